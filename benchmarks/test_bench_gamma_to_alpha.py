"""pytest-benchmark entries for duo_fast.gamma_to_alpha (small and fast).

    pytest benchmarks/ --benchmark-only            # time them
    pytest benchmarks/ --benchmark-disable         # run each once, as a smoke test

The ratios against the reference and the BASELINES targets are in
`python -m benchmarks.report` (fresh process per measurement, peak memory);
these entries are for pytest-benchmark's history/compare tooling.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import duo_fast
from duo_fast import reference as R

K = 50257
N = 512
N_REF = 8  # reference quadrature is ~1.2 ms per value: time a few


def _gammas(n, dtype):
    g = torch.Generator().manual_seed(1234)
    lo, hi = R.DUO_GAMMA_MIN, R.DUO_GAMMA_MAX
    return (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_duo_gamma_to_alpha_512(benchmark, dtype):
    benchmark.group = "gamma_to_alpha 512 values"
    g = _gammas(N, dtype)
    duo_fast.gamma_to_alpha(g, K)  # build the per-K table outside the timing
    alpha, dalpha = benchmark(duo_fast.gamma_to_alpha, g, K)
    assert alpha.shape == g.shape and alpha.dtype == dtype
    assert bool(((alpha > 0) & (alpha < 1)).all()) and bool((dalpha < 0).all())


def test_duo_gamma_to_alpha_new_k(benchmark):
    """First call for a vocabulary size not seen before (per-K table build)."""
    benchmark.group = "gamma_to_alpha first call for a new K"
    g = _gammas(N, torch.float64)
    unseen = itertools.count(K + 20_001)  # Ks no other entry of this session uses

    def setup():
        return (g, next(unseen)), {}

    alpha, _ = benchmark.pedantic(duo_fast.gamma_to_alpha, setup=setup, rounds=3, iterations=1, warmup_rounds=1)
    assert alpha.shape == g.shape


def test_reference_gamma_to_alpha(benchmark):
    """Reference (scipy quadrature) on N_REF values; its per-value cache is cleared
    before each round. Multiply by N / N_REF for 512 values."""
    benchmark.group = f"gamma_to_alpha reference, {N_REF} values"
    g = _gammas(N_REF, torch.float64)

    def setup():
        R._pt_scalar.cache_clear()
        return (g, K), {}

    alpha, dalpha = benchmark.pedantic(R.gamma_to_alpha, setup=setup, rounds=3, iterations=1, warmup_rounds=1)
    duo_alpha, duo_dalpha = duo_fast.gamma_to_alpha(g, K)
    torch.testing.assert_close(duo_alpha, alpha, rtol=0, atol=1e-9)
    torch.testing.assert_close(duo_dalpha, dalpha, rtol=1e-6, atol=0)
