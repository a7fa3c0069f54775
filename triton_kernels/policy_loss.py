"""Fused policy loss: one program per row computes the row statistics, the per-token loss and
the row's gradient, while the row is still in cache (DESIGN.md "The two paths for a loss").

Per row (same row contract and conventions as token_logprobs.py):

1. statistics pass, exactly as the token_logprobs forward: lse, entropy H, logp = x_y - lse
   (NaN for an out-of-range token id, which is never loaded);
2. the per-token loss and its upstream gradients g_logp, g_H: a line-by-line port of
   ``policy_term``, ``kl_term`` and ``token_loss`` of csrc/include/rlfuse/token_loss.h
   (SPEC.md sections 3 and 5), with the policy kind, the KL kind and the CISPO mode as
   constexprs so unused variants compile away;
3. gradient pass over the same row, exactly as the token_logprobs backward:
   g_j = p_j * (base + slope * log p_j) (+ target at j == y), every element written. A row with
   g_logp = g_H = 0 (masked token, zero weights, clipped) is written as zeros without reading
   the logits again, as the CPU and CUDA kernels do (csrc/include/rlfuse/kernels.h).

The gradient is that of the weighted per-token loss itself (upstream gradient 1); the autograd
backward only rescales it by grad_output.
"""

import triton
import triton.language as tl

from ._launch import AotKernel, block_config
from .token_logprobs import _row_ptr, _row_stats, _token_logp, _write_grad_row

# Enum values of token_loss.h (PolicyKind, KlKind, CispoMode).
PPO, GPPO, CISPO, SAPO, PSPO, REINFORCE = 0, 1, 2, 3, 4, 5
KL_NONE, K1, K2, K3, K3_PLUS, KL_ABS = 0, 1, 2, 3, 4, 5
CISPO_TWO_SIDED, CISPO_UPPER, CISPO_CAP = 0, 1, 2

POLICY_NAMES = ("ppo", "gppo", "cispo", "sapo", "pspo", "reinforce")
KL_NAMES = ("none", "k1", "k2", "k3", "k3+", "abs")
CISPO_MODE_NAMES = ("two_sided", "upper", "cap")

# Float fields of TokenLossParams, in the kernel's argument order.
FLOAT_PARAMS = ("clip_low", "clip_high", "dual_clip", "delta", "gppo_beta_low", "gppo_beta_high",
                "sapo_tau_pos", "sapo_tau_neg", "pspo_alpha", "kl_coef", "entropy_coef")


@triton.jit
def _clampf(v, lo, hi):
    # token_loss.h clampf: v < lo ? lo : (v > hi ? hi : v); NaN passes through.
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _policy_term(logp, old_logp, a,
                 clip_low, clip_high, dual_clip, delta, gppo_beta_low, gppo_beta_high,
                 sapo_tau_pos, sapo_tau_neg, pspo_alpha,
                 POLICY: tl.constexpr, CISPO_MODE: tl.constexpr):
    """token_loss.h policy_term: (value, d value / d logp), unweighted."""
    raw_log_ratio = logp - old_logp
    log_ratio = _clampf(raw_log_ratio, -20.0, 20.0)
    # A clamp that bites zeroes the token's gradient (verl convention).
    ratio_grad_gate = tl.where(raw_log_ratio == log_ratio, 1.0, 0.0)
    r = tl.exp(log_ratio)
    dr = r * ratio_grad_gate  # d r / d logp

    if POLICY == 5:  # reinforce
        value = -a * logp
        grad = -a
    elif POLICY == 4:  # pspo
        value = -a * ((1.0 - pspo_alpha) * r + pspo_alpha)
        grad = -a * (1.0 - pspo_alpha) * dr
    elif POLICY == 3:  # sapo
        tau = tl.where(a > 0.0, sapo_tau_pos, sapo_tau_neg)
        s = 1.0 / (1.0 + tl.exp(-tau * (r - 1.0)))
        value = -a * (4.0 / tau) * s
        grad = -a * 4.0 * s * (1.0 - s) * dr
    elif POLICY == 2:  # cispo
        if CISPO_MODE == 2:  # cap
            w = tl.where(r < clip_high, r, clip_high)
        else:
            upper = 1.0 + clip_high
            w = tl.where(r < upper, r, upper)
            if CISPO_MODE == 0:  # two_sided; clip_low < 0 means no lower bound
                lower = 1.0 - clip_low
                w = tl.where(clip_low >= 0.0, tl.where(w > lower, w, lower), w)
        value = -w * a * logp  # w is detached
        grad = -w * a
    else:  # ppo / gppo
        # delta (two-sided PPO) first caps r; a cap that bites stops the gradient.
        capped = (delta > 0.0) & (r > delta)
        r = tl.where(capped, delta, r)
        dr = tl.where(capped, 0.0, dr)
        low = 1.0 - clip_low
        high = 1.0 + clip_high
        # Strict inequalities: a ratio exactly on a boundary is unclipped and keeps its gradient.
        clipped_high = (a > 0.0) & (r > high)
        clipped_low = (a < 0.0) & (r < low)
        value = -a * r
        grad = -a * dr
        if POLICY == 1:  # gppo: bounded gradient on clipped tokens, gated like dr (1, or 0)
            gate = dr / r
            grad_high = -gppo_beta_high * high * a * gate
            grad_low = -gppo_beta_low * low * a * gate
        else:
            grad_high = 0.0
            grad_low = 0.0
        value = tl.where(clipped_high, -a * high, tl.where(clipped_low, -a * low, value))
        grad = tl.where(clipped_high, grad_high, tl.where(clipped_low, grad_low, grad))
        dual = (dual_clip > 0.0) & (a < 0.0) & (value > -dual_clip * a)
        value = tl.where(dual, -dual_clip * a, value)
        grad = tl.where(dual, 0.0, grad)
    return value, grad


