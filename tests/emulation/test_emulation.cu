// test_emulation.cu -- tests of tests/emulation/cuda_emulation.h.
//
// The kernels are plain CUDA: this file compiles with nvcc (-arch=sm_80/sm_90,
// no emulation header) and, as a program, would run the same checks on a GPU.
// Under g++ with -DDUO_FAST_EMULATE_CUDA it runs on the CPU through the
// emulation and adds emulation-only checks: garbage-filled dynamic shared
// memory, planted ordering bugs caught by seeded schedules, mode switching,
// and (with --fatal=CASE) the errors the emulation must abort on.
//
// Usage: test_emulation [--only=NAME] [--quick] [--bench] [--fatal=CASE] [--planted=CASE]
// Prints one "[PASS] name" / "[FAIL] name" line per test, then
// "ALL PASSED" or "FAILURES: n"; exit status 0 only if all passed.
#ifdef DUO_FAST_EMULATE_CUDA
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// The project header defines DUO_DYNAMIC_SHARED; keep this file standalone.
#ifndef DUO_DYNAMIC_SHARED
#ifdef DUO_FAST_EMULATE_CUDA
#define DUO_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::cuda_emu::dynamic_smem())
#else
#define DUO_DYNAMIC_SHARED(T, name)                                  \
  extern __shared__ __align__(16) unsigned char duo_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(duo_dynamic_smem_)
#endif
#endif

// One launch spelling for both compilers (the kernel name must not contain a comma).
#ifdef DUO_FAST_EMULATE_CUDA
#define LAUNCH(kernel, grid, block, smem, ...) ::cuda_emu::launch(kernel, grid, block, smem, nullptr, __VA_ARGS__)
#else
#define LAUNCH(kernel, grid, block, smem, ...) kernel<<<grid, block, smem>>>(__VA_ARGS__)
#endif

#define FULL_MASK 0xffffffffu

// ===========================================================================
// Kernels
// ===========================================================================

__device__ __forceinline__ float warp_sum_xor(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;  // every lane holds the sum
}

__device__ __forceinline__ float warp_sum_down(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
  return v;  // lane 0 holds the sum
}

// Block reduction: warp shuffles, then a cross-warp step through shared memory.
template <int BLOCK>
__global__ void k_block_sum(const float* __restrict__ in, float* __restrict__ out, int n) {
  __shared__ float red[BLOCK / 32];
  const int i = blockIdx.x * BLOCK + threadIdx.x;
  float v = i < n ? in[i] : 0.0f;  // out-of-range lanes pad with the identity
  v = warp_sum_xor(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < BLOCK / 32 ? red[lane] : 0.0f;
    t = warp_sum_xor(t);
    if (lane == 0) out[blockIdx.x] = t;
  }
}

// Sum broadcast to every thread; `red` is shared scratch of 32 floats.
// Ends with __syncthreads (rule 4) unless `skip_trailing_sync` plants the bug.
__device__ float block_sum_bcast(float v, float* red, bool skip_trailing_sync) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  v = warp_sum_down(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.0f;
  for (int w = 0; w < nwarps; ++w) t += red[w];
  if (!skip_trailing_sync) __syncthreads();
  return t;
}

// Two reductions in a row through the same scratch; every thread stores both.
__global__ void k_two_sums(const float* x, float* out, int skip_trailing_sync) {
  __shared__ float red[32];
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = x[g];
  const float s1 = block_sum_bcast(v, red, skip_trailing_sync != 0);
  const float s2 = block_sum_bcast(v * v, red, skip_trailing_sync != 0);
  out[2 * g] = s1;
  out[2 * g + 1] = s2;
}

// Each thread publishes a value and reads its neighbour's (32 threads away).
__global__ void k_neighbour(int* out, int salt, int skip_sync) {
  DUO_DYNAMIC_SHARED(int, s);
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = salt + 1000 * t;
  if (!skip_sync) __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 32) % n];
}

// Shuffle semantics, lane by lane, for every width and several offsets.
__device__ __constant__ int c_widths[6] = {32, 16, 8, 4, 2, 1};
__device__ __constant__ int c_deltas[7] = {0, 1, 2, 3, 5, 16, 31};
#define N_SHFL_CASES (6 * 7 * 4)

template <class T>
__host__ __device__ T shfl_value(int g, int k) {
  // distinct per thread g and case k; 64-bit types use the high half too
  if (sizeof(T) == 8) return T((static_cast<long long>(g + 1) << 36) + 3 * k + g);
  return T(g * 1000 + k);
}

template <class T>
__global__ void k_shfl(T* out) {
  const int g = threadIdx.x, lane = g % 32;
  int c = 0;
  for (int wi = 0; wi < 6; ++wi) {
    for (int di = 0; di < 7; ++di) {
      const int w = c_widths[wi], d = c_deltas[di];
      out[(c + 0) * blockDim.x + g] = __shfl_up_sync(FULL_MASK, shfl_value<T>(g, c + 0), d, w);
      out[(c + 1) * blockDim.x + g] = __shfl_down_sync(FULL_MASK, shfl_value<T>(g, c + 1), d, w);
      out[(c + 2) * blockDim.x + g] = __shfl_xor_sync(FULL_MASK, shfl_value<T>(g, c + 2), d, w);
      const int src = (lane * 7 + d) % 45;  // also beyond the width: taken modulo width
      out[(c + 3) * blockDim.x + g] = __shfl_sync(FULL_MASK, shfl_value<T>(g, c + 3), src, w);
      c += 4;
    }
  }
}

// Votes, block-wide predicate barriers, sm_80 warp reductions, match.
#define N_VOTE_CASES 7
__host__ __device__ inline int vote_pred(int c, int g) {
  const int lane = g % 32, warp = g / 32;
  switch (c) {
    case 0: return lane % 3 == 0;
    case 1: return lane < 17;
    case 2: return 1;
    case 3: return 0;
    case 4: return lane == 31;
    case 5: return (lane + warp) % 2 == 0;
    default: return lane != 5;
  }
}

__global__ void k_vote(unsigned* ballot, int* all, int* any, int* bcount, int* band, int* bor, unsigned* red,
                       unsigned* match) {
  const int g = threadIdx.x, n = blockDim.x, lane = g % 32;
  for (int c = 0; c < N_VOTE_CASES; ++c) {
    const int p = vote_pred(c, g);
    ballot[c * n + g] = __ballot_sync(FULL_MASK, p);
    all[c * n + g] = __all_sync(FULL_MASK, p);
    any[c * n + g] = __any_sync(FULL_MASK, p);
    __syncwarp();
    bcount[c * n + g] = __syncthreads_count(p);
    band[c * n + g] = __syncthreads_and(p);
    bor[c * n + g] = __syncthreads_or(p);
  }
  const unsigned v = 7u * unsigned(g) + 3u;
  const int sv = lane % 2 ? -int(v) : int(v);
  red[0 * n + g] = __reduce_add_sync(FULL_MASK, v);
  red[1 * n + g] = __reduce_min_sync(FULL_MASK, v);
  red[2 * n + g] = __reduce_max_sync(FULL_MASK, v);
  red[3 * n + g] = unsigned(__reduce_min_sync(FULL_MASK, sv));
  red[4 * n + g] = unsigned(__reduce_max_sync(FULL_MASK, sv));
  red[5 * n + g] = __reduce_and_sync(FULL_MASK, v | 0x100u);
  red[6 * n + g] = __reduce_or_sync(FULL_MASK, 1u << lane);
  red[7 * n + g] = __reduce_xor_sync(FULL_MASK, v);
  match[g] = __match_any_sync(FULL_MASK, lane % 4);
  match[n + g] = __match_any_sync(FULL_MASK, static_cast<unsigned long long>(lane / 8) << 40);
}

// Atomics from every thread of several blocks.
struct AtomicOut {
  int add_i;
  unsigned add_u;
  unsigned long long add_ull;
  float add_f;
  double add_d;
  int max_i, min_i;
  unsigned max_u, min_u;
  long long max_ll, min_ll;
  unsigned long long max_ull, min_ull;
  unsigned cas_chain;
  unsigned long long cas_ull;
  int exch;
  unsigned inc, dec;
  unsigned and_u, or_u, xor_u;
  unsigned long long or_ull;
  int sub_i;
  int hist[17];
};

__host__ __device__ inline int atomic_key(int g) { return (g * 37) % 1001 - 500; }

