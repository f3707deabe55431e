// ATen glue of the CUDA kernels: checks, allocation, current stream, and the
// launchers of launchers.h. Compiled by the host compiler (no nvcc).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "checks.h"
#include "fused_outputs.h"
#include "duo_fast/device_check.h"
#include "duo_fast/gamma_to_alpha.h"
#include "curriculum_embed_mma.h"
#include "launchers.h"
#include "gamma_to_alpha_tables.h"

namespace duo_fast {
namespace {

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "duo_fast: CUDA launch of ", op, " failed: ", cudaGetErrorString(cudaError_t(err)));
}

// Device-side value checks (duo_fast/device_check.h), per device: the kernels'
// violation counters in device memory, and a pinned host copy refreshed by an
// asynchronous copy after every op that checks values. The host reads the copy
// without synchronizing: an op raises the violations that earlier ops' copies
// have brought back (counters only grow; `seen` is what was raised already).
// The first call on a device allocates (not inside a CUDA graph capture: warm up first).
struct DeviceChecks {
  std::mutex mutex;
  at::Tensor counters;  // int32 [kNumArgs] on the device
  uint32_t* host = nullptr;
  uint32_t seen[check::kNumArgs] = {};
};

DeviceChecks& device_checks(const at::Device& device) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<DeviceChecks>> all;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = all[device.index()];
  if (!slot) {
    auto c = std::make_unique<DeviceChecks>();
    c->counters = at::zeros({check::kNumArgs}, at::TensorOptions().dtype(at::kInt).device(device));
    void* host = nullptr;
    const cudaError_t err = cudaHostAlloc(&host, sizeof(uint32_t) * check::kNumArgs, cudaHostAllocDefault);
    TORCH_CHECK(err == cudaSuccess, "duo_fast: cudaHostAlloc failed: ", cudaGetErrorString(err));
    std::memset(host, 0, sizeof(uint32_t) * check::kNumArgs);
    c->host = static_cast<uint32_t*>(host);
    slot = std::move(c);
  }
  return *slot;
}

// Raises the violations reported since the last call (by earlier ops) and returns
// the device counters for this op's kernels. No synchronization.
uint32_t* begin_checks(const at::Device& device, const char* op) {
  DeviceChecks& c = device_checks(device);
  std::string found;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (int i = 0; i < check::kNumArgs; ++i) {
      const uint32_t v = __atomic_load_n(&c.host[i], __ATOMIC_RELAXED);  // written by the copy engine
      if (v > c.seen[i]) {
        found += found.empty() ? "" : "; ";
        found += check::arg_message(i) + std::string(" (") + std::to_string(v - c.seen[i]) + " rows or tokens)";
        c.seen[i] = v;
      }
    }
  }
  TORCH_CHECK(found.empty(), "duo_fast: ", op, ": an earlier duo_fast CUDA call on ", device,
              " got invalid values (checked on the device, so reported at a later call): ", found,
              ". Those rows or tokens got unspecified outputs (NaN where floating, ids in range). Set "
              "DUO_FAST_CUDA_SYNC_CHECKS=1 to check values on the host at every call (synchronizes).");
  return reinterpret_cast<uint32_t*>(c.counters.mutable_data_ptr<int32_t>());
}

// After the op's kernels: bring the counters back to the host (asynchronous).
void end_checks(const at::Device& device, void* stream) {
  DeviceChecks& c = device_checks(device);
  const cudaError_t err = cudaMemcpyAsync(c.host, c.counters.const_data_ptr<int32_t>(),
                                          sizeof(uint32_t) * check::kNumArgs, cudaMemcpyDeviceToHost,
                                          static_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "duo_fast: copying the device checks failed: ", cudaGetErrorString(err));
}

// Device copy of the schedule table of K, cached per (K, device). The copy is
// asynchronous, from a pinned buffer kept alive with it (no host synchronization).
const double* device_schedule_table(int64_t vocab_size, const at::Device& device) {
  static std::mutex mutex;
  static std::map<std::pair<int64_t, int>, std::pair<at::Tensor, at::Tensor>> tables;  // (pinned, device)
  const double* host = gamma_to_alpha_table(vocab_size);
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(vocab_size, int(device.index()));
  auto it = tables.find(key);
  if (it == tables.end()) {
    at::Tensor pinned = at::from_blob(const_cast<double*>(host), {schedule::kTableSize}, at::kDouble).pin_memory();
    at::Tensor dev = pinned.to(device, /*non_blocking=*/true);
    it = tables.emplace(key, std::make_pair(pinned, dev)).first;
  }
  return it->second.second.const_data_ptr<double>();
}

