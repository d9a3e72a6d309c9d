"""Does the validation split rank settings as the test set does? A random carve against a tail carve.

IMDB's training reviews come in groups: reviews of one movie have neighbouring file ids,
and the test set's movies are not in train. A random carve puts reviews of training
movies in validation, where memorising their names and titles pays; a "tail" carve
(`--data.val_carve tail`: each class's last rows) leaves those movies out of training,
as the test set does.

This script measures both, cheaply: it trains an n-gram bag like `imdb.yaml`'s alone
(`NgramBag`, naive_bayes features, 2^22 slots and trigrams by default, texts cut to 400 tokens; no GRU) with `LitClassifier`'s optimiser (AdamW, warm-up
and cosine decay; unlike a Lightning fit, every epoch sees the same batch order), at a few
learning rates, and prints the validation accuracy under
each carve beside the test accuracy, plus how much more neighbouring rows share
capitalised names than random pairs do. A validation split that ranks the learning
rates as the test set does is one to choose settings on.

    python scripts/validation_carve.py --data ../shared/data/imdb
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.nn import functional as F

from gru_nlp.data import TextDataModule
from gru_nlp.lit import warmup_cosine
from gru_nlp.model import NgramBag, lengths_to_mask


def name_overlap(texts: list[str], pairs: int = 3000) -> tuple[float, float]:
    """Mean Jaccard overlap of capitalised words (mostly names): neighbouring rows, random pairs."""
    names = [set(re.findall(r"\b[A-Z][a-z]{3,}\b", text)) for text in texts]

    def overlap(a: int, b: int) -> float:
        return len(names[a] & names[b]) / max(1, len(names[a] | names[b]))

    rng = random.Random(0)
    rows = rng.sample(range(len(texts) - 1), min(pairs, len(texts) - 1))  # all neighbours of a small split
    neighbours = sum(overlap(row, row + 1) for row in rows) / len(rows)
    strangers = sum(overlap(row, rng.randrange(len(texts))) for row in rows) / len(rows)
    return neighbours, strangers


def accuracy(bag: NgramBag, loader) -> float:
    bag.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            mask = lengths_to_mask(batch["lengths"], batch["input_ids"].size(1))  # (B, T)
            right += int((bag(batch["input_ids"], mask).argmax(-1) == batch["labels"]).sum())
            total += batch["labels"].numel()
    bag.train()
    return right / total


def train_bag(data: TextDataModule, lr: float, args: argparse.Namespace) -> NgramBag:
    torch.manual_seed(0)
    bag = NgramBag(data.vocab_size, args.buckets, data.num_classes, data.pad_id, args.order, "naive_bayes")
    loader = data.train_dataloader()
    bag.set_log_count_ratios(bag.count_texts((b["input_ids"], b["lengths"], b["labels"]) for b in loader))
    optimizer = torch.optim.AdamW(bag.parameters(), lr=lr, weight_decay=0.0)
    steps = args.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(int(0.05 * steps), steps))
    for _ in range(args.epochs):
        for batch in loader:
            mask = lengths_to_mask(batch["lengths"], batch["input_ids"].size(1))  # (B, T)
            loss = F.cross_entropy(bag(batch["input_ids"], mask), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return bag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/imdb", help="a folder with train.parquet and test.parquet")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.002, 0.001, 0.0005])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--buckets", type=int, default=2**22)
    parser.add_argument("--order", type=int, default=3)
    args = parser.parse_args()
    if args.epochs < 1 or min(args.lrs) <= 0:
        parser.error("--epochs must be at least 1 and every --lrs above 0")

    started = time.perf_counter()
    data_by_carve = {}
    for carve in ("random", "tail"):
        data = TextDataModule(args.data, label_names=["neg", "pos"], max_length=400, val_carve=carve)
        data.setup("fit")
        data.setup("test")
        data_by_carve[carve] = data
    train_texts = pq.read_table(Path(args.data) / "train.parquet", columns=["text"]).column("text").to_pylist()
    neighbours, strangers = name_overlap(train_texts)
    print(f"capitalised-word overlap in train.parquet: neighbouring rows {neighbours:.4f}, random pairs {strangers:.4f}")

    print("| bag learning rate | random carve: val/acc | test/acc | tail carve: val/acc | test/acc |")
    print("| --- | --- | --- | --- | --- |")
    for lr in args.lrs:
        scores = []
        for data in data_by_carve.values():
            bag = train_bag(data, lr, args)
            scores += [accuracy(bag, data.val_dataloader()), accuracy(bag, data.test_dataloader())]
        print(f"| {lr:g} | " + " | ".join(f"{score:.4f}" for score in scores) + " |", flush=True)
    print(f"{(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
