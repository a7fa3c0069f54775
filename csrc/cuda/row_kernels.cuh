// Device building blocks shared by the row kernels in csrc/cuda (docs/SPEC.md sections 1-2): element
// access, the row walk, block reductions generic over the statistics type, the block-wide row
// statistics pass (every op's: token log-probs, policy loss, sampling, top-k; the KL's pair
// statistics reuse the walk, the re-centring and the reductions), the row gradient pass, and the
// host-side launch dispatch. Included by .cu files only; everything is a template or inline.
//
// One thread block owns one row at a time (blocks loop over rows past kMaxGrid). The statistics
// pass reads each logit once: every thread keeps online softmax statistics over its elements, then
// a fixed-order block reduction merges them. The gradient pass reads each logit once and writes
// its gradient once. No atomics anywhere, so results are bitwise reproducible.
//
// A row is walked as [scalar head | 16-byte vectors | scalar tail]; the head (shorter than one
// vector) brings the vectors to a 16-byte boundary, so any row stride still gets vector loads.
//
// The per-element math is row_math.h's, re-arranged for the GPU: exponentials run as exp2 on the
// special function unit (ex2.approx, 2 ulp), with 1/T and log2(e) folded into one FFMA. Both passes
// then cost ~8 SASS instructions per element (the literal push()/grad_element(), with an IEEE expf
// each, cost ~13 and ~18), which leaves bf16 rows issue headroom at H200/B200-class bandwidth, not
// just at H100's.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "rlfuse/kernels.h"
#include "rlfuse/row_math.h"

namespace rlfuse {
namespace row_kernels {

constexpr int kVecBytes = 16;
constexpr int kUnroll = 4;                     // 16-byte loads in flight per thread
constexpr int kWarpSize = 32;
constexpr int kLargeBlock = 512;               // V ~ 150K bf16: ~37 vectors per thread
constexpr int kSmallBlock = 128;               // short rows: fewer idle threads, cheaper reduction
constexpr int64_t kLargeRowBytes = 64 * 1024;  // rows at least this long use kLargeBlock
constexpr int64_t kMaxGrid = 65535;            // more rows than this: blocks loop over rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kMinLog2Prob = -160.0f;        // 2^-160 is 0 in fp32 (even as a subnormal)

// Blocks per SM the kernels are compiled for: 1024 resident threads, so at most 64 registers.
template <int kBlock>
constexpr int kMinBlocks = 1024 / kBlock;

// ---- element access ---------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16 bytes of logits, loaded or stored as one vector.
template <typename T>
struct alignas(kVecBytes) Pack {
  static constexpr int kSize = kVecBytes / sizeof(T);
  T v[kSize];
};

// One 16-byte load. Reading a Pack member-wise through a reference compiles to one load per
// element; this never does.
template <typename T>
__device__ __forceinline__ Pack<T> load(const Pack<T>* address) {
  static_assert(sizeof(Pack<T>) == sizeof(uint4), "a Pack is one 16-byte vector");
  const uint4 bits = *reinterpret_cast<const uint4*>(address);
  Pack<T> pack;
  memcpy(&pack, &bits, sizeof(pack));
  return pack;
}

template <typename T>
__device__ __forceinline__ void unpack(const Pack<T>& pack, float* z) {
#pragma unroll
  for (int k = 0; k < Pack<T>::kSize; ++k) z[k] = to_float(pack.v[k]);
}

// A row split so that [head, tail) is whole 16-byte vectors. Logits pointers are always
// element-aligned (torch guarantees it), so the head is shorter than one vector.
struct RowSplit {
  int head;         // scalar elements before the first aligned vector
  int64_t vectors;  // 16-byte vectors in [head, tail)
  int64_t tail;     // first scalar element after the vectors
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int64_t vocab) {
  constexpr int64_t kSize = Pack<T>::kSize;
  const auto element_address = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) / sizeof(T));
  const int64_t to_boundary = -element_address & (kSize - 1);  // elements to the next boundary
  RowSplit split;
  split.head = static_cast<int>(to_boundary < vocab ? to_boundary : vocab);
  split.vectors = (vocab - split.head) / kSize;
  split.tail = split.head + split.vectors * kSize;
  return split;
}

