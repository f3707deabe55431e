// Rows of logits without a probability distribution (NaN, +inf or no finite
// entry), found by the CPU kernels of the ops that sample (sample_step,
// posterior, canvas_step, softmax_embed) while they read the rows: counted across
// threads, the first one named, and raised once every row is done (so no output
// is returned). Also the task size of those kernels' loops over rows.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "checks.h"

namespace duo_fast {

// Rows per task of at::parallel_for over rows of K entries: at least ~32K entries a
// task, so that small calls stay on one thread (a task costs a thread wake-up).
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(K, 1)); }

struct BadRows {
  std::atomic<int64_t> count{0};
  std::atomic<int64_t> first{INT64_MAX};
  void add(int64_t r) {
    count.fetch_add(1, std::memory_order_relaxed);
    int64_t f = first.load(std::memory_order_relaxed);
    while (r < f && !first.compare_exchange_weak(f, r, std::memory_order_relaxed)) {
    }
  }
  void raise_if_any() const {
    const int64_t n = count.load();
    TORCH_CHECK(n == 0, "duo_fast: logits: ", n, " row(s) (the first: row ", first.load(), " of the flattened leading "
                "dimensions)", kBadLogitsRows);
  }
};

}  // namespace duo_fast
