"""kl_divergence on every backend vs float64 autograd: values and both gradients."""

from __future__ import annotations

import pytest
import torch

import rlfuse
from rlfuse.reference import kl_divergence_reference


def _case(generator, rows, vocab, dtype, shift=0.7):
    logits = (torch.randn(rows, vocab, generator=generator) * 2).to(dtype)
    other = (logits.float() + shift * torch.randn(rows, vocab, generator=generator)).to(dtype)
    return logits, other


def _run(logits, other, target, direction, temperature=1.0, grads=(True, True), mask=None):
    device, backend = target
    x = logits.detach().to(device).requires_grad_(grads[0])
    y = other.detach().to(device).requires_grad_(grads[1])
    kl = rlfuse.kl_divergence(x, y, direction, temperature=temperature, backend=backend,
                              mask=None if mask is None else mask.to(device))
    upstream = torch.linspace(-1.0, 2.0, kl.numel()).reshape(kl.shape).to(device)
    if any(grads):
        kl.backward(upstream)
    grad = lambda t: None if t.grad is None else t.grad.cpu()  # noqa: E731
    return kl.detach().cpu(), grad(x), grad(y), upstream.cpu()


def _oracle(logits, other, direction, temperature, upstream):
    x = logits.detach().double().requires_grad_(True)
    y = other.detach().double().requires_grad_(True)
    kl = kl_divergence_reference(x, y, direction, temperature)
    kl.backward(upstream.double())
    return kl.detach(), x.grad, y.grad


def _check(logits, other, target, direction, temperature=1.0):
    kl, gx, gy, upstream = _run(logits, other, target, direction, temperature)
    ref_kl, ref_gx, ref_gy = _oracle(logits, other, direction, temperature, upstream)
    vocab = logits.shape[-1]
    torch.testing.assert_close(kl.double(), ref_kl, atol=2e-5 + 1e-7 * vocab**0.5 * 10, rtol=1e-4)
    eps = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[logits.dtype]
    for got, expected in ((gx, ref_gx), (gy, ref_gy)):
        assert got.dtype == logits.dtype
        scale = expected.abs().max().item()
        # The floor: the per-row KL enters every element, with the fp32 rounding of lse (~1e-6).
        torch.testing.assert_close(got.double(), expected, atol=eps * scale + 1e-6, rtol=eps)


def _rows(target, vocab):
    return 3 if target == ("cpu", "triton") and vocab > 2000 else 6


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4096 + 17])
def test_matches_oracle(target, direction, dtype, vocab, generator):
    _check(*_case(generator, _rows(target, vocab), vocab, dtype), target, direction)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_temperature_and_leading_shape(target, direction, generator):
    logits, other = _case(generator, 6, 333, torch.float32)
    _check(logits.reshape(2, 3, 333), other.reshape(2, 3, 333), target, direction, temperature=0.7)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_minus_inf_in_both_rows(target, direction, generator):
    """Entries -inf in both rows add nothing; the remaining support is shared, so KL stays finite."""
    logits, other = _case(generator, 5, 700, torch.float32)
    masked = torch.rand(logits.shape, generator=generator) < 0.3
    logits = logits.masked_fill(masked, float("-inf"))
    other = other.masked_fill(masked, float("-inf"))
    _check(logits, other, target, direction)
    kl, gx, gy, _ = _run(logits, other, target, direction)
    assert torch.isfinite(kl).all() and torch.all(gx[masked] == 0) and torch.all(gy[masked] == 0)


def test_support_mismatch_gives_infinite_forward_kl(target, generator):
    logits, other = _case(generator, 2, 50, torch.float32)
    other[0, 3] = float("-inf")  # q = 0 where p > 0
    kl, _, _, _ = _run(logits, other, target, "forward", grads=(False, False))
    assert kl[0].item() == float("inf") and torch.isfinite(kl[1])
    kl_rev, _, _, _ = _run(logits, other, target, "reverse", grads=(False, False))
    assert torch.isfinite(kl_rev).all()  # q = 0 there: it contributes nothing to KL(q || p)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_identical_inputs_give_exactly_zero(target, direction, generator):
    logits, _ = _case(generator, 4, 1500, torch.bfloat16)
    kl, gx, gy, _ = _run(logits, logits.clone(), target, direction)
    assert torch.all(kl == 0) and torch.all(gx == 0) and torch.all(gy == 0)


def test_gradient_only_where_required(target, generator):
    logits, other = _case(generator, 3, 200, torch.float32)
    _, gx, gy, upstream = _run(logits, other, target, "reverse", grads=(True, False))
    _, ref_gx, _ = _oracle(logits, other, "reverse", 1.0, upstream)
    assert gy is None
    torch.testing.assert_close(gx.double(), ref_gx, atol=1e-6, rtol=1e-5)


def test_strided_views(target, generator):
    logits, other = _case(generator, 8, 257, torch.bfloat16)
    full_x, full_y = logits.reshape(2, 4, 257), other.reshape(2, 4, 257)
    _check(full_x[:, :-1], full_y[:, 1:], target, "forward")


def test_mask_zeroes_rows(target, generator):
    logits, other = _case(generator, 4, 100, torch.float32)
    logits[1, 7] = float("nan")  # garbage in a masked row must not leak into its gradient
    mask = torch.tensor([True, False, True, False])
    kl, gx, gy, _ = _run(logits, other, target, "forward", mask=mask)
    assert torch.all(kl[~mask] == 0) and torch.all(gx[~mask] == 0) and torch.all(gy[~mask] == 0)
    assert torch.all(kl[mask] > 0)


def test_bad_inputs():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="other_logits must have the logits' shape"):
        rlfuse.kl_divergence(x, torch.randn(3, 11))
    with pytest.raises(ValueError, match="other_logits must have the logits' shape"):
        rlfuse.kl_divergence(x, torch.randn(4, 10))
    with pytest.raises(TypeError, match="other_logits must have the logits' dtype"):
        rlfuse.kl_divergence(x, torch.randn(3, 10).bfloat16())
    with pytest.raises(ValueError, match="direction must be"):
        rlfuse.kl_divergence(x, x, direction="both")
    with pytest.raises(ValueError, match="temperature"):
        rlfuse.kl_divergence(x, x, temperature=0)
    with pytest.raises(TypeError, match="other_logits must be float32"):
        rlfuse.kl_divergence(x, torch.ones(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be a tensor of shape"):
        rlfuse.kl_divergence(x, x, mask=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    from rlfuse.ops import kl_div as ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 29, generator=g, requires_grad=True)
    y = torch.randn(2, 3, 29, generator=g, requires_grad=True)
    torch.library.opcheck(ops.kl_div_fwd, (x, y, 0.9, 1, backend))
