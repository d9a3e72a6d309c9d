"""Load a gru-nlp Lightning checkpoint safely, and rebuild the model and tokenizer from it.

A checkpoint is a pickle, and unpickling can run any code the file names. So the file is
only ever read with ``torch.load(weights_only=True)``, whose restricted unpickler builds
tensors, containers and numbers and refuses everything else; nothing here falls back to
``weights_only=False``. Every way a file can be wrong ends in a ``CheckpointError`` (a
``ValueError``) or ``FileNotFoundError`` whose message names the path and the problem.

This module imports torch and tokenizers only (not Lightning), so serving stays light.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from gru_nlp.model import BiGRUClassifier
from gru_nlp.tokenizer import TRUNCATIONS

# Everything inference needs besides the weights lives under this key of a checkpoint
# (LitClassifier writes it); this module reads checkpoints without importing Lightning.
CHECKPOINT_KEY = "gru_nlp"
CHECKPOINT_FORMAT = 1
# BiGRUClassifier's constructor arguments, as LitClassifier saves them in hyper_parameters.
MODEL_ARGUMENTS = (
    "vocab_size",
    "num_classes",
    "embedding_dim",
    "hidden_size",
    "num_layers",
    "bidirectional",
    "dropout",
    "embedding_dropout",
    "pooling",
    "pad_id",
)
# Added later, with defaults that reproduce older models: older checkpoints lack them.
OPTIONAL_ARGUMENTS = ("recurrent_dropout", "ngram_buckets", "ngram_order", "ngram_features")


class CheckpointError(ValueError):
    """The file exists but is not a usable gru-nlp checkpoint; the message says why."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without running code from it, and check it is a gru-nlp checkpoint.

    Args:
        path: a ``.ckpt`` saved by Lightning from ``LitClassifier``.

    Returns:
        The checkpoint dict, with ``hyper_parameters``, ``state_dict`` and the
        ``"gru_nlp"`` inference entry checked (the tokenizer JSON and the weights are checked
        by ``build_model``).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: not a checkpoint, truncated or corrupt, a pickle that asks to run
            code (refused), not saved by gru-nlp, an unknown format version, or a label
            map that does not fit the model.
    """
    if not str(path):
        raise FileNotFoundError("no checkpoint path given")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a regular file (a device or a pipe), not a checkpoint file")
    checkpoint = _safe_torch_load(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict")
    extras = checkpoint.get(CHECKPOINT_KEY)
    hparams = checkpoint.get("hyper_parameters")
    if {"format", "tokenizer", "weights"} <= checkpoint.keys() and "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path}: is a pretrained encoder (scripts/pretrain_imdb.py), not a classifier checkpoint: "
            "fine-tune from it with `gru-nlp fit --model.encoder_path`"
        )
    if not isinstance(extras, dict) or not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path}: not a gru-nlp checkpoint (it needs 'hyper_parameters', 'state_dict' and a "
            f"{CHECKPOINT_KEY!r} entry, as saved by LitClassifier after fitting with TextDataModule)"
        )
    version = extras.get("format_version")
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: unknown gru-nlp checkpoint format_version {version!r}; this version of gru-nlp "
            f"reads format {CHECKPOINT_FORMAT}"
        )
    missing = [name for name in MODEL_ARGUMENTS if name not in hparams]
    if missing:
        raise CheckpointError(f"{path}: hyper_parameters lack {', '.join(missing)}")
    for name in ("tokenizer", "max_length", "truncation"):
        if extras.get(name) is None:
            raise CheckpointError(
                f"{path}: the {CHECKPOINT_KEY!r} entry has no {name!r}; the model was saved without "
                "its tokenizer settings (fit it with a data module that has a tokenizer)"
            )
    labels = extras.get("label_names")
    num_classes = hparams["num_classes"]
    if (
        not isinstance(labels, list)
        or not all(isinstance(label, str) for label in labels)
        or len(set(labels)) != len(labels)
    ):
        raise CheckpointError(f"{path}: label_names must be a list of distinct strings, got {labels!r}")
    if len(labels) != num_classes:
        raise CheckpointError(f"{path}: {len(labels)} label names for a model with num_classes={num_classes}")
    integer_labels = extras.get("integer_labels")  # absent in checkpoints saved before it was recorded
    if integer_labels is not None and not (
        isinstance(integer_labels, dict)
        and all(isinstance(value, int) and isinstance(i, int) and 0 <= i < num_classes for value, i in integer_labels.items())
    ):
        raise CheckpointError(
            f"{path}: integer_labels must map integer labels to class ids 0..{num_classes - 1}, got {integer_labels!r:.200}"
        )
    max_length = extras["max_length"]
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise CheckpointError(f"{path}: max_length must be a positive integer, got {max_length!r}")
    if extras["truncation"] not in TRUNCATIONS:
        raise CheckpointError(f"{path}: truncation must be one of {TRUNCATIONS}, got {extras['truncation']!r}")
    return checkpoint


def build_model(
    checkpoint: dict[str, Any], source: str | Path = "checkpoint"
) -> tuple[BiGRUClassifier, Tokenizer, list[str], int, str]:
    """Rebuild the classifier (in eval mode, on CPU) and its tokenizer from a loaded checkpoint.

    Args:
        checkpoint: as returned by ``load_checkpoint``.
        source: where it came from, for error messages (usually its path).

    Returns:
        (model, tokenizer, label_names, max_length, truncation).

    Raises:
        CheckpointError: the tokenizer JSON does not parse, or the weights do not fit the
            model the hyper-parameters describe (missing keys or shape mismatch).
    """
    hparams, extras = checkpoint["hyper_parameters"], checkpoint[CHECKPOINT_KEY]
    tokenizer = stored_tokenizer(checkpoint, source)
    # encode truncates and the classifier pads; settings saved in the JSON would interfere.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    if tokenizer.get_vocab_size() > hparams["vocab_size"]:
        raise CheckpointError(
            f"{source}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
            f"vocab_size is {hparams['vocab_size']}"
        )
    try:
        arguments = {name: hparams[name] for name in MODEL_ARGUMENTS}
        arguments.update({name: hparams[name] for name in OPTIONAL_ARGUMENTS if name in hparams})
        model = BiGRUClassifier(**arguments)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: hyper_parameters do not describe a valid model ({error})") from None
    # Lightning prefixes the wrapped module's weights with "model."; the rest (loss weights,
    # metric states) belongs to training.
    prefix = "model."
    state_dict = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise CheckpointError(f"{source}: the weights do not fit the model described by hyper_parameters: {detail}") from None
    broken = non_finite_weights(state_dict)
    if broken:  # every prediction would be NaN, or the first class
        raise CheckpointError(f"{source}: {', '.join(broken)} hold NaN or infinite values (its training diverged)")
    model.eval()
    return model, tokenizer, list(extras["label_names"]), extras["max_length"], extras["truncation"]


def non_finite_weights(state_dict: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``state_dict`` that hold a NaN or an infinity."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()
    ]


def refuse_a_diverged_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Raise CheckpointError if a checkpoint about to be saved holds NaN or infinite weights: the
    averaged ones (``state_dict``) or, with weight averaging, the trained ones (``current_model_state``)."""
    broken = non_finite_weights(checkpoint.get("state_dict", {})) + non_finite_weights(checkpoint.get("current_model_state", {}))
    if broken:
        raise CheckpointError(
            f"training diverged: at epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}, "
            f"{', '.join(broken[:3])}{' and more' if len(broken) > 3 else ''} hold NaN or infinite values. "
            "No checkpoint was written from this point; those saved before are kept. Lower --model.lr, or clip "
            "gradients (--trainer.gradient_clip_val)"
        )


