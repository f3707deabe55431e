"""The DUO_FAST_* environment variables that duo_fast reads (issue 24): a malformed
value raises at import, or at its first use when set later, with a ValueError that
names the variable and the accepted values (never a C++ stack trace); the
accepted values keep working."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import duo_fast
from duo_fast import _env

BAD = [
    ("DUO_FAST_GRAD_CACHE_MB", "lots", r"a whole number of MiB in \[0, 1099511627776\)"),
    ("DUO_FAST_GRAD_CACHE_MB", "-1", r"a whole number of MiB"),
    ("DUO_FAST_GRAD_CACHE_MB", "", r"a whole number of MiB"),
    ("DUO_FAST_TOPK_BAG", "sort", r"sorted, token or auto \(or unset: auto\)"),
    ("DUO_FAST_CUDA_SYNC_CHECKS", "yes", r"0 or 1 \(or unset: 0\)"),
    ("DUO_FAST_CUDA_SYNC_CHECKS", "off", r"0 or 1"),  # was read as on
    ("DUO_FAST_EMBED_PORTABLE", "true", r"0 or 1 \(or unset: 0\)"),  # was read as off
    ("DUO_FAST_BENCH_REFERENCE", "fast", r"auto, duo or eager"),
]


@pytest.mark.parametrize("name,value,accepted", BAD)
def test_malformed_values_name_the_variable_and_the_accepted_values(monkeypatch, name, value, accepted):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"duo_fast: the environment variable {name} must be {accepted}.*, got '{value}'"):
        _env.check()


@pytest.mark.parametrize("name,value", [("DUO_FAST_GRAD_CACHE_MB", "0"), ("DUO_FAST_GRAD_CACHE_MB", "4096"),
                                        ("DUO_FAST_TOPK_BAG", "auto"), ("DUO_FAST_TOPK_BAG", ""),
                                        ("DUO_FAST_CUDA_SYNC_CHECKS", "1"), ("DUO_FAST_EMBED_PORTABLE", "0"),
                                        ("DUO_FAST_BENCH_REFERENCE", "Eager")])
def test_accepted_values_pass(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    _env.check()


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """A fresh interpreter with no DUO_FAST_* variable but ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DUO_FAST_") or k == "DUO_FAST_FUZZ_PROFILE"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**base, **env})


def test_a_malformed_value_fails_the_import():
    r = _run("import duo_fast", DUO_FAST_TOPK_BAG="sort")
    assert r.returncode != 0
    assert ("ValueError: duo_fast: the environment variable DUO_FAST_TOPK_BAG must be sorted, token or auto (or unset: "
            "auto), got 'sort'") in r.stderr


def test_values_set_after_import_raise_at_first_use_without_a_cpp_trace(monkeypatch):
    """The C++ readers (env_choice, grad_cache.cpp) apply the same rules."""
    E = torch.randn(40, 8, requires_grad=True)
    x0 = torch.tensor([[1, 2, 3]])
    monkeypatch.setenv("DUO_FAST_TOPK_BAG", "sort")
    with pytest.raises(ValueError, match=r"DUO_FAST_TOPK_BAG must be one of sorted, token, auto \(or unset\), got "
                                         "'sort'") as e:
        duo_fast.curriculum_topk_embed(x0, 0.0, 1.0, 3, E, seed=1)
    assert "Exception raised from" not in str(e.value)
    monkeypatch.setenv("DUO_FAST_TOPK_BAG", "token")
    duo_fast.curriculum_topk_embed(x0, 0.0, 1.0, 3, E, seed=1)
    monkeypatch.setenv("DUO_FAST_GRAD_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="DUO_FAST_GRAD_CACHE_MB must be a whole number of MiB") as e:
        duo_fast.cache_info()  # a pybind function: its C++ error carried the C++ stack trace
    assert "Exception raised from" not in str(e.value)
    # read once, at the first value check of the process
    r = _run("import os, torch, duo_fast; os.environ['DUO_FAST_CUDA_SYNC_CHECKS'] = 'yes'; "
             "z = torch.zeros(1, 2, dtype=torch.long); duo_fast.sample_zt(z, torch.zeros(1), 5, seed=1)")
    assert r.returncode != 0 and "Exception raised from" not in r.stderr
    assert "DUO_FAST_CUDA_SYNC_CHECKS must be one of 0, 1 (or unset), got 'yes'" in r.stderr
