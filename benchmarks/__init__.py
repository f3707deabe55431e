"""duo_fast benchmarks: `python -m benchmarks.report` (markdown table against the
reference, each measurement in a fresh process) and pytest-benchmark entries
(`pytest benchmarks/ --benchmark-only`). See benchmarks/README.md."""
