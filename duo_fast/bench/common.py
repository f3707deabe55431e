"""Shared benchmark machinery: timing, peak-memory measurement, achieved bandwidth,
the `Case` description every op's benchmark module returns, the case registry,
and the fresh-subprocess runner used by `duo-fast bench` (`python -m duo_fast bench`,
in a source checkout too).

Protocol (docs/benchmarks.md): each side of a case (duo_fast, the reference,
the torch.compile'd reference) is measured in its own fresh Python process:
build the inputs, warm up (lazy initialisation, per-K tables, torch.compile
compilation: none of it counted, the first call's time is reported on its own),
measure the peak extra memory of one call, then take the median wall time of
`repeats` (5) calls. duo_fast and the reference are always measured in the same
report run and compared as ratios, because these machines vary by +-50% between
runs.

Adding an op: create `duo_fast/bench/cases_<op>.py` defining

    def cases(mode: str, device: str) -> list[Case]: ...

(mode is "tiny", "quick" or "full"; device "cpu" or "cuda"). The report discovers
every `cases_*.py` module of this package by name; a module that cannot run here
(e.g. it needs the Duo code) raises `CasesUnavailable` from `cases()`. `cases()` must be cheap and deterministic (it runs
in the parent and again in every subprocess to find the case by id): allocate
tensors only in `Case.setup`, which runs inside the subprocess.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .report import SIDES

MIB = float(1 << 20)
PACKAGE_DIR = Path(__file__).resolve().parent
# The directory that holds the imported duo_fast package (a source checkout's root,
# or site-packages): the measuring subprocesses import the same duo_fast from it.
IMPORT_ROOT = PACKAGE_DIR.parents[1]
RESULT_MARKER = "DUO_BENCH_RESULT "
MODES = ("tiny", "quick", "full")
COMPILE_WARMUP = 3  # warm-up calls of a torch.compile'd side (unless its Impl sets warmup)


class CasesUnavailable(RuntimeError):
    """Raised by a cases module's cases() when its cases cannot run here (the
    report lists the module as skipped, with the reason, and is not failed)."""


# --------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------
#
# Host (CPU) memory: peak growth of the process's resident set size during one call.
#
# Method "hwm" (used whenever the kernel allows it, i.e. Linux >= 4.0): Linux keeps a
# per-process high-water mark of resident memory, VmHWM in /proc/self/status, and
# writing "5" to /proc/self/clear_refs resets that mark to the current RSS. The kernel
# folds the current RSS into the mark before it unmaps any pages (munmap, madvise
# DONTNEED, brk shrink) and whenever the status file is read, so
#     reset mark -> call -> VmHWM - RSS-at-reset
# is the exact peak growth of the call however short or long it is (1 us to hours):
# no sampling, no GIL contention with a sampling thread, and it includes memory
# touched by OpenMP / intra-op worker threads (they share the address space). Its
# resolution is the kernel's RSS counter: pages, with per-CPU counter slack of a few
# hundred KiB on big machines (<~0.3 MiB here).
#
# Caveat: memory the call frees and re-allocates inside malloc's free lists is
# counted once (as it should be), but memory freed *before* the call and still
# resident in malloc's arenas could be reused by the call without growing RSS, which
# would under-count. Before the measured call we therefore run gc.collect() and
# glibc's malloc_trim(0), which returns free arena memory to the kernel. Tensors of
# 32 MiB and more are mmap'ed by glibc and unmapped on free anyway. For the same
# reason duo_fast's cache of freed gradient buffers (duo_fast.empty_cache) is emptied.
#
# Method "sampled" (fallback where clear_refs is not writable): a daemon thread reads
# /proc/self/statm about every millisecond while the call runs, plus one reading
# right after it. It misses peaks shorter than ~1 ms that are freed before the call
# returns, and a call that holds the GIL for a long time starves it, so results are
# flagged with the method name.
#
# CUDA: torch.cuda.max_memory_allocated() growth over memory_allocated() before the
# call (reset_peak_memory_stats first): peak extra device memory held by tensors of
# the caching allocator (not the allocator's reserved-but-unused cache, not host RSS).

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(field_name + r":\s+(\d+) kB", f.read())
    return int(m.group(1)) if m else -1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") >= 0
    except OSError:
        return False


_HWM_OK: bool | None = None


def rss_method() -> str:
    """'hwm' (exact, kernel high-water mark) or 'sampled' (1 kHz thread)."""
    global _HWM_OK
    if _HWM_OK is None:
        _HWM_OK = _hwm_reset()
    return "hwm" if _HWM_OK else "sampled"


def _clean_heap() -> None:
    gc.collect()
    _malloc_trim()
    # duo_fast's kept gradient buffers (duo_fast.empty_cache) are freed too, so the
    # memory call pays for a fresh [K, d] gradient as a first step would: the timed
    # calls reuse one (the steady state of a training loop), the peak counts it.
    import duo_fast

    duo_fast.empty_cache()


def peak_rss_growth_mib(fn: Callable[[], Any], *, clean: bool = True) -> float:
    """Peak growth of the resident set size (MiB) during one call of fn() (CPU).

    The call's result is dropped before returning (its memory is part of the peak).
    See the comment above for the method and its accuracy.
    """
    if clean:
        _clean_heap()
    if rss_method() == "hwm":
        _hwm_reset()
        base = _status_kib("VmRSS")
        out = fn()
        peak = _status_kib("VmHWM")
        del out
        return max(peak - base, 0) / 1024.0
    # Fallback: sampling thread.
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
        peak[0] = max(peak[0], _rss_bytes())
    finally:
        stop.set()
        t.join()
    del out
    return max(peak[0] - base, 0) / MIB


def peak_cuda_growth_mib(fn: Callable[[], Any], device=None) -> float:
    """Peak extra CUDA memory allocated (MiB) during one call of fn()."""
    import torch

    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(peak - base, 0) / MIB


def peak_growth_mib(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, str]:
    """(peak extra MiB of one call, method name) for the given device."""
    if str(device).startswith("cuda"):
        return peak_cuda_growth_mib(fn), "cuda_max_allocated"
    return peak_rss_growth_mib(fn), "rss_" + rss_method()


# --------------------------------------------------------------------------------------
# Time and bandwidth
# --------------------------------------------------------------------------------------


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def time_call_ms(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Time of one call of fn() in ms on `device`.

    CPU: wall time (perf_counter) around the call. CUDA: the device is
    synchronized first (no earlier work is counted), then a CUDA event is
    recorded on the current stream before and after the call and the time
    between them is read once the end event has completed: the GPU time of
    everything the call queued, not the host's launch overhead after it. The
    rest of the measurement (warm-up, memory call, median of repeats) is the
    same code for both devices."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        ms = float(start.elapsed_time(end))
    else:
        t0 = time.perf_counter()
        out = fn()
        ms = (time.perf_counter() - t0) * 1e3
    del out
    return ms


def median_ms(
    fn: Callable[[], Any],
    repeats: int = 5,
    warmup: int = 1,
    *,
    before_each: Callable[[], Any] | None = None,
    device: str = "cpu",
) -> tuple[float, list[float]]:
    """(median, all times) in ms of `repeats` single calls after `warmup` calls.

    before_each (untimed) runs before every call, warm-up included: e.g. drop
    .grad, clear a cache, pick a new vocabulary size.
    """
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        time_call_ms(fn, device)
    times = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        times.append(time_call_ms(fn, device))
    return statistics.median(times), times


def gbps(nbytes: float | None, ms: float | None) -> float | None:
    """Achieved bandwidth in GB/s (1e9 bytes/s) for nbytes moved in ms milliseconds."""
    if not nbytes or not ms or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------
# Case description
# --------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One measured side of a case.

    fn(state) is the timed call; state is what Case.setup (or this side's own
    setup, when the sides need different inputs) returned. The return value is
    dropped after the call (its memory counts in the peak).
    """

    fn: Callable[[Any], Any]
    before_each: Callable[[Any], Any] | None = None  # untimed, before every call
    scale: float = 1.0  # measured time is multiplied by this (e.g. 512/32 values timed)
    note: str = ""  # printed as a footnote of the row
    compile: bool = False  # wrap fn in torch.compile (compile time: first call, not counted)
    compile_kwargs: dict = field(default_factory=dict)
    repeats: int | None = None  # override Case.repeats
    warmup: int | None = None  # override Case.warmup
    setup: Callable[[str], Any] | None = None  # override Case.setup for this side only
    # What this side runs, for the report's "reference code" column: a string, or a
    # function called in the measuring process after setup (e.g. "Duo code" when
    # the Duo codebase was imported there, "eager copy" when it was not).
    source: str | Callable[[], str] | None = None


