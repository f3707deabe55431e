// CPU kernel of the exact O(1) latent sampler (docs/math.md §2a, §2b; math in sample_zt.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "duo_fast/sample_zt.h"

namespace duo_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> sample_zt_cpu(const at::Tensor& x0, const at::Tensor& gamma_t,
                                                 const std::optional<at::Tensor>& gamma_s, int64_t vocab_size,
                                                 int64_t seed, int64_t offset) {
  check_sample_zt_args(x0, gamma_t, gamma_s, vocab_size);
  const at::Tensor x = x0.contiguous(), gt = gamma_t.contiguous();
  const at::Tensor gs = gamma_s ? gamma_s->contiguous() : at::Tensor();
  at::Tensor z_t = at::empty_like(x);
  at::Tensor z_s = gamma_s ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t* xp = x.const_data_ptr<int64_t>();
  const double* gtp = gt.const_data_ptr<double>();
  const double* gsp = gamma_s ? gs.const_data_ptr<double>() : nullptr;
  int64_t* ztp = z_t.mutable_data_ptr<int64_t>();
  int64_t* zsp = gamma_s ? z_s.mutable_data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, x.numel(), 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const latent::Draw d = latent::draw(uint64_t(seed), uint64_t(offset), uint64_t(i), xp[i], vocab_size);
      ztp[i] = latent::select(d, xp[i], gtp[i]);
      if (zsp) zsp[i] = latent::select(d, xp[i], gsp[i]);
    }
  });
  return {z_t, z_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) { m.impl("sample_zt", &sample_zt_cpu); }

}  // namespace duo_fast
