"""Fused policy loss: one program per row computes the row statistics, the per-token loss and
the row's gradient, while the row is still in cache (docs/ARCHITECTURE.md "The two paths for a loss").

Per row (same row contract and conventions as token_logprobs.py):

1. statistics pass, exactly as the token_logprobs forward: lse, entropy H, logp = x_y - lse
   (NaN for an out-of-range token id, which is never loaded);
2. the per-token loss and its upstream gradients g_logp, g_H: a line-by-line port of
   ``policy_term``, ``kl_term`` and ``token_loss`` of csrc/include/rlfuse/token_loss.h
   (docs/SPEC.md sections 3 and 5), with the policy kind, the KL kind and the CISPO mode as
   constexprs so unused variants compile away;
3. gradient pass over the same row, exactly as the token_logprobs backward:
   g_j = p_j * (base + slope * log p_j) (+ target at j == y), every element written. A row with
   g_logp = g_H = 0 (masked token, zero weights, clipped) is written as zeros without reading
   the logits again, as the CPU and CUDA kernels do (csrc/include/rlfuse/kernels.h).

The gradient is that of the weighted per-token loss itself (upstream gradient 1); the autograd
backward only rescales it by grad_output (``rescale_rows_``: on CUDA without a host sync).

The enum values (``POLICY_KIND.sapo`` ...) and the float parameters (``TokenLossFloats``, one named
tuple argument) come from ``rlfuse._schema``: a new variant or knob adds no argument here.
"""

from collections import namedtuple

import triton
import triton.language as tl

from ._launch import AOT_VOCAB, aot_kernel, block_config, layout_signature, optional_rows, vec_width
from ._row import _row_or
from .token_logprobs import _row_ptr, _row_stats, _token_logp, _write_grad_row

try:  # installed as rlfuse.triton_kernels
    from .. import _schema
except ImportError:  # aot.py run from a checkout imports this folder as a top-level package
    from rlfuse import _schema


class _EnumConstants(tl.constexpr):
    """An enum of rlfuse._schema as one compile-time constant: in a kernel, ``POLICY_KIND.sapo`` is
    sapo's value (a name that is not an identifier spells "+" as "_plus": ``KL_KIND.k3_plus``)."""

    def __init__(self, enum):
        names = [name.replace("+", "_plus") for name in enum.names]
        super().__init__(namedtuple(enum.cname, names)(*range(len(enum))))

    def __getattr__(self, name):  # the interpreter runs kernels as Python: attribute access here
        if name.startswith("__"):
            raise AttributeError(name)
        return tl.constexpr(getattr(self.value, name))


POLICY_KIND = _EnumConstants(_schema.POLICY_KIND)
KL_KIND = _EnumConstants(_schema.KL_KIND)
CISPO_MODE = _EnumConstants(_schema.CISPO_MODE)

# The float fields of TokenLossParams, in schema order: the kernel takes them as one named tuple
# (``p.kl_coef`` in the per-token math); the enum fields are the constexprs POLICY, KL, MODE.
TokenLossFloats = namedtuple("TokenLossFloats", _schema.TOKEN_LOSS_FLOATS)


@triton.jit
def _clampf(v, lo, hi):
    # token_loss.h clampf: v < lo ? lo : (v > hi ? hi : v); NaN passes through.
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _clamped_log_ratio(logp, old_logp):
    """token_loss.h clamped_log_ratio: (l, dl / dlogp); a clamp that bites zeroes the token's gradient
    (verl convention)."""
    raw_log_ratio = logp - old_logp
    log_ratio = _clampf(raw_log_ratio, -20.0, 20.0)
    return log_ratio, tl.where(raw_log_ratio == log_ratio, 1.0, 0.0)