__global__ void k_atomics(AtomicOut* o) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&o->add_i, 1);
  atomicAdd(&o->add_u, 2u);
  atomicAdd(&o->add_ull, 1ull << 33);
  atomicAdd(&o->add_f, 0.5f);
  atomicAdd(&o->add_d, 0.25);
  atomicMax(&o->max_i, atomic_key(g));
  atomicMin(&o->min_i, atomic_key(g));
  atomicMax(&o->max_u, unsigned(g) * 3u);
  atomicMin(&o->min_u, unsigned(g) + 10u);
  atomicMax(&o->max_ll, static_cast<long long>(atomic_key(g)) << 35);
  atomicMin(&o->min_ll, static_cast<long long>(atomic_key(g)) << 35);
  atomicMax(&o->max_ull, static_cast<unsigned long long>(g) << 40);
  atomicMin(&o->min_ull, (static_cast<unsigned long long>(g) << 40) + 5);
  // CAS loop applying x -> 3x + 1: the result does not depend on the order.
  // (The first read is atomic too: a plain read racing with the CAS is a data
  // race that ThreadSanitizer reports in thread mode.)
  unsigned old = atomicOr(&o->cas_chain, 0u), assumed;
  do {
    assumed = old;
    old = atomicCAS(&o->cas_chain, assumed, assumed * 3u + 1u);
  } while (assumed != old);
  unsigned long long old64 = atomicOr(&o->cas_ull, 0ull), assumed64;
  do {
    assumed64 = old64;
    old64 = atomicCAS(&o->cas_ull, assumed64, assumed64 + (1ull << 34) + 1);
  } while (assumed64 != old64);
  atomicExch(&o->exch, g + 1);
  atomicInc(&o->inc, 99u);
  atomicDec(&o->dec, 1000u);
  atomicAnd(&o->and_u, ~(1u << (g % 32)) | (g % 64 < 32 ? 0u : 0xffffffffu));
  atomicOr(&o->or_u, 1u << (g % 29));
  atomicXor(&o->xor_u, 1u << (g % 32));
  atomicOr(&o->or_ull, 1ull << (g % 64));
  atomicSub(&o->sub_i, 3);
  atomicAdd(&o->hist[g % 17], 1);
  __threadfence();
}

// Dynamic shared memory read before any write: sees the garbage fill.
__global__ void k_smem_garbage(unsigned* out) {
  DUO_DYNAMIC_SHARED(unsigned, s);
  if (threadIdx.x == 0) {
    out[0] = s[0];
    out[1] = s[3];
    out[2] = unsigned(reinterpret_cast<unsigned long long>(s) % 16);
  }
}

// Dynamic shared memory used correctly: two regions, reversal through smem.
__global__ void k_smem_reverse(const float* in, float* out, int* idx_out) {
  DUO_DYNAMIC_SHARED(float, s);
  int* si = reinterpret_cast<int*>(s + blockDim.x);
  const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
  s[t] = in[base + t];
  si[t] = base + t;
  __syncthreads();
  out[base + t] = s[n - 1 - t];
  idx_out[base + t] = si[n - 1 - t];
}

// A launch asking for more than 48 KiB of dynamic shared memory.
__global__ void k_smem_big(int* out) {
  DUO_DYNAMIC_SHARED(int, s);
  const int words = 64 * 1024 / 4;
  for (int i = threadIdx.x; i < words; i += blockDim.x) s[i] = i;
  __syncthreads();
  long long acc = 0;
  if (threadIdx.x == 0)
    for (int i = 0; i < words; ++i) acc += s[i];
  if (threadIdx.x == 0) out[0] = int(acc % 1000003);
}

// Early exit: the rest keep using __syncthreads.
__global__ void k_early_exit_tree(const int* in, int* out, int active) {
  __shared__ int s[128];
  const int t = threadIdx.x;
  if (t >= active) return;
  s[t] = in[blockIdx.x * active + t];
  __syncthreads();
  for (int stride = 64; stride > 0; stride >>= 1) {
    if (t < stride && t + stride < active) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Whole warps exit; the remaining warps still shuffle and synchronize.
__global__ void k_early_exit_warps(const float* in, float* out, int live_warps) {
  __shared__ float red[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= live_warps) return;
  float v = warp_sum_xor(in[blockIdx.x * blockDim.x + threadIdx.x]);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.0f;
    for (int w = 0; w < live_warps; ++w) t += red[w];
    out[blockIdx.x] = t;
  }
  __syncthreads();  // a barrier after thread 0's work, among the live threads only
}

// Multi-dimensional blocks and grids.
__global__ void k_multidim(unsigned* out, unsigned* ballots) {
  const unsigned bx = blockIdx.x, by = blockIdx.y, bz = blockIdx.z;
  const unsigned tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
  const unsigned tlin = tx + blockDim.x * (ty + blockDim.y * tz);
  const unsigned blin = bx + gridDim.x * (by + gridDim.y * bz);
  const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned g = blin * nthreads + tlin;
  out[g] = (tx) | (ty << 4) | (tz << 8) | (bx << 12) | (by << 16) | (bz << 20);
  const unsigned b = __ballot_sync(FULL_MASK, ty == 1);
  if (tlin % 32 == 0) ballots[blin * (nthreads / 32) + tlin / 32] = b;
}

// Tiled transpose with a 2D block (32, 8) and a padded shared tile.
__global__ void k_transpose(const float* in, float* out, int rows, int cols) {
  __shared__ float tile[32][33];
  int x = blockIdx.x * 32 + threadIdx.x, y = blockIdx.y * 32 + threadIdx.y;
  for (int j = 0; j < 32; j += 8)
    if (x < cols && y + j < rows) tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * cols + x];
  __syncthreads();
  x = blockIdx.y * 32 + threadIdx.x;
  y = blockIdx.x * 32 + threadIdx.y;
  for (int j = 0; j < 32; j += 8)
    if (x < rows && y + j < cols) out[(y + j) * rows + x] = tile[threadIdx.x][threadIdx.y + j];
}

// Launch arguments of many kinds, by value.
struct Params {
  int a;
  float b;
  double c;
  int arr[5];
  const int* ptr;
  char tag;
};

__global__ void k_args(Params p, double* out, const int* in, int n, float scale, double d, unsigned long long big,
                       char ch, bool flag, short sh, int2 i2, float4 f4, unsigned u, long long neg) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int k = 0;
  out[k++] = p.a;
  out[k++] = p.b;
  out[k++] = p.c;
  for (int i = 0; i < 5; ++i) out[k++] = p.arr[i];
  out[k++] = p.ptr[1];
  out[k++] = p.tag;
  out[k++] = in[n - 1];
  out[k++] = n;
  out[k++] = scale;
  out[k++] = d;
  out[k++] = double(big >> 32);
  out[k++] = double(big & 0xffffffffull);
  out[k++] = ch;
  out[k++] = flag ? 1.0 : 0.0;
  out[k++] = sh;
  out[k++] = i2.x;
  out[k++] = i2.y;
  out[k++] = f4.x;
  out[k++] = f4.w;
  out[k++] = u;
  out[k++] = double(neg);
}

// Parameters are private copies: a thread modifying its copy affects no other.
__global__ void k_param_copy(int v, int* out) {
  v += threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = v;
}

// Integer and float intrinsics against host references.
__global__ void k_intrinsics(const unsigned* a32, const unsigned* b32, const unsigned long long* a64,
                             const unsigned long long* b64, const float* f, unsigned* o32,
                             unsigned long long* o64, float* of, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const unsigned a = a32[i], b = b32[i];
  const unsigned long long A = a64[i], B = b64[i];
  unsigned* r = o32 + 12 * i;
  r[0] = __umulhi(a, b);
  r[1] = unsigned(__mulhi(int(a), int(b)));
  r[2] = unsigned(__clz(int(a)));
  r[3] = unsigned(__ffs(int(a)));
  r[4] = unsigned(__popc(a));
  r[5] = __brev(a);
  r[6] = unsigned(__popcll(A));
  r[7] = __byte_perm(a, b, 0x5173u);
  r[8] = __funnelshift_l(a, b, i % 40);
  r[9] = __funnelshift_r(a, b, i % 40);
  r[10] = unsigned(__float_as_int(__int_as_float(int(a))));
  r[11] = __float_as_uint(__uint_as_float(b));
  unsigned long long* R = o64 + 5 * i;
  R[0] = __umul64hi(A, B);
  R[1] = static_cast<unsigned long long>(__mul64hi(static_cast<long long>(A), static_cast<long long>(B)));
  R[2] = __brevll(A);
  R[3] = static_cast<unsigned long long>(__double_as_longlong(__longlong_as_double(static_cast<long long>(B))));
  R[4] = static_cast<unsigned long long>(__clzll(static_cast<long long>(A >> (i % 64))));
  const float x = f[i];
  float* F = of + 8 * i;
  F[0] = __expf(x);
  F[1] = __logf(fabsf(x) + 0.5f);
  F[2] = __powf(fabsf(x) + 0.5f, 1.7f);
  F[3] = __fdividef(x, 3.0f);
  F[4] = rsqrtf(fabsf(x) + 0.25f);
  F[5] = __saturatef(x);
  F[6] = float(__float2int_rn(x * 10.0f));
  F[7] = fmaxf(fminf(x, 1.0f), -1.0f);
}

