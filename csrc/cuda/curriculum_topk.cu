// CUDA kernels of curriculum_topk, curriculum_topk_embed and the bag backward
// (docs/math.md §2e; row math in curriculum_topk.h), a warp per token
// (warp_token): the lanes draw the k uniforms, scan log V_i and invert Phi in
// parallel (the kept values live in the token's ids row until the ids are
// drawn), reduce the argmax and normalizer by shuffles, write the weights, and
// draw the Fisher-Yates indices; only the swap chain itself (k hash-map
// steps) runs on lane 0. Each warp owns a swap map (scratch slot); the grid is
// sized from the SM count (resident warps of every SM) with the scratch capped
// at 128 MiB but never below one block per SM.
//   * curriculum_topk: 4 warps (tokens) per block, grid-stride over tokens.
//   * curriculum_topk_embed: the same, then the block sums h[t, c] = sum_i w_i
//     E[id_i, c] for its 4 tokens (float32 accumulation).
//   * bag backward: atomicAdd of w_i grad_h into dE rows, or, deterministic,
//     over ids sorted by the caller (stable), in segments of S = max(256, k)
//     sorted entries: pass 1 sums, per segment that starts inside a run begun
//     earlier, that run's piece in the segment (a partial row); pass 2: the
//     block whose segment holds a run's first entry sums its own piece and adds
//     the partial rows of the following segments the run covers, in segment
//     order, and writes the row. A run of 10^4+ equal ids (padding, a frequent
//     word) is then spread over its segments' blocks, and the sum order is fixed.
//     Each row of dE is written once, by one block, without atomics: a run's
//     row by its first block, the zero rows of the ids no entry holds by the
//     block of the run that follows them (the last run's block: those after
//     it), so the output needs no zero-initialization.
#include "duo_fast/cuda_compat.h"
#include "duo_fast/curriculum_topk.h"
#include "duo_fast/device_check.h"
#include "duo_fast/logits.h"
#include "duo_fast/reduce.h"
#include "launchers.h"

namespace duo_fast {
namespace cuda {
namespace {

constexpr unsigned kTopKThreads = 128;  // 4 warps = 4 tokens in flight per block
constexpr int kTopKWarps = int(kTopKThreads / 32);
constexpr int64_t kResidentWarpsPerSM = 64;  // 2048 threads per SM on sm_80 and sm_90
constexpr int64_t kTopKScratchCap = int64_t(128) << 20;
constexpr unsigned kBagThreads = 128;
constexpr int64_t kMinBagSegment = 256;  // sorted entries per segment (deterministic backward): max(this, k)

// Swap map of scratch slot s (one per warp): keys then vals, `cap` int32 each.
DUO_DEVICE topk::SwapMap slot_map(int32_t* map_scratch, int64_t s, uint32_t cap) {
  int32_t* keys = map_scratch + s * 2 * int64_t(cap);
  return {keys, keys + cap, cap - 1};
}

// (value, index) argmax step: larger value, or the lower index among ties.
DUO_DEVICE void argmax_merge(double& v, int64_t& i, double ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
}

// topk::token computed by the 32 lanes of a warp (same equations and random
// streams; sums in a different order, so weights agree to rounding). Every lane
// returns z. `map` must be empty and is left empty. The ids row doubles as the
// k kept values (double bits) until step 5 draws the ids.
DUO_DEVICE int64_t warp_token(uint64_t seed, uint64_t offset, uint64_t t, int64_t x, double gamma, double inv_tau,
                              int64_t k, int64_t vocab_size, int zt_rule, topk::SwapMap map, int64_t* ids,
                              float* weights, uint32_t* checks) {
  const int lane = int(threadIdx.x & 31u);
  {  // device-side value checks (warp-uniform): ids 0 .. k-1 (valid), NaN weights, z = 0
    const bool ok_x = check::valid_id(x, vocab_size), ok_g = check::valid_gamma(gamma);
    const bool ok_t = check::valid_inv_tau(inv_tau);
    if (!(ok_x && ok_g && ok_t)) {
      if (lane == 0) {
        if (!ok_x) check::report(checks, check::kX0);
        if (!ok_g) check::report(checks, check::kGamma);
        if (!ok_t) check::report(checks, check::kInvTau);
      }
      for (int64_t i = lane; i < k; i += 32) ids[i] = i, weights[i] = check::nan_f();
      return 0;
    }
  }
  double* kept = reinterpret_cast<double*>(ids);
  const topk::Scales sc = topk::scales(gamma);
  const double n_others = double(vocab_size - 1);
  const double refine_above = 3e-8 / (1.15e-9 * sc.s * inv_tau);  // as topk::token

  // 1. o_i = s~ Phi^-1(V_i), log V_i = sum_{r <= i} log U_r / (N' - r): chunks of 64
  // entries, two per lane (one Philox block), an exclusive warp scan, a carry.
  double carry = 0.0;
  for (int64_t c0 = 0; c0 < k; c0 += 64) {
    const int64_t i = c0 + 2 * lane;
    double a0 = 0.0, a1 = 0.0;
    if (i < k) {
      const Uniform2 u = uniform2(philox_block(seed, t, offset + 1 + uint64_t(i / 2)));
      a0 = log(u.a) / (n_others - double(i));
      if (i + 1 < k) a1 = log(u.b) / (n_others - double(i + 1));
    }
    double incl = a0 + a1;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double v = __shfl_up_sync(reduce::kFullMask, incl, o);
      if (lane >= o) incl += v;
    }
    double excl = __shfl_up_sync(reduce::kFullMask, incl, 1);
    if (lane == 0) excl = 0.0;
    double log_v = carry + excl;
    carry += __shfl_sync(reduce::kFullMask, incl, 31);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (i + e >= k) break;
      log_v += e == 0 ? a0 : a1;
      const double q = -expm1(log_v);  // 1 - V_i
      double phi_inv = -ndtri_approx(q);
      if (phi_inv > refine_above || -phi_inv > refine_above) phi_inv = -ndtri(q);
      kept[i + e] = sc.s * phi_inv;
    }
  }
  __syncwarp();  // kept[] is read by every lane

