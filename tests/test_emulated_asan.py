"""Every emulated CUDA kernel under the sanitizers: the program mode of
tests/native/exports.cpp (-DDUO_EMU_MAIN) runs each kernel on odd sizes (masked
-inf rows and all -inf rows included) and compares it with the host evaluation
of the same header math: under AddressSanitizer + UBSan in both modes, and under
ThreadSanitizer in thread mode (one OS thread per CUDA thread, synchronized
only as CUDA synchronizes them) on a few small rows (--small, ~10 s), so a
missing __syncthreads / __syncwarp in the project's own kernels is a reported
data race, not only in the emulation's tests."""

from __future__ import annotations

import pytest


def _build(harness, sanitizer):
    from conftest import CUDA_SOURCES, EMU_INCLUDES, EXPORTS

    return harness.compile_emulated(
        [*CUDA_SOURCES, EXPORTS], "duo_fast_emulated_main", mode_sanitizer=sanitizer,
        extra_flags=["-DDUO_EMU_MAIN"], include_dirs=EMU_INCLUDES,
    )


@pytest.mark.parametrize("mode", ["fiber", "thread"])
def test_emulated_kernels_under_asan_ubsan(harness, mode):
    exe = _build(harness, "asan")
    proc = harness.run_emulated_program(exe, env={"CUDA_EMU_MODE": mode, "CUDA_EMU_SEED": "3"}, check=True)
    assert "emulated kernels: ok" in proc.stdout


def test_emulated_kernels_under_tsan(harness):
    exe = _build(harness, "tsan")
    proc = harness.run_emulated_program(exe, ["--small"], env={"CUDA_EMU_MODE": "thread", "CUDA_EMU_SEED": "3"},
                                        check=True, timeout=600)
    assert "emulated kernels: ok" in proc.stdout
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr
