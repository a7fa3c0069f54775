"""Independent float64 oracle for ``rlfuse.policy_loss`` (docs/SPEC.md sections 3-6).

This module imports NOTHING from rlfuse (tests/test_policy_oracle_independent.py checks it): every
formula is written out here, in float64, from the papers' formulas and docs/SPEC.md, one token and one
sequence at a time with plain Python loops, so that the library's math (``rlfuse.reference``, which
its general path runs in production) is checked against a second derivation and not against itself.
The gradient is float64 autograd through these formulas; stop-gradients are Python floats.

The library's documented decisions (README "Policy losses", docs/SPEC.md) it honours:

* Log-softmax, gather and entropy from the raw logits: ``x = z / T``, ``lse = log sum exp x`` (max
  shifted), ``logp = x_y - lse``, ``H = -sum_j p_j log p_j`` (``0 log 0 = 0``).
* Masked tokens contribute nothing: only valid tokens' rows are read at all, so a masked row's
  gradient is an exact 0 (whatever it holds).
* Every log-ratio is clamped to [-20, 20] before ``exp``; a clamp that bites (strictly outside)
  leaves a constant, i.e. zeroes that token's gradient. Exactly on the bound it is live.
* A ratio exactly on a clip boundary is unclipped (strict ``>`` / ``<``) and keeps its gradient.
* The rollout correction (and the high-entropy minority mask) multiply the policy term only, never
  the KL or entropy terms; tokens they drop still count in every normaliser.
* Advantages are per token (``tokens.shape``) or per sequence (``[S]``, broadcast to its tokens).
  The sequence-level losses (gspo, gmpo) use ``A_i`` = the mean of the sequence's valid tokens'
  advantages (= ``A_i`` for per-sequence advantages).
* gspo / gmpo: the policy term is the mean over non-empty sequences (whatever ``aggregation``
  says); the KL / entropy penalties are aggregated by ``aggregation`` like everywhere else. docs/SPEC.md
  defines no per-token multiplier of a sequence-level loss: with a rollout correction or an entropy
  quantile the oracle raises NotImplementedError (LossConfig rejects those combinations too).
* gspo_token: ``log s_it`` has only its own clamp ``<= 10`` (verl / TRL GSPO-token), no [-20, 20].
* High-entropy minority threshold: ``torch.quantile(..., interpolation="linear")``'s convention,
  written out: sort the valid tokens' entropies ascending ``v_0 <= ... <= v_{n-1}``, position
  ``pos = (1 - rho) (n - 1)``, threshold ``v_lo + (pos - lo) (v_hi - v_lo)`` with ``lo = floor(pos)``,
  ``hi = min(lo + 1, n - 1)``; a token is kept iff ``H >= threshold``.
* Clip-Cov's random pick is part of the contract: candidates in flat token order, then
  ``torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:count]``.
  "Already clipped" means PPO-clipped by the (log-clamped) ratio before ``delta``, as verl.
  KL-Cov's top tokens are the valid tokens of largest covariance (ties: any order).
* TROLL and the full-vocabulary KL (``kl_full_coef``) are not covered here (their own oracles).

Off-policy corrections (docs/SPEC.md section 4, from the peers' formulas):

* ``rollout_rejection`` (verl ``compute_rollout_rejection_mask``): ``l = clamp(old - rollout, +-20)``,
  ``k1 = -l``, ``k2 = l^2 / 2``, ``k3 = e^l - 1 - l``; per token, or the sum / mean / max over the
  sequence's valid tokens; k1 keeps ``log lo <= v <= log hi``, k2 / k3 keep ``v <= hi``. A rejected
  token leaves the mask (the loss and every normaliser), as verl's response mask. The rollout
  weights and their batch normalisation are computed on the caller's mask.
* ``seq_mask_tis`` (OpenRLHF): sequence kept iff ``lo <= exp(mean_t l_t) <= hi``; weight ``min(e^l_t, hi)``.
* ``rollout_is_batch_normalize`` (verl): weights divided by their mean over valid tokens (``seq_*``
  modes: over non-empty sequences), unless that mean is <= 1e-8.
* ``off_policy_mask_threshold`` (TRL ``get_off_policy_mask``): a token with ``A < 0`` is dropped from
  the policy term when its sequence's mean of ``behaviour - sg(logp)`` exceeds the threshold
  (behaviour = rollout if given, else old).
* ``kl_bias_correction`` (TRL ``use_bias_correction_kl``): the KL times ``exp(logp - old)`` (per
  token), or ``exp(mean_t (logp - old))`` for gspo / gspo_token, the ratio NOT detached.
* ``m2po_threshold`` (M2PO, arXiv 2510.01161, the paper's masking loop): over the valid tokens,
  ``M2_t = (sg(logp_t) - b_t)^2`` (b = rollout if given, else old); while the kept tokens' mean M2
  exceeds the threshold, drop the kept token of largest M2 (ties: the later position first). Dropped
  tokens leave the policy term only; the normaliser is unchanged (the paper's 1 / sum |o_i|).
* ``dppo_mask_low`` / ``dppo_mask_high`` (prime-rl ``default_loss_fn``): ``d = p - p_b`` with
  ``p = exp(sg(logp))``; ``A > 0`` drops ``d > high``, else ``d < -low``. ``ipo_threshold``
  (prime-rl ``ipo_loss_fn``): drops ``|d| > threshold``. Policy term only, normaliser unchanged.
* ``loss="topr"`` (TOPR eq. 8, ROLL ``_compute_topr_loss``): ``-w A logp`` with the constant
  ``w = positive weight`` for ``A >= 0``, ``negative weight * min(r, 1)`` for ``A < 0``.
"""

