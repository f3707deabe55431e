// CPU kernel of the fused uniform-state diffusion loss (docs/math.md §3; row
// math and gradient derivation in usdm_loss.h): one row per task, three sweeps,
// gradient written in the same call, in the logits' dtype (float32, bfloat16 or
// float16, read natively). The row kernels (float32 entries with
// double sums, AVX2 + FMA or SSE2 picked at run time; float64 entries for rows
// near alpha = 0 or 1) are in usdm_loss_rows.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "fused_outputs.h"
#include "usdm_loss_rows.h"

namespace duo_fast {
namespace {

// The rows into loss (and into grad where defined, contiguous).
void usdm_loss_rows_cpu(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& x0, const at::Tensor& alpha,
                        const at::Tensor& dalpha, at::Tensor& loss, at::Tensor* grad) {
  // 16-bit logits are read natively (no float32 copy) and their gradient written
  // in their own dtype: the only [N, K] output is the gradient, 1x the logits' bytes.
  const at::Tensor l = logits.contiguous(), zc = z.contiguous(), xc = x0.contiguous();
  const at::Tensor ac = alpha.contiguous(), dc = dalpha.contiguous();
  const int64_t K = l.size(-1), rows = zc.numel();
  dispatch_float_storage(l, "logits", [&](const auto* lp) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(lp)>>;
    const usdm_cpu::Rows<T> args{lp,
                                 zc.const_data_ptr<int64_t>(),
                                 xc.const_data_ptr<int64_t>(),
                                 ac.const_data_ptr<double>(),
                                 dc.const_data_ptr<double>(),
                                 loss.mutable_data_ptr<float>(),
                                 grad != nullptr ? static_cast<T*>(grad->data_ptr()) : nullptr,
                                 K};
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(static_cast<size_t>(K));  // e_j = exp(x_j - max) of the current row
      usdm_cpu::rows(args, begin, end, scratch.data());
    });
  });
}

std::tuple<at::Tensor, at::Tensor> usdm_loss_cpu(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& x0,
                                                 const at::Tensor& alpha, const at::Tensor& dalpha,
                                                 bool compute_grad) {
  check_usdm_loss_args(logits, z, x0, alpha, dalpha);
  auto [loss, grad] = fused_grad_outputs(logits, compute_grad);
  usdm_loss_rows_cpu(logits, z, x0, alpha, dalpha, loss, compute_grad ? &grad : nullptr);
  return {loss, grad};
}

at::Tensor usdm_loss_into_cpu(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& x0,
                              const at::Tensor& alpha, const at::Tensor& dalpha, at::Tensor& grad) {
  check_usdm_loss_into_args(logits, z, x0, alpha, dalpha, grad);
  at::Tensor loss = fused_value_output(logits);
  usdm_loss_rows_cpu(logits, z, x0, alpha, dalpha, loss, &grad);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) {
  m.impl("usdm_loss", &usdm_loss_cpu);
  m.impl("usdm_loss.into", &usdm_loss_into_cpu);
}

}  // namespace duo_fast