def stored_tokenizer(checkpoint: dict[str, Any], source: str | Path = "checkpoint") -> Tokenizer:
    """The tokenizer saved in a checkpoint loaded by ``load_checkpoint``.

    Raises:
        CheckpointError: its JSON does not parse (named by ``source``, usually the path).
    """
    try:
        return Tokenizer.from_str(checkpoint[CHECKPOINT_KEY]["tokenizer"])
    except Exception as error:  # tokenizers raises its own Exception type for bad JSON
        raise CheckpointError(f"{source}: the stored tokenizer is corrupt and does not parse ({error})") from None


def _safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with each failure turned into a CheckpointError."""
    try:
        with warnings.catch_warnings():
            # Legacy-format fallbacks warn on garbage input; the error below says it better.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: the file's pickle asks to import {refused.group(1)}, which "
                "could run code. gru-nlp loads checkpoints with torch.load(weights_only=True) and never "
                "executes code from a file; re-save the checkpoint from plain tensors and containers"
            ) from None
        # torch.save writes a zip archive; a file that starts like one but does not load
        # was cut short or damaged, whatever the exception says.
        with path.open("rb") as file:
            damaged = file.read(4) in (b"PK\x03\x04", b"")
        if damaged:
            raise CheckpointError(f"{path}: the checkpoint is truncated or corrupt ({type(error).__name__})") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(error).__name__})") from None