// Benchmark kernel: a 256-thread block with a block reduction and a few barriers.
__global__ void k_bench(const float* in, float* out) {
  __shared__ float red[32];
  __shared__ float buf[256];
  const int t = threadIdx.x;
  buf[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  float v = buf[(t + 1) % blockDim.x];
  __syncthreads();
  v = block_sum_bcast(v, red, false);
  buf[t] = v;
  __syncthreads();
  if (t == 0) out[blockIdx.x] = buf[blockDim.x - 1];
}

#ifdef DUO_FAST_EMULATE_CUDA
// ---- Kernels that must make the emulation abort (run with --fatal=CASE) ----
__global__ void k_fatal_deadlock(float* out) {  // half the warp shuffles, half waits at the barrier
  float v = float(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(FULL_MASK, v, 1);
  else __syncthreads();
  out[threadIdx.x] = v;
}
__global__ void k_fatal_bad_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, float(threadIdx.x), 1);
}
__global__ void k_fatal_exited_lane(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, float(threadIdx.x), 1);
}
__global__ void k_fatal_partial_warp(float* out) {  // launched with 48 threads
  out[threadIdx.x] = __shfl_down_sync(FULL_MASK, float(threadIdx.x), 1);
}
__global__ void k_fatal_divergent_sync(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}
__global__ void k_fatal_divergent_warp_op(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = float(__ballot_sync(FULL_MASK, 1));
  else v = __shfl_xor_sync(FULL_MASK, v, 1);
  out[threadIdx.x] = v;
}
__global__ void k_fatal_trap(float*) {
  if (threadIdx.x == 7) __trap();
}
#endif

// Planted bugs for the emulation's poisoned static shared memory and seeded
// atomic order (test_planted_bugs).
// (a) An argmax whose index lives in static shared memory and is written only
// when a score beats the running best (as curriculum_embed once did): with
// no score above -inf (here: all NaN) the index is read uninitialised.
__global__ void k_planted_uninit_static_smem(const float* score, int n, int* out, int init_index) {
  __shared__ float best;
  __shared__ int arg;
  if (threadIdx.x == 0) {
    best = -INFINITY;
    if (init_index) arg = 0;
    for (int i = 0; i < n; ++i)
      if (score[blockIdx.x * n + i] > best) best = score[blockIdx.x * n + i], arg = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = arg;
}
// (b) An order-dependent float sum by atomics: each thread adds +x_t then -x_t
// (magnitudes 1 .. 2^23). Run thread after thread the sum stays exactly 0
// (0 + x - x), but when other threads' atomics interleave the roundings no
// longer cancel: the bits depend on the order. The fixed version sums each
// thread's terms first and reduces in a fixed tree order.
__global__ void k_planted_atomic_order(float* out, int fixed_order) {
  __shared__ float part[256];
  const int t = threadIdx.x;
  const float x = exp2f(float(t % 24)) * (1.0f + float((t * 37) % 101) / 101.0f);
  if (!fixed_order) {
    atomicAdd(&out[blockIdx.x], x);
    atomicAdd(&out[blockIdx.x], -x);
    return;
  }
  part[t] = (0.0f + x) - x;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) part[t] += part[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = part[0];
}

// Planted memory bugs for the sanitizer runs (--planted=CASE): plain CUDA,
// but only AddressSanitizer / ThreadSanitizer turn them into failures.
// The race uses 8-byte elements: TSan keeps 4 accesses per 8-byte shadow
// cell, and with 4-byte ints the racing pair could be evicted.
__global__ void k_planted_race(long long* out) {  // missing __syncthreads before a neighbour read
  DUO_DYNAMIC_SHARED(long long, s);
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = 3ll * t + 1;
  out[blockIdx.x * n + t] = s[(t + 32) % n];
}
__global__ void k_planted_oob_smem(int* out) {  // reads one int past the dynamic shared memory
  DUO_DYNAMIC_SHARED(int, s);
  s[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + 1];
}
__global__ void k_planted_oob_global(const int* in, int* out, int n) {  // off-by-one bound
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i % n] = in[i];
}
__global__ void k_planted_oob_stack(int* out, int idx) {  // local array indexed out of range
  int local[8];
  for (int i = 0; i < 8; ++i) local[i] = i * int(threadIdx.x);
  const int* p = local;  // through a pointer: for ASan on the fiber stack, not UBSan's bounds check
  out[threadIdx.x] = p[idx + int(threadIdx.x) % 2];
}

// ===========================================================================
// Host side
// ===========================================================================
static int g_failures = 0;
static int g_checks_failed_in_test = 0;
static bool g_quick = false;

#define EXPECT(cond, ...)                                       \
  do {                                                          \
    if (!(cond)) {                                              \
      if (g_checks_failed_in_test++ < 8) {                      \
        std::printf("    check failed: %s: ", #cond);           \
        std::printf(__VA_ARGS__);                               \
        std::printf("\n");                                      \
      }                                                         \
    }                                                           \
  } while (0)

static void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("    CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    ++g_checks_failed_in_test;
  }
}
#define SYNC(what) check_cuda(cudaGetLastError(), what), check_cuda(cudaDeviceSynchronize(), what)

