// Row kernel of the CPU fused TROLL loss (schema.h TrollArgs, docs/SPEC.md section 7): per row, one
// statistics pass with a bounded top-k selection over each chunk while it is in L1 (as
// row_topk_rows.cpp), the support {y} + old kept + new kept, the projection and its implicit
// gradient on the support in float64 (troll_math.h), then the gradient pass: zeros plus the sparse
// support gradient, or, with a KL / entropy penalty, the dense row gradient of SPEC section 2 plus
// the sparse corrections, chunk by chunk.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "rlfuse/token_loss.h"
#include "rlfuse/troll_math.h"
#include "row_kernels.h"

namespace rlfuse::cpu::RLFUSE_CPU_ISA {
namespace {

// One support entry before sorting by id.
struct Candidate {
  int64_t id;
  float x;
  float old_logprob;  // raw b (not normalised)
};

// Per-thread scratch, sized once for (old_k, k).
struct Scratch {
  std::vector<Entry> heap;  // the selected top entries (sorted at the end)
  std::vector<float> vals;  // the selection's candidate buffer
  std::vector<int32_t> ids;
  std::vector<Candidate> candidates;
  std::vector<int64_t> table;  // open addressing on ids, -1 = empty
  std::vector<double> a, b, lq, g, ea;
  std::vector<float> seed;  // the logits of y and the old ids, for the first top-k threshold
  std::vector<float> sparse;  // the TROLL gradient per support entry (sorted by id), fp32, times 1/T
  int64_t mask = 0;
  size_t capacity = 0;  // of the top-k candidate buffer: cut back to k entries when it fills

  Scratch(int64_t old_k, int64_t k) {
    const int64_t cap = 1 + old_k + k;
    capacity = static_cast<size_t>(std::max<int64_t>(4 * k, 256));
    heap.reserve(capacity + kLanes);
    vals.resize(capacity + kLanes);
    ids.resize(capacity + kLanes);
    candidates.reserve(static_cast<size_t>(cap));
    int64_t size = 16;
    while (size < 2 * cap) size *= 2;
    table.assign(static_cast<size_t>(size), -1);
    mask = size - 1;
    a.resize(cap);
    b.resize(cap);
    lq.resize(cap);
    g.resize(cap);
    ea.resize(cap);
    seed.reserve(static_cast<size_t>(cap));
    sparse.resize(cap);
  }

