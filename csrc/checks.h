// ATen-level argument checks shared by the CPU and CUDA bindings. Messages name
// the argument and say what was expected and what was given; the Python
// wrappers in duo_fast/ops.py run the same checks first, these guard direct
// torch.ops.duo_fast calls.
#pragma once

#include <ATen/ATen.h>

#include "duo_fast/common.h"

namespace duo_fast {

inline void check_floating(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  for (auto s : allowed) ok = ok || t.scalar_type() == s;
  TORCH_CHECK(ok, "duo_fast: ", name, " has dtype ", t.scalar_type(), ", expected one of ", c10::ArrayRef(allowed));
}

inline void check_vocab(int64_t vocab_size, const char* name = "vocab_size") {
  TORCH_CHECK(vocab_size >= kMinVocab && vocab_size <= kMaxVocab, "duo_fast: ", name, " must be in [", kMinVocab,
              ", ", kMaxVocab, "], got ", vocab_size);
}

inline void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), "duo_fast: ", name_a, " is on ", a.device(), " but ", name_b, " is on ",
              b.device());
}

}  // namespace duo_fast
