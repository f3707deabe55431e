// Rows of logits without a probability distribution (NaN, +inf or no finite
// entry), found by the CPU kernels of the ops that sample (sample_step,
// posterior, canvas_step, softmax_embed) while they read the rows: counted across
// threads, the first one named, and raised once every row is done (so no output
// is returned).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>

#include "checks.h"

namespace duo_fast {

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
