"""``duo-fast bench``: duo_fast against the Duo code's own operations, each side in a
fresh process, with a markdown table, a CSV (with the machine) and plots.

    duo-fast bench [--tiny | --quick | --full] [--ops a,b] [--threads N] [--device cuda] [--out DIR]

All benchmark code lives here, so an installed wheel runs it: the command
(:mod:`duo_fast.bench.cli`), the machinery (:mod:`duo_fast.bench.common`), the one
report writer (:mod:`duo_fast.bench.report`: tables, CSV, JSON, plots, the GPU check's
report), the reference side (:mod:`duo_fast.bench.duo_code`: the Duo codebase's
functions, or an eager copy of them where it is absent), one ``cases_<op>.py`` module
per op, and the GPU check's Python (``gpu_bench.py``, ``gpu_sanitize.py``,
``cost_model.py``; benchmarks/gpu/check.sh runs them). ``benchmarks/results/`` holds
the measured runs that docs/benchmarks.md cites.
"""

from .cli import main

__all__ = ["main"]
