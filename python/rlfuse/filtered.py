"""Log-probs on the sampler's filtered support (docs/SPEC.md section 8, "Scoring"; issue 17).

``filtered_token_logprobs`` gives each chosen token's log-prob under the distribution ``rlfuse.sample``
draws from with the same temperature / top-k / top-p / min-p (the kept set renormalised, same
thresholds, same tie rule), and that distribution's entropy, both differentiable in the logits, so
that training ratios compare like with like (NeMo-RL ``TrainingSamplingParams``).

Two kernels, no new math: the sampler in score mode (``rlfuse::sample_score``) gives the row's
threshold ``kept_min`` and the exact log-prob (bit for bit what ``sample`` returned for the same
token); ``token_logprobs`` restricted to ``{j : x_j >= kept_min}`` gives the kept set's entropy and,
in the backward, the gradient (SPEC section 2 over the kept set, exactly 0 outside it). The returned
log-prob is the score op's value; its gradient is the token_logprobs kernel's. Both see the same
``x = z * fp32(1 / T)`` (the temperature is rounded to fp32 first, as the sampler does), so the
kept sets agree entry for entry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validation as check
from .ops.sample import sample_score
from .ops.token_logprobs import token_logprobs_fwd
from .sampling import _fp32, _sampling_params
from .source import is_source


class _ExactValue(torch.autograd.Function):
    """``exact`` as the value, the gradient passed to ``differentiable`` (the same quantity up to
    rounding), except where ``exact`` is -inf (a token outside the kept set: a constant)."""

    @staticmethod
    def forward(ctx, differentiable: Tensor, exact: Tensor) -> Tensor:
        ctx.save_for_backward(exact)
        return exact.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (exact,) = ctx.saved_tensors
        return torch.where(exact == float("-inf"), torch.zeros_like(grad), grad), None


def _kept_statistics(logits: Tensor, tokens: Tensor, temperature: Tensor, scalar: float | None,
                     kept_min: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    """(logp, entropy) over each row's kept set, differentiable (the token_logprobs op with
    ``kept_min``; None: the whole row). ``temperature``: fp32 [rows], the sampler's; ``scalar``: the
    same T as a number (fp32-rounded) when every token has it, else None."""
    if backend == "torch":
        # The reference divides by T; the sampler multiplies by fp32(1 / T). Scale here, as the
        # sampler does, so that the threshold entry (a value of x) stays in the kept set.
        x = logits.float() * torch.reciprocal(temperature).reshape(*logits.shape[:-1], 1)
        logp, entropy, _ = token_logprobs_fwd(x, tokens, 1.0, backend, False, None, kept_min)
    elif scalar is None:
        # float64 copies of the fp32 T: the op's fp32(1 / T) is then the sampler's 1.0f / T.
        logp, entropy, _ = token_logprobs_fwd(logits, tokens, 1.0, backend, False,
                                              temperature.double().reshape(tokens.shape), kept_min)
    else:
        # The op's fp32(1.0 / T) of an fp32 T is the sampler's 1.0f / T (one correct rounding).
        logp, entropy, _ = token_logprobs_fwd(logits, tokens, scalar, backend, False, None, kept_min)
    return logp, entropy


def min_p_logprobs(rows: Tensor, tokens: Tensor, temperature: float | Tensor, min_p: float,
                   backend: str) -> tuple[Tensor, Tensor]:
    """``(kept, full)`` [rows], fp32, differentiable in ``rows`` ([rows, V]): each row's token
    log-prob over the sampler's min-p kept set (``kept_min`` from the score op; -inf outside the set)
    and over the whole row, both at ``x = z * fp32(1 / fp32(T))`` (per-row temperatures, as the
    sampler takes them; ``temperature`` a number or one value per row), on a kernel ``backend``. No
    data checks and no host read, so it traces under ``torch.compile(fullgraph=True)``: for rows the
    caller knows to be valid (Lp-Reg's selected rows, docs/SPEC.md section 11)."""
    count, device = rows.shape[0], rows.device
    if isinstance(temperature, Tensor):
        temperatures = temperature.reshape(count).to(torch.float32)
    else:
        temperatures = torch.full((count,), temperature, dtype=torch.float32, device=device)
    no_top_k = torch.zeros(count, dtype=torch.int32, device=device)
    no_top_p = torch.ones(count, dtype=torch.float32, device=device)
    min_ps = torch.full((count,), min_p, dtype=torch.float32, device=device)
    kept_min = sample_score(rows.detach(), tokens, temperatures, no_top_k, no_top_p, min_ps, None, backend)[3]
    kept, _ = _kept_statistics(rows, tokens, temperatures, None, kept_min, backend)
    full, _ = _kept_statistics(rows, tokens, temperatures, None, None, backend)
    return kept, full


def filtered_token_logprobs(logits, tokens: Tensor, temperature=1.0, top_k=None, top_p=None, min_p=None,
                            backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(logp, entropy)`` of shape ``tokens.shape``, fp32, differentiable in ``logits``: the chosen
    token's log-prob under ``softmax(logits / T)`` restricted to the kept set of ``rlfuse.sample``
    with the same ``top_k`` / ``top_p`` / ``min_p`` (docs/SPEC.md section 8) and renormalised, and
    that distribution's entropy.

    ``logp`` equals ``rlfuse.sample``'s ``logprobs`` for the same token bit for bit (same backend).
    A token outside the kept set gets ``-inf`` and no gradient through ``logp``. ``temperature`` is a
    positive number or one value per token (rounded to fp32, as the sampler takes it; 0, greedy, is
    a ``ValueError``: nothing to differentiate); ``top_k`` / ``top_p`` / ``min_p`` a number or one value
    per token, checked as in ``rlfuse.sample``. ``logits`` may be a ``LinearLogits`` (row chunks);
    other logits sources are a ``ValueError``. Data checks (token ids in [0, V), parameter values,
    rows that cannot be sampled) cost one host synchronisation, as in ``rlfuse.sample``.
    """
    if is_source(logits):
        return _on_linear_logits(logits, tokens, temperature, top_k, top_p, min_p, backend)
    check.check_logits(logits)
    checks = check.DataChecks(logits)
    check.check_tokens(tokens, logits, checks)
    temperature = check.check_temperature(temperature, tokens, checks, logits)
    per_token = isinstance(temperature, Tensor)
    params = _sampling_params(logits, temperature.reshape(-1) if per_token else temperature, top_k, top_p, min_p,
                              None, backend, "token_logprobs", checks)
    exact, _, row_entropy, kept_min = sample_score(params.logits.detach(), tokens, *params.op_args(), None,
                                                   params.backend)
    params.check_rows(row_entropy)
    scalar = None if per_token else _fp32(temperature)
    logp, entropy = _kept_statistics(params.logits, tokens, params.temperature, scalar, kept_min.detach(),
                                     params.backend)
    return _ExactValue.apply(logp, exact), entropy


def _on_linear_logits(source, tokens, temperature, top_k, top_p, min_p, backend):
    """The tensor path a chunk of rows at a time (``linear.map_rows``: each chunk's logits made,
    used, and recomputed in the backward), every per-token argument sliced with its rows."""
    from .linear import LinearLogits, map_rows

    if not isinstance(source, LinearLogits):
        raise ValueError(f"logits: token_logprobs with top_k / top_p / min_p takes a tensor or a LinearLogits, "
                         f"not a {type(source).__name__} (the filtered support needs whole rows)")
    check.check_tokens(tokens, source)
    lead = source.shape[:-1]
    rows = math.prod(lead)

    def per_token(name, value, dtype):
        if isinstance(value, Tensor):
            if value.numel() != rows and value.dim() != 0:
                raise ValueError(f"{name} must be a number or one value per token ({rows}), got shape "
                                 f"{tuple(value.shape)}")
            return value.to(tokens.device).expand(lead).reshape(rows)
        return torch.full((rows,), value, dtype=dtype, device=tokens.device)

    arguments = [per_token("temperature", temperature, torch.float64),
                 per_token("top_k", 0 if top_k is None else top_k, torch.int64),
                 per_token("top_p", 1.0 if top_p is None else top_p, torch.float32),
                 per_token("min_p", 0.0 if min_p is None else min_p, torch.float32)]

    def chunk(x, chunk_tokens, *chunk_arguments):
        return filtered_token_logprobs(x, chunk_tokens, *chunk_arguments, backend=backend)

    logp, entropy = map_rows(chunk, [source], [tokens.reshape(rows), *arguments])
    return logp.reshape(lead), entropy.reshape(lead)
