"""``rlfuse::kl_div_*``: full-vocabulary KL between two logit tensors, per row.

The forward reads both rows once and saves only per-row statistics; the backward reads them again
and writes the gradient of each input that needs one (kernels.h KlDivFwdArgs / KlDivBwdArgs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._layout import as_rows, contiguous_layout
from ._launch import empty_gradient, kernels

OP = "kl_div"
DIRECTIONS = {"forward": 0, "reverse": 1}


def _direction_name(direction: int) -> str:
    return "forward" if direction == 0 else "reverse"


@torch.library.custom_op("rlfuse::kl_div_fwd", mutates_args=())
def kl_div_fwd(logits: Tensor, other: Tensor, temperature: float, direction: int, backend: str
               ) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "torch":
        return reference.kl_statistics(logits, other, _direction_name(direction), temperature)
    x, layout = as_rows(logits)
    y, other_layout = as_rows(other)
    kl, lse, other_lse = (torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device) for _ in range(3))
    if layout[0] > 0:
        kernels(backend, OP).kl_div_fwd(x, layout, y, other_layout, logits.shape[-1], 1.0 / temperature, direction,
                                        kl, lse, other_lse)
    return kl, lse, other_lse


@kl_div_fwd.register_fake
def _(logits, other, temperature, direction, backend):
    return tuple(logits.new_empty(logits.shape[:-1], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("rlfuse::kl_div_bwd", mutates_args=())
def kl_div_bwd(logits: Tensor, other: Tensor, kl: Tensor, lse: Tensor, other_lse: Tensor, grad_kl: Tensor,
               temperature: float, direction: int, need_logits: bool, need_other: bool, backend: str
               ) -> tuple[Tensor, Tensor]:
    """(grad_logits, grad_other); a gradient that is not needed comes back empty."""
    if backend == "torch":
        grad_x, grad_y = reference.kl_gradients(logits, other, kl, lse, other_lse, grad_kl,
                                                _direction_name(direction), temperature)
        empty = logits.new_empty(0)
        return (grad_x.to(logits.dtype) if need_logits else empty, grad_y.to(other.dtype) if need_other else empty)
    x, layout = as_rows(logits)
    y, other_layout = as_rows(other)
    rows, vocab = layout[0], logits.shape[-1]
    grad_x = empty_gradient(logits) if need_logits else None
    grad_y = empty_gradient(other) if need_other else None
    if rows > 0 and (need_logits or need_other):
        flat = [t.reshape(-1).contiguous() for t in (kl, lse, other_lse, grad_kl.float())]
        grad_layout = contiguous_layout(rows, vocab)
        kernels(backend, OP).kl_div_bwd(x, layout, y, other_layout, vocab, 1.0 / temperature, direction, *flat,
                                        grad_x, grad_layout, grad_y, grad_layout)
    empty = logits.new_empty(0)
    return (grad_x if need_logits else empty, grad_y if need_other else empty)


@kl_div_bwd.register_fake
def _(logits, other, kl, lse, other_lse, grad_kl, temperature, direction, need_logits, need_other, backend):
    empty = logits.new_empty(0)
    return (torch.empty_like(logits, memory_format=torch.contiguous_format) if need_logits else empty,
            torch.empty_like(other, memory_format=torch.contiguous_format) if need_other else empty)


def _setup_context(ctx, inputs, output):
    logits, other, temperature, direction, backend = inputs
    kl, lse, other_lse = output
    ctx.save_for_backward(logits, other, kl, lse, other_lse)
    ctx.temperature, ctx.direction, ctx.backend = temperature, direction, backend


def _backward(ctx, grad_kl, _grad_lse, _grad_other_lse):
    logits, other, kl, lse, other_lse = ctx.saved_tensors
    need_logits, need_other = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_kl = torch.zeros_like(kl) if grad_kl is None else grad_kl
    grad_x, grad_y = kl_div_bwd(logits, other, kl, lse, other_lse, grad_kl, ctx.temperature, ctx.direction,
                                need_logits, need_other, ctx.backend)
    return (grad_x if need_logits else None), (grad_y if need_other else None), None, None, None


kl_div_fwd.register_autograd(_backward, setup_context=_setup_context)
