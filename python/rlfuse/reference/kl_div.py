"""Plain-PyTorch full-vocabulary KL between two logit tensors (docs/SPEC.md section 5, last bullet).

* :func:`kl_divergence_reference` — two log-softmaxes and autograd: the test oracle (in float64)
  and the "torch eager" benchmark baseline.
* :func:`kl_statistics` / :func:`kl_gradients` — the explicit forward and closed-form gradients
  the kernels compute, used by the ``backend="torch"`` fallback of the op.
"""

from __future__ import annotations

import torch

from .token_logprobs import _scaled, log_softmax_parts, per_row


def _plogp_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b) with 0 where a == 0 (also for log_b = -inf)."""
    a = log_a.exp()
    safe = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return a * safe


def kl_divergence_reference(logits, other, direction="forward", temperature=1.0):
    """KL(p || q) (forward) or KL(q || p) (reverse) per row, p = softmax(logits / T), q = softmax(other / T)."""
    log_p = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    log_q = torch.log_softmax(_scaled(other, temperature), dim=-1)
    if direction == "forward":
        return _plogp_ratio(log_p, log_q).sum(-1)
    return _plogp_ratio(log_q, log_p).sum(-1)


def kl_statistics(logits, other, direction, temperature):
    """(kl, lse_p, lse_q), float32, without autograd. log p and log q are (x - max) - log_sum,
    never x - lse (token_logprobs.log_softmax_parts)."""
    log_p, max_p, log_sum_p = log_softmax_parts(_scaled(logits, temperature))
    log_q, max_q, log_sum_q = log_softmax_parts(_scaled(other, temperature))
    lse_p, lse_q = (max_p + log_sum_p).squeeze(-1), (max_q + log_sum_q).squeeze(-1)
    if direction == "forward":
        kl = _plogp_ratio(log_p, log_q).sum(-1)
    else:
        kl = _plogp_ratio(log_q, log_p).sum(-1)
    return kl.float(), lse_p.float(), lse_q.float()


def kl_gradients(logits, other, kl, lse_p, lse_q, grad_kl, direction, temperature):
    """(dL/dlogits, dL/dother) in float32 from the closed forms in rlfuse's kernels.h.

    log p and log q are recomputed from the rows as (x - max) - log_sum; the saved fp32 lse's are
    not used (x - lse would carry their rounding, relative ~6e-8 of |lse|, into every p_j).
    """
    del lse_p, lse_q  # see above
    log_p = log_softmax_parts(_scaled(logits, temperature))[0]
    log_q = log_softmax_parts(_scaled(other, temperature))[0]
    p, q = log_p.exp(), log_q.exp()
    g = grad_kl.unsqueeze(-1)
    g = g / per_row(temperature, g)  # temperature: a number or one value per row
    k = kl.unsqueeze(-1)
    if direction == "forward":
        grad_x = torch.where(p == 0, 0.0, p * (log_p - log_q - k))
        grad_y = q - p
    else:
        grad_x = p - q
        grad_y = torch.where(q == 0, 0.0, q * (log_q - log_p - k))
    # A zero upstream gradient (masked row) gives exact zeros, whatever the row holds.
    return (torch.where(g == 0, 0.0, g * grad_x).float(), torch.where(g == 0, 0.0, g * grad_y).float())
