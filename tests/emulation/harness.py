"""Build and run CUDA sources on the CPU through tests/emulation/cuda_emulation.h.

Used by pytest:

* ``compile_emulated(sources, name, ...)`` compiles ``.cu`` (or ``.cpp``) sources with
  g++ as C++20 with ``-DDUO_FAST_EMULATE_CUDA`` into a shared library (or an
  executable) under ``tests/emulation/_build/``, cached by a hash of the sources,
  every project header they include (transitively), the flags and the compiler.
* ``load_emulated(...)`` returns the shared library as a ``ctypes.CDLL``;
  ``configure_emulation(lib, mode=..., seed=..., smem_fill=...)`` sets the
  emulation's mode/seed through the header's C hooks.
* Sanitizer builds (``mode_sanitizer="asan"`` = ASan + UBSan, ``"tsan"``) are
  executables: a sanitized shared library cannot be loaded into an
  unsanitized Python. Run them with ``run_emulated_program``.
* ``nvcc_path()`` / ``nvcc_compile_check(source, arch)`` compile a ``.cu`` with the
  real nvcc (no GPU needed).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EMULATION_DIR = REPO_ROOT / "tests" / "emulation"
BUILD_DIR = EMULATION_DIR / "_build"
DEFAULT_INCLUDE_DIRS = (REPO_ROOT / "csrc" / "include", EMULATION_DIR)

SANITIZER_FLAGS = {
    None: [],
    "asan": [
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=undefined",
    ],
    "tsan": ["-fsanitize=thread"],
}

# Runtime options for sanitized programs (the caller's env entries win).
SANITIZER_ENV = {
    "ASAN_OPTIONS": "abort_on_error=0:halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1",
}

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


class BuildError(RuntimeError):
    """A compiler invocation failed; the message holds the command and its output."""


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


@lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:  # pragma: no cover - depends on the machine
        raise BuildError(f"C++ compiler {cxx!r} is not usable: {exc}") from exc
    return out.splitlines()[0] if out else cxx


def _project_headers(sources: Sequence[Path], include_dirs: Sequence[Path]) -> list[Path]:
    """Quote-included files reachable from the sources (resolved like the
    preprocessor: the including file's directory first, then -I dirs).
    System (<...>) headers are not followed: the compiler id stands for them."""
    seen: dict[Path, None] = {}
    stack = list(sources)
    while stack:
        path = stack.pop()
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for name in _INCLUDE_RE.findall(text):
            for base in (path.parent, *include_dirs):
                cand = (base / name).resolve()
                if cand.is_file():
                    if cand not in seen:
                        seen[cand] = None
                        stack.append(cand)
                    break
    return sorted(seen)


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:20]


def compile_emulated(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    name: str,
    *,
    mode_sanitizer: str | None = None,
    extra_flags: Sequence[str] = (),
    include_dirs: Sequence[str | os.PathLike[str]] = (),
    executable: bool | None = None,
    opt: str = "-O1",
    build_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Compile CUDA sources for CPU emulation; return the built file's path.

    ``mode_sanitizer``: None, "asan" (AddressSanitizer + UBSan) or "tsan".
    ``executable``: build a program instead of a shared library; defaults to
    True for sanitizer builds (which cannot be dlopen'ed into Python).
    Builds are cached in ``build_dir`` (default tests/emulation/_build/) under
    ``<name>[-<sanitizer>]-<hash>[.so]``; older builds of the same name are pruned.
    """
    if mode_sanitizer not in SANITIZER_FLAGS:
        raise ValueError(f"mode_sanitizer must be None, 'asan' or 'tsan', not {mode_sanitizer!r}")
    if executable is None:
        executable = mode_sanitizer is not None
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    srcs = [Path(s).resolve() for s in sources]
    for s in srcs:
        if not s.is_file():
            raise FileNotFoundError(s)
    incs = [Path(d).resolve() for d in include_dirs] + [Path(d) for d in DEFAULT_INCLUDE_DIRS]

    cxx = _compiler()
    flags = [
        "-std=c++20",
        opt,
        "-g",
        "-fPIC",
        "-DDUO_FAST_EMULATE_CUDA",
        "-Wno-unknown-pragmas",  # #pragma unroll
        *SANITIZER_FLAGS[mode_sanitizer],
        *extra_flags,
    ]
    if executable:
        flags.append("-rdynamic")  # kernel names in the emulation's error messages
    else:
        flags.append("-shared")
    inc_flags = [f"-I{d}" for d in incs]

    headers = _project_headers(srcs, incs)
    key = _digest(
        [_compiler_id(cxx).encode(), cxx.encode(), "\0".join(flags).encode(), "\0".join(inc_flags).encode()]
        + [p.as_posix().encode() + b"\0" + p.read_bytes() for p in (*srcs, *headers)]
    )
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    suffix = "" if executable else ".so"
    san = f"-{mode_sanitizer}" if mode_sanitizer else ""
    bdir = Path(build_dir) if build_dir is not None else BUILD_DIR
    out = bdir / f"{safe}{san}-{key}{suffix}"
    if out.exists():
        return out

    bdir.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: concurrent builders never see half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{safe}-", suffix=suffix, dir=bdir)
    os.close(fd)
    cmd = [cxx, *flags, *inc_flags, "-x", "c++", *map(str, srcs), "-x", "none", "-o", tmp, "-pthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"compilation failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    _prune_stale(bdir, f"{safe}{san}", suffix, keep=out)
    return out


def _prune_stale(bdir: Path, stem: str, suffix: str, keep: Path, min_age_s: float = 600.0) -> None:
    """Delete older builds of the same name (not touched for ``min_age_s``, so
    that a concurrent run still using one is left alone)."""
    pat = re.compile(re.escape(stem) + r"-[0-9a-f]{20}" + re.escape(suffix) + "$")
    now = time.time()
    for p in bdir.iterdir():
        if p != keep and pat.match(p.name):
            try:
                if now - p.stat().st_mtime > min_age_s:
                    p.unlink()
            except OSError:
                pass


def load_emulated(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    name: str,
    *,
    extra_flags: Sequence[str] = (),
    include_dirs: Sequence[str | os.PathLike[str]] = (),
    opt: str = "-O1",
) -> ctypes.CDLL:
    """Compile (cached) an unsanitized shared library and load it with ctypes."""
    path = compile_emulated(sources, name, extra_flags=extra_flags, include_dirs=include_dirs, opt=opt)
    return ctypes.CDLL(str(path))


def configure_emulation(
    lib: ctypes.CDLL, *, mode: str | None = None, seed: int | None = None, smem_fill: int | None = None
) -> None:
    """Set the emulation's mode ("fiber"/"thread"), seed and shared-memory fill
    byte (-1 = automatic) in a library loaded by load_emulated."""
    if mode is not None:
        if mode not in ("fiber", "thread"):
            raise ValueError(f"mode must be 'fiber' or 'thread', not {mode!r}")
        lib.cuda_emu_set_mode(ctypes.c_int(0 if mode == "fiber" else 1))
    if seed is not None:
        lib.cuda_emu_set_seed(ctypes.c_ulonglong(seed))
    if smem_fill is not None:
        lib.cuda_emu_set_smem_fill(ctypes.c_int(smem_fill))


def emulation_mode(lib: ctypes.CDLL) -> str:
    """The mode a loaded emulated library launches in."""
    lib.cuda_emu_get_mode.restype = ctypes.c_int
    return "fiber" if lib.cuda_emu_get_mode() == 0 else "thread"


def run_emulated_program(
    path: str | os.PathLike[str],
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    timeout: float = 300,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run an emulated (possibly sanitized) program; return the completed process
    (text stdout/stderr). ``env`` entries are added to os.environ and to the
    default sanitizer options. With ``check=True`` a non-zero exit raises."""
    full_env = dict(os.environ)
    full_env.update(SANITIZER_ENV)
    if env:
        full_env.update(env)
    cmd = [str(path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if "ThreadSanitizer: unexpected memory mapping" in proc.stderr and shutil.which("setarch"):
        # Older TSan runtimes reject some ASLR layouts; rerun without randomization.
        proc = subprocess.run(
            ["setarch", os.uname().machine, "-R", *cmd], capture_output=True, text=True, env=full_env, timeout=timeout
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def nvcc_path() -> Path | None:
    """The nvcc to use: $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, nvcc on PATH,
    /usr/local/cuda/bin/nvcc, else the newest /usr/local/cuda-*/bin/nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return Path("/usr/local/cuda/bin/nvcc")

    def version_key(p: str) -> tuple[int, ...]:
        m = re.search(r"cuda-(\d+(?:\.\d+)*)", p)
        return tuple(int(x) for x in m.group(1).split(".")) if m else ()

    cands = sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), key=version_key)
    return Path(cands[-1]) if cands else None


@lru_cache(maxsize=None)
def _nvcc_id(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else nvcc


def nvcc_compile_check(
    source: str | os.PathLike[str],
    arch: str | int = "sm_80",
    *,
    include_dirs: Sequence[str | os.PathLike[str]] = (),
    extra_flags: Sequence[str] = (),
    ptxas_verbose: bool = False,
    std: str = "c++17",
    timeout: float = 600,
    cache: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Compile ``source`` with nvcc for ``arch`` (``"sm_80"``, ``"90"`` or ``90``)
    to a throw-away object file; raise BuildError on failure. Returns the
    completed process (``stderr`` carries the ``-Xptxas -v`` report if asked).
    With ``cache`` a success is remembered in _build/ (keyed by nvcc version,
    flags, the source and the project headers it includes) and not redone."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    arch_s = str(arch)
    if not arch_s.startswith(("sm_", "compute_")):
        arch_s = f"sm_{arch_s}"
    src = Path(source).resolve()
    incs = [Path(d).resolve() for d in include_dirs] + [REPO_ROOT / "csrc" / "include"]
    flags = [
        f"-std={std}",
        f"-arch={arch_s}",
        *(f"-I{d}" for d in incs),
        *(["-Xptxas", "-v"] if ptxas_verbose else []),
        *extra_flags,
    ]
    log = None
    if cache:
        key = _digest(
            [_nvcc_id(str(nvcc)).encode(), "\0".join(flags).encode()]
            + [p.as_posix().encode() + b"\0" + p.read_bytes() for p in (src, *_project_headers([src], incs))]
        )
        log = BUILD_DIR / f"nvcc-{re.sub(r'[^A-Za-z0-9_.-]', '_', src.stem)}-{arch_s}-{key}.log"
        if log.exists():
            return subprocess.CompletedProcess([str(nvcc), *flags, "-c", str(src)], 0, "", log.read_text())
    with tempfile.TemporaryDirectory(prefix="nvcc-check-") as tmp:
        cmd = [str(nvcc), *flags, "-c", str(src), "-o", str(Path(tmp) / "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BuildError(f"nvcc failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if log is not None:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        fd, tmp_log = tempfile.mkstemp(prefix=".nvcc-", suffix=".log", dir=BUILD_DIR)
        with os.fdopen(fd, "w") as f:
            f.write(proc.stderr)
        os.replace(tmp_log, log)
        _prune_stale(BUILD_DIR, log.name[: -len("-" + key + ".log")], ".log", keep=log)
    return proc
