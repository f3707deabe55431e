// Test-only kernels exercising the tensor-core wrappers of csrc/cuda/mma_sm80.cuh
// (one warp each), so tests/test_curriculum_mma.py can check the emulated
// instructions lane by lane against the PTX ISA fragment layouts and against a
// plain matrix product. Compiled into the emulated test library and by nvcc in
// tests/test_build.py; never part of the shipped extension.
#include <cstdint>

#include "duo_fast/cuda_compat.h"
#include "mma_sm80.cuh"

namespace duo_fast {
namespace test {

// d[lane][0..3] = mma(a[lane][0..3], b[lane][0..1], c[lane][0..3]): registers given per lane.
__global__ void mma_regs_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b,
                                const float* __restrict__ c, float* __restrict__ d) {
  const int l = int(threadIdx.x);
  uint32_t ra[4], rb[2];
  float rc[4], rd[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[4 * l + i], rc[i] = c[4 * l + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[2 * l + i];
  mma::mma_bf16_16816(rd, ra, rb, rc);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = rd[i];
}

// ldmatrix.x{X}[.trans] of mats [4][8][8] (b16) staged in shared memory with a
// row pitch of 24 elements (48 bytes); lane l points at row rows[l] of matrix
// mats_of[l] (the test decides which lanes address what). out[lane][0..X-1].
template <int X, bool T>
__global__ void ldmatrix_kernel(const uint16_t* __restrict__ mats, const int* __restrict__ mat_of,
                                const int* __restrict__ row_of, uint32_t* __restrict__ out) {
  // dynamic: a static __shared__ of a template lands outside the emulation's shared section
  DUO_DYNAMIC_SHARED(uint16_t, smem);
  uint16_t(*s)[8][24] = reinterpret_cast<uint16_t(*)[8][24]>(smem);
  const int l = int(threadIdx.x);
  for (int i = l; i < 4 * 8 * 8; i += 32) s[i / 64][(i / 8) % 8][i % 8] = mats[i];
  __syncwarp();
  uint32_t r[4] = {0u, 0u, 0u, 0u};
  mma::ldmatrix<X, T>(r, &s[mat_of[l]][row_of[l]][0]);
  for (int i = 0; i < 4; ++i) out[4 * l + i] = r[i];
}

// D [16 x 8] = A [16 x 16] B [16 x 8] (float32 in, rounded to bf16 when staged)
// the way the curriculum kernels do it: A from shared memory by ldmatrix.x4
// (row-major A) or ldmatrix.x4.trans (A stored transposed, a_trans = 1), B
// (row-major [k][n]) by ldmatrix.x2.trans, D stored from the C-fragment layout.
__global__ void gemm_tile_kernel(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ D,
                                 int a_trans) {
  __shared__ __align__(16) uint16_t As[16][24];  // [m][k], or [k][m] when a_trans
  __shared__ __align__(16) uint16_t Bs[16][16];  // [k][n], columns 8..15 unused
  const int l = int(threadIdx.x), g = l >> 2, q = l & 3;
  for (int i = l; i < 256; i += 32) {
    const int m = i / 16, k = i % 16;
    const uint16_t v = uint16_t(mma::bf16_rn_bits(A[m * 16 + k]));
    if (a_trans) As[k][m] = v;
    else As[m][k] = v;
  }
  for (int i = l; i < 128; i += 32) Bs[i / 8][i % 8] = uint16_t(mma::bf16_rn_bits(B[i]));
  __syncwarp();
  uint32_t a[4], b[2];
  if (a_trans) mma::ldmatrix<4, true>(a, &As[(l & 7) + 8 * (l >> 4)][8 * ((l >> 3) & 1)]);
  else mma::ldmatrix<4, false>(a, &As[(l & 7) + 8 * ((l >> 3) & 1)][8 * (l >> 4)]);
  mma::ldmatrix<2, true>(b, &Bs[(l & 7) + 8 * ((l >> 3) & 1)][0]);  // lanes 16..31: addresses unused
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4];
  mma::mma_bf16_16816(d, a, b, c);
  D[g * 8 + 2 * q] = d[0];
  D[g * 8 + 2 * q + 1] = d[1];
  D[(g + 8) * 8 + 2 * q] = d[2];
  D[(g + 8) * 8 + 2 * q + 1] = d[3];
}

}  // namespace test
}  // namespace duo_fast

extern "C" int df_emu_mma_regs(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  return int(duo_fast::launch_kernel(duo_fast::test::mma_regs_kernel, dim3(1), dim3(32), 0, nullptr, a, b, c, d));
}

extern "C" int df_emu_ldmatrix(const uint16_t* mats, const int* mat_of, const int* row_of, uint32_t* out, int x,
                               int trans) {
  using namespace duo_fast::test;
  auto* k = x == 1 ? (trans ? ldmatrix_kernel<1, true> : ldmatrix_kernel<1, false>)
            : x == 2 ? (trans ? ldmatrix_kernel<2, true> : ldmatrix_kernel<2, false>)
                     : (trans ? ldmatrix_kernel<4, true> : ldmatrix_kernel<4, false>);
  return int(duo_fast::launch_kernel(k, dim3(1), dim3(32), 4 * 8 * 24 * sizeof(uint16_t), nullptr, mats, mat_of, row_of, out));
}

extern "C" int df_emu_gemm_tile(const float* A, const float* B, float* D, int a_trans) {
  return int(duo_fast::launch_kernel(duo_fast::test::gemm_tile_kernel, dim3(1), dim3(32), 0, nullptr, A, B, D, a_trans));
}

extern "C" uint32_t df_bf16_rn_bits(float x) { return duo_fast::mma::bf16_rn_bits(x); }

// The tensor-core curriculum_embed launchers (csrc/cuda/curriculum_embed_mma.cu) on
// host memory; operands as bf16 bits; checks: check::kNumArgs counters or nullptr.
#include "curriculum_embed_mma.h"

extern "C" int df_emu_curriculum_embed_mma(const int64_t* x0, const double* gamma, const double* inv_tau,
                                           const uint16_t* embedding_bf16, int64_t n, int64_t vocab_size, int64_t d,
                                           uint64_t seed, uint64_t offset, float* h, int64_t* z, double* lse,
                                           uint32_t* checks) {
  return duo_fast::cuda::curriculum_embed_mma(x0, gamma, inv_tau, embedding_bf16, n, vocab_size, d, seed, offset, h,
                                              z, lse, checks, nullptr);
}

extern "C" int df_emu_curriculum_embed_backward_mma(const uint16_t* grad_h_bf16, const int64_t* x0,
                                                    const double* gamma, const double* inv_tau, const double* lse,
                                                    int64_t n, int64_t vocab_size, int64_t d, uint64_t seed,
                                                    uint64_t offset, float* grad_embedding) {
  return duo_fast::cuda::curriculum_embed_backward_mma(grad_h_bf16, x0, gamma, inv_tau, lse, n, vocab_size, d, seed,
                                                       offset, grad_embedding, nullptr);
}
