// cuda_emulation.h -- test-only emulation of the CUDA execution model on the CPU.
//
// The exact source of a CUDA kernel (.cu) compiles with
//     g++ -std=c++20 -x c++ -DDUO_FAST_EMULATE_CUDA -Itests/emulation -Icsrc/include file.cu
// and runs on the host: blocks one after another, the threads of a block
// concurrently, either as cooperative fibers on one OS thread (fast; a seed
// shuffles the schedule) or as one OS thread per CUDA thread (for
// ThreadSanitizer). See docs/cuda_emulation.md for the design and the
// rules kernels follow. Only the C++ standard library and POSIX are used.
//
// Public host API (namespace cuda_emu):
//   enum class Mode { fiber, thread };
//   Mode mode();                 void set_mode(Mode);      env CUDA_EMU_MODE=fiber|thread (default fiber)
//   std::uint64_t seed();        void set_seed(uint64_t);  env CUDA_EMU_SEED (default 0 = natural order)
//   int smem_fill();             void set_smem_fill(int);  env CUDA_EMU_SMEM_FILL (-1 = auto, else a byte)
//   template <class... KArgs, class... Args>
//   void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block,
//               std::size_t dynamic_smem_bytes, cudaStream_t stream, Args&&... args);
//   void* dynamic_smem();  std::size_t dynamic_smem_size();   (device side: this block's buffer)
//   env CUDA_EMU_STACK_KB: fiber stack size (default 256 KiB, 1 MiB under ASan).
//   C hooks for ctypes (weak, default visibility): cuda_emu_set_mode(int 0=fiber/1=thread),
//   cuda_emu_get_mode(), cuda_emu_set_seed(unsigned long long), cuda_emu_get_seed(),
//   cuda_emu_set_smem_fill(int).
// launch() is synchronous; a bad configuration (block > 1024 threads, > 48 KiB
// of dynamic shared memory without cudaFuncSetAttribute, ...) sets
// cudaGetLastError() like CUDA does. A small runtime subset (cudaMalloc,
// cudaMallocManaged, cudaMemcpy*, cudaMemset*, cudaDeviceSynchronize,
// cudaFuncSetAttribute, cudaDeviceGetAttribute ...) works on host memory.
//
// Errors abort with "cuda_emu: error: ..." on stderr, naming the kernel,
// block and thread: deadlock (all live threads wait and no barrier can
// complete; found at once in fiber mode, by a 50 ms watchdog in thread
// mode), __syncthreads reached at different call sites, warp intrinsics
// with a mask other than 0xffffffff, on a partial warp, with an exited lane,
// or with lanes in different intrinsics; __trap(); builtins used outside a
// kernel. Shared memory (dynamic, and every static __shared__ variable: they
// live in one ELF section) is refilled with garbage before every block.
//
// Thread mode synchronizes like CUDA (block barrier: the block; warp op: the
// warp; block start: launcher -> thread), so ThreadSanitizer reports a
// missing __syncthreads as a data race. Blocks still run one at a time.
//
// Fiber mode: hand-written x86-64 context switch (ucontext elsewhere, or with
// -DCUDA_EMU_USE_UCONTEXT, ~8x slower); stacks with guard pages are kept for
// reuse; ASan-annotated (__sanitizer_*_switch_fiber). Under ThreadSanitizer,
// fiber mode is unavailable and mode() reports thread mode.
//
// Limitations (by design): no inter-block waiting (blocks run in sequence), no
// cooperative groups / CUB / inline PTX / half types; warp intrinsics need the
// full mask and all 32 lanes; __expf & co. are exact host functions; launches
// are serialized process-wide; thread mode's worker threads live until the
// process exits (do not dlclose).
//
// Schedules with a nonzero seed (fiber mode): every warp's lanes start each
// block in a seeded shuffled order and warps race by random priorities; every
// atomic read-modify-write first yields to a random ready lane of the block,
// so atomics of different threads interleave in a seeded random order (an
// order-dependent float sum gives different bits for different seeds). Thread
// mode with a nonzero seed starts each block's threads in the same kind of
// shuffled order (the OS schedules them from there).
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is for g++ builds with DUO_FAST_EMULATE_CUDA; do not include it under nvcc"
#endif
#if __cplusplus < 202002L
#error "cuda_emulation.h needs C++20 (-std=c++20)"
#endif

// <memory> first: libstdc++ spells __attribute__((__noinline__)) in
// shared_ptr_base.h, which our __noinline__ macro below would break; its
// include guard keeps later #include <memory> from re-expanding it.
#include <memory>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <source_location>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <math.h>  // global ::expf, ::isnan ... as kernels spell them

#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <semaphore.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#else
#define CUDA_EMU_ASAN 0
#endif
#if defined(__SANITIZE_THREAD__)
#define CUDA_EMU_TSAN 1
#else
#define CUDA_EMU_TSAN 0
#endif

// Fiber context switch: hand-written on x86-64 (no signal-mask syscall, ~20x
// cheaper than swapcontext); ucontext elsewhere or with -DCUDA_EMU_USE_UCONTEXT.
#if defined(__x86_64__) && !defined(CUDA_EMU_USE_UCONTEXT)
#define CUDA_EMU_ASM_SWITCH 1
#else
#define CUDA_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

// Functions on the path of a fiber that never returns carry no ASan stack
// redzones, so none stay poisoned when the stack is reused by the next block.
// (GCC does not inline across differing sanitizer attributes.)
#if CUDA_EMU_ASAN
#define CUDA_EMU_NO_ASAN __attribute__((no_sanitize_address))
#else
#define CUDA_EMU_NO_ASAN
#endif

// ---------------------------------------------------------------------------
// Keywords
// ---------------------------------------------------------------------------
// Kernels say `#pragma unroll`, which g++ does not know: keep -Wall quiet
// for the rest of the translation unit (honoured from g++ 13 on; harness.py
// also passes -Wno-unknown-pragmas).
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
// One block runs at a time (process-wide), so a static variable is exactly
// one block's shared memory. Do not write `static __shared__`. The variables
// are placed in one section, cuda_emu_shared, which the launcher overwrites
// with garbage before every block, as CUDA gives no initial value (GCC's ASan
// does not pad variables of a user section, so the fill touches no redzone).
#define __shared__ __attribute__((section("cuda_emu_shared"))) static
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// __restrict__ is already a g++ keyword.

