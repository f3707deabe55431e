// CPU kernels of the reverse-process step (docs/math.md §4; math in sample_step.h):
// sample_step draws z_s per token, posterior writes the dense q(z_s). Per row:
// the max, then the weights w_j = exp((x_j - max)/T) into a per-thread scratch
// row (K floats, cache-resident) with their sum, the nucleus boundary when
// top_p < 1 (radix passes over the scratch), then the mixture choice and, for
// the model part, the inverse-CDF scan of the scratch. A row with NaN, +inf or
// no finite logit has no distribution: the op raises after the rows are done
// (naming logits, the count and the first such row), so no id is returned.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bad_rows.h"
#include "checks.h"
#include "dispatch.h"
#include "duo_fast/device_check.h"
#include "duo_fast/sample_step.h"

namespace duo_fast {
namespace {

using sampling::Nucleus;

// Per-thread scratch rows: the weights, and the nucleus candidates (top_p < 1).
struct Scratch {
  std::vector<float> w;
  std::vector<int32_t> candidates;
  Scratch(int64_t K, double top_p) : w(static_cast<size_t>(K)), candidates(top_p < 1.0 ? static_cast<size_t>(K) : 0) {}
};

// Per-row state shared by the two ops.
struct Row {
  bool valid;       // the row is a distribution (check::valid_weight_sum)
  bool filter;      // top_p < 1
  Nucleus nucleus;  // the boundary when filtering
  double kept;      // mass of the kept weights (all of them without filtering)
};

template <class T>
Row prepare_row(const T* x, int64_t K, float inv_temperature, double top_p, float* w, int32_t* candidates) {
  float m = -INFINITY;
  for (int64_t j = 0; j < K; ++j) {
    const float v = to_float(x[j]);
    m = v > m ? v : m;
  }
  double s[4] = {0.0, 0.0, 0.0, 0.0};  // four chains: the adds do not wait on each other
  int64_t j = 0;
  for (; j + 4 <= K; j += 4) {
    for (int e = 0; e < 4; ++e) {
      w[j + e] = sampling::weight(to_float(x[j + e]), m, inv_temperature);
      s[e] += w[j + e];
    }
  }
  for (; j < K; ++j) {
    w[j] = sampling::weight(to_float(x[j]), m, inv_temperature);
    s[0] += w[j];
  }
  const double total = (s[0] + s[1]) + (s[2] + s[3]);
  Row row{check::valid_weight_sum(total), top_p < 1.0, sampling::nucleus_start(top_p, total), total};
  if (!row.valid || !row.filter) return row;
  // Radix passes over the candidates only: entries sharing the decided prefix,
  // compacted after every pass (all K at the first pass, a few percent after it).
  double hist[sampling::kRadixBins];
  uint32_t count[sampling::kRadixBins];
  Nucleus& nu = row.nucleus;
  int64_t n = K;
  for (int64_t i = 0; i < K; ++i) candidates[i] = int32_t(i);
  while (!nu.done) {
    for (int d = 0; d < sampling::kRadixBins; ++d) hist[d] = 0.0, count[d] = 0;
    for (int64_t c = 0; c < n; ++c) {
      const int32_t i = candidates[c];
      const int d = sampling::nucleus_digit(nu, sampling::rank_key(to_float(x[i]), i));
      hist[d] += w[i];
      count[d] += 1;
    }
    sampling::choose_digit(nu, hist, count);
    int64_t kept_n = 0;
    for (int64_t c = 0; c < n; ++c) {
      const int32_t i = candidates[c];
      candidates[kept_n] = i;  // branch-free compaction
      kept_n += sampling::nucleus_match(nu, sampling::rank_key(to_float(x[i]), i)) ? 1 : 0;
    }
    n = kept_n;
  }
  row.kept = nu.kept;
  // Zero the weights outside the nucleus: from here on w is the filtered p (unnormalized).
  // (A multiply, not a select: kept ids are scattered, a branch mispredicts.)
  for (int64_t i = 0; i < K; ++i)
    w[i] *= float(sampling::nucleus_kept(nu, sampling::rank_key(to_float(x[i]), i)));
  return row;
}

sampling::Mixture row_mixture(const Row& row, const float* w, int64_t K, int64_t z, double alpha_t, double alpha_s,
                              double kappa) {
  const double p_z = double(w[z]) / row.kept;
  return sampling::mixture(alpha_t, alpha_s, kappa, double(K), p_z);
}

template <class T>
int64_t sample_row(const T* x, int64_t K, int64_t z, double alpha_t, double alpha_s, double kappa,
                   float inv_temperature, double top_p, uint64_t seed, uint64_t offset, uint64_t token, float* w,
                   int32_t* candidates) {
  const Row row = prepare_row(x, K, inv_temperature, top_p, w, candidates);
  if (!row.valid) return -1;  // the caller raises
  const sampling::Mixture mix = row_mixture(row, w, K, z, alpha_t, alpha_s, kappa);
  const sampling::StepDraw draw = sampling::step_draw(seed, offset, token);
  switch (sampling::choose_part(mix, draw.u_part)) {
    case sampling::kPointZ: return z;
    case sampling::kUniform: return int64_t(uniform_index(draw.hi, draw.lo, uint32_t(K)));
    case sampling::kModel: break;
  }
  // Inverse CDF: the first j whose inclusive running sum exceeds u * kept.
  const int64_t j = sampling::inverse_cdf(w, K, draw.u_cat * row.kept);
  return j >= 0 ? j : z;
}

template <class T>
bool posterior_row(const T* x, int64_t K, int64_t z, double alpha_t, double alpha_s, double kappa,
                   float inv_temperature, double top_p, float* w, int32_t* candidates, float* q) {
  const Row row = prepare_row(x, K, inv_temperature, top_p, w, candidates);
  if (!row.valid) return false;  // the caller raises
  const sampling::Mixture mix = row_mixture(row, w, K, z, alpha_t, alpha_s, kappa);
  const double scale = mix.p / row.kept, uniform = mix.u / double(K);
  for (int64_t j = 0; j < K; ++j) q[j] = float(scale * w[j] + uniform);
  q[z] = float(double(q[z]) + mix.z);
  return true;
}

at::Tensor sample_step_cpu(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& alpha_t,
                           const at::Tensor& alpha_s, double kappa, double temperature, double top_p, int64_t seed,
                           int64_t offset, int64_t row_offset) {
  check_sample_step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p);
  check_row_offset(row_offset);
  const at::Tensor l = logits.contiguous(), zc = z.contiguous(), at_ = alpha_t.contiguous(), as_ = alpha_s.contiguous();
  const int64_t K = l.size(-1), rows = zc.numel();
  at::Tensor out = at::empty_like(zc);
  const int64_t* zp = zc.const_data_ptr<int64_t>();
  const double *atp = at_.const_data_ptr<double>(), *asp = as_.const_data_ptr<double>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const float inv_t = float(1.0 / temperature);
  BadRows bad;
  dispatch_float_storage(l, "logits", [&](auto* xp) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      Scratch sc(K, top_p);
      for (int64_t r = begin; r < end; ++r) {
        op[r] = sample_row(xp + r * K, K, zp[r], atp[r], asp[r], kappa, inv_t, top_p, uint64_t(seed),
                           uint64_t(offset), uint64_t(row_offset + r), sc.w.data(), sc.candidates.data());
        if (op[r] < 0) bad.add(row_offset + r);
      }
    });
  });
  bad.raise_if_any();
  return out;
}

