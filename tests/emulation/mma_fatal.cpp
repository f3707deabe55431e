// Misuses of the emulated warp matrix instructions (cuda_emulation.h), each of
// which must abort with a message naming the instruction: run by
// tests/test_curriculum_mma.py as `mma_fatal <case>` (a program, since the
// emulation aborts the process). Compiled with the wrappers of mma_sm80.cuh.
#include <cstdio>
#include <cstring>

#include "duo_fast/cuda_compat.h"
#include "mma_sm80.cuh"

using namespace duo_fast;

// Half the warp issues ldmatrix, the other half mma.sync: a divergent warp.
__global__ void k_fatal_divergent_mma(float* out) {
  __shared__ __align__(16) uint16_t s[8][8];
  const int l = int(threadIdx.x);
  for (int i = l; i < 64; i += 32) s[i / 8][i % 8] = uint16_t(i);
  __syncwarp();
  uint32_t r[4] = {0u, 0u, 0u, 0u}, b[2] = {0u, 0u};
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4];
  if (l < 16) mma::ldmatrix<1, false>(r, &s[l % 8][0]);
  else mma::mma_bf16_16816(d, r, b, c);
  out[l] = float(r[0]);
}

// ldmatrix with a row address in global memory (not shared).
__global__ void k_fatal_ldmatrix_global(float* out) {
  uint32_t r[1];
  mma::ldmatrix<1, false>(r, out + 4 * (threadIdx.x % 8));
  out[threadIdx.x] = float(r[0]);
}

// ldmatrix with a shared row address that is not 16-byte aligned.
__global__ void k_fatal_ldmatrix_misaligned(float* out) {
  __shared__ __align__(16) uint16_t s[8][16];
  const int l = int(threadIdx.x);
  for (int i = l; i < 128; i += 32) s[i / 16][i % 16] = uint16_t(i);
  __syncwarp();
  uint32_t r[1];
  mma::ldmatrix<1, false>(r, &s[l % 8][1]);
  out[l] = float(r[0]);
}

// mma.sync called by a warp with an exited lane.
__global__ void k_fatal_mma_exited_lane(float* out) {
  if (threadIdx.x == 5) return;
  uint32_t a[4] = {0u, 0u, 0u, 0u}, b[2] = {0u, 0u};
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4];
  mma::mma_bf16_16816(d, a, b, c);
  out[threadIdx.x] = d[0];
}

int main(int argc, char** argv) {
  static __align__(16) float out[256];
  const char* which = argc > 1 ? argv[1] : "";
  if (!std::strcmp(which, "divergent")) launch_kernel(k_fatal_divergent_mma, dim3(1), dim3(32), 0, nullptr, out);
  else if (!std::strcmp(which, "global")) launch_kernel(k_fatal_ldmatrix_global, dim3(1), dim3(32), 0, nullptr, out);
  else if (!std::strcmp(which, "misaligned")) launch_kernel(k_fatal_ldmatrix_misaligned, dim3(1), dim3(32), 0, nullptr, out);
  else if (!std::strcmp(which, "exited")) launch_kernel(k_fatal_mma_exited_lane, dim3(1), dim3(32), 0, nullptr, out);
  else {
    std::printf("unknown case %s\n", which);
    return 2;
  }
  std::printf("did NOT abort\n");
  return 0;
}
