// CUDA kernels of the reverse-process step (docs/math.md §4; math in sample_step.h):
// one block per row (grid-stride over rows). Sweeps: one online-softmax read
// for the row max and the sum of the weights w_j = exp((x_j - max)/T), with
// 16-byte loads; with top_p < 1 the radix-select passes
// (256-bin histograms, one row per warp filled without atomics by
// reduce::warp_histogram_add, merged in warp order: the first byte puts nearly
// all entries in a few bins, where 256 threads' atomicAdds on one address
// serialised and summed in a run-dependent order); then thread 0 picks the
// mixture part and, for
// the model part, the block scans tiles of one 16-byte vector per thread until
// the running sum passes u * kept (about half a row on average): with top_p = 1
// the logits are read 1.5 times on average. Same weights, Philox stream and
// selection rule as the CPU kernel, so tokens agree except where a different
// summation order (the online total, prepare_row) moves u * kept across a
// boundary (~1e-8 of u's range).
// A row with NaN, +inf or no finite logit (the weight sum is not >= 1,
// check::valid_weight_sum) is counted as check::kLogits and skips the nucleus
// passes: sample_step keeps z there, posterior writes NaN (the next op raises).
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
constexpr int kWarps = kThreads / 32;

struct Shared {
  reduce::MaxSum<double> scratch_ms[32];
  float scratch_f[32];
  double scratch_d[32];
  int scratch_i[32];
  int64_t scratch_l[32];
  double hist[kWarps][sampling::kRadixBins];  // per-warp rows; row 0 holds the merge
  uint32_t count[kWarps][sampling::kRadixBins];
  sampling::Nucleus nucleus;
  ScanShared scan;  // the draw (inverse_cdf.cuh)
  int part;
};

struct Row {
  float m;
  bool valid;  // a distribution (check::valid_weight_sum); the same in every thread
  bool filter;
  sampling::Nucleus nucleus;
  double kept;
};

template <class T>
__device__ bool kept(const Row& row, const T* x, int64_t j) {
  return !row.filter || sampling::nucleus_kept(row.nucleus, sampling::rank_key(to_float(x[j]), j));
}

__device__ bool kept_value(const Row& row, float v, int64_t j) {
  return !row.filter || sampling::nucleus_kept(row.nucleus, sampling::rank_key(v, j));
}

// Max, weight sum and nucleus boundary of row x; every thread gets the result.
// One read for (max, sum): an online softmax with 16-byte loads (row_vec.h):
// per thread the running max m and sum_j exp((x_j - m) / T), each vector's
// weights summed in float and added to a double, rescaled by exp((m_old -
// m_new) / T) when the max grows; merged over the block with the maxima in
// units of 1/T. The total then differs from the CPU's index-order sum of
// w_j = exp((x_j - M) / T) by roundings (~1e-8 relative), so u * total and
// p_z move by that much: a token can differ from the CPU's only where u falls
// within ~1e-8 of a CDF boundary (the scan itself uses the CPU's weights).
template <class T>
__device__ Row prepare_row(const T* x, int64_t K, float inv_temperature, double top_p, Shared& sh) {
  float m = -INFINITY;
  double s = 0.0;
  int bad = 0;  // NaN or +inf: no distribution (the CPU's NaN weight sum)
  rowvec::for_each(x, K, [&](int64_t, const float* v, int n) {
    float cm = -INFINITY;
    for (int e = 0; e < n; ++e) {
      bad |= int(!(v[e] < INFINITY));
      cm = v[e] > cm ? v[e] : cm;
    }
    if (cm > m) {  // exp(-inf) = 0 while the sum is empty
      s *= exp((double(m) - double(cm)) * double(inv_temperature));
      m = cm;
    }
    if (m > -INFINITY) {
      float part = 0.0f;
      for (int e = 0; e < n; ++e) part += sampling::weight(v[e], m, inv_temperature);
      s += double(part);
    }
  });
  bad = reduce::block_reduce(bad, reduce::Max(), 0, sh.scratch_i);
  const float M = reduce::block_reduce(m, reduce::Max(), float(-INFINITY), sh.scratch_f);
  reduce::MaxSum<double> ms{m > -INFINITY ? double(m) * double(inv_temperature) : -INFINITY, s};
  ms = reduce::block_reduce_max_sum(ms, sh.scratch_ms);
  const double total = bad ? double(NAN) : ms.s;
  Row row{M, check::valid_weight_sum(total), top_p < 1.0, sampling::nucleus_start(top_p, total), total};
  if (!row.valid || !row.filter) return row;  // uniform across the block: total is the block's reduction
  if (threadIdx.x == 0) sh.nucleus = row.nucleus;
  __syncthreads();
  while (true) {
    const sampling::Nucleus nu = sh.nucleus;
    if (nu.done) break;
    for (int i = threadIdx.x; i < kWarps * sampling::kRadixBins; i += blockDim.x)
      sh.hist[i / sampling::kRadixBins][i % sampling::kRadixBins] = 0.0,
      sh.count[i / sampling::kRadixBins][i % sampling::kRadixBins] = 0;
    __syncthreads();
    const int warp = int(threadIdx.x >> 5);
    for (int64_t base = 0; base < K; base += blockDim.x) {  // same trip count for every lane (warp ops)
      const int64_t j = base + threadIdx.x;
      int d = -1;
      double w = 0.0;
      if (j < K) {
        const float v = to_float(x[j]);
        const uint64_t key = sampling::rank_key(v, j);
        if (sampling::nucleus_match(nu, key)) d = sampling::nucleus_digit(nu, key), w = sampling::weight(v, M, inv_temperature);
      }
      reduce::warp_histogram_add(sh.hist[warp], sh.count[warp], d, w);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < sampling::kRadixBins; d += blockDim.x) {  // merge in warp order
      double h = sh.hist[0][d];
      uint32_t c = sh.count[0][d];
      for (int w = 1; w < int(blockDim.x >> 5); ++w) h += sh.hist[w][d], c += sh.count[w][d];
      sh.hist[0][d] = h, sh.count[0][d] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) sampling::choose_digit(sh.nucleus, sh.hist[0], sh.count[0]);
    __syncthreads();
  }
  row.nucleus = sh.nucleus;
  row.kept = row.nucleus.kept;
  __syncthreads();  // sh.nucleus is read before the next row overwrites it
  return row;
}