template <typename T>
__device__ __forceinline__ const T* row_pointer(const void* base, const RowLayout& layout,
                                                int64_t row) {
  return static_cast<const T*>(base) +
         row_offset(row, layout.inner, layout.stride_outer, layout.stride_inner);
}

template <typename T>
__device__ __forceinline__ T* row_pointer(void* base, const RowLayout& layout, int64_t row) {
  return static_cast<T*>(base) +
         row_offset(row, layout.inner, layout.stride_outer, layout.stride_inner);
}

// 2^x on the special function unit; results below 2^-126 flush to 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// threadIdx.x, read where it is used: values derived from it are not hoisted out of a row loop
// and held in registers through the passes (kernels at the register cap would spill them).
__device__ __forceinline__ int thread_index() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  return tid;
}

// ---- row walk ---------------------------------------------------------------------------------

// The number of elements of a chunk a visitor is handed (z is `const float (&)[N]`).
template <typename Z>
constexpr int chunk_size = static_cast<int>(std::extent<std::remove_reference_t<Z>>::value);

// Walks kRows rows of the same 16-byte phase in step, by the whole block: the head element and the
// tail element of this thread (each shorter than one vector: one element per thread at most),
// then kLoads 16-byte vectors of every row per step (all loads before any use), then the
// remaining vectors. Hands every chunk to visit(z, col0, stride): z[r][m] is row r's element at
// column col0 + (m / kSize) * stride + m % kSize (a single element: column col0). Every pass over
// a row walks it this way, so each thread sees the same elements in the same order in every pass.
// `tid` is threadIdx.x, or thread_index() in a kernel at the register cap that must not hold
// values derived from it across passes.
template <typename T, int kBlock, int kLoads, int kRows, typename Visit>
__device__ __forceinline__ void walk_rows(const T* const (&rows)[kRows], int64_t vocab, int tid,
                                          Visit&& visit) {
  using Vec = Pack<T>;
  constexpr int kSize = Vec::kSize;
  const RowSplit split = split_row(rows[0], vocab);  // the same split for every row
  const auto element = [&](int64_t col) {
    float z[kRows][1];
#pragma unroll
    for (int r = 0; r < kRows; ++r) z[r][0] = to_float(rows[r][col]);
    visit(z, col, int64_t{0});
  };
  if (tid < split.head) element(tid);
  if (tid < vocab - split.tail) element(split.tail + tid);

  const Vec* vecs[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) vecs[r] = reinterpret_cast<const Vec*>(rows[r] + split.head);
  int64_t i = tid;
  for (; i + (kLoads - 1) * kBlock < split.vectors; i += kLoads * kBlock) {
    Vec pack[kLoads][kRows];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) pack[u][r] = load(vecs[r] + i + u * kBlock);  // loads first
    }
    float z[kRows][kLoads * kSize];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) unpack(pack[u][r], z[r] + u * kSize);
    }
    visit(z, split.head + i * kSize, int64_t{kBlock} * kSize);
  }
  for (; i < split.vectors; i += kBlock) {
    float z[kRows][kSize];
#pragma unroll
    for (int r = 0; r < kRows; ++r) unpack(load(vecs[r] + i), z[r]);
    visit(z, split.head + i * kSize, int64_t{0});
  }
}

// walk_rows over one row: visit(z, col0, stride) with z[m] the element at column
// col0 + (m / kSize) * stride + m % kSize.
template <typename T, int kBlock, int kLoads = kUnroll, typename Visit>
__device__ __forceinline__ void walk_row(const T* logits, int64_t vocab, int tid, Visit&& visit) {
  const T* const rows[1] = {logits};
  walk_rows<T, kBlock, kLoads>(rows, vocab, tid, [&](const auto& z, int64_t col0, int64_t stride) {
    visit(z[0], col0, stride);
  });
}

// ---- block reductions, generic over the statistics type ---------------------------------------

// A statistics type S (a trivially copyable struct of 32-bit words) is reduced through a Merge:
// Merge::merge(a, b) the pairwise combination, Merge::identity() the S that merging leaves the
// other operand unchanged.

