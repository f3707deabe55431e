// C entry points for the tests (ctypes), compiled by g++ together with every
// csrc/cuda/*.cu file against the CUDA emulation (tests/emulation/harness.py):
//   * the emulated CUDA launchers, on host memory standing in for device memory;
//   * the shared host/device math headers (Philox, uniforms, normal functions),
//     so tests can check them against known answers and scipy.
// With -DDUO_EMU_MAIN it is also a program that runs every emulated kernel on
// small inputs (for the AddressSanitizer + UBSan run; with --small, fewer and
// smaller rows for the ThreadSanitizer run in thread mode), exiting non-zero on
// a mismatch with the host evaluation of the same header math.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "duo_fast/canvas_step.h"
#include "duo_fast/cuda_compat.h"
#include "duo_fast/curriculum_embed.h"
#include "duo_fast/device_check.h"
#include "duo_fast/distill_kl.h"
#include "duo_fast/logits.h"
#include "duo_fast/sample_zt.h"
#include "duo_fast/philox.h"
#include "duo_fast/random.h"
#include "duo_fast/sample_step.h"
#include "duo_fast/gamma_to_alpha.h"
#include "duo_fast/gamma_to_alpha_table.h"
#include "duo_fast/softmax_embed.h"
#include "duo_fast/special.h"
#include "duo_fast/curriculum_topk.h"
#include "duo_fast/usdm_loss.h"
#include "curriculum_embed_mma.h"
#include "launchers.h"

using namespace duo_fast;

extern "C" {

// ---- math headers ----
void df_philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, uint32_t* out) {
  const Philox4x32 r = philox4x32_10(Philox4x32{{c0, c1, c2, c3}}, k0, k1);
  for (int i = 0; i < 4; ++i) out[i] = r.v[i];
}
void df_uniforms(uint64_t seed, uint64_t stream, uint64_t offset, int64_t n, double* out) {
  for (int64_t i = 0; i < n; i += 2) {
    const Uniform2 u = uniform2(philox_block(seed, stream, offset + uint64_t(i / 2)));
    out[i] = u.a;
    if (i + 1 < n) out[i + 1] = u.b;
  }
}
void df_normals(uint64_t seed, uint64_t stream, uint64_t offset, int64_t n, double* out) {
  for (int64_t i = 0; i < n; i += 2) {
    const Normal2 z = normal2(philox_block(seed, stream, offset + uint64_t(i / 2)));
    out[i] = z.a;
    if (i + 1 < n) out[i + 1] = z.b;
  }
}
void df_uniform_index(uint64_t seed, int64_t n, uint32_t bound, uint32_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const Philox4x32 r = philox_block(seed, uint64_t(i), 0);
    out[i] = uniform_index(r.v[0], r.v[1], bound);
  }
}
void df_ndtri(const double* p, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = ndtri(p[i]);
}
void df_log_ndtr(const double* x, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = log_ndtr(x[i]);
}
int df_schedule_table_size() { return schedule::kTableSize; }
void df_build_schedule_table(int64_t vocab_size, double* out) {
  std::vector<double> t = schedule::build_table(double(vocab_size));
  for (int i = 0; i < schedule::kTableSize; ++i) out[i] = t[i];
}

// ---- emulated CUDA launchers ----
// The device-side check counters (device_check.h) the df_emu_* launchers report to.
static uint32_t g_checks[check::kNumArgs] = {};
// Copies the counters to out[kNumArgs] and zeroes them; returns kNumArgs.
int df_emu_take_checks(uint32_t* out) {
  for (int i = 0; i < check::kNumArgs; ++i) out[i] = g_checks[i], g_checks[i] = 0;
  return check::kNumArgs;
}

int df_emu_gamma_to_alpha_f32(const float* g, float* a, float* d, int64_t n, const double* table) {
  return cuda::gamma_to_alpha_f32(g, a, d, n, table, g_checks, nullptr);
}
int df_emu_gamma_to_alpha_f64(const double* g, double* a, double* d, int64_t n, const double* table) {
  return cuda::gamma_to_alpha_f64(g, a, d, n, table, g_checks, nullptr);
}

int df_emu_sample_zt(const int64_t* x0, const double* gamma_t, const double* gamma_s, int64_t* z_t, int64_t* z_s,
                     int64_t n, int64_t vocab_size, uint64_t seed, uint64_t offset) {
  return cuda::sample_zt(x0, gamma_t, gamma_s, z_t, z_s, n, vocab_size, seed, offset, g_checks, nullptr);
}

// dtypes: 0 float32, 1 bfloat16 bits, 2 float16 bits (launchers.h); grad in the student's.
int df_emu_distill_kl(const void* student, int student_dtype, const void* teacher, int teacher_dtype, float* kl,
                      void* grad, int64_t rows, int64_t K, int direction) {
  return cuda::distill_kl(student, student_dtype, teacher, teacher_dtype, kl, grad, rows, K, direction, nullptr);
}

// dtype: 0 float32, 1 bfloat16 bits, 2 float16 bits (launchers.h); grad in the same dtype.
int df_emu_usdm_loss(const void* logits, int dtype, const int64_t* z, const int64_t* x0, const double* alpha,
                     const double* dalpha, float* loss, void* grad, int64_t rows, int64_t K) {
  return cuda::usdm_loss(logits, dtype, z, x0, alpha, dalpha, loss, grad, rows, K, g_checks, nullptr);
}

// float32 -> bfloat16 / float16 bits, rounded as the kernels round (logits.h).
int df_round_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<bf16_bits>(in[i]).bits;
  return 0;
}
int df_round_f16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<f16_bits>(in[i]).bits;
  return 0;
}
// bfloat16 / float16 bits -> float32 (logits.h).
int df_widen_bf16(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(bf16_bits{in[i]});
  return 0;
}
int df_widen_f16(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(f16_bits{in[i]});
  return 0;
}

