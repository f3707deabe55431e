// The process-wide cache of the per-K gamma_to_alpha tables: host code shared by
// the CPU and CUDA backends (the CUDA one copies a table to each device).
#include "gamma_to_alpha_tables.h"

#include <ATen/Parallel.h>

#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "checks.h"
#include "duo_fast/gamma_to_alpha.h"
#include "duo_fast/gamma_to_alpha_table.h"

namespace duo_fast {

const double* gamma_to_alpha_table(int64_t vocab_size) {
  check_vocab(vocab_size);
  static std::mutex mutex;
  static std::map<int64_t, std::unique_ptr<std::vector<double>>> tables;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = tables.find(vocab_size);
  if (it != tables.end()) return it->second->data();
  auto table = std::make_unique<std::vector<double>>(schedule::kTableSize);
  const double K = double(vocab_size);
  schedule::build_header(K, table->data());
  at::parallel_for(0, schedule::kIntervals, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) schedule::build_interval(K, int(i), table->data());
  });
  const double* data = table->data();
  tables.emplace(vocab_size, std::move(table));
  return data;
}

}  // namespace duo_fast
