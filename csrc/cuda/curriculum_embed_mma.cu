// curriculum_embed (docs/math.md §2c, §2d; curriculum_embed.h) on tensor cores (sm_80+): the
// GEMMs h = P E ([N,K] x [K,d]) and dE = P^T dh ([K,N] x [N,d]) with bf16
// operands and float32 accumulation (mma.sync m16n8k16, ldmatrix; wrappers in
// mma_sm80.cuh), tiled like flash-attention 2. The portable float kernels of
// curriculum.cu stay for sm < 80 (and on request, DUO_FAST_EMBED_PORTABLE=1).
//
// Forward, a block = 64 tokens x a slice of C = WC CW columns of d (CW = 1 or
// 2 column warps of WC = 128 or 192 columns; C = 384 for d = 768), 4 CW warps;
// the block walks K in tiles of 64 entries:
//   1. scores in registers: thread (row r = tid / TPR, segment s = tid % TPR)
//      draws the 64 / TPR entries s*64/TPR .. of token t0 + r from Philox (the
//      same counters as curriculum.cu: block j / 4 of stream t), y = w / tau
//      in double; the row's TPR threads (consecutive lanes) reduce the tile's
//      max / argmax by shuffles; online softmax: m_new = max(m, tile max),
//      P = exp(y - m_new) (float), l = l exp(m - m_new) + sum P, per thread
//      (the row's threads hold partial l of the same scale; summed at the end).
//   2. P (bf16) and the rescale factor exp(m - m_new) go to shared memory, the
//      E tile [64 x C] (bf16) is staged next to it.
//   3. warp (row group wr, column group wc) rescales its accumulators
//      O[16 x WC] (flash-attention 2: O *= exp(m_old - m_new)), loads the A
//      fragments of P with ldmatrix.x4 and the B fragments of E with
//      ldmatrix.x4.trans, and runs 4 x WC / 8 mma per tile.
//   h = O / l at the end; z = the running argmax; lse = m + log l (double).
// The P tile goes through shared memory (not straight from the score registers
// into A fragments as in flash-attention 2) because a row's scores are needed
// by the CW column warps of its row group, and the Philox draws, not the
// tensor cores, are the expensive part (below): each score is drawn once per
// block, by all 4 CW warps together, not once per warp that uses it.
//
// Cost per (token, entry) and column slice: one Philox block per 4 entries
// (10 rounds, ~2 mul.wide each) plus Box-Muller (log, sqrt, sin/cos
// polynomials) plus a double FMA and an expf: ~60 instructions per entry,
// against 2 C flops of mma per entry. On an H200 (~30 T fp32-pipe
// instructions/s, i.e. ~60 TFLOP/s of FMA; ~790 TFLOP/s bf16 mma) the draws
// cost (60 / 30e12) / (2 C / 790e12) ~ 790 / C times the mma time: C = 384 ->
// ~2x, so the draws, not the GEMM, bound this op (its predicted times per size
// are the cost model's, duo_fast/bench/cost_model.py; a GPU run decides the next step).
// Recomputing the scores per column slice was chosen over a two-pass design
// (pass 1 row stats, pass 2 GEMM with known lse: every score drawn at least
// twice, and still once per slice in pass 2) and over a whole-d block (64 x 768
// float accumulators do not fit the register file; C = 384 per block already
// takes 212 registers per thread, 96 of them accumulators). The E tile is read from global
// memory (L2) once per 64 tokens: N / 64 * K d * 2 bytes (overlapped with the
// draws), so the operands are bf16 copies
// made once by the caller (E: K d * 2 bytes, no copy for a bf16 embedding; dh:
// N d * 2 bytes), which halves that traffic against staging float32.
//
// Backward dE = P^T dh: a block = 64 ids x C columns, walking the tokens in
// tiles of 64: the scores are regenerated (the same draws) with the saved lse,
// P = exp(y - lse) (float, no online rescale), stored as bf16 P[token][id];
// the A fragments of P^T come from ldmatrix.x4.trans of that tile, the B
// fragments of dh (bf16, staged [token][col]) from ldmatrix.x4.trans. One
// writer per dE element (deterministic; no atomics).
//
// Occupancy (nvcc 13, -Xptxas -v): 154-214 registers per thread, no spills;
// forcing 2 blocks of 256 threads (or 3 of 128) per SM with __launch_bounds__
// spills 100-180 bytes (measured with WC = 128), so an SM holds 8 warps (1
// block of CW = 2, 2 of CW = 1).
// Whether more warps pay (e.g. scores kept as float eps, 16 fewer registers)
// is for a run on the GPU.
//
// Accuracy: bf16 operands (8 significant bits, relative rounding <= 2^-8), float
// accumulation. tests/test_curriculum_mma.py derives the tolerance.
#include "duo_fast/cuda_compat.h"
#include "duo_fast/curriculum_embed.h"
#include "duo_fast/device_check.h"
#include "duo_fast/reduce.h"
#include "duo_fast/curriculum_topk.h"
#include "curriculum_embed_mma.h"
#include "mma_sm80.cuh"
#include "mma_tiles.cuh"

