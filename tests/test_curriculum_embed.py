"""curriculum_embed (docs/math.md §2c, §2d): with the noise made visible (test hook
df_curriculum_noise, the kernel's own eps), h and z against the dense float64
formula of duo_fast.reference on the same scores, the embedding gradient against
autograd of that formula; the law of z against pt(gamma) and the mean of h
against the dense reference with its own noise (z-scores < 5); float32 /
bfloat16 embeddings, 1/tau up to 1e4, the emulated CUDA kernels, op
conventions and errors."""

from __future__ import annotations

import ctypes
import math
import os

import pytest
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr


def _noise(emulated, seed, n, K):
    eps = torch.empty(n, K)
    for t in range(n):
        emulated.df_curriculum_noise(ctypes.c_uint64(seed), ctypes.c_uint64(0), ctypes.c_uint64(t), ctypes.c_int64(K), ptr(eps[t]))
    return eps


def _inputs(n, K, seed, lo=-4.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, K, (n,), generator=g)
    gamma = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return x0, gamma


@pytest.mark.parametrize("K,d", [(2, 3), (37, 8), (1000, 16), (2053, 5)])
@pytest.mark.parametrize("inv_tau", [1.0, 30.0, 1e4])
def test_matches_dense_formula_on_the_same_scores(emulated, K, d, inv_tau):
    n, seed = 40, K + int(inv_tau)
    x0, gamma = _inputs(n, K, seed)
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
    h, z = duo_fast.curriculum_embed(x0, gamma, inv_tau, E, seed=seed)
    eps = _noise(emulated, seed, n, K)
    E64 = E.detach().double().requires_grad_(True)
    h_ref, z_ref = reference.curriculum_embed_dense(x0, gamma, inv_tau, E64, noise=eps)
    assert h.shape == (n, d) and h.dtype == torch.float32
    assert torch.equal(z, z_ref)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    dh = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    (h * dh).sum().backward()
    (h_ref * dh.double()).sum().backward()
    torch.testing.assert_close(E.grad.double(), E64.grad, rtol=1e-5, atol=1e-5)


def _tensor_cores(device):
    # the op's CUDA path on sm_80+ multiplies in bf16 (csrc/cuda/curriculum_embed_mma.cu)
    return (device == "cuda" and torch.cuda.get_device_capability()[0] >= 8
            and os.environ.get("DUO_FAST_EMBED_PORTABLE") != "1")


def test_huge_inv_tau_is_the_one_hot_of_z(device):
    K, d, n = 500, 6, 64
    x0, gamma = _inputs(n, K, 3)
    E = torch.randn(K, d)
    h, z = (t.cpu() for t in duo_fast.curriculum_embed(x0.to(device), gamma.to(device), 1e6, E.to(device), seed=1))
    assert bool(torch.isfinite(h).all())
    # P is exactly one-hot here, so on tensor cores h is the bf16-rounded row
    want = E[z].bfloat16().float() if _tensor_cores(device) else E[z]
    torch.testing.assert_close(h, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K", [2, 27, 1000])
def test_z_marginal_is_exact(K, device):
    n = 20_000
    for gamma in (-4.0, -2.0, 0.0):
        x0 = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(K))
        _, z = duo_fast.curriculum_embed(x0.to(device), torch.full((n,), gamma, dtype=torch.float64, device=device), 1.0,
                                         torch.zeros(K, 1, device=device), seed=int(K - 7 * gamma))
        z = z.cpu()
        p_hat = float((z == x0).double().mean())
        p = float(reference.pt_from_gamma(torch.tensor([gamma], dtype=torch.float64), K)[0])
        assert abs(p_hat - p) / math.sqrt(max(p * (1 - p), 1e-12) / n) < 5, (K, gamma, p_hat, p)


def test_mean_of_h_matches_dense_reference(device):
    # E[h | x, gamma, tau] by Monte Carlo on both sides (dense reference with torch noise).
    K, d, n = 7, 3, 40_000
    x0 = torch.full((n,), 2)
    gamma = torch.full((n,), -1.0, dtype=torch.float64)
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(0))
    h = duo_fast.curriculum_embed(x0.to(device), gamma.to(device), 2.0, E.to(device), seed=5)[0].cpu()
    h_ref, _ = reference.curriculum_embed_dense(x0, gamma, 2.0, E, generator=torch.Generator().manual_seed(6))
    diff = h.double().mean(0) - h_ref.mean(0)
    se = torch.sqrt(h.double().var(0) / n + h_ref.var(0) / n)
    assert bool((diff.abs() < 5 * se).all()), (diff, se)