from __future__ import annotations

import math

import torch

LOG_RATIO_CLAMP = 20.0  # verl: log-ratios clamped to [-20, 20] before exp
K3_CLAMP = 10.0  # verl low_var_kl: k3 clamped to [-10, 10]
GSPO_TOKEN_LOG_CLAMP = 10.0  # GSPO-token (verl / TRL): log s_it clamped <= 10
F64 = torch.float64


def _const(value: float) -> torch.Tensor:
    """A float64 scalar with no gradient (a stop-gradient, or a clamp that bit)."""
    return torch.tensor(float(value), dtype=F64)


def _value(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def _value_with_gradient_of(value: float, g: torch.Tensor) -> torch.Tensor:
    """Forward value ``value``, gradient that of ``g``: value + g - sg(g)."""
    if not g.requires_grad:
        return _const(value)
    return _const(value) + (g - g.detach())


# --- row statistics (docs/SPEC.md section 1), from scratch --------------------------------------------


def _logprob_and_entropy(row: torch.Tensor, token: int, temperature: float):
    """(log p_y, H) of one float64 logits row, differentiable in the row."""
    x = row / temperature
    shift = x.detach().max()
    if not math.isfinite(float(shift)):
        shift = torch.zeros((), dtype=F64)
    lse = shift + torch.log(torch.exp(x - shift).sum())
    log_p = x - lse
    p = torch.exp(log_p)
    safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))  # 0 log 0 := 0, no NaN gradient
    entropy = -(p * safe_log_p).sum()
    return log_p[token], entropy


# --- ratios and per-token variants (docs/SPEC.md section 3) -------------------------------------------


def _exp_clamped(log_value: torch.Tensor, low: float = -LOG_RATIO_CLAMP, high: float = LOG_RATIO_CLAMP):
    """exp of a log-ratio clamped to [low, high]; strictly outside, a constant (no gradient)."""
    v = _value(log_value)
    if v > high:
        return _const(math.exp(high))
    if v < low:
        return _const(math.exp(low))
    return torch.exp(log_value)


