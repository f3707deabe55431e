// Host entry points of the tensor-core curriculum_embed kernels (sm_80+;
// curriculum_embed_mma.cu): raw device pointers and a stream, like launchers.h.
// The operands are bf16 bits (uint16_t): the caller converts E (forward) and
// grad_h (backward) once. Outputs as cuda::curriculum_embed /
// curriculum_embed_backward (h float32 [n, d], z, lse double; dE float32).
#pragma once

#include <cstdint>

namespace duo_fast {
namespace cuda {

// The architecture (major * 10 + minor) of the kernel binary the runtime runs on
// the current device (cudaFuncAttributes::binaryVersion): the tensor-core
// kernels need >= 80. The emulation reports 80.
int curriculum_mma_binary_version();

int curriculum_embed_mma(const int64_t* x0, const double* gamma, const double* inv_tau, const uint16_t* embedding_bf16,
                         int64_t n, int64_t vocab_size, int64_t d, uint64_t seed, uint64_t offset, float* h,
                         int64_t* z, double* lse, uint32_t* checks, void* stream);
int curriculum_embed_backward_mma(const uint16_t* grad_h_bf16, const int64_t* x0, const double* gamma,
                                  const double* inv_tau, const double* lse, int64_t n, int64_t vocab_size, int64_t d,
                                  uint64_t seed, uint64_t offset, float* grad_embedding, void* stream);

}  // namespace cuda
}  // namespace duo_fast