// Managed buffer: the same pointer is valid on host and device (and on the
// emulated "device", which is the host).
template <class T>
struct Buf {
  T* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t count) : n(count) {
    check_cuda(cudaMallocManaged(&p, sizeof(T) * (count ? count : 1)), "cudaMallocManaged");
    std::memset(static_cast<void*>(p), 0, sizeof(T) * (count ? count : 1));
  }
  ~Buf() { cudaFree(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T& operator[](size_t i) { return p[i]; }
};

static unsigned long long g_lcg = 0x243F6A8885A308D3ull;
static unsigned long long rnd64() {
  g_lcg = g_lcg * 6364136223846793005ull + 1442695040888963407ull;
  unsigned long long x = g_lcg;
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9ull;
  return x ^ (x >> 32);
}

static double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static void finish(const char* name, double t0) {
  const bool ok = g_checks_failed_in_test == 0;
  std::printf("[%s] %s (%.1f ms)\n", ok ? "PASS" : "FAIL", name, (now_s() - t0) * 1e3);
  std::fflush(stdout);
  if (!ok) ++g_failures;
  g_checks_failed_in_test = 0;
}

// ---- block reduction ----
template <int BLOCK>
static void run_block_sum(int n) {
  const int blocks = (n + BLOCK - 1) / BLOCK;
  Buf<float> in(n), out(blocks);
  for (int i = 0; i < n; ++i) in[i] = float((i * 7) % 13 - 6);
  LAUNCH(k_block_sum<BLOCK>, blocks, BLOCK, 0, in.p, out.p, n);
  SYNC("k_block_sum");
  for (int b = 0; b < blocks; ++b) {
    double ref = 0;
    for (int i = b * BLOCK; i < n && i < (b + 1) * BLOCK; ++i) ref += in[i];
    EXPECT(out[b] == float(ref), "BLOCK=%d block %d: got %g want %g", BLOCK, b, double(out[b]), ref);
  }
}

static void test_block_reduce() {
  double t0 = now_s();
  run_block_sum<256>(1000);
  if (g_quick) run_block_sum<512>(1200);  // --quick (sanitizer runs): no 1024-thread blocks
  else run_block_sum<1024>(3000);
  run_block_sum<32>(77);
  finish("block_reduce_shfl_xor_smem", t0);
}

static bool run_two_sums(int blocks, int threads, bool buggy, bool* wrong) {
  const int n = blocks * threads;
  Buf<float> x(n), out(2 * n);
  for (int i = 0; i < n; ++i) x[i] = float((i * 5) % 11 - 5);
  LAUNCH(k_two_sums, blocks, threads, 0, x.p, out.p, buggy ? 1 : 0);
  SYNC("k_two_sums");
  bool bad = false;
  for (int b = 0; b < blocks; ++b) {
    double s1 = 0, s2 = 0;
    for (int t = 0; t < threads; ++t) {
      s1 += x[b * threads + t];
      s2 += double(x[b * threads + t]) * x[b * threads + t];
    }
    for (int t = 0; t < threads; ++t) {
      const int g = b * threads + t;
      if (out[2 * g] != float(s1) || out[2 * g + 1] != float(s2)) bad = true;
    }
  }
  *wrong = bad;
  return !bad;
}

static void test_block_reduce_broadcast() {
  double t0 = now_s();
  bool wrong = false;
  run_two_sums(3, 256, false, &wrong);
  EXPECT(!wrong, "two block sums through shared scratch disagree with the reference");
  run_two_sums(2, 64, false, &wrong);
  EXPECT(!wrong, "two block sums (64 threads) disagree with the reference");
  finish("block_reduce_shfl_down_broadcast", t0);
}

// ---- shuffles ----
template <class T>
static bool check_shfl(const char* tname) {
  const int threads = 64;
  Buf<T> out(N_SHFL_CASES * threads);
  LAUNCH(k_shfl<T>, 1, threads, 0, out.p);
  SYNC("k_shfl");
  const int widths[6] = {32, 16, 8, 4, 2, 1}, deltas[7] = {0, 1, 2, 3, 5, 16, 31};
  int c = 0, bad = 0;
  for (int wi = 0; wi < 6; ++wi)
    for (int di = 0; di < 7; ++di, c += 4) {
      const int w = widths[wi], d = deltas[di];
      for (int g = 0; g < threads; ++g) {
        const int lane = g % 32, base = g - lane, r = lane % w;
        // Expected source lanes, from the CUDA programming guide's wording.
        const int up = r >= d ? lane - d : lane;
        const int down = r + d < w ? lane + d : lane;
        const int x = lane ^ d;
        const int xr = (x / w) > (lane / w) ? lane : x;  // later groups are out of reach
        const int src = (lane * 7 + d) % 45;
        const int idx = (lane / w) * w + src % w;
        const int want[4] = {up, down, xr, idx};
        for (int op = 0; op < 4; ++op) {
          const T got = out[(c + op) * threads + g];
          const T exp = shfl_value<T>(base + want[op], c + op);
          if (!(got == exp)) {
            if (bad++ < 4)
              std::printf("    %s op %d width %d delta %d thread %d: got %.17g want %.17g\n", tname, op, w, d, g,
                          double(got), double(exp));
          }
        }
      }
    }
  EXPECT(bad == 0, "%s: %d wrong shuffle results", tname, bad);
  return bad == 0;
}

static void test_shuffles() {
  double t0 = now_s();
  check_shfl<int>("int");
  check_shfl<unsigned>("unsigned");
  check_shfl<long long>("long long");
  check_shfl<unsigned long long>("unsigned long long");
  check_shfl<float>("float");
  check_shfl<double>("double");
  finish("shfl_up_down_xor_idx_all_widths", t0);
}

// ---- votes ----
static void test_votes() {
  double t0 = now_s();
  const int n = 96;
  Buf<unsigned> ballot(N_VOTE_CASES * n), red(8 * n), match(2 * n);
  Buf<int> all(N_VOTE_CASES * n), any(N_VOTE_CASES * n), bcount(N_VOTE_CASES * n), band(N_VOTE_CASES * n),
      bor(N_VOTE_CASES * n);
  LAUNCH(k_vote, 1, n, 0, ballot.p, all.p, any.p, bcount.p, band.p, bor.p, red.p, match.p);
  SYNC("k_vote");
  for (int c = 0; c < N_VOTE_CASES; ++c) {
    int cnt = 0;
    for (int g = 0; g < n; ++g) cnt += vote_pred(c, g) != 0;
    for (int g = 0; g < n; ++g) {
      const int base = g - g % 32;
      unsigned m = 0;
      for (int l = 0; l < 32; ++l)
        if (vote_pred(c, base + l)) m |= 1u << l;
      EXPECT(ballot[c * n + g] == m, "ballot case %d thread %d: 0x%08x want 0x%08x", c, g, ballot[c * n + g], m);
      EXPECT(all[c * n + g] == (m == 0xffffffffu ? 1 : 0), "all case %d thread %d: %d", c, g, all[c * n + g]);
      EXPECT(any[c * n + g] == (m != 0 ? 1 : 0), "any case %d thread %d: %d", c, g, any[c * n + g]);
      EXPECT(bcount[c * n + g] == cnt, "syncthreads_count case %d thread %d: %d want %d", c, g, bcount[c * n + g], cnt);
      EXPECT(band[c * n + g] == (cnt == n ? 1 : 0), "syncthreads_and case %d thread %d", c, g);
      EXPECT(bor[c * n + g] == (cnt > 0 ? 1 : 0), "syncthreads_or case %d thread %d", c, g);
    }
  }
  for (int g = 0; g < n; ++g) {
    const int base = g - g % 32, lane = g % 32;
    unsigned add = 0, mn = ~0u, mx = 0, an = ~0u, x = 0;
    int smn = 0x7fffffff, smx = -0x7fffffff - 1;
    for (int l = 0; l < 32; ++l) {
      const unsigned v = 7u * unsigned(base + l) + 3u;
      const int sv = l % 2 ? -int(v) : int(v);
      add += v, mn = v < mn ? v : mn, mx = v > mx ? v : mx, an &= v | 0x100u, x ^= v;
      smn = sv < smn ? sv : smn, smx = sv > smx ? sv : smx;
    }
    EXPECT(red[0 * n + g] == add, "reduce_add thread %d", g);
    EXPECT(red[1 * n + g] == mn, "reduce_min(unsigned) thread %d", g);
    EXPECT(red[2 * n + g] == mx, "reduce_max(unsigned) thread %d", g);
    EXPECT(int(red[3 * n + g]) == smn, "reduce_min(int) thread %d: %d want %d", g, int(red[3 * n + g]), smn);
    EXPECT(int(red[4 * n + g]) == smx, "reduce_max(int) thread %d", g);
    EXPECT(red[5 * n + g] == an, "reduce_and thread %d", g);
    EXPECT(red[6 * n + g] == 0xffffffffu, "reduce_or thread %d", g);
    EXPECT(red[7 * n + g] == x, "reduce_xor thread %d", g);
    unsigned m4 = 0, m8 = 0;
    for (int l = 0; l < 32; ++l) {
      if (l % 4 == lane % 4) m4 |= 1u << l;
      if (l / 8 == lane / 8) m8 |= 1u << l;
    }
    EXPECT(match[g] == m4, "match_any(int) thread %d: 0x%08x want 0x%08x", g, match[g], m4);
    EXPECT(match[n + g] == m8, "match_any(u64) thread %d: 0x%08x want 0x%08x", g, match[n + g], m8);
  }
  finish("ballot_all_any_syncthreads_count_reduce_match", t0);
}

// ---- atomics ----
static void test_atomics() {
  double t0 = now_s();
  const int blocks = g_quick ? 3 : 6, threads = 128, n = blocks * threads;
  Buf<AtomicOut> o(1);
  AtomicOut& a = o[0];
  a.max_i = -1000000;
  a.min_i = 1000000;
  a.min_u = ~0u;
  a.max_ll = -(1ll << 62);
  a.min_ll = 1ll << 62;
  a.min_ull = ~0ull;
  a.cas_chain = 1;
  a.cas_ull = 7;
  a.dec = 0;
  a.and_u = 0xffffffffu;
  a.sub_i = 0;
  LAUNCH(k_atomics, blocks, threads, 0, o.p);
  SYNC("k_atomics");
  int kmax = -1000000, kmin = 1000000;
  long long lmax = -(1ll << 62), lmin = 1ll << 62;
  unsigned or_u = 0, xor_u = 0;
  unsigned long long or_ull = 0;
  unsigned chain = 1;
  unsigned dec = 0;
  int hist[17] = {0};
  for (int g = 0; g < n; ++g) {
    const int k = atomic_key(g);
    kmax = k > kmax ? k : kmax, kmin = k < kmin ? k : kmin;
    const long long kk = static_cast<long long>(k) * (1ll << 35);
    lmax = kk > lmax ? kk : lmax, lmin = kk < lmin ? kk : lmin;
    or_u |= 1u << (g % 29);
    xor_u ^= 1u << (g % 32);
    or_ull |= 1ull << (g % 64);
    chain = chain * 3u + 1u;
    dec = (dec == 0 || dec > 1000u) ? 1000u : dec - 1;
    hist[g % 17]++;
  }
  EXPECT(a.add_i == n, "atomicAdd(int) %d", a.add_i);
  EXPECT(a.add_u == 2u * n, "atomicAdd(unsigned) %u", a.add_u);
  EXPECT(a.add_ull == static_cast<unsigned long long>(n) << 33, "atomicAdd(ull) %llu", a.add_ull);
  EXPECT(a.add_f == 0.5f * n, "atomicAdd(float) %g", double(a.add_f));
  EXPECT(a.add_d == 0.25 * n, "atomicAdd(double) %g", a.add_d);
  EXPECT(a.max_i == kmax && a.min_i == kmin, "atomicMax/Min(int) %d %d want %d %d", a.max_i, a.min_i, kmax, kmin);
  EXPECT(a.max_u == 3u * (n - 1) && a.min_u == 10u, "atomicMax/Min(unsigned) %u %u", a.max_u, a.min_u);
  EXPECT(a.max_ll == lmax && a.min_ll == lmin, "atomicMax/Min(long long)");
  EXPECT(a.max_ull == static_cast<unsigned long long>(n - 1) << 40 && a.min_ull == 5ull, "atomicMax/Min(ull)");
  EXPECT(a.cas_chain == chain, "atomicCAS chain %u want %u", a.cas_chain, chain);
  EXPECT(a.cas_ull == 7ull + static_cast<unsigned long long>(n) * ((1ull << 34) + 1), "atomicCAS(ull) chain");
  EXPECT(a.exch >= 1 && a.exch <= n, "atomicExch left %d", a.exch);
  EXPECT(a.inc == unsigned(n % 100), "atomicInc wrap: %u want %u", a.inc, unsigned(n % 100));
  EXPECT(a.dec == dec, "atomicDec wrap: %u want %u", a.dec, dec);
  EXPECT(a.and_u == 0u, "atomicAnd 0x%08x", a.and_u);
  EXPECT(a.or_u == or_u && a.xor_u == xor_u && a.or_ull == or_ull, "atomicOr/Xor");
  EXPECT(a.sub_i == -3 * n, "atomicSub %d", a.sub_i);
  for (int k = 0; k < 17; ++k) EXPECT(a.hist[k] == hist[k], "histogram bin %d: %d want %d", k, a.hist[k], hist[k]);
  finish("atomics_many_threads_and_blocks", t0);
}

// ---- dynamic shared memory ----
static void test_dynamic_smem() {
  double t0 = now_s();
  {
    const int threads = 128, blocks = 3, n = threads * blocks;
    Buf<float> in(n), out(n);
    Buf<int> idx(n);
    for (int i = 0; i < n; ++i) in[i] = float(i) * 0.5f;
    LAUNCH(k_smem_reverse, blocks, threads, 2 * threads * sizeof(float), in.p, out.p, idx.p);
    SYNC("k_smem_reverse");
    for (int b = 0; b < blocks; ++b)
      for (int t = 0; t < threads; ++t) {
        const int g = b * threads + t, src = b * threads + threads - 1 - t;
        EXPECT(out[g] == in[src] && idx[g] == src, "reverse block %d thread %d", b, t);
      }
  }
  {
    Buf<unsigned> out(3);
    LAUNCH(k_smem_garbage, 2, 64, 64, out.p);
    SYNC("k_smem_garbage");
    EXPECT(out[2] == 0, "dynamic shared memory is not 16-byte aligned (offset %u)", out[2]);
#ifdef DUO_FAST_EMULATE_CUDA
    const int saved = cuda_emu::smem_fill();
    cuda_emu::set_smem_fill(0xFF);
    LAUNCH(k_smem_garbage, 2, 64, 64, out.p);
    EXPECT(out[0] == 0xffffffffu && out[1] == 0xffffffffu, "fill 0xFF not observed: 0x%08x 0x%08x", out[0], out[1]);
    float f;
    std::memcpy(&f, &out[0], 4);
    EXPECT(std::isnan(f), "0xFF garbage is not NaN as a float");
    cuda_emu::set_smem_fill(0x7F);
    LAUNCH(k_smem_garbage, 2, 64, 64, out.p);
    EXPECT(out[0] == 0x7f7f7f7fu, "fill 0x7F not observed: 0x%08x", out[0]);
    cuda_emu::set_smem_fill(saved);
    // The automatic fill differs from zero for every seed's first block.
    LAUNCH(k_smem_garbage, 1, 32, 64, out.p);
    EXPECT(out[0] != 0u, "automatic garbage fill left zeros");
#endif
  }
  {
    // > 48 KiB needs the opt-in attribute, on a GPU and in the emulation.
    Buf<int> out(1);
    const size_t big = 64 * 1024;
    check_cuda(cudaFuncSetAttribute(k_smem_big, cudaFuncAttributeMaxDynamicSharedMemorySize, 0),
               "cudaFuncSetAttribute(0)");  // a previous run in this process may have opted in
    LAUNCH(k_smem_big, 1, 128, big, out.p);
    cudaError_t e = cudaGetLastError();
    EXPECT(e != cudaSuccess, "a 64 KiB launch without cudaFuncSetAttribute succeeded");
    check_cuda(cudaFuncSetAttribute(k_smem_big, cudaFuncAttributeMaxDynamicSharedMemorySize, int(big)),
               "cudaFuncSetAttribute");
    LAUNCH(k_smem_big, 1, 128, big, out.p);
    SYNC("k_smem_big");
    long long acc = 0;
    for (int i = 0; i < int(big / 4); ++i) acc += i;
    EXPECT(out[0] == int(acc % 1000003), "big smem result %d", out[0]);
  }
  finish("dynamic_shared_memory", t0);
}

// ---- early exit ----
static void test_early_exit() {
  double t0 = now_s();
  {
    const int active = 100, blocks = 3;
    Buf<int> in(active * blocks), out(blocks);
    for (int i = 0; i < active * blocks; ++i) in[i] = (i * 13) % 17;
    LAUNCH(k_early_exit_tree, blocks, 128, 0, in.p, out.p, active);
    SYNC("k_early_exit_tree");
    for (int b = 0; b < blocks; ++b) {
      int ref = 0;
      for (int t = 0; t < active; ++t) ref += in[b * active + t];
      EXPECT(out[b] == ref, "tree block %d: %d want %d", b, out[b], ref);
    }
    // A block of 100 threads (a partial last warp) with barriers only: fine.
    Buf<int> out2(blocks);
    LAUNCH(k_early_exit_tree, blocks, active, 0, in.p, out2.p, active);
    SYNC("k_early_exit_tree (100 threads)");
    for (int b = 0; b < blocks; ++b) EXPECT(out2[b] == out[b], "partial-warp block %d: %d", b, out2[b]);
  }
  {
    const int blocks = 2, threads = 128, live = 2;
    Buf<float> in(blocks * threads), out(blocks);
    for (int i = 0; i < blocks * threads; ++i) in[i] = float(i % 9);
    LAUNCH(k_early_exit_warps, blocks, threads, 0, in.p, out.p, live);
    SYNC("k_early_exit_warps");
    for (int b = 0; b < blocks; ++b) {
      double ref = 0;
      for (int t = 0; t < 32 * live; ++t) ref += in[b * threads + t];
      EXPECT(out[b] == float(ref), "warps block %d: %g want %g", b, double(out[b]), ref);
    }
  }
  finish("early_exit_with_syncthreads", t0);
}

// ---- multi-dimensional indexing ----
static void test_multidim() {
  double t0 = now_s();
  {
    const dim3 grid(3, 2, 2), block(8, 4, 2);
    const int nthreads = 64, nblocks = 12;
    Buf<unsigned> out(nthreads * nblocks), ballots(2 * nblocks);
    LAUNCH(k_multidim, grid, block, 0, out.p, ballots.p);
    SYNC("k_multidim");
    for (unsigned bz = 0; bz < 2; ++bz)
      for (unsigned by = 0; by < 2; ++by)
        for (unsigned bx = 0; bx < 3; ++bx)
          for (unsigned tz = 0; tz < 2; ++tz)
            for (unsigned ty = 0; ty < 4; ++ty)
              for (unsigned tx = 0; tx < 8; ++tx) {
                const unsigned blin = bx + 3 * (by + 2 * bz), tlin = tx + 8 * (ty + 4 * tz);
                const unsigned want = tx | (ty << 4) | (tz << 8) | (bx << 12) | (by << 16) | (bz << 20);
                EXPECT(out[blin * 64 + tlin] == want, "block (%u,%u,%u) thread (%u,%u,%u)", bx, by, bz, tx, ty, tz);
              }
    for (int i = 0; i < 2 * nblocks; ++i)
      EXPECT(ballots[i] == 0x0000ff00u, "ballot(threadIdx.y == 1) warp %d: 0x%08x", i, ballots[i]);
  }
  {
    const int rows = 70, cols = 45;
    Buf<float> in(rows * cols), out(rows * cols);
    for (int i = 0; i < rows * cols; ++i) in[i] = float(i);
    LAUNCH(k_transpose, dim3((cols + 31) / 32, (rows + 31) / 32), dim3(32, 8), 0, in.p, out.p, rows, cols);
    SYNC("k_transpose");
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c)
        EXPECT(out[c * rows + r] == in[r * cols + c], "transpose (%d,%d)", r, c);
  }
  finish("multidim_block_and_grid", t0);
}

