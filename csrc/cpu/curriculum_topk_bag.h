// CPU weighted embedding bag of the top-k curriculum input (docs/math.md §2e step 6),
// h[t] = sum_i w[t,i] E[ids[t,i]], and its backward dE[j] = sum_{(t,i): ids[t,i]=j}
// w[t,i] dh[t], id-sorted (issue 13): the N k (token, id, weight) entries are
// counting-sorted by id (stable: token order, then slot order), so
//   * the forward reads each row of E once and adds it into the rows of h of the
//     tokens that use it;
//   * the backward writes each row of dE once, zero rows included (the output is
//     uninitialized, from grad_cache.h: one pass over the K d floats, where
//     zero-initializing and then scattering is two, the second a read-modify-write).
// The columns are split into blocks so that a block of h (or dh) of the tile's
// tokens, kept contiguous in a per-thread buffer, stays in L2 (kBlockFloats);
// threads take column blocks from a shared counter (a thread that is
// descheduled on a busy machine does not hold the others up; a block's sums do
// not depend on which thread does it). Tokens are tiled (kMaxTileTokens, each tile sorted
// on its own) when N outgrows the block at kMinCols columns.
//
// Summation order (fixed, whatever the blocks, tiles and thread count):
//   * h[t, c]: over t's entries in ascending id (top-k ids are distinct);
//   * dE[j, c]: over j's entries in token order (a running sum, continued from
//     the stored value in later token tiles: the same additions as one pass).
// The backward's order is the per-token scatter's (topk_bag_backward before
// issue 13), so it gives the same bits; the forward's differs from the
// per-token bag (slot order) by rounding only.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "duo_fast/logits.h"
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace duo_fast {
namespace bag_cpu {

constexpr int64_t kBlockFloats = int64_t(128) << 10;  // h / dh block per thread: 512 KiB, half a Zen L2
constexpr int64_t kMinCols = 16;                       // one 64-byte line of floats
constexpr int64_t kMaxTileTokens = kBlockFloats / kMinCols;

// The forward's per-token bag (slot order, E rows gathered, in the top-k pass) is
// kept for tiny bags: the sorted forward is used when n k >= kSortedMinEntriesPerId
// K. Measured (1 thread, K = 50257, d = 768, k = 128): per-token / sorted time
// 0.9 at n k / K = 0.04, 1.2 .. 1.35 at 0.06 .. 0.16, 1.7 at 0.3 .. 1.3, 4.3 at 5.2.
constexpr double kSortedMinEntriesPerId = 0.05;

// DUO_FAST_TOPK_BAG=sorted / token forces one forward (benchmarks, tests); unset or
// anything else: this rule. Read at every call.
inline bool use_sorted_forward(int64_t n, int64_t k, int64_t vocab_size) {
  if (const char* v = std::getenv("DUO_FAST_TOPK_BAG")) {
    if (std::strcmp(v, "sorted") == 0) return true;
    if (std::strcmp(v, "token") == 0) return false;
  }
  return double(n) * double(k) >= kSortedMinEntriesPerId * double(vocab_size);
}

struct Plan {
  int64_t tile, cols, blocks;
};

// Token tile, column block width (a multiple of kMinCols unless d is smaller)
// and block count; at least `threads` blocks where d allows it.
inline Plan plan(int64_t n, int64_t k, int64_t d, int64_t threads) {
  int64_t tile = std::min<int64_t>(std::max<int64_t>(n, 1), kMaxTileTokens);
  tile = std::min<int64_t>(tile, std::max<int64_t>(1, (int64_t(1) << 30) / std::max<int64_t>(k, 1)));  // int32 offsets
  const int64_t budget = std::max(kMinCols, kBlockFloats / tile / kMinCols * kMinCols);
  const int64_t max_blocks = (d + kMinCols - 1) / kMinCols;
  int64_t blocks = std::min(max_blocks, std::max((d + budget - 1) / budget, threads));
  int64_t cols = (d + blocks - 1) / blocks;
  cols = std::min(d, (cols + kMinCols - 1) / kMinCols * kMinCols);
  blocks = (d + cols - 1) / cols;
  return {tile, cols, blocks};
}

// Entries of tokens [t0, t1) sorted by id: start[j] .. start[j + 1] are id j's,
// in token order, then slot order (a stable counting sort). With several threads
// the tokens are cut into contiguous parts: each counts its ids, one scan over
// (id, part) gives every part its write position per id, and each part scatters
// its entries there: the same order (hence the same bits downstream) as one pass.
constexpr int64_t kMinEntriesPerPart = int64_t(1) << 15;  // below: one part (the scan is O(K parts))

struct Sorted {
  std::vector<int32_t> start, cursor, token;  // cursor: [parts, K]; token: relative to t0
  std::vector<float> weight;

  void build(const int64_t* ids, const float* w, int64_t t0, int64_t t1, int64_t k, int64_t K, bool drop_zero) {
    const int64_t nt = t1 - t0;
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nt * k / kMinEntriesPerPart));
    auto part_tokens = [&](int64_t q) { return std::make_pair(t0 + nt * q / parts, t0 + nt * (q + 1) / parts); };
    cursor.assign(size_t(parts * K), 0);
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        int32_t* count = cursor.data() + q * K;
        const auto [a, b] = part_tokens(q);
        for (int64_t e = a * k; e < b * k; ++e)
          if (!drop_zero || w[e] != 0.0f) ++count[ids[e]];
      }
    });
    start.resize(size_t(K + 1));
    int32_t total = 0;
    for (int64_t j = 0; j < K; ++j) {
      start[size_t(j)] = total;
      for (int64_t q = 0; q < parts; ++q) {
        int32_t& c = cursor[size_t(q * K + j)];
        const int32_t n = c;
        c = total;
        total += n;
      }
    }
    start[size_t(K)] = total;
    token.resize(size_t(total));
    weight.resize(size_t(total));
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        int32_t* pos = cursor.data() + q * K;
        const auto [a, b] = part_tokens(q);
        for (int64_t t = a; t < b; ++t)
          for (int64_t i = 0; i < k; ++i) {
            const int64_t e = t * k + i;
            if (drop_zero && w[e] == 0.0f) continue;
            const int32_t p = pos[ids[e]]++;
            token[size_t(p)] = int32_t(t - t0);
            weight[size_t(p)] = w[e];
          }
      }
    });
  }
};