// ---------------------------------------------------------------------------
// Vector and launch types (layout and alignment as in CUDA's vector_types.h)
// ---------------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct int3 { int x, y, z; };
struct float3 { float x, y, z; };
struct __align__(8) int2 { int x, y; };
struct __align__(8) uint2 { unsigned int x, y; };
struct __align__(8) float2 { float x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(16) uint4 { unsigned int x, y, z, w; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(16) double2 { double x, y; };
struct __align__(16) longlong2 { long long x, y; };
struct __align__(16) ulonglong2 { unsigned long long x, y; };

inline constexpr int2 make_int2(int x, int y) { return {x, y}; }
inline constexpr uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline constexpr float2 make_float2(float x, float y) { return {x, y}; }
inline constexpr int3 make_int3(int x, int y, int z) { return {x, y, z}; }
inline constexpr uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline constexpr float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline constexpr int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline constexpr uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline constexpr float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline constexpr double2 make_double2(double x, double y) { return {x, y}; }

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

inline constexpr int warpSize = 32;

// Bounds of the static __shared__ section, from the linker (weak: a program
// without __shared__ variables has none; hidden: each shared library poisons
// its own variables).
extern "C" char __start_cuda_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_cuda_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace cuda_emu {

enum class Mode : int { fiber = 0, thread = 1 };

// Limits enforced at launch: those of sm_80 (the stricter target).
inline constexpr std::size_t default_dynamic_smem_limit = 48 * 1024;
inline constexpr std::size_t max_dynamic_smem_optin = 166912;  // 163 KiB, A100

namespace detail {

// ---------------------------------------------------------------------------
// Global settings (env read lazily; setters override)
// ---------------------------------------------------------------------------
inline std::atomic<int> g_mode{-1};  // -1: not yet read from the environment
inline std::atomic<std::uint64_t> g_seed{0};
inline std::atomic<bool> g_seed_set{false};
inline std::atomic<int> g_fill{-2};  // -2: not yet read; -1: auto; else byte

inline thread_local cudaError_t tl_last_error = cudaSuccess;

[[noreturn]] inline void die_plain(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void die_plain(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  std::fputs("cuda_emu: error: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::fflush(stderr);
  std::abort();
}

inline int env_mode() {
  const char* s = std::getenv("CUDA_EMU_MODE");
  if (!s || !*s || std::strcmp(s, "fiber") == 0) return int(Mode::fiber);
  if (std::strcmp(s, "thread") == 0) return int(Mode::thread);
  die_plain("CUDA_EMU_MODE=%s: expected 'fiber' or 'thread'", s);
}

inline std::uint64_t env_u64(const char* name, std::uint64_t dflt) {
  const char* s = std::getenv(name);
  if (!s || !*s) return dflt;
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s, &end, 0);
  if (errno || *end) die_plain("%s=%s: expected an unsigned integer", name, s);
  return v;
}

struct Stack {
  char* base = nullptr;  // lowest usable address (guard page below it)
  std::size_t size = 0;
  std::size_t color = 0;  // top-of-stack offset, so that hot frames of different fibers use different cache sets
};

inline std::size_t stack_bytes() {
  static const std::size_t bytes = [] {
    std::size_t kb = env_u64("CUDA_EMU_STACK_KB", CUDA_EMU_ASAN ? 1024 : 256);
    if (kb < 16) kb = 16;
    return kb * 1024;
  }();
  return bytes;
}

// ---------------------------------------------------------------------------
// Per-launch state
// ---------------------------------------------------------------------------
enum class Op : std::uint8_t {
  none, syncwarp, shfl_idx, shfl_up, shfl_down, shfl_xor, ballot, all, any, match_any,
  red_add, red_min_s, red_max_s, red_min_u, red_max_u, red_and, red_or, red_xor,
  collective,  // a warp-wide matrix instruction (mma.sync, ldmatrix): Warp::coll_fn over all lanes' operands
};

inline const char* op_name(Op op) {
  switch (op) {
    case Op::none: return "(none)";
    case Op::syncwarp: return "__syncwarp";
    case Op::shfl_idx: return "__shfl_sync";
    case Op::shfl_up: return "__shfl_up_sync";
    case Op::shfl_down: return "__shfl_down_sync";
    case Op::shfl_xor: return "__shfl_xor_sync";
    case Op::ballot: return "__ballot_sync";
    case Op::all: return "__all_sync";
    case Op::any: return "__any_sync";
    case Op::match_any: return "__match_any_sync";
    case Op::red_add: return "__reduce_add_sync";
    case Op::red_min_s: case Op::red_min_u: return "__reduce_min_sync";
    case Op::red_max_s: case Op::red_max_u: return "__reduce_max_sync";
    case Op::red_and: return "__reduce_and_sync";
    case Op::red_or: return "__reduce_or_sync";
    case Op::red_xor: return "__reduce_xor_sync";
    case Op::collective: return "a warp matrix instruction (mma.sync / ldmatrix)";
  }
  return "?";
}

enum class BarKind : std::uint8_t { sync, count, and_, or_ };

inline const char* bar_name(BarKind k) {
  switch (k) {
    case BarKind::sync: return "__syncthreads";
    case BarKind::count: return "__syncthreads_count";
    case BarKind::and_: return "__syncthreads_and";
    case BarKind::or_: return "__syncthreads_or";
  }
  return "?";
}

struct Loc {  // a call site, compared by file and line
  const char* file = "?";
  unsigned line = 0;
  Loc() = default;
  Loc(const std::source_location& l) : file(l.file_name()), line(l.line()) {}
  bool operator==(const Loc& o) const {
    return line == o.line && (file == o.file || std::strcmp(file, o.file) == 0);
  }
};

struct Ctx {
#if CUDA_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

enum class Wait : std::uint8_t { none, block, warp };
enum class LaneState : std::uint8_t { running, blocked, exited };

struct Block;

// Fields written by one thread and read by another only for reports and the
// thread-mode watchdog are relaxed atomics: no data race, and (unlike locks)
// no happens-before edges that would hide the kernel's own races from TSan.
struct Lane {
  uint3 tid{};
  unsigned linear = 0, warp = 0, lane = 0;
  Block* blk = nullptr;
  bool blocked = false;  // waiting at a barrier that has not completed (guarded by that barrier's lock)
  std::atomic<LaneState> st{LaneState::running};
  std::atomic<Wait> wait{Wait::none};  // what the lane waits at (or last waited at)
  std::atomic<Op> wait_op{Op::none};
  std::atomic<const char*> wait_file{"?"};
  std::atomic<unsigned> wait_line{0};
  std::atomic<std::uint64_t> progress{0};  // arrivals, for the thread-mode watchdog
  Ctx ctx;                                 // fiber mode
  Stack* stack = nullptr;
  void* asan_fake = nullptr;
};

inline void note_wait(Lane* l, Wait w, Op op, const Loc& loc) {
  l->wait.store(w, std::memory_order_relaxed);
  l->wait_op.store(op, std::memory_order_relaxed);
  l->wait_file.store(loc.file, std::memory_order_relaxed);
  l->wait_line.store(loc.line, std::memory_order_relaxed);
}

struct Warp {
  std::uint32_t present = 0;  // lanes that exist (a partial last warp has fewer)
  std::uint32_t exited = 0;
  std::uint32_t arrived = 0;  // lanes waiting in the current warp op
  unsigned narrived = 0;
  Op op = Op::none;
  int width = 32;
  Loc where;
  std::uint64_t in[32];
  int arg[32];
  std::uint64_t out[32];
  // Op::collective: the instruction's semantics, run once by the last arriving lane
  // over every lane's operand block (in[l] holds lane l's pointer); coll_name names it.
  void (*coll_fn)(void* const* lane_operands) = nullptr;
  const char* coll_name = "";
  // fiber scheduling with a nonzero seed: ready lanes, warp priority, lane order
  std::uint32_t ready = 0;
  std::uint64_t prio = 0;
  std::uint8_t perm[32];
  // thread mode: warp ops synchronize the warp's lanes only
  std::mutex mu;
  std::condition_variable cv;
};

struct Block {
  Mode mode = Mode::fiber;
  const void* kernel = nullptr;
  void (*invoke)(void*) = nullptr;
  void* call = nullptr;

  dim3 gdim, bdim;
  uint3 bid{};
  unsigned n = 0, nwarps = 0;
  unsigned live = 0;     // guarded by bar_mu in thread mode
  unsigned waiting = 0;  // fiber mode only: lanes blocked at a barrier

  // block barrier (__syncthreads family)
  unsigned bar_arrived = 0;
  BarKind bar_kind = BarKind::sync;
  Loc bar_where;
  int bar_count = 0;
  bool bar_and = true, bar_or = false;
  int bar_result = 0;
  std::vector<std::uint32_t> bar_waiters;

  std::unique_ptr<Lane[]> lanes;
  std::unique_ptr<Warp[]> warps;

  unsigned char* smem = nullptr;
  std::size_t smem_bytes = 0;

  std::uint64_t seed = 0, rng = 0;

  // fiber mode
  Ctx main_ctx;
  void* main_fake = nullptr;
  const void* main_bottom = nullptr;
  std::size_t main_size = 0;
  bool entering_from_main = false;
  std::vector<std::uint32_t> fifo;
  std::size_t fifo_head = 0, fifo_count = 0;

  // thread mode. Synchronization follows CUDA's: __syncthreads orders the
  // block (bar_mu), a warp op its warp (Warp::mu), a block start goes from the
  // launching thread to each thread alone (a POSIX semaphore per thread), and
  // nothing orders two threads that merely start, exit or wait for the next
  // block -- so ThreadSanitizer sees the races a GPU would have.
  std::mutex bar_mu;
  std::condition_variable bar_cv;
  std::mutex done_mu;
  std::condition_variable done_cv;
  bool done = false;  // guarded by done_mu
  std::unique_ptr<sem_t[]> start_sem;
  bool stop = false;  // written before the final sem_post
};

inline thread_local Lane* tl_lane = nullptr;

inline std::uint64_t splitmix64(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline std::string kernel_name(const void* k) {
  Dl_info info{};
  if (k && dladdr(k, &info) && info.dli_sname) {
    int st = 0;
    char* dem = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
    std::string r = (st == 0 && dem) ? dem : info.dli_sname;
    std::free(dem);
    return r;
  }
  char buf[64];
  std::snprintf(buf, sizeof buf, "kernel@%p", k);
  return buf;
}

// Prints "cuda_emu: error: <msg>" plus the current kernel/block/thread, aborts.
[[noreturn]] inline void fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fatal(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  std::fputs("cuda_emu: error: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  if (Lane* l = tl_lane) {
    Block* b = l->blk;
    std::fprintf(stderr,
                 "cuda_emu:   in %s, gridDim (%u,%u,%u) blockDim (%u,%u,%u), blockIdx (%u,%u,%u), "
                 "threadIdx (%u,%u,%u) [warp %u lane %u], %s mode, seed %llu\n",
                 kernel_name(b->kernel).c_str(), b->gdim.x, b->gdim.y, b->gdim.z, b->bdim.x, b->bdim.y,
                 b->bdim.z, b->bid.x, b->bid.y, b->bid.z, l->tid.x, l->tid.y, l->tid.z, l->warp, l->lane,
                 b->mode == Mode::fiber ? "fiber" : "thread", (unsigned long long)b->seed);
  }
  std::fflush(stderr);
  std::abort();
}

inline Lane* cur_lane() {
  Lane* l = tl_lane;
  if (__builtin_expect(l == nullptr, 0))
    die_plain("a device builtin (threadIdx, __syncthreads, __shfl_*, dynamic_smem ...) was used outside a kernel launched by cuda_emu::launch");
  return l;
}

inline const uint3& thread_idx() { return cur_lane()->tid; }
inline const uint3& block_idx() { return cur_lane()->blk->bid; }
inline const dim3& block_dim() { return cur_lane()->blk->bdim; }
inline const dim3& grid_dim() { return cur_lane()->blk->gdim; }

// ---------------------------------------------------------------------------
// Fiber stacks and context switch
// ---------------------------------------------------------------------------
inline std::vector<Stack>& stack_pool() {  // grown under the launch mutex, never freed
  static std::vector<Stack> pool;
  return pool;
}

inline void ensure_stacks(std::size_t n) {
  auto& pool = stack_pool();
  const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
  const std::size_t size = (stack_bytes() + page - 1) / page * page;
  while (pool.size() < n) {
    void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) die_plain("mmap of a %zu-byte fiber stack failed: %s", size, std::strerror(errno));
    // Guard page: a stack overflow faults instead of corrupting a neighbour.
    if (mprotect(p, page, PROT_NONE) != 0) die_plain("mprotect of a guard page failed");
    pool.push_back(Stack{static_cast<char*>(p) + page, size, (pool.size() % 61) * 64});
  }
}

CUDA_EMU_NO_ASAN inline void fiber_entry();

}  // namespace detail
}  // namespace cuda_emu

#if CUDA_EMU_ASM_SWITCH
// void cuda_emu_ctx_switch_v1(void** save_sp, void* new_sp): pushes the
// callee-saved registers, stores rsp, loads the other stack, pops, returns
// there. Weak + COMDAT so every translation unit may carry a copy.
extern "C" void cuda_emu_ctx_switch_v1(void** save_sp, void* new_sp);
__asm__(
    ".pushsection .text.cuda_emu_ctx_switch_v1,\"axG\",@progbits,cuda_emu_ctx_switch_v1,comdat\n"
    ".weak cuda_emu_ctx_switch_v1\n"
    ".hidden cuda_emu_ctx_switch_v1\n"
    ".type cuda_emu_ctx_switch_v1,@function\n"
    "cuda_emu_ctx_switch_v1:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size cuda_emu_ctx_switch_v1, .-cuda_emu_ctx_switch_v1\n"
    ".popsection\n");
#endif

namespace cuda_emu {
namespace detail {

inline void ctx_init(Ctx& c, Stack& s) {
#if CUDA_EMU_ASM_SWITCH
  auto top = reinterpret_cast<std::uintptr_t>(s.base + s.size - s.color) & ~std::uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                  // fake return address: entry sees rsp % 16 == 8
  *--sp = reinterpret_cast<void*>(&fiber_entry);    // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;      // r15 r14 r13 r12 rbx rbp (rbp = 0 ends backtraces)
  c.sp = sp;
#else
  if (getcontext(&c.uc) != 0) die_plain("getcontext failed");
  c.uc.uc_stack.ss_sp = s.base;
  c.uc.uc_stack.ss_size = s.size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&fiber_entry), 0);
#endif
}

CUDA_EMU_NO_ASAN inline void ctx_jump(Ctx& from, Ctx& to) {
#if CUDA_EMU_ASM_SWITCH
  cuda_emu_ctx_switch_v1(&from.sp, to.sp);
#else
  if (swapcontext(&from.uc, &to.uc) != 0) die_plain("swapcontext failed");
#endif
}

// Switch from `from` to `to` (nullptr = the launching thread's own context).
// A dying fiber never resumes; ASan is told so that it drops its fake stack.
CUDA_EMU_NO_ASAN inline void switch_to(Block* b, Lane* from, Lane* to, bool dying) {
  Ctx& fc = from ? from->ctx : b->main_ctx;
  Ctx& tc = to ? to->ctx : b->main_ctx;
  tl_lane = to;
#if CUDA_EMU_ASAN
  void** save = dying ? nullptr : (from ? &from->asan_fake : &b->main_fake);
  const void* bottom = to ? static_cast<const void*>(to->stack->base) : b->main_bottom;
  std::size_t size = to ? to->stack->size : b->main_size;
  __sanitizer_start_switch_fiber(save, bottom, size);
#else
  (void)dying;
#endif
  ctx_jump(fc, tc);
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(from ? from->asan_fake : b->main_fake, nullptr, nullptr);
#endif
}

// ---------------------------------------------------------------------------
// Fiber scheduler. Seed 0: one FIFO, lanes in natural order (all warps advance
// barrier by barrier). Seed != 0: every warp gets a random priority (redrawn
// whenever one of its barriers completes) and a random lane order; the ready
// lane of the highest-priority warp runs, so some warps race ahead of others.
// ---------------------------------------------------------------------------
inline void shuffle_perm(Block* b, Warp& w) {
  for (int i = 0; i < 32; ++i) w.perm[i] = std::uint8_t(i);
  for (int i = 31; i > 0; --i) {
    int j = int(splitmix64(b->rng) % std::uint64_t(i + 1));
    std::swap(w.perm[i], w.perm[j]);
  }
}

inline void make_ready(Block* b, std::uint32_t id) {
  if (b->seed == 0) {
    b->fifo[(b->fifo_head + b->fifo_count) % b->fifo.size()] = id;
    ++b->fifo_count;
  } else {
    b->warps[id / 32].ready |= 1u << (id % 32);
  }
}

inline Lane* pick_next(Block* b) {
  if (b->seed == 0) {
    if (b->fifo_count == 0) return nullptr;
    std::uint32_t id = b->fifo[b->fifo_head];
    b->fifo_head = (b->fifo_head + 1) % b->fifo.size();
    --b->fifo_count;
    return &b->lanes[id];
  }
  Warp* best = nullptr;
  unsigned best_i = 0;
  for (unsigned i = 0; i < b->nwarps; ++i) {
    Warp& w = b->warps[i];
    if (w.ready && (!best || w.prio > best->prio)) best = &w, best_i = i;
  }
  if (!best) return nullptr;
  for (int k = 0; k < 32; ++k) {
    unsigned l = best->perm[k];
    if (best->ready & (1u << l)) {
      best->ready &= ~(1u << l);
      return &b->lanes[best_i * 32 + l];
    }
  }
  return nullptr;  // unreachable
}

inline void redraw_warp(Block* b, Warp& w) {
  w.prio = splitmix64(b->rng);
  shuffle_perm(b, w);
}

// The running lane gives the CPU to the next ready lane (maybe itself).
inline void fiber_yield(Block* b, Lane* me) {
  Lane* next = pick_next(b);
  if (next == nullptr) fatal("internal: fiber scheduler has no ready lane");
  if (next != me) switch_to(b, me, next, false);
}

// ---------------------------------------------------------------------------
// Barriers
// ---------------------------------------------------------------------------
// Takes `m` in thread mode only: fiber mode is single-threaded.
struct Guard {
  std::unique_lock<std::mutex> lk;
  Guard(Block* b, std::mutex& m) : lk(m, std::defer_lock) {
    if (b->mode == Mode::thread) lk.lock();
  }
};

inline std::string lane_mask_str(std::uint32_t m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}

// Built from the lanes' relaxed-atomic fields, so the thread-mode watchdog
// can call it while the lanes sleep.
[[noreturn]] inline void report_deadlock(Block* b) {
  std::string s;
  char buf[512];
  unsigned live = 0;
  for (unsigned i = 0; i < b->n; ++i) live += b->lanes[i].st.load(std::memory_order_relaxed) != LaneState::exited;
  std::snprintf(buf, sizeof buf,
                "deadlock: all %u live threads of block (%u,%u,%u) are waiting and none can proceed "
                "(threads waiting at different barriers, or a warp op missing lanes)",
                live, b->bid.x, b->bid.y, b->bid.z);
  s += buf;
  for (unsigned wi = 0; wi < b->nwarps; ++wi) {
    // Group the warp's lanes by where they wait.
    struct Group {
      Wait w;
      Op op;
      const char* file;
      unsigned line;
      std::uint32_t mask;
    };
    std::vector<Group> groups;
    std::uint32_t exited = 0;
    for (unsigned l = 0; l < 32 && wi * 32 + l < b->n; ++l) {
      Lane& ln = b->lanes[wi * 32 + l];
      if (ln.st.load(std::memory_order_relaxed) == LaneState::exited) {
        exited |= 1u << l;
        continue;
      }
      Group g{ln.wait.load(std::memory_order_relaxed), ln.wait_op.load(std::memory_order_relaxed),
              ln.wait_file.load(std::memory_order_relaxed), ln.wait_line.load(std::memory_order_relaxed), 1u << l};
      if (g.w == Wait::block) g.op = Op::none;
      bool merged = false;
      for (Group& o : groups)
        if (o.w == g.w && o.op == g.op && o.line == g.line && std::strcmp(o.file, g.file) == 0) {
          o.mask |= g.mask;
          merged = true;
        }
      if (!merged) groups.push_back(g);
    }
    std::snprintf(buf, sizeof buf, "\ncuda_emu:   warp %u:", wi);
    s += buf;
    for (const Group& g : groups) {
      std::snprintf(buf, sizeof buf, " lanes %s in %s at %s:%u;", lane_mask_str(g.mask).c_str(),
                    g.w == Wait::block ? "__syncthreads" : op_name(g.op), g.file, g.line);
      s += buf;
    }
    if (exited) s += " lanes " + lane_mask_str(exited) + " exited;";
  }
  if (!tl_lane) {  // the thread-mode watchdog: no current lane to name
    std::snprintf(buf, sizeof buf,
                  "\ncuda_emu:   in %s, gridDim (%u,%u,%u) blockDim (%u,%u,%u), blockIdx (%u,%u,%u), thread mode, seed %llu",
                  kernel_name(b->kernel).c_str(), b->gdim.x, b->gdim.y, b->gdim.z, b->bdim.x, b->bdim.y, b->bdim.z,
                  b->bid.x, b->bid.y, b->bid.z, static_cast<unsigned long long>(b->seed));
    s += buf;
  }
  fatal("%s", s.c_str());
}

// The calling lane cannot proceed until a barrier completes. `g` holds the
// barrier's lock (thread mode); `cv` is that barrier's condition variable.
inline void block_until_released(Block* b, Lane* me, Guard& g, std::condition_variable& cv) {
  me->blocked = true;
  me->st.store(LaneState::blocked, std::memory_order_relaxed);
  if (b->mode == Mode::fiber) {
    ++b->waiting;
    if (b->waiting == b->live) report_deadlock(b);  // nobody is left to complete a barrier
    Lane* next = pick_next(b);
    if (!next) report_deadlock(b);
    switch_to(b, me, next, false);
    if (me->blocked) fatal("internal: fiber resumed while still blocked");
  } else {  // deadlocks are found by the launching thread's watchdog
    cv.wait(g.lk, [me] { return !me->blocked; });
  }
}

// Marks a waiting lane runnable (its barrier completed).
inline void unblock(Block* b, Lane& l) {
  l.blocked = false;
  l.st.store(LaneState::running, std::memory_order_relaxed);
  if (b->mode == Mode::fiber) --b->waiting;
}

// Completes the block barrier: every waiter may go on. `me` is the last
// arriver (runs on), or nullptr when the barrier completes because a thread exited.
inline void release_block_barrier(Block* b, Lane* me) {
  switch (b->bar_kind) {
    case BarKind::sync: b->bar_result = 0; break;
    case BarKind::count: b->bar_result = b->bar_count; break;
    case BarKind::and_: b->bar_result = b->bar_and ? 1 : 0; break;
    case BarKind::or_: b->bar_result = b->bar_or ? 1 : 0; break;
  }
  b->bar_arrived = 0;
  for (std::uint32_t id : b->bar_waiters) unblock(b, b->lanes[id]);
  if (b->mode == Mode::fiber) {
    if (b->seed != 0)
      for (unsigned i = 0; i < b->nwarps; ++i) redraw_warp(b, b->warps[i]);
    for (std::uint32_t id : b->bar_waiters) make_ready(b, id);
    if (me) make_ready(b, me->linear);
  } else {
    b->bar_cv.notify_all();
  }
  b->bar_waiters.clear();
}

inline int block_barrier(BarKind kind, int pred, const std::source_location& where) {
  Lane* me = cur_lane();
  Block* b = me->blk;
  Guard g(b, b->bar_mu);
  Loc loc(where);
  me->progress.fetch_add(1, std::memory_order_relaxed);
  if (b->bar_arrived == 0) {
    b->bar_kind = kind;
    b->bar_where = loc;
    b->bar_count = 0;
    b->bar_and = true;
    b->bar_or = false;
  } else if (!(b->bar_where == loc) || b->bar_kind != kind) {
    fatal("divergent barrier: this thread calls %s at %s:%u while %u other thread(s) wait in %s at %s:%u "
          "(__syncthreads in divergent code is undefined behaviour)",
          bar_name(kind), loc.file, loc.line, b->bar_arrived, bar_name(b->bar_kind), b->bar_where.file,
          b->bar_where.line);
  }
  ++b->bar_arrived;
  if (pred) ++b->bar_count, b->bar_or = true;
  else b->bar_and = false;
  note_wait(me, Wait::block, Op::none, loc);
  if (b->bar_arrived == b->live) {
    release_block_barrier(b, me);
    if (b->mode == Mode::fiber) fiber_yield(b, me);
  } else {
    b->bar_waiters.push_back(me->linear);
    block_until_released(b, me, g, b->bar_cv);
  }
  return b->bar_result;  // stable: the next completion needs this thread again
}

template <class T>
inline std::uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp intrinsics exchange plain scalars of at most 8 bytes");
  std::uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits(std::uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Source lane of a shuffle, following the PTX shfl.sync definition
// (c = ((32 - width) << 8) | clamp, with clamp 0 for .up and 31 otherwise).
inline unsigned shfl_src(Op op, unsigned lane, unsigned b, int width) {
  const unsigned segmask = unsigned(32 - width) & 31u;
  b &= 31u;
  const unsigned min_lane = lane & segmask;
  const unsigned max_lane = (lane & segmask) | (31u & ~segmask);
  int j = int(lane);
  bool ok = true;
  switch (op) {
    case Op::shfl_up: j = int(lane) - int(b); ok = j >= int(min_lane); break;
    case Op::shfl_down: j = int(lane + b); ok = j <= int(max_lane); break;
    case Op::shfl_xor: j = int(lane ^ b); ok = j <= int(max_lane); break;
    case Op::shfl_idx: j = int(min_lane | (b & ~segmask)); ok = j <= int(max_lane); break;
    default: break;
  }
  return ok ? unsigned(j) : lane;
}

inline void compute_warp_op(Warp& w) {
  switch (w.op) {
    case Op::none:
    case Op::syncwarp:
      break;
    case Op::shfl_idx:
    case Op::shfl_up:
    case Op::shfl_down:
    case Op::shfl_xor:
      for (unsigned l = 0; l < 32; ++l) w.out[l] = w.in[shfl_src(w.op, l, unsigned(w.arg[l]), w.width)];
      break;
    case Op::ballot:
    case Op::all:
    case Op::any: {
      std::uint32_t m = 0;
      for (unsigned l = 0; l < 32; ++l)
        if (w.in[l]) m |= 1u << l;
      std::uint64_t r = w.op == Op::ballot ? m : w.op == Op::all ? (m == 0xffffffffu) : (m != 0);
      for (unsigned l = 0; l < 32; ++l) w.out[l] = r;
      break;
    }
    case Op::collective: {
      void* ops[32];
      for (unsigned l = 0; l < 32; ++l) ops[l] = reinterpret_cast<void*>(std::uintptr_t(w.in[l]));
      w.coll_fn(ops);
      for (unsigned l = 0; l < 32; ++l) w.out[l] = 0;
      break;
    }
    case Op::match_any:
      for (unsigned l = 0; l < 32; ++l) {
        std::uint32_t m = 0;
        for (unsigned k = 0; k < 32; ++k)
          if (w.in[k] == w.in[l]) m |= 1u << k;
        w.out[l] = m;
      }
      break;
    default: {  // 32-bit reductions
      std::uint32_t acc = std::uint32_t(w.in[0]);
      for (unsigned l = 1; l < 32; ++l) {
        std::uint32_t v = std::uint32_t(w.in[l]);
        switch (w.op) {
          case Op::red_add: acc += v; break;
          case Op::red_min_s: acc = std::int32_t(v) < std::int32_t(acc) ? v : acc; break;
          case Op::red_max_s: acc = std::int32_t(v) > std::int32_t(acc) ? v : acc; break;
          case Op::red_min_u: acc = std::min(acc, v); break;
          case Op::red_max_u: acc = std::max(acc, v); break;
          case Op::red_and: acc &= v; break;
          case Op::red_or: acc |= v; break;
          case Op::red_xor: acc ^= v; break;
          default: break;
        }
      }
      for (unsigned l = 0; l < 32; ++l) w.out[l] = acc;
    }
  }
}

// Every warp intrinsic: deposit this lane's value, wait for all 32 lanes,
// read this lane's result (computed once by the last arriver).
inline std::uint64_t warp_op(Op op, unsigned mask, std::uint64_t in, int arg, int width,
                             const std::source_location& where, void (*coll_fn)(void* const*) = nullptr,
                             const char* coll_name = nullptr) {
  Lane* me = cur_lane();
  Block* b = me->blk;
  Warp& w = b->warps[me->warp];
  Guard g(b, w.mu);
  Loc loc(where);
  me->progress.fetch_add(1, std::memory_order_relaxed);
  if (mask != 0xffffffffu)
    fatal("%s at %s:%u: mask 0x%08x is not the full mask 0xffffffff (the emulation, like the project's "
          "kernel rules, requires full-warp intrinsics)",
          op_name(op), loc.file, loc.line, mask);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fatal("%s at %s:%u: width %d is not a power of two in [1, 32]", op_name(op), loc.file, loc.line, width);
  if (w.present != 0xffffffffu)
    fatal("%s at %s:%u: warp %u is partial (blockDim (%u,%u,%u) has %u threads; lanes outside %s do not exist), "
          "so a full-mask warp intrinsic is undefined",
          op_name(op), loc.file, loc.line, me->warp, b->bdim.x, b->bdim.y, b->bdim.z, b->n,
          lane_mask_str(w.present).c_str());
  if (w.exited)
    fatal("%s at %s:%u: lanes %s of warp %u have exited; a full-mask warp intrinsic needs all 32 lanes "
          "(pad with identity values instead of returning early)",
          op_name(op), loc.file, loc.line, lane_mask_str(w.exited).c_str(), me->warp);
  if (w.narrived == 0) {
    w.op = op;
    w.width = width;
    w.where = loc;
    w.coll_fn = coll_fn;
    w.coll_name = coll_name ? coll_name : "";
  } else if (op == Op::collective && w.op == op && w.coll_fn != coll_fn) {
    fatal("divergent warp: this lane executes %s at %s:%u while lanes %s of warp %u wait in %s at %s:%u",
          coll_name, loc.file, loc.line, lane_mask_str(w.arrived).c_str(), me->warp, w.coll_name, w.where.file,
          w.where.line);
  } else if (w.op != op || w.width != width) {
    fatal("divergent warp: this lane calls %s (width %d) at %s:%u while lanes %s of warp %u wait in %s (width %d) at %s:%u",
          op_name(op), width, loc.file, loc.line, lane_mask_str(w.arrived).c_str(), me->warp, op_name(w.op),
          w.width, w.where.file, w.where.line);
  }
  w.in[me->lane] = in;
  w.arg[me->lane] = arg;
  w.arrived |= 1u << me->lane;
  note_wait(me, Wait::warp, op, loc);
  if (++w.narrived == 32) {
    compute_warp_op(w);
    w.narrived = 0;
    w.arrived = 0;
    for (unsigned l = 0; l < 32; ++l) {
      Lane& o = b->lanes[me->warp * 32 + l];
      if (&o != me) unblock(b, o);
    }
    if (b->mode == Mode::fiber) {
      if (b->seed != 0) redraw_warp(b, w);  // this warp may now overtake or fall behind
      for (unsigned l = 0; l < 32; ++l) make_ready(b, me->warp * 32 + l);
      fiber_yield(b, me);
    } else {
      w.cv.notify_all();
    }
  } else {
    block_until_released(b, me, g, w.cv);
  }
  return w.out[me->lane];  // stable: the next op needs this lane again
}

// A lane returned from the kernel.
CUDA_EMU_NO_ASAN inline void lane_exit(Lane* me) {
  Block* b = me->blk;
  {
    Warp& w = b->warps[me->warp];
    Guard g(b, w.mu);
    w.exited |= 1u << me->lane;
    if (w.narrived)
      fatal("this thread exited while lanes %s of its warp %u wait for it in %s at %s:%u",
            lane_mask_str(w.arrived).c_str(), me->warp, op_name(w.op), w.where.file, w.where.line);
  }
  bool last = false;
  {
    Guard g(b, b->bar_mu);
    me->st.store(LaneState::exited, std::memory_order_relaxed);
    me->progress.fetch_add(1, std::memory_order_relaxed);
    last = --b->live == 0;
    // Exited threads no longer count for __syncthreads.
    if (b->bar_arrived && b->bar_arrived == b->live) release_block_barrier(b, nullptr);
  }
  if (b->mode == Mode::fiber) {
    if (b->live && b->waiting == b->live) report_deadlock(b);
    Lane* next = b->live ? pick_next(b) : nullptr;
    if (b->live && !next) report_deadlock(b);
    switch_to(b, me, next, true);  // never returns
    __builtin_trap();
  }
  if (last) {  // only the last thread signals the launching thread
    std::lock_guard<std::mutex> lk(b->done_mu);
    b->done = true;
    b->done_cv.notify_all();
  }
}

inline void run_kernel_body(Lane* me) {
  Block* b = me->blk;
  try {
    b->invoke(b->call);
  } catch (const std::exception& e) {
    fatal("C++ exception escaped the kernel: %s", e.what());
  } catch (...) {
    fatal("C++ exception escaped the kernel");
  }
}

CUDA_EMU_NO_ASAN inline void fiber_entry() {
#if CUDA_EMU_ASAN
  const void* old_bottom = nullptr;
  std::size_t old_size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &old_bottom, &old_size);
#endif
  Lane* me = tl_lane;
#if CUDA_EMU_ASAN
  if (me->blk->entering_from_main) {  // remember the launching thread's stack for the switch back
    me->blk->main_bottom = old_bottom;
    me->blk->main_size = old_size;
  }
#endif
  me->blk->entering_from_main = false;
  run_kernel_body(me);
  lane_exit(me);
  __builtin_trap();
}

// ---------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}
inline std::unordered_map<const void*, int>& smem_optin() {  // guarded by launch_mutex
  static std::unordered_map<const void*, int> m;
  return m;
}

inline int current_fill() {
  int f = g_fill.load(std::memory_order_relaxed);
  if (f == -2) {
    std::uint64_t v = env_u64("CUDA_EMU_SMEM_FILL", ~0ull);
    f = v == ~0ull ? -1 : int(v & 0xff);
    g_fill.store(f, std::memory_order_relaxed);
  }
  return f;
}

inline void fill_bytes(Block* b, unsigned char* p, std::size_t n, int f) {
  if (f >= 0) {
    std::memset(p, f, n);
  } else {
    for (std::size_t i = 0; i < n; i += 8) {
      std::uint64_t r = splitmix64(b->rng);
      std::memcpy(p + i, &r, std::min<std::size_t>(8, n - i));
    }
  }
}

// Garbage for shared memory (dynamic, and the static __shared__ section) so
// that reads before writes show up: 0xFF (NaN / -1) with seed 0; with a seed,
// per block one of 0xFF, 0x7F (+3.4e38: survives fmaxf, which would drop a
// NaN), 0xCD, or random bytes.
inline void fill_smem(Block* b) {
  unsigned char* st = reinterpret_cast<unsigned char*>(__start_cuda_emu_shared);
  const std::size_t st_bytes = st ? std::size_t(__stop_cuda_emu_shared - __start_cuda_emu_shared) : 0;
  if (!b->smem_bytes && !st_bytes) return;
  int f = current_fill();
  if (f < 0) {
    if (b->seed == 0) {
      f = 0xFF;
    } else {
      static constexpr int pats[4] = {0xFF, 0x7F, 0xCD, -1};
      f = pats[splitmix64(b->rng) % 4];
    }
  }
  if (b->smem_bytes) fill_bytes(b, b->smem, b->smem_bytes, f);
  if (st_bytes) fill_bytes(b, st, st_bytes, f);
}

inline void setup_block(Block* b, std::uint64_t linear_block) {
  b->bid.x = unsigned(linear_block % b->gdim.x);
  b->bid.y = unsigned((linear_block / b->gdim.x) % b->gdim.y);
  b->bid.z = unsigned(linear_block / (std::uint64_t(b->gdim.x) * b->gdim.y));
  b->live = b->n;
  b->waiting = 0;
  b->bar_arrived = 0;
  b->bar_waiters.clear();
  b->done = false;
  for (unsigned i = 0; i < b->n; ++i) {
    Lane& l = b->lanes[i];
    l.blocked = false;
    l.st.store(LaneState::running, std::memory_order_relaxed);
    l.wait.store(Wait::none, std::memory_order_relaxed);
  }
  for (unsigned i = 0; i < b->nwarps; ++i) {
    Warp& w = b->warps[i];
    w.exited = 0;
    w.arrived = 0;
    w.narrived = 0;
    w.ready = 0;
  }
  fill_smem(b);
}

inline void run_fiber_blocks(Block* b, const std::vector<std::uint32_t>* order, std::uint64_t nblocks) {
  ensure_stacks(b->n);
  auto& pool = stack_pool();
  b->fifo.assign(b->n, 0);
  for (std::uint64_t k = 0; k < nblocks; ++k) {
    setup_block(b, order ? (*order)[k] : k);
    for (unsigned i = 0; i < b->n; ++i) {
      b->lanes[i].stack = &pool[i];
      ctx_init(b->lanes[i].ctx, pool[i]);
    }
    b->fifo_head = b->fifo_count = 0;
    if (b->seed != 0)
      for (unsigned i = 0; i < b->nwarps; ++i) redraw_warp(b, b->warps[i]);
    for (unsigned i = 0; i < b->n; ++i) make_ready(b, i);
    Lane* first = pick_next(b);
    b->entering_from_main = true;
    switch_to(b, nullptr, first, false);  // returns when every lane has exited
    tl_lane = nullptr;
  }
}

inline void sem_wait_retry(sem_t* sem) {
  while (sem_wait(sem) != 0)
    if (errno != EINTR) die_plain("sem_wait failed: %s", std::strerror(errno));
}

// Thread i of every block of one launch.
inline void thread_worker(Block* b, unsigned i) {
  for (;;) {
    sem_wait_retry(&b->start_sem[i]);  // posted by the launching thread only
    if (b->stop) return;
    Lane* me = &b->lanes[i];
    tl_lane = me;
    run_kernel_body(me);
    lane_exit(me);
    tl_lane = nullptr;
  }
}

// Thread mode keeps one process-wide pool of OS threads (worker i runs
// thread i of every block), grown to the largest block seen: creating
// threads is slow (~50 us each, ~5 ms under TSan). The pool is never torn
// down; its idle threads block on a condition variable until process exit.
struct ThreadPool {
  std::mutex mu;
  std::condition_variable cv, idle_cv;
  std::uint64_t epoch = 0;  // bumped per launch
  Block* job = nullptr;
  unsigned busy = 0;        // workers still serving the current launch
  unsigned size = 0;
};

inline ThreadPool& thread_pool() {
  static ThreadPool* p = new ThreadPool;  // intentionally immortal (see above)
  return *p;
}

inline void pool_worker(unsigned i) {
  ThreadPool& P = thread_pool();
  std::uint64_t seen = 0;
  for (;;) {
    Block* b = nullptr;
    {
      std::unique_lock<std::mutex> lk(P.mu);
      P.cv.wait(lk, [&] { return P.epoch != seen; });
      seen = P.epoch;
      // Decide under the lock: a launch this worker does not serve may end
      // (and its Block vanish) at any moment.
      if (P.job && i < P.job->n) b = P.job;
    }
    if (!b) continue;
    thread_worker(b, i);  // returns when the launch is over
    std::lock_guard<std::mutex> lk(P.mu);
    if (--P.busy == 0) P.idle_cv.notify_all();
  }
}

// While a block runs, the launching thread checks every 50 ms whether all
// live threads are blocked with no arrival in between: a deadlock (thread
// mode cannot check at each arrival without ordering all threads).
inline void wait_block_done(Block* b) {
  std::unique_lock<std::mutex> lk(b->done_mu);
  std::uint64_t last_progress = ~0ull;
  int stalls = 0;
  while (!b->done_cv.wait_for(lk, std::chrono::milliseconds(50), [b] { return b->done; })) {
    std::uint64_t progress = 0;
    bool all_blocked = true;
    unsigned live = 0;
    for (unsigned i = 0; i < b->n; ++i) {
      const Lane& l = b->lanes[i];
      const LaneState st = l.st.load(std::memory_order_relaxed);
      progress += l.progress.load(std::memory_order_relaxed);
      if (st == LaneState::exited) continue;
      ++live;
      if (st != LaneState::blocked) all_blocked = false;
    }
    if (live && all_blocked && progress == last_progress) {
      if (++stalls >= 2) report_deadlock(b);
    } else {
      stalls = 0;
    }
    last_progress = progress;
  }
}

// Thread mode: the order in which a block's threads are released. Seed 0:
// natural; else warps in a random order, each warp's lanes shuffled (as the
// fiber scheduler starts them).
inline void start_order(Block* b, std::vector<std::uint32_t>& out) {
  out.clear();
  if (b->seed == 0) {
    for (std::uint32_t i = 0; i < b->n; ++i) out.push_back(i);
    return;
  }
  std::vector<std::uint32_t> warps(b->nwarps);
  for (std::uint32_t w = 0; w < b->nwarps; ++w) warps[w] = w;
  for (std::uint32_t w = b->nwarps; w > 1; --w) std::swap(warps[w - 1], warps[splitmix64(b->rng) % w]);
  for (std::uint32_t w : warps) {
    shuffle_perm(b, b->warps[w]);
    for (int k = 0; k < 32; ++k)
      if (w * 32 + b->warps[w].perm[k] < b->n) out.push_back(w * 32 + b->warps[w].perm[k]);
  }
}

inline void run_thread_blocks(Block* b, const std::vector<std::uint32_t>* order, std::uint64_t nblocks) {
  b->start_sem.reset(new sem_t[b->n]);
  for (unsigned i = 0; i < b->n; ++i) sem_init(&b->start_sem[i], 0, 0);
  ThreadPool& P = thread_pool();
  {
    std::lock_guard<std::mutex> lk(P.mu);
    try {
      for (; P.size < b->n; ++P.size) std::thread(pool_worker, P.size).detach();
    } catch (const std::system_error& e) {
      die_plain("thread mode: could not start %u threads: %s", b->n, e.what());
    }
    P.job = b;
    P.busy = b->n;
    ++P.epoch;
    P.cv.notify_all();
  }
  std::vector<std::uint32_t> start(b->n);
  for (std::uint64_t k = 0; k < nblocks; ++k) {
    setup_block(b, order ? (*order)[k] : k);  // every thread waits for its semaphore
    start_order(b, start);
    for (std::uint32_t i : start) sem_post(&b->start_sem[i]);
    wait_block_done(b);
  }
  b->stop = true;
  for (unsigned i = 0; i < b->n; ++i) sem_post(&b->start_sem[i]);
  {
    std::unique_lock<std::mutex> lk(P.mu);
    P.idle_cv.wait(lk, [&] { return P.busy == 0; });
    P.job = nullptr;
  }
  for (unsigned i = 0; i < b->n; ++i) sem_destroy(&b->start_sem[i]);
}

inline Mode effective_mode();

inline void launch_erased(const void* kernel, dim3 grid, dim3 block, std::size_t smem_bytes, void* call,
                          void (*invoke)(void*)) {
  if (tl_lane) fatal("kernel launch from device code (dynamic parallelism) is not emulated");
  std::lock_guard<std::mutex> launch_lock(launch_mutex());
  const std::uint64_t nthreads = std::uint64_t(block.x) * block.y * block.z;
  const std::uint64_t nblocks = std::uint64_t(grid.x) * grid.y * grid.z;
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || nblocks == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    std::fprintf(stderr, "cuda_emu: launch of %s failed: invalid configuration grid (%u,%u,%u) block (%u,%u,%u)\n",
                 kernel_name(kernel).c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z);
    tl_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem_bytes > default_dynamic_smem_limit) {
    auto it = smem_optin().find(kernel);
    if (it == smem_optin().end() || std::size_t(it->second) < smem_bytes) {
      std::fprintf(stderr,
                   "cuda_emu: launch of %s failed: %zu bytes of dynamic shared memory need "
                   "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, >= %zu)\n",
                   kernel_name(kernel).c_str(), smem_bytes, smem_bytes);
      tl_last_error = cudaErrorInvalidValue;
      return;
    }
  }

  Block b;
  b.mode = effective_mode();
  b.kernel = kernel;
  b.invoke = invoke;
  b.call = call;
  b.gdim = grid;
  b.bdim = block;
  b.n = unsigned(nthreads);
  b.nwarps = (b.n + 31) / 32;
  b.seed = g_seed.load(std::memory_order_relaxed);
  if (!g_seed_set.load(std::memory_order_relaxed)) b.seed = env_u64("CUDA_EMU_SEED", 0);
  std::uint64_t s0 = b.seed;
  b.rng = splitmix64(s0);  // reset per launch: a launch's schedule depends only on the seed
  b.lanes.reset(new Lane[b.n]);
  b.warps.reset(new Warp[b.nwarps]);
  for (unsigned i = 0; i < b.n; ++i) {
    Lane& l = b.lanes[i];
    l.linear = i;
    l.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    l.warp = i / 32;
    l.lane = i % 32;
    l.blk = &b;
    b.warps[l.warp].present |= 1u << l.lane;
  }
  b.bar_waiters.reserve(b.n);
  // Exactly the requested size, 128-byte aligned, so ASan sees overruns.
  std::unique_ptr<unsigned char, void (*)(unsigned char*)> smem(
      static_cast<unsigned char*>(::operator new(smem_bytes, std::align_val_t(128))),
      [](unsigned char* p) { ::operator delete(p, std::align_val_t(128)); });
  b.smem = smem.get();
  b.smem_bytes = smem_bytes;

  std::vector<std::uint32_t> order;
  if (b.seed != 0 && nblocks > 1) {
    if (nblocks > 0xffffffffull) die_plain("grid too large to shuffle");
    order.resize(nblocks);
    for (std::uint32_t i = 0; i < nblocks; ++i) order[i] = i;
    for (std::uint64_t i = nblocks - 1; i > 0; --i) std::swap(order[i], order[splitmix64(b.rng) % (i + 1)]);
  }
  const std::vector<std::uint32_t>* ord = order.empty() ? nullptr : &order;
  if (b.mode == Mode::fiber) run_fiber_blocks(&b, ord, nblocks);
  else run_thread_blocks(&b, ord, nblocks);
}

// CUDA copies kernel arguments with implicit conversions, as a call would.
template <class To, class From>
inline To convert_arg(From&& f) {
  return std::forward<From>(f);
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Public host API
// ---------------------------------------------------------------------------
inline void set_mode(Mode m) { detail::g_mode.store(int(m), std::memory_order_relaxed); }

// The mode launches use. Under ThreadSanitizer fiber mode is unavailable
// (TSan cannot follow our stack switches), so thread mode is used instead.
inline Mode mode() {
  int m = detail::g_mode.load(std::memory_order_relaxed);
  if (m < 0) {
    m = detail::env_mode();
    detail::g_mode.store(m, std::memory_order_relaxed);
  }
  if (CUDA_EMU_TSAN) return Mode::thread;
  return Mode(m);
}

inline void set_seed(std::uint64_t s) {
  detail::g_seed.store(s, std::memory_order_relaxed);
  detail::g_seed_set.store(true, std::memory_order_relaxed);
}

inline std::uint64_t seed() {
  if (!detail::g_seed_set.load(std::memory_order_relaxed)) return detail::env_u64("CUDA_EMU_SEED", 0);
  return detail::g_seed.load(std::memory_order_relaxed);
}

// Byte written over dynamic shared memory before each block; -1 = automatic.
inline void set_smem_fill(int byte_or_minus1) {
  detail::g_fill.store(byte_or_minus1 < 0 ? -1 : (byte_or_minus1 & 0xff), std::memory_order_relaxed);
}
inline int smem_fill() { return detail::current_fill(); }

// The current block's dynamic shared memory (128-byte aligned, the size given at launch).
inline void* dynamic_smem() { return detail::cur_lane()->blk->smem; }
inline std::size_t dynamic_smem_size() { return detail::cur_lane()->blk->smem_bytes; }

// The launch helper: like kernel<<<grid, block, dynamic_smem_bytes, stream>>>(args...),
// but synchronous. Errors in the configuration set cudaGetLastError().
template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t dynamic_smem_bytes, cudaStream_t stream,
            Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "cuda_emu::launch: wrong number of kernel arguments");
  static_assert((!std::is_reference_v<KArgs> && ...), "__global__ kernels take their parameters by value");
  (void)stream;  // launches are synchronous; every stream behaves like the default one
  struct Call {
    void (*k)(KArgs...);
    std::tuple<KArgs...> a;
  };
  Call c{kernel, std::tuple<KArgs...>(detail::convert_arg<KArgs>(std::forward<Args>(args))...)};
  // Each CUDA thread receives its own copy of the parameters (std::apply passes
  // lvalues to by-value parameters).
  detail::launch_erased(reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem_bytes, &c,
                        [](void* p) {
                          Call* cp = static_cast<Call*>(p);
                          std::apply(cp->k, cp->a);
                        });
}

namespace detail {
inline Mode effective_mode() {
  Mode m = mode();
  return m;
}
}  // namespace detail

}  // namespace cuda_emu

// C hooks for ctypes users of an emulated shared library.
extern "C" __attribute__((weak, visibility("default"))) void cuda_emu_set_mode(int m) {
  cuda_emu::set_mode(m ? cuda_emu::Mode::thread : cuda_emu::Mode::fiber);
}
extern "C" __attribute__((weak, visibility("default"))) int cuda_emu_get_mode() { return int(cuda_emu::mode()); }
extern "C" __attribute__((weak, visibility("default"))) void cuda_emu_set_seed(unsigned long long s) {
  cuda_emu::set_seed(s);
}
extern "C" __attribute__((weak, visibility("default"))) unsigned long long cuda_emu_get_seed() {
  return cuda_emu::seed();
}
extern "C" __attribute__((weak, visibility("default"))) void cuda_emu_set_smem_fill(int b) {
  cuda_emu::set_smem_fill(b);
}

// ---------------------------------------------------------------------------
// Per-thread builtins
// ---------------------------------------------------------------------------
#define threadIdx (::cuda_emu::detail::thread_idx())
#define blockIdx (::cuda_emu::detail::block_idx())
#define blockDim (::cuda_emu::detail::block_dim())
#define gridDim (::cuda_emu::detail::grid_dim())

// ---------------------------------------------------------------------------
// Synchronization and warp intrinsics
// ---------------------------------------------------------------------------
inline void __syncthreads(std::source_location w = std::source_location::current()) {
  ::cuda_emu::detail::block_barrier(::cuda_emu::detail::BarKind::sync, 0, w);
}
inline int __syncthreads_count(int pred, std::source_location w = std::source_location::current()) {
  return ::cuda_emu::detail::block_barrier(::cuda_emu::detail::BarKind::count, pred, w);
}
inline int __syncthreads_and(int pred, std::source_location w = std::source_location::current()) {
  return ::cuda_emu::detail::block_barrier(::cuda_emu::detail::BarKind::and_, pred, w);
}
inline int __syncthreads_or(int pred, std::source_location w = std::source_location::current()) {
  return ::cuda_emu::detail::block_barrier(::cuda_emu::detail::BarKind::or_, pred, w);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location w = std::source_location::current()) {
  ::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::syncwarp, mask, 0, 0, 32, w);
}

