"""Generalised Jensen-Shannon divergence between two logit rows and its gradient on both
(docs/distillation.md; schema.h JsdFwdArgs / JsdBwdArgs; the port of csrc/cpu/distill_rows.cpp).

Per row, ``x = logits * inv_temp``, ``y = other * inv_temp``, ``p = softmax(x)``, ``q = softmax(y)``,
``m = (1 - beta) p + beta q`` and ``JSD = beta KL(q || m) + (1 - beta) KL(p || m)`` (TRL's GKD
``generalized_jsd_loss`` for ``0 < beta < 1``). Both logit tensors follow the row contract of
_row.py, each with its own ``layout = (rows, inner, stride_outer, stride_inner)``.

Forward, two reads of both rows: _row.py's statistics pass over each row (the same code for both,
so identical rows give identical statistics), then the mixture sums. Per element, with
``d = log q - log p``:
    w = (1 - beta) + beta e^d  (d <= 0)  or  beta + (1 - beta) e^-d  (d > 0),   r = log w
    u = log(m / p) = r  or  r + d,         v = log(m / q) = r - d  or  r
    KL(p || m) = -sum p u,  KL(q || m) = -sum q v   (terms with p = 0, resp. q = 0, add 0)
The exponential only sees ``-|d|`` and the logarithm a value in ``[min(beta, 1 - beta), 1]``;
identical rows give ``d = 0``, ``w = 1`` and exactly 0.

Backward (one more read of both rows, one write of each requested gradient), ``g = grad * inv_temp``:
    d/dx_j = -(1 - beta) g p_j (u_j + KL(p || m)),   d/dy_j = -beta g q_j (v_j + KL(q || m))
"""

import triton
import triton.language as tl

from ._launch import layout_signature, pair_aot_kernels, pair_backward, pair_forward
from ._row import _exp, _load_pair, _pair_rows, _row_ptr, _row_stats, _store_grad


@triton.jit
def _mixture_logs(log_p, log_q, beta):
    """(u, v) = (log(m / p), log(m / q)) per element; NaN d (both entries -inf) is selected away by
    the callers (p = q = 0 there)."""
    d = log_q - log_p
    below = d <= 0.0
    e = _exp(-tl.abs(d))
    w = tl.where(below, (1.0 - beta) + beta * e, beta + (1.0 - beta) * e)
    r = tl.log(w)
    u = tl.where(below, r, r + d)
    v = tl.where(below, r - d, r)
    return u, v


@triton.jit
def _jsd_fwd_kernel(
    logits_ptr, other_ptr, jsd_ptr, kl_logits_ptr, kl_other_ptr, lse_ptr, other_lse_ptr, inv_temps_ptr,
    inner, stride_outer, stride_inner, other_inner, other_stride_outer, other_stride_inner,
    vocab, inv_temp, beta,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, HAS_ROW_TEMP: tl.constexpr,
):
    row, inv_temp, x_row, y_row = _pair_rows(logits_ptr, other_ptr, inv_temps_ptr, inv_temp, inner, stride_outer,
                                             stride_inner, other_inner, other_stride_outer, other_stride_inner,
                                             HAS_ROW_TEMP)
    # Read 1: the statistics of each row.
    max_x, log_sum_x, _ = _row_stats(x_row, vocab, inv_temp, BLOCK_V, VEC)
    max_y, log_sum_y, _ = _row_stats(y_row, vocab, inv_temp, BLOCK_V, VEC)
    # Read 2: the mixture sums; log p = (x - max) - log sum, exact for the probable entries.
    cols = tl.arange(0, BLOCK_V)
    sum_pu = tl.zeros([BLOCK_V], tl.float32)
    sum_qv = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        zx, zy, _mask = _load_pair(x_row, y_row, start + cols, vocab)
        log_p = (zx * inv_temp - max_x) - log_sum_x
        log_q = (zy * inv_temp - max_y) - log_sum_y
        p = _exp(log_p)
        q = _exp(log_q)
        u, v = _mixture_logs(log_p, log_q, beta)
        sum_pu += tl.where(p == 0.0, 0.0, p * u)
        sum_qv += tl.where(q == 0.0, 0.0, q * v)
    kl_p = -tl.sum(sum_pu, axis=0)
    kl_q = -tl.sum(sum_qv, axis=0)
    tl.store(kl_logits_ptr + row, kl_p)
    tl.store(kl_other_ptr + row, kl_q)
    tl.store(jsd_ptr + row, beta * kl_q + (1.0 - beta) * kl_p)
    tl.store(lse_ptr + row, max_x + log_sum_x)
    tl.store(other_lse_ptr + row, max_y + log_sum_y)


