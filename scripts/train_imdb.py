"""Train on IMDB, then score every epoch's checkpoint on the test set: time-to-accuracy on test.

This is `gru-nlp fit` followed by `gru-nlp test`, plus a table of when each test accuracy
was reached, counted from the start of this script (data loading and tokenizer training
included). The test set is only scored after training: it never steers the run.

    python scripts/train_imdb.py --data.path ../shared/data/imdb
    python scripts/train_imdb.py --data.path ../shared/data/imdb --config configs/cpu_ddp.yaml   # 2 CPU processes
    python scripts/train_imdb.py --data.path ../shared/data/imdb --model.hidden_size 192           # any CLI override
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

from gru_nlp.lightning_cli import run_cli  # noqa: E402
from gru_nlp.lit import LitClassifier  # noqa: E402


class EpochEndTimes(L.Callback):
    """Remembers the wall time, from the script's start, at which each epoch's checkpoint was written."""

    def __init__(self) -> None:
        self.minutes: dict[int, float] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.minutes[trainer.current_epoch] = (time.perf_counter() - START) / 60


def main(argv: list[str]) -> None:
    times = EpochEndTimes()
    cli = run_cli(["--config", "configs/imdb.yaml", "--checkpoint.save_top_k", "-1", *argv], extra_callbacks=[times], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_minutes = (time.perf_counter() - START) / 60
    checkpoint = cli.trainer.checkpoint_callback
    print(f"fit finished after {fit_minutes:.1f} min (tokenizer, encoding and all epochs); best: {checkpoint.best_model_path}")

    if not cli.trainer.is_global_zero:
        return  # other DDP processes are done; the test set is scored once, in one process

    # Score each epoch's checkpoint on every test example exactly once: a plain loop over the
    # test loader (a DDP test would pad the ranks' shares with repeated examples).
    torch.set_num_threads(os.cpu_count() or 1)
    data = cli.datamodule
    data.setup("test")
    rows = []
    for path, val_acc in sorted(checkpoint.best_k_models.items(), key=lambda item: str(item[0])):
        model = LitClassifier.load_from_checkpoint(path, map_location="cpu").eval()
        predictions, labels = [], []
        with torch.inference_mode():
            for batch in data.test_dataloader():
                predictions.append(model(batch["input_ids"], batch["lengths"]).argmax(-1))
                labels.append(batch["labels"])
        predictions, labels = torch.cat(predictions), torch.cat(labels)
        test_acc = (predictions == labels).float().mean().item()
        test_f1 = multiclass_f1_score(predictions, labels, model.hparams.num_classes, average="macro").item()
        epoch = int(Path(path).name.removeprefix("epoch")[:2])
        rows.append((epoch, times.minutes.get(epoch, float("nan")), float(val_acc), test_acc, test_f1))
        print(f"scored epoch {epoch} on {len(labels)} test examples: acc {test_acc:.4f}", flush=True)
    print(f"\n{'epoch':>5} {'minutes':>8} {'val/acc':>8} {'test/acc':>9} {'test/f1':>8}")
    for epoch, minutes, val_acc, test_acc, test_f1 in rows:
        print(f"{epoch:>5} {minutes:>8.1f} {val_acc:>8.4f} {test_acc:>9.4f} {test_f1:>8.4f}")
    best = max(rows, key=lambda row: row[2])
    print(f"\nbest by val/acc: epoch {best[0]}: test/acc {best[3]:.4f} (test/f1 {best[4]:.4f}), fit {fit_minutes:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