// ---- launch argument types ----
static void test_launch_args() {
  double t0 = now_s();
  Buf<double> out(32);
  Buf<int> in(10), extra(3);
  for (int i = 0; i < 10; ++i) in[i] = 100 + i;
  extra[1] = 4242;
  Params p{};
  p.a = -7;
  p.b = 2.5f;
  p.c = 1e-300;
  for (int i = 0; i < 5; ++i) p.arr[i] = i * i;
  p.ptr = extra.p;
  p.tag = 'Z';
  const long long n64 = 10;  // converted to the kernel's int parameter
  const int2 i2 = make_int2(-3, 9);
  const float4 f4 = make_float4(1.5f, 2.5f, 3.5f, -4.5f);
  const int* cin = in.p;
  LAUNCH(k_args, 2, 32, 0, p, out.p, cin, n64, 0.125f, -2.75, 0x123456789abcdef0ull, 'q', true, short(-12),
         i2, f4, 4000000000u, -(1ll << 40));
  SYNC("k_args");
  const double want[] = {-7,    2.5,  1e-300, 0,    1,   4,    9,   16,  4242, 'Z', 109, 10, 0.125, -2.75,
                         double(0x12345678u), double(0x9abcdef0u), 'q', 1, -12, -3, 9, 1.5, -4.5, 4000000000.0,
                         -1099511627776.0};
  for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); ++i)
    EXPECT(out[i] == want[i], "argument slot %zu: %.17g want %.17g", i, out[i], want[i]);
  Buf<int> pc(64);
  LAUNCH(k_param_copy, 1, 64, 0, 1000, pc.p);
  SYNC("k_param_copy");
  for (int t = 0; t < 64; ++t) EXPECT(pc[t] == 1000 + t, "parameter copy thread %d: %d", t, pc[t]);
  finish("launch_argument_types", t0);
}

