"""The GPU check (check.sh) and its Python parts: bench, sanitize_calls, report, cost_model."""