  // 2. the x-entry (every lane: same values).
  const double o_1 = kept[0], o_k = kept[k - 1];
  const double e_x = sc.a + sc.s * topk::draw_xi(seed, offset, t);
  const bool in_topk = e_x > o_k;
  const double c = in_topk ? (k >= 2 ? kept[k - 2] : INFINITY) : o_k;
  const double n_tail = double(in_topk ? vocab_size - k : vocab_size - k - 1);
  __syncwarp();  // every lane has read kept[k - 1]
  if (in_topk && lane == 0) kept[k - 1] = e_x;
  __syncwarp();

  // 3. tail mass.
  const double S = sc.s * inv_tau, ct = c * inv_tau;
  const double log_mu = 0.5 * S * S + log_ndtr((ct - S * S) / S) - log_ndtr(ct / S);
  const double log_tail = n_tail > 0.0 ? log(n_tail) + log_mu : -INFINITY;

  // 4. argmax (first index among ties), normalizer and weights.
  double best = -INFINITY;
  int64_t arg = k;
  for (int64_t i = lane; i < k; i += 32) argmax_merge(best, arg, kept[i], i);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double ov = __shfl_xor_sync(reduce::kFullMask, best, o);
    const int64_t oi = __shfl_xor_sync(reduce::kFullMask, arg, o);
    argmax_merge(best, arg, ov, oi);
  }
  double m = fmax(log_tail, best * inv_tau);
  if (!in_topk) m = fmax(m, e_x * inv_tau);
  double part = 0.0;
  for (int64_t i = lane; i < k; i += 32) part += exp(kept[i] * inv_tau - m);
  const double sum = reduce::warp_reduce(part, reduce::Sum()) + exp(log_tail - m) +
                     (in_topk ? 0.0 : exp(e_x * inv_tau - m));
  const double log_z = m + log(sum);
  bool any = false;
  for (int64_t i = lane; i < k; i += 32) {
    weights[i] = float(exp(kept[i] * inv_tau - log_z));
    any = any || weights[i] > 0.0f;
  }
  if (!__any_sync(reduce::kFullMask, any))
    for (int64_t i = lane; i < k; i += 32) weights[i] = i == arg ? 1.0f : 0.0f;
  __syncwarp();  // kept[] (the ids row) is overwritten below

