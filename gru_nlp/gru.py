"""A stacked, optionally bidirectional GRU that keeps padding out of the recurrence.

Shape legend: B batch, T padded length, E input size, H hidden size, D directions (1 or 2).

Sequences are right-padded. The forward direction reads them as they are: padding comes
after the last real token, so it can never reach a real output. The backward direction
must start at each sequence's own last token, so every sequence is reversed within its
length (padding stays at the end), run forwards, and reversed back. This gives exactly
what ``nn.GRU`` computes on each unpadded sequence, without ``PackedSequence``, whose CPU
path measured about 4x slower here (scripts/benchmark_gru.py).

On CPU the recurrence runs in ``_FusedGRULayer``, an autograd Function with a
hand-written backward through time. Both directions share one time loop (one batched
matmul per step for the pair), everything that does not depend on the previous step
(input projection, weight gradients) is done in a few large matmuls outside the loop,
and the loop writes into preallocated buffers. ``nn.GRU``'s CPU backward instead
replays a per-step autograd graph of small ops. Without gradients (validation,
inference) the same loop runs alone (``_recurrence``), skipping the per-step factors
that only backward needs. For float32, each step's elementwise work (gates, new state,
backward factors) is one call of a small C++ kernel (``gru_steps.cpp``, compiled on
first use by ``compiled_steps``) instead of about fifteen PyTorch ops; where it cannot
be compiled, the PyTorch ops run the same math. On CUDA, ``fused=False``, or anything else, each direction goes through
``torch._VF.gru`` (cuDNN on CUDA).

Parameters are named as in ``nn.GRU`` (``weight_ih_l0``, ``weight_hh_l0_reverse``, ...),
so a ``nn.GRU`` state dict loads into this module and back.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each sequence's first ``lengths[b]`` steps; padding stays where it is.

    Args:
        x: (B, T, *) right-padded batch.
        lengths: (B,) number of real steps per sequence.
    """
    steps = torch.arange(x.size(1), device=x.device)  # (T,)
    reversed_steps = lengths[:, None] - 1 - steps[None, :]  # (B, T)
    index = torch.where(reversed_steps >= 0, reversed_steps, steps[None, :])  # (B, T)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)  # (B, T, ...) as x
    return x.gather(1, index)  # (B, T, ...)


def _reversal_rows(lengths: Tensor, steps: int) -> Tensor:
    """(T*B,) row index that reverses a time-first (T, B, *) batch within lengths.

    Selecting whole rows with ``index_select`` measured ~5x faster than ``gather`` with an
    index expanded over the feature dimension.
    """
    batch = lengths.size(0)
    time = torch.arange(steps, device=lengths.device)[:, None]  # (T, 1)
    reversed_time = torch.where(time < lengths[None, :], lengths[None, :] - 1 - time, time)  # (T, B)
    return (reversed_time * batch + torch.arange(batch, device=lengths.device)).flatten()  # (T*B,)


def _select_rows(x: Tensor, rows: Tensor) -> Tensor:
    """Reorder the (t, b) rows of a time-first (T, B, F) tensor."""
    return x.flatten(0, 1).index_select(0, rows).view_as(x)


# Rows (steps x batch) of the input projection computed at a time; see _recurrence.
_PROJECTION_ROWS = 1024

_log = logging.getLogger(__name__)


