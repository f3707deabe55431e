// Reused host buffers for the dense [K, d] float32 embedding gradients of the CPU
// backward kernels (topk_bag_backward, curriculum_embed_backward).
//
// Why: a training step that drops its gradients (optimizer.zero_grad(), set_to_none
// by default) frees the 147 MiB GPT-2 embedding gradient, and the next backward gets
// fresh pages from the kernel: ~37k page faults of 4 KiB (or 74 huge pages the
// kernel must zero), which cost as much as the bag's backward itself on a small CPU
// (docs/benchmarks.md). torch's CPU allocator keeps no
// cache (glibc returns these mmap'ed blocks to the kernel on free), so duo_fast
// keeps the last freed ones, like the CUDA caching allocator does on a GPU.
//
// Policy: buffers of at least kMinCachedBytes, 2 MiB aligned and sized, advised to
// transparent huge pages. A freed one is kept (most recent first) while the cache
// holds at most kMaxCachedBuffers and DUO_FAST_GRAD_CACHE_MB (default 4096; 0: no
// cache, every buffer goes back to the kernel), evicting the oldest; a request takes
// a kept buffer of exactly its rounded size. The variable is read at each allocation
// and by info() (a lower value evicts at once). Kept buffers stay resident until
// reused or released by empty_cache() (duo_fast.empty_cache()). Thread-safe; the
// deleter may run on any thread and at exit, and neither throws nor allocates. The
// tensors are from_blob: their storage cannot be resized (resize_ to a larger size
// raises), and torch's profiler does not count them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace duo_fast {
namespace grad_cache {

constexpr int64_t kMinCachedBytes = int64_t(16) << 20;
constexpr int64_t kMaxCachedBuffers = 2;
constexpr int64_t kDefaultLimitMiB = 4096;

// Uninitialized float32 CPU tensor [rows, cols] (the caller writes every element):
// a cached buffer when one of the size is kept, else a fresh one.
at::Tensor empty_float(int64_t rows, int64_t cols);

struct Info {
  int64_t bytes, buffers, limit_bytes;
};
Info info();

// Frees every kept buffer; returns the bytes freed.
int64_t empty_cache();

}  // namespace grad_cache
}  // namespace duo_fast
