// CPU kernel of the distillation KLs (SPEC section 3; row math in distill.h):
// one row per task, float64 accumulation, gradient written in the same call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "duo_fast/distill.h"
#include "fused_outputs.h"

namespace duo_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> distill_kl_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  int64_t direction, bool compute_grad) {
  check_distill_args(student, teacher, direction);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t K = s.size(-1), rows = s.numel() / K;
  auto [kl, grad] = fused_grad_outputs(s, compute_grad);
  const float* sp = s.const_data_ptr<float>();
  const float* tp = t.const_data_ptr<float>();
  float* klp = kl.mutable_data_ptr<float>();
  float* gp = compute_grad ? grad.mutable_data_ptr<float>() : nullptr;
  const int dir = int(direction);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* ls = sp + r * K;
      const float* lt = tp + r * K;
      double ms = -INFINITY, mt = -INFINITY;
      for (int64_t j = 0; j < K; ++j) {
        ms = std::max(ms, double(ls[j]));
        mt = std::max(mt, double(lt[j]));
      }
      double ss = 0.0, st = 0.0;
      for (int64_t j = 0; j < K; ++j) {
        ss += std::exp(double(ls[j]) - ms);
        st += std::exp(double(lt[j]) - mt);
      }
      const double lse_s = ms + std::log(ss), lse_t = mt + std::log(st);
      double acc = 0.0;
      for (int64_t j = 0; j < K; ++j) acc += distill::kl_term<double>(dir, ls[j], lt[j], lse_s, lse_t);
      klp[r] = float(acc);
      if (gp) {
        float* g = gp + r * K;
        for (int64_t j = 0; j < K; ++j) g[j] = float(distill::grad_term<double>(dir, ls[j], lt[j], lse_s, lse_t, acc));
      }
    }
  });
  return {kl, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) { m.impl("distill_kl", &distill_kl_cpu); }

}  // namespace duo_fast
