"""Sampling from logit rows with temperature, top-k, top-p and min-p (docs/SPEC.md 8, kernels.h SampleArgs).

One program per row, rows following the row contract of _row.py
(``layout = (rows, inner, stride_outer, stride_inner)``). Per row:

1. Temperature: ``temperature[row]``, or with ``adaptive``
   ``T = t_min + (t_max - t_min) * clamp((H1 - h_low) / (h_high - h_low), 0, 1)`` from the
   entropy H1 at temperature 1 (one extra statistics pass). ``T == 0`` is greedy: every draw is
   the argmax of z (lower id on ties) with log-prob 0, and the raw log-prob and entropy are
   taken at T = 1.
2. One statistics pass over x = z * (1 / T) (1 / T rounded once per row, as inv_temp elsewhere):
   max, lse, entropy (_row.py's _row_stats, every op's), plus the smallest finite x and the
   number of finite entries.
3. Thresholds without sorting, by bisection on the order-preserving int32 key of x (the float's
   bits with the magnitude flipped for negatives, -0.0 taken as +0.0; integer order is float
   order). Each bisection step is one pass counting the entries with key >= mid and summing
   their exp(x - max). The answer is always the key of an entry, so at most 32 steps, over
   [key(min finite x), key(max x)]:
     t_k: the largest key with count >= top_k (only if 0 < top_k < number of finite entries);
     t_p: the largest key >= t_k with mass >= top_p * mass(t_k) (only if top_p < 1).
   min-p then raises the threshold to max x + log(min_p) (if min_p > 0; never above max x).
   The kept set is {j : key(x_j) >= threshold}: ties at a threshold are all kept. Its mass is
   already known from the bisection unless min-p raised the threshold (then one more pass).
4. Draws: argmax over kept j of x_j + G_j (Gumbel-max, ties to the lower id),
   G_j = -log(-log u_j), u_j from the counter-based generator of row_math.h
   (mix32 / rng_row_key / rng_bits / rng_uniform, uint32 wrap-around arithmetic), keyed by
   (seed[row], s, j) only, so a row's draws do not depend on its batch position. S_BLOCK draws
   share one pass over the row ([S_BLOCK, BLOCK_V] score tiles): 1 on GPU for large
   vocabularies (a 1-D chunk, the row_topk/token_logprobs register budget), more for small rows
   and in the interpreter. Greedy rows draw once and repeat the token.

The same random bits and thresholds as the CPU kernel (csrc/cpu/sample_rows.cpp, which races
exp(x_j - max) / -log u_j instead: the same argmax up to float rounding at near-ties).

Interpreter: every call of a @triton.jit helper costs about a millisecond under
TRITON_INTERPRET=1 (the interpreter re-patches triton.language per call), so the passes over a
row make few per chunk: _chunk_keys (the chunk's x and keys, _scaled and _key inline) and, drawing,
_gumbel; exp is inline (the statistics pass, _row.py's, makes one call per chunk). The generated
GPU code is the same as with every helper called.

Outputs: tokens[row, s] (int64), logprobs[row, s] = x_tok - lse(kept set),
raw_logprobs[row, s] = x_tok - lse(all), entropy[row] of the unfiltered distribution at T.
Rows with NaN or without a finite entry are the caller's to reject (kernels.h).
Score mode (SCORE, score_ptr): the row's given token replaces the draws and is scored with the
same expressions (docs/SPEC.md section 8, "Scoring"); KEPT_MIN writes the row's threshold on x.
"""

import triton
import triton.language as tl

from ._launch import AOT_VOCAB, aot_kernel, block_config, layout_signature, optional_rows, vec_width
from ._row import LOG2E, _row_ptr, _row_stats

INT32_MAX = tl.constexpr(2**31 - 1)
# row_math.h constants: lowbias32 multipliers, the golden-ratio increment, 2^-23 (rng_uniform).
MIX_MUL1 = tl.constexpr(0x7FEB352D)
MIX_MUL2 = tl.constexpr(0x846CA68B)
GOLDEN = tl.constexpr(0x9E3779B9)
TWO_POW_M23 = tl.constexpr(1.1920928955078125e-7)


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers (row_math.h), all uint32 with wrap-around.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mix32(h):
    h ^= h >> 16
    h *= MIX_MUL1
    h ^= h >> 15
    h *= MIX_MUL2
    h ^= h >> 16
    return h


