// CUDA kernels of curriculum_embed on the portable path (docs/math.md §2c, §2d;
// row math in curriculum_embed.h); the tensor-core path of sm_80+ is
// curriculum_embed_mma.cu. Flash-attention style: a block takes 16 tokens and
// walks K in tiles of 64; each thread generates one Philox block of noise (4
// entries) per tile, a warp per two tokens updates the online softmax (max,
// argmax, sum; rescale factor), then each thread accumulates 16 tokens x 4
// columns of acc += P_tile E_tile in registers. Columns beyond 1024 are done
// in further passes (noise regenerated). Backward: a block owns 16 ids and
// walks the tokens in groups of 16, regenerating P = exp(y - lse), and
// accumulates dE rows in registers (one writer per row, deterministic).
#include "duo_fast/cuda_compat.h"
#include "duo_fast/curriculum_embed.h"
#include "duo_fast/curriculum_topk.h"  // topk::scales: the levels a~, s~ of gamma
#include "duo_fast/device_check.h"
#include "duo_fast/reduce.h"
#include "launchers.h"

namespace duo_fast {
namespace cuda {
namespace {

constexpr unsigned kEmbedThreads = 256;
constexpr int kTokens = 16;     // tokens per block (forward) / per step (backward)
constexpr int kTile = 64;       // vocabulary entries per forward tile
constexpr int kIds = 16;        // ids per backward block
constexpr int kCols = 4;        // columns per thread per pass
constexpr int64_t kColsPerPass = int64_t(kEmbedThreads) * kCols;
static_assert(kTokens * (kIds / 4) % 32 == 0, "backward noise threads are whole warps (they shuffle)");

// Per-token constants of the scores, computed once per token (not per Philox block).
struct TokenLevel {
  double a, s, inv_tau;  // a~, s~ (topk::scales), 1 / tau
  int64_t x;             // the clean id; -1 for t past the last token
};

DUO_DEVICE TokenLevel token_level(const int64_t* x0, const double* gamma, const double* inv_tau, int64_t n,
                                  int64_t t) {
  if (t >= n) return {0.0, 0.0, 0.0, -1};
  const topk::Scales sc = topk::scales(gamma[t]);
  return {sc.a, sc.s, inv_tau[t], x0[t]};
}

// Scores y = w / tau of token t for entries j .. j+3 (one Philox block of noise);
// -inf past the vocabulary and for t past the last token (lv.x = -1).
DUO_DEVICE void scores4(const TokenLevel& lv, int64_t K, int64_t t, int64_t j, uint64_t seed, uint64_t offset,
                        double* y) {
  if (lv.x < 0) {
#pragma unroll
    for (int e = 0; e < 4; ++e) y[e] = -INFINITY;
    return;
  }
  float eps[4];
  curriculum::noise4(seed, offset, uint64_t(t), j / 4, eps);
#pragma unroll
  for (int e = 0; e < 4; ++e)
    y[e] = j + e < K ? curriculum::latent(eps[e], j + e == lv.x, lv.a, lv.s) * lv.inv_tau : -INFINITY;
}

__global__ void embed_forward_kernel(const int64_t* __restrict__ x0, const double* __restrict__ gamma,
                                     const double* __restrict__ inv_tau, const float* __restrict__ E, int64_t n,
                                     int64_t K, int64_t d, uint64_t seed, uint64_t offset, float* __restrict__ h,
                                     int64_t* __restrict__ z, double* __restrict__ lse, uint32_t* checks) {
  __shared__ double y[kTokens][kTile];
  __shared__ float P[kTokens][kTile];
  __shared__ double m[kTokens], l[kTokens], best[kTokens];
  __shared__ float scale[kTokens];
  __shared__ int64_t arg[kTokens];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t t0 = int64_t(blockIdx.x) * kTokens; t0 < n; t0 += int64_t(gridDim.x) * kTokens) {
    for (int64_t c0 = 0; c0 < d; c0 += kColsPerPass) {
      float acc[kTokens][kCols];
#pragma unroll
      for (int r = 0; r < kTokens; ++r)
#pragma unroll
        for (int q = 0; q < kCols; ++q) acc[r][q] = 0.0f;
      // arg too: if no score beats -inf (all NaN) z would be read uninitialised.
      if (threadIdx.x < kTokens)
        m[threadIdx.x] = -INFINITY, l[threadIdx.x] = 0.0, best[threadIdx.x] = -INFINITY, arg[threadIdx.x] = 0;
      // noise: thread -> (token r, Philox block q of 4 entries in each tile)
      const int r_noise = threadIdx.x / (kTile / 4), q_noise = threadIdx.x % (kTile / 4);
      const TokenLevel lv = token_level(x0, gamma, inv_tau, n, t0 + r_noise);
      if (c0 == 0 && q_noise == 0 && t0 + r_noise < n) {  // device-side checks: unspecified h and z
        if (!check::valid_id(x0[t0 + r_noise], K)) check::report(checks, check::kX0);
        if (!check::valid_gamma(gamma[t0 + r_noise])) check::report(checks, check::kGamma);
        if (!check::valid_inv_tau(inv_tau[t0 + r_noise])) check::report(checks, check::kInvTau);
      }
      __syncthreads();
      for (int64_t j0 = 0; j0 < K; j0 += kTile) {
        {
          const int r = r_noise, q = q_noise;
          double ys[4];
          scores4(lv, K, t0 + r, j0 + 4 * q, seed, offset, ys);
#pragma unroll
          for (int e = 0; e < 4; ++e) y[r][4 * q + e] = ys[e];
        }
        __syncthreads();
        for (int r = warp; r < kTokens; r += kEmbedThreads / 32) {  // online softmax, a warp per row
          double v0 = y[r][lane], v1 = y[r][lane + 32];
          double mx = v0 >= v1 ? v0 : v1;
          int64_t ax = v0 >= v1 ? j0 + lane : j0 + lane + 32;
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) {
            const double om = __shfl_xor_sync(reduce::kFullMask, mx, o);
            const int64_t oa = __shfl_xor_sync(reduce::kFullMask, ax, o);
            if (om > mx || (om == mx && oa < ax)) mx = om, ax = oa;  // first index among ties
          }
          const double m_old = m[r], m_new = mx > m_old ? mx : m_old;
          const float p0 = expf(float(v0 - m_new)), p1 = expf(float(v1 - m_new));
          P[r][lane] = p0;
          P[r][lane + 32] = p1;
          const double sum = reduce::warp_reduce(double(p0) + double(p1), reduce::Sum());
          __syncwarp();
          if (lane == 0) {
            const double sc = m_old == -INFINITY ? 0.0 : exp(m_old - m_new);
            scale[r] = float(sc);
            l[r] = l[r] * sc + sum;
            m[r] = m_new;
            if (mx > best[r]) best[r] = mx, arg[r] = ax;
          }
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < kTokens; ++r)
#pragma unroll
          for (int q = 0; q < kCols; ++q) acc[r][q] *= scale[r];
        const int64_t jn = K - j0 < kTile ? K - j0 : kTile;
        for (int j = 0; j < jn; ++j) {
#pragma unroll
          for (int q = 0; q < kCols; ++q) {
            const int64_t c = c0 + threadIdx.x + int64_t(q) * kEmbedThreads;
            const float e = c < d ? E[(j0 + j) * d + c] : 0.0f;
#pragma unroll
            for (int r = 0; r < kTokens; ++r) acc[r][q] += P[r][j] * e;
          }
        }
        __syncthreads();  // y, P and scale are rewritten by the next tile
      }
      for (int r = 0; r < kTokens && t0 + r < n; ++r) {
        const float inv_l = float(1.0 / l[r]);
#pragma unroll
        for (int q = 0; q < kCols; ++q) {
          const int64_t c = c0 + threadIdx.x + int64_t(q) * kEmbedThreads;
          if (c < d) h[(t0 + r) * d + c] = acc[r][q] * inv_l;
        }
      }
      if (c0 == 0 && threadIdx.x < kTokens && t0 + threadIdx.x < n) {
        z[t0 + threadIdx.x] = arg[threadIdx.x];
        lse[t0 + threadIdx.x] = m[threadIdx.x] + log(l[threadIdx.x]);
      }
      __syncthreads();  // m, l, arg are reset by the next pass
    }
  }
}

__global__ void embed_backward_kernel(const float* __restrict__ dh, const int64_t* __restrict__ x0,
                                      const double* __restrict__ gamma, const double* __restrict__ inv_tau,
                                      const double* __restrict__ lse, int64_t n, int64_t K, int64_t d, uint64_t seed,
                                      uint64_t offset, float* __restrict__ dE) {
  __shared__ float P[kTokens][kIds];
  for (int64_t j0 = int64_t(blockIdx.x) * kIds; j0 < K; j0 += int64_t(gridDim.x) * kIds) {
    for (int64_t c0 = 0; c0 < d; c0 += kColsPerPass) {
      float acc[kIds][kCols];
#pragma unroll
      for (int j = 0; j < kIds; ++j)
#pragma unroll
        for (int q = 0; q < kCols; ++q) acc[j][q] = 0.0f;
      for (int64_t t0 = 0; t0 < n; t0 += kTokens) {
        if (threadIdx.x < kTokens * (kIds / 4)) {  // noise: thread -> (token r, 4 ids); two full warps
          const int r = threadIdx.x / (kIds / 4), q = threadIdx.x % (kIds / 4);
          const int64_t t = t0 + r;
          // The token's constants once per token: its first thread computes, the other
          // kIds / 4 - 1 threads of the token take them by shuffle.
          TokenLevel lv{0.0, 0.0, 0.0, -1};
          if (q == 0) lv = token_level(x0, gamma, inv_tau, n, t);
          const int src = int(threadIdx.x & 31u) & ~(kIds / 4 - 1);
          lv.a = __shfl_sync(reduce::kFullMask, lv.a, src);
          lv.s = __shfl_sync(reduce::kFullMask, lv.s, src);
          lv.inv_tau = __shfl_sync(reduce::kFullMask, lv.inv_tau, src);
          lv.x = __shfl_sync(reduce::kFullMask, lv.x, src);
          double ys[4];
          scores4(lv, K, t, j0 + 4 * q, seed, offset, ys);
          const double l = t < n ? lse[t] : 0.0;
#pragma unroll
          for (int e = 0; e < 4; ++e) P[r][4 * q + e] = expf(float(ys[e] - l));  // exp(-inf) = 0
        }
        __syncthreads();
        for (int r = 0; r < kTokens && t0 + r < n; ++r) {
#pragma unroll
          for (int q = 0; q < kCols; ++q) {
            const int64_t c = c0 + threadIdx.x + int64_t(q) * kEmbedThreads;
            const float g = c < d ? dh[(t0 + r) * d + c] : 0.0f;
#pragma unroll
            for (int j = 0; j < kIds; ++j) acc[j][q] += P[r][j] * g;
          }
        }
        __syncthreads();  // P is rewritten by the next token group
      }
      for (int j = 0; j < kIds && j0 + j < K; ++j) {
#pragma unroll
        for (int q = 0; q < kCols; ++q) {
          const int64_t c = c0 + threadIdx.x + int64_t(q) * kEmbedThreads;
          if (c < d) dE[(j0 + j) * d + c] = acc[j][q];
        }
      }
    }
  }
}

}  // namespace