  // 5. ids: the Fisher-Yates index of every step in parallel (ids[pos] = j), then
  // the swap chain on lane 0 (topk::draw_ranks), x in the last slot if in_topk.
  const uint64_t base = offset + 1 + uint64_t((k + 1) / 2);
  const uint32_t n = uint32_t(vocab_size - 1);
  for (int64_t i = 2 * lane; i < k; i += 64) {
    const Philox4x32 b = philox_block(seed, t, base + uint64_t(i / 2));
    for (int64_t e = 0; e < 2 && i + e < k; ++e) {
      const int32_t pos = int32_t(i + e);
      ids[pos] = pos + int32_t(uniform_index(b.v[2 * e], b.v[2 * e + 1], n - uint32_t(pos)));
    }
  }
  __syncwarp();
  int64_t rank0 = 0;
  if (lane == 0) {
    for (int64_t pos = 0; pos < k; ++pos) {
      const int32_t j = int32_t(ids[pos]);
      const int32_t vj = map.get(j);
      if (j != int32_t(pos)) map.set(j, map.get(int32_t(pos)));  // position pos is never drawn again
      ids[pos] = int64_t(vj) + (int64_t(vj) >= x ? 1 : 0);      // [0, K-1) -> ids != x
    }
    rank0 = ids[0];
    if (in_topk) ids[k - 1] = x;
  }
  rank0 = __shfl_sync(reduce::kFullMask, rank0, 0);
  __syncwarp();  // lane 0's map writes are done: clear the map for the next token
  for (uint32_t i = uint32_t(lane); i <= map.mask; i += 32) map.keys[i] = -1;
  __syncwarp();

  // 7. the discrete latent.
  const bool x_wins = zt_rule == topk::kExact ? e_x > o_1 : in_topk;
  return x_wins ? x : rank0;
}

__global__ void topk_kernel(const int64_t* __restrict__ x0, const double* __restrict__ gamma,
                            const double* __restrict__ inv_tau, int64_t* __restrict__ ids, float* __restrict__ weights,
                            int64_t* __restrict__ z, int64_t n, int64_t k, int64_t vocab_size, int zt_rule,
                            uint64_t seed, uint64_t offset, int32_t* map_scratch, uint32_t* checks) {
  const int64_t slot = int64_t(blockIdx.x) * kTopKWarps + int64_t(threadIdx.x >> 5);
  const topk::SwapMap map = slot_map(map_scratch, slot, topk::swap_map_capacity(k));
  for (int64_t t = slot; t < n; t += int64_t(gridDim.x) * kTopKWarps) {  // warp-uniform
    const int64_t zt = warp_token(seed, offset, uint64_t(t), x0[t], gamma[t], inv_tau[t], k, vocab_size, zt_rule,
                                  map, ids + t * k, weights + t * k, checks);
    if ((threadIdx.x & 31u) == 0) z[t] = zt;
  }
}

template <class E>
__global__ void topk_embed_kernel(const int64_t* __restrict__ x0, const double* __restrict__ gamma,
                                  const double* __restrict__ inv_tau, const E* __restrict__ embedding, int64_t d,
                                  float* __restrict__ h, int64_t* __restrict__ ids, float* __restrict__ weights,
                                  int64_t* __restrict__ z, int64_t n, int64_t k, int64_t vocab_size, int zt_rule,
                                  uint64_t seed, uint64_t offset, int32_t* map_scratch, uint32_t* checks) {
  const int warp = int(threadIdx.x >> 5);
  const topk::SwapMap map =
      slot_map(map_scratch, int64_t(blockIdx.x) * kTopKWarps + warp, topk::swap_map_capacity(k));
  for (int64_t t0 = int64_t(blockIdx.x) * kTopKWarps; t0 < n; t0 += int64_t(gridDim.x) * kTopKWarps) {
    const int64_t t = t0 + warp;
    if (t < n) {  // warp-uniform
      const int64_t zt = warp_token(seed, offset, uint64_t(t), x0[t], gamma[t], inv_tau[t], k, vocab_size, zt_rule,
                                    map, ids + t * k, weights + t * k, checks);
      if ((threadIdx.x & 31u) == 0) z[t] = zt;
    }
    __syncthreads();  // the block's tokens' ids and weights are written (global memory, this block)
    // h[t0 + r, c] over (r, c), c fastest: consecutive threads read consecutive columns of a row of E.
    const int64_t tokens = n - t0 < kTopKWarps ? n - t0 : kTopKWarps;
    for (int64_t q = threadIdx.x; q < tokens * d; q += blockDim.x) {
      const int64_t r = q / d, c = q - r * d;
      const int64_t* id = ids + (t0 + r) * k;
      const float* w = weights + (t0 + r) * k;
      float acc = 0.0f;
      for (int64_t i = 0; i < k; ++i) acc += w[i] * to_float(embedding[id[i] * d + c]);
      h[(t0 + r) * d + c] = acc;
    }
    // (no trailing barrier: the next tokens' rows and each warp's own map are not read here)
  }
}

