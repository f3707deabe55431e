"""pytest-benchmark entries for duo_fast.linear_usdm_loss fwd+bwd (small).

The memory-vs-N comparison and the ratios are in
`python -m benchmarks.report --ops linear_usdm_loss`.
"""

from __future__ import annotations

import pytest

from duo_fast.bench.cases_linear_usdm_loss import _drop_grads, _duo, _ref, _setup
from duo_fast.bench.cases_usdm_loss import with_model


@pytest.mark.parametrize("side", ["duo", "ref"])
def test_linear_usdm_loss_fwd_bwd(benchmark, side):
    benchmark.group = "linear_usdm_loss fwd+bwd N=256 K=50257 d=768"
    st = with_model(_setup(256))("cpu")
    fn = _duo if side == "duo" else _ref

    def run():
        _drop_grads(st)
        fn(st)

    benchmark.pedantic(run, rounds=3, iterations=1)
    assert st["W"].grad is not None and st["hidden"].grad is not None
