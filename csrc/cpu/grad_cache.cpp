// Process-wide cache of large gradient buffers (grad_cache.h has the why and the policy).
#include "grad_cache.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace duo_fast {
namespace grad_cache {
namespace {

constexpr int64_t kHugePage = int64_t(2) << 20;

struct Block {
  void* ptr;
  int64_t bytes;
};

// Buffers to free outside the lock: a fixed array, so the deleter never allocates.
struct Drop {
  std::array<Block, kMaxCachedBuffers + 1> blocks;
  int n = 0;
  void add(Block b) { blocks[size_t(n++)] = b; }
  ~Drop() {
    for (int i = 0; i < n; ++i) std::free(blocks[size_t(i)].ptr);
  }
};

struct Cache {
  std::mutex mu;
  std::vector<Block> kept;  // oldest first; capacity reserved: push_back never allocates
  int64_t bytes = 0;
  int64_t limit = kDefaultLimitMiB << 20;  // DUO_FAST_GRAD_CACHE_MB as last read by a caller

  Cache() { kept.reserve(kMaxCachedBuffers + 1); }

  // Evicts the oldest kept buffers until `extra` more bytes and one more buffer fit
  // (extra < 0: until the kept ones fit). Caller holds mu.
  void make_room(int64_t extra, Drop& drop) {
    const int64_t max_buffers = extra < 0 ? kMaxCachedBuffers : kMaxCachedBuffers - 1;
    const int64_t need = extra < 0 ? 0 : extra;
    while (!kept.empty() && (bytes + need > limit || int64_t(kept.size()) > max_buffers)) {
      drop.add(kept.front());
      bytes -= kept.front().bytes;
      kept.erase(kept.begin());
    }
  }
};

// Never destroyed: a gradient freed during interpreter shutdown still finds it.
Cache*& cache_ptr() {
  static Cache* c = new Cache;
  return c;
}
Cache& cache() { return *cache_ptr(); }

#if defined(__linux__)
// A fork() while another thread holds mu (a backward on a worker thread) would leave
// the child's copy locked forever: the child starts a fresh cache (the parent's kept
// buffers are left mapped in the child, unused).
void fresh_cache_in_child() { cache_ptr() = new Cache; }
const int kAtFork = pthread_atfork(nullptr, nullptr, &fresh_cache_in_child);
#endif

// DUO_FAST_GRAD_CACHE_MB, read on the caller's thread at every allocation and info()
// (tests and users may change it) and stored for the deleter, which reads no
// environment (getenv racing a setenv on another thread is undefined) and must not
// throw. A lower limit evicts what no longer fits at once.
int64_t read_limit() {
  int64_t mib = kDefaultLimitMiB;
  if (const char* v = std::getenv("DUO_FAST_GRAD_CACHE_MB")) {
    char* end = nullptr;
    const long long x = std::strtoll(v, &end, 10);
    TORCH_CHECK(end != v && *end == '\0' && x >= 0 && x < (1LL << 40),
                "duo_fast: DUO_FAST_GRAD_CACHE_MB must be a whole number of MiB >= 0, got '", v, "'");
    mib = int64_t(x);
  }
  const int64_t limit = mib << 20;
  Drop drop;
  std::lock_guard<std::mutex> lock(cache().mu);
  cache().limit = limit;
  cache().make_room(-1, drop);
  return limit;
}

void give_back(void* ptr, int64_t bytes) noexcept {
  Drop drop;
  std::lock_guard<std::mutex> lock(cache().mu);
  Cache& c = cache();
  if (bytes <= c.limit) {
    c.make_room(bytes, drop);
    c.kept.push_back({ptr, bytes});
    c.bytes += bytes;
  } else {
    drop.add({ptr, bytes});
  }
}

void* take(int64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(cache().mu);
    Cache& c = cache();
    for (auto it = c.kept.rbegin(); it != c.kept.rend(); ++it)
      if (it->bytes == bytes) {
        void* p = it->ptr;
        c.bytes -= bytes;
        c.kept.erase(std::next(it).base());
        return p;
      }
  }
  void* p = nullptr;
  TORCH_CHECK(posix_memalign(&p, size_t(kHugePage), size_t(bytes)) == 0 && p != nullptr,
              "duo_fast: out of host memory allocating a ", bytes >> 20, " MiB gradient buffer");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  (void)madvise(p, size_t(bytes), MADV_HUGEPAGE);  // a hint: no error when refused
#endif
  return p;
}

}  // namespace

at::Tensor empty_float(int64_t rows, int64_t cols) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "duo_fast: gradient shape must be non-negative, got [", rows, ", ", cols, "]");
  const auto options = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  const int64_t need = rows * cols * int64_t(sizeof(float));
  (void)read_limit();
  if (need < kMinCachedBytes) return at::empty({rows, cols}, options);
  const int64_t bytes = (need + kHugePage - 1) / kHugePage * kHugePage;
  auto deleter = [bytes](void* q) { give_back(q, bytes); };
  std::unique_ptr<void, decltype(deleter)> p(take(bytes), deleter);  // back to the cache if from_blob throws
  at::Tensor t = at::from_blob(p.get(), {rows, cols}, deleter, options);
  (void)p.release();
  return t;
}

Info info() {
  const int64_t limit = read_limit();
  std::lock_guard<std::mutex> lock(cache().mu);
  return {cache().bytes, int64_t(cache().kept.size()), limit};
}

int64_t empty_cache() {
  std::vector<Block> kept;
  {
    std::lock_guard<std::mutex> lock(cache().mu);
    kept.swap(cache().kept);
    cache().kept.reserve(kMaxCachedBuffers + 1);
    cache().bytes = 0;
  }
  int64_t freed = 0;
  for (const Block& b : kept) {
    freed += b.bytes;
    std::free(b.ptr);
  }
  return freed;
}

}  // namespace grad_cache
}  // namespace duo_fast
