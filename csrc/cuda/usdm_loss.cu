// CUDA kernel of the fused uniform-state diffusion loss (docs/math.md §3; row
// math and gradient derivation in usdm_loss.h): one block per row, grid-stride
// over rows. Logits float32, bfloat16 or float16, read natively with 16-byte
// loads (duo_fast/row_vec.h: a scalar head up to the first 16-byte boundary,
// vectors, a scalar tail); the gradient written in the logits' dtype.
//
// Float32 entries (most rows; the CPU's switch, usdm::use_f32): three sweeps,
// so the logits are read three times and the gradient written once (the
// gradient's brackets need Q, a sum over the row of a function of the
// log-sum-exp, and that sum needs the log-sum-exp first: three dependent
// passes; with one 512-thread block per SM the rows in flight fit in L2,
// so the 2nd and 3rd reads mostly come from L2, not DRAM):
//   1. online softmax: per thread (max m, sum of expf(x - m)), each vector
//      summed in float then added to a double; merged over the block -> M, se1;
//      also the first index of the maximum (the candidate big entry b);
//   2. e_j = expf(x_j - M), u_j = e_j R1 (R1 = r / se1) and the sums over j not
//      in {x, z, b} of log1p(u), e, e (1 - q) (as the CPU kernel,
//      usdm_loss_rows.h), plus B = sum u q and C1 = sum e u q^2; the exact
//      se = sum e_j of these same e_j then corrects S and A to first order in
//      eps = se1 / se - 1 (~1e-7: online and direct exp roundings differ):
//      S += eps B, A += eps C1 (d log1p(u) = u q d(log R), d(1 - q) = u q^2
//      d(log R)), so every p_j = e_j / se sums to 1 to double precision as on
//      the CPU and the remaining error is O(eps^2);
//   3. the gradient, e_j (F / (r se)) (r C - u_j q_j) with the CPU's bracket.
// Float64 entries (the original kernel): rows near alpha = 0 or 1, r < 1e-2,
// K < 16, rows with NaN or +inf logits (NaN results), and z == x0 rows with a
// positive gradient bracket C (usdm_loss_rows.h: the brackets cancel in float).
// Consumer GPUs run float64 at 1/64 of the float32 rate: the float path has
// one double add per 16-byte vector and sum, the rest is float.
#include "duo_fast/cuda_compat.h"
#include "duo_fast/device_check.h"
#include "duo_fast/logits.h"
#include "duo_fast/reduce.h"
#include "duo_fast/row_vec.h"
#include "duo_fast/usdm_loss.h"
#include "launchers.h"

namespace duo_fast {
namespace cuda {
namespace {

struct Shared {
  reduce::MaxSum<double> ms[32];
  double d[32];
  int64_t l[32];
  int i[32];
};

// Float64 entries, plain loads: the original kernel's row (every thread returns
// after writing the row's loss and gradient).
template <class T>
__device__ void row_f64(const T* l, T* gr, float* loss, int64_t x, int64_t zz, int64_t K, const usdm::Token& t,
                        Shared& sh) {
  reduce::MaxSum<double> ms = reduce::max_sum_identity<double>();
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) ms = reduce::max_sum_push(ms, double(to_float(l[j])));
  const double lse = reduce::max_sum_lse(reduce::block_reduce_max_sum(ms, sh.ms));
  usdm::Sums small{0.0, 0.0, 0.0};
  double b = -1.0;  // index of the entry with p > 1/2 outside {x, z}, if any (exact in a double)
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    if (j == x || j == zz) continue;
    const double p = exp(double(to_float(l[j])) - lse);
    if (usdm::is_big(p))
      b = double(j);
    else
      usdm::accumulate(small, p, t.r);
  }
  small.S_excl = reduce::block_reduce(small.S_excl, reduce::Sum(), 0.0, sh.d);
  small.P_excl = reduce::block_reduce(small.P_excl, reduce::Sum(), 0.0, sh.d);
  small.Q_excl = reduce::block_reduce(small.Q_excl, reduce::Sum(), 0.0, sh.d);
  const int64_t big = int64_t(reduce::block_reduce(b, reduce::Max(), -1.0, sh.d));
  const double p_b = big >= 0 ? exp(double(to_float(l[big])) - lse) : 0.0;
  const usdm::Sums s = usdm::add_big(small, p_b, t.r, big >= 0);
  const double p_x = exp(double(to_float(l[x])) - lse), p_z = exp(double(to_float(l[zz])) - lse);
  if (threadIdx.x == 0) *loss = float(usdm::loss(t, p_x, p_z, s));
  if (gr != nullptr) {
    const usdm::Grad g = usdm::grad_constants(t, p_x, p_z, s, small.P_excl, p_b);
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      const double v = j == zz    ? g.grad_z
                       : j == x   ? g.grad_x
                       : j == big ? g.grad_b
                                  : usdm::grad_entry(exp(double(to_float(l[j])) - lse), g.F, g.C, g.r);
      gr[j] = from_float<T>(float(v));
    }
  }
}

