// CUDA kernels of softmax_embed (math in duo_fast/softmax_embed.h).
//
// 1. Row statistics, one block per row: the max M (with the NaN / +inf screen;
//    a bad row or temperature is counted, check::kLogits / kTemperature, and
//    gets S = NaN, so its h is NaN) and S = sum of the kept weights (double).
// 2. h = scale / S * sum_j w_j E_j, the weights recomputed from the logits with
//    the known M (no online rescaling):
//    * tensor cores (bf16 E, sm_80+): the tile machinery of mma_tiles.cuh (as
//      curriculum_embed's forward): a block of 64 rows x a slice of d walks K in
//      tiles of 64; each thread writes kEPT weights of its row into the bf16 P
//      tile, the block stages the E tile and the warps run mma.sync. A tile in
//      which none of the block's rows keeps an entry (every weight below theta:
//      confident rows) is skipped, E tile and mma included (__syncthreads_or).
//    * portable (any E dtype, any sm): a block of 16 rows x 256 columns; per
//      tile of 64 entries the block writes the float P tile [16 x 64] to shared
//      memory (skipped when empty, as above) and each thread adds P[r][j] E[j][c]
//      for its column c into 16 float accumulators (E read once per 16 rows,
//      coalesced along d).
#include "duo_fast/canvas_step.h"
#include "duo_fast/cuda_compat.h"
#include "duo_fast/device_check.h"
#include "duo_fast/logits.h"
#include "duo_fast/reduce.h"
#include "duo_fast/row_vec.h"
#include "duo_fast/softmax_embed.h"
#include "launchers.h"
#include "mma_sm80.cuh"
#include "mma_tiles.cuh"

