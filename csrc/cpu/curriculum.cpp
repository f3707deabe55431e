// CPU kernels of the Duo++ top-k curriculum input (SPEC 2e; row math in topk.h):
// curriculum_topk (ids, weights, z_t per token), curriculum_topk_embed (the same
// plus the weighted embedding bag h = sum_i w_i E[id_i], in the same pass over
// the tokens) and the bag's backward dE[id_i] += w_i dh (columns split among
// threads: no atomics, deterministic for any thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "duo_fast/logits.h"
#include "duo_fast/topk.h"

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

// Per-thread scratch of the top-k row: the swap map and the kept values.
struct TopKScratch {
  std::vector<int32_t> keys, vals;
  std::vector<double> kept;
  topk::SwapMap map;
  explicit TopKScratch(int64_t k) : keys(topk::swap_map_capacity(k), -1), vals(keys.size()), kept(size_t(k)) {
    map = {keys.data(), vals.data(), uint32_t(keys.size() - 1)};
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
  const topk::TokenOut o = topk::token(a.seed, a.offset, uint64_t(t), a.x0[t], a.gamma[t], a.inv_tau[t], a.k,
                                       a.vocab_size, a.zt_rule, sc.map, ids, weights, sc.kept.data());
  std::fill(sc.keys.begin(), sc.keys.end(), -1);  // 2k..4k slots: cheaper than tracking them
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
    TopKScratch sc(k);
    for (int64_t t = begin; t < end; ++t) zp[t] = topk_token(a, t, sc, ip + t * k, wp + t * k);
  });
  return {ids, weights, z};
}

template <class Fn>
void dispatch_embedding(const at::Tensor& e, Fn&& fn) {
  switch (e.scalar_type()) {
    case at::kFloat: fn(e.const_data_ptr<float>()); break;
    case at::kBFloat16: fn(reinterpret_cast<const bf16_bits*>(e.const_data_ptr<at::BFloat16>())); break;
    case at::kHalf: fn(reinterpret_cast<const f16_bits*>(e.const_data_ptr<at::Half>())); break;
    default: TORCH_CHECK(false, "duo_fast: embedding has dtype ", e.scalar_type(), ", expected Float, BFloat16 or Half");
  }
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
  dispatch_embedding(emb, [&](auto* ep) {
    at::parallel_for(0, x.numel(), 16, [&](int64_t begin, int64_t end) {
      TopKScratch sc(k);
      for (int64_t t = begin; t < end; ++t) {
        zp[t] = topk_token(a, t, sc, ip + t * k, wp + t * k);
        bag_row(ep, d, ip + t * k, wp + t * k, k, hp + t * d);
      }
    });
  });
  if (!h32.is_same(h)) h.copy_(h32);
  return {h, z, ids, weights};
}

// grad_embedding [K, d] (float32) = scatter of w_i * grad_h over ids.
at::Tensor topk_bag_backward_cpu(const at::Tensor& grad_h, const at::Tensor& ids, const at::Tensor& weights,
                                 int64_t vocab_size, bool deterministic) {
  (void)deterministic;  // the CPU kernel is always deterministic
  check_bag_backward_args(grad_h, ids, weights, vocab_size);
  const at::Tensor gh = grad_h.contiguous().to(at::kFloat), ic = ids.contiguous(), wc = weights.contiguous();
  const int64_t d = gh.size(-1), k = ic.size(-1), tokens = ic.numel() / std::max<int64_t>(k, 1);
  at::Tensor grad = at::zeros({vocab_size, d}, gh.options());
  const float* ghp = gh.const_data_ptr<float>();
  const int64_t* ip = ic.const_data_ptr<int64_t>();
  const float* wp = wc.const_data_ptr<float>();
  float* gp = grad.mutable_data_ptr<float>();
  // Threads own column ranges, tokens in order: no atomics, same sums for any thread count.
  at::parallel_for(0, d, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t t = 0; t < tokens; ++t) {
      const float* g = ghp + t * d;
      for (int64_t i = 0; i < k; ++i) {
        const float w = wp[t * k + i];
        float* row = gp + ip[t * k + i] * d;
        for (int64_t c = c0; c < c1; ++c) row[c] += w * g[c];
      }
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) {
  m.impl("curriculum_topk", &curriculum_topk_cpu);
  m.impl("curriculum_topk_embed", &curriculum_topk_embed_cpu);
  m.impl("topk_bag_backward", &topk_bag_backward_cpu);
}

}  // namespace duo_fast