// 8 floats (GCC vector extension: two SSE or one AVX register); unaligned loads and
// stores. Every function taking or returning one is always_inline, so the f8 never
// crosses a call between baseline and AVX2 code (hence -Wpsabi is silenced).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f8 __attribute__((vector_size(32)));
[[gnu::always_inline]] inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
[[gnu::always_inline]] inline void store8(float* p, const f8& v) { std::memcpy(p, &v, sizeof v); }

// Columns are done 16 at a time in registers, then the nc % 16 tail one by one
// (the tail is always the last d % 16 columns: the blocks start at multiples of
// 16, so a column takes the same path, hence the same bits, for any plan).
// No software prefetch: measured, prefetching the E slices ahead or the h / dh
// rows into L1 did not help (hardware prefetch and out-of-order loads suffice).
constexpr int64_t kChunk = 16;

// Stores of the dE chunks: plain, or non-temporal (the [K, d] gradient is not read
// again here: no read-for-ownership of its lines, no eviction of the dh block).
struct PlainStore {
  [[gnu::always_inline]] static inline void store(float* p, const f8& v) { store8(p, v); }
  static void fence() {}
};
#if defined(__x86_64__) && defined(__GNUC__)
struct StreamStore {  // p 16-byte aligned; SSE (baseline x86-64): no target clone needed
  [[gnu::always_inline]] static inline void store(float* p, const f8& v) {
    __m128 lo, hi;
    std::memcpy(&lo, &v, 16);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 16, 16);
    _mm_stream_ps(p, lo);
    _mm_stream_ps(p + 4, hi);
  }
  static void fence() { _mm_sfence(); }
};
#endif

// A float buffer starting on a 64-byte cache line. The blocks' rows are 16-float
// multiples, so every 16-column chunk of hb / dhb is one line; from malloc's 16-byte
// alignment, half the 8-float loads and stores of a chunk straddled two lines.
class LineBuffer {
 public:
  explicit LineBuffer(int64_t n) : raw_(size_t(n) + 16) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(raw_.data());
    data_ = raw_.data() + ((64 - a % 64) % 64) / sizeof(float);
  }
  LineBuffer(const LineBuffer&) = delete;
  LineBuffer& operator=(const LineBuffer&) = delete;
  float* data() { return data_; }

 private:
  std::vector<float> raw_;
  float* data_;
};

