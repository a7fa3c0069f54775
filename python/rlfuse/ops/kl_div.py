"""``rlfuse::kl_div_*``: full-vocabulary KL between two logit tensors, per row.

The forward reads both rows once and saves only per-row statistics; the backward reads them again
and writes the gradient of each input that needs one (kernels.h KlDivFwdArgs / KlDivBwdArgs).
``temperatures`` (optional, float64, one per row): per-row T for both inputs; ``temperature`` is then
unused and the kernels get fp32(1 / T) as ``inv_temps``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference
from ._fake import ROW, gradient, out_op
from ._launch import inv_temps, kernels, pair_rows_backward, pair_rows_forward, reference_temperature

OP = "kl_div"
DIRECTIONS = {"forward": 0, "reverse": 1}


def _direction_name(direction: int) -> str:
    return "forward" if direction == 0 else "reverse"


@out_op("rlfuse::kl_div_fwd", ROW, ROW, ROW)
def kl_div_fwd(logits: Tensor, other: Tensor, temperature: float, direction: int, backend: str,
               temperatures: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "torch":
        return reference.kl_statistics(logits, other, _direction_name(direction),
                                       reference_temperature(temperature, temperatures))
    return pair_rows_forward(logits, other, ("kl", "lse", "other_lse"),
                             functools.partial(kernels(backend, OP).kl_div_fwd, inv_temp=1.0 / temperature,
                                               direction=direction, inv_temps=inv_temps(temperatures)))


@out_op("rlfuse::kl_div_bwd", gradient("logits", when="need_logits"), gradient("other", when="need_other"))
def kl_div_bwd(logits: Tensor, other: Tensor, kl: Tensor, lse: Tensor, other_lse: Tensor, grad_kl: Tensor,
               temperature: float, direction: int, need_logits: bool, need_other: bool, backend: str,
               temperatures: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(grad_logits, grad_other); a gradient that is not needed comes back empty."""
    if backend == "torch":
        grad_x, grad_y = reference.kl_gradients(logits, other, kl, lse, other_lse, grad_kl, _direction_name(direction),
                                                reference_temperature(temperature, temperatures))
        empty = logits.new_empty(0)
        return (grad_x.to(logits.dtype) if need_logits else empty, grad_y.to(other.dtype) if need_other else empty)
    return pair_rows_backward(logits, other, need_logits, need_other,
                              dict(kl=kl, lse=lse, other_lse=other_lse, grad_kl=grad_kl),
                              functools.partial(kernels(backend, OP).kl_div_bwd, inv_temp=1.0 / temperature,
                                                direction=direction, inv_temps=inv_temps(temperatures)))


def _setup_context(ctx, inputs, output):
    logits, other, temperature, direction, backend, temperatures = inputs
    kl, lse, other_lse = output
    ctx.save_for_backward(logits, other, kl, lse, other_lse, temperatures)
    ctx.temperature, ctx.direction, ctx.backend = temperature, direction, backend


def _backward(ctx, grad_kl, _grad_lse, _grad_other_lse):
    logits, other, kl, lse, other_lse, temperatures = ctx.saved_tensors
    need_logits, need_other = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_kl = torch.zeros_like(kl) if grad_kl is None else grad_kl
    grad_x, grad_y = kl_div_bwd(logits, other, kl, lse, other_lse, grad_kl, ctx.temperature, ctx.direction,
                                need_logits, need_other, ctx.backend, temperatures)
    return (grad_x if need_logits else None), (grad_y if need_other else None), None, None, None, None


kl_div_fwd.register_autograd(_backward, setup_context=_setup_context)
