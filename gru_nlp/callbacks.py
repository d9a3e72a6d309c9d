"""Lightning callbacks: a per-epoch summary with elapsed time."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class EpochSummary(L.Callback):
    """Logs ``time/elapsed_min`` and prints one line per validation, so time-to-accuracy can be read off.

    The clock starts when ``fit`` starts, so data loading and tokenizer training done before
    it are not counted here; scripts that need the full wall time measure it themselves.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not hasattr(self, "start"):
            return
        elapsed_min = (time.perf_counter() - self.start) / 60
        pl_module.log("time/elapsed_min", elapsed_min, rank_zero_only=True)
        metrics = trainer.callback_metrics
        shown = "  ".join(
            f"{name} {metrics[name].item():.4f}" for name in ("val/acc", "val/f1", "val/loss", "train/loss") if name in metrics
        )
        rank_zero_info(f"epoch {trainer.current_epoch}  step {trainer.global_step}  {shown}  elapsed {elapsed_min:.1f} min")
