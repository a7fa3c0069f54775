"""Public functions on vocabulary-sized logits."""

from __future__ import annotations

import torch

from . import _validation as check
from ._layout import inplace_layout
from .backends import resolve_backend
from .ops._launch import split_temperature
from .ops.kl_div import DIRECTIONS, kl_div_fwd
from .ops.token_logprobs import token_logprobs_fwd
from .source import is_source


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    inplace_backward: bool = False,
    top_k=None,
    top_p=None,
    min_p=None,
):
    """Log-probability of each chosen token (and optionally the entropy) from raw logits.

    Args:
        logits: ``[..., V]`` float32/float16/bfloat16 (float64 runs on the torch backend). Views
            whose last dimension is contiguous, e.g. ``logits[:, :-1]``, are read in place. Or a
            logits source (``LinearLogits``, ``ShardedLogits``): the gradient then reaches its tensors.
        tokens: int32/int64 ids of shape ``logits.shape[:-1]``, each in ``[0, V)``.
        temperature: ``T > 0``; the distribution is ``softmax(logits / T)``. A number, or a float
            tensor of the tokens' shape (one T per token, e.g. rollouts sampled at varying
            temperature; a 0-dim tensor applies to every token). The temperature gets no gradient
            (one that requires grad is a ``ValueError``).
        return_entropy: also return the entropy of that distribution.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``.
        inplace_backward: the backward writes the gradient into ``logits``' own memory (no
            ``[..., V]`` allocation); ``logits`` must not be used after the backward.
        top_k, top_p, min_p: the log-probs under the sampler's filtered and renormalised
            distribution (``rlfuse.sample``'s filters; README "Per-token temperature and the
            sampler's support"): ``rlfuse.filtered.filtered_token_logprobs``.

    Returns:
        ``logp`` (float32, shape ``logits.shape[:-1]``), or ``(logp, entropy)``. Both are
        differentiable with respect to ``logits`` through one fused gradient kernel.
    """
    if _filtered(top_k, top_p, min_p):
        if inplace_backward:
            raise ValueError("inplace_backward is not available with top_k / top_p / min_p")
        logp, entropy = _filtered_token_logprobs(logits, tokens, temperature, top_k, top_p, min_p, backend)
    else:
        logp, entropy = _forward(logits, tokens, temperature, backend, inplace_backward)
    return (logp, entropy) if return_entropy else logp


def entropy(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, backend: str = "auto", top_k=None,
            top_p=None, min_p=None) -> torch.Tensor:
    """Entropy (natural log) of ``softmax(logits / T)`` per row, float32, differentiable. ``logits``
    may be a logits source, ``temperature`` a number or one value per row, and ``top_k`` /
    ``top_p`` / ``min_p`` restrict the distribution as for ``token_logprobs``."""
    if not is_source(logits):
        check.check_logits(logits)
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    if _filtered(top_k, top_p, min_p):
        return _filtered_token_logprobs(logits, tokens, temperature, top_k, top_p, min_p, backend)[1]
    return _forward(logits, tokens, temperature, backend, False, tokens_checked=True)[1]


def _filtered(top_k, top_p, min_p) -> bool:
    return any(value is not None for value in (top_k, top_p, min_p))


def _filtered_token_logprobs(logits, tokens, temperature, top_k, top_p, min_p, backend):
    from .filtered import filtered_token_logprobs  # the sampler's support (its own module)

    return filtered_token_logprobs(logits, tokens, temperature, top_k, top_p, min_p, backend)


