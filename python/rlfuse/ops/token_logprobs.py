"""``rlfuse::token_logprobs_*``: per-token log-probs and entropy from logits (SPEC.md 1-2).

Declared with torch.library (schema + fake + autograd), so the op works under torch.compile and
passes ``torch.library.opcheck``. Three ops:

* ``token_logprobs_fwd(logits, tokens, temperature, backend, inplace_backward) -> (logp, entropy, lse)``
* ``token_logprobs_bwd(...) -> grad_logits``: a new gradient tensor.
* ``token_logprobs_bwd_inplace(logits!, ...)``: writes the gradient into ``logits`` itself (declared
  as a mutation), so the backward needs no ``[N, V]`` memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._layout import as_rows, contiguous_layout, inplace_layout
from ._launch import empty_gradient, kernels

OP = "token_logprobs"


def _flat_tokens(tokens: Tensor) -> Tensor:
    return tokens.reshape(-1).to(torch.int64).contiguous()


def _flat_f32(values: Tensor) -> Tensor:
    return values.reshape(-1).to(torch.float32).contiguous()


@torch.library.custom_op("rlfuse::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(
    logits: Tensor, tokens: Tensor, temperature: float, backend: str, inplace_backward: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "torch":
        return reference.row_statistics(logits, tokens, temperature)
    rows_view, layout = as_rows(logits)
    out_shape = logits.shape[:-1]
    logp, entropy, lse = (torch.empty(out_shape, dtype=torch.float32, device=logits.device) for _ in range(3))
    if layout[0] > 0:
        kernels(backend, OP).token_logprobs_fwd(
            rows_view, layout, logits.shape[-1], _flat_tokens(tokens), 1.0 / temperature, logp, entropy, lse
        )
    return logp, entropy, lse


@token_logprobs_fwd.register_fake
def _(logits, tokens, temperature, backend, inplace_backward):
    shape = logits.shape[:-1]
    return tuple(logits.new_empty(shape, dtype=torch.float32) for _ in range(3))


def _launch_backward(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature, backend, grad_logits):
    if grad_logits is logits:  # in place: the rows are written through logits' own layout
        rows_view, layout = logits, inplace_layout(logits)
        grad_layout = layout
    else:
        rows_view, layout = as_rows(logits)
        grad_layout = contiguous_layout(layout[0], logits.shape[-1])
    if layout[0] == 0:
        return
    kernels(backend, OP).token_logprobs_bwd(
        rows_view, layout, logits.shape[-1], _flat_tokens(tokens), 1.0 / temperature, _flat_f32(lse),
        _flat_f32(entropy), _flat_f32(grad_logp), _flat_f32(grad_entropy), grad_logits, grad_layout,
    )


@torch.library.custom_op("rlfuse::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(
    logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor,
    temperature: float, backend: str,
) -> Tensor:
    if backend == "torch":
        grad = reference.row_gradient(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature)
        return grad.to(logits.dtype)
    grad_logits = empty_gradient(logits)
    _launch_backward(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature, backend, grad_logits)
    return grad_logits


@token_logprobs_bwd.register_fake
def _(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlfuse::token_logprobs_bwd_inplace", mutates_args=("logits",))
def token_logprobs_bwd_inplace(
    logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor,
    temperature: float, backend: str,
) -> None:
    if backend == "torch":
        inplace_layout(logits)
        logits.copy_(reference.row_gradient(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature))
        return
    _launch_backward(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature, backend, logits)


@token_logprobs_bwd_inplace.register_fake
def _(logits, tokens, lse, entropy, grad_logp, grad_entropy, temperature, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, tokens, temperature, backend, inplace_backward = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, tokens, lse, entropy)
    ctx.temperature, ctx.backend, ctx.inplace_backward = temperature, backend, inplace_backward


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, tokens, lse, entropy = ctx.saved_tensors
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy
    args = (tokens, lse, entropy, grad_logp, grad_entropy, ctx.temperature, ctx.backend)
    if ctx.inplace_backward:
        token_logprobs_bwd_inplace(logits, *args)
        grad_logits = logits
    else:
        grad_logits = token_logprobs_bwd(logits, *args)
    return grad_logits, None, None, None, None


token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)