def test_bfloat16_embedding():
    K, d, n = 300, 16, 50
    x0, gamma = _inputs(n, K, 4)
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(0))
    Eb = E.bfloat16().requires_grad_(True)
    h, z = duo_fast.curriculum_embed(x0, gamma, 3.0, Eb, seed=2)
    h32, z32 = duo_fast.curriculum_embed(x0, gamma, 3.0, Eb.detach().float(), seed=2)
    assert h.dtype == torch.bfloat16 and torch.equal(z, z32)
    torch.testing.assert_close(h.float(), h32, rtol=1e-2, atol=1e-2)
    h.float().sum().backward()
    assert Eb.grad.dtype == torch.bfloat16 and bool(torch.isfinite(Eb.grad.float()).all())


def test_reproducible_and_memory_is_not_n_by_k():
    K, d = 4099, 32
    x0, gamma = _inputs(600, K, 9)
    E = torch.randn(K, d)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = duo_fast.curriculum_embed(x0, gamma, 2.0, E, seed=3)
        torch.set_num_threads(2)
        b = duo_fast.curriculum_embed(x0, gamma, 2.0, E, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    torch.manual_seed(0)
    c = duo_fast.curriculum_embed(x0, gamma, 2.0, E)
    d2 = duo_fast.curriculum_embed(x0, gamma, 2.0, E)
    torch.manual_seed(0)
    assert torch.equal(duo_fast.curriculum_embed(x0, gamma, 2.0, E)[0], c[0]) and not torch.equal(c[0], d2[0])


def test_opcheck():
    K, d = 45, 6
    x0, gamma = _inputs(12, K, 0)
    x0, gamma = x0.reshape(3, 4), gamma.reshape(3, 4)
    it = torch.full((3, 4), 2.0, dtype=torch.float64)
    E = torch.randn(K, d, requires_grad=True)
    torch.library.opcheck(torch.ops.duo_fast.curriculum_embed.default, (x0, gamma, it, E, 5, 0))
    _, _, lse = torch.ops.duo_fast.curriculum_embed(x0, gamma, it, E.detach(), 5, 0)
    torch.library.opcheck(torch.ops.duo_fast.curriculum_embed_backward.default, (torch.randn(3, 4, d), x0, gamma, it, lse, K, 5, 0))


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 4), ("thread", 0)])
def test_emulated_cuda_kernels_match_cpu(harness, emulated, mode, seed):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        cases = [(37, 5, 20), (1000, 1100, 19)] if mode == "fiber" else [(37, 5, 3)]
        for K, d, n in cases:  # d = 1100: two column passes of 1024
            x0, gamma = _inputs(n, K, seed + K)
            it = torch.linspace(0.5, 1e4, n, dtype=torch.float64)
            E = torch.randn(K, d, generator=torch.Generator().manual_seed(seed))
            h, z, lse = torch.empty(n, d), torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float64)
            rc = emulated.df_emu_curriculum_embed(
                ptr(x0), ptr(gamma), ptr(it), ptr(E), ctypes.c_int64(n), ctypes.c_int64(K), ctypes.c_int64(d),
                ctypes.c_uint64(8), ctypes.c_uint64(0), ptr(h), ptr(z), ptr(lse),
            )
            assert rc == 0
            c_h, c_z, c_lse = torch.ops.duo_fast.curriculum_embed(x0, gamma, it, E, 8, 0)
            assert torch.equal(z, c_z)
            torch.testing.assert_close(h, c_h, rtol=1e-5, atol=1e-5)
            # log-sum-exp: an absolute error is a relative error of P; the CPU exp is a float
            # polynomial (~1e-7 relative per entry), CUDA uses expf
            torch.testing.assert_close(lse, c_lse, rtol=0, atol=1e-7)
            dh = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
            dE = torch.empty(K, d)
            rc = emulated.df_emu_curriculum_embed_backward(
                ptr(dh), ptr(x0), ptr(gamma), ptr(it), ptr(lse), ctypes.c_int64(n), ctypes.c_int64(K), ctypes.c_int64(d),
                ctypes.c_uint64(8), ctypes.c_uint64(0), ptr(dE),
            )
            assert rc == 0
            c_dE = torch.ops.duo_fast.curriculum_embed_backward(dh, x0, gamma, it, c_lse, K, 8, 0)
            torch.testing.assert_close(dE, c_dE, rtol=1e-5, atol=1e-5)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.parametrize("seed", [0, 3])
