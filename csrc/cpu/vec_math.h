// Branch-free fp32 helpers that GCC/Clang auto-vectorise, for the CPU kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "rlfuse/kernels.h"

// This header is compiled once per instruction set (RLFUSE_CPU_ISA, see CMakeLists.txt): its
// helpers have internal linkage so each copy stays with the code built for it.
#define RLFUSE_ALWAYS_INLINE static inline __attribute__((always_inline))

namespace rlfuse::cpu {

// Elements converted to fp32 and processed per chunk: 8 KiB of floats stays in L1.
constexpr int64_t kChunk = 2048;

RLFUSE_ALWAYS_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
RLFUSE_ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// fp32 lanes (GCC/Clang vector extension): 16 = one AVX-512 register; 8 = one AVX2 register, two
// SSE ones. The lane count is fixed per instruction set, which fixes the reduction order: results
// are bitwise reproducible for a given build and CPU (RLFUSE_CPU_ISA can pin the variant).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecInt __attribute__((vector_size(kLanes * sizeof(int32_t))));

RLFUSE_ALWAYS_INLINE Vec splat(float v) { return Vec{} + v; }
RLFUSE_ALWAYS_INLINE Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
RLFUSE_ALWAYS_INLINE void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
RLFUSE_ALWAYS_INLINE float lane_sum(Vec v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// exp(t) for t <= 0 (t = x - max), lane-wise, about 2 ulp; exactly 0 below -87 and for -inf.
// Cody-Waite range reduction to r in [-ln2/2, ln2/2], Cephes' degree-6 polynomial, times 2^n.
RLFUSE_ALWAYS_INLINE Vec exp_nonpositive(Vec t) {
  const Vec clamped = t < -87.0f ? splat(-87.0f) : t;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n_shifted = clamped * 1.44269504088896341f + round_magic;
  const Vec n = n_shifted - round_magic;
  const VecInt ni = __builtin_bit_cast(VecInt, n_shifted) - 0x4B400000;
  const Vec r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VecInt scale_bits = (ni + 127) << 23;
  const Vec scaled = p * __builtin_bit_cast(Vec, scale_bits);
  return t < -87.0f ? splat(0.0f) : scaled;
}

// log(v) lane-wise for positive normal v (Cephes logf: v = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// degree-8 polynomial in m - 1), about 2 ulp.
RLFUSE_ALWAYS_INLINE Vec log_positive(Vec v) {
  typedef uint32_t VecU __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  const VecU bits = __builtin_bit_cast(VecU, v);
  VecInt exponent = __builtin_bit_cast(VecInt, bits >> 23) - 127;
  Vec m = __builtin_bit_cast(Vec, (bits & 0x007FFFFFu) | 0x3F800000u);  // in [1, 2)
  const auto big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  exponent = big ? exponent + 1 : exponent;
  const Vec x = m - 1.0f;
  Vec p = splat(7.0376836292e-2f);
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  const Vec z = x * x;
  const Vec e = __builtin_convertvector(exponent, Vec);
  return x + (p * x * z - 0.5f * z) + e * 0.693147180559945f;
}

// Loads `n` elements of one row, converts to fp32 and multiplies by inv_temp.
RLFUSE_ALWAYS_INLINE void load_scaled(const void* src, DType dtype, int64_t n, float inv_temp, float* dst) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* s = static_cast<const float*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * inv_temp;
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(uint32_t{s[i]} << 16) * inv_temp;
      break;
    }
    case DType::kFloat16: {
      const _Float16* s = static_cast<const _Float16*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]) * inv_temp;
      break;
    }
  }
}

// Converts fp32 values to `dtype` (round to nearest even) and stores them.
RLFUSE_ALWAYS_INLINE void store_converted(const float* src, int64_t n, DType dtype, void* dst) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case DType::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = float_to_bits(src[i]);
        const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
        const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
        d[i] = static_cast<uint16_t>(is_nan ? (u >> 16) | 0x40u : rounded >> 16);
      }
      break;
    }
    case DType::kFloat16: {
      _Float16* d = static_cast<_Float16*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<_Float16>(src[i]);
      break;
    }
  }
}

RLFUSE_ALWAYS_INLINE int64_t element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace rlfuse::cpu