at::Tensor posterior_cpu(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& alpha_t,
                         const at::Tensor& alpha_s, double kappa, double temperature, double top_p) {
  check_sample_step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p);
  const at::Tensor l = logits.contiguous(), zc = z.contiguous(), at_ = alpha_t.contiguous(), as_ = alpha_s.contiguous();
  const int64_t K = l.size(-1), rows = zc.numel();
  at::Tensor q = at::empty(l.sizes(), l.options().dtype(at::kFloat));
  const int64_t* zp = zc.const_data_ptr<int64_t>();
  const double *atp = at_.const_data_ptr<double>(), *asp = as_.const_data_ptr<double>();
  float* qp = q.mutable_data_ptr<float>();
  const float inv_t = float(1.0 / temperature);
  BadRows bad;
  dispatch_float_storage(l, "logits", [&](auto* xp) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      Scratch sc(K, top_p);
      for (int64_t r = begin; r < end; ++r)
        if (!posterior_row(xp + r * K, K, zp[r], atp[r], asp[r], kappa, inv_t, top_p, sc.w.data(),
                           sc.candidates.data(), qp + r * K))
          bad.add(r);
    });
  });
  bad.raise_if_any();
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) {
  m.impl("sample_step", &sample_step_cpu);
  m.impl("posterior", &posterior_cpu);
}

}  // namespace duo_fast
