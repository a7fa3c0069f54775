"""Row top-k with the row statistics (kernels.h RowTopkArgs; TROLL's sparse support).

Per row of x = z * inv_temp: the token_logprobs forward outputs (logp, entropy, lse) and the k
largest x in descending order, ties broken by the lower id, into ``ids[row, :k]`` (int32) and
``values[row, :k]`` (fp32 x). Slots past the row's finite entries (k > V, or -inf entries) hold
id -1 and value -inf; -inf and NaN entries never enter the selection. Rows follow the row
contract of _row.py: ``layout = (rows, inner, stride_outer, stride_inner)``.

Selection without sorting the row: every entry becomes one int64 key that orders as
(x descending, id ascending),
    key = (orderable bits of x) << 32 | (2^31 - 1 - id),
where the orderable bits are the float's bits with the magnitude bits flipped for negative
floats (so signed integer order is float order; -0.0 is taken as +0.0 first). Excluded entries
(-inf, NaN, past the row's end) get SENTINEL = -2^63, below every real key, and decode to
(id -1, value -inf). Keys are unique except for SENTINEL, so the order is total and ties by id
come out right from an integer sort. A running top-K buffer (sorted descending) is merged with
each [BLOCK_S] chunk: the chunk's top K (``tl.topk``, bitonic), then the top K of the union of
two sorted lists, max(buffer, reversed chunk top) (a bitonic sequence) sorted by one bitonic
merge. A chunk whose best key does not beat the buffer's K-th key is skipped. K is a power of
two >= max(k, 2); only the first k slots are written.
"""

import triton
import triton.language as tl

from ._launch import AOT_VOCAB, aot_kernel, block_config, layout_signature, optional_rows, vec_width
from ._row import _row_or, _row_ptr, _row_stats, _token_logp

SENTINEL = tl.constexpr(-(2**63))
INT32_MAX = tl.constexpr(2**31 - 1)
MAX_K = 1024


@triton.jit
def _sort_key(x, ids):
    """int64 keys ordering (x descending, id ascending); SENTINEL for -inf, NaN (and masked)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 == +0.0: same key, tie broken by id
    bits = x.to(tl.int32, bitcast=True)
    hi = tl.where(bits >= 0, bits, bits ^ INT32_MAX)
    key = (hi.to(tl.int64) << 32) | (ids ^ INT32_MAX).to(tl.int64)  # 2^31 - 1 - id
    return tl.where(x > float("-inf"), key, SENTINEL)


@triton.jit
def _decode_key(key):
    """(id int32, x fp32) of keys; (-1, -inf) for SENTINEL."""
    hi = (key >> 32).to(tl.int32)
    bits = tl.where(hi >= 0, hi, hi ^ INT32_MAX)
    value = bits.to(tl.float32, bitcast=True)
    ids = (key & INT32_MAX).to(tl.int32) ^ INT32_MAX
    valid = key != SENTINEL
    return tl.where(valid, ids, -1), tl.where(valid, value, float("-inf"))


@triton.jit
def _row_topk_keys(logits_row, vocab, inv_temp, BLOCK_S: tl.constexpr, K: tl.constexpr):
    """[K] keys of the row's K best entries, descending (SENTINEL past its finite entries)."""
    cols = tl.arange(0, BLOCK_S)
    top = tl.full([K], SENTINEL, tl.int64)
    for start in range(0, vocab, BLOCK_S):
        offs = start + cols
        z = tl.load(logits_row + offs, mask=offs < vocab, other=float("-inf"))
        key = _sort_key(z.to(tl.float32) * inv_temp, offs)
        # Keys are unique but for SENTINEL, so the buffer's min is its K-th entry.
        if tl.max(key, axis=0) > tl.min(top, axis=0):
            chunk_top = tl.topk(key, K)  # descending
            # top descending, flipped chunk_top ascending: the elementwise max holds the K best
            # of both and is bitonic; one bitonic merge sorts it.
            top = tl.bitonic_merge(tl.maximum(top, tl.flip(chunk_top)), descending=True)
    return top


