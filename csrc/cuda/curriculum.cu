// CUDA kernels of the curriculum soft inputs.
//   * curriculum_embed (SPEC 2c, 2d; curriculum.h), flash-attention style on
//     the portable path: a block takes 16 tokens and walks K in tiles of 64;
//     each thread generates one Philox block of noise (4 entries) per tile, a
//     warp per two tokens updates the online softmax (max, argmax, sum;
//     rescale factor), then each thread accumulates 16 tokens x 4 columns of
//     acc += P_tile E_tile in registers. Columns beyond 1024 are done in
//     further passes (noise regenerated). Backward: a block owns 16 ids and
//     walks the tokens in groups of 16, regenerating P = exp(y - lse), and
//     accumulates dE rows in registers (one writer per row, deterministic).
// Duo++ top-k curriculum input (SPEC 2e; row math in topk.h):
//   * curriculum_topk: one thread per token (grid-stride); each thread owns a
//     slice of the scratch (swap map + kept values), so the launch is capped at
//     topk_scratch_threads(n, k) threads.
//   * curriculum_topk_embed: one block per token (grid-stride); thread 0 draws
//     the ids and weights, then the block sums h[c] = sum_i w_i E[id_i, c] over
//     its columns (float32 accumulation).
//   * bag backward: atomicAdd of w_i grad_h into dE rows, or, deterministic,
//     over ids sorted by the caller (stable): the block whose chunk holds a
//     run's first entry sums the whole run in order and writes the row.
#include "duo_fast/cuda_compat.h"
#include "duo_fast/curriculum.h"
#include "duo_fast/reduce.h"
#include "duo_fast/logits.h"
#include "duo_fast/topk.h"
#include "launchers.h"

namespace duo_fast {
namespace cuda {
namespace {

constexpr unsigned kTopKThreads = 128;
constexpr unsigned kBagThreads = 128;
constexpr int64_t kSortedChunk = 64;  // sorted entries per block (deterministic backward)

struct Slot {
  topk::SwapMap map;
  double* kept;
};

// Scratch slot s: keys/vals of `cap` int32 each, then k doubles of kept values.
DUO_DEVICE Slot slot_at(int32_t* map_scratch, double* kept_scratch, int64_t s, uint32_t cap, int64_t k) {
  int32_t* keys = map_scratch + s * 2 * int64_t(cap);
  return {{keys, keys + cap, cap - 1}, kept_scratch + s * k};
}

DUO_DEVICE void clear_map(const topk::SwapMap& m) {
  for (uint32_t i = 0; i <= m.mask; ++i) m.keys[i] = -1;
}

__global__ void topk_kernel(const int64_t* __restrict__ x0, const double* __restrict__ gamma,
                            const double* __restrict__ inv_tau, int64_t* __restrict__ ids, float* __restrict__ weights,
                            int64_t* __restrict__ z, int64_t n, int64_t k, int64_t vocab_size, int zt_rule,
                            uint64_t seed, uint64_t offset, int32_t* map_scratch, double* kept_scratch) {
  const uint32_t cap = topk::swap_map_capacity(k);
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const Slot slot = slot_at(map_scratch, kept_scratch, s, cap, k);
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t t = s; t < n; t += stride) {
    const topk::TokenOut o = topk::token(seed, offset, uint64_t(t), x0[t], gamma[t], inv_tau[t], k, vocab_size,
                                         zt_rule, slot.map, ids + t * k, weights + t * k, slot.kept);
    clear_map(slot.map);
    z[t] = o.z;
  }
}

template <class E>
__global__ void topk_embed_kernel(const int64_t* __restrict__ x0, const double* __restrict__ gamma,
                                  const double* __restrict__ inv_tau, const E* __restrict__ embedding, int64_t d,
                                  float* __restrict__ h, int64_t* __restrict__ ids, float* __restrict__ weights,
                                  int64_t* __restrict__ z, int64_t n, int64_t k, int64_t vocab_size, int zt_rule,
                                  uint64_t seed, uint64_t offset, int32_t* map_scratch, double* kept_scratch) {
  const uint32_t cap = topk::swap_map_capacity(k);
  const Slot slot = slot_at(map_scratch, kept_scratch, blockIdx.x, cap, k);
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    if (threadIdx.x == 0) {
      const topk::TokenOut o = topk::token(seed, offset, uint64_t(t), x0[t], gamma[t], inv_tau[t], k, vocab_size,
                                           zt_rule, slot.map, ids + t * k, weights + t * k, slot.kept);
      clear_map(slot.map);
      z[t] = o.z;
    }
    __syncthreads();  // ids/weights of token t are written (global memory, same block)
    const int64_t* id = ids + t * k;
    const float* w = weights + t * k;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float acc = 0.0f;
      for (int64_t i = 0; i < k; ++i) acc += w[i] * to_float(embedding[id[i] * d + c]);
      h[t * d + c] = acc;
    }
    __syncthreads();  // thread 0 reuses the scratch for the next token
  }
}