// Lane `lane ^ mask`'s value of s, word by word.
template <typename S>
__device__ __forceinline__ S shuffle_xor(const S& s, int mask) {
  static_assert(sizeof(S) % sizeof(uint32_t) == 0, "statistics are 32-bit words");
  constexpr int kWords = sizeof(S) / sizeof(uint32_t);
  uint32_t words[kWords];
  memcpy(words, &s, sizeof(S));
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = __shfl_xor_sync(0xffffffffu, words[w], mask);
  S shuffled;
  memcpy(&shuffled, words, sizeof(S));
  return shuffled;
}

// Xor-butterfly over the warp: every lane ends with the merge of all 32 (in a fixed order).
template <typename Merge, typename S>
__device__ __forceinline__ S warp_reduce(S s) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) s = Merge::merge(s, shuffle_xor(s, mask));
  return s;
}

// Fixed-order block reduction; the result is valid in thread 0. `warp_stats` is __shared__,
// kBlock / kWarpSize entries. Ends with a barrier so the next row may reuse `warp_stats`.
template <int kBlock, typename Merge, typename S>
__device__ __forceinline__ S block_reduce(S s, S* warp_stats) {
  constexpr int kWarps = kBlock / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  s = warp_reduce<Merge>(s);
  if (lane == 0) warp_stats[warp] = s;
  __syncthreads();
  if (warp == 0) s = warp_reduce<Merge>(lane < kWarps ? warp_stats[lane] : Merge::identity());
  __syncthreads();
  return s;
}

// ---- statistics pass --------------------------------------------------------------------------

// Where one thread's online pass moves when a chunk raises its maximum from max_z to new_max (raw
// logits; x = z / T): sums are kept relative to `ref` (the max, or 0 while it is -inf: every
// exponential is 0 then), earlier terms are multiplied by `rescale` = exp((max_z - ref) / T)
// (exactly 1 if the max held, 0 while the max was -inf) and their centred logits move by `shift`
// = old ref - ref.
struct Recentre {
  float ref;
  float shift;
  float rescale;
};

__device__ __forceinline__ Recentre recentre(float max_z, float new_max, float inv_temp) {
  const float ref = new_max == -INFINITY ? 0.0f : new_max;
  const float old_ref = max_z == -INFINITY ? ref : max_z;  // nothing accumulated yet: no shift
  return Recentre{ref, old_ref - ref, expf((max_z - ref) * inv_temp)};
}

// The chunk's maximum merged into max_z; skips NaN (the sums catch it: exp of NaN is NaN).
template <int N>
__device__ __forceinline__ float chunk_max(float max_z, const float (&z)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) max_z = fmaxf(max_z, z[k]);
  return max_z;
}

// The running maximum in x units, as the statistics' `max`. A NaN or +inf logit leaves `sum` NaN;
// it is moved into the max so that merging propagates it even past partial stats that are empty.
__device__ __forceinline__ float stats_max(float max_z, float sum, float inv_temp) {
  return sum != sum ? NAN : max_z * inv_temp;
}

// One thread's online softmax statistics, kept on the raw logits z (x = z / T is applied once, in
// stats()): sum = sum exp((z - max_z) / T), dot = sum exp((z - max_z) / T) * (z - max_z).
// `dot` is centred on the running max, as RowStats.dot (row_math.h), so H = log(sum) - dot / sum
// does not cancel for large logits. add() is push() for a whole chunk: one rescale per chunk,
// then independent exponentials.
struct ThreadStats {
  float max_z = -INFINITY;
  float sum = 0.0f;
  float dot = 0.0f;

  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N], float inv_temp) {
    const float new_max = chunk_max(max_z, z);
    const Recentre c = recentre(max_z, new_max, inv_temp);
    // Re-centre on the new max; terms that underflow add 0 (a shift of -inf would make 0 * inf).
    dot = c.rescale == 0.0f ? 0.0f : (dot + sum * c.shift) * c.rescale;
    sum *= c.rescale;
    max_z = new_max;
    const float scale = inv_temp * kLog2e;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float centred = z[k] - c.ref;
      const float e = fast_exp2(centred * scale);  // exp((z - ref) / T)
      sum += e;
      dot = fmaf(e, fmaxf(centred, -FLT_MAX), dot);  // z = -inf adds 0, not 0 * -inf
    }
  }

  // As RowStats of x.
  __device__ __forceinline__ RowStats stats(float inv_temp) const {
    return RowStats{stats_max(max_z, sum, inv_temp), sum, dot * inv_temp};
  }
};

