// CPU kernels of the curriculum soft inputs.
//
// Exact (SPEC 2c, 2d; row math in curriculum.h): curriculum_embed is attention
// with one query per token whose scores are generated noise and whose values
// are E. Each thread takes a chunk of tokens and walks K in tiles: generate the
// tile's scores, update the online softmax (row max m, sum l; rescale the
// accumulator when m grows), then acc += P_tile E_tile by a BLAS GEMM. h =
// acc / l; the row log-sum-exp is kept for the backward, which walks K-tiles
// per thread (so each dE tile has one writer), regenerates P = exp(y - lse)
// for token chunks and does dE_tile += P^T dh. Memory O(N d + tile).
//
// Top-k (SPEC 2e; row math in topk.h):
// curriculum_topk (ids, weights, z_t per token), curriculum_topk_embed (the same
// plus the weighted embedding bag h = sum_i w_i E[id_i]: all tokens' entries,
// then the id-sorted bag of bag_cpu.h, or per token in the same pass when the
// bag is small) and the bag's backward dE[id] = sum w_i dh (id-sorted, each row
// written once; no atomics, deterministic for any thread count). The rows run through
// topk_cpu.h (vectorized per-slot math, AVX2+FMA clone chosen at run time; same
// ids and z as topk::token, to which it falls back near ties).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "bag_cpu.h"
#include "checks.h"
#include "curriculum_rows.h"
#include "dispatch.h"
#include "grad_cache.h"
#include "duo_fast/curriculum.h"
#include "duo_fast/logits.h"
#include "duo_fast/topk.h"
#include "topk_cpu.h"

namespace duo_fast {
namespace {

struct TopKArgs {
  const int64_t* x0;
  const double* gamma;
  const double* inv_tau;
  int64_t k, vocab_size;
  int zt_rule;
  uint64_t seed, offset;
};

// Per-thread scratch of the top-k row (topk_cpu.h): the swap map (hash, for
// topk::token and large vocabularies), the dense Fisher-Yates table (vocabularies
// up to kDenseMaxOthers others: one int32 per id, reset by the row itself; only
// when the chunk has enough slots to repay initializing it), the Philox words
// and the per-slot arrays.
struct TopKScratch {
  std::vector<int32_t> keys, vals, perm, touched;
  std::vector<double> kept, a, e;
  std::vector<uint64_t> words;
  topk::SwapMap map;
  TopKScratch(int64_t k, int64_t vocab_size, int64_t tokens)
      : keys(topk::swap_map_capacity(k), -1),
        vals(keys.size()),
        perm(vocab_size - 1 <= topk_cpu::kDenseMaxOthers && tokens * k * 8 >= vocab_size - 1
                 ? size_t(vocab_size - 1)
                 : 0,
             -1),
        touched(size_t(k)),
        kept(size_t(k)),
        a(size_t(k)),
        e(size_t(k)),
        words(size_t(topk_cpu::scratch_words(k))) {
    map = {keys.data(), vals.data(), uint32_t(keys.size() - 1)};
  }
  topk_cpu::Scratch rows() {
    return {words.data(), a.data(), kept.data(), e.data(), perm.empty() ? nullptr : perm.data(), touched.data()};
  }
};

template <class E>
void bag_row(const E* emb, int64_t d, const int64_t* ids, const float* w, int64_t k, float* acc) {
  for (int64_t c = 0; c < d; ++c) acc[c] = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    const E* row = emb + ids[i] * d;
    const float wi = w[i];
    if (wi == 0.0f) continue;
    for (int64_t c = 0; c < d; ++c) acc[c] += wi * to_float(row[c]);
  }
}

// One token of either op; returns z. ids/weights may be the scratch's or an output row.
int64_t topk_token(const TopKArgs& a, int64_t t, TopKScratch& sc, int64_t* ids, float* weights) {
  bool fast = false;
  const topk::TokenOut o = topk_cpu::token(a.seed, a.offset, uint64_t(t), a.x0[t], a.gamma[t], a.inv_tau[t], a.k,
                                           a.vocab_size, a.zt_rule, sc.map, ids, weights, sc.rows(), &fast);
  // The hash map is dirty after topk::token (the rare fallback) or when it did the
  // Fisher-Yates (no dense table): 2k..4k slots, cheaper than tracking them.
  if (!fast || sc.perm.empty()) std::fill(sc.keys.begin(), sc.keys.end(), -1);
  return o.z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> curriculum_topk_cpu(const at::Tensor& x0, const at::Tensor& gamma,
                                                                   const at::Tensor& inv_tau, int64_t k,
                                                                   int64_t vocab_size, int64_t zt_rule, int64_t seed,
                                                                   int64_t offset) {
  check_topk_args(x0, gamma, inv_tau, k, vocab_size, zt_rule);
  const at::Tensor x = x0.contiguous(), g = gamma.contiguous(), it = inv_tau.contiguous();
  auto sizes = x.sizes().vec();
  sizes.push_back(k);
  at::Tensor ids = at::empty(sizes, x.options());
  at::Tensor weights = at::empty(sizes, x.options().dtype(at::kFloat));
  at::Tensor z = at::empty_like(x);
  const TopKArgs a{x.const_data_ptr<int64_t>(), g.const_data_ptr<double>(), it.const_data_ptr<double>(), k,
                   vocab_size, int(zt_rule), uint64_t(seed), uint64_t(offset)};
  int64_t* ip = ids.mutable_data_ptr<int64_t>();
  float* wp = weights.mutable_data_ptr<float>();
  int64_t* zp = z.mutable_data_ptr<int64_t>();
  at::parallel_for(0, x.numel(), 16, [&](int64_t begin, int64_t end) {
    TopKScratch sc(k, vocab_size, end - begin);
    for (int64_t t = begin; t < end; ++t) zp[t] = topk_token(a, t, sc, ip + t * k, wp + t * k);
  });
  return {ids, weights, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> curriculum_topk_embed_cpu(
    const at::Tensor& x0, const at::Tensor& gamma, const at::Tensor& inv_tau, int64_t k, const at::Tensor& embedding,
    int64_t zt_rule, int64_t seed, int64_t offset) {
  check_embedding(embedding, x0);
  const int64_t vocab_size = embedding.size(0), d = embedding.size(1);
  check_topk_args(x0, gamma, inv_tau, k, vocab_size, zt_rule);
  const at::Tensor x = x0.contiguous(), g = gamma.contiguous(), it = inv_tau.contiguous();
  const at::Tensor emb = embedding.contiguous();
  auto sizes = x.sizes().vec();
  sizes.push_back(k);
  at::Tensor ids = at::empty(sizes, x.options());
  at::Tensor weights = at::empty(sizes, x.options().dtype(at::kFloat));
  sizes.back() = d;
  at::Tensor h = at::empty(sizes, emb.options());
  at::Tensor h32 = emb.scalar_type() == at::kFloat ? h : at::empty(sizes, emb.options().dtype(at::kFloat));
  at::Tensor z = at::empty_like(x);
  const TopKArgs a{x.const_data_ptr<int64_t>(), g.const_data_ptr<double>(), it.const_data_ptr<double>(), k,
                   vocab_size, int(zt_rule), uint64_t(seed), uint64_t(offset)};
  int64_t* ip = ids.mutable_data_ptr<int64_t>();
  float* wp = weights.mutable_data_ptr<float>();
  float* hp = h32.mutable_data_ptr<float>();
  int64_t* zp = z.mutable_data_ptr<int64_t>();
  const int64_t n = x.numel();
  dispatch_float_storage(emb, "embedding", [&](auto* ep) {
    if (bag_cpu::use_sorted_forward(n, k, vocab_size)) {
      // All (token, id, weight) entries first, then the id-sorted bag (bag_cpu.h).
      at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        TopKScratch sc(k, vocab_size, end - begin);
        for (int64_t t = begin; t < end; ++t) zp[t] = topk_token(a, t, sc, ip + t * k, wp + t * k);
      });
      if (d > 0) bag_cpu::forward(ip, wp, n, k, ep, vocab_size, d, hp);
      return;
    }
    // Few entries per id (little row reuse): the per-token bag, in the same pass.
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      TopKScratch sc(k, vocab_size, end - begin);
      for (int64_t t = begin; t < end; ++t) {
        zp[t] = topk_token(a, t, sc, ip + t * k, wp + t * k);
        bag_row(ep, d, ip + t * k, wp + t * k, k, hp + t * d);
      }
    });
  });
  if (!h32.is_same(h)) h.copy_(h32);
  return {h, z, ids, weights};
}

