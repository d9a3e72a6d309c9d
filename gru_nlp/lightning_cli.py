"""LightningCLI for ``gru-nlp fit|validate|test|predict``: argument links, checkpoint defaults, safe stops."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gru_nlp.allocator import keep_freed_memory
from gru_nlp.callbacks import (
    AtomicCheckpointIO,
    EpochSummary,
    OutputFolderError,
    Preflight,
    ResumeCheckpoint,
    check_output_folder,
)
from gru_nlp.data import TextDataModule
from gru_nlp.lit import LitClassifier

# The exit status of a process ended by SIGTERM (128 + 15), as shells report it.
SIGTERM_EXIT_STATUS = 143
_LAST_CHECKPOINT = re.compile(r"last(-\d+)?\.ckpt")


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

    def before_instantiate_classes(self) -> None:
        # Fail before the data is loaded and the tokenizer trained (minutes on IMDB), not after.
        if self.subcommand != "fit":
            return
        config = self.config[self.subcommand]
        folders = [config.trainer.default_root_dir or os.getcwd(), config.checkpoint.dirpath, config.autosave.dirpath]
        for folder in filter(None, folders):
            check_output_folder(folder)

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
            found = self._newest_last_checkpoint()
            if found is not None:
                config["ckpt_path"] = found
                rank_zero_info(f"Resuming from {found}")

    def after_fit(self) -> None:
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        rank_zero_info(f"best checkpoint: {best or '(none saved)'}")

    def _newest_last_checkpoint(self) -> str | None:
        """The newest ``last.ckpt`` of any earlier version of this run, or None."""
        trainer = self.trainer
        folders = [Path(callback.dirpath) for callback in trainer.checkpoint_callbacks if callback.dirpath]
        logger = trainer.logger
        if logger is not None and logger.save_dir is not None:
            folders += Path(logger.save_dir, logger.name or "").glob("*/checkpoints")
        else:
            folders.append(Path(trainer.default_root_dir, "checkpoints"))
        found = [path for folder in folders for path in folder.glob("last*.ckpt") if _LAST_CHECKPOINT.fullmatch(path.name)]
        return str(max(found, key=os.path.getmtime)) if found else None


def run_cli(args: list[str] | None = None, **kwargs) -> GruNlpCLI:
    """Build (and by default run) the CLI with the project's defaults; kwargs go to LightningCLI.

    ``args`` are the command-line arguments after the program name; None reads ``sys.argv``.

    An unusable output folder exits with status 2 and a one-line message; a SIGTERM during
    ``fit`` exits with status 143 after `ResumeCheckpoint` saved ``last.ckpt``.
    """
    keep_freed_memory()
    callbacks = [EpochSummary(), Preflight(), *kwargs.pop("extra_callbacks", [])]
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
    except OutputFolderError as err:
        print(f"gru-nlp: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit with status 0: a scheduler would think the run finished.
        print(
            "gru-nlp: stopped by SIGTERM. A fit saved last.ckpt first (see the line above); "
            "run the same command with --ckpt_path last to resume.",
            file=sys.stderr,
        )
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