@triton.jit
def _policy_term(logp, old_logp, a, p, bounds, POLICY: tl.constexpr, MODE: tl.constexpr):
    """token_loss.h policy_term: (value, d value / d logp), unweighted; ``p``: TokenLossFloats,
    ``bounds``: the row's (clip_low, clip_high, dual_clip), which replace p's (``_row_bounds``)."""
    clip_low, clip_high, dual_clip = bounds
    log_ratio, log_ratio_grad = _clamped_log_ratio(logp, old_logp)
    r = tl.exp(log_ratio)
    dr = r * log_ratio_grad  # d r / d logp

    if POLICY == POLICY_KIND.reinforce:
        value = -a * logp
        grad = -a
    elif POLICY == POLICY_KIND.pspo:
        value = -a * ((1.0 - p.pspo_alpha) * r + p.pspo_alpha)
        grad = -a * (1.0 - p.pspo_alpha) * dr
    elif POLICY == POLICY_KIND.spo:  # -(A r - |A| (r - 1)^2 / (2 eps)), eps = clip_high
        d = r - 1.0
        value = -(a * r - tl.abs(a) * d * d / (2.0 * clip_high))
        grad = -(a - tl.abs(a) * d / clip_high) * dr
    elif POLICY == POLICY_KIND.cpgd:  # -min(A l, A clip(l, log(1 - eps_low), log(1 + eps_high)))
        # log(1 + x), not log1p (no interpreter port): within an ulp of it for eps of O(0.1).
        log_low = tl.log(1.0 - clip_low)
        log_high = tl.log(1.0 + clip_high)
        # Strict, as the ratio clip: a log-ratio exactly on a bound is unclipped and keeps its gradient.
        clipped_high = (a > 0.0) & (log_ratio > log_high)
        clipped_low = (a < 0.0) & (log_ratio < log_low)
        value = tl.where(clipped_high, -a * log_high, tl.where(clipped_low, -a * log_low, -a * log_ratio))
        grad = tl.where(clipped_high | clipped_low, 0.0, -a * log_ratio_grad)
    elif POLICY == POLICY_KIND.sapo:
        tau = tl.where(a > 0.0, p.sapo_tau_pos, p.sapo_tau_neg)
        s = 1.0 / (1.0 + tl.exp(-tau * (r - 1.0)))
        value = -a * (4.0 / tau) * s
        grad = -a * 4.0 * s * (1.0 - s) * dr
    elif POLICY == POLICY_KIND.cispo:
        if MODE == CISPO_MODE.cap:
            w = tl.where(r < clip_high, r, clip_high)
        else:
            upper = 1.0 + clip_high
            w = tl.where(r < upper, r, upper)
            if MODE == CISPO_MODE.two_sided:  # clip_low < 0 means no lower bound
                lower = 1.0 - clip_low
                w = tl.where(clip_low >= 0.0, tl.where(w > lower, w, lower), w)
        value = -w * a * logp  # w is detached
        grad = -w * a
    else:  # ppo / gppo
        # delta (two-sided PPO) first caps r; a cap that bites stops the gradient.
        capped = (p.delta > 0.0) & (r > p.delta)
        r = tl.where(capped, p.delta, r)
        dr = tl.where(capped, 0.0, dr)
        low = 1.0 - clip_low
        high = 1.0 + clip_high
        # Strict inequalities: a ratio exactly on a boundary is unclipped and keeps its gradient.
        clipped_high = (a > 0.0) & (r > high)
        clipped_low = (a < 0.0) & (r < low)
        value = -a * r
        grad = -a * dr
        if POLICY == POLICY_KIND.gppo:  # bounded gradient on clipped tokens, gated like dr (1, or 0)
            gate = dr / r
            grad_high = -p.gppo_beta_high * high * a * gate
            grad_low = -p.gppo_beta_low * low * a * gate
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
    if KL == KL_KIND.k1:
        value = diff
        grad = 1.0
    elif KL == KL_KIND.k2:
        value = 0.5 * diff * diff
        grad = diff
    elif KL == KL_KIND.abs:
        value = tl.abs(diff)
        grad = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
    elif KL == KL_KIND.k3:
        value, grad = _k3_term(logp, ref_logp)
    elif KL == KL_KIND.k3_plus:  # value of k3, gradient of k2
        value, _ = _k3_term(logp, ref_logp)
        grad = diff
    else:
        value = 0.0
        grad = 0.0
    return value, grad


@triton.jit
def _cpgd_drift(logp, old_logp, cap):
    """token_loss.h cpgd_drift: (r - 1 - l, min(r - 1, cap) dl / dlogp), without coefficient."""
    log_ratio, log_ratio_grad = _clamped_log_ratio(logp, old_logp)
    excess = tl.exp(log_ratio) - 1.0  # r - 1
    return excess - log_ratio, tl.where(excess > cap, cap, excess) * log_ratio_grad


