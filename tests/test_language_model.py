"""Encoder pretraining: the sampled softmax, the bidirectional language model, and fine-tuning from it."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from gru_nlp.encoder import ENCODER_PARAMETERS, EncoderError, load_encoder, save_encoder
from gru_nlp.language_model import BiGRULanguageModel, SampledSoftmax
from gru_nlp.lit import LitClassifier

REPO = Path(__file__).resolve().parents[1]


def test_the_sampled_softmax_is_exact_outside_training():
    torch.manual_seed(0)
    softmax = SampledSoftmax(5, 11, num_sampled=4).eval()
    inputs, targets = torch.randn(7, 5), torch.randint(0, 11, (7,))
    expected = F.cross_entropy(inputs @ softmax.weight.T + softmax.bias, targets)
    torch.testing.assert_close(softmax(inputs, targets), expected)


def test_a_large_sample_estimates_the_full_softmax():
    torch.manual_seed(0)
    softmax = SampledSoftmax(5, 11, num_sampled=200_000)
    softmax.set_class_counts(torch.arange(11) * 100)  # skewed: the correction for sampling odds matters
    inputs, targets = torch.randn(7, 5), torch.randint(0, 11, (7,))
    exact = softmax.eval()(inputs, targets)
    torch.testing.assert_close(softmax.train()(inputs, targets), exact, rtol=0.01, atol=0)


def test_a_sample_equal_to_the_target_is_not_scored_against_it():
    torch.manual_seed(0)
    softmax = SampledSoftmax(5, 11, num_sampled=8)
    counts = torch.zeros(11)
    counts[3] = 1e12  # every sample is class 3 (the others have odds of about 1e-9)
    softmax.set_class_counts(counts)
    inputs = torch.randn(6, 5, requires_grad=True)
    loss = softmax(inputs, torch.full((6,), 3))
    loss.backward()
    # Scored against copies of itself the loss would be log 2; with them left out, only the target is left.
    assert loss.item() == 0.0
    assert torch.isfinite(inputs.grad).all() and torch.isfinite(softmax.weight.grad).all()


def _train(model: BiGRULanguageModel, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, scored=None) -> float:
    """Train on the batches in turn; return the exact loss on `scored` (default: the first batch)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    model.train()
    for step in range(steps):
        input_ids, lengths = batches[step % len(batches)]
        loss = model(input_ids, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return model.eval()(*(scored or batches[0])).item()


def _sequences(rows: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows past their lengths with 0."""
    positions = torch.arange(rows.size(1))
    return rows.masked_fill(positions >= lengths[:, None], 0), lengths


def test_the_language_model_learns_what_comes_next_and_what_came_before():
    torch.manual_seed(0)
    # Tokens 2..11 in a cycle from a random start: each token fixes both neighbours.
    starts = torch.randint(0, 10, (16, 1))
    rows = 2 + (starts + torch.arange(12)) % 10  # (16, 12)
    batch = _sequences(rows, torch.randint(2, 13, (16,)))
    model = BiGRULanguageModel(12, embedding_dim=8, hidden_size=16, num_sampled=6)
    model.set_token_counts(torch.bincount(batch[0].flatten(), minlength=12))
    assert _train(model, [batch], steps=150) < 0.1


def test_neither_direction_reads_the_token_it_predicts():
    torch.manual_seed(0)
    # Independent uniform tokens: on texts it has not seen, nothing better than log 10 nats
    # is possible, unless a direction's state has already read its target (as a second
    # stacked layer would). The same training on the cycle above reaches 0.1.
    batches = [_sequences(torch.randint(2, 12, (16, 12)), torch.randint(2, 13, (16,))) for _ in range(5)]
    model = BiGRULanguageModel(12, embedding_dim=8, hidden_size=16, num_sampled=6)
    loss = _train(model, batches[1:], steps=150, scored=batches[0])
    assert loss > 0.95 * math.log(10)


def test_texts_of_one_token_predict_nothing_and_still_train():
    model = BiGRULanguageModel(12, embedding_dim=8, hidden_size=16, num_sampled=6)
    loss = model(torch.tensor([[5], [7]]), torch.tensor([1, 1]))
    loss.backward()
    assert loss.item() == 0.0
    # Every parameter still gets a (zero) gradient, as DDP's reducer expects at every step.
    assert all(parameter.grad is not None and not parameter.grad.any() for parameter in model.parameters())


@pytest.fixture
def encoder_file(tmp_path: Path) -> tuple[Path, object]:
    from gru_nlp.tokenizer import train_tokenizer

    from conftest import TINY_TEXTS

    tokenizer = train_tokenizer([text for text, _ in TINY_TEXTS] * 3, vocab_size=60, min_frequency=1)
    torch.manual_seed(0)
    model = BiGRULanguageModel(tokenizer.get_vocab_size(), embedding_dim=8, hidden_size=6)
    path = tmp_path / "encoder.pt"
    save_encoder(model, tokenizer.to_str(), path)
    return path, tokenizer


def _classifier(tokenizer, path: Path | None, hidden_size: int = 6) -> LitClassifier:
    return LitClassifier(tokenizer.get_vocab_size(), 2, embedding_dim=8, hidden_size=hidden_size, num_layers=2, encoder_path=path)


def test_fine_tuning_starts_from_the_pretrained_embedding_and_first_layer(encoder_file):
    path, tokenizer = encoder_file
    torch.manual_seed(1)
    lit = _classifier(tokenizer, path)
    untouched = {name: value.clone() for name, value in lit.model.named_parameters()}
    with pytest.warns(UserWarning, match="no data module with a tokenizer"):  # (the command's test checks it)
        lit.setup("fit")
    weights = load_encoder(path)["weights"]
    parameters = dict(lit.model.named_parameters())
    for name in ENCODER_PARAMETERS:
        torch.testing.assert_close(parameters[name], weights[name], rtol=0, atol=0)
    # The second layer, pooling and head keep their fresh initialisation.
    assert all(torch.equal(parameters[name], untouched[name]) for name in parameters if name not in ENCODER_PARAMETERS)

    # Once only: a second fit of the same module goes on from what the first one trained.
    with torch.no_grad():
        parameters["embedding.weight"].add_(1.0)
    trained = parameters["embedding.weight"].clone()
    path.unlink()
    lit.setup("fit")
    lit.setup("validate")  # and only fit reads the file
    assert torch.equal(parameters["embedding.weight"], trained)


def test_each_direction_is_scored_on_the_neighbour_it_has_not_read():
    torch.manual_seed(0)
    model = BiGRULanguageModel(20, embedding_dim=4, hidden_size=3)
    scored = []
    model.softmax.forward = lambda predictors, targets: scored.append((predictors, targets)) or predictors.sum()
    input_ids, lengths = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]), torch.tensor([4, 2])
    model(input_ids, lengths)
    predictors, targets = scored[0]
    states = model.gru(model.embedding(input_ids), lengths)  # (B, T, 2H): [left-to-right, right-to-left]
    forward, backward = states[..., :3], states[..., 3:]
    expected = [
        (forward[0, 0], 6), (forward[0, 1], 7), (forward[0, 2], 8), (forward[1, 0], 10),  # state after t -> token t+1
        (backward[0, 1], 5), (backward[0, 2], 6), (backward[0, 3], 7), (backward[1, 1], 9),  # state from t on -> token t-1
    ]  # fmt: skip
    assert targets.tolist() == [token for _, token in expected]
    torch.testing.assert_close(predictors, torch.stack([state for state, _ in expected]))


@pytest.mark.filterwarnings("ignore:no data module with a tokenizer")
def test_an_encoder_that_does_not_fit_the_model_is_named(encoder_file, tmp_path):
    path, tokenizer = encoder_file
    with pytest.raises(EncoderError, match=r"gru.weight_ih_l0 is \(18, 8\) there and \(21, 8\) in the model"):
        _classifier(tokenizer, path, hidden_size=7).setup("fit")
    with pytest.raises(EncoderError, match="no such file"):
        _classifier(tokenizer, tmp_path / "missing.pt").setup("fit")
    with pytest.raises(EncoderError, match=r"has \d+ token embeddings and the model 99: .*--data.tokenizer_path"):
        LitClassifier(99, 2, embedding_dim=8, hidden_size=6, encoder_path=path).setup("fit")
    checkpoint_like = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, checkpoint_like)
    with pytest.raises(EncoderError, match="not a file written by save_encoder"):
        load_encoder(checkpoint_like)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(EncoderError, match="not a file written by save_encoder"):
        load_encoder(truncated)
    text = tmp_path / "tokenizer.json"
    text.write_text('{"version": "1.0"}')
    with pytest.raises(EncoderError, match="not a file written by save_encoder") as not_torch:
        load_encoder(text)
    assert "\n" not in str(not_torch.value)  # one line, without torch's advice on weights_only
    diverged = torch.load(path, weights_only=True)
    diverged["weights"]["gru.weight_hh_l0"][0, 0] = float("nan")
    torch.save(diverged, tmp_path / "diverged.pt")
    with pytest.raises(EncoderError, match="gru.weight_hh_l0 hold NaN or infinite values"):
        load_encoder(tmp_path / "diverged.pt")


def _run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_pretrain_then_fine_tune_with_the_gru_nlp_command(tmp_path):
    tiny = str(REPO / "tests/fixtures/tiny")
    pretrained = tmp_path / "pretrain"
    sizes = ["--embedding-dim", "16", "--hidden-size", "16", "--vocab-size", "300"]  # as configs/tiny.yaml
    result = _run("scripts/pretrain_imdb.py", "--data", tiny, "--splits", "train", "test", "--out", str(pretrained), *sizes)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/loss" in result.stdout
    fit = [
        "-m", "gru_nlp.cli", "fit", "--config", "configs/tiny.yaml", "--data.path", tiny,
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.max_epochs", "1", "--model.encoder_path", str(pretrained / "encoder.pt"),
    ]  # fmt: skip

    # With the data's own tokenizer, the embedding rows would mean other tokens.
    refused = _run(*fit)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"gru-nlp: error: pretrained encoder {pretrained / 'encoder.pt'} was trained with another tokenizer than "
        "the data's: pass --data.tokenizer_path with the tokenizer.json saved beside it"
    )

    fitted = _run(*fit, "--data.tokenizer_path", str(pretrained / "tokenizer.json"))
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    shutil.copy(pretrained / "encoder.pt", tmp_path / "another_encoder.pt")
    (pretrained / "encoder.pt").unlink()  # the checkpoint holds the weights: it serves without the file
    from gru_nlp import TextClassifier

    checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
    prediction = TextClassifier.from_checkpoint(checkpoint, device="cpu").predict("a wonderful film")
    assert prediction.label in ("neg", "pos")
    # Nor does resuming the fit: the checkpoint replaces the weights the encoder started.
    resumed = _run(*fit, "--data.tokenizer_path", str(pretrained / "tokenizer.json"), "--ckpt_path", str(checkpoint), "--trainer.max_epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # --ckpt_path last finds that run without the encoder (gone now) named again.
    without_encoder = fit[: fit.index("--model.encoder_path")]
    resumed_last = _run(*without_encoder, "--data.tokenizer_path", str(pretrained / "tokenizer.json"), "--ckpt_path", "last",
                        "--trainer.max_epochs", "3")  # fmt: skip
    assert resumed_last.returncode == 0, resumed_last.stderr[-3000:]
    assert "Resuming from" in resumed_last.stdout + resumed_last.stderr
    # Given, the encoder must match: a run started from another encoder is another run.
    another = _run(*without_encoder, "--data.tokenizer_path", str(pretrained / "tokenizer.json"), "--ckpt_path", "last",
                   "--model.encoder_path", str(tmp_path / "another_encoder.pt"), "--trainer.max_epochs", "3")  # fmt: skip
    assert another.returncode == 2 and "differs in model.encoder_path" in another.stderr, another.stderr[-3000:]


@pytest.mark.parametrize("arguments", [["--lr", "-1"], ["--max-length", "1"]])
def test_pretraining_refuses_bad_arguments_before_touching_its_output(tmp_path, arguments):
    (tmp_path / "tokenizer.json").write_text("an earlier run's")
    result = _run("scripts/pretrain_imdb.py", "--data", str(REPO / "tests/fixtures/tiny"), "--out", str(tmp_path), *arguments)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pretrain_imdb.py: error: --" in result.stderr.strip().splitlines()[-1]
    assert (tmp_path / "tokenizer.json").read_text() == "an earlier run's"


def test_a_pretraining_that_diverges_writes_no_nan_encoder(tmp_path):
    sizes = ["--embedding-dim", "8", "--hidden-size", "8", "--vocab-size", "200", "--max-length", "32", "--batch-size", "8"]
    arguments = ["--data", str(REPO / "tests/fixtures/tiny"), "--splits", "train", "test", "--out", str(tmp_path), *sizes]
    result = _run("scripts/pretrain_imdb.py", *arguments, "--lr", "1e30", "--epochs", "2")
    assert result.returncode == 2 and "training diverged (try a lower --lr)" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "encoder.pt").exists()


def test_pretraining_names_a_split_the_data_does_not_have(tmp_path):
    result = _run("scripts/pretrain_imdb.py", "--data", str(REPO / "tests/fixtures/tiny"), "--splits", "unsup", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("pretrain_imdb: error: ")
    assert "no split 'unsup'; it has test, train" in result.stderr


def test_train_imdb_reports_a_missing_encoder_in_one_line(tmp_path):
    missing = tmp_path / "encoder.pt"
    result = _run(
        "scripts/train_imdb.py", "--config", "configs/tiny.yaml", "--data.path", str(REPO / "tests/fixtures/tiny"),
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--model.encoder_path", str(missing),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"train_imdb: error: pretrained encoder {missing}: no such file"


def test_train_imdb_without_a_test_split_stops_before_training(tmp_path):
    result = _run(
        "scripts/train_imdb.py", "--config", "configs/tiny.yaml", "--data.path", str(REPO / "tests/fixtures/tiny"),
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.test_split", "null",
    )  # fmt: skip
    assert result.returncode == 2 and not (tmp_path / "run" / "lightning_logs").exists()
    assert result.stderr.strip().splitlines()[-1] == "train_imdb: error: this script scores the test split after training: set --data.test_split"


def test_load_texts_names_a_missing_text_column_and_its_split(tmp_path):
    from gru_nlp.data import DataError, load_texts

    (tmp_path / "train.jsonl").write_text('{"review": "a fine film", "label": 1}\n')
    with pytest.raises(DataError, match=r"train.jsonl \(split 'train'\) has no column 'text' \(columns: review, label\)"):
        load_texts(str(tmp_path), ["train"], cache_dir=str(tmp_path / "cache"))
    assert load_texts(str(tmp_path), ["train"], text_field="review", cache_dir=str(tmp_path / "cache")) == ["a fine film"]


def test_train_imdb_names_itself_and_label_names_in_a_label_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (REPO / f"tests/fixtures/tiny/{split}.jsonl").read_text().splitlines()]
        text = "".join(json.dumps({"text": row["text"], "label": row["label"] + "itive"}) + "\n" for row in rows)
        (data / f"{split}.jsonl").write_text(text)  # "negitive" and "positive": not imdb.yaml's neg and pos
    result = _run(
        "scripts/train_imdb.py", "--config", "configs/tiny.yaml", "--data.path", str(data),
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 2 and "not recommended to provide both args" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train_imdb: error: label ") and "is not one of the classes ['neg', 'pos'] that label_names gives" in last


def test_train_imdb_checks_its_output_folder_before_reading_data(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = _run(
        "scripts/train_imdb.py", "--config", "configs/tiny.yaml", "--data.path", str(REPO / "tests/fixtures/tiny"),
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "a_file"),
    )  # fmt: skip
    assert result.returncode == 2 and not (tmp_path / "cache").exists()  # refused before any data was read
    assert result.stderr.strip().splitlines()[-1].startswith(f"train_imdb: error: the output folder {tmp_path / 'a_file'}")