// ---- the kept set (token_logprobs' kept_min) ---------------------------------------------------

// Every entry kept: the kernels without a kept set compile as if it did not exist.
struct KeepAll {
  __device__ __forceinline__ bool kept(float) const { return true; }
  __device__ __forceinline__ float operator()(float z) const { return z; }
};

// A sampler's kept set {x >= kept_min} with x = fp32(z * inv_temp), the one rounded multiply of
// sample.cu's scaled(): an entry outside counts as z = -inf (row_math.h kept_logit); NaN is kept,
// so a NaN row stays NaN.
struct KeepAbove {
  float inv_temp;
  float kept_min;
  __device__ __forceinline__ bool kept(float z) const {
    return !(__fmul_rn(z, inv_temp) < kept_min);
  }
  __device__ __forceinline__ float operator()(float z) const { return kept(z) ? z : -INFINITY; }
};

// The kept set of `row`: KeepAbove from kept_min[row] when kKeptSet, else KeepAll.
template <bool kKeptSet>
__device__ __forceinline__ auto kept_set(const float* kept_min, int64_t row, float inv_temp) {
  if constexpr (kKeptSet) {
    return KeepAbove{inv_temp, kept_min[row]};
  } else {
    return KeepAll{};
  }
}

// RowStats merge (row_math.h) for block_reduce.
struct RowStatsMerge {
  static __device__ __forceinline__ RowStats identity() { return empty_stats(); }
  static __device__ __forceinline__ RowStats merge(const RowStats& a, const RowStats& b) {
    return rlfuse::merge(a, b);
  }
};

// Statistics of one row of x = z / T (docs/SPEC.md section 1), by the whole block; the result is valid
// in thread 0. `warp_stats` is __shared__, kBlock / kWarpSize entries. Entries outside `keep`
// count as -inf (statistics over the kept set).
template <typename T, int kBlock, typename Keep = KeepAll>
__device__ __forceinline__ RowStats row_stats(const T* logits, int64_t vocab, float inv_temp,
                                              RowStats* warp_stats, Keep keep = {}) {
  ThreadStats thread_stats;
  walk_row<T, kBlock>(logits, vocab, threadIdx.x, [&](const auto& z, int64_t, int64_t) {
    float kept[chunk_size<decltype(z)>];
#pragma unroll
    for (int m = 0; m < chunk_size<decltype(z)>; ++m) kept[m] = keep(z[m]);
    thread_stats.add(kept, inv_temp);
  });
  return block_reduce<kBlock, RowStatsMerge>(thread_stats.stats(inv_temp), warp_stats);
}

// x_y = z_y / T (-inf outside `keep`), or NaN for a token id outside [0, vocab) (never used as an
// index then).
template <typename T, typename Keep = KeepAll>
__device__ __forceinline__ float target_logit(const T* logits, int64_t vocab, int64_t target,
                                              float inv_temp, Keep keep = {}) {
  const bool in_range = target >= 0 && target < vocab;
  return in_range ? keep(to_float(logits[target])) * inv_temp : NAN;
}

// ---- gradient pass ----------------------------------------------------------------------------

// grad_element() in log2 units: with l = log2 p_j = (z_j / T - lse) * log2(e),
//   grad_j = 2^l * (base + slope * ln2 * l) + target * 1[j = y].
struct ElementGrad {
  float scale;   // log2(e) / T
  float shift;   // lse * log2(e)
  float base;
  float slope2;  // slope * ln2
  float target;

  __device__ __forceinline__ ElementGrad(const GradCoeffs& c, float lse, float inv_temp)
      : scale(inv_temp * kLog2e),
        shift(lse * kLog2e),
        base(c.base),
        slope2(c.slope * kLn2),
        target(c.target) {}

