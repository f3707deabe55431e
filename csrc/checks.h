// ATen-level argument checks shared by the CPU and CUDA bindings. Messages name
// the argument and say what was expected and what was given; the Python
// wrappers in duo_fast/ops.py run the same checks first, these guard direct
// torch.ops.duo_fast calls.
//
// What is checked where. Shapes, dtypes, devices and scalar arguments: here,
// on the host, for every device (free). Values inside tensors (token ids in
// [0, K), alpha / alpha_t / alpha_s / gamma / inv_tau ranges): here for CPU
// tensors; for CUDA tensors reading them here would synchronize the host with
// the GPU (.item()) at every call and break CUDA graph capture, so the CUDA
// kernels check them on the device instead (duo_fast/device_check.h: no
// out-of-bounds access, unspecified outputs for that row, an error raised by
// the next duo_fast CUDA call). DUO_FAST_CUDA_SYNC_CHECKS=1 runs the host
// value checks for CUDA tensors too (synchronizing; for debugging).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include "duo_fast/common.h"
#include "duo_fast/device_check.h"
#include "duo_fast/usdm_loss.h"

namespace duo_fast {

inline void check_floating(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  for (auto s : allowed) ok = ok || t.scalar_type() == s;
  TORCH_CHECK(ok, "duo_fast: ", name, " has dtype ", t.scalar_type(), ", expected one of ", c10::ArrayRef(allowed));
}

inline void check_vocab(int64_t vocab_size, const char* name = "vocab_size") {
  TORCH_CHECK(vocab_size >= kMinVocab && vocab_size <= kMaxVocab, "duo_fast: ", name, " must be in [", kMinVocab,
              ", ", kMaxVocab, "], got ", vocab_size);
}

// A DUO_FAST_* environment variable with a fixed set of values (duo_fast/_env.py
// checks the same at import): the index of its value in `accepted`, -1 when unset
// or empty; any other value raises naming the variable and the accepted values.
inline int env_choice(const char* name, std::initializer_list<const char*> accepted) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return -1;
  int i = 0;
  std::string list;
  for (const char* a : accepted) {
    if (std::strcmp(v, a) == 0) return i;
    list += (i++ ? ", " : "") + std::string(a);
  }
  TORCH_CHECK_VALUE(false, "duo_fast: the environment variable ", name, " must be one of ", list,
                    " (or unset), got '", v, "'");
  return -1;
}

// Whether the values of t are checked on the host (see the top of this file).
inline bool check_values_on_host(const at::Tensor& t) {
  static const bool sync_checks = env_choice("DUO_FAST_CUDA_SYNC_CHECKS", {"0", "1"}) == 1;
  return !t.is_cuda() || sync_checks;
}

inline void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), "duo_fast: ", name_a, " is on ", a.device(), " but ", name_b, " is on ",
              b.device());
}

// Token ids in [0, K): every op that takes ids calls this (one reduction; values
// on the host for CPU tensors only, see above).
inline void check_token_ids(const at::Tensor& ids, const char* name, int64_t vocab_size) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, "duo_fast: ", name, " has dtype ", ids.scalar_type(),
              ", expected Long (int64) (the Python functions duo_fast.* also take int32 ids and convert them)");
  if (ids.numel() == 0 || !check_values_on_host(ids)) return;
  auto [lo, hi] = at::aminmax(ids);
  const int64_t mn = lo.item<int64_t>(), mx = hi.item<int64_t>();
  TORCH_CHECK(mn >= 0 && mx < vocab_size, "duo_fast: ", name, " holds token ids in [", mn, ", ", mx,
              "], outside [0, vocab_size) = [0, ", vocab_size, ")");
}

// A Gaussian log-noise level that may be +-inf (the limits alpha = 1 and 0) but
// not NaN (values on the host for CPU tensors only, see above).
inline void check_not_nan(const at::Tensor& level, const char* name) {
  if (level.numel() == 0 || !check_values_on_host(level)) return;
  const int64_t nan = at::isnan(level).sum().item<int64_t>();
  TORCH_CHECK(nan == 0, "duo_fast: ", name, " must not be NaN, got ", nan, " NaN value(s) (+-inf are allowed: the "
              "limits alpha = 1 and alpha = 0)");
}

