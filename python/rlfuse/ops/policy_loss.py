"""``rlfuse::policy_loss_fused*``: the fused path of token-local policy losses (ARCHITECTURE.md).

One kernel per row computes the row statistics, the token's loss (token_loss.h) and writes the
row's gradient while the row is still in cache (kernel backends only: the ``torch`` backend is the
general path, reference math on top of ``token_logprobs``). The backward only rescales that gradient by the
upstream gradient (skipped when it is 1). ``policy_loss_fused_inplace`` writes the gradient into
the logits themselves (declared as a mutation), so the loss costs no ``[N, V]`` memory.

The loss parameters are the fields of ``TokenLossParams`` (``rlfuse._schema``): typed, named
arguments of both ops (``..., *, int policy, int kl, int cispo_mode, float clip_low, ...``).
Optional per-token inputs after them: ``temperatures`` (float64 T per row; ``temperature`` then
unused, the kernels get fp32(1 / T) as ``inv_temps``) and ``clip_low_rows`` / ``clip_high_rows`` /
``dual_clip_rows`` (fp32, replacing the params' ``clip_low`` / ``clip_high`` / ``dual_clip`` per row).
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch
from torch import Tensor

from .. import _schema
from .._layout import gradient_layouts, inplace_layout
from ..backends import triton_installed, triton_interpreting
from ._fake import gradient, out_op, per_entry
from ._launch import empty_gradient, inv_temps, kernels, rows_f32, split_temperature

_PARAM_FIELDS = _schema.TOKEN_LOSS_PARAMS.fields


def _param_from_config(field: _schema.Field, config):
    value = getattr(config, field.source or field.name)
    if field.enum is not None:
        return _schema.enum(field.enum)["none" if value is None else value]
    if value is None:
        if field.none is None:
            raise ValueError(f"LossConfig.{field.source or field.name} is None; TokenLossParams.{field.name} needs a value")
        return field.none
    return float(value)


class TokenLossParams(namedtuple("TokenLossParams", _schema.TOKEN_LOSS_PARAMS.names)):
    """Field-for-field the C++ ``TokenLossParams`` (schema.h, generated from ``rlfuse._schema``)."""

    __slots__ = ()

    @classmethod
    def from_config(cls, config) -> "TokenLossParams":
        """Each field from the LossConfig attribute of the same name (enums by member name; ``kl=None``
        is ``"none"``; a None float takes the field's ``none`` value)."""
        return cls(*[_param_from_config(f, config) for f in _PARAM_FIELDS])


def _op_params_schema() -> str:
    """``int policy, int kl, ..., float entropy_coef``: the params as keyword-only op arguments."""
    types = {"int": "int", "float": "float"}
    return ", ".join(f"{types[f.ctype]} {f.name}" for f in _PARAM_FIELDS)


_PER_TOKEN = "Tensor advantages, Tensor old_logp, Tensor ref_logp, Tensor policy_weight, Tensor weight"
# Optional per-row inputs of the fused kernel (None: the scalar or the params' field applies).
CLIP_ROWS = ("clip_low_rows", "clip_high_rows", "dual_clip_rows")
_ROWS = ", ".join(f"Tensor? {name}=None" for name in ("temperatures", *CLIP_ROWS))
# (custom ops take no keyword-only tensors: they come before the keyword-only loss parameters)
_FUSED_SCHEMA = (f"(Tensor logits, Tensor tokens, {_PER_TOKEN}, float temperature, str backend, {_ROWS}, *, "
                 f"{_op_params_schema()}) -> (Tensor, Tensor, Tensor, Tensor)")
_FUSED_INPLACE_SCHEMA = (f"(Tensor(a!) logits, Tensor tokens, {_PER_TOKEN}, float temperature, str backend, {_ROWS}, "
                         f"*, {_op_params_schema()}) -> (Tensor, Tensor, Tensor)")


def _launch(logits, tokens, per_token, temperature, params, backend, grad_logits, temperatures=None,
            clip_rows=(None, None, None)):
    rows_view, layout, grad_layout = gradient_layouts(logits, grad_logits)
    n = layout[0]
    loss, logp, entropy = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n == 0:
        return loss, logp, entropy
    advantages, old_logp, ref_logp, policy_weight, weight = per_token
    kernels(backend, "policy_loss").policy_loss_fused(
        rows_view, layout, logits.shape[-1], tokens.reshape(-1).to(torch.int64).contiguous(), 1.0 / temperature,
        advantages, old_logp, ref_logp, policy_weight, weight, params, loss, logp, entropy, grad_logits, grad_layout,
        inv_temps=inv_temps(temperatures), **{name: rows_f32(rows) for name, rows in zip(CLIP_ROWS, clip_rows)},
    )
    return loss, logp, entropy


def _fused(logits, tokens, advantages, old_logp, ref_logp, policy_weight, weight, temperature, backend,
           temperatures=None, clip_low_rows=None, clip_high_rows=None, dual_clip_rows=None, **params):
    per_token = (advantages, old_logp, ref_logp, policy_weight, weight)
    grad = empty_gradient(logits)
    return (*_launch(logits, tokens, per_token, temperature, TokenLossParams(**params), backend, grad, temperatures,
                     (clip_low_rows, clip_high_rows, dual_clip_rows)), grad)


def _fused_inplace(logits, tokens, advantages, old_logp, ref_logp, policy_weight, weight, temperature, backend,
                   temperatures=None, clip_low_rows=None, clip_high_rows=None, dual_clip_rows=None, **params):
    per_token = (advantages, old_logp, ref_logp, policy_weight, weight)
    return _launch(logits, tokens, per_token, temperature, TokenLossParams(**params), backend, logits, temperatures,
                   (clip_low_rows, clip_high_rows, dual_clip_rows))


def fused_op_arguments(temperature, params, clip_rows=(None, None, None)) -> tuple[float, dict]:
    """``(temperature, keyword arguments)`` of the fused ops for a validated temperature (a number
    or a per-token float64 tensor), ``TokenLossParams`` and the optional per-token clip bounds."""
    scalar, temperatures = split_temperature(temperature)
    op_params = {name: getattr(params, name) for name in TokenLossParams._fields}
    return scalar, {**op_params, "temperatures": temperatures, **dict(zip(CLIP_ROWS, clip_rows))}


# (loss, logp, entropy): one fp32 value per token, as the advantages; the out-of-place op also the gradient.
_TOKEN_OUTPUTS = (per_entry("advantages"),) * 3
policy_loss_fused = out_op("rlfuse::policy_loss_fused", *_TOKEN_OUTPUTS, gradient(), schema=_FUSED_SCHEMA)(_fused)
policy_loss_fused_inplace = out_op("rlfuse::policy_loss_fused_inplace", *_TOKEN_OUTPUTS, mutates_args=("logits",),
                                   schema=_FUSED_INPLACE_SCHEMA)(_fused_inplace)


# --- backward: rescaling the saved gradient ---------------------------------------------------------

# Tests set this to run the device path below on CPU tensors (Triton under TRITON_INTERPRET=1).
DEVICE_RESCALE_ON_CPU = False


def rescale_saved_gradient_(grad: Tensor, upstream: Tensor, applied: Tensor) -> None:
    """grad *= upstream / applied on the device, without reading either scalar on the host.

    ``grad`` carries the factor ``applied`` (a device fp32 scalar) and must carry ``upstream``.
    Equal factors (the usual upstream gradient 1): nothing is read or written. A gradient that
    carries 0 or a non-finite factor cannot be rescaled: it becomes NaN (never silently wrong).
    The Triton kernel (``triton_kernels/policy_loss.py``) is one launch that returns at once when
    the factor is 1; without Triton the same math runs as torch ops (always a full pass).
    """
    if grad.numel() == 0:
        return
    on_cpu = grad.device.type == "cpu"
    if triton_installed() and triton_interpreting() == on_cpu:
        from ..triton_kernels.policy_loss import rescale_rows_

        rescale_rows_(grad, inplace_layout(grad, "the saved gradient"), grad.shape[-1], upstream, applied)
        return
    recoverable = (applied != 0) & torch.isfinite(applied)
    factor = torch.where(upstream == applied, torch.ones_like(applied),
                         torch.where(recoverable, upstream / applied, torch.full_like(applied, math.nan)))
    if grad.dtype == torch.float32:
        grad.mul_(factor)
        return
    # fp16/bf16: multiply in fp32 (a 0-dim device tensor would be rounded to the gradient's dtype),
    # in slices of the first dimension (views, also of an in-place gradient) of bounded size.
    per_slice = grad[0].numel() if grad.dim() > 1 else grad.numel()
    for chunk in grad.split(max(1, (64 << 20) // max(1, 4 * per_slice))):
        chunk.copy_(chunk.float() * factor)


class FusedPolicyLoss(torch.autograd.Function):
    """loss = sum of the fused per-token losses; backward = stored gradient x upstream gradient.

    The saved gradient is rescaled in place (no ``[N, V]`` allocation) and keeps track of the factor
    it carries, so a repeated backward (``retain_graph=True``) rescales from it:

    - CPU tensors: the upstream gradient is read on the host (no synchronisation there). 1: the
      gradient is returned as is; 0: ``None`` (the saved gradient is left as it is); non-finite: a
      new tensor ``grad * upstream``; otherwise an in-place rescale.
    - CUDA tensors: never a host synchronisation. ``rescale_saved_gradient_`` multiplies by
      upstream / applied read from device memory (a launch and nothing else when they are equal),
      and the gradient is always returned. An upstream gradient of exactly 0 zeroes the saved
      gradient (the correct gradient of that backward); a later backward of the same graph with a
      nonzero upstream gradient then gets NaN everywhere, as after a non-finite one: a gradient
      that cannot be recovered is NaN, never silently wrong.
    """

    @staticmethod
    def forward(ctx, logits, tokens, per_token, temperature, params, backend, inplace, clip_rows=(None, None, None)):
        """``temperature``: a number or a per-token float64 tensor; ``clip_rows``: optional per-token
        clip_low / clip_high / dual_clip (``CLIP_ROWS``)."""
        temperature, op_kwargs = fused_op_arguments(temperature, params, clip_rows)
        if inplace:
            token_losses, logp, entropy = policy_loss_fused_inplace(
                logits, tokens, *per_token, temperature, backend, **op_kwargs)
            grad = logits
        else:
            token_losses, logp, entropy, grad = policy_loss_fused(
                logits, tokens, *per_token, temperature, backend, **op_kwargs)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(logp, entropy)
        ctx.applied_scale = 1.0  # the factor the saved gradient currently carries (host path)
        ctx.applied = None  # the same as a device scalar (device path), made on first use
        return token_losses.sum(), logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        (grad,) = ctx.saved_tensors
        none = (None,) * 7  # one per input after the logits (FusedTroll, one fewer: the extra None is allowed)
        if torch.compiler.is_compiling():
            return grad * grad_loss.to(grad.dtype), *none
        if grad.device.type != "cpu" or DEVICE_RESCALE_ON_CPU:
            upstream = grad_loss.detach().to(torch.float32).reshape(())
            if ctx.applied is None:
                ctx.applied = torch.ones((), dtype=torch.float32, device=grad.device)
            with torch.autograd._unsafe_preserve_version_counter(grad):
                rescale_saved_gradient_(grad, upstream, ctx.applied)
            ctx.applied.copy_(upstream)  # stream-ordered after the rescale that read it
            return grad, *none
        scale = float(grad_loss)  # a CPU tensor: no synchronisation
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
