// Full-vocabulary KL divergence between two logit rows on the GPU (docs/SPEC.md section 5, last
// bullet; kernels.h KlDivFwdArgs / KlDivBwdArgs).
//
// One block per row pair, as in row_kernels.cuh: the forward reads both rows once, keeping per
// thread online statistics of both softmaxes and the cross term (re-centred per chunk with
// row_kernels' recentre(), as its ThreadStats), then row_kernels' fixed-order block_reduce merges
// them (KlMerge); the backward reads both rows once more and writes the requested gradients once.
// No atomics: results are bitwise reproducible.
//
// The kernels only compute the forward direction, KL(p || q) with p from the first row. The
// reverse direction KL(q || p) is the forward one of the swapped pair, and so are its gradients
//   dKL(q||p)/dy = q (log q - log p - KL),  dKL(q||p)/dx = p - q,
// so the host entry points swap (logits, other), their layouts, lse's and gradients, and the
// kernels need one cross term, not two.
//
// Numerics:
// - The statistics of x and y go through the very same code (same thread split, same order, same
//   exponentials, no contraction freedom: _rn intrinsics where the compiler could fuse), so
//   identical rows give sum_p == sum_q and max_p == max_q bitwise, and a cross term of exact zeros:
//   KL is exactly 0, and so is every gradient element.
// - KL = E_p[(x - max_p) - (y - max_q)] - log(sum_p / sum_q), which is E_p[x - y] - lse_p + lse_q
//   without the rounding of large lse's and of E_p[x - y] (~1e-6 each for |logits| ~ 20) that
//   would swamp a small KL: a one-entry row, or y = x + c, gives 0 (up to exp rounding).
// - Exponents are exp2((z - ref) * log2(e) / T), the subtraction first, so every chunk of a thread
//   sits on exactly the reference its rescale assumes (an fma with a rounded ref * log2(e) / T
//   would shift each chunk by up to ~1e-6 in log space).
// - A cross term whose exponential is 0 adds nothing (0 * inf := 0): -inf in both rows is no
//   support, x finite with y = -inf makes the cross term, and the forward KL, +inf. A +inf cross
//   term survives later rescales (inf * 0 would be NaN). NaN or +inf anywhere in either row, or a
//   row that is -inf everywhere (no distribution), gives NaN.
// - Backward rows with grad_kl == 0 (masked) are written as zeros without reading the logits, as in
//   policy_loss.cu: cheaper, and garbage in masked rows cannot leak NaN into the gradient.
//
// Two rows and up to two gradients walk in step, so 16-byte vectors need all of them at the same
// 16-byte phase (true for same-shaped contiguous tensors); otherwise the row is walked with
// scalar, still coalesced, accesses in chunks whose loads come before any arithmetic or store.

#include <utility>

#include "row_kernels.cuh"

#include "rlfuse/cuda_kernels.h"