namespace duo_fast {
namespace cuda {
namespace {

// The tile shapes, staging, mma steps and launch of mma_tiles.cuh.
using namespace tiles;  // NOLINT(build/namespaces): the shared tile machinery of this file's kernels

struct Level {
  double a, s, inv_tau;  // a~, s~ (topk::scales), 1 / tau
  int64_t x;             // the clean id; -1 for a row past the last token
};

DUO_DEVICE Level level_of(const int64_t* x0, const double* gamma, const double* inv_tau, int64_t n, int64_t t) {
  if (t >= n) return {0.0, 0.0, 0.0, -1};
  const topk::Scales sc = topk::scales(gamma[t]);
  return {sc.a, sc.s, inv_tau[t], x0[t]};
}

// The kEPT scores y = w / tau of token t at entries j .. j + kEPT - 1 (j a
// multiple of 4): -inf past the vocabulary and for rows past the last token.
template <int EPT>
DUO_DEVICE void scores(const Level& lv, int64_t K, int64_t t, int64_t j, uint64_t seed, uint64_t offset, double* y) {
#pragma unroll
  for (int b = 0; b < EPT / 4; ++b) {
    float eps[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (lv.x >= 0 && j + 4 * b < K) curriculum::noise4(seed, offset, uint64_t(t), (j + 4 * b) / 4, eps);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t jj = j + 4 * b + e;
      y[4 * b + e] = lv.x >= 0 && jj < K ? curriculum::latent(eps[e], jj == lv.x, lv.a, lv.s) * lv.inv_tau : -INFINITY;
    }
  }
}

// (value, index) argmax step: larger value, or the lower index among ties.
DUO_DEVICE void argmax_merge(double& v, int64_t& i, double ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
}

template <int CW, int WC>
__global__ void __launch_bounds__(Shape<CW, WC>::kThreads)
    embed_forward_mma_kernel(const int64_t* __restrict__ x0, const double* __restrict__ gamma,
                             const double* __restrict__ inv_tau, const uint16_t* __restrict__ E, int64_t n, int64_t K,
                             int64_t d, uint64_t seed, uint64_t offset, float* __restrict__ h, int64_t* __restrict__ z,
                             double* __restrict__ lse, uint32_t* checks) {
  using S = Shape<CW, WC>;
  DUO_DYNAMIC_SHARED(unsigned char, smem);  // forward_smem_bytes<CW, WC>()
  uint16_t(*Ps)[kPitchP] = reinterpret_cast<uint16_t(*)[kPitchP]>(smem);  // P tile, [token][entry], bf16
  uint16_t(*Vs)[S::kPitchV] = reinterpret_cast<uint16_t(*)[S::kPitchV]>(smem + kPBytes);  // E tile, [entry][column]
  float* scale_s = reinterpret_cast<float*>(smem + kPBytes + S::kVBytes);  // exp(m_old - m_new) per row
  float* inv_l_s = scale_s + kRows;
  const Roles ro = roles<CW, WC>(d, E);  // mma role: rows 16 wr..; score role: row r, entries seg * kEPT ..
  const int wr = ro.wr, r = ro.r, seg = ro.seg, g = ro.g, q = ro.q, col0 = ro.col0, cols_left = ro.cols_left;
  const int64_t c0 = ro.c0;
  for (int64_t t0 = int64_t(blockIdx.x) * kRows; t0 < n; t0 += int64_t(gridDim.x) * kRows) {
    const int64_t t = t0 + r;
    const Level lv = level_of(x0, gamma, inv_tau, n, t);
    if (blockIdx.y == 0 && seg == 0 && t < n) {  // device-side checks: unspecified h and z
      if (!check::valid_id(x0[t], K)) check::report(checks, check::kX0);
      if (!check::valid_gamma(gamma[t])) check::report(checks, check::kGamma);
      if (!check::valid_inv_tau(inv_tau[t])) check::report(checks, check::kInvTau);
    }
    double m = -INFINITY, l = 0.0, best = -INFINITY;  // l: this thread's part of the row sum
    int64_t arg = 0;                                   // defined even if no score beats -inf (NaN levels)
    float acc[S::kNT][4];
    zero_acc(acc);

    for (int64_t j0 = 0; j0 < K; j0 += kKTile) {
      // 1. scores and the online softmax of row r (its kTPR threads in step)
      const int64_t j = j0 + seg * S::kEPT;
      double y[S::kEPT];
      scores<S::kEPT>(lv, K, t, j, seed, offset, y);
      double mx = -INFINITY;
      int64_t ax = j;
#pragma unroll
      for (int e = 0; e < S::kEPT; ++e)
        if (y[e] > mx) mx = y[e], ax = j + e;  // first index among ties
#pragma unroll
      for (int o = 1; o < S::kTPR; o <<= 1) {
        const double om = __shfl_xor_sync(reduce::kFullMask, mx, o);
        const int64_t oa = __shfl_xor_sync(reduce::kFullMask, ax, o);
        argmax_merge(mx, ax, om, oa);
      }
      const double m_new = mx > m ? mx : m;
      const double sc = m == -INFINITY ? 0.0 : exp(m - m_new);
      double part = 0.0;
#pragma unroll
      for (int e = 0; e < S::kEPT; e += 2) {
        const float p0 = m_new == -INFINITY ? 0.0f : expf(float(y[e] - m_new));  // exp(-inf) = 0
        const float p1 = m_new == -INFINITY ? 0.0f : expf(float(y[e + 1] - m_new));
        part += double(p0) + double(p1);
        *reinterpret_cast<uint32_t*>(&Ps[r][seg * S::kEPT + e]) = mma::pack_bf16x2(p0, p1);
      }
      l = l * sc + part;
      m = m_new;
      if (mx > best) best = mx, arg = ax;  // earlier tiles win ties
      if (seg == 0) scale_s[r] = float(sc);
      // 2. the E tile
      stage_tile<CW, WC>(Vs, E, K, d, j0, c0, ro.vec);
      __syncthreads();
      // 3. O = O * scale + P E on the tensor cores (warps with columns left)
      if (cols_left > 0) {
        const float s0 = scale_s[16 * wr + g], s1 = scale_s[16 * wr + g + 8];
#pragma unroll
        for (int nt = 0; nt < S::kNT; ++nt) acc[nt][0] *= s0, acc[nt][1] *= s0, acc[nt][2] *= s1, acc[nt][3] *= s1;
        mma_rows<CW, WC>(acc, Ps, Vs, ro);
      }
      __syncthreads();  // Ps, Vs, scale_s are rewritten by the next tile
    }
#pragma unroll
    for (int o = 1; o < S::kTPR; o <<= 1) l += __shfl_xor_sync(reduce::kFullMask, l, o);
    if (seg == 0) {
      inv_l_s[r] = float(1.0 / l);
      if (blockIdx.y == 0 && t < n) z[t] = arg, lse[t] = m + log(l);
    }
    __syncthreads();
    if (cols_left > 0)
      store_acc(h, acc, t0 + 16 * wr + g, n, d, c0 + col0, cols_left, q, inv_l_s[16 * wr + g], inv_l_s[16 * wr + g + 8]);
    __syncthreads();  // inv_l_s is rewritten by the next token group
  }
}

template <int CW, int WC>
__global__ void __launch_bounds__(Shape<CW, WC>::kThreads)
    embed_backward_mma_kernel(const uint16_t* __restrict__ dh, const int64_t* __restrict__ x0,
                              const double* __restrict__ gamma, const double* __restrict__ inv_tau,
                              const double* __restrict__ lse, int64_t n, int64_t K, int64_t d, uint64_t seed,
                              uint64_t offset, float* __restrict__ dE) {
  using S = Shape<CW, WC>;
  DUO_DYNAMIC_SHARED(unsigned char, smem);  // backward_smem_bytes<CW, WC>()
  uint16_t(*Ps)[kPitchP] = reinterpret_cast<uint16_t(*)[kPitchP]>(smem);  // P tile, [token][id], bf16
  uint16_t(*Vs)[S::kPitchV] = reinterpret_cast<uint16_t(*)[S::kPitchV]>(smem + kPBytes);  // dh tile, [token][column]
  const Roles ro = roles<CW, WC>(d, dh);  // mma role: ids 16 wr..; score role: token row r, ids seg * kEPT ..
  const int lane = ro.lane, wr = ro.wr, r = ro.r, seg = ro.seg, g = ro.g, q = ro.q, col0 = ro.col0;
  const int cols_left = ro.cols_left;
  const int64_t c0 = ro.c0;
  for (int64_t j0 = int64_t(blockIdx.x) * kRows; j0 < K; j0 += int64_t(gridDim.x) * kRows) {
    float acc[S::kNT][4];
    zero_acc(acc);
    for (int64_t t0 = 0; t0 < n; t0 += kKTile) {
      // 1. P[t][j] = exp(y - lse_t) of token row r, ids j0 + seg * kEPT ..
      const int64_t t = t0 + r;
      const Level lv = level_of(x0, gamma, inv_tau, n, t);
      const double ls = t < n ? lse[t] : 0.0;
      double y[S::kEPT];
      scores<S::kEPT>(lv, K, t, j0 + seg * S::kEPT, seed, offset, y);
#pragma unroll
      for (int e = 0; e < S::kEPT; e += 2)
        *reinterpret_cast<uint32_t*>(&Ps[r][seg * S::kEPT + e]) =
            mma::pack_bf16x2(expf(float(y[e] - ls)), expf(float(y[e + 1] - ls)));  // exp(-inf) = 0
      // 2. the dh tile
      stage_tile<CW, WC>(Vs, dh, n, d, t0, c0, ro.vec);
      __syncthreads();
      // 3. dE += P^T dh
      if (cols_left > 0) {
#pragma unroll
        for (int kk = 0; kk < kKTile / 16; ++kk) {
          // A = P^T (rows = ids, k = tokens) from P[token][id] with x4.trans: matrices
          // (ids 0-7, tok 0-7), (ids 8-15, tok 0-7), (ids 0-7, tok 8-15), (ids 8-15, tok 8-15)
          // live at P rows (tokens) 16 kk + 8 (i >> 1), columns (ids) 16 wr + 8 (i & 1).
          uint32_t a[4];
          mma::ldmatrix<4, true>(a, &Ps[16 * kk + (lane & 7) + 8 * (lane >> 4)][16 * wr + 8 * ((lane >> 3) & 1)]);
          mma_k16<CW, WC>(acc, a, Vs, 16 * kk, col0, cols_left, lane);
        }
      }
      __syncthreads();  // Ps and Vs are rewritten by the next token tile
    }
    if (cols_left > 0) store_acc(dE, acc, j0 + 16 * wr + g, K, d, c0 + col0, cols_left, q, 1.0f, 1.0f);
  }
}

}  // namespace

int curriculum_mma_binary_version() {
#if defined(DUO_FAST_EMULATE_CUDA)
  return 80;
#else
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, embed_forward_mma_kernel<1, 128>) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it
    return 0;
  }
  return attr.binaryVersion;
#endif
}

