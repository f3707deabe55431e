// Outputs of the ops that return (per-row value, d value / d logits): the value
// has the logits' leading shape (float32), the gradient the logits' shape, or is
// empty when not requested. Shared by the CPU and CUDA bindings.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace duo_fast {

inline std::tuple<at::Tensor, at::Tensor> fused_grad_outputs(const at::Tensor& logits, bool compute_grad) {
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  at::Tensor value = at::empty(lead, logits.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  return {value, grad};
}

}  // namespace duo_fast