int curriculum_embed(const int64_t* x0, const double* gamma, const double* inv_tau, const float* embedding,
                     int64_t n, int64_t vocab_size, int64_t d, uint64_t seed, uint64_t offset, float* h, int64_t* z,
                     double* lse, uint32_t* checks, void* stream) {
  if (n == 0) return 0;
  return int(launch_kernel(embed_forward_kernel, dim3(grid_size(n, kTokens)),
                           dim3(kEmbedThreads), 0, static_cast<cudaStream_t>(stream), x0, gamma, inv_tau, embedding,
                           n, vocab_size, d, seed, offset, h, z, lse, checks));
}

int curriculum_embed_backward(const float* grad_h, const int64_t* x0, const double* gamma, const double* inv_tau,
                              const double* lse, int64_t n, int64_t vocab_size, int64_t d, uint64_t seed,
                              uint64_t offset, float* grad_embedding, void* stream) {
  return int(launch_kernel(embed_backward_kernel, dim3(grid_size(vocab_size, kIds)),
                           dim3(kEmbedThreads), 0, static_cast<cudaStream_t>(stream), grad_h, x0, gamma, inv_tau, lse,
                           n, vocab_size, d, seed, offset, grad_embedding));
}

}  // namespace cuda
}  // namespace duo_fast
