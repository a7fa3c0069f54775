"""Parity of ``rlfuse.policy_loss`` on a ``LinearLogits`` with Liger-Kernel's chunked fused-linear GRPO
loss (``LigerFusedLinearGRPOLoss``, pure PyTorch: it runs on CPU) on TRL's conventions: the loss, and
the gradients of the hidden states and of the lm_head weight (issue 15).

The two are independent implementations of TRL's GRPO loss: Liger's chunks the lm_head GEMM in its
own PyTorch code; rlfuse's runs its fused kernels on its own chunks. Both compute in fp32 from the
same fp32 inputs, so they agree to fp32 rounding (a few ulps of each log-sum-exp, summed over the
tokens): 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

import rlfuse
from rlfuse import LinearLogits, LossConfig
from conftest import kernel_backends

liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")

B, T, D, V = 3, 7, 16, 203
# TRL's loss_type -> the rlfuse config with its aggregation (TRL's normalisers for one process,
# no gradient accumulation).
CASES = {
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28), LossConfig.dapo()),
    "bnpo": (dict(loss_type="bnpo", epsilon_high=0.28), LossConfig.dapo()),
    "grpo": (dict(loss_type="grpo"), LossConfig(clip_low=0.2, clip_high=0.2, aggregation="seq-mean-token-mean")),
    "dr_grpo": (dict(loss_type="dr_grpo", max_completion_length=T),
                LossConfig(clip_low=0.2, clip_high=0.2, aggregation="seq-mean-token-sum-norm", norm_length=float(T))),
    "dapo+beta": (dict(loss_type="dapo", epsilon_high=0.28, beta=0.04),
                  LossConfig.dapo(kl="k3", kl_coef=0.04)),
    "grpo+temperature": (dict(loss_type="grpo", temperature=0.7),
                         LossConfig(clip_low=0.2, clip_high=0.2, aggregation="seq-mean-token-mean", temperature=0.7)),
}


def inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.5
    tokens = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[:, 0] = True
    advantages = torch.randn(B, generator=gen)
    return hidden, weight, tokens, mask, advantages, gen


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_liger_fused_linear_grpo(case, backend):
    liger_kwargs, config = dict(CASES[case][0]), CASES[case][1]
    hidden, weight, tokens, mask, advantages, gen = inputs(11)
    temperature = liger_kwargs.get("temperature", 1.0)
    with torch.no_grad():
        current = rlfuse.token_logprobs(LinearLogits(hidden, weight), tokens, temperature=temperature)
    old = current + 0.3 * torch.randn(B, T, generator=gen)
    ref = current + 0.2 * torch.randn(B, T, generator=gen)
    beta = liger_kwargs.pop("beta", 0.0)

    module = liger.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta != 0, chunk_size=2,
                                            **liger_kwargs)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = module(h1, w1, tokens, mask.to(torch.int64), advantages, old_per_token_logps=old,
                 ref_per_token_logps=ref if beta != 0 else None)
    expected = out[0] if isinstance(out, tuple) else out
    expected.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    src = LinearLogits(h2, w2, chunk_tokens=4)
    got = rlfuse.policy_loss(src, tokens, advantages, old_logprobs=old, ref_logprobs=ref if beta != 0 else None,
                             mask=mask, config=config, backend=backend)
    got.loss.backward()

    torch.testing.assert_close(got.loss, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6 * max(1.0, h1.grad.abs().max().item()))
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6 * max(1.0, w1.grad.abs().max().item()))
    assert h1.grad.abs().max() > 0 and torch.all(h2.grad[~mask] == 0)