__global__ void bag_backward_atomic_kernel(const float* __restrict__ grad_h, const int64_t* __restrict__ ids,
                                           const float* __restrict__ weights, float* __restrict__ grad, int64_t tokens,
                                           int64_t k, int64_t d, int64_t vocab_size, uint32_t* checks) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t i = 0; i < k; ++i) {
      const float w = weights[t * k + i];
      const int64_t id = ids[t * k + i];
      if (!check::valid_id(id, vocab_size)) {  // device-side check: the entry is dropped
        if (threadIdx.x == 0) check::report(checks, check::kIds);
        continue;
      }
      float* row = grad + id * d;
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) atomicAdd(&row[c], w * grad_h[t * d + c]);
    }
  }
}

// sorted_ids[e] = ids of flat entry order[e] (token = order[e] / k), ascending,
// ties in entry order; segments of `seg` sorted entries.

// Column c of sum_{f in [e, end)} w_f grad_h[token_f], in entry order.
DUO_DEVICE float bag_piece(const float* grad_h, const int64_t* order, const float* weights, int64_t e, int64_t end,
                           int64_t k, int64_t d, int64_t c) {
  float acc = 0.0f;
  for (int64_t f = e; f < end; ++f) acc += weights[order[f]] * grad_h[(order[f] / k) * d + c];
  return acc;
}

// End of the run piece starting at e within its segment (seg_end = the segment's end).
DUO_DEVICE int64_t piece_end(const int64_t* sorted_ids, int64_t e, int64_t seg_end) {
  int64_t f = e + 1;
  while (f < seg_end && sorted_ids[f] == sorted_ids[e]) ++f;
  return f;
}

// Pass 1: partial[s] = the first piece of segment s when its run began in an earlier segment.
__global__ void bag_partials_kernel(const float* __restrict__ grad_h, const int64_t* __restrict__ sorted_ids,
                                    const int64_t* __restrict__ order, const float* __restrict__ weights,
                                    float* __restrict__ partial, int64_t entries, int64_t seg, int64_t k, int64_t d) {
  const int64_t segments = (entries + seg - 1) / seg;
  for (int64_t s = int64_t(blockIdx.x) + 1; s < segments; s += gridDim.x) {
    const int64_t e = s * seg;
    if (sorted_ids[e - 1] != sorted_ids[e]) continue;  // the segment starts a run: no partial
    const int64_t end = piece_end(sorted_ids, e, e + seg < entries ? e + seg : entries);
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
      partial[s * d + c] = bag_piece(grad_h, order, weights, e, end, k, d, c);
  }
}

// grad rows [lo, hi) clamped to [0, K) = 0 (rows no entry points at).
DUO_DEVICE void zero_rows(float* grad, int64_t lo, int64_t hi, int64_t d, int64_t vocab_size) {
  lo = lo > 0 ? lo : 0;
  hi = hi < vocab_size ? hi : vocab_size;
  for (int64_t row = lo; row < hi; ++row)
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) grad[row * d + c] = 0.0f;
}