def _ppo_clip(r: torch.Tensor, a: float, config, gppo: bool = False) -> torch.Tensor:
    """max(-A r, -A clip(r, 1-eps_low, 1+eps_high)) written as its cases, then dual clip.

    GPPO: same forward, clipped tokens keep the gradient of -beta * bound * A * r / sg(r).
    """
    rv = _value(r)
    low, high = 1.0 - config.clip_low, 1.0 + config.clip_high
    if a > 0 and rv > high:  # -A r < -A high: the clipped branch is the max
        if gppo:
            loss = _value_with_gradient_of(-a * high, -config.gppo_beta_high * high * a * r / rv)
        else:
            loss = _const(-a * high)
    elif a < 0 and rv < low:  # -A r < -A low (A < 0)
        if gppo:
            loss = _value_with_gradient_of(-a * low, -config.gppo_beta_low * low * a * r / rv)
        else:
            loss = _const(-a * low)
    else:
        loss = -a * r
    # Dual clip (Ye et al. 2020): for A < 0, L = min(L, -c A).
    if config.dual_clip is not None and a < 0 and _value(loss) > -config.dual_clip * a:
        loss = _const(-config.dual_clip * a)
    return loss


def _ppo_token(logp, old: float, a: float, config, gppo: bool = False) -> torch.Tensor:
    r = _exp_clamped(logp - old)
    if config.delta is not None and _value(r) > config.delta:  # INTELLECT-2: r capped at delta first
        r = _const(config.delta)
    return _ppo_clip(r, a, config, gppo)


def _token_local_term(logp, old, a: float, config) -> torch.Tensor:
    """Unweighted per-token policy loss of a token-local variant (docs/SPEC.md section 3 table)."""
    name = config.loss
    if name == "reinforce":  # GPG / REINFORCE: -A logp
        return -a * logp
    if name in ("ppo", "gppo"):
        return _ppo_token(logp, old, a, config, gppo=name == "gppo")
    r = _exp_clamped(logp - old)
    rv = _value(r)
    if name == "cispo":  # -sg(w) A logp
        if config.cispo_mode == "cap":
            w = min(rv, config.clip_high)
        elif config.cispo_mode == "upper":
            w = min(rv, 1.0 + config.clip_high)
        else:  # two_sided; clip_low None means no lower bound
            w = min(rv, 1.0 + config.clip_high)
            if config.clip_low is not None:
                w = max(w, 1.0 - config.clip_low)
        return -w * a * logp
    if name == "sapo":  # -A (4 / tau) sigmoid(tau (r - 1))
        tau = config.sapo_tau_pos if a > 0 else config.sapo_tau_neg
        gate = 1.0 / (1.0 + torch.exp(-tau * (r - 1.0)))
        return -a * (4.0 / tau) * gate
    if name == "pspo":  # -A ((1 - alpha) r + alpha)
        return -a * ((1.0 - config.pspo_alpha) * r + config.pspo_alpha)
    if name == "spo":  # SPO: -(A r - |A| (r - 1)^2 / (2 eps)), eps = clip_high
        return -(a * r - abs(a) * (r - 1.0) ** 2 / (2.0 * config.clip_high))
    if name == "topr":  # TOPR: REINFORCE for A >= 0, constant min(r, 1) times -A logp for A < 0
        w = config.topr_positive_weight if a >= 0 else config.topr_negative_weight * min(max(rv, 0.0), 1.0)
        return -w * a * logp
    raise ValueError(f"{name!r} is not a token-local variant")


# --- penalties (docs/SPEC.md section 5) ---------------------------------------------------------------


