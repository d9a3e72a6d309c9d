"""The reference GRU matches nn.GRU and PaddingSafeGRU, and exposes sane gates."""

from __future__ import annotations

import torch
from torch import nn

from gru_nlp.gates import gru_cell, reference_gru, update_strength
from gru_nlp.gru import PaddingSafeGRU

B, T, E, H, L = 3, 7, 5, 6, 2


def make_gru(seed: int = 0) -> PaddingSafeGRU:
    torch.manual_seed(seed)
    return PaddingSafeGRU(E, H, num_layers=L, bidirectional=True, dropout=0.0).eval()


def test_cell_matches_nn_grucell():
    torch.manual_seed(1)
    cell = nn.GRUCell(E, H)
    x, h = torch.randn(E), torch.randn(H)
    expected = cell(x[None], h[None])[0]
    got, r, z = gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert r.shape == z.shape == (H,)


def test_reference_matches_padding_safe_gru_and_nn_gru():
    gru = make_gru()
    inputs = torch.randn(B, T, E)
    lengths = torch.tensor([7, 4, 1])
    trace = reference_gru(gru, inputs, lengths)
    with torch.no_grad():
        expected = gru(inputs, lengths)  # (B, T, 2H)
    assert trace.outputs.shape == (B, T, 2 * H)
    torch.testing.assert_close(trace.outputs, expected, atol=1e-5, rtol=1e-5)

    # PaddingSafeGRU's parameters are named as nn.GRU's, so the weights load straight across.
    reference = nn.GRU(E, H, num_layers=L, bidirectional=True, batch_first=True).eval()
    reference.load_state_dict(gru.state_dict())
    for b, length in enumerate(lengths.tolist()):
        with torch.no_grad():
            unpadded, _ = reference(inputs[b : b + 1, :length])  # (1, T_b, 2H)
        torch.testing.assert_close(trace.outputs[b, :length], unpadded[0], atol=1e-5, rtol=1e-5)
        assert trace.outputs[b, length:].abs().sum() == 0  # padding stays zero


def test_gates_shapes_ranges_and_padding():
    gru = make_gru()
    lengths = torch.tensor([7, 4, 1])
    trace = reference_gru(gru, torch.randn(B, T, E), lengths)
    assert trace.update.shape == trace.reset.shape == (L, 2, B, T, H)
    assert trace.update[:, :, 1, 4:].abs().max() == 0  # padding carries no gate
    real = trace.update[:, :, 0]
    assert ((real > 0) & (real < 1)).all()
    strength = update_strength(trace)  # (L, D, B, T)
    assert strength.shape == (L, 2, B, T)
    assert ((strength >= 0) & (strength <= 1)).all()


def test_update_strength_reads_a_closed_update_gate_as_no_rewrite():
    gru = make_gru()
    with torch.no_grad():
        for layer in range(L):
            for reverse in (False, True):
                b_ih = gru.layer_weights(layer, reverse)[2]
                b_ih[H : 2 * H] = 50.0  # z_t ≈ 1: every state is kept, nothing rewritten
    trace = reference_gru(gru, torch.randn(1, T, E), torch.tensor([T]))
    assert update_strength(trace).max() < 1e-6