// hb[r, c] (r: tile token, c < nc) += w E[id, c0 + c] over the sorted entries.
// er: nc floats (the row slice in float32, converted once per id).
template <class E>
[[gnu::always_inline]] inline void block_forward_impl(const Sorted& s, const E* emb, int64_t d, int64_t c0, int64_t nc,
                                                      float* __restrict__ hb, float* __restrict__ er) {
  const int64_t K = int64_t(s.start.size()) - 1, nv = nc / kChunk * kChunk;
  const int32_t* st = s.start.data();
  const int32_t* tok = s.token.data();
  const float* wt = s.weight.data();
  for (int64_t j = 0; j < K; ++j) {
    const int32_t e0 = st[j], e1 = st[j + 1];
    if (e0 == e1) continue;
    const E* row = emb + j * d + c0;
    for (int64_t c = 0; c < nc; ++c) er[c] = to_float(row[c]);
    for (int64_t c = 0; c < nv; c += kChunk) {
      const f8 a = load8(er + c), b = load8(er + c + 8);
      for (int64_t e = e0; e < e1; ++e) {
        float* hr = hb + int64_t(tok[e]) * nc + c;
        const float w = wt[e];
        store8(hr, load8(hr) + w * a);
        store8(hr + 8, load8(hr + 8) + w * b);
      }
    }
    for (int64_t c = nv; c < nc; ++c)
      for (int64_t e = e0; e < e1; ++e) hb[int64_t(tok[e]) * nc + c] += wt[e] * er[c];
  }
}

// dst[0, n) = src[0, n) (n floats), streaming the multiples of 16 when dst is 16-byte aligned.
inline void copy_out(float* dst, const float* src, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    const int64_t nv = n / kChunk * kChunk;
    for (int64_t c = 0; c < nv; c += 8) StreamStore::store(dst + c, load8(src + c));
    std::memcpy(dst + nv, src + nv, size_t(n - nv) * sizeof(float));
    return;
  }
#endif
  std::memcpy(dst, src, size_t(n) * sizeof(float));
}

// dE[j, c0 + c] for every id j of [0, K): the running sum over j's entries of
// w dhb[r, c], started at 0 (first tile) or at the stored value; written once.
template <class Store>
[[gnu::always_inline]] inline void block_backward_impl(const Sorted& s, const float* __restrict__ dhb, int64_t nc,
                                                       float* __restrict__ dE, int64_t d, int64_t c0, int64_t K,
                                                       bool first) {
  const int64_t nv = nc / kChunk * kChunk;
  const int32_t* st = s.start.data();
  const int32_t* tok = s.token.data();
  const float* wt = s.weight.data();
  for (int64_t j = 0; j < K; ++j) {
    float* out = dE + j * d + c0;
    const int32_t e0 = st[j], e1 = st[j + 1];
    if (e0 == e1) {
      if (!first) continue;
      for (int64_t c = 0; c < nv; c += 8) Store::store(out + c, f8{});
      for (int64_t c = nv; c < nc; ++c) out[c] = 0.0f;
      continue;
    }
    for (int64_t c = 0; c < nv; c += kChunk) {
      f8 a = first ? f8{} : load8(out + c), b = first ? f8{} : load8(out + c + 8);
      for (int32_t e = e0; e < e1; ++e) {
        const float* g = dhb + int64_t(tok[e]) * nc + c;
        const float w = wt[e];
        a += w * load8(g);
        b += w * load8(g + 8);
      }
      Store::store(out + c, a);
      Store::store(out + c + 8, b);
    }
    for (int64_t c = nv; c < nc; ++c) {
      float a = first ? 0.0f : out[c];
      for (int32_t e = e0; e < e1; ++e) a += wt[e] * dhb[int64_t(tok[e]) * nc + c];
      out[c] = a;
    }
  }
  Store::fence();
}

