"""LightningCLI for ``gru-nlp fit|validate|test|predict``: argument links, checkpoint defaults, safe stops.

What a checkpoint given with ``--ckpt_path`` brings to the command, and which ``last.ckpt``
resumes a run, is `gru_nlp.resume`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from gru_nlp.allocator import keep_freed_memory
from gru_nlp.callbacks import (
    AtomicCheckpointIO,
    EpochSummary,
    OutputFolderError,
    PredictionWriter,
    Preflight,
    ResumeCheckpoint,
    check_output_folder,
)
from gru_nlp.checkpoint import CHECKPOINT_KEY, CheckpointError
from gru_nlp.data import DataError, TextDataModule
from gru_nlp.encoder import EncoderError
from gru_nlp.lit import LitClassifier
from gru_nlp.model import SettingError
from gru_nlp.resume import (
    MODEL_SETTINGS_FROM_DATA_OR_FIRST_FIT,
    adopt_the_checkpoints_carve,
    adopt_the_checkpoints_encoding,
    check_resumed_model_settings,
    differing_model_settings,
    keep_checkpoints_in_the_resumed_folders,
    last_checkpoint_of_this_run,
    read_ckpt_path,
)

# The exit status of a process ended by SIGTERM (128 + 15), as shells report it.
SIGTERM_EXIT_STATUS = 143
# --ckpt_path values that Lightning resolves itself rather than reading as a file.
_LIGHTNING_CKPT_NAMES = {"best", "last", "hpc", "registry"}
# Subcommands that score a trained model, so need its checkpoint.
_SCORING_SUBCOMMANDS = {"validate", "test", "predict"}
# What unusable data, folders, checkpoints, encoders or settings raise: one line each, not a traceback.
USER_ERRORS = (OutputFolderError, CheckpointError, DataError, EncoderError, SettingError, MisconfigurationException)
# Precisions that cast the weights themselves to 16 bits (Lightning's "-true" plugins).
_HALF_WEIGHT_PRECISIONS = {"16-true", "bf16-true"}


class GruNlpCLI(LightningCLI):
    """LightningCLI with the data-derived sizes linked into the model, a best checkpoint and a resumable last one."""

    def add_arguments_to_parser(self, parser) -> None:
        # Derived from the data (after the tokenizer is trained or loaded), never typed twice.
        for source, target in [
            ("data.vocab_size", "model.vocab_size"),
            ("data.num_classes", "model.num_classes"),
            ("data.label_names", "model.label_names"),
            ("data.pad_id", "model.pad_id"),
        ]:
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                # last.ckpt belongs to `autosave`: this callback would write it only when val/acc improves.
                "checkpoint.save_last": False,
                "checkpoint.filename": "epoch{epoch:02d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ResumeCheckpoint, "autosave")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._trained_integer_labels: dict[int, int] | None = None  # a --ckpt_path's, for the data module
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        _refuse_scoring_an_untrained_model(subcommand, ckpt_path)
        seed = config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 2**32:
            raise SettingError(f"seed_everything must be from 0 to 2**32 - 1 (or true for a random one), got {seed}")
        if subcommand == "fit" and ckpt_path == "best":
            raise CheckpointError(
                "gru-nlp fit --ckpt_path best names the best checkpoint of a fit earlier in the same process; "
                "to resume a run pass --ckpt_path last, or the .ckpt file to start from"
            )
        if not ckpt_path or ckpt_path in _LIGHTNING_CKPT_NAMES or str(ckpt_path).startswith("registry:"):
            return
        checkpoint = read_ckpt_path(ckpt_path)
        adopt_the_checkpoints_encoding(config.data, checkpoint, ckpt_path)
        self._trained_integer_labels = checkpoint[CHECKPOINT_KEY].get("integer_labels")  # older checkpoints: None
        trained_model = checkpoint.get("hyper_parameters", {})
        if subcommand == "fit":
            check_resumed_model_settings(config.model, trained_model, ckpt_path)
        elif subcommand in _SCORING_SUBCOMMANDS:
            differing = differing_model_settings(config.model, trained_model)
            if differing:  # LightningCLI puts the checkpoint's settings in the config: say so
                shown = ", ".join(f"{name} {trained_model[name]!r} (not {config.model[name]!r})" for name in differing)
                rank_zero_info(f"Scoring with the checkpoint's model settings: {shown}")
        # A resumed fit, too: on another carve it would validate on rows it has trained on.
        adopt_the_checkpoints_carve(config.data, checkpoint.get("datamodule_hyper_parameters", {}))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # no subcommand with run=False
        if str(config.trainer.precision) in _HALF_WEIGHT_PRECISIONS:
            raise SettingError(
                f"--trainer.precision {config.trainer.precision} casts the weights to half precision, which the GRU "
                "does not support; use bf16-mixed (or 16-mixed on a GPU): half-precision compute, fp32 weights"
            )
        # Lightning would say so only after the data is loaded and the tokenizer trained (minutes on IMDB).
        accelerator = str(config.trainer.accelerator)
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            if not (accelerator == "gpu" and torch.backends.mps.is_available()):
                raise SettingError(
                    f"--trainer.accelerator {accelerator}: torch sees no CUDA GPU here "
                    f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use auto or cpu"
                )
        # Fail before the data is loaded and the tokenizer trained (minutes on IMDB), not after.
        # No subcommand: built with run=False to fit from a script (scripts/train_imdb.py).
        if self.subcommand not in ("fit", None):
            return
        folders = [config.trainer.default_root_dir or os.getcwd(), config.checkpoint.dirpath, config.autosave.dirpath]
        for folder in filter(None, folders):
            check_output_folder(folder)
        _check_model_settings(config.model)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Not a data setting (the config holds none of it): what the checkpoint recorded of its training data.
        if isinstance(self.datamodule, TextDataModule):
            self.datamodule.trained_integer_labels = self._trained_integer_labels

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Keep a checkpoint IO the user chose (async, remote); replace only Lightning's default.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        # Lightning looks for "last" only in this run's checkpoint folder, and every run gets a
        # new version_N folder, so a plain `--ckpt_path last` would silently start afresh.
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            found = last_checkpoint_of_this_run(
                self.trainer,
                self.model.hparams,
                self.datamodule.hparams,
                config.seed_everything,
                self.datamodule.tokenizer.to_str(),
            )
            if found is not None:
                rank_zero_info(f"Resuming from {found}")
            else:  # as a resume loop's first run needs; Lightning's own warning would blame save_last
                rank_zero_info(f"--ckpt_path last: no last.ckpt under {self.trainer.default_root_dir} yet; starting a new run")
            config["ckpt_path"] = found
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in _LIGHTNING_CKPT_NAMES and Path(ckpt_path).is_file():
            keep_checkpoints_in_the_resumed_folders(self.trainer, ckpt_path)
            self.model.encoder_pending = False  # the checkpoint holds the weights the encoder started

    def after_fit(self) -> None:
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        if best:
            rank_zero_info(f"best checkpoint: {best}")
            return
        last = [callback.last_model_path for callback in self.trainer.checkpoint_callbacks if callback.last_model_path]
        kept = f"; the last state is in {last[0]}" if last else ""
        rank_zero_info(f"best checkpoint: (none kept: no validation ran, or --checkpoint.save_top_k is 0){kept}")


def _check_model_settings(model: Any) -> None:
    """Build the model once with stand-in sizes, so that a setting out of range (`--model.num_layers 0`)
    fails before the data is read and the tokenizer trained, not after; the sizes come from the data."""
    settings = {name: value for name, value in dict(model).items() if name not in MODEL_SETTINGS_FROM_DATA_OR_FIRST_FIT}
    class_weights = settings.get("class_weights")
    LitClassifier(vocab_size=8, num_classes=len(class_weights) if class_weights else 2, **settings)


def _refuse_scoring_an_untrained_model(subcommand: str | None, ckpt_path: str | None) -> None:
    if subcommand in _SCORING_SUBCOMMANDS and (not ckpt_path or ckpt_path in _LIGHTNING_CKPT_NAMES):
        # Lightning would go on with the freshly initialised model (for "best" and "last"
        # after a one-line warning: they name checkpoints of a fit in this same process).
        given = f"--ckpt_path {ckpt_path}" if ckpt_path else "no --ckpt_path"
        raise CheckpointError(
            f"gru-nlp {subcommand} with {given} would score an untrained model: "
            "pass --ckpt_path <a .ckpt file> (`gru-nlp fit` prints the best one's path)"
        )


def run_cli(args: list[str] | None = None, program: str = "gru-nlp", **kwargs) -> GruNlpCLI:
    """Build (and by default run) the CLI with the project's defaults; kwargs go to LightningCLI.

    ``args`` are the command-line arguments after the program name; None reads ``sys.argv``.
    ``program`` names the command in error messages.

    Unusable data, output folder, checkpoint, pretrained encoder, model setting or trainer setting (Lightning's
    MisconfigurationException: an accelerator this machine lacks) exits with status 2 and a one-line message; a SIGTERM during
    ``fit`` exits with status 143 after `ResumeCheckpoint` saved ``last.ckpt``.
    """
    keep_freed_memory()
    callbacks = [EpochSummary(), Preflight(), PredictionWriter(), *kwargs.pop("extra_callbacks", [])]
    try:
        return GruNlpCLI(
            LitClassifier,
            TextDataModule,
            args=args,
            seed_everything_default=42,
            trainer_defaults={"callbacks": callbacks},
            save_config_kwargs={"overwrite": True},
            **kwargs,
        )
    except USER_ERRORS as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit with status 0: a scheduler would think the run finished.
        print(
            f"{program}: stopped by SIGTERM. A fit saved last.ckpt first (see the line above); "
            "run the same command with --ckpt_path last to resume.",
            file=sys.stderr,
        )
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