@triton.jit
def _token_loss(logp, entropy, old_logp, ref_logp, advantage, policy_weight, weight, p, bounds,
                POLICY: tl.constexpr, KL: tl.constexpr, MODE: tl.constexpr):
    """token_loss.h token_loss: (weighted loss, g_logp, g_entropy); ``bounds`` as in _policy_term."""
    # Zero weights skip the math (tl.where never lets the skipped branch's NaN through), so
    # masked tokens never turn garbage inputs into NaN.
    t_value, t_grad = _policy_term(logp, old_logp, advantage, p, bounds, POLICY, MODE)
    use_policy = policy_weight != 0.0
    loss = tl.where(use_policy, 0.0 + policy_weight * t_value, 0.0)
    g_logp = tl.where(use_policy, 0.0 + policy_weight * t_grad, 0.0)
    use_weight = weight != 0.0  # penalties: the aggregation weight, no rollout factor
    if POLICY == POLICY_KIND.cpgd:
        d_value, d_grad = _cpgd_drift(logp, old_logp, p.cpgd_drift_cap)
        use_drift = use_weight & (p.cpgd_drift_coef != 0.0)
        loss = tl.where(use_drift, loss + weight * p.cpgd_drift_coef * d_value, loss)
        g_logp = tl.where(use_drift, g_logp + weight * p.cpgd_drift_coef * d_grad, g_logp)
    if KL != KL_KIND.none:
        k_value, k_grad = _kl_term(logp, ref_logp, KL)
        use_kl = use_weight & (p.kl_coef != 0.0)
        loss = tl.where(use_kl, loss + weight * p.kl_coef * k_value, loss)
        g_logp = tl.where(use_kl, g_logp + weight * p.kl_coef * k_grad, g_logp)
    use_entropy = use_weight & (p.entropy_coef != 0.0)
    loss = tl.where(use_entropy, loss - weight * p.entropy_coef * entropy, loss)
    g_entropy = tl.where(use_entropy, 0.0 - weight * p.entropy_coef, 0.0)
    return loss, g_logp, g_entropy


@triton.jit
def _row_bounds(p, row, clip_low_ptr, clip_high_ptr, dual_clip_ptr,
                HAS_CLIP_LOW: tl.constexpr, HAS_CLIP_HIGH: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr):
    """The row's (clip_low, clip_high, dual_clip): token_loss.h row_params, p's unless per-token given."""
    return (_row_or(clip_low_ptr, row, p.clip_low, HAS_CLIP_LOW),
            _row_or(clip_high_ptr, row, p.clip_high, HAS_CLIP_HIGH),
            _row_or(dual_clip_ptr, row, p.dual_clip, HAS_DUAL_CLIP))


@triton.jit
def _policy_loss_fused_kernel(
    logits_ptr, tokens_ptr, advantages_ptr, old_logp_ptr, ref_logp_ptr, policy_weight_ptr,
    weight_ptr, loss_ptr, logp_ptr, entropy_ptr, grad_ptr,
    inv_temps_ptr, clip_low_ptr, clip_high_ptr, dual_clip_ptr,
    inner, stride_outer, stride_inner, grad_inner, grad_stride_outer, grad_stride_inner,
    vocab, inv_temp, params,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
    POLICY: tl.constexpr, KL: tl.constexpr, MODE: tl.constexpr,
    HAS_ROW_TEMP: tl.constexpr, HAS_CLIP_LOW: tl.constexpr, HAS_CLIP_HIGH: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)
    grad_row = _row_ptr(grad_ptr, row, grad_inner, grad_stride_outer, grad_stride_inner)
    inv_temp = _row_or(inv_temps_ptr, row, inv_temp, HAS_ROW_TEMP)

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
    if KL != KL_KIND.none:
        ref_logp = tl.load(ref_logp_ptr + row)
    else:
        ref_logp = old_logp  # never used: ref_logp_ptr may be a dummy
    bounds = _row_bounds(params, row, clip_low_ptr, clip_high_ptr, dual_clip_ptr,
                         HAS_CLIP_LOW, HAS_CLIP_HIGH, HAS_DUAL_CLIP)
    loss, g_logp, g_entropy = _token_loss(
        logp, entropy, old_logp, ref_logp, advantage, policy_weight, weight, params, bounds, POLICY, KL, MODE)
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
    """(POLICY, KL, MODE) a launch with ``params`` specialises on.

    The KL kind is dropped when kl_coef == 0 (token_loss.h skips the term then) and the CISPO
    mode unless the policy is cispo, so equivalent configurations share one compiled kernel.
    """
    for field in _schema.TOKEN_LOSS_PARAMS.fields:
        if field.enum is not None:
            size, value = len(_schema.enum(field.enum)), int(getattr(params, field.name))
            if not 0 <= value < size:
                raise ValueError(f"params.{field.name} must be in [0, {size}), got {value}")
    policy, kl, mode = int(params.policy), int(params.kl), int(params.cispo_mode)
    if float(params.kl_coef) == 0.0:
        kl = _schema.KL_KIND["none"]
    if policy != _schema.POLICY_KIND["cispo"]:
        mode = _schema.CISPO_MODE["two_sided"]
    return policy, kl, mode


