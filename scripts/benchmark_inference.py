"""Inference speed and accuracy of a checkpoint, fp32 against int8 dynamic quantization.

    python scripts/benchmark_inference.py --ckpt best.ckpt --data ../shared/data/imdb --limit 2000

Reports, for each variant: texts/s when classifying the test texts in batches, the
median and p95 latency of classifying one text at a time, and test accuracy. The parquet's
labels are matched to the checkpoint's classes as training reads them (`TextClassifier.class_ids`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from gru_nlp.api import TextClassifier


def measure(classifier: TextClassifier, texts: list[str], labels: np.ndarray, batch_size: int, single: int) -> dict:
    """Throughput, single-text latency and accuracy of one classifier on the texts."""
    classifier.predict_proba(texts[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    probs = classifier.predict_proba(texts, batch_size=batch_size)
    elapsed = time.perf_counter() - start
    latencies = []
    for text in texts[:single]:
        start = time.perf_counter()
        classifier.predict(text)
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    return {
        "texts_per_s": round(len(texts) / elapsed, 1),
        "latency_median_ms": round(1000 * statistics.median(latencies), 2),
        "latency_p95_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
        "accuracy": round(float((probs.argmax(axis=1) == labels).mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/imdb"), help="folder with test.parquet")
    parser.add_argument("--limit", type=int, default=None, help="use the first N test texts (shuffled, seed 0)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--single", type=int, default=200, help="texts timed one at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.batch_size < 1 or args.single < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size, --single and --limit must be at least 1")
    if not (args.data / "test.parquet").is_file():
        parser.error(f"no test.parquet in {args.data}")
    table = pq.read_table(args.data / "test.parquet", columns=["text", "label"])
    texts, labels = table.column("text").to_pylist(), table.column("label").to_pylist()
    # IMDB's test file is sorted by label; shuffle so a --limit subset holds both classes.
    order = np.random.default_rng(0).permutation(len(texts))[: args.limit]
    texts, labels = [texts[i] for i in order], [labels[i] for i in order]

    results = {"texts": len(texts), "threads": torch.get_num_threads()}
    for name, quantize in [("fp32", False), ("int8", True)]:
        try:
            classifier = TextClassifier.from_checkpoint(args.ckpt, device="cpu", quantize=quantize)
        except (OSError, ValueError) as err:  # missing or unusable checkpoint (CheckpointError is a ValueError)
            parser.error(str(err))
        results[name] = measure(classifier, texts, classifier.class_ids(labels), args.batch_size, args.single)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
