"""pytest-benchmark entries for duo_fast.sample_step (small and fast).

    pytest benchmarks/ --benchmark-only            # time them
    pytest benchmarks/ --benchmark-disable         # run each once, as a smoke test

The ratios against the reference, peak memory and the BASELINES targets are in
`python -m benchmarks.report --ops sample_step` (fresh process per measurement).
The reference entry is the float64 Duo step of cases_sample_step.duo_step.
"""

from __future__ import annotations

import pytest
import torch

from .cases_sample_step import _duo_fn, _ref_fn, _setup

SIZES = [(128, 50257), (512, 1024)]  # (N, K)


@pytest.mark.parametrize("N,K", SIZES, ids=[f"N{n}-K{k}" for n, k in SIZES])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("side", ["duo", "ref"])
def test_sample_step(benchmark, side, top_p, N, K):
    benchmark.group = f"sample_step N={N} K={K} top_p={top_p}"
    st = _setup(N, K, 0.6, top_p)("cpu")
    fn = _duo_fn if side == "duo" else _ref_fn(torch.float64)
    z_s = benchmark(fn, st)
    assert z_s.shape == st["z"].shape and z_s.dtype == torch.int64
    assert int(z_s.min()) >= 0 and int(z_s.max()) < K