namespace duo_fast {
namespace cuda {
namespace {

constexpr unsigned kStatThreads = 256;

template <class T>
__global__ void stats_kernel(const T* __restrict__ logits, const double* __restrict__ temperature,
                             float* __restrict__ row_max, double* __restrict__ row_sum, int64_t rows, int64_t K,
                             float lt, uint32_t* checks) {
  __shared__ float scratch_f[32];
  __shared__ int scratch_i[32];
  __shared__ double scratch_d[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* x = logits + r * K;
    const double t = temperature[r];
    if (!check::valid_temperature(t)) {  // uniform across the block
      if (threadIdx.x == 0) check::report(checks, check::kTemperature), row_max[r] = 0.0f, row_sum[r] = double(NAN);
      continue;
    }
    const float inv_t = float(1.0 / t);
    float m = -INFINITY;
    int bad = 0;
    rowvec::for_each(x, K, [&](int64_t, const float* v, int n) {
      for (int e = 0; e < n; ++e) bad |= int(!(v[e] < INFINITY)), m = v[e] > m ? v[e] : m;
    });
    bad = reduce::block_reduce(bad, reduce::Max(), 0, scratch_i);
    const float M = reduce::block_reduce(m, reduce::Max(), float(-INFINITY), scratch_f);
    if (!canvas::row_valid(M, bad != 0)) {
      if (threadIdx.x == 0) check::report(checks, check::kLogits), row_max[r] = 0.0f, row_sum[r] = double(NAN);
      continue;
    }
    double s = 0.0;
    rowvec::for_each(x, K, [&](int64_t, const float* v, int n) {
      float part = 0.0f;
      for (int e = 0; e < n; ++e) part += soft_embedding::weight(canvas::scaled(v[e], M, inv_t), lt);
      s += double(part);
    });
    s = reduce::block_reduce(s, reduce::Sum(), 0.0, scratch_d);
    if (threadIdx.x == 0) row_max[r] = M, row_sum[r] = s;
  }
}

// The kept weight of row `row` at entry j (0 past the rows or the vocabulary).
template <class T>
DUO_DEVICE float entry_weight(const T* logits, int64_t row, int64_t rows, int64_t j, int64_t K, float M, float inv_t,
                              float lt) {
  if (row >= rows || j >= K) return 0.0f;
  return soft_embedding::weight(canvas::scaled(to_float(logits[row * K + j]), M, inv_t), lt);
}

// ---- tensor cores (bf16 E) ----

using namespace tiles;  // NOLINT(build/namespaces): mma_tiles.cuh's shapes and steps

template <class T, int CW, int WC>
__global__ void __launch_bounds__(Shape<CW, WC>::kThreads)
    mma_kernel(const T* __restrict__ logits, const double* __restrict__ temperature,
               const float* __restrict__ row_max, const double* __restrict__ row_sum, const uint16_t* __restrict__ E,
               int64_t rows, int64_t K, int64_t d, float lt, double scale, float* __restrict__ h) {
  using S = Shape<CW, WC>;
  DUO_DYNAMIC_SHARED(unsigned char, smem);  // forward_smem_bytes<CW, WC>()
  uint16_t(*Ps)[kPitchP] = reinterpret_cast<uint16_t(*)[kPitchP]>(smem);  // P tile, [row][entry], bf16
  uint16_t(*Vs)[S::kPitchV] = reinterpret_cast<uint16_t(*)[S::kPitchV]>(smem + kPBytes);  // E tile, [entry][column]
  float* inv_s = reinterpret_cast<float*>(smem + kPBytes + S::kVBytes);  // scale / S per row
  const Roles ro = roles<CW, WC>(d, E);
  for (int64_t t0 = int64_t(blockIdx.x) * kRows; t0 < rows; t0 += int64_t(gridDim.x) * kRows) {
    const int64_t row = t0 + ro.r;
    const float M = row < rows ? row_max[row] : 0.0f;
    const float inv_t = row < rows ? float(1.0 / temperature[row]) : 0.0f;
    float acc[S::kNT][4];
    zero_acc(acc);
    for (int64_t j0 = 0; j0 < K; j0 += kKTile) {
      const int64_t j = j0 + ro.seg * S::kEPT;
      int any = 0;
#pragma unroll 4  // fully unrolled, the 32 weights of CW = 1 spill next to its 64 accumulators
      for (int e = 0; e < S::kEPT; e += 2) {
        const float p0 = entry_weight(logits, row, rows, j + e, K, M, inv_t, lt);
        const float p1 = entry_weight(logits, row, rows, j + e + 1, K, M, inv_t, lt);
        any |= int(p0 != 0.0f) | int(p1 != 0.0f);
        *reinterpret_cast<uint32_t*>(&Ps[ro.r][ro.seg * S::kEPT + e]) = mma::pack_bf16x2(p0, p1);
      }
      if (!__syncthreads_or(any)) continue;  // no kept entry in the block's rows: skip the tile
      stage_tile<CW, WC>(Vs, E, K, d, j0, ro.c0, ro.vec);
      __syncthreads();
      mma_rows<CW, WC>(acc, Ps, Vs, ro);
      __syncthreads();  // Ps and Vs are rewritten by the next tile
    }
    if (ro.seg == 0) inv_s[ro.r] = row < rows ? float(scale / row_sum[row]) : 0.0f;
    __syncthreads();
    if (ro.cols_left > 0)
      store_acc(h, acc, t0 + 16 * ro.wr + ro.g, rows, d, ro.c0 + ro.col0, ro.cols_left, ro.q, inv_s[16 * ro.wr + ro.g],
                inv_s[16 * ro.wr + ro.g + 8]);
    __syncthreads();  // inv_s is rewritten by the next row group
  }
}

// ---- portable (float accumulation, any E dtype) ----

constexpr int kPRows = 16, kPTile = 64;
constexpr unsigned kPThreads = 256;  // = kPRows * kPTile / 4: four weights per thread
static_assert(kPRows * kPTile == 4 * int(kPThreads), "one P tile is four weights per thread");

template <class T, class E>
__global__ void __launch_bounds__(kPThreads, 1)
    portable_kernel(const T* __restrict__ logits, const double* __restrict__ temperature,
                    const float* __restrict__ row_max, const double* __restrict__ row_sum, const E* __restrict__ emb,
                    int64_t rows, int64_t K, int64_t d, float lt, double scale, float* __restrict__ h) {
  __shared__ float P[kPRows][kPTile];
  const int64_t c = int64_t(blockIdx.y) * kPThreads + threadIdx.x;
  const int pr = int(threadIdx.x) / (kPTile / 4), pj = 4 * (int(threadIdx.x) % (kPTile / 4));  // weight role
  for (int64_t r0 = int64_t(blockIdx.x) * kPRows; r0 < rows; r0 += int64_t(gridDim.x) * kPRows) {
    const int64_t row = r0 + pr;
    const float M = row < rows ? row_max[row] : 0.0f;
    const float inv_t = row < rows ? float(1.0 / temperature[row]) : 0.0f;
    float acc[kPRows];
#pragma unroll
    for (int i = 0; i < kPRows; ++i) acc[i] = 0.0f;
    for (int64_t j0 = 0; j0 < K; j0 += kPTile) {
      int any = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = entry_weight(logits, row, rows, j0 + pj + e, K, M, inv_t, lt);
        P[pr][pj + e] = p;
        any |= int(p != 0.0f);
      }
      if (!__syncthreads_or(any)) continue;  // no kept entry in the block's rows
      if (c < d) {
        const int n = int(K - j0 < kPTile ? K - j0 : kPTile);
        for (int jj = 0; jj < n; ++jj) {
          const float ev = to_float(emb[(j0 + jj) * d + c]);
#pragma unroll
          for (int i = 0; i < kPRows; ++i) acc[i] += P[i][jj] * ev;
        }
      }
      __syncthreads();  // P is rewritten by the next tile
    }
    if (c < d) {
#pragma unroll  // acc stays in registers
      for (int i = 0; i < kPRows; ++i)
        if (r0 + i < rows) h[(r0 + i) * d + c] = acc[i] * float(scale / row_sum[r0 + i]);
    }
  }
}

unsigned row_blocks(int64_t n) { return n < 65535 ? unsigned(n < 1 ? 1 : n) : 65535u; }

template <class T>
int launch(const T* logits, const double* temperature, const void* embedding, int emb_dtype, bool tensor_cores,
           int64_t rows, int64_t K, int64_t d, double scale, float* row_max, double* row_sum, float* h,
           uint32_t* checks, cudaStream_t s) {
  const float lt = soft_embedding::log_theta(K);
  int err = int(launch_kernel(stats_kernel<T>, dim3(row_blocks(rows)), dim3(kStatThreads), 0, s, logits, temperature,
                              row_max, row_sum, rows, K, lt, checks));
  if (err != 0 || d == 0) return err;
  if (tensor_cores) {
    const uint16_t* E = static_cast<const uint16_t*>(embedding);
#define DUO_MMA(CW, WC)                                                                                            \
  launch_shape<CW, WC>(mma_kernel<T, CW, WC>, forward_smem_bytes<CW, WC>(), rows, d, s, logits, temperature,     \
                       row_max, row_sum, E, rows, K, d, lt, scale, h)
    if (d <= 128) return DUO_MMA(1, 128);
    if (d <= 256) return DUO_MMA(2, 128);
    return DUO_MMA(2, 192);
#undef DUO_MMA
  }
  const dim3 grid(row_blocks((rows + kPRows - 1) / kPRows), unsigned((d + kPThreads - 1) / kPThreads));
  switch (emb_dtype) {
    case 0:
      return int(launch_kernel(portable_kernel<T, float>, grid, dim3(kPThreads), 0, s, logits, temperature, row_max,
                               row_sum, static_cast<const float*>(embedding), rows, K, d, lt, scale, h));
    case 1:
      return int(launch_kernel(portable_kernel<T, bf16_bits>, grid, dim3(kPThreads), 0, s, logits, temperature,
                               row_max, row_sum, static_cast<const bf16_bits*>(embedding), rows, K, d, lt, scale, h));
    case 2:
      return int(launch_kernel(portable_kernel<T, f16_bits>, grid, dim3(kPThreads), 0, s, logits, temperature,
                               row_max, row_sum, static_cast<const f16_bits*>(embedding), rows, K, d, lt, scale, h));
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace

int softmax_embed(const void* logits, int dtype, const double* temperature, const void* embedding, int emb_dtype,
                  bool tensor_cores, int64_t rows, int64_t K, int64_t d, double scale, float* row_max,
                  double* row_sum, float* h, uint32_t* checks, void* stream) {
  if (rows == 0) return 0;
  if (tensor_cores && emb_dtype != 1) return int(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return launch(static_cast<const float*>(logits), temperature, embedding, emb_dtype, tensor_cores, rows, K, d,
                    scale, row_max, row_sum, h, checks, s);
    case 1:
      return launch(static_cast<const bf16_bits*>(logits), temperature, embedding, emb_dtype, tensor_cores, rows, K,
                    d, scale, row_max, row_sum, h, checks, s);
    case 2:
      return launch(static_cast<const f16_bits*>(logits), temperature, embedding, emb_dtype, tensor_cores, rows, K,
                    d, scale, row_max, row_sum, h, checks, s);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace duo_fast
