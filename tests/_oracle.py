"""The float64 oracle every backend is compared with, and dtype-justified tolerances."""

from __future__ import annotations

import torch

from rlfuse.reference import token_logprobs_reference


def oracle(logits: torch.Tensor, tokens: torch.Tensor, grad_logp, grad_entropy, temperature=1.0):
    """logp, entropy and d(sum g_logp*logp + g_H*H)/dlogits in float64, from the same inputs."""
    x = logits.detach().to(torch.float64).requires_grad_(True)
    logp, entropy = token_logprobs_reference(x, tokens, temperature)
    torch.autograd.backward([logp, entropy], [grad_logp.double(), grad_entropy.double()])
    return logp.detach(), entropy.detach(), x.grad


def value_tolerance(vocab: int) -> dict:
    # Kernels upcast every dtype to fp32 exactly, so log-prob/entropy error is fp32 summation error
    # over V terms (relative ~1e-7 * sqrt(V) on values of magnitude ~log V).
    return dict(atol=2e-5 + 2e-7 * vocab**0.5 * 10, rtol=1e-5)


def grad_tolerance(dtype: torch.dtype, reference_grad: torch.Tensor) -> dict:
    # The gradient is stored in the logits dtype: one rounding of relative size eps(dtype).
    scale = reference_grad.abs().max().item() if reference_grad.numel() else 1.0
    eps = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}[dtype]
    return dict(atol=eps * scale + 1e-7, rtol=eps)
