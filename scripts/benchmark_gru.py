"""Time the GRU options on this machine: training (forward + backward) and inference.

Usage: python scripts/benchmark_gru.py [--rounds 5] [--threads N]

Options compared at B=64, E=H=128, 2 bidirectional layers, T in {128, 256}, every
sequence full length (a length-bucketed batch; padding would only favour the paths that
skip it):
    nn.GRU padded     one cuDNN-style call over the padded batch (wrong on padding; the baseline)
    nn.GRU packed     PackedSequence, exact on padding
    per-direction     PaddingSafeGRU(fused=False): torch._VF.gru per direction, reversal within lengths
    fused             PaddingSafeGRU(): both directions in one hand-written autograd Function,
                      each step's elementwise work in the compiled kernel (gru_steps.cpp)
    fused, ops        the same, with each step's elementwise work as PyTorch ops

Options are interleaved inside each round so that load from other processes hits them
alike; the median over rounds is reported (and the best round, which on a shared machine
is the better estimate of the uncontended speed). Positions/s counts B*T positions.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gru_nlp import gru as gru_module
from gru_nlp.gru import PaddingSafeGRU

BATCH, SIZE, LAYERS = 64, 128, 2


def make_options() -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """Name -> fn(x (B, T, E), lengths (B,)) -> (B, T, 2H), all with the same weights."""
    reference = nn.GRU(SIZE, SIZE, LAYERS, batch_first=True, bidirectional=True)
    per_direction = PaddingSafeGRU(SIZE, SIZE, LAYERS, bidirectional=True, fused=False)
    fused = PaddingSafeGRU(SIZE, SIZE, LAYERS, bidirectional=True)
    per_direction.load_state_dict(reference.state_dict())
    fused.load_state_dict(reference.state_dict())

    def packed(x: Tensor, lengths: Tensor) -> Tensor:
        packed_x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(reference(packed_x)[0], batch_first=True, total_length=x.size(1))[0]

    return {
        "nn.GRU padded": lambda x, lengths: reference(x)[0],
        "nn.GRU packed": packed,
        "per-direction": per_direction,
        "fused": fused,
        "fused, ops": fused,  # run under gru_steps_as_ops
    }


@contextlib.contextmanager
def gru_steps_as_ops() -> Iterator[None]:
    """PaddingSafeGRU's steps as PyTorch ops instead of the compiled kernels, forward and backward."""
    compiled_steps = gru_module.compiled_steps
    gru_module.compiled_steps = lambda: None
    try:
        yield
    finally:
        gru_module.compiled_steps = compiled_steps


def time_once(name: str, fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, lengths: Tensor, train: bool) -> float:
    start = time.perf_counter()
    with gru_steps_as_ops() if name == "fused, ops" else contextlib.nullcontext():
        if train:
            x.grad = None
            fn(x, lengths).sum().backward()
        else:
            with torch.inference_mode():
                fn(x, lengths)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions per option (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = make_options()
    if gru_module.compiled_steps() is None:
        print("the GRU's step kernels could not be compiled here: 'fused' runs as PyTorch ops too")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={BATCH}, E=H={SIZE}, {LAYERS} layers, bidirectional")
    for steps in (128, 256):
        x = torch.randn(BATCH, steps, SIZE, requires_grad=True)
        lengths = torch.full((BATCH,), steps)
        for train in (True, False):
            times: dict[str, list[float]] = {name: [] for name in options}
            for round_ in range(args.rounds + 1):
                for name, fn in options.items():
                    seconds = time_once(name, fn, x, lengths, train)
                    if round_ > 0:  # round 0 warms up allocator and caches
                        times[name].append(seconds)
            baseline = statistics.median(times["nn.GRU padded"])
            best_baseline = min(times["nn.GRU padded"])
            print(f"\nT={steps} {'train (fwd+bwd)' if train else 'inference'}   median | best round")
            for name, values in times.items():
                median, best = statistics.median(values), min(values)
                print(
                    f"  {name:15s} {median * 1e3:8.1f} ms {BATCH * steps / median:7.0f} positions/s x{baseline / median:.2f}"
                    f" | {best * 1e3:8.1f} ms {BATCH * steps / best:7.0f} positions/s x{best_baseline / best:.2f}"
                )


if __name__ == "__main__":
    main()