// dtype: 0 float32, 1 bfloat16 bits, 2 float16 bits (launchers.h). _rows: rows of a
// larger call, from Philox streams row_offset.. (the plain one: row_offset 0).
int df_emu_sample_step_rows(const void* logits, int dtype, const int64_t* z, const double* alpha_t,
                            const double* alpha_s, int64_t* out, int64_t rows, int64_t K, double kappa,
                            double temperature, double top_p, uint64_t seed, uint64_t offset, uint64_t row_offset) {
  return cuda::sample_step(logits, dtype, z, alpha_t, alpha_s, out, rows, K, kappa, temperature, top_p, seed, offset,
                           row_offset, g_checks, nullptr);
}
int df_emu_sample_step(const void* logits, int dtype, const int64_t* z, const double* alpha_t, const double* alpha_s,
                       int64_t* out, int64_t rows, int64_t K, double kappa, double temperature, double top_p,
                       uint64_t seed, uint64_t offset) {
  return df_emu_sample_step_rows(logits, dtype, z, alpha_t, alpha_s, out, rows, K, kappa, temperature, top_p, seed,
                                 offset, 0);
}

int df_emu_posterior(const void* logits, int dtype, const int64_t* z, const double* alpha_t, const double* alpha_s,
                     float* q, int64_t rows, int64_t K, double kappa, double temperature, double top_p) {
  return cuda::posterior(logits, dtype, z, alpha_t, alpha_s, q, rows, K, kappa, temperature, top_p, g_checks,
                         nullptr);
}

// dtype: 0 float32, 1 bfloat16 bits, 2 float16 bits (launchers.h).
int df_emu_canvas_step(const void* logits, int dtype, const double* temperature, int64_t* sample, int64_t* argmax,
                       float* entropy, int64_t rows, int64_t K, uint64_t seed, uint64_t offset) {
  return cuda::canvas_step(logits, dtype, temperature, sample, argmax, entropy, rows, K, seed, offset, g_checks,
                           nullptr);
}

// softmax_embed: dtype codes as above; tensor_cores needs emb_dtype 1 (bf16).
int df_emu_softmax_embed(const void* logits, int dtype, const double* temperature, const void* embedding,
                         int emb_dtype, int tensor_cores, int64_t rows, int64_t K, int64_t d, double scale,
                         float* row_max, double* row_sum, float* h) {
  return cuda::softmax_embed(logits, dtype, temperature, embedding, emb_dtype, tensor_cores != 0, rows, K, d, scale,
                             row_max, row_sum, h, g_checks, nullptr);
}

// The random inputs of the top-k curriculum for token `stream` (curriculum_topk.h), for
// the float64 reference: u[k], xi, ranks[k] (distinct ids != x, rank order).
void df_topk_draws(uint64_t seed, uint64_t offset, uint64_t stream, int64_t k, int64_t vocab_size, int64_t x,
                   double* u, double* xi, int64_t* ranks) {
  std::vector<int32_t> keys(topk::swap_map_capacity(k), -1), vals(keys.size());
  topk::draw_uniforms(seed, offset, stream, k, u);
  *xi = topk::draw_xi(seed, offset, stream);
  topk::draw_ranks(seed, offset, stream, k, vocab_size, x, {keys.data(), vals.data(), uint32_t(keys.size() - 1)},
                   ranks);
}

// The SM count the emulated top-k launches are sized for (the grid: slots / 4
// blocks); a small count makes every warp loop over several tokens.
static int64_t g_emu_sm_count = 108;
void df_emu_set_sm_count(int64_t sm_count) { g_emu_sm_count = sm_count; }
int64_t df_topk_scratch_slots(int64_t n, int64_t k, int64_t sm_count) { return cuda::topk_scratch_slots(n, k, sm_count); }

int df_emu_curriculum_topk(const int64_t* x0, const double* gamma, const double* inv_tau, int64_t* ids,
                           float* weights, int64_t* z, int64_t n, int64_t k, int64_t vocab_size, int zt_rule,
                           uint64_t seed, uint64_t offset) {
  const int64_t slots = cuda::topk_scratch_slots(n, k, g_emu_sm_count);
  std::vector<int32_t> map(size_t(slots * 2 * cuda::topk_map_capacity(k)), -1);
  return cuda::curriculum_topk(x0, gamma, inv_tau, ids, weights, z, n, k, vocab_size, zt_rule, seed, offset,
                               map.data(), slots, g_checks, nullptr);
}

int df_emu_curriculum_topk_embed(const int64_t* x0, const double* gamma, const double* inv_tau,
                                 const void* embedding, int emb_dtype, int64_t d, float* h, int64_t* ids,
                                 float* weights, int64_t* z, int64_t n, int64_t k, int64_t vocab_size, int zt_rule,
                                 uint64_t seed, uint64_t offset) {
  const int64_t slots = cuda::topk_scratch_slots(n, k, g_emu_sm_count);
  std::vector<int32_t> map(size_t(slots * 2 * cuda::topk_map_capacity(k)), -1);
  return cuda::curriculum_topk_embed(x0, gamma, inv_tau, embedding, emb_dtype, d, h, ids, weights, z, n, k,
                                     vocab_size, zt_rule, seed, offset, map.data(), slots, g_checks, nullptr);
}

// grad has vocab_size rows (ids outside [0, vocab_size) are dropped and counted).
int df_emu_topk_bag_backward_atomic(const float* grad_h, const int64_t* ids, const float* weights, float* grad,
                                    int64_t tokens, int64_t k, int64_t d, int64_t vocab_size) {
  return cuda::topk_bag_backward_atomic(grad_h, ids, weights, grad, tokens, k, d, vocab_size, g_checks, nullptr);
}

int df_emu_topk_bag_backward_sorted(const float* grad_h, const int64_t* sorted_ids, const int64_t* order,
                                    const float* weights, float* grad, int64_t entries, int64_t k, int64_t d,
                                    int64_t vocab_size) {
  std::vector<float> partial(size_t(cuda::topk_bag_partial_floats(entries, k, d)), NAN);
  return cuda::topk_bag_backward_sorted(grad_h, sorted_ids, order, weights, grad, entries, k, d, vocab_size,
                                        partial.data(), g_checks, nullptr);
}
int64_t df_topk_bag_segment(int64_t k) { return cuda::topk_bag_segment(k); }