// ---- intrinsics ----
static unsigned ref_brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
static int ref_clz64(unsigned long long x) {
  int c = 0;
  for (int i = 63; i >= 0 && !((x >> i) & 1ull); --i) ++c;
  return c;
}

static void test_intrinsics() {
  double t0 = now_s();
  const int n = 512;
  Buf<unsigned> a(n), b(n), o32(12 * n);
  Buf<unsigned long long> A(n), B(n), o64(5 * n);
  Buf<float> f(n), of(8 * n);
  for (int i = 0; i < n; ++i) {
    a[i] = unsigned(rnd64());
    b[i] = unsigned(rnd64());
    A[i] = rnd64();
    B[i] = rnd64();
    f[i] = float(int(rnd64() % 2001) - 1000) / 250.0f;
  }
  a[0] = 0, a[1] = 0xffffffffu, b[1] = 0xffffffffu, A[1] = ~0ull, B[1] = ~0ull, a[2] = 1u << 31, A[2] = 0;
  f[0] = 0.5f, f[1] = 1.25f, f[2] = -0.25f, f[3] = 0.05f, f[4] = 0.15f;  // __float2int_rn ties: 0.5, 1.5
  LAUNCH(k_intrinsics, (n + 127) / 128, 128, 0, a.p, b.p, A.p, B.p, f.p, o32.p, o64.p, of.p, n);
  SYNC("k_intrinsics");
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    const unsigned x = a[i], y = b[i];
    const unsigned long long X = A[i], Y = B[i];
    const unsigned* r = &o32[12 * i];
    unsigned want[12];
    want[0] = unsigned((static_cast<unsigned long long>(x) * y) >> 32);
    want[1] = unsigned(static_cast<unsigned long long>(static_cast<long long>(int(x)) * int(y)) >> 32);
    int clz = 0;
    while (clz < 32 && !((x >> (31 - clz)) & 1u)) ++clz;
    want[2] = unsigned(clz);
    int ffs = 0;
    for (int k = 0; k < 32; ++k)
      if ((x >> k) & 1u) {
        ffs = k + 1;
        break;
      }
    want[3] = unsigned(ffs);
    int pc = 0;
    for (int k = 0; k < 32; ++k) pc += (x >> k) & 1u;
    want[4] = unsigned(pc);
    want[5] = ref_brev(x);
    int pc64 = 0;
    for (int k = 0; k < 64; ++k) pc64 += int((X >> k) & 1ull);
    want[6] = unsigned(pc64);
    {
      const unsigned char bytes[8] = {static_cast<unsigned char>(x), static_cast<unsigned char>(x >> 8),
                                      static_cast<unsigned char>(x >> 16), static_cast<unsigned char>(x >> 24),
                                      static_cast<unsigned char>(y), static_cast<unsigned char>(y >> 8),
                                      static_cast<unsigned char>(y >> 16), static_cast<unsigned char>(y >> 24)};
      const unsigned sel = 0x5173u;
      want[7] = 0;
      for (int k = 0; k < 4; ++k) want[7] |= unsigned(bytes[(sel >> (4 * k)) & 7]) << (8 * k);
    }
    const unsigned sh = unsigned(i % 40) & 31u;
    const unsigned long long cat = (static_cast<unsigned long long>(y) << 32) | x;
    want[8] = unsigned((cat << sh) >> 32);
    want[9] = unsigned(cat >> sh);
    want[10] = x;
    want[11] = y;
    for (int k = 0; k < 12; ++k)
      if (r[k] != want[k] && bad++ < 6) std::printf("    int32 op %d input %d: 0x%08x want 0x%08x\n", k, i, r[k], want[k]);
    const unsigned long long* R = &o64[5 * i];
    unsigned long long W[5];
    W[0] = static_cast<unsigned long long>((static_cast<unsigned __int128>(X) * Y) >> 64);
    W[1] = static_cast<unsigned long long>(
        static_cast<__int128>(static_cast<__int128>(static_cast<long long>(X)) * static_cast<long long>(Y)) >> 64);
    W[2] = (static_cast<unsigned long long>(ref_brev(unsigned(X))) << 32) | ref_brev(unsigned(X >> 32));
    W[3] = Y;
    W[4] = static_cast<unsigned long long>(ref_clz64(X >> (i % 64)));
    for (int k = 0; k < 5; ++k)
      if (R[k] != W[k] && bad++ < 6) std::printf("    int64 op %d input %d: 0x%016llx want 0x%016llx\n", k, i, R[k], W[k]);
    const double v = f[i];
    const float* F = &of[8 * i];
    const double wf[8] = {std::exp(v), std::log(std::fabs(v) + 0.5), std::pow(std::fabs(v) + 0.5, 1.7), v / 3.0,
                          1.0 / std::sqrt(std::fabs(v) + 0.25), v < 0 ? 0.0 : (v > 1 ? 1.0 : v),
                          std::nearbyint(double(f[i] * 10.0f)), v < -1 ? -1.0 : (v > 1 ? 1.0 : v)};
    for (int k = 0; k < 8; ++k) {
      // fast-math intrinsics: a few ulp on a GPU (relative 1e-5, or 1e-6 absolute near 0)
      const double tol = k == 6 ? 0.0 : 1e-5 * std::fabs(wf[k]) + 1e-6;
      if (!(std::fabs(F[k] - wf[k]) <= tol) && bad++ < 6)
        std::printf("    float op %d input %d (x=%g): %.9g want %.9g\n", k, i, v, double(F[k]), wf[k]);
    }
  }
  EXPECT(bad == 0, "%d intrinsic results differ from the host reference", bad);
  EXPECT(o32[12 * 2 + 2] == 0 && o32[12 * 0 + 2] == 32 && o32[12 * 0 + 3] == 0, "__clz/__ffs edge cases");
  EXPECT(of[8 * 0 + 6] == 5.0f && of[8 * 2 + 6] == -2.0f, "__float2int_rn rounds half to even: %g %g",
         double(of[6]), double(of[8 * 2 + 6]));
  finish("integer_and_float_intrinsics", t0);
}