#if defined(__x86_64__) && defined(__GNUC__)
template <class E>
[[gnu::target("avx2,fma")]] inline void block_forward_avx2(const Sorted& s, const E* emb, int64_t d, int64_t c0,
                                                           int64_t nc, float* hb, float* er) {
  block_forward_impl(s, emb, d, c0, nc, hb, er);
}
[[gnu::target("avx2,fma")]] inline void block_backward_avx2(const Sorted& s, const float* dhb, int64_t nc, float* dE,
                                                            int64_t d, int64_t c0, int64_t K, bool first) {
  // Streaming stores when every chunk is 16-byte aligned (c0 is a multiple of 16 floats).
  if (reinterpret_cast<uintptr_t>(dE) % 16 == 0 && d % 4 == 0)
    block_backward_impl<StreamStore>(s, dhb, nc, dE, d, c0, K, first);
  else
    block_backward_impl<PlainStore>(s, dhb, nc, dE, d, c0, K, first);
}
#endif

template <class E>
inline void block_forward(const Sorted& s, const E* emb, int64_t d, int64_t c0, int64_t nc, float* hb, float* er) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2_fma()) return block_forward_avx2(s, emb, d, c0, nc, hb, er);
#endif
  block_forward_impl(s, emb, d, c0, nc, hb, er);
}

inline void block_backward(const Sorted& s, const float* dhb, int64_t nc, float* dE, int64_t d, int64_t c0, int64_t K,
                           bool first) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2_fma()) return block_backward_avx2(s, dhb, nc, dE, d, c0, K, first);
#endif
  block_backward_impl<PlainStore>(s, dhb, nc, dE, d, c0, K, first);
}

// h [n, d] float32 = the bag of ids / w [n, k] over emb [K, d] (entries of weight 0
// skipped: a NaN / inf row they point at does not reach h).
template <class E>
void forward(const int64_t* ids, const float* w, int64_t n, int64_t k, const E* emb, int64_t K, int64_t d, float* h) {
  const Plan p = plan(n, k, d, at::get_num_threads());
  Sorted s;
  for (int64_t t0 = 0; t0 < n; t0 += p.tile) {
    const int64_t t1 = std::min(n, t0 + p.tile), T = t1 - t0;
    s.build(ids, w, t0, t1, k, K, /*drop_zero=*/true);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(p.blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      LineBuffer hb(T * p.cols), er(p.cols);
      for (int64_t b; (b = next.fetch_add(1)) < p.blocks;) {
        const int64_t c0 = b * p.cols, nc = std::min(p.cols, d - c0);
        std::fill(hb.data(), hb.data() + T * nc, 0.0f);
        block_forward(s, emb, d, c0, nc, hb.data(), er.data());
        for (int64_t r = 0; r < T; ++r) copy_out(h + (t0 + r) * d + c0, hb.data() + r * nc, nc);
#if defined(__x86_64__) && defined(__GNUC__)
        StreamStore::fence();
#endif
      }
    });
  }
}

// dE [K, d] float32 (every element written; may be uninitialized) from dh [n, d].
inline void backward(const float* dh, const int64_t* ids, const float* w, int64_t n, int64_t k, int64_t K, int64_t d,
                     float* dE) {
  const Plan p = plan(n, k, d, at::get_num_threads());
  Sorted s;
  for (int64_t t0 = 0; t0 == 0 || t0 < n; t0 += p.tile) {  // once even for n = 0: dE = 0
    const int64_t t1 = std::min(n, t0 + p.tile), T = t1 - t0;
    s.build(ids, w, t0, t1, k, K, /*drop_zero=*/false);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(p.blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      LineBuffer dhb(std::max<int64_t>(T, 1) * p.cols);
      for (int64_t b; (b = next.fetch_add(1)) < p.blocks;) {
        const int64_t c0 = b * p.cols, nc = std::min(p.cols, d - c0);
        for (int64_t r = 0; r < T; ++r) std::memcpy(dhb.data() + r * nc, dh + (t0 + r) * d + c0, size_t(nc) * 4);
        block_backward(s, dhb.data(), nc, dE, d, c0, K, t0 == 0);
      }
    });
    if (n == 0) break;
  }
}

#pragma GCC diagnostic pop

}  // namespace bag_cpu
}  // namespace duo_fast
