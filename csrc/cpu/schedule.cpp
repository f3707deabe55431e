// CPU kernel of the schedule operator (SPEC section 1) and the per-K table cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "checks.h"
#include "duo_fast/schedule.h"
#include "duo_fast/schedule_table.h"
#include "schedule_table_cache.h"

namespace duo_fast {

const double* schedule_table(int64_t vocab_size) {
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

namespace {

std::tuple<at::Tensor, at::Tensor> gamma_to_alpha_cpu(const at::Tensor& gamma, int64_t vocab_size) {
  check_floating(gamma, "gamma", {at::kFloat, at::kDouble});
  check_vocab(vocab_size);
  check_not_nan(gamma, "gamma");
  const double* table = schedule_table(vocab_size);
  const at::Tensor g = gamma.contiguous();
  at::Tensor alpha = at::empty_like(g), dalpha = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gamma_to_alpha_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* ap = alpha.mutable_data_ptr<scalar_t>();
    scalar_t* dp = dalpha.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double a, d;
        schedule::gamma_to_alpha(table, double(gp[i]), a, d);
        ap[i] = scalar_t(a);
        dp[i] = scalar_t(d);
      }
    });
  });
  return {alpha, dalpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) { m.impl("gamma_to_alpha", &gamma_to_alpha_cpu); }

}  // namespace duo_fast
