"""``duo-fast bench``: duo_fast against the Duo code's own operations, each side in a
fresh process, with a markdown table, a CSV (with the machine) and plots.

    duo-fast bench [--tiny | --quick | --full] [--ops a,b] [--threads N] [--device cuda] [--out DIR]

The machinery (:mod:`duo_fast.bench.common`), the report (:mod:`duo_fast.bench.report`),
the reference side (:mod:`duo_fast.bench.duo_code`: the Duo codebase's functions, or
an eager copy of them where it is absent) and one ``cases_<op>.py`` module per op
live in the package, so an installed wheel runs them; a source checkout also has
``python -m benchmarks.report`` and the pytest-benchmark entries in ``benchmarks/``.
"""

from .report import main

__all__ = ["main"]