@triton.jit
def _k3_term(logp, ref_logp):
    """(k3, d k3 / d logp): zero gradient where either clamp bites."""
    raw = ref_logp - logp
    d = _clampf(raw, -20.0, 20.0)
    e = tl.exp(d)
    k3_raw = e - d - 1.0
    k3 = _clampf(k3_raw, -10.0, 10.0)
    live = (raw == d) & (k3_raw == k3)
    return k3, tl.where(live, 1.0 - e, 0.0)


@triton.jit
def _kl_term(logp, ref_logp, KL: tl.constexpr):
    """token_loss.h kl_term: (value, d value / d logp), without weight or coefficient."""
    diff = logp - ref_logp
    if KL == 1:  # k1
        value = diff
        grad = 1.0
    elif KL == 2:  # k2
        value = 0.5 * diff * diff
        grad = diff
    elif KL == 5:  # abs
        value = tl.abs(diff)
        grad = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
    elif KL == 3:  # k3
        value, grad = _k3_term(logp, ref_logp)
    elif KL == 4:  # k3+: value of k3, gradient of k2
        value, _ = _k3_term(logp, ref_logp)
        grad = diff
    else:
        value = 0.0
        grad = 0.0
    return value, grad


@triton.jit
def _token_loss(logp, entropy, old_logp, ref_logp, advantage, policy_weight, weight,
                clip_low, clip_high, dual_clip, delta, gppo_beta_low, gppo_beta_high,
                sapo_tau_pos, sapo_tau_neg, pspo_alpha, kl_coef, entropy_coef,
                POLICY: tl.constexpr, KL: tl.constexpr, CISPO_MODE: tl.constexpr):
    """token_loss.h token_loss: (weighted loss, g_logp, g_entropy)."""
    # Zero weights skip the math (tl.where never lets the skipped branch's NaN through), so
    # masked tokens never turn garbage inputs into NaN.
    t_value, t_grad = _policy_term(logp, old_logp, advantage, clip_low, clip_high, dual_clip,
                                   delta, gppo_beta_low, gppo_beta_high, sapo_tau_pos,
                                   sapo_tau_neg, pspo_alpha, POLICY, CISPO_MODE)
    use_policy = policy_weight != 0.0
    loss = tl.where(use_policy, 0.0 + policy_weight * t_value, 0.0)
    g_logp = tl.where(use_policy, 0.0 + policy_weight * t_grad, 0.0)
    use_weight = weight != 0.0
    if KL != 0:
        k_value, k_grad = _kl_term(logp, ref_logp, KL)
        use_kl = use_weight & (kl_coef != 0.0)
        loss = tl.where(use_kl, loss + weight * kl_coef * k_value, loss)
        g_logp = tl.where(use_kl, g_logp + weight * kl_coef * k_grad, g_logp)
    use_entropy = use_weight & (entropy_coef != 0.0)
    loss = tl.where(use_entropy, loss - weight * entropy_coef * entropy, loss)
    g_entropy = tl.where(use_entropy, 0.0 - weight * entropy_coef, 0.0)
    return loss, g_logp, g_entropy