// ===========================================================================
// Emulation-only tests
// ===========================================================================
#ifdef DUO_FAST_EMULATE_CUDA
static void test_planted_bugs() {
  double t0 = now_s();
  const cuda_emu::Mode saved_mode = cuda_emu::mode();
  const std::uint64_t saved_seed = cuda_emu::seed();
  cuda_emu::set_mode(cuda_emu::Mode::fiber);
  if (cuda_emu::mode() != cuda_emu::Mode::fiber) {
    std::printf("[SKIP] planted_bugs_caught_by_seeds (fiber mode unavailable in this build)\n");
    cuda_emu::set_mode(saved_mode);
    return;
  }
  // (1) Missing trailing __syncthreads before shared scratch is reused.
  int exposed = 0;
  std::string which;
  for (std::uint64_t s = 1; s <= 5; ++s) {
    cuda_emu::set_seed(s);
    bool wrong = false;
    run_two_sums(2, 256, true, &wrong);
    if (wrong) ++exposed, which += " " + std::to_string(s);
  }
  cuda_emu::set_seed(0);
  bool wrong0 = false;
  run_two_sums(2, 256, true, &wrong0);
  std::printf("    missing trailing __syncthreads: wrong with seeds {%s } of 1..5; seed 0 (natural order) %s\n",
              which.c_str(), wrong0 ? "wrong" : "right");
  EXPECT(exposed >= 1, "no seed in 1..5 exposed the missing trailing __syncthreads");
  // The correct kernel is right for every seed.
  for (std::uint64_t s = 0; s <= 5; ++s) {
    cuda_emu::set_seed(s);
    bool wrong = false;
    run_two_sums(2, 256, false, &wrong);
    EXPECT(!wrong, "correct two-sum kernel wrong with seed %llu", static_cast<unsigned long long>(s));
  }
  // (2) Missing __syncthreads between writing shared memory and reading a neighbour's value.
  int exposed2 = 0;
  for (std::uint64_t s = 1; s <= 5; ++s) {
    cuda_emu::set_seed(s);
    for (int buggy = 0; buggy < 2; ++buggy) {
      const int threads = 128, blocks = 2;
      Buf<int> out(threads * blocks);
      LAUNCH(k_neighbour, blocks, threads, threads * sizeof(int), out.p, int(s) * 7 + 1, buggy);
      bool bad = false;
      for (int b = 0; b < blocks; ++b)
        for (int t = 0; t < threads; ++t)
          if (out[b * threads + t] != int(s) * 7 + 1 + 1000 * ((t + 32) % threads)) bad = true;
      if (buggy) exposed2 += bad;
      else EXPECT(!bad, "correct neighbour kernel wrong with seed %llu", static_cast<unsigned long long>(s));
    }
  }
  std::printf("    missing __syncthreads before a neighbour read: wrong with %d of seeds 1..5\n", exposed2);
  EXPECT(exposed2 >= 1, "no seed in 1..5 exposed the missing __syncthreads");
  // (3) An index in static __shared__ memory read before any write: static shared
  // memory is poisoned at every block start (for every seed, 0 included), so the
  // index is garbage, not the 0 of a fresh static or the previous block's value.
  {
    const int n = 8, blocks = 3;
    Buf<float> score(n * blocks);
    Buf<int> out(blocks);
    for (int i = 0; i < n * blocks; ++i) score[i] = NAN;  // no score beats -inf
    score[n + 5] = 1.0f;  // block 1 finds index 5: block 2 must not inherit it
    for (std::uint64_t s = 0; s <= 5; ++s) {
      cuda_emu::set_seed(s);
      LAUNCH(k_planted_uninit_static_smem, blocks, 32, 0, score.p, n, out.p, 0);
      const bool caught = out[0] < 0 || out[0] >= n || out[2] < 0 || out[2] >= n;
      EXPECT(caught, "uninitialised static __shared__ index looked valid with seed %llu: %d %d",
             static_cast<unsigned long long>(s), out[0], out[2]);
      LAUNCH(k_planted_uninit_static_smem, blocks, 32, 0, score.p, n, out.p, 1);
      EXPECT(out[0] == 0 && out[1] == 5 && out[2] == 0, "initialised index wrong with seed %llu",
             static_cast<unsigned long long>(s));
    }
  }
  // (4) An order-dependent atomic float sum: atomics run in a seeded random order,
  // so different seeds give different bits (thread-after-thread it always gave 0).
  {
    const int blocks = 2, threads = 64;
    Buf<float> out(blocks);
    std::vector<float> seen;
    for (std::uint64_t s = 1; s <= 5; ++s) {
      cuda_emu::set_seed(s);
      for (int fixed = 0; fixed < 2; ++fixed) {
        out[0] = out[1] = 0.0f;
        LAUNCH(k_planted_atomic_order, blocks, threads, 0, out.p, fixed);
        if (fixed) EXPECT(out[0] == 0.0f && out[1] == 0.0f, "fixed-order sum %g %g with seed %llu", out[0], out[1],
                          static_cast<unsigned long long>(s));
        else seen.push_back(out[0]), seen.push_back(out[1]);
      }
    }
    std::sort(seen.begin(), seen.end());
    const long distinct = std::unique(seen.begin(), seen.end()) - seen.begin();
    std::printf("    order-dependent atomic sum: %ld distinct results over seeds 1..5 (2 blocks each)\n", distinct);
    EXPECT(distinct >= 2, "seeded atomic order did not change an order-dependent float sum");
  }
  cuda_emu::set_seed(saved_seed);
  cuda_emu::set_mode(saved_mode);
  finish("planted_bugs_caught_by_seeds", t0);
}

// Seeded start order: in fiber mode a nonzero seed starts each warp's lanes in
// a shuffled order at every launch (reproducible for the seed), seed 0 in lane
// order. (A plain counter is race-free here: fibers share one OS thread.)
__global__ void k_start_order(int* order, int* counter) {
  order[blockIdx.x * blockDim.x + threadIdx.x] = (*counter)++;
}

static void test_start_order() {
  double t0 = now_s();
  const cuda_emu::Mode saved_mode = cuda_emu::mode();
  const std::uint64_t saved_seed = cuda_emu::seed();
  cuda_emu::set_mode(cuda_emu::Mode::fiber);
  if (cuda_emu::mode() != cuda_emu::Mode::fiber) {
    std::printf("[SKIP] start_order (fiber mode unavailable in this build)\n");
    cuda_emu::set_mode(saved_mode);
    return;
  }
  const int threads = 64, blocks = 2;
  Buf<int> order(threads * blocks), again(threads * blocks), counter(1);
  auto run = [&](Buf<int>& o, std::uint64_t seed) {
    cuda_emu::set_seed(seed);
    counter[0] = 0;
    LAUNCH(k_start_order, blocks, threads, 0, o.p, counter.p);
  };
  run(order, 0);
  for (int i = 0; i < threads * blocks; ++i) EXPECT(order[i] == i, "seed 0: thread %d started %d-th", i, order[i]);
  std::vector<std::vector<int>> lane_orders;
  for (std::uint64_t s = 1; s <= 4; ++s) {
    run(order, s);
    run(again, s);
    for (int b = 0; b < blocks; ++b)
      for (int w = 0; w < threads / 32; ++w) {
        std::vector<int> lanes(32);
        for (int l = 0; l < 32; ++l) lanes[l] = l;
        const int* o = order.p + b * threads + w * 32;
        std::sort(lanes.begin(), lanes.end(), [&](int a, int c) { return o[a] < o[c]; });
        bool identity = true;
        for (int l = 0; l < 32; ++l) identity = identity && lanes[l] == l;
        EXPECT(!identity, "seed %llu block %d warp %d started in lane order", static_cast<unsigned long long>(s), b, w);
        lane_orders.push_back(lanes);
      }
    for (int i = 0; i < threads * blocks; ++i) EXPECT(order[i] == again[i], "seed %llu: start order not reproducible", static_cast<unsigned long long>(s));
  }
  std::sort(lane_orders.begin(), lane_orders.end());
  EXPECT(std::unique(lane_orders.begin(), lane_orders.end()) - lane_orders.begin() >= 8, "lane orders repeat across warps and seeds");
  cuda_emu::set_seed(saved_seed);
  cuda_emu::set_mode(saved_mode);
  finish("start_order", t0);
}

