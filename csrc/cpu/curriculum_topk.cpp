// CPU kernels of curriculum_topk and curriculum_topk_embed (docs/math.md §2e; row math in
// curriculum_topk.h):
// curriculum_topk (ids, weights, z_t per token), curriculum_topk_embed (the same
// plus the weighted embedding bag h = sum_i w_i E[id_i]: all tokens' entries,
// then the id-sorted bag of curriculum_topk_bag.h, or per token in the same pass when the
// bag is small) and the bag's backward dE[id] = sum w_i dh (id-sorted, each row
// written once; no atomics, deterministic for any thread count). The rows run through
// curriculum_topk_rows.h (vectorized per-slot math, AVX2+FMA clone chosen at run time; same
// ids and z as topk::token, to which it falls back near ties).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "checks.h"
#include "curriculum_topk_bag.h"
#include "dispatch.h"
#include "grad_cache.h"
#include "curriculum_topk_rows.h"
#include "duo_fast/curriculum_topk.h"
#include "duo_fast/logits.h"

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

// Per-thread scratch of the top-k row (curriculum_topk_rows.h): the swap map (hash, for
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
      // All (token, id, weight) entries first, then the id-sorted bag (curriculum_topk_bag.h).
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
// each row written once (curriculum_topk_bag.h); deterministic for any thread count.
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

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) {
  m.impl("curriculum_topk", &curriculum_topk_cpu);
  m.impl("curriculum_topk_embed", &curriculum_topk_embed_cpu);
  m.impl("topk_bag_backward", &topk_bag_backward_cpu);
}

}  // namespace duo_fast