@functools.cache
def compiled_steps() -> ModuleType | None:
    """The C++ step kernels of ``gru_steps.cpp``, compiled on first use; None where they cannot be.

    Each kernel does one time step's elementwise work in one pass (forward: the gates, the
    new state and the factors backward needs; backward: the pre-activation gradients and
    the carried state gradient), where the PyTorch ops take about fifteen passes and
    dispatches per step. Compiling needs a C++ compiler and takes about a minute, once:
    ``torch.utils.cpp_extension`` caches the build (``TORCH_EXTENSIONS_DIR``, by default
    under ``~/.cache``; it must be writable, as ``load`` takes a lock file there even to
    reuse a build). Without a compiler, or with ``GRU_NLP_COMPILED_STEPS=0``, the GRU runs
    the same math as PyTorch ops, slower.
    """
    if os.environ.get("GRU_NLP_COMPILED_STEPS", "1") == "0":
        return None
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the `ninja` package's own binary, when its environment is not activated
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass  # load() below fails and says so

    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ...
    flags = [
        "-O3",
        "-fno-trapping-math",  # lets gcc vectorise exp_approx's clamp
        "-ffp-contract=off",  # no fused multiply-adds: a step rounds alike with and without the backward factors
    ]
    if platform.machine().lower() in ("x86_64", "amd64") and capability.startswith(("AVX2", "AVX512")):
        flags += ["-mavx2", "-mfma"]  # vectorise the step's loops 8 floats wide
    if sys.platform.startswith("linux"):
        flags += ["-fopenmp"]  # at::parallel_for splits the batch over torch's threads
    name = f"gru_nlp_steps_{capability.lower()}"  # one build per instruction set, should the cache be shared
    compiler = os.environ.get("CXX", "c++")  # what cpp_extension compiles with
    if shutil.which(compiler) is None:
        return _without_compiled_steps(f"no C++ compiler {compiler!r} on PATH")
    try:
        build = Path(cpp_extension._get_build_directory(name, verbose=False))  # where load() builds, and caches
        _remove_stale_lock(build / "lock")
        if not any(build.glob("*.so")):
            _log.warning(f"gru_nlp: compiling the GRU's step kernels into {build} (once; about a minute)")
        return cpp_extension.load(name, [str(Path(__file__).with_name("gru_steps.cpp"))], extra_cflags=flags, extra_ldflags=flags)
    except Exception as error:  # no ninja, a failed build, a read-only cache: the PyTorch ops still work
        return _without_compiled_steps((str(error).strip().splitlines() or [type(error).__name__])[-1])


def _remove_stale_lock(lock: Path, stale_after_s: float = 600.0) -> None:
    """Remove a build lock left by a process killed while compiling.

    ``cpp_extension.load`` waits, without a time limit, for the lock file of a build in
    progress; a build takes about a minute, so a lock older than ``stale_after_s`` is one
    whose process died, and every later run would otherwise hang at its first step.
    """
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > stale_after_s:
        _log.warning(f"gru_nlp: removing {lock}, left {age / 60:.0f} minutes ago by a build that did not finish")
        lock.unlink(missing_ok=True)


def _without_compiled_steps(reason: str) -> None:
    warnings.warn(
        f"gru_nlp: could not compile the GRU's step kernels ({reason}); the GRU runs as PyTorch ops, about 1.1x "
        "slower to train (set GRU_NLP_COMPILED_STEPS=0 to choose that without this warning)"
    )


