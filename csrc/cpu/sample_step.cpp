// CPU kernels of the reverse-process step (docs/math.md §4; math in sample_step.h):
// sample_step draws z_s per token, posterior writes the dense q(z_s). Per row:
// the max, then the weights w_j = exp((x_j - max)/T) into a per-thread scratch
// row (K floats, cache-resident) with their sum, the nucleus boundary when
// top_p < 1 (radix passes over the scratch), then the mixture choice and, for
// the model part, the inverse-CDF scan of the scratch (inverse_cdf.h). The max
// and weight loops vectorize; the rows run in an AVX2 clone chosen at run time
// ("avx2" without FMA: the weights are bit-identical to the baseline build's
// and to the emulated CUDA kernel's). A row with NaN, +inf or no finite logit
// has no distribution: the op raises after the rows are done (naming logits,
// the count and the first such row), so no id is returned.
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
#include "inverse_cdf.h"
#include "isa.h"

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
[[gnu::always_inline]] inline Row prepare_row(const T* x, int64_t K, float inv_temperature, double top_p, float* w,
                                              int32_t* candidates) {
  float m = -INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < K; ++j) {
    const float v = to_float(x[j]);
    m = v > m ? v : m;
    nan |= int(v != v);
  }
  // weight() maps NaN to 0, so a NaN row is screened here; +inf or no finite
  // logit leaves every weight 0 ((x - m) is NaN or -inf), a total below 1.
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < K; ++j) {
    const float wj = sampling::weight(to_float(x[j]), m, inv_temperature);
    w[j] = wj;
    s += double(wj);
  }
  const double total = nan ? double(NAN) : s;
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

[[gnu::always_inline]] inline sampling::Mixture row_mixture(const Row& row, const float* w, int64_t K, int64_t z,
                                                            double alpha_t, double alpha_s, double kappa) {
  const double p_z = double(w[z]) / row.kept;
  return sampling::mixture(alpha_t, alpha_s, kappa, double(K), p_z);
}

// The arguments of a call, per row where indexed by r.
struct Args {
  int64_t K;
  const int64_t* z;
  const double *alpha_t, *alpha_s;
  double kappa, top_p;
  float inv_t;
  uint64_t seed, offset;
  int64_t row_offset;
  int64_t* out;  // sample_step: z_s
  float* q;      // posterior: [rows, K]
};

// z_s of row r, or -1 where the row has no distribution (the caller raises).
template <class T>
[[gnu::always_inline]] inline int64_t sample_row(const T* x, const Args& a, int64_t r, float* w, int32_t* candidates) {
  const int64_t K = a.K, z = a.z[r];
  const Row row = prepare_row(x, K, a.inv_t, a.top_p, w, candidates);
  if (!row.valid) return -1;
  const sampling::Mixture mix = row_mixture(row, w, K, z, a.alpha_t[r], a.alpha_s[r], a.kappa);
  const sampling::StepDraw draw = sampling::step_draw(a.seed, a.offset, uint64_t(a.row_offset + r));
  switch (sampling::choose_part(mix, draw.u_part)) {
    case sampling::kPointZ: return z;
    case sampling::kUniform: return int64_t(uniform_index(draw.hi, draw.lo, uint32_t(K)));
    case sampling::kModel: break;
  }
  // Inverse CDF: the first j whose inclusive running sum exceeds u * kept.
  const int64_t j = sampling::inverse_cdf(w, K, draw.u_cat * row.kept);
  return j >= 0 ? j : z;
}

// q(z_s) of row r into q (K floats); false where the row has no distribution.
template <class T>
[[gnu::always_inline]] inline bool posterior_row(const T* x, const Args& a, int64_t r, float* w, int32_t* candidates,
                                                 float* q) {
  const int64_t K = a.K, z = a.z[r];
  const Row row = prepare_row(x, K, a.inv_t, a.top_p, w, candidates);
  if (!row.valid) return false;
  const sampling::Mixture mix = row_mixture(row, w, K, z, a.alpha_t[r], a.alpha_s[r], a.kappa);
  const double scale = mix.p / row.kept, uniform = mix.u / double(K);
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) q[j] = float(scale * w[j] + uniform);
  q[z] = float(double(q[z]) + mix.z);
  return true;
}

