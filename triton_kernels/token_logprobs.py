"""Per-token log-prob, entropy and their fused gradient, straight from the logits (docs/SPEC.md 1-2).

Rows follow the row contract of _row.py; the forward is _row.py's statistics pass, the backward
the row gradient pass below (also policy_loss.py's). Optional inputs (_row.py): ``inv_temps``, a
per-row inv_temp, and ``kept_min``, the sampler's kept set: statistics over x >= kept_min, logp
-inf for a token outside it, and exactly 0 gradient outside it.
"""

import triton
import triton.language as tl

from ._launch import AOT_VOCAB, aot_kernel, aot_variants, block_config, layout_signature, optional_rows, vec_width
from ._row import _exp, _row_or, _row_ptr, _row_stats, _token_logp


@triton.jit
def _grad_coeffs(g_logp, g_entropy, entropy, inv_temp):
    """(target, base, slope) of dL/dz_j = target * 1[j = y] + p_j * (base + slope * log p_j)."""
    target = g_logp * inv_temp
    base = (-g_logp - g_entropy * entropy) * inv_temp
    slope = -g_entropy * inv_temp
    return target, base, slope


@triton.jit
def _dense_grad(log_p, cols, token_col, target, base, slope):
    """dL/dz_j of _grad_coeffs at the columns ``cols`` from their log p_j; p_j = 0 (e.g. a -inf
    logit) gives exactly 0, not 0 * inf."""
    p = _exp(log_p)
    g = tl.where(p == 0.0, 0.0, p * (base + slope * log_p))
    return tl.where(cols == token_col, g + target, g)


@triton.jit
def _write_zero_row(grad_row, vocab, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_V], grad_row.dtype.element_ty)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        tl.store(grad_row + offs, zero, mask=offs < vocab)


@triton.jit
def _write_grad_row(logits_row, grad_row, token, vocab, inv_temp, lse, g_logp, g_entropy, entropy,
                    BLOCK_V: tl.constexpr, kept_min=0.0, KEPT: tl.constexpr = False):
    """Writes every element of one gradient row (in grad_row's dtype) for upstream gradients
    g_logp (on logp) and g_entropy (on H). A row with g_logp = g_entropy = 0 (masked or fully
    clipped token) is written as zeros without reading the logits, so NaN/inf in a masked row never
    leaks into its gradient (csrc/include/rlfuse/kernels.h contract). With KEPT, entries outside
    the kept set (x < kept_min; lse is the kept set's) get exactly 0, the token's included."""
    if (g_logp == 0.0) & (g_entropy == 0.0):
        _write_zero_row(grad_row, vocab, BLOCK_V)
    else:
        target, base, slope = _grad_coeffs(g_logp, g_entropy, entropy, inv_temp)
        # Out-of-range ids match no column (the forward already returned NaN for them).
        token_col = tl.where((token >= 0) & (token < vocab), token, -1).to(tl.int32)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            mask = offs < vocab
            z = tl.load(logits_row + offs, mask=mask, other=float("-inf"))
            x = z.to(tl.float32) * inv_temp
            g = _dense_grad(x - lse, offs, token_col, target, base, slope)
            if KEPT:
                g = tl.where(x < kept_min, 0.0, g)
            # Same program reads then writes each element, so grad_row may alias logits_row.
            tl.store(grad_row + offs, g.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, tokens_ptr, logp_ptr, entropy_ptr, lse_ptr, inv_temps_ptr, kept_min_ptr,
    inner, stride_outer, stride_inner, vocab, inv_temp,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, HAS_ROW_TEMP: tl.constexpr, HAS_KEPT_MIN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)
    inv_temp = _row_or(inv_temps_ptr, row, inv_temp, HAS_ROW_TEMP)
    kept_min = _row_or(kept_min_ptr, row, 0.0, HAS_KEPT_MIN)
    row_max, log_sum, entropy = _row_stats(logits_row, vocab, inv_temp, BLOCK_V, VEC, False, kept_min, HAS_KEPT_MIN)
    lse = row_max + log_sum
    token = tl.load(tokens_ptr + row)
    logp = _token_logp(logits_row, token, vocab, inv_temp, row_max, log_sum, kept_min, HAS_KEPT_MIN)

    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, tokens_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_ptr,
    inv_temps_ptr, kept_min_ptr,
    inner, stride_outer, stride_inner, grad_inner, grad_stride_outer, grad_stride_inner,
    vocab, inv_temp,
    BLOCK_V: tl.constexpr, HAS_ROW_TEMP: tl.constexpr, HAS_KEPT_MIN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)
    grad_row = _row_ptr(grad_ptr, row, grad_inner, grad_stride_outer, grad_stride_inner)
    inv_temp = _row_or(inv_temps_ptr, row, inv_temp, HAS_ROW_TEMP)
    kept_min = _row_or(kept_min_ptr, row, 0.0, HAS_KEPT_MIN)
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row)
    g_entropy = tl.load(grad_entropy_ptr + row)
    token = tl.load(tokens_ptr + row)
    _write_grad_row(logits_row, grad_row, token, vocab, inv_temp, lse, g_logp, g_entropy, entropy, BLOCK_V,
                    kept_min, HAS_KEPT_MIN)


