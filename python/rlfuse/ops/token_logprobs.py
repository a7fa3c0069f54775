"""``rlfuse::token_logprobs_*``: per-token log-probs and entropy from logits (docs/SPEC.md 1-2).

Declared with torch.library (schema + fake + autograd), so the op works under torch.compile and
passes ``torch.library.opcheck``. Three ops:

* ``token_logprobs_fwd(logits, tokens, temperature, backend, inplace_backward, temperatures=None,
  kept_min=None) -> (logp, entropy, lse)``
* ``token_logprobs_bwd(...) -> grad_logits``: a new gradient tensor.
* ``token_logprobs_bwd_inplace(logits!, ...)``: writes the gradient into ``logits`` itself (declared
  as a mutation), so the backward needs no ``[N, V]`` memory.

Optional per-row inputs (one value per token): ``temperatures`` (float64 T; the scalar
``temperature`` is then unused; kernels get fp32(1 / T) as ``inv_temps``) and ``kept_min`` (fp32:
the distribution restricted to {j : x_j >= kept_min} and renormalised, as the sampler filtered it;
``rlfuse.filtered``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._layout import as_rows, gradient_layouts, inplace_layout
from ._fake import ROW, gradient, out_op
from ._launch import empty_gradient, inv_temps, kernels, reference_temperature, rows_f32

OP = "token_logprobs"


def _flat_tokens(tokens: Tensor) -> Tensor:
    return tokens.reshape(-1).to(torch.int64).contiguous()


def _flat_f32(values: Tensor) -> Tensor:
    return values.reshape(-1).to(torch.float32).contiguous()


@out_op("rlfuse::token_logprobs_fwd", ROW, ROW, ROW)
def token_logprobs_fwd(
    logits: Tensor, tokens: Tensor, temperature: float, backend: str, inplace_backward: bool,
    temperatures: Tensor | None = None, kept_min: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "torch":
        return reference.row_statistics(logits, tokens, reference_temperature(temperature, temperatures), kept_min)
    rows_view, layout = as_rows(logits)
    out_shape = logits.shape[:-1]
    logp, entropy, lse = (torch.empty(out_shape, dtype=torch.float32, device=logits.device) for _ in range(3))
    if layout[0] > 0:
        kernels(backend, OP).token_logprobs_fwd(
            logits=rows_view, layout=layout, vocab=logits.shape[-1], tokens=_flat_tokens(tokens),
            inv_temp=1.0 / temperature, logp=logp, entropy=entropy, lse=lse,
            inv_temps=inv_temps(temperatures), kept_min=rows_f32(kept_min),
        )
    return logp, entropy, lse


def _launch_backward(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature, backend, grad_logits,
                     temperatures, kept_min):
    rows_view, layout, grad_layout = gradient_layouts(logits, grad_logits)
    if layout[0] == 0:
        return
    kernels(backend, OP).token_logprobs_bwd(
        logits=rows_view, layout=layout, vocab=logits.shape[-1], tokens=_flat_tokens(tokens),
        inv_temp=1.0 / temperature, lse=_flat_f32(lse), entropy=_flat_f32(entropy), grad_logp=_flat_f32(grad_logp),
        grad_entropy=_flat_f32(grad_entropy), grad_logits=grad_logits, grad_layout=grad_layout,
        inv_temps=inv_temps(temperatures), kept_min=rows_f32(kept_min),
    )


@out_op("rlfuse::token_logprobs_bwd", gradient())
def token_logprobs_bwd(
    logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor,
    temperature: float, backend: str, temperatures: Tensor | None = None, kept_min: Tensor | None = None,
) -> Tensor:
    if backend == "torch":
        grad = reference.row_gradient(logits, tokens, lse, entropy, grad_logp, grad_entropy,
                                      reference_temperature(temperature, temperatures), kept_min)
        return grad.to(logits.dtype)
    grad_logits = empty_gradient(logits)
    _launch_backward(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature, backend, grad_logits,
                     temperatures, kept_min)
    return grad_logits


@out_op("rlfuse::token_logprobs_bwd_inplace", mutates_args=("logits",))
def token_logprobs_bwd_inplace(
    logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor,
    temperature: float, backend: str, temperatures: Tensor | None = None, kept_min: Tensor | None = None,
) -> None:
    if backend == "torch":
        inplace_layout(logits)
        logits.copy_(reference.row_gradient(logits, tokens, lse, entropy, grad_logp, grad_entropy,
                                            reference_temperature(temperature, temperatures), kept_min))
        return
    _launch_backward(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature, backend, logits,
                     temperatures, kept_min)


def _setup_context(ctx, inputs, output):
    logits, tokens, temperature, backend, inplace_backward, temperatures, kept_min = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, tokens, lse, entropy, temperatures, kept_min)
    ctx.temperature, ctx.backend, ctx.inplace_backward = temperature, backend, inplace_backward


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, tokens, lse, entropy, temperatures, kept_min = ctx.saved_tensors
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy
    args = (tokens, lse, entropy, grad_logp, grad_entropy, ctx.temperature, ctx.backend, temperatures, kept_min)
    if ctx.inplace_backward:
        token_logprobs_bwd_inplace(logits, *args)
        grad_logits = logits
    else:
        grad_logits = token_logprobs_bwd(logits, *args)
    return grad_logits, None, None, None, None, None, None


token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)