  // Inserts id; false if it is already there (the first copy has priority).
  bool insert(int64_t id) {
    uint64_t h = (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> 20;
    for (;; ++h) {
      int64_t& slot = table[static_cast<size_t>(h & mask)];
      if (slot == id) return false;
      if (slot < 0) {
        slot = id;
        return true;
      }
    }
  }

  void clear_table() {
    for (const Candidate& c : candidates) {
      uint64_t h = (static_cast<uint64_t>(c.id) * 0x9E3779B97F4A7C15ull) >> 20;
      for (;; ++h) {
        int64_t& slot = table[static_cast<size_t>(h & mask)];
        if (slot < 0) break;
        slot = -1;  // clears the whole probe run of this id (every id of the run is in `candidates`)
      }
    }
  }
};

// Whether any lane of a comparison result is set.
RLFUSE_ALWAYS_INLINE bool any_lane(VecInt m) {
#if defined(__AVX512F__)
  if constexpr (kLanes == 16) {
    __m512i v;
    std::memcpy(&v, &m, sizeof v);
    return _mm512_test_epi32_mask(v, v) != 0;
  }
#endif
#if defined(__AVX2__)
  if constexpr (kLanes == 8) {
    __m256i v;
    std::memcpy(&v, &m, sizeof v);
    return !_mm256_testz_si256(v, v);
  }
#endif
  int any = 0;
  for (int l = 0; l < kLanes; ++l) any |= m[l];
  return any != 0;
}

// Zeroes a gradient row with ordinary stores. (Streaming stores were slower here: a fresh gradient
// buffer's huge page has just been cleared by the page fault, its lines are still in cache, and
// bypassing the cache writes them to memory a second time; measured on the 2-core VM, N=2048
// V=32768 fp32: 170 ms CPU per call with streaming stores, 139 ms with memset, dapo 114 ms.)
RLFUSE_ALWAYS_INLINE void zero_row(char* dst, int64_t bytes) { std::memset(dst, 0, bytes); }

}  // namespace

void troll_rows(const TrollArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kChunk];
  Scratch sc(a.old_k, a.k);
  const int64_t esize = element_size(a.dtype);
  const double keep_below = 1.0 - a.threshold;
  for (int64_t row = begin; row < end; ++row) {
    const char* src = row_pointer(a.logits, a.dtype, a.layout, row);
    char* dst = const_cast<char*>(row_pointer(a.grad_logits, a.dtype, a.grad_layout, row));
    const int64_t y = a.tokens[row];
    const float inv_temp = row_inv_temp(a, row);
    const float policy_weight = a.policy_weight[row], weight = a.weight[row];
    if (policy_weight == 0.0f && weight == 0.0f) {
      // A masked token: its statistics (returned as for every loss), no TROLL math, a zero row.
      const RowResult r = row_statistics(src, a.dtype, a.vocab, inv_temp, y, buf);
      a.loss[row] = 0.0f;
      a.logp[row] = r.logp;
      a.entropy[row] = r.entropy;
      a.eta[row] = a.kl_before[row] = a.kl_after[row] = a.support[row] = 0.0f;
      zero_row(dst, a.vocab * esize);
      continue;
    }
    // Top-k selection on each chunk while it is in L1: entries above the current k-th value `thr`
    // are appended to a buffer (blocks of kLanes with none are skipped at once); a full buffer is cut
    // back to its k best. Entries come in increasing id order, so one equal to thr never ranks
    // before the k-th entry: strict > is exact. (thr starts just below a seed that is not above
    // the row's k-th value, see below, or at -inf.)
    auto& heap = sc.heap;
    float* const vals = sc.vals.data();  // candidates above thr, in id order: values and ids
    int32_t* const idx = sc.ids.data();
    size_t size = 0;
    float thr = -INFINITY;
    // A full buffer is cut back to the entries at or above a new threshold `edge` that at least k
    // of them reach: a 64-bin histogram of their values between thr and their max, walked from the
    // top (linear time). Any such edge is safe: a later entry v <= edge ranks after k earlier entries
    // (v >= edge, lower ids). Ties that defeat the histogram fall back to an exact selection.
    const auto exact = [&] {
      heap.resize(size);
      for (size_t i = 0; i < size; ++i) heap[i] = Entry{vals[i], idx[i]};
      std::nth_element(heap.begin(), heap.begin() + (a.k - 1), heap.end(), ranks_before);
      size = static_cast<size_t>(a.k);
      for (size_t i = 0; i < size; ++i) {
        vals[i] = heap[i].value;
        idx[i] = heap[i].id;
      }
      thr = heap[a.k - 1].value;
    };
    const auto shrink = [&] {
      constexpr int kBins = 64;
      float lo = thr, hi = -INFINITY;
      for (size_t i = 0; i < size; ++i) {
        hi = std::max(hi, vals[i]);
        if (thr == -INFINITY) lo = i == 0 ? vals[i] : std::min(lo, vals[i]);
      }
      const float scale = kBins / (hi - lo);
      if (!(hi > lo) || !(scale < INFINITY)) return exact();
      int count[kBins] = {};
      const auto bin = [&](float v) { return std::min(kBins - 1, std::max(0, static_cast<int>((v - lo) * scale))); };
      for (size_t i = 0; i < size; ++i) ++count[bin(vals[i])];
      int b = kBins - 1;
      for (int64_t above = count[b]; above < a.k; above += count[--b]) {
      }
      float edge = INFINITY;
      for (size_t i = 0; i < size; ++i) {
        if (bin(vals[i]) >= b) edge = std::min(edge, vals[i]);
      }
      if (!(edge > thr)) return exact();
      size_t kept = 0;
      for (size_t i = 0; i < size; ++i) {
        vals[kept] = vals[i];
        idx[kept] = idx[i];
        kept += vals[i] >= edge ? 1 : 0;
      }
      size = kept;
      thr = edge;
      if (size >= sc.capacity / 2) exact();
    };
    const size_t capacity = sc.capacity;
    const auto select = [&](const float* x, int64_t start, int64_t n) {
#if defined(__AVX512F__)
      const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (int64_t i = 0; i < n; i += 16) {  // x is padded with -inf to whole lanes (kLanes = 16)
        const __m512 v = _mm512_loadu_ps(x + i);
        const __mmask16 above = _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), _CMP_GT_OQ);  // not -inf, not NaN
        if (above == 0) continue;
        _mm512_mask_compressstoreu_ps(vals + size, above, v);
        _mm512_mask_compressstoreu_epi32(idx + size, above,
                                         _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(start + i))));
        size += static_cast<size_t>(__builtin_popcount(above));
        if (size >= capacity) shrink();
      }
