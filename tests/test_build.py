"""The build itself: every .cu compiles with the real nvcc for each target
architecture without register spills; a CUDA build registers CPU, CUDA and
Meta kernels for every op of the schema block; the built module passes the CPU
smoke test, has no RUNPATH, links the shared cudart and embeds SASS for each
architecture and PTX for the highest; and configure-only CMake runs: the CPU-only
build without a toolkit (issue 15), the architecture list and its errors, the
nvcc/torch CUDA major check."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import duo_fast
from conftest import CUDA_SOURCES, ROOT, TEST_CUDA_SOURCES, load_harness

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


# --------------------------------------------------------------------------------------
# The built module: smoke test, dynamic section, embedded CUDA code
# --------------------------------------------------------------------------------------


def test_smoke_checks_pass_on_this_build():
    """tests/smoke_installed.py (what CI runs against the installed CPU-only wheel)
    on the in-tree build, so that the smoke test itself keeps working."""
    import smoke_installed

    smoke_installed.main(["--expect-cuda", "1" if duo_fast.build_info()["cuda"] else "0"])


def _dynamic_section(path) -> str:
    return subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout


def test_module_has_no_runpath_and_links_the_shared_cudart():
    """No RUNPATH/RPATH (one into the build machine's venv or toolkit is wrong on any
    other machine; torch's libraries are loaded by `import torch` first), and a CUDA
    build needs libcudart.so.N with no static cudart linked in."""
    so = duo_fast._C.__file__
    dyn = _dynamic_section(so)
    assert "(RUNPATH)" not in dyn and "(RPATH)" not in dyn, dyn
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)
    assert "libc10.so" in needed and "libtorch_cpu.so" in needed, needed
    if duo_fast.build_info()["cuda"]:
        major = duo_fast.build_info()["cuda_version"].split(".")[0]
        assert f"libcudart.so.{major}" in needed, needed
        # A static cudart would define (and export) the runtime API in _C itself.
        syms = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, check=True).stdout
        assert not re.search(r" (cuda\w+|__cuda\w+)$", syms, re.MULTILINE), "cudart symbols defined in _C"


def _fatbin_entries(so_path) -> list[tuple[str, int]]:
    """(kind, sm) of every image in the .nv_fatbin section of an ELF64 shared object:
    kind "sass" (a cubin) or "ptx". The layout is that of CUDA's fatbinary container
    (magic 0xBA55ED50, 16-byte header; per image: uint16 kind (1 = PTX, 2 = cubin),
    uint32 header size, uint64 payload size, uint32 sm at byte 28)."""
    data = Path(so_path).read_bytes()
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for h in headers:
        if data[strtab + h[0] : data.index(b"\0", strtab + h[0])] == b".nv_fatbin":
            section = data[h[4] : h[4] + h[5]]
            break
    else:
        return []
    entries, pos = [], 0
    while (pos := section.find(struct.pack("<I", 0xBA55ED50), pos)) >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", section, pos)
        e, end = pos + header_size, pos + header_size + fat_size
        while e < end:
            kind, _, image_header_size, payload = struct.unpack_from("<HHIQ", section, e)
            sm = struct.unpack_from("<I", section, e + 28)[0]
            entries.append(({1: "ptx", 2: "sass"}[kind], sm))
            e += image_header_size + payload
        pos = end
    return entries


def test_cuda_build_embeds_sass_for_each_arch_and_ptx_for_the_highest():
    if not duo_fast.build_info()["cuda"]:
        assert _fatbin_entries(duo_fast._C.__file__) == []
        return
    archs = duo_fast.build_info()["cuda_archs"].split()
    sms = [int(a.rstrip("a").replace(".", "")) for a in archs]
    entries = set(_fatbin_entries(duo_fast._C.__file__))
    assert entries == {("sass", sm) for sm in sms} | {("ptx", max(sms))}, (archs, entries)


# --------------------------------------------------------------------------------------
# CMake: the arch list, and configure-only runs into a temporary directory
# --------------------------------------------------------------------------------------

ARCHS_SCRIPT = ROOT / "cmake" / "DuoFastCudaArchs.cmake"


def _parse_archs(spec: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cmake", f"-DARCHS={spec}", "-P", str(ARCHS_SCRIPT)], capture_output=True, text=True)


@pytest.mark.parametrize(
    "spec,architectures",
    [
        ("8.0;9.0", "80-real;90-real;90-virtual"),
        ("9.0;8.0", "90-real;80-real;90-virtual"),  # PTX of the highest, not of the last
        ("10.0;9.0", "100-real;90-real;100-virtual"),  # compared as numbers
        ("8.0 9.0+PTX", "80-real;90-real;90-virtual"),  # torch's syntax
        (" 8.0;  9.0 ", "80-real;90-real;90-virtual"),
        ("8.0;8.0;9.0", "80-real;90-real;90-virtual"),
        ("8.0;9.0a", "80-real;90a-real;90a-virtual"),  # arch-specific PTX: see README
        ("9.0a;9.0;8.0", "90a-real;90-real;80-real;90-virtual"),  # the portable PTX when both
    ],
)
def test_arch_list_to_cmake_architectures(spec, architectures):
    proc = _parse_archs(spec)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == architectures


@pytest.mark.parametrize(
    "spec,message",
    [
        ("Ampere", '"Ampere" is not a compute capability'),
        ("8.0;Hopper", '"Hopper" is not a compute capability'),
        ("sm_90", '"sm_90" is not a compute capability'),
        ("90", '"90" is not a compute capability'),
        ("8.0,9.0", '"8.0,9.0" is not a compute capability'),
        ("8.0;;9.0", "has an empty item"),
        ("8.0;", "has an empty item"),
        (";8.0", "has an empty item"),
        ("  ", "is empty"),
    ],
)
def test_arch_list_errors(spec, message):
    proc = _parse_archs(spec)
    assert proc.returncode != 0
    assert message in " ".join(proc.stderr.split()), proc.stderr


def _nvcc_dirs() -> set[str]:
    return {d for d in os.environ.get("PATH", "").split(os.pathsep) if d and (Path(d) / "nvcc").exists()}


def _configure(tmp_path, *cache_args, hide_nvcc=False, env=None) -> subprocess.CompletedProcess:
    """CMake configure of the project into tmp_path/build (no build); `env` is added
    to the environment after CUDA_HOME, CUDA_PATH, CUDACXX and TORCH_CUDA_ARCH_LIST are
    removed from it."""
    full = dict(os.environ)
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDACXX", "TORCH_CUDA_ARCH_LIST"):
        full.pop(var, None)
    full.update(env or {})
    if hide_nvcc:
        hidden = _nvcc_dirs()
        full["PATH"] = os.pathsep.join(d for d in full["PATH"].split(os.pathsep) if d not in hidden)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    return subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), *gen, f"-DPython_EXECUTABLE={sys.executable}", *cache_args],
        capture_output=True, text=True, env=full,
    )


def _nvcc_or_skip() -> Path:
    nvcc = load_harness().nvcc_path()
    if nvcc is None:
        pytest.skip("no nvcc: the CUDA part is not built on this machine either")
    return nvcc


def test_cpu_only_configures_without_a_toolkit(tmp_path):
    """Issue 15: DUO_FAST_CUDA=0 with no nvcc on PATH configures against this torch,
    also when it is a CUDA build (torch's CMake package used to demand CUDA)."""
    proc = _configure(tmp_path, "-DDUO_FAST_CUDA=0", hide_nvcc=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "duo_fast: CPU-only build" in proc.stdout
    assert "CUDA compiler" not in proc.stdout and "find CUDA" not in proc.stdout + proc.stderr, proc.stdout


def test_cuda_configure_flags_and_link_line(tmp_path):
    """DUO_FAST_CUDA_ARCHS="9.0;8.0": SASS for both, PTX for 9.0 in the nvcc flags;
    the link line has the shared cudart, no static cudart and no -rpath."""
    nvcc = _nvcc_or_skip()
    proc = _configure(tmp_path, "-DDUO_FAST_CUDA=1", "-DDUO_FAST_CUDA_ARCHS=9.0;8.0", f"-DCMAKE_CUDA_COMPILER={nvcc}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "architectures 90-real;80-real;90-virtual" in proc.stdout
    if not shutil.which("ninja"):
        return
    build = tmp_path / "build"
    compile_cmd = subprocess.run(["ninja", "-C", str(build), "-t", "commands", "CMakeFiles/_C.dir/csrc/cuda/sample_zt.cu.o"],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    gencode = re.findall(r"--generate-code=arch=compute_(\d+),code=\[(\w+)\]", compile_cmd)
    assert sorted(gencode) == [("80", "sm_80"), ("90", "compute_90"), ("90", "sm_90")], compile_cmd
    so = next(t for t in subprocess.run(["ninja", "-C", str(build), "-t", "targets", "all"], capture_output=True,
                                        text=True, check=True).stdout.split() if t.startswith("_C") and ".so" in t)
    link_cmd = subprocess.run(["ninja", "-C", str(build), "-t", "commands", so.rstrip(":")], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[-1]
    assert "libcudart.so" in link_cmd, link_cmd
    assert "cudart_static" not in link_cmd and "-rpath" not in link_cmd, link_cmd


@pytest.mark.parametrize("source", ["DUO_FAST_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"])
def test_cuda_configure_rejects_arch_names(tmp_path, source):
    nvcc = _nvcc_or_skip()
    args, env = ["-DDUO_FAST_CUDA=1", f"-DCMAKE_CUDA_COMPILER={nvcc}"], None
    if source == "DUO_FAST_CUDA_ARCHS":
        args.append("-DDUO_FAST_CUDA_ARCHS=Ampere;Hopper")
    else:
        args.append("-DDUO_FAST_CUDA_ARCHS=")
        env = {"TORCH_CUDA_ARCH_LIST": "Ampere;Hopper"}
    proc = _configure(tmp_path, *args, env=env)
    assert proc.returncode != 0
    err = " ".join(proc.stderr.split())
    assert f'{source}="Ampere;Hopper": "Ampere" is not a compute capability' in err, proc.stderr


def _fake_torch(tmp_path, version: str, cuda: str | None) -> Path:
    """A stand-in torch package that reports `version` / torch.version.cuda = `cuda`,
    with empty libraries: enough for a configure that must stop (or not) on them."""
    pkg = tmp_path / "fake" / "torch"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "include" / "torch" / "csrc" / "api" / "include").mkdir(parents=True)
    for lib in ("c10", "torch_cpu", "c10_cuda", "torch_cuda"):
        (pkg / "lib" / f"lib{lib}.so").write_bytes(b"")
    (pkg / "__init__.py").write_text(f"__version__ = {version!r}\nfrom . import version, _C\n")
    (pkg / "version.py").write_text(f"cuda = {cuda!r}\n")
    (pkg / "_C.py").write_text("_GLIBCXX_USE_CXX11_ABI = True\n")
    return tmp_path / "fake"


def _nvcc_version(nvcc: Path) -> tuple[int, int]:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = re.search(r"release (\d+)\.(\d+)", out).groups()
    return int(major), int(minor)


def test_configure_fails_when_nvcc_and_torch_cuda_majors_differ(tmp_path):
    nvcc = _nvcc_or_skip()
    major, _ = _nvcc_version(nvcc)
    other = f"{major - 1}.8"
    fake = _fake_torch(tmp_path, f"2.14.1+cu{other.replace('.', '')}", other)
    for mode in ("1", "auto"):
        proc = _configure(tmp_path / mode, f"-DDUO_FAST_CUDA={mode}", f"-DCMAKE_CUDA_COMPILER={nvcc}", env={"PYTHONPATH": str(fake)})
        assert proc.returncode != 0, proc.stdout
        err = " ".join(proc.stderr.split())
        assert f"was built with CUDA {other}: the CUDA major versions must match" in err, proc.stderr
        assert f"Install a CUDA {major - 1}.x toolkit" in err, proc.stderr


def test_cpu_build_of_torch_gets_no_cuda_kernels(tmp_path):
    """A CPU build of torch: auto builds CPU-only even with nvcc present; 1 is an error."""
    nvcc = _nvcc_or_skip()
    fake = _fake_torch(tmp_path, "2.14.1+cpu", None)
    proc = _configure(tmp_path / "auto", "-DDUO_FAST_CUDA=auto", f"-DCMAKE_CUDA_COMPILER={nvcc}", env={"PYTHONPATH": str(fake)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is a CPU-only build: the CUDA kernels are not built" in proc.stdout
    assert "duo_fast: CPU-only build" in proc.stdout
    proc = _configure(tmp_path / "one", "-DDUO_FAST_CUDA=1", f"-DCMAKE_CUDA_COMPILER={nvcc}", env={"PYTHONPATH": str(fake)})
    assert proc.returncode != 0
    assert "install a CUDA build of torch" in " ".join(proc.stderr.split()), proc.stderr
