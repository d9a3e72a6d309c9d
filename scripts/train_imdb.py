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

import os
import sys
import time
from pathlib import Path

START = time.perf_counter()

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import multiclass_f1_score  # noqa: E402

from gru_nlp.callbacks import OutputFolderError  # noqa: E402
from gru_nlp.checkpoint import CheckpointError  # noqa: E402
from gru_nlp.data import DataError  # noqa: E402
from gru_nlp.language_model import EncoderError  # noqa: E402
from gru_nlp.lightning_cli import run_cli  # noqa: E402
from gru_nlp.lit import LitClassifier  # noqa: E402


class EpochLog(L.Callback):
    """Remembers each epoch's validation metrics and the wall time, from the script's start, of its checkpoint."""

    def __init__(self) -> None:
        self.minutes: dict[int, float] = {}
        self.val: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.val[trainer.current_epoch] = {name: float(metrics[name]) for name in ("val/acc", "val/loss")}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.minutes[trainer.current_epoch] = (time.perf_counter() - START) / 60


def main(argv: list[str]) -> None:
    epochs = EpochLog()
    cli = run_cli(["--config", "configs/imdb.yaml", "--checkpoint.save_top_k", "-1", *argv], extra_callbacks=[epochs], run=False)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except (OutputFolderError, CheckpointError, DataError, EncoderError) as err:  # as the gru-nlp command reports them
        print(f"train_imdb: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    fit_minutes = (time.perf_counter() - START) / 60
    checkpoint = cli.trainer.checkpoint_callback
    print(f"fit finished after {fit_minutes:.1f} min (tokenizer, encoding and all epochs); best: {checkpoint.best_model_path}")

    if not cli.trainer.is_global_zero:
        return  # other DDP processes are done; the test set is scored once, in one process

    # Score each epoch's checkpoint on every test example exactly once: a plain loop over the
    # test loader, in this one process.
    torch.set_num_threads(os.cpu_count() or 1)
    data = cli.datamodule
    data.setup("test")
    rows = []
    for path in sorted(checkpoint.best_k_models, key=str):
        model = LitClassifier.load_from_checkpoint(path, map_location="cpu").eval()
        predictions, labels = [], []
        with torch.inference_mode():
            for batch in data.test_dataloader():
                predictions.append(model(batch["input_ids"], batch["lengths"]).argmax(-1))
                labels.append(batch["labels"])
        predictions, labels = torch.cat(predictions), torch.cat(labels)
        test_acc = (predictions == labels).float().mean().item()
        test_f1 = multiclass_f1_score(predictions, labels, model.hparams.num_classes, average="macro").item()
        epoch = _epoch_of(path)
        val = epochs.val[epoch]
        rows.append((epoch, epochs.minutes.get(epoch, float("nan")), val["val/acc"], val["val/loss"], test_acc, test_f1))
        print(f"scored epoch {epoch} on {len(labels)} test examples: acc {test_acc:.4f}", flush=True)
    print(f"\n{'epoch':>5} {'minutes':>8} {'val/acc':>8} {'val/loss':>9} {'test/acc':>9} {'test/f1':>8}")
    for epoch, minutes, val_acc, val_loss, test_acc, test_f1 in rows:
        print(f"{epoch:>5} {minutes:>8.1f} {val_acc:>8.4f} {val_loss:>9.6f} {test_acc:>9.4f} {test_f1:>8.4f}")
    best_epoch = _epoch_of(checkpoint.best_model_path)
    (best,) = [row for row in rows if row[0] == best_epoch]
    print(
        f"\nbest by {checkpoint.monitor}: epoch {best_epoch}: test/acc {best[4]:.4f} (test/f1 {best[5]:.4f}), "
        f"fit {fit_minutes:.1f} min"
    )


def _epoch_of(checkpoint_path: str) -> int:
    """The epoch of a checkpoint named by `checkpoint.filename` (``epoch03-...``)."""
    return int(Path(checkpoint_path).name.removeprefix("epoch")[:2])


if __name__ == "__main__":
    main(sys.argv[1:])