std::tuple<at::Tensor, at::Tensor> gamma_to_alpha_cuda(const at::Tensor& gamma, int64_t vocab_size) {
  check_floating(gamma, "gamma", {at::kFloat, at::kDouble});
  check_vocab(vocab_size);
  const c10::cuda::CUDAGuard guard(gamma.device());
  uint32_t* checks = begin_checks(gamma.device(), "gamma_to_alpha");
  check_not_nan(gamma, "gamma");  // DUO_FAST_CUDA_SYNC_CHECKS=1 only (else on the device)
  const double* table = device_schedule_table(vocab_size, gamma.device());
  const at::Tensor g = gamma.contiguous();
  at::Tensor alpha = at::empty_like(g), dalpha = at::empty_like(g);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  int err = 0;
  if (g.scalar_type() == at::kFloat) {
    err = cuda::gamma_to_alpha_f32(g.const_data_ptr<float>(), alpha.mutable_data_ptr<float>(),
                                   dalpha.mutable_data_ptr<float>(), g.numel(), table, checks, stream);
  } else {
    err = cuda::gamma_to_alpha_f64(g.const_data_ptr<double>(), alpha.mutable_data_ptr<double>(),
                                   dalpha.mutable_data_ptr<double>(), g.numel(), table, checks, stream);
  }
  check_launch(err, "gamma_to_alpha");
  end_checks(gamma.device(), stream);
  return {alpha, dalpha};
}

std::tuple<at::Tensor, at::Tensor> sample_zt_cuda(const at::Tensor& x0, const at::Tensor& gamma_t,
                                                  const std::optional<at::Tensor>& gamma_s, int64_t vocab_size,
                                                  int64_t seed, int64_t offset) {
  check_sample_zt_args(x0, gamma_t, gamma_s, vocab_size);
  const c10::cuda::CUDAGuard guard(x0.device());
  uint32_t* checks = begin_checks(x0.device(), "sample_zt");
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = x0.contiguous(), gt = gamma_t.contiguous();
  const at::Tensor gs = gamma_s ? gamma_s->contiguous() : at::Tensor();
  at::Tensor z_t = at::empty_like(x);
  at::Tensor z_s = gamma_s ? at::empty_like(x) : at::empty({0}, x.options());
  check_launch(cuda::sample_zt(x.const_data_ptr<int64_t>(), gt.const_data_ptr<double>(),
                               gamma_s ? gs.const_data_ptr<double>() : nullptr, z_t.mutable_data_ptr<int64_t>(),
                               gamma_s ? z_s.mutable_data_ptr<int64_t>() : nullptr, x.numel(), vocab_size,
                               uint64_t(seed), uint64_t(offset), checks, stream),
               "sample_zt");
  end_checks(x0.device(), stream);
  return {z_t, z_s};
}

// dtype code of the sampling launchers (launchers.h).
int logits_dtype_code(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return 0;  // float32 (the argument checks allow only these three)
  }
}

// The rows into kl (and into grad where not null, contiguous, the student's dtype).
void distill_kl_rows_cuda(const at::Tensor& student, const at::Tensor& teacher, int64_t direction, at::Tensor& kl,
                          at::Tensor* grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  begin_checks(student.device(), "distill_kl");
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t K = s.size(-1), rows = s.numel() / K;
  check_launch(cuda::distill_kl(s.const_data_ptr(), logits_dtype_code(s), t.const_data_ptr(), logits_dtype_code(t),
                                kl.mutable_data_ptr<float>(), grad != nullptr ? grad->mutable_data_ptr() : nullptr, rows,
                                K, int(direction), c10::cuda::getCurrentCUDAStream().stream()),
               "distill_kl");
}

