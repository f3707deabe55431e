"""pytest-benchmark entries for duo_fast.sample_zt (small and fast).

    pytest benchmarks/ --benchmark-only            # time them
    pytest benchmarks/ --benchmark-disable         # run each once, as a smoke test

The ratios against the dense reference and the BASELINES targets are in
`python -m benchmarks.report --ops sample_zt` (fresh process per measurement,
peak memory); these entries are for pytest-benchmark's history/compare tooling.
"""

from __future__ import annotations

import pytest
import torch

import duo_fast
from duo_fast import reference as R

K = 50257
B, L = 2, 1024  # N = 2048, the BASELINES size
K_REF, B_REF, L_REF = 1024, 2, 128  # dense reference: N*K float64 noise, keep it small
SEED = 1234


def _inputs(b, l, k, coupled):
    g = torch.Generator().manual_seed(99)
    x0 = torch.randint(0, k, (b, l), generator=g)
    lv = R.DUO_GAMMA_MIN + (R.DUO_GAMMA_MAX - R.DUO_GAMMA_MIN) * torch.rand(2, b, generator=g, dtype=torch.float64)
    if coupled:
        return x0, lv.max(0).values, lv.min(0).values  # gamma_t, gamma_s <= gamma_t
    return x0, lv[0], None


def _check_coupling(x0, z_t, z_s):
    # gamma_s <= gamma_t: {z_t == x0} is contained in {z_s == x0}, and where both
    # differ from x0 they are the same token (holder of the max of the other noises)
    keep_t, keep_s = z_t == x0, z_s == x0
    assert bool((keep_s | ~keep_t).all())
    both_off = ~keep_t & ~keep_s
    assert bool((z_t[both_off] == z_s[both_off]).all())


def test_duo_sample_zt_single(benchmark):
    benchmark.group = f"sample_zt N={B * L} K={K}"
    x0, g, _ = _inputs(B, L, K, False)
    z = benchmark(duo_fast.sample_zt, x0, g, K, seed=SEED)
    assert z.shape == x0.shape and z.dtype == torch.int64
    assert bool(((z >= 0) & (z < K)).all())
    assert torch.equal(z, duo_fast.sample_zt(x0, g, K, seed=SEED))  # a pure function of the seed
    # P(z == x0) = pt(gamma) ~ alpha in [0.28, 0.67] in the training range: loose check
    alpha, _ = duo_fast.gamma_to_alpha(g, K)
    frac = (z == x0).double().mean(1)
    assert bool(((frac - alpha).abs() < 0.1).all())


def test_duo_sample_zt_coupled(benchmark):
    benchmark.group = f"sample_zt N={B * L} K={K}"
    x0, gt, gs = _inputs(B, L, K, True)
    z_t, z_s = benchmark(duo_fast.sample_zt, x0, gt, K, gamma_s=gs, seed=SEED)
    assert z_t.shape == z_s.shape == x0.shape
    _check_coupling(x0, z_t, z_s)


@pytest.mark.parametrize("coupled", [False, True], ids=["single", "coupled"])
def test_reference_sample_zt_dense(benchmark, coupled):
    """Dense reference at a small size (N=256, K=1024)."""
    benchmark.group = f"sample_zt dense reference N={B_REF * L_REF} K={K_REF}"
    x0, gt, gs = _inputs(B_REF, L_REF, K_REF, coupled)
    gen = torch.Generator().manual_seed(5)
    out = benchmark.pedantic(R.sample_zt_dense, args=(x0, gt, K_REF),
                             kwargs={"gamma_s": gs, "generator": gen}, rounds=5, iterations=1, warmup_rounds=1)
    if coupled:
        _check_coupling(x0, *out)
    else:
        assert out.shape == x0.shape


@pytest.mark.parametrize("coupled", [False, True], ids=["single", "coupled"])
def test_duo_sample_zt_small(benchmark, coupled):
    """duo_fast at the dense reference's small size, for a same-group comparison."""
    benchmark.group = f"sample_zt dense reference N={B_REF * L_REF} K={K_REF}"
    x0, gt, gs = _inputs(B_REF, L_REF, K_REF, coupled)
    out = benchmark(duo_fast.sample_zt, x0, gt, K_REF, gamma_s=gs, seed=SEED)
    if coupled:
        _check_coupling(x0, *out)
