"""PaddingSafeGRU must compute exactly what nn.GRU computes on each unpadded sequence."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

from gru_nlp import gru as gru_module
from gru_nlp.gru import PaddingSafeGRU

BATCH, STEPS, INPUT, HIDDEN = 3, 7, 8, 6
LENGTHS = torch.tensor([5, 7, 2])


def make_pair(num_layers: int, bidirectional: bool, fused: bool = True, dtype=torch.float32):
    torch.manual_seed(0)
    gru = PaddingSafeGRU(INPUT, HIDDEN, num_layers, bidirectional, fused=fused).to(dtype)
    reference = nn.GRU(INPUT, HIDDEN, num_layers, batch_first=True, bidirectional=bidirectional).to(dtype)
    reference.load_state_dict(gru.state_dict())
    return gru, reference


def without_compiled_steps(monkeypatch) -> None:
    """Run the fused GRU's steps as PyTorch ops, as where the C++ kernels cannot be compiled."""
    monkeypatch.setattr(gru_module, "compiled_steps", lambda: None)


@pytest.mark.parametrize("fused", [True, "pyops", False, "chunked"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_matches_nn_gru_per_sequence(num_layers: int, bidirectional: bool, fused: bool | str, monkeypatch) -> None:
    if fused == "chunked":  # the input projection in chunks of 2 steps (2, 2, 2, 1), not all at once
        monkeypatch.setattr(gru_module, "_PROJECTION_ROWS", 2 * BATCH)
    if fused == "pyops":
        without_compiled_steps(monkeypatch)
    gru, reference = make_pair(num_layers, bidirectional, fused=bool(fused))
    x = torch.randn(BATCH, STEPS, INPUT, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_(True)
    output = gru(x, LENGTHS)
    width = HIDDEN * (2 if bidirectional else 1)
    assert output.shape == (BATCH, STEPS, width)
    grad_output = torch.randn_like(output)
    (output * grad_output).sum().backward()

    loss = 0.0
    for b, length in enumerate(LENGTHS.tolist()):
        expected, _ = reference(x_reference[b : b + 1, :length])  # (1, L, D*H)
        torch.testing.assert_close(output[b : b + 1, :length], expected, atol=1e-5, rtol=0)
        assert (output[b, length:] == 0).all()
        loss = loss + (expected * grad_output[b : b + 1, :length]).sum()
    loss.backward()

    torch.testing.assert_close(x.grad, x_reference.grad, atol=1e-5, rtol=0)
    reference_params = dict(reference.named_parameters())
    for name, param in gru.named_parameters():
        torch.testing.assert_close(param.grad, reference_params[name].grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pyops"])
@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_inference_path_matches_nn_gru(no_grad, compiled: bool, monkeypatch) -> None:
    """Without gradients the fused GRU runs its loop alone (no saved factors): same outputs."""
    monkeypatch.setattr(gru_module, "_PROJECTION_ROWS", 2 * BATCH)
    if not compiled:
        without_compiled_steps(monkeypatch)
    gru, reference = make_pair(2, True)
    x = torch.randn(BATCH, STEPS, INPUT)
    with no_grad():
        output = gru(x, LENGTHS)
        for b, length in enumerate(LENGTHS.tolist()):
            expected, _ = reference(x[b : b + 1, :length])
            torch.testing.assert_close(output[b : b + 1, :length], expected, atol=1e-5, rtol=0)
            assert (output[b, length:] == 0).all()
    torch.testing.assert_close(output, gru(x, LENGTHS).detach(), atol=0, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_padding_does_not_change_a_sequence(fused: bool) -> None:
    gru, _ = make_pair(2, True, fused)
    gru.eval()
    x = torch.randn(BATCH, STEPS, INPUT)
    batched = gru(x, LENGTHS)
    for b, length in enumerate(LENGTHS.tolist()):
        alone = gru(x[b : b + 1, :length], LENGTHS[b : b + 1])  # (1, L, 2H)
        torch.testing.assert_close(batched[b : b + 1, :length], alone, atol=1e-6, rtol=0)


def test_short_batch_is_padded_back_to_input_length() -> None:
    gru, _ = make_pair(1, True)
    out = gru(torch.randn(BATCH, STEPS, INPUT), torch.tensor([3, 2, 3]))
    assert out.shape == (BATCH, STEPS, 2 * HIDDEN)
    assert (out[:, 3:] == 0).all()


def test_autocast_bf16_keeps_float_outputs() -> None:
    gru, _ = make_pair(2, True)
    x = torch.randn(BATCH, STEPS, INPUT)
    expected = gru(x, LENGTHS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = gru(x.bfloat16(), LENGTHS)
    assert output.dtype == torch.float32
    assert torch.isfinite(output).all()
    # only the bf16 rounding of the input differs
    torch.testing.assert_close(output, expected, atol=2e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_bf16_autocast_runs_the_recurrence_in_float32_and_float16_autocast_in_float16() -> None:
    gru, _ = make_pair(2, True)
    gru = gru.cuda()
    x, lengths = torch.randn(BATCH, STEPS, INPUT, device="cuda"), LENGTHS.cuda()
    expected = gru(x, lengths)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # autocast alone would run cuDNN in float16
        output = gru(x, lengths)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=0)
    with torch.autocast("cuda", dtype=torch.float16):  # float16-mixed: scaled gradients, cuDNN in float16
        assert gru(x, lengths).dtype == torch.float16


def test_dropout_between_layers() -> None:
    torch.manual_seed(0)
    gru = PaddingSafeGRU(INPUT, HIDDEN, num_layers=2, dropout=0.5)
    x = torch.randn(BATCH, STEPS, INPUT)
    gru.train()
    assert not torch.equal(gru(x, LENGTHS), gru(x, LENGTHS))
    gru.eval()
    torch.testing.assert_close(gru(x, LENGTHS), gru(x, LENGTHS), atol=0, rtol=0)


def test_directional_gradcheck_float64() -> None:
    """v^T J u by central differences equals the backward's answer, for x and all weights.

    (``torch.autograd.gradcheck`` backpropagates several times through one graph, which
    the fused backward does not allow: it consumes its saved buffer.)
    """
    gru, _ = make_pair(2, True, dtype=torch.float64)
    lengths = torch.tensor([4, 3])
    x = torch.randn(2, 4, INPUT, dtype=torch.float64, requires_grad=True)
    inputs = [x, *gru.parameters()]
    directions = [torch.randn_like(t) for t in inputs]
    v = torch.randn(2, 4, 2 * HIDDEN, dtype=torch.float64)

    (gru(x, lengths) * v).sum().backward()
    analytic = sum((t.grad * u).sum() for t, u in zip(inputs, directions))

    eps = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for t, u in zip(inputs, directions):
                t.add_(sign * eps * u)
            values.append((gru(x, lengths) * v).sum())
            for t, u in zip(inputs, directions):
                t.sub_(sign * eps * u)
    numeric = (values[0] - values[1]) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-7)


def test_state_dict_round_trips_with_nn_gru() -> None:
    gru, reference = make_pair(2, True)
    assert gru.state_dict().keys() == reference.state_dict().keys()
    weights = gru.layer_weights(1, reverse=True)
    assert [w.shape for w in weights] == [(3 * HIDDEN, 2 * HIDDEN), (3 * HIDDEN, HIDDEN), (3 * HIDDEN,), (3 * HIDDEN,)]


@pytest.mark.parametrize("fused", [True, False])
def test_recurrent_dropout_drops_hidden_weights_in_training_only(fused: bool) -> None:
    torch.manual_seed(0)
    gru = PaddingSafeGRU(INPUT, HIDDEN, num_layers=2, recurrent_dropout=0.5, fused=fused)
    plain = PaddingSafeGRU(INPUT, HIDDEN, num_layers=2, fused=fused)
    plain.load_state_dict(gru.state_dict())
    x = torch.randn(BATCH, STEPS, INPUT)
    gru.train()
    first = gru(x, LENGTHS)
    assert not torch.equal(first, gru(x, LENGTHS))
    first.sum().backward()
    assert gru.weight_hh_l0.grad.abs().sum() > 0
    # about half of W_hh's entries were dropped, so got no gradient
    assert 0.3 < (gru.weight_hh_l1_reverse.grad == 0).float().mean() < 0.7
    gru.eval()
    torch.testing.assert_close(gru(x, LENGTHS), plain.eval()(x, LENGTHS), atol=0, rtol=0)


def test_dropout_between_layers_keeps_one_mask_along_time() -> None:
    torch.manual_seed(0)
    gru = PaddingSafeGRU(INPUT, HIDDEN, num_layers=2, dropout=0.5).train()
    outputs = gru._drop_between_layers(torch.ones(STEPS, BATCH, 2 * HIDDEN), time_dim=0)  # (T, B, 2H)
    assert torch.equal(outputs, outputs[:1].expand_as(outputs))  # same units dropped at every step
    assert set(outputs.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1 / (1 - p)


@pytest.mark.parametrize("lengths", [[4, 0], [4, 5]], ids=["empty-row", "longer-than-padded"])
def test_lengths_outside_the_padded_batch_are_an_error(lengths: list[int]) -> None:
    gru = PaddingSafeGRU(3, 4, num_layers=1)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 4\] \(the padded length\), got"):
        gru(torch.randn(2, 4, 3), torch.tensor(lengths))


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler here")
def test_step_kernels_compile_where_there_is_a_compiler() -> None:
    """Where a compiler exists, the fast path must be in use, not a silent fallback."""
    assert gru_module.compiled_steps() is not None


def test_compiled_steps_match_pyops_over_vector_width(monkeypatch) -> None:
    """H = 20: the kernels' 8-wide vector loop plus a remainder; 2 x 20 rows: split over threads.

    Outputs and gradients agree with the PyTorch ops.
    """
    if gru_module.compiled_steps() is None:
        pytest.skip("the step kernels could not be compiled here")
    torch.manual_seed(0)
    gru = PaddingSafeGRU(5, 20, num_layers=2)
    x = torch.randn(20, 9, 5) * 3  # large enough to saturate some gates
    lengths = torch.randint(1, 10, (20,))
    results = []
    for compiled in (True, False):
        if not compiled:
            without_compiled_steps(monkeypatch)
        gru.zero_grad()
        x_run = x.clone().requires_grad_(True)
        output = gru(x_run, lengths)
        (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
        results.append([output, x_run.grad, *(p.grad for p in gru.parameters())])
    for compiled_result, pyops_result in zip(*results):
        torch.testing.assert_close(compiled_result, pyops_result, atol=2e-6, rtol=1e-5)


def test_forward_step_kernel_saturates_and_keeps_nan() -> None:
    """Huge pre-activations give saturated gates (no inf or NaN from exp); NaN stays NaN."""
    steps_kernel = gru_module.compiled_steps()
    if steps_kernel is None:
        pytest.skip("the step kernels could not be compiled here")
    values = torch.tensor([1e4, -1e4, 88.0, -88.0, 0.0, 3.0, float("nan"), 1.0, -1.0])  # 9: a vector and a remainder
    hidden = values.numel()
    gi = values.repeat(3).view(1, 1, 3 * hidden)  # (D, B, 3H): r, z and n all see the values
    gh = torch.zeros(1, 1, 3 * hidden)
    h = torch.full((1, 1, hidden), 0.5)
    h_next, saved = torch.empty_like(h), torch.empty(1, 1, 5, hidden)
    steps_kernel.forward_step(gi, gh, h, h_next, saved)
    z = torch.sigmoid(values)  # r does not matter: it multiplies gh_n, which is zero
    n = torch.tanh(values)
    expected = (1 - z) * n + z * 0.5
    torch.testing.assert_close(h_next.flatten(), expected, atol=1e-6, rtol=0, equal_nan=True)
    torch.testing.assert_close(saved[0, 0, 4], z, atol=1e-6, rtol=0, equal_nan=True)
    assert torch.isfinite(saved[0, 0, :, :6]).all() and saved[0, 0, :, 6].isnan().all()


def test_without_a_compiler_the_gru_warns_and_runs_as_pytorch_ops(monkeypatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-for-gru-nlp")
    gru_module.compiled_steps.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler 'no-such-compiler-for-gru-nlp' on PATH"):
            assert gru_module.compiled_steps() is None
        gru, reference = make_pair(1, True)
        x = torch.randn(1, STEPS, INPUT)
        torch.testing.assert_close(gru(x, torch.tensor([STEPS])), reference(x)[0], atol=1e-5, rtol=0)
    finally:
        monkeypatch.undo()
        gru_module.compiled_steps.cache_clear()  # the next caller loads the cached build again


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pyops"])
def test_a_second_backward_through_the_gru_is_an_error(compiled: bool, monkeypatch) -> None:
    """Backward turns the saved factors into gradients in place: a second pass must fail, not reuse them."""
    if not compiled:
        without_compiled_steps(monkeypatch)
    gru, _ = make_pair(1, True)
    output = gru(torch.randn(BATCH, STEPS, INPUT, requires_grad=True), LENGTHS)
    output.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        output.sum().backward()


def test_a_build_lock_left_by_a_killed_build_is_removed_a_fresh_one_kept(tmp_path) -> None:
    """cpp_extension waits forever on its lock file; one older than any build is a dead process's."""
    stale, fresh = tmp_path / "stale" / "lock", tmp_path / "fresh" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(stale, (stale.stat().st_atime, stale.stat().st_mtime - 3600))
    gru_module._remove_stale_lock(stale)
    gru_module._remove_stale_lock(fresh)
    gru_module._remove_stale_lock(tmp_path / "missing" / "lock")
    assert not stale.exists() and fresh.exists()
