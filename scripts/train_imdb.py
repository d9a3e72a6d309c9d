"""Train on IMDB, then score every epoch's checkpoint on the test set: time-to-accuracy on test.

This is `gru-nlp fit` followed by `gru-nlp test`, plus a table of when each test accuracy
was reached, counted from the start of this script (data loading and tokenizer training
included). The test set is only scored after training: it never steers the run.

    python scripts/train_imdb.py --data.path ../shared/data/imdb
    python scripts/train_imdb.py --data.path ../shared/data/imdb --config configs/cpu_ddp.yaml   # 2 CPU processes
    python scripts/train_imdb.py --data.path ../shared/data/imdb --model.hidden_size 192           # any CLI override
    # from a pretrained encoder (scripts/pretrain_imdb.py):
    python scripts/train_imdb.py --data.path ../shared/data/imdb \
        --data.tokenizer_path runs/pretrain/tokenizer.json --model.encoder_path runs/pretrain/encoder.pt
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from pathlib import Path

START = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]  # configs/ is found from any working folder

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from torchmetrics.functional.classification import multiclass_f1_score  # noqa: E402

from gru_nlp.checkpoint import load_checkpoint  # noqa: E402
from gru_nlp.data import DataError  # noqa: E402
from gru_nlp.lightning_cli import SIGTERM_EXIT_STATUS, USER_ERRORS, run_cli  # noqa: E402
from gru_nlp.lit import LitClassifier  # noqa: E402


class ValidationLog(L.Callback):
    """Each validation's metrics and wall time (minutes from the script's start), by optimizer step:
    a checkpoint saved then has the same `global_step`, however many validations an epoch has."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.by_step[trainer.global_step] = {name: float(metrics[name]) for name in ("val/acc", "val/loss")}
            self.by_step[trainer.global_step]["minutes"] = (time.perf_counter() - START) / 60


def main(argv: list[str]) -> None:
    validations = ValidationLog()
    # The arguments are this script's own, passed on: LightningCLI's warning about giving both is moot.
    warnings.filterwarnings("ignore", message=".*not recommended to provide both args and command line arguments")
    cli = run_cli(
        ["--config", str(REPO / "configs/imdb.yaml"), "--checkpoint.save_top_k", "-1", *argv],
        program="train_imdb",
        extra_callbacks=[validations],
        run=False,
    )
    try:
        if cli.datamodule.hparams.test_split is None:
            raise DataError("this script scores the test split after training: set --data.test_split")
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one process per machine encodes, as fit's prepare_data does
            cli.datamodule.setup("test")  # a test split it cannot score fails now, not after training
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except USER_ERRORS as err:  # as the gru-nlp command reports them
        print(f"train_imdb: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:  # a SystemExit with status 0 from Lightning; last.ckpt was saved (the line above)
        print(
            "train_imdb: stopped by SIGTERM. This script does not resume: resume the fit with `gru-nlp fit --config "
            "configs/imdb.yaml` plus this run's options and --ckpt_path <that last.ckpt>, then score its checkpoints "
            "with `gru-nlp test`",
            file=sys.stderr,
        )
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
    fit_minutes = (time.perf_counter() - START) / 60
    checkpoint = cli.trainer.checkpoint_callback
    print(f"fit finished after {fit_minutes:.1f} min (tokenizer, encoding and all epochs); best: {checkpoint.best_model_path}")

    if not cli.trainer.is_global_zero:
        return  # other DDP processes are done; the test set is scored once, in one process
    if not checkpoint.best_k_models:
        sys.exit("train_imdb: no checkpoint was saved (no validation ran), so there is nothing to score")

    # Score each checkpoint on every test example exactly once: a plain loop over the test
    # loader, in this one process, on the device it trained on (all the CPU's cores after CPU DDP).
    device = cli.trainer.strategy.root_device
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    data = cli.datamodule
    data.setup("test")
    rows = []
    for path in checkpoint.best_k_models:
        saved = load_checkpoint(path)
        epoch, step = saved["epoch"], saved["global_step"]
        model = LitClassifier.load_from_checkpoint(path, map_location=device).eval()
        predictions, labels = [], []
        with torch.inference_mode():
            for batch in data.test_dataloader():
                predictions.append(model(batch["input_ids"].to(device), batch["lengths"].to(device)).argmax(-1).cpu())
                labels.append(batch["labels"])
        predictions, labels = torch.cat(predictions), torch.cat(labels)
        test_acc = (predictions == labels).float().mean().item()
        test_f1 = multiclass_f1_score(predictions, labels, model.hparams.num_classes, average="macro").item()
        val = validations.by_step.get(step, {})
        rows.append((step, epoch, val.get("minutes", math.nan), val.get("val/acc", math.nan), val.get("val/loss", math.nan), test_acc, test_f1, path))
        print(f"scored epoch {epoch} (step {step}) on {len(labels)} test examples: acc {test_acc:.4f}", flush=True)
    rows.sort()
    print(f"\n{'epoch':>5} {'step':>6} {'minutes':>8} {'val/acc':>8} {'val/loss':>9} {'test/acc':>9} {'test/f1':>8}")
    for step, epoch, minutes, val_acc, val_loss, test_acc, test_f1, _ in rows:
        print(f"{epoch:>5} {step:>6} {minutes:>8.1f} {val_acc:>8.4f} {val_loss:>9.6f} {test_acc:>9.4f} {test_f1:>8.4f}")
    (best,) = [row for row in rows if row[-1] == checkpoint.best_model_path]
    print(
        f"\nbest by {checkpoint.monitor}: epoch {best[1]} (step {best[0]}): test/acc {best[5]:.4f} (test/f1 {best[6]:.4f}), "
        f"fit {fit_minutes:.1f} min"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
