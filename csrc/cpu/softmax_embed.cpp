// CPU kernel of softmax_embed (math in duo_fast/softmax_embed.h). Phase 1, in
// parallel over rows: the max M, NaN screening and the number of kept entries
// (two vectorized reads of the row). A row with at most K / kSparseDivisor kept
// entries is finished there: a third read picks the kept entries and adds w_j
// E_j (the row of E widened to float) into a float32 accumulator of d values.
// Phase 2, the other rows, in chunks of kChunkRows: for each tile of V entries
// the P tile (the kept weights, float) and one GEMM into a float32 [rows, d]
// accumulator; the GEMMs are ATen's (multithreaded): float32 E with sgemm on a
// view of E, bfloat16 E with the bf16 GEMM (oneDNN; P rounded to bf16 as
// transformers' own soft embedding rounds it, each tile's product rounded to
// bf16 once before the float32 sum), float16 E through a float32 copy of each
// (smaller) tile (ATen's float16 CPU GEMM is unoptimized). Extra memory: the
// chunk's accumulator and tiles (~16 MB), never [rows, K]. h = acc * scale / S
// in the embedding's dtype. A row with NaN, +inf or no finite logit raises
// after phase 1 (bad_rows.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bad_rows.h"
#include "checks.h"
#include "dispatch.h"
#include "duo_fast/canvas_step.h"
#include "duo_fast/softmax_embed.h"
#include "isa.h"

namespace duo_fast {
namespace {

using soft_embedding::kSparseDivisor;

constexpr int64_t kChunkRows = 256;  // dense rows per GEMM
constexpr int64_t kTile = 8192;      // entries per GEMM (bf16 and float32 E)
constexpr int64_t kTileF16 = 1024;   // entries per GEMM of float16 E (widened to a float32 copy)

struct RowStats {
  float m;         // the max
  int64_t kept;    // entries with y >= log theta
  bool valid;
};

template <class T>
[[gnu::always_inline]] inline RowStats row_stats(const T* x, int64_t K, float inv_t, float lt) {
  float m = -INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < K; ++j) {
    const float v = to_float(x[j]);
    m = v > m ? v : m;
    nan |= int(v != v);
  }
  if (!canvas::row_valid(m, nan != 0)) return {m, 0, false};
  int64_t kept = 0;
#pragma omp simd reduction(+ : kept)
  for (int64_t j = 0; j < K; ++j) kept += int64_t(canvas::scaled(to_float(x[j]), m, inv_t) >= lt);
  return {m, kept, true};
}

// h_row = scale * sum_kept w_j E_j / sum_kept w_j, summed row of E by row.
template <class T, class E>
[[gnu::always_inline]] inline void sparse_row(const T* x, int64_t K, float M, float inv_t, float lt, const E* emb,
                                              int64_t d, double scale, float* acc, E* out) {
  std::fill(acc, acc + d, 0.0f);
  double s = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const float y = canvas::scaled(to_float(x[j]), M, inv_t);
    if (!(y >= lt)) continue;
    const float w = canvas::weight(y);
    s += double(w);
    const E* row = emb + j * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) acc[c] += w * to_float(row[c]);
  }
  const float f = float(scale / s);
  for (int64_t c = 0; c < d; ++c) out[c] = from_float<E>(acc[c] * f);
}

// Weights of entries [j0, j0 + n) of a row into p; returns their sum.
template <class T>
[[gnu::always_inline]] inline double tile_weights(const T* x, int64_t n, float M, float inv_t, float lt, float* p) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    p[j] = soft_embedding::weight(canvas::scaled(to_float(x[j]), M, inv_t), lt);
    s += double(p[j]);
  }
  return s;
}

// The two per-row loops, compiled for the baseline and for AVX2 + FMA.
struct Phase1 {
  template <class T, class E>
  static void run(const T* xp, int64_t K, const double* temp, float lt, const E* emb, int64_t d, double scale,
                  E* out, int64_t begin, int64_t end, RowStats* stats, BadRows& bad) {
    std::vector<float> acc(static_cast<size_t>(d));
    for (int64_t r = begin; r < end; ++r) {
      const float inv_t = float(1.0 / temp[r]);
      stats[r] = row_stats(xp + r * K, K, inv_t, lt);
      if (!stats[r].valid) {
        bad.add(r);
        continue;
      }
      if (stats[r].kept * kSparseDivisor <= K)
        sparse_row(xp + r * K, K, stats[r].m, inv_t, lt, emb, d, scale, acc.data(), out + r * d);
    }
  }
};

template <class T, class E>
[[gnu::target("avx2,fma")]] void phase1_avx2(const T* xp, int64_t K, const double* temp, float lt, const E* emb,
                                             int64_t d, double scale, E* out, int64_t begin, int64_t end,
                                             RowStats* stats, BadRows& bad) {
  Phase1::run(xp, K, temp, lt, emb, d, scale, out, begin, end, stats, bad);
}