def policy_loss_fused(logits, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp,
                      policy_weight, weight, params, loss, logp, entropy, grad_logits, grad_layout,
                      inv_temps=None, clip_low_rows=None, clip_high_rows=None, dual_clip_rows=None, *, block_v=None):
    """Per-token weighted loss, logp, entropy (fp32 [rows]) and d loss / d logits in one pass.

    ``layout`` / ``grad_layout`` = (rows, inner, stride_outer, stride_inner) as in
    token_logprobs.py; ``logits`` and ``grad_logits`` are only base pointers, and
    ``grad_logits`` may be ``logits`` itself (same layout) for an in-place gradient. ``tokens``
    is contiguous int64 [rows]; ``advantages``, ``old_logp``, ``ref_logp``, ``policy_weight``
    and ``weight`` are contiguous fp32 [rows]. ``ref_logp`` may be None when the KL term is off
    (params.kl == 0 or params.kl_coef == 0); it is then never read. ``params`` is any object
    with the fields of TokenLossParams (rlfuse._schema). ``block_v`` overrides the vocab chunk.
    Optional contiguous fp32 [rows]: ``inv_temps`` (per-row inv_temp) and ``clip_low_rows``,
    ``clip_high_rows``, ``dual_clip_rows`` (per-token params.clip_low, clip_high, dual_clip).
    """
    rows, inner, stride_outer, stride_inner = layout
    grad_rows, grad_inner, grad_stride_outer, grad_stride_inner = grad_layout
    assert grad_rows == rows, "layout and grad_layout must describe the same rows"
    policy, kl, mode = kernel_constexprs(params)
    if ref_logp is None:
        if kl != _schema.KL_KIND["none"]:
            raise ValueError("ref_logp is required when params.kl != 0 and params.kl_coef != 0")
        ref_logp = old_logp  # a dummy the kernel never reads
    if rows == 0:
        return
    block, num_warps = block_config(vocab, logits.device.type != "cpu", block_v)
    floats = TokenLossFloats(*[float(getattr(params, name)) for name in TokenLossFloats._fields])
    inv_temps, has_row_temp = optional_rows(inv_temps, loss)
    clip_low_rows, has_clip_low = optional_rows(clip_low_rows, loss)
    clip_high_rows, has_clip_high = optional_rows(clip_high_rows, loss)
    dual_clip_rows, has_dual_clip = optional_rows(dual_clip_rows, loss)
    _policy_loss_fused_kernel[(rows,)](
        logits, tokens, advantages, old_logp, ref_logp, policy_weight, weight,
        loss, logp, entropy, grad_logits, inv_temps, clip_low_rows, clip_high_rows, dual_clip_rows,
        inner, stride_outer, stride_inner, grad_inner, grad_stride_outer, grad_stride_inner,
        vocab, float(inv_temp), floats,
        BLOCK_V=block, VEC=min(16 // logits.element_size(), block),
        POLICY=policy, KL=kl, MODE=mode, HAS_ROW_TEMP=has_row_temp, HAS_CLIP_LOW=has_clip_low,
        HAS_CLIP_HIGH=has_clip_high, HAS_DUAL_CLIP=has_dual_clip, num_warps=num_warps,
    )


# --- backward: rescaling the saved gradient without a host synchronisation ----------------------

@triton.jit
def _rescale_rows_kernel(grad_ptr, upstream_ptr, applied_ptr, inner, stride_outer, stride_inner, vocab,
                         BLOCK_V: tl.constexpr):
    """grad *= upstream / applied for one chunk of one row; nothing read or written when equal.

    A gradient that carries 0 or a non-finite factor cannot be rescaled: it becomes NaN.
    """
    upstream = tl.load(upstream_ptr)
    applied = tl.load(applied_ptr)
    recoverable = (applied != 0.0) & (tl.abs(applied) < float("inf"))
    factor = tl.where(upstream == applied, 1.0, tl.where(recoverable, upstream / applied, float("nan")))
    if factor != 1.0:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        ptrs = _row_ptr(grad_ptr, row, inner, stride_outer, stride_inner) + cols
        mask = cols < vocab
        g = tl.load(ptrs, mask=mask).to(tl.float32)
        tl.store(ptrs, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


def rescale_rows_(grad, layout, vocab, upstream, applied, *, block_v=None):
    """In place, rows of ``grad`` (``layout``, as above) times upstream / applied (fp32 device
    scalars); one launch that reads and writes nothing when the two are equal."""
    rows, inner, stride_outer, stride_inner = layout
    if rows == 0 or vocab == 0:
        return
    block, num_warps = block_config(vocab, grad.device.type != "cpu", block_v)
    _rescale_rows_kernel[(rows, triton.cdiv(vocab, block))](
        grad, upstream, applied, inner, stride_outer, stride_inner, vocab, BLOCK_V=block, num_warps=num_warps)


def _aot_kernels():
    sig = {
        "logits_ptr": "*{dtype}", "tokens_ptr": "*i64", "advantages_ptr": "*fp32",
        "old_logp_ptr": "*fp32", "ref_logp_ptr": "*fp32", "policy_weight_ptr": "*fp32",
        "weight_ptr": "*fp32", "loss_ptr": "*fp32", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
        "grad_ptr": "*{dtype}",
        "inv_temps_ptr": "*fp32", "clip_low_ptr": "*fp32", "clip_high_ptr": "*fp32", "dual_clip_ptr": "*fp32",
        **layout_signature("", "grad_"), "vocab": "i32", "inv_temp": "fp32",
        "params": TokenLossFloats(*["fp32"] * len(TokenLossFloats._fields)),
        "BLOCK_V": "constexpr", "VEC": "constexpr",
        "POLICY": "constexpr", "KL": "constexpr", "MODE": "constexpr",
        "HAS_ROW_TEMP": "constexpr", "HAS_CLIP_LOW": "constexpr", "HAS_CLIP_HIGH": "constexpr",
        "HAS_DUAL_CLIP": "constexpr",
    }
    row_flags = ("HAS_ROW_TEMP", "HAS_CLIP_LOW", "HAS_CLIP_HIGH", "HAS_DUAL_CLIP")
    block, num_warps = block_config(AOT_VOCAB, on_gpu=True)
    # (dtype, aligned, policy, kl, cispo mode, per-row inputs). The entropy bonus is a runtime
    # scalar: every entry compiles it. bf16 covers every policy kind (every CISPO mode) of the
    # schema, the KL kinds taken in turn so that each is compiled at least once.
    policies = [(policy, mode) for policy in _schema.POLICY_KIND.names
                for mode in (_schema.CISPO_MODE.names if policy == "cispo" else ("two_sided",))]
    kl_names = _schema.KL_KIND.names
    variants = [("bf16", True, policy, kl_names[i % len(kl_names)], mode, False)
                for i, (policy, mode) in enumerate(policies)]
    variants += [
        ("fp16", True, "ppo", "none", "two_sided", False),
        ("fp16", True, "gppo", "k3", "two_sided", False),
        ("fp32", True, "ppo", "none", "two_sided", False),
        ("fp32", True, "sapo", "k1", "two_sided", False),
        ("bf16", False, "ppo", "none", "two_sided", False),
        ("bf16", False, "gppo", "k3", "two_sided", False),
        # Per-token temperature and clip bounds (every optional input given).
        ("bf16", True, "ppo", "k3", "two_sided", True),
    ]
    entries = []
    for dtype, is_aligned, policy, kl, mode, row_inputs in variants:
        variant = policy + (f"-{mode}" if policy == "cispo" else "")
        tag = f"{dtype},{variant},{kl}" + ("" if is_aligned else ",unaligned") + (",rows" if row_inputs else "")
        entries.append(aot_kernel(
            f"policy_loss_fused[{tag}]", _policy_loss_fused_kernel, sig, dtype, is_aligned, num_warps,
            {"BLOCK_V": block, "VEC": vec_width(dtype), "POLICY": _schema.POLICY_KIND[policy],
             "KL": _schema.KL_KIND[kl], "MODE": _schema.CISPO_MODE[mode], **dict.fromkeys(row_flags, row_inputs)}))
    rescale_sig = {"grad_ptr": "*{dtype}", "upstream_ptr": "*fp32", "applied_ptr": "*fp32", **layout_signature(""),
                   "vocab": "i32", "BLOCK_V": "constexpr"}
    for dtype in ("bf16", "fp16", "fp32"):
        entries.append(aot_kernel(f"rescale_rows[{dtype}]", _rescale_rows_kernel, rescale_sig, dtype, True, num_warps,
                                  {"BLOCK_V": block}))
    return entries


# Specialisations compiled by aot.py: the launcher's GPU configuration for large vocabularies.
AOT_KERNELS = _aot_kernels()