  __device__ __forceinline__ float operator()(float z, bool is_target) const {
    const float log2_p = fmaf(z, scale, -shift);
    const float p = fast_exp2(log2_p);  // NaN stays NaN
    // The clamp only changes entries with p = 0, keeping the bracket finite for z = -inf.
    const float g = __fmul_rn(p, fmaf(slope2, fmaxf(log2_p, kMinLog2Prob), base));
    // _rn: no FMA contraction, so the vector and scalar paths round alike (in-place == not).
    return is_target ? __fadd_rn(g, target) : g;
  }
};

// ElementGrad on a kept set: exactly 0 outside it (p_j = 0 there, and the token's 1[j = y] term
// is dropped with it); KeepAll compiles to ElementGrad itself.
template <typename Keep>
struct KeptElementGrad {
  ElementGrad grad;
  Keep keep;

  __device__ __forceinline__ float operator()(float z, bool is_target) const {
    return keep.kept(z) ? grad(z, is_target) : 0.0f;
  }
};

template <typename Keep>
__device__ __forceinline__ KeptElementGrad<Keep> kept_grad(const ElementGrad& grad, Keep keep) {
  return KeptElementGrad<Keep>{grad, keep};
}

// Writes one row's gradient, `element_grad(z, is_target)` of every logit (an ElementGrad or a
// KeptElementGrad), by the whole block. `logits` and `grad` may alias (in-place backward): no
// __restrict__, and each element is read by the thread that writes it, before it writes it.
// `target` may be out of range (then no element is it).
template <typename T, int kBlock, typename Grad>
__device__ __forceinline__ void row_grad(const T* logits, T* grad, int64_t vocab, int64_t target,
                                         const Grad& element_grad) {
  using Vec = Pack<T>;
  constexpr int kSize = Vec::kSize;
  const int tid = threadIdx.x;
  const auto scalar_grad = [&](int64_t col) {
    grad[col] = from_float<T>(element_grad(to_float(logits[col]), col == target));
  };

  const uintptr_t phase = reinterpret_cast<uintptr_t>(logits) ^ reinterpret_cast<uintptr_t>(grad);
  if (phase % kVecBytes != 0) {
    // No common 16-byte boundary for input and output: scalar, still coalesced.
    for (int64_t col = tid; col < vocab; col += kBlock) scalar_grad(col);
    return;
  }

  const RowSplit split = split_row(logits, vocab);
  if (tid < split.head) scalar_grad(tid);
  if (tid < vocab - split.tail) scalar_grad(split.tail + tid);

  // The target as (vector, lane); vector -1 when it is not in [head, tail).
  const bool target_in_vectors = target >= split.head && target < split.tail;
  const int64_t target_vec = target_in_vectors ? (target - split.head) / kSize : -1;
  const int target_lane = target_in_vectors ? static_cast<int>((target - split.head) % kSize) : -1;

  const Vec* in = reinterpret_cast<const Vec*>(logits + split.head);
  Vec* out = reinterpret_cast<Vec*>(grad + split.head);
  const auto pack_grad = [&](const Vec& pack, int lane) {
    Vec g;
#pragma unroll
    for (int k = 0; k < kSize; ++k) {
      g.v[k] = from_float<T>(element_grad(to_float(pack.v[k]), k == lane));
    }
    return g;
  };
  // Only one vector holds the target: the others take a copy with the lane tests folded away.
  const auto vector_grad = [&](const Vec& pack, int64_t index) {
    return index == target_vec ? pack_grad(pack, target_lane) : pack_grad(pack, -1);
  };

  int64_t i = tid;
  for (; i + (kUnroll - 1) * kBlock < split.vectors; i += kUnroll * kBlock) {
    // All loads before any store: with possible aliasing the compiler may not reorder them.
    Vec pack[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) pack[u] = load(in + i + u * kBlock);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) out[i + u * kBlock] = vector_grad(pack[u], i + u * kBlock);
  }
  for (; i < split.vectors; i += kBlock) out[i] = vector_grad(load(in + i), i);
}