// sample_zt: x0 int64 ids; gamma_t (and gamma_s) float64 of x0's shape (the
// Python wrapper broadcasts per-row levels to per-token), not NaN.
inline void check_sample_zt_args(const at::Tensor& x0, const at::Tensor& gamma_t,
                                 const std::optional<at::Tensor>& gamma_s, int64_t vocab_size) {
  check_vocab(vocab_size);
  check_token_ids(x0, "x0", vocab_size);
  TORCH_CHECK(gamma_t.scalar_type() == at::kDouble, "duo_fast: gamma has dtype ", gamma_t.scalar_type(),
              ", expected Double (the wrapper converts)");
  TORCH_CHECK(gamma_t.sizes() == x0.sizes(), "duo_fast: gamma has shape ", gamma_t.sizes(), ", expected x0's shape ",
              x0.sizes());
  check_same_device(x0, "x0", gamma_t, "gamma");
  if (gamma_s) {
    TORCH_CHECK(gamma_s->scalar_type() == at::kDouble, "duo_fast: gamma_s has dtype ", gamma_s->scalar_type(),
                ", expected Double");
    TORCH_CHECK(gamma_s->sizes() == x0.sizes(), "duo_fast: gamma_s has shape ", gamma_s->sizes(),
                ", expected x0's shape ", x0.sizes());
    check_same_device(x0, "x0", *gamma_s, "gamma_s");
    check_not_nan(*gamma_s, "gamma_s");
  }
  check_not_nan(gamma_t, "gamma");
}