// Device-side value checks of row r (device_check.h): false (and reported by
// thread 0) if z or the levels are invalid. The same values for the whole block.
__device__ bool row_valid(int64_t z, double alpha_t, double alpha_s, int64_t K, uint32_t* checks) {
  const bool ok_z = check::valid_id(z, K), ok_t = check::valid_alpha_t(alpha_t);
  const bool ok_s = check::valid_alpha_s(alpha_s, alpha_t);
  if (threadIdx.x == 0) {
    if (!ok_z) check::report(checks, check::kZ);
    if (!ok_t) check::report(checks, check::kAlphaT);
    if (!ok_s) check::report(checks, check::kAlphaS);
  }
  return ok_z && ok_t && ok_s;
}

template <class T>
__device__ sampling::Mixture row_mixture(const Row& row, const T* x, int64_t K, int64_t z, double alpha_t,
                                         double alpha_s, double kappa, float inv_temperature) {
  const double p_z =
      kept(row, x, z) ? double(sampling::weight(to_float(x[z]), row.m, inv_temperature)) / row.kept : 0.0;
  return sampling::mixture(alpha_t, alpha_s, kappa, double(K), p_z);
}

// The draw from the model part: the inverse CDF over the kept weights.
template <class T>
__device__ int64_t model_draw(const Row& row, const T* x, int64_t K, float inv_temperature, double target,
                              Shared& sh) {
  const auto weight = [&](float v, int64_t j) {
    return kept_value(row, v, j) ? sampling::weight(v, row.m, inv_temperature) : 0.0f;
  };
  return cuda::inverse_cdf(x, K, weight, target, sh.scan);
}

template <class T>
__global__ void sample_step_kernel(const T* __restrict__ logits, const int64_t* __restrict__ z,
                                   const double* __restrict__ alpha_t, const double* __restrict__ alpha_s,
                                   int64_t* __restrict__ out, int64_t rows, int64_t K, double kappa,
                                   float inv_temperature, double top_p, uint64_t seed, uint64_t offset,
                                   uint64_t row_offset, uint32_t* checks) {
  __shared__ Shared sh;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (!row_valid(z[r], alpha_t[r], alpha_s[r], K, checks)) {  // unspecified valid id
      if (threadIdx.x == 0) out[r] = 0;
      continue;
    }
    const T* x = logits + r * K;
    const Row row = prepare_row(x, K, inv_temperature, top_p, sh);
    if (!row.valid) {  // no distribution: keep z (counted; the next op raises)
      if (threadIdx.x == 0) {
        check::report(checks, check::kLogits);
        out[r] = z[r];
      }
      continue;
    }
    const sampling::StepDraw draw = sampling::step_draw(seed, offset, row_offset + uint64_t(r));
    if (threadIdx.x == 0) {
      const sampling::Mixture mix = row_mixture(row, x, K, z[r], alpha_t[r], alpha_s[r], kappa, inv_temperature);
      const sampling::Part part = sampling::choose_part(mix, draw.u_part);
      if (part == sampling::kPointZ) out[r] = z[r];
      if (part == sampling::kUniform) out[r] = int64_t(uniform_index(draw.hi, draw.lo, uint32_t(K)));
      sh.part = int(part);
    }
    __syncthreads();
    const int part = sh.part;
    __syncthreads();
    if (part != sampling::kModel) continue;
    const int64_t j = model_draw(row, x, K, inv_temperature, draw.u_cat * row.kept, sh);
    if (threadIdx.x == 0) out[r] = j >= 0 ? j : z[r];
  }
}

