"""Lightning callbacks and the checkpoint writer: epoch summary, predictions file, weight averaging (EMA),
preflight checks, resumable and atomic checkpoints.

How Lightning 2.6 behaves, read from its source, and what this module changes:

- SIGTERM: Lightning's handler only sets ``trainer.received_sigterm``; after the current batch
  the loops raise ``SIGTERMException``, a ``SystemExit`` with no code, so the process exits
  with status 0 and saves nothing unless a callback does. `ResumeCheckpoint` saves
  ``last.ckpt`` there, and ``run_cli`` turns the exception into exit status 143.
- ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only at a step where it also wrote
  a top-k file, so with ``monitor`` set, ``last.ckpt`` stays at the best epoch, not the last
  one. `ResumeCheckpoint` owns ``last.ckpt`` instead and rewrites it every few minutes or
  steps and after every validation.
- ``TorchCheckpointIO`` writes through an fsspec transaction: a temporary file from
  ``tempfile.mkstemp()`` in the system temp folder, then ``shutil.move``. When that folder is
  on another file system (a tmpfs ``/tmp``, a mounted output disk) the move is a copy into
  the target, and a kill during it leaves half a checkpoint under its real name.
  `AtomicCheckpointIO` writes beside the target and renames.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gru_nlp.checkpoint import CheckpointError
from gru_nlp.files import atomic_write

# A checkpoint holds the weights and AdamW's two moment estimates, each the size of the weights.
CHECKPOINT_COPIES_OF_WEIGHTS = 3
# Hyperparameters, the tokenizer and the loop state ride along; generous for a large vocabulary.
CHECKPOINT_OVERHEAD_BYTES = 8 * 2**20
# With save_top_k=-1, the free-space check counts one checkpoint per epoch up to this many.
MOST_EPOCHS_COUNTED = 10


class OutputFolderError(OSError):
    """An output folder cannot be created or written, or its disk is too full for the checkpoints."""


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
        self.elapsed_min = (time.perf_counter() - self.start) / 60
        pl_module.log("time/elapsed_min", self.elapsed_min, rank_zero_only=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Printed here, after the module's own on_validation_epoch_end has logged (LitClassifier
        # scores validation there once side weights are fitted), not in the hook above.
        if trainer.sanity_checking or not hasattr(self, "elapsed_min"):
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(
            f"{name} {metrics[name].item():.4f}" for name in ("val/acc", "val/f1", "val/loss", "train/loss") if name in metrics
        )
        rank_zero_info(f"epoch {trainer.current_epoch}  step {trainer.global_step}  {shown}  elapsed {self.elapsed_min:.1f} min")


class PredictionWriter(L.Callback):
    """Writes what ``predict`` computes to ``predictions.jsonl`` in the run folder, one line per text.

    Lines are in the data's row order (batches come longest first; ``batch["index"]`` puts
    them back), each ``{"row", "text", "label", "score", "probs"}``: the text's row in its
    split as loaded (rows without text are skipped, so numbers may jump), then as
    ``gru-nlp classify`` prints them. A data module without ``predict_texts`` gives
    ``{"index", "label", "score", "probs"}``. Under DDP every process writes the rows it
    scored to ``predictions-rank<N>.jsonl``.
    """

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows: list[tuple[int, list[float]]] = []

    def on_predict_batch_end(
        self, trainer, pl_module, outputs: dict, batch: dict, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        probs = outputs["probs"].tolist()
        # Batches without an index (another data module's) are numbered in the order they come.
        first = len(self.rows)
        indices = outputs["index"].tolist() if "index" in outputs else range(first, first + len(probs))
        self.rows += zip(indices, probs, strict=True)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        name = "predictions.jsonl" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.jsonl"
        path = folder / name
        source = trainer.datamodule.predict_texts() if hasattr(trainer.datamodule, "predict_texts") else None
        labels = pl_module.label_names
        with atomic_write(path) as file:  # a reader never sees half a file
            for index, probs in sorted(self.rows):
                best = max(range(len(probs)), key=probs.__getitem__)
                line = {"index": index} if source is None else {"row": source[0][index], "text": source[1][index]}
                line |= {"label": labels[best], "score": probs[best], "probs": dict(zip(labels, probs, strict=True))}
                file.write(json.dumps(line, ensure_ascii=False) + "\n")
        print(f"predictions: {path} ({len(self.rows)} texts)")


class WeightEMA(EMAWeightAveraging):
    """Validates, checkpoints and finishes with an exponential moving average of the weights.

    Lightning's ``EMAWeightAveraging`` with one change: buffers are copied from the trained model
    instead of averaged, since ours hold facts, not weights: the bag's log-count ratios (counted
    when training starts) and the side weights (fitted at the end of each validation, which runs
    with the averaged weights, so they fit the model that is saved). A checkpoint's ``state_dict``
    holds the average; ``current_model_state`` the trained weights, from which a resumed fit goes on.

    ``--trainer.callbacks+=gru_nlp.callbacks.WeightEMA --trainer.callbacks.decay 0.999``
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1) -> None:
        super().__init__(use_buffers=False, decay=decay, update_every_n_steps=update_every_n_steps)

    def _copy_buffers(self, pl_module: L.LightningModule) -> None:
        if self._average_model is not None:
            for averaged, trained in zip(self._average_model.module.buffers(), pl_module.buffers(), strict=True):
                averaged.copy_(trained)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._copy_buffers(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._copy_buffers(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._copy_buffers(pl_module)
        super().on_train_end(trainer, pl_module)


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """An estimate of one training checkpoint's size: weights, optimizer state, buffers and overhead."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())  # the n-gram bag's log-count ratios
    return CHECKPOINT_COPIES_OF_WEIGHTS * weights + buffers + CHECKPOINT_OVERHEAD_BYTES


def checkpoints_on_disk(trainer: L.Trainer) -> int:
    """How many checkpoint files a fit may keep at once: every callback's top k, last.ckpt, and one being written.

    ``save_top_k=-1`` keeps one file per validation: counted as one per epoch, at most
    ``MOST_EPOCHS_COUNTED`` (a run bounded by steps has ``max_epochs`` -1, and one bounded by
    nothing Lightning's 1000), since this check is there to fail early on a disk that is
    clearly too small, not to refuse a long run.
    """
    kept = 0
    for callback in trainer.checkpoint_callbacks:
        top_k = getattr(callback, "save_top_k", 1)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else MOST_EPOCHS_COUNTED
        kept += top_k if top_k >= 0 else min(epochs, MOST_EPOCHS_COUNTED)
    return kept + 2


def check_output_folder(
    folder: str | os.PathLike, needed_bytes: int = 0, option: str = "--trainer.default_root_dir (or --checkpoint.dirpath)"
) -> None:
    """Create `folder` if needed, and check that a file can be written there and that `needed_bytes` fit.

    Remote folders (``s3://...``) are left to their file system. `option` is the flag that chooses
    the folder, named in the fix.

    Raises:
        OutputFolderError: naming the folder, the cause and the fix.
    """
    if "://" in str(folder):
        return
    folder = Path(folder).expanduser().absolute()
    fix = f"choose another folder with {option}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Write a real file: permission bits say nothing for root or on read-only mounts.
        with tempfile.TemporaryFile(dir=folder, prefix=".gru-nlp-write-test"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputFolderError(
            f"the output folder {folder} cannot be created or written ({reason}): "
            f"{fix}, or make it writable"
        ) from err
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OutputFolderError(
            f"the output folder {folder} has {_megabytes(free)} free, but the checkpoints need about "
            f"{_megabytes(needed_bytes)}: free some space there, or {fix} on a larger disk"
        )


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MB"


class Preflight(L.Callback):
    """Before `fit` writes anything, check that the run and checkpoint folders are writable and roomy.

    Runs in ``setup``, ahead of LightningCLI's config saving and the checkpoint callbacks (Lightning
    moves those last), so a bad folder fails in seconds with the folder and the fix named, not
    after an epoch with a traceback from inside ``torch.save``. Every rank checks, so all fail alike.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        needed = checkpoints_on_disk(trainer) * checkpoint_bytes(pl_module)
        folders = {trainer.default_root_dir, trainer.log_dir}
        # A checkpoint callback without a dirpath writes under log_dir, checked above.
        folders |= {callback.dirpath for callback in trainer.checkpoint_callbacks if callback.dirpath}
        for folder in sorted(str(f) for f in folders if f):
            check_output_folder(folder, needed)


class ResumeCheckpoint(ModelCheckpoint):
    """Keep ``last.ckpt`` current so that a killed run loses little: ``gru-nlp fit ... --ckpt_path last``.

    Writes ``last.ckpt`` (in the same folder as the best checkpoints) every `every_n_minutes`
    of training, or every `every_n_train_steps` when that is set; after every validation; at
    the end; and when Lightning stops on SIGTERM, after the batch in flight. A SIGKILL (or a
    power cut) loses at most the steps since the last write.

    Only SIGTERM triggers a save among exceptions: it stops at a batch boundary, while an error
    or Ctrl-C can land inside an optimizer step and would overwrite a good ``last.ckpt`` with
    half-updated weights.

    Args:
        every_n_minutes: Minutes of training between writes; None for none.
        every_n_train_steps: Optimizer steps between writes; replaces `every_n_minutes` when set.
        dirpath: The folder; None for the run's ``checkpoints/`` folder, as ModelCheckpoint does.
    """

    def __init__(
        self,
        every_n_minutes: float | None = 5.0,
        every_n_train_steps: int | None = None,
        dirpath: str | None = None,
    ) -> None:
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise ValueError(f"every_n_minutes must be positive or null, got {every_n_minutes}")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be at least 1 or null, got {every_n_train_steps}")
        interval = None if every_n_train_steps or every_n_minutes is None else timedelta(minutes=every_n_minutes)
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,  # no top-k files: only last.ckpt
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=interval,
            # Overwrite last.ckpt in place; the counter would write last-v1.ckpt beside a
            # last.ckpt left by a best-checkpoint callback with save_last=True.
            enable_version_counter=False,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == TrainerFn.FITTING:
            kept = f"{self.last_model_path} holds the last save" if self.last_model_path else "no last.ckpt was saved yet"
            rank_zero_info(
                f"Interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}: {kept} (Ctrl-C can land "
                "inside a step, so nothing is saved now; SIGTERM saves first). Resume with `gru-nlp fit` and the "
                "same settings plus --ckpt_path last"
            )
            return
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        try:
            self._save_last_now(trainer)
        except CheckpointError as error:  # diverged: keep the last good save, and still stop as SIGTERM asks
            rank_zero_info(f"Stopped by SIGTERM; not saved: {error}")
            return
        rank_zero_info(
            f"Stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"saved {self.last_model_path}. Resume with the same command plus "
            f"--ckpt_path {self.last_model_path} (or --ckpt_path last)"
        )

    def _save_last_now(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside its target, sync it, then rename it into place.

    ``os.replace`` within one folder is atomic, so a reader (or a resume after a kill) sees the
    old checkpoint or the new one, never half of one; a kill mid-write leaves only a
    ``.<name>.*.tmp`` file, which ``--ckpt_path last`` does not match. Remote paths go
    through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(Path(path), binary=True, sync=True) as file:
            torch.save(checkpoint, file)

