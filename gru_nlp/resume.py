"""A checkpoint named on the command line: what it brings to the command, and which last.ckpt resumes a run.

A checkpoint's weights only mean something with the tokenizer, label names and truncation they
were trained with, and its scores only with the validation rows its fit held out: scoring it
(`gru-nlp validate|test|predict --ckpt_path F`) or resuming its fit (`gru-nlp fit --ckpt_path F`)
takes those from the checkpoint. A resumed fit keeps its model settings, and `--ckpt_path last`
finds the newest ``last.ckpt`` of an earlier run with this run's settings.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
from pathlib import Path
from typing import Any

import yaml

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from gru_nlp.checkpoint import CHECKPOINT_KEY, CheckpointError, load_checkpoint, stored_tokenizer
from gru_nlp.data import DataError, tokenizer_cache_folder
from gru_nlp.lit import LitClassifier
from gru_nlp.tokenizer import load_tokenizer, save_tokenizer

_LAST_CHECKPOINT = re.compile(r"last(-\d+)?\.ckpt")
# Data settings that a resumed run may change: where files live, how many workers read them,
# and the evaluation batch size; the tokenizer is compared by content.
_SETTINGS_THAT_KEEP_A_RUN = {"cache_dir", "num_workers", "tokenizer_path", "eval_batch_size"}
# Model settings a resumed run may leave out or change: the pretrained encoder only started the
# weights, which the checkpoint now holds; the rest are linked from the data.
MODEL_SETTINGS_FROM_DATA_OR_FIRST_FIT = {"encoder_path", "vocab_size", "num_classes", "label_names", "pad_id"}
# Data settings that decide which training rows a carved validation split holds: scoring or
# resuming a checkpoint with others would validate on rows it trained on.
_CARVE_SETTINGS = ("train_split", "val_size", "val_carve", "seed")


def read_ckpt_path(ckpt_path: str) -> dict:
    """LightningCLI reads --ckpt_path with torch.load straight after parsing; read it first, so that a
    missing, truncated or foreign file gets a line naming it, not a traceback."""
    if Path(ckpt_path).is_dir():
        raise CheckpointError(f"--ckpt_path {ckpt_path} is a folder: name a .ckpt file (`gru-nlp fit` prints the best one's path)")
    try:
        return load_checkpoint(ckpt_path)  # names a device or pipe, and a truncated or foreign file
    except FileNotFoundError:
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file") from None


def adopt_the_checkpoints_encoding(data: Any, checkpoint: dict, ckpt_path: str) -> None:
    """Set the data config to the checkpoint's tokenizer, label names, max_length and truncation.

    A checkpoint's weights only mean something with the tokenizer and the label names they were
    trained with: not a tokenizer trained (or cached) anew, whose ids may differ while its size
    still fits the weights, nor label names read from the data, whose order may differ (every
    prediction would be swapped). Text is cut as it was in training (and is when served), or the
    scores would describe other inputs than the model sees in use.
    """
    stored = _checkpoint_tokenizer(checkpoint, ckpt_path, data.cache_dir)
    if data.tokenizer_path is None:
        data.tokenizer_path = stored
    elif _tokenizer_json(data.tokenizer_path) != load_tokenizer(stored).to_str():
        raise CheckpointError(
            f"{ckpt_path}: was trained with another tokenizer than --data.tokenizer_path {data.tokenizer_path}; "
            "leave --data.tokenizer_path out to use the checkpoint's own"
        )
    trained_labels = list(checkpoint[CHECKPOINT_KEY]["label_names"])
    if data.label_names is None:
        data.label_names = trained_labels
    elif list(data.label_names) != trained_labels:
        raise CheckpointError(
            f"{ckpt_path}: was trained with the labels {trained_labels} (class ids in that order), not "
            f"--data.label_names {list(data.label_names)}; leave --data.label_names out to use the checkpoint's"
        )
    for setting in ("max_length", "truncation"):
        trained, configured = checkpoint[CHECKPOINT_KEY][setting], getattr(data, setting)
        if configured != trained:
            rank_zero_info(f"Using the checkpoint's data.{setting} {trained!r}, not {configured!r}: it was trained with it")
            setattr(data, setting, trained)


def adopt_the_checkpoints_carve(data: Any, trained_data: dict) -> None:
    """On the fit's own data, a validation split carved from training must be the one the fit held out
    (when scoring a checkpoint, and when resuming its fit)."""
    same_data = _same_source(trained_data.get("path"), data.path) and trained_data.get("name") == data.name
    if not same_data:
        return
    trained_split = trained_data.get("val_split")
    if data.val_split is None and trained_split is not None:  # else a carve would take rows the fit trained on
        rank_zero_info(f"Using the checkpoint's data.val_split {trained_split!r}, not None: its fit validated on that split")
        data.val_split = trained_split
    if data.val_split is not None:  # a named split: no carve, and no training rows in it
        return
    for setting in _CARVE_SETTINGS:
        trained, configured = trained_data.get(setting), getattr(data, setting)
        if trained is not None and configured != trained:
            rank_zero_info(
                f"Using the checkpoint's data.{setting} {trained!r}, not {configured!r}: a validation split "
                "carved from training must hold the rows that fit held out"
            )
            setattr(data, setting, trained)


def check_resumed_model_settings(configured: Any, trained: dict, ckpt_path: str) -> None:
    """A resumed fit keeps its checkpoint's model settings (LightningCLI puts them in the config):
    refuse a setting given another value, rather than drop it unsaid. A setting at its default
    may just not have been given (resuming without the fit's --config): a line names those."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(LitClassifier).parameters.items()}
    names = differing_model_settings(configured, trained)
    at_default = [name for name in names if configured[name] == defaults.get(name)]
    if at_default:
        kept = ", ".join(f"{name} {trained[name]!r}" for name in at_default)
        rank_zero_info(f"Resuming with the checkpoint's model settings, not the defaults: {kept}")
    changed = [
        f"model.{name} {configured[name]!r} (trained with {trained[name]!r})"
        for name in names
        if configured[name] != defaults.get(name)
    ]
    if changed:
        raise CheckpointError(
            f"--ckpt_path {ckpt_path}: resuming keeps the checkpoint's model settings, but this command sets "
            f"{', '.join(changed)}; leave them out to resume, or leave out --ckpt_path to start a new run"
        )


def differing_model_settings(configured: Any, trained: dict) -> list[str]:
    """The model settings configured otherwise than a checkpoint was trained with, leaving out those
    derived from the data (linked from it) or read only by a first fit (`encoder_path`)."""
    names = sorted(trained.keys() - MODEL_SETTINGS_FROM_DATA_OR_FIRST_FIT)
    return [name for name in names if name in configured and configured[name] != trained[name]]


def _same_source(first: str | None, second: str | None) -> bool:
    """Whether two `data.path` values name the same data: the same local file or folder, or the same Hub id."""
    if first is None or second is None:
        return first == second
    local = Path(first).expanduser(), Path(second).expanduser()
    if all(path.exists() for path in local):
        return local[0].resolve() == local[1].resolve()
    return first == second


def _run_settings(model_hparams: dict, data_hparams: dict, seed: Any) -> dict[str, Any]:
    """What makes two fits the same run, by CLI name: the seed, and the model and data settings."""
    settings = {f"model.{name}": value for name, value in model_hparams.items()}
    settings.update({f"data.{name}": value for name, value in data_hparams.items() if name not in _SETTINGS_THAT_KEEP_A_RUN})
    if seed is not None:
        settings["seed_everything"] = seed
    return settings


def _saved_seed(checkpoint_path: Path) -> Any:
    """The seed in the config.yaml LightningCLI saved beside a checkpoint's run, or None if there is none."""
    config = checkpoint_path.parent.parent / "config.yaml"
    try:
        return yaml.safe_load(config.read_text()).get("seed_everything")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _tokenizer_json(path: str) -> str:
    """The tokenizer saved at ``--data.tokenizer_path``, as JSON; a one-line error if it cannot be loaded."""
    try:
        return load_tokenizer(path).to_str()
    except (OSError, ValueError) as err:
        raise DataError(f"--data.tokenizer_path: {err}") from None


def _checkpoint_tokenizer(checkpoint: dict, ckpt_path: str, cache_dir: str | None) -> str:
    """Write the tokenizer stored in a checkpoint to the tokenizer cache; return the file's path."""
    key = hashlib.sha256(checkpoint[CHECKPOINT_KEY]["tokenizer"].encode()).hexdigest()[:16]
    path = tokenizer_cache_folder(cache_dir) / f"checkpoint-{key}.json"
    if not path.exists():
        save_tokenizer(stored_tokenizer(checkpoint, ckpt_path), path)
    return str(path)


def last_checkpoint_of_this_run(
    trainer: Trainer, model_hparams: Any, data_hparams: Any, seed: Any, tokenizer_json: str
) -> str | None:
    """The newest ``last.ckpt`` of an earlier version with this run's settings, or None if there is none.

    ``tokenizer_json`` is this run's tokenizer (`Tokenizer.to_str()`), ``seed`` its seed_everything.
    Runs with another seed or other model or data settings (an ablation beside this one
    under the same root folder) are passed over, with a line saying so: resuming them
    would continue the wrong run. If every ``last.ckpt`` found is such a run, that is an
    error naming the newest and what differs, rather than a silent fresh start.

    Raises:
        CheckpointError: no match among the checkpoints found; a ``last.ckpt`` newer than
            the match cannot be read (truncated, corrupt or not a gru-nlp checkpoint); or the
            match was trained with another tokenizer than the cached one this run has.
    """
    folders = [Path(callback.dirpath) for callback in trainer.checkpoint_callbacks if callback.dirpath]
    logger = trainer.logger
    if logger is not None and logger.save_dir is not None:
        folders += Path(logger.save_dir, logger.name or "").glob("*/checkpoints")
    else:
        folders.append(Path(trainer.default_root_dir, "checkpoints"))
    found = [path for folder in folders for path in folder.glob("last*.ckpt") if _LAST_CHECKPOINT.fullmatch(path.name)]
    ours = _run_settings(model_hparams, data_hparams, seed)
    skipped = []
    for path in sorted(found, key=os.path.getmtime, reverse=True):
        try:
            checkpoint = load_checkpoint(path)
        except FileNotFoundError:  # deleted since the search found it
            continue
        except CheckpointError as error:  # whose run it was cannot be told: resuming an older one, or none, would lose it
            raise CheckpointError(
                f"--ckpt_path last: {error}. Pass --ckpt_path with another checkpoint to resume from "
                f"({_other_checkpoints(path)}), move the file away if it is another run's, or leave out "
                "--ckpt_path to start afresh"
            ) from None
        theirs = _run_settings(
            checkpoint["hyper_parameters"], checkpoint.get("datamodule_hyper_parameters", {}), _saved_seed(path)
        )
        names = ours.keys() | theirs.keys()
        if "seed_everything" not in theirs:  # no config.yaml beside it: the seed is unknown, not different
            names.discard("seed_everything")
        if ours.get("model.encoder_path") is None:  # a resume may leave the encoder out; given, it must match
            names.discard("model.encoder_path")
        changed = sorted(name for name in names if ours.get(name) != theirs.get(name))
        if checkpoint[CHECKPOINT_KEY]["tokenizer"] != tokenizer_json:
            if data_hparams.get("tokenizer_path") is None and not changed:
                raise CheckpointError(
                    f"{path}: was trained with another tokenizer than this run's (the tokenizer cache "
                    "was cleared, or the training data changed); resume it with --ckpt_path set to "
                    "this file, which brings its own tokenizer"
                )
            changed.append("the tokenizer")
        if not changed:
            return str(path)
        rank_zero_info(f"Not resuming {path}: it has other settings ({', '.join(changed)})")
        skipped.append((path, changed))
    if skipped:
        path, changed = skipped[0]
        raise CheckpointError(
            f"--ckpt_path last: no last.ckpt under {trainer.default_root_dir} has this run's settings; "
            f"the newest, {path}, differs in {', '.join(changed)}. Pass --ckpt_path {path} to resume "
            "it anyway, or leave out --ckpt_path to start afresh"
        )
    return None


def _other_checkpoints(path: Path) -> str:
    """The checkpoints saved beside ``path``, newest first, for an error message."""
    others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=os.path.getmtime, reverse=True)
    return f"beside it: {', '.join(p.name for p in others)}" if others else "none is saved beside it"


def keep_checkpoints_in_the_resumed_folders(trainer: Trainer, ckpt_path: str) -> None:
    """Write a resumed run's checkpoints where the run wrote them before.

    A ModelCheckpoint restores its best-so-far (score, path, top k) only into the folder it
    saved them from; in this run's new version_N folder it would start afresh and call the
    first epoch after the resume the best, however much worse than an earlier one. (A run
    moved to another folder since has that problem still; Lightning warns of it.)
    """
    states = load_checkpoint(ckpt_path).get("callbacks", {})
    here = Path(ckpt_path).resolve().parent
    for callback in trainer.checkpoint_callbacks:
        recorded = (states.get(callback.state_key) or {}).get("dirpath")
        # Only the folder the checkpoint is in: a run moved since keeps to its new folders.
        if callback.dirpath is None and recorded and Path(recorded).resolve() == here:
            callback.dirpath = recorded  # as recorded: Lightning compares the strings
