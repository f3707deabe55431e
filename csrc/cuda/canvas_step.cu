// CUDA kernel of canvas_step (math in duo_fast/canvas_step.h): one block per
// row (grid-stride over rows). One read of the row with 16-byte loads gives the
// max, the first argmax and the entropy sums through canvas::Online states (per
// thread: its entries relative to its running max, rescaled when the max grows;
// merged over the warp by shuffles and over the block through shared memory,
// like reduce.h's online softmax). Then thread 0 writes the argmax and the
// entropy, and the block draws by inverse CDF (inverse_cdf.cuh, sample_step's
// scan) over the weights exp((x - M) / T), recomputed from the logits: about
// half a row. Same weights, Philox numbers and selection rule as the CPU
// kernel; the total S comes from the online sums instead of the CPU's
// index-order sum (~1e-7 relative apart), so a token can differ from the
// CPU's only where u falls within that of a CDF boundary.
// A row with NaN, +inf or no finite logit (check::kLogits) or an invalid
// temperature (check::kTemperature) is counted and gets sample = argmax = 0
// and a NaN entropy.
#include "duo_fast/canvas_step.h"
#include "duo_fast/cuda_compat.h"
#include "duo_fast/device_check.h"
#include "duo_fast/reduce.h"
#include "duo_fast/row_vec.h"
#include "duo_fast/sample_step.h"
#include "inverse_cdf.cuh"
#include "launchers.h"

namespace duo_fast {
namespace cuda {
namespace {

constexpr unsigned kThreads = 256;

struct Shared {
  canvas::Online online[32];
  int scratch_i[32];
  ScanShared scan;
};

__device__ canvas::Online warp_merge(canvas::Online v, float inv_t) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    canvas::Online o;
    o.m = __shfl_xor_sync(reduce::kFullMask, v.m, offset);
    o.arg = __shfl_xor_sync(reduce::kFullMask, v.arg, offset);
    o.delta = __shfl_xor_sync(reduce::kFullMask, v.delta, offset);
    o.b = __shfl_xor_sync(reduce::kFullMask, v.b, offset);
    v = canvas::online_merge(v, o, inv_t);  // symmetric: both lanes of a pair get the same state
  }
  return v;
}

// Every thread gets the block's state; ends with __syncthreads() (sh.online is free again).
__device__ canvas::Online block_merge(canvas::Online v, float inv_t, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_merge(v, inv_t);
  if (lane == 0) sh.online[warp] = v;
  __syncthreads();
  v = lane < warps ? sh.online[lane] : canvas::online_identity();
  v = warp_merge(v, inv_t);
  __syncthreads();
  return v;
}

// This thread's online state over its entries of row x; bad |= NaN or +inf seen.
template <class T>
__device__ canvas::Online row_state(const T* x, int64_t K, float inv_t, int& bad) {
  canvas::Online s = canvas::online_identity();
  rowvec::for_each(x, K, [&](int64_t j0, const float* v, int n) {
    float cm = -INFINITY;
    int ca = 0;
    for (int e = 0; e < n; ++e) {
      bad |= int(!(v[e] < INFINITY));
      if (v[e] > cm) cm = v[e], ca = e;  // first index of the vector's max
    }
    if (cm > s.m) {  // the new max: the old entries (the old max included) rescale
      if (s.m > -INFINITY) {
        const double gap = (double(cm) - double(s.m)) * double(inv_t), f = exp(-gap), m1 = s.delta + 1.0;
        s.delta = m1 * f, s.b = f * (s.b + m1 * gap);
      }
      s.m = cm, s.arg = j0 + ca;
    }
    if (s.m > -INFINITY) {
      float d = 0.0f, b = 0.0f;
      for (int e = 0; e < n; ++e) {
        if (j0 + e == s.arg) continue;  // the max entry itself: weight 1, not in delta
        const float y = canvas::scaled(v[e], s.m, inv_t), w = canvas::weight(y);
        d += w, b += canvas::entropy_term(w, y);
      }
      s.delta += double(d), s.b += double(b);
    }
  });
  return s;
}

template <class T>
__global__ void canvas_step_kernel(const T* __restrict__ logits, const double* __restrict__ temperature,
                                   int64_t* __restrict__ sample, int64_t* __restrict__ argmax,
                                   float* __restrict__ entropy, int64_t rows, int64_t K, uint64_t seed,
                                   uint64_t offset, uint32_t* checks) {
  __shared__ Shared sh;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const double t = temperature[r];
    const T* x = logits + r * K;
    if (!check::valid_temperature(t)) {  // the same for the whole block
      if (threadIdx.x == 0) {
        check::report(checks, check::kTemperature);
        sample[r] = 0, argmax[r] = 0, entropy[r] = check::nan_f();
      }
      continue;
    }
    const float inv_t = float(1.0 / t);
    int bad = 0;
    canvas::Online s = row_state(x, K, inv_t, bad);
    bad = reduce::block_reduce(bad, reduce::Max(), 0, sh.scratch_i);
    s = block_merge(s, inv_t, sh);
    if (!canvas::row_valid(s.m, bad != 0)) {
      if (threadIdx.x == 0) {
        check::report(checks, check::kLogits);
        sample[r] = 0, argmax[r] = 0, entropy[r] = check::nan_f();
      }
      continue;
    }
    if (threadIdx.x == 0) argmax[r] = s.arg, entropy[r] = float(canvas::entropy(s.delta, s.b));
    const float M = s.m;
    const auto weight = [&](float v, int64_t) { return canvas::weight(canvas::scaled(v, M, inv_t)); };
    const double u = sampling::step_draw(seed, offset, uint64_t(r)).u_cat;
    const int64_t j = inverse_cdf(x, K, weight, u * (1.0 + s.delta), sh.scan);
    if (threadIdx.x == 0) sample[r] = j >= 0 ? j : s.arg;
  }
}

template <class T>
int launch(const T* logits, const double* temperature, int64_t* sample, int64_t* argmax, float* entropy, int64_t rows,
           int64_t K, uint64_t seed, uint64_t offset, uint32_t* checks, void* stream) {
  if (rows == 0) return 0;
  const unsigned blocks = rows < 65535 ? unsigned(rows) : 65535u;
  return int(launch_kernel(canvas_step_kernel<T>, dim3(blocks), dim3(kThreads), 0, static_cast<cudaStream_t>(stream),
                           logits, temperature, sample, argmax, entropy, rows, K, seed, offset, checks));
}

}  // namespace

int canvas_step(const void* logits, int dtype, const double* temperature, int64_t* sample, int64_t* argmax,
                float* entropy, int64_t rows, int64_t K, uint64_t seed, uint64_t offset, uint32_t* checks,
                void* stream) {
  switch (dtype) {
    case 0:
      return launch(static_cast<const float*>(logits), temperature, sample, argmax, entropy, rows, K, seed, offset,
                    checks, stream);
    case 1:
      return launch(static_cast<const bf16_bits*>(logits), temperature, sample, argmax, entropy, rows, K, seed,
                    offset, checks, stream);
    case 2:
      return launch(static_cast<const f16_bits*>(logits), temperature, sample, argmax, entropy, rows, K, seed,
                    offset, checks, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace duo_fast
