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

from .adaptive_clip import ClipBounds, cpgd_drift, cpgd_term

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per-sequence sums of a ``[N]`` tensor; deterministic (float64 prefix sums, no atomics)."""
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    return (prefix[cu_seqlens[1:]] - prefix[cu_seqlens[:-1]]).to(values.dtype)


def ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """exp(logp - old) with the log-ratio clamped to [-20, 20]; a clamp that bites has no gradient."""
    return torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def ppo_term(logp, old_logp, advantages, config, ratios=None, bounds=None):
    """Per-token PPO / GPPO loss (docs/SPEC.md section 3), with dual clip and delta; ``bounds`` (a
    ``ClipBounds``, default the config's floats) may hold per-token tensors (section 12)."""
    bounds = ClipBounds.of(config) if bounds is None else bounds
    r = ratio(logp, old_logp) if ratios is None else ratios
    if config.delta is not None:
        r = torch.where(r > config.delta, torch.full_like(r, config.delta), r)
    low, high = 1.0 - bounds.low, 1.0 + bounds.high
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
    if bounds.dual is not None:
        dual = (a < 0) & (loss > -bounds.dual * a)
        loss = torch.where(dual, (-bounds.dual * a).detach(), loss)
    return loss


def _clamp(values: Tensor, low=None, high=None) -> Tensor:
    """torch.clamp whose bounds may be floats, tensors or None (torch.clamp takes no float / tensor mix)."""
    if low is not None:
        values = torch.maximum(values, torch.as_tensor(low, dtype=values.dtype, device=values.device))
    if high is not None:
        values = torch.minimum(values, torch.as_tensor(high, dtype=values.dtype, device=values.device))
    return values


def cispo_weight(r: Tensor, config, bounds=None) -> Tensor:
    bounds = ClipBounds.of(config) if bounds is None else bounds
    if config.cispo_mode == "cap":
        return _clamp(r, high=bounds.high)
    lower = None
    if config.cispo_mode == "two_sided" and bounds.low is not None:
        lower = 1.0 - bounds.low
    return _clamp(r, lower, 1.0 + bounds.high)


def policy_term(logp, old_logp, advantages, config, bounds=None) -> Tensor:
    """Unweighted per-token loss of a token-local variant (docs/SPEC.md section 3) and CPGD (section 12);
    ``bounds``: the clip bounds (``ClipBounds``, default the config's floats)."""
    bounds = ClipBounds.of(config) if bounds is None else bounds
    a = advantages
    if config.loss == "reinforce":
        return -a * logp
    if config.loss == "cpgd":
        return cpgd_term(logp, old_logp, a, bounds)
    r = ratio(logp, old_logp)
    if config.loss in ("ppo", "gppo"):
        return ppo_term(logp, old_logp, a, config, r, bounds)
    if config.loss == "cispo":
        return -cispo_weight(r, config, bounds).detach() * a * logp
    if config.loss == "sapo":
        tau = torch.where(a > 0, config.sapo_tau_pos, config.sapo_tau_neg)
        return -a * (4.0 / tau) * torch.sigmoid(tau * (r - 1.0))
    if config.loss == "pspo":
        return -a * ((1.0 - config.pspo_alpha) * r + config.pspo_alpha)
    if config.loss == "spo":  # eps = clip_high
        return -(a * r - a.abs() * (r - 1.0) ** 2 / (2.0 * bounds.high))
    if config.loss == "topr":
        return -topr_weights(logp, old_logp, a, config) * a * logp
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


def penalty_terms(logp, entropy, ref_logp, weight, config, old_logp=None, mask=None, cu_seqlens=None) -> Tensor:
    """Weighted KL-to-reference and entropy-bonus terms per token (docs/SPEC.md section 5), and CPGD's
    policy drift (section 12; needs ``old_logp``). ``kl_bias_correction`` multiplies the KL by
    :func:`kl_importance_weights` (needs ``old_logp``, and ``mask`` / ``cu_seqlens`` at the sequence level)."""
    zero = torch.zeros_like(logp)
    total = zero
    if config.loss == "cpgd" and config.cpgd_drift_coef != 0:
        drift = cpgd_drift(logp, old_logp, config.cpgd_drift_cap)
        total = total + torch.where(weight != 0, weight * config.cpgd_drift_coef * drift, zero)
    if config.kl is not None and config.kl_coef != 0:
        kl = kl_term(logp, ref_logp, config.kl)
        if getattr(config, "kl_bias_correction", False):
            kl = kl * kl_importance_weights(logp, old_logp, mask, cu_seqlens, config.kl_correction_level)
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
    return policy + penalty_terms(logp, entropy, ref_logp, weight, config, old_logp)


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
    """Detached importance weights between trainer and inference engine (docs/SPEC.md section 4).

    ``token_*`` / ``seq_*``: ``w = exp(clamp(log w))`` of the token's / sequence's summed log-ratio,
    truncated at ``rollout_cap`` or zeroed outside ``[rollout_cap_low, rollout_cap]`` (verl TIS /
    IcePop). ``seq_mask_tis`` (OpenRLHF): the sequence's geometric-mean ratio ``exp(mean_t log w_t)``
    outside ``[rollout_cap_low, rollout_cap]`` zeroes the sequence; the kept tokens get
    ``min(w_t, rollout_cap)``. ``rollout_is_batch_normalize`` then divides by the batch mean of the
    weights over valid tokens (per sequence for ``seq_*``: the mean of the sequences' weights), as
    verl, when that mean exceeds 1e-8."""
    mode = config.rollout_correction
    cap = config.rollout_cap
    cap_low = config.rollout_cap_low if config.rollout_cap_low is not None else 1.0 / cap
    valid = mask != 0
    log_w = (old_logp - rollout_logp).detach().masked_fill(~valid, 0.0)
    n = mask.numel()
    if mode == "seq_mask_tis":
        seq_mean, _ = _per_sequence(log_w, mask, cu_seqlens)
        geo = torch.exp(_broadcast(seq_mean, cu_seqlens, n).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        w = torch.clamp(torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), max=cap)
        w = torch.where((geo >= cap_low) & (geo <= cap), w, torch.zeros_like(w))
    else:
        if mode.startswith("seq_"):
            log_w = _broadcast(segment_sum(log_w, cu_seqlens), cu_seqlens, n)
        w = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        if mode.endswith("truncate"):
            w = torch.clamp(w, max=cap)
        else:
            w = torch.where((w >= cap_low) & (w <= cap), w, torch.zeros_like(w))
    if getattr(config, "rollout_is_batch_normalize", False):
        w = w / rollout_weight_batch_mean(w, mask, cu_seqlens, mode)
    return w


def rollout_weight_batch_mean(w, mask, cu_seqlens, mode) -> Tensor:
    """verl's ``rollout_is_batch_normalize`` divisor: the mean weight over valid tokens (sequence modes:
    over non-empty sequences of their weight), or 1 when it is <= 1e-8."""
    valid = mask != 0
    if mode in ("seq_truncate", "seq_mask"):
        seq_w, lengths = _per_sequence(w, mask, cu_seqlens)
        nonempty = lengths > 0
        mean = torch.where(nonempty, seq_w, 0.0).sum() / nonempty.sum().clamp(min=1)
    else:
        mean = torch.where(valid, w, 0.0).sum() / valid.sum().clamp(min=1)
    return torch.where(mean > 1e-8, mean, torch.ones_like(mean))


# --- off-policy corrections that are not importance weights (docs/SPEC.md section 4) -------------


def _sequence_ids(cu_seqlens, n):
    return torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device), cu_seqlens.diff(),
                                   output_size=n)


