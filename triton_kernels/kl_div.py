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

from ._launch import MIN_BLOCK_V, AotKernel, block_config, optional_rows
from ._row import FLT_MAX, _combine, _exp, _online, _row_or, _row_ptr


@triton.jit
def _kl_div_fwd_kernel(
    logits_ptr, other_ptr, kl_ptr, lse_ptr, other_lse_ptr, inv_temps_ptr,
    inner, stride_outer, stride_inner, other_inner, other_stride_outer, other_stride_inner,
    vocab, inv_temp, direction,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, HAS_ROW_TEMP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = _row_or(inv_temps_ptr, row, inv_temp, HAS_ROW_TEMP)
    x_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)
    y_row = _row_ptr(other_ptr, row, other_inner, other_stride_outer, other_stride_inner)

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
        offs = start + cols
        mask = offs < vocab
        zx = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        zy = tl.load(y_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
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
    row = tl.program_id(0).to(tl.int64)
    inv_temp = _row_or(inv_temps_ptr, row, inv_temp, HAS_ROW_TEMP)
    x_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)
    y_row = _row_ptr(other_ptr, row, other_inner, other_stride_outer, other_stride_inner)
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
        mask = offs < vocab
        zx = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        zy = tl.load(y_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = _exp(zx * inv_temp - lse_p)
        q = _exp(zy * inv_temp - lse_q)
        # Same program reads then writes each element: a gradient may alias its own input.
        if GRAD_X:
            gx_fwd = tl.where(p == 0.0, 0.0, p * ((zx - zy) * inv_temp + c_fwd))
            # g == 0 (a masked row) writes zeros even where the row holds NaN / inf.
            gx = tl.where(g == 0.0, 0.0, g * tl.where(forward, gx_fwd, p - q))
            tl.store(grad_row + offs, gx.to(grad_ptr.dtype.element_ty), mask=mask)
        if GRAD_Y:
            gy_rev = tl.where(q == 0.0, 0.0, q * ((zy - zx) * inv_temp + c_rev))
            gy = tl.where(g == 0.0, 0.0, g * tl.where(forward, q - p, gy_rev))
            tl.store(grad_other_row + offs, gy.to(grad_other_ptr.dtype.element_ty), mask=mask)


def _block_config(vocab, on_gpu, block_v=None):
    """block_config's (BLOCK_V, num_warps), the GPU chunk halved: a chunk loads two rows, so
    each thread keeps as many bytes in flight as token_logprobs' one-row chunk."""
    block, num_warps = block_config(vocab, on_gpu, block_v)
    if block_v is None and on_gpu:
        block = max(block // 2, MIN_BLOCK_V)
    return block, num_warps


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
    rows, inner, stride_outer, stride_inner = layout
    other_rows, other_inner, other_stride_outer, other_stride_inner = other_layout
    assert other_rows == rows, "layout and other_layout must describe the same rows"
    direction = _check_direction(direction)
    if rows == 0:
        return
    inv_temps, has_row_temp = optional_rows(inv_temps, kl)
    block, num_warps = _block_config(vocab, logits.device.type != "cpu", block_v)
    _kl_div_fwd_kernel[(rows,)](
        logits, other, kl, lse, other_lse, inv_temps,
        inner, stride_outer, stride_inner, other_inner, other_stride_outer, other_stride_inner,
        vocab, float(inv_temp), direction,
        BLOCK_V=block, VEC=min(16 // logits.element_size(), block), HAS_ROW_TEMP=has_row_temp,
        num_warps=num_warps,
    )


def kl_div_bwd(logits, layout, other, other_layout, vocab, inv_temp, direction, kl, lse, other_lse,
               grad_kl, grad_logits, grad_layout, grad_other, grad_other_layout, inv_temps=None, *, block_v=None):
    """Writes dKL/dlogits and dKL/dother scaled by ``grad_kl`` (contiguous fp32 [rows]).

    ``kl``, ``lse``, ``other_lse`` are the forward's outputs. Gradients are stored in their
    tensors' dtype at their layouts' row offsets; ``grad_logits`` or ``grad_other`` None skips
    that gradient (its layout is then ignored). A gradient may be its own input tensor (same
    layout) for an in-place backward. ``inv_temps`` must be the forward's.
    """
    rows, inner, stride_outer, stride_inner = layout
    assert other_layout[0] == rows, "layout and other_layout must describe the same rows"
    direction = _check_direction(direction)
    grad_x, grad_y = grad_logits is not None, grad_other is not None
    # A skipped gradient gets its input as a never-written stand-in.
    if not grad_x:
        grad_logits, grad_layout = logits, layout
    if not grad_y:
        grad_other, grad_other_layout = other, other_layout
    assert grad_layout[0] == rows and grad_other_layout[0] == rows, \
        "gradient layouts must describe the same rows"
    if rows == 0 or not (grad_x or grad_y):
        return
    inv_temps, has_row_temp = optional_rows(inv_temps, kl)
    block, num_warps = _block_config(vocab, logits.device.type != "cpu", block_v)
    _kl_div_bwd_kernel[(rows,)](
        logits, other, kl, lse, other_lse, grad_kl, grad_logits, grad_other, inv_temps,
        *layout[1:], *other_layout[1:], *grad_layout[1:], *grad_other_layout[1:],
        vocab, float(inv_temp), direction,
        BLOCK_V=block, GRAD_X=grad_x, GRAD_Y=grad_y, HAS_ROW_TEMP=has_row_temp, num_warps=num_warps,
    )


def _aot_kernels():
    layout_sig = {"inner": "i32", "stride_outer": "i64", "stride_inner": "i32"}

    def layouts(*prefixes):
        return {f"{prefix}{k}": v for prefix in prefixes for k, v in layout_sig.items()}

    scalars = {"vocab": "i32", "inv_temp": "fp32", "direction": "i32"}
    fwd_sig = {
        "logits_ptr": "*{dtype}", "other_ptr": "*{dtype}",
        "kl_ptr": "*fp32", "lse_ptr": "*fp32", "other_lse_ptr": "*fp32", "inv_temps_ptr": "*fp32",
        **layouts("", "other_"), **scalars, "BLOCK_V": "constexpr", "VEC": "constexpr",
        "HAS_ROW_TEMP": "constexpr",
    }
    bwd_sig = {
        "logits_ptr": "*{dtype}", "other_ptr": "*{dtype}",
        "kl_ptr": "*fp32", "lse_ptr": "*fp32", "other_lse_ptr": "*fp32", "grad_kl_ptr": "*fp32",
        "grad_ptr": "*{dtype}", "grad_other_ptr": "*{dtype}", "inv_temps_ptr": "*fp32",
        **layouts("", "other_", "grad_", "grad_other_"), **scalars,
        "BLOCK_V": "constexpr", "GRAD_X": "constexpr", "GRAD_Y": "constexpr", "HAS_ROW_TEMP": "constexpr",
    }
    # What a launch usually specialises as multiples of 16 (see token_logprobs.py): pointers,
    # strides, vocab. "unaligned" is a vocab like 50257 (scalar loads).
    fwd_aligned = tuple(k for k, v in fwd_sig.items() if v.startswith("*")) + tuple(
        k for k in fwd_sig if k.endswith("stride_outer") or k.endswith("stride_inner")) + ("vocab",)
    bwd_aligned = tuple(k for k, v in bwd_sig.items() if v.startswith("*")) + tuple(
        k for k in bwd_sig if k.endswith("stride_outer") or k.endswith("stride_inner")) + ("vocab",)
    bytes_per = {"bf16": 2, "fp16": 2, "fp32": 4}
    block, num_warps = _block_config(151936, on_gpu=True)
    entries = []
    # (dtype, aligned, per-row inv_temps): without them, and bf16 with.
    for dtype, aligned, row_temp in (("bf16", True, False), ("fp16", True, False), ("fp32", True, False),
                                     ("bf16", False, False), ("bf16", True, True)):
        tag = (dtype if aligned else f"{dtype},unaligned") + (",inv_temps" if row_temp else "")
        entries.append(AotKernel(
            name=f"kl_div_fwd[{tag}]", fn=_kl_div_fwd_kernel,
            signature={k: v.format(dtype=dtype) for k, v in fwd_sig.items()},
            constexprs={"BLOCK_V": block, "VEC": 16 // bytes_per[dtype], "HAS_ROW_TEMP": row_temp},
            num_warps=num_warps, aligned=fwd_aligned if aligned else ()))
        # Gradient on the policy only (frozen reference / teacher), or on both (distillation).
        for grads, grad_y in (("dx", False), ("dx,dy", True)):
            entries.append(AotKernel(
                name=f"kl_div_bwd[{tag},{grads}]", fn=_kl_div_bwd_kernel,
                signature={k: v.format(dtype=dtype) for k, v in bwd_sig.items()},
                constexprs={"BLOCK_V": block, "GRAD_X": True, "GRAD_Y": grad_y, "HAS_ROW_TEMP": row_temp},
                num_warps=num_warps, aligned=bwd_aligned if aligned else ()))
    return entries


# Specialisations compiled by aot.py: the launchers' GPU configuration for large vocabularies.
AOT_KERNELS = _aot_kernels()