// distill_kl: float32 logits of one shape [..., K], K >= 2, same device.
inline void check_distill_args(const at::Tensor& student, const at::Tensor& teacher, int64_t direction) {
  TORCH_CHECK(direction == 0 || direction == 1, "duo_fast: direction must be 0 (bwd) or 1 (fwd), got ", direction);
  check_floating(student, "student_logits", {at::kFloat, at::kBFloat16, at::kHalf});
  check_floating(teacher, "teacher_logits", {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK(student.dim() >= 1 && student.size(-1) >= kMinVocab, "duo_fast: student_logits must be [..., K] with K >= 2, got shape ",
              student.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "duo_fast: teacher_logits has shape ", teacher.sizes(),
              ", expected student_logits' shape ", student.sizes());
  check_same_device(student, "student_logits", teacher, "teacher_logits");
}

// usdm_loss: float32/bfloat16/float16 logits [B, L, K] (any leading shape), z and x0 int64 ids of
// the leading shape, alpha/dalpha float64 of the leading shape (the wrapper
// broadcasts per-row levels) with 0 < alpha < 1 and dalpha <= 0.
inline void check_usdm_loss_args(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& x0,
                                 const at::Tensor& alpha, const at::Tensor& dalpha) {
  check_floating(logits, "logits", {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK(logits.dim() >= 2, "duo_fast: logits must be [..., K], got shape ", logits.sizes());
  const int64_t K = logits.size(-1);
  check_vocab(K, "logits.size(-1) (the vocabulary size)");
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{z, "z"}, {x0, "x0"}, {alpha, "alpha"},
                                {dalpha, "dalpha"}}) {
    TORCH_CHECK(t.sizes() == lead, "duo_fast: ", name, " has shape ", t.sizes(), ", expected logits' leading shape ",
                lead);
    check_same_device(logits, "logits", t, name);
  }
  TORCH_CHECK(alpha.scalar_type() == at::kDouble && dalpha.scalar_type() == at::kDouble,
              "duo_fast: alpha and dalpha must be Double (the wrapper converts), got ", alpha.scalar_type(), " and ",
              dalpha.scalar_type());
  check_token_ids(z, "z", K);
  check_token_ids(x0, "x0", K);
  if (alpha.numel() > 0 && check_values_on_host(alpha)) {
    auto [lo, hi] = at::aminmax(alpha);
    const double mn = lo.item<double>(), mx = hi.item<double>();
    TORCH_CHECK(mn > 0.0 && mx < 1.0, "duo_fast: alpha must be in (0, 1) for the loss, got values in [", mn, ", ",
                mx, "]");
    const double dmax = dalpha.max().item<double>();
    TORCH_CHECK(dmax <= 0.0, "duo_fast: dalpha must be <= 0 (alpha decreases in t), got a value ", dmax);
    // the loss must be a float32 number (usdm::loss_in_float32; the CUDA kernels check the same per token)
    const at::Tensor a = alpha.to(at::kCPU).contiguous(), d = dalpha.to(at::kCPU).contiguous();
    const double *ap = a.const_data_ptr<double>(), *dp = d.const_data_ptr<double>();
    for (int64_t i = 0; i < a.numel(); ++i) {
      if (usdm::loss_in_float32(double(K), ap[i], dp[i])) continue;
      TORCH_CHECK(false, "duo_fast: dalpha must be finite and small enough that the loss is a float32: expected "
                  "|dalpha| <= ", usdm::max_abs_dalpha(double(K), ap[i]), " for alpha = ", ap[i], " and K = ", K,
                  " (the loss bound |dalpha| B(K, alpha) / (K alpha) <= 3.4e38 and the weight |dalpha| / (K alpha) "
                  "<= 1e300, csrc/include/duo_fast/usdm_loss.h), got dalpha = ", dp[i], " (token ", i, ")");
    }
  }
}

// Sampling needs a probability distribution per row: no NaN, no +inf, and at
// least one finite logit (-inf entries are probability 0). CPU tensors are
// checked by the kernels as they read the rows; this host version serves
// CUDA tensors under DUO_FAST_CUDA_SYNC_CHECKS=1.
inline const char* kBadLogitsRows =
    " hold NaN, +inf or no finite logit: no probability distribution to sample from (a diverged model?). A -inf "
    "entry is probability 0 and allowed; a row of only -inf is not";

inline void check_logits_rows_on_host(const at::Tensor& logits) {
  if (logits.numel() == 0 || !check_values_on_host(logits)) return;
  const at::Tensor l = logits.to(at::kFloat);
  const at::Tensor bad = at::isnan(l).any(-1) | at::isposinf(l).any(-1) | (l.amax(-1) == -INFINITY);
  const int64_t n = bad.sum().item<int64_t>();
  TORCH_CHECK(n == 0, "duo_fast: logits: ", n, " row(s)", kBadLogitsRows);
}

// sample_step: the stream of the first row (rows of a larger call, chunk by chunk).
inline void check_row_offset(int64_t row_offset) {
  TORCH_CHECK(row_offset >= 0, "duo_fast: row_offset must be >= 0, got ", row_offset);
}

// sample_step / posterior: logits [..., K] float32/bfloat16/float16; z int64 ids
// of the leading shape; alpha_t, alpha_s float64 of the leading shape with
// 0 <= alpha_t <= alpha_s <= 1 and alpha_t < 1; kappa in [0, 1]; temperature
// > 0; top_p in (0, 1].
inline void check_sample_step_args(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& alpha_t,
                                   const at::Tensor& alpha_s, double kappa, double temperature, double top_p) {
  check_floating(logits, "logits", {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK(logits.dim() >= 1, "duo_fast: logits must be [..., K], got a 0-dim tensor");
  const int64_t K = logits.size(-1);
  check_vocab(K, "logits.size(-1) (the vocabulary size)");
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{z, "z"}, {alpha_t, "alpha_t"},
                                {alpha_s, "alpha_s"}}) {
    TORCH_CHECK(t.sizes() == lead, "duo_fast: ", name, " has shape ", t.sizes(), ", expected logits' leading shape ",
                lead);
    check_same_device(logits, "logits", t, name);
  }
  TORCH_CHECK(alpha_t.scalar_type() == at::kDouble && alpha_s.scalar_type() == at::kDouble,
              "duo_fast: alpha_t and alpha_s must be Double (the wrapper converts), got ", alpha_t.scalar_type(),
              " and ", alpha_s.scalar_type());
  TORCH_CHECK(kappa >= 0.0 && kappa <= 1.0, "duo_fast: kappa must be in [0, 1], got ", kappa);
  TORCH_CHECK(temperature >= 1.0 / kFloat32Max && temperature <= 1.0 / kFloat32Tiny,
              "duo_fast: temperature must be in [", 1.0 / kFloat32Max, ", ", 1.0 / kFloat32Tiny,
              "] (1/temperature scales the logits in float32: a finite, normal float32), got ", temperature);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "duo_fast: top_p must be in (0, 1], got ", top_p);
  check_token_ids(z, "z", K);
  if (z.numel() == 0 || !check_values_on_host(alpha_t)) return;
  auto [tlo, thi] = at::aminmax(alpha_t);
  auto [slo, shi] = at::aminmax(alpha_s);
  const double t_min = tlo.item<double>(), t_max = thi.item<double>();
  const double s_min = slo.item<double>(), s_max = shi.item<double>();
  TORCH_CHECK(t_min >= 0.0 && t_max < 1.0, "duo_fast: alpha_t must be in [0, 1), got values in [", t_min, ", ",
              t_max, "]");
  TORCH_CHECK(s_min > 0.0 && s_max <= 1.0, "duo_fast: alpha_s must be in (0, 1], got values in [", s_min, ", ",
              s_max, "]");
  const double gap = (alpha_s - alpha_t).min().item<double>();
  TORCH_CHECK(gap >= 0.0, "duo_fast: alpha_s must be >= alpha_t (s is the earlier, less noisy time), got alpha_s - "
              "alpha_t = ", gap);
  // The CPU kernels check the logits rows as they read them (sample_step.cpp); CUDA
  // kernels on the device (check::kLogits); here only under DUO_FAST_CUDA_SYNC_CHECKS.
  if (logits.is_cuda()) check_logits_rows_on_host(logits);
}

// canvas_step / softmax_embed: logits [..., K] float32/bfloat16/float16; temperature
// float64 of the leading shape (the wrapper broadcasts a float or a per-row value),
// finite and > 0 (values on the host for CPU tensors; CUDA kernels check on the device).
inline void check_canvas_logits(const at::Tensor& logits, const at::Tensor& temperature) {
  check_floating(logits, "logits", {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK(logits.dim() >= 1, "duo_fast: logits must be [..., K], got a 0-dim tensor");
  check_vocab(logits.size(-1), "logits.size(-1) (the vocabulary size)");
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(temperature.scalar_type() == at::kDouble, "duo_fast: temperature has dtype ", temperature.scalar_type(),
              ", expected Double (the wrapper converts)");
  TORCH_CHECK(temperature.sizes() == lead, "duo_fast: temperature has shape ", temperature.sizes(),
              ", expected logits' leading shape ", lead);
  check_same_device(logits, "logits", temperature, "temperature");
  if (temperature.numel() > 0 && check_values_on_host(temperature)) {
    auto [lo, hi] = at::aminmax(temperature);
    const double mn = lo.item<double>(), mx = hi.item<double>();
    TORCH_CHECK(check::valid_temperature(mn) && check::valid_temperature(mx), "duo_fast: temperature must be in [",
                1.0 / kFloat32Max, ", ", 1.0 / kFloat32Tiny,
                "] (1/temperature scales the logits in float32: a finite, normal float32), got values in [", mn, ", ", mx,
                "]");
  }
  // The CPU kernels check the logits rows as they read them; CUDA kernels on the
  // device (check::kLogits); here only under DUO_FAST_CUDA_SYNC_CHECKS.
  if (logits.is_cuda()) check_logits_rows_on_host(logits);
}

// softmax_embed: the logits and temperature of canvas_step, an embedding [K, d]
// (float32/bfloat16/float16) on their device, a scale that is a finite float32
// (the kernels scale the output by it in float32).
inline void check_softmax_embed_args(const at::Tensor& logits, const at::Tensor& embedding,
                                     const at::Tensor& temperature, double scale) {
  check_floating(embedding, "embedding", {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK(embedding.dim() == 2, "duo_fast: embedding must be [vocab_size, d], got shape ", embedding.sizes());
  TORCH_CHECK(std::abs(scale) <= kFloat32Max, "duo_fast: scale must be in [", -kFloat32Max, ", ", kFloat32Max,
              "] (the output is scaled in float32), got ", scale);
  check_same_device(logits, "logits", embedding, "embedding");
  TORCH_CHECK(logits.dim() >= 1 && embedding.size(0) == logits.size(-1), "duo_fast: embedding has ",
              embedding.size(0), " rows, expected one per logit: logits has shape ", logits.sizes());
  check_canvas_logits(logits, temperature);
}

// Levels of the curriculum ops: float64 of x0's shape (the wrapper converts),
// gamma finite, inv_tau finite and > 0.
inline void check_curriculum_levels(const at::Tensor& x0, const at::Tensor& gamma, const at::Tensor& inv_tau) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{gamma, "gamma"}, {inv_tau, "inv_tau"}}) {
    TORCH_CHECK(t.scalar_type() == at::kDouble, "duo_fast: ", name, " has dtype ", t.scalar_type(),
                ", expected Double (the wrapper converts)");
    TORCH_CHECK(t.sizes() == x0.sizes(), "duo_fast: ", name, " has shape ", t.sizes(), ", expected x0's shape ",
                x0.sizes());
    check_same_device(x0, "x0", t, name);
  }
  if (x0.numel() == 0 || !check_values_on_host(gamma)) return;
  TORCH_CHECK(at::isfinite(gamma).all().item<bool>(), "duo_fast: gamma must be finite");
  auto [lo, hi] = at::aminmax(inv_tau);
  const double mn = lo.item<double>(), mx = hi.item<double>();
  TORCH_CHECK(check::valid_inv_tau(mn) && check::valid_inv_tau(mx), "duo_fast: inv_tau must be finite and > 0, at most ",
              kFloat32Max, " (the largest float32: the kernels scale the noise by it in float32), got values in [", mn,
              ", ", mx, "]");
}

// curriculum_topk: 1 <= k <= K - 1, zt_rule 0 (exact) or 1 (reference).
inline void check_topk_args(const at::Tensor& x0, const at::Tensor& gamma, const at::Tensor& inv_tau, int64_t k,
                            int64_t vocab_size, int64_t zt_rule) {
  check_vocab(vocab_size);
  TORCH_CHECK(k >= 1 && k <= vocab_size - 1, "duo_fast: k must be in [1, vocab_size - 1] = [1, ", vocab_size - 1,
              "], got ", k);
  TORCH_CHECK(zt_rule == 0 || zt_rule == 1, "duo_fast: zt_rule must be 0 (exact) or 1 (reference), got ", zt_rule);
  check_token_ids(x0, "x0", vocab_size);
  check_curriculum_levels(x0, gamma, inv_tau);
}

// embedding [K, d] float32/bfloat16/float16 on x0's device.
inline void check_embedding(const at::Tensor& embedding, const at::Tensor& x0) {
  check_floating(embedding, "embedding", {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK(embedding.dim() == 2 && embedding.size(1) >= 1, "duo_fast: embedding must be [vocab_size, d], got shape ",
              embedding.sizes());
  check_same_device(x0, "x0", embedding, "embedding");
}

// curriculum_embed: embedding [K, d], x0 ids in [0, K), the levels.
inline void check_curriculum_embed_args(const at::Tensor& x0, const at::Tensor& gamma, const at::Tensor& inv_tau,
                                        const at::Tensor& embedding) {
  check_embedding(embedding, x0);
  check_vocab(embedding.size(0), "embedding.size(0) (the vocabulary size)");
  check_token_ids(x0, "x0", embedding.size(0));
  check_curriculum_levels(x0, gamma, inv_tau);
}

// curriculum_embed_backward: the forward's arguments, its log-sum-exp and grad_h [x0's shape, d].
inline void check_curriculum_embed_backward_args(const at::Tensor& grad_h, const at::Tensor& x0,
                                                 const at::Tensor& gamma, const at::Tensor& inv_tau,
                                                 const at::Tensor& lse, int64_t vocab_size) {
  check_vocab(vocab_size);
  check_token_ids(x0, "x0", vocab_size);
  check_curriculum_levels(x0, gamma, inv_tau);
  TORCH_CHECK(lse.scalar_type() == at::kDouble && lse.sizes() == x0.sizes(),
              "duo_fast: lse must be Double of x0's shape, got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(grad_h.dim() == x0.dim() + 1 && grad_h.sizes().slice(0, x0.dim()) == x0.sizes(),
              "duo_fast: grad_h has shape ", grad_h.sizes(), ", expected x0's shape + [d]");
  check_same_device(x0, "x0", grad_h, "grad_h");
  check_same_device(x0, "x0", lse, "lse");
}

// topk_bag_backward: grad_h [..., d], ids int64 [..., k] in [0, K), weights float32 [..., k].
inline void check_bag_backward_args(const at::Tensor& grad_h, const at::Tensor& ids, const at::Tensor& weights,
                                    int64_t vocab_size) {
  check_vocab(vocab_size);
  TORCH_CHECK(ids.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat,
              "duo_fast: ids must be Long and weights Float, got ", ids.scalar_type(), " and ", weights.scalar_type());
  TORCH_CHECK(ids.dim() >= 1 && ids.sizes() == weights.sizes(), "duo_fast: ids and weights must have one shape, got ",
              ids.sizes(), " and ", weights.sizes());
  TORCH_CHECK(grad_h.dim() == ids.dim() && grad_h.sizes().slice(0, grad_h.dim() - 1) == ids.sizes().slice(0, ids.dim() - 1),
              "duo_fast: grad_h has shape ", grad_h.sizes(), ", expected ids' leading shape ",
              ids.sizes().slice(0, ids.dim() - 1), " + [d]");
  check_same_device(ids, "ids", weights, "weights");
  check_same_device(ids, "ids", grad_h, "grad_h");
  check_token_ids(ids, "ids", vocab_size);
}

}  // namespace duo_fast
