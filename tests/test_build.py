"""The build itself: every .cu compiles with the real nvcc for each target
architecture without register spills, and a CUDA build registers CPU, CUDA and
Meta kernels for every op of the schema block."""

from __future__ import annotations

import os
import re

import pytest
import torch

import duo_fast
from conftest import CUDA_SOURCES, ROOT, TEST_CUDA_SOURCES

ARCHS = [a.strip() for a in os.environ.get("DUO_FAST_CUDA_ARCHS", "8.0;9.0").replace(" ", ";").split(";") if a.strip()]
OPS = re.findall(r'm\.def\("(\w+)\(', (ROOT / "csrc" / "registration.cpp").read_text())


def test_build_info_shape():
    info = duo_fast.build_info()
    assert info["cpu"] is True and isinstance(info["cuda"], bool)
    assert info["version"] == duo_fast.__version__
    if os.environ.get("DUO_FAST_EXPECT_CUDA") == "1":  # set by .ci/run
        assert info["cuda"], "CI builds the CUDA part"
        assert info["cuda_archs"].split() == [a.replace("+PTX", "") for a in ARCHS]


def test_every_op_has_cpu_meta_and_cuda_kernels():
    assert OPS, "no schemas found in csrc/registration.cpp"
    for name in OPS:
        dump = torch._C._dispatch_dump(f"duo_fast::{name}")
        assert "\nCPU: registered" in dump, dump
        assert "\nMeta: registered" in dump, dump
        if duo_fast.build_info()["cuda"]:
            assert "\nCUDA: registered" in dump, dump


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [*CUDA_SOURCES, *TEST_CUDA_SOURCES], ids=lambda p: p.name)
def test_nvcc_compiles_without_spills(harness, source, arch):
    if harness.nvcc_path() is None:
        pytest.skip("no nvcc: the CUDA part is not built on this machine either")
    sm = "sm_" + arch.replace(".", "").replace("+PTX", "")
    proc = harness.nvcc_compile_check(
        source, arch=sm, include_dirs=[ROOT / "csrc" / "include", ROOT / "csrc" / "cuda"], ptxas_verbose=True
    )
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert spills, proc.stderr
    assert all(s == "0" and l == "0" for s, l in spills), proc.stderr