std::tuple<at::Tensor, at::Tensor> distill_kl_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                   int64_t direction, bool compute_grad) {
  check_distill_args(student, teacher, direction);
  auto [kl, grad] = fused_grad_outputs(student, compute_grad);  // the gradient in the student's dtype
  distill_kl_rows_cuda(student, teacher, direction, kl, compute_grad ? &grad : nullptr);
  return {kl, grad};
}

at::Tensor distill_kl_into_cuda(const at::Tensor& student, const at::Tensor& teacher, int64_t direction,
                                at::Tensor& grad) {
  check_distill_into_args(student, teacher, direction, grad);
  at::Tensor kl = fused_value_output(student);
  distill_kl_rows_cuda(student, teacher, direction, kl, &grad);
  return kl;
}

// The rows into loss (and into grad where not null, contiguous, the logits' dtype).
void usdm_loss_rows_cuda(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& x0, const at::Tensor& alpha,
                         const at::Tensor& dalpha, at::Tensor& loss, at::Tensor* grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  uint32_t* checks = begin_checks(logits.device(), "usdm_loss");
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  // 16-bit logits are read natively and their gradient written in their dtype (no copy).
  const at::Tensor l = logits.contiguous(), zc = z.contiguous(), xc = x0.contiguous();
  const at::Tensor ac = alpha.contiguous(), dc = dalpha.contiguous();
  check_launch(cuda::usdm_loss(l.const_data_ptr(), logits_dtype_code(l), zc.const_data_ptr<int64_t>(),
                               xc.const_data_ptr<int64_t>(), ac.const_data_ptr<double>(), dc.const_data_ptr<double>(),
                               loss.mutable_data_ptr<float>(), grad != nullptr ? grad->mutable_data_ptr() : nullptr,
                               zc.numel(), l.size(-1), checks, stream),
               "usdm_loss");
  end_checks(logits.device(), stream);
}

std::tuple<at::Tensor, at::Tensor> usdm_loss_cuda(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& x0,
                                                  const at::Tensor& alpha, const at::Tensor& dalpha,
                                                  bool compute_grad) {
  check_usdm_loss_args(logits, z, x0, alpha, dalpha);
  auto [loss, grad] = fused_grad_outputs(logits, compute_grad);
  usdm_loss_rows_cuda(logits, z, x0, alpha, dalpha, loss, compute_grad ? &grad : nullptr);
  return {loss, grad};
}

at::Tensor usdm_loss_into_cuda(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& x0,
                               const at::Tensor& alpha, const at::Tensor& dalpha, at::Tensor& grad) {
  check_usdm_loss_into_args(logits, z, x0, alpha, dalpha, grad);
  at::Tensor loss = fused_value_output(logits);
  usdm_loss_rows_cuda(logits, z, x0, alpha, dalpha, loss, &grad);
  return loss;
}

at::Tensor sample_step_cuda(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& alpha_t,
                            const at::Tensor& alpha_s, double kappa, double temperature, double top_p, int64_t seed,
                            int64_t offset, int64_t row_offset) {
  check_sample_step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p);
  check_row_offset(row_offset);
  const c10::cuda::CUDAGuard guard(logits.device());
  uint32_t* checks = begin_checks(logits.device(), "sample_step");
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor l = logits.contiguous(), zc = z.contiguous(), at_ = alpha_t.contiguous(), as_ = alpha_s.contiguous();
  at::Tensor out = at::empty_like(zc);
  check_launch(cuda::sample_step(l.const_data_ptr(), logits_dtype_code(l), zc.const_data_ptr<int64_t>(),
                                 at_.const_data_ptr<double>(), as_.const_data_ptr<double>(),
                                 out.mutable_data_ptr<int64_t>(), zc.numel(), l.size(-1), kappa, temperature, top_p,
                                 uint64_t(seed), uint64_t(offset), uint64_t(row_offset), checks, stream),
               "sample_step");
  end_checks(logits.device(), stream);
  return out;
}

