"""duo_fast.gamma_to_alpha (docs/math.md §1) against the float64 reference
(adaptive quadrature), closed forms and limits; op conventions (opcheck, fake
kernel, errors); the CUDA kernel's own source run through the CPU emulation."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr

VOCABS = [2, 3, 27, 1000, 30522, 50257, 1 << 20, 1 << 24]
# Spread over the table, its edges, and both out-of-table regimes.
GAMMAS = [-25.0, -9.0, -8.2, -6.3, -5.0, -3.55, -3.5, -2.7, -1.75, -1.0, 0.0, 3.3, 10.0, 19.99, 20.0, 20.5, 24.0]

ALPHA_ABS_TOL = 1e-12  # docs/math.md asks 1e-9
DALPHA_REL_TOL = 1e-7  # docs/math.md asks 1e-6


def _check_against(alpha, dalpha, ref_alpha, ref_dalpha):
    alpha, dalpha = alpha.double(), dalpha.double()
    assert (alpha - ref_alpha).abs().max().item() <= ALPHA_ABS_TOL
    # Relative accuracy of dalpha where the exact value is a normal double.
    normal = ref_dalpha.abs() > 1e-290
    rel = ((dalpha - ref_dalpha).abs() / ref_dalpha.abs().clamp_min(1e-300))[normal]
    assert rel.max().item() <= DALPHA_REL_TOL, rel.max().item()
    assert (dalpha[~normal].abs() <= 1e-280).all()


@pytest.mark.parametrize("vocab_size", VOCABS)
def test_matches_reference_quadrature(vocab_size, device):
    gen = torch.Generator().manual_seed(vocab_size)
    gamma = torch.cat([torch.tensor(GAMMAS, dtype=torch.float64), torch.rand(8, generator=gen, dtype=torch.float64) * 30 - 9.5])
    alpha, dalpha = (t.cpu() for t in duo_fast.gamma_to_alpha(gamma.to(device), vocab_size))
    ref_alpha, ref_dalpha = reference.gamma_to_alpha(gamma, vocab_size)
    _check_against(alpha, dalpha, ref_alpha, ref_dalpha)


def test_relative_accuracy_of_small_alpha_and_one_minus_alpha():
    """alpha near 0 and 1 - alpha near 0 keep relative accuracy (the loss divides by both)."""
    gamma = torch.tensor([-6.0, -5.0, -4.0, 15.0, 19.5], dtype=torch.float64)
    alpha, _ = duo_fast.gamma_to_alpha(gamma, 50257)
    ref_alpha, _ = reference.gamma_to_alpha(gamma, 50257)
    small = ref_alpha < 0.5
    torch.testing.assert_close(alpha[small], ref_alpha[small], rtol=1e-9, atol=0)
    # 1 - alpha at gamma=-5 is 6.6e-12: what survives rounding of alpha itself.
    torch.testing.assert_close(1 - alpha[~small], 1 - ref_alpha[~small], rtol=1e-3, atol=1e-15)


def test_two_token_closed_form():
    """K = 2: pt = Phi(nu / sqrt 2), so alpha = 2 Phi(nu/sqrt2) - 1 = erf(nu/2) and
    dalpha/dgamma = (1/sqrt pi) exp(-nu^2/4) * (-nu/2)."""
    gamma = torch.linspace(-8.5, 19.5, 113, dtype=torch.float64)
    nu = torch.exp(-gamma / 2)
    alpha, dalpha = duo_fast.gamma_to_alpha(gamma, 2)
    torch.testing.assert_close(alpha, torch.erf(nu / 2), rtol=0, atol=1e-14)
    exact_d = -(nu / 2) * torch.exp(-nu * nu / 4) / math.sqrt(math.pi)
    torch.testing.assert_close(dalpha, exact_d, rtol=1e-8, atol=1e-300)


def test_limits_nan_and_monotonicity():
    g = torch.tensor([-math.inf, -1e300, -30.0, 30.0, 1e300, math.inf, math.nan], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="gamma must not be NaN"):  # a level is never NaN (hardening issue)
        duo_fast.gamma_to_alpha(g, 50257)
    alpha, dalpha = duo_fast.gamma_to_alpha(g[:6], 50257)
    assert alpha[:3].eq(1).all() and dalpha[:3].eq(0).all()
    assert alpha[3].item() == pytest.approx(reference.gamma_to_alpha(g[3:4], 50257)[0].item(), rel=1e-7)
    assert alpha[4:6].eq(0).all() and dalpha[4:6].eq(0).all()
    grid = torch.linspace(-12, 25, 20001, dtype=torch.float64)
    for K in (2, 50257, 1 << 24):
        a, d = duo_fast.gamma_to_alpha(grid, K)
        assert ((a >= 0) & (a <= 1)).all() and (d <= 0).all()
        assert (a[1:] <= a[:-1]).all(), "alpha must not increase with gamma"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_layouts(dtype):
    base = torch.linspace(-6, 4, 24, dtype=torch.float64)
    ref_alpha, ref_dalpha = duo_fast.gamma_to_alpha(base, 1000)
    for g, ra, rd in [
        (base.view(4, 6).to(dtype), ref_alpha.view(4, 6), ref_dalpha.view(4, 6)),
        (base.view(6, 4).t().to(dtype), ref_alpha.view(6, 4).t(), ref_dalpha.view(6, 4).t()),  # non-contiguous
        (base[::3].to(dtype), ref_alpha[::3], ref_dalpha[::3]),
        (base[5].to(dtype), ref_alpha[5], ref_dalpha[5]),  # 0-dim
        (base[:0].to(dtype), ref_alpha[:0], ref_dalpha[:0]),  # empty
    ]:
        alpha, dalpha = duo_fast.gamma_to_alpha(g, 1000)
        assert alpha.shape == g.shape and dalpha.shape == g.shape
        assert alpha.dtype == dtype and dalpha.dtype == dtype
        if dtype == torch.float32:
            # float32 input: computed in float64 at the float32 gamma, then rounded.
            ea, ed = duo_fast.gamma_to_alpha(g.double(), 1000)
            assert torch.equal(alpha, ea.float()) and torch.equal(dalpha, ed.float())
        else:
            torch.testing.assert_close(alpha, ra, rtol=0, atol=0)
            torch.testing.assert_close(dalpha, rd, rtol=0, atol=0)


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        for shape in [(5,), (3, 7), ()]:
            g = torch.randn(shape, dtype=dtype) - 2
            torch.library.opcheck(torch.ops.duo_fast.gamma_to_alpha.default, (g, 50257))


def test_fake_kernel_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = torch.empty(3, 5, dtype=torch.float32)
        a, d = duo_fast.gamma_to_alpha(g, 1000)
        assert a.shape == (3, 5) and d.dtype == torch.float32

    @torch.compile(backend="eager", fullgraph=True)
    def f(gamma):
        alpha, dalpha = duo_fast.gamma_to_alpha(gamma, 1000)
        return alpha * 2 + dalpha

    g = torch.linspace(-4, 0, 10)
    a, d = duo_fast.gamma_to_alpha(g, 1000)
    torch.testing.assert_close(f(g), a * 2 + d)


def test_bad_inputs_name_the_argument():
    g = torch.zeros(3)
    with pytest.raises(TypeError, match="gamma has dtype int64"):
        duo_fast.gamma_to_alpha(torch.zeros(3, dtype=torch.int64), 100)
    with pytest.raises(TypeError, match="gamma has dtype float16"):
        duo_fast.gamma_to_alpha(torch.zeros(3, dtype=torch.float16), 100)
    with pytest.raises(TypeError, match="gamma must be a torch.Tensor"):
        duo_fast.gamma_to_alpha([0.0, 1.0], 100)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[2, 16777216\], got 1"):
        duo_fast.gamma_to_alpha(g, 1)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        duo_fast.gamma_to_alpha(g, (1 << 24) + 1)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        duo_fast.gamma_to_alpha(g, 100.0)
    # The C++ checks guard direct torch.ops calls.
    with pytest.raises(RuntimeError, match="vocab_size must be in"):
        torch.ops.duo_fast.gamma_to_alpha(g, 0)
    with pytest.raises(RuntimeError, match="gamma has dtype Long"):
        torch.ops.duo_fast.gamma_to_alpha(torch.zeros(3, dtype=torch.int64), 100)


# ---- the CUDA kernel's own source, run on the CPU through the emulation ----


def _emulated_table(lib, vocab_size):
    lib.df_schedule_table_size.restype = ctypes.c_int
    table = torch.empty(lib.df_schedule_table_size(), dtype=torch.float64)
    lib.df_build_schedule_table(ctypes.c_int64(vocab_size), ptr(table))
    return table


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 1), ("fiber", 2), ("thread", 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_cuda_kernel_matches_cpu(harness, emulated, mode, seed, dtype):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        K = 50257
        table = _emulated_table(emulated, K)
        # 1000 values: several blocks of 128 threads, a partial last block.
        gamma = (torch.rand(1000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 40 - 15).to(dtype)
        alpha, dalpha = torch.empty_like(gamma), torch.empty_like(gamma)
        fn = emulated.df_emu_gamma_to_alpha_f32 if dtype == torch.float32 else emulated.df_emu_gamma_to_alpha_f64
        assert fn(ptr(gamma), ptr(alpha), ptr(dalpha), ctypes.c_int64(gamma.numel()), ptr(table)) == 0
        cpu_alpha, cpu_dalpha = duo_fast.gamma_to_alpha(gamma, K)
        assert torch.equal(alpha, cpu_alpha) and torch.equal(dalpha, cpu_dalpha)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernel_matches_cpu runs this kernel's source on the CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_device_matches_cpu(dtype):
    gamma = torch.linspace(-15, 25, 4097, dtype=dtype)
    a, d = duo_fast.gamma_to_alpha(gamma.cuda(), 50257)
    ea, ed = duo_fast.gamma_to_alpha(gamma, 50257)
    # Device libm (exp/expm1/fma) may differ from the host's by an ulp.
    torch.testing.assert_close(a.cpu(), ea, rtol=1e-13 if dtype == torch.float64 else 1e-6, atol=1e-15)
    torch.testing.assert_close(d.cpu(), ed, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-300)
    torch.library.opcheck(torch.ops.duo_fast.gamma_to_alpha.default, (gamma.cuda(), 50257))