__global__ void bag_backward_atomic_kernel(const float* __restrict__ grad_h, const int64_t* __restrict__ ids,
                                           const float* __restrict__ weights, float* __restrict__ grad, int64_t tokens,
                                           int64_t k, int64_t d) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t i = 0; i < k; ++i) {
      const float w = weights[t * k + i];
      float* row = grad + ids[t * k + i] * d;
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) atomicAdd(&row[c], w * grad_h[t * d + c]);
    }
  }
}

// sorted_ids[e] = ids of flat entry order[e] (token = order[e] / k), ascending,
// ties in entry order. Block b starts the runs whose first entry lies in its chunk.
__global__ void bag_backward_sorted_kernel(const float* __restrict__ grad_h, const int64_t* __restrict__ sorted_ids,
                                           const int64_t* __restrict__ order, const float* __restrict__ weights,
                                           float* __restrict__ grad, int64_t entries, int64_t k, int64_t d) {
  const int64_t chunks = (entries + kSortedChunk - 1) / kSortedChunk;
  for (int64_t b = blockIdx.x; b < chunks; b += gridDim.x) {
    const int64_t end_chunk = (b + 1) * kSortedChunk < entries ? (b + 1) * kSortedChunk : entries;
    for (int64_t e = b * kSortedChunk; e < end_chunk; ++e) {
      if (e > 0 && sorted_ids[e - 1] == sorted_ids[e]) continue;  // not a run start
      const int64_t id = sorted_ids[e];
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int64_t f = e; f < entries && sorted_ids[f] == id; ++f)
          acc += weights[order[f]] * grad_h[(order[f] / k) * d + c];
        grad[id * d + c] = acc;
      }
    }
  }
}

// ---- exact curriculum input ----

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
                                     int64_t* __restrict__ z, double* __restrict__ lse) {
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

unsigned blocks_for(int64_t n, int64_t cap) { return unsigned(n < cap ? (n > 0 ? n : 1) : cap); }

}  // namespace

int curriculum_embed(const int64_t* x0, const double* gamma, const double* inv_tau, const float* embedding,
                     int64_t n, int64_t vocab_size, int64_t d, uint64_t seed, uint64_t offset, float* h, int64_t* z,
                     double* lse, void* stream) {
  if (n == 0) return 0;
  return int(launch_kernel(embed_forward_kernel, dim3(blocks_for((n + kTokens - 1) / kTokens, 65535)),
                           dim3(kEmbedThreads), 0, static_cast<cudaStream_t>(stream), x0, gamma, inv_tau, embedding,
                           n, vocab_size, d, seed, offset, h, z, lse));
}

int curriculum_embed_backward(const float* grad_h, const int64_t* x0, const double* gamma, const double* inv_tau,
                              const double* lse, int64_t n, int64_t vocab_size, int64_t d, uint64_t seed,
                              uint64_t offset, float* grad_embedding, void* stream) {
  return int(launch_kernel(embed_backward_kernel, dim3(blocks_for((vocab_size + kIds - 1) / kIds, 65535)),
                           dim3(kEmbedThreads), 0, static_cast<cudaStream_t>(stream), grad_h, x0, gamma, inv_tau, lse,
                           n, vocab_size, d, seed, offset, grad_embedding));
}

int64_t topk_scratch_slots(int64_t n, int64_t k, bool per_block) {
  // ~32 MiB of swap maps at most; a slot per thread (topk) or per block (embed).
  const int64_t slot_bytes = int64_t(topk::swap_map_capacity(k)) * 8 + k * 8;
  int64_t slots = (int64_t(32) << 20) / slot_bytes;
  const int64_t unit = per_block ? 1 : int64_t(kTopKThreads);
  slots = slots < unit ? unit : slots / unit * unit;  // whole blocks of threads
  const int64_t needed = per_block ? n : (n + unit - 1) / unit * unit;
  slots = slots < needed ? slots : needed;
  return slots < 65535 * unit ? (slots > 0 ? slots : unit) : 65535 * unit;
}