at::Tensor posterior_cuda(const at::Tensor& logits, const at::Tensor& z, const at::Tensor& alpha_t,
                          const at::Tensor& alpha_s, double kappa, double temperature, double top_p) {
  check_sample_step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p);
  const c10::cuda::CUDAGuard guard(logits.device());
  uint32_t* checks = begin_checks(logits.device(), "posterior");
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor l = logits.contiguous(), zc = z.contiguous(), at_ = alpha_t.contiguous(), as_ = alpha_s.contiguous();
  at::Tensor q = at::empty(l.sizes(), l.options().dtype(at::kFloat));
  check_launch(cuda::posterior(l.const_data_ptr(), logits_dtype_code(l), zc.const_data_ptr<int64_t>(),
                               at_.const_data_ptr<double>(), as_.const_data_ptr<double>(), q.mutable_data_ptr<float>(),
                               zc.numel(), l.size(-1), kappa, temperature, top_p, checks, stream),
               "posterior");
  end_checks(logits.device(), stream);
  return q;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> canvas_step_cuda(const at::Tensor& logits,
                                                                const at::Tensor& temperature, int64_t seed,
                                                                int64_t offset) {
  check_canvas_logits(logits, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  uint32_t* checks = begin_checks(logits.device(), "canvas_step");
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor l = logits.contiguous(), t = temperature.contiguous();
  const auto lead = l.sizes().slice(0, l.dim() - 1);
  at::Tensor sample = at::empty(lead, l.options().dtype(at::kLong)), argmax = at::empty_like(sample);
  at::Tensor entropy = at::empty(lead, l.options().dtype(at::kFloat));
  check_launch(cuda::canvas_step(l.const_data_ptr(), logits_dtype_code(l), t.const_data_ptr<double>(),
                                 sample.mutable_data_ptr<int64_t>(), argmax.mutable_data_ptr<int64_t>(),
                                 entropy.mutable_data_ptr<float>(), t.numel(), l.size(-1), uint64_t(seed),
                                 uint64_t(offset), checks, stream),
               "canvas_step");
  end_checks(logits.device(), stream);
  return {sample, argmax, entropy};
}

// curriculum_embed on tensor cores (curriculum_embed_mma.cu) when the device and the
// kernel binary the runtime picks for it are sm_80+ (a build whose only code
// for this device is older PTX would trap), unless DUO_FAST_EMBED_PORTABLE=1
// asks for the portable float kernels (0 or unset: the rule; anything else raises) (curriculum.cu; they also serve sm < 80).
bool embed_on_tensor_cores(const at::Device& device) {
  if (env_choice("DUO_FAST_EMBED_PORTABLE", {"0", "1"}) == 1) return false;
  static std::mutex mutex;
  static std::map<int, bool> ok;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = ok.find(device.index());
  if (it == ok.end()) {
    int major = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index());
    TORCH_CHECK(err == cudaSuccess, "duo_fast: cudaDeviceGetAttribute(ComputeCapabilityMajor) failed: ",
                cudaGetErrorString(err));
    it = ok.emplace(device.index(), major >= 8 && cuda::curriculum_mma_binary_version() >= 80).first;
  }
  return it->second;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> curriculum_embed_cuda(const at::Tensor& x0, const at::Tensor& gamma,
                                                                     const at::Tensor& inv_tau,
                                                                     const at::Tensor& embedding, int64_t seed,
                                                                     int64_t offset) {
  check_curriculum_embed_args(x0, gamma, inv_tau, embedding);
  const int64_t K = embedding.size(0), d = embedding.size(1);
  const c10::cuda::CUDAGuard guard(x0.device());
  uint32_t* checks = begin_checks(x0.device(), "curriculum_embed");
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = x0.contiguous(), g = gamma.contiguous(), it = inv_tau.contiguous();
  auto sizes = x.sizes().vec();
  sizes.push_back(d);
  at::Tensor h = at::empty(sizes, embedding.options().dtype(at::kFloat)), z = at::empty_like(x);
  at::Tensor lse = at::empty(x.sizes(), x.options().dtype(at::kDouble));
  if (embed_on_tensor_cores(x0.device())) {
    // bf16 operand, converted once (K d * 2 bytes; no copy for a bf16 embedding)
    const at::Tensor Eb = embedding.contiguous().to(at::kBFloat16);
    check_launch(cuda::curriculum_embed_mma(x.const_data_ptr<int64_t>(), g.const_data_ptr<double>(),
                                            it.const_data_ptr<double>(),
                                            static_cast<const uint16_t*>(Eb.const_data_ptr()), x.numel(), K, d,
                                            uint64_t(seed), uint64_t(offset), h.mutable_data_ptr<float>(),
                                            z.mutable_data_ptr<int64_t>(), lse.mutable_data_ptr<double>(), checks,
                                            stream),
                 "curriculum_embed");
    end_checks(x0.device(), stream);
    return {h.to(embedding.scalar_type()), z, lse};
  }
  const at::Tensor E = embedding.contiguous().to(at::kFloat);
  check_launch(cuda::curriculum_embed(x.const_data_ptr<int64_t>(), g.const_data_ptr<double>(),
                                      it.const_data_ptr<double>(), E.const_data_ptr<float>(), x.numel(), K, d,
                                      uint64_t(seed), uint64_t(offset), h.mutable_data_ptr<float>(),
                                      z.mutable_data_ptr<int64_t>(), lse.mutable_data_ptr<double>(), checks, stream),
               "curriculum_embed");
  end_checks(x0.device(), stream);
  return {h.to(embedding.scalar_type()), z, lse};
}

at::Tensor softmax_embed_cuda(const at::Tensor& logits, const at::Tensor& embedding, const at::Tensor& temperature,
                              double scale) {
  check_softmax_embed_args(logits, embedding, temperature, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  uint32_t* checks = begin_checks(logits.device(), "softmax_embed");
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor l = logits.contiguous(), t = temperature.contiguous(), E = embedding.contiguous();
  const int64_t rows = t.numel(), K = l.size(-1), d = E.size(1);
  auto sizes = l.sizes().vec();
  sizes.back() = d;
  at::Tensor h = at::empty(sizes, E.options().dtype(at::kFloat));
  at::Tensor row_max = at::empty({rows}, l.options().dtype(at::kFloat));
  at::Tensor row_sum = at::empty({rows}, l.options().dtype(at::kDouble));
  // bf16 E on tensor cores (read in place); float32 / float16 E, or sm < 80: the float kernel.
  const bool tc = E.scalar_type() == at::kBFloat16 && embed_on_tensor_cores(logits.device());
  check_launch(cuda::softmax_embed(l.const_data_ptr(), logits_dtype_code(l), t.const_data_ptr<double>(),
                                   E.const_data_ptr(), logits_dtype_code(E), tc, rows, K, d, scale,
                                   row_max.mutable_data_ptr<float>(), row_sum.mutable_data_ptr<double>(),
                                   h.mutable_data_ptr<float>(), checks, stream),
               "softmax_embed");
  end_checks(logits.device(), stream);
  return h.to(E.scalar_type());
}

at::Tensor curriculum_embed_backward_cuda(const at::Tensor& grad_h, const at::Tensor& x0, const at::Tensor& gamma,
                                          const at::Tensor& inv_tau, const at::Tensor& lse, int64_t vocab_size,
                                          int64_t seed, int64_t offset) {
  check_curriculum_embed_backward_args(grad_h, x0, gamma, inv_tau, lse, vocab_size);
  const c10::cuda::CUDAGuard guard(x0.device());
  begin_checks(x0.device(), "curriculum_embed_backward");
  const at::Tensor x = x0.contiguous(), g = gamma.contiguous(), it = inv_tau.contiguous(), ls = lse.contiguous();
  const int64_t d = grad_h.size(-1);
  at::Tensor dE = at::empty({vocab_size, d}, grad_h.options().dtype(at::kFloat));
  if (embed_on_tensor_cores(x0.device())) {
    const at::Tensor dhb = grad_h.contiguous().to(at::kBFloat16);  // bf16 operand, N d * 2 bytes
    check_launch(cuda::curriculum_embed_backward_mma(
                     static_cast<const uint16_t*>(dhb.const_data_ptr()), x.const_data_ptr<int64_t>(),
                     g.const_data_ptr<double>(), it.const_data_ptr<double>(), ls.const_data_ptr<double>(), x.numel(),
                     vocab_size, d, uint64_t(seed), uint64_t(offset), dE.mutable_data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream().stream()),
                 "curriculum_embed_backward");
    return dE;
  }
  const at::Tensor dh = grad_h.contiguous().to(at::kFloat);
  check_launch(cuda::curriculum_embed_backward(dh.const_data_ptr<float>(), x.const_data_ptr<int64_t>(),
                                               g.const_data_ptr<double>(), it.const_data_ptr<double>(),
                                               ls.const_data_ptr<double>(), x.numel(), vocab_size, d, uint64_t(seed),
                                               uint64_t(offset), dE.mutable_data_ptr<float>(),
                                               c10::cuda::getCurrentCUDAStream().stream()),
               "curriculum_embed_backward");
  return dE;
}

// Multiprocessors of a device (cached): the top-k launch fills every SM.
int sm_count(const at::Device& device) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device.index());
  if (it == counts.end()) {
    int v = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device.index());
    TORCH_CHECK(err == cudaSuccess, "duo_fast: cudaDeviceGetAttribute(MultiProcessorCount) failed: ",
                cudaGetErrorString(err));
    it = counts.emplace(device.index(), v).first;
  }
  return it->second;
}