def _recurrence(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, saved: Tensor | None = None) -> Tensor:
    """The time loop of one GRU layer, all directions at once, without autograd.

    Inputs as ``_FusedGRULayer`` takes them: x (D, T, B, E), w_ih (D, 3H, E), w_hh (D, 3H, H),
    b_ih (D, 3H), b_hh (D, 3H). Returns the states (D, T+1, B, H), the first one zero.

    Inference calls it alone. Training passes ``saved``, (D, T, B, 5, H), which the loop
    fills with the per-step factors ``_FusedGRULayer.backward`` needs; they add about a
    third to the loop's time (measured 380 against 277 µs per step), so inference skips them.

    Each step is one matmul and one call of the compiled step kernel (``compiled_steps``)
    for float32; otherwise, or where the kernels could not be compiled, PyTorch ops, as follows.

    n = tanh(a) is computed as 2 sigmoid(2a) - 1: sigmoid measured ~2x faster than tanh
    here, and doubling the n rows of the input projection is exact (a power of two), so
    the loop gets 2a at no extra cost.
    """
    num_directions, steps, batch, _ = x.shape
    steps_kernel = compiled_steps() if x.dtype == torch.float32 else None
    if steps_kernel is not None:
        return _compiled_recurrence(steps_kernel, x, w_ih, w_hh, b_ih, b_hh, saved)
    hidden = w_hh.size(-1)
    rz, n_gate = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
    # b_hr and b_hz add to the pre-activations just like b_ir and b_iz, so they join the
    # input projection; b_hn cannot, as r multiplies it.
    bias = torch.cat([b_ih[:, rz] + b_hh[:, rz], 2 * b_ih[:, n_gate]], dim=-1)[:, None]  # (D, 1, 3H), n doubled
    w_ih_t = torch.cat([w_ih[:, rz], 2 * w_ih[:, n_gate]], dim=1).transpose(1, 2)  # (D, E, 3H), n doubled
    w_hh_t = w_hh.transpose(1, 2)  # (D, H, 3H)
    w_hrz_t, w_hn_t = w_hh_t[..., rz], w_hh_t[..., n_gate]  # (D, H, 2H), (D, H, H)
    b_hn = b_hh[:, None, n_gate]  # (D, 1, H)

    states = x.new_empty(num_directions, steps + 1, batch, hidden)  # (D, T+1, B, H)
    states[:, 0] = 0
    gates_rz = x.new_empty(num_directions, batch, 2 * hidden)  # (D, B, 2H) scratch
    hidden_n = x.new_empty(num_directions, batch, hidden)  # (D, B, H) scratch: W_hn h + b_hn
    gate_n = torch.empty_like(hidden_n)  # (D, B, H) scratch
    r, z = gates_rz[..., :hidden], gates_rz[..., hidden:]
    one, minus_one = x.new_ones(()), x.new_full((), -1.0)
    # unbind once: slicing per step would cost a dispatcher call per view
    h_steps = states.unbind(1)
    if saved is not None:
        saved_steps = [slot.unbind(1) for slot in saved.unbind(3)]
        one_minus_z = torch.empty_like(hidden_n)  # (D, B, H) scratch

    for t, gi_t in _input_projections(x, w_ih_t, bias):  # gi_t: (D, B, 3H)
        h = h_steps[t]  # (D, B, H)
        torch.baddbmm(gi_t[..., rz], h, w_hrz_t, out=gates_rz).sigmoid_()
        torch.baddbmm(b_hn, h, w_hn_t, out=hidden_n)
        torch.addcmul(gi_t[..., n_gate], r, hidden_n, value=2, out=gate_n).sigmoid_()  # sigmoid(2a)
        n = torch.add(minus_one, gate_n, alpha=2, out=gate_n)  # tanh(a)
        torch.lerp(n, h, z, out=h_steps[t + 1])
        if saved is not None:
            d_hn, d_r, d_z, d_n, z_t = (slot[t] for slot in saved_steps)
            torch.sub(one, z, out=one_minus_z)
            torch.addcmul(one, n, n, value=-1, out=d_n).mul_(one_minus_z)  # (1 - n^2)(1 - z)
            torch.mul(d_n, r, out=d_hn)
            torch.mul(d_hn, hidden_n, out=d_r).addcmul_(d_r, r, value=-1)  # * r' = r(1 - r)
            torch.sub(h, n, out=d_z).mul_(z).mul_(one_minus_z)  # (h - n) z(1 - z)
            z_t.copy_(z)
    return states