namespace rlfuse {
namespace {

using namespace row_kernels;  // NOLINT(build/namespaces): this file's own building blocks

// 16-byte loads per row in flight per thread: two rows, so as many bytes in flight as the single
// row kernels' kUnroll, at the same register budget.
constexpr int kPairUnroll = kUnroll / 2;
constexpr int kScalarChunk = 8;  // scalar fallback: elements per row loaded before use

// t * s for a rescale factor s in [0, 1], keeping t = +inf (a support mismatch) at +inf.
__device__ __forceinline__ float rescale_cross(float t, float s) {
  return t == INFINITY ? t : __fmul_rn(t, s);
}

// ---- forward statistics -----------------------------------------------------------------------

// Partial statistics of one row pair, in x units: x = logits / T (p), y = other / T (q),
//   max_p = max x, sum_p = sum exp(x - max_p),
//   cross = sum exp(x - max_p) * ((x - max_p) - (y - max_q))  (terms with exp(x - max_p) = 0
//           dropped), so that E_p[x - y] = cross / sum_p + max_p - max_q,
//   max_q = max y, sum_q = sum exp(y - max_q).
// Keeping the cross term shifted, as row_math keeps `dot`, makes KL = cross / sum_p -
// log(sum_p / sum_q): no cancellation between E_p[x - y] and max_p - max_q (a 1-entry row, or
// y = x + c, gives exactly 0). A NaN half has max NaN. Empty: max -inf, sums and cross 0.
struct KlStats {
  float max_p;
  float sum_p;
  float cross;
  float max_q;
  float sum_q;
};

// The common maximum of two partial maxima and the factors that rebase each side onto it.
struct CommonMax {
  float max;
  float scale_a;
  float scale_b;
};

__device__ __forceinline__ CommonMax common_max(float a, float b) {
  if (a != a || b != b) return CommonMax{NAN, NAN, NAN};
  const float m = fmaxf(a, b);
  if (m == -INFINITY) return CommonMax{m, 0.0f, 0.0f};  // both empty: sums stay 0
  return CommonMax{m, expf(a - m), expf(b - m)};        // exactly 1 for the side holding m
}

// `s.cross` re-expressed relative to the maxima (max_p, max_q) >= (s.max_p, s.max_q), scaled by
// `scale` = exp(s.max_p - max_p). No p mass (s.max_p = -inf) means no cross terms. A partial with
// p mass but no q mass has cross = +inf, which stays +inf (or NaN where q has no mass at all).
__device__ __forceinline__ float rebase_cross(const KlStats& s, float max_p, float max_q,
                                              float scale) {
  if (s.max_p == -INFINITY) return 0.0f;
  const float shift = __fsub_rn(__fsub_rn(s.max_p, max_p), __fsub_rn(s.max_q, max_q));
  return rescale_cross(fmaf(s.sum_p, shift, s.cross), scale);
}

// Merges two partial summaries (for block_reduce); p and q go through identical code.
struct KlMerge {
  static __device__ __forceinline__ KlStats identity() {
    return KlStats{-INFINITY, 0.0f, 0.0f, -INFINITY, 0.0f};
  }
  static __device__ __forceinline__ KlStats merge(const KlStats& a, const KlStats& b) {
    const CommonMax p = common_max(a.max_p, b.max_p);
    const CommonMax q = common_max(a.max_q, b.max_q);
    KlStats s;
    s.max_p = p.max;
    s.sum_p = __fadd_rn(__fmul_rn(a.sum_p, p.scale_a), __fmul_rn(b.sum_p, p.scale_b));
    s.cross = __fadd_rn(rebase_cross(a, p.max, q.max, p.scale_a),
                        rebase_cross(b, p.max, q.max, p.scale_b));
    s.max_q = q.max;
    s.sum_q = __fadd_rn(__fmul_rn(a.sum_q, q.scale_a), __fmul_rn(b.sum_q, q.scale_b));
    return s;
  }
};

// One thread's statistics, kept on the raw logits (z of the first row, w of the second) as
// ThreadStats does, relative to the references ref = max, or 0 while the max is -inf. add() takes
// a chunk of element pairs: one rescale per chunk, then independent exponentials.
struct KlThreadStats {
  float max_z = -INFINITY;
  float sum_p = 0.0f;    // sum exp((z - ref_z) / T)
  float cross_z = 0.0f;  // sum exp((z - ref_z) / T) * ((z - ref_z) - (w - ref_w))
  float max_w = -INFINITY;
  float sum_q = 0.0f;    // sum exp((w - ref_w) / T)

  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N], const float (&w)[N], float inv_temp) {
    const float new_max_z = chunk_max(max_z, z);
    const float new_max_w = chunk_max(max_w, w);
    const Recentre cz = recentre(max_z, new_max_z, inv_temp);
    const Recentre cw = recentre(max_w, new_max_w, inv_temp);
    const float ref_z = cz.ref;
    const float ref_w = cw.ref;
    // Each earlier cross term moves by (old_ref_z - ref_z) - (old_ref_w - ref_w): 0 if both held.
    cross_z = rescale_cross(fmaf(sum_p, __fsub_rn(cz.shift, cw.shift), cross_z), cz.rescale);
    sum_p = __fmul_rn(sum_p, cz.rescale);
    sum_q = __fmul_rn(sum_q, cw.rescale);
    max_z = new_max_z;
    max_w = new_max_w;
    const float scale = inv_temp * kLog2e;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // Subtracting first (not fma(z, scale, -ref_z * scale)) keeps every chunk on exactly the
      // reference that the rescale and the cross term use; the max gets 2^0.
      const float a = __fsub_rn(z[k], ref_z);
      const float b = __fsub_rn(w[k], ref_w);
      const float e_p = fast_exp2(__fmul_rn(a, scale));  // exp((z - ref_z) / T)
      const float e_q = fast_exp2(__fmul_rn(b, scale));
      sum_p = __fadd_rn(sum_p, e_p);
      sum_q = __fadd_rn(sum_q, e_q);
      // e_p = 0 adds nothing, so z = -inf (with any w) never makes -inf - -inf or 0 * inf;
      // w = -inf with e_p > 0 makes the cross term +inf.
      cross_z = e_p == 0.0f ? cross_z : fmaf(e_p, __fsub_rn(a, b), cross_z);
    }
  }

  // In x units (a NaN sum moves into its half's max: stats_max()).
  __device__ __forceinline__ KlStats stats(float inv_temp) const {
    return KlStats{stats_max(max_z, sum_p, inv_temp), sum_p, cross_z * inv_temp,
                   stats_max(max_w, sum_q, inv_temp), sum_q};
  }
};

