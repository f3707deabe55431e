// Block-wide inverse-CDF draw over one row of logits (device code; also runs
// under the CPU emulation), shared by the CUDA kernels of sample_step
// (sample_step.cu) and canvas_step (canvas_step.cu): the device twin of
// sampling::inverse_cdf (cpu/inverse_cdf.h), which scans a scratch row of weights on
// the CPU. Here the weights are recomputed from the logits tile by tile, so the
// draw reads about half of the row.
#pragma once

#include <cstdint>

#include "duo_fast/cuda_compat.h"
#include "duo_fast/logits.h"
#include "duo_fast/reduce.h"
#include "duo_fast/row_vec.h"

namespace duo_fast {
namespace cuda {

// The scan's shared memory (a member of the kernel's own __shared__ struct).
struct ScanShared {
  double scratch_d[32];
  int scratch_i[32];
  int64_t scratch_l[32];
  double tile_total;
  int64_t found;
};

// Inverse CDF over one row x of K logits: the first j whose inclusive running
// sum of weight(v_j, j) (a float; 0: never drawn) exceeds target. Tiles in index order: the row's head (the entries before its
// first 16-byte boundary, one per thread), tiles of one 16-byte vector per
// thread (4 floats or 8 16-bit values: row_vec.h), the tail (one per thread).
// Within a tile the owner is the first thread whose (block-scanned) inclusive
// sum passes the target, and it finishes with a sequential scan of its own
// entries. Reads about half the row on average.
template <class T, class W>
__device__ int64_t inverse_cdf(const T* x, int64_t K, W&& weight, double target, ScanShared& sh) {
  using V = rowvec::Vec<T>;
  constexpr int kN = V::kN;
  const int64_t head = rowvec::head_count(x, K), nvec = (K - head) / V::kN;
  const int64_t vec_tiles = (nvec + blockDim.x - 1) / blockDim.x;
  const typename V::Raw* xv = reinterpret_cast<const typename V::Raw*>(x + head);
  double run = 0.0;
  for (int64_t tile = -1; tile <= vec_tiles; ++tile) {  // -1: head; vec_tiles: tail
    if ((tile < 0 && head == 0) || (tile == vec_tiles && head + nvec * kN == K)) continue;  // uniform
    float v[kN];
    int64_t j0;
    int n = 0;
    if (tile < 0) {
      j0 = threadIdx.x;
      if (j0 < head) v[0] = to_float(x[j0]), n = 1;
    } else if (tile == vec_tiles) {
      j0 = head + nvec * kN + threadIdx.x;
      if (j0 < K) v[0] = to_float(x[j0]), n = 1;
    } else {
      const int64_t i = tile * blockDim.x + threadIdx.x;
      j0 = head + i * kN;
      if (i < nvec) V::unpack(xv[i], v), n = kN;
    }
    float w[kN];
    double own = 0.0;
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      w[e] = e < n ? weight(v[e], j0 + e) : 0.0f;
      own += w[e];
    }
    const double incl = reduce::block_inclusive_scan(own, sh.scratch_d);
    if (threadIdx.x == blockDim.x - 1) sh.tile_total = incl;
    const int passed = run + incl > target ? int(threadIdx.x) : int(blockDim.x);
    const int owner = reduce::block_reduce(passed, reduce::Min(), int(blockDim.x), sh.scratch_i);
    if (owner < int(blockDim.x)) {
      if (int(threadIdx.x) == owner) {
        double c = run + (incl - own);
        int64_t pick = -1, last = -1;
        for (int e = 0; e < n && pick < 0; ++e) {
          if (!(w[e] > 0.0f)) continue;
          c += w[e];
          last = j0 + e;
          if (c > target) pick = last;
        }
        sh.found = pick >= 0 ? pick : last;
      }
      __syncthreads();
      const int64_t found = sh.found;
      __syncthreads();
      if (found >= 0) return found;
    }
    run += sh.tile_total;
    __syncthreads();  // tile_total is rewritten by the next tile
  }
  // Rounding left the target at or above the scanned total: the last positive weight.
  int64_t last = -1;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x)
    if (weight(to_float(x[j]), j) > 0.0f) last = j;
  return reduce::block_reduce(last, reduce::Max(), int64_t(-1), sh.scratch_l);
}

}  // namespace cuda
}  // namespace duo_fast