@triton.jit
def _jsd_bwd_kernel(
    logits_ptr, other_ptr, kl_logits_ptr, kl_other_ptr, lse_ptr, other_lse_ptr, grad_jsd_ptr,
    grad_ptr, grad_other_ptr,
    inner, stride_outer, stride_inner, other_inner, other_stride_outer, other_stride_inner,
    grad_inner, grad_stride_outer, grad_stride_inner,
    grad_other_inner, grad_other_stride_outer, grad_other_stride_inner,
    # inv_temps_ptr last: ahead of the layouts, ptxas gave the dx-only sm_100 kernel 40 registers, not 32.
    vocab, inv_temp, beta, inv_temps_ptr,
    BLOCK_V: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr, HAS_ROW_TEMP: tl.constexpr,
):
    row, inv_temp, x_row, y_row = _pair_rows(logits_ptr, other_ptr, inv_temps_ptr, inv_temp, inner, stride_outer,
                                             stride_inner, other_inner, other_stride_outer, other_stride_inner,
                                             HAS_ROW_TEMP)
    lse_p = tl.load(lse_ptr + row)
    lse_q = tl.load(other_lse_ptr + row)
    kl_p = tl.load(kl_logits_ptr + row)
    kl_q = tl.load(kl_other_ptr + row)
    g = tl.load(grad_jsd_ptr + row) * inv_temp
    coef_x = -(1.0 - beta) * g
    coef_y = -beta * g
    grad_row = _row_ptr(grad_ptr, row, grad_inner, grad_stride_outer, grad_stride_inner)
    grad_other_row = _row_ptr(grad_other_ptr, row, grad_other_inner, grad_other_stride_outer,
                              grad_other_stride_inner)

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        zx, zy, mask = _load_pair(x_row, y_row, offs, vocab)
        log_p = zx * inv_temp - lse_p
        log_q = zy * inv_temp - lse_q
        p = _exp(log_p)
        q = _exp(log_q)
        u, v = _mixture_logs(log_p, log_q, beta)
        if GRAD_X:
            _store_grad(grad_row, offs, mask, g, tl.where(p == 0.0, 0.0, coef_x * (p * (u + kl_p))))
        if GRAD_Y:
            _store_grad(grad_other_row, offs, mask, g, tl.where(q == 0.0, 0.0, coef_y * (q * (v + kl_q))))


def _check_beta(beta):
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    return float(beta)


def jsd_fwd(logits, layout, other, other_layout, vocab, inv_temp, beta, jsd, kl_logits, kl_other, lse, other_lse,
            inv_temps=None, *, block_v=None):
    """jsd, kl_logits = KL(p || m), kl_other = KL(q || m), lse, other_lse (contiguous fp32 [rows]).

    ``logits`` and ``other`` (same dtype) are only base pointers, rows described by ``layout`` and
    ``other_layout``. ``block_v`` overrides the vocab chunk (a power of two). ``inv_temps``:
    optional per-row inv_temp (contiguous fp32 [rows]) for both rows.
    """
    pair_forward(_jsd_fwd_kernel, logits, layout, other, other_layout, vocab, inv_temp, _check_beta(beta),
                 (jsd, kl_logits, kl_other, lse, other_lse), inv_temps, block_v)


def jsd_bwd(logits, layout, other, other_layout, vocab, inv_temp, beta, kl_logits, kl_other, lse, other_lse,
            grad_jsd, grad_logits, grad_layout, grad_other, grad_other_layout, inv_temps=None, *, block_v=None):
    """Writes dJSD/dlogits and dJSD/dother scaled by ``grad_jsd`` (contiguous fp32 [rows]); either
    gradient may be None (skipped). A gradient may be its own input tensor (same layout).
    ``inv_temps`` must be the forward's."""
    pair_backward(_jsd_bwd_kernel, logits, layout, other, other_layout, vocab, inv_temp, _check_beta(beta),
                  (kl_logits, kl_other, lse, other_lse, grad_jsd), grad_logits, grad_layout, grad_other,
                  grad_other_layout, inv_temps, block_v, inv_temps_last=True)


# Specialisations compiled by aot.py: the launchers' GPU configuration for large vocabularies.
AOT_KERNELS = pair_aot_kernels("jsd", _jsd_fwd_kernel, {
    "logits_ptr": "*{dtype}", "other_ptr": "*{dtype}", "jsd_ptr": "*fp32",
    "kl_logits_ptr": "*fp32", "kl_other_ptr": "*fp32", "lse_ptr": "*fp32", "other_lse_ptr": "*fp32",
    "inv_temps_ptr": "*fp32", **layout_signature("", "other_"), "vocab": "i32", "inv_temp": "fp32", "beta": "fp32",
    "BLOCK_V": "constexpr", "VEC": "constexpr", "HAS_ROW_TEMP": "constexpr",
}, _jsd_bwd_kernel, {
    "logits_ptr": "*{dtype}", "other_ptr": "*{dtype}",
    "kl_logits_ptr": "*fp32", "kl_other_ptr": "*fp32", "lse_ptr": "*fp32", "other_lse_ptr": "*fp32",
    "grad_jsd_ptr": "*fp32", "grad_ptr": "*{dtype}", "grad_other_ptr": "*{dtype}",
    **layout_signature("", "other_", "grad_", "grad_other_"), "vocab": "i32", "inv_temp": "fp32", "beta": "fp32",
    "inv_temps_ptr": "*fp32",
    "BLOCK_V": "constexpr", "GRAD_X": "constexpr", "GRAD_Y": "constexpr", "HAS_ROW_TEMP": "constexpr",
})