// Writes zeros over one row, by the whole block, without reading anything.
template <typename T, int kBlock>
__device__ __forceinline__ void row_zero(T* grad, int64_t vocab) {
  using Vec = Pack<T>;
  const int tid = threadIdx.x;
  const RowSplit split = split_row(grad, vocab);
  if (tid < split.head) grad[tid] = from_float<T>(0.0f);
  if (tid < vocab - split.tail) grad[split.tail + tid] = from_float<T>(0.0f);
  Vec zero;
#pragma unroll
  for (int k = 0; k < Vec::kSize; ++k) zero.v[k] = from_float<T>(0.0f);
  Vec* out = reinterpret_cast<Vec*>(grad + split.head);
  for (int64_t i = tid; i < split.vectors; i += kBlock) out[i] = zero;
}

// ---- launch -----------------------------------------------------------------------------------

inline bool valid_layout(const RowLayout& layout) {
  return layout.rows >= 0 && layout.inner >= 1;
}

// Calls launch(std::true_type{}) or launch(std::false_type{}) as `flag` says: a run-time choice
// between the two instantiations of a kernel with a bool template parameter.
template <typename Launch>
void with_flag(bool flag, Launch&& launch) {
  if (flag) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

// The two-row kernels read and write layout.rows rows of every buffer.
inline bool same_rows(const RowLayout& layout, const RowLayout& other) {
  return valid_layout(other) && other.rows == layout.rows;
}

// A two-row backward (kl_div.cu, distill.cu: Args with grad_logits and grad_other, either null):
// checks the rows (both logit rows and each requested gradient: layout.rows rows), then returns
// launch() unless no gradient is requested, which launches nothing (still rejecting what
// dispatch() would).
template <typename Args, typename Launch>
int launch_pair_backward(const Args& args, Launch&& launch) {
  if (!same_rows(args.layout, args.other_layout) ||
      (args.grad_logits != nullptr && !same_rows(args.layout, args.grad_layout)) ||
      (args.grad_other != nullptr && !same_rows(args.layout, args.grad_other_layout))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (args.grad_logits == nullptr && args.grad_other == nullptr) {
    const bool valid = valid_layout(args.layout) && args.vocab >= 0;
    return static_cast<int>(valid ? cudaSuccess : cudaErrorInvalidValue);
  }
  return launch();
}

// Calls launch(grad_p, grad_q) with std::bool_constant's that say which gradients `args`
// requests (at least one): the backward kernels are compiled for each combination.
template <typename Args, typename Launch>
void with_requested_grads(const Args& args, Launch&& launch) {
  if (args.grad_logits != nullptr && args.grad_other != nullptr) {
    launch(std::true_type{}, std::true_type{});
  } else if (args.grad_logits != nullptr) {
    launch(std::true_type{}, std::false_type{});
  } else {
    launch(std::false_type{}, std::true_type{});
  }
}

// Picks the element type and block size for `args` (any *Args with dtype, layout and vocab) and
// calls Launcher::launch<T, kBlock>(args, grid, stream). Empty inputs launch nothing.
template <typename Launcher, typename Args>
int dispatch(const Args& args, void* stream) {
  if (!valid_layout(args.layout) || args.vocab < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (args.layout.rows == 0 || args.vocab == 0) return static_cast<int>(cudaSuccess);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const auto grid = static_cast<unsigned>(std::min(args.layout.rows, kMaxGrid));
  const auto launch = [&](auto element) {
    using T = decltype(element);
    if (args.vocab * static_cast<int64_t>(sizeof(T)) >= kLargeRowBytes) {
      Launcher::template launch<T, kLargeBlock>(args, grid, cuda_stream);
    } else {
      Launcher::template launch<T, kSmallBlock>(args, grid, cuda_stream);
    }
    return static_cast<int>(cudaGetLastError());
  };
  switch (args.dtype) {
    case DType::kFloat32:
      return launch(float{});
    case DType::kFloat16:
      return launch(__half{});
    case DType::kBFloat16:
      return launch(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace row_kernels
}  // namespace rlfuse