def _input_projections(x: Tensor, w_ih_t: Tensor, bias: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Yield (t, x_t @ w_ih_t + bias) for every step t of x (D, T, B, E): (D, B, 3H) views.

    The projection runs a chunk of steps ahead of the loop, into one reused buffer that
    stays in cache: read back from a whole-sequence projection (50 MB at T=256, B=64),
    the loop waited on memory (measured ~8% slower per step). Each view is valid until
    the next chunk is computed.
    """
    num_directions, steps, batch, _ = x.shape
    chunk_steps = max(1, _PROJECTION_ROWS // batch)
    gi_chunk = x.new_empty(num_directions, min(chunk_steps, steps) * batch, w_ih_t.size(-1))  # (D, C*B, 3H)
    for start in range(0, steps, chunk_steps):
        stop = min(start + chunk_steps, steps)
        rows = (stop - start) * batch
        inputs = x[:, start:stop].reshape(num_directions, rows, -1)  # (D, C*B, E)
        gi = torch.baddbmm(bias, inputs, w_ih_t, out=gi_chunk[:, :rows])  # (D, C*B, 3H)
        yield from enumerate(gi.view(num_directions, stop - start, batch, -1).unbind(1), start)


def _compiled_recurrence(
    steps_kernel: ModuleType, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, saved: Tensor | None
) -> Tensor:
    """``_recurrence`` with each step's elementwise work in ``steps_kernel.forward_step``."""
    num_directions, steps, batch, _ = x.shape
    hidden = w_hh.size(-1)
    states = x.new_empty(num_directions, steps + 1, batch, hidden)  # (D, T+1, B, H)
    states[:, 0] = 0
    gh = x.new_empty(num_directions, batch, 3 * hidden)  # (D, B, 3H) scratch: W_hh h + b_hh
    w_hh_t, b_hh = w_hh.transpose(1, 2), b_hh[:, None]  # (D, H, 3H), (D, 1, 3H)
    h_steps = states.unbind(1)
    saved_steps = saved.unbind(1) if saved is not None else [None] * steps  # [(D, B, 5, H)]
    for t, gi_t in _input_projections(x, w_ih.transpose(1, 2), b_ih[:, None]):  # gi_t: (D, B, 3H)
        torch.baddbmm(b_hh, h_steps[t], w_hh_t, out=gh)
        steps_kernel.forward_step(gi_t, gh, h_steps[t], h_steps[t + 1], saved_steps[t])
    return states


class _FusedGRULayer(torch.autograd.Function):
    """One GRU layer, all directions at once, with backward through time written by hand.

    Same math as ``nn.GRU`` (gates stacked [r, z, n]):
        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h = lerp(n, h, z)

    Inputs are time first with directions stacked, each direction already in the order it
    reads: x (D, T, B, E), w_ih (D, 3H, E), w_hh (D, 3H, H), b_ih (D, 3H), b_hh (D, 3H).
    The initial state is zero. Returns all states, (D, T, B, H). The time loop is
    ``_recurrence``; this Function adds the factors it saves and the backward.

    Padding needs no special care as long as every sequence's real steps come first: a
    padded step can only feed later (padded) steps, and since the caller zeroes padded
    outputs their incoming gradient is zero, so no gradient flows from padding to real
    steps either.

    Fresh large tensors are expensive here (first-touch page faults measured ~5x the cost
    of filling a reused buffer), so the loops write into a few preallocated buffers, and
    the matmuls write into small contiguous scratch tensors (a strided ``out=`` makes
    ``bmm`` compute into a temporary and copy). Backward turns the saved per-step factors
    into gradients in place, so it runs once per forward: a second backward through the
    same graph (``retain_graph=True``) fails autograd's in-place check instead of silently
    reading overwritten values.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
        num_directions, steps, batch, _ = x.shape
        # What backward needs from step t, per (direction, batch, unit), in 5 slots:
        #   0 dh_t/d(W_hn h + b_hn), 1 dh_t/d(pre-sigmoid r), 2 dh_t/d(pre-sigmoid z),
        #   3 dh_t/d(pre-tanh n), 4 z_t.
        # Filled by the time loop while the step's gates are in cache; backward multiplies
        # slots 0-3 by dL/dh_t in place, so they become the pre-activation gradients,
        # ordered [n_h, r, z] (= the rows of w_hh, rolled) and [r, z, n_i] (= the rows of w_ih).
        saved = x.new_empty(num_directions, steps, batch, 5, w_hh.size(-1))  # (D, T, B, 5, H)
        states = _recurrence(x, w_ih, w_hh, b_ih, b_hh, saved)
        ctx.save_for_backward(x, w_ih, w_hh, states, saved)
        return states[:, 1:]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, w_ih, w_hh, states, saved = ctx.saved_tensors
        num_directions, steps, batch, _ = x.shape
        hidden = w_hh.size(-1)
        grad_pre = saved[..., :4, :]  # (D, T, B, 4, H): slots 0-3, become gradients below
        grad_pre_steps, z_steps = grad_pre.unbind(1), saved[..., 4, :].unbind(1)
        grad_gh_steps = grad_pre[..., :3, :].flatten(3).unbind(1)  # [(D, B, 3H)] rows [n, r, z]
        w_hh_rolled = w_hh.roll(hidden, dims=1)  # (D, 3H, H) rows [n, r, z]
        steps_kernel = compiled_steps() if x.dtype == torch.float32 else None
        if steps_kernel is not None:
            grad_out = grad_out.contiguous()  # the kernel reads rows; autograd may pass an expanded tensor
        grad_out_steps = grad_out.unbind(1)
        grad_h, grad_h_next = grad_out[:, -1].clone(), torch.empty_like(grad_out[:, -1])  # (D, B, H)
        saved_steps = saved.unbind(1)  # [(D, B, 5, H)]
        for t in range(steps - 1, -1, -1):
            # dL/dh_{t-1} = dL/dout_{t-1} + z_t dL/dh_t + dL/dgh_t @ W_hh
            if steps_kernel is not None:  # writes into `saved` where autograd cannot see it: see below
                steps_kernel.backward_step(saved_steps[t], grad_h, grad_out_steps[t - 1] if t > 0 else None, grad_h_next)
            else:
                grad_pre_steps[t].mul_(grad_h[:, :, None])  # (D, B, 4, H)
                if t > 0:
                    torch.addcmul(grad_out_steps[t - 1], z_steps[t], grad_h, out=grad_h_next)
            if t > 0:
                grad_h_next.baddbmm_(grad_gh_steps[t], w_hh_rolled)
                grad_h, grad_h_next = grad_h_next, grad_h
        if steps_kernel is not None:  # so that a second backward fails autograd's check, as with the ops
            torch.autograd.graph.increment_version(saved)

        flat = num_directions, steps * batch
        grad_gi = grad_pre[..., 1:, :].reshape(*flat, 3 * hidden)  # (D, T*B, 3H) rows [r, z, n], a view
        grad_gh = grad_pre[..., :3, :].reshape(*flat, 3 * hidden)  # (D, T*B, 3H) rows [n, r, z], a view
        grad_x = grad_w_ih = grad_w_hh = grad_b_ih = grad_b_hh = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_gi, w_ih).view_as(x)  # (D, T, B, E)
        if ctx.needs_input_grad[1]:
            grad_w_ih = torch.bmm(grad_gi.transpose(1, 2), x.reshape(*flat, -1))  # (D, 3H, E)
        if ctx.needs_input_grad[2]:
            h_prev = states[:, :-1].reshape(*flat, hidden)  # (D, T*B, H)
            grad_w_hh = torch.bmm(grad_gh.transpose(1, 2), h_prev).roll(-hidden, dims=1)  # (D, 3H, H)
        if ctx.needs_input_grad[3]:
            grad_b_ih = grad_gi.sum(1)  # (D, 3H)
        if ctx.needs_input_grad[4]:
            grad_b_hh = grad_gh.sum(1).roll(-hidden, dims=1)  # (D, 3H)
        return grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


class PaddingSafeGRU(nn.Module):
    """Stacked (bi)directional GRU over right-padded batches.

    Args:
        input_size: E, the size of each input vector.
        hidden_size: H, the state size of each direction.
        num_layers: number of stacked layers.
        bidirectional: add a right-to-left direction to every layer.
        dropout: dropout on the outputs of every layer but the last, with one mask per
            sequence shared by all its time steps ("locked" or variational dropout, Gal &
            Ghahramani 2016): a unit dropped for a sequence stays dropped along it. Unlike
            ``nn.GRU``'s fresh mask per step, it needs B x D*H random numbers instead of
            B x T x D*H, which measured faster on CPU, where drawing them is the cost.
        recurrent_dropout: DropConnect on the hidden-to-hidden weights (``weight_hh``):
            in training, each forward pass zeroes this fraction of their entries, the
            same ones at every time step (the "weight drop" of AWD-LSTM, Merity et al.
            2018). It regularises the recurrence itself and costs one dropout per weight.
        fused: on CPU, run the recurrence in the fused kernel (``_FusedGRULayer``);
            ``False`` runs ``torch._VF.gru`` per direction instead (kept for comparison).
            CUDA always uses ``torch._VF.gru`` (cuDNN).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.fused = fused
        self.dropout = dropout
        self.recurrent_dropout = recurrent_dropout
        suffixes = ["", "_reverse"][: self.num_directions]
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in suffixes:
                self.register_parameter(f"weight_ih_l{layer}{suffix}", nn.Parameter(torch.empty(3 * hidden_size, layer_input)))
                self.register_parameter(f"weight_hh_l{layer}{suffix}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size)))
                self.register_parameter(f"bias_ih_l{layer}{suffix}", nn.Parameter(torch.empty(3 * hidden_size)))
                self.register_parameter(f"bias_hh_l{layer}{suffix}", nn.Parameter(torch.empty(3 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)), as ``nn.GRU`` initialises."""
        bound = self.hidden_size**-0.5
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def layer_weights(self, layer: int, reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_ih, W_hh, b_ih, b_hh) of one layer and direction, gates stacked as [r, z, n]."""
        suffix = "_reverse" if reverse else ""
        return tuple(getattr(self, f"{name}_l{layer}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def _drop_between_layers(self, hidden: Tensor, time_dim: int) -> Tensor:
        """Locked dropout on a layer's outputs: one mask per sequence, shared along ``time_dim``."""
        if not self.training or self.dropout == 0:
            return hidden
        mask_shape = list(hidden.shape)
        mask_shape[time_dim] = 1
        mask = hidden.new_empty(mask_shape).bernoulli_(1 - self.dropout).div_(1 - self.dropout)
        return hidden * mask

    def _drop_recurrent(self, w_hh: Tensor) -> Tensor:
        """W_hh with recurrent_dropout applied (in training only)."""
        if self.training and self.recurrent_dropout > 0:
            return F.dropout(w_hh, self.recurrent_dropout)
        return w_hh

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Run the stack.

        Args:
            x: (B, T, E) right-padded inputs.
            lengths: (B,) real lengths, each in [1, T].

        Returns:
            (B, T, D*H) outputs; positions past a sequence's length are zero. On CPU they
            are float32 (or float64 for float64 inputs) even under autocast; on CUDA, float32
            under bf16 autocast and float16 under float16 autocast.
        """
        lengths = lengths.to(x.device)
        device = x.device.type
        if device != "cpu":
            if device == "cuda" and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16:
                # Autocast runs cuDNN's RNN in float16 whatever dtype was asked for (torch's
                # aten/src/ATen/cudnn/AutocastRNN.cpp), and bf16-mixed has no gradient scaler to keep
                # float16 gradients from underflowing: the recurrence runs in float32 instead.
                with torch.autocast(device, enabled=False):
                    return self._forward_per_direction(x.float(), lengths)
            return self._forward_per_direction(x, lengths)
        # CPU bf16 matmuls have no fast kernel here (AVX2, no AVX-512/AMX): the GRU ran about
        # 10x slower under bf16 autocast than in fp32, so the recurrence stays in fp32.
        with torch.autocast("cpu", enabled=False):
            if x.dtype in (torch.bfloat16, torch.float16):
                x = x.float()
            if self.fused:
                return self._forward_fused(x, lengths)
            return self._forward_per_direction(x, lengths)

    def _forward_fused(self, x: Tensor, lengths: Tensor) -> Tensor:
        """CPU path: both directions of a layer in one ``_FusedGRULayer`` call."""
        padded_steps = x.size(1)
        # Steps past the longest sequence hold only padding; skip them (one host sync, on CPU).
        shortest, steps = (int(value) for value in lengths.aminmax())
        if shortest < 1 or steps > padded_steps:
            raise ValueError(f"lengths must be in [1, {padded_steps}] (the padded length), got {shortest} to {steps}")
        mask = torch.arange(steps, device=x.device)[:, None] < lengths[None, :]  # (T', B)
        rows = _reversal_rows(lengths, steps)  # (T'*B,)
        hidden = x[:, :steps].transpose(0, 1)  # (T', B, E)
        for layer in range(self.num_layers):
            if layer > 0:
                hidden = self._drop_between_layers(hidden, time_dim=0)
            directions = [hidden]
            if self.bidirectional:
                directions.append(_select_rows(hidden, rows))
            weights = zip(*(self.layer_weights(layer, reverse) for reverse in (False, True)[: self.num_directions]))
            w_ih, w_hh, b_ih, b_hh = (torch.stack(w) for w in weights)  # (D, 3H, E_l), (D, 3H, H), (D, 3H), (D, 3H)
            layer_inputs = (torch.stack(directions), w_ih, self._drop_recurrent(w_hh), b_ih, b_hh)  # x: (D, T', B, E_l)
            if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in layer_inputs):
                states = _FusedGRULayer.apply(*layer_inputs)  # (D, T', B, H)
            else:  # inference: the loop alone, without the factors backward would need
                states = _recurrence(*layer_inputs)[:, 1:]  # (D, T', B, H)
            outputs = [states[0]]
            if self.bidirectional:
                outputs.append(_select_rows(states[1], rows))
            hidden = torch.cat(outputs, dim=-1)  # (T', B, D*H)
        hidden = (hidden * mask[..., None]).transpose(0, 1)  # (B, T', D*H)
        return F.pad(hidden, (0, 0, 0, padded_steps - steps))  # (B, T, D*H)

    def _forward_per_direction(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``torch._VF.gru`` per layer and direction (cuDNN on CUDA)."""
        mask = torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]  # (B, T)
        hidden = x
        for layer in range(self.num_layers):
            if layer > 0:
                hidden = self._drop_between_layers(hidden, time_dim=1)
            outputs = [self._run_direction(hidden, layer, reverse=False)]  # [(B, T, H)]
            if self.bidirectional:
                backward = self._run_direction(reverse_within_lengths(hidden, lengths), layer, reverse=True)
                outputs.append(reverse_within_lengths(backward, lengths))
            hidden = torch.cat(outputs, dim=-1)  # (B, T, D*H)
        return hidden * mask[..., None]

    def _run_direction(self, x: Tensor, layer: int, reverse: bool) -> Tensor:
        """One layer, one direction, left to right: (B, T, E_l) -> (B, T, H)."""
        weights = list(self.layer_weights(layer, reverse))
        weights[1] = self._drop_recurrent(weights[1])
        h0 = x.new_zeros(1, x.size(0), self.hidden_size)
        output, _ = torch._VF.gru(x, h0, weights, True, 1, 0.0, self.training, False, True)
        return output

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, dropout={self.dropout}, "
            f"recurrent_dropout={self.recurrent_dropout}, fused={self.fused}"
        )
