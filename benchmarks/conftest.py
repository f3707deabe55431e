"""pytest-benchmark setup for `pytest benchmarks/ --benchmark-only`.

Threads: torch.set_num_threads($DUO_BENCH_THREADS, default 2), like the report.
These files are not collected by `pytest` / `pytest tests/` (pyproject's
testpaths is tests/), only when benchmarks/ is named on the command line.
"""

from __future__ import annotations

import os

import torch


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("DUO_BENCH_THREADS", "2")))


def pytest_report_header(config):
    return f"duo_fast benchmarks: torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