int64_t topk_map_capacity(int64_t k) { return topk::swap_map_capacity(k); }

int curriculum_topk(const int64_t* x0, const double* gamma, const double* inv_tau, int64_t* ids, float* weights,
                    int64_t* z, int64_t n, int64_t k, int64_t vocab_size, int zt_rule, uint64_t seed, uint64_t offset,
                    int32_t* map_scratch, double* kept_scratch, int64_t slots, void* stream) {
  if (n == 0) return 0;
  const unsigned blocks = unsigned(slots / kTopKThreads);
  return int(launch_kernel(topk_kernel, dim3(blocks), dim3(kTopKThreads), 0, static_cast<cudaStream_t>(stream), x0,
                           gamma, inv_tau, ids, weights, z, n, k, vocab_size, zt_rule, seed, offset, map_scratch,
                           kept_scratch));
}

namespace {
template <class E>
int launch_topk_embed(const int64_t* x0, const double* gamma, const double* inv_tau, const E* embedding, int64_t d,
                      float* h, int64_t* ids, float* weights, int64_t* z, int64_t n, int64_t k, int64_t vocab_size,
                      int zt_rule, uint64_t seed, uint64_t offset, int32_t* map_scratch, double* kept_scratch,
                      int64_t slots, void* stream) {
  return int(launch_kernel(topk_embed_kernel<E>, dim3(unsigned(slots)), dim3(kBagThreads), 0,
                           static_cast<cudaStream_t>(stream), x0, gamma, inv_tau, embedding, d, h, ids, weights, z, n,
                           k, vocab_size, zt_rule, seed, offset, map_scratch, kept_scratch));
}
}  // namespace

int curriculum_topk_embed(const int64_t* x0, const double* gamma, const double* inv_tau, const void* embedding,
                          int emb_dtype, int64_t d, float* h, int64_t* ids, float* weights, int64_t* z, int64_t n,
                          int64_t k, int64_t vocab_size, int zt_rule, uint64_t seed, uint64_t offset,
                          int32_t* map_scratch, double* kept_scratch, int64_t slots, void* stream) {
  if (n == 0) return 0;
  switch (emb_dtype) {
    case 0:
      return launch_topk_embed(x0, gamma, inv_tau, static_cast<const float*>(embedding), d, h, ids, weights, z, n, k,
                               vocab_size, zt_rule, seed, offset, map_scratch, kept_scratch, slots, stream);
    case 1:
      return launch_topk_embed(x0, gamma, inv_tau, static_cast<const bf16_bits*>(embedding), d, h, ids, weights, z, n,
                               k, vocab_size, zt_rule, seed, offset, map_scratch, kept_scratch, slots, stream);
    case 2:
      return launch_topk_embed(x0, gamma, inv_tau, static_cast<const f16_bits*>(embedding), d, h, ids, weights, z, n,
                               k, vocab_size, zt_rule, seed, offset, map_scratch, kept_scratch, slots, stream);
  }
  return int(cudaErrorInvalidValue);
}

int topk_bag_backward_atomic(const float* grad_h, const int64_t* ids, const float* weights, float* grad,
                             int64_t tokens, int64_t k, int64_t d, void* stream) {
  if (tokens == 0) return 0;
  return int(launch_kernel(bag_backward_atomic_kernel, dim3(blocks_for(tokens, 65535)), dim3(kBagThreads), 0,
                           static_cast<cudaStream_t>(stream), grad_h, ids, weights, grad, tokens, k, d));
}

int topk_bag_backward_sorted(const float* grad_h, const int64_t* sorted_ids, const int64_t* order,
                             const float* weights, float* grad, int64_t entries, int64_t k, int64_t d, void* stream) {
  if (entries == 0) return 0;
  const int64_t chunks = (entries + kSortedChunk - 1) / kSortedChunk;
  return int(launch_kernel(bag_backward_sorted_kernel, dim3(blocks_for(chunks, 65535)), dim3(kBagThreads), 0,
                           static_cast<cudaStream_t>(stream), grad_h, sorted_ids, order, weights, grad, entries, k,
                           d));
}

}  // namespace cuda
}  // namespace duo_fast