template <class T>
__global__ void posterior_kernel(const T* __restrict__ logits, const int64_t* __restrict__ z,
                                 const double* __restrict__ alpha_t, const double* __restrict__ alpha_s,
                                 float* __restrict__ q, int64_t rows, int64_t K, double kappa, float inv_temperature,
                                 double top_p, uint32_t* checks) {
  __shared__ Shared sh;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (!row_valid(z[r], alpha_t[r], alpha_s[r], K, checks)) {
      for (int64_t j = threadIdx.x; j < K; j += blockDim.x) q[r * K + j] = check::nan_f();
      continue;
    }
    const T* x = logits + r * K;
    const Row row = prepare_row(x, K, inv_temperature, top_p, sh);
    if (!row.valid) {  // no distribution: a NaN row (counted; the next op raises)
      if (threadIdx.x == 0) check::report(checks, check::kLogits);
      for (int64_t j = threadIdx.x; j < K; j += blockDim.x) q[r * K + j] = check::nan_f();
      continue;
    }
    const int64_t zr = z[r];
    const sampling::Mixture mix = row_mixture(row, x, K, zr, alpha_t[r], alpha_s[r], kappa, inv_temperature);
    const double scale = mix.p / row.kept, uniform = mix.u / double(K);
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      const double pj = kept(row, x, j) ? scale * sampling::weight(to_float(x[j]), row.m, inv_temperature) : 0.0;
      q[r * K + j] = float(pj + uniform + (j == zr ? mix.z : 0.0));
    }
  }
}

unsigned row_blocks(int64_t rows) { return rows < 65535 ? unsigned(rows) : 65535u; }

template <class T>
int launch_sample_step(const T* logits, const int64_t* z, const double* alpha_t, const double* alpha_s, int64_t* out,
                       int64_t rows, int64_t K, double kappa, double temperature, double top_p, uint64_t seed,
                       uint64_t offset, uint64_t row_offset, uint32_t* checks, void* stream) {
  if (rows == 0) return 0;
  return int(launch_kernel(sample_step_kernel<T>, dim3(row_blocks(rows)), dim3(kThreads), 0,
                           static_cast<cudaStream_t>(stream), logits, z, alpha_t, alpha_s, out, rows, K, kappa,
                           float(1.0 / temperature), top_p, seed, offset, row_offset, checks));
}

template <class T>
int launch_posterior(const T* logits, const int64_t* z, const double* alpha_t, const double* alpha_s, float* q,
                     int64_t rows, int64_t K, double kappa, double temperature, double top_p, uint32_t* checks,
                     void* stream) {
  if (rows == 0) return 0;
  return int(launch_kernel(posterior_kernel<T>, dim3(row_blocks(rows)), dim3(kThreads), 0,
                           static_cast<cudaStream_t>(stream), logits, z, alpha_t, alpha_s, q, rows, K, kappa,
                           float(1.0 / temperature), top_p, checks));
}

}  // namespace

// dtype codes as in launchers.h: 0 float32, 1 bfloat16, 2 float16.
int sample_step(const void* logits, int dtype, const int64_t* z, const double* alpha_t, const double* alpha_s,
                int64_t* out, int64_t rows, int64_t K, double kappa, double temperature, double top_p, uint64_t seed,
                uint64_t offset, uint64_t row_offset, uint32_t* checks, void* stream) {
  switch (dtype) {
    case 0:
      return launch_sample_step(static_cast<const float*>(logits), z, alpha_t, alpha_s, out, rows, K, kappa,
                                temperature, top_p, seed, offset, row_offset, checks, stream);
    case 1:
      return launch_sample_step(static_cast<const bf16_bits*>(logits), z, alpha_t, alpha_s, out, rows, K, kappa,
                                temperature, top_p, seed, offset, row_offset, checks, stream);
    case 2:
      return launch_sample_step(static_cast<const f16_bits*>(logits), z, alpha_t, alpha_s, out, rows, K, kappa,
                                temperature, top_p, seed, offset, row_offset, checks, stream);
  }
  return int(cudaErrorInvalidValue);
}

int posterior(const void* logits, int dtype, const int64_t* z, const double* alpha_t, const double* alpha_s, float* q,
              int64_t rows, int64_t K, double kappa, double temperature, double top_p, uint32_t* checks,
              void* stream) {
  switch (dtype) {
    case 0:
      return launch_posterior(static_cast<const float*>(logits), z, alpha_t, alpha_s, q, rows, K, kappa, temperature,
                              top_p, checks, stream);
    case 1:
      return launch_posterior(static_cast<const bf16_bits*>(logits), z, alpha_t, alpha_s, q, rows, K, kappa,
                              temperature, top_p, checks, stream);
    case 2:
      return launch_posterior(static_cast<const f16_bits*>(logits), z, alpha_t, alpha_s, q, rows, K, kappa,
                              temperature, top_p, checks, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace duo_fast