// Float32 entries; returns false (nothing written) when the row must take the
// float64 entries instead (the same answer in every thread).
template <class T>
__device__ bool row_f32(const T* l, T* gr, float* loss, int64_t x, int64_t zz, int64_t K, const usdm::Token& t,
                        Shared& sh) {
  // Sweep 1: online (max, sum); NaN / +inf flag; first index of the thread's max.
  reduce::MaxSum<double> ms = reduce::max_sum_identity<double>();
  float m = -INFINITY;
  int64_t arg = INT64_MAX;
  int bad = 0;
  rowvec::for_each(l, K, [&](int64_t j0, const float* v, int n) {
    float cm = -INFINITY;
    int first = -1;
    for (int e = 0; e < n; ++e) {
      bad |= int(!(v[e] < INFINITY));  // NaN or +inf
      if (v[e] > cm) cm = v[e], first = e;
    }
    if (cm > m) {  // a new maximum: rescale the sum (exp(-inf) = 0 while it is empty)
      ms.s *= exp(double(m) - double(cm));
      m = cm;
      arg = j0 + first;
    }
    float part = 0.0f;
    for (int e = 0; e < n; ++e) part += v[e] > -INFINITY ? expf(v[e] - m) : 0.0f;
    ms.s += double(part);
  });
  ms.m = double(m);
  bad = reduce::block_reduce(bad, reduce::Max(), 0, sh.i);
  const reduce::MaxSum<double> row = reduce::block_reduce_max_sum(ms, sh.ms);
  if (bad || !(row.m > -INFINITY)) return false;  // the float64 path's NaN semantics
  const float M = float(row.m);
  const double se1 = row.s;
  const int64_t jmax = reduce::block_reduce(ms.m == row.m ? arg : INT64_MAX, reduce::Min(), INT64_MAX, sh.l);
  // b: p > 1/2 is only possible for the unique maximum, p_max = 1 / se.
  const int64_t b = (se1 < 2.0 && jmax != x && jmax != zz) ? jmax : -1;

  // Sweep 2: the sums over j not in {x, z, b} with R1 = r / se1.
  const double R1 = t.r / se1;
  const float R1_hi = float(R1), R1_lo = float(R1 - double(R1_hi));
  double S = 0.0, E = 0.0, A = 0.0, B = 0.0, C1 = 0.0;
  rowvec::for_each(l, K, [&](int64_t j0, const float* v, int n) {
    float s_ = 0.0f, e_ = 0.0f, b_ = 0.0f, c_ = 0.0f, af = 0.0f, ag = 0.0f;
    for (int e = 0; e < n; ++e) {
      const int64_t j = j0 + e;
      const float ej = (j == x || j == zz || j == b) ? 0.0f : expf(v[e] - M);
      const float u = ej * R1_hi + ej * R1_lo;  // r p_j
      const float q = 1.0f / (1.0f + u);
      // e (1 - q) = e f - g: f = 1, g = e q if u > 1, else f = u q, g = 0 (usdm_loss_rows.h)
      const bool big = u > 1.0f;
      s_ += log1pf(u);
      e_ += ej;
      af += ej * (big ? 1.0f : u * q);
      ag += big ? ej * q : 0.0f;
      b_ += u * q;
      c_ += ej * u * q * q;
    }
    S += double(s_), E += double(e_), A += double(af) - double(ag), B += double(b_), C1 += double(c_);
  });
  S = reduce::block_reduce(S, reduce::Sum(), 0.0, sh.d);
  E = reduce::block_reduce(E, reduce::Sum(), 0.0, sh.d);
  A = reduce::block_reduce(A, reduce::Sum(), 0.0, sh.d);
  B = reduce::block_reduce(B, reduce::Sum(), 0.0, sh.d);
  C1 = reduce::block_reduce(C1, reduce::Sum(), 0.0, sh.d);
  const float e_x = expf(to_float(l[x]) - M), e_z = expf(to_float(l[zz]) - M);
  const float e_b = b >= 0 ? expf(to_float(l[b]) - M) : 0.0f;
  const double se = E + double(e_x) + (zz != x ? double(e_z) : 0.0) + double(e_b);
  const double eps = se1 / se - 1.0;
  S += eps * B;
  A += eps * C1;
  const double inv = 1.0 / se;
  const usdm::Sums small{S, E * inv, A * inv / t.r};
  const double p_b = double(e_b) * inv;
  const usdm::Sums s = usdm::add_big(small, p_b, t.r, b >= 0);
  const double p_x = double(e_x) * inv, p_z = double(e_z) * inv;
  const usdm::Grad g = usdm::grad_constants(t, p_x, p_z, s, small.P_excl, p_b);
  if (t.e && g.C > 0.0) return false;  // z == x0, C > 0: float64 entries (usdm_loss_rows.h)
  if (threadIdx.x == 0) *loss = float(usdm::loss(t, p_x, p_z, s));
  if (gr == nullptr) return true;

  // Sweep 3: grad_j = e_j (F / (r se)) (r C - u_j q_j), the bracket as H - u q
  // (H = r C) while u <= 1, else as q - G (G = 1 - r C, in double).
  const double R = t.r * inv, H = t.r * g.C;
  const float R_hi = float(R), R_lo = float(R - double(R_hi));
  const float Hf = float(H), Gf = float(1.0 - H), k = float(g.F * inv / t.r);
  const float gx = float(g.grad_x), gz = float(g.grad_z), gb = float(g.grad_b);
  rowvec::transform(l, gr, K, [&](int64_t j, float v) {
    const float ej = expf(v - M);
    const float u = ej * R_hi + ej * R_lo;
    const float q = 1.0f / (1.0f + u);
    const float bracket = u > 1.0f ? q - Gf : Hf - u * q;
    return j == zz ? gz : j == x ? gx : j == b ? gb : ej * k * bracket;
  });
  return true;
}

