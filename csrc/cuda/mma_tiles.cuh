// Tile machinery of the tensor-core kernels that multiply a [rows, K] matrix P
// of weights computed on the fly by a [K, d] bf16 matrix (sm_80+; mma.sync
// m16n8k16 through mma_sm80.cuh): curriculum_embed (curriculum_embed_mma.cu; P the
// curriculum's softmax of generated noise) and softmax_embed
// (softmax_embed.cu; P the softmax of the logits). A block holds 64 rows of P
// and a slice of C = WC CW columns of d (4 row warps x CW column warps) and
// walks K in tiles of 64: the block writes the P tile (bf16) into shared
// memory, stages the [64 x C] tile of the right-hand matrix next to it
// (stage_tile), and each warp runs mma_k16 over its 16 rows x WC columns;
// store_acc writes the accumulators. Device code; also runs under the CPU
// emulation (mma_sm80.cuh emulates the instructions).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "duo_fast/cuda_compat.h"
#include "mma_sm80.cuh"

namespace duo_fast {
namespace cuda {
namespace tiles {

constexpr int kRows = 64;             // tokens (forward) / ids (backward) per block
constexpr int kKTile = 64;            // entries (forward) / tokens (backward) per k-tile
constexpr int kPitchP = kKTile + 8;   // bf16 per row of the P tile (+16 bytes: the 8 rows of an
                                      // ldmatrix fall on different banks)

// CW column warps of WC columns each (WC / 8 n-tiles of 8): (1, 128) for d <= 128,
// (2, 128) for d <= 256, else (2, 192): d = 768 in two slices of 384 (the draws
// are repeated per slice, so fewer, wider slices; 96 accumulators per thread).
template <int CW, int WC>
struct Shape {
  static constexpr int kNT = WC / 8;                 // n-tiles per warp
  static constexpr int kThreads = 128 * CW;          // 4 row warps x CW column warps
  static constexpr int kCols = WC * CW;              // columns of d per block
  static constexpr int kPitchV = kCols + 8;          // bf16 per row of the E / dh tile
  static constexpr int kTPR = kThreads / kRows;      // threads per score row: 2 or 4 (consecutive lanes)
  static constexpr int kEPT = kKTile / kTPR;         // scores per thread per tile: 32 or 16
  static constexpr int kVBytes = kKTile * kPitchV * 2;
  static_assert(kEPT % 4 == 0, "whole Philox blocks per thread");
  static_assert(kVBytes % 16 == 0, "ldmatrix rows are 16-byte aligned");
};

// Shared memory (dynamic: the emulation refills it with garbage per block, so a
// read before write shows): the P tile, the E / dh tile, and (forward) two
// floats per row: 58.5 KB for (CW, WC) = (2, 192), opted in above the 48 KB default.
constexpr int kPBytes = kRows * kPitchP * 2;
static_assert(kPBytes % 16 == 0, "ldmatrix rows are 16-byte aligned");
template <int CW, int WC>
constexpr size_t forward_smem_bytes() { return size_t(kPBytes + Shape<CW, WC>::kVBytes) + 2 * kRows * sizeof(float); }
template <int CW, int WC>
constexpr size_t backward_smem_bytes() { return size_t(kPBytes + Shape<CW, WC>::kVBytes); }
static_assert(forward_smem_bytes<2, 192>() <= 99 * 1024, "fits sm_80 (163 KB per block opt-in) twice over");

// Rows [r0, r0 + 64) x columns [c0, c0 + kCols) of a row-major bf16 [rows, d]
// matrix into V (pitch kPitchV), zero outside; 16-byte copies when d % 8 == 0
// and the base is 16-byte aligned (then a chunk of 8 is all in or all out).
template <int CW, int WC>
DUO_DEVICE void stage_tile(uint16_t (*V)[Shape<CW, WC>::kPitchV], const uint16_t* src, int64_t rows, int64_t d,
                           int64_t r0, int64_t c0, bool vec) {
  using S = Shape<CW, WC>;
  if (vec) {
    constexpr int kChunks = S::kCols / 8;
    for (int i = threadIdx.x; i < kRows * kChunks; i += S::kThreads) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r0 + r < rows && c0 + c < d) v = *reinterpret_cast<const uint4*>(src + (r0 + r) * d + c0 + c);
      *reinterpret_cast<uint4*>(&V[r][c]) = v;
    }
  } else {
    for (int i = threadIdx.x; i < kRows * S::kCols; i += S::kThreads) {
      const int r = i / S::kCols, c = i % S::kCols;
      V[r][c] = r0 + r < rows && c0 + c < d ? src[(r0 + r) * d + c0 + c] : uint16_t(0);
    }
  }
}

// acc[nt] += A (16 rows x 16 k of the warp) B (16 k x 8 columns nt) for the
// warp's 16 n-tiles at column col0 of V and k-rows k0 of V; n-tile pairs
// wholly past `cols_left` are skipped (warp-uniform).
template <int CW, int WC>
DUO_DEVICE void mma_k16(float (&acc)[WC / 8][4], const uint32_t (&a)[4], const uint16_t (*V)[Shape<CW, WC>::kPitchV],
                        int k0, int col0, int cols_left, int lane) {
#pragma unroll
  for (int np = 0; np < WC / 16; ++np) {
    if (16 * np >= cols_left) break;
    // x4.trans: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
    // -> b[0..1] of n-tile 2 np, b[0..1] of n-tile 2 np + 1.
    uint32_t b[4];
    mma::ldmatrix<4, true>(b, &V[k0 + (lane & 7) + 8 * ((lane >> 3) & 1)][col0 + 16 * np + 8 * (lane >> 4)]);
    mma::mma_bf16_16816(acc[2 * np], a, b, acc[2 * np]);
    mma::mma_bf16_16816(acc[2 * np + 1], a, b + 2, acc[2 * np + 1]);
  }
}

// A thread's roles in a block of Shape<CW, WC> over a [rows, d] output (blockIdx.y:
// the column slice): the mma role (warp wr of the 4 row warps: rows 16 wr..; column
// warp wc: columns col0.. of the slice starting at c0, cols_left of them, may be
// <= 0), the weight role (row r of the P tile, entries seg * kEPT..), the fragment
// coordinates g, q, and whether the right-hand matrix V stages in 16-byte copies.
struct Roles {
  int lane, wr, r, seg, g, q, col0, cols_left;
  int64_t c0;
  bool vec;
};

template <int CW, int WC>
DUO_DEVICE Roles roles(int64_t d, const uint16_t* V) {
  using S = Shape<CW, WC>;
  const int lane = int(threadIdx.x & 31u), warp = int(threadIdx.x >> 5);
  const int64_t c0 = int64_t(blockIdx.y) * S::kCols;
  const int col0 = WC * (warp >> 2);
  return {lane, warp & 3, int(threadIdx.x) / S::kTPR, int(threadIdx.x) % S::kTPR, lane >> 2, lane & 3, col0,
          int(d - c0 - col0 < WC ? d - c0 - col0 : WC), c0, d % 8 == 0 && (reinterpret_cast<uintptr_t>(V) & 15u) == 0};
}

template <int NT>
DUO_DEVICE void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
}