@triton.jit
def _row_topk_kernel(
    logits_ptr, tokens_ptr, ids_ptr, values_ptr, logp_ptr, entropy_ptr, lse_ptr, inv_temps_ptr,
    inner, stride_outer, stride_inner, vocab, inv_temp, k,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, BLOCK_S: tl.constexpr, K: tl.constexpr,
    HAS_ROW_TEMP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = _row_or(inv_temps_ptr, row, inv_temp, HAS_ROW_TEMP)
    logits_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)
    row_max, log_sum, entropy = _row_stats(logits_row, vocab, inv_temp, BLOCK_V, VEC)
    token = tl.load(tokens_ptr + row)
    logp = _token_logp(logits_row, token, vocab, inv_temp, row_max, log_sum)
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, row_max + log_sum)

    top = _row_topk_keys(logits_row, vocab, inv_temp, BLOCK_S, K)
    ids, values = _decode_key(top)
    slots = tl.arange(0, K)
    out = row * k + slots
    tl.store(ids_ptr + out, ids, mask=slots < k)
    tl.store(values_ptr + out, values, mask=slots < k)


def _select_config(k, block_v):
    """(K, BLOCK_S): the buffer size (power of two >= k, >= 2) and the selection chunk (>= K)."""
    # K >= 2: tl.flip and tl.bitonic_merge need a tensor of at least two entries.
    K = triton.next_power_of_2(max(k, 2))
    return K, max(block_v, K)


def row_topk(logits, layout, vocab, tokens, inv_temp, k, ids, values, logp, entropy, lse, inv_temps=None, *,
             block_v=None):
    """Top-k ids/values (contiguous [rows, k], int32 / fp32 x) and logp, entropy, lse (fp32 [rows]).

    ``tokens`` is contiguous int64 [rows]; ``logits`` is only the base pointer. ``k`` is at most
    1024. ``block_v`` overrides the vocab chunk (a power of two), e.g. to test multi-chunk rows.
    ``inv_temps``: optional per-row inv_temp (contiguous fp32 [rows]); values are then that row's x.
    """
    rows, inner, stride_outer, stride_inner = layout
    if not 0 <= k <= MAX_K:
        raise ValueError(f"row_topk: k must be in [0, {MAX_K}], got {k}")
    if rows == 0:
        return
    block, num_warps = block_config(vocab, logits.device.type != "cpu", block_v)
    K, block_s = _select_config(k, block)
    inv_temps, has_row_temp = optional_rows(inv_temps, lse)
    _row_topk_kernel[(rows,)](
        logits, tokens, ids, values, logp, entropy, lse, inv_temps,
        inner, stride_outer, stride_inner, vocab, float(inv_temp), k,
        BLOCK_V=block, VEC=min(16 // logits.element_size(), block), BLOCK_S=block_s, K=K,
        HAS_ROW_TEMP=has_row_temp, num_warps=num_warps,
    )


def _aot_kernels():
    sig = {
        "logits_ptr": "*{dtype}", "tokens_ptr": "*i64", "ids_ptr": "*i32", "values_ptr": "*fp32",
        "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "inv_temps_ptr": "*fp32",
        **layout_signature(""), "vocab": "i32", "inv_temp": "fp32", "k": "i32",
        "BLOCK_V": "constexpr", "VEC": "constexpr", "BLOCK_S": "constexpr", "K": "constexpr",
        "HAS_ROW_TEMP": "constexpr",
    }
    block, num_warps = block_config(AOT_VOCAB, on_gpu=True)
    K, block_s = _select_config(64, block)
    entries = []
    # bf16 and fp32 cover both load widths; every entry costs ~10-30 s of compile time in CI.
    # Without per-row inv_temps: with them the kernel only loads its inv_temp (124-125 registers, no
    # stack on sm_80/90/100 when compiled), not worth ~10 s per arch here.
    # Aligned arguments as in token_logprobs, and k = 64.
    for dtype in ("bf16", "fp32"):
        entries.append(aot_kernel(
            f"row_topk[{dtype},K={K}]", _row_topk_kernel, sig, dtype, True, num_warps,
            {"BLOCK_V": block, "VEC": vec_width(dtype), "BLOCK_S": block_s, "K": K, "HAS_ROW_TEMP": False},
            extra_aligned=("k",)))
    return entries


# Specialisations compiled by aot.py: the launcher's GPU configuration at k = 64, large vocab.
AOT_KERNELS = _aot_kernels()
