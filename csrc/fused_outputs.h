// Outputs of the ops that return (per-row value, d value / d logits): the value
// has the logits' leading shape (float32), the gradient the logits' shape, or is
// empty when not requested (or written into the caller's tensor: the ".into"
// overloads). Shared by the CPU and CUDA bindings.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <initializer_list>
#include <tuple>
#include <utility>

#include "checks.h"

namespace duo_fast {

inline at::Tensor fused_value_output(const at::Tensor& logits) {
  return at::empty(logits.sizes().slice(0, logits.dim() - 1), logits.options().dtype(at::kFloat));
}

inline std::tuple<at::Tensor, at::Tensor> fused_grad_outputs(const at::Tensor& logits, bool compute_grad) {
  // Contiguous whatever the logits' strides: the kernels write rows of K entries.
  at::Tensor grad = compute_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  return {fused_value_output(logits), grad};
}

// The ".into" overloads write the gradient into the caller's tensor `grad`: it
// must have the logits' shape and dtype, be contiguous, on their device, and
// share no memory with them or the other inputs (`others`: tensor and name),
// since the kernels read a row after writing part of it. Inputs in another
// storage pass whatever their strides; within one storage, only provably
// disjoint memory does.
inline void check_grad_into(const at::Tensor& logits, const at::Tensor& grad, const char* logits_name,
                            std::initializer_list<std::pair<const at::Tensor*, const char*>> others = {}) {
  TORCH_CHECK(grad.sizes() == logits.sizes(), "duo_fast: grad must have ", logits_name, "'s shape ", logits.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type(), "duo_fast: grad must have ", logits_name, "'s dtype ",
              logits.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == logits.device(), "duo_fast: grad is on ", grad.device(), " but ", logits_name,
              " is on ", logits.device());
  TORCH_CHECK(grad.is_contiguous(), "duo_fast: grad must be contiguous");
  const auto separate = [&](const at::Tensor& t, const char* name) {
    const bool same_storage = t.has_storage() && grad.has_storage() && t.storage().is_alias_of(grad.storage());
    TORCH_CHECK(!same_storage || at::get_overlap_status(grad, t) == at::MemOverlapStatus::No,
                "duo_fast: grad shares memory with ", name, "; pass a separate tensor");
  };
  separate(logits, logits_name);
  for (const auto& [t, name] : others) separate(*t, name);
}

// The argument checks of the two ".into" overloads (their CPU and CUDA impls).
inline void check_usdm_loss_into_args(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& x0,
                                      const at::Tensor& alpha, const at::Tensor& dalpha, const at::Tensor& grad) {
  check_usdm_loss_args(logits, z, x0, alpha, dalpha);
  check_grad_into(logits, grad, "logits", {{&z, "z"}, {&x0, "x0"}, {&alpha, "alpha"}, {&dalpha, "dalpha"}});
}

inline void check_distill_into_args(const at::Tensor& student, const at::Tensor& teacher, int64_t direction,
                                    const at::Tensor& grad) {
  check_distill_args(student, teacher, direction);
  check_grad_into(student, grad, "student_logits", {{&teacher, "teacher_logits"}});
}

}  // namespace duo_fast
