// Logit storage types read by the row kernels: float32, bfloat16 and float16,
// all computed in float32. The 16-bit types are carried as raw bits (the CPU
// bindings reinterpret c10::BFloat16 / c10::Half, whose layout is the same), so
// the same kernel source compiles under nvcc, g++ and the CUDA emulation.
#pragma once

#include <cstdint>
#include <cstring>

#include "duo_fast/common.h"

namespace duo_fast {

struct bf16_bits {
  uint16_t bits;
};
struct f16_bits {
  uint16_t bits;
};

DUO_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

DUO_HD uint32_t bits_from_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DUO_HD float to_float(float x) { return x; }
// bfloat16 is the top half of a float32.
DUO_HD float to_float(bf16_bits x) { return float_from_bits(uint32_t(x.bits) << 16); }
// IEEE half: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
DUO_HD float to_float(f16_bits x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu, mantissa = x.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float v = float(mantissa) * 0x1.0p-24f;
    return sign ? -v : v;
  }
  if (exponent == 31) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

}  // namespace duo_fast
