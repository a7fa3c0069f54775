"""``rlfuse::troll_fused*``: the fused TROLL loss (docs/SPEC.md section 7) on kernel backends.

One kernel per row (schema.h ``TrollArgs``): the statistics and the new policy's top-k in one read
of the row, the support, the projection and its implicit gradient on the support in float64, the
KL / entropy penalties, and the row's gradient, all while the row is in cache. As for the fused
policy loss, the backward only rescales the stored gradient (``FusedPolicyLoss.backward``);
``troll_fused_inplace`` writes it into the logits themselves.

Outputs per token (fp32): the weighted loss (policy weight x TROLL term + weight x penalties: their
sum is the loss), logp, entropy, eta, KL(a || b), KL(q || b) and the support size. ``temperatures``
(optional, float64, one per token): per-row T (``temperature`` then unused; the kernel gets fp32(1 / T)
as ``inv_temps``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._layout import gradient_layouts
from ._fake import gradient, out_op, per_entry
from ._launch import empty_gradient, inv_temps, kernels
from .policy_loss import CLIP_ROWS, FusedPolicyLoss, TokenLossParams, _op_params_schema, fused_op_arguments

_PER_TOKEN = "Tensor advantages, Tensor old_logp, Tensor ref_logp, Tensor policy_weight, Tensor weight"
_TROLL = "Tensor old_ids, Tensor old_logprobs, int k, float threshold, float eps, float alpha"
_OUTPUTS = 7  # loss, logp, entropy, eta, kl_before, kl_after, support
_SCHEMA = (f"(Tensor logits, Tensor tokens, {_PER_TOKEN}, {_TROLL}, float temperature, str backend, "
           f"Tensor? temperatures=None, *, {_op_params_schema()}) -> ({', '.join(['Tensor'] * (_OUTPUTS + 1))})")
_INPLACE_SCHEMA = (f"(Tensor(a!) logits, Tensor tokens, {_PER_TOKEN}, {_TROLL}, float temperature, str backend, "
                   f"Tensor? temperatures=None, *, {_op_params_schema()}) -> ({', '.join(['Tensor'] * _OUTPUTS)})")


def _launch(logits, tokens, per_token, old_ids, old_logprobs, k, threshold, eps, alpha, temperature, params, backend,
            grad_logits, temperatures=None):
    rows_view, layout, grad_layout = gradient_layouts(logits, grad_logits)
    n = layout[0]
    outputs = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(_OUTPUTS)]
    if n == 0:
        return outputs
    advantages, old_logp, ref_logp, policy_weight, weight = per_token
    old_k = old_ids.shape[-1]
    kernels(backend, "troll").troll(
        rows_view, layout, logits.shape[-1], tokens.reshape(-1).to(torch.int64).contiguous(), 1.0 / temperature,
        advantages, old_logp, ref_logp, policy_weight, weight, params,
        old_ids.reshape(n, old_k).to(torch.int32).contiguous(),
        old_logprobs.reshape(n, old_k).to(torch.float32).contiguous(), old_k, k, threshold, eps, alpha,
        *outputs, grad_logits, grad_layout, inv_temps=inv_temps(temperatures),
    )
    return outputs


def _fused(logits, tokens, advantages, old_logp, ref_logp, policy_weight, weight, old_ids, old_logprobs, k, threshold,
           eps, alpha, temperature, backend, temperatures=None, **params):
    per_token = (advantages, old_logp, ref_logp, policy_weight, weight)
    grad = empty_gradient(logits)
    outputs = _launch(logits, tokens, per_token, old_ids, old_logprobs, k, threshold, eps, alpha, temperature,
                      TokenLossParams(**params), backend, grad, temperatures)
    return (*outputs, grad)


def _fused_inplace(logits, tokens, advantages, old_logp, ref_logp, policy_weight, weight, old_ids, old_logprobs, k,
                   threshold, eps, alpha, temperature, backend, temperatures=None, **params):
    per_token = (advantages, old_logp, ref_logp, policy_weight, weight)
    return tuple(_launch(logits, tokens, per_token, old_ids, old_logprobs, k, threshold, eps, alpha, temperature,
                         TokenLossParams(**params), backend, logits, temperatures))


# Seven fp32 values per token (as the advantages); the out-of-place op also the gradient.
_TOKEN_OUTPUTS = (per_entry("advantages"),) * _OUTPUTS
troll_fused = out_op("rlfuse::troll_fused", *_TOKEN_OUTPUTS, gradient(), schema=_SCHEMA)(_fused)
troll_fused_inplace = out_op("rlfuse::troll_fused_inplace", *_TOKEN_OUTPUTS, mutates_args=("logits",),
                             schema=_INPLACE_SCHEMA)(_fused_inplace)


class FusedTroll(FusedPolicyLoss):
    """(loss, logp, stats): loss = the sum of the fused per-token losses, stats = [5, N] (entropy, eta,
    kl_before, kl_after, support). Inputs and outputs are laid out as ``FusedPolicyLoss``'s, whose
    backward it inherits (the stored gradient rescaled by the upstream gradient, in place)."""

    @staticmethod
    def forward(ctx, logits, tokens, per_token, troll_inputs, params, backend, inplace):
        old_ids, old_logprobs, k, threshold, eps, alpha, temperature = troll_inputs
        temperature, op_kwargs = fused_op_arguments(temperature, params)
        op_kwargs = {name: value for name, value in op_kwargs.items() if name not in CLIP_ROWS}  # no clip in TROLL
        args = (logits, tokens, *per_token, old_ids, old_logprobs, k, threshold, eps, alpha, temperature, backend)
        if inplace:
            outputs = troll_fused_inplace(*args, **op_kwargs)
            grad = logits
        else:
            *outputs, grad = troll_fused(*args, **op_kwargs)
        stats = torch.stack(outputs[2:])
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(outputs[1], stats)
        ctx.applied_scale = 1.0  # as FusedPolicyLoss.forward
        ctx.applied = None
        return outputs[0].sum(), outputs[1], stats


def fused_troll(logits: Tensor, tokens: Tensor, per_token, old_ids: Tensor, old_logprobs: Tensor, config, params,
                backend: str, inplace: bool, temperature=None):
    """(loss, logp, entropy, eta, kl_before, kl_after, support): the loss a differentiable scalar.
    ``temperature``: a number or per-token float64 tensor; None: ``config.temperature``."""
    temperature = config.temperature if temperature is None else temperature
    troll_inputs = (old_ids, old_logprobs, int(config.troll_k), float(config.troll_threshold),
                    float(config.troll_eps), float(config.troll_alpha), temperature)
    loss, logp, stats = FusedTroll.apply(logits, tokens, per_token, troll_inputs, params, backend, bool(inplace))
    return (loss, logp, *stats.unbind(0))
