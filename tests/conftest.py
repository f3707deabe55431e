"""Shared fixtures: the emulated-CUDA library (every csrc/cuda/*.cu compiled by g++
against tests/emulation/cuda_emulation.h together with tests/native/exports.cpp)."""

from __future__ import annotations

import ctypes
import os
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# Test-only kernels (header primitives such as duo_fast/reduce.h).
TEST_CUDA_SOURCES = sorted((ROOT / "tests" / "native").glob("*.cu"))
EXPORTS = ROOT / "tests" / "native" / "exports.cpp"
EMU_INCLUDES = (ROOT / "csrc" / "cuda",)


# Real-GPU twins. A test that takes the `device` fixture runs on "cpu" and on "cuda";
# the cuda case carries the `cuda` marker (pyproject.toml) and skips where no device is
# present (every CUDA kernel also runs in tests/emulation on the CPU). The GPU check
# (benchmarks/gpu/check.sh) selects them with `pytest tests -m cuda`; GPU-only tests
# carry `@cuda_only` (the same marker and skip).
NO_CUDA = "no CUDA device (the cpu case runs here, and tests/emulation runs the CUDA kernels' source on the CPU)"


def cuda_only(fn):
    """Decorator of a GPU-only test: the `cuda` marker, skipped without a device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)(fn))


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                                  pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])]


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu", then "cuda" (marked `cuda`, skipped without a device)."""
    return request.param


def load_harness():
    name = "duo_fast_tests_emulation_harness"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "emulation" / "harness.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def ptr(t: torch.Tensor):
    """ctypes pointer to a contiguous CPU tensor's data."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return ctypes.c_void_p(t.data_ptr())


@pytest.fixture(scope="session")
def harness():
    return load_harness()


@pytest.fixture(scope="session")
def emulated(harness):
    """ctypes handle on the emulated kernels + header math (fiber mode, seed 0)."""
    lib = harness.load_emulated([*CUDA_SOURCES, *TEST_CUDA_SOURCES, EXPORTS], "duo_fast_emulated", include_dirs=EMU_INCLUDES, opt="-O2")
    harness.configure_emulation(lib, mode="fiber", seed=0)
    return lib


# Hypothesis profiles of the property-based tests (tests/test_fuzz.py), chosen by
# DUO_FAST_FUZZ_PROFILE: "ci" (the default: 200 examples per test, derandomized, so
# every run tries the same examples), "long" (10x: 2000 random examples per test and
# the example database, for nightly runs), "dev" (20, for editing the tests).
FUZZ_PROFILES = {"ci": 200, "long": 2000, "dev": 20}
FUZZ_PROFILE = os.environ.get("DUO_FAST_FUZZ_PROFILE", "ci")
if FUZZ_PROFILE not in FUZZ_PROFILES:
    raise ValueError(f"DUO_FAST_FUZZ_PROFILE must be one of {sorted(FUZZ_PROFILES)}, got {FUZZ_PROFILE!r}")

try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # only test_fuzz.py needs it (requirements-test.txt); it fails to import without
    pass
else:
    # No "explain" phase (it reruns a failure under coverage tracing) and one bug reported
    # per test: failing examples with K = 2^20 hold ~100 MiB each, and keeping many of them
    # grew a failing long run to gigabytes.
    _common = dict(deadline=None, print_blob=True, report_multiple_bugs=False,
                   phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=FUZZ_PROFILES["ci"], derandomize=True, database=None, **_common)
    settings.register_profile("long", max_examples=FUZZ_PROFILES["long"], **_common)
    settings.register_profile("dev", max_examples=FUZZ_PROFILES["dev"], derandomize=True, database=None, **_common)
    settings.load_profile(FUZZ_PROFILE)


def fuzz_examples(fraction: float = 1.0) -> int:
    """Examples per test for a test that runs `fraction` of the profile's volume."""
    return max(1, int(FUZZ_PROFILES[FUZZ_PROFILE] * fraction))


def pytest_collection_modifyitems(config, items):
    """Every real-GPU test carries the `cuda` marker: the `device="cuda"` cases (marked
    in DEVICES) and the GPU-only tests, recognised by their skip reason ("no CUDA
    device..."), so that `pytest -m cuda` selects all of them and nothing else."""
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            continue
        for m in item.iter_markers("skipif"):
            if str(m.kwargs.get("reason", "")).startswith("no CUDA device"):
                item.add_marker(pytest.mark.cuda)
                break
