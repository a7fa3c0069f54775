"""Plain-PyTorch policy losses, written from docs/SPEC.md sections 3-6.

Everything here works on per-token tensors of shape ``[N]`` (tokens flattened; sequences are
contiguous runs given by ``cu_seqlens``) and is differentiable in ``logp`` and ``entropy`` through
autograd, so the gradients are exactly the ones the formulas imply. ``policy_loss``'s general path
runs these functions on log-probs from the fused ``token_logprobs`` kernels; the tests run them on
float64 log-probs as the oracle for every path and backend. ``token_loss`` mirrors
``csrc/include/rlfuse/token_loss.h`` (the fused kernels' per-token math).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per-sequence sums of a ``[N]`` tensor; deterministic (float64 prefix sums, no atomics)."""
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    return (prefix[cu_seqlens[1:]] - prefix[cu_seqlens[:-1]]).to(values.dtype)


def ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """exp(logp - old) with the log-ratio clamped to [-20, 20]; a clamp that bites has no gradient."""
    return torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def ppo_term(logp, old_logp, advantages, config, ratios=None):
    """Per-token PPO / GPPO loss (docs/SPEC.md section 3), with dual clip and delta."""
    r = ratio(logp, old_logp) if ratios is None else ratios
    if config.delta is not None:
        r = torch.where(r > config.delta, torch.full_like(r, config.delta), r)
    low, high = 1.0 - config.clip_low, 1.0 + config.clip_high
    a = advantages
    # Strict inequalities: a ratio exactly on a boundary is unclipped and keeps its gradient.
    clipped_high = (a > 0) & (r > high)
    clipped_low = (a < 0) & (r < low)
    if config.loss == "gppo":
        # Forward value of PPO, bounded gradient beta * bound * A on clipped tokens.
        grad_gate = r / r.detach() - 1.0  # value 0, d/dlogp = 1 (0 where a clamp bit)
        high_value = -a * high - config.gppo_beta_high * high * a * grad_gate
        low_value = -a * low - config.gppo_beta_low * low * a * grad_gate
    else:
        high_value = (-a * high).detach()
        low_value = (-a * low).detach()
    loss = torch.where(clipped_high, high_value, torch.where(clipped_low, low_value, -a * r))
    if config.dual_clip is not None:
        dual = (a < 0) & (loss > -config.dual_clip * a)
        loss = torch.where(dual, (-config.dual_clip * a).detach(), loss)
    return loss


def cispo_weight(r: Tensor, config) -> Tensor:
    if config.cispo_mode == "cap":
        return torch.clamp(r, max=config.clip_high)
    lower = None
    if config.cispo_mode == "two_sided" and config.clip_low is not None:
        lower = 1.0 - config.clip_low
    return torch.clamp(r, min=lower, max=1.0 + config.clip_high)


def policy_term(logp, old_logp, advantages, config) -> Tensor:
    """Unweighted per-token loss of a token-local variant (docs/SPEC.md section 3)."""
    a = advantages
    if config.loss == "reinforce":
        return -a * logp
    r = ratio(logp, old_logp)
    if config.loss in ("ppo", "gppo"):
        return ppo_term(logp, old_logp, a, config, r)
    if config.loss == "cispo":
        return -cispo_weight(r, config).detach() * a * logp
    if config.loss == "sapo":
        tau = torch.where(a > 0, config.sapo_tau_pos, config.sapo_tau_neg)
        return -a * (4.0 / tau) * torch.sigmoid(tau * (r - 1.0))
    if config.loss == "pspo":
        return -a * ((1.0 - config.pspo_alpha) * r + config.pspo_alpha)
    if config.loss == "spo":  # eps = clip_high
        return -(a * r - a.abs() * (r - 1.0) ** 2 / (2.0 * config.clip_high))
    raise ValueError(f"{config.loss!r} is not a token-local loss")


