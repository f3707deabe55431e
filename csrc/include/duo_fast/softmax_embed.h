// Row math of softmax_embed, shared by the CPU and CUDA kernels: the soft
// embedding of DiffusionGemma's self-conditioning,
//   h = scale * sum_j p_j E_j,   p = softmax(x / T),
// from logits x [K] and an embedding E [K, d], without the [rows, K]
// probabilities (attention-shaped: one query whose scores are the logits and
// whose values are E).
//
// Weights relative to the row max M (canvas_step.h): y_j = (x_j - M) / T,
// w_j = exp(y_j). Entries with w_j < theta = 2^-24 / K are dropped (kept: y_j
// >= log theta; log theta = -(24 + log2 K) ln 2, -29.1 at K = 262,144): the
// dropped mass is below K theta / S <= 2^-24 of the total, so
//   h = scale * sum_{kept} w_j E_j / sum_{kept} w_j
// differs from the exact softmax-weighted sum by at most 2^-23 max_j |E_jk|
// scale in column k (mass 2^-24 leaves the numerator and the denominator):
// below float32's rounding of the embedding's largest entries, and 2^15 times
// below the bf16 rounding of the probabilities in transformers' own
// soft embedding. What it buys: a confident row (every other logit more than
// 29 T below its max: late denoising steps) is a sparse sum of a few rows of
// E instead of a dense [K] x [K, d] product.
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/canvas_step.h"
#include "duo_fast/common.h"
#include "duo_fast/fast_math.h"

namespace duo_fast {
namespace soft_embedding {

// log theta for a vocabulary of K entries (float, as the kernels compare y with it).
DUO_HD float log_theta(int64_t K) { return float(-(24.0 + log2(double(K))) * 0.69314718055994530942); }

// The weight of y = (x - M) / T: exp(y) when kept, else 0 (NaN: 0; bad rows are screened).
DUO_HD_ALWAYS float weight(float y, float log_theta) {
  return fastmath::select(y >= log_theta, canvas::weight(y), 0.0f);
}

// CPU: a row whose kept entries are at most K / kSparseDivisor is summed row by
// row of E (a gather of kept rows); the others go through tiled GEMMs.
constexpr int64_t kSparseDivisor = 64;

}  // namespace soft_embedding
}  // namespace duo_fast