def _forward(logits, tokens, temperature, backend, inplace_backward, tokens_checked=False):
    """(logp, entropy). ``tokens_checked``: the caller has validated the ids (entropy's own zeros,
    policy_loss's data checks); otherwise their range is a data check here. The ids and a
    per-token temperature are read back together: one host read."""
    source = is_source(logits)
    if not source:
        check.check_logits(logits)
    checks = check.DataChecks(logits)
    read_back = not tokens_checked or isinstance(temperature, torch.Tensor)  # else no check, no collective
    if not tokens_checked:
        check.check_tokens(tokens, logits, checks)
    temperature = check.check_temperature(temperature, tokens, checks)
    if read_back:
        checks.run()
    if source:
        if inplace_backward:
            raise ValueError("inplace_backward applies to a logits tensor; a logits source never stores its logits")
        return logits._token_logprobs(tokens, temperature, backend)
    resolved = resolve_backend(backend, logits.device, "token_logprobs", logits.dtype)
    if inplace_backward:
        inplace_layout(logits)
    scalar, temperatures = split_temperature(temperature)
    logp, entropy, _ = token_logprobs_fwd(logits, tokens, scalar, resolved, bool(inplace_backward), temperatures)
    return logp, entropy


def kl_divergence(
    logits: torch.Tensor,
    other_logits: torch.Tensor,
    direction: str = "forward",
    temperature: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Full-vocabulary KL per row between ``p = softmax(logits / T)`` and ``q = softmax(other_logits / T)``.

    ``direction="forward"`` gives KL(p || q), ``"reverse"`` KL(q || p). Returns float32 of shape
    ``logits.shape[:-1]``, differentiable with respect to both inputs (a gradient is computed only
    for inputs that require it). Neither distribution is materialised: the forward reads both rows
    once. ``mask`` (same shape as the result) zeroes masked rows' values and gradients.
    ``temperature``: a number, or a float tensor of the result's shape (one T per row, for both
    distributions; no gradient).

    Either argument may be a logits source (``LinearLogits``; ``ShardedLogits`` sharded like the other).
    """
    check_logits_pair(logits, other_logits)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != logits.shape[:-1]):
        raise ValueError(f"mask must be a tensor of shape {tuple(logits.shape[:-1])}")
    temperature = check.check_temperature(temperature, logits=logits)
    return checked_kl_divergence(logits, other_logits, direction, temperature, mask, backend)


def check_logits_pair(logits, other_logits, name: str = "other_logits") -> None:
    """Both logits (tensors or sources) valid, ``other_logits`` (called ``name``) with the logits'
    shape, dtype and device."""
    for label, value in (("logits", logits), (name, other_logits)):
        if not is_source(value):
            check.check_logits(value, label)
    if other_logits.shape != logits.shape:
        raise ValueError(
            f"{name} must have the logits' shape {tuple(logits.shape)} (same vocabulary), "
            f"got {tuple(other_logits.shape)}"
        )
    dtype, other_dtype = _dtype(logits), _dtype(other_logits)
    if other_dtype != dtype:
        raise TypeError(f"{name} must have the logits' dtype {dtype}, got {other_dtype}")
    if other_logits.device != logits.device:
        raise ValueError(f"{name} are on {other_logits.device} but logits are on {logits.device}")


def checked_kl_divergence(logits, other_logits, direction, temperature, mask, backend):
    """``kl_divergence`` on validated arguments (``temperature`` a float or a float64 tensor of the
    rows' shape): no further check, no host read."""
    if is_source(logits) or is_source(other_logits):
        if not is_source(logits):  # KL(p || q) = the reverse KL seen from q
            logits, other_logits = other_logits, logits
            direction = "reverse" if direction == "forward" else "forward"
        kl = logits._kl_divergence(other_logits, direction, temperature, backend, mask)
    else:
        resolved = resolve_backend(backend, logits.device, "kl_div", logits.dtype)
        scalar, temperatures = split_temperature(temperature)
        kl, _, _ = kl_div_fwd(logits, other_logits, scalar, DIRECTIONS[direction], resolved, temperatures)
    if mask is not None:
        kl = torch.where(mask.to(device=kl.device, dtype=torch.bool), kl, torch.zeros_like(kl))
    return kl


def _dtype(logits) -> torch.dtype:
    """The dtype the logits are (or, for a source, are made) in."""
    return logits.compute_dtype() if is_source(logits) else logits.dtype
