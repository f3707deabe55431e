"""The benchmark machinery now lives in the package (duo_fast/bench/common.py), so
that `duo-fast bench` runs from an installed wheel; re-exported here for scripts
that import benchmarks.common."""

from duo_fast.bench.common import *  # noqa: F401,F403
from duo_fast.bench.common import (  # noqa: F401
    Case,
    Impl,
    Target,
    discover_cases,
    gbps,
    median_ms,
    peak_cuda_growth_mib,
    peak_rss_growth_mib,
    run_case,
    time_call_ms,
)
