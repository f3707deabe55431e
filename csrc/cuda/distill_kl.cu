// CUDA kernel of the distillation KLs (docs/math.md §3; row math in distill_kl.h):
// one block per row (grid-stride over rows); sweep 1 merges online-softmax
// states of student and teacher, sweep 2 sums the KL, sweep 3 writes the gradient.
// A row with a NaN or +inf logit (either law) or with no finite logit gets a NaN
// KL and a NaN gradient row (distill_kl.h). Logits float32, bfloat16 or float16
// (each law its own type), read natively; the gradient in the student's type.
#include "duo_fast/cuda_compat.h"
#include "duo_fast/distill_kl.h"
#include "duo_fast/logits.h"
#include "duo_fast/reduce.h"
#include "launchers.h"

namespace duo_fast {
namespace cuda {

template <class TS, class TT>
__global__ void distill_kl_kernel(const TS* __restrict__ student, const TT* __restrict__ teacher,
                                  float* __restrict__ kl, TS* __restrict__ grad, int64_t rows, int64_t K,
                                  int direction) {
  __shared__ reduce::MaxSum<float> scratch_ms[32];
  __shared__ float scratch[32];
  __shared__ int scratch_i[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const TS* ls = student + r * K;
    const TT* lt = teacher + r * K;
    reduce::MaxSum<float> s = reduce::max_sum_identity<float>(), t = reduce::max_sum_identity<float>();
    int bad = 0;
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      const float vs = to_float(ls[j]), vt = to_float(lt[j]);
      s = reduce::max_sum_push(s, vs);
      t = reduce::max_sum_push(t, vt);
      bad |= int(!distill::finite_or_masked(vs)) | int(!distill::finite_or_masked(vt));
    }
    const reduce::MaxSum<float> ms = reduce::block_reduce_max_sum(s, scratch_ms);
    const reduce::MaxSum<float> mt = reduce::block_reduce_max_sum(t, scratch_ms);
    bad = reduce::block_reduce(bad, reduce::Max(), 0, scratch_i);
    if (bad || !(ms.m > -INFINITY) || !(mt.m > -INFINITY)) {  // no distribution: a NaN row (same in every thread)
      if (threadIdx.x == 0) kl[r] = __int_as_float(0x7fc00000);
      if (grad != nullptr)
        for (int64_t j = threadIdx.x; j < K; j += blockDim.x) grad[r * K + j] = from_float<TS>(__int_as_float(0x7fc00000));
      continue;
    }
    const float lse_s = reduce::max_sum_lse(ms);
    const float lse_t = reduce::max_sum_lse(mt);
    float acc = 0.0f;
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) acc += distill::kl_term(direction, to_float(ls[j]), to_float(lt[j]), lse_s, lse_t);
    const float row_kl = reduce::block_reduce(acc, reduce::Sum(), 0.0f, scratch);
    if (threadIdx.x == 0) kl[r] = row_kl;
    if (grad != nullptr) {
      TS* g = grad + r * K;
      for (int64_t j = threadIdx.x; j < K; j += blockDim.x)
        g[j] = from_float<TS>(distill::grad_term(direction, to_float(ls[j]), to_float(lt[j]), lse_s, lse_t, row_kl));
    }
  }
}

template <class TS, class TT>
int launch_distill_kl(const TS* student, const TT* teacher, float* kl, TS* grad, int64_t rows, int64_t K,
                      int direction, void* stream) {
  if (rows == 0) return 0;
  constexpr unsigned kThreads = 256;
  const unsigned blocks = rows < 65535 ? unsigned(rows) : 65535u;
  return int(launch_kernel(distill_kl_kernel<TS, TT>, dim3(blocks), dim3(kThreads), 0,
                           static_cast<cudaStream_t>(stream), student, teacher, kl, grad, rows, K, direction));
}

template <class TS>
int distill_kl_teacher(const TS* student, const void* teacher, int teacher_dtype, float* kl, TS* grad, int64_t rows,
                       int64_t K, int direction, void* stream) {
  switch (teacher_dtype) {
    case 0:
      return launch_distill_kl(student, static_cast<const float*>(teacher), kl, grad, rows, K, direction, stream);
    case 1:
      return launch_distill_kl(student, static_cast<const bf16_bits*>(teacher), kl, grad, rows, K, direction, stream);
    case 2:
      return launch_distill_kl(student, static_cast<const f16_bits*>(teacher), kl, grad, rows, K, direction, stream);
  }
  return int(cudaErrorInvalidValue);
}

// dtype codes as in launchers.h: 0 float32, 1 bfloat16, 2 float16; grad in the student's.
int distill_kl(const void* student, int student_dtype, const void* teacher, int teacher_dtype, float* kl, void* grad,
               int64_t rows, int64_t K, int direction, void* stream) {
  switch (student_dtype) {
    case 0:
      return distill_kl_teacher(static_cast<const float*>(student), teacher, teacher_dtype, kl,
                                static_cast<float*>(grad), rows, K, direction, stream);
    case 1:
      return distill_kl_teacher(static_cast<const bf16_bits*>(student), teacher, teacher_dtype, kl,
                                static_cast<bf16_bits*>(grad), rows, K, direction, stream);
    case 2:
      return distill_kl_teacher(static_cast<const f16_bits*>(student), teacher, teacher_dtype, kl,
                                static_cast<f16_bits*>(grad), rows, K, direction, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace duo_fast
