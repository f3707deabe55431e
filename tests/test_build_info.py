"""The build record beside duo_fast._C (_build_info.json, written by CMakeLists.txt)
and the import-time check against the running torch (duo_fast/__init__.py): an
import under another torch major.minor, a CPU-only torch under a CUDA build, or
another CUDA major fails before _C is loaded, naming the wheel to get.

The other torch is faked in a subprocess (torch.__version__ / torch.version.cuda
set before `import duo_fast`), and the record is faked by a copy of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import duo_fast

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(duo_fast.__file__).with_name("_build_info.json")


def _mm(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def _import_with(prelude: str) -> subprocess.CompletedProcess:
    """`import duo_fast` in a fresh interpreter after running prelude (which fakes torch)."""
    code = f"import torch\n{prelude}\nimport duo_fast\nprint('imported', duo_fast.__version__)"
    env = dict(os.environ, PYTHONPATH=str(Path(duo_fast.__file__).parents[1]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_record_describes_this_build():
    assert RECORD.is_file(), f"{RECORD} is missing: every build by setup.py/CMake writes it beside _C"
    info = json.loads(RECORD.read_text())
    built = duo_fast.build_info()
    assert info["version"] == built["version"]
    assert info["torch_version"] == built["torch_version"] == torch.__version__
    assert info["torch_cuda"] == (torch.version.cuda or "")
    assert info["cuda"] is built["cuda"]
    if info["cuda"]:
        assert info["cuda_version"] == built["cuda_version"]
        assert info["cuda_archs"] == built["cuda_archs"].split()
    else:
        assert info["cuda_version"] == "" and info["cuda_archs"] == []
    assert info["cxx11_abi"] == int(torch._C._GLIBCXX_USE_CXX11_ABI)


def test_import_under_the_same_torch_passes():
    p = _import_with("")
    assert p.returncode == 0, p.stderr
    assert "imported" in p.stdout


@pytest.mark.parametrize("fake_version,fake_cuda", [("2.13.0", "13.0"), ("2.15.0", None), ("3.0.1", "12.8")])
def test_import_under_another_torch_minor_names_the_wheel(fake_version, fake_cuda):
    p = _import_with(f"torch.__version__ = {fake_version!r}\ntorch.version.cuda = {fake_cuda!r}")
    assert p.returncode != 0 and "ImportError" in p.stderr, p.stdout + p.stderr
    msg = p.stderr
    info = json.loads(RECORD.read_text())
    mm = _mm(fake_version)
    tag = f"+cu{fake_cuda.replace('.', '')}torch{mm}" if fake_cuda else f"+cputorch{mm}"
    assert f"built against torch {info['torch_version']}" in msg
    assert f"torch {fake_version} is installed" in msg
    assert f"duo_fast-{info['version']}{tag}" in msg, msg
    assert "tools/build_wheels.sh" in msg
    assert "undefined symbol" not in msg  # the check runs before _C is loaded


def test_cuda_build_under_cpu_only_torch_or_other_cuda_major():
    info = json.loads(RECORD.read_text())
    if not info["cuda"]:
        pytest.skip("a CPU-only build loads under a CPU or CUDA torch of the same major.minor")
    mm = _mm(torch.__version__)
    p = _import_with("torch.version.cuda = None")
    assert p.returncode != 0 and "CPU-only build" in p.stderr, p.stderr
    assert f"duo_fast-{info['version']}+cputorch{mm}" in p.stderr
    other = "12.8" if not info["cuda_version"].startswith("12.") else "13.0"
    p = _import_with(f"torch.version.cuda = {other!r}")
    assert p.returncode != 0 and "CUDA major versions must match" in p.stderr, p.stderr
    assert f"duo_fast-{info['version']}+cu{other.replace('.', '')}torch{mm}" in p.stderr


def test_check_reads_a_given_record(tmp_path):
    info = json.loads(RECORD.read_text())
    assert duo_fast._check_build(RECORD) == info
    assert duo_fast._check_build(tmp_path / "absent.json") is None  # a build without a record: nothing to check
    fake = dict(info, torch_version="1.13.1+cu117", cuda=True, cuda_version="11.7")
    path = tmp_path / "_build_info.json"
    path.write_text(json.dumps(fake))
    with pytest.raises(ImportError, match=r"built against torch 1\.13\.1\+cu117 \(CUDA 11\.7\)"):
        duo_fast._check_build(path)