def _kl(logp, ref: float, kind: str) -> torch.Tensor:
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    if kind == "abs":
        return torch.abs(logp - ref)
    # k3 = exp(ref - logp) - (ref - logp) - 1, with ref - logp clamped to [-20, 20] and k3 to [-10, 10].
    d = ref - logp
    dv = _value(d)
    if dv > LOG_RATIO_CLAMP or dv < -LOG_RATIO_CLAMP:
        d = _const(max(-LOG_RATIO_CLAMP, min(LOG_RATIO_CLAMP, dv)))
    k3 = torch.exp(d) - d - 1.0
    k3v = _value(k3)
    if k3v > K3_CLAMP or k3v < -K3_CLAMP:
        k3 = _const(max(-K3_CLAMP, min(K3_CLAMP, k3v)))
    if kind == "k3":
        return k3
    if kind == "k3+":  # value of k3, gradient of k2 = 0.5 (logp - ref)^2
        return _value_with_gradient_of(_value(k3), 0.5 * (logp - ref) ** 2)
    raise ValueError(f"unknown kl {kind!r}")


# --- the oracle ----------------------------------------------------------------------------------


def _linear_quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def _rollout_weights(sequences, old, rollout, config) -> dict:
    """Rollout importance weights per valid token of the caller's mask (docs/SPEC.md section 4)."""
    mode = config.rollout_correction
    cap = config.rollout_cap
    cap_low = config.rollout_cap_low if config.rollout_cap_low is not None else 1.0 / cap

    def clamped_exp(v):
        return math.exp(max(-LOG_RATIO_CLAMP, min(LOG_RATIO_CLAMP, v)))

    weights, seq_weights = {}, []
    for seq in sequences:
        logs = [old[i] - rollout[i] for i in seq]
        if mode == "seq_mask_tis":
            geo = clamped_exp(sum(logs) / len(seq)) if seq else 1.0
            for i, lw in zip(seq, logs):
                weights[i] = min(clamped_exp(lw), cap) if cap_low <= geo <= cap else 0.0
            continue
        for i, lw in zip(seq, logs):
            w = clamped_exp(sum(logs) if mode.startswith("seq_") else lw)
            if mode.endswith("truncate"):
                w = min(w, cap)
            elif not cap_low <= w <= cap:
                w = 0.0
            weights[i] = w
        if seq:
            seq_weights.append(weights[seq[0]])
    if getattr(config, "rollout_is_batch_normalize", False) and weights:
        if mode in ("seq_truncate", "seq_mask"):
            mean = sum(seq_weights) / len(seq_weights)
        else:
            mean = sum(weights.values()) / len(weights)
        if mean > 1e-8:
            weights = {i: w / mean for i, w in weights.items()}
    return weights


def _rejection(valid, sequences, old, rollout, config) -> list:
    """verl's rejection options applied to the caller's mask: the new per-token validity."""
    options = [o.strip() for o in config.rollout_rejection.split(",") if o.strip()]
    options = list(dict.fromkeys(options))
    spec = config.rollout_rejection_threshold
    specs = [str(spec)] if not isinstance(spec, str) else [p.strip() for p in spec.split(",") if p.strip()]
    specs = specs * len(options) if len(specs) == 1 else specs
    keep = list(valid)
    for option, text in zip(options, specs):
        kind = option[-2:]
        if kind == "k1":
            low_text, high_text = text.split("_") if "_" in text else (None, text)
            high = float(high_text)
            low = float(low_text) if low_text is not None else 1.0 / high
        else:
            high, low = float(text), None

        def stat(i):
            lr = max(-LOG_RATIO_CLAMP, min(LOG_RATIO_CLAMP, old[i] - rollout[i]))
            return {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.exp(lr) - 1.0 - lr}[kind]

        def ok(v):
            return math.log(low) <= v <= math.log(high) if low is not None else v <= high

        for seq in sequences:
            if option.startswith("token_"):
                for i in seq:
                    keep[i] = keep[i] and ok(stat(i))
                continue
            values = [stat(i) for i in seq]
            if not values:
                continue
            agg = {"seq_sum": sum(values), "seq_mean": sum(values) / len(values), "seq_max": max(values)}
            if not ok(agg[option.rsplit("_", 1)[0]]):
                for i in seq:
                    keep[i] = False
    return keep


