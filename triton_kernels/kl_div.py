"""Full-vocabulary KL between two logit rows and its gradient on both (docs/SPEC.md 5, last bullet).

Per row, ``x = logits * inv_temp``, ``y = other * inv_temp``, ``p = softmax(x)``,
``q = softmax(y)``. ``direction`` 0 is the forward ``KL(p || q)``, 1 the reverse ``KL(q || p)``.
Both logit tensors follow the row contract of _row.py, each with its own
``layout = (rows, inner, stride_outer, stride_inner)``.

Forward (one read of both rows), _row.py's lane-wise online pass with the cross term:
    Mx, sx = sum exp(x - Mx), tx = sum exp(x - Mx) * (x - y)      (and the same for y vs x)
    lse_p = Mx + log sx, lse_q = My + log sy
    KL(p || q) = tx / sx - (lse_p - lse_q),   KL(q || p) = ty / sy - (lse_q - lse_p).
A term whose exp is 0 adds 0 (``0 * inf := 0``: a -inf logit in either row); a finite x_j with
y_j = -inf makes KL(p || q) = +inf; a NaN anywhere in either row makes the row's outputs NaN.
x and y go through the same code, so identical rows give exactly 0.

Backward (one more read of both rows, one write of each requested gradient), with
``a = x - lse_p``, ``b = y - lse_q``, ``g = grad_kl * inv_temp``, ``K = kl``:
    forward: d/dz = g * p * (a - b - K)  (0 where p = 0),  d/dother = g * (q - p)
    reverse: d/dz = g * (p - q),  d/dother = g * q * (b - a - K)  (0 where q = 0)
"""

import triton
import triton.language as tl

from ._launch import layout_signature, pair_aot_kernels, pair_backward, pair_forward
from ._row import FLT_MAX, _combine, _exp, _load_pair, _online, _pair_rows, _row_ptr, _store_grad


