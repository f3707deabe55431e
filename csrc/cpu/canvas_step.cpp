// CPU kernel of canvas_step (math in duo_fast/canvas_step.h): per row, sweep 1
// the max M and the first argmax (chunks of 64 entries: a vector max per chunk,
// the chunk that first raises M remembered, the argmax found in it); sweep 2
// the weights w_j = exp((x_j - M) / T) into a per-thread scratch row with the
// entropy sums (delta as the sum over x_j < M plus the count of the other
// maxima, b = sum w (-y), in double); then the inverse-CDF draw scans the
// scratch row (inverse_cdf.h, shared with sample_step). Two reads of the logits,
// K floats of scratch per thread, O(rows) outputs. Sweep 2 has an AVX2 clone
// chosen at run time ("avx2" without FMA: the weights are bit-identical to the
// baseline build's and to the emulated CUDA kernel's). A row with NaN, +inf or
// no finite logit raises after the rows are done (bad_rows.h).
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
#include "duo_fast/sample_step.h"
#include "inverse_cdf.h"
#include "isa.h"

namespace duo_fast {
namespace {

struct MaxArg {
  float m;
  int64_t arg;
};

// M = max_j x_j (NaN entries ignored; sweep 2 finds them) and its first index.
template <class T>
[[gnu::always_inline]] inline MaxArg max_argmax(const T* x, int64_t K) {
  constexpr int64_t kChunk = 64;
  float m = -INFINITY;
  int64_t first_chunk = -1;
  for (int64_t j0 = 0; j0 < K; j0 += kChunk) {
    const int64_t j1 = std::min(K, j0 + kChunk);
    float cm = -INFINITY;
#pragma omp simd reduction(max : cm)
    for (int64_t j = j0; j < j1; ++j) {
      const float v = to_float(x[j]);
      cm = v > cm ? v : cm;
    }
    if (cm > m) m = cm, first_chunk = j0;  // strict: an equal max later keeps the earlier chunk
  }
  if (first_chunk < 0) return {m, 0};  // no entry above -inf: not a distribution
  int64_t j = first_chunk;
  while (to_float(x[j]) != m) ++j;
  return {m, j};
}

struct Sums {
  double delta, b;
  bool any_nan;
};

// Sweep 2: w[j] = exp(y_j), delta = sum_{x_j < M} w_j + (#{x_j = M} - 1), b = sum w_j (-y_j).
template <class T>
[[gnu::always_inline]] inline Sums weights(const T* x, int64_t K, float M, float inv_t, float* w) {
  double lt = 0.0, b = 0.0;
  int64_t eq = 0;
  int nan = 0;
#pragma omp simd reduction(+ : lt, b, eq) reduction(| : nan)
  for (int64_t j = 0; j < K; ++j) {
    const float v = to_float(x[j]);
    const float y = canvas::scaled(v, M, inv_t);
    const float wj = canvas::weight(y);
    w[j] = wj;
    lt += double(fastmath::select(v < M, wj, 0.0f));
    b += double(canvas::entropy_term(wj, y));
    eq += int64_t(v == M);
    nan |= int(v != v);
  }
  return {lt + double(eq - 1), b, nan != 0};
}

struct RowOut {
  int64_t sample, argmax;
  float entropy;
  bool valid;
};

template <class T>
[[gnu::always_inline]] inline RowOut canvas_row(const T* x, int64_t K, float inv_t, uint64_t seed, uint64_t offset,
                                                uint64_t row, float* w) {
  const MaxArg ma = max_argmax(x, K);
  if (!canvas::row_valid(ma.m, false)) return {0, 0, 0.0f, false};
  const Sums s = weights(x, K, ma.m, inv_t, w);
  if (s.any_nan) return {0, 0, 0.0f, false};
  const double u = sampling::step_draw(seed, offset, row).u_cat;
  const int64_t j = sampling::inverse_cdf(w, K, u * (1.0 + s.delta));
  return {j >= 0 ? j : ma.arg, ma.arg, float(canvas::entropy(s.delta, s.b)), true};
}

struct Args {
  int64_t K;
  const double* temperature;
  uint64_t seed, offset;
  int64_t *sample, *argmax;
  float* entropy;
};

template <class T>
[[gnu::always_inline]] inline void rows_impl(const T* xp, const Args& a, int64_t begin, int64_t end, float* w,
                                             BadRows& bad) {
  for (int64_t r = begin; r < end; ++r) {
    const RowOut o = canvas_row(xp + r * a.K, a.K, float(1.0 / a.temperature[r]), a.seed, a.offset, uint64_t(r), w);
    a.sample[r] = o.sample, a.argmax[r] = o.argmax, a.entropy[r] = o.entropy;
    if (!o.valid) bad.add(r);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <class T>
[[gnu::target("avx2")]] void rows_avx2(const T* xp, const Args& a, int64_t begin, int64_t end, float* w,
                                       BadRows& bad) {
  rows_impl(xp, a, begin, end, w, bad);
}
#endif

template <class T>
void rows_base(const T* xp, const Args& a, int64_t begin, int64_t end, float* w, BadRows& bad) {
  rows_impl(xp, a, begin, end, w, bad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> canvas_step_cpu(const at::Tensor& logits,
                                                               const at::Tensor& temperature, int64_t seed,
                                                               int64_t offset) {
  check_canvas_logits(logits, temperature);
  const at::Tensor l = logits.contiguous(), t = temperature.contiguous();
  const int64_t K = l.size(-1), rows = t.numel();
  const auto lead = l.sizes().slice(0, l.dim() - 1);
  at::Tensor sample = at::empty(lead, l.options().dtype(at::kLong)), argmax = at::empty_like(sample);
  at::Tensor entropy = at::empty(lead, l.options().dtype(at::kFloat));
  const Args a{K, t.const_data_ptr<double>(), uint64_t(seed), uint64_t(offset), sample.mutable_data_ptr<int64_t>(),
               argmax.mutable_data_ptr<int64_t>(), entropy.mutable_data_ptr<float>()};
  BadRows bad;
  dispatch_float_storage(l, "logits", [&](auto* xp) {
    at::parallel_for(0, rows, row_grain(K), [&](int64_t begin, int64_t end) {
      std::vector<float> w(static_cast<size_t>(K));
#if defined(__x86_64__) && defined(__GNUC__)
      if (have_avx2_fma())
        rows_avx2(xp, a, begin, end, w.data(), bad);
      else
#endif
        rows_base(xp, a, begin, end, w.data(), bad);
    });
  });
  bad.raise_if_any();
  return {sample, argmax, entropy};
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) { m.impl("canvas_step", &canvas_step_cpu); }

}  // namespace duo_fast
