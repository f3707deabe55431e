"""pytest-benchmark entries for duo_fast.usdm_loss fwd+bwd (small and fast).

    pytest benchmarks/ --benchmark-only            # time them
    pytest benchmarks/ --benchmark-disable         # run each once, as a smoke test

The ratios against the reference, peak memory and the BASELINES targets are in
`python -m benchmarks.report --ops usdm_loss` (fresh process per measurement).
The reference entry is the Duo code's loss (log_softmax + DUO_BASE.nll_per_token; its eager
copy without the Duo code), as duo_fast/bench/cases_usdm_loss.py.
"""

from __future__ import annotations

import pytest
import torch

import duo_fast
from duo_fast.bench import duo_code
from duo_fast.bench.cases_usdm_loss import _setup, with_model

SIZES = [(128, 50257), (512, 1024)]  # (N, K)


def _duo_code_loss(st):
    return duo_code.loss(st["model"], st["logits"], st["z"], st["x0"], st["alpha"], st["dalpha"])


def _duo(st):
    return duo_fast.usdm_loss(st["logits"], st["z"], st["x0"], st["alpha"], st["dalpha"])


def _fwd_bwd(loss_fn, st):
    st["logits"].grad = None
    loss = loss_fn(st)
    loss.sum().backward()
    return loss


@pytest.mark.parametrize("N,K", SIZES, ids=[f"N{n}-K{k}" for n, k in SIZES])
@pytest.mark.parametrize("side", ["duo", "ref"])
def test_usdm_loss_fwd_bwd(benchmark, side, N, K):
    benchmark.group = f"usdm_loss fwd+bwd N={N} K={K} fp32"
    st = with_model(_setup(N, K))("cpu")
    fn = _duo if side == "duo" else _duo_code_loss
    loss = benchmark(_fwd_bwd, fn, st)
    assert loss.shape == st["z"].shape and loss.dtype == torch.float32
    assert bool(torch.isfinite(loss).all()) and st["logits"].grad is not None
    # both sides agree (the Duo code's float32 loss vs duo_fast)
    grad = st["logits"].grad.clone()
    other = _fwd_bwd(_duo_code_loss if side == "duo" else _duo, st)
    torch.testing.assert_close(loss.detach(), other.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, st["logits"].grad, rtol=1e-3, atol=1e-6)