def kl_term(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate to the reference policy (docs/SPEC.md section 5), without coefficient."""
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff * diff
    if kind == "abs":
        return diff.abs()
    d = torch.clamp(-diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = torch.clamp(torch.exp(d) - d - 1.0, -K3_CLAMP, K3_CLAMP)
    if kind == "k3":
        return k3
    if kind == "k3+":
        k2 = 0.5 * diff * diff
        return k3.detach() + k2 - k2.detach()  # value of k3, gradient of k2
    raise ValueError(f"unknown kl {kind!r}")


def penalty_terms(logp, entropy, ref_logp, weight, config) -> Tensor:
    """Weighted KL-to-reference and entropy-bonus terms per token (docs/SPEC.md section 5)."""
    zero = torch.zeros_like(logp)
    total = zero
    if config.kl is not None and config.kl_coef != 0:
        kl = kl_term(logp, ref_logp, config.kl)
        total = total + torch.where(weight != 0, weight * config.kl_coef * kl, zero)
    if config.entropy_coef != 0:
        total = total - torch.where(weight != 0, weight * config.entropy_coef * entropy, zero)
    return total


def weighted(term: Tensor, weight: Tensor) -> Tensor:
    """weight * term, with zero-weight tokens contributing exactly 0 (even if term is NaN there)."""
    return torch.where(weight != 0, weight * term, torch.zeros_like(term))


def token_loss(logp, entropy, old_logp, ref_logp, advantages, policy_weight, weight, config) -> Tensor:
    """Weighted per-token loss of the fused path; its sum over tokens is the loss.

    ``policy_weight`` multiplies the policy term (aggregation weight x rollout correction x
    entropy mask), ``weight`` the KL and entropy terms (aggregation weight). Zero weights skip the
    token entirely, so masked tokens never turn garbage inputs into NaN.
    """
    policy = weighted(policy_term(logp, old_logp, advantages, config), policy_weight)
    return policy + penalty_terms(logp, entropy, ref_logp, weight, config)


# --- aggregation (docs/SPEC.md section 6) -------------------------------------------------------------


def aggregation_weights(mask: Tensor, cu_seqlens: Tensor, config) -> Tensor:
    """Per-token weights w with loss = sum_t w_t * L_t, for every aggregation mode."""
    mask = mask.to(torch.float32)
    mode = config.aggregation
    if mode == "token-sum":
        return mask
    if mode == "token-mean":
        denominator = config.norm_tokens if config.norm_tokens is not None else mask.sum().clamp(min=1.0)
        return mask / denominator
    lengths = segment_sum(mask, cu_seqlens)
    seq_lengths = torch.repeat_interleave(lengths, cu_seqlens.diff(), output_size=mask.numel())
    valid_sequences = (lengths > 0).sum().clamp(min=1).to(torch.float32)
    if mode == "seq-mean-token-mean":
        return mask / seq_lengths.clamp(min=1.0) / valid_sequences
    if mode == "seq-mean-token-sum":
        return mask / valid_sequences
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO: mean over sequences of token sums / a constant
        return mask / config.norm_length / valid_sequences
    raise ValueError(f"unknown aggregation {mode!r}")


def rollout_correction_weights(old_logp, rollout_logp, mask, cu_seqlens, config) -> Tensor:
    """Detached importance weights between trainer and inference engine (docs/SPEC.md section 4)."""
    mode = config.rollout_correction
    cap = config.rollout_cap
    cap_low = config.rollout_cap_low if config.rollout_cap_low is not None else 1.0 / cap
    log_w = (old_logp - rollout_logp).detach().masked_fill(mask == 0, 0.0)
    if mode.startswith("seq_"):
        log_w = torch.repeat_interleave(segment_sum(log_w, cu_seqlens), cu_seqlens.diff(), output_size=mask.numel())
    w = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode.endswith("truncate"):
        return torch.clamp(w, max=cap)
    return torch.where((w >= cap_low) & (w <= cap), w, torch.zeros_like(w))


def entropy_minority_mask(entropy: Tensor, mask: Tensor, rho: float) -> Tensor:
    """1 for tokens whose entropy is at least the (1 - rho)-quantile over valid tokens."""
    valid = mask > 0
    if not bool(valid.any()):
        return torch.zeros_like(entropy)
    threshold = torch.quantile(entropy.detach()[valid].double(), 1.0 - rho).to(entropy.dtype)
    return ((entropy.detach() >= threshold) & valid).to(entropy.dtype)


# --- sequence- and batch-level losses (docs/SPEC.md section 4) ----------------------------------------


def _per_sequence(values, mask, cu_seqlens):
    """Masked per-sequence mean of a per-token tensor, and the valid-token counts."""
    lengths = segment_sum(mask, cu_seqlens)
    masked = torch.where(mask > 0, values, torch.zeros_like(values))  # never NaN * 0
    return segment_sum(masked, cu_seqlens) / lengths.clamp(min=1.0), lengths


def _broadcast(seq_values, cu_seqlens, n):
    return torch.repeat_interleave(seq_values, cu_seqlens.diff(), output_size=n)


def gspo_loss(logp, old_logp, advantages, mask, cu_seqlens, config) -> Tensor:
    """Sequence-level ratio s_i = exp(mean_t (logp - old)), clipped PPO per sequence, mean over sequences."""
    mean_log_ratio, lengths = _per_sequence(logp - old_logp, mask, cu_seqlens)
    seq_adv, _ = _per_sequence(advantages, mask, cu_seqlens)
    s = torch.exp(mean_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    low, high = 1.0 - config.clip_low, 1.0 + config.clip_high
    per_seq = torch.maximum(-seq_adv * s, -seq_adv * torch.clamp(s, low, high))
    valid = lengths > 0
    return (per_seq * valid).sum() / valid.sum().clamp(min=1)


def gspo_token_term(logp, old_logp, advantages, mask, cu_seqlens, config) -> Tensor:
    """log s_it = sg(log s_i) + logp_t - sg(logp_t), clamped <= 10; per-token PPO clip."""
    mean_log_ratio, _ = _per_sequence((logp - old_logp).detach(), mask, cu_seqlens)
    log_s = _broadcast(mean_log_ratio, cu_seqlens, logp.numel()) + logp - logp.detach()
    s = torch.exp(torch.clamp(log_s, max=10.0))
    low, high = 1.0 - config.clip_low, 1.0 + config.clip_high
    return torch.maximum(-advantages * s, -advantages * torch.clamp(s, low, high))


def gmpo_loss(logp, old_logp, advantages, mask, cu_seqlens, config) -> Tensor:
    """Geometric-mean policy optimisation: clip in log space, R_i = exp(mean_t l~), mean_i(-A_i R_i)."""
    log_ratio = logp - old_logp
    clipped = torch.clamp(log_ratio, -config.clip_low, config.clip_high)
    sign = torch.sign(advantages)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped)
    mean_log, lengths = _per_sequence(pessimistic, mask, cu_seqlens)
    seq_adv, _ = _per_sequence(advantages, mask, cu_seqlens)
    per_seq = -seq_adv * torch.exp(mean_log.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    valid = lengths > 0
    return (per_seq * valid).sum() / valid.sum().clamp(min=1)


def _covariance(logp, advantages, mask):
    valid = mask > 0
    n = valid.sum().clamp(min=1)
    lp = logp.detach()
    mean_a = torch.where(valid, advantages, 0.0).sum() / n
    mean_lp = torch.where(valid, lp, 0.0).sum() / n
    return (advantages - mean_a) * (lp - mean_lp), valid


def clip_cov_term(logp, old_logp, advantages, mask, config) -> Tensor:
    """PPO loss with a seeded random subset of high-covariance, unclipped tokens detached (loss 0)."""
    loss = ppo_term(logp, old_logp, advantages, config)
    cov, valid = _covariance(logp, advantages, mask)
    r = ratio(logp, old_logp).detach()
    unclipped = ~(((advantages > 0) & (r > 1.0 + config.clip_high)) | ((advantages < 0) & (r < 1.0 - config.clip_low)))
    candidates = torch.nonzero(valid & unclipped & (cov > config.cov_lb) & (cov < config.cov_ub)).flatten()
    count = min(max(1, int(config.cov_ratio * int(valid.sum()))), candidates.numel())
    if count:
        generator = torch.Generator().manual_seed(config.seed)
        chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count].to(candidates.device)]
        keep = torch.ones_like(loss)
        keep[chosen] = 0.0
        loss = loss * keep
    return loss


def kl_cov_term(logp, old_logp, advantages, mask, config) -> Tensor:
    """Unclipped -A r, plus coef |logp - old| on the top tokens by covariance."""
    loss = -advantages * ratio(logp, old_logp)
    cov, valid = _covariance(logp, advantages, mask)
    count = min(max(1, int(config.cov_ratio * int(valid.sum()))), int(valid.sum()))
    if count:
        chosen = torch.topk(cov.masked_fill(~valid, -math.inf), count).indices
        bonus = torch.zeros_like(loss)
        bonus[chosen] = 1.0
        loss = loss + bonus * config.kl_cov_coef * (logp - old_logp).abs()
    return loss
