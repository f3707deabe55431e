// CUDA kernel of the distillation KLs (SPEC section 3; row math in distill.h):
// one block per row (grid-stride over rows); sweep 1 merges online-softmax
// states of student and teacher, sweep 2 sums the KL, sweep 3 writes the gradient.
// A row with a NaN or +inf logit (either law) or with no finite logit gets a NaN
// KL and a NaN gradient row (distill.h).
#include "duo_fast/cuda_compat.h"
#include "duo_fast/distill.h"
#include "duo_fast/reduce.h"
#include "launchers.h"

namespace duo_fast {
namespace cuda {

__global__ void distill_kl_kernel(const float* __restrict__ student, const float* __restrict__ teacher,
                                  float* __restrict__ kl, float* __restrict__ grad, int64_t rows, int64_t K,
                                  int direction) {
  __shared__ reduce::MaxSum<float> scratch_ms[32];
  __shared__ float scratch[32];
  __shared__ int scratch_i[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* ls = student + r * K;
    const float* lt = teacher + r * K;
    reduce::MaxSum<float> s = reduce::max_sum_identity<float>(), t = reduce::max_sum_identity<float>();
    int bad = 0;
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      s = reduce::max_sum_push(s, ls[j]);
      t = reduce::max_sum_push(t, lt[j]);
      bad |= int(!distill::finite_or_masked(ls[j])) | int(!distill::finite_or_masked(lt[j]));
    }
    const reduce::MaxSum<float> ms = reduce::block_reduce_max_sum(s, scratch_ms);
    const reduce::MaxSum<float> mt = reduce::block_reduce_max_sum(t, scratch_ms);
    bad = reduce::block_reduce(bad, reduce::Max(), 0, scratch_i);
    if (bad || !(ms.m > -INFINITY) || !(mt.m > -INFINITY)) {  // no distribution: a NaN row (same in every thread)
      if (threadIdx.x == 0) kl[r] = __int_as_float(0x7fc00000);
      if (grad != nullptr)
        for (int64_t j = threadIdx.x; j < K; j += blockDim.x) grad[r * K + j] = __int_as_float(0x7fc00000);
      continue;
    }
    const float lse_s = reduce::max_sum_lse(ms);
    const float lse_t = reduce::max_sum_lse(mt);
    float acc = 0.0f;
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) acc += distill::kl_term(direction, ls[j], lt[j], lse_s, lse_t);
    const float row_kl = reduce::block_reduce(acc, reduce::Sum(), 0.0f, scratch);
    if (threadIdx.x == 0) kl[r] = row_kl;
    if (grad != nullptr) {
      float* g = grad + r * K;
      for (int64_t j = threadIdx.x; j < K; j += blockDim.x)
        g[j] = distill::grad_term(direction, ls[j], lt[j], lse_s, lse_t, row_kl);
    }
  }
}

int distill_kl(const float* student, const float* teacher, float* kl, float* grad, int64_t rows, int64_t K,
               int direction, void* stream) {
  if (rows == 0) return 0;
  constexpr unsigned kThreads = 256;
  const unsigned blocks = rows < 65535 ? unsigned(rows) : 65535u;
  return int(launch_kernel(distill_kl_kernel, dim3(blocks), dim3(kThreads), 0, static_cast<cudaStream_t>(stream),
                           student, teacher, kl, grad, rows, K, direction));
}

}  // namespace cuda
}  // namespace duo_fast
