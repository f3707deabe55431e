"""Shared fixtures: the emulated-CUDA library (every csrc/cuda/*.cu compiled by g++
against tests/emulation/cuda_emulation.h together with tests/native/exports.cpp)."""

from __future__ import annotations

import ctypes
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