// grad_embedding [K, d] (float32) = scatter of w_i * grad_h over ids: id-sorted,
// each row written once (bag_cpu.h); deterministic for any thread count.
at::Tensor topk_bag_backward_cpu(const at::Tensor& grad_h, const at::Tensor& ids, const at::Tensor& weights,
                                 int64_t vocab_size, bool deterministic) {
  (void)deterministic;  // the CPU kernel is always deterministic
  check_bag_backward_args(grad_h, ids, weights, vocab_size);
  const at::Tensor gh = grad_h.contiguous().to(at::kFloat), ic = ids.contiguous(), wc = weights.contiguous();
  const int64_t d = gh.size(-1), k = ic.size(-1), tokens = ic.numel() / std::max<int64_t>(k, 1);
  if (d == 0 || k == 0) return at::zeros({vocab_size, d}, gh.options());
  at::Tensor grad = grad_cache::empty_float(vocab_size, d);  // every element is written once
  bag_cpu::backward(gh.const_data_ptr<float>(), ic.const_data_ptr<int64_t>(), wc.const_data_ptr<float>(), tokens, k,
                    vocab_size, d, grad.mutable_data_ptr<float>());
  return grad;
}

// ---- exact curriculum input ----
//
// Row math in curriculum_rows.h: per (token, vocabulary tile) the noise tile
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
  m.impl("curriculum_topk", &curriculum_topk_cpu);
  m.impl("curriculum_topk_embed", &curriculum_topk_embed_cpu);
  m.impl("topk_bag_backward", &topk_bag_backward_cpu);
  m.impl("curriculum_embed", &curriculum_embed_cpu);
  m.impl("curriculum_embed_backward", &curriculum_embed_backward_cpu);
}

}  // namespace duo_fast