// The walk of a row pair without a common 16-byte boundary: scalar, coalesced, kScalarChunk
// elements of each row (kBlock apart) loaded before any use, then the rest one at a time. Hands
// each chunk to visit(z, w, col0), element u of a chunk at column col0 + u * kBlock.
template <typename T, int kBlock, typename Visit>
__device__ __forceinline__ void walk_pair_scalar(const T* logits, const T* other, int64_t vocab,
                                                 int tid, Visit&& visit) {
  int64_t col = tid;
  for (; col + (kScalarChunk - 1) * kBlock < vocab; col += kScalarChunk * kBlock) {
    float z[kScalarChunk];
    float w[kScalarChunk];
#pragma unroll
    for (int u = 0; u < kScalarChunk; ++u) {
      z[u] = to_float(logits[col + u * kBlock]);
      w[u] = to_float(other[col + u * kBlock]);
    }
    visit(z, w, col);
  }
  for (; col < vocab; col += kBlock) {
    const float z[1] = {to_float(logits[col])};
    const float w[1] = {to_float(other[col])};
    visit(z, w, col);
  }
}

// Statistics of one row pair, by the whole block; valid in thread 0.
template <typename T, int kBlock>
__device__ __forceinline__ KlStats pair_stats(const T* logits, const T* other, int64_t vocab,
                                              float inv_temp, KlStats* warp_stats) {
  const int tid = threadIdx.x;
  KlThreadStats thread_stats;

  const uintptr_t phase = reinterpret_cast<uintptr_t>(logits) ^ reinterpret_cast<uintptr_t>(other);
  if (phase % kVecBytes != 0) {
    const auto add = [&](const auto& z, const auto& w, int64_t) {
      thread_stats.add(z, w, inv_temp);
    };
    walk_pair_scalar<T, kBlock>(logits, other, vocab, tid, add);
  } else {
    const T* const rows[2] = {logits, other};
    walk_rows<T, kBlock, kPairUnroll>(rows, vocab, tid, [&](const auto& z, int64_t, int64_t) {
      thread_stats.add(z[0], z[1], inv_temp);
    });
  }
  return block_reduce<kBlock, KlMerge>(thread_stats.stats(inv_temp), warp_stats);
}

// KL(p || q) and both lse's; lse = max + log(sum) as row_math's finalize().
struct KlResult {
  float kl;
  float lse_p;
  float lse_q;
};

__device__ __forceinline__ KlResult finalize_kl(const KlStats& s) {
  KlResult r;
  r.lse_p = s.max_p + logf(s.sum_p);
  r.lse_q = s.max_q + logf(s.sum_q);
  // E_p[x - y] - lse_p + lse_q with the maxima cancelled exactly. No p mass gives 0 / 0, no q
  // mass a NaN cross term (rebase_cross): NaN either way.
  r.kl = s.cross / s.sum_p - logf(s.sum_p / s.sum_q);
  return r;
}

