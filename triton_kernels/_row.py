"""Row building blocks of the Triton kernels (docs/SPEC.md section 1), the port of csrc/cpu/row_kernels.h
and csrc/cuda/row_kernels.cuh: row addressing and the one online statistics pass of every op
(token log-probs, policy loss, top-k, sampling; with its cross-term form, the KL), and what the
two-row kernels (KL, JSD) share: their rows, a chunk of both, a gradient chunk's store.

Optional per-row inputs (docs/SPEC.md section 1; python/rlfuse/_schema.py ``optional`` fields): a
kernel takes each as a pointer plus a constexpr flag, so a launch without it compiles the read
away and costs what it did before. ``_row_or`` reads one (a per-row inv_temp or clip bound); the
statistics take the sampler's kept set as ``kept_min`` with KEPT: entries with x < kept_min count
as x = -inf (NaN stays NaN: the comparison is false for it).

Row contract shared with the CPU and CUDA backends: row r of the logits starts at element
``(r // inner) * stride_outer + (r % inner) * stride_inner`` of the base pointer and its ``vocab``
entries are contiguous. ``layout = (rows, inner, stride_outer, stride_inner)``, in elements.

The statistics are lane-wise: a chunk is [LANES, VEC], each lane owning VEC consecutive entries
(one 16-byte load), so the per-chunk max and sums along VEC stay inside a thread; each lane keeps
its own online softmax (``_online``), combined across lanes once per row (``_combine``). Under
TRITON_INTERPRET=1 every call of a @triton.jit helper costs about a millisecond, so the per-chunk
step is one call with its exponentials inline.
"""

import triton
import triton.language as tl

FLT_MAX = tl.constexpr(3.4028234663852886e38)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _row_ptr(base_ptr, row, inner, stride_outer, stride_inner):
    # 64-bit offsets: rows * vocab exceeds 2^31 at realistic sizes.
    row = row.to(tl.int64)
    return base_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def _row_or(values_ptr, row, default, GIVEN: tl.constexpr):
    """values_ptr[row] of an optional [rows] input when GIVEN, else ``default`` (the scalar it overrides)."""
    if GIVEN:
        value = tl.load(values_ptr + row)
    else:
        value = default
    return value


@triton.jit
def _pair_rows(logits_ptr, other_ptr, inv_temps_ptr, inv_temp, inner, stride_outer, stride_inner,
               other_inner, other_stride_outer, other_stride_inner, HAS_ROW_TEMP: tl.constexpr):
    """(row, inv_temp, x_row, y_row) of a two-row kernel's program (kl_div.py, distill.py): the
    logits row x and the other row y, each at its own layout, one inv_temp for both."""
    row = tl.program_id(0).to(tl.int64)
    inv_temp = _row_or(inv_temps_ptr, row, inv_temp, HAS_ROW_TEMP)
    x_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)
    y_row = _row_ptr(other_ptr, row, other_inner, other_stride_outer, other_stride_inner)
    return row, inv_temp, x_row, y_row


