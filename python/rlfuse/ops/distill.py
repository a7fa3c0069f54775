"""``rlfuse::jsd_*``: the generalised Jensen-Shannon divergence between two logit tensors, per row
(docs/distillation.md; schema.h JsdFwdArgs / JsdBwdArgs).

The forward reads both rows twice (statistics, then the mixture sums) and saves per-row
statistics only; the backward reads them once more and writes the gradient of each input that
needs one. ``beta`` must be in (0, 1): beta = 0 and 1 are the KLs of ``rlfuse::kl_div_*``.
``temperatures`` (optional, float64, one per row) as in ``rlfuse::kl_div_*``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference
from ._fake import ROW, gradient, out_op
from ._launch import inv_temps, kernels, pair_rows_backward, pair_rows_forward, reference_temperature

OP = "distill"


@out_op("rlfuse::jsd_fwd", ROW, ROW, ROW, ROW, ROW)
def jsd_fwd(logits: Tensor, other: Tensor, temperature: float, beta: float, backend: str,
            temperatures: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(jsd, kl_logits = KL(p || m), kl_other = KL(q || m), lse, other_lse), fp32 per row."""
    if backend == "torch":
        return reference.jsd_statistics(logits, other, beta, reference_temperature(temperature, temperatures))
    return pair_rows_forward(logits, other, ("jsd", "kl_logits", "kl_other", "lse", "other_lse"),
                             functools.partial(kernels(backend, OP).jsd_fwd, inv_temp=1.0 / temperature, beta=beta,
                                               inv_temps=inv_temps(temperatures)))


@out_op("rlfuse::jsd_bwd", gradient("logits", when="need_logits"), gradient("other", when="need_other"))
def jsd_bwd(logits: Tensor, other: Tensor, kl_logits: Tensor, kl_other: Tensor, lse: Tensor, other_lse: Tensor,
            grad_jsd: Tensor, temperature: float, beta: float, need_logits: bool, need_other: bool, backend: str,
            temperatures: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(grad_logits, grad_other); a gradient that is not needed comes back empty."""
    empty = logits.new_empty(0)
    if backend == "torch":
        grad_x, grad_y = reference.jsd_gradients(logits, other, kl_logits, kl_other, grad_jsd, beta,
                                                 reference_temperature(temperature, temperatures))
        return (grad_x.to(logits.dtype) if need_logits else empty, grad_y.to(other.dtype) if need_other else empty)
    return pair_rows_backward(logits, other, need_logits, need_other,
                              dict(kl_logits=kl_logits, kl_other=kl_other, lse=lse, other_lse=other_lse,
                                   grad_jsd=grad_jsd),
                              functools.partial(kernels(backend, OP).jsd_bwd, inv_temp=1.0 / temperature, beta=beta,
                                                inv_temps=inv_temps(temperatures)))


def _setup_context(ctx, inputs, output):
    logits, other, temperature, beta, backend, temperatures = inputs
    _, kl_logits, kl_other, lse, other_lse = output
    ctx.save_for_backward(logits, other, kl_logits, kl_other, lse, other_lse, temperatures)
    ctx.temperature, ctx.beta, ctx.backend = temperature, beta, backend


def _backward(ctx, grad_jsd, *_unused):
    logits, other, kl_logits, kl_other, lse, other_lse, temperatures = ctx.saved_tensors
    need_logits, need_other = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_jsd = torch.zeros_like(lse) if grad_jsd is None else grad_jsd
    grad_x, grad_y = jsd_bwd(logits, other, kl_logits, kl_other, lse, other_lse, grad_jsd, ctx.temperature,
                             ctx.beta, need_logits, need_other, ctx.backend, temperatures)
    return (grad_x if need_logits else None), (grad_y if need_other else None), None, None, None, None


jsd_fwd.register_autograd(_backward, setup_context=_setup_context)