struct TopKScratch {
  at::Tensor map;
  int64_t slots;
  TopKScratch(const at::Tensor& like, int64_t n, int64_t k) {
    slots = cuda::topk_scratch_slots(n, k, sm_count(like.device()));
    map = at::full({slots * 2 * cuda::topk_map_capacity(k)}, -1, like.options().dtype(at::kInt));
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> curriculum_topk_cuda(const at::Tensor& x0, const at::Tensor& gamma,
                                                                    const at::Tensor& inv_tau, int64_t k,
                                                                    int64_t vocab_size, int64_t zt_rule, int64_t seed,
                                                                    int64_t offset) {
  check_topk_args(x0, gamma, inv_tau, k, vocab_size, zt_rule);
  const c10::cuda::CUDAGuard guard(x0.device());
  uint32_t* checks = begin_checks(x0.device(), "curriculum_topk");
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = x0.contiguous(), g = gamma.contiguous(), it = inv_tau.contiguous();
  auto sizes = x.sizes().vec();
  sizes.push_back(k);
  at::Tensor ids = at::empty(sizes, x.options()), weights = at::empty(sizes, x.options().dtype(at::kFloat));
  at::Tensor z = at::empty_like(x);
  TopKScratch sc(x, x.numel(), k);
  check_launch(cuda::curriculum_topk(x.const_data_ptr<int64_t>(), g.const_data_ptr<double>(),
                                     it.const_data_ptr<double>(), ids.mutable_data_ptr<int64_t>(),
                                     weights.mutable_data_ptr<float>(), z.mutable_data_ptr<int64_t>(), x.numel(), k,
                                     vocab_size, int(zt_rule), uint64_t(seed), uint64_t(offset),
                                     sc.map.mutable_data_ptr<int32_t>(), sc.slots, checks, stream),
               "curriculum_topk");
  end_checks(x0.device(), stream);
  return {ids, weights, z};
}

int embedding_dtype_code(const at::Tensor& e) {
  return e.scalar_type() == at::kBFloat16 ? 1 : e.scalar_type() == at::kHalf ? 2 : 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> curriculum_topk_embed_cuda(
    const at::Tensor& x0, const at::Tensor& gamma, const at::Tensor& inv_tau, int64_t k, const at::Tensor& embedding,
    int64_t zt_rule, int64_t seed, int64_t offset) {
  check_embedding(embedding, x0);
  const int64_t vocab_size = embedding.size(0), d = embedding.size(1);
  check_topk_args(x0, gamma, inv_tau, k, vocab_size, zt_rule);
  const c10::cuda::CUDAGuard guard(x0.device());
  uint32_t* checks = begin_checks(x0.device(), "curriculum_topk_embed");
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = x0.contiguous(), g = gamma.contiguous(), it = inv_tau.contiguous(), emb = embedding.contiguous();
  auto sizes = x.sizes().vec();
  sizes.push_back(k);
  at::Tensor ids = at::empty(sizes, x.options()), weights = at::empty(sizes, x.options().dtype(at::kFloat));
  sizes.back() = d;
  at::Tensor h = at::empty(sizes, x.options().dtype(at::kFloat));
  at::Tensor z = at::empty_like(x);
  TopKScratch sc(x, x.numel(), k);
  check_launch(cuda::curriculum_topk_embed(x.const_data_ptr<int64_t>(), g.const_data_ptr<double>(),
                                           it.const_data_ptr<double>(), emb.const_data_ptr(), embedding_dtype_code(emb),
                                           d, h.mutable_data_ptr<float>(), ids.mutable_data_ptr<int64_t>(),
                                           weights.mutable_data_ptr<float>(), z.mutable_data_ptr<int64_t>(), x.numel(),
                                           k, vocab_size, int(zt_rule), uint64_t(seed), uint64_t(offset),
                                           sc.map.mutable_data_ptr<int32_t>(), sc.slots, checks, stream),
               "curriculum_topk_embed");
  end_checks(x0.device(), stream);
  return {h.to(emb.scalar_type()), z, ids, weights};
}

at::Tensor topk_bag_backward_cuda(const at::Tensor& grad_h, const at::Tensor& ids, const at::Tensor& weights,
                                  int64_t vocab_size, bool deterministic) {
  check_bag_backward_args(grad_h, ids, weights, vocab_size);
  const c10::cuda::CUDAGuard guard(ids.device());
  uint32_t* checks = begin_checks(ids.device(), "topk_bag_backward");
  const at::Tensor gh = grad_h.contiguous().to(at::kFloat), ic = ids.contiguous(), wc = weights.contiguous();
  const int64_t d = gh.size(-1), k = ic.size(-1), tokens = ic.numel() / std::max<int64_t>(k, 1);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  // The sorted kernel writes every row once (zero rows included); atomics add into zeros.
  at::Tensor grad = deterministic ? at::empty({vocab_size, d}, gh.options()) : at::zeros({vocab_size, d}, gh.options());
  if (!deterministic) {
    check_launch(cuda::topk_bag_backward_atomic(gh.const_data_ptr<float>(), ic.const_data_ptr<int64_t>(),
                                                wc.const_data_ptr<float>(), grad.mutable_data_ptr<float>(), tokens, k,
                                                d, vocab_size, checks, stream),
                 "topk_bag_backward");
    end_checks(ids.device(), stream);
    return grad;
  }
  auto [sorted, order] = at::sort(ic.reshape(-1), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor partial = at::empty({cuda::topk_bag_partial_floats(sorted.numel(), k, d)}, gh.options());
  check_launch(cuda::topk_bag_backward_sorted(gh.const_data_ptr<float>(), sorted.const_data_ptr<int64_t>(),
                                              order.const_data_ptr<int64_t>(), wc.const_data_ptr<float>(),
                                              grad.mutable_data_ptr<float>(), sorted.numel(), k, d, vocab_size,
                                              partial.mutable_data_ptr<float>(), checks, stream),
               "topk_bag_backward");
  end_checks(ids.device(), stream);
  return grad;
}

// Waits for the device (the one synchronization of this file, asked for by
// name) and raises what its kernels have counted since the last report.
void check_device_errors_cuda(const at::Tensor& device_like) {
  const c10::cuda::CUDAGuard guard(device_like.device());
  const cudaError_t err = cudaDeviceSynchronize();
  TORCH_CHECK(err == cudaSuccess, "duo_fast: check_device_errors: cudaDeviceSynchronize failed: ",
              cudaGetErrorString(err));
  begin_checks(device_like.device(), "check_device_errors");
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CUDA, m) {
  m.impl("check_device_errors", &check_device_errors_cuda);
  m.impl("usdm_loss", &usdm_loss_cuda);
  m.impl("usdm_loss.into", &usdm_loss_into_cuda);
  m.impl("distill_kl", &distill_kl_cuda);
  m.impl("distill_kl.into", &distill_kl_into_cuda);
  m.impl("gamma_to_alpha", &gamma_to_alpha_cuda);
  m.impl("sample_zt", &sample_zt_cuda);
  m.impl("sample_step", &sample_step_cuda);
  m.impl("canvas_step", &canvas_step_cuda);
  m.impl("softmax_embed", &softmax_embed_cuda);
  m.impl("posterior", &posterior_cuda);
  m.impl("curriculum_topk", &curriculum_topk_cuda);
  m.impl("curriculum_topk_embed", &curriculum_topk_embed_cuda);
  m.impl("topk_bag_backward", &topk_bag_backward_cuda);
  m.impl("curriculum_embed", &curriculum_embed_cuda);
  m.impl("curriculum_embed_backward", &curriculum_embed_backward_cuda);
}

}  // namespace duo_fast
