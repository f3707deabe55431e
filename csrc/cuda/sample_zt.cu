// CUDA kernel of the exact O(1) latent sampler (docs/math.md §2a, §2b; math in sample_zt.h):
// one thread per token, grid-stride; same Philox streams as the CPU kernel.
#include "duo_fast/cuda_compat.h"
#include "duo_fast/device_check.h"
#include "duo_fast/sample_zt.h"
#include "launchers.h"

namespace duo_fast {
namespace cuda {

__global__ void sample_zt_kernel(const int64_t* __restrict__ x0, const double* __restrict__ gamma_t,
                                 const double* __restrict__ gamma_s, int64_t* __restrict__ z_t,
                                 int64_t* __restrict__ z_s, int64_t n, int64_t vocab_size, uint64_t seed,
                                 uint64_t offset, uint32_t* checks) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t x = x0[i];
    const bool ok_x = check::valid_id(x, vocab_size), ok_t = check::not_nan(gamma_t[i]);
    const bool ok_s = gamma_s == nullptr || check::not_nan(gamma_s[i]);
    if (!(ok_x && ok_t && ok_s)) {  // device-side checks: an unspecified valid id
      if (!ok_x) check::report(checks, check::kX0);
      if (!ok_t) check::report(checks, check::kGammaNaN);
      if (!ok_s) check::report(checks, check::kGammaSNaN);
      z_t[i] = 0;
      if (z_s != nullptr) z_s[i] = 0;
      continue;
    }
    const latent::Draw d = latent::draw(seed, offset, uint64_t(i), x, vocab_size);
    z_t[i] = latent::select(d, x, gamma_t[i]);
    if (z_s != nullptr) z_s[i] = latent::select(d, x, gamma_s[i]);
  }
}

int sample_zt(const int64_t* x0, const double* gamma_t, const double* gamma_s, int64_t* z_t, int64_t* z_s, int64_t n,
              int64_t vocab_size, uint64_t seed, uint64_t offset, uint32_t* checks, void* stream) {
  if (n == 0) return 0;
  constexpr unsigned kThreads = 256;
  return int(launch_kernel(sample_zt_kernel, dim3(grid_size(n, kThreads)), dim3(kThreads), 0,
                           static_cast<cudaStream_t>(stream), x0, gamma_t, gamma_s, z_t, z_s, n, vocab_size, seed,
                           offset, checks));
}

}  // namespace cuda
}  // namespace duo_fast