@dataclass
class Target:
    """A BASELINES.md target; every condition that is set must hold for PASS.

    speedup = reference ms / duo_fast ms (higher is better);
    memory ratio = duo_fast peak MiB / reference peak MiB (lower is better).
    """

    text: str
    min_speedup_ref: float | None = None
    min_speedup_compiled: float | None = None
    max_mem_ratio: float | None = None
    max_mem_mib: float | None = None

    def check(self, r: dict) -> str | None:
        """'PASS' / 'MISS', or None when a needed measurement is missing."""
        conds = []
        pairs = [
            (self.min_speedup_ref, r.get("speedup_ref"), lambda v, t: v >= t),
            (self.min_speedup_compiled, r.get("speedup_compiled"), lambda v, t: v >= t),
            (self.max_mem_ratio, r.get("mem_ratio_ref"), lambda v, t: v <= t),
            (self.max_mem_mib, _get(r, "duo", "peak_mib"), lambda v, t: v <= t),
        ]
        for t, v, ok in pairs:
            if t is None:
                continue
            if v is None:
                return None
            conds.append(ok(v, t))
        if not conds:
            return None
        return "PASS" if all(conds) else "MISS"


@dataclass
class Case:
    """One benchmark row: duo_fast against the reference (and torch.compile of it).

    op        registry name shown in the table and matched by --ops
    name      unique within op; the case id is f"{op}/{name}"
    size      human-readable size for the table ("N=2048 K=50257 fp32")
    setup     setup(device: str) -> state, run in the subprocess, untimed; make
              inputs deterministic (seed a torch.Generator)
    duo, ref, compiled   Impl or None (None: shown as "—")
    bytes_moved  bytes the op must move at minimum (int or fn(state) -> int) for
              the GB/s column (duo_fast's time); None where meaningless
    target    Target from BASELINES.md, or None (informational row)
    notes     footnotes printed under the table
    """

    op: str
    name: str
    size: str
    setup: Callable[[str], Any]
    duo: Impl | None = None
    ref: Impl | None = None
    compiled: Impl | None = None
    bytes_moved: int | Callable[[Any], int] | None = None
    target: Target | None = None
    notes: list[str] = field(default_factory=list)
    repeats: int = 5
    warmup: int = 1
    timeout_s: float = 900.0  # per side (subprocess)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"

    def impl(self, side: str) -> Impl | None:
        return {"duo": self.duo, "ref": self.ref, "compiled": self.compiled}[side]


