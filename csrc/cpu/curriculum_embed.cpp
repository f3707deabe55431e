// CPU kernels of curriculum_embed (docs/math.md §2c, §2d; row math in curriculum_embed.h and
// curriculum_embed_rows.h).
//
// curriculum_embed is attention
// with one query per token whose scores are generated noise and whose values
// are E. Each thread takes a chunk of tokens and walks K in tiles: generate the
// tile's scores, update the online softmax (row max m, sum l; rescale the
// accumulator when m grows), then acc += P_tile E_tile by a BLAS GEMM. h =
// acc / l; the row log-sum-exp is kept for the backward, which walks K-tiles
// per thread (so each dE tile has one writer), regenerates P = exp(y - lse)
// for token chunks and does dE_tile += P^T dh. Memory O(N d + tile).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "checks.h"
#include "curriculum_embed_rows.h"
#include "grad_cache.h"
#include "duo_fast/curriculum_embed.h"
#include "duo_fast/curriculum_topk.h"  // topk::scales: the levels a~, s~ of gamma

namespace duo_fast {
namespace {

// ---- exact curriculum input ----
//
// Row math in curriculum_embed_rows.h: per (token, vocabulary tile) the noise tile
// (vectorized Box-Muller, bit-identical to curriculum::noise4), its largest eps
// eref (x masked out), the scores' running max / log-sum-exp in double, and the
// tile's row of P = exp(c (eps_j - eref) + (y_ref - M)) (vectorized exp); the x
// entry is done apart in double. z compares w = y tau (the reference's argmax
// of w; first index among ties).

constexpr int64_t kTokenChunk = 256;  // tokens per GEMM (rows of P)
using curriculum_cpu::kVocabTile;     // entries per GEMM (columns of P); a multiple of 8

struct CurriculumArgs {
  const int64_t* x0;
  const double* gamma;
  const double* inv_tau;
  int64_t vocab_size;
  uint64_t seed, offset;
};

struct TokenLevels {
  double a, s, inv_tau;
  double c;  // s~ / tau: y_j - y_ref = c (eps_j - eref) away from x
  int64_t x;
};

TokenLevels token_levels(const CurriculumArgs& a, int64_t t) {
  const topk::Scales sc = topk::scales(a.gamma[t]);
  return {sc.a, sc.s, a.inv_tau[t], sc.s * a.inv_tau[t], a.x0[t]};
}

// One tile's scores in the form the row needs.
struct TileScores {
  float eref;         // largest eps of the tile, x excluded (-inf: the tile is x alone)
  float ex;           // eps of x (when in the tile)
  double y_ref, y_x;  // their scores (y_x = -inf: x is not in the tile)
};

// Noise of token t, entries [j0, j0 + kt), into sc.eps with x's entry set to -inf.
TileScores tile_scores(const CurriculumArgs& a, const TokenLevels& lv, int64_t t, int64_t j0, int64_t kt,
                       curriculum_cpu::NoiseScratch& sc) {
  curriculum_cpu::noise_tile(a.seed, a.offset, uint64_t(t), j0 / curriculum::kNoisePerBlock,
                             (kt + curriculum::kNoisePerBlock - 1) / curriculum::kNoisePerBlock, sc);
  TileScores ts{-INFINITY, 0.0f, -INFINITY, -INFINITY};
  if (lv.x >= j0 && lv.x < j0 + kt) {
    ts.ex = sc.eps[lv.x - j0];
    ts.y_x = curriculum::latent(ts.ex, true, lv.a, lv.s) * lv.inv_tau;
    sc.eps[lv.x - j0] = -INFINITY;
  }
  ts.eref = curriculum_cpu::tile_max(sc.eps, kt);
  if (ts.eref > -INFINITY) ts.y_ref = curriculum::latent(ts.eref, false, lv.a, lv.s) * lv.inv_tau;
  return ts;
}

// prow[0 .. kt) = exp(y_j - M) of the tile (M >= every y_j); returns their sum.
double tile_probs(const TokenLevels& lv, const TileScores& ts, int64_t j0, int64_t kt, double M,
                  const curriculum_cpu::NoiseScratch& sc, float* prow) {
  double sum = 0.0;
  if (ts.eref > -INFINITY)
    sum = curriculum_cpu::exp_row(sc.eps, kt, curriculum_cpu::exponent(lv.c, ts.eref, ts.y_ref - M), prow);  // x: 0
  else
    std::fill(prow, prow + kt, 0.0f);
  if (ts.y_x > -INFINITY) {
    const float px = fastmath::exp_nonpos(float(ts.y_x - M));
    prow[lv.x - j0] = px;
    sum += double(px);
  }
  return sum;
}

int64_t find_first(const float* e, int64_t n, float v) {
  for (int64_t j = 0; j < n; ++j)
    if (e[j] == v) return j;
  return 0;  // not reached: v is the max of e
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> curriculum_embed_cpu(const at::Tensor& x0, const at::Tensor& gamma,
                                                                    const at::Tensor& inv_tau,
                                                                    const at::Tensor& embedding, int64_t seed,
                                                                    int64_t offset) {
  check_curriculum_embed_args(x0, gamma, inv_tau, embedding);
  const int64_t K = embedding.size(0), d = embedding.size(1);
  const at::Tensor x = x0.contiguous(), g = gamma.contiguous(), it = inv_tau.contiguous();
  const at::Tensor E = embedding.contiguous().to(at::kFloat);  // [K, d] float32 once (O(K d), not O(N K))
  const int64_t n = x.numel();
  at::Tensor h = at::empty({n, d}, E.options());
  at::Tensor z = at::empty_like(x);
  at::Tensor lse = at::empty(x.sizes(), x.options().dtype(at::kDouble));
  const CurriculumArgs a{x.const_data_ptr<int64_t>(), g.const_data_ptr<double>(), it.const_data_ptr<double>(), K,
                         uint64_t(seed), uint64_t(offset)};
  int64_t* zp = z.mutable_data_ptr<int64_t>();
  double* lp = lse.mutable_data_ptr<double>();
  at::parallel_for(0, (n + kTokenChunk - 1) / kTokenChunk, 1, [&](int64_t c0, int64_t c1) {
    at::Tensor P = at::empty({kTokenChunk, kVocabTile}, E.options());
    auto sc = std::make_unique<curriculum_cpu::NoiseScratch>();
    std::vector<double> m(kTokenChunk), l(kTokenChunk), best(kTokenChunk);
    std::vector<TokenLevels> lv(kTokenChunk);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * kTokenChunk, T = std::min(kTokenChunk, n - t0);
      at::Tensor acc = h.narrow(0, t0, T);
      acc.zero_();
      float* accp = acc.mutable_data_ptr<float>();
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0);
      std::fill(best.begin(), best.end(), -INFINITY);
      for (int64_t r = 0; r < T; ++r) lv[r] = token_levels(a, t0 + r), zp[t0 + r] = 0;  // z defined even if no w beats -inf
      for (int64_t j0 = 0; j0 < K; j0 += kVocabTile) {
        const int64_t kt = std::min(kVocabTile, K - j0);
        float* pp = P.mutable_data_ptr<float>();
        for (int64_t r = 0; r < T; ++r) {
          const int64_t t = t0 + r;
          const TileScores ts = tile_scores(a, lv[r], t, j0, kt, *sc);
          // z = the first index of the largest w = y tau (earlier tiles hold smaller indices).
          if (ts.eref > -INFINITY) {
            const double w = curriculum::latent(ts.eref, false, lv[r].a, lv[r].s);
            if (w > best[r]) best[r] = w, zp[t] = j0 + find_first(sc->eps, kt, ts.eref);
          }
          if (ts.y_x > -INFINITY) {
            const double w = curriculum::latent(ts.ex, true, lv[r].a, lv[r].s);
            if (w > best[r] || (w == best[r] && lv[r].x < zp[t])) best[r] = w, zp[t] = lv[r].x;
          }
          const double tile_max = std::max(ts.y_ref, ts.y_x);
          if (tile_max > m[r]) {  // online softmax: rescale what was summed under the old max
            const double scale = std::exp(m[r] - tile_max);
            if (j0 > 0) {
              for (int64_t col = 0; col < d; ++col) accp[r * d + col] *= float(scale);
            }
            l[r] *= scale;
            m[r] = tile_max;
          }
          l[r] += tile_probs(lv[r], ts, j0, kt, m[r], *sc, pp + r * kVocabTile);
        }
        acc.addmm_(P.narrow(0, 0, T).narrow(1, 0, kt), E.narrow(0, j0, kt));
      }
      for (int64_t r = 0; r < T; ++r) {
        const float inv_l = float(1.0 / l[r]);
        for (int64_t col = 0; col < d; ++col) accp[r * d + col] *= inv_l;
        lp[t0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
  auto out_sizes = x.sizes().vec();
  out_sizes.push_back(d);
  return {h.reshape(out_sizes).to(embedding.scalar_type()), z, lse};
}

// dE [K, d] float32 = P^T grad_h with P = exp(y - lse) regenerated tile by tile.
at::Tensor curriculum_embed_backward_cpu(const at::Tensor& grad_h, const at::Tensor& x0, const at::Tensor& gamma,
                                         const at::Tensor& inv_tau, const at::Tensor& lse, int64_t vocab_size,
                                         int64_t seed, int64_t offset) {
  check_curriculum_embed_backward_args(grad_h, x0, gamma, inv_tau, lse, vocab_size);
  const at::Tensor x = x0.contiguous(), g = gamma.contiguous(), it = inv_tau.contiguous(), ls = lse.contiguous();
  const int64_t n = x.numel(), K = vocab_size, d = grad_h.size(-1);
  const at::Tensor dh = grad_h.reshape({n, d}).contiguous().to(at::kFloat);
  at::Tensor dE = grad_cache::empty_float(K, d).zero_();  // accumulated by addmm_
  const CurriculumArgs a{x.const_data_ptr<int64_t>(), g.const_data_ptr<double>(), it.const_data_ptr<double>(), K,
                         uint64_t(seed), uint64_t(offset)};
  const double* lp = ls.const_data_ptr<double>();
  at::parallel_for(0, (K + kVocabTile - 1) / kVocabTile, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor P = at::empty({kTokenChunk, kVocabTile}, dh.options());
    auto sc = std::make_unique<curriculum_cpu::NoiseScratch>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kVocabTile, kt = std::min(kVocabTile, K - j0);
      at::Tensor dE_tile = dE.narrow(0, j0, kt);
      for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
        const int64_t T = std::min(kTokenChunk, n - t0);
        float* pp = P.mutable_data_ptr<float>();
        for (int64_t r = 0; r < T; ++r) {
          const TokenLevels lv = token_levels(a, t0 + r);
          const TileScores ts = tile_scores(a, lv, t0 + r, j0, kt, *sc);
          tile_probs(lv, ts, j0, kt, lp[t0 + r], *sc, pp + r * kVocabTile);
        }
        dE_tile.addmm_(P.narrow(0, 0, T).narrow(1, 0, kt).t(), dh.narrow(0, t0, T));
      }
    }
  });
  return dE;
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) {
  m.impl("curriculum_embed", &curriculum_embed_cpu);
  m.impl("curriculum_embed_backward", &curriculum_embed_backward_cpu);
}

}  // namespace duo_fast