int curriculum_embed_mma(const int64_t* x0, const double* gamma, const double* inv_tau, const uint16_t* embedding_bf16,
                         int64_t n, int64_t vocab_size, int64_t d, uint64_t seed, uint64_t offset, float* h,
                         int64_t* z, double* lse, uint32_t* checks, void* stream) {
  if (n == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
#define DUO_FWD(CW, WC)                                                                                              \
  launch_shape<CW, WC>(embed_forward_mma_kernel<CW, WC>, forward_smem_bytes<CW, WC>(), n, d, s, x0, gamma, inv_tau, \
                       embedding_bf16, n, vocab_size, d, seed, offset, h, z, lse, checks)
  if (d <= 128) return DUO_FWD(1, 128);
  if (d <= 256) return DUO_FWD(2, 128);
  return DUO_FWD(2, 192);
#undef DUO_FWD
}

int curriculum_embed_backward_mma(const uint16_t* grad_h_bf16, const int64_t* x0, const double* gamma,
                                  const double* inv_tau, const double* lse, int64_t n, int64_t vocab_size, int64_t d,
                                  uint64_t seed, uint64_t offset, float* grad_embedding, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
#define DUO_BWD(CW, WC)                                                                                             \
  launch_shape<CW, WC>(embed_backward_mma_kernel<CW, WC>, backward_smem_bytes<CW, WC>(), vocab_size, d, s,         \
                       grad_h_bf16, x0, gamma, inv_tau, lse, n, vocab_size, d, seed, offset, grad_embedding)
  if (d <= 128) return DUO_BWD(1, 128);
  if (d <= 256) return DUO_BWD(2, 128);
  return DUO_BWD(2, 192);
#undef DUO_BWD
}

}  // namespace cuda
}  // namespace duo_fast