# --------------------------------------------------------------------------------------
# The device's copy bandwidth: the yardstick of the GB/s column
# --------------------------------------------------------------------------------------

COPY_MIB = {"tiny": 16, "quick": 256, "full": 256}
COPY_MIB_CUDA = 1024


def _copy_setup(mib: int):
    def setup(device):
        import torch

        src = torch.ones(mib << 20, dtype=torch.uint8, device=device)
        return {"src": src, "dst": torch.empty_like(src)}

    return setup


def _copy(st):
    st["dst"].copy_(st["src"])


def copy_case(mode: str, device: str) -> Case:
    """Device-to-device copy of one buffer (dst.copy_(src)), measured like any
    case's duo side (fresh process, same clock): bytes moved = read + write."""
    mib = COPY_MIB_CUDA if is_cuda(device) and mode != "tiny" else COPY_MIB[mode]
    return Case(op="__copy__", name=f"d2d-{mib}MiB", size=f"copy {mib} MiB", setup=_copy_setup(mib),
                duo=Impl(_copy, warmup=2, note="dst.copy_(src), read + write"),
                bytes_moved=2 * (mib << 20), repeats=9)


def _get(r: dict, side: str, key: str):
    s = r.get(side)
    return None if not s or "error" in s else s.get(key)


# --------------------------------------------------------------------------------------
# Registry: the cases_<op>.py modules of this package
# --------------------------------------------------------------------------------------


def case_modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE_DIR.glob("cases_*.py"))


