"""duo_fast.sample_zt (docs/math.md §2a, §2b): the law of z_t against the exact pt(gamma)
of the reference (quadrature), the coupled pair's joint law, uniformity of the
other token, reproducibility across thread counts, the emulated CUDA kernel
token-for-token, op conventions and errors. Statistical tests use fixed seeds;
each states its tolerance (z-scores below 5, chi-square p-values above 1e-4)."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import scipy.stats as st
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr


def _z(p_hat: float, p: float, n: int) -> float:
    return abs(p_hat - p) / math.sqrt(max(p * (1 - p), 1e-300) / n)


@pytest.mark.parametrize("vocab_size", [2, 27, 1000, 50257])
def test_marginal_matches_exact_pt(vocab_size, device):
    gammas = [-6.0, -3.5, -2.5, -1.75, 0.0, 3.0]
    n_tok = 100_000
    x0 = torch.randint(0, vocab_size, (len(gammas), n_tok), generator=torch.Generator().manual_seed(1))
    gamma = torch.tensor(gammas, dtype=torch.float64)  # one level per row
    z = duo_fast.sample_zt(x0.to(device), gamma.to(device), vocab_size, seed=1234 + vocab_size).cpu()
    assert z.dtype == torch.int64 and z.shape == x0.shape
    assert ((z >= 0) & (z < vocab_size)).all()
    pt = reference.latent_marginal(x0[:, :1], gamma, vocab_size)[:, 0]
    for row in range(len(gammas)):
        p_hat = (z[row] == x0[row]).double().mean().item()
        assert _z(p_hat, pt[row].item(), n_tok) < 5, (gammas[row], p_hat, pt[row].item())


def test_other_token_is_uniform_over_the_rest(device):
    K, n = 27, 300_000
    x0 = torch.full((1, n), 5, dtype=torch.int64)
    z = duo_fast.sample_zt(x0.to(device), torch.tensor([2.0], device=device), K, seed=7)[0].cpu()
    others = z[z != 5].numpy()
    counts = np.bincount(others, minlength=K)
    assert counts[5] == 0
    assert st.chisquare(np.delete(counts, 5)).pvalue > 1e-4


def test_top_ids_reachable(device):
    """No gap at the top: id K-1 appears as the noisy latent at its rate."""
    K, n = 50257, 400_000
    x0 = torch.zeros(1, n, dtype=torch.int64)
    z = duo_fast.sample_zt(x0.to(device), torch.tensor([20.0], device=device), K, seed=3)[0].cpu()  # nearly uniform
    hi = (z >= K - 1000).double().mean().item()
    p = 1000 / K * (1 - reference.latent_marginal(x0[:, :1], torch.tensor([20.0]), K).item()) * K / (K - 1)
    assert _z(hi, p, n) < 5


@pytest.mark.parametrize("vocab_size", [2, 50, 50257])
def test_coupled_pair_joint_law(vocab_size, device):
    pairs = [(-1.0, -3.0), (-2.5, -3.5), (0.0, -1.0), (-3.0, -1.0)]  # (gamma_t, gamma_s); t noisier or not
    n_tok = 80_000
    x0 = torch.randint(0, vocab_size, (len(pairs), n_tok), generator=torch.Generator().manual_seed(2))
    g_t = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    g_s = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    z_t, z_s = (z.cpu() for z in duo_fast.sample_zt(x0.to(device), g_t.to(device), vocab_size, gamma_s=g_s.to(device),
                                                    seed=99))
    law = reference.coupled_joint_law(g_t, g_s, vocab_size)  # [rows, 2, 2]
    for r in range(len(pairs)):
        a = (z_t[r] == x0[r]).long()
        b = (z_s[r] == x0[r]).long()
        counts = torch.bincount(a * 2 + b, minlength=4).double().numpy()
        expected = law[r].reshape(4).numpy() * n_tok
        keep = expected > 0
        assert counts[~keep].sum() == 0, "a cell of probability 0 was drawn"
        if keep.sum() > 1:
            assert st.chisquare(counts[keep], expected[keep] * counts.sum() / expected[keep].sum()).pvalue > 1e-4
        # Both away from x: the same j* (shared noise).
        both = (a == 0) & (b == 0)
        assert torch.equal(z_t[r][both], z_s[r][both])


def test_limits_of_gamma(device):
    K = 1000
    x0 = torch.randint(0, K, (2, 50_000), generator=torch.Generator().manual_seed(5))
    z = duo_fast.sample_zt(x0.to(device), torch.tensor([-math.inf, math.inf], device=device), K, seed=11).cpu()
    assert torch.equal(z[0], x0[0])  # no noise
    assert _z((z[1] == x0[1]).double().mean().item(), 1 / K, 50_000) < 5  # pure noise: uniform


def test_level_shapes_and_noncontiguous_x0():
    K = 100
    x0 = torch.randint(0, K, (3, 8), generator=torch.Generator().manual_seed(0))
    per_row = duo_fast.sample_zt(x0, torch.tensor([-1.0, -2.0, -3.0]), K, seed=5)
    per_row_col = duo_fast.sample_zt(x0, torch.tensor([[-1.0], [-2.0], [-3.0]]), K, seed=5)
    per_token = duo_fast.sample_zt(x0, torch.tensor([-1.0, -2.0, -3.0]).view(3, 1).expand(3, 8).float(), K, seed=5)
    assert torch.equal(per_row, per_row_col) and torch.equal(per_row, per_token)
    xt = x0.t()  # non-contiguous; result follows its logical layout
    z = duo_fast.sample_zt(xt, torch.full((8, 3), -1.5), K, seed=5)
    assert z.shape == (8, 3) and ((z >= 0) & (z < K)).all()
    one = duo_fast.sample_zt(x0[:, :1], torch.tensor([-1.0, -2.0, -3.0]), K, seed=5)  # L = 1
    assert one.shape == (3, 1)


def test_reproducibility_threads_and_generators():
    K = 50257
    x0 = torch.randint(0, K, (4, 5000), generator=torch.Generator().manual_seed(0))
    g = torch.tensor([-3.0, -2.0, -1.0, 0.0])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = duo_fast.sample_zt(x0, g, K, gamma_s=g - 1, seed=2024)
        torch.set_num_threads(2)
        b = duo_fast.sample_zt(x0, g, K, gamma_s=g - 1, seed=2024)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(3)
    c1 = duo_fast.sample_zt(x0, g, K)
    c2 = duo_fast.sample_zt(x0, g, K)
    torch.manual_seed(3)
    assert torch.equal(duo_fast.sample_zt(x0, g, K), c1)
    assert not torch.equal(c1, c2), "two calls must not reuse a stream"
    gen = torch.Generator().manual_seed(8)
    d1 = duo_fast.sample_zt(x0, g, K, generator=gen)
    assert torch.equal(duo_fast.sample_zt(x0, g, K, generator=torch.Generator().manual_seed(8)), d1)


def test_opcheck():
    K = 50
    x0 = torch.randint(0, K, (3, 7))
    g = torch.randn(3, 7, dtype=torch.float64) - 2
    torch.library.opcheck(torch.ops.duo_fast.sample_zt.default, (x0, g, None, K, 123, 0))
    torch.library.opcheck(torch.ops.duo_fast.sample_zt.default, (x0, g, g - 1, K, -5, 2))


def test_bad_inputs_name_the_argument():
    K = 10
    x0 = torch.randint(0, K, (2, 3))
    g = torch.zeros(2)
    with pytest.raises(RuntimeError, match=r"x0 holds token ids in \[.*\], outside \[0, vocab_size\)"):
        duo_fast.sample_zt(torch.tensor([[0, 10]]), torch.zeros(1), K, seed=0)
    with pytest.raises(RuntimeError, match="x0 holds token ids"):
        duo_fast.sample_zt(torch.tensor([[-1, 3]]), torch.zeros(1), K, seed=0)
    with pytest.raises(TypeError, match="x0 has dtype int16"):  # int32 is taken (test_bad_values.py)
        duo_fast.sample_zt(x0.short(), g, K, seed=0)
    with pytest.raises(ValueError, match=r"gamma has shape \(5,\)"):
        duo_fast.sample_zt(x0, torch.zeros(5), K, seed=0)
    with pytest.raises(ValueError, match="gamma_s has shape"):
        duo_fast.sample_zt(x0, g, K, gamma_s=torch.zeros(2, 4), seed=0)
    with pytest.raises(TypeError, match="gamma must be a floating tensor"):
        duo_fast.sample_zt(x0, torch.zeros(2, dtype=torch.int64), K, seed=0)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        duo_fast.sample_zt(x0, g, 1, seed=0)
    with pytest.raises(ValueError, match="either seed or generator"):
        duo_fast.sample_zt(x0, g, K, seed=0, generator=torch.Generator())
    with pytest.raises(RuntimeError, match="gamma has shape"):
        torch.ops.duo_fast.sample_zt(x0, torch.zeros(2, dtype=torch.float64), None, K, 0, 0)


# ---- the CUDA kernel's own source on the CPU ----


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 4), ("thread", 0)])
def test_emulated_cuda_kernel_matches_cpu(harness, emulated, mode, seed):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        K, n = 50257, 3000  # 12 blocks of 256, partial last block
        x0 = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(seed))
        g_t = torch.linspace(-4, 1, n, dtype=torch.float64)
        g_s = g_t - 0.7
        z_t, z_s = torch.empty_like(x0), torch.empty_like(x0)
        rc = emulated.df_emu_sample_zt(
            ptr(x0), ptr(g_t), ptr(g_s), ptr(z_t), ptr(z_s), ctypes.c_int64(n), ctypes.c_int64(K),
            ctypes.c_uint64(777), ctypes.c_uint64(0),
        )
        assert rc == 0
        c_t, c_s = torch.ops.duo_fast.sample_zt(x0, g_t, g_s, K, 777, 0)
        assert torch.equal(z_t, c_t) and torch.equal(z_s, c_s)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernel_matches_cpu runs this kernel's source on the CPU")
def test_cuda_device_matches_cpu():
    K = 50257
    x0 = torch.randint(0, K, (8, 1000))
    g = torch.linspace(-4, 1, 8)
    a = duo_fast.sample_zt(x0.cuda(), g.cuda(), K, gamma_s=g.cuda() - 1, seed=9)
    b = duo_fast.sample_zt(x0, g, K, gamma_s=g - 1, seed=9)
    # Identical except at rounding ties of nu + eps_x vs M (device libm may differ by an ulp).
    assert (a[0].cpu() != b[0]).double().mean() < 1e-3 and (a[1].cpu() != b[1]).double().mean() < 1e-3
    torch.library.opcheck(torch.ops.duo_fast.sample_zt.default, (x0.cuda(), g.cuda().double()[:, None].expand(8, 1000).contiguous(), None, K, 1, 0))
