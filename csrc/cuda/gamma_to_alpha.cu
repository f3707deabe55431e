// CUDA kernel of the schedule operator: one thread per gamma value evaluating
// the per-K Chebyshev table (duo_fast/gamma_to_alpha.h), grid-stride. A NaN gamma
// gives NaN outputs and is counted (device_check.h: the next op raises).
#include "duo_fast/cuda_compat.h"
#include "duo_fast/device_check.h"
#include "duo_fast/gamma_to_alpha.h"
#include "launchers.h"

namespace duo_fast {
namespace cuda {

template <class T>
__global__ void gamma_to_alpha_kernel(const T* __restrict__ gamma, T* __restrict__ alpha, T* __restrict__ dalpha,
                                      int64_t n, const double* __restrict__ table, uint32_t* checks) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double g = double(gamma[i]);
    if (!check::not_nan(g)) check::report(checks, check::kGammaNaN);
    double a, d;
    schedule::gamma_to_alpha(table, g, a, d);
    alpha[i] = T(a);
    dalpha[i] = T(d);
  }
}

template <class T>
static int launch_gamma_to_alpha(const T* gamma, T* alpha, T* dalpha, int64_t n, const double* table,
                                 uint32_t* checks, void* stream) {
  if (n == 0) return 0;
  constexpr unsigned kThreads = 128;
  return int(launch_kernel(gamma_to_alpha_kernel<T>, dim3(grid_size(n, kThreads)), dim3(kThreads), 0,
                           static_cast<cudaStream_t>(stream), gamma, alpha, dalpha, n, table, checks));
}

int gamma_to_alpha_f32(const float* gamma, float* alpha, float* dalpha, int64_t n, const double* table,
                       uint32_t* checks, void* stream) {
  return launch_gamma_to_alpha(gamma, alpha, dalpha, n, table, checks, stream);
}
int gamma_to_alpha_f64(const double* gamma, double* alpha, double* dalpha, int64_t n, const double* table,
                       uint32_t* checks, void* stream) {
  return launch_gamma_to_alpha(gamma, alpha, dalpha, n, table, checks, stream);
}

}  // namespace cuda
}  // namespace duo_fast