// No entries: every row is a zero row.
__global__ void bag_zero_kernel(float* __restrict__ grad, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    grad[i] = 0.0f;
}

// Pass 2: the block of the segment holding a run's first entry writes the run's row:
// its own piece, then the partial rows of the later segments the run covers, in order.
__global__ void bag_runs_kernel(const float* __restrict__ grad_h, const int64_t* __restrict__ sorted_ids,
                                const int64_t* __restrict__ order, const float* __restrict__ weights,
                                const float* __restrict__ partial, float* __restrict__ grad, int64_t entries,
                                int64_t seg, int64_t k, int64_t d, int64_t vocab_size, uint32_t* checks) {
  const int64_t segments = (entries + seg - 1) / seg;
  for (int64_t s = blockIdx.x; s < segments; s += gridDim.x) {
    const int64_t seg_end = (s + 1) * seg < entries ? (s + 1) * seg : entries;
    for (int64_t e = s * seg; e < seg_end;) {
      const int64_t end = piece_end(sorted_ids, e, seg_end);
      if (e > 0 && sorted_ids[e - 1] == sorted_ids[e]) {  // continues a run begun earlier: pass 1's partial
        e = end;
        continue;
      }
      const int64_t id = sorted_ids[e];
      {  // zero rows: the ids between the previous run's and this one (after it too, for the last run)
        const int64_t prev = e > 0 ? sorted_ids[e - 1] : -1;
        zero_rows(grad, prev + 1, id, d, vocab_size);
        if (sorted_ids[entries - 1] == id) zero_rows(grad, id + 1, vocab_size, d, vocab_size);  // the last run
      }
      if (!check::valid_id(id, vocab_size)) {  // device-side check: the run is dropped
        if (threadIdx.x == 0) check::report(checks, check::kIds);
        e = end;
        continue;
      }
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = bag_piece(grad_h, order, weights, e, end, k, d, c);
        for (int64_t t = s + 1; t < segments && sorted_ids[t * seg] == id; ++t) acc += partial[t * d + c];
        grad[id * d + c] = acc;
      }
      e = end;
    }
  }
}

}  // namespace

int64_t topk_scratch_slots(int64_t n, int64_t k, int64_t sm_count) {
  // A slot (swap map) per warp: every SM's resident warps, fewer if n is small;
  // above 128 MiB of maps fewer slots, but never below one block per SM (the
  // maps of those are then at most ~2.7x the [n, k] outputs).
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  const int64_t needed = (n + kTopKWarps - 1) / kTopKWarps * kTopKWarps;
  const int64_t slot_bytes = int64_t(topk::swap_map_capacity(k)) * 8;
  int64_t slots = sms * kResidentWarpsPerSM;
  if (slots * slot_bytes > kTopKScratchCap) {
    slots = kTopKScratchCap / slot_bytes / kTopKWarps * kTopKWarps;
    if (slots < sms * kTopKWarps) slots = sms * kTopKWarps;
  }
  slots = slots < needed ? slots : needed;
  if (slots < kTopKWarps) slots = kTopKWarps;
  return slots < 65535 * int64_t(kTopKWarps) ? slots : 65535 * int64_t(kTopKWarps);
}

int64_t topk_map_capacity(int64_t k) { return topk::swap_map_capacity(k); }

int curriculum_topk(const int64_t* x0, const double* gamma, const double* inv_tau, int64_t* ids, float* weights,
                    int64_t* z, int64_t n, int64_t k, int64_t vocab_size, int zt_rule, uint64_t seed, uint64_t offset,
                    int32_t* map_scratch, int64_t slots, uint32_t* checks, void* stream) {
  if (n == 0) return 0;
  const unsigned blocks = unsigned(slots / kTopKWarps);
  return int(launch_kernel(topk_kernel, dim3(blocks), dim3(kTopKThreads), 0, static_cast<cudaStream_t>(stream), x0,
                           gamma, inv_tau, ids, weights, z, n, k, vocab_size, zt_rule, seed, offset, map_scratch,
                           checks));
}