template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kBlock>) kl_div_fwd_kernel(KlDivFwdArgs args) {
  __shared__ KlStats warp_stats[kBlock / kWarpSize];

  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {
    const T* logits = row_pointer<T>(args.logits, args.layout, row);
    const T* other = row_pointer<T>(args.other, args.other_layout, row);
    const float inv_temp = row_inv_temp(args, row);
    const KlStats stats = pair_stats<T, kBlock>(logits, other, args.vocab, inv_temp, warp_stats);
    if (threadIdx.x == 0) {
      const KlResult result = finalize_kl(stats);
      args.kl[row] = result.kl;
      args.lse[row] = result.lse_p;
      args.other_lse[row] = result.lse_q;
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------

// Gradients of KL(p || q) for one element pair, times g = grad_kl / T:
//   d/dz = g p (log p - log q - KL)  (0 where p = 0),  d/dw = g (q - p).
// kRowTemps: 1/T is the row's, held in a register where the kernel's scalar parameter was a
// constant operand; the exponents are then formed as (z / T - lse) * log2(e), with no register for
// log2(e)/T, which keeps the float kernel writing both gradients within 64 registers (one more
// rounding than z * log2(e)/T - lse * log2(e), the scalar path's, kept bitwise as it was).
template <bool kRowTemps>
struct KlElementGrad {
  float scale;     // log2(e) / T (unused with kRowTemps)
  float shift_p;   // lse_p * log2(e), or lse_p with kRowTemps
  float shift_q;   // lse_q * log2(e), or lse_q with kRowTemps
  float inv_temp;
  float offset;    // lse_p - lse_q + KL: log p - log q - KL = (z - w) / T - offset
  float g;         // grad_kl / T

  __device__ __forceinline__ KlElementGrad(float grad_kl, float kl, float lse_p, float lse_q,
                                           float inv_temp_)
      : scale(inv_temp_ * kLog2e),
        shift_p(kRowTemps ? lse_p : lse_p * kLog2e),
        shift_q(kRowTemps ? lse_q : lse_q * kLog2e),
        inv_temp(inv_temp_),
        offset((lse_p - lse_q) + kl),
        g(grad_kl * inv_temp_) {}

  // log2 of the probability of logit v under the softmax whose lse is behind `shift`.
  __device__ __forceinline__ float log2_prob(float v, float shift) const {
    return kRowTemps ? __fmul_rn(fmaf(v, inv_temp, -shift), kLog2e) : fmaf(v, scale, -shift);
  }

  // _rn: no FMA contraction, so the vector and scalar copies round alike.
  __device__ __forceinline__ float2 operator()(float z, float w) const {
    const float p = fast_exp2(log2_prob(z, shift_p));  // NaN stays NaN
    const float q = fast_exp2(log2_prob(w, shift_q));
    const float bracket = fmaf(__fsub_rn(z, w), inv_temp, -offset);
    float2 grad;
    grad.x = p == 0.0f ? 0.0f : __fmul_rn(__fmul_rn(g, p), bracket);
    grad.y = __fmul_rn(g, __fsub_rn(q, p));
    return grad;
  }
};

// Writes one row pair's gradients (those enabled), by the whole block. Any output may alias the
// input it has the layout of (in-place): no __restrict__, every element pair is read by the thread
// that writes its gradients, before it writes them.
template <typename T, int kBlock, bool kGradP, bool kGradQ, typename ElementGrad>
__device__ __forceinline__ void pair_grad(const T* logits, const T* other, T* grad_p, T* grad_q,
                                          int64_t vocab, const ElementGrad& element_grad) {
  using Vec = Pack<T>;
  constexpr int kSize = Vec::kSize;
  const int tid = threadIdx.x;
  const auto store = [&](int64_t col, float2 g) {
    if constexpr (kGradP) grad_p[col] = from_float<T>(g.x);
    if constexpr (kGradQ) grad_q[col] = from_float<T>(g.y);
  };
  const auto scalar_grad = [&](int64_t col) {
    store(col, element_grad(to_float(logits[col]), to_float(other[col])));
  };

  const auto address = [](const void* pointer) { return reinterpret_cast<uintptr_t>(pointer); };
  uintptr_t phase = address(logits) ^ address(other);
  if constexpr (kGradP) phase |= address(logits) ^ address(grad_p);
  if constexpr (kGradQ) phase |= address(logits) ^ address(grad_q);
  if (phase % kVecBytes != 0) {
    // All of a chunk's loads before its stores.
    const auto chunk_grad = [&](const auto& z, const auto& w, int64_t col) {
#pragma unroll
      for (int u = 0; u < chunk_size<decltype(z)>; ++u) {
        store(col + u * kBlock, element_grad(z[u], w[u]));
      }
    };
    walk_pair_scalar<T, kBlock>(logits, other, vocab, tid, chunk_grad);
    return;
  }

  const RowSplit split = split_row(logits, vocab);  // the same split for every row of the pair
  if (tid < split.head) scalar_grad(tid);
  if (tid < vocab - split.tail) scalar_grad(split.tail + tid);

  const Vec* z_vecs = reinterpret_cast<const Vec*>(logits + split.head);
  const Vec* w_vecs = reinterpret_cast<const Vec*>(other + split.head);
  Vec* gp_vecs = kGradP ? reinterpret_cast<Vec*>(grad_p + split.head) : nullptr;
  Vec* gq_vecs = kGradQ ? reinterpret_cast<Vec*>(grad_q + split.head) : nullptr;
  const auto vector_grad = [&](const Vec& z_pack, const Vec& w_pack, int64_t index) {
    Vec gp;
    Vec gq;
#pragma unroll
    for (int k = 0; k < kSize; ++k) {
      const float2 g = element_grad(to_float(z_pack.v[k]), to_float(w_pack.v[k]));
      gp.v[k] = from_float<T>(g.x);
      gq.v[k] = from_float<T>(g.y);
    }
    if constexpr (kGradP) gp_vecs[index] = gp;
    if constexpr (kGradQ) gq_vecs[index] = gq;
  };

  int64_t i = tid;
  for (; i + (kPairUnroll - 1) * kBlock < split.vectors; i += kPairUnroll * kBlock) {
    // All loads before any store: with possible aliasing the compiler may not reorder them.
    Vec z_pack[kPairUnroll];
    Vec w_pack[kPairUnroll];
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) {
      z_pack[u] = load(z_vecs + i + u * kBlock);
      w_pack[u] = load(w_vecs + i + u * kBlock);
    }
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) vector_grad(z_pack[u], w_pack[u], i + u * kBlock);
  }
  for (; i < split.vectors; i += kBlock) vector_grad(load(z_vecs + i), load(w_vecs + i), i);
}

// kRowTemps: args.inv_temps is given; without it 1/T is the kernel's scalar parameter, as before
// per-row temperatures existed (KlElementGrad).
template <typename T, int kBlock, bool kGradP, bool kGradQ, bool kRowTemps>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kBlock>) kl_div_bwd_kernel(KlDivBwdArgs args) {
  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {
    T* grad_p = nullptr;
    T* grad_q = nullptr;
    if constexpr (kGradP) grad_p = row_pointer<T>(args.grad_logits, args.grad_layout, row);
    if constexpr (kGradQ) grad_q = row_pointer<T>(args.grad_other, args.grad_other_layout, row);
    const float grad_kl = args.grad_kl[row];  // the same for the whole block: no divergence
    if (grad_kl == 0.0f) {
      if constexpr (kGradP) row_zero<T, kBlock>(grad_p, args.vocab);
      if constexpr (kGradQ) row_zero<T, kBlock>(grad_q, args.vocab);
      continue;
    }
    const T* logits = row_pointer<T>(args.logits, args.layout, row);
    const T* other = row_pointer<T>(args.other, args.other_layout, row);
    const float inv_temp = kRowTemps ? args.inv_temps[row] : args.inv_temp;
    const KlElementGrad<kRowTemps> element_grad(grad_kl, args.kl[row], args.lse[row],
                                                args.other_lse[row], inv_temp);
    pair_grad<T, kBlock, kGradP, kGradQ>(logits, other, grad_p, grad_q, args.vocab, element_grad);
  }
}

