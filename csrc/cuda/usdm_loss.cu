// CUDA kernel of the fused uniform-state diffusion loss (SPEC section 3; row
// math and gradient derivation in usdm_loss.h): one block per row, grid-stride
// over rows; sweep 1 online softmax -> lse, sweep 2 the row sums, sweep 3 the
// gradient. Logits float32, bfloat16 or float16, read natively; the gradient in
// their dtype. Entries are evaluated in float64 (the CPU kernel's float32 entry
// path with its row switch, usdm_loss_rows.h, is not ported yet: on a GPU the
// float64 rate decides whether it is needed).
#include "duo_fast/cuda_compat.h"
#include "duo_fast/device_check.h"
#include "duo_fast/logits.h"
#include "duo_fast/reduce.h"
#include "duo_fast/usdm_loss.h"
#include "launchers.h"

namespace duo_fast {
namespace cuda {

template <class T>
__global__ void usdm_loss_kernel(const T* __restrict__ logits, const int64_t* __restrict__ z,
                                 const int64_t* __restrict__ x0, const double* __restrict__ alpha,
                                 const double* __restrict__ dalpha, float* __restrict__ loss,
                                 T* __restrict__ grad, int64_t rows, int64_t K, uint32_t* checks) {
  __shared__ reduce::MaxSum<double> scratch_ms[32];
  __shared__ double scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* l = logits + row * K;
    const int64_t x = x0[row], zz = z[row];
    const double a = alpha[row], da = dalpha[row];
    // Device-side value checks (device_check.h); the same values for the whole block.
    const bool ok_x = check::valid_id(x, K), ok_z = check::valid_id(zz, K);
    const bool ok_a = check::valid_alpha(a), ok_d = check::valid_dalpha(da);
    if (!(ok_x && ok_z && ok_a && ok_d)) {
      if (threadIdx.x == 0) {
        loss[row] = check::nan_f();
        if (!ok_x) check::report(checks, check::kX0);
        if (!ok_z) check::report(checks, check::kZ);
        if (!ok_a) check::report(checks, check::kAlpha);
        if (!ok_d) check::report(checks, check::kDalpha);
      }
      if (grad != nullptr)
        for (int64_t j = threadIdx.x; j < K; j += blockDim.x) grad[row * K + j] = from_float<T>(check::nan_f());
      continue;
    }
    const usdm::Token t = usdm::token_constants(K, a, da, x == zz);
    reduce::MaxSum<double> ms = reduce::max_sum_identity<double>();
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) ms = reduce::max_sum_push(ms, double(to_float(l[j])));
    const double lse = reduce::max_sum_lse(reduce::block_reduce_max_sum(ms, scratch_ms));
    usdm::Sums small{0.0, 0.0, 0.0};
    double b = -1.0;  // index of the entry with p > 1/2 outside {x, z}, if any (exact in a double)
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      if (j == x || j == zz) continue;
      const double p = exp(double(to_float(l[j])) - lse);
      if (usdm::is_big(p))
        b = double(j);
      else
        usdm::accumulate(small, p, t.r);
    }
    small.S_excl = reduce::block_reduce(small.S_excl, reduce::Sum(), 0.0, scratch);
    small.P_excl = reduce::block_reduce(small.P_excl, reduce::Sum(), 0.0, scratch);
    small.Q_excl = reduce::block_reduce(small.Q_excl, reduce::Sum(), 0.0, scratch);
    const int64_t big = int64_t(reduce::block_reduce(b, reduce::Max(), -1.0, scratch));
    const double p_b = big >= 0 ? exp(double(to_float(l[big])) - lse) : 0.0;
    const usdm::Sums s = usdm::add_big(small, p_b, t.r, big >= 0);
    const double p_x = exp(double(to_float(l[x])) - lse), p_z = exp(double(to_float(l[zz])) - lse);
    if (threadIdx.x == 0) loss[row] = float(usdm::loss(t, p_x, p_z, s));
    if (grad != nullptr) {
      const usdm::Grad g = usdm::grad_constants(t, p_x, p_z, s, small.P_excl, p_b);
      T* gr = grad + row * K;
      for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
        const double v = j == zz   ? g.grad_z
                         : j == x  ? g.grad_x
                         : j == big ? g.grad_b
                                    : usdm::grad_entry(exp(double(to_float(l[j])) - lse), g.F, g.C, g.r);
        gr[j] = from_float<T>(float(v));
      }
    }
  }
}

template <class T>
int launch_usdm_loss(const T* logits, const int64_t* z, const int64_t* x0, const double* alpha, const double* dalpha,
                     float* loss, T* grad, int64_t rows, int64_t K, uint32_t* checks, void* stream) {
  if (rows == 0) return 0;
  constexpr unsigned kThreads = 256;
  const unsigned blocks = rows < 65535 ? unsigned(rows) : 65535u;
  return int(launch_kernel(usdm_loss_kernel<T>, dim3(blocks), dim3(kThreads), 0, static_cast<cudaStream_t>(stream),
                           logits, z, x0, alpha, dalpha, loss, grad, rows, K, checks));
}

// dtype codes as in launchers.h: 0 float32, 1 bfloat16, 2 float16 (logits and grad).
int usdm_loss(const void* logits, int dtype, const int64_t* z, const int64_t* x0, const double* alpha,
              const double* dalpha, float* loss, void* grad, int64_t rows, int64_t K, uint32_t* checks, void* stream) {
  switch (dtype) {
    case 0:
      return launch_usdm_loss(static_cast<const float*>(logits), z, x0, alpha, dalpha, loss, static_cast<float*>(grad),
                              rows, K, checks, stream);
    case 1:
      return launch_usdm_loss(static_cast<const bf16_bits*>(logits), z, x0, alpha, dalpha, loss,
                              static_cast<bf16_bits*>(grad), rows, K, checks, stream);
    case 2:
      return launch_usdm_loss(static_cast<const f16_bits*>(logits), z, x0, alpha, dalpha, loss,
                              static_cast<f16_bits*>(grad), rows, K, checks, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace duo_fast