@triton.jit
def _rng_row_key(seed, sample):
    """rng_row_key(seed, sample): ``seed`` int64 (its uint64 bits), ``sample`` uint32."""
    h = _mix32(seed.to(tl.uint32) ^ GOLDEN)  # int -> narrower int truncates: the low 32 bits
    h = _mix32(h ^ (seed >> 32).to(tl.uint32))  # bits 32..63 whatever the shift fills in
    return _mix32(h ^ sample)


@triton.jit
def _gumbel(row_key, cols, use_gumbel):
    """G_j = -log(-log u_j), u_j = rng_uniform(rng_bits(row_key, j)), of the columns j (0 unless
    use_gumbel); ``row_key`` and ``cols`` broadcast against each other."""
    u = ((_mix32(row_key + cols.to(tl.uint32) * GOLDEN) >> 9).to(tl.float32) + 0.5) * TWO_POW_M23
    return tl.where(use_gumbel, -tl.log(-tl.log(u)), 0.0)


# ---------------------------------------------------------------------------------------------
# Row passes.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scaled(z, inv_temp):
    """x = z * (1 / T) in fp32, 1 / T rounded once per row (a division per element would cost
    twice the registers and spill)."""
    return z.to(tl.float32) * inv_temp


@triton.jit
def _key(x):
    """int32 key with the order of x (-0.0 as +0.0); -inf below every finite x."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ INT32_MAX)


@triton.jit
def _key_value(key):
    """The float whose _key is ``key``."""
    bits = tl.where(key >= 0, key, key ^ INT32_MAX)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _chunk_keys(logits_row, offs, vocab, inv_temp):
    """(x, _key(x)) of a chunk, x = _scaled(z) and -inf past the row's end (so never kept: every
    threshold is at least key(min finite x)); _scaled and _key inline."""
    z = tl.load(logits_row + offs, mask=offs < vocab, other=float("-inf"))
    x = z.to(tl.float32) * inv_temp
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return x, tl.where(bits >= 0, bits, bits ^ INT32_MAX)


@triton.jit
def _count_mass(logits_row, vocab, inv_temp, row_max, key_ge, BLOCK_V: tl.constexpr):
    """(#entries, sum exp(x - max)) over the entries with _key(x) >= key_ge (int32)."""
    cols = tl.arange(0, BLOCK_V)
    count = tl.zeros([BLOCK_V], tl.int32)
    mass = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        x, key = _chunk_keys(logits_row, start + cols, vocab, inv_temp)
        keep = key >= key_ge
        count += keep.to(tl.int32)
        mass += tl.where(keep, tl.exp2((x - row_max) * LOG2E), 0.0)
    return tl.sum(count, axis=0), tl.sum(mass, axis=0)


@triton.jit
def _bisect(logits_row, vocab, inv_temp, row_max, lo, hi, lo_mass, need_count, need_mass,
            BLOCK_V: tl.constexpr):
    """Largest key in [lo, hi] (int64) where the predicate holds, assuming it holds at lo:
    count >= need_count and mass >= need_mass (both monotone). Returns (key, its mass)."""
    while lo < hi:
        mid = lo + ((hi - lo + 1) >> 1)
        count, mass = _count_mass(logits_row, vocab, inv_temp, row_max, mid.to(tl.int32), BLOCK_V)
        ok = (count >= need_count) & (mass >= need_mass)
        lo = tl.where(ok, mid, lo)
        lo_mass = tl.where(ok, mass, lo_mass)
        hi = tl.where(ok, hi, mid - 1)
    return lo, lo_mass


@triton.jit
def _draw_one(logits_row, vocab, inv_temp, thr_key, row_key, use_gumbel, BLOCK_V: tl.constexpr):
    """argmax over j with _key(x_j) >= thr_key of x_j + G_j (G = 0 unless use_gumbel), lower
    id on ties. Returns the id (int32)."""
    cols = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        x, key = _chunk_keys(logits_row, offs, vocab, inv_temp)
        kept = key >= thr_key
        score = tl.where(kept, x + _gumbel(row_key, offs, use_gumbel), float("-inf"))
        # Strictly greater: each lane sees increasing ids, so it keeps its first best.
        better = score > best
        best = tl.where(better, score, best)
        best_id = tl.where(better, offs, best_id)
    top = tl.max(best, axis=0)
    # Lanes that never saw a kept entry hold -inf < top (the row has a finite kept entry). Ids
    # only ever come from in-range columns (masked ones score -inf or NaN, never better), so even
    # a row the caller must reject (NaN, +inf: nothing wins) gives id 0, never -1 or >= vocab.
    return tl.min(tl.where(best == top, best_id, INT32_MAX), axis=0)


@triton.jit
def _draw(logits_row, vocab, inv_temp, thr_key, seed, s0, use_gumbel, BLOCK_V: tl.constexpr,
          S_BLOCK: tl.constexpr):
    """Draws s0 .. s0 + S_BLOCK - 1 of the row ([S_BLOCK] int32 ids), as _draw_one with the keys
    rng_row_key(seed, s). With S_BLOCK > 1 each chunk of the row is loaded once for all the
    draws, scored as an [S_BLOCK, BLOCK_V] tile; S_BLOCK == 1 keeps the 1-D chunk (a 2-D tile of
    one row costs registers and a shared-memory layout conversion on GPU)."""
    if S_BLOCK == 1:
        row_key = _rng_row_key(seed, tl.cast(s0, tl.uint32))
        token = _draw_one(logits_row, vocab, inv_temp, thr_key, row_key, use_gumbel, BLOCK_V)
        return tl.zeros([S_BLOCK], tl.int32) + token
    else:
        row_keys = _rng_row_key(seed, (s0 + tl.arange(0, S_BLOCK)).to(tl.uint32))
        cols = tl.arange(0, BLOCK_V)
        best = tl.full([S_BLOCK, BLOCK_V], float("-inf"), tl.float32)
        best_id = tl.zeros([S_BLOCK, BLOCK_V], tl.int32)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            x, key = _chunk_keys(logits_row, offs, vocab, inv_temp)
            kept = key >= thr_key
            g = _gumbel(row_keys[:, None], offs[None, :], use_gumbel)
            score = tl.where(kept[None, :], x[None, :] + g, float("-inf"))
            better = score > best
            best = tl.where(better, score, best)
            best_id = tl.where(better, offs[None, :], best_id)
        top = tl.max(best, axis=1)
        return tl.min(tl.where(best == top[:, None], best_id, INT32_MAX), axis=1)


@triton.jit
def _sample_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,
    tokens_ptr, logprobs_ptr, raw_logprobs_ptr, entropy_ptr, score_ptr, kept_min_ptr,
    inner, stride_outer, stride_inner, vocab, num_samples,
    adaptive, t_min, t_max, h_low, h_high,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, S_BLOCK: tl.constexpr, SCORE: tl.constexpr,
    KEPT_MIN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = _row_ptr(logits_ptr, row, inner, stride_outer, stride_inner)

    temp = tl.load(temperature_ptr + row)
    if adaptive != 0:
        _, _, h1 = _row_stats(logits_row, vocab, 1.0, BLOCK_V, VEC)
        span = h_high - h_low
        # span == 0: a step at h_high (as the CPU kernel), not 0 / 0.
        frac = tl.where(h1 >= h_high, 1.0, 0.0)
        if span > 0.0:
            frac = tl.minimum(tl.maximum(tl.math.div_rn(h1 - h_low, span), 0.0), 1.0)
        temp = t_min + (t_max - t_min) * frac
    stochastic = temp != 0.0  # T == 0: greedy, statistics at T = 1
    inv_temp = tl.math.div_rn(1.0, tl.where(stochastic, temp, 1.0))

    row_max, log_sum, entropy, sum_exp, x_min, n_finite = _row_stats(
        logits_row, vocab, inv_temp, BLOCK_V, VEC, RANGE=True)
    tl.store(entropy_ptr + row, entropy)

    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    key_min = _key(x_min).to(tl.int64)
    key_max = _key(row_max).to(tl.int64)

    # Top-k: the largest key with count{key >= t} >= top_k. top_k >= #finite keeps every
    # finite entry, the same set as threshold -inf (-inf entries never win a draw).
    k_active = (top_k > 0) & (top_k < n_finite) & stochastic
    lo = key_min
    lo, kept_mass = _bisect(logits_row, vocab, inv_temp, row_max, lo, tl.where(k_active, key_max, lo),
                            sum_exp, top_k, 0.0, BLOCK_V)
    # Top-p over the top-k survivors: the largest key >= t_k with mass >= top_p * mass(t_k).
    p_active = (top_p < 1.0) & stochastic
    lo, kept_mass = _bisect(logits_row, vocab, inv_temp, row_max, lo, tl.where(p_active, key_max, lo),
                            kept_mass, 0, top_p * kept_mass, BLOCK_V)
    thr_key = lo.to(tl.int32)
    # Min-p from the max, never above the max (so the kept set is never empty).
    if (min_p > 0.0) & stochastic:
        minp_key = tl.minimum(_key(row_max + tl.log(min_p)), key_max.to(tl.int32))
        if minp_key > thr_key:
            thr_key = minp_key
            _, kept_mass = _count_mass(logits_row, vocab, inv_temp, row_max, thr_key, BLOCK_V)
    log_kept = tl.log(kept_mass)
    if KEPT_MIN:
        # The threshold on x; one at the smallest finite x filters nothing (-inf); greedy: the max.
        filtered = tl.where(thr_key > key_min, _key_value(thr_key), float("-inf"))
        tl.store(kept_min_ptr + row, tl.where(stochastic, filtered, row_max))

    if SCORE:
        # Score mode: the given token, scored as a draw of it (same expressions, so bit for bit);
        # -inf outside the kept set (greedy: all but the first maximum), NaN for an id outside [0, V).
        token = tl.load(score_ptr + row)
        in_range = (token >= 0) & (token < vocab)
        x_tok = _scaled(tl.load(logits_row + tl.where(in_range, token, 0)), inv_temp)
        kept = _key(x_tok) >= thr_key
        if temp == 0.0:  # greedy: only the first maximum is kept (the token a greedy draw gives)
            kept = token == _draw_one(logits_row, vocab, inv_temp, thr_key, 0, False, BLOCK_V)
        logp = tl.where(kept, tl.where(stochastic, (x_tok - row_max) - log_kept, 0.0), float("-inf"))
        raw_logp = (x_tok - row_max) - log_sum
        tl.store(tokens_ptr + row, token)
        tl.store(logprobs_ptr + row, tl.where(in_range, logp, float("nan")))
        tl.store(raw_logprobs_ptr + row, tl.where(in_range, raw_logp, float("nan")))
    else:
        seed = tl.load(seed_ptr + row)
        out = row * num_samples
        samples = tl.arange(0, S_BLOCK)
        tokens = tl.zeros([S_BLOCK], tl.int32)
        logp = tl.zeros([S_BLOCK], tl.float32)
        raw_logp = tl.zeros([S_BLOCK], tl.float32)
        for s0 in range(0, num_samples, S_BLOCK):
            # Greedy rows draw once and repeat it.
            if (s0 == 0) | stochastic:
                tokens = _draw(logits_row, vocab, inv_temp, thr_key, seed, s0, stochastic, BLOCK_V, S_BLOCK)
                x_tok = _scaled(tl.load(logits_row + tokens), inv_temp)
                logp = tl.where(stochastic, (x_tok - row_max) - log_kept, 0.0)
                raw_logp = (x_tok - row_max) - log_sum
            s_offs = s0 + samples
            s_mask = s_offs < num_samples
            tl.store(tokens_ptr + out + s_offs, tokens.to(tl.int64), mask=s_mask)
            tl.store(logprobs_ptr + out + s_offs, logp, mask=s_mask)
            tl.store(raw_logprobs_ptr + out + s_offs, raw_logp, mask=s_mask)

# Score mode's compile options: without a register budget ptxas gives it 64 registers and a 16-byte
# stack on sm_80 (values kept across the division's slow-path call); with one, 93 and no stack.
SCORE_OPTIONS = {"maxnreg": 128}

# Draws per pass over a row: a [S_BLOCK, BLOCK_V] tile of scores at most this many elements. On
# GPU the 4096 of a single-draw chunk (large vocabularies draw one at a time); the interpreter
# pays per operation, not per element, so many draws of a small row share one pass there.
GPU_TILE = 4096
INTERPRET_TILE = 1 << 16


def sample_config(vocab, num_samples, on_gpu, block_v=None, s_block=None):
    """(BLOCK_V, S_BLOCK, num_warps) of a launch."""
    block, _ = block_config(vocab, on_gpu, block_v)
    if s_block is None:
        tile = GPU_TILE if on_gpu else INTERPRET_TILE
        s_block = min(triton.next_power_of_2(num_samples), max(tile // block, 1))
    _, num_warps = block_config(block * s_block, on_gpu, block * s_block)
    return block, s_block, num_warps


def sample(logits, layout, vocab, temperature, top_k, top_p, min_p, seed, num_samples, adaptive,
           t_min, t_max, h_low, h_high, tokens, logprobs, raw_logprobs, entropy, score_tokens=None, kept_min=None, *, block_v=None,
           s_block=None):
    """Draws ``num_samples`` tokens per row (kernels.h SampleArgs).

    ``logits`` is only the base pointer, rows described by ``layout``. Per row (contiguous):
    ``temperature``, ``top_p``, ``min_p`` fp32, ``top_k`` int32, ``seed`` int64 (its uint64
    bits). ``adaptive`` (bool) replaces the temperature by the entropy map over
    ``t_min, t_max, h_low, h_high``. Writes ``tokens`` int64 and ``logprobs``, ``raw_logprobs``
    fp32 (contiguous [rows, num_samples]) and ``entropy`` fp32 [rows]. ``block_v`` overrides the
    vocab chunk and ``s_block`` the draws per pass (powers of two), e.g. to test multi-chunk rows
    and partial draw blocks at small sizes; the results do not depend on either. ``score_tokens``
    (int64 [rows], num_samples 1): score these instead of drawing; ``kept_min`` (fp32 [rows]): the
    rows' thresholds (kernels.h SampleArgs).
    """
    rows, inner, stride_outer, stride_inner = layout
    if rows == 0 or num_samples == 0:
        return
    score_pointer, score = optional_rows(score_tokens, tokens)
    kept_min_pointer, write_kept_min = optional_rows(kept_min, entropy)
    block, s_block, num_warps = sample_config(vocab, num_samples, logits.device.type != "cpu",
                                              block_v, s_block)
    _sample_kernel[(rows,)](
        logits, temperature, top_k, top_p, min_p, seed,
        tokens, logprobs, raw_logprobs, entropy,
        score_pointer, kept_min_pointer,
        inner, stride_outer, stride_inner, vocab, int(num_samples),
        int(bool(adaptive)), float(t_min), float(t_max), float(h_low), float(h_high),
        BLOCK_V=block, VEC=min(16 // logits.element_size(), block), S_BLOCK=s_block,
        SCORE=score, KEPT_MIN=write_kept_min, num_warps=num_warps, **(SCORE_OPTIONS if score else {}),
    )


def _aot_kernels():
    sig = {
        "logits_ptr": "*{dtype}", "temperature_ptr": "*fp32", "top_k_ptr": "*i32",
        "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "seed_ptr": "*i64",
        "tokens_ptr": "*i64", "logprobs_ptr": "*fp32", "raw_logprobs_ptr": "*fp32",
        "entropy_ptr": "*fp32", "score_ptr": "*i64", "kept_min_ptr": "*fp32",
        **layout_signature(""), "vocab": "i32", "num_samples": "i32", "adaptive": "i32",
        "t_min": "fp32", "t_max": "fp32", "h_low": "fp32", "h_high": "fp32",
        "BLOCK_V": "constexpr", "VEC": "constexpr", "S_BLOCK": "constexpr", "SCORE": "constexpr",
        "KEPT_MIN": "constexpr",
    }
    entries = []
    # bf16 and fp32 cover both load widths at the launcher's GPU configuration for a large
    # vocabulary (one draw per pass, any num_samples); the last entry is its configuration for
    # many draws from a small row (16 draws per pass over V = 256).
    # The last is score mode with the thresholds written (filtered log-probs, bf16 large vocabulary).
    for dtype, vocab, num_samples, score in (("bf16", AOT_VOCAB, 1, False), ("fp32", AOT_VOCAB, 1, False),
                                             ("bf16", 256, 16, False), ("bf16", AOT_VOCAB, 1, True)):
        block, s_block, num_warps = sample_config(vocab, num_samples, on_gpu=True)
        tag = dtype if s_block == 1 else f"{dtype},S_BLOCK={s_block}"
        tag += ",SCORE" if score else ""
        entries.append(aot_kernel(
            f"sample[{tag}]", _sample_kernel, sig, dtype, True, num_warps,
            {"BLOCK_V": block, "VEC": vec_width(dtype), "S_BLOCK": s_block, "SCORE": score, "KEPT_MIN": score},
            options=SCORE_OPTIONS if score else {}))
    return entries


# Specialisations compiled by aot.py (every entry costs compile time in CI).
AOT_KERNELS = _aot_kernels()
