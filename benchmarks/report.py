"""`python -m benchmarks.report`: the benchmark report of a source checkout, a thin
wrapper around `duo-fast bench` (duo_fast/bench/report.py), which it runs with the
same options; by default it only prints the table (`--out DIR` also writes the
CSV, JSON and plots). See benchmarks/README.md."""

import sys

from duo_fast.bench.report import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks.report", default_out=None))
