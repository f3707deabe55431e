"""pytest-benchmark entries for the curriculum inputs (small and fast).

    pytest benchmarks/ --benchmark-only            # time them
    pytest benchmarks/ --benchmark-disable         # run each once, as a smoke test

Ratios against the reference, peak memory and the BASELINES targets:
`python -m benchmarks.report --ops curriculum_embed,curriculum_topk,curriculum_topk_embed`.
References: the Duo code's simple curriculum and utils.sample_tempered_softmax_topk +
EmbeddingLayer.forward (duo_fast/bench/cases_curriculum.py; the eager copy without the Duo code).
"""

from __future__ import annotations

import pytest
import torch

from duo_fast.bench.cases_curriculum import (
    _drop_grad,
    _embed_duo,
    _embed_ref,
    _setup,
    _topk_duo,
    _topk_embed_duo,
    _topk_embed_ref,
    _topk_ref,
)

N, K = 128, 8192


@pytest.mark.parametrize("side", ["duo", "ref"])
def test_curriculum_embed_fwd_bwd(benchmark, side):
    benchmark.group = f"curriculum_embed fwd+bwd N={N} K={K} d=768"
    st = _setup(N, K, 768, True, ref=side == "ref")("cpu")
    fn = _embed_duo if side == "duo" else _embed_ref

    def run():
        _drop_grad(st)
        return fn(st)

    z = benchmark(run)
    assert z.shape == st["x0"].shape and st["E"].grad is not None and bool(torch.isfinite(st["E"].grad).all())


@pytest.mark.parametrize("k", [32, 128])
@pytest.mark.parametrize("side", ["duo", "ref"])
def test_curriculum_topk(benchmark, side, k):
    benchmark.group = f"curriculum_topk k={k} N={N} K={K}"
    st = _setup(N, K, 768, False, ref=side == "ref")("cpu")
    out = benchmark(_topk_duo(k) if side == "duo" else _topk_ref(k), st)
    ids = out[0] if side == "duo" else out[1]
    assert ids.shape == (*st["x0"].shape, k) and int(ids.max()) < K


@pytest.mark.parametrize("side", ["duo", "ref"])
def test_curriculum_topk_embed_fwd_bwd(benchmark, side):
    benchmark.group = f"curriculum_topk_embed fwd+bwd k=128 N={N} K={K} d=768"
    st = _setup(N, K, 768, True, ref=side == "ref")("cpu")
    fn = _topk_embed_duo(128) if side == "duo" else _topk_embed_ref(128)

    def run():
        _drop_grad(st)
        return fn(st)

    z = benchmark(run)
    assert z.shape == st["x0"].shape and st["E"].grad is not None
