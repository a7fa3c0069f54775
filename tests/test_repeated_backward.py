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
from _policy_oracle import oracle_policy_loss
from conftest import kernel_backends

KERNEL_BACKENDS = [b for b in kernel_backends("cpu") if b != "torch"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       scales=st.lists(st.sampled_from([1.0, 0.0, -2.0, 0.25, 3.0, 1e-3]), min_size=1, max_size=5),
       inplace=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_repeated_backward_with_any_upstream_gradient(backend, seed, scales, inplace, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(5, 37, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, 37, (5,), generator=g)
    advantages = torch.randn(5, generator=g)
    old = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1).float() + 0.3 * torch.randn(
        5, generator=g)
    config = rlfuse.LossConfig.dapo(kl="k3", kl_coef=0.1)
    ref_lp = old - 0.1
    _, expected = oracle_policy_loss(logits, tokens, advantages, old=old, ref_lp=ref_lp, config=config)
    leaf = logits.clone().requires_grad_(True)
    out = rlfuse.policy_loss(leaf, tokens, advantages, old_logprobs=old, ref_logprobs=ref_lp, config=config,
                             backend=backend, inplace_backward=inplace)
    for scale in scales:
        leaf.grad = None
        (out.loss * scale).backward(retain_graph=True)
        want = expected * scale
        got = torch.zeros_like(want) if leaf.grad is None else leaf.grad.double()
        torch.testing.assert_close(got, want, **grad_tolerance(dtype, expected))