@triton.jit
def _policy_loss_fused_kernel(
    logits_ptr, tokens_ptr, advantages_ptr, old_logp_ptr, ref_logp_ptr, policy_weight_ptr,
    weight_ptr, loss_ptr, logp_ptr, entropy_ptr, grad_ptr,
    inner, stride_outer, stride_inner, grad_inner, grad_stride_outer, grad_stride_inner,
    vocab, inv_temp,
    clip_low, clip_high, dual_clip, delta, gppo_beta_low, gppo_beta_high,
    sapo_tau_pos, sapo_tau_neg, pspo_alpha, kl_coef, entropy_coef,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
    POLICY: tl.constexpr, KL: tl.constexpr, CISPO_MODE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)
    grad_row = _row_ptr(grad_ptr, row, grad_inner, grad_stride_outer, grad_stride_inner)

    # 1. Row statistics (token_logprobs forward).
    row_max, log_sum, entropy = _row_stats(logits_row, vocab, inv_temp, BLOCK_V, VEC)
    lse = row_max + log_sum
    token = tl.load(tokens_ptr + row)
    logp = _token_logp(logits_row, token, vocab, inv_temp, row_max, log_sum)

    # 2. Per-token loss (token_loss.h).
    advantage = tl.load(advantages_ptr + row)
    old_logp = tl.load(old_logp_ptr + row)
    policy_weight = tl.load(policy_weight_ptr + row)
    weight = tl.load(weight_ptr + row)
    if KL != 0:
        ref_logp = tl.load(ref_logp_ptr + row)
    else:
        ref_logp = old_logp  # never used: ref_logp_ptr may be a dummy
    loss, g_logp, g_entropy = _token_loss(
        logp, entropy, old_logp, ref_logp, advantage, policy_weight, weight,
        clip_low, clip_high, dual_clip, delta, gppo_beta_low, gppo_beta_high,
        sapo_tau_pos, sapo_tau_neg, pspo_alpha, kl_coef, entropy_coef,
        POLICY, KL, CISPO_MODE)
    tl.store(loss_ptr + row, loss)
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)

    # 3. Row gradient (token_logprobs backward), written while the row is still in cache.
    # In place (grad_ptr == logits_ptr), no warp may overwrite z_y before every warp has read it
    # (each warp loads it for its own copy of logp after the statistics' last barrier).
    tl.debug_barrier()
    # No loss gradient (masked token, zero weights, clipped): zeros without re-reading the row.
    _write_grad_row(logits_row, grad_row, token, vocab, inv_temp, lse, g_logp, g_entropy, entropy, BLOCK_V)


def kernel_constexprs(params):
    """(POLICY, KL, CISPO_MODE) a launch with ``params`` specialises on.

    The KL kind is dropped when kl_coef == 0 (token_loss.h skips the term then) and the CISPO
    mode unless the policy is cispo, so equivalent configurations share one compiled kernel.
    """
    policy, kl, mode = int(params.policy), int(params.kl), int(params.cispo_mode)
    if not 0 <= policy < len(POLICY_NAMES):
        raise ValueError(f"params.policy must be in [0, {len(POLICY_NAMES)}), got {policy}")
    if not 0 <= kl < len(KL_NAMES):
        raise ValueError(f"params.kl must be in [0, {len(KL_NAMES)}), got {kl}")
    if not 0 <= mode < len(CISPO_MODE_NAMES):
        raise ValueError(f"params.cispo_mode must be in [0, {len(CISPO_MODE_NAMES)}), got {mode}")
    if float(params.kl_coef) == 0.0:
        kl = KL_NONE
    if policy != CISPO:
        mode = CISPO_TWO_SIDED
    return policy, kl, mode