def _launch(kernel, pointers, lse, layouts, vocab, inv_temp, inv_temps, kept_min, block_v, vec=False):
    """kernel[(rows,)] at block_config's configuration for ``vocab``, with arguments ``pointers``
    (the logits first), the optional per-row inputs (``lse`` their stand-in when None), each of
    ``layouts`` but its rows (all must describe the same rows), vocab, inv_temp; with ``vec``
    also VEC (the forward's statistics pass)."""
    rows = layouts[0][0]
    assert all(layout[0] == rows for layout in layouts), "layout and grad_layout must describe the same rows"
    if rows == 0:
        return
    inv_temps, has_row_temp = optional_rows(inv_temps, lse)
    kept_min, has_kept_min = optional_rows(kept_min, lse)
    block, num_warps = block_config(vocab, pointers[0].device.type != "cpu", block_v)
    lanes = {"VEC": min(16 // pointers[0].element_size(), block)} if vec else {}
    kernel[(rows,)](
        *pointers, inv_temps, kept_min, *[n for layout in layouts for n in layout[1:]], vocab, float(inv_temp),
        BLOCK_V=block, **lanes, HAS_ROW_TEMP=has_row_temp, HAS_KEPT_MIN=has_kept_min, num_warps=num_warps,
    )


def token_logprobs_fwd(logits, layout, vocab, tokens, inv_temp, logp, entropy, lse, inv_temps=None, kept_min=None, *, block_v=None):
    """logp, entropy, lse (fp32 [rows]) of the logits rows described by ``layout``.

    ``tokens`` is contiguous int64 [rows]; ``logits`` is only the base pointer. ``block_v``
    overrides the vocab chunk (a power of two), e.g. to test multi-chunk rows at small vocab.
    ``inv_temps`` and ``kept_min`` (contiguous fp32 [rows], optional): see the module docstring.
    """
    _launch(_token_logprobs_fwd_kernel, (logits, tokens, logp, entropy, lse), lse, (layout,), vocab, inv_temp,
            inv_temps, kept_min, block_v, vec=True)


def token_logprobs_bwd(logits, layout, vocab, tokens, inv_temp, lse, entropy, grad_logp,
                       grad_entropy, grad_logits, grad_layout, inv_temps=None, kept_min=None, *, block_v=None):
    """Writes dL/dlogits for L with upstream grads ``grad_logp``, ``grad_entropy`` (fp32 [rows]).

    The gradient is stored in ``grad_logits``' dtype at ``grad_layout``'s row offsets;
    ``grad_logits`` may be ``logits`` itself (same layout) for an in-place backward. ``inv_temps``
    and ``kept_min`` must be the forward's.
    """
    _launch(_token_logprobs_bwd_kernel, (logits, tokens, lse, entropy, grad_logp, grad_entropy, grad_logits), lse,
            (layout, grad_layout), vocab, inv_temp, inv_temps, kept_min, block_v)


def _aot_kernels():
    fwd_sig = {
        "logits_ptr": "*{dtype}", "tokens_ptr": "*i64",
        "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32",
        "inv_temps_ptr": "*fp32", "kept_min_ptr": "*fp32", **layout_signature(""), "vocab": "i32",
        "inv_temp": "fp32", "BLOCK_V": "constexpr", "VEC": "constexpr",
        "HAS_ROW_TEMP": "constexpr", "HAS_KEPT_MIN": "constexpr",
    }
    bwd_sig = {
        "logits_ptr": "*{dtype}", "tokens_ptr": "*i64", "lse_ptr": "*fp32",
        "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32",
        "grad_ptr": "*{dtype}", "inv_temps_ptr": "*fp32", "kept_min_ptr": "*fp32",
        **layout_signature("", "grad_"), "vocab": "i32", "inv_temp": "fp32",
        "BLOCK_V": "constexpr", "HAS_ROW_TEMP": "constexpr", "HAS_KEPT_MIN": "constexpr",
    }
    block, num_warps = block_config(AOT_VOCAB, on_gpu=True)
    entries = []
    # Both per-row inputs given at once: a sampler's scoring pass.
    for tag, dtype, aligned, row_inputs in aot_variants("inv_temps,kept_min"):
        flags = {"HAS_ROW_TEMP": row_inputs, "HAS_KEPT_MIN": row_inputs}
        entries.append(aot_kernel(f"token_logprobs_fwd[{tag}]", _token_logprobs_fwd_kernel, fwd_sig, dtype, aligned,
                                  num_warps, {"BLOCK_V": block, "VEC": vec_width(dtype), **flags}))
        entries.append(aot_kernel(f"token_logprobs_bwd[{tag}]", _token_logprobs_bwd_kernel, bwd_sig, dtype, aligned,
                                  num_warps, {"BLOCK_V": block, **flags}))
    return entries


# Specialisations compiled by aot.py: the launchers' GPU configuration for large vocabularies.
AOT_KERNELS = _aot_kernels()
