"""Fused TROLL (schema.h TrollArgs, docs/SPEC.md section 7): one program per row, the port of
csrc/cpu/troll_rows.cpp and csrc/include/rlfuse/troll_math.h.

Per row:

1. one read of the row for the statistics (lse, entropy, logp; _row.py's lane-wise online pass)
   and the new policy's top K (row_topk.py's int64 keys: a running sorted buffer merged with each
   chunk's top K);
2. the support on two power-of-two segments instead of one sorted list: A = the old kept ids
   (``old_k`` slots) then the chosen token y (slot ``old_k``), B = the new top K. Priority as in
   the CPU kernel: y, then the old ids (a repeat of y or of an earlier old slot is dropped), then
   the new kept ids (those while the mass before them is < 1 - threshold, dropped when already in
   A). Old log-probs: old_logprobs for y, the stored value for old ids, log(1e-12) for new ones;
3. the projection and its implicit gradient on the support in float64 (troll_math.h line by line:
   a safeguarded Newton in s = 1 / (1 + eta), a while loop that stops when the row converges, at
   most 32 steps; e^a and the last Newton exponentials reused);
4. the KL / entropy penalties (policy_loss.py ``_token_loss`` with the policy weight 0);
5. the gradient: zeros, or with a penalty the dense row gradient of SPEC section 2, written over
   the row; then (after a barrier) each support entry rewritten with its dense part plus the
   TROLL gradient (ids are distinct: no two programs' threads store to one element). Every logit
   the row needs is read before the first store, so ``grad_logits`` may be ``logits``.
"""

import triton
import triton.language as tl

from ._launch import AOT_VOCAB, aot_kernel, block_config, layout_signature, optional_rows, vec_width
from ._row import FLT_MAX, _combine, _online, _row_or, _row_ptr, _token_logp
from .policy_loss import KL_KIND, TokenLossFloats, _token_loss, kernel_constexprs
from .row_topk import SENTINEL, _decode_key, _sort_key
from .token_logprobs import _dense_grad, _grad_coeffs

try:  # installed as rlfuse.triton_kernels
    from .. import _schema
except ImportError:  # aot.py run from a checkout imports this folder as a top-level package
    from rlfuse import _schema

IMPLEMENTED = True
LOG_FLOOR = tl.constexpr(-27.631021115928547)  # log(1e-12), troll_math.h kTrollLogFloor
NEWTON_STEPS = tl.constexpr(32)
TOLERANCE = tl.constexpr(1e-10)
ABS_TOLERANCE = tl.constexpr(1e-13)


@triton.jit
def _sum2(u, v):
    return tl.sum(u, axis=0) + tl.sum(v, axis=0)


@triton.jit
def _max2(u, v):
    return tl.maximum(tl.max(u, axis=0), tl.max(v, axis=0))