def policy_loss_fused(logits, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp,
                      policy_weight, weight, params, loss, logp, entropy, grad_logits, grad_layout,
                      *, block_v=None):
    """Per-token weighted loss, logp, entropy (fp32 [rows]) and d loss / d logits in one pass.

    ``layout`` / ``grad_layout`` = (rows, inner, stride_outer, stride_inner) as in
    token_logprobs.py; ``logits`` and ``grad_logits`` are only base pointers, and
    ``grad_logits`` may be ``logits`` itself (same layout) for an in-place gradient. ``tokens``
    is contiguous int64 [rows]; ``advantages``, ``old_logp``, ``ref_logp``, ``policy_weight``
    and ``weight`` are contiguous fp32 [rows]. ``ref_logp`` may be None when the KL term is off
    (params.kl == 0 or params.kl_coef == 0); it is then never read. ``params`` is any object
    with the fields of token_loss.h's TokenLossParams (ints ``policy``, ``kl``,
    ``cispo_mode`` and the floats in FLOAT_PARAMS). ``block_v`` overrides the vocab chunk.
    """
    rows, inner, stride_outer, stride_inner = layout
    grad_rows, grad_inner, grad_stride_outer, grad_stride_inner = grad_layout
    assert grad_rows == rows, "layout and grad_layout must describe the same rows"
    policy, kl, mode = kernel_constexprs(params)
    if ref_logp is None:
        if kl != KL_NONE:
            raise ValueError("ref_logp is required when params.kl != 0 and params.kl_coef != 0")
        ref_logp = old_logp  # a dummy the kernel never reads
    if rows == 0:
        return
    block, num_warps = block_config(vocab, logits.device.type != "cpu", block_v)
    floats = [float(getattr(params, name)) for name in FLOAT_PARAMS]
    _policy_loss_fused_kernel[(rows,)](
        logits, tokens, advantages, old_logp, ref_logp, policy_weight, weight,
        loss, logp, entropy, grad_logits,
        inner, stride_outer, stride_inner, grad_inner, grad_stride_outer, grad_stride_inner,
        vocab, float(inv_temp), *floats,
        BLOCK_V=block, VEC=min(16 // logits.element_size(), block),
        POLICY=policy, KL=kl, CISPO_MODE=mode, num_warps=num_warps,
    )


def _aot_kernels():
    sig = {
        "logits_ptr": "*{dtype}", "tokens_ptr": "*i64", "advantages_ptr": "*fp32",
        "old_logp_ptr": "*fp32", "ref_logp_ptr": "*fp32", "policy_weight_ptr": "*fp32",
        "weight_ptr": "*fp32", "loss_ptr": "*fp32", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
        "grad_ptr": "*{dtype}",
        "inner": "i32", "stride_outer": "i64", "stride_inner": "i32",
        "grad_inner": "i32", "grad_stride_outer": "i64", "grad_stride_inner": "i32",
        "vocab": "i32", "inv_temp": "fp32",
        **{name: "fp32" for name in FLOAT_PARAMS},
        "BLOCK_V": "constexpr", "VEC": "constexpr",
        "POLICY": "constexpr", "KL": "constexpr", "CISPO_MODE": "constexpr",
    }
    aligned = ("logits_ptr", "tokens_ptr", "advantages_ptr", "old_logp_ptr", "ref_logp_ptr",
               "policy_weight_ptr", "weight_ptr", "loss_ptr", "logp_ptr", "entropy_ptr",
               "grad_ptr", "stride_outer", "stride_inner", "grad_stride_outer",
               "grad_stride_inner", "vocab")
    bytes_per = {"bf16": 2, "fp16": 2, "fp32": 4}
    block, num_warps = block_config(151936, on_gpu=True)
    # (dtype, aligned, policy, kl, cispo mode). The entropy bonus is a runtime scalar: every
    # entry compiles it. bf16 covers every policy kind and every KL kind at least once.
    variants = (
        ("bf16", True, PPO, KL_NONE, 0),
        ("bf16", True, GPPO, K3, 0),
        ("bf16", True, CISPO, K2, CISPO_TWO_SIDED),
        ("bf16", True, CISPO, KL_NONE, CISPO_CAP),
        ("bf16", True, SAPO, K1, 0),
        ("bf16", True, PSPO, K3_PLUS, 0),
        ("bf16", True, REINFORCE, KL_ABS, 0),
        ("fp16", True, PPO, KL_NONE, 0),
        ("fp16", True, GPPO, K3, 0),
        ("fp32", True, PPO, KL_NONE, 0),
        ("fp32", True, SAPO, K1, 0),
        ("bf16", False, PPO, KL_NONE, 0),
        ("bf16", False, GPPO, K3, 0),
    )
    entries = []
    for dtype, is_aligned, policy, kl, mode in variants:
        variant = f"{POLICY_NAMES[policy]}" + (f"-{CISPO_MODE_NAMES[mode]}" if policy == CISPO else "")
        tag = f"{dtype},{variant},{KL_NAMES[kl]}" + ("" if is_aligned else ",unaligned")
        entries.append(AotKernel(
            name=f"policy_loss_fused[{tag}]", fn=_policy_loss_fused_kernel,
            signature={k: v.format(dtype=dtype) for k, v in sig.items()},
            constexprs={"BLOCK_V": block, "VEC": 16 // bytes_per[dtype],
                        "POLICY": policy, "KL": kl, "CISPO_MODE": mode},
            num_warps=num_warps, aligned=aligned if is_aligned else ()))
    return entries


# Specialisations compiled by aot.py: the launcher's GPU configuration for large vocabularies.
AOT_KERNELS = _aot_kernels()
