"""Plain-PyTorch token log-probs and entropy, written from docs/SPEC.md sections 1-2.

Two independent forms:

* :func:`token_logprobs_reference` — the textbook eager computation with autograd (log_softmax,
  gather, entropy). It is the test oracle (run in float64) and the "torch eager" benchmark baseline.
* :func:`row_statistics` / :func:`row_gradient` — the explicit forward statistics and the
  closed-form gradient of docs/SPEC.md section 2, used by the ``backend="torch"`` fallback of the ops.
"""

from __future__ import annotations

import torch


def per_row(value, like: torch.Tensor):
    """A number as it is; a per-row tensor (one value per row of ``like``) in ``like``'s dtype with a
    trailing dimension, to broadcast over each row (a per-token temperature, README)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(like.shape[:-1]).unsqueeze(-1)
    return value


def row_divisor(value, like: torch.Tensor) -> torch.Tensor:
    """``per_row`` as a tensor for a number too (0-dim, ``like``'s dtype and device), for the kernels'
    callers that promise a constant per-token tensor the number's bits: dividing by a tensor is a
    true division on every device, where CUDA divides by a Python number through its reciprocal."""
    if isinstance(value, torch.Tensor):
        return per_row(value, like)
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _scaled(logits: torch.Tensor, temperature) -> torch.Tensor:
    """x = z / T, computed in at least float32; ``temperature`` a number or one value per row."""
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute_dtype)
    return x / per_row(temperature, x)


def _kept(x: torch.Tensor, kept_min) -> torch.Tensor:
    """x restricted to the kept set {j : x_j >= kept_min[row]} (a sampler's filtered support): the
    entries outside become -inf. ``kept_min`` None: x unchanged."""
    if kept_min is None:
        return x
    return torch.where(x >= per_row(kept_min, x), x, torch.full_like(x, float("-inf")))


def log_softmax_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p, max, log_sum)`` of rows x with ``log p = (x - max) - log_sum``, ``log_sum =
    log sum exp(x - max)`` and ``lse = max + log_sum`` (max and log_sum keep their last dim).

    Never ``x - lse``: an lse rounded to the compute dtype carries an error of its own scale
    (~5e-4 at |lse| = 1e4 in fp32), which ``x - lse`` passes to every log-prob, while ``x - max``
    is exact for the entries that carry probability. A row whose max is not finite (all -inf,
    +inf, NaN) is shifted by 0, as torch.logsumexp does.
    """
    row_max = x.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = x - row_max
    log_sum = shifted.exp().sum(-1, keepdim=True).log()
    return shifted - log_sum, row_max, log_sum


def _entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    probs = log_probs.exp()
    # A -inf logit contributes 0 * -inf := 0; masking log p (not the product) also keeps the
    # gradient of those entries at 0 instead of NaN.
    finite_log_probs = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    return -(probs * finite_log_probs).sum(-1)


def token_logprobs_reference(
    logits: torch.Tensor, tokens: torch.Tensor, temperature=1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(logp, entropy)`` of shape ``logits.shape[:-1]``, differentiable in ``logits``.

    Computed in float32 (float64 for float64 logits), materialising the full log-softmax.
    """
    log_probs = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    logp = log_probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return logp, _entropy_from_log_probs(log_probs)


def row_statistics(
    logits: torch.Tensor, tokens: torch.Tensor, temperature, kept_min=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of docs/SPEC.md section 1 without autograd: ``(logp, entropy, lse)``, float32.

    ``temperature``: a number or one value per row. ``kept_min`` (one value per row, or None): the
    distribution restricted to {j : x_j >= kept_min} and renormalised (a chosen token outside has
    log-prob -inf). Out-of-range token ids give a NaN log-prob (the Python layer rejects them
    before this runs).
    """
    x = _kept(_scaled(logits, temperature), kept_min)
    log_probs, row_max, log_sum = log_softmax_parts(x)
    lse = (row_max + log_sum).squeeze(-1)
    vocab = x.shape[-1]
    in_range = (tokens >= 0) & (tokens < vocab)
    target = log_probs.gather(-1, tokens.long().clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(in_range, target, torch.full_like(lse, float("nan")))
    return logp.float(), _entropy_from_log_probs(log_probs).float(), lse.float()


def row_gradient(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature,
    kept_min=None,
) -> torch.Tensor:
    """docs/SPEC.md section 2: dL/dz = [g_logp (1[j=y] - p) - g_H p (log p + H)] / T, in float32.

    log p is recomputed from the row as (x - max) - log_sum; the saved fp32 ``lse`` is not used:
    x - lse would carry lse's rounding (relative ~6e-8 of |lse|) into every p_j. ``temperature`` and
    ``kept_min`` as in :func:`row_statistics`: outside the kept set the gradient is exactly 0, and a
    chosen token outside it (log-prob -inf, a constant) passes no gradient through ``g_logp``.
    """
    del lse  # see above
    log_probs = log_softmax_parts(_kept(_scaled(logits, temperature), kept_min))[0]
    probs = log_probs.exp()
    if kept_min is not None:
        vocab = logits.shape[-1]
        chosen = log_probs.gather(-1, tokens.long().clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
        grad_logp = torch.where(chosen > float("-inf"), grad_logp.to(chosen.dtype), 0.0)
    # Upstream gradients in the row's compute dtype (fp64 logits get fp32 upstream gradients).
    g_logp = grad_logp.to(log_probs.dtype).unsqueeze(-1)
    g_h = grad_entropy.to(log_probs.dtype).unsqueeze(-1)
    entropy = entropy.to(log_probs.dtype)
    grad = torch.where(probs == 0, 0.0, -probs * (g_logp + g_h * (log_probs + entropy.unsqueeze(-1))))
    vocab = logits.shape[-1]
    in_range = ((tokens >= 0) & (tokens < vocab)).unsqueeze(-1)
    target = torch.where(in_range, g_logp, 0.0)
    grad = grad.scatter_add(-1, tokens.long().clamp(0, vocab - 1).unsqueeze(-1), target)
    # A row with no upstream gradient is exactly 0, whatever its logits hold (NaN in a masked row).
    no_gradient = ((grad_logp == 0) & (grad_entropy == 0)).unsqueeze(-1)
    return torch.where(no_gradient, 0.0, grad / per_row(temperature, grad)).float()
