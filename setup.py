"""Build driver for duo_fast: configures and builds CMakeLists.txt (which owns
every source and flag) and installs the resulting duo_fast/_C*.so.

Environment:
  DUO_FAST_CUDA=auto|0|1     build the CUDA kernels (auto: when a toolkit is found)
  DUO_FAST_CUDA_ARCHS=8.0;9.0 CUDA compute capabilities (default 8.0;9.0, PTX of the highest)
  CUDA_HOME                  toolkit root (found from nvcc on PATH otherwise)
  DUO_FAST_BUILD_JOBS        parallel build jobs (default: CPU count)
  DUO_FAST_LOCAL_VERSION     0 to drop the +cuXYZtorchA.B wheel version suffix
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BASE_VERSION = "0.1.0"
BUILD_INFO = "_build_info.json"  # written by CMakeLists.txt beside _C


@functools.lru_cache(maxsize=None)
def find_cuda_home() -> str | None:
    """Toolkit root (the directory holding bin/nvcc and lib64), or None.

    nvcc on PATH may be a wrapper script elsewhere, so ask nvcc itself where its
    toolkit is (`nvcc --dryrun` on a source prints `#$ _HERE_=<root>/bin`)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and (Path(env) / "bin" / "nvcc").exists():
        return env
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = Path("/usr/local/cuda")
        return str(default) if (default / "bin" / "nvcc").exists() else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.cu"
            src.write_text("")
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                capture_output=True, text=True, timeout=60,
            )
        m = re.search(r"^#\$ _HERE_=(.*)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            root = Path(m.group(1).strip()).resolve().parent
            if (root / "bin" / "nvcc").exists():
                return str(root)
    except (OSError, subprocess.SubprocessError):
        pass
    return str(Path(nvcc).resolve().parent.parent)


def cuda_requested() -> str:
    value = os.environ.get("DUO_FAST_CUDA", "auto").lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"DUO_FAST_CUDA must be auto, 0 or 1, got {value!r}")
    return value


def local_version() -> str:
    """flash-attention-style local version: +cu130torch2.14 or +cputorch2.14."""
    if os.environ.get("DUO_FAST_LOCAL_VERSION", "1") == "0":
        return ""
    try:
        import torch
    except ImportError:
        return ""
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    # As CMakeLists.txt decides: no CUDA kernels against a CPU build of torch.
    cuda_home = find_cuda_home() if cuda_requested() != "0" and torch.version.cuda else None
    if cuda_home:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True)
        m = re.search(r"release (\d+)\.(\d+)", out.stdout)
        if m:
            return f"+cu{m.group(1)}{m.group(2)}torch{torch_mm}"
    return f"+cputorch{torch_mm}"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # CPU-only builds get their own directory, so that switching DUO_FAST_CUDA does
        # not rebuild (or reconfigure) the other variant; so does each torch version
        # (objects compiled against one torch's headers must not be reused for another:
        # tools/build_wheels.sh builds several from one tree).
        variant = "cpu" if cuda_requested() == "0" else "cuda"
        import torch

        torch_tag = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}-torch{torch_tag}-{variant}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            # Drop FindPython's cached interpreter, so that a build folder configured
            # from another venv (tools/build_wheels.sh) takes this one.
            "-U_Python_*",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DDUO_FAST_CUDA={cuda_requested()}",
            # Always passed, so that a value cached by an earlier configure never outlives
            # the environment ("" = the default, or TORCH_CUDA_ARCH_LIST).
            f"-DDUO_FAST_CUDA_ARCHS={os.environ.get('DUO_FAST_CUDA_ARCHS', '')}",
        ]
        cuda_home = find_cuda_home() if cuda_requested() != "0" else None
        if cuda_home:
            args += [
                f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc",
                f"-DCUDAToolkit_ROOT={cuda_home}",
            ]
            os.environ.setdefault("CUDA_HOME", cuda_home)
        elif cuda_requested() == "1":
            raise SystemExit("DUO_FAST_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("DUO_FAST_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--config", cfg, "-j", jobs], check=True)

    def copy_extensions_to_source(self) -> None:
        """In-place builds (build_ext --inplace, editable installs): the build record
        goes beside _C too."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            src = Path(regular_file).with_name(BUILD_INFO)
            if src.exists():
                self.copy_file(str(src), str(Path(inplace_file).with_name(BUILD_INFO)), level=self.verbose)


setup(
    name="duo_fast",
    version=BASE_VERSION + local_version(),
    description="Fast CPU/CUDA kernels for uniform-state discrete diffusion language models (Duo)",
    packages=find_packages(include=["duo_fast", "duo_fast.*"]),
    ext_modules=[CMakeExtension("duo_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "tqdm"],
    entry_points={"console_scripts": ["duo-fast=duo_fast.cli:main"]},
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy", "scipy", "mpmath", "matplotlib"],
                    "demo": ["matplotlib"], "bench": ["matplotlib"]},
    zip_safe=False,
)
