// Block-wide sweeps over one row of logits with 16-byte loads (device code;
// also runs under the CPU emulation). A row of K entries of T (float32,
// bfloat16 or float16 bits, logits.h) is split into
//   head: the entries before the first 16-byte boundary (a row of an odd K
//         such as 50257 starts anywhere: row * K * sizeof(T) is not a multiple
//         of 16), at most 16 / sizeof(T) - 1, one per thread;
//   body: 16-byte vectors (4 floats or 8 16-bit values), thread-strided;
//   tail: the entries after the last whole vector, one per thread.
// Every thread visits its entries in increasing j. f(j0, v, n) gets n values
// v[0..n) (as float) of the entries j0 .. j0 + n - 1 (n = 1 in the head and
// tail, n = kVec in the body), so a sweep can sum a vector in float before
// adding it to a double. blockDim.x must be >= 16 / sizeof(T) (the head and
// the tail are shorter than that).
#pragma once

#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/cuda_compat.h"
#include "duo_fast/logits.h"

namespace duo_fast {
namespace rowvec {

// A 16-byte vector of T: its raw type, its length, unpacking to floats and
// packing from floats (rounded once, logits.h).
template <class T>
struct Vec;

template <>
struct Vec<float> {
  using Raw = float4;
  static constexpr int kN = 4;
  static DUO_DEVICE void unpack(const Raw& r, float* v) { v[0] = r.x, v[1] = r.y, v[2] = r.z, v[3] = r.w; }
  static DUO_DEVICE Raw pack(const float* v) { return make_float4(v[0], v[1], v[2], v[3]); }
};

template <class T16>
struct Vec16 {
  using Raw = uint4;
  static constexpr int kN = 8;
  static DUO_DEVICE void unpack(const Raw& r, float* v) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = to_float(T16{uint16_t(w[i] & 0xffffu)});  // little-endian: the lower index in the low half
      v[2 * i + 1] = to_float(T16{uint16_t(w[i] >> 16)});
    }
  }
  static DUO_DEVICE Raw pack(const float* v) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = uint32_t(from_float<T16>(v[2 * i]).bits) | (uint32_t(from_float<T16>(v[2 * i + 1]).bits) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Vec<bf16_bits> : Vec16<bf16_bits> {};
template <>
struct Vec<f16_bits> : Vec16<f16_bits> {};

// Entries before x's first 16-byte boundary (capped at K).
template <class T>
DUO_DEVICE int64_t head_count(const T* x, int64_t K) {
  const int64_t h = int64_t(((16u - unsigned(reinterpret_cast<uintptr_t>(x) & 15u)) & 15u) / sizeof(T));
  return h < K ? h : K;
}

// f(j0, v, n) over every entry of row x (see the top of the file).
template <class T, class F>
DUO_DEVICE void for_each(const T* x, int64_t K, F&& f) {
  using V = Vec<T>;
  const int64_t head = head_count(x, K);
  const int64_t t = threadIdx.x;
  if (t < head) {
    const float v = to_float(x[t]);
    f(t, &v, 1);
  }
  const int64_t nvec = (K - head) / V::kN;
  const typename V::Raw* xv = reinterpret_cast<const typename V::Raw*>(x + head);
  for (int64_t i = t; i < nvec; i += blockDim.x) {
    float v[V::kN];
    V::unpack(xv[i], v);
    f(head + i * V::kN, v, V::kN);
  }
  const int64_t j = head + nvec * V::kN + t;
  if (j < K) {
    const float v = to_float(x[j]);
    f(j, &v, 1);
  }
}

// out[j] = g(j, x_j) over every entry of row x; out has x's type. The stores are
// 16 bytes wide when out has x's alignment modulo 16 (the usual case: a fresh
// gradient of contiguous logits), else one entry at a time.
template <class T, class G>
DUO_DEVICE void transform(const T* x, T* out, int64_t K, G&& g) {
  using V = Vec<T>;
  const bool same_alignment = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
  const int64_t head = head_count(x, K);
  const int64_t t = threadIdx.x;
  if (t < head) out[t] = from_float<T>(g(t, to_float(x[t])));
  const int64_t nvec = (K - head) / V::kN;
  const typename V::Raw* xv = reinterpret_cast<const typename V::Raw*>(x + head);
  for (int64_t i = t; i < nvec; i += blockDim.x) {
    float v[V::kN];
    V::unpack(xv[i], v);
    const int64_t j0 = head + i * V::kN;
#pragma unroll
    for (int e = 0; e < V::kN; ++e) v[e] = g(j0 + e, v[e]);
    if (same_alignment) {
      reinterpret_cast<typename V::Raw*>(out + head)[i] = V::pack(v);
    } else {
#pragma unroll
      for (int e = 0; e < V::kN; ++e) out[j0 + e] = from_float<T>(v[e]);
    }
  }
  const int64_t j = head + nvec * V::kN + t;
  if (j < K) out[j] = from_float<T>(g(j, to_float(x[j])));
}

}  // namespace rowvec
}  // namespace duo_fast