@triton.jit
def _kl_div_fwd_kernel(
    logits_ptr, other_ptr, kl_ptr, lse_ptr, other_lse_ptr, inv_temps_ptr,
    inner, stride_outer, stride_inner, other_inner, other_stride_outer, other_stride_inner,
    vocab, inv_temp, direction,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, HAS_ROW_TEMP: tl.constexpr,
):
    row, inv_temp, x_row, y_row = _pair_rows(logits_ptr, other_ptr, inv_temps_ptr, inv_temp, inner, stride_outer,
                                             stride_inner, other_inner, other_stride_outer, other_stride_inner,
                                             HAS_ROW_TEMP)

    # [LANES, VEC] chunks, one 16-byte load per lane and row (see _row.py).
    LANES: tl.constexpr = BLOCK_V // VEC
    cols = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    mx = tl.full([LANES], -FLT_MAX, tl.float32)
    sx = tl.zeros([LANES], tl.float32)
    tx = tl.zeros([LANES], tl.float32)
    my = tl.full([LANES], -FLT_MAX, tl.float32)
    sy = tl.zeros([LANES], tl.float32)
    ty = tl.zeros([LANES], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        zx, zy, _mask = _load_pair(x_row, y_row, start + cols, vocab)
        # x - y as (zx - zy) * inv_temp: exactly 0 for equal entries, where zx * inv_temp - y
        # may be contracted to an FMA that leaves the rounding error of y.
        mx, sx, tx = _online(mx, sx, tx, zx * inv_temp, (zx - zy) * inv_temp, False)
        my, sy, ty = _online(my, sy, ty, zy * inv_temp, (zy - zx) * inv_temp, False)

    max_x, sum_x, t_x = _combine(mx, sx, tx, False)
    log_sx, mean_x = tl.log(sum_x), t_x / sum_x  # mean_x = E_p[x - y]
    max_y, sum_y, t_y = _combine(my, sy, ty, False)
    log_sy, mean_y = tl.log(sum_y), t_y / sum_y  # mean_y = E_q[y - x]
    # lse_q - lse_p without rounding at |lse|'s scale when the maxima agree.
    lse_diff = (max_y - max_x) + (log_sy - log_sx)
    kl = tl.where(direction == 0, mean_x + lse_diff, mean_y - lse_diff)

    tl.store(kl_ptr + row, kl)
    tl.store(lse_ptr + row, max_x + log_sx)
    tl.store(other_lse_ptr + row, max_y + log_sy)


@triton.jit
def _kl_div_bwd_kernel(
    logits_ptr, other_ptr, kl_ptr, lse_ptr, other_lse_ptr, grad_kl_ptr,
    grad_ptr, grad_other_ptr, inv_temps_ptr,
    inner, stride_outer, stride_inner, other_inner, other_stride_outer, other_stride_inner,
    grad_inner, grad_stride_outer, grad_stride_inner,
    grad_other_inner, grad_other_stride_outer, grad_other_stride_inner,
    vocab, inv_temp, direction,
    BLOCK_V: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr, HAS_ROW_TEMP: tl.constexpr,
):
    row, inv_temp, x_row, y_row = _pair_rows(logits_ptr, other_ptr, inv_temps_ptr, inv_temp, inner, stride_outer,
                                             stride_inner, other_inner, other_stride_outer, other_stride_inner,
                                             HAS_ROW_TEMP)
    lse_p = tl.load(lse_ptr + row)
    lse_q = tl.load(other_lse_ptr + row)
    kl = tl.load(kl_ptr + row)
    g = tl.load(grad_kl_ptr + row) * inv_temp
    forward = direction == 0
    # a - b - K = (x - y) + c_fwd and b - a - K = (y - x) + c_rev, x - y = (zx - zy) * inv_temp
    # (exactly 0 for equal entries, see the forward).
    c_fwd = (lse_q - lse_p) - kl
    c_rev = (lse_p - lse_q) - kl
    grad_row = _row_ptr(grad_ptr, row, grad_inner, grad_stride_outer, grad_stride_inner)
    grad_other_row = _row_ptr(grad_other_ptr, row, grad_other_inner, grad_other_stride_outer,
                              grad_other_stride_inner)

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        zx, zy, mask = _load_pair(x_row, y_row, offs, vocab)
        p = _exp(zx * inv_temp - lse_p)
        q = _exp(zy * inv_temp - lse_q)
        if GRAD_X:
            gx_fwd = tl.where(p == 0.0, 0.0, p * ((zx - zy) * inv_temp + c_fwd))
            _store_grad(grad_row, offs, mask, g, g * tl.where(forward, gx_fwd, p - q))
        if GRAD_Y:
            gy_rev = tl.where(q == 0.0, 0.0, q * ((zy - zx) * inv_temp + c_rev))
            _store_grad(grad_other_row, offs, mask, g, g * tl.where(forward, q - p, gy_rev))


def _check_direction(direction):
    if direction not in (0, 1):
        raise ValueError(f"direction must be 0 (forward KL) or 1 (reverse KL), got {direction!r}")
    return int(direction)


def kl_div_fwd(logits, layout, other, other_layout, vocab, inv_temp, direction, kl, lse, other_lse,
               inv_temps=None, *, block_v=None):
    """kl, lse = logsumexp(x), other_lse = logsumexp(y) (contiguous fp32 [rows]) per row.

    ``logits`` and ``other`` (same dtype) are only base pointers, rows described by ``layout``
    and ``other_layout``. ``direction`` 0: KL(p || q), 1: KL(q || p). ``block_v`` overrides the
    vocab chunk (a power of two), e.g. to test multi-chunk rows at small vocab. ``inv_temps``:
    optional per-row inv_temp (contiguous fp32 [rows]) for both rows.
    """
    pair_forward(_kl_div_fwd_kernel, logits, layout, other, other_layout, vocab, inv_temp, _check_direction(direction),
                 (kl, lse, other_lse), inv_temps, block_v)


def kl_div_bwd(logits, layout, other, other_layout, vocab, inv_temp, direction, kl, lse, other_lse,
               grad_kl, grad_logits, grad_layout, grad_other, grad_other_layout, inv_temps=None, *, block_v=None):
    """Writes dKL/dlogits and dKL/dother scaled by ``grad_kl`` (contiguous fp32 [rows]).

    ``kl``, ``lse``, ``other_lse`` are the forward's outputs. Gradients are stored in their
    tensors' dtype at their layouts' row offsets; ``grad_logits`` or ``grad_other`` None skips
    that gradient (its layout is then ignored). A gradient may be its own input tensor (same
    layout) for an in-place backward. ``inv_temps`` must be the forward's.
    """
    pair_backward(_kl_div_bwd_kernel, logits, layout, other, other_layout, vocab, inv_temp, _check_direction(direction),
                  (kl, lse, other_lse, grad_kl), grad_logits, grad_layout, grad_other, grad_other_layout, inv_temps,
                  block_v)


# Specialisations compiled by aot.py: the launchers' GPU configuration for large vocabularies.
AOT_KERNELS = pair_aot_kernels("kl_div", _kl_div_fwd_kernel, {
    "logits_ptr": "*{dtype}", "other_ptr": "*{dtype}",
    "kl_ptr": "*fp32", "lse_ptr": "*fp32", "other_lse_ptr": "*fp32", "inv_temps_ptr": "*fp32",
    **layout_signature("", "other_"), "vocab": "i32", "inv_temp": "fp32", "direction": "i32",
    "BLOCK_V": "constexpr", "VEC": "constexpr", "HAS_ROW_TEMP": "constexpr",
}, _kl_div_bwd_kernel, {
    "logits_ptr": "*{dtype}", "other_ptr": "*{dtype}",
    "kl_ptr": "*fp32", "lse_ptr": "*fp32", "other_lse_ptr": "*fp32", "grad_kl_ptr": "*fp32",
    "grad_ptr": "*{dtype}", "grad_other_ptr": "*{dtype}", "inv_temps_ptr": "*fp32",
    **layout_signature("", "other_", "grad_", "grad_other_"), "vocab": "i32", "inv_temp": "fp32", "direction": "i32",
    "BLOCK_V": "constexpr", "GRAD_X": "constexpr", "GRAD_Y": "constexpr", "HAS_ROW_TEMP": "constexpr",
})
