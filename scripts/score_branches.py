"""Test accuracy of a wide-and-deep checkpoint's two sides alone and together.

A model trained with an n-gram bag (`ngram_buckets`) adds the bag's class scores to the
GRU's, each side weighted by the model's `side_weights` (fitted on validation data). This
scores, in one pass over the test texts, the weighted sum (the model as served), the GRU
side alone and the bag alone, so a reader can see what each side contributes:

    python scripts/score_branches.py --ckpt best.ckpt --data ../shared/data/imdb
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import torch

from gru_nlp.api import TextClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/imdb"), help="folder with test.parquet")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    if not (args.data / "test.parquet").is_file():
        parser.error(f"no test.parquet in {args.data}")
    try:
        classifier = TextClassifier.from_checkpoint(args.ckpt, device="cpu")
    except (OSError, ValueError) as err:  # missing or unusable checkpoint (CheckpointError is a ValueError)
        parser.error(str(err))
    if classifier.model.ngrams is None:
        parser.error(f"{args.ckpt} has no n-gram bag (ngram_buckets was 0): there is only one side to score")
    print(f"labels by id: {classifier.labels}")
    table = pq.read_table(args.data / "test.parquet", columns=["text", "label"])
    # Names or ids (IMDB's parquet: 0 = neg, 1 = pos), matched to the classes as training reads them.
    texts, labels = table.column("text").to_pylist(), torch.from_numpy(classifier.class_ids(table.column("label").to_pylist()))

    correct = {"both (as served)": 0, "GRU side alone": 0, "n-gram bag alone": 0}
    weights = [round(weight, 4) for weight in classifier.model.side_weights.tolist()]
    for rows, output in classifier.batched_outputs(texts, args.batch_size):
        gold = labels[rows]
        for name, logits in zip(correct, (output.logits, output.gru_logits, output.ngram_logits)):
            correct[name] += int((logits.argmax(dim=-1) == gold).sum())
    print(json.dumps({"texts": len(texts), "side_weights (gru, bag)": weights, **{name: round(hits / len(texts), 4) for name, hits in correct.items()}}, indent=2))


if __name__ == "__main__":
    main()
