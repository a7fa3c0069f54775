// Per-token policy-loss math of the fused path (docs/SPEC.md sections 3 and 5), shared by the CPU and
// CUDA kernels. Given one token's log-prob and entropy (from the row statistics) and its per-token
// inputs, returns the weighted loss and the upstream gradients on logp and H that the row-gradient
// step (row_math.h: grad_coeffs / grad_element) turns into the logits' gradient.
//
// The Python reference (python/rlfuse/reference/policy_loss.py) is the specification this mirrors.
#pragma once

#include "rlfuse/row_math.h"
#include "rlfuse/schema.h"

namespace rlfuse {

// PolicyKind, KlKind, CispoMode and TokenLossParams: schema.h (python/rlfuse/_schema.py).

struct TokenLossInputs {
  float logp;
  float entropy;
  float old_logp;
  float ref_logp;
  float advantage;
  float policy_weight;  // aggregation weight x rollout correction x any other per-token factor
  float weight;         // aggregation weight for the KL and entropy terms
};

struct TokenLoss {
  float loss;       // weighted: summing over tokens gives the aggregated loss
  float g_logp;     // d loss / d logp
  float g_entropy;  // d loss / d H
};

RLFUSE_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// A per-token quantity (a policy term, a penalty, the log-ratio): value and d/dlogp.
struct Term {
  float value;
  float grad;
};

// l = clamp(logp - old, -20, 20) and dl/dlogp: a clamp that bites zeroes the token's gradient (verl
// convention).
RLFUSE_HD Term clamped_log_ratio(float logp, float old_logp) {
  const float raw_log_ratio = logp - old_logp;
  const float log_ratio = clampf(raw_log_ratio, -20.0f, 20.0f);
  return Term{log_ratio, (raw_log_ratio == log_ratio) ? 1.0f : 0.0f};
}

RLFUSE_HD Term policy_term(const TokenLossParams& p, float logp, float old_logp, float a) {
  const Term log_ratio = clamped_log_ratio(logp, old_logp);
  float r = expf(log_ratio.value);
  float dr = r * log_ratio.grad;  // d r / d logp

  switch (p.policy) {
    case kReinforce:
      return Term{-a * logp, -a};
    case kPspo:
      return Term{-a * ((1.0f - p.pspo_alpha) * r + p.pspo_alpha), -a * (1.0f - p.pspo_alpha) * dr};
    case kSpo: {  // SPO: -(A r - |A| (r - 1)^2 / (2 eps)), eps = clip_high
      const float d = r - 1.0f;
      return Term{-(a * r - fabsf(a) * d * d / (2.0f * p.clip_high)), -(a - fabsf(a) * d / p.clip_high) * dr};
    }
    case kCpgd: {  // CPGD (SPEC section 12): -min(A l, A clip(l, log(1 - eps_low), log(1 + eps_high)))
      const float log_low = log1pf(-p.clip_low), log_high = log1pf(p.clip_high);
      // Strict, as the ratio clip: a log-ratio exactly on a bound is unclipped and keeps its gradient.
      if (a > 0.0f && log_ratio.value > log_high) return Term{-a * log_high, 0.0f};
      if (a < 0.0f && log_ratio.value < log_low) return Term{-a * log_low, 0.0f};
      return Term{-a * log_ratio.value, -a * log_ratio.grad};
    }
    case kSapo: {
      const float tau = a > 0.0f ? p.sapo_tau_pos : p.sapo_tau_neg;
      const float s = 1.0f / (1.0f + expf(-tau * (r - 1.0f)));
      return Term{-a * (4.0f / tau) * s, -a * 4.0f * s * (1.0f - s) * dr};
    }
    case kCispo: {
      float w = r;
      if (p.cispo_mode == kCispoCap) {
        w = r < p.clip_high ? r : p.clip_high;
      } else {
        const float upper = 1.0f + p.clip_high;
        w = r < upper ? r : upper;
        if (p.cispo_mode == kCispoTwoSided && p.clip_low >= 0.0f) {
          const float lower = 1.0f - p.clip_low;
          w = w > lower ? w : lower;
        }
      }
      return Term{-w * a * logp, -w * a};  // w is detached
    }
    default:
      break;
  }

  // ppo / gppo. delta (two-sided PPO) first caps r; a cap that bites stops the gradient.
  if (p.delta > 0.0f && r > p.delta) {
    r = p.delta;
    dr = 0.0f;
  }
  const float low = 1.0f - p.clip_low, high = 1.0f + p.clip_high;
  // Strict inequalities: a ratio exactly on a boundary is unclipped and keeps its gradient.
  const bool clipped_high = a > 0.0f && r > high;
  const bool clipped_low = a < 0.0f && r < low;
  Term t{-a * r, -a * dr};
  // GPPO keeps a bounded gradient on clipped tokens: d/dlogp of beta * bound * A * r / sg(r),
  // gated like every ratio gradient (dr / r is 1, or 0 where a clamp bit).
  const float gate = dr / r;
  if (clipped_high) {
    t = Term{-a * high, p.policy == kGppo ? -p.gppo_beta_high * high * a * gate : 0.0f};
  } else if (clipped_low) {
    t = Term{-a * low, p.policy == kGppo ? -p.gppo_beta_low * low * a * gate : 0.0f};
  }
  if (p.dual_clip > 0.0f && a < 0.0f && t.value > -p.dual_clip * a) {
    t = Term{-p.dual_clip * a, 0.0f};
  }
  return t;
}

// KL penalty to the reference policy (unweighted, without coefficient): value and d/dlogp.
RLFUSE_HD Term kl_term(int kind, float logp, float ref_logp) {
  const float diff = logp - ref_logp;
  switch (kind) {
    case kK1:
      return Term{diff, 1.0f};
    case kK2:
      return Term{0.5f * diff * diff, diff};
    case kKlAbs:
      return Term{fabsf(diff), diff > 0.0f ? 1.0f : (diff < 0.0f ? -1.0f : 0.0f)};
    case kK3:
    case kK3Plus: {
      const float raw = ref_logp - logp;
      const float d = clampf(raw, -20.0f, 20.0f);
      const float e = expf(d);
      const float k3_raw = e - d - 1.0f;
      const float k3 = clampf(k3_raw, -10.0f, 10.0f);
      if (kind == kK3Plus) return Term{k3, diff};  // value of k3, gradient of k2
      // d k3 / d logp = -(e - 1), zero where either clamp bites.
      const bool live = raw == d && k3_raw == k3;
      return Term{k3, live ? 1.0f - e : 0.0f};
    }
    default:
      return Term{0.0f, 0.0f};
  }
}

// CPGD's policy drift KL(old || new) (SPEC section 12), without coefficient: value r - 1 - l (k3 from
// the old policy's samples), gradient min(r - 1, cap) dl/dlogp (siiRL's capped drift gradient).
RLFUSE_HD Term cpgd_drift(float cap, float logp, float old_logp) {
  const Term log_ratio = clamped_log_ratio(logp, old_logp);
  const float excess = expf(log_ratio.value) - 1.0f;  // r - 1
  return Term{excess - log_ratio.value, (excess > cap ? cap : excess) * log_ratio.grad};  // NaN stays NaN
}

// out += w * term (loss and d/dlogp).
RLFUSE_HD void add_weighted(TokenLoss& out, float w, const Term& term) {
  out.loss += w * term.value;
  out.g_logp += w * term.grad;
}

// The loss parameters of one row of a PolicyLossFusedArgs: `params`, with clip_low / clip_high /
// dual_clip taken from the per-token arrays that are given (non-null).
template <typename Args>
RLFUSE_HD TokenLossParams row_params(const Args& args, int64_t row) {
  TokenLossParams p = args.params;
  if (args.clip_low_rows != nullptr) p.clip_low = args.clip_low_rows[row];
  if (args.clip_high_rows != nullptr) p.clip_high = args.clip_high_rows[row];
  if (args.dual_clip_rows != nullptr) p.dual_clip = args.dual_clip_rows[row];
  return p;
}

RLFUSE_HD TokenLoss token_loss(const TokenLossParams& p, const TokenLossInputs& in) {
  TokenLoss out{0.0f, 0.0f, 0.0f};
  // Zero weights skip the math, so masked tokens never turn garbage inputs into NaN.
  if (in.policy_weight != 0.0f) {
    add_weighted(out, in.policy_weight, policy_term(p, in.logp, in.old_logp, in.advantage));
  }
  // Penalties: the aggregation weight, no rollout factor (SPEC section 5).
  if (in.weight != 0.0f) {
    if (p.policy == kCpgd && p.cpgd_drift_coef != 0.0f) {
      add_weighted(out, in.weight * p.cpgd_drift_coef, cpgd_drift(p.cpgd_drift_cap, in.logp, in.old_logp));
    }
    if (p.kl != kKlNone && p.kl_coef != 0.0f) {
      add_weighted(out, in.weight * p.kl_coef, kl_term(p.kl, in.logp, in.ref_logp));
    }
    if (p.entropy_coef != 0.0f) {
      out.loss -= in.weight * p.entropy_coef * in.entropy;
      out.g_entropy -= in.weight * p.entropy_coef;
    }
  }
  return out;
}

}  // namespace rlfuse
