"""The gru-nlp command: shipped configs parse, fit -> test on the tiny config, and DDP on 2 CPU processes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gru_nlp.checkpoint import load_checkpoint
from gru_nlp.cli import main
from gru_nlp.lightning_cli import _check_model_settings

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def gru_nlp(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "gru_nlp.cli", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


# Each shipped config as it is used: cpu_ddp.yaml is an overlay on another.
SHIPPED = [[config] for config in CONFIGS if config.name != "cpu_ddp.yaml"] + [[REPO / "configs/imdb.yaml", REPO / "configs/cpu_ddp.yaml"]]


@pytest.mark.parametrize("configs", SHIPPED, ids=["+".join(config.name for config in configs) for configs in SHIPPED])
def test_every_shipped_config_parses_to_its_settings_and_builds_its_model(configs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(argument for config in configs for argument in ("--config", str(config))), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = {}
    for config in configs:  # the later file's values win
        for section, settings in yaml.safe_load(config.read_text()).items():
            expected[section] = {**expected.get(section, {}), **settings} if isinstance(settings, dict) else settings
    for section, settings in expected.items():
        if isinstance(settings, dict):
            assert {name: printed[section][name] for name in settings} == settings, section
        else:
            assert printed[section] == settings, section
    _check_model_settings(printed["model"])  # the model builds with these settings (stand-in sizes from the data)


def tiny_args(root: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs/tiny.yaml"),
        "--data.path", str(REPO / "tests/fixtures/tiny"),
        "--data.cache_dir", str(root / "cache"),
        "--trainer.default_root_dir", str(root / "run"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def test_fit_then_test_on_the_tiny_config(tmp_path):
    fit = gru_nlp("fit", *tiny_args(tmp_path))
    best = [line for line in (fit.stdout + fit.stderr).splitlines() if line.startswith("best checkpoint: ")]
    assert best, "fit must print the best checkpoint's path"
    best_path = Path(best[-1].removeprefix("best checkpoint: ").strip())
    assert best_path.is_file()
    assert (best_path.parent / "last.ckpt").is_file()

    checkpoint = load_checkpoint(best_path)
    assert checkpoint["gru_nlp"]["label_names"] == ["neg", "pos"]
    assert checkpoint["hyper_parameters"]["num_classes"] == 2

    tested = gru_nlp("test", *tiny_args(tmp_path), "--ckpt_path", str(best_path))
    assert "test/acc" in tested.stdout


def test_ddp_on_two_cpu_processes_writes_a_loadable_checkpoint(tmp_path):
    gru_nlp(
        "fit", *tiny_args(tmp_path),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "2",
        "--data.eval_batch_size", "5",  # 24 validation texts: 3 batches on one rank, 2 on the other
        "--model.ngram_buckets", "4096",  # side weights fitted on all ranks' validation logits
    )  # fmt: skip
    last = next((tmp_path / "run").rglob("last.ckpt"))
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] > 0
    assert checkpoint["state_dict"]["model.side_weights"].tolist() != [1.0, 1.0]  # fitted across both processes
    from gru_nlp import TextClassifier

    prediction = TextClassifier.from_checkpoint(last, device="cpu").predict("a wonderful film")
    assert prediction.label in ("neg", "pos")
    torch.testing.assert_close(sum(prediction.probs.values()), 1.0, rtol=0, atol=1e-5)


def test_train_imdb_script_scores_every_checkpoint_and_names_its_pick(tmp_path):
    command = [
        sys.executable, str(REPO / "scripts/train_imdb.py"), *tiny_args(tmp_path),
        "--model.ngram_buckets", "4096", "--trainer.max_epochs", "2", "--trainer.val_check_interval", "0.5",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:2] == ["epoch", "step"] and "test/acc" in line))
    table = [line.split() for line in lines[header + 1 : header + 5]]  # two validations, so two checkpoints, per epoch
    assert [row[0] for row in table] == ["0", "0", "1", "1"]
    assert [int(row[1]) for row in table] == sorted({int(row[1]) for row in table})  # each its own step
    losses = {row[1]: float(row[4]) for row in table}
    (picked,) = re.findall(r"best by val/loss: epoch \d+ \(step (\d+)\): test/acc", result.stdout)
    assert losses[picked] == min(losses.values())  # imdb.yaml keeps the lowest val/loss (printed to 6 places)


def test_help_names_classify_beside_the_lightning_subcommands():
    shown = "".join(gru_nlp("--help").stdout.split())  # argparse wraps lines, even inside a word
    assert "`gru-nlpclassify--help`" in shown and "{fit,validate,test,predict}" in shown
