// CPU kernel of the fused uniform-state diffusion loss (SPEC section 3; row
// math and gradient derivation in usdm_loss.h): one row per task, three sweeps,
// float64 math per entry, gradient written in the same call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "duo_fast/usdm_loss.h"
#include "fused_outputs.h"

namespace duo_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> usdm_loss_cpu(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& x0,
                                                 const at::Tensor& alpha, const at::Tensor& dalpha,
                                                 bool compute_grad) {
  check_usdm_loss_args(logits, z, x0, alpha, dalpha);
  const at::Tensor l = logits.contiguous(), zc = z.contiguous(), xc = x0.contiguous();
  const at::Tensor ac = alpha.contiguous(), dc = dalpha.contiguous();
  const int64_t K = l.size(-1), rows = zc.numel();
  auto [loss, grad] = fused_grad_outputs(l, compute_grad);
  const float* lp = l.const_data_ptr<float>();
  const int64_t* zp = zc.const_data_ptr<int64_t>();
  const int64_t* xp = xc.const_data_ptr<int64_t>();
  const double* ap = ac.const_data_ptr<double>();
  const double* dp = dc.const_data_ptr<double>();
  float* outp = loss.mutable_data_ptr<float>();
  float* gp = compute_grad ? grad.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* lr = lp + row * K;
      const int64_t x = xp[row], zz = zp[row];
      const usdm::Token t = usdm::token_constants(K, ap[row], dp[row], x == zz);
      double m = -INFINITY;
      for (int64_t j = 0; j < K; ++j) m = std::max(m, double(lr[j]));
      double se = 0.0;
      for (int64_t j = 0; j < K; ++j) se += std::exp(double(lr[j]) - m);
      const double lse = m + std::log(se);
      usdm::Sums small{0.0, 0.0, 0.0};
      int64_t b = -1;
      double p_b = 0.0;
      for (int64_t j = 0; j < K; ++j) {
        if (j == x || j == zz) continue;
        const double p = std::exp(double(lr[j]) - lse);
        if (usdm::is_big(p)) {
          b = j;
          p_b = p;
        } else {
          usdm::accumulate(small, p, t.r);
        }
      }
      const usdm::Sums s = usdm::add_big(small, p_b, t.r, b >= 0);
      const double p_x = std::exp(double(lr[x]) - lse), p_z = std::exp(double(lr[zz]) - lse);
      outp[row] = float(usdm::loss(t, p_x, p_z, s));
      if (gp) {
        const usdm::Grad g = usdm::grad_constants(t, p_x, p_z, s, small.P_excl, p_b);
        float* gr = gp + row * K;
        for (int64_t j = 0; j < K; ++j) gr[j] = float(usdm::grad_entry(std::exp(double(lr[j]) - lse), g.F, g.C, g.r));
        if (b >= 0) gr[b] = float(g.grad_b);
        gr[zz] = float(g.grad_z);
        gr[x] = float(g.grad_x);
      }
    }
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) { m.impl("usdm_loss", &usdm_loss_cpu); }

}  // namespace duo_fast
