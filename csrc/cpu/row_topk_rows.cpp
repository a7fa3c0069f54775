// Row kernel of the CPU row top-k (kernels.h RowTopkArgs): the statistics pass, with a bounded
// selection over each of its chunks while the chunk is in L1 (one read of the row). Blocks of
// kLanes entries are compared with the current k-th value at once, so only the rare candidates
// touch the heap.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"
#include "row_kernels.h"

namespace rlfuse::cpu::RLFUSE_CPU_ISA {

void row_topk_rows(const RowTopkArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kChunk];
  std::vector<Entry> heap;  // min-heap by rank: heap.front() is the current k-th entry
  heap.reserve(static_cast<size_t>(a.k));
  const auto worse_on_top = [](const Entry& x, const Entry& y) { return ranks_before(x, y); };
  for (int64_t row = begin; row < end; ++row) {
    const char* src = row_pointer(a.logits, a.dtype, a.layout, row);
    heap.clear();
    const auto offer = [&](float v, int64_t col) {
      if (!(v > -INFINITY)) return;  // -inf and NaN never enter the selection
      const Entry e{v, static_cast<int32_t>(col)};
      if (static_cast<int64_t>(heap.size()) < a.k) {
        heap.push_back(e);
        std::push_heap(heap.begin(), heap.end(), worse_on_top);
      } else if (ranks_before(e, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), worse_on_top);
        heap.back() = e;
        std::push_heap(heap.begin(), heap.end(), worse_on_top);
      }
    };
    // The selection walks each chunk of the statistics pass while it is in L1: one read of the row.
    const auto select = [&](const float* x, int64_t start, int64_t n) {
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) {
        // Once the heap is full, entries come in increasing id order, so only v > the k-th value
        // can enter: test kLanes at once and skip the (usual) block with none.
        if (static_cast<int64_t>(heap.size()) == a.k) {
          const Vec v = load_vec(x + i);
          const VecInt above = v > heap.front().value;
          int any = 0;
          for (int l = 0; l < kLanes; ++l) any |= above[l];
          if (!any) continue;
        }
        for (int l = 0; l < kLanes; ++l) offer(x[i + l], start + i + l);
      }
      for (; i < n; ++i) offer(x[i], start + i);
    };
    const RowResult stats = row_statistics(src, a.dtype, a.vocab, row_inv_temp(a, row), a.tokens[row], buf, select);
    std::sort(heap.begin(), heap.end(), ranks_before);
    int32_t* ids = a.topk_ids + row * a.k;
    float* values = a.topk_values + row * a.k;
    for (int64_t j = 0; j < a.k; ++j) {
      const bool filled = j < static_cast<int64_t>(heap.size());
      ids[j] = filled ? heap[j].id : -1;
      values[j] = filled ? heap[j].value : -INFINITY;
    }
    a.logp[row] = stats.logp;
    a.entropy[row] = stats.entropy;
    a.lse[row] = stats.lse;
  }
}

}  // namespace rlfuse::cpu::RLFUSE_CPU_ISA