namespace cuda_emu::detail {
template <class T>
concept ShuffleScalar = std::is_arithmetic_v<T> && sizeof(T) <= 8;
template <class T>
inline T shfl(Op op, unsigned mask, T var, int arg, int width, const std::source_location& w) {
  return from_bits<T>(warp_op(op, mask, to_bits(var), arg, width, w));
}
}  // namespace cuda_emu::detail

template <::cuda_emu::detail::ShuffleScalar T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
                     std::source_location w = std::source_location::current()) {
  return ::cuda_emu::detail::shfl(::cuda_emu::detail::Op::shfl_idx, mask, var, srcLane, width, w);
}
template <::cuda_emu::detail::ShuffleScalar T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                        std::source_location w = std::source_location::current()) {
  return ::cuda_emu::detail::shfl(::cuda_emu::detail::Op::shfl_up, mask, var, int(delta), width, w);
}
template <::cuda_emu::detail::ShuffleScalar T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                          std::source_location w = std::source_location::current()) {
  return ::cuda_emu::detail::shfl(::cuda_emu::detail::Op::shfl_down, mask, var, int(delta), width, w);
}
template <::cuda_emu::detail::ShuffleScalar T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         std::source_location w = std::source_location::current()) {
  return ::cuda_emu::detail::shfl(::cuda_emu::detail::Op::shfl_xor, mask, var, laneMask, width, w);
}

inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location w = std::source_location::current()) {
  return unsigned(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::ballot, mask, pred != 0, 0, 32, w));
}
inline int __all_sync(unsigned mask, int pred, std::source_location w = std::source_location::current()) {
  return int(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::all, mask, pred != 0, 0, 32, w));
}
inline int __any_sync(unsigned mask, int pred, std::source_location w = std::source_location::current()) {
  return int(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::any, mask, pred != 0, 0, 32, w));
}
template <::cuda_emu::detail::ShuffleScalar T>
inline unsigned __match_any_sync(unsigned mask, T value, std::source_location w = std::source_location::current()) {
  return unsigned(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::match_any, mask, ::cuda_emu::detail::to_bits(value), 0, 32, w));
}
// sm_80 warp reductions (32-bit only, as in CUDA).
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, std::source_location w = std::source_location::current()) {
  return unsigned(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::red_add, mask, v, 0, 32, w));
}
inline int __reduce_add_sync(unsigned mask, int v, std::source_location w = std::source_location::current()) {
  return int(std::uint32_t(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::red_add, mask, std::uint32_t(v), 0, 32, w)));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, std::source_location w = std::source_location::current()) {
  return unsigned(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::red_min_u, mask, v, 0, 32, w));
}
inline int __reduce_min_sync(unsigned mask, int v, std::source_location w = std::source_location::current()) {
  return int(std::uint32_t(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::red_min_s, mask, std::uint32_t(v), 0, 32, w)));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, std::source_location w = std::source_location::current()) {
  return unsigned(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::red_max_u, mask, v, 0, 32, w));
}
inline int __reduce_max_sync(unsigned mask, int v, std::source_location w = std::source_location::current()) {
  return int(std::uint32_t(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::red_max_s, mask, std::uint32_t(v), 0, 32, w)));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, std::source_location w = std::source_location::current()) {
  return unsigned(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::red_and, mask, v, 0, 32, w));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, std::source_location w = std::source_location::current()) {
  return unsigned(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::red_or, mask, v, 0, 32, w));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, std::source_location w = std::source_location::current()) {
  return unsigned(::cuda_emu::detail::warp_op(::cuda_emu::detail::Op::red_xor, mask, v, 0, 32, w));
}