def discover_cases(mode: str, device: str, ops: list[str] | None = None,
                   skipped: list[str] | None = None) -> tuple[list[Case], list[str]]:
    """All cases of every cases_*.py module (filtered by op names); also the list of
    modules that failed to import or to list their cases (with the error), so that one
    broken or not-yet-buildable op does not stop the others. Modules that raise
    CasesUnavailable are appended to `skipped` (with the reason) instead."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    found, errors = [], []
    for stem in case_modules():
        try:
            mod = importlib.import_module(f"{__package__}.{stem}")
            cs = list(mod.cases(mode, device))
        except CasesUnavailable as e:
            if skipped is not None:
                skipped.append(f"{stem}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - reported in the output
            errors.append(f"{stem}: {type(e).__name__}: {e}")
            continue
        for c in cs:
            if ops and c.op not in ops:
                continue
            found.append(c)
    ids = [c.id for c in found]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"duplicate benchmark case ids: {sorted(dup)}")
    return found, errors


# --------------------------------------------------------------------------------------
# Measuring one side (inside the fresh subprocess)
# --------------------------------------------------------------------------------------


def configure_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def measure_side(case: Case, side: str, device: str) -> dict:
    """Measure one side of a case in the current process (meant to be fresh)."""
    import torch

    impl = case.impl(side)
    if impl is None:
        raise ValueError(f"case {case.id} has no side {side!r}")
    torch.manual_seed(0)
    state = (impl.setup or case.setup)(device)
    source = impl.source() if callable(impl.source) else impl.source
    fn = impl.fn
    if impl.compile:
        fn = torch.compile(fn, **impl.compile_kwargs)

    def call():
        return fn(state)

    before = (lambda: impl.before_each(state)) if impl.before_each is not None else None
    warmup = case.warmup if impl.warmup is None else impl.warmup
    if impl.compile and impl.warmup is None:
        # torch.compile: the first call compiles, and the next ones may still recompile
        # (guards on .grad, the backward graph): none of it is the steady state.
        warmup = max(warmup, COMPILE_WARMUP)
    repeats = case.repeats if impl.repeats is None else impl.repeats

    # First call of the process: lazy init, tables, compilation. Reported, not counted.
    if before is not None:
        before()
    first_ms = time_call_ms(call, device)
    for _ in range(max(warmup - 1, 0)):
        if before is not None:
            before()
        time_call_ms(call, device)

    if before is not None:
        before()
    peak_mib, mem_method = peak_growth_mib(call, device)

    med, times = median_ms(call, repeats, 0, before_each=before, device=device)
    nbytes = case.bytes_moved(state) if callable(case.bytes_moved) else case.bytes_moved
    ms = med * impl.scale
    return {
        "median_ms": ms,
        "raw_median_ms": med,
        "times_ms": times,
        "scale": impl.scale,
        "first_call_ms": first_ms,
        "peak_mib": peak_mib,
        "mem_method": mem_method,
        "repeats": repeats,
        "warmup": max(warmup, 1),
        "threads": torch.get_num_threads(),
        "bytes_moved": nbytes,
        "gbps": gbps(nbytes, ms),
        "note": impl.note,
        "source": source,
    }


def one_main(case_id: str, side: str, mode: str, device: str, threads: int) -> int:
    """Entry point of the subprocess: print one RESULT_MARKER line of JSON."""
    try:
        configure_threads(threads)
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda given but torch.cuda.is_available() is False")
        cases, errors = discover_cases(mode, device)
        by_id = {c.id: c for c in cases}
        copy = copy_case(mode, device)
        by_id[copy.id] = copy
        if case_id not in by_id:
            raise KeyError(f"no case {case_id!r} (mode {mode}); import errors: {errors}")
        res = measure_side(by_id[case_id], side, device)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(res), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# Running a case: each side in a fresh subprocess
# --------------------------------------------------------------------------------------


def subprocess_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONPATH"] = str(IMPORT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_side_subprocess(case: Case, side: str, mode: str, device: str, threads: int) -> dict:
    """Measure one side of a case in a fresh `python -m duo_fast.bench --one` process
    (run from the directory that holds the imported duo_fast, so that it imports the
    same one)."""
    cmd = [
        sys.executable, "-m", __package__, "--one", case.id, "--side", side,
        "--mode", mode, "--device", device, "--threads", str(threads),
    ]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd, cwd=IMPORT_ROOT, env=subprocess_env(threads), capture_output=True, text=True,
            timeout=case.timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {case.timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            res = json.loads(line[len(RESULT_MARKER):])
            res["process_wall_s"] = wall
            return res
    tail = (p.stderr or p.stdout)[-2000:]
    return {"error": f"subprocess exited with {p.returncode} without a result", "stderr_tail": tail}


def _ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


# Memory ratios are only formed when the denominator is at least this large: below
# it both sides are a handful of pages (Python objects, page-granular RSS) and the
# ratio is noise.
MEM_RATIO_MIN_MIB = 1.0


def _mem_ratio(duo, other):
    if other is None or other < MEM_RATIO_MIN_MIB:
        return None
    return _ratio(duo, other)


def combine(case: Case, sides: dict[str, dict]) -> dict:
    """Add ratios, bandwidth and the target verdict to per-side results."""
    r: dict[str, Any] = {"id": case.id, "op": case.op, "size": case.size, **sides}
    duo_ms = _get(r, "duo", "median_ms")
    r["speedup_ref"] = _ratio(_get(r, "ref", "median_ms"), duo_ms)
    r["speedup_compiled"] = _ratio(_get(r, "compiled", "median_ms"), duo_ms)
    r["mem_ratio_ref"] = _mem_ratio(_get(r, "duo", "peak_mib"), _get(r, "ref", "peak_mib"))
    r["mem_ratio_compiled"] = _mem_ratio(_get(r, "duo", "peak_mib"), _get(r, "compiled", "peak_mib"))
    r["gbps"] = _get(r, "duo", "gbps")
    r["target"] = case.target.text if case.target else None
    r["status"] = case.target.check(r) if case.target else None
    r["notes"] = list(case.notes)
    return r


def merge_rounds(results: list[dict]) -> dict:
    """One side's result from its rounds (each a fresh process): the median over
    every round's timed calls, the largest peak; the per-round medians are kept."""
    ok = [r for r in results if "error" not in r]
    if len(results) == 1 or not ok:
        return results[0]
    out = dict(ok[0])
    times = [t for r in ok for t in r["times_ms"]]
    out["times_ms"] = times
    out["raw_median_ms"] = statistics.median(times)
    out["median_ms"] = out["raw_median_ms"] * out["scale"]
    out["round_medians_ms"] = [r["median_ms"] for r in ok]
    out["peak_mib"] = max(r["peak_mib"] for r in ok)
    out["first_call_ms"] = max(r["first_call_ms"] for r in ok)
    out["process_wall_s"] = sum(r.get("process_wall_s", 0.0) for r in ok)
    out["gbps"] = gbps(out.get("bytes_moved"), out["median_ms"])
    out["rounds"] = len(ok)
    if len(ok) < len(results):
        out["round_errors"] = [r["error"] for r in results if "error" in r]
    return out


