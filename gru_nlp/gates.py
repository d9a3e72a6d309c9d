"""A reference GRU written from the equations, to read a trained model's gates.

Shape legend: B batch, T padded length, E input size, H hidden size per direction,
L layers, D directions (1 or 2).

For each token x_t and previous state h_{t-1} (PyTorch's ``nn.GRU`` equations):

    r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)            reset gate
    z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)            update gate
    n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))  candidate state
    h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}

Convention: the reset gate multiplies (W_hn h_{t-1} + b_hn), *after* the matrix product,
as ``nn.GRU`` and cuDNN do. The original formulation (Cho et al., 2014) applies it to the
state before the product, n_t = tanh(W_in x_t + W_hn (r_t ⊙ h_{t-1}) + ...); the two are
different functions, so weights trained under one convention do not carry over to the other.

z_t near 1 keeps the old state; near 0 it replaces the state with the candidate. So the
per-token statistic "how strongly the update gate rewrote the state" is the mean over the
H units of (1 − z_t): 0 means the token left the state untouched, 1 means it overwrote it.

This is deliberately a slow Python loop over time steps: it exists to be read and to
expose r_t and z_t, which the fused kernels never return. Use it on a handful of texts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gru_nlp.gru import PaddingSafeGRU


class GateTrace(NamedTuple):
    outputs: Tensor  # (B, T, D*H) last layer's outputs, zero on padding
    update: Tensor  # (L, D, B, T, H) z_t, at the position of the token that produced it; zero on padding
    reset: Tensor  # (L, D, B, T, H) r_t, likewise


def gru_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One GRU step.

    Args:
        x: (E,) input at this step.
        h: (H,) previous state.
        w_ih: (3H, E) input weights, gates stacked [r, z, n] as in ``nn.GRU``.
        w_hh: (3H, H) recurrent weights, same stacking.
        b_ih: (3H,) input bias.
        b_hh: (3H,) recurrent bias.

    Returns:
        The new state h_t, the reset gate r_t and the update gate z_t, each (H,).
    """
    input_r, input_z, input_n = (w_ih @ x + b_ih).chunk(3)  # 3 x (H,)
    hidden_r, hidden_z, hidden_n = (w_hh @ h + b_hh).chunk(3)  # 3 x (H,)
    r = torch.sigmoid(input_r + hidden_r)
    z = torch.sigmoid(input_z + hidden_z)
    # The reset gate scales the recurrent term after the product (nn.GRU / cuDNN convention).
    n = torch.tanh(input_n + r * hidden_n)
    h_new = (1 - z) * n + z * h
    return h_new, r, z


def run_direction(
    x: Tensor, weights: tuple[Tensor, Tensor, Tensor, Tensor], reverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one layer and direction over one unpadded sequence.

    Args:
        x: (T, E) the sequence's real steps only.
        weights: (W_ih, W_hh, b_ih, b_hh) from ``PaddingSafeGRU.layer_weights``.
        reverse: read right to left; results are still indexed by token position.

    Returns:
        outputs, reset gates and update gates, each (T, H).
    """
    hidden_size = weights[1].size(1)
    h = x.new_zeros(hidden_size)
    steps = range(x.size(0) - 1, -1, -1) if reverse else range(x.size(0))
    outputs, resets, updates = [x.new_zeros(x.size(0), hidden_size) for _ in range(3)]
    for t in steps:
        h, r, z = gru_cell(x[t], h, *weights)
        outputs[t], resets[t], updates[t] = h, r, z
    return outputs, resets, updates


@torch.no_grad()
def reference_gru(gru: PaddingSafeGRU, inputs: Tensor, lengths: Tensor) -> GateTrace:
    """Run a trained ``PaddingSafeGRU``'s own weights through the equations above.

    Computes what the module computes in eval mode (no dropout between layers), one
    sequence and one step at a time, and keeps every gate.

    Args:
        gru: the trained module; only ``num_layers``, ``bidirectional`` and
            ``layer_weights`` are used.
        inputs: (B, T, E) right-padded inputs (e.g. the model's embeddings).
        lengths: (B,) real lengths, each in [1, T].

    Returns:
        GateTrace with outputs (B, T, D*H), update and reset gates (L, D, B, T, H).
    """
    batch_size, max_length, _ = inputs.shape
    directions = [False, True] if gru.bidirectional else [False]
    hidden_size = gru.layer_weights(0, reverse=False)[1].size(1)
    update = inputs.new_zeros(gru.num_layers, len(directions), batch_size, max_length, hidden_size)
    reset = torch.zeros_like(update)
    outputs = inputs.new_zeros(batch_size, max_length, len(directions) * hidden_size)
    for b, length in enumerate(lengths.tolist()):
        layer_input = inputs[b, :length]  # (T_b, E)
        for layer in range(gru.num_layers):
            direction_outputs = []
            for d, reverse in enumerate(directions):
                out, r, z = run_direction(layer_input, gru.layer_weights(layer, reverse), reverse)
                direction_outputs.append(out)
                reset[layer, d, b, :length], update[layer, d, b, :length] = r, z
            layer_input = torch.cat(direction_outputs, dim=-1)  # (T_b, D*H)
        outputs[b, :length] = layer_input
    return GateTrace(outputs, update, reset)


def update_strength(trace: GateTrace) -> Tensor:
    """Per token, how strongly the update gate rewrote the state: mean over units of (1 − z_t).

    Returns:
        (L, D, B, T) values in [0, 1]; padding positions are 1 (z is stored as 0 there),
        so mask them with the lengths before averaging.
    """
    return (1 - trace.update).mean(dim=-1)