static void test_mode_api() {
  double t0 = now_s();
  const cuda_emu::Mode saved = cuda_emu::mode();
  for (cuda_emu::Mode m : {cuda_emu::Mode::thread, cuda_emu::Mode::fiber}) {
    cuda_emu::set_mode(m);
    bool wrong = false;
    run_two_sums(2, 64, false, &wrong);
    EXPECT(!wrong, "two sums wrong in mode %d", int(m));
  }
  cuda_emu::set_mode(cuda_emu::Mode::thread);
  EXPECT(cuda_emu::mode() == cuda_emu::Mode::thread, "set_mode(thread) not reflected by mode()");
  cuda_emu::set_mode(saved);
  EXPECT(cuda_emu::mode() == saved, "mode not restored");
  // Invalid configurations set the last error instead of running.
  Buf<float> out(64);
  LAUNCH(k_fatal_trap, 1, 2048, 0, out.p);
  EXPECT(cudaGetLastError() == cudaErrorInvalidConfiguration, "block of 2048 threads accepted");
  EXPECT(cudaGetLastError() == cudaSuccess, "cudaGetLastError did not reset");
  std::printf("    mode %s, seed %llu, smem fill %d\n", saved == cuda_emu::Mode::fiber ? "fiber" : "thread",
              static_cast<unsigned long long>(cuda_emu::seed()), cuda_emu::smem_fill());
  finish("mode_seed_api_and_launch_errors", t0);
}

static int run_fatal(const std::string& which) {
  Buf<float> out(64);
  std::printf("running fatal case %s in %s mode\n", which.c_str(),
              cuda_emu::mode() == cuda_emu::Mode::fiber ? "fiber" : "thread");
  std::fflush(stdout);
  if (which == "deadlock") LAUNCH(k_fatal_deadlock, 1, 32, 0, out.p);
  else if (which == "bad_mask") LAUNCH(k_fatal_bad_mask, 1, 32, 0, out.p);
  else if (which == "exited_lane") LAUNCH(k_fatal_exited_lane, 1, 32, 0, out.p);
  else if (which == "partial_warp") LAUNCH(k_fatal_partial_warp, 1, 48, 0, out.p);
  else if (which == "divergent_sync") LAUNCH(k_fatal_divergent_sync, 1, 32, 0, out.p);
  else if (which == "divergent_warp_op") LAUNCH(k_fatal_divergent_warp_op, 1, 64, 0, out.p);
  else if (which == "trap") LAUNCH(k_fatal_trap, 1, 32, 0, out.p);
  else if (which == "outside_kernel") __syncthreads();
  else {
    std::printf("unknown fatal case %s\n", which.c_str());
    return 2;
  }
  std::printf("fatal case %s did NOT abort\n", which.c_str());
  return 3;
}
#endif

// Runs a planted bug; returns 0 (the sanitizer, if any, reports and aborts).
static int run_planted(const std::string& which) {
  const int n = 64;
  Buf<int> in(n), out(n);
  Buf<long long> out64(2 * n);
  std::printf("running planted bug %s\n", which.c_str());
  std::fflush(stdout);
  if (which == "oob_smem") LAUNCH(k_planted_oob_smem, 1, n, n * sizeof(int), out.p);
  else if (which == "oob_global") LAUNCH(k_planted_oob_global, 2, n, 0, in.p, out.p, n);
  else if (which == "oob_stack") LAUNCH(k_planted_oob_stack, 1, n, 0, out.p, 7);
  else if (which == "race_missing_sync") LAUNCH(k_planted_race, 2, n, n * sizeof(long long), out64.p);
  else if (which == "race_trailing_sync") {  // shared scratch reused without the trailing barrier
    Buf<float> x(2 * 128), sums(2 * 2 * 128);
    LAUNCH(k_two_sums, 2, 128, 0, x.p, sums.p, 1);
  }
  else {
    std::printf("unknown planted bug %s\n", which.c_str());
    return 2;
  }
  SYNC(which.c_str());
  std::printf("planted bug %s ran to completion\n", which.c_str());
  return 0;
}

static void bench() {
  const int threads = 256;
  const int blocks = g_quick ? 20 : 100;
  Buf<float> in(blocks * threads), out(blocks);
  for (int i = 0; i < blocks * threads; ++i) in[i] = float(i % 5);
#ifdef DUO_FAST_EMULATE_CUDA
  const cuda_emu::Mode saved = cuda_emu::mode();
  for (cuda_emu::Mode m : {cuda_emu::Mode::fiber, cuda_emu::Mode::thread}) {
    cuda_emu::set_mode(m);
    const int nb = m == cuda_emu::Mode::fiber ? blocks : (blocks < 10 ? blocks : 10);
    LAUNCH(k_bench, nb, threads, 0, in.p, out.p);  // warm up (stacks, pages)
    double dt = 1e30;
    for (int rep = 0; rep < 3; ++rep) {  // best of 3: the machine may be busy
      const double t0 = now_s();
      LAUNCH(k_bench, nb, threads, 0, in.p, out.p);
      dt = std::min(dt, now_s() - t0);
    }
    std::printf("BENCH %s mode: %d blocks x %d threads (4 __syncthreads + 5 shuffles each): %.1f us per block\n",
                cuda_emu::mode() == cuda_emu::Mode::fiber ? "fiber" : "thread", nb, threads, dt / nb * 1e6);
  }
  cuda_emu::set_mode(saved);
#else
  LAUNCH(k_bench, blocks, threads, 0, in.p, out.p);
  SYNC("k_bench");
#endif
}

#ifdef EMU_TEST_LIBRARY
extern "C" int emu_test_main(int argc, char** argv)
#else
int main(int argc, char** argv)
#endif
{
  g_failures = 0;
  g_checks_failed_in_test = 0;
  g_quick = false;
  std::string only;
  bool do_bench = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--only=", 0) == 0) only = a.substr(7);
    else if (a == "--bench") do_bench = true;
    else if (a == "--quick") g_quick = true;
    else if (a.rfind("--planted=", 0) == 0) return run_planted(a.substr(10));
#ifdef DUO_FAST_EMULATE_CUDA
    else if (a.rfind("--fatal=", 0) == 0) return run_fatal(a.substr(8));
#endif
    else {
      std::printf("unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (do_bench) {
    bench();
    return 0;
  }
  struct Test {
    const char* name;
    void (*fn)();
  };
  const Test tests[] = {
      {"block_reduce", test_block_reduce},
      {"broadcast", test_block_reduce_broadcast},
      {"shuffles", test_shuffles},
      {"votes", test_votes},
      {"atomics", test_atomics},
      {"dynamic_smem", test_dynamic_smem},
      {"early_exit", test_early_exit},
      {"multidim", test_multidim},
      {"launch_args", test_launch_args},
      {"intrinsics", test_intrinsics},
#ifdef DUO_FAST_EMULATE_CUDA
      {"planted_bugs", test_planted_bugs},
      {"start_order", test_start_order},
      {"mode_api", test_mode_api},
#endif
  };
  const double t0 = now_s();
  for (const Test& t : tests)
    if (only.empty() || only == t.name) t.fn();
  std::printf(g_failures ? "FAILURES: %d" : "ALL PASSED", g_failures);
  std::printf(" (%.2f s)\n", now_s() - t0);
  std::fflush(stdout);
  return g_failures ? 1 : 0;
}