@triton.jit
def _troll_kernel(
    logits_ptr, tokens_ptr, advantages_ptr, old_logp_ptr, ref_logp_ptr, policy_weight_ptr, weight_ptr,
    old_ids_ptr, old_logprobs_ptr,
    loss_ptr, logp_ptr, entropy_ptr, eta_ptr, kl_before_ptr, kl_after_ptr, support_ptr, grad_ptr, inv_temps_ptr,
    inner, stride_outer, stride_inner, grad_inner, grad_stride_outer, grad_stride_inner,
    vocab, inv_temp, old_k, k, keep_below, eps, alpha, params,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, K: tl.constexpr, OA: tl.constexpr, OK: tl.constexpr,
    POLICY: tl.constexpr, KL: tl.constexpr, MODE: tl.constexpr, HAS_ROW_TEMP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)
    grad_row = _row_ptr(grad_ptr, row, grad_inner, grad_stride_outer, grad_stride_inner)
    inv_temp = _row_or(inv_temps_ptr, row, inv_temp, HAS_ROW_TEMP)

    # 1. One read of the row: lane-wise online statistics and the running top K (row_topk.py).
    LANES: tl.constexpr = BLOCK_V // VEC
    cols = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    m = tl.full([LANES], -FLT_MAX, tl.float32)
    s = tl.zeros([LANES], tl.float32)
    dot = tl.zeros([LANES], tl.float32)
    top = tl.full([K], SENTINEL, tl.int64)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        z = tl.load(logits_row + offs, mask=offs < vocab, other=float("-inf"))
        x = z.to(tl.float32) * inv_temp
        m, s, dot = _online(m, s, dot, x, x, True)
        key = _sort_key(tl.reshape(x, [BLOCK_V]), tl.reshape(offs, [BLOCK_V]))
        if tl.max(key, axis=0) > tl.min(top, axis=0):
            chunk_top = tl.topk(key, K)
            top = tl.bitonic_merge(tl.maximum(top, tl.flip(chunk_top)), descending=True)
    row_max, sum_exp, sum_dot = _combine(m, s, dot, True)
    log_sum = tl.log(sum_exp)
    entropy = log_sum - sum_dot / sum_exp
    lse = row_max + log_sum
    token = tl.load(tokens_ptr + row)
    logp = _token_logp(logits_row, token, vocab, inv_temp, row_max, log_sum)

    advantage = tl.load(advantages_ptr + row).to(tl.float64)
    policy_weight = tl.load(policy_weight_ptr + row)
    weight = tl.load(weight_ptr + row)
    masked = (policy_weight == 0.0) & (weight == 0.0)
    # (A vector: under the interpreter a scalar bool & a bool vector comes out int32.)
    weights = tl.abs(policy_weight) + tl.abs(weight)

    # 2. The support. Segment A: old slots [0, old_k), y at slot old_k.
    slot_a = tl.arange(0, OA)
    is_old = slot_a < old_k
    is_y = slot_a == old_k
    y_valid = (token >= 0) & (token < vocab)
    old_base = row * old_k
    ids_a32 = tl.load(old_ids_ptr + old_base + slot_a, mask=is_old, other=-1)
    ids_a32 = tl.where(is_y, token.to(tl.int32), ids_a32)
    ids_a = ids_a32.to(tl.int64)
    in_range_a = (ids_a >= 0) & (ids_a < vocab)
    # An old slot repeating y or an earlier old slot is dropped (y, then the first copy, win); the
    # comparisons on int32 ids against the [OK] old slots only (register pressure).
    slot_o = tl.arange(0, OK)
    ids_o = tl.load(old_ids_ptr + old_base + slot_o, mask=slot_o < old_k, other=-1)
    earlier = (slot_o[None, :] < slot_a[:, None]) & (slot_o < old_k)[None, :]
    first = tl.max(((ids_a32[:, None] == ids_o[None, :]) & earlier).to(tl.int32), axis=1) == 0
    keep_a = first & (ids_a != token)
    keep_a = is_y | keep_a
    valid_a = in_range_a & keep_a
    valid_a = valid_a & ((tl.zeros([OA], tl.float32) + weights) != 0.0)
    z_a = tl.load(logits_row + tl.where(valid_a, ids_a, 0), mask=valid_a, other=float("-inf"))
    x_a = z_a.to(tl.float32) * inv_temp
    old_lp = tl.load(old_logprobs_ptr + old_base + slot_a, mask=is_old, other=0.0)
    b_a = tl.where(is_y, tl.load(old_logp_ptr + row), old_lp).to(tl.float64)
    # Segment B: the new top K while the mass before them is < 1 - threshold, at most k of them.
    ids_b32, x_b = _decode_key(top)
    ids_b = ids_b32.to(tl.int64)
    slot_b = tl.arange(0, K)
    p_b = tl.exp(x_b.to(tl.float64) - lse.to(tl.float64))
    p_b = tl.where(ids_b >= 0, p_b, 0.0)
    before = tl.cumsum(p_b, axis=0) - p_b
    # (The first is always kept, as in the CPU kernel's loop, also when lse is NaN.)
    kept = (ids_b >= 0) & (slot_b < k) & ((before < keep_below) | (slot_b == 0))
    new = tl.max(((ids_b32[:, None] == ids_a32[None, :]) & valid_a[None, :]).to(tl.int32), axis=1) == 0
    valid_b = kept & new & ((tl.zeros([K], tl.float32) + weights) != 0.0)
    b_b = tl.full([K], LOG_FLOOR, tl.float64)

    # 3. The projection on the support, float64 (troll_math.h troll_on_support).
    xa = tl.where(valid_a, x_a, float("-inf")).to(tl.float64)
    xb = tl.where(valid_b, x_b, float("-inf")).to(tl.float64)
    live_a = valid_a & ((xa > float("-inf")) | (xa != xa))
    live_b = valid_b & ((xb > float("-inf")) | (xb != xb))
    ma = _max2(tl.where(live_a, xa, float("-inf")), tl.where(live_b, xb, float("-inf")))
    ea_a = tl.where(live_a, tl.exp(xa - ma), 0.0)
    ea_b = tl.where(live_b, tl.exp(xb - ma), 0.0)
    total_a = _sum2(ea_a, ea_b)
    lse_a = ma + tl.log(total_a)
    a_a = tl.where(live_a, xa - lse_a, float("-inf"))
    a_b = tl.where(live_b, xb - lse_a, float("-inf"))
    ea_a = tl.where(live_a, ea_a / total_a, 0.0)
    ea_b = tl.where(live_b, ea_b / total_a, 0.0)
    mb = _max2(tl.where(valid_a, b_a, float("-inf")), tl.where(valid_b, b_b, float("-inf")))
    lse_b = mb + tl.log(_sum2(tl.where(valid_a, tl.exp(b_a - mb), 0.0),
                              tl.where(valid_b, tl.exp(b_b - mb), 0.0)))
    b_a = tl.where(valid_a, b_a - lse_b, float("-inf"))
    b_b = tl.where(valid_b, b_b - lse_b, float("-inf"))
    d_a = tl.where(live_a, a_a - b_a, 0.0)
    d_b = tl.where(live_b, a_b - b_b, 0.0)
    kl_before = _sum2(tl.where(live_a, ea_a * d_a, 0.0), tl.where(live_b, ea_b * d_b, 0.0))

    tolerance = tl.maximum(TOLERANCE * eps, ABS_TOLERANCE)
    # Step 0 at s = 1, where q = a: mean KL(a || b), residual KL(a || b) - eps.
    s_val = tl.full([], 1.0, tl.float64)
    variance = _sum2(tl.where(live_a, ea_a * (d_a - kl_before) * (d_a - kl_before), 0.0),
                     tl.where(live_b, ea_b * (d_b - kl_before) * (d_b - kl_before), 0.0))
    residual = kl_before - eps
    active = residual > 0.0
    s_low = s_val * 0.0
    s_high = s_val
    moving = active & (tl.abs(residual) > tolerance)
    newton = s_val - residual / tl.maximum(s_val * variance, 1e-300)
    s_val = tl.where(moving, tl.where((newton >= s_low) & (newton <= s_high), newton, 0.5 * (s_low + s_high)), s_val)
    s_cached = s_val * 0.0 - 1.0
    top_cached = s_val * 0.0
    total_cached = s_val * 0.0 + 1.0
    e_a = ea_a
    e_b = ea_b
    step = 1
    while moving & (step < NEWTON_STEPS):
        w_a = tl.where(live_a, b_a + s_val * d_a, float("-inf"))
        w_b = tl.where(live_b, b_b + s_val * d_b, float("-inf"))
        top_w = _max2(w_a, w_b)
        e_a = tl.where(live_a, tl.exp(w_a - top_w), 0.0)
        e_b = tl.where(live_b, tl.exp(w_b - top_w), 0.0)
        total = _sum2(e_a, e_b)
        mean = _sum2(e_a * d_a, e_b * d_b) / total
        variance = _sum2(e_a * (d_a - mean) * (d_a - mean), e_b * (d_b - mean) * (d_b - mean)) / total
        residual = s_val * mean - (top_w + tl.log(total)) - eps
        s_cached = s_val
        top_cached = top_w
        total_cached = total
        s_low = tl.where(residual <= 0.0, s_val, s_low)
        s_high = tl.where(residual > 0.0, s_val, s_high)
        moving = tl.abs(residual) > tolerance
        newton = s_val - residual / tl.maximum(s_val * variance, 1e-300)
        s_next = tl.where((newton >= s_low) & (newton <= s_high), newton, 0.5 * (s_low + s_high))
        s_val = tl.where(moving, s_next, s_val)
        step += 1
    eta = tl.where(active, 1.0 / s_val - 1.0, 0.0)
    # log q and q: a itself when not projected; from the last Newton exponentials when they were
    # taken at the final s; else log_softmax(b + s d) afresh.
    if active & (s_val == s_cached):
        shift = top_cached + tl.log(total_cached)
        q_a = tl.where(live_a, e_a / total_cached, 0.0)
        q_b = tl.where(live_b, e_b / total_cached, 0.0)
        lq_a = tl.where(live_a, b_a + s_val * d_a - shift, float("-inf"))
        lq_b = tl.where(live_b, b_b + s_val * d_b - shift, float("-inf"))
    elif active:
        w_a = tl.where(live_a, b_a + s_val * d_a, float("-inf"))
        w_b = tl.where(live_b, b_b + s_val * d_b, float("-inf"))
        top_w = _max2(w_a, w_b)
        shift = top_w + tl.log(_sum2(tl.where(live_a, tl.exp(w_a - top_w), 0.0),
                                     tl.where(live_b, tl.exp(w_b - top_w), 0.0)))
        lq_a = tl.where(live_a, w_a - shift, float("-inf"))
        lq_b = tl.where(live_b, w_b - shift, float("-inf"))
        q_a = tl.where(live_a, tl.exp(lq_a), 0.0)
        q_b = tl.where(live_b, tl.exp(lq_b), 0.0)
    else:
        lq_a = a_a
        lq_b = a_b
        q_a = ea_a
        q_b = ea_b
    kl_after = _sum2(tl.where(live_a, q_a * (lq_a - b_a), 0.0), tl.where(live_b, q_b * (lq_b - b_b), 0.0))
    trust = _sum2(tl.where(live_a, ea_a * (a_a - lq_a), 0.0), tl.where(live_b, ea_b * (a_b - lq_b), 0.0))
    dbar = _sum2(tl.where(live_a, q_a * d_a, 0.0), tl.where(live_b, q_b * d_b, 0.0))
    at_y = is_y & valid_a
    # exp(log q_y - b_y) (0 for a dead y; NaN without a valid y).
    lq_y = tl.sum(tl.where(at_y, lq_a, 0.0), axis=0)
    b_y = tl.sum(tl.where(at_y, b_a, 0.0), axis=0)
    ratio = tl.where(y_valid, tl.exp(lq_y - b_y), float("nan"))
    troll_loss = -advantage * ratio + alpha * trust
    gy = -advantage * ratio
    c_a = tl.where(live_a, d_a - dbar, 0.0)
    c_b = tl.where(live_b, d_b - dbar, 0.0)
    variance = _sum2(q_a * c_a * c_a, q_b * c_b * c_b)
    inv = 1.0 / (1.0 + eta)
    implicit = (eta > 0.0) & (variance > 0.0) & (gy != 0.0)
    d_y = tl.sum(tl.where(at_y & live_a, c_a, 0.0), axis=0)
    h = tl.where(implicit, gy * d_y / variance, 0.0)
    g_a = (tl.where(at_y, gy, 0.0) - q_a * gy - tl.where(implicit, q_a * c_a * h, 0.0)) * inv
    g_a = tl.where(live_a, g_a + alpha * ea_a * (a_a - lq_a), 0.0)
    g_b = (0.0 - q_b * gy - tl.where(implicit, q_b * c_b * h, 0.0)) * inv
    g_b = tl.where(live_b, g_b + alpha * ea_b * (a_b - lq_b), 0.0)
    g_total = _sum2(g_a, g_b)
    g_a = tl.where(live_a, g_a - ea_a * g_total, 0.0)
    g_b = tl.where(live_b, g_b - ea_b * g_total, 0.0)

    # 4. The penalties (KL to the reference, entropy bonus) as the fused policy loss has them.
    if KL != KL_KIND.none:
        ref_logp = tl.load(ref_logp_ptr + row)
    else:
        ref_logp = logp
    zero = tl.full([], 0.0, tl.float32)
    bounds = (params.clip_low, params.clip_high, params.dual_clip)  # unused: policy weight 0
    pen_loss, g_logp, g_entropy = _token_loss(logp, entropy, zero, ref_logp, zero, zero, weight, params, bounds,
                                              POLICY, KL, MODE)
    use_policy = policy_weight != 0.0
    row_loss = tl.where(use_policy, policy_weight * troll_loss.to(tl.float32), 0.0) + pen_loss
    support = _sum2(valid_a.to(tl.float32), valid_b.to(tl.float32))
    tl.store(loss_ptr + row, row_loss)
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(eta_ptr + row, tl.where(masked, 0.0, eta.to(tl.float32)))
    tl.store(kl_before_ptr + row, tl.where(masked, 0.0, kl_before.to(tl.float32)))
    tl.store(kl_after_ptr + row, tl.where(masked, 0.0, kl_after.to(tl.float32)))
    tl.store(support_ptr + row, tl.where(masked, 0.0, support))
    scale = policy_weight.to(tl.float64) * inv_temp
    sparse_a = tl.where(use_policy, (scale * g_a).to(tl.float32), 0.0)
    sparse_b = tl.where(use_policy, (scale * g_b).to(tl.float32), 0.0)

    # 5. The gradient. Every logit this row needs has been read: no warp may store before all have.
    tl.debug_barrier()
    dense = (g_logp != 0.0) | (g_entropy != 0.0)
    target, base, slope = _grad_coeffs(g_logp, g_entropy, entropy, inv_temp)
    token_col = tl.where(y_valid, token, -1)
    flat = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        offs = start + flat
        mask = offs < vocab
        if dense:
            z = tl.load(logits_row + offs, mask=mask, other=float("-inf"))
            g = _dense_grad(z.to(tl.float32) * inv_temp - lse, offs, token_col, target, base, slope)
        else:
            g = tl.zeros([BLOCK_V], tl.float32)
        tl.store(grad_row + offs, g.to(grad_row.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    # Each support entry: its dense part (the same formula, from the logit read in step 2) plus
    # the TROLL gradient, in one rounding.
    dense_a = tl.where(dense, _dense_grad(x_a - lse, ids_a, token_col, target, base, slope), 0.0)
    tl.store(grad_row + tl.where(valid_a, ids_a, 0), (dense_a + sparse_a).to(grad_row.dtype.element_ty), mask=valid_a)
    dense_b = tl.where(dense, _dense_grad(x_b - lse, ids_b, token_col, target, base, slope), 0.0)
    tl.store(grad_row + tl.where(valid_b, ids_b, 0), (dense_b + sparse_b).to(grad_row.dtype.element_ty), mask=valid_b)


def _config(vocab, k, old_k, on_gpu):
    """(BLOCK_V, num_warps, K, OA, OK): the vocab chunk (>= K), the top-K buffer (a power of two
    >= max(k, 2)), segment A (a power of two >= old_k + 1) and the old slots (>= old_k)."""
    block, num_warps = block_config(vocab, on_gpu)
    # At most 4 warps: at 8 the fp32 kernel spilled on sm_80 (128 registers, a 96-byte stack);
    # at 4 it takes 234 registers and no stack.
    num_warps = min(num_warps, 4)
    K = triton.next_power_of_2(max(k, 2))
    return max(block, K), num_warps, K, triton.next_power_of_2(old_k + 1), triton.next_power_of_2(max(old_k, 1))


def troll(logits, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp, policy_weight, weight, params,
          old_ids, old_logprobs, old_k, k, threshold, eps, alpha, loss, logp, entropy, eta, kl_before, kl_after,
          support, grad_logits, grad_layout, inv_temps=None):
    """The fused TROLL loss (schema.h TrollArgs): per-token outputs (fp32 [rows]) and the row
    gradient into ``grad_logits`` (``grad_layout``; may be ``logits``). ``old_ids`` int32 and
    ``old_logprobs`` fp32 are contiguous [rows, old_k]; ``params`` the TokenLossParams of the
    penalties (its policy field is not read). ``inv_temps``: optional per-row inv_temp (fp32 [rows])."""
    rows, inner, stride_outer, stride_inner = layout
    grad_rows, grad_inner, grad_stride_outer, grad_stride_inner = grad_layout
    assert grad_rows == rows, "layout and grad_layout must describe the same rows"
    if rows == 0:
        return
    policy, kl, mode = kernel_constexprs(params)
    if ref_logp is None:
        if kl != _schema.KL_KIND["none"]:
            raise ValueError("ref_logp is required when params.kl != 0 and params.kl_coef != 0")
        ref_logp = old_logp
    block, num_warps, K, OA, OK = _config(vocab, k, old_k, logits.device.type != "cpu")
    floats = TokenLossFloats(*[float(getattr(params, name)) for name in TokenLossFloats._fields])
    inv_temps, has_row_temp = optional_rows(inv_temps, loss)
    _troll_kernel[(rows,)](
        logits, tokens, advantages, old_logp, ref_logp, policy_weight, weight, old_ids, old_logprobs,
        loss, logp, entropy, eta, kl_before, kl_after, support, grad_logits, inv_temps,
        inner, stride_outer, stride_inner, grad_inner, grad_stride_outer, grad_stride_inner,
        vocab, float(inv_temp), old_k, k, 1.0 - float(threshold), float(eps), float(alpha), floats,
        BLOCK_V=block, VEC=min(16 // logits.element_size(), block), K=K, OA=OA, OK=OK,
        POLICY=policy, KL=kl, MODE=mode, HAS_ROW_TEMP=has_row_temp, num_warps=num_warps,
    )


def _aot_kernels():
    sig = {
        "logits_ptr": "*{dtype}", "tokens_ptr": "*i64", "advantages_ptr": "*fp32", "old_logp_ptr": "*fp32",
        "ref_logp_ptr": "*fp32", "policy_weight_ptr": "*fp32", "weight_ptr": "*fp32",
        "old_ids_ptr": "*i32", "old_logprobs_ptr": "*fp32",
        "loss_ptr": "*fp32", "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "eta_ptr": "*fp32",
        "kl_before_ptr": "*fp32", "kl_after_ptr": "*fp32", "support_ptr": "*fp32", "grad_ptr": "*{dtype}",
        "inv_temps_ptr": "*fp32", **layout_signature("", "grad_"),
        "vocab": "i32", "inv_temp": "fp32", "old_k": "i32", "k": "i32",
        "keep_below": "fp64", "eps": "fp64", "alpha": "fp64",
        "params": TokenLossFloats(*["fp32"] * len(TokenLossFloats._fields)),
        "BLOCK_V": "constexpr", "VEC": "constexpr", "K": "constexpr", "OA": "constexpr", "OK": "constexpr",
        "POLICY": "constexpr", "KL": "constexpr", "MODE": "constexpr", "HAS_ROW_TEMP": "constexpr",
    }
    # The launcher's GPU configuration at K = 64 (LossConfig.troll()'s default), large vocabulary:
    # without penalties and with the k3 KL penalty (the policy field is not read: ppo). Per-row
    # inv_temps only replace the scalar by one load (bf16 k3 compiled with them: 252-254 registers,
    # no stack on sm_80/90/100), not worth ~20 s per arch here.
    block, num_warps, K, OA, OK = _config(AOT_VOCAB, 64, 64, on_gpu=True)
    entries = []
    for dtype, kl in (("bf16", "none"), ("bf16", "k3"), ("fp32", "none")):
        entries.append(aot_kernel(
            f"troll[{dtype},{kl},K={K}]", _troll_kernel, sig, dtype, True, num_warps,
            {"BLOCK_V": block, "VEC": vec_width(dtype), "K": K, "OA": OA, "OK": OK,
             "POLICY": _schema.POLICY_KIND["ppo"], "KL": _schema.KL_KIND[kl],
             "MODE": _schema.CISPO_MODE["two_sided"], "HAS_ROW_TEMP": False},
            extra_aligned=("old_k", "k")))
    return entries


# Specialisations compiled by aot.py.
AOT_KERNELS = _aot_kernels()
