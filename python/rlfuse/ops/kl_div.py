"""``rlfuse::kl_div_*``: full-vocabulary KL between two logit tensors, per row.

The forward reads both rows once and saves only per-row statistics; the backward reads them again
and writes the gradient of each input that needs one (kernels.h KlDivFwdArgs / KlDivBwdArgs).
``temperatures`` (optional, float64, one per row): per-row T for both inputs; ``temperature`` is then
unused and the kernels get fp32(1 / T) as ``inv_temps``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._layout import as_rows, contiguous_layout
from ._fake import ROW, gradient, out_op
from ._launch import empty_gradient, inv_temps, kernels, reference_temperature

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
    x, layout = as_rows(logits)
    y, other_layout = as_rows(other)
    kl, lse, other_lse = (torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device) for _ in range(3))
    if layout[0] > 0:
        kernels(backend, OP).kl_div_fwd(logits=x, layout=layout, other=y, other_layout=other_layout,
                                        vocab=logits.shape[-1], inv_temp=1.0 / temperature, direction=direction,
                                        kl=kl, lse=lse, other_lse=other_lse, inv_temps=inv_temps(temperatures))
    return kl, lse, other_lse


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
    x, layout = as_rows(logits)
    y, other_layout = as_rows(other)
    rows, vocab = layout[0], logits.shape[-1]
    grad_x = empty_gradient(logits) if need_logits else None
    grad_y = empty_gradient(other) if need_other else None
    if rows > 0 and (need_logits or need_other):
        flat = {name: t.reshape(-1).contiguous() for name, t in
                (("kl", kl), ("lse", lse), ("other_lse", other_lse), ("grad_kl", grad_kl.float()))}
        grad_layout = contiguous_layout(rows, vocab)
        kernels(backend, OP).kl_div_bwd(logits=x, layout=layout, other=y, other_layout=other_layout, vocab=vocab,
                                        inv_temp=1.0 / temperature, direction=direction, **flat, grad_logits=grad_x,
                                        grad_layout=grad_layout, grad_other=grad_y, grad_other_layout=grad_layout,
                                        inv_temps=inv_temps(temperatures))
    empty = logits.new_empty(0)
    return (grad_x if need_logits else empty, grad_y if need_other else empty)


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
