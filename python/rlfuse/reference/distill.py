"""Plain-PyTorch distillation divergences (docs/distillation.md), written from the formulas.

* :func:`jsd_reference` — TRL's generalised JSD(beta) per row from two log-softmaxes (beta = 0 is
  KL(teacher || student), beta = 1 KL(student || teacher), as TRL's GKD defines them): the
  "torch eager" benchmark baseline and an autograd reference.
* :func:`jsd_statistics` / :func:`jsd_gradients` — the forward and closed-form gradients the JSD
  kernels compute (schema.h JsdFwdArgs / JsdBwdArgs), used by the ``backend="torch"`` fallback.
* :func:`sparse_kl_terms` — the KL of a sparse (top-k) teacher against the student on the
  teacher's support, in TRL's tail-bucket, verl's and the renormalised conventions.
* :func:`sampled_kl_terms` — the sampled-token reverse-KL estimators k1 / k3.
"""

from __future__ import annotations

import math

import torch

from .token_logprobs import _scaled, log_softmax_parts, per_row

TAIL_LOG_SUM_MAX = -1e-7  # TRL's _add_tail_bucket clamp: the support's mass is at most 1 - ~1e-7


def _xlogy_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b), 0 where a == 0."""
    a = log_a.exp()
    return a * torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))


def jsd_reference(logits, other, beta=0.5, temperature=1.0):
    """Per row: beta KL(q || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta q,
    p = softmax(logits / T) (student), q = softmax(other / T) (teacher); beta = 0 gives KL(q || p),
    beta = 1 KL(p || q) (TRL's GKD convention)."""
    log_p = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    log_q = torch.log_softmax(_scaled(other, temperature), dim=-1)
    if beta == 0:
        return _xlogy_ratio(log_q, log_p).sum(-1)
    if beta == 1:
        return _xlogy_ratio(log_p, log_q).sum(-1)
    log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
    return beta * _xlogy_ratio(log_q, log_m).sum(-1) + (1 - beta) * _xlogy_ratio(log_p, log_m).sum(-1)


def mixture_logs(log_p: torch.Tensor, log_q: torch.Tensor, beta: float):
    """(u, v) = (log(m / p), log(m / q)) per element, as the kernels form them: with d = log q - log p,
    w = (1 - beta) + beta e^d (d <= 0) or beta + (1 - beta) e^-d (d > 0), r = log w; u = r, v = r - d
    or u = r + d, v = r. Exactly 0 where d = 0."""
    d = log_q - log_p
    below = d <= 0
    e = torch.exp(-d.abs())
    w = torch.where(below, (1.0 - beta) + beta * e, beta + (1.0 - beta) * e)
    r = torch.log(w)
    return torch.where(below, r, r + d), torch.where(below, r - d, r)


def jsd_statistics(logits, other, beta, temperature):
    """(jsd, KL(p || m), KL(q || m), lse_p, lse_q), float32, without autograd (0 < beta < 1)."""
    log_p, max_p, log_sum_p = log_softmax_parts(_scaled(logits, temperature))
    log_q, max_q, log_sum_q = log_softmax_parts(_scaled(other, temperature))
    p, q = log_p.exp(), log_q.exp()
    u, v = mixture_logs(log_p, log_q, beta)
    kl_p = -torch.where(p == 0, 0.0, p * u).sum(-1)
    kl_q = -torch.where(q == 0, 0.0, q * v).sum(-1)
    jsd = beta * kl_q + (1.0 - beta) * kl_p
    lse_p, lse_q = (max_p + log_sum_p).squeeze(-1), (max_q + log_sum_q).squeeze(-1)
    return jsd.float(), kl_p.float(), kl_q.float(), lse_p.float(), lse_q.float()


def jsd_gradients(logits, other, kl_p, kl_q, grad, beta, temperature):
    """(dL/dlogits, dL/dother) in float32 (float64 for float64 logits):
    dJSD/dx_j = -(1 - beta) p_j (u_j + KL(p || m)), dJSD/dy_j = -beta q_j (v_j + KL(q || m)), times
    grad / T; zero rows where grad == 0. log p, log q are recomputed from the rows."""
    log_p = log_softmax_parts(_scaled(logits, temperature))[0]
    log_q = log_softmax_parts(_scaled(other, temperature))[0]
    p, q = log_p.exp(), log_q.exp()
    u, v = mixture_logs(log_p, log_q, beta)
    g = grad.to(log_p.dtype).unsqueeze(-1)
    g = g / per_row(temperature, g)  # temperature: a number or one value per row
    grad_x = torch.where(p == 0, 0.0, -(1.0 - beta) * p * (u + kl_p.to(log_p.dtype).unsqueeze(-1)))
    grad_y = torch.where(q == 0, 0.0, -beta * q * (v + kl_q.to(log_q.dtype).unsqueeze(-1)))
    return torch.where(g == 0, 0.0, g * grad_x), torch.where(g == 0, 0.0, g * grad_y)


def _tail(log_probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of the support's probabilities), the sum clamped to <= e^-1e-7 (TRL)."""
    log_sum = torch.logsumexp(log_probs.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.log(-torch.expm1(log_sum.clamp(max=TAIL_LOG_SUM_MAX)))


def sparse_kl_terms(student_logprobs, teacher_logprobs, valid, convention="tail"):
    """Per-token KL(teacher || student) on the teacher's support.

    ``student_logprobs``: the student's full-vocabulary log-probs at the support ids ``[..., K]``;
    ``teacher_logprobs``: the teacher's (full-vocabulary) log-probs there; ``valid``: which of the
    K slots hold a support id. Conventions:

    * ``"tail"`` (TRL's ``_add_tail_bucket``): both sides get a (K+1)-th bucket holding their
      remaining mass, ``log(1 - sum_k exp(logprob_k))`` with the sum clamped to ``<= e^-1e-7``;
      ``sum_k t_k (log t_k - log s_k) + t_tail (log t_tail - log s_tail)``.
    * ``"verl"`` (verl's GKD recipe, megatron_kl_loss.py): the teacher renormalised on its support,
      ``t~ = softmax(teacher_logprobs)``, against the student's unrenormalised log-probs:
      ``sum_k t~_k (log t~_k - log s_k)``; its student gradient is ``s - t~`` (t~ = 0 off the support).
    * ``"renorm"`` (TRL with ``loss_add_tail=False``): both renormalised on the support.
    """
    neg_inf = float("-inf")
    s = student_logprobs.masked_fill(~valid, neg_inf)
    t = teacher_logprobs.masked_fill(~valid, neg_inf)
    if convention == "tail":
        s_tail, t_tail = _tail(s, valid), _tail(t, valid)
        body = _xlogy_ratio(t, torch.where(valid, s, 0.0)).masked_fill(~valid, 0.0).sum(-1)
        return body + _xlogy_ratio(t_tail, s_tail)
    if convention == "verl":
        t = torch.log_softmax(t, dim=-1)
    elif convention == "renorm":
        t = torch.log_softmax(t, dim=-1)
        s = torch.log_softmax(s, dim=-1)
    else:
        raise ValueError(f"unknown sparse convention {convention!r}")
    # Rows without any support entry: 0 (log_softmax of all -inf is NaN).
    t = torch.where(valid, t, neg_inf)
    return _xlogy_ratio(t, torch.where(valid, s, 0.0)).masked_fill(~valid, 0.0).sum(-1)


def sampled_kl_terms(logp, teacher_logp, estimator="k1"):
    """Sampled-token reverse-KL estimators with D = logp - teacher_logp (student samples):

    * ``"k1"``: value D, gradient D (the score-function gradient of KL(student || teacher):
      the teacher's log-ratio as a per-token advantage, -D);
    * ``"k3"``: value ``clamp(e^u - u - 1, -10, 10)``, ``u = clamp(-D, -20, 20)`` (docs/SPEC.md
      section 5's k3), gradient ``1 - e^u`` (0 where a clamp bites), the pathwise gradient of k3.
    """
    d = logp - teacher_logp.detach()
    if estimator == "k1":
        value = d.detach()
        return value + value * (logp - logp.detach())
    if estimator == "k3":
        u = (-d).clamp(-20.0, 20.0)
        return (u.exp() - u - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")
