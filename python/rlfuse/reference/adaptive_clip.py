"""Adaptive clipping (issue 18, docs/SPEC.md section 12): per-token clip bounds, the rules that compute
them (DCPO, BAPO, HAPO), entropy ratio clipping (ERC) and CPGD's clipped log-ratio objective with its
policy drift.

Every function works on flattened ``[N]`` tensors (masked positions hold 0, as everywhere on the general
path) and reads no value back to the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
ENTROPY_EPS = 1e-8  # ERC's and HAPO's guard against a zero entropy (the authors' 1e-8)
BAPO_EPS = 1e-8  # the authors' guard of the positive / negative quotient


class ClipBounds(NamedTuple):
    """eps_low, eps_high and the dual-clip constant c of the ratio clip: each a float (None: off; eps_low
    None is CISPO's "no lower bound") or a per-token ``[N]`` fp32 tensor."""

    low: Tensor | float | None
    high: Tensor | float
    dual: Tensor | float | None

    @classmethod
    def of(cls, config, low=None, high=None, dual=None) -> "ClipBounds":
        """The given per-token tensors, the config's floats where one is None."""
        return cls(config.clip_low if low is None else low, config.clip_high if high is None else high,
                   config.dual_clip if dual is None else dual)

    @property
    def per_token(self) -> bool:
        return any(isinstance(bound, Tensor) for bound in self)


def dcpo_bounds(old_logp: Tensor, eps_low, eps_high, ratio_cap: float) -> tuple[Tensor, Tensor]:
    """DCPO's dynamic-adaptive bounds (arXiv 2509.02333 eq. for DAC; the authors' ``get_clip_low_high``) as
    (eps_low, eps_high) per token: with ``q = exp(old)``, ratio bounds
    ``0.5 + 0.5 sqrt(max(1 - 4 eps_low / q, 0))`` and ``min(0.5 + 0.5 sqrt(1 + 4 eps_high / q), ratio_cap)``."""
    q = torch.exp(old_logp.detach())
    low_ratio = 0.5 + 0.5 * torch.sqrt(torch.clamp(1.0 - 4.0 * eps_low / q, min=0.0))
    high_ratio = torch.clamp(0.5 + 0.5 * torch.sqrt(1.0 + 4.0 * eps_high / q), max=ratio_cap)
    return 1.0 - low_ratio, high_ratio - 1.0


def bapo_candidates(config) -> list[tuple[float, float]]:
    """BAPO's search order of (lower, upper) ratio bounds, as the authors' ``compute_policy_loss_bapo``
    steps them: the start, then the lower bound up by ``bapo_step`` to its maximum, then the upper one."""
    low, high = config.bapo_low_start, config.bapo_high_start
    candidates = [(low, high)]
    while low < config.bapo_low_max:
        low = min(low + config.bapo_step, config.bapo_low_max)
        candidates.append((low, high))
    while high < config.bapo_high_max:
        high = min(high + config.bapo_step, config.bapo_high_max)
        candidates.append((low, high))
    return candidates


def bapo_search(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, config):
    """BAPO's batch-level bounds (arXiv 2510.18927, Algorithm 1; the authors' ``recipe/bapo``): the first
    candidate (:func:`bapo_candidates`) whose clipped contributions ``A min(r, c_high)`` (A >= 0) /
    ``A max(r, c_low)`` (A < 0) over the valid tokens give ``pos / (neg + 1e-8) >= rho / (1 - rho)``
    (the positive share ``pos / (pos + neg)`` reaches ``rho = bapo_target``; met when ``neg = 0``), else
    the last. Returns 0-d tensors (c_low, c_high, positive share at them); all candidates at once, in
    float64, no host read."""
    candidates = torch.tensor(bapo_candidates(config), dtype=torch.float64, device=logp.device)  # [K, 2]
    valid = mask > 0
    log_r = torch.where(valid, logp.detach().double() - old_logp.double(), 0.0)  # masked: never NaN x 0
    r = torch.exp(torch.clamp(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    a = torch.where(valid, advantages.double(), 0.0)
    effective = torch.where(a >= 0, torch.minimum(r, candidates[:, 1:]), torch.maximum(r, candidates[:, :1]))
    contribution = effective * a  # [K, N]
    positive = contribution.clamp(min=0.0).sum(1)
    negative = (-contribution).clamp(min=0.0).sum(1)
    target = config.bapo_target / (1.0 - config.bapo_target)
    met = (negative <= 0) | (positive / (negative + BAPO_EPS) >= target)
    met[-1] = True  # none met: the last (widest) bounds
    chosen = torch.argmax(met.to(torch.int8)).reshape(1)  # the first met (a gather: no host read)
    share = positive / (positive + negative).clamp(min=torch.finfo(torch.float64).tiny)
    return tuple(values.gather(0, chosen)[0].float() for values in (candidates[:, 0], candidates[:, 1], share))


def hapo_entropy_scores(entropy: Tensor, mask: Tensor, pivot: float) -> Tensor:
    """HAPO's normalised entropy ``h`` in [-1, 1] (arXiv 2509.16591; the authors' ``compute_entropy_h``):
    ``g = log max(H, 1e-8)`` minus its ``pivot``-quantile over the valid tokens (nearest rank, ties to even,
    as the authors' ``torch_quantile(..., "nearest")``), divided by ``sqrt(max(mean g^2, 1e-8))``; then the
    positive side by its maximum and the negative side by the magnitude of its minimum (each at least
    1e-8). Detached; 0 at masked positions."""
    valid = mask > 0
    g = torch.log(entropy.detach().double().clamp(min=ENTROPY_EPS))
    padding = g.new_full((1,), math.inf)  # one more entry: zero tokens still have a (never used) rank 0
    ordered = torch.sort(torch.cat([torch.where(valid, g, math.inf), padding])).values
    count = valid.sum()
    rank = torch.round(pivot * (count - 1).clamp(min=0).double()).long().reshape(1)
    median = torch.where(count > 0, ordered.gather(0, rank)[0], 0.0)
    h = torch.where(valid, g - median, 0.0)
    std = torch.sqrt((h * h).sum().div(count.clamp(min=1)).clamp(min=ENTROPY_EPS))
    h = h / std
    padded = torch.cat([h, padding.new_zeros(1)])
    positive_max = padded.clamp(min=0.0).max().clamp(min=ENTROPY_EPS)
    negative_mag = (-padded).clamp(min=0.0).max().clamp(min=ENTROPY_EPS)
    return torch.where(h > 0, h / positive_max, h / negative_mag).float()


def hapo_bounds(entropy: Tensor, mask: Tensor, config) -> tuple[Tensor, Tensor]:
    """HAPO's asymmetric adaptive clipping (the authors' ``ada_clip``): eps_low ``(1 - alpha h)`` where
    ``h <= 0`` (low entropy: wider below), eps_high ``(1 + alpha h)`` where ``h > 0``."""
    h = hapo_entropy_scores(entropy, mask, config.hapo_entropy_pivot)
    low = torch.where(h <= 0, config.clip_low * (1.0 - config.hapo_alpha * h), config.clip_low)
    high = torch.where(h > 0, config.clip_high * (1.0 + config.hapo_alpha * h), config.clip_high)
    return low, high


def entropy_ratio(entropy: Tensor, old_entropy: Tensor) -> Tensor:
    """ERC's per-token ratio ``(H + 1e-8) / (H_old + 1e-8)`` (the authors' ``grpo_erc``), detached."""
    return (entropy.detach() + ENTROPY_EPS) / (old_entropy + ENTROPY_EPS)


def erc_keep(entropy: Tensor, old_entropy: Tensor, config) -> Tensor:
    """True where ERC keeps the token's gradient: ``1 - beta_low < H / H_old < 1 + beta_high`` (strict, as
    the authors; a None side never drops)."""
    ratio = entropy_ratio(entropy, old_entropy)
    keep = torch.ones_like(ratio, dtype=torch.bool)
    if config.erc_beta_low is not None:
        keep = keep & (ratio > 1.0 - config.erc_beta_low)
    if config.erc_beta_high is not None:
        keep = keep & (ratio < 1.0 + config.erc_beta_high)
    return keep


def cpgd_term(logp: Tensor, old_logp: Tensor, advantages: Tensor, bounds: ClipBounds) -> Tensor:
    """CPGD's clipped policy gradient (arXiv 2505.12504): ``-min(A l, A clip(l, log(1 - eps_low),
    log(1 + eps_high)))`` with ``l = clamp(logp - old, -20, 20)``; a log-ratio exactly on a bound is
    unclipped and keeps its gradient (strict comparisons, as the ratio clip)."""
    a = advantages
    log_r = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_low = torch.log1p(-torch.as_tensor(bounds.low, dtype=log_r.dtype, device=log_r.device))
    log_high = torch.log1p(torch.as_tensor(bounds.high, dtype=log_r.dtype, device=log_r.device))
    clipped_high = (a > 0) & (log_r > log_high)
    clipped_low = (a < 0) & (log_r < log_low)
    return torch.where(clipped_high, (-a * log_high).detach(),
                       torch.where(clipped_low, (-a * log_low).detach(), -a * log_r))


def cpgd_drift(logp: Tensor, old_logp: Tensor, cap: float) -> Tensor:
    """CPGD's policy drift ``KL(old || new)`` per token: value ``r - 1 - l`` (the k3 estimate from samples
    of the old policy), gradient ``min(r - 1, cap) d logp`` (siiRL's CPGD drift term; its cap is 2)."""
    log_r = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    r = torch.exp(log_r.detach())
    value = r - 1.0 - log_r.detach()
    return value + torch.clamp(r - 1.0, max=cap) * (log_r - log_r.detach())
