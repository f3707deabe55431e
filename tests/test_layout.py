"""The repository's layout (issue 21): every op is found by its name in each layer,
and neither backend reaches into the other's files.

    csrc/include/duo_fast/<op>.h   the math, shared by host and device
    csrc/cpu/<op>.cpp              the CPU kernel
    csrc/cuda/<op>.cu              the CUDA kernel
    duo_fast/ops/<op>.py           the wrapper, fake kernel and autograd
    duo_fast/reference/<op>.py     the float64 oracle
    tests/test_<op>.py             its tests
    duo_fast/bench/cases_<op>.py   its benchmark cases
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import duo_fast

ROOT = Path(__file__).resolve().parents[1]

KERNEL_OPS = ("gamma_to_alpha", "sample_zt", "curriculum_embed", "curriculum_topk", "usdm_loss", "distill_kl",
              "sample_step", "canvas_step", "softmax_embed")
COMPOSITE_OPS = ("linear_usdm_loss", "linear_distill_kl", "linear_sample_step")  # Python over a kernel op: no header or kernels of their own


def _places(op: str, kernels: bool) -> list[Path]:
    python = [ROOT / "duo_fast" / "ops" / f"{op}.py", ROOT / "duo_fast" / "reference" / f"{op}.py",
              ROOT / "tests" / f"test_{op}.py", ROOT / "duo_fast" / "bench" / f"cases_{op}.py"]
    if not kernels:
        return python
    return [ROOT / "csrc" / "include" / "duo_fast" / f"{op}.h", ROOT / "csrc" / "cpu" / f"{op}.cpp",
            ROOT / "csrc" / "cuda" / f"{op}.cu"] + python


@pytest.mark.parametrize("op", KERNEL_OPS + COMPOSITE_OPS)
def test_every_op_is_found_by_its_name_in_each_layer(op):
    missing = [str(p.relative_to(ROOT)) for p in _places(op, op in KERNEL_OPS) if not p.is_file()]
    assert not missing, f"{op}: missing {missing}"
    assert callable(getattr(duo_fast, op)) and callable(getattr(duo_fast.reference, op))


def test_every_schema_is_implemented_in_the_files_of_its_op():
    """Each op of the one schema block is registered (m.impl) by the CPU file of the op
    family it belongs to, and launched from the CUDA bindings."""
    schemas = re.findall(r'm\.def\("(\w+)\(', (ROOT / "csrc" / "registration.cpp").read_text())
    impls = {}
    for f in (ROOT / "csrc" / "cpu").glob("*.cpp"):
        for name in re.findall(r'm\.impl\("(\w+)"', f.read_text()):
            impls[name] = f.stem
    bindings = (ROOT / "csrc" / "cuda" / "bindings.cpp").read_text()
    for name in schemas:
        if name == "check_device_errors":
            continue
        family = impls.get(name)
        assert family is not None, f"{name} has no CPU implementation"
        assert name.startswith(family) or family in ("curriculum_topk", "curriculum_embed", "sample_step"), (name, family)
        assert f'm.impl("{name}"' in bindings, f"{name} has no CUDA implementation"


def _local_includes(path: Path) -> list[str]:
    return re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), re.MULTILINE)


def test_no_backend_includes_the_other_backends_files():
    cpu = {p.name for p in (ROOT / "csrc" / "cpu").iterdir()}
    cuda = {p.name for p in (ROOT / "csrc" / "cuda").iterdir()}
    for f in (ROOT / "csrc" / "cpu").iterdir():
        bad = [i for i in _local_includes(f) if Path(i).name in cuda or i.startswith("cuda/")]
        assert not bad, f"{f.name} includes CUDA backend files {bad}"
    for f in (ROOT / "csrc" / "cuda").iterdir():
        bad = [i for i in _local_includes(f) if Path(i).name in cpu or i.startswith("cpu/")]
        assert not bad, f"{f.name} includes CPU backend files {bad}"


def test_no_cuda_source_includes_torch():
    """Kernels take raw pointers and a stream; the ATen glue is bindings.cpp."""
    for f in (ROOT / "csrc" / "cuda").glob("*.cu*"):
        text = f.read_text()
        assert not re.search(r'#\s*include\s*[<"](ATen|torch|c10)/', text), f.name


def test_no_reference_to_notes_outside_the_repository():
    """The math contract is docs/math.md; no path outside the checkout in code (the Duo
    checkout's lookup rule, $DUO_REFERENCE_DIR or ../shared/duo-reference, is the one
    exception: a place the user may put it)."""
    bad = []
    for f in [*ROOT.glob("csrc/**/*"), *ROOT.glob("duo_fast/**/*.py"), *ROOT.glob("tests/**/*"),
              *ROOT.glob("benchmarks/**/*.sh"), *ROOT.glob("tools/*")]:
        if not f.is_file() or f.suffix not in (".h", ".cpp", ".cu", ".cuh", ".py", ".sh") or f.name == "test_layout.py":
            continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if re.search(r"\bSPEC\b(?!IALS)|/work/|\.\./shared/(?!duo-reference)", line):
                bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)