namespace {
template <class E>
int launch_topk_embed(const int64_t* x0, const double* gamma, const double* inv_tau, const E* embedding, int64_t d,
                      float* h, int64_t* ids, float* weights, int64_t* z, int64_t n, int64_t k, int64_t vocab_size,
                      int zt_rule, uint64_t seed, uint64_t offset, int32_t* map_scratch, int64_t slots,
                      uint32_t* checks, void* stream) {
  return int(launch_kernel(topk_embed_kernel<E>, dim3(unsigned(slots / kTopKWarps)), dim3(kTopKThreads), 0,
                           static_cast<cudaStream_t>(stream), x0, gamma, inv_tau, embedding, d, h, ids, weights, z, n,
                           k, vocab_size, zt_rule, seed, offset, map_scratch, checks));
}
}  // namespace

int curriculum_topk_embed(const int64_t* x0, const double* gamma, const double* inv_tau, const void* embedding,
                          int emb_dtype, int64_t d, float* h, int64_t* ids, float* weights, int64_t* z, int64_t n,
                          int64_t k, int64_t vocab_size, int zt_rule, uint64_t seed, uint64_t offset,
                          int32_t* map_scratch, int64_t slots, uint32_t* checks, void* stream) {
  if (n == 0) return 0;
  switch (emb_dtype) {
    case 0:
      return launch_topk_embed(x0, gamma, inv_tau, static_cast<const float*>(embedding), d, h, ids, weights, z, n, k,
                               vocab_size, zt_rule, seed, offset, map_scratch, slots, checks, stream);
    case 1:
      return launch_topk_embed(x0, gamma, inv_tau, static_cast<const bf16_bits*>(embedding), d, h, ids, weights, z, n,
                               k, vocab_size, zt_rule, seed, offset, map_scratch, slots, checks, stream);
    case 2:
      return launch_topk_embed(x0, gamma, inv_tau, static_cast<const f16_bits*>(embedding), d, h, ids, weights, z, n,
                               k, vocab_size, zt_rule, seed, offset, map_scratch, slots, checks, stream);
  }
  return int(cudaErrorInvalidValue);
}

int topk_bag_backward_atomic(const float* grad_h, const int64_t* ids, const float* weights, float* grad,
                             int64_t tokens, int64_t k, int64_t d, int64_t vocab_size, uint32_t* checks,
                             void* stream) {
  if (tokens == 0) return 0;
  return int(launch_kernel(bag_backward_atomic_kernel, dim3(grid_size(tokens, 1)), dim3(kBagThreads), 0,
                           static_cast<cudaStream_t>(stream), grad_h, ids, weights, grad, tokens, k, d, vocab_size,
                           checks));
}

int64_t topk_bag_segment(int64_t k) { return k > kMinBagSegment ? k : kMinBagSegment; }

int64_t topk_bag_partial_floats(int64_t entries, int64_t k, int64_t d) {
  const int64_t seg = topk_bag_segment(k);
  return (entries + seg - 1) / seg * d;
}

int topk_bag_backward_sorted(const float* grad_h, const int64_t* sorted_ids, const int64_t* order,
                             const float* weights, float* grad, int64_t entries, int64_t k, int64_t d,
                             int64_t vocab_size, float* partial_scratch, uint32_t* checks, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (entries == 0) {  // dE = 0 (the output is written in full, like with entries)
    const int64_t floats = vocab_size * d;
    if (floats == 0) return 0;
    return int(launch_kernel(bag_zero_kernel, dim3(grid_size(floats, 256, 4096)), dim3(256), 0, st, grad,
                             floats));
  }
  const int64_t seg = topk_bag_segment(k), segments = (entries + seg - 1) / seg;
  if (segments > 1) {
    const int err = int(launch_kernel(bag_partials_kernel, dim3(grid_size(segments - 1, 1)), dim3(kBagThreads), 0,
                                      st, grad_h, sorted_ids, order, weights, partial_scratch, entries, seg, k, d));
    if (err != 0) return err;
  }
  return int(launch_kernel(bag_runs_kernel, dim3(grid_size(segments, 1)), dim3(kBagThreads), 0, st, grad_h,
                           sorted_ids, order, weights, partial_scratch, grad, entries, seg, k, d, vocab_size, checks));
}

}  // namespace cuda
}  // namespace duo_fast
