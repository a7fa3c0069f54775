// Splits [0, n) into contiguous ranges over `num_threads` std::threads (the caller's thread
// takes the first). Rows are independent, so no synchronisation beyond the join is needed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace rlfuse::cpu {

template <typename Body>
void parallel_for_rows(int64_t n, int num_threads, Body body) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, n));
  if (workers == 1) {
    body(int64_t{0}, n);
    return;
  }
  const int64_t per = (n + workers - 1) / workers;
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int64_t w = 1; w < workers; ++w) {
    const int64_t begin = std::min(n, w * per);
    const int64_t end = std::min(n, begin + per);
    threads.emplace_back([=] { body(begin, end); });
  }
  body(int64_t{0}, std::min(n, per));
  for (auto& t : threads) t.join();
}

}  // namespace rlfuse::cpu