// At most kMaxThreads threads, one block per SM: <= 128 registers a thread. The
// float path needs ~110 unconstrained; two blocks per SM (<= 64 registers) spilled
// 120-350 bytes a thread (tests/test_build.py allows no spills).
constexpr unsigned kMaxThreads = 512;

template <class T>
__global__ void __launch_bounds__(kMaxThreads, 1) usdm_loss_kernel(const T* __restrict__ logits, const int64_t* __restrict__ z,
                                 const int64_t* __restrict__ x0, const double* __restrict__ alpha,
                                 const double* __restrict__ dalpha, float* __restrict__ loss, T* __restrict__ grad,
                                 int64_t rows, int64_t K, uint32_t* checks) {
  __shared__ Shared sh;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t x = x0[row], zz = z[row];
    const double a = alpha[row], da = dalpha[row];
    // Device-side value checks (device_check.h); the same values for the whole block.
    const bool ok_x = check::valid_id(x, K), ok_z = check::valid_id(zz, K);
    const bool ok_a = check::valid_alpha(a), ok_d = check::valid_dalpha(da);
    if (!(ok_x && ok_z && ok_a && ok_d)) {
      if (threadIdx.x == 0) {
        loss[row] = check::nan_f();
        if (!ok_x) check::report(checks, check::kX0);
        if (!ok_z) check::report(checks, check::kZ);
        if (!ok_a) check::report(checks, check::kAlpha);
        if (!ok_d) check::report(checks, check::kDalpha);
      }
      if (grad != nullptr)
        for (int64_t j = threadIdx.x; j < K; j += blockDim.x) grad[row * K + j] = from_float<T>(check::nan_f());
      continue;
    }
    const usdm::Token t = usdm::token_constants(K, a, da, x == zz);
    const T* l = logits + row * K;
    T* gr = grad != nullptr ? grad + row * K : nullptr;
    if (!(usdm::use_f32(t) && row_f32(l, gr, loss + row, x, zz, K, t, sh))) row_f64(l, gr, loss + row, x, zz, K, t, sh);
  }
}

template <class T>
int launch_usdm_loss(const T* logits, const int64_t* z, const int64_t* x0, const double* alpha, const double* dalpha,
                     float* loss, T* grad, int64_t rows, int64_t K, uint32_t* checks, void* stream) {
  if (rows == 0) return 0;
  // Large rows: 512 threads, one block per SM, so the rows in flight (132 on an
  // H100/H200: 27 MB of float32 rows at K = 50257) mostly stay in L2 between sweeps.
  const unsigned threads = K >= 8192 ? kMaxThreads : 256u;
  const unsigned blocks = rows < 65535 ? unsigned(rows) : 65535u;
  return int(launch_kernel(usdm_loss_kernel<T>, dim3(blocks), dim3(threads), 0, static_cast<cudaStream_t>(stream),
                           logits, z, x0, alpha, dalpha, loss, grad, rows, K, checks));
}

}  // namespace

// dtype codes as in launchers.h: 0 float32, 1 bfloat16, 2 float16 (logits and grad).
int usdm_loss(const void* logits, int dtype, const int64_t* z, const int64_t* x0, const double* alpha,
              const double* dalpha, float* loss, void* grad, int64_t rows, int64_t K, uint32_t* checks, void* stream) {
  switch (dtype) {
    case 0:
      return launch_usdm_loss(static_cast<const float*>(logits), z, x0, alpha, dalpha, loss, static_cast<float*>(grad),
                              rows, K, checks, stream);
    case 1:
      return launch_usdm_loss(static_cast<const bf16_bits*>(logits), z, x0, alpha, dalpha, loss,
                              static_cast<bf16_bits*>(grad), rows, K, checks, stream);
    case 2:
      return launch_usdm_loss(static_cast<const f16_bits*>(logits), z, x0, alpha, dalpha, loss,
                              static_cast<f16_bits*>(grad), rows, K, checks, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace duo_fast