template <bool kPosterior, class T>
[[gnu::always_inline]] inline void rows_impl(const T* xp, const Args& a, int64_t begin, int64_t end, Scratch& sc,
                                             BadRows& bad) {
  for (int64_t r = begin; r < end; ++r) {
    const T* x = xp + r * a.K;
    if constexpr (kPosterior) {
      if (!posterior_row(x, a, r, sc.w.data(), sc.candidates.data(), a.q + r * a.K)) bad.add(r);
    } else {
      a.out[r] = sample_row(x, a, r, sc.w.data(), sc.candidates.data());
      if (a.out[r] < 0) bad.add(a.row_offset + r);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <bool kPosterior, class T>
[[gnu::target("avx2")]] void rows_avx2(const T* xp, const Args& a, int64_t begin, int64_t end, Scratch& sc,
                                       BadRows& bad) {
  rows_impl<kPosterior>(xp, a, begin, end, sc, bad);
}
#endif

template <bool kPosterior, class T>
void rows_base(const T* xp, const Args& a, int64_t begin, int64_t end, Scratch& sc, BadRows& bad) {
  rows_impl<kPosterior>(xp, a, begin, end, sc, bad);
}

// Both ops: the checks, then the rows in parallel (out: sample_step's z_s, or q:
// posterior's [rows, K]).
template <bool kPosterior>
void run_rows(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& alpha_t, const at::Tensor& alpha_s,
              double kappa, double temperature, double top_p, int64_t seed, int64_t offset, int64_t row_offset,
              int64_t* out, float* q) {
  const at::Tensor l = logits.contiguous(), zc = z.contiguous(), at_ = alpha_t.contiguous(), as_ = alpha_s.contiguous();
  const int64_t K = l.size(-1), rows = zc.numel();
  const Args a{K, zc.const_data_ptr<int64_t>(), at_.const_data_ptr<double>(), as_.const_data_ptr<double>(), kappa,
               top_p, float(1.0 / temperature), uint64_t(seed), uint64_t(offset), row_offset, out, q};
  BadRows bad;
  dispatch_float_storage(l, "logits", [&](auto* xp) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      Scratch sc(K, top_p);
#if defined(__x86_64__) && defined(__GNUC__)
      if (have_avx2_fma())
        rows_avx2<kPosterior>(xp, a, begin, end, sc, bad);
      else
#endif
        rows_base<kPosterior>(xp, a, begin, end, sc, bad);
    });
  });
  bad.raise_if_any();
}

at::Tensor sample_step_cpu(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& alpha_t,
                           const at::Tensor& alpha_s, double kappa, double temperature, double top_p, int64_t seed,
                           int64_t offset, int64_t row_offset) {
  check_sample_step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p);
  check_row_offset(row_offset);
  at::Tensor out = at::empty_like(z, z.options(), at::MemoryFormat::Contiguous);
  run_rows<false>(logits, z, alpha_t, alpha_s, kappa, temperature, top_p, seed, offset, row_offset,
                  out.mutable_data_ptr<int64_t>(), nullptr);
  return out;
}

at::Tensor posterior_cpu(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& alpha_t,
                         const at::Tensor& alpha_s, double kappa, double temperature, double top_p) {
  check_sample_step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p);
  at::Tensor q = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  run_rows<true>(logits, z, alpha_t, alpha_s, kappa, temperature, top_p, 0, 0, 0, nullptr, q.mutable_data_ptr<float>());
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) {
  m.impl("sample_step", &sample_step_cpu);
  m.impl("posterior", &posterior_cpu);
}

}  // namespace duo_fast