def _segment_max(values, mask, cu_seqlens):
    """Per-sequence max over valid tokens; 0 for a sequence without one (verl's convention)."""
    n_seqs = cu_seqlens.numel() - 1
    out = values.new_full((n_seqs,), -math.inf)
    filled = torch.where(mask != 0, values, torch.full_like(values, -math.inf))
    out = out.scatter_reduce(0, _sequence_ids(cu_seqlens, values.numel()), filled, "amax", include_self=True)
    return torch.where(out == -math.inf, torch.zeros_like(out), out)


def rollout_rejection_mask(old_logp, rollout_logp, mask, cu_seqlens, config) -> Tensor:
    """1 for tokens every ``rollout_rejection`` option keeps, else 0 (verl's
    ``compute_rollout_rejection_mask``). With ``l = clamp(old - rollout, +-20)``: ``k1 = -l``,
    ``k2 = l^2 / 2``, ``k3 = exp(l) - 1 - l``; ``token_*`` tests each token's value, ``seq_sum_*`` /
    ``seq_mean_*`` / ``seq_max_*`` the sum / mean / max over the sequence's valid tokens; k1 keeps
    ``log(lower) <= value <= log(upper)``, k2 / k3 keep ``value <= upper``."""
    from ..config import parse_rollout_rejection

    valid = mask != 0
    n = mask.numel()
    log_r = (old_logp - rollout_logp).detach().masked_fill(~valid, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    stats = {"k1": -log_r, "k2": 0.5 * log_r * log_r, "k3": torch.exp(log_r) - 1.0 - log_r}
    keep = torch.ones_like(valid)
    for name, lower, upper in parse_rollout_rejection(config.rollout_rejection, config.rollout_rejection_threshold):
        stat = stats[name[-2:]]
        if name.startswith("seq_sum"):
            stat = _broadcast(segment_sum(torch.where(valid, stat, 0.0), cu_seqlens), cu_seqlens, n)
        elif name.startswith("seq_mean"):
            stat = _broadcast(_per_sequence(stat, mask, cu_seqlens)[0], cu_seqlens, n)
        elif name.startswith("seq_max"):
            stat = _broadcast(_segment_max(stat, mask, cu_seqlens), cu_seqlens, n)
        if lower is not None:  # k1: bounds on the log-ratio
            keep = keep & (stat >= math.log(lower)) & (stat <= math.log(upper))
        else:
            keep = keep & (stat <= upper)
    return (keep & valid).to(torch.float32)


def off_policy_sequence_mask(logp, behaviour_logp, advantages, mask, cu_seqlens, threshold) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask in TRL's form (``GRPOTrainer.get_off_policy_mask``):
    0 for tokens with ``A < 0`` in a sequence whose mean over valid tokens of
    ``behaviour - sg(logp)`` (NaN counted as 0) exceeds ``threshold``, else 1. Detached."""
    valid = mask != 0
    diff = torch.nan_to_num((behaviour_logp - logp).detach(), nan=0.0)
    seq_mean, _ = _per_sequence(torch.where(valid, diff, 0.0), mask, cu_seqlens)
    low_divergence = _broadcast(seq_mean, cu_seqlens, mask.numel()) <= threshold
    return ((advantages >= 0) | low_divergence).to(torch.float32)


def m2po_mask(logp, behaviour_logp, mask, threshold) -> Tensor:
    """M2PO's second-moment mask (Zheng et al. 2025, arXiv 2510.01161; AReaL ``_apply_m2po_masking``):
    with ``m_t = (sg(logp_t) - behaviour_t)^2`` over the valid tokens (NaN counted as +inf), the
    tokens of largest ``m_t`` are masked until the mean of the kept ones is ``<= threshold``: sorted
    ascending (ties by token position, earlier first), the first ``K`` are kept, ``K`` the largest
    ``k`` with ``mean(m_(1..k)) <= threshold`` (0 when even the smallest exceeds it). The prefix means
    are non-decreasing, so ``K`` is a count; no host read (a stable sort of all N tokens, masked ones
    last, and float64 prefix sums). 1 = kept (also at masked positions, which carry no loss)."""
    valid = mask != 0
    n = mask.numel()
    if n == 0:
        return torch.ones_like(mask, dtype=torch.float32)
    m2 = (logp.detach().double() - behaviour_logp.detach().double()) ** 2
    m2 = torch.where(valid, torch.nan_to_num(m2, nan=math.inf), math.inf)
    ordered, order = torch.sort(m2, stable=True)
    positions = torch.arange(1, n + 1, device=m2.device, dtype=torch.float64)
    prefix_mean = torch.cumsum(ordered, 0) / positions
    kept_count = (prefix_mean <= threshold).sum()  # inf / NaN prefixes never count
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=m2.device))
    return ((rank < kept_count) | ~valid).to(torch.float32)


def prob_trust_region_mask(logp, behaviour_logp, advantages, config) -> Tensor:
    """prime-rl's probability-difference trust regions, with ``d = exp(sg(logp)) - exp(behaviour)``:
    DPPO (``default_loss_fn``, DPPO-Binary TV): a token with ``A > 0`` is masked when
    ``d > dppo_mask_high``, any other when ``d < -dppo_mask_low`` (a None side never masks); IPO
    (``ipo_loss_fn``): masked when ``|d| > ipo_threshold``. 1 = kept (by every one that is set)."""
    kept = torch.ones_like(logp, dtype=torch.bool)
    for masked in prob_trust_region_violations(logp, behaviour_logp, advantages, config).values():
        kept = kept & ~masked
    return kept.to(torch.float32)


def prob_trust_region_violations(logp, behaviour_logp, advantages, config) -> dict:
    """``{"dppo": masked, "ipo": masked}`` (bool, detached) for the trust regions that are set."""
    d = torch.exp(logp.detach()) - torch.exp(behaviour_logp.detach())
    never = torch.zeros_like(d, dtype=torch.bool)
    out = {}
    high, low = getattr(config, "dppo_mask_high", None), getattr(config, "dppo_mask_low", None)
    if high is not None or low is not None:
        over = d > high if high is not None else never
        under = d < -low if low is not None else never
        out["dppo"] = torch.where(advantages > 0, over, under)
    if getattr(config, "ipo_threshold", None) is not None:
        out["ipo"] = d.abs() > config.ipo_threshold
    return out


def topr_weights(logp, old_logp, advantages, config) -> Tensor:
    """TOPR's detached per-token weight (Le Roux et al. 2025, eq. 8; ROLL ``_compute_topr_loss``):
    ``topr_positive_weight`` for ``A >= 0`` (REINFORCE), ``topr_negative_weight * clip(r, 0, 1)`` for
    ``A < 0`` (truncated importance sampling), ``r = exp(clamp(sg(logp) - old, -20, 20))``. The loss is
    ``-w A logp``: its gradient is the paper's ``mu [pi / mu]_0^1 R grad log pi`` on negative tokens."""
    r = ratio(logp.detach(), old_logp)
    positive = torch.full_like(r, float(config.topr_positive_weight))
    return torch.where(advantages >= 0, positive, config.topr_negative_weight * torch.clamp(r, 0.0, 1.0))


def kl_importance_weights(logp, old_logp, mask, cu_seqlens, level="token") -> Tensor:
    """The importance ratio of ``kl_bias_correction`` (TRL / Liger ``use_bias_correction_kl``):
    ``exp(clamp(logp - old))`` per token, or ``exp(clamp(mean_t (logp - old)))`` over the sequence's
    valid tokens at the sequence level. NOT detached (TRL's convention): with samples from the old
    policy, ``r * KL_t`` has the expectation and the gradient of the KL under the current policy."""
    log_r = logp - old_logp
    if level == "sequence":
        seq_mean, _ = _per_sequence(log_r, mask, cu_seqlens)
        log_r = _broadcast(seq_mean, cu_seqlens, logp.numel())
    return torch.exp(torch.clamp(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def mismatch_metrics(old_logp, rollout_logp, mask, cu_seqlens, weights=None, cap=None) -> dict:
    """Trainer-vs-inference diagnostics over valid tokens (verl ``compute_offpolicy_metrics``; non-empty
    sequences only where verl averages over rows): ``mismatch_kl`` = mean(rollout - old),
    ``mismatch_k3_kl`` = mean(exp(l) - l - 1) with ``l = old - rollout``, ``training_ppl`` /
    ``rollout_ppl`` = mean over sequences of exp(-mean log-prob) (and their ``*_log_ppl``),
    ``log_ppl_diff`` (mean, ``_abs``, ``_max``, ``_min``) = per-sequence mean(rollout) - mean(old),
    ``ppl_ratio`` = mean exp(log_ppl_diff), ``chi2_token`` = mean(exp(l)^2) - 1, ``chi2_seq`` =
    mean over sequences of exp(2 sum l) - 1 (log-ratios clamped to +-20), and with ``weights`` (the
    rollout correction's, before batch normalisation) ``rollout_ess`` = 1 / mean((w / mean w)^2) of
    ``clamp(w, 0, cap)`` (verl's effective sample size, as a fraction of the valid tokens). Every one
    is 0 without a valid token."""
    valid = mask != 0
    count = valid.sum().clamp(min=1)
    old = torch.where(valid, old_logp.detach().float(), 0.0)
    rollout = torch.where(valid, rollout_logp.detach().float(), 0.0)
    log_r = old - rollout
    safe = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)

    def mean(values):
        return torch.where(valid, values, 0.0).sum() / count

    old_seq, lengths = _per_sequence(old, mask, cu_seqlens)
    rollout_seq, _ = _per_sequence(rollout, mask, cu_seqlens)
    nonempty = lengths > 0
    n_seqs = nonempty.sum().clamp(min=1)

    def seq_mean(values):
        return torch.where(nonempty, values, 0.0).sum() / n_seqs

    def seq_extreme(values, kind):
        fill = math.inf if kind == "min" else -math.inf
        padded = torch.cat([values.masked_fill(~nonempty, fill), values.new_full((1,), fill)])
        extreme = padded.amin() if kind == "min" else padded.amax()
        return torch.where(nonempty.any(), extreme, torch.zeros_like(extreme))

    diff = rollout_seq - old_seq
    seq_log_r = segment_sum(safe, cu_seqlens).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    metrics = {
        "mismatch_kl": mean(rollout - old),
        "mismatch_k3_kl": mean(torch.exp(safe) - safe - 1.0),
        "training_ppl": seq_mean(torch.exp(-old_seq)),
        "training_log_ppl": seq_mean(-old_seq),
        "rollout_ppl": seq_mean(torch.exp(-rollout_seq)),
        "rollout_log_ppl": seq_mean(-rollout_seq),
        "log_ppl_diff": seq_mean(diff),
        "log_ppl_abs_diff": seq_mean(diff.abs()),
        "log_ppl_diff_max": seq_extreme(diff, "max"),
        "log_ppl_diff_min": seq_extreme(diff, "min"),
        "ppl_ratio": seq_mean(torch.exp(diff)),
        "chi2_token": mean(torch.exp(2.0 * safe)) - 1.0,
        "chi2_seq": seq_mean(torch.exp(2.0 * seq_log_r)) - 1.0,
    }
    if weights is not None:
        w = weights.detach().float().clamp(min=0.0, max=cap)
        normalised = w / (mean(w) + 1e-8)
        metrics["rollout_ess"] = 1.0 / mean(normalised * normalised)
    # Without a valid token every diagnostic is 0 (the zero-token convention of policy_loss's metrics).
    return {name: torch.where(valid.any(), value, torch.zeros_like(value)) for name, value in metrics.items()}


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


def gspo_token_term(logp, old_logp, advantages, mask, cu_seqlens, config, bounds=None) -> Tensor:
    """log s_it = sg(log s_i) + logp_t - sg(logp_t), clamped <= 10; per-token PPO clip."""
    bounds = ClipBounds.of(config) if bounds is None else bounds
    mean_log_ratio, _ = _per_sequence((logp - old_logp).detach(), mask, cu_seqlens)
    log_s = _broadcast(mean_log_ratio, cu_seqlens, logp.numel()) + logp - logp.detach()
    s = torch.exp(torch.clamp(log_s, max=10.0))
    return torch.maximum(-advantages * s, -advantages * _clamp(s, 1.0 - bounds.low, 1.0 + bounds.high))


def gmpo_loss(logp, old_logp, advantages, mask, cu_seqlens, config, bounds=None) -> Tensor:
    """Geometric-mean policy optimisation: clip in log space, R_i = exp(mean_t l~), mean_i(-A_i R_i)."""
    bounds = ClipBounds.of(config) if bounds is None else bounds
    log_ratio = logp - old_logp
    clipped = _clamp(log_ratio, -bounds.low, bounds.high)
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


def clip_cov_term(logp, old_logp, advantages, mask, config, bounds=None) -> Tensor:
    """PPO loss with a seeded random subset of high-covariance, unclipped tokens detached (loss 0)."""
    bounds = ClipBounds.of(config) if bounds is None else bounds
    loss = ppo_term(logp, old_logp, advantages, config, bounds=bounds)
    cov, valid = _covariance(logp, advantages, mask)
    r = ratio(logp, old_logp).detach()
    unclipped = ~(((advantages > 0) & (r > 1.0 + bounds.high)) | ((advantages < 0) & (r < 1.0 - bounds.low)))
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
