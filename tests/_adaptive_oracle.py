"""Independent float64 oracle for issue 18's adaptive clipping (docs/SPEC.md section 12).

Imports nothing from rlfuse: each method is written out from its paper's formula (and the authors' code
where the paper leaves a detail open), in float64, with its own loops where the method is a search:

* Per-token PPO clip (Schulman et al. 2017; dual clip, Ye et al. 2020): ``max(-A r, -A clip(r, 1 - el_t,
  1 + eh_t))``, then ``min(., -c_t A)`` for ``A < 0``.
* DCPO (arXiv 2509.02333, DAC): ratio bounds ``0.5 + 0.5 sqrt(max(1 - 4 el / q, 0))`` and
  ``min(0.5 + 0.5 sqrt(1 + 4 eh / q), cap)``, ``q`` the old probability.
* BAPO (arXiv 2510.18927, Algorithm 1 as the authors' recipe steps it): lower bound first, then upper,
  by ``step``, until ``sum_{A>0} A min(r, c+) >= rho / (1 - rho) * sum_{A<0} |A| max(r, c-)``.
* HAPO (arXiv 2509.16591): ``g = log H``, centred on its nearest-rank ``pivot`` quantile, scaled by the
  root mean square, then each side by its largest magnitude; el (1 - a h) where h <= 0, eh (1 + a h) where h > 0.
* ERC (arXiv 2512.05591): tokens with ``(H + 1e-8) / (H_old + 1e-8)`` outside ``(1 - bl, 1 + bh)`` keep
  their loss value and get no gradient.
* CPGD (arXiv 2505.12504): ``-min(A l, A clip(l, log(1 - el), log(1 + eh)))`` plus ``coef`` times the drift,
  value ``r - 1 - l`` and gradient ``min(r - 1, cap) dl``.

The log-ratio is clamped to [-20, 20] (the library's convention, README "Policy losses"); aggregation is
the token mean over valid tokens.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def row_logprobs(logits, tokens, temperature=1.0):
    """float64 log-probs of the chosen tokens and entropies; ``logits`` a float64 leaf (any shape [..., V])."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(p))).sum(-1)  # -inf entries: no NaN gradient
    return logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy


def log_ratio(logp, old):
    return torch.clamp(logp - old.double(), -20.0, 20.0)


def ppo_loss(logp, old, advantages, low, high, dual=None):
    """Per-token clipped PPO with per-token (or scalar) eps_low / eps_high and dual-clip c."""
    a = advantages.double()
    r = torch.exp(log_ratio(logp, old))
    low = torch.as_tensor(low, dtype=F64)
    high = torch.as_tensor(high, dtype=F64)
    clipped = torch.minimum(torch.maximum(r, 1.0 - low), 1.0 + high)
    loss = torch.maximum(-a * r, -a * clipped)
    if dual is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -torch.as_tensor(dual, dtype=F64) * a), loss)
    return loss


def token_mean(per_token, mask):
    valid = mask.bool()
    return torch.where(valid, per_token, torch.zeros_like(per_token)).sum() / max(int(valid.sum()), 1)


def dcpo_eps(old, eps_low, eps_high, cap):
    q = old.double().exp()
    low_ratio = 0.5 + 0.5 * torch.sqrt(torch.clamp(1.0 - 4.0 * eps_low / q, min=0.0))
    high_ratio = torch.clamp(0.5 + 0.5 * torch.sqrt(1.0 + 4.0 * eps_high / q), max=cap)
    return 1.0 - low_ratio, high_ratio - 1.0


def bapo_ratio_bounds(logp, old, advantages, mask, target, low, low_max, high, high_max, step):
    """The search, token by token in Python floats."""
    r = [math.exp(x) for x in log_ratio(logp.detach(), old).flatten().tolist()]
    a = advantages.double().flatten().tolist()
    valid = mask.flatten().tolist()

    def met(c_low, c_high):
        positive = sum(ai * min(ri, c_high) for ri, ai, v in zip(r, a, valid) if v and ai > 0)
        negative = sum(-ai * max(ri, c_low) for ri, ai, v in zip(r, a, valid) if v and ai < 0)
        return negative <= 0 or positive / (negative + 1e-8) >= target / (1.0 - target)

    if met(low, high):
        return low, high
    while low < low_max:
        low = min(low + step, low_max)
        if met(low, high):
            return low, high
    while high < high_max:
        high = min(high + step, high_max)
        if met(low, high):
            return low, high
    return low, high


def hapo_eps(entropy, mask, eps_low, eps_high, pivot, alpha):
    h_flat = entropy.detach().double().flatten()
    valid = mask.flatten().bool()
    g = torch.log(h_flat.clamp(min=1e-8))
    values = sorted(g[valid].tolist())
    median = values[round(pivot * (len(values) - 1))] if values else 0.0
    centred = [(x - median) if v else 0.0 for x, v in zip(g.tolist(), valid.tolist())]
    rms = math.sqrt(max(sum(c * c for c in centred) / max(len(values), 1), 1e-8))
    scaled = [c / rms for c in centred]
    top = max(max([c for c in scaled if c > 0], default=0.0), 1e-8)
    bottom = max(max([-c for c in scaled if c < 0], default=0.0), 1e-8)
    low, high = [], []
    for c in scaled:
        h = c / top if c > 0 else c / bottom
        low.append(eps_low * (1 - alpha * h) if h <= 0 else eps_low)
        high.append(eps_high * (1 + alpha * h) if h > 0 else eps_high)
    shape = entropy.shape
    return torch.tensor(low, dtype=F64).view(shape), torch.tensor(high, dtype=F64).view(shape)


def erc_gate(loss, entropy, old_entropy, beta_low, beta_high):
    ratio = (entropy.detach() + 1e-8) / (old_entropy.double() + 1e-8)
    inside = (ratio > 1.0 - beta_low) & (ratio < 1.0 + beta_high)
    return torch.where(inside, loss, loss.detach())


def cpgd_loss(logp, old, advantages, eps_low, eps_high, coef, cap):
    a = advantages.double()
    lr = log_ratio(logp, old)
    log_low, log_high = (torch.log1p(torch.as_tensor(eps, dtype=F64)) for eps in (-eps_low, eps_high))  # float or [N]
    clipped = torch.clamp(lr, log_low, log_high)
    policy = -torch.minimum(a * lr, a * clipped)
    r = lr.detach().exp()
    drift = (r - 1.0 - lr.detach()) + torch.clamp(r - 1.0, max=cap) * (lr - lr.detach())
    return policy + coef * drift
