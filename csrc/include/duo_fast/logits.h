// Logit storage types read (and, for gradients, written) by the row kernels:
// float32, bfloat16 and float16, all computed in float32. The 16-bit types are carried as raw bits (the CPU
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

DUO_HD_ALWAYS float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

DUO_HD_ALWAYS uint32_t bits_from_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DUO_HD_ALWAYS float to_float(float x) { return x; }
// bfloat16 is the top half of a float32.
DUO_HD_ALWAYS float to_float(bf16_bits x) { return float_from_bits(uint32_t(x.bits) << 16); }
// IEEE half: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Written with bit
// masks (no branches, no ?:) so GCC vectorizes the CPU loops that read float16 rows; a subnormal is
// mantissa * 2^-24 (exact: float(mantissa) < 2^10 and the product is normal).
DUO_HD_ALWAYS float to_float(f16_bits x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t em = x.bits & 0x7fffu, exponent = em >> 10;
  const uint32_t normal = (em << 13) + (112u << 23);          // exponent + (127 - 15)
  const uint32_t special = (em << 13) | 0x7f800000u;          // inf / NaN (payload kept)
  const uint32_t sub = bits_from_float(float(em) * 0x1.0p-24f);  // zero or subnormal
  const uint32_t is_sub = 0u - uint32_t(exponent == 0), is_special = 0u - uint32_t(exponent == 31);  // masks
  return float_from_bits(sign | (sub & is_sub) | (special & is_special) | (normal & ~(is_sub | is_special)));
}

// float32 -> storage type, rounded to nearest, ties to even (what the hardware's
// cvt.rn.bf16.f32 / cvt.rn.f16.f32 and torch's CPU conversions do), in integer
// arithmetic only, so the result does not depend on the FPU's rounding or
// flush-to-zero modes and is the same on the CPU, the GPU and the emulation.
// NaN: torch's canonical NaNs (bfloat16 0x7fc0, float16 0x7e00 with the sign);
// NaN payloads are the only bits that may differ from the hardware's.
template <class T>
struct FromFloat;

template <>
struct FromFloat<float> {
  static DUO_HD_ALWAYS float convert(float v) { return v; }
};

template <>
struct FromFloat<bf16_bits> {
  static DUO_HD_ALWAYS bf16_bits convert(float v) {
    const uint32_t u = bits_from_float(v);
    // + 0x7fff + the lowest kept bit: rounds up above the halfway point and at it when odd.
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return bf16_bits{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r)};
  }
};

template <>
struct FromFloat<f16_bits> {
  static DUO_HD_ALWAYS f16_bits convert(float v) {
    const uint32_t u = bits_from_float(v);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    // Normal halves (|v| >= 2^-14): drop 13 mantissa bits with the same trick as bf16;
    // a carry out of the mantissa bumps the exponent (up to inf: 65520 -> 0x7c00).
    const uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    // Subnormal halves (|v| < 2^-14): the integer significand m (implicit bit set for
    // normal floats) times 2^(e - 150) in units of 2^-24 is m >> (126 - e), rounded
    // to nearest even on the dropped bits; a shift of 25 or more leaves 0 (m < 2^24).
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | (e != 0 ? 0x800000u : 0u);
    const uint32_t s0 = 126u - (e != 0 ? e : 1u);  // float subnormals: exponent 1 - 127
    const uint32_t s = s0 < 25u ? s0 : 25u;
    const uint32_t q = m >> s, rem = m & ((1u << s) - 1u), half = 1u << (s - 1u);
    const uint32_t sub = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    const uint32_t h = a > 0x7f800000u ? 0x7e00u : a >= (143u << 23) ? 0x7c00u : a >= (113u << 23) ? normal : sub;
    return f16_bits{uint16_t(sign | h)};
  }
};

template <class T>
DUO_HD_ALWAYS T from_float(float v) {
  return FromFloat<T>::convert(v);
}

}  // namespace duo_fast
