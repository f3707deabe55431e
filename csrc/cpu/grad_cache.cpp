// Process-wide cache of large gradient buffers (grad_cache.h has the why and the policy).
#include "grad_cache.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
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

struct Cache {
  std::mutex mu;
  std::vector<Block> kept;  // oldest first
  int64_t bytes = 0;
};

// Never destroyed: a gradient freed during interpreter shutdown still finds it.
Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

// DUO_FAST_GRAD_CACHE_MB, read at every call (tests and users may change it). A bad
// value raises where it can (strict: allocation, info) and means the default in the
// deleter, which must not throw.
int64_t limit_bytes(bool strict) {
  int64_t mib = kDefaultLimitMiB;
  if (const char* v = std::getenv("DUO_FAST_GRAD_CACHE_MB")) {
    char* end = nullptr;
    const long long x = std::strtoll(v, &end, 10);
    const bool ok = end != v && *end == '\0' && x >= 0 && x < (1LL << 40);
    TORCH_CHECK(ok || !strict, "duo_fast: DUO_FAST_GRAD_CACHE_MB must be a whole number of MiB >= 0, got '", v, "'");
    if (ok) mib = int64_t(x);
  }
  return mib << 20;
}

void give_back(void* ptr, int64_t bytes) noexcept {
  const int64_t limit = limit_bytes(/*strict=*/false);
  std::vector<Block> drop;
  {
    std::lock_guard<std::mutex> lock(cache().mu);
    Cache& c = cache();
    if (bytes <= limit) {
      while (!c.kept.empty() && (c.bytes + bytes > limit || int64_t(c.kept.size()) >= kMaxCachedBuffers)) {
        drop.push_back(c.kept.front());
        c.bytes -= c.kept.front().bytes;
        c.kept.erase(c.kept.begin());
      }
      c.kept.push_back({ptr, bytes});
      c.bytes += bytes;
    } else {
      drop.push_back({ptr, bytes});
    }
  }
  for (const Block& b : drop) std::free(b.ptr);
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
  (void)limit_bytes(/*strict=*/true);
  if (need < kMinCachedBytes) return at::empty({rows, cols}, options);
  const int64_t bytes = (need + kHugePage - 1) / kHugePage * kHugePage;
  void* p = take(bytes);
  return at::from_blob(p, {rows, cols}, [bytes](void* q) { give_back(q, bytes); }, options);
}

Info info() {
  std::lock_guard<std::mutex> lock(cache().mu);
  return {cache().bytes, int64_t(cache().kept.size()), limit_bytes(/*strict=*/true)};
}

int64_t empty_cache() {
  std::vector<Block> drop;
  {
    std::lock_guard<std::mutex> lock(cache().mu);
    drop.swap(cache().kept);
    cache().bytes = 0;
  }
  int64_t freed = 0;
  for (const Block& b : drop) {
    freed += b.bytes;
    std::free(b.ptr);
  }
  return freed;
}

}  // namespace grad_cache
}  // namespace duo_fast