// eps[token, 0..K) of the exact curriculum input (curriculum_embed.h): the test hook
// that makes the noise visible.
void df_curriculum_noise(uint64_t seed, uint64_t offset, uint64_t token, int64_t vocab_size, float* out) {
  float eps[curriculum::kNoisePerBlock];
  for (int64_t j = 0; j < vocab_size; j += curriculum::kNoisePerBlock) {
    curriculum::noise4(seed, offset, token, j / curriculum::kNoisePerBlock, eps);
    for (int e = 0; e < curriculum::kNoisePerBlock && j + e < vocab_size; ++e) out[j + e] = eps[e];
  }
}

int df_emu_curriculum_embed(const int64_t* x0, const double* gamma, const double* inv_tau, const float* embedding,
                            int64_t n, int64_t vocab_size, int64_t d, uint64_t seed, uint64_t offset, float* h,
                            int64_t* z, double* lse) {
  return cuda::curriculum_embed(x0, gamma, inv_tau, embedding, n, vocab_size, d, seed, offset, h, z, lse, g_checks,
                                nullptr);
}

int df_emu_curriculum_embed_backward(const float* grad_h, const int64_t* x0, const double* gamma,
                                     const double* inv_tau, const double* lse, int64_t n, int64_t vocab_size,
                                     int64_t d, uint64_t seed, uint64_t offset, float* grad_embedding) {
  return cuda::curriculum_embed_backward(grad_h, x0, gamma, inv_tau, lse, n, vocab_size, d, seed, offset,
                                         grad_embedding, nullptr);
}

// The random inputs of sample_zt for token `token` (sample_zt.h), for the float64
// reference: eps_x, the uniform U of the max of the K-1 other noises, and the
// uniform index r in [0, K - 1) whose id j* = r + (r >= x) holds that max.
void df_latent_draw(uint64_t seed, uint64_t offset, uint64_t token, int64_t vocab_size, double* eps_x, double* u,
                    int64_t* r) {
  const Philox4x32 b0 = philox_block(seed, token, offset);
  const Philox4x32 b1 = philox_block(seed, token, offset + 1);
  *eps_x = normal2(b0).a;
  *u = uniform53(b1.v[0], b1.v[1]);
  *r = int64_t(uniform_index(b1.v[2], b1.v[3], uint32_t(vocab_size - 1)));
}

// The random inputs of sample_step for row `token` (sample_step.h): the uniform that
// picks the mixture part, the inverse-CDF uniform, and the uniform part's id.
void df_step_draw(uint64_t seed, uint64_t offset, uint64_t token, int64_t vocab_size, double* u_part, double* u_cat,
                  int64_t* uniform_id) {
  const sampling::StepDraw d = sampling::step_draw(seed, offset, token);
  *u_part = d.u_part;
  *u_cat = d.u_cat;
  *uniform_id = int64_t(uniform_index(d.hi, d.lo, uint32_t(vocab_size)));
}

// rank_key of sample_step.h (ties by lower id; -0 like +0).
uint64_t df_rank_key(float x, int64_t j) { return sampling::rank_key(x, j); }

}  // extern "C"

