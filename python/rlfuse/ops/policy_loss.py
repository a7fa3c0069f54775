"""``rlfuse::policy_loss_fused*``: the fused path of token-local policy losses (DESIGN.md).

One kernel per row computes the row statistics, the token's loss (token_loss.h) and writes the
row's gradient while the row is still in cache (kernel backends only: the ``torch`` backend is the
general path, reference math on top of ``token_logprobs``). The backward only rescales that gradient by the
upstream gradient (skipped when it is 1). ``policy_loss_fused_inplace`` writes the gradient into
the logits themselves (declared as a mutation), so the loss costs no ``[N, V]`` memory.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._layout import as_rows, contiguous_layout, inplace_layout
from ._launch import empty_gradient, kernels

POLICY_KINDS = {"ppo": 0, "gppo": 1, "cispo": 2, "sapo": 3, "pspo": 4, "reinforce": 5}
KL_KINDS = {None: 0, "k1": 1, "k2": 2, "k3": 3, "k3+": 4, "abs": 5}
CISPO_MODES = {"two_sided": 0, "upper": 1, "cap": 2}


class TokenLossParams(NamedTuple):
    """Field-for-field the C++ ``TokenLossParams`` (token_loss.h); also read by the Triton kernel."""

    policy: int
    kl: int
    cispo_mode: int
    clip_low: float
    clip_high: float
    dual_clip: float
    delta: float
    gppo_beta_low: float
    gppo_beta_high: float
    sapo_tau_pos: float
    sapo_tau_neg: float
    pspo_alpha: float
    kl_coef: float
    entropy_coef: float

    @classmethod
    def from_config(cls, config) -> "TokenLossParams":
        return cls(
            POLICY_KINDS[config.loss], KL_KINDS[config.kl], CISPO_MODES[config.cispo_mode],
            -1.0 if config.clip_low is None else config.clip_low, config.clip_high,
            config.dual_clip or 0.0, config.delta or 0.0, config.gppo_beta_low, config.gppo_beta_high,
            config.sapo_tau_pos, config.sapo_tau_neg, config.pspo_alpha,
            config.kl_coef if config.kl is not None else 0.0, config.entropy_coef,
        )


def _launch(logits, tokens, per_token, temperature, params, backend, grad_logits):
    if grad_logits is logits:  # in place: the rows are written through logits' own layout
        rows_view, layout = logits, inplace_layout(logits)
        grad_layout = layout
    else:
        rows_view, layout = as_rows(logits)
        grad_layout = contiguous_layout(layout[0], logits.shape[-1])
    n = layout[0]
    loss, logp, entropy = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n == 0:
        return loss, logp, entropy
    advantages, old_logp, ref_logp, policy_weight, weight = per_token
    kernels(backend, "policy_loss").policy_loss_fused(
        rows_view, layout, logits.shape[-1], tokens.reshape(-1).to(torch.int64).contiguous(), 1.0 / temperature,
        advantages, old_logp, ref_logp, policy_weight, weight, params, loss, logp, entropy, grad_logits, grad_layout,
    )
    return loss, logp, entropy


@torch.library.custom_op("rlfuse::policy_loss_fused", mutates_args=())
def policy_loss_fused(
    logits: Tensor, tokens: Tensor, advantages: Tensor, old_logp: Tensor, ref_logp: Tensor,
    policy_weight: Tensor, weight: Tensor, temperature: float, params: list[float], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    token_params = TokenLossParams(*[int(v) for v in params[:3]], *params[3:])
    per_token = (advantages, old_logp, ref_logp, policy_weight, weight)
    grad = empty_gradient(logits)
    return (*_launch(logits, tokens, per_token, temperature, token_params, backend, grad), grad)


@policy_loss_fused.register_fake
def _(logits, tokens, advantages, old_logp, ref_logp, policy_weight, weight, temperature, params, backend):
    n = advantages.shape[0]
    per_row = [logits.new_empty(n, dtype=torch.float32) for _ in range(3)]
    return (*per_row, torch.empty_like(logits, memory_format=torch.contiguous_format))


@torch.library.custom_op("rlfuse::policy_loss_fused_inplace", mutates_args=("logits",))
def policy_loss_fused_inplace(
    logits: Tensor, tokens: Tensor, advantages: Tensor, old_logp: Tensor, ref_logp: Tensor,
    policy_weight: Tensor, weight: Tensor, temperature: float, params: list[float], backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    token_params = TokenLossParams(*[int(v) for v in params[:3]], *params[3:])
    per_token = (advantages, old_logp, ref_logp, policy_weight, weight)
    return _launch(logits, tokens, per_token, temperature, token_params, backend, logits)


@policy_loss_fused_inplace.register_fake
def _(logits, tokens, advantages, old_logp, ref_logp, policy_weight, weight, temperature, params, backend):
    n = advantages.shape[0]
    return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))


class FusedPolicyLoss(torch.autograd.Function):
    """loss = sum of the fused per-token losses; backward = stored gradient x upstream gradient."""

    @staticmethod
    def forward(ctx, logits, tokens, per_token, temperature, params, backend, inplace):
        args = (tokens, *per_token, temperature, list(params), backend)
        if inplace:
            token_losses, logp, entropy = policy_loss_fused_inplace(logits, *args)
            grad = logits
        else:
            token_losses, logp, entropy, grad = policy_loss_fused(logits, *args)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(logp, entropy)
        ctx.applied_scale = 1.0  # the factor the saved gradient currently carries
        return token_losses.sum(), logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        (grad,) = ctx.saved_tensors
        none = (None,) * 6
        if torch.compiler.is_compiling():
            return grad * grad_loss.to(grad.dtype), *none
        scale = float(grad_loss)
        # The usual upstream gradient of a loss is exactly 1: return the kernel's gradient as it is.
        if scale == ctx.applied_scale:
            return grad, *none
        if scale == 0.0:
            return None, *none  # a zero gradient, without touching (or allocating) [N, V]
        if not math.isfinite(scale):
            return grad * grad_loss.to(grad.dtype), *none
        # Rescale in place (no [N, V] allocation). The saved gradient is rescaled, not overwritten:
        # a repeated backward (retain_graph=True) rescales from the factor it carries now.
        with torch.autograd._unsafe_preserve_version_counter(grad):
            grad.mul_(scale / ctx.applied_scale)
        ctx.applied_scale = scale
        return grad, *none
