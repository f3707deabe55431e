// Warp and block reductions for the CUDA kernels (device code; also runs under
// the CPU emulation). Conventions (docs/cuda_emulation.md, rules 3 and 4):
//   * every lane of every warp calls them (pad idle lanes with the identity);
//   * blockDim.x is a multiple of 32 and at most 1024;
//   * block reductions take a caller-provided __shared__ scratch of 32 values,
//     return the result to every thread, and end with __syncthreads() so the
//     scratch can be reused at once.
// Online softmax: a (max, sum) pair with sum = sum_j exp(x_j - max); merging two
// pairs rescales the smaller-max sum (Milakov & Gimelshein 2018), so one pass
// over a row gives its log-sum-exp = max + log(sum).
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/cuda_compat.h"

namespace duo_fast {
namespace reduce {

constexpr unsigned kFullMask = 0xffffffffu;

struct Sum {
  template <class T>
  DUO_HD T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <class T>
  DUO_HD T operator()(T a, T b) const { return a > b ? a : b; }  // NaN-free inputs
};
struct Min {
  template <class T>
  DUO_HD T operator()(T a, T b) const { return a < b ? a : b; }
};

// Butterfly reduction: every lane gets the warp's result.
template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Block-wide reduction; every thread gets the result. scratch: __shared__ T[32].
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : identity;
  v = warp_reduce(v, op);  // every warp reduces the partials: no broadcast step needed
  __syncthreads();         // scratch is free again
  return v;
}

// Online-softmax state of a set of values x_j: m = max x_j, s = sum exp(x_j - m).
// T = float, or double where a kernel needs the log-sum-exp to ~1e-16.
template <class T>
struct MaxSum {
  T m;
  T s;
};

template <class T>
DUO_HD MaxSum<T> max_sum_identity() {
  return {T(-INFINITY), T(0)};
}

// Add one value. x = -inf is probability 0 and leaves the state unchanged
// (otherwise exp(-inf - (-inf)) = NaN while the state is still the identity).
template <class T>
DUO_HD MaxSum<T> max_sum_push(MaxSum<T> a, T x) {
  if (x <= a.m) return x == T(-INFINITY) ? a : MaxSum<T>{a.m, a.s + exp(x - a.m)};
  return {x, a.s * exp(a.m - x) + T(1)};  // exp(-inf) = 0 for the identity
}

// Merge two states (either may be the identity).
template <class T>
DUO_HD MaxSum<T> max_sum_merge(MaxSum<T> a, MaxSum<T> b) {
  if (a.m < b.m) {
    const MaxSum<T> t = a;
    a = b;
    b = t;
  }
  if (b.m == T(-INFINITY)) return a;
  return {a.m, a.s + b.s * exp(b.m - a.m)};
}

template <class T>
DUO_HD T max_sum_lse(MaxSum<T> a) {
  return a.m + log(a.s);
}

template <class T>
__device__ __forceinline__ MaxSum<T> warp_reduce_max_sum(MaxSum<T> v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum<T> o;
    o.m = __shfl_xor_sync(kFullMask, v.m, offset);
    o.s = __shfl_xor_sync(kFullMask, v.s, offset);
    v = max_sum_merge(v, o);
  }
  return v;
}

// Block-wide online-softmax merge; scratch: __shared__ MaxSum<T>[32].
template <class T>
__device__ __forceinline__ MaxSum<T> block_reduce_max_sum(MaxSum<T> v, MaxSum<T>* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce_max_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : max_sum_identity<T>();
  v = warp_reduce_max_sum(v);
  __syncthreads();
  return v;
}

// Inclusive prefix sum over the block in thread order; scratch: __shared__ T[32].
// (Warp scans by shuffles, then a scan of the warp totals by warp 0.) Ends with
// __syncthreads(), like the reductions.
template <class T>
__device__ __forceinline__ T block_inclusive_scan(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T n = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += n;
  }
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T t = lane < warps ? scratch[lane] : T(0);
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const T n = __shfl_up_sync(kFullMask, t, offset);
      if (lane >= offset) t += n;
    }
    if (lane < warps) scratch[lane] = t;
  }
  __syncthreads();
  if (warp > 0) v += scratch[warp - 1];
  __syncthreads();
  return v;
}

// Position of the n-th (0-based) set bit of m; n < popc(m).
__device__ __forceinline__ int nth_set_bit(uint32_t m, int n) {
  int base = 0;
#pragma unroll
  for (int w = 16; w > 0; w >>= 1) {
    const int c = __popc(m & ((1u << w) - 1u));  // set bits in the low w bits
    if (n >= c) n -= c, m >>= w, base += w;
  }
  return base;
}

// Deterministic warp-aggregated histogram add (no atomics). Every lane of the
// warp calls it (bin < 0: no entry). Lanes with the same bin are summed by a
// tree over their rank in that group (fixed order: partner rank r + s at step
// s), and the group's lowest lane adds the sum and the group size to the bin of
// this warp's own row, so each bin of a row has one writer per call and the
// row's sums are in call order. Merge the rows of a block in warp order after a
// __syncthreads(). Ends with __syncwarp(): the next call's writer of a bin may
// be another lane of the warp.
template <class T>
__device__ __forceinline__ void warp_histogram_add(T* row, uint32_t* count, int bin, T v) {
  if (__ballot_sync(kFullMask, bin >= 0) == 0) return;  // warp-uniform: no lane has an entry
  const int lane = int(threadIdx.x & 31u);
  const uint32_t peers = __match_any_sync(kFullMask, bin);
  const int rank = __popc(peers & ((1u << lane) - 1u)), size = __popc(peers);
#pragma unroll
  for (int s = 1; s < 32; s <<= 1) {
    const bool take = (rank & (2 * s - 1)) == 0 && rank + s < size;
    const int src = take ? nth_set_bit(peers, rank + s) : lane;
    const T o = __shfl_sync(kFullMask, v, src);
    if (take) v += o;
  }
  if (rank == 0 && bin >= 0) {
    row[bin] += v;
    count[bin] += uint32_t(size);
  }
  __syncwarp();
}

}  // namespace reduce
}  // namespace duo_fast