#ifdef DUO_EMU_MAIN
// Every emulated kernel once, on odd sizes, compared with the host evaluation.
// Seconds since the previous call (--small prints each section's time).
static double lap() {
  static auto t = std::chrono::steady_clock::now();
  const auto now = std::chrono::steady_clock::now();
  const double s = std::chrono::duration<double>(now - t).count();
  t = now;
  return s;
}

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
  auto section = [&](const char* name) {
    if (small) std::printf("  %-20s %.2f s\n", name, lap());
  };
  lap();
  int failures = 0;
  for (int64_t K : {int64_t(2), small ? int64_t(1000) : int64_t(50257)}) {
    const std::vector<double> table = schedule::build_table(double(K));
    for (int64_t n : {int64_t(1), int64_t(127), small ? int64_t(127) : int64_t(1000)}) {
      std::vector<double> g(n), a(n), d(n);
      for (int64_t i = 0; i < n; ++i) g[i] = -25.0 + 50.0 * double(i) / double(n);
      const int err = cuda::gamma_to_alpha_f64(g.data(), a.data(), d.data(), n, table.data(), nullptr, nullptr);
      for (int64_t i = 0; i < n; ++i) {
        double ea, ed;
        schedule::gamma_to_alpha(table.data(), g[i], ea, ed);
        if (err != 0 || ea != a[i] || ed != d[i]) {
          ++failures;
          std::printf("gamma_to_alpha mismatch K=%lld i=%lld\n", (long long)K, (long long)i);
          break;
        }
      }
    }
  }
  section("gamma_to_alpha");
  for (int64_t K : {2, 1000}) {
    const int64_t n = small ? 100 : 777;
    std::vector<int64_t> x(n), zt(n), zs(n);
    std::vector<double> gt(n), gs(n);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = (i * 7919) % K;
      gt[i] = -4.0 + 6.0 * double(i) / double(n);
      gs[i] = gt[i] - 1.0;
    }
    const int err = cuda::sample_zt(x.data(), gt.data(), gs.data(), zt.data(), zs.data(), n, K, 42, 6, nullptr, nullptr);
    for (int64_t i = 0; i < n; ++i) {
      const latent::Draw d = latent::draw(42, 6, uint64_t(i), x[i], K);
      if (err != 0 || zt[i] != latent::select(d, x[i], gt[i]) || zs[i] != latent::select(d, x[i], gs[i]) || zt[i] < 0 ||
          zt[i] >= K) {
        ++failures;
        std::printf("sample_zt mismatch K=%lld i=%lld\n", (long long)K, (long long)i);
        break;
      }
    }
  }
  section("sample_zt");
  for (int64_t K : small ? std::vector<int64_t>{333} : std::vector<int64_t>{2, 333}) {
    const int64_t rows = small ? 2 : 3;
    std::vector<float> ls(rows * K), lt(rows * K), kl(rows), grad(rows * K);
    for (int64_t i = 0; i < rows * K; ++i) {
      ls[i] = float((i * 37) % 11) - 5.0f;
      lt[i] = float((i * 53) % 7) - 3.0f;
    }
    // Masked entries (-inf in both, probability 0): the first 300 columns of row 1.
    if (K > 300)
      for (int64_t j = 0; j < 300; ++j) ls[K + j] = lt[K + j] = -INFINITY;
    for (int dir : {0, 1}) {
      const int err = cuda::distill_kl(ls.data(), 0, lt.data(), 0, kl.data(), grad.data(), rows, K, dir, nullptr);
      for (int64_t r = 0; r < rows && err == 0; ++r) {
        double ms = -INFINITY, mt = -INFINITY, ss = 0, st = 0, acc = 0;
        for (int64_t j = 0; j < K; ++j) ms = fmax(ms, ls[r * K + j]), mt = fmax(mt, lt[r * K + j]);
        for (int64_t j = 0; j < K; ++j) ss += exp(ls[r * K + j] - ms), st += exp(lt[r * K + j] - mt);
        for (int64_t j = 0; j < K; ++j)
          acc += distill::kl_term<double>(dir, ls[r * K + j], lt[r * K + j], ms + log(ss), mt + log(st));
        if (fabs(acc - kl[r]) > 1e-4 * (1 + fabs(acc))) {
          ++failures;
          std::printf("distill_kl mismatch K=%lld row=%lld\n", (long long)K, (long long)r);
        }
      }
      if (err != 0) ++failures;
    }
  }
  section("distill_kl");
  for (int64_t K : small ? std::vector<int64_t>{1000} : std::vector<int64_t>{2, 7, 1000}) {
    // Loss finite, >= 0 (a KL rate) and each gradient row sums to 0 (softmax Jacobian);
    // rows with an entry far above the rest exercise the p > 1/2 path; with K = 1000,
    // row 1 has -inf (probability 0) in its first 300 columns and row 4 is all -inf
    // (unspecified values, but nothing out of bounds).
    const int64_t rows = K == 1000 ? 5 : 4;
    std::vector<float> logits(rows * K), loss(rows), grad(rows * K);
    std::vector<int64_t> z(rows), x(rows);
    std::vector<double> alpha(rows), dalpha(rows);
    for (int64_t i = 0; i < rows * K; ++i) logits[i] = float((i * 31) % 13) * 0.5f;
    for (int64_t r = 0; r < rows; ++r) {
      x[r] = r % K;
      z[r] = (r % 2) ? x[r] : (x[r] + 1) % K;
      alpha[r] = 0.1 + 0.2 * double(r);
      dalpha[r] = -1.0;
      logits[r * K + (r + 2) % K] = 40.0f;
    }
    if (K == 1000) {
      for (int64_t j = 0; j < 300; ++j) logits[K + j] = -INFINITY;
      for (int64_t j = 0; j < K; ++j) logits[4 * K + j] = -INFINITY;
    }
    const int err = cuda::usdm_loss(logits.data(), 0, z.data(), x.data(), alpha.data(), dalpha.data(), loss.data(),
                                    grad.data(), rows, K, nullptr, nullptr);
    // The same rows as bfloat16, one entry into the buffer (rows off 16-byte boundaries,
    // gradient stores one entry at a time): finite, >= 0 losses, nothing out of bounds.
    std::vector<bf16_bits> lh(rows * K + 1), gh(rows * K);
    for (int64_t i = 0; i < rows * K; ++i) lh[i + 1] = from_float<bf16_bits>(logits[i]);
    std::vector<float> loss_h(rows);
    const int err_h = cuda::usdm_loss(lh.data() + 1, 1, z.data(), x.data(), alpha.data(), dalpha.data(), loss_h.data(),
                                      gh.data(), rows, K, nullptr, nullptr);
    for (int64_t r = 0; r < (K == 1000 ? 4 : rows); ++r)
      if (err_h != 0 || !(loss_h[r] > -1e-6f) || !std::isfinite(loss_h[r])) {
        ++failures;
        std::printf("usdm_loss bf16 check failed K=%lld row=%lld loss=%g\n", (long long)K, (long long)r,
                    double(loss_h[r]));
      }
    for (int64_t r = 0; r < (K == 1000 ? 4 : rows); ++r) {
      double sum = 0.0, mx = 0.0;
      for (int64_t j = 0; j < K; ++j) sum += grad[r * K + j], mx = fmax(mx, fabs(grad[r * K + j]));
      if (err != 0 || !(loss[r] > -1e-6f) || !std::isfinite(loss[r]) || fabs(sum) > 1e-5 * (1.0 + mx)) {
        ++failures;
        std::printf("usdm_loss check failed K=%lld row=%lld loss=%g gradsum=%g\n", (long long)K, (long long)r,
                    double(loss[r]), sum);
      }
    }
  }
  section("usdm_loss");
  for (int64_t K : small ? std::vector<int64_t>{1000} : std::vector<int64_t>{2, 7, 1000}) {
    // posterior: rows are laws (>= 0, sum 1); sample_step: ids in range, and with
    // top_p < 1, kappa = 1 and alpha_s = 1 only the point mass at z or ids of the
    // posterior's support are drawn. Ties in the logits exercise the id tie-break.
    // The last row holds a NaN (no distribution): counted, z kept, a NaN row of q.
    const int64_t rows = small ? 3 : 6, bad = rows - 1;
    std::vector<float> logits(rows * K), q(rows * K);
    std::vector<int64_t> z(rows), out(rows);
    std::vector<double> at(rows), as(rows, 1.0);
    for (int64_t i = 0; i < rows * K; ++i) logits[i] = float((i * 17) % 11) * 0.7f - 3.0f;
    logits[bad * K + K / 2] = NAN;
    for (int64_t r = 0; r < rows; ++r) z[r] = (r * 3) % K, at[r] = 0.15 * double(r % 5);
    for (double top_p : {1.0, 0.6}) {
      uint32_t counters[check::kNumArgs] = {};
      int err = cuda::posterior(logits.data(), 0, z.data(), at.data(), as.data(), q.data(), rows, K, 1.0, 0.8, top_p,
                                counters, nullptr);
      err |= cuda::sample_step(logits.data(), 0, z.data(), at.data(), as.data(), out.data(), rows, K, 1.0, 0.8, top_p,
                               3, 0, 0, counters, nullptr);
      bool bad_ok = counters[check::kLogits] == 2 && out[bad] == z[bad];
      for (int64_t j = 0; j < K; ++j) bad_ok = bad_ok && std::isnan(q[bad * K + j]);
      for (int a = 0; a < check::kNumArgs; ++a) bad_ok = bad_ok && (a == check::kLogits || counters[a] == 0);
      if (!bad_ok) {
        ++failures;
        std::printf("sample_step/posterior: the NaN row was not reported as check::kLogits K=%lld\n", (long long)K);
      }
      for (int64_t r = 0; r < bad; ++r) {
        double sum = 0.0, mn = 1.0;
        for (int64_t j = 0; j < K; ++j) sum += q[r * K + j], mn = fmin(mn, q[r * K + j]);
        const bool in_support = out[r] >= 0 && out[r] < K && q[r * K + out[r]] > 0.0f;
        if (err != 0 || fabs(sum - 1.0) > 1e-5 || mn < 0.0 || !in_support) {
          ++failures;
          std::printf("sample_step/posterior check failed K=%lld row=%lld sum=%g min=%g out=%lld\n", (long long)K,
                      (long long)r, sum, mn, (long long)out[r]);
        }
      }
    }
  }
  section("sample_step");
  for (int64_t K : small ? std::vector<int64_t>{1000} : std::vector<int64_t>{2, 7, 1000}) {
    // canvas_step: argmax = the host's first max, the sample drawn from the support
    // (no -inf entry), the entropy against the host's two-pass sums. Row `bad`
    // holds a NaN, row `cold` an invalid temperature: counted, 0, 0, NaN.
    const int64_t rows = small ? 4 : 8, bad = rows - 1, cold = rows - 2;
    std::vector<float> logits(rows * K), entropy(rows);
    std::vector<int64_t> sample(rows), argmax(rows);
    std::vector<double> temp(rows);
    for (int64_t i = 0; i < rows * K; ++i) logits[i] = float((i * 17) % 11) * 0.7f - 3.0f;
    for (int64_t i = 1; i < rows * K; i += 5) logits[i] = -INFINITY;
    logits[bad * K + K / 2] = NAN;
    for (int64_t r = 0; r < rows; ++r) temp[r] = 0.3 + 0.4 * double(r);
    temp[cold] = 0.0;
    uint32_t counters[check::kNumArgs] = {};
    const int err = cuda::canvas_step(logits.data(), 0, temp.data(), sample.data(), argmax.data(), entropy.data(),
                                      rows, K, 5, 0, counters, nullptr);
    bool bad_ok = counters[check::kLogits] == 1 && counters[check::kTemperature] == 1;
    for (int64_t r : {bad, cold}) bad_ok = bad_ok && sample[r] == 0 && argmax[r] == 0 && std::isnan(entropy[r]);
    if (err != 0 || !bad_ok) {
      ++failures;
      std::printf("canvas_step: the bad rows were not reported K=%lld\n", (long long)K);
    }
    for (int64_t r = 0; r < cold; ++r) {
      const float* x = logits.data() + r * K;
      const float inv_t = float(1.0 / temp[r]);
      int64_t a = 0;
      for (int64_t j = 1; j < K; ++j) a = x[j] > x[a] ? j : a;
      double delta = 0.0, b = 0.0;
      for (int64_t j = 0; j < K; ++j) {
        const float y = canvas::scaled(x[j], x[a], inv_t), w = canvas::weight(y);
        delta += j == a ? 0.0 : double(w), b += double(canvas::entropy_term(w, y));
      }
      const double h = canvas::entropy(delta, b);
      if (argmax[r] != a || sample[r] < 0 || sample[r] >= K || x[sample[r]] == -INFINITY ||
          fabs(double(entropy[r]) - h) > 1e-6 * h) {
        ++failures;
        std::printf("canvas_step check failed K=%lld row=%lld argmax=%lld/%lld sample=%lld H=%g/%g\n", (long long)K,
                    (long long)r, (long long)argmax[r], (long long)a, (long long)sample[r], double(entropy[r]), h);
      }
    }
  }
  section("canvas_step");
  for (int64_t K : small ? std::vector<int64_t>{200} : std::vector<int64_t>{3, 200}) {
    // softmax_embed against the host's float64 sum over the kept weights, in float
    // (float32 E) and on tensor cores (bf16 E; the probabilities rounded to bf16:
    // 2^-8 of sum p |E|); the last row holds a NaN (counted, a NaN row of h).
    const int64_t rows = small ? 5 : 70, d = 40, bad = rows - 1;
    const double scale = 1.5;
    std::vector<float> logits(rows * K), E(K * d), Ebf(K * d), h(rows * d), mx(rows);
    std::vector<uint16_t> Eb(K * d);
    std::vector<double> temp(rows), sum(rows);
    for (int64_t i = 0; i < rows * K; ++i) logits[i] = float((i * 37) % 23) * 0.9f - 9.0f;
    logits[bad * K + K / 2] = NAN;
    for (int64_t i = 0; i < K * d; ++i) {
      E[i] = float((i * 13) % 17) / 8.0f - 1.0f;
      Eb[i] = from_float<bf16_bits>(E[i]).bits;
      Ebf[i] = to_float(bf16_bits{Eb[i]});
    }
    for (int64_t r = 0; r < rows; ++r) temp[r] = 0.2 + 0.05 * double(r % 9);
    for (int tc : {0, 1}) {
      uint32_t counters[check::kNumArgs] = {};
      const float* Eh = tc ? Ebf.data() : E.data();
      const int err = cuda::softmax_embed(logits.data(), 0, temp.data(), tc ? static_cast<const void*>(Eb.data())
                                                                            : static_cast<const void*>(E.data()),
                                          tc, tc != 0, rows, K, d, scale, mx.data(), sum.data(), h.data(), counters,
                                          nullptr);
      bool ok = err == 0 && counters[check::kLogits] == 1;
      for (int64_t c = 0; c < d; ++c) ok = ok && std::isnan(h[bad * d + c]);
      for (int64_t r = 0; r < bad && ok; ++r) {
        const float* x = logits.data() + r * K;
        float M = -INFINITY;
        for (int64_t j = 0; j < K; ++j) M = std::max(M, x[j]);
        const float inv_t = float(1.0 / temp[r]), lt = soft_embedding::log_theta(K);
        double S = 0.0;
        for (int64_t j = 0; j < K; ++j) S += soft_embedding::weight(canvas::scaled(x[j], M, inv_t), lt);
        for (int64_t c = 0; c < d; ++c) {
          double want = 0.0, mag = 0.0;
          for (int64_t j = 0; j < K; ++j) {
            const double p = soft_embedding::weight(canvas::scaled(x[j], M, inv_t), lt) / S;
            want += p * Eh[j * d + c], mag += p * fabs(Eh[j * d + c]);
          }
          const double tol = (tc ? 0x1p-8 : 1e-6) * mag * scale + 1e-6;
          ok = ok && fabs(double(h[r * d + c]) - want * scale) <= tol;
        }
      }
      if (!ok) {
        ++failures;
        std::printf("softmax_embed check failed K=%lld tensor_cores=%d\n", (long long)K, tc);
      }
    }
  }
  section("softmax_embed");
  for (int64_t K : {2, 9, 1000}) {
    // curriculum_topk / _embed vs the host evaluation of topk::token; bag backward
    // (atomic and sorted) vs a host scatter.
    const int64_t n = small ? 9 : 37, d = 5;
    for (int64_t k : {int64_t(1), K - 1, std::min<int64_t>(K - 1, 7)}) {
      std::vector<int64_t> x(n), ids(n * k), z(n), hid(n * k), hz(n), ids2(n * k), z2(n);
      std::vector<double> g(n), it(n), kept(k);
      std::vector<float> w(n * k), hw(n * k), w2(n * k), emb(K * d), h(n * d), gh(n * d), ga(K * d, 0.f), gs(K * d, 0.f);
      for (int64_t t = 0; t < n; ++t) x[t] = (t * 7) % K, g[t] = -4.0 + 0.2 * double(t), it[t] = t % 3 ? 1.0 : 50.0;
      for (int64_t i = 0; i < K * d; ++i) emb[i] = float((i * 13) % 17) - 8.0f;
      for (int64_t i = 0; i < n * d; ++i) gh[i] = float((i * 5) % 7) - 3.0f;
      int err = 0;
      {
        // sm_count 1: 64 warps, fewer than the tokens of the full run (grid-stride loops)
        const int64_t slots = cuda::topk_scratch_slots(n, k, 1);
        std::vector<int32_t> map(size_t(slots * 2 * cuda::topk_map_capacity(k)), -1);
        err |= cuda::curriculum_topk(x.data(), g.data(), it.data(), ids.data(), w.data(), z.data(), n, k, K, 0, 5, 0,
                                     map.data(), slots, nullptr, nullptr);
        std::fill(map.begin(), map.end(), -1);
        err |= cuda::curriculum_topk_embed(x.data(), g.data(), it.data(), emb.data(), 0, d, h.data(), ids2.data(),
                                           w2.data(), z2.data(), n, k, K, 0, 5, 0, map.data(), slots, nullptr,
                                           nullptr);
        const int64_t cap = cuda::topk_map_capacity(k);  // every warp leaves its map's keys empty
        for (int64_t sl = 0; sl < slots; ++sl)
          for (int64_t i = 0; i < cap; ++i) err |= map[size_t(sl * 2 * cap + i)] != -1;
      }
      std::vector<int32_t> keys(topk::swap_map_capacity(k), -1), vals(keys.size());
      bool ok = err == 0;
      for (int64_t t = 0; t < n; ++t) {
        std::fill(keys.begin(), keys.end(), -1);
        hz[t] = topk::token(5, 0, uint64_t(t), x[t], g[t], it[t], k, K, 0,
                            {keys.data(), vals.data(), uint32_t(keys.size() - 1)}, hid.data() + t * k,
                            hw.data() + t * k, kept.data()).z;
        ok = ok && hz[t] == z[t] && hz[t] == z2[t];
        for (int64_t i = 0; i < k; ++i) {
          // the warp sums in another order: weights to ~1 float ulp
          ok = ok && hid[t * k + i] == ids[t * k + i] && fabsf(hw[t * k + i] - w[t * k + i]) <= 2e-7f * hw[t * k + i] &&
               ids2[t * k + i] == ids[t * k + i] && w2[t * k + i] == w[t * k + i];
          for (int64_t c = 0; c < d; ++c) ga[ids[t * k + i] * d + c] += w[t * k + i] * gh[t * d + c];
        }
        for (int64_t c = 0; c < d; ++c) {
          float want = 0.0f, mag = 0.0f;
          for (int64_t i = 0; i < k; ++i)
            want += w[t * k + i] * emb[ids[t * k + i] * d + c], mag += fabsf(w[t * k + i] * emb[ids[t * k + i] * d + c]);
          ok = ok && fabsf(h[t * d + c] - want) <= 1e-5f * (mag + 1.0f);
        }
      }
      std::vector<float> gatomic(K * d, 0.f), gsorted(K * d, 0.f);
      std::vector<int64_t> order(n * k), sorted(n * k);
      for (int64_t e = 0; e < n * k; ++e) order[e] = e;
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
      for (int64_t e = 0; e < n * k; ++e) sorted[e] = ids[order[e]];
      err |= cuda::topk_bag_backward_atomic(gh.data(), ids.data(), w.data(), gatomic.data(), n, k, d, K, nullptr, nullptr);
      std::vector<float> partial(size_t(cuda::topk_bag_partial_floats(n * k, k, d)), NAN);
      err |= cuda::topk_bag_backward_sorted(gh.data(), sorted.data(), order.data(), w.data(), gsorted.data(), n * k, k,
                                            d, K, partial.data(), nullptr, nullptr);
      for (int64_t i = 0; i < K * d; ++i)
        ok = ok && fabs(gatomic[i] - ga[i]) <= 1e-3f * (1.f + fabs(ga[i])) && fabs(gsorted[i] - ga[i]) <= 1e-3f * (1.f + fabs(ga[i]));
      if (!ok || err != 0) {
        ++failures;
        std::printf("curriculum_topk check failed K=%lld k=%lld\n", (long long)K, (long long)k);
      }
    }
  }
  {
    // curriculum_embed: z in range, h a convex combination of rows of E (so inside
    // their column range), lse finite; backward: sum_j dE[j] = sum_t dh[t] (rows of
    // P sum to 1). Odd sizes: a partial token group, a partial tile, two column passes.
    section("curriculum_topk");
    const int64_t K = 67, d = 1030, n = small ? 17 : 19;
    std::vector<int64_t> x(n), z(n);
    std::vector<double> g(n), it(n), lse(n);
    std::vector<float> E(K * d), h(n * d), dh(n * d), dE(K * d);
    for (int64_t t = 0; t < n; ++t) x[t] = (t * 5) % K, g[t] = -3.0 + 0.3 * double(t), it[t] = t % 2 ? 1.0 : 1e4;
    for (int64_t i = 0; i < K * d; ++i) E[i] = float((i * 29) % 23) - 11.0f;
    for (int64_t i = 0; i < n * d; ++i) dh[i] = float((i * 7) % 5) - 2.0f;
    int err = cuda::curriculum_embed(x.data(), g.data(), it.data(), E.data(), n, K, d, 3, 0, h.data(), z.data(),
                                     lse.data(), nullptr, nullptr);
    err |= cuda::curriculum_embed_backward(dh.data(), x.data(), g.data(), it.data(), lse.data(), n, K, d, 3, 0,
                                           dE.data(), nullptr);
    bool ok = err == 0;
    for (int64_t t = 0; t < n; ++t) ok = ok && z[t] >= 0 && z[t] < K && std::isfinite(lse[t]);
    for (int64_t c = 0; c < d; ++c) {
      float lo = INFINITY, hi = -INFINITY;
      double col = 0.0, want = 0.0;
      for (int64_t j = 0; j < K; ++j) lo = fminf(lo, E[j * d + c]), hi = fmaxf(hi, E[j * d + c]), col += dE[j * d + c];
      for (int64_t t = 0; t < n; ++t) {
        ok = ok && h[t * d + c] >= lo - 1e-3f && h[t * d + c] <= hi + 1e-3f;
        want += dh[t * d + c];
      }
      ok = ok && fabs(col - want) <= 1e-3 * (1.0 + fabs(want));
    }
    if (!ok) {
      ++failures;
      std::printf("curriculum_embed check failed\n");
    }
  }
  section("curriculum_embed");
  {
    // curriculum_embed on tensor cores (curriculum_embed_mma.cu; emulated mma.sync /
    // ldmatrix): the same invariants with bf16 operands (values exact in bf16; the
    // rows of bf16(P) sum to 1 within 2^-8 each). d = 1030: five column slices, the
    // last of 6 columns (no 16-byte copies); n = 19: a partial token group.
    const int64_t K = 67, d = 1030, n = small ? 17 : 19;
    std::vector<int64_t> x(n), z(n);
    std::vector<double> g(n), it(n), lse(n);
    std::vector<uint16_t> Eb(K * d), dhb(n * d);
    std::vector<float> E(K * d), h(n * d), dh(n * d), dE(K * d);
    for (int64_t t = 0; t < n; ++t) x[t] = (t * 5) % K, g[t] = -3.0 + 0.3 * double(t), it[t] = t % 2 ? 1.0 : 1e4;
    for (int64_t i = 0; i < K * d; ++i) E[i] = float((i * 29) % 23) - 11.0f, Eb[i] = uint16_t(bits_from_float(E[i]) >> 16);
    for (int64_t i = 0; i < n * d; ++i) dh[i] = float((i * 7) % 5) - 2.0f, dhb[i] = uint16_t(bits_from_float(dh[i]) >> 16);
    int err = cuda::curriculum_embed_mma(x.data(), g.data(), it.data(), Eb.data(), n, K, d, 3, 0, h.data(), z.data(),
                                         lse.data(), nullptr, nullptr);
    err |= cuda::curriculum_embed_backward_mma(dhb.data(), x.data(), g.data(), it.data(), lse.data(), n, K, d, 3, 0,
                                               dE.data(), nullptr);
    bool ok = err == 0;
    for (int64_t t = 0; t < n; ++t) ok = ok && z[t] >= 0 && z[t] < K && std::isfinite(lse[t]);
    for (int64_t c = 0; c < d; ++c) {
      float lo = INFINITY, hi = -INFINITY;
      double col = 0.0, want = 0.0, abs_sum = 0.0;
      for (int64_t j = 0; j < K; ++j) lo = fminf(lo, E[j * d + c]), hi = fmaxf(hi, E[j * d + c]), col += dE[j * d + c];
      for (int64_t t = 0; t < n; ++t) {
        ok = ok && h[t * d + c] >= lo - 0.1f && h[t * d + c] <= hi + 0.1f;
        want += dh[t * d + c], abs_sum += fabs(dh[t * d + c]);
      }
      ok = ok && fabs(col - want) <= 0x1p-7 * abs_sum + 1e-3;
    }
    if (!ok) {
      ++failures;
      std::printf("curriculum_embed (tensor cores) check failed\n");
    }
  }
  section("curriculum_embed_mma");
  {
    // Device-side value checks (device_check.h): every invalid id or level is
    // counted, never used to index memory (ASan), and gives the specified outputs.
    uint32_t c[check::kNumArgs] = {};
    const int64_t K = 300, rows = 3, d = 4, k = 5;
    std::vector<float> logits(rows * K), loss(rows), grad(rows * K), q(rows * K);
    for (int64_t i = 0; i < rows * K; ++i) logits[i] = float(i % 7) * 0.3f;
    std::vector<int64_t> z = {1, K + 7, 2}, x = {-3, 4, 5}, out(rows), zt(rows);
    std::vector<double> alpha = {0.5, 0.5, 1.5}, dalpha = {-1.0, -1.0, -1.0};
    std::vector<double> at = {0.2, 0.2, 0.2}, as = {0.5, 0.5, 0.1}, gt = {0.0, 0.0, 0.0};
    bool ok = true;
    // usdm_loss: row 0 bad x0, row 1 bad z, row 2 bad alpha -> NaN rows
    ok &= cuda::usdm_loss(logits.data(), 0, z.data(), x.data(), alpha.data(), dalpha.data(), loss.data(), grad.data(),
                          rows, K, c, nullptr) == 0;
    for (int64_t r = 0; r < rows; ++r) ok &= std::isnan(loss[r]) && std::isnan(grad[r * K + 7]);
    // sample_step / posterior: row 1 bad z, row 2 alpha_s < alpha_t -> id 0 / NaN rows; row 0 valid
    ok &= cuda::sample_step(logits.data(), 0, z.data(), at.data(), as.data(), out.data(), rows, K, 1.0, 1.0, 0.5, 1, 0,
                            0, c, nullptr) == 0;
    ok &= cuda::posterior(logits.data(), 0, z.data(), at.data(), as.data(), q.data(), rows, K, 1.0, 1.0, 0.5, c,
                          nullptr) == 0;
    ok &= out[0] >= 0 && out[0] < K && out[1] == 0 && out[2] == 0;
    ok &= !std::isnan(q[0]) && std::isnan(q[K]) && std::isnan(q[2 * K + K - 1]);
    // sample_zt: row 0 bad x0 -> 0
    ok &= cuda::sample_zt(x.data(), gt.data(), nullptr, zt.data(), nullptr, rows, K, 1, 0, c, nullptr) == 0;
    ok &= zt[0] == 0 && zt[1] >= 0 && zt[1] < K;
    // top-k (+ embedding bag) and the exact curriculum: token 0 bad x0, 1 NaN gamma, 2 inv_tau 0
    std::vector<int64_t> tx = {K + 3, 1, 2}, ids(rows * k), ids2(rows * k), tz(rows), tz2(rows), ez(rows);
    std::vector<double> tg = {0.0, NAN, 0.0}, tit = {1.0, 1.0, 0.0}, lse(rows);
    std::vector<float> w(rows * k), w2(rows * k), emb(K * d, 1.0f), h(rows * d), eh(rows * d);
    const int64_t slots = cuda::topk_scratch_slots(rows, k, 1);
    std::vector<int32_t> map(size_t(slots * 2 * cuda::topk_map_capacity(k)), -1);
    ok &= cuda::curriculum_topk(tx.data(), tg.data(), tit.data(), ids.data(), w.data(), tz.data(), rows, k, K, 0, 1, 0,
                                map.data(), slots, c, nullptr) == 0;
    ok &= cuda::curriculum_topk_embed(tx.data(), tg.data(), tit.data(), emb.data(), 0, d, h.data(), ids2.data(),
                                      w2.data(), tz2.data(), rows, k, K, 0, 1, 0, map.data(), slots, c, nullptr) == 0;
    for (int64_t i = 0; i < rows * k; ++i) ok &= ids[i] >= 0 && ids[i] < K && std::isnan(w[i]) && ids2[i] == ids[i];
    for (int64_t i = 0; i < rows * d; ++i) ok &= std::isnan(h[i]);
    ok &= cuda::curriculum_embed(tx.data(), tg.data(), tit.data(), emb.data(), rows, K, d, 1, 0, eh.data(), ez.data(),
                                 lse.data(), c, nullptr) == 0;
    for (int64_t r = 0; r < rows; ++r) ok &= ez[r] >= 0 && ez[r] < K;
    // embedding-bag backward: ids -1 and K are dropped (not written out of bounds)
    std::vector<int64_t> bid = {3, -1, K, 3}, order = {1, 0, 3, 2}, sorted = {-1, 3, 3, K};
    std::vector<float> bw = {1.0f, 1.0f, 1.0f, 2.0f}, gh(2 * d, 1.0f), ga(K * d, 0.0f), gs(K * d, 0.0f);
    std::vector<float> partial(size_t(cuda::topk_bag_partial_floats(4, 2, d)), NAN);
    ok &= cuda::topk_bag_backward_atomic(gh.data(), bid.data(), bw.data(), ga.data(), 2, 2, d, K, c, nullptr) == 0;
    ok &= cuda::topk_bag_backward_sorted(gh.data(), sorted.data(), order.data(), bw.data(), gs.data(), 4, 2, d, K,
                                         partial.data(), c, nullptr) == 0;
    ok &= ga[3 * d] == 3.0f && gs[3 * d] == 3.0f;
    const uint32_t want[check::kNumArgs] = {/*x0*/ 5, /*z*/ 3, /*ids*/ 4, /*alpha*/ 1, /*dalpha*/ 0,
                                            /*alpha_t*/ 0, /*alpha_s*/ 2, /*gamma*/ 3, /*inv_tau*/ 3};
    for (int i = 0; i < check::kNumArgs; ++i) {
      if (c[i] != want[i]) std::printf("device check %s: %u violations, expected %u\n", check::arg_message(i), c[i], want[i]);
      ok &= c[i] == want[i];
    }
    if (!ok) {
      ++failures;
      std::printf("device-side value checks failed\n");
    }
  }
  section("device checks");
  std::printf("emulated kernels: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
#endif
