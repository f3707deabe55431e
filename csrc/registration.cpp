// The one schema block of the duo_fast operator library, and the Python module
// `duo_fast._C` whose import loads it. Kernels register per device in
// cpu/*.cpp and cuda/bindings.cpp; fake (meta) kernels and autograd live in
// duo_fast/ops.py.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "cpu/grad_cache.h"

#ifndef DUO_FAST_VERSION
#define DUO_FAST_VERSION "0.0.0"
#endif
#ifndef DUO_FAST_CUDA_ARCHS
#define DUO_FAST_CUDA_ARCHS ""
#endif
#ifndef DUO_FAST_CUDA_VERSION
#define DUO_FAST_CUDA_VERSION ""
#endif
#ifndef DUO_FAST_TORCH_VERSION
#define DUO_FAST_TORCH_VERSION ""
#endif

// `SymInt seed`: the Philox key may be an unbacked SymInt inside torch.compile (a
// key drawn from a generator in the graph); the kernels take it as int64_t.
TORCH_LIBRARY(duo_fast, m) {
  // docs/math.md §1: (alpha, dalpha/dgamma) = T(gamma) for vocabulary size K.
  m.def("gamma_to_alpha(Tensor gamma, int vocab_size) -> (Tensor, Tensor)");
  // docs/math.md §2a/§2b: exact O(1) z_t (and the coupled z_s when gamma_s is given; else
  // the second output is empty). gamma_t/gamma_s: float64, x0's shape. Philox
  // key `seed`, positions offset, offset+1 of stream token (sample_zt.h).
  m.def("sample_zt(Tensor x0, Tensor gamma_t, Tensor? gamma_s, int vocab_size, SymInt seed, int offset)"
        " -> (Tensor, Tensor)");
  // docs/math.md §3: per-token uniform-state NELBO from logits [..., K] (float32,
  // bfloat16 or float16, read natively); z, x0 int64 and alpha, dalpha float64 of the
  // leading shape. With compute_grad also d loss / d logits in the logits' dtype (else
  // the second output is empty); backward scales it by grad_output.
  m.def("usdm_loss(Tensor logits, Tensor z, Tensor x0, Tensor alpha, Tensor dalpha, bool compute_grad)"
        " -> (Tensor, Tensor)");
  // The same with the gradient written into grad (the logits' shape and dtype,
  // contiguous, separate memory) instead of a new tensor; returns the loss. For
  // callers that reuse one buffer (the chunks of linear_usdm_loss); no autograd.
  m.def("usdm_loss.into(Tensor logits, Tensor z, Tensor x0, Tensor alpha, Tensor dalpha, Tensor(a!) grad) -> Tensor");
  // docs/math.md §3: per-token KL of student vs teacher logits [..., K] (float32,
  // bfloat16 or float16, each its own dtype; direction 0: KL(pS||pT), 1: KL(pT||pS));
  // with compute_grad also dKL/dstudent_logits in the student's dtype (else the second
  // output is empty). Backward scales it by grad_output.
  m.def("distill_kl(Tensor student_logits, Tensor teacher_logits, int direction, bool compute_grad)"
        " -> (Tensor, Tensor)");
  // The same with dKL/dstudent_logits written into grad (as usdm_loss.into).
  m.def("distill_kl.into(Tensor student_logits, Tensor teacher_logits, int direction, Tensor(a!) grad) -> Tensor");
  // docs/math.md §2c/§2d: exact curriculum input h = softmax((a~ onehot(x0) + s~ eps) * inv_tau) E
  // with eps regenerated from Philox (stream token, position offset + j/4); returns
  // (h [..., d] in embedding's dtype, z_t = argmax, row log-sum-exp float64 for backward).
  m.def("curriculum_embed(Tensor x0, Tensor gamma, Tensor inv_tau, Tensor embedding, SymInt seed, int offset)"
        " -> (Tensor, Tensor, Tensor)");
  // d embedding [K, d] float32 = P^T grad_h, P regenerated from the saved log-sum-exp.
  m.def("curriculum_embed_backward(Tensor grad_h, Tensor x0, Tensor gamma, Tensor inv_tau, Tensor lse,"
        " int vocab_size, SymInt seed, int offset) -> Tensor");
  // docs/math.md §2e: Duo++ top-k curriculum input per token: ids [..., k] int64, weights
  // [..., k] float32, z_t; gamma, inv_tau float64 of x0's shape; zt_rule 0 exact,
  // 1 the reference's rule. Philox key `seed`, positions offset.. of stream token.
  m.def("curriculum_topk(Tensor x0, Tensor gamma, Tensor inv_tau, int k, int vocab_size, int zt_rule, SymInt seed,"
        " int offset) -> (Tensor, Tensor, Tensor)");
  // docs/math.md §2e fused with the embedding bag: (h [..., d] in embedding's dtype, z_t,
  // ids, weights) -- ids/weights are kept for the backward.
  m.def("curriculum_topk_embed(Tensor x0, Tensor gamma, Tensor inv_tau, int k, Tensor embedding, int zt_rule,"
        " SymInt seed, int offset) -> (Tensor, Tensor, Tensor, Tensor)");
  // d embedding [K, d] float32 of the bag h = sum_i w_i E[id_i]: scatter of w_i grad_h.
  m.def("topk_bag_backward(Tensor grad_h, Tensor ids, Tensor weights, int vocab_size, bool deterministic) -> Tensor");
  // docs/math.md §4: one reverse step z -> z_s from logits [..., K] (float32, bfloat16,
  // float16); alpha_t, alpha_s float64 of z's shape; kappa < 1 mixes in the
  // Psi-sampler's predictor-corrector part; top_p < 1 filters p to the nucleus.
  // Philox key `seed`, position `offset` of stream row_offset + token (sample_step.h): rows
  // [row_offset, row_offset + rows) of a larger call draw what that call draws for them.
  m.def("sample_step(Tensor logits, Tensor z, Tensor alpha_t, Tensor alpha_s, float kappa, float temperature,"
        " float top_p, SymInt seed, int offset, int row_offset=0) -> Tensor");
  // docs/math.md §4: the dense q(z_s) [..., K] float32 that sample_step draws from.
  m.def("posterior(Tensor logits, Tensor z, Tensor alpha_t, Tensor alpha_s, float kappa, float temperature,"
        " float top_p) -> Tensor");
  // DiffusionGemma's denoising step (canvas_step.h): per row of logits [..., K]
  // (float32, bfloat16, float16) and temperature (float64, the leading shape),
  // one draw from softmax(logits / T), the argmax (first index) and the entropy
  // (float32). Philox key `seed`, position `offset` of stream row.
  m.def("canvas_step(Tensor logits, Tensor temperature, SymInt seed, int offset) -> (Tensor, Tensor, Tensor)");
  // The soft embedding of DiffusionGemma's self-conditioning (softmax_embed.h):
  // softmax(logits / T) @ embedding * scale, [..., d] in embedding's dtype, without
  // the [rows, K] probabilities. Forward only.
  m.def("softmax_embed(Tensor logits, Tensor embedding, Tensor temperature, float scale) -> Tensor");
  // Raises the invalid values that the CUDA kernels found on the device of
  // `device_like` (duo_fast/device_check.h) after waiting for that device; on
  // CPU a no-op (CPU ops raise at the call).
  m.def("check_device_errors(Tensor device_like) -> ()");
}

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) {
  m.impl("check_device_errors", [](const at::Tensor&) {});
}

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef DUO_FAST_WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
#ifdef _OPENMP
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
  return Py_BuildValue("{s:s,s:O,s:O,s:s,s:s,s:s,s:O}", "version", DUO_FAST_VERSION, "cpu", Py_True, "cuda",
                       cuda ? Py_True : Py_False, "cuda_archs", DUO_FAST_CUDA_ARCHS, "cuda_version",
                       DUO_FAST_CUDA_VERSION, "torch_version", DUO_FAST_TORCH_VERSION, "openmp",
                       openmp ? Py_True : Py_False);
}

PyObject* grad_cache_info(PyObject*, PyObject*) {
  try {
    const duo_fast::grad_cache::Info i = duo_fast::grad_cache::info();
    return Py_BuildValue("{s:L,s:L,s:L}", "bytes", (long long)i.bytes, "buffers", (long long)i.buffers,
                         "limit_bytes", (long long)i.limit_bytes);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* grad_cache_empty(PyObject*, PyObject*) {
  return PyLong_FromLongLong((long long)duo_fast::grad_cache::empty_cache());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Backends and CUDA architectures compiled into duo_fast."},
    {"grad_cache_info", grad_cache_info, METH_NOARGS,
     "Kept gradient buffers of the CPU backward kernels: bytes, buffers, limit_bytes (cpu/grad_cache.h)."},
    {"grad_cache_empty", grad_cache_empty, METH_NOARGS, "Frees the kept gradient buffers; returns the bytes freed."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "duo_fast compiled kernels (custom ops under torch.ops.duo_fast)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
