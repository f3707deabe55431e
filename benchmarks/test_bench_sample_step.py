"""pytest-benchmark entries for duo_fast.sample_step (small and fast).

    pytest benchmarks/ --benchmark-only            # time them
    pytest benchmarks/ --benchmark-disable         # run each once, as a smoke test

The ratios against the reference, peak memory and the BASELINES targets are in
`python -m benchmarks.report --ops sample_step` (fresh process per measurement).
The reference entry is the Duo code's float64 _ancestral_update (duo_code.ancestral_step).
"""

from __future__ import annotations

import pytest
import torch

from duo_fast.bench.cases_sample_step import _duo_fn, _ref_fn, _ref_setup

SIZES = [(128, 50257), (512, 1024)]  # (N, K)


@pytest.mark.parametrize("N,K", SIZES, ids=[f"N{n}-K{k}" for n, k in SIZES])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("side", ["duo", "ref"])
def test_sample_step(benchmark, side, top_p, N, K):
    benchmark.group = f"sample_step N={N} K={K} top_p={top_p}"
    st = _ref_setup(N, K, 0.6, top_p, True)("cpu")
    if side == "duo":  # duo_fast takes the float64 levels
        st["alpha_t"], st["alpha_s"] = st["alpha_t"].double(), st["alpha_s"].double()
    fn = _duo_fn if side == "duo" else _ref_fn(False)
    z_s = benchmark(fn, st)
    assert z_s.shape == st["z"].shape and z_s.dtype == torch.int64
    assert int(z_s.min()) >= 0 and int(z_s.max()) < K