@triton.jit
def _load_pair(x_row, y_row, offs, vocab):
    """(zx, zy, mask): a chunk of both rows of a two-row kernel in fp32, -inf past the end."""
    mask = offs < vocab
    zx = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    zy = tl.load(y_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    return zx, zy, mask


@triton.jit
def _store_grad(grad_row, offs, mask, g, grad):
    """Stores a gradient chunk in grad_row's dtype; g == 0 (the row's upstream gradient: a masked
    row) writes zeros even where the row holds NaN / inf. The program has read the chunk first,
    so a gradient may alias its own input."""
    grad = tl.where(g == 0.0, 0.0, grad)
    tl.store(grad_row + offs, grad.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _exp(x):
    # Straight to the exp2 instruction: tl.exp adds subnormal-range handling we do not need.
    return tl.exp2(x * LOG2E)


@triton.jit
def _online(m, s, t, x, w, CENTRED: tl.constexpr):
    """One [LANES, VEC] chunk ``x`` of the lane-wise online softmax: per lane the max m,
    s = sum exp(x - m) and t = sum exp(x - m) * w, where w is x - m with CENTRED (SPEC's dot,
    kept relative to m so that H = lse - E[x] does not cancel; it moves with the max) or the given
    ``w`` (the KL's cross term x - y, which does not). Lanes start at m = -FLT_MAX rather than
    -inf so that shifts are never -inf - -inf; a lane that only saw -inf keeps s = t = 0."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = m - m_new  # <= 0
    rescale = tl.exp2(shift * LOG2E)
    d = x - m_new[:, None]
    e = tl.exp2(d * LOG2E)  # NaN for NaN entries, which then poisons s and t
    # (The statements keep the order of the kernels' former copies, so the generated code is theirs.)
    if CENTRED:
        # Clamping d makes a -inf entry (e = 0, d = -inf) add 0 * -FLT_MAX = 0, not NaN.
        chunk_t = tl.sum(e * tl.maximum(d, -FLT_MAX), axis=1)
        # Old terms that underflow add 0: from m = -FLT_MAX a max above ~1e31 makes shift -inf
        # (s = 0 then, and 0 * -inf would be NaN).
        t = tl.where(rescale == 0.0, 0.0, (t + s * shift) * rescale) + chunk_t
        s = s * rescale + tl.sum(e, axis=1)
    else:
        # e = 0 (a -inf entry, or underflow) adds 0 whatever w is (-inf - -inf, +inf); so do old
        # terms that underflow against a new max (t may be +inf).
        term = tl.where(e == 0.0, 0.0, e * w)
        s = s * rescale + tl.sum(e, axis=1)
        t = tl.where(rescale == 0.0, 0.0, t * rescale) + tl.sum(term, axis=1)
    return m_new, s, t


@triton.jit
def _combine(m, s, t, CENTRED: tl.constexpr):
    """(row max, sum exp(x - max), sum exp(x - max) * w) of a row from its lanes' ``_online``
    statistics, by the same rule: a lane whose terms underflow against the row max adds 0."""
    row_max = tl.max(m, axis=0)
    shift = m - row_max
    scale = tl.exp2(shift * LOG2E)
    sum_s = tl.sum(s * scale, axis=0)
    if CENTRED:
        sum_t = tl.sum(tl.where(scale == 0.0, 0.0, (t + s * shift) * scale), axis=0)
    else:
        sum_t = tl.sum(tl.where(scale == 0.0, 0.0, t * scale), axis=0)
    return row_max, sum_s, sum_t


@triton.jit
def _row_stats(logits_row, vocab, inv_temp, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
               RANGE: tl.constexpr = False, kept_min=0.0, KEPT: tl.constexpr = False):
    """(row_max, log_sum, entropy) of x = z * inv_temp over one row: lse = row_max + log_sum.
    With RANGE also sum exp(x - max), the smallest finite x and the number of finite entries
    (sampling's bisection bounds), from the same pass. With KEPT, over the kept set x >= kept_min."""
    LANES: tl.constexpr = BLOCK_V // VEC
    cols = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    m = tl.full([LANES], -FLT_MAX, tl.float32)
    s = tl.zeros([LANES], tl.float32)
    dot = tl.zeros([LANES], tl.float32)
    if RANGE:
        lo = tl.full([LANES], float("inf"), tl.float32)
        n = tl.zeros([LANES], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        z = tl.load(logits_row + offs, mask=offs < vocab, other=float("-inf"))
        x = z.to(tl.float32) * inv_temp
        if KEPT:
            x = tl.where(x < kept_min, float("-inf"), x)
        if RANGE:
            finite = x > float("-inf")
            lo = tl.minimum(lo, tl.min(tl.where(finite, x, float("inf")), axis=1))
            n += tl.sum(finite.to(tl.int32), axis=1)
        m, s, dot = _online(m, s, dot, x, x, True)

    row_max, sum_exp, sum_dot = _combine(m, s, dot, True)
    log_sum = tl.log(sum_exp)
    entropy = log_sum - sum_dot / sum_exp
    if RANGE:
        return row_max, log_sum, entropy, sum_exp, tl.min(lo, axis=0), tl.sum(n, axis=0)
    else:
        return row_max, log_sum, entropy


@triton.jit
def _token_logp(logits_row, token, vocab, inv_temp, row_max, log_sum, kept_min=0.0, KEPT: tl.constexpr = False):
    """logp = x_y - lse of the row's token; NaN for an out-of-range id, which is never loaded.
    With KEPT, -inf for a token outside the kept set (x_y < kept_min)."""
    valid = (token >= 0) & (token < vocab)
    z_token = tl.load(logits_row + tl.where(valid, token, 0), mask=valid, other=float("nan"))
    x_token = z_token.to(tl.float32) * inv_temp
    if KEPT:  # as in the statistics: a NaN row still gives NaN
        x_token = tl.where(x_token < kept_min, float("-inf"), x_token)
    # x_y - max is exact for the likely tokens; going through lse would round at |lse|'s scale.
    return (x_token - row_max) - log_sum