template <class T>
[[gnu::target("avx2,fma")]] double tile_weights_avx2(const T* x, int64_t n, float M, float inv_t, float lt,
                                                     float* p) {
  return tile_weights(x, n, M, inv_t, lt, p);
}

template <class T>
double tile_weights_any(const T* x, int64_t n, float M, float inv_t, float lt, float* p) {
  return have_avx2_fma() ? tile_weights_avx2(x, n, M, inv_t, lt, p) : tile_weights(x, n, M, inv_t, lt, p);
}

// acc [R, d] += P [R, kt] E[j0 .. j0 + kt) for the embedding's dtype.
void gemm_tile(at::Tensor& acc, const at::Tensor& P, const at::Tensor& emb, int64_t j0, int64_t kt) {
  const at::Tensor Et = emb.narrow(0, j0, kt);
  switch (emb.scalar_type()) {
    case at::kFloat: acc.addmm_(P, Et); break;
    case at::kBFloat16: acc.add_(at::mm(P.to(at::kBFloat16), Et)); break;
    default: acc.addmm_(P, Et.to(at::kFloat)); break;
  }
}

// Phase 2: the rows in `dense`, chunk by chunk (ATen's GEMMs parallelize inside).
template <class T>
void dense_rows(const T* xp, int64_t K, const double* temp, float lt, const at::Tensor& emb, double scale,
                const std::vector<int64_t>& dense, const std::vector<RowStats>& stats, at::Tensor& out2d) {
  const int64_t d = emb.size(1), tile = emb.scalar_type() == at::kHalf ? kTileF16 : kTile;
  const auto f32 = emb.options().dtype(at::kFloat);
  for (size_t c0 = 0; c0 < dense.size(); c0 += kChunkRows) {
    const int64_t R = std::min<int64_t>(kChunkRows, int64_t(dense.size() - c0));
    at::Tensor acc = at::zeros({R, d}, f32), P = at::empty({R, std::min(tile, K)}, f32);
    std::vector<double> s(static_cast<size_t>(R), 0.0);
    for (int64_t j0 = 0; j0 < K; j0 += tile) {
      const int64_t kt = std::min(tile, K - j0);
      at::Tensor Pt = P.narrow(1, 0, kt);
      float* pp = P.mutable_data_ptr<float>();
      const int64_t pitch = P.size(1);
      at::parallel_for(0, R, row_grain(kt), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t r = dense[c0 + i];
          s[i] += tile_weights_any(xp + r * K + j0, kt, stats[r].m, float(1.0 / temp[r]), lt, pp + i * pitch);
        }
      });
      gemm_tile(acc, Pt, emb, j0, kt);
    }
    std::vector<double> f(static_cast<size_t>(R));
    for (int64_t i = 0; i < R; ++i) f[i] = scale / s[i];
    const at::Tensor fs = at::from_blob(f.data(), {R, 1}, at::kDouble).to(at::kFloat);
    const at::Tensor idx = at::from_blob(const_cast<int64_t*>(dense.data() + c0), {R}, at::kLong);
    out2d.index_copy_(0, idx, (acc * fs).to(out2d.scalar_type()));
  }
}

at::Tensor softmax_embed_cpu(const at::Tensor& logits, const at::Tensor& embedding, const at::Tensor& temperature,
                             double scale) {
  check_softmax_embed_args(logits, embedding, temperature, scale);
  const at::Tensor l = logits.contiguous(), t = temperature.contiguous(), emb = embedding.contiguous();
  const int64_t K = l.size(-1), rows = t.numel(), d = emb.size(1);
  auto sizes = l.sizes().vec();
  sizes.back() = d;
  at::Tensor out = at::empty(sizes, emb.options());
  at::Tensor out2d = out.view({rows, d});
  const double* tp = t.const_data_ptr<double>();
  const float lt = soft_embedding::log_theta(K);
  std::vector<RowStats> stats(static_cast<size_t>(rows));
  BadRows bad;
  dispatch_float_storage(l, "logits", [&](auto* xp) {
    dispatch_float_storage(emb, "embedding", [&](auto* ep) {
      using E = std::remove_const_t<std::remove_pointer_t<decltype(ep)>>;
      E* op = reinterpret_cast<E*>(out.mutable_data_ptr());
      at::parallel_for(0, rows, row_grain(K), [&](int64_t begin, int64_t end) {
        if (have_avx2_fma())
          phase1_avx2(xp, K, tp, lt, ep, d, scale, op, begin, end, stats.data(), bad);
        else
          Phase1::run(xp, K, tp, lt, ep, d, scale, op, begin, end, stats.data(), bad);
      });
    });
    bad.raise_if_any();
    std::vector<int64_t> dense;
    for (int64_t r = 0; r < rows; ++r)
      if (stats[r].kept * kSparseDivisor > K) dense.push_back(r);
    if (!dense.empty()) dense_rows(xp, K, tp, lt, emb, scale, dense, stats, out2d);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) { m.impl("softmax_embed", &softmax_embed_cpu); }

}  // namespace duo_fast