// acc += P V for the warp's 16 rows of the P tile (all kKTile entries, [row][entry])
// and its columns of the V tile ([entry][column]): the forward GEMM step.
template <int CW, int WC>
DUO_DEVICE void mma_rows(float (&acc)[WC / 8][4], const uint16_t (*Ps)[kPitchP],
                         const uint16_t (*V)[Shape<CW, WC>::kPitchV], const Roles& ro) {
  if (ro.cols_left <= 0) return;
#pragma unroll
  for (int kk = 0; kk < kKTile / 16; ++kk) {
    // x4: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3]
    uint32_t a[4];
    mma::ldmatrix<4, false>(a, &Ps[16 * ro.wr + (ro.lane & 7) + 8 * ((ro.lane >> 3) & 1)][16 * kk + 8 * (ro.lane >> 4)]);
    mma_k16<CW, WC>(acc, a, V, 16 * kk, ro.col0, ro.cols_left, ro.lane);
  }
}

// Stores the warp's accumulators (m16n8 C fragments: lane holds rows g and g + 8,
// columns 2 q + i of each n-tile) into the row-major out[rows][d] at column c0,
// rows ra and ra + 8 scaled by sa and sb; rows >= rows_end and columns past
// cols_left are not written.
template <int NT>
DUO_DEVICE void store_acc(float* __restrict__ out, const float (&acc)[NT][4], int64_t ra, int64_t rows_end, int64_t d,
                          int64_t c0, int cols_left, int q, float sa, float sb) {
  const int64_t rb = ra + 8;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int cl = 8 * nt + 2 * q + i;
      if (cl >= cols_left) continue;
      if (ra < rows_end) out[ra * d + c0 + cl] = acc[nt][i] * sa;
      if (rb < rows_end) out[rb * d + c0 + cl] = acc[nt][2 + i] * sb;
    }
  }
}

inline unsigned grid_x(int64_t tiles) { return unsigned(tiles < 1 ? 1 : (tiles > 65535 * 8 ? 65535 * 8 : tiles)); }

// Launch kernel<CW, WC> over (row tiles, column slices); above 48 KB of shared
// memory the kernel is opted in first (cudaFuncSetAttribute, idempotent).
template <int CW, int WC, class... KArgs, class... Args>
int launch_shape(void (*kernel)(KArgs...), size_t smem, int64_t rows, int64_t d, cudaStream_t s, Args&&... args) {
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return int(e);
  }
  const int64_t cols = int64_t(Shape<CW, WC>::kCols);
  const dim3 grid(grid_x((rows + kRows - 1) / kRows), unsigned((d + cols - 1) / cols));
  return int(launch_kernel(kernel, grid, dim3(Shape<CW, WC>::kThreads), smem, s, std::forward<Args>(args)...));
}

}  // namespace tiles
}  // namespace cuda
}  // namespace duo_fast