def run_case(case: Case, mode: str = "quick", device: str = "cpu", threads: int = 2,
             log: Callable[[str], None] | None = None, rounds: int = 1) -> dict:
    """Run every side of a case, each in a fresh subprocess, one after the other,
    `rounds` times with the order of the sides reversed every other round (on a
    shared machine the speed drifts over minutes: alternating spreads a slow spell
    over both sides instead of one); returns the combined JSON-able dict (per-side
    results merged over the rounds, ratios, verdict)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    present = [side for side in SIDES if case.impl(side) is not None]
    runs: dict[str, list[dict]] = {side: [] for side in present}
    for rnd in range(rounds):
        for side in present if rnd % 2 == 0 else present[::-1]:
            res = run_side_subprocess(case, side, mode, device, threads)
            runs[side].append(res)
            if log:
                tag = f"{case.id} [{side}]" + (f" round {rnd + 1}/{rounds}" if rounds > 1 else "")
                if "error" in res:
                    log(f"  {tag}: ERROR {res['error']}")
                else:
                    log(f"  {tag}: {res['median_ms']:.4g} ms, {res['peak_mib']:.3g} MiB "
                        f"(process {res['process_wall_s']:.1f} s)")
    return combine(case, {side: merge_rounds(v) for side, v in runs.items()})


# ---- size grid shared by the per-token-row ops (sample_zt, usdm_loss, distill_kl) ----

# (N, K) pairs: BASELINES sizes for --full, a quick proxy otherwise.
TOKEN_SIZES = {
    "full": [(2048, 1024), (2048, 50257), (8192, 1024), (8192, 50257)],
    "quick": [(256, 50257), (2048, 1024)],
    "tiny": [(64, 1000)],  # --tiny: seconds, for CI and a first try
}


def token_sizes(mode: str) -> list[tuple[int, int]]:
    return TOKEN_SIZES[mode]


def ref_limit_gib(device, cpu_gib: float = 9.0, cuda_gib: float = 40.0) -> float:
    """Largest estimated reference peak a case runs (the machine has 24 GiB)."""
    return cuda_gib if str(device).startswith("cuda") else cpu_gib


def copy_bandwidth(mode: str, device: str, threads: int) -> dict:
    """The copy case's result (its "gbps" is the device's copy bandwidth), measured in
    a fresh process like every case side."""
    return run_side_subprocess(copy_case(mode, device), "duo", mode, device, threads)
