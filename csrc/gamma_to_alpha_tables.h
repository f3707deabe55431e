// Process-wide cache of the per-K gamma_to_alpha tables (host memory, built on first
// use in parallel, never freed: kTableSize doubles = 33 KiB per K).
#pragma once

#include <cstdint>

namespace duo_fast {

// Host pointer to the table of vocabulary size K (2 <= K <= 2^24).
const double* gamma_to_alpha_table(int64_t vocab_size);

}  // namespace duo_fast
