"""Mixed on-/off-policy terms and token re-weightings on ``[N]`` tensors (docs/SPEC.md section 11).

CHORD's and LUFFY's expert-token terms, EMPG's entropy-modulated advantages and Lp-Reg's token
selection and filtered-proxy KL. ``policy_loss`` runs these in production (general path, or the
pre-pass of the fused path); every function is differentiable where the formula is, and detached
where the paper detaches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .token_logprobs import _scaled


def _valid_mean(values: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp(min=1)


# --- CHORD / LUFFY: the expert tokens' own terms -----------------------------------------------


def chord_sft_term(logp: Tensor, use_phi: bool = True) -> Tensor:
    """CHORD's SFT loss of one expert token: ``-phi logp`` with ``phi = sg(p (1 - p))`` (CHORD-phi),
    or ``-logp`` without the token weight."""
    if not use_phi:
        return -logp
    p = torch.exp(logp.detach())
    return -(p * (1.0 - p)) * logp


def luffy_term(logp: Tensor, advantages: Tensor, gamma: float) -> Tensor:
    """LUFFY's off-policy term of one expert token: ``-A f(p)``, ``f(p) = p / (p + gamma)``, no clip
    (the expert's own probability is taken as 1, so the ratio is ``p``)."""
    p = torch.exp(logp)
    return -advantages * (p / (p + gamma))


# --- EMPG: entropy-modulated advantages ---------------------------------------------------------


def next_valid_index(valid: Tensor, cu_seqlens: Tensor) -> Tensor:
    """For each position, the next valid position of the same sequence, or -1 (none)."""
    n = valid.numel()
    positions = torch.arange(n, device=valid.device)
    candidate = torch.where(valid, positions, torch.full_like(positions, n))
    after = torch.cat([candidate[1:], candidate.new_full((1,), n)])
    following = torch.flip(torch.cummin(torch.flip(after, (0,)), 0).values, (0,))
    sequence = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=valid.device), cu_seqlens.diff(),
                                       output_size=n)
    end = cu_seqlens[1:][sequence]  # one past the sequence's last position
    return torch.where(following < end, following, torch.full_like(following, -1))


def empg_components(entropy: Tensor, mask: Tensor, k: float, k_future: float) -> tuple[Tensor, Tensor]:
    """EMPG's ``(g, f)`` per token from ``sg(H)`` over the valid tokens of the batch: the min-max
    normalised entropy ``Hn = (H - min H) / (max H - min H + 1e-8)`` (the paper's eq. 12),
    ``g = exp(-k Hn) / (mean exp(-k Hn) + 1e-8)`` (eq. 10, mean 1 over the batch) and
    ``f = exp(-k_f Hn)`` (eq. 11). Masked positions hold 0."""
    valid = mask > 0
    h = entropy.detach().double()
    low = torch.where(valid, h, torch.full_like(h, math.inf)).amin() if h.numel() else h.new_zeros(())
    high = torch.where(valid, h, torch.full_like(h, -math.inf)).amax() if h.numel() else h.new_zeros(())
    normalised = torch.where(valid, (h - low) / (high - low + 1e-8), torch.zeros_like(h))
    scale = torch.exp(-k * normalised)
    g = scale / (_valid_mean(scale, valid) + 1e-8)
    f = torch.exp(-k_future * normalised)
    zero = torch.zeros_like(h)
    return torch.where(valid, g, zero), torch.where(valid, f, zero)


def empg_advantages(entropy, advantages, mask, cu_seqlens, k, k_future, zeta) -> Tensor:
    """EMPG's advantages with tokens as steps: ``A'_t = g_t A_t + zeta f_{t+1}`` (eq. 8; ``t + 1``
    the next valid token of the same sequence, no bonus on a sequence's last one), then centred over
    the valid tokens, ``A'' = A' - mean A'`` (eq. 7). Detached; fp32; 0 at masked positions."""
    valid = mask > 0
    g, f = empg_components(entropy, mask, k, k_future)
    following = next_valid_index(valid, cu_seqlens)
    bonus = torch.where(following >= 0, f[following.clamp(min=0)], torch.zeros_like(f))
    modulated = g * advantages.detach().double() + zeta * bonus
    centred = modulated - _valid_mean(modulated, valid)
    return torch.where(valid, centred, torch.zeros_like(centred)).to(advantages.dtype)


# --- Lp-Reg: the regularised tokens and the KL to the filtered proxy ----------------------------


def lp_reg_count(advantages: Tensor, mask: Tensor, rho: float) -> Tensor:
    """How many tokens Lp-Reg looks at: ``max(1, floor(rho n_neg))`` of the ``n_neg`` valid tokens
    with ``A < 0`` (0 without one), an int64 device scalar."""
    negatives = ((mask > 0) & (advantages < 0)).sum()
    return torch.where(negatives > 0, torch.floor(rho * negatives.double()).clamp(min=1.0).long(), 0)


def lp_reg_candidates(logp: Tensor, advantages: Tensor, mask: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    """The lowest-probability negative tokens, ``(positions, live)``: the ``bound = min(max(1,
    floor(rho N)), N)`` valid ``A < 0`` tokens of smallest ``sg(logp)`` in ascending order (a shape
    fixed by N), the first :func:`lp_reg_count` of them ``live``. No host read."""
    n = logp.numel()
    bound = min(max(1, int(rho * n)), n)
    negative = (mask > 0) & (advantages < 0)
    keys = torch.where(negative, logp.detach().double(), torch.full_like(logp, math.inf, dtype=torch.float64))
    positions = torch.topk(keys, bound, largest=False, sorted=True).indices
    live = (torch.arange(bound, device=logp.device) < lp_reg_count(advantages, mask, rho)) & negative[positions]
    return positions, live


def filtered_proxy_kl(rows: Tensor, tokens: Tensor, temperature, min_p: float) -> tuple[Tensor, Tensor]:
    """``(KL(proxy || pi), kept)`` per row, differentiable in ``rows``: ``x = z / T`` (``temperature``
    a number or one value per row), the proxy is
    ``pi`` restricted to the min-p set ``{j : x_j >= max x + log(min_p)}`` (docs/SPEC.md section 8)
    and renormalised, so ``KL = log sum_j e^(x_j - M) - log sum_{kept} e^(x_j - M)`` (``M`` the row
    max, always kept); ``kept`` says whether the chosen token is in the set (detached). The gradient
    is ``(p - proxy) / T``, the same whether the proxy is detached or not."""
    x = _scaled(rows, temperature)
    top = x.detach().amax(-1, keepdim=True)
    in_set = x.detach() >= top + math.log(min_p)
    shifted = x - top
    full = torch.logsumexp(shifted, -1)
    kept_mass = torch.logsumexp(torch.where(in_set, shifted, torch.full_like(shifted, -math.inf)), -1)
    chosen = in_set.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return (full - kept_mass).float(), chosen


__all__ = ["chord_sft_term", "luffy_term", "next_valid_index", "empg_components", "empg_advantages",
           "lp_reg_count", "lp_reg_candidates", "filtered_proxy_kl"]