def test_emulated_z_defined_when_every_score_is_nan(harness, emulated, seed):
    # A NaN level (the CUDA path checks values on the device, not on the host) makes
    # every score NaN: no score beats the running best, so z must come from the
    # initialised argmax (0), never from uninitialised shared memory (the emulation
    # poisons static __shared__ at every block start). Other tokens are unaffected.
    harness.configure_emulation(emulated, mode="fiber", seed=seed)
    try:
        K, d, n = 300, 8, 40  # three blocks of 16 tokens
        x0, gamma = _inputs(n, K, 5)
        gamma[[3, 17, 39]] = math.nan
        it = torch.full((n,), 2.0, dtype=torch.float64)
        E = torch.randn(K, d, generator=torch.Generator().manual_seed(2))
        h, z, lse = torch.empty(n, d), torch.full((n,), -7, dtype=torch.int64), torch.empty(n, dtype=torch.float64)
        assert emulated.df_emu_curriculum_embed(
            ptr(x0), ptr(gamma), ptr(it), ptr(E), ctypes.c_int64(n), ctypes.c_int64(K), ctypes.c_int64(d),
            ctypes.c_uint64(8), ctypes.c_uint64(0), ptr(h), ptr(z), ptr(lse),
        ) == 0
        bad = torch.zeros(n, dtype=torch.bool)
        bad[[3, 17, 39]] = True
        assert (z[bad] == 0).all(), z[bad]
        ok = ~bad
        # the same tokens (Philox stream = token index) where the levels are finite
        idx = ok.nonzero().squeeze(1)
        c_h, c_z, _ = torch.ops.duo_fast.curriculum_embed(x0, gamma.nan_to_num(0.0), it, E, 8, 0)
        assert torch.equal(z[idx], c_z[idx])
        torch.testing.assert_close(h[idx], c_h[idx], rtol=1e-5, atol=1e-5)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernels_match_cpu runs these kernels' source on the CPU")
def test_cuda_device_matches_cpu(monkeypatch):
    # the portable float kernels (on sm_80+ the op runs the tensor-core kernels unless
    # asked not to; those are compared within the bf16 bound in test_curriculum_embed_mma.py)
    monkeypatch.setenv("DUO_FAST_EMBED_PORTABLE", "1")
    K, d = 50257, 768
    x0, gamma = _inputs(256, K, 0)
    E = torch.randn(K, d)
    Ec = E.cuda().requires_grad_(True)
    h, z = duo_fast.curriculum_embed(x0.cuda(), gamma.cuda(), 3.0, Ec, seed=2)
    h.sum().backward()
    Er = E.clone().requires_grad_(True)
    hr, zr = duo_fast.curriculum_embed(x0, gamma, 3.0, Er, seed=2)
    hr.sum().backward()
    assert (z.cpu() != zr).sum() <= 1
    torch.testing.assert_close(h.cpu(), hr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Ec.grad.cpu(), Er.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gamma=torch.tensor([[math.nan, 0.0]])), r"gamma must be finite"),
        (dict(inv_tau=-1.0), r"inv_tau must be finite and > 0"),
        (dict(inv_tau=math.inf), r"inv_tau must be finite and > 0"),
        (dict(x0=torch.tensor([[0, 10]])), r"x0 holds token ids in \[0, 10\], outside \[0, vocab_size\)"),
        (dict(embedding=torch.zeros(10)), r"embedding must be \[vocab_size, d\]"),
        (dict(embedding=torch.zeros(1, 4)), r"embedding.shape\[0\] \(the vocabulary size\) must be in \[2"),
        (dict(embedding=torch.zeros(10, 4, dtype=torch.float64)), r"embedding has dtype float64"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    args = dict(x0=torch.tensor([[0, 1]]), gamma=torch.tensor([[0.0, 0.0]]), inv_tau=1.0, embedding=torch.zeros(10, 4))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        duo_fast.curriculum_embed(args["x0"], args["gamma"], args["inv_tau"], args["embedding"])
