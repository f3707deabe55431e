"""pytest-benchmark entries for duo_fast.distill_kl fwd+bwd (small and fast).

    pytest benchmarks/ --benchmark-only            # time them
    pytest benchmarks/ --benchmark-disable         # run each once, as a smoke test

The ratios against the Duo code's kl-bwd (duo_code.kl_bwd) and peak memory are in
`python -m benchmarks.report --ops distill_kl` (fresh process per measurement).
"""

from __future__ import annotations

import pytest
import torch

import duo_fast
from duo_fast.bench import duo_code
from duo_fast.bench.cases_distill_kl import _ref_setup

SIZES = [(128, 50257), (512, 1024)]  # (N, K)


def _duo(st):
    return duo_fast.distill_kl(st["student"], st["teacher"], "bwd")


def _ref(st):
    return duo_code.kl_bwd(st["model"], st["student"], st["teacher"])


def _fwd_bwd(fn, st):
    st["student"].grad = None
    kl = fn(st)
    kl.sum().backward()
    return kl


@pytest.mark.parametrize("N,K", SIZES, ids=[f"N{n}-K{k}" for n, k in SIZES])
@pytest.mark.parametrize("side", ["duo", "ref"])
def test_distill_kl_fwd_bwd(benchmark, side, N, K):
    benchmark.group = f"distill_kl bwd fwd+bwd N={N} K={K} fp32"
    st = _ref_setup(N, K)("cpu")
    kl = benchmark(_fwd_bwd, _duo if side == "duo" else _ref, st)
    assert kl.shape == st["student"].shape[:-1] and kl.dtype == torch.float32
    assert bool((kl >= -1e-5).all()) and st["student"].grad is not None
    grad = st["student"].grad.clone()
    other = _fwd_bwd(_ref if side == "duo" else _duo, st)
    torch.testing.assert_close(kl.detach(), other.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, st["student"].grad, rtol=1e-3, atol=1e-7)
