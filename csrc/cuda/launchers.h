// Host entry points of the CUDA kernels: raw device pointers and a stream, no
// torch types (so .cu files compile without torch headers, in about a second,
// and also under the CPU emulation). Each returns the launch's cudaError_t as int.
#pragma once

#include <cstdint>

namespace duo_fast {
namespace cuda {

// alpha, dalpha_dgamma = T(gamma) for n values; `table` is the device copy of
// the per-K schedule table (schedule.h). T = float or double.
int gamma_to_alpha_f32(const float* gamma, float* alpha, float* dalpha, int64_t n, const double* table,
                       void* stream);
int gamma_to_alpha_f64(const double* gamma, double* alpha, double* dalpha, int64_t n, const double* table,
                       void* stream);

// z_t (and z_s when gamma_s != nullptr) for n tokens (SPEC 2a, 2b; latent.h).
int sample_zt(const int64_t* x0, const double* gamma_t, const double* gamma_s, int64_t* z_t, int64_t* z_s, int64_t n,
              int64_t vocab_size, uint64_t seed, uint64_t offset, void* stream);

// Per-row KL (direction 0: KL(pS||pT), 1: KL(pT||pS)) of float32 [rows, K]
// logits; grad (nullptr to skip) gets dKL/dstudent (distill.h).
int distill_kl(const float* student, const float* teacher, float* kl, float* grad, int64_t rows, int64_t K,
               int direction, void* stream);

// Per-token loss of float32 [rows, K] logits (SPEC 3; usdm_loss.h); grad
// (nullptr to skip) gets d loss / d logits. Ids must already be validated.
int usdm_loss(const float* logits, const int64_t* z, const int64_t* x0, const double* alpha, const double* dalpha,
              float* loss, float* grad, int64_t rows, int64_t K, void* stream);

// Reverse-process step (SPEC 4; sampling.h) over [rows, K] logits of dtype code
// `dtype` (0 float32, 1 bfloat16, 2 float16): z_s per row into out, or the dense
// posterior into q [rows, K]. Arguments must already be validated.
int sample_step(const void* logits, int dtype, const int64_t* z, const double* alpha_t, const double* alpha_s,
                int64_t* out, int64_t rows, int64_t K, double kappa, double temperature, double top_p, uint64_t seed,
                uint64_t offset, void* stream);
int posterior(const void* logits, int dtype, const int64_t* z, const double* alpha_t, const double* alpha_s, float* q,
              int64_t rows, int64_t K, double kappa, double temperature, double top_p, void* stream);

}  // namespace cuda
}  // namespace duo_fast
