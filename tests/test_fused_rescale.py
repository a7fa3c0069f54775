"""The fused loss's backward on CUDA tensors: rescaling without a host synchronisation.

On CUDA the backward never reads the upstream gradient on the host: the saved gradient is rescaled
by upstream / applied read from device memory (``rescale_saved_gradient_``: a Triton kernel that
returns at once when the factor is 1, torch ops without Triton). Documented behaviour
(``FusedPolicyLoss``): an upstream gradient of exactly 0 zeroes the saved gradient, and a later
backward of the same graph with a nonzero upstream gradient is NaN everywhere (as after a
non-finite one), never silently wrong. Here the device path is forced on CPU tensors
(``DEVICE_RESCALE_ON_CPU``), Triton running under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import rlfuse
from _oracle import grad_tolerance
from _policy_batch import dapo_k3_problem
from conftest import kernel_backends
from rlfuse._layout import inplace_layout
from rlfuse.ops import policy_loss as fused_op

KERNEL_BACKENDS = [b for b in kernel_backends("cpu") if b != "torch"]


@pytest.fixture(params=["triton", "torch"])
def device_path(request, monkeypatch):
    """The device path on CPU tensors, with the Triton rescale kernel or the torch fallback."""
    monkeypatch.setattr(fused_op, "DEVICE_RESCALE_ON_CPU", True)
    if request.param == "triton":
        if not (fused_op.triton_installed() and fused_op.triton_interpreting()):
            pytest.skip("needs Triton under TRITON_INTERPRET=1")
    else:
        monkeypatch.setattr(fused_op, "triton_installed", lambda: False)
    return request.param


@contextlib.contextmanager
def no_host_reads():
    """Any host read of a tensor's value (float(), int(), bool(), item(), tolist()) raises."""
    names = ("__float__", "__int__", "__bool__", "item", "tolist")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value in the device backward")

    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _backwards(logits, tokens, advantages, kwargs, backend, inplace, scales):
    leaf = logits.clone().requires_grad_(True)
    out = rlfuse.policy_loss(leaf, tokens, advantages, backend=backend, inplace_backward=inplace, **kwargs)
    grads = []
    for scale in scales:
        leaf.grad = None
        with no_host_reads():
            (out.loss * scale).backward(retain_graph=True)
        grads.append(leaf.grad.double().clone())
    return grads


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_rescale_matches_every_nonzero_upstream_gradient(device_path, backend, inplace, dtype):
    logits, tokens, advantages, kwargs, expected = dapo_k3_problem(dtype)
    scales = [1.0, 0.25, 3.0, -2.0, 1.0, 1e-3]
    for scale, got in zip(scales, _backwards(logits, tokens, advantages, kwargs, backend, inplace, scales)):
        torch.testing.assert_close(got, expected * scale, **grad_tolerance(dtype, expected))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_zero_upstream_gradient_then_nonzero_is_nan(device_path, backend, inplace):
    logits, tokens, advantages, kwargs, expected = dapo_k3_problem(torch.float32, seed=1)
    grads = _backwards(logits, tokens, advantages, kwargs, backend, inplace, [0.5, 0.0, 0.0, 2.0, 1.0])
    torch.testing.assert_close(grads[0], expected * 0.5, **grad_tolerance(torch.float32, expected))
    assert torch.equal(grads[1], torch.zeros_like(expected))  # the correct gradient of that backward
    assert torch.equal(grads[2], torch.zeros_like(expected))  # 0 again: still zeros, nothing to recover
    assert torch.isnan(grads[3]).all() and torch.isnan(grads[4]).all()  # unrecoverable: NaN, not wrong


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_finite_upstream_gradient_then_finite_is_nan(device_path, backend):
    logits, tokens, advantages, kwargs, expected = dapo_k3_problem(torch.float32, seed=2)
    grads = _backwards(logits, tokens, advantages, kwargs, backend, False, [math.inf, 1.0])
    assert not torch.isfinite(grads[0]).any()
    assert torch.isnan(grads[1]).all()


def test_rescale_kernel_factor_one_and_unrecoverable_factors():
    pytest.importorskip("triton")
    if not fused_op.triton_interpreting():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    from rlfuse.triton_kernels.policy_loss import rescale_rows_

    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 4, 70, generator=g)
    cases = ((2.0, 2.0, base), (3.0, 1.5, base * 2.0), (-1.0, 4.0, base * -0.25),
             (1.0, 0.0, torch.full_like(base, math.nan)), (1.0, math.inf, torch.full_like(base, math.nan)),
             (math.nan, 1.0, torch.full_like(base, math.nan)))
    for upstream, applied, want in cases:
        whole = torch.randn(3, 5, 70, generator=g)
        whole[:, 1:] = base
        view = whole[:, 1:]  # a strided view: rows through their own layout
        before = whole.clone()
        rescale_rows_(view, inplace_layout(view), 70, torch.tensor(upstream), torch.tensor(applied), block_v=32)
        torch.testing.assert_close(view, want, equal_nan=True)
        assert torch.equal(whole[:, 0], before[:, 0])  # rows outside the view untouched
