// Value checks of the CUDA ops on the device: no host synchronization.
//
// The host checks what costs nothing: shapes, dtypes, devices and scalar
// arguments. The values inside tensors (token ids, levels) are checked by the
// kernels that read them: a row or token with an invalid value is never used
// to read or write out of bounds, gets unspecified outputs (NaN where
// floating, ids in range), and counts one violation per argument in a small
// device array of counters. The binding copies the counters to pinned host
// memory after every op (asynchronously) and the next CUDA op of the process
// raises an error naming the arguments (checked lazily). Counters only grow,
// so copies landing out of order never hide or repeat a report.
#pragma once

#include <cstdint>

#include "duo_fast/common.h"

namespace duo_fast {
namespace check {

// Index of an argument's counter.
enum Arg : int {
  kX0 = 0,      // x0: token ids outside [0, K)
  kZ = 1,       // z: token ids outside [0, K)
  kIds = 2,     // ids (embedding-bag backward): outside [0, K)
  kAlpha = 3,   // alpha outside (0, 1)
  kDalpha = 4,  // dalpha > 0 or NaN, or a loss beyond float32 (usdm::loss_in_float32)
  kAlphaT = 5,  // alpha_t outside [0, 1)
  kAlphaS = 6,  // alpha_s outside (0, 1] or below alpha_t
  kGamma = 7,   // gamma not finite
  kInvTau = 8,  // inv_tau not in (0, FLT_MAX]
  kGammaNaN = 9,    // gamma NaN (sample_zt, gamma_to_alpha: +-inf are the limits alpha = 1, 0)
  kGammaSNaN = 10,  // gamma_s NaN (sample_zt)
  kLogits = 11,     // a logits row with NaN, +inf or no finite entry (sample_step, posterior, canvas_step,
                    // softmax_embed)
  kTemperature = 12,  // a per-row temperature outside [1/FLT_MAX, 1/FLT_MIN] (canvas_step, softmax_embed)
  kNumArgs = 13,
};

inline const char* arg_message(int a) {
  switch (a) {
    case kX0: return "x0 holds token ids outside [0, vocab_size)";
    case kZ: return "z holds token ids outside [0, vocab_size)";
    case kIds: return "ids hold token ids outside [0, vocab_size)";
    case kAlpha: return "alpha must be in (0, 1)";
    case kDalpha: return "dalpha must be <= 0 and small enough that the loss is a float32 (usdm::loss_in_float32)";
    case kAlphaT: return "alpha_t must be in [0, 1)";
    case kAlphaS: return "alpha_s must be in (0, 1] and >= alpha_t";
    case kGamma: return "gamma must be finite";
    case kInvTau: return "inv_tau must be finite and > 0, at most 3.4e38 (the largest float32)";
    case kGammaNaN: return "gamma must not be NaN";
    case kGammaSNaN: return "gamma_s must not be NaN";
    case kLogits:
      return "logits rows must hold no NaN or +inf and at least one finite entry (no probability distribution "
             "to sample from: a diverged model?)";
    case kTemperature: return "temperature must be in [1/FLT_MAX, 1/FLT_MIN] (1/temperature a normal float32)";
  }
  return "?";
}

DUO_HD bool valid_id(int64_t id, int64_t vocab_size) { return id >= 0 && id < vocab_size; }
// Written so that NaN fails every test.
DUO_HD bool valid_alpha(double a) { return a > 0.0 && a < 1.0; }
DUO_HD bool valid_dalpha(double d) { return d <= 0.0; }
DUO_HD bool valid_alpha_t(double a) { return a >= 0.0 && a < 1.0; }
DUO_HD bool valid_alpha_s(double as, double at) { return as > 0.0 && as <= 1.0 && as >= at; }
DUO_HD bool valid_gamma(double g) { return g - g == 0.0; }  // finite
// inv_tau scales the noise in float32 (above FLT_MAX the forward gives NaN).
DUO_HD bool valid_inv_tau(double t) { return t > 0.0 && t <= kFloat32Max; }
DUO_HD bool not_nan(double g) { return g == g; }
// 1/t scales the logits in float32: a finite, normal float32 (NaN fails both tests).
DUO_HD bool valid_temperature(double t) { return t >= 1.0 / kFloat32Max && t <= 1.0 / kFloat32Tiny; }
// A sampling row: the sum of exp((x_j - max) / T) is >= 1 (the max entry gives
// exactly 1) when every logit is finite or -inf with a finite max; NaN logits,
// a +inf logit (inf - inf) and a row of only -inf (-inf + inf) make it NaN.
DUO_HD bool valid_weight_sum(double total) { return total >= 1.0; }

#if defined(__CUDACC__) || defined(DUO_FAST_EMULATE_CUDA)
// One violation of argument `a` (counters: nullptr = no reporting).
__device__ __forceinline__ void report(uint32_t* counters, int a) {
  if (counters != nullptr) atomicAdd(&counters[a], 1u);
}

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }
#endif

}  // namespace check
}  // namespace duo_fast
