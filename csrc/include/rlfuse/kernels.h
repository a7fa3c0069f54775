// Torch-free kernel entry points. Every backend honours the same row contract:
//   logits row r lives at  base + row_offset(r, inner, stride_outer, stride_inner)  (elements),
//   its V entries are contiguous; tokens are int64 (out-of-range ids give NaN log-probs and never
//   index memory); all per-row outputs and upstream gradients are contiguous fp32 of length rows.
#pragma once

#include <cstdint>

#include "rlfuse/token_loss.h"

namespace rlfuse {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RowLayout {
  int64_t rows;          // number of rows (tokens)
  int64_t inner;         // rows per outer index (>= 1)
  int64_t stride_outer;  // elements between outer indices
  int64_t stride_inner;  // elements between consecutive inner rows
};

struct TokenLogprobsFwdArgs {
  const void* logits;
  DType dtype;
  RowLayout layout;
  int64_t vocab;
  const int64_t* tokens;
  float inv_temp;
  float* logp;     // [rows]
  float* entropy;  // [rows]
  float* lse;      // [rows], saved for the backward
};

struct TokenLogprobsBwdArgs {
  const void* logits;
  DType dtype;
  RowLayout layout;
  int64_t vocab;
  const int64_t* tokens;
  float inv_temp;
  const float* lse;         // [rows] from the forward
  const float* entropy;     // [rows] from the forward
  const float* grad_logp;   // [rows]
  const float* grad_entropy;  // [rows]
  void* grad_logits;        // same dtype as logits; may alias `logits` (in-place backward). Rows
                            // with grad_logp = grad_entropy = 0 are written as zeros without
                            // reading the logits, so garbage in masked rows never leaks.
  RowLayout grad_layout;
};

// Fused policy loss (DESIGN.md "fused path"): per row, the statistics pass, token_loss() from
// token_loss.h, then the gradient pass, all in one kernel; the backward only rescales.
struct PolicyLossFusedArgs {
  const void* logits;
  DType dtype;
  RowLayout layout;
  int64_t vocab;
  const int64_t* tokens;
  float inv_temp;
  const float* advantages;     // [rows]
  const float* old_logp;       // [rows]
  const float* ref_logp;       // [rows]; may be null when params.kl == kKlNone or kl_coef == 0
  const float* policy_weight;  // [rows]
  const float* weight;         // [rows]
  TokenLossParams params;
  float* loss;      // [rows] weighted per-token loss (their sum is the loss)
  float* logp;      // [rows]
  float* entropy;   // [rows]
  void* grad_logits;  // same dtype as logits; may alias `logits` (in-place). Rows whose token has
                      // zero loss gradient (g_logp = g_H = 0: masked, clipped) are written as zeros
                      // without reading the logits again, so garbage in masked rows never leaks.
  RowLayout grad_layout;
};

// Full-vocabulary KL between two logit rows (SPEC.md section 5, last bullet): p = softmax(x),
// q = softmax(y), x = logits * inv_temp, y = other * inv_temp, both of `dtype`.
//   direction 0 (forward): KL(p || q);  direction 1 (reverse): KL(q || p).
// Forward: one read of both rows. Entries where the distribution being averaged over is 0
// contribute nothing (0 * inf := 0); a token p > 0 where q = 0 makes the forward KL +inf.
enum KlDirection : int { kKlForward = 0, kKlReverse = 1 };

struct KlDivFwdArgs {
  const void* logits;
  const void* other;
  DType dtype;
  RowLayout layout;
  RowLayout other_layout;
  int64_t vocab;
  float inv_temp;
  int direction;     // KlDirection
  float* kl;         // [rows]
  float* lse;        // [rows] logsumexp(x), saved for the backward
  float* other_lse;  // [rows] logsumexp(y)
};

// Backward: one more read of both rows, writes of the requested gradients (each may be null):
//   forward: dKL/dx_j = p_j (log p_j - log q_j - KL),  dKL/dy_j = q_j - p_j
//   reverse: dKL/dx_j = p_j - q_j,                     dKL/dy_j = q_j (log q_j - log p_j - KL)
// times grad_kl[row] * inv_temp, stored in `dtype`. Rows with grad_kl == 0 are written as zeros
// without reading the inputs (masked rows may hold garbage).
struct KlDivBwdArgs {
  const void* logits;
  const void* other;
  DType dtype;
  RowLayout layout;
  RowLayout other_layout;
  int64_t vocab;
  float inv_temp;
  int direction;
  const float* kl;
  const float* lse;
  const float* other_lse;
  const float* grad_kl;  // [rows]
  void* grad_logits;     // nullable; contiguous rows or any RowLayout below
  RowLayout grad_layout;
  void* grad_other;      // nullable
  RowLayout grad_other_layout;
};

// Row top-k with the row statistics (TROLL's sparse support, sparse_logprobs): in one pass over
// each row, the k largest x = z * inv_temp in descending order (ties: lower id first) and the
// token_logprobs forward outputs. Slots past the row's finite entries (k > V, or -inf entries)
// hold id -1 and value -inf. NaN rows: NaN statistics, ids unspecified but in [-1, V).
struct RowTopkArgs {
  const void* logits;
  DType dtype;
  RowLayout layout;
  int64_t vocab;
  const int64_t* tokens;
  float inv_temp;
  int64_t k;
  int32_t* topk_ids;    // [rows, k]
  float* topk_values;   // [rows, k], x values
  float* logp;          // [rows]
  float* entropy;       // [rows]
  float* lse;           // [rows]
};

// Sampling (SPEC.md section 8), num_samples draws per row. Per row: temperature T (T == 0:
// greedy), or with `adaptive` T = t_min + (t_max - t_min) * clamp((H1 - h_low) / (h_high - h_low), 0, 1)
// from the row's entropy H1 at temperature 1. Then, on x = z / T, the kept set is
// {j : x_j >= threshold}, threshold = max(t_k, t_p, t_min_p):
//   t_k: the top_k-th largest x (top_k <= 0 or >= vocab: -inf);
//   t_p: the largest t with mass{x_j >= max(t, t_k)} >= top_p * mass{x_j >= t_k} (top_p >= 1: -inf);
//   t_min_p: max x + log(min_p) (min_p <= 0: -inf).
// Ties at a threshold are all kept. Thresholds are found without sorting (e.g. bisection on the
// order-preserving integer key of x, one counting pass per step). The draw is Gumbel-max over
// the kept set: argmax_j (x_j + G_j), ties to the lower id, G_j = -log(-log u_j) with
//   u_j = ((rng_bits(seed[row], sample, j) >> 9) + 0.5) * 2^-23, exact in fp32, never 0 or 1
//   (see rng_uniform in row_math.h).
// Outputs per draw: token, its log-prob under the kept set renormalised (0 when greedy) and under
// the unfiltered temperature-T distribution (T = 1 when greedy); per row: the unfiltered entropy
// at T (T = 1 when greedy). Rows with NaN, or with no finite entry, are rejected by the caller.
struct SampleArgs {
  const void* logits;
  DType dtype;
  RowLayout layout;
  int64_t vocab;
  const float* temperature;  // [rows]
  const int32_t* top_k;      // [rows]
  const float* top_p;        // [rows]
  const float* min_p;        // [rows]
  const uint64_t* seed;      // [rows]
  int64_t num_samples;
  int adaptive;              // 0 or 1
  float t_min, t_max, h_low, h_high;
  int64_t* tokens;           // [rows, num_samples]
  float* logprobs;           // [rows, num_samples]
  float* raw_logprobs;       // [rows, num_samples]
  float* entropy;            // [rows]
};

// CPU (csrc/cpu), multi-threaded over rows.
void token_logprobs_fwd_cpu(const TokenLogprobsFwdArgs& args, int num_threads);
void token_logprobs_bwd_cpu(const TokenLogprobsBwdArgs& args, int num_threads);
void policy_loss_fused_cpu(const PolicyLossFusedArgs& args, int num_threads);
void kl_div_fwd_cpu(const KlDivFwdArgs& args, int num_threads);
void row_topk_cpu(const RowTopkArgs& args, int num_threads);
void sample_cpu(const SampleArgs& args, int num_threads);
void kl_div_bwd_cpu(const KlDivBwdArgs& args, int num_threads);
// Instruction set the CPU kernels run with on this machine ("avx2" or "base").
const char* cpu_isa();

}  // namespace rlfuse
