"""LightningCLI for ``gru-nlp fit|validate|test|predict``: argument links and checkpoint defaults."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from gru_nlp.callbacks import EpochSummary
from gru_nlp.data import TextDataModule
from gru_nlp.lit import LitClassifier


class GruNlpCLI(LightningCLI):
    """LightningCLI with the data-derived sizes linked into the model and a best-checkpoint callback."""

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
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def after_fit(self) -> None:
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        rank_zero_info(f"best checkpoint: {best or '(none saved)'}")


def run_cli(args: list[str], **kwargs) -> GruNlpCLI:
    """Build (and by default run) the CLI with the project's defaults; kwargs go to LightningCLI."""
    callbacks = [EpochSummary(), *kwargs.pop("extra_callbacks", [])]
    return GruNlpCLI(
        LitClassifier,
        TextDataModule,
        args=args,
        seed_everything_default=42,
        trainer_defaults={"callbacks": callbacks},
        save_config_kwargs={"overwrite": True},
        **kwargs,
    )