// ---- launch -----------------------------------------------------------------------------------

struct FwdLauncher {
  template <typename T, int kBlock>
  static void launch(const KlDivFwdArgs& args, unsigned grid, cudaStream_t stream) {
    kl_div_fwd_kernel<T, kBlock><<<grid, kBlock, 0, stream>>>(args);
  }
};

struct BwdLauncher {
  template <typename T, int kBlock>
  static void launch(const KlDivBwdArgs& args, unsigned grid, cudaStream_t stream) {
    with_flag(args.inv_temps != nullptr, [&](auto row_temps) {
      with_requested_grads(args, [&](auto grad_p, auto grad_q) {
        kl_div_bwd_kernel<T, kBlock, grad_p, grad_q, row_temps><<<grid, kBlock, 0, stream>>>(args);
      });
    });
  }
};

bool valid_direction(int direction) { return direction == kKlForward || direction == kKlReverse; }

// The row pair oriented so that the kernels' KL(first || second) is the requested KL.
KlDivFwdArgs oriented(KlDivFwdArgs args) {
  if (args.direction == kKlReverse) {
    std::swap(args.logits, args.other);
    std::swap(args.layout, args.other_layout);
    std::swap(args.lse, args.other_lse);
    args.direction = kKlForward;
  }
  return args;
}

KlDivBwdArgs oriented(KlDivBwdArgs args) {
  if (args.direction == kKlReverse) {
    std::swap(args.logits, args.other);
    std::swap(args.layout, args.other_layout);
    std::swap(args.lse, args.other_lse);
    std::swap(args.grad_logits, args.grad_other);
    std::swap(args.grad_layout, args.grad_other_layout);
    args.direction = kKlForward;
  }
  return args;
}

}  // namespace

int kl_div_fwd_cuda(const KlDivFwdArgs& args, void* stream) {
  if (!valid_direction(args.direction) || !same_rows(args.layout, args.other_layout)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return dispatch<FwdLauncher>(oriented(args), stream);
}

int kl_div_bwd_cuda(const KlDivBwdArgs& args, void* stream) {
  if (!valid_direction(args.direction)) return static_cast<int>(cudaErrorInvalidValue);
  return launch_pair_backward(args, [&] { return dispatch<BwdLauncher>(oriented(args), stream); });
}

}  // namespace rlfuse
