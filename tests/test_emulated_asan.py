"""Every emulated CUDA kernel once under AddressSanitizer + UBSan: the program
mode of tests/native/exports.cpp (-DDUO_EMU_MAIN) runs each kernel on odd sizes
and compares it with the host evaluation of the same header math."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("mode", ["fiber", "thread"])
def test_emulated_kernels_under_asan_ubsan(harness, mode):
    from conftest import CUDA_SOURCES, EMU_INCLUDES, EXPORTS

    exe = harness.compile_emulated(
        [*CUDA_SOURCES, EXPORTS], "duo_fast_emulated_main", mode_sanitizer="asan",
        extra_flags=["-DDUO_EMU_MAIN"], include_dirs=EMU_INCLUDES,
    )
    proc = harness.run_emulated_program(exe, env={"CUDA_EMU_MODE": mode, "CUDA_EMU_SEED": "3"}, check=True)
    assert "emulated kernels: ok" in proc.stdout
