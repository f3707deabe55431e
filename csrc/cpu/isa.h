// Run-time choice of the CPU kernels' AVX2+FMA clones ([[gnu::target("avx2,fma")]]
// functions, compiled next to the baseline x86-64 code of the same row math).
#pragma once

namespace duo_fast {

inline bool have_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

}  // namespace duo_fast
