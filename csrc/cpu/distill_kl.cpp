// CPU kernel of the distillation KLs (docs/math.md §3; row math in distill_kl.h):
// one row per task; exp(l - max) of student and teacher once per entry (float,
// vectorized, kept in a scratch row), every p, log-ratio and sum in double;
// gradient written in the same call. Logits float32, bfloat16 or float16 (each
// law its own dtype), read natively; the gradient in the student's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "duo_fast/distill_kl.h"
#include "duo_fast/fast_math.h"
#include "duo_fast/logits.h"
#include "fused_outputs.h"
#include "isa.h"

namespace duo_fast {
namespace {

// Rows [begin, end) of student logits TS and teacher logits TT (float, bf16_bits,
// f16_bits: read natively as float); the gradient is written in TS. es / et: K
// floats of scratch each. Compiled twice, baseline x86-64 and AVX2+FMA (run-time
// choice): every loop is a vectorizable reduction or map.
template <class TS, class TT>
[[gnu::always_inline]] inline void distill_rows_impl(const TS* sp, const TT* tp, float* klp, TS* gp, int64_t K, int dir,
                                                     int64_t begin, int64_t end, float* __restrict__ es,
                                                     float* __restrict__ et) {
  for (int64_t r = begin; r < end; ++r) {
    const TS* ls = sp + r * K;
    const TT* lt = tp + r * K;
    float ms = -INFINITY, mt = -INFINITY;
    int nonfinite = 0;  // a NaN or +inf logit in either row (-inf is probability 0)
#pragma omp simd reduction(max : ms, mt) reduction(| : nonfinite)
    for (int64_t j = 0; j < K; ++j) {
      const float vs = to_float(ls[j]), vt = to_float(lt[j]);
      ms = vs > ms ? vs : ms;
      mt = vt > mt ? vt : mt;
      nonfinite |= int(!(vs < INFINITY)) | int(!(vt < INFINITY));
    }
    // e = exp(l - max) once per entry (float polynomial, vectorized), sums in double;
    // p = e / sum then sums to 1 in double, so float only adds ~1e-7 relative
    // per entry (no common error on all p's).
    double ss = 0.0, st = 0.0;
#pragma omp simd reduction(+ : ss, st)
    for (int64_t j = 0; j < K; ++j) {
      es[j] = fastmath::exp_nonpos(to_float(ls[j]) - ms);
      et[j] = fastmath::exp_nonpos(to_float(lt[j]) - mt);
      ss += double(es[j]);
      st += double(et[j]);
    }
    // NaN or +inf logits, or an all--inf row: no distribution, a NaN KL and a NaN
    // gradient row (as log_softmax would give; exp_nonpos does not propagate NaN).
    if (nonfinite || !(ms > -INFINITY) || !(mt > -INFINITY)) {
      klp[r] = NAN;
      if (gp) std::fill(gp + r * K, gp + (r + 1) * K, from_float<TS>(NAN));
      continue;
    }
    // log pS_j - log pT_j = (ls_j - lt_j) - c, c = lse_S - lse_T, in double.
    // A -inf logit is probability 0 (distill_kl.h): 0 log 0 = 0 for the weighting law
    // (its e_j = 0 times an infinite log-ratio would be NaN), +inf where only the
    // other law is 0 (also where e_j underflowed to 0).
    const double c = (double(ms) + std::log(ss)) - (double(mt) + std::log(st));
    const double inv_ss = 1.0 / ss, inv_st = 1.0 / st;
    constexpr double kInf = INFINITY, kNegInf = -INFINITY;
    double acc = 0.0;
    if (dir == distill::kBackward) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < K; ++j) {
        // compares and selects in double, the width of the sum (mixed-width masks keep GCC scalar)
        const double vs = to_float(ls[j]), vt = to_float(lt[j]);
        const double term = double(es[j]) * inv_ss * ((vs - vt) - c);
        acc += vs == kNegInf ? 0.0 : vt == kNegInf ? kInf : term;
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < K; ++j) {
        const double vs = to_float(ls[j]), vt = to_float(lt[j]);
        const double term = double(et[j]) * inv_st * ((vs - vt) - c);
        acc -= vt == kNegInf ? 0.0 : vs == kNegInf ? -kInf : term;
      }
    }
    klp[r] = float(acc);
    if (gp) {
      TS* g = gp + r * K;
      if (dir == distill::kBackward) {  // pS_j (d_j - KL); 0 where pS_j = 0
#pragma omp simd
        for (int64_t j = 0; j < K; ++j) {
          const double vs = to_float(ls[j]), vt = to_float(lt[j]);
          const double v = double(es[j]) * inv_ss * (((vs - vt) - c) - acc);
          g[j] = from_float<TS>(float(vs == kNegInf ? 0.0 : v));
        }
      } else {  // pS_j - pT_j
#pragma omp simd
        for (int64_t j = 0; j < K; ++j) g[j] = from_float<TS>(float(double(es[j]) * inv_ss - double(et[j]) * inv_st));
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <class TS, class TT>
[[gnu::target("avx2,fma")]] void distill_rows_avx2(const TS* sp, const TT* tp, float* klp, TS* gp, int64_t K, int dir,
                                                   int64_t begin, int64_t end, float* es, float* et) {
  distill_rows_impl(sp, tp, klp, gp, K, dir, begin, end, es, et);
}
#endif

template <class TS, class TT>
void distill_rows(const TS* sp, const TT* tp, float* klp, TS* gp, int64_t K, int dir, int64_t begin, int64_t end) {
  std::vector<float> es(static_cast<size_t>(K)), et(static_cast<size_t>(K));
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2_fma()) return distill_rows_avx2(sp, tp, klp, gp, K, dir, begin, end, es.data(), et.data());
#endif
  distill_rows_impl(sp, tp, klp, gp, K, dir, begin, end, es.data(), et.data());
}

// The rows into kl (and into grad where not null, contiguous, the student's dtype).
void distill_kl_rows_cpu(const at::Tensor& student, const at::Tensor& teacher, int64_t direction, at::Tensor& kl,
                         at::Tensor* grad) {
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t K = s.size(-1), rows = s.numel() / K;
  float* klp = kl.mutable_data_ptr<float>();
  const int dir = int(direction);
  dispatch_float_storage(s, "student_logits", [&](const auto* sp) {
    using TS = std::remove_cv_t<std::remove_pointer_t<decltype(sp)>>;
    TS* gp = grad != nullptr ? static_cast<TS*>(grad->data_ptr()) : nullptr;
    dispatch_float_storage(t, "teacher_logits", [&](const auto* tp) {
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { distill_rows(sp, tp, klp, gp, K, dir, begin, end); });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> distill_kl_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  int64_t direction, bool compute_grad) {
  check_distill_args(student, teacher, direction);
  auto [kl, grad] = fused_grad_outputs(student, compute_grad);  // the gradient in the student's dtype
  distill_kl_rows_cpu(student, teacher, direction, kl, compute_grad ? &grad : nullptr);
  return {kl, grad};
}

at::Tensor distill_kl_into_cpu(const at::Tensor& student, const at::Tensor& teacher, int64_t direction,
                               at::Tensor& grad) {
  check_distill_into_args(student, teacher, direction, grad);
  at::Tensor kl = fused_value_output(student);
  distill_kl_rows_cpu(student, teacher, direction, kl, &grad);
  return kl;
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) {
  m.impl("distill_kl", &distill_kl_cpu);
  m.impl("distill_kl.into", &distill_kl_into_cpu);
}

}  // namespace duo_fast
