// Host entry points of the CUDA kernels: raw device pointers and a stream, no
// torch types (so .cu files compile without torch headers, in about a second,
// and also under the CPU emulation). Each returns the launch's cudaError_t as int.
// `checks` (nullptr: none) is the device array of check::kNumArgs uint32
// counters of duo_fast/device_check.h: the kernels validate the token ids and
// levels they read, never index memory with an invalid id, write unspecified
// outputs for that row or token, and count the violation there (no host sync).
#pragma once

#include <cstdint>

namespace duo_fast {
namespace cuda {

// alpha, dalpha_dgamma = T(gamma) for n values; `table` is the device copy of
// the per-K schedule table (gamma_to_alpha.h). T = float or double. NaN gammas
// give NaN and are counted (check::kGammaNaN).
int gamma_to_alpha_f32(const float* gamma, float* alpha, float* dalpha, int64_t n, const double* table,
                       uint32_t* checks, void* stream);
int gamma_to_alpha_f64(const double* gamma, double* alpha, double* dalpha, int64_t n, const double* table,
                       uint32_t* checks, void* stream);

// z_t (and z_s when gamma_s != nullptr) for n tokens (docs/math.md §2a, §2b; sample_zt.h).
// An invalid x0 or a NaN gamma / gamma_s gives id 0 for that token (counted).
int sample_zt(const int64_t* x0, const double* gamma_t, const double* gamma_s, int64_t* z_t, int64_t* z_s, int64_t n,
              int64_t vocab_size, uint64_t seed, uint64_t offset, uint32_t* checks, void* stream);

// Per-row KL (direction 0: KL(pS||pT), 1: KL(pT||pS)) of [rows, K] logits of
// dtype codes student_dtype / teacher_dtype (0 float32, 1 bfloat16, 2 float16);
// grad (nullptr to skip), in the student's dtype, gets dKL/dstudent (distill_kl.h).
int distill_kl(const void* student, int student_dtype, const void* teacher, int teacher_dtype, float* kl, void* grad,
               int64_t rows, int64_t K, int direction, void* stream);

// Per-token loss of [rows, K] logits of dtype code `dtype` (0 float32, 1
// bfloat16, 2 float16; docs/math.md §3; usdm_loss.h); grad (nullptr to skip), in the
// logits' dtype, gets d loss / d logits. Invalid ids or levels: NaN row.
int usdm_loss(const void* logits, int dtype, const int64_t* z, const int64_t* x0, const double* alpha,
              const double* dalpha, float* loss, void* grad, int64_t rows, int64_t K, uint32_t* checks, void* stream);

// Reverse-process step (docs/math.md §4; sample_step.h) over [rows, K] logits of dtype code
// `dtype` (0 float32, 1 bfloat16, 2 float16): z_s per row into out, or the dense
// posterior into q [rows, K]. Scalars must already be validated; a row with an
// invalid z or level gives id 0 / a NaN row of q; a logits row with NaN, +inf
// or no finite entry (check::kLogits) keeps z / gives a NaN row of q. Row r
// draws from Philox stream row_offset + r (rows of a larger call).
int sample_step(const void* logits, int dtype, const int64_t* z, const double* alpha_t, const double* alpha_s,
                int64_t* out, int64_t rows, int64_t K, double kappa, double temperature, double top_p, uint64_t seed,
                uint64_t offset, uint64_t row_offset, uint32_t* checks, void* stream);
int posterior(const void* logits, int dtype, const int64_t* z, const double* alpha_t, const double* alpha_s, float* q,
              int64_t rows, int64_t K, double kappa, double temperature, double top_p, uint32_t* checks,
              void* stream);

// DiffusionGemma's denoising step (canvas_step.h) over [rows, K] logits of dtype
// code `dtype` (0 float32, 1 bfloat16, 2 float16) and a float64 temperature per
// row: one draw from softmax(x / T), the argmax and the float32 entropy per row.
// A row with NaN, +inf or no finite logit (check::kLogits) or an invalid
// temperature (check::kTemperature) gets 0, 0 and a NaN entropy.
int canvas_step(const void* logits, int dtype, const double* temperature, int64_t* sample, int64_t* argmax,
                float* entropy, int64_t rows, int64_t K, uint64_t seed, uint64_t offset, uint32_t* checks,
                void* stream);

// softmax_embed (softmax_embed.h): h [rows, d] float32 = scale * softmax(x / T) E
// over [rows, K] logits of dtype code `dtype` and a float64 temperature per row;
// E [K, d] of dtype code emb_dtype, on tensor cores when `tensor_cores` (bf16 E
// only, sm_80+). row_max [rows] and row_sum [rows] are the caller's workspace.
// A row with NaN, +inf or no finite logit (check::kLogits) or an invalid
// temperature (check::kTemperature) gets a NaN row of h.
int softmax_embed(const void* logits, int dtype, const double* temperature, const void* embedding, int emb_dtype,
                  bool tensor_cores, int64_t rows, int64_t K, int64_t d, double scale, float* row_max,
                  double* row_sum, float* h, uint32_t* checks, void* stream);

// Exact curriculum input (docs/math.md §2c, §2d; curriculum_embed.h) for n tokens over a float32
// [vocab_size, d] embedding: h [n, d] float32, z, row log-sum-exp (double);
// backward writes every row of grad_embedding [vocab_size, d].
int curriculum_embed(const int64_t* x0, const double* gamma, const double* inv_tau, const float* embedding,
                     int64_t n, int64_t vocab_size, int64_t d, uint64_t seed, uint64_t offset, float* h, int64_t* z,
                     double* lse, uint32_t* checks, void* stream);
int curriculum_embed_backward(const float* grad_h, const int64_t* x0, const double* gamma, const double* inv_tau,
                              const double* lse, int64_t n, int64_t vocab_size, int64_t d, uint64_t seed,
                              uint64_t offset, float* grad_embedding, void* stream);

// Duo++ top-k curriculum input (docs/math.md §2e; curriculum_topk.h), a warp per token. The caller
// allocates `slots` = topk_scratch_slots(n, k, sm_count) scratch slots (one per
// warp; sm_count = the device's multiprocessor count, which sizes the grid):
// map_scratch of slots * 2 * topk_map_capacity(k) int32 filled with -1 (left
// so). curriculum_topk_embed writes h as float32 [n, d]; emb_dtype: 0 float32,
// 1 bfloat16, 2 float16.
int64_t topk_scratch_slots(int64_t n, int64_t k, int64_t sm_count);
int64_t topk_map_capacity(int64_t k);
int curriculum_topk(const int64_t* x0, const double* gamma, const double* inv_tau, int64_t* ids, float* weights,
                    int64_t* z, int64_t n, int64_t k, int64_t vocab_size, int zt_rule, uint64_t seed, uint64_t offset,
                    int32_t* map_scratch, int64_t slots, uint32_t* checks, void* stream);
int curriculum_topk_embed(const int64_t* x0, const double* gamma, const double* inv_tau, const void* embedding,
                          int emb_dtype, int64_t d, float* h, int64_t* ids, float* weights, int64_t* z, int64_t n,
                          int64_t k, int64_t vocab_size, int zt_rule, uint64_t seed, uint64_t offset,
                          int32_t* map_scratch, int64_t slots, uint32_t* checks, void* stream);
// grad [K, d] (zeroed by the caller) += scatter of w_i grad_h [tokens, d] over ids
// [tokens, k]; the sorted variant takes the flat ids sorted stably and the entry
// order, and writes every row that appears (deterministic: runs of equal ids are
// summed in segments of topk_bag_segment(k) entries combined in segment order;
// partial_scratch holds topk_bag_partial_floats(entries, k, d) floats, at most
// grad_h's size).
int topk_bag_backward_atomic(const float* grad_h, const int64_t* ids, const float* weights, float* grad,
                             int64_t tokens, int64_t k, int64_t d, int64_t vocab_size, uint32_t* checks,
                             void* stream);
int64_t topk_bag_segment(int64_t k);
int64_t topk_bag_partial_floats(int64_t entries, int64_t k, int64_t d);
int topk_bag_backward_sorted(const float* grad_h, const int64_t* sorted_ids, const int64_t* order,
                             const float* weights, float* grad, int64_t entries, int64_t k, int64_t d,
                             int64_t vocab_size, float* partial_scratch, uint32_t* checks, void* stream);

}  // namespace cuda
}  // namespace duo_fast
