// CUDA kernels of the Duo++ top-k curriculum input (SPEC 2e; row math in topk.h).
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

unsigned blocks_for(int64_t n, int64_t cap) { return unsigned(n < cap ? (n > 0 ? n : 1) : cap); }

}  // namespace

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
