"""Float64 oracle for policy_loss: the reference math of SPEC.md sections 3-6 on float64 log-probs,
with its own plumbing (flattening, sequences, weights), independent of rlfuse.losses."""

from __future__ import annotations

import torch

from rlfuse import reference as ref


def oracle_policy_loss(logits, tokens, advantages, old=None, ref_lp=None, rollout=None, mask=None,
                       cu_seqlens=None, config=None):
    """(loss, d loss / d logits) in float64."""
    x = logits.detach().double().requires_grad_(True)
    logp, entropy = ref.token_logprobs_reference(x, tokens, config.temperature)
    logp, entropy = logp.reshape(-1), entropy.reshape(-1)
    n = logp.numel()
    if logits.dim() == 3:
        b, t = tokens.shape
        cu = torch.arange(b + 1) * t
        norm_length = config.norm_length or float(t)
    else:
        cu = cu_seqlens.long() if cu_seqlens is not None else torch.tensor([0, n])
        norm_length = config.norm_length
    m = torch.ones(n, dtype=torch.float64) if mask is None else (mask.reshape(-1) != 0).double()
    lengths = cu.diff()
    a = advantages.double()
    a = a.reshape(-1) if a.numel() == n else torch.repeat_interleave(a, lengths)

    def flat(v):
        return None if v is None else v.reshape(-1).double()

    old, ref_lp, rollout = flat(old), flat(ref_lp), flat(rollout)

    # Aggregation weights, written out per mode.
    seq_len = torch.repeat_interleave(torch.stack([m[s:e].sum() for s, e in zip(cu[:-1], cu[1:])]), lengths)
    n_valid_seq = max(1, sum(int(m[s:e].sum() > 0) for s, e in zip(cu[:-1], cu[1:])))
    w = {
        "token-sum": m,
        "token-mean": m / (config.norm_tokens or max(float(m.sum()), 1.0)),
        "seq-mean-token-mean": m / seq_len.clamp(min=1) / n_valid_seq,
        "seq-mean-token-sum": m / n_valid_seq,
        "seq-mean-token-sum-norm": m / (norm_length or 1.0) / n_valid_seq,
    }[config.aggregation]
    pw = w
    if config.rollout_correction is not None:
        pw = pw * ref.rollout_correction_weights(old, rollout, m, cu, config)
    if config.entropy_quantile is not None:
        pw = pw * ref.entropy_minority_mask(entropy, m, config.entropy_quantile)

    penalties = ref.penalty_terms(logp, entropy, ref_lp, w, config).sum()
    if config.loss == "gspo":
        loss = ref.gspo_loss(logp, old, a, m, cu, config) + penalties
    elif config.loss == "gmpo":
        loss = ref.gmpo_loss(logp, old, a, m, cu, config) + penalties
    else:
        term = {
            "gspo_token": lambda: ref.gspo_token_term(logp, old, a, m, cu, config),
            "clip_cov": lambda: ref.clip_cov_term(logp, old, a, m, config),
            "kl_cov": lambda: ref.kl_cov_term(logp, old, a, m, config),
        }.get(config.loss, lambda: ref.policy_term(logp, old, a, config))()
        loss = ref.weighted(term, pw).sum() + penalties
    loss.backward()
    return loss.detach(), x.grad