#else
      for (int64_t i = 0; i < n; i += kLanes) {  // x is padded with -inf to whole lanes
        if (!any_lane(load_vec(x + i) > thr)) continue;
        for (int l = 0; l < kLanes; ++l) {  // branch-free append of the lanes above thr
          const float v = x[i + l];
          vals[size] = v;
          idx[size] = static_cast<int32_t>(start + i + l);
          size += v > thr ? 1 : 0;  // never -inf (padding) or NaN
        }
        if (size >= capacity) shrink();
      }
#endif
    };
    // The support, in priority order for b: y (old_logprobs), old kept (stored), new kept (floor).
    // y and the old kept ids come first: their logits, read before the statistics pass, also seed
    // the top-k threshold (below).
    auto& cand = sc.candidates;
    cand.clear();
    const auto logit = [&](int64_t id) {
      float x = 0.0f;
      load_scaled(src + id * esize, a.dtype, 1, inv_temp, &x);
      return x;
    };
    const bool y_valid = y >= 0 && y < a.vocab;
    if (y_valid && sc.insert(y)) cand.push_back(Candidate{y, logit(y), a.old_logp[row]});
    const int32_t* old_ids = a.old_ids + row * a.old_k;
    const float* old_lp = a.old_logprobs + row * a.old_k;
    for (int64_t slot = 0; slot < a.old_k; ++slot) {
      const int64_t id = old_ids[slot];
      if (id < 0 || id >= a.vocab || !sc.insert(id)) continue;
      cand.push_back(Candidate{id, logit(id), old_lp[slot]});
    }
    // The k-th largest of any k distinct logits of the row is at most the row's k-th largest: every
    // entry of the top k is >= it, so the selection may start just below it (strict > then keeps the
    // ties, which may rank before the k-th entry by id) instead of at -inf. The old policy's kept ids
    // are usually most of the new top k, so few entries are appended and the buffer rarely fills.
    if (static_cast<int64_t>(cand.size()) >= a.k) {
      auto& seed = sc.seed;
      seed.clear();
      for (const Candidate& c : cand) {
        if (c.x == c.x) seed.push_back(c.x);
      }
      if (static_cast<int64_t>(seed.size()) >= a.k) {
        std::nth_element(seed.begin(), seed.begin() + (a.k - 1), seed.end(), std::greater<float>());
        const float kth = seed[a.k - 1];
        if (kth > -INFINITY) thr = std::nextafter(kth, -INFINITY);
      }
    }
    const RowResult stats = row_statistics(src, a.dtype, a.vocab, inv_temp, y, buf, select);
    if (size > static_cast<size_t>(a.k)) exact();
    heap.resize(size);
    for (size_t i = 0; i < size; ++i) heap[i] = Entry{vals[i], idx[i]};
    std::sort(heap.begin(), heap.end(), ranks_before);

    // New kept ids: the sorted top entries while the mass before them is < 1 - threshold.
    double cumulative = 0.0;
    for (const Entry& e : heap) {
      if (!(cumulative < keep_below)) break;
      cumulative += std::exp(static_cast<double>(e.value) - static_cast<double>(stats.lse));
      if (sc.insert(e.id)) cand.push_back(Candidate{e.id, e.value, static_cast<float>(kTrollLogFloor)});
    }
    sc.clear_table();
    std::sort(cand.begin(), cand.end(), [](const Candidate& p, const Candidate& q) { return p.id < q.id; });
    const int n = static_cast<int>(cand.size());
    int ty = -1;
    for (int j = 0; j < n; ++j) {
      sc.a[j] = cand[j].x;
      sc.b[j] = cand[j].old_logprob;
      if (cand[j].id == y) ty = j;
    }
    const TrollSupportResult t = troll_on_support(n, sc.a.data(), sc.b.data(), sc.lq.data(), sc.g.data(), sc.ea.data(), ty,
                                                  a.advantages[row], a.eps, a.alpha);
    // The penalties (KL to the reference, entropy bonus) as the fused policy loss has them.
    const TokenLossInputs in{stats.logp, stats.entropy, 0.0f, a.ref_logp != nullptr ? a.ref_logp[row] : 0.0f,
                             0.0f, 0.0f, weight};
    const TokenLoss pen = token_loss(a.params, in);
    a.loss[row] = (policy_weight != 0.0f ? policy_weight * static_cast<float>(t.loss) : 0.0f) + pen.loss;
    a.logp[row] = stats.logp;
    a.entropy[row] = stats.entropy;
    a.eta[row] = static_cast<float>(t.eta);
    a.kl_before[row] = static_cast<float>(t.kl_before);
    a.kl_after[row] = static_cast<float>(t.kl_after);
    a.support[row] = static_cast<float>(n);
    const double scale = static_cast<double>(policy_weight) * inv_temp;
    for (int j = 0; j < n; ++j) sc.sparse[j] = policy_weight != 0.0f ? static_cast<float>(scale * sc.g[j]) : 0.0f;

    // The gradient pass. Every logit this row needs has been read: dst may alias src.
    if (pen.g_logp == 0.0f && pen.g_entropy == 0.0f) {
      zero_row(dst, a.vocab * esize);
      for (int j = 0; j < n; ++j) store_converted(&sc.sparse[j], 1, a.dtype, dst + cand[j].id * esize);
      continue;
    }
    const GradCoeffs c = grad_coeffs(pen.g_logp, pen.g_entropy, stats.entropy, inv_temp);
    const float lse = stats.lse;
    int next = 0;  // the first support entry not yet added
    for (int64_t start = 0; start < a.vocab; start += kChunk) {
      const int64_t count = std::min(kChunk, a.vocab - start);
      const int64_t padded = load_chunk(src, a.dtype, start, count, inv_temp, buf);
      for (int64_t i = 0; i < padded; i += kLanes) {
        const Vec logp = load_vec(buf + i) - lse;
        const Vec p = exp_nonpositive(logp);
        store_vec(buf + i, p == 0.0f ? splat(0.0f) : p * (c.base + c.slope * logp));
      }
      if (y_valid && y >= start && y < start + count) buf[y - start] += c.target;
      for (; next < n && cand[next].id < start + count; ++next) buf[cand[next].id - start] += sc.sparse[next];
      store_converted(buf, count, a.dtype, dst + start * esize);
    }
  }
}

}  // namespace rlfuse::cpu::RLFUSE_CPU_ISA
