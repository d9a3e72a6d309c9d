"""Training speed, peak memory and inference speed: the shipped pipeline against a naive baseline.

Both sides train the same model sizes (those of `--config`'s `model:` section) on the
same IMDB reviews, cut to the same `--max-length` tokens by the same tokenizer, so they
see the same real tokens:

- baseline: plain PyTorch, `nn.GRU` + attention, every review padded or cut to
  `--max-length`, fp32, batches of random reviews, a hand-written training loop;
- shipped: `LitClassifier`, with every `model:` setting of `--config` (dropouts,
  pooling, n-gram bag), trained by a Lightning `Trainer` on length-bucketed
  batches (`BucketBatchSampler` + `collate`), the padding-safe GRU, for each
  `--shipped` variant: one process, or (`-ddp`) two single-threaded DDP processes
  sharing each batch of the same global size, as `configs/cpu_ddp.yaml` trains;
  `-pyops` runs the GRU's steps as PyTorch ops instead of the compiled step kernels.

Only real (non-padding) tokens are counted. Each variant runs in its own process,
so its peak resident memory is its own. Example:

    python scripts/benchmark.py --data ../shared/data/imdb --reviews 4000 --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

SIZE_SETTINGS = ("embedding_dim", "hidden_size", "num_layers")


def model_settings(config: str) -> dict:
    """The `model:` section of a gru-nlp config file."""
    with open(config) as file:
        return yaml.safe_load(file).get("model") or {}


class NaiveBiGRU(nn.Module):
    """The baseline: what a first BiGRU + attention classifier usually looks like."""

    def __init__(self, vocab_size: int, embedding_dim: int = 128, hidden_size: int = 128, num_layers: int = 2, num_classes: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.gru = nn.GRU(embedding_dim, hidden_size, num_layers, batch_first=True, bidirectional=True, dropout=0.3)
        self.score = nn.Sequential(nn.Linear(2 * hidden_size, 2 * hidden_size), nn.Tanh(), nn.Linear(2 * hidden_size, 1))
        self.classifier = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embedding(input_ids))  # (B, T, 2H)
        scores = self.score(states).squeeze(-1).masked_fill(input_ids == 0, -1e4)  # (B, T)
        pooled = (torch.softmax(scores, -1).unsqueeze(-1) * states).sum(1)  # (B, 2H)
        return self.classifier(pooled)  # (B, K)


def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    """Tokenize a seeded sample of IMDB train (and test, for inference) once for every variant."""
    import pyarrow.parquet as pq

    from gru_nlp.tokenizer import encode, train_tokenizer

    data = Path(args.data)
    train = pq.read_table(data / "train.parquet").to_pydict()
    test = pq.read_table(data / "test.parquet").to_pydict()
    rng = random.Random(0)
    train_rows = rng.sample(range(len(train["text"])), args.reviews)
    test_rows = rng.sample(range(len(test["text"])), args.inference_reviews)
    tokenizer = train_tokenizer((train["text"][i] for i in train_rows), vocab_size=args.vocab_size)
    classes = sorted({train["label"][i] for i in train_rows})  # ids for string labels too ("neg", "pos")
    encoded = {
        "vocab_size": tokenizer.get_vocab_size(),
        "num_classes": len(classes),
        "train_ids": encode(tokenizer, [train["text"][i] for i in train_rows], args.max_length, "head"),
        "train_labels": [classes.index(train["label"][i]) for i in train_rows],
        "test_ids": encode(tokenizer, [test["text"][i] for i in test_rows], args.max_length, "head"),
    }
    torch.save(encoded, workdir / "encoded.pt")
    return encoded


def padded(sequences: list[list[int]], width: int) -> torch.Tensor:
    """Cut or pad every sequence to `width`: (N, width)."""
    out = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, ids in enumerate(sequences):
        out[row, : min(width, len(ids))] = torch.tensor(ids[:width])
    return out


def run_baseline(args: argparse.Namespace, encoded: dict) -> dict:
    torch.manual_seed(0)
    settings = model_settings(args.config)
    sizes = {name: settings[name] for name in SIZE_SETTINGS if name in settings}
    model = NaiveBiGRU(encoded["vocab_size"], num_classes=encoded["num_classes"], **sizes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    inputs = padded(encoded["train_ids"], args.max_length)  # (N, T)
    labels = torch.tensor(encoded["train_labels"])
    order = torch.randperm(len(inputs))
    real_tokens, positions, elapsed = 0, 0, 0.0
    for step in range(args.warmup + args.steps):
        rows = order[(step * args.batch_size) % len(order) :][: args.batch_size]
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(inputs[rows]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
            real_tokens += int((inputs[rows] != 0).sum())
            positions += inputs[rows].numel()  # a batch cut short where the order wraps around counts as what it is
    model.eval()
    test_inputs = padded(encoded["test_ids"], args.max_length)
    start = time.perf_counter()
    with torch.inference_mode():
        for rows in torch.arange(len(test_inputs)).split(args.batch_size):
            model(test_inputs[rows])
    inference_s = time.perf_counter() - start
    return {
        "real_tokens_per_s": real_tokens / elapsed,
        "positions_per_s": positions / elapsed,
        "padding_fraction": 1 - real_tokens / positions,
        "inference_texts_per_s": len(test_inputs) / inference_s,
    }


def run_shipped(args: argparse.Namespace, encoded: dict, variant: str) -> dict | None:
    """`variant` is a Lightning precision, with "-ddp" for two single-threaded CPU processes."""
    import lightning as L
    from torch.utils.data import DataLoader

    from gru_nlp.allocator import keep_freed_memory
    from gru_nlp.batching import BucketBatchSampler, collate
    from gru_nlp.lit import LitClassifier

    keep_freed_memory()  # as the gru-nlp command does

    class Throughput(L.Callback):
        """Times the training steps after the warm-up, counting real tokens."""

        real_tokens, positions, elapsed, batches = 0, 0, 0.0, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches += 1  # over all epochs: batch_idx restarts at 0 in each
            if self.batches > args.warmup:
                self.elapsed += time.perf_counter() - self.start
                self.real_tokens += int(batch["lengths"].sum())
                self.positions += batch["input_ids"].numel()

    from gru_nlp.gru import compiled_steps

    if variant.endswith("-pyops"):  # the GRU's steps as PyTorch ops, without the compiled kernels
        os.environ["GRU_NLP_COMPILED_STEPS"] = "0"
        variant = variant.removesuffix("-pyops")
    precision, ddp = variant.removesuffix("-ddp"), variant.endswith("-ddp")
    processes = 2 if ddp else 1
    L.seed_everything(0, verbose=False)
    examples = [{"input_ids": ids, "labels": label} for ids, label in zip(encoded["train_ids"], encoded["train_labels"])]
    lengths = [len(ids) for ids in encoded["train_ids"]]

    class Data(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            # Built in the hook so Lightning can hand the sampler its DDP rank (gru_nlp.batching).
            # Under DDP each process takes half of every global batch: the optimiser sees the same batch size.
            sampler = BucketBatchSampler(lengths, args.batch_size // processes, shuffle=True)
            return DataLoader(examples, batch_sampler=sampler, collate_fn=collate)

    model = LitClassifier(encoded["vocab_size"], encoded["num_classes"], **model_settings(args.config))
    throughput = Throughput()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=processes,
        strategy="ddp" if ddp else "auto",
        precision=precision,
        max_steps=args.warmup + args.steps,
        gradient_clip_val=1.0,
        callbacks=[throughput],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=Data())
    counts = torch.tensor([throughput.real_tokens, throughput.positions], dtype=torch.float64)
    real_tokens, positions = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
    if not trainer.is_global_zero:
        return None
    torch.set_num_threads(os.cpu_count() or 1)  # inference in one process, as the API runs

    classifier = model.model.eval()
    test_ids = encoded["test_ids"]
    order = sorted(range(len(test_ids)), key=lambda i: len(test_ids[i]))
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(order), args.batch_size):
            batch = collate([{"input_ids": test_ids[i]} for i in order[first : first + args.batch_size]])
            classifier(batch["input_ids"], batch["lengths"])
    inference_s = time.perf_counter() - start
    return {
        "real_tokens_per_s": real_tokens / throughput.elapsed,
        "positions_per_s": positions / throughput.elapsed,
        "padding_fraction": 1 - real_tokens / positions,
        "inference_texts_per_s": len(test_ids) / inference_s,
        "compiled_steps": compiled_steps() is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/imdb", help="folder with IMDB train.parquet and test.parquet")
    parser.add_argument(
        "--config",
        default=str(Path(__file__).resolve().parents[1] / "configs/imdb.yaml"),
        help="the shipped model settings; the baseline takes its sizes (default: the repository's configs/imdb.yaml)",
    )
    parser.add_argument("--reviews", type=int, default=4000, help="training reviews sampled (seeded)")
    parser.add_argument("--inference-reviews", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=30000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps")
    parser.add_argument(
        "--shipped",
        nargs="+",
        default=["32-true", "32-true-ddp"],
        help="shipped variants: a Lightning precision (32-true, bf16-mixed), with -ddp for 2 CPU processes, "
        "then -pyops to run the GRU's steps as PyTorch ops instead of the compiled kernels (32-true-ddp-pyops)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times; report each one's median round")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("reviews", "inference_reviews", "max_length", "vocab_size", "batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")

    if args.variant:  # a child process: run one variant, print one JSON line
        encoded = torch.load(Path(args.workdir) / "encoded.pt")
        if args.variant.startswith("baseline"):
            if args.variant == "baseline+allocator":
                from gru_nlp.allocator import keep_freed_memory

                keep_freed_memory()
            result = run_baseline(args, encoded)
        else:
            result = run_shipped(args, encoded, args.variant)
            if result is None:  # a second DDP process: rank 0 reports for both
                return
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as workdir:
        encoded = prepare(args, Path(workdir))
        lengths = [len(ids) for ids in encoded["train_ids"]]
        print(
            f"{len(lengths)} IMDB train reviews, cut to {args.max_length} tokens: mean {sum(lengths) / len(lengths):.0f}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        # "baseline+allocator" shows how much of the gain is the allocator setting alone.
        variants = ["baseline", "baseline+allocator", *args.shipped]
        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        # Rounds interleave the variants, so a slow spell on the machine hits them alike.
        for _ in range(args.rounds):
            for variant in variants:
                child = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--workdir", workdir]
                output = subprocess.run(child, capture_output=True, text=True)
                lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
                if output.returncode != 0 or not lines:
                    sys.exit(f"variant {variant} failed:\n{output.stderr[-3000:]}")
                runs[variant].append(json.loads(lines[-1][len("RESULT ") :]))
        # Per variant, the round with the median training speed.
        results = {
            variant: sorted(rounds, key=lambda r: r["real_tokens_per_s"])[len(rounds) // 2] for variant, rounds in runs.items()
        }
        if args.rounds > 1:
            print("real tokens/s per round: " + "; ".join(
                f"{variant} " + ", ".join(f"{r['real_tokens_per_s']:,.0f}" for r in rounds) for variant, rounds in runs.items()
            ))

    base = results["baseline"]
    print(f"\n{'variant':<24}{'real tok/s':>12}{'x base':>8}{'positions/s':>13}{'padding':>9}{'peak MB':>9}{'infer texts/s':>15}{'x base':>8}")
    for variant, r in results.items():
        name = variant if variant.startswith("baseline") else f"shipped {variant}"
        print(
            f"{name:<24}{r['real_tokens_per_s']:>12,.0f}{r['real_tokens_per_s'] / base['real_tokens_per_s']:>8.2f}"
            f"{r['positions_per_s']:>13,.0f}{r['padding_fraction']:>9.1%}{r['peak_rss_mb']:>9,.0f}"
            f"{r['inference_texts_per_s']:>15,.0f}{r['inference_texts_per_s'] / base['inference_texts_per_s']:>8.2f}"
            + ("" if r.get("compiled_steps", True) else "  (GRU steps as PyTorch ops)")
        )


if __name__ == "__main__":
    main()