// Lanes of the calling warp that have not exited (the emulation never runs
// a warp partially converged, so this is all live lanes).
inline unsigned __activemask() {
  auto* l = ::cuda_emu::detail::cur_lane();
  auto& w = l->blk->warps[l->warp];
  ::cuda_emu::detail::Guard g(l->blk, w.mu);
  return w.present & ~w.exited;
}

// ---------------------------------------------------------------------------
// Memory fences, atomics, loads
// ---------------------------------------------------------------------------
namespace cuda_emu::detail {
#if CUDA_EMU_TSAN
// TSan does not model standalone fences; an acq_rel RMW on one shared word
// makes fence-to-fence synchronization visible to it.
inline std::atomic<int> g_fence_word{0};
inline void fence() { g_fence_word.fetch_add(0, std::memory_order_acq_rel); }
#else
inline void fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
#endif
// Fiber mode with a nonzero seed: before an atomic read-modify-write the lane
// yields to a random ready lane of its block (maybe itself), so atomics of
// different threads run in a seeded random order, not in lane-schedule order.
inline void atomic_point() {
  Lane* me = tl_lane;
  if (me == nullptr) return;  // host code
  Block* b = me->blk;
  if (b->mode != Mode::fiber || b->seed == 0) return;
  unsigned total = 0;
  for (unsigned i = 0; i < b->nwarps; ++i) total += unsigned(__builtin_popcount(b->warps[i].ready));
  unsigned r = unsigned(splitmix64(b->rng) % (std::uint64_t(total) + 1));
  if (r == total) return;  // this lane goes on
  for (unsigned i = 0; i < b->nwarps; ++i) {
    Warp& w = b->warps[i];
    const unsigned c = unsigned(__builtin_popcount(w.ready));
    if (r >= c) {
      r -= c;
      continue;
    }
    std::uint32_t m = w.ready;
    for (; r > 0; --r) m &= m - 1;  // drop the r lowest ready lanes
    const unsigned l = unsigned(__builtin_ctz(m));
    w.ready &= ~(1u << l);
    make_ready(b, me->linear);
    switch_to(b, me, &b->lanes[i * 32 + l], false);
    return;
  }
}

template <class T>
inline std::atomic_ref<T> aref(T* p) {
  atomic_point();  // every atomic (RMW, CAS, max/min, inc/dec) goes through aref
  return std::atomic_ref<T>(*p);
}
template <class T>
inline T atomic_max(T* p, T v) {
  auto r = aref(p);
  T old = r.load(std::memory_order_relaxed);
  while (old < v && !r.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}
template <class T>
inline T atomic_min(T* p, T v) {
  auto r = aref(p);
  T old = r.load(std::memory_order_relaxed);
  while (v < old && !r.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}
template <class T>
inline T atomic_cas(T* p, T compare, T val) {
  aref(p).compare_exchange_strong(compare, val, std::memory_order_relaxed);
  return compare;  // the old value either way
}
}  // namespace cuda_emu::detail

inline void __threadfence() { ::cuda_emu::detail::fence(); }
inline void __threadfence_block() { ::cuda_emu::detail::fence(); }
inline void __threadfence_system() { ::cuda_emu::detail::fence(); }

#define CUDA_EMU_ATOMIC_RMW(name, T, expr)                                                          \
  inline T name(T* address, T val) {                                                                \
    return ::cuda_emu::detail::aref(address).expr;                                                  \
  }
CUDA_EMU_ATOMIC_RMW(atomicAdd, int, fetch_add(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicAdd, unsigned int, fetch_add(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicAdd, unsigned long long int, fetch_add(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicAdd, float, fetch_add(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicAdd, double, fetch_add(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicSub, int, fetch_sub(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicSub, unsigned int, fetch_sub(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicExch, int, exchange(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicExch, unsigned int, exchange(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicExch, unsigned long long int, exchange(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicExch, float, exchange(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicAnd, int, fetch_and(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicAnd, unsigned int, fetch_and(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicAnd, unsigned long long int, fetch_and(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicOr, int, fetch_or(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicOr, unsigned int, fetch_or(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicOr, unsigned long long int, fetch_or(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicXor, int, fetch_xor(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicXor, unsigned int, fetch_xor(val, std::memory_order_relaxed))
CUDA_EMU_ATOMIC_RMW(atomicXor, unsigned long long int, fetch_xor(val, std::memory_order_relaxed))
#undef CUDA_EMU_ATOMIC_RMW

inline int atomicMax(int* a, int v) { return ::cuda_emu::detail::atomic_max(a, v); }
inline unsigned int atomicMax(unsigned int* a, unsigned int v) { return ::cuda_emu::detail::atomic_max(a, v); }
inline long long int atomicMax(long long int* a, long long int v) { return ::cuda_emu::detail::atomic_max(a, v); }
inline unsigned long long int atomicMax(unsigned long long int* a, unsigned long long int v) {
  return ::cuda_emu::detail::atomic_max(a, v);
}
inline int atomicMin(int* a, int v) { return ::cuda_emu::detail::atomic_min(a, v); }
inline unsigned int atomicMin(unsigned int* a, unsigned int v) { return ::cuda_emu::detail::atomic_min(a, v); }
inline long long int atomicMin(long long int* a, long long int v) { return ::cuda_emu::detail::atomic_min(a, v); }
inline unsigned long long int atomicMin(unsigned long long int* a, unsigned long long int v) {
  return ::cuda_emu::detail::atomic_min(a, v);
}
inline int atomicCAS(int* a, int c, int v) { return ::cuda_emu::detail::atomic_cas(a, c, v); }
inline unsigned int atomicCAS(unsigned int* a, unsigned int c, unsigned int v) {
  return ::cuda_emu::detail::atomic_cas(a, c, v);
}
inline unsigned long long int atomicCAS(unsigned long long int* a, unsigned long long int c,
                                        unsigned long long int v) {
  return ::cuda_emu::detail::atomic_cas(a, c, v);
}
inline unsigned short int atomicCAS(unsigned short int* a, unsigned short int c, unsigned short int v) {
  return ::cuda_emu::detail::atomic_cas(a, c, v);
}
// ((old >= val) ? 0 : (old + 1)) and (((old == 0) || (old > val)) ? val : (old - 1)), as in CUDA.
inline unsigned int atomicInc(unsigned int* a, unsigned int val) {
  auto r = ::cuda_emu::detail::aref(a);
  unsigned old = r.load(std::memory_order_relaxed);
  while (!r.compare_exchange_weak(old, old >= val ? 0u : old + 1u, std::memory_order_relaxed)) {
  }
  return old;
}
inline unsigned int atomicDec(unsigned int* a, unsigned int val) {
  auto r = ::cuda_emu::detail::aref(a);
  unsigned old = r.load(std::memory_order_relaxed);
  while (!r.compare_exchange_weak(old, (old == 0 || old > val) ? val : old - 1u, std::memory_order_relaxed)) {
  }
  return old;
}

// Cache-hinted loads/stores are plain accesses on the host.
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldca(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------
// Math and bit intrinsics (host-exact versions of the fast-math intrinsics)
// ---------------------------------------------------------------------------
inline float __expf(float x) { return ::expf(x); }
inline float __exp10f(float x) { return ::powf(10.0f, x); }
inline float __logf(float x) { return ::logf(x); }
inline float __log2f(float x) { return ::log2f(x); }
inline float __log10f(float x) { return ::log10f(x); }
inline float __powf(float x, float y) { return ::powf(x, y); }
inline float __sinf(float x) { return ::sinf(x); }
inline float __cosf(float x) { return ::cosf(x); }
inline float __tanf(float x) { return ::tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = ::sinf(x); *c = ::cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / ::sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / ::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / ::sqrtf(x); }
inline float __fsqrt_rn(float x) { return ::sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return ::fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return ::fma(a, b, c); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0

namespace cuda_emu::detail {
template <class I, class F>
inline I f2i_sat(F r) {  // CUDA conversions saturate and map NaN to 0
  if (r != r) return 0;
  if (r <= F(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (r >= F(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return I(r);
}
}  // namespace cuda_emu::detail
inline int __float2int_rn(float x) { return ::cuda_emu::detail::f2i_sat<int>(::nearbyintf(x)); }
inline int __float2int_rz(float x) { return ::cuda_emu::detail::f2i_sat<int>(::truncf(x)); }
inline int __float2int_rd(float x) { return ::cuda_emu::detail::f2i_sat<int>(::floorf(x)); }
inline int __float2int_ru(float x) { return ::cuda_emu::detail::f2i_sat<int>(::ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return ::cuda_emu::detail::f2i_sat<unsigned>(::nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return ::cuda_emu::detail::f2i_sat<unsigned>(::truncf(x)); }
inline long long __float2ll_rn(float x) { return ::cuda_emu::detail::f2i_sat<long long>(::nearbyintf(x)); }
inline long long __float2ll_rz(float x) { return ::cuda_emu::detail::f2i_sat<long long>(::truncf(x)); }
inline int __double2int_rn(double x) { return ::cuda_emu::detail::f2i_sat<int>(::nearbyint(x)); }
inline int __double2int_rz(double x) { return ::cuda_emu::detail::f2i_sat<int>(::trunc(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __ll2float_rn(long long x) { return float(x); }
inline float __double2float_rn(double x) { return float(x); }

inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline int __double2hiint(double x) { return int(std::bit_cast<unsigned long long>(x) >> 32); }
inline int __double2loint(double x) { return int(std::bit_cast<unsigned long long>(x) & 0xffffffffull); }
inline double __hiloint2double(int hi, int lo) {
  return std::bit_cast<double>((static_cast<unsigned long long>(unsigned(hi)) << 32) | unsigned(lo));
}

inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((static_cast<unsigned long long>(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return int((static_cast<long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) {  // low 32 bits of the product of the sign-extended low 24 bits
  return int(std::uint32_t((a << 8) >> 8) * std::uint32_t((b << 8) >> 8));
}
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __hadd(int a, int b) { return int((static_cast<long long>(a) + b) >> 1); }
inline int __rhadd(int a, int b) { return int((static_cast<long long>(a) + b + 1) >> 1); }
inline unsigned __uhadd(unsigned a, unsigned b) { return unsigned((static_cast<unsigned long long>(a) + b) >> 1); }
inline unsigned __urhadd(unsigned a, unsigned b) { return unsigned((static_cast<unsigned long long>(a) + b + 1) >> 1); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(unsigned(x))) << 32) | __brev(unsigned(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
// Funnel shifts: the high 32 bits of (hi:lo) << s, the low 32 bits of (hi:lo) >> s;
// the plain versions use s & 31, the _c versions clamp s to 32.
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return unsigned((v << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return unsigned(v >> (shift & 31));
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
  unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return unsigned((v << (shift > 32 ? 32 : shift)) >> 32);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
  unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return unsigned(v >> (shift > 32 ? 32 : shift));
}

// CUDA's global min/max overloads (device and host). Non-template exact
// matches win over std::min/std::max if a kernel has `using namespace std`.
#define CUDA_EMU_MINMAX(T)                              \
  inline T min(T a, T b) { return b < a ? b : a; }      \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MINMAX(int)
CUDA_EMU_MINMAX(unsigned int)
CUDA_EMU_MINMAX(long)
CUDA_EMU_MINMAX(unsigned long)
CUDA_EMU_MINMAX(long long)
CUDA_EMU_MINMAX(unsigned long long)
#undef CUDA_EMU_MINMAX
inline float min(float a, float b) { return ::fminf(a, b); }
inline float max(float a, float b) { return ::fmaxf(a, b); }
inline double min(double a, double b) { return ::fmin(a, b); }
inline double max(double a, double b) { return ::fmax(a, b); }
// Mixed signed/unsigned int as in CUDA: compared as unsigned.
inline unsigned int min(int a, unsigned int b) { return min(unsigned(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, unsigned(b)); }
inline unsigned int max(int a, unsigned int b) { return max(unsigned(a), b); }
inline unsigned int max(unsigned int a, int b) { return max(a, unsigned(b)); }
inline double min(float a, double b) { return ::fmin(double(a), b); }
inline double min(double a, float b) { return ::fmin(a, double(b)); }
inline double max(float a, double b) { return ::fmax(double(a), b); }
inline double max(double a, float b) { return ::fmax(a, double(b)); }

// ---------------------------------------------------------------------------
// Misc device functions
// ---------------------------------------------------------------------------
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline void __nanosleep(unsigned) {}  // a spin-wait on other blocks would never end here (rule 5)
[[noreturn]] inline void __trap() { ::cuda_emu::detail::fatal("__trap() called"); }
[[noreturn]] inline void __brkpt() { ::cuda_emu::detail::fatal("__brkpt() called"); }

// ---------------------------------------------------------------------------
// Host runtime API subset (launches are synchronous; memory is host memory)
// ---------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() {
  cudaError_t e = ::cuda_emu::detail::tl_last_error;
  ::cuda_emu::detail::tl_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::cuda_emu::detail::tl_last_error; }

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unrecognized error code";
}

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = int(::cuda_emu::default_dynamic_smem_limit); return cudaSuccess;
    case cudaDevAttrWarpSize: *v = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = 108; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = 8; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(::cuda_emu::max_dynamic_smem_optin); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || std::size_t(value) > ::cuda_emu::max_dynamic_smem_optin) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lk(::cuda_emu::detail::launch_mutex());
    ::cuda_emu::detail::smem_optin()[func] = value;
  }
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

inline cudaError_t cudaMalloc(void** p, std::size_t n) {
  *p = nullptr;
  if (posix_memalign(p, 256, n ? n : 1) != 0) return cudaErrorMemoryAllocation;
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMalloc(T** p, std::size_t n) {
  return cudaMalloc(reinterpret_cast<void**>(p), n);
}
template <class T>
inline cudaError_t cudaMallocManaged(T** p, std::size_t n, unsigned = 1) {
  return cudaMalloc(reinterpret_cast<void**>(p), n);
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, std::size_t n, cudaMemcpyKind) {
  if (n) std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, std::size_t n, cudaMemcpyKind k, cudaStream_t = nullptr) {
  return cudaMemcpy(d, s, n, k);
}
inline cudaError_t cudaMemset(void* d, int v, std::size_t n) {
  if (n) std::memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* d, int v, std::size_t n, cudaStream_t = nullptr) {
  return cudaMemset(d, v, n);
}
template <class T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, std::size_t n, std::size_t offset = 0,
                                      cudaMemcpyKind = cudaMemcpyHostToDevice) {
  if (offset + n > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, n);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------
// Warp matrix instructions (tensor cores), lane by lane per the PTX ISA
// ---------------------------------------------------------------------------
// Inline PTX does not compile under g++, so kernels reach these instructions
// through small __device__ wrappers (csrc/cuda/mma_sm80.cuh: inline asm on the
// device, these functions under DUO_FAST_EMULATE_CUDA). Each is one warp-wide
// collective: every lane deposits pointers to its own registers, the last lane
// to arrive computes the whole warp's result from all lanes' operands with the
// fragment layouts of the PTX ISA (below), and writes each lane's registers.
// All 32 lanes must call, with the full warp converged, as on the GPU.
//
// Notation: g = lane >> 2 (groupID), q = lane % 4 (thread in group). A 32-bit
// register holds two 16-bit elements, the lower-indexed one in bits 0..15.
namespace cuda_emu {
namespace detail {

inline float bf16_to_float(std::uint16_t b) { return std::bit_cast<float>(std::uint32_t(b) << 16); }
inline std::uint16_t half_of(std::uint32_t r, int i) { return std::uint16_t(i ? r >> 16 : r & 0xffffu); }

// A 16-byte-aligned address inside this block's shared memory (dynamic or static).
inline bool in_shared(const void* p, std::size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const Block* b = cur_lane()->blk;
  const unsigned char* st = reinterpret_cast<const unsigned char*>(__start_cuda_emu_shared);
  const unsigned char* en = reinterpret_cast<const unsigned char*>(__stop_cuda_emu_shared);
  if (b->smem && c >= b->smem && c + bytes <= b->smem + b->smem_bytes) return true;
  return st && c >= st && c + bytes <= en;
}

struct MmaOperands {
  const std::uint32_t* a;  // 4 registers
  const std::uint32_t* b;  // 2 registers
  const float* c;          // 4
  float* d;                // 4 (may alias c)
};

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D[16x8] = A[16x16] B[16x8] + C.
//   A: a_i, i = 0..7 (register i/2, half i%2): row g + 8 ((i/2) % 2), col 2q + (i%2) + 8 (i >= 4)
//   B: b_i, i = 0..3 (register i/2, half i%2): row (k) 2q + (i%2) + 8 (i >= 2), col (n) g
//   C, D: c_i, i = 0..3: row g + 8 (i >= 2), col 2q + (i%2)
// The bf16 products are exact in float; the emulation sums them and C in double and
// rounds once (the hardware's internal rounding of the sum differs slightly:
// tests compare with tolerances, never bits).
inline void mma_m16n8k16_bf16_fn(void* const* lanes) {
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaOperands& o = *static_cast<const MmaOperands*>(lanes[l]);
    const int g = l >> 2, q = l & 3;
    for (int i = 0; i < 8; ++i) A[g + 8 * ((i >> 1) & 1)][2 * q + (i & 1) + 8 * (i >= 4)] = bf16_to_float(half_of(o.a[i >> 1], i & 1));
    for (int i = 0; i < 4; ++i) B[2 * q + (i & 1) + 8 * (i >= 2)][g] = bf16_to_float(half_of(o.b[i >> 1], i & 1));
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >= 2)][2 * q + (i & 1)] = o.c[i];
  }
  for (int l = 0; l < 32; ++l) {
    const MmaOperands& o = *static_cast<const MmaOperands*>(lanes[l]);
    const int g = l >> 2, q = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i >= 2), c = 2 * q + (i & 1);
      double s = C[r][c];
      for (int k = 0; k < 16; ++k) s += double(A[r][k] * B[k][c]);
      o.d[i] = float(s);
    }
  }
}

struct LdmatrixOperands {
  const void* addr;  // this lane's row address (lanes 8m .. 8m+7: rows 0..7 of matrix m)
  std::uint32_t* r;  // `count` registers
  int count;
  bool trans;
};

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: matrix m (8x8 of 16-bit
// elements) has its row rr (8 contiguous elements, 16-byte aligned) at the address
// of lane 8m + rr (for .x1 / .x2 the other lanes' addresses are not used). Lane l
// receives in register m: without .trans row g, cols 2q, 2q+1 of matrix m; with
// .trans the transposed matrix: (row 2q, col g) and (row 2q+1, col g).
inline void ldmatrix_fn(void* const* lanes) {
  const LdmatrixOperands& o0 = *static_cast<const LdmatrixOperands*>(lanes[0]);
  const int count = o0.count;
  std::uint16_t M[4][8][8];
  for (int m = 0; m < count; ++m)
    for (int rr = 0; rr < 8; ++rr) {
      const LdmatrixOperands& o = *static_cast<const LdmatrixOperands*>(lanes[8 * m + rr]);
      if (o.count != count || o.trans != o0.trans) fatal("ldmatrix: lanes disagree on .x%d / .trans", count);
      if ((reinterpret_cast<std::uintptr_t>(o.addr) & 15u) != 0 || !in_shared(o.addr, 16))
        fatal("ldmatrix: lane %d's row address %p is not a 16-byte-aligned shared memory row", 8 * m + rr, o.addr);
      std::memcpy(M[m][rr], o.addr, 16);
    }
  for (int l = 0; l < 32; ++l) {
    const LdmatrixOperands& o = *static_cast<const LdmatrixOperands*>(lanes[l]);
    const int g = l >> 2, q = l & 3;
    for (int m = 0; m < count; ++m) {
      const std::uint16_t lo = o0.trans ? M[m][2 * q][g] : M[m][g][2 * q];
      const std::uint16_t hi = o0.trans ? M[m][2 * q + 1][g] : M[m][g][2 * q + 1];
      o.r[m] = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
    }
  }
}

}  // namespace detail

// d = A B + c for the warp (registers as in detail::mma_m16n8k16_bf16_fn).
inline void mma_m16n8k16_bf16_f32(float* d, const std::uint32_t* a, const std::uint32_t* b, const float* c,
                                  std::source_location w = std::source_location::current()) {
  detail::MmaOperands o{a, b, c, d};
  detail::warp_op(detail::Op::collective, 0xffffffffu, std::uint64_t(reinterpret_cast<std::uintptr_t>(&o)), 0, 32,
                  w, &detail::mma_m16n8k16_bf16_fn, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
}

// count = 1, 2 or 4 matrices into r[0 .. count-1].
inline void ldmatrix_m8n8_b16(std::uint32_t* r, const void* row_addr, int count, bool trans,
                              std::source_location w = std::source_location::current()) {
  if (count != 1 && count != 2 && count != 4) detail::fatal("ldmatrix: .x%d is not .x1, .x2 or .x4", count);
  detail::LdmatrixOperands o{row_addr, r, count, trans};
  detail::warp_op(detail::Op::collective, 0xffffffffu, std::uint64_t(reinterpret_cast<std::uintptr_t>(&o)), 0, 32,
                  w, &detail::ldmatrix_fn, "ldmatrix.sync.aligned.m8n8.b16");
}

}  // namespace cuda_emu
