// CPU kernel of gamma_to_alpha (docs/math.md §1): the per-K table (gamma_to_alpha_tables.h)
// evaluated per element.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "duo_fast/gamma_to_alpha.h"
#include "gamma_to_alpha_tables.h"

namespace duo_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> gamma_to_alpha_cpu(const at::Tensor& gamma, int64_t vocab_size) {
  check_floating(gamma, "gamma", {at::kFloat, at::kDouble});
  check_vocab(vocab_size);
  check_not_nan(gamma, "gamma");
  const double* table = gamma_to_alpha_table(vocab_size);
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
