"""Tests of the CUDA-on-CPU emulation (tests/emulation/cuda_emulation.h).

Builds tests/emulation/test_emulation.cu with g++ against the emulation and runs
it: fiber mode with seeds 0-4, thread mode, ThreadSanitizer (thread mode),
AddressSanitizer + UBSan (fiber and thread mode), the errors the emulation
must abort on, planted bugs that the sanitizers must catch, the ctypes path,
and the nvcc compile of the same file for sm_80 and sm_90.

All builds are cached in tests/emulation/_build/ and started together (two at
a time) when the module's first test needs one.
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

EMU_DIR = Path(__file__).resolve().parent / "emulation"
TEST_CU = EMU_DIR / "test_emulation.cu"


def _load_harness():
    name = "duo_fast_tests_emulation_harness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EMU_DIR / "harness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


harness = _load_harness()

HAVE_GXX = shutil.which("g++") is not None
pytestmark = pytest.mark.skipif(not HAVE_GXX, reason="g++ is needed to build the emulated kernels")

NVCC = harness.nvcc_path()


# --------------------------------------------------------------------------
# Builds (all submitted at once; each test waits for the one it needs)
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builds():
    pool = ThreadPoolExecutor(max_workers=2)
    futs: dict[str, Future] = {
        "plain": pool.submit(harness.compile_emulated, [TEST_CU], "test_emulation", executable=True),
        "asan": pool.submit(harness.compile_emulated, [TEST_CU], "test_emulation", mode_sanitizer="asan"),
        "tsan": pool.submit(harness.compile_emulated, [TEST_CU], "test_emulation", mode_sanitizer="tsan"),
        "lib": pool.submit(
            harness.compile_emulated, [TEST_CU], "test_emulation_lib", extra_flags=["-DEMU_TEST_LIBRARY"]
        ),
    }
    if NVCC is not None:
        for arch in ("sm_80", "sm_90"):
            futs[f"nvcc_{arch}"] = pool.submit(harness.nvcc_compile_check, TEST_CU, arch, ptxas_verbose=True)
    yield futs
    pool.shutdown(wait=True, cancel_futures=True)


def _run(path, args=(), env=None, timeout=120):
    t0 = time.perf_counter()
    proc = harness.run_emulated_program(path, args, env or {}, timeout=timeout)
    proc.elapsed = time.perf_counter() - t0
    return proc


def _assert_all_passed(proc):
    out = proc.stdout + "\n--- stderr ---\n" + proc.stderr
    assert proc.returncode == 0, out
    assert "ALL PASSED" in proc.stdout, out
    assert "[FAIL]" not in proc.stdout, out


# --------------------------------------------------------------------------
# The test program in each mode
# --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_fiber_mode(builds, seed):
    proc = _run(builds["plain"].result(), env={"CUDA_EMU_MODE": "fiber", "CUDA_EMU_SEED": str(seed)})
    _assert_all_passed(proc)
    # the emulation-only checks ran, including the planted ordering bugs
    assert "[PASS] planted_bugs_caught_by_seeds" in proc.stdout
    assert "[PASS] dynamic_shared_memory" in proc.stdout
    assert f"mode fiber, seed {seed}," in proc.stdout


def test_thread_mode(builds):
    proc = _run(builds["plain"].result(), env={"CUDA_EMU_MODE": "thread"})
    _assert_all_passed(proc)
    assert "mode thread, seed 0," in proc.stdout


def test_tsan_thread_mode(builds):
    proc = _run(builds["tsan"].result(), ["--quick"], env={"CUDA_EMU_MODE": "thread"}, timeout=300)
    _assert_all_passed(proc)
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "case, where",
    [
        ("race_missing_sync", "in k_planted_race"),  # neighbour read without __syncthreads
        ("race_trailing_sync", "in block_sum_bcast"),  # scratch reused without the trailing barrier
    ],
)
def test_tsan_catches_missing_syncthreads(builds, case, where):
    proc = _run(builds["tsan"].result(), [f"--planted={case}"], env={"CUDA_EMU_MODE": "thread"})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert re.search(r"SUMMARY: ThreadSanitizer: data race .*" + re.escape(where), proc.stderr), proc.stderr


@pytest.mark.parametrize("mode", ["fiber", "thread"])
def test_asan_ubsan(builds, mode):
    args = [] if mode == "fiber" else ["--quick"]
    proc = _run(builds["asan"].result(), args, env={"CUDA_EMU_MODE": mode, "CUDA_EMU_SEED": "3"}, timeout=300)
    _assert_all_passed(proc)
    assert "AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("mode", ["fiber", "thread"])
@pytest.mark.parametrize(
    "case, pattern",
    [
        ("oob_smem", r"AddressSanitizer: heap-buffer-overflow.*\n(.*\n)*.*k_planted_oob_smem"),
        ("oob_global", r"AddressSanitizer: heap-buffer-overflow.*\n(.*\n)*.*k_planted_oob_global"),
        # UBSan's object-size check or ASan's stack redzones (on the fiber's own stack)
        ("oob_stack", r"(runtime error: load of address .* insufficient space|stack-buffer-overflow)"),
    ],
)
def test_asan_catches_planted_bugs(builds, mode, case, pattern):
    proc = _run(builds["asan"].result(), [f"--planted={case}"], env={"CUDA_EMU_MODE": mode})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr


# --------------------------------------------------------------------------
# Errors the emulation must report (and abort on) instead of hanging
# --------------------------------------------------------------------------
FATAL_CASES = {
    "deadlock": r"deadlock: all 32 live threads of block \(0,0,0\) are waiting(.*\n)*.*warp 0: lanes 0x0000ffff in __shfl_xor_sync",
    "bad_mask": r"__shfl_xor_sync at .*test_emulation\.cu:\d+: mask 0x0000ffff is not the full mask",
    "exited_lane": r"(exited while lanes .* wait for it in __shfl_xor_sync|lanes 0x00000008 of warp 0 have exited)",
    "partial_warp": r"__shfl_down_sync at .*: warp 1 is partial \(blockDim \(48,1,1\)",
    "divergent_sync": r"divergent barrier: this thread calls __syncthreads at .*test_emulation\.cu:\d+ while",
    "divergent_warp_op": r"divergent warp: this lane calls (__shfl_xor_sync|__ballot_sync)",
    "trap": r"__trap\(\) called(.*\n)*.*k_fatal_trap.*threadIdx \(7,0,0\)",
    "outside_kernel": r"used outside a kernel",
}


@pytest.mark.parametrize("mode", ["fiber", "thread"])
@pytest.mark.parametrize("case", sorted(FATAL_CASES))
def test_fatal_errors_abort_with_message(builds, case, mode):
    proc = _run(builds["plain"].result(), [f"--fatal={case}"], env={"CUDA_EMU_MODE": mode}, timeout=30)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "did NOT abort" not in proc.stdout
    assert "cuda_emu: error:" in proc.stderr, proc.stderr
    assert re.search(FATAL_CASES[case], proc.stderr), proc.stderr
    if case != "outside_kernel":  # the message names the kernel, block and thread
        assert re.search(r"in k_fatal_\w+\(float\*\), gridDim", proc.stderr), proc.stderr


def test_bad_mode_env_is_reported(builds):
    proc = _run(builds["plain"].result(), ["--only=votes"], env={"CUDA_EMU_MODE": "gpu"}, timeout=30)
    assert proc.returncode != 0
    assert "CUDA_EMU_MODE=gpu: expected 'fiber' or 'thread'" in proc.stderr


def test_bench_fiber_vs_thread(builds):
    proc = _run(builds["plain"].result(), ["--bench"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    per_block = {
        m: float(us) for m, us in re.findall(r"BENCH (\w+) mode: .*: ([\d.]+) us per block", proc.stdout)
    }
    print(proc.stdout)
    assert set(per_block) == {"fiber", "thread"}, proc.stdout
    # Fiber mode must stay cheap: well under a millisecond per 256-thread block
    # (loose bound: the machine may be busy).
    assert per_block["fiber"] < 5000, per_block
    assert per_block["fiber"] < per_block["thread"], per_block


# --------------------------------------------------------------------------
# The ctypes path: the same tests from a shared library in this process
# --------------------------------------------------------------------------
def _call_main(lib, *args):
    argv = [b"emu_test"] + [a.encode() for a in args]
    arr = (ctypes.c_char_p * len(argv))(*argv)
    lib.emu_test_main.restype = ctypes.c_int
    lib.emu_test_main.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib.emu_test_main(len(argv), arr)


def test_shared_library_via_ctypes(builds, capfd):
    lib = ctypes.CDLL(str(builds["lib"].result()))
    harness.configure_emulation(lib, mode="fiber", seed=2, smem_fill=-1)
    assert harness.emulation_mode(lib) == "fiber"
    lib.cuda_emu_get_seed.restype = ctypes.c_ulonglong
    assert lib.cuda_emu_get_seed() == 2
    assert _call_main(lib, "--quick") == 0
    out = capfd.readouterr().out
    assert "ALL PASSED" in out and "mode fiber, seed 2," in out, out
    harness.configure_emulation(lib, mode="thread", seed=0)
    assert harness.emulation_mode(lib) == "thread"
    assert _call_main(lib, "--only=votes") == 0
    assert "[PASS] ballot_all_any" in capfd.readouterr().out
    harness.configure_emulation(lib, mode="fiber")


def test_load_emulated_uses_cache(builds):
    path = builds["lib"].result()
    mtime = path.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = harness.compile_emulated([TEST_CU], "test_emulation_lib", extra_flags=["-DEMU_TEST_LIBRARY"])
    assert again == path and again.stat().st_mtime_ns == mtime
    assert time.perf_counter() - t0 < 2.0
    lib = harness.load_emulated([TEST_CU], "test_emulation_lib", extra_flags=["-DEMU_TEST_LIBRARY"])
    assert hasattr(lib, "emu_test_main")


def test_cache_key_follows_included_headers(tmp_path):
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "value.h").write_text("#pragma once\n#include \"nested.h\"\n")
    (inc / "nested.h").write_text("#define VALUE 1\n")
    src = tmp_path / "prog.cu"
    src.write_text('#include "value.h"\n#include <cstdio>\nint main() { std::printf("%d\\n", VALUE); }\n')
    kw = dict(include_dirs=[inc], executable=True, opt="-O0", build_dir=tmp_path / "build")
    a = harness.compile_emulated([src], "cache_probe", **kw)
    assert harness.run_emulated_program(a, check=True).stdout.strip() == "1"
    assert harness.compile_emulated([src], "cache_probe", **kw) == a
    (inc / "nested.h").write_text("#define VALUE 2\n")  # a transitively included header changes
    b = harness.compile_emulated([src], "cache_probe", **kw)
    assert b != a
    assert harness.run_emulated_program(b, check=True).stdout.strip() == "2"
    with pytest.raises(harness.BuildError):
        bad = tmp_path / "bad.cu"
        bad.write_text("int main() { return undefined_name; }\n")
        harness.compile_emulated([bad], "cache_probe_bad", **kw)


# --------------------------------------------------------------------------
# The same file is valid CUDA
# --------------------------------------------------------------------------
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda*)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_test_file(builds, arch):
    proc = builds[f"nvcc_{arch}"].result()
    assert proc.returncode == 0
    # -Xptxas -v: every kernel compiled, none spills
    assert "k_block_sum" in proc.stderr or "Compiling entry" in proc.stderr, proc.stderr
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    assert spills and all(s == "0" for s in spills), proc.stderr
