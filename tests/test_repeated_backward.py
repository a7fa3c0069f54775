"""The fused loss's backward with any upstream gradients, any number of times (retain_graph=True).

The fused kernels store the gradient of the loss during the forward and the backward only rescales
it. Property: for any sequence of upstream gradients (1, 0, negative, tiny, repeated), each backward
gives upstream x the gradient of the loss — checked against float64 math — never an error, never a
gradient scaled twice; in place or not, on every kernel backend.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlfuse
from _oracle import grad_tolerance
from _policy_batch import dapo_k3_problem
from conftest import kernel_backends

KERNEL_BACKENDS = [b for b in kernel_backends("cpu") if b != "torch"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       scales=st.lists(st.sampled_from([1.0, 0.0, -2.0, 0.25, 3.0, 1e-3]), min_size=1, max_size=5),
       inplace=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_repeated_backward_with_any_upstream_gradient(backend, seed, scales, inplace, dtype):
    logits, tokens, advantages, kwargs, expected = dapo_k3_problem(dtype, seed, rows=5, vocab=37)
    leaf = logits.clone().requires_grad_(True)
    out = rlfuse.policy_loss(leaf, tokens, advantages, backend=backend, inplace_backward=inplace, **kwargs)
    for scale in scales:
        leaf.grad = None
        (out.loss * scale).backward(retain_graph=True)
        want = expected * scale
        got = torch.zeros_like(want) if leaf.grad is None else leaf.grad.double()
        torch.testing.assert_close(got, want, **grad_tolerance(dtype, expected))
