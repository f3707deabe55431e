// The float storage types the CPU kernels read (float32, bfloat16, float16),
// passed to the kernel as the raw-bit types of duo_fast/logits.h so the same
// row code serves the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "duo_fast/logits.h"

namespace duo_fast {

// Runs fn(typed const pointer to t's data); `name` is t's argument name for the error.
template <class Fn>
void dispatch_float_storage(const at::Tensor& t, const char* name, Fn&& fn) {
  switch (t.scalar_type()) {
    case at::kFloat: fn(t.const_data_ptr<float>()); break;
    case at::kBFloat16: fn(reinterpret_cast<const bf16_bits*>(t.const_data_ptr<at::BFloat16>())); break;
    case at::kHalf: fn(reinterpret_cast<const f16_bits*>(t.const_data_ptr<at::Half>())); break;
    default: TORCH_CHECK(false, "duo_fast: ", name, " has dtype ", t.scalar_type(), ", expected Float, BFloat16 or Half");
  }
}

}  // namespace duo_fast
