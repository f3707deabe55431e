// Warp-level tensor-core instructions of sm_80+ behind small __device__
// wrappers: inline PTX on the device (__CUDA_ARCH__ >= 800), the lane-by-lane
// emulation of tests/emulation/cuda_emulation.h under DUO_FAST_EMULATE_CUDA
// (g++ cannot compile inline PTX), and __trap() when compiled for an older
// architecture (the host dispatch never launches a tensor-core kernel there).
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16", bf16), with
// g = lane >> 2, q = lane % 4, two bf16 per 32-bit register (lower index in the
// low half):
//   A (16x16, row-major) a[0..3]: (g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)
//   B (16x8, "col")      b[0..1]: (k = 2q..2q+1, n = g), (k = 2q+8..2q+9, n = g)
//   C, D (16x8 float)    c[0..3]: (g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)
// ldmatrix.m8n8.x4: lane 8m + r gives the address of row r of matrix m (16
// contiguous bytes, 16-byte aligned, shared memory); register m of lane l gets
// elements (g, 2q..2q+1) of matrix m, or with .trans (2q, g), (2q+1, g).
#pragma once

#include <cstdint>

#include "duo_fast/cuda_compat.h"
#include "duo_fast/common.h"
#include "duo_fast/logits.h"  // bits_from_float

namespace duo_fast {
namespace mma {

#if !defined(DUO_FAST_EMULATE_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define DUO_FAST_MMA_PTX 1
#else
#define DUO_FAST_MMA_PTX 0
#endif

// bfloat16 bits of x, rounded to nearest even (NaN stays a quiet NaN).
DUO_HD uint32_t bf16_rn_bits(float x) {
  const uint32_t u = bits_from_float(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Two floats as one bf16x2 register (lo in bits 0..15), round to nearest even.
DUO_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
#if DUO_FAST_MMA_PTX
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return bf16_rn_bits(lo) | (bf16_rn_bits(hi) << 16);
#endif
}

// d = A B + c, one warp (all 32 lanes, converged).
DUO_DEVICE void mma_bf16_16816(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
#if defined(DUO_FAST_EMULATE_CUDA)
  ::cuda_emu::mma_m16n8k16_bf16_f32(d, a, b, c);
#elif DUO_FAST_MMA_PTX
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  (void)d, (void)a, (void)b, (void)c;
  __trap();  // sm < 80: the portable kernels run instead
#endif
}

#if DUO_FAST_MMA_PTX
DUO_DEVICE uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
#endif

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 into r[0 .. X-1].
template <int X, bool Trans>
DUO_DEVICE void ldmatrix(uint32_t* r, const void* smem_row) {
  static_assert(X == 1 || X == 2 || X == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(DUO_FAST_EMULATE_CUDA)
  ::cuda_emu::ldmatrix_m8n8_b16(r, smem_row, X, Trans);
#elif DUO_FAST_MMA_PTX
  const uint32_t s = smem_addr(smem_row);
  if constexpr (X == 1 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(s));
  else if constexpr (X == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(s));
  else if constexpr (X == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  else if constexpr (X == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(s));
  else if constexpr (!Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#else
  (void)r, (void)smem_row;
  __trap();
#endif
}

}  // namespace mma
}  // namespace duo_fast