def oracle_policy_loss(logits, tokens, advantages, old=None, ref_lp=None, rollout=None, mask=None,
                       cu_seqlens=None, config=None):
    """(loss, d loss / d logits) in float64, for padded [B, T, V] or packed [N, V] logits."""
    if config is None:
        raise ValueError("the oracle needs an explicit config")
    if config.loss == "troll" or config.kl_full_coef != 0:
        raise NotImplementedError("TROLL and the full-vocabulary KL have their own oracles")

    x = logits.detach().to(F64).requires_grad_(True)
    vocab = x.shape[-1]
    rows = x.reshape(-1, vocab)
    flat_tokens = [int(t) for t in tokens.reshape(-1).tolist()]
    n = len(flat_tokens)

    # Sequences as [start, end) runs of the flat tokens.
    if logits.dim() == 3:
        b, t = tokens.shape
        bounds = [(i * t, (i + 1) * t) for i in range(b)]
        norm_length = config.norm_length if config.norm_length is not None else float(max(t, 1))
    else:
        cu = [0, n] if cu_seqlens is None else [int(c) for c in cu_seqlens.tolist()]
        bounds = list(zip(cu[:-1], cu[1:]))
        norm_length = config.norm_length

    valid = [True] * n if mask is None else [bool(v != 0) for v in mask.reshape(-1).tolist()]

    def per_token(values):
        return None if values is None else [float(v) for v in values.detach().to(F64).reshape(-1).tolist()]

    if tuple(advantages.shape) == tuple(tokens.shape):
        adv = per_token(advantages)
    else:
        per_seq = per_token(advantages)
        assert len(per_seq) == len(bounds), "advantages must be per token or per sequence"
        adv = [0.0] * n
        for (start, end), a in zip(bounds, per_seq):
            for i in range(start, end):
                adv[i] = a
    old, ref_lp, rollout = per_token(old), per_token(ref_lp), per_token(rollout)

    caller_sequences = [[i for i in range(start, end) if valid[i]] for start, end in bounds]
    rejection = getattr(config, "rollout_rejection", None)
    if rejection is not None:
        valid = _rejection(valid, caller_sequences, old, rollout, config)

    # Valid tokens of each sequence; empty sequences are skipped everywhere.
    sequences = [[i for i in range(start, end) if valid[i]] for start, end in bounds]
    nonempty = [s for s in sequences if s]
    valid_tokens = [i for s in sequences for i in s]  # flat order (bounds are increasing)

    logp, entropy = {}, {}
    for i in valid_tokens:
        logp[i], entropy[i] = _logprob_and_entropy(rows[i], flat_tokens[i], config.temperature)

    def aggregate(per_token_values: dict) -> torch.Tensor:
        """docs/SPEC.md section 6, written per mode over the valid tokens."""
        total = _const(0.0)
        mode = config.aggregation
        if mode in ("token-sum", "token-mean"):
            for i in valid_tokens:
                if i in per_token_values:
                    total = total + per_token_values[i]
            if mode == "token-mean":
                total = total / (config.norm_tokens if config.norm_tokens is not None else max(len(valid_tokens), 1))
            return total
        for seq in nonempty:
            seq_sum = _const(0.0)
            for i in seq:
                if i in per_token_values:
                    seq_sum = seq_sum + per_token_values[i]
            if mode == "seq-mean-token-mean":
                total = total + seq_sum / len(seq)
            elif mode == "seq-mean-token-sum":
                total = total + seq_sum
            elif mode == "seq-mean-token-sum-norm":
                if norm_length is None:
                    raise ValueError("seq-mean-token-sum-norm on packed inputs needs config.norm_length")
                total = total + seq_sum / norm_length
            else:
                raise ValueError(f"unknown aggregation {mode!r}")
        return total / max(len(nonempty), 1)

    # Multipliers of the policy term: rollout correction (docs/SPEC.md section 4), entropy minority mask.
    policy_factor = {i: 1.0 for i in valid_tokens}
    if config.rollout_correction is not None:
        weights = _rollout_weights(caller_sequences, old, rollout, config)
        for i in valid_tokens:
            policy_factor[i] *= weights[i]
    if getattr(config, "off_policy_mask_threshold", None) is not None:
        behaviour = rollout if rollout is not None else old
        for seq in sequences:
            diffs = [behaviour[i] - _value(logp[i]) for i in seq]
            mean_kl = sum(0.0 if math.isnan(d) else d for d in diffs) / max(len(seq), 1)
            for i in seq:
                if adv[i] < 0 and mean_kl > config.off_policy_mask_threshold:
                    policy_factor[i] = 0.0
    behaviour = rollout if rollout is not None else old
    m2po = getattr(config, "m2po_threshold", None)
    if m2po is not None:
        m2 = {}
        for i in valid_tokens:
            v = (_value(logp[i]) - behaviour[i]) ** 2
            m2[i] = math.inf if math.isnan(v) else v
        kept = sorted(valid_tokens, key=lambda i: (m2[i], i))
        while kept and sum(m2[i] for i in kept) / len(kept) > m2po:
            policy_factor[kept.pop()] = 0.0  # the largest second moment leaves
    dppo_low, dppo_high = getattr(config, "dppo_mask_low", None), getattr(config, "dppo_mask_high", None)
    ipo = getattr(config, "ipo_threshold", None)
    for i in valid_tokens:
        d = math.exp(_value(logp[i])) - math.exp(behaviour[i]) if behaviour is not None else 0.0
        dropped = False
        if dppo_low is not None or dppo_high is not None:
            if adv[i] > 0:
                dropped = dppo_high is not None and d > dppo_high
            else:
                dropped = dppo_low is not None and d < -dppo_low
        if ipo is not None and abs(d) > ipo:
            dropped = True
        if dropped:
            policy_factor[i] = 0.0
    if config.entropy_quantile is not None and valid_tokens:
        threshold = _linear_quantile([_value(entropy[i]) for i in valid_tokens], 1.0 - config.entropy_quantile)
        for i in valid_tokens:
            if not _value(entropy[i]) >= threshold:
                policy_factor[i] = 0.0

    # kl_bias_correction's importance ratio (with its gradient).
    kl_ratio = {}
    if getattr(config, "kl_bias_correction", False):
        for seq in sequences:
            if config.loss in ("gspo", "gspo_token") and seq:
                seq_log = sum((logp[i] - old[i] for i in seq), _const(0.0)) / len(seq)
                for i in seq:
                    kl_ratio[i] = _exp_clamped(seq_log)
            else:
                for i in seq:
                    kl_ratio[i] = _exp_clamped(logp[i] - old[i])

    # Penalties: KL to the reference and the entropy bonus, per valid token.
    penalties = {}
    for i in valid_tokens:
        term = _const(0.0)
        if config.kl is not None and config.kl_coef != 0:
            kl = _kl(logp[i], ref_lp[i], config.kl)
            if getattr(config, "kl_bias_correction", False):
                kl = kl * kl_ratio[i]
            term = term + config.kl_coef * kl
        if config.entropy_coef != 0:
            term = term - config.entropy_coef * entropy[i]
        penalties[i] = term

    name = config.loss
    if name in ("gspo", "gmpo"):
        if config.entropy_quantile is not None or config.rollout_correction is not None:
            raise NotImplementedError(f"docs/SPEC.md defines no per-token multiplier of the sequence-level {name!r} loss")
        policy = _const(0.0)
        for seq in nonempty:
            a_seq = sum(adv[i] for i in seq) / len(seq)
            if name == "gspo":
                # s_i = exp(mean_t (logp - old)); L_i = max(-A s, -A clip(s, 1-eps_low, 1+eps_high)).
                mean_log_ratio = sum((logp[i] - old[i] for i in seq), _const(0.0)) / len(seq)
                s = _exp_clamped(mean_log_ratio)
                low, high = 1.0 - config.clip_low, 1.0 + config.clip_high
                if (a_seq > 0 and _value(s) > high) or (a_seq < 0 and _value(s) < low):
                    seq_loss = _const(-a_seq * (high if a_seq > 0 else low))
                else:
                    seq_loss = -a_seq * s
            else:
                # GMPO: l~ = sgn(A) min(sgn(A) l, sgn(A) clamp(l, -eps_low, eps_high)), R_i = exp(mean l~).
                total_log = _const(0.0)
                for i in seq:
                    log_ratio = logp[i] - old[i]
                    lv, a = _value(log_ratio), adv[i]
                    if a > 0:
                        total_log = total_log + (_const(config.clip_high) if lv > config.clip_high else log_ratio)
                    elif a < 0:
                        total_log = total_log + (_const(-config.clip_low) if lv < -config.clip_low else log_ratio)
                    # sgn(A) = 0: l~ = 0
                seq_loss = -a_seq * _exp_clamped(total_log / len(seq))
            policy = policy + seq_loss
        loss = policy / max(len(nonempty), 1) + aggregate(penalties)
    else:
        terms = {}
        if name == "gspo_token":
            # log s_it = sg(log s_i) + logp_t - sg(logp_t), clamped <= 10; then the PPO clip per token.
            for seq in sequences:
                if not seq:
                    continue
                log_s_seq = sum(_value(logp[i]) - old[i] for i in seq) / len(seq)
                for i in seq:
                    log_s = log_s_seq + (logp[i] - _value(logp[i]))
                    s = _exp_clamped(log_s, -math.inf, GSPO_TOKEN_LOG_CLAMP)  # only the upper clamp
                    terms[i] = _ppo_clip(s, adv[i], config)
        elif name in ("clip_cov", "kl_cov"):
            count_valid = len(valid_tokens)
            mean_a = sum(adv[i] for i in valid_tokens) / max(count_valid, 1)
            mean_lp = sum(_value(logp[i]) for i in valid_tokens) / max(count_valid, 1)
            cov = {i: (adv[i] - mean_a) * (_value(logp[i]) - mean_lp) for i in valid_tokens}
            budget = max(1, int(config.cov_ratio * count_valid))  # max(1, floor(ratio N))
            if name == "clip_cov":
                # Among valid, not-already-clipped tokens with lb < cov < ub, a seeded random pick loses its loss.
                candidates = []
                for i in valid_tokens:
                    r = math.exp(max(-LOG_RATIO_CLAMP, min(LOG_RATIO_CLAMP, _value(logp[i]) - old[i])))
                    a = adv[i]
                    clipped = (a > 0 and r > 1.0 + config.clip_high) or (a < 0 and r < 1.0 - config.clip_low)
                    if not clipped and config.cov_lb < cov[i] < config.cov_ub:
                        candidates.append(i)
                count = min(budget, len(candidates))
                chosen = set()
                if count:
                    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(config.seed))
                    chosen = {candidates[j] for j in order[:count].tolist()}
                for i in valid_tokens:
                    terms[i] = _const(0.0) if i in chosen else _ppo_token(logp[i], old[i], adv[i], config)
            else:
                # KL-Cov: unclipped -A r; the top-covariance tokens add coef |logp - old|.
                count = min(budget, count_valid)
                top = set(sorted(valid_tokens, key=lambda i: -cov[i])[:count])
                for i in valid_tokens:
                    terms[i] = -adv[i] * _exp_clamped(logp[i] - old[i])
                    if i in top:
                        terms[i] = terms[i] + config.kl_cov_coef * torch.abs(logp[i] - old[i])
        else:
            for i in valid_tokens:
                terms[i] = _token_local_term(logp[i], None if old is None else old[i], adv[i], config)
        weighted = {i: policy_factor[i] * terms[i] for i in valid_tokens if policy_factor[i] != 0}
        loss = aggregate(weighted) + aggregate(penalties)

    if loss.requires_grad:
        loss.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return loss.detach(), grad
