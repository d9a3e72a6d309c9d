"""Checkpoints load without running code, and every kind of bad file gives a clear error."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gru_nlp import checkpoint as ckpt
from gru_nlp.checkpoint import CheckpointError, build_model, load_checkpoint


def resave(source: Path, target: Path, mutate: Callable[[dict], None]) -> Path:
    """Copy a checkpoint with ``mutate`` applied to its dict."""
    data = torch.load(source, weights_only=True)
    mutate(data)
    torch.save(data, target)
    return target


class RunsCode:
    """Unpickling this would create a marker file (if anything ran it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_real_lightning_checkpoint_loads_weights_only(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    model, tokenizer, labels, max_length, truncation = build_model(checkpoint)
    assert labels == ["neg", "neu", "pos"]
    assert (max_length, truncation) == (9, "head_tail")
    assert not model.training
    assert tokenizer.get_vocab_size() <= model.embedding.num_embeddings
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, checkpoint["state_dict"][f"model.{name}"])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_checkpoint(tmp_path / "nowhere.ckpt")


def test_directory_and_special_files_are_named_for_what_they_are(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    for special in ("/dev/null", tmp_path / "pipe"):
        with pytest.raises(CheckpointError, match=r"is not a regular file \(a device or a pipe\)"):
            load_checkpoint(special)


def test_no_path_and_a_pretrained_encoder_file_are_named_for_what_they_are(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint path given"):
        load_checkpoint("")
    torch.save({"format": 1, "tokenizer": "{}", "weights": {}}, tmp_path / "encoder.pt")  # as pretrain_imdb.py saves
    with pytest.raises(CheckpointError, match="is a pretrained encoder .* --model.encoder_path"):
        load_checkpoint(tmp_path / "encoder.pt")


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused.*system"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (os.urandom(2000), "not a PyTorch checkpoint"),
        (b"epoch: 3\nthis is a text file\n", "not a PyTorch checkpoint"),
        (b"", "truncated or corrupt"),
    ],
    ids=["random-bytes", "text-file", "empty-file"],
)
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_truncated_checkpoint(tiny_checkpoint, tmp_path):
    path = tmp_path / "cut.ckpt"
    data = tiny_checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_plain_state_dict_is_not_a_gru_nlp_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not a gru-nlp checkpoint"):
        load_checkpoint(path)


def _set(section: str, key: str, value) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data[section][key] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set("gru_nlp", "format_version", 99), "unknown gru-nlp checkpoint format_version 99"),
        (_set("gru_nlp", "label_names", ["neg", "pos"]), "2 label names for a model with num_classes=3"),
        (_set("gru_nlp", "label_names", ["neg", "neg", "pos"]), "distinct strings"),
        (_set("gru_nlp", "label_names", ["neg", 1, "pos"]), "distinct strings"),
        (_set("gru_nlp", "max_length", 0), "max_length"),
        (_set("gru_nlp", "truncation", "tail"), "truncation"),
        (lambda data: data["gru_nlp"].pop("tokenizer"), "no 'tokenizer'"),
        (lambda data: data["hyper_parameters"].pop("hidden_size"), "lack hidden_size"),
        (_set("gru_nlp", "integer_labels", [0, 1, 2]), "integer_labels must map integer labels to class ids 0..2"),
        (_set("gru_nlp", "integer_labels", {0: 0, 1: 3}), "integer_labels must map"),
    ],
    ids=["format", "label-count", "label-duplicate", "label-type", "max-length", "truncation", "no-tokenizer", "hparam",
         "integer-labels-type", "integer-labels-id"],  # fmt: skip
)
def test_bad_metadata(tiny_checkpoint, tmp_path, mutate, message):
    path = resave(tiny_checkpoint, tmp_path / "bad.ckpt", mutate)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set("gru_nlp", "tokenizer", '{"version": "1.0", "model": {"type": "Wor'), "tokenizer is corrupt"),
        (_set("hyper_parameters", "hidden_size", 7), "weights do not fit"),
        (_set("hyper_parameters", "pooling", "sum"), "do not describe a valid model"),
        (lambda data: data["state_dict"]["model.classifier.bias"].fill_(float("nan")), "classifier.bias hold NaN or infinite"),
    ],
    ids=["tokenizer", "shape-mismatch", "bad-pooling", "diverged-weights"],
)
def test_bad_contents_found_when_building(tiny_checkpoint, tmp_path, mutate, message):
    path = resave(tiny_checkpoint, tmp_path / "bad.ckpt", mutate)
    with pytest.raises(CheckpointError, match=message):
        build_model(load_checkpoint(path), source=path)


def test_every_model_argument_is_read_back_from_a_checkpoint():
    # A BiGRUClassifier argument missing here would be served at its default, whatever it was trained with.
    import inspect

    from gru_nlp.checkpoint import MODEL_ARGUMENTS, OPTIONAL_ARGUMENTS
    from gru_nlp.model import BiGRUClassifier

    assert sorted(MODEL_ARGUMENTS + OPTIONAL_ARGUMENTS) == sorted(inspect.signature(BiGRUClassifier).parameters)


def test_a_checkpoint_to_save_with_diverged_trained_weights_is_refused_even_when_the_average_is_finite():
    finite, diverged = {"model.w": torch.ones(3)}, {"model.w": torch.tensor([1.0, float("nan"), 1.0])}
    ckpt.refuse_a_diverged_checkpoint({"state_dict": finite, "current_model_state": finite})  # no error
    for checkpoint in ({"state_dict": diverged}, {"state_dict": finite, "current_model_state": diverged}):  # WeightEMA's
        with pytest.raises(CheckpointError, match=r"training diverged: .*model\.w hold NaN or infinite values"):
            ckpt.refuse_a_diverged_checkpoint({"epoch": 1, "global_step": 9, **checkpoint})
