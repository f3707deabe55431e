"""The GPU check (benchmarks/gpu/check.sh, issue 12) in its --dry-run: the same
steps and files as on the H200 machine, at tiny sizes on the CPU, so that the
device minutes are never lost to a typo. Also the report's reading of what the
GPU steps write (compute-sanitizer refused by gVisor, errors found, junit) on
planted logs, and the cost model against the closed forms the issue quotes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from duo_fast.bench import cost_model, report

ROOT = Path(__file__).resolve().parents[1]

OUT_FILES = {"gpu_report.md", "gpu_results.json", "gpu_log.txt", "gpu_tests_junit.xml", "gpu_sanitizer.txt",
             "gpu_build.log"}
OPS = {"usdm_loss", "distill_kl", "sample_step", "sample_zt", "curriculum_embed", "curriculum_topk_embed",
       "curriculum_topk", "linear_usdm_loss", "linear_distill_kl", "linear_sample_step", "gamma_to_alpha"}
try:  # DiffusionGemma's rows need transformers' models.diffusion_gemma (requirements-test.txt)
    import transformers.models.diffusion_gemma.generation_diffusion_gemma  # noqa: F401

    OPS.add("diffusion_gemma")
except ImportError:
    pass


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path_factory.mktemp("work")))
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "check.sh"), "--dry-run"], cwd=str(out),
                       env=env, capture_output=True, text=True, timeout=600)
    return out, p


def test_dry_run_writes_the_files_the_device_tool_brings_back(dry_run):
    out, p = dry_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = {f.name for f in out.iterdir()}
    assert files == OUT_FILES, files
    # the device tool brings back at most 8 files, named in letters, digits, '.', '_', '-'
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    # the short table is printed last
    tail = p.stdout.strip().splitlines()
    assert any("duo_fast GPU check: summary" in ln for ln in tail[-40:])
    assert tail[-1].startswith("gamma_to_alpha")


def test_dry_run_results_structure(dry_run):
    out, _ = dry_run
    res = json.loads((out / "gpu_results.json").read_text())
    assert res["dry_run"] is True
    assert res["env"]["commit"] and res["env"]["torch"]
    assert {s: res["steps"][s]["status"] for s in report.STEP_ORDER} == {
        "env": "ok", "build": "ok", "tests": "ok", "sanitizer": "done", "bench": "ok"}
    # tests: the GPU selection is valid and non-empty; without a device every case skips with the reason
    t = res["tests"]
    assert t["tests"] >= 14 and t["failures"] == 0 and t["errors"] == 0
    assert t["skipped"] == t["tests"] and all(r.startswith("no CUDA device") for r in t["skip_reasons"])
    # the sanitizer's calls reached every op without a failure
    for tool in ("memcheck", "racecheck"):
        s = res["sanitizer"][tool]
        assert s["status"].startswith("dry run") and s["calls_ok"] >= 25 and s["calls_failed"] is None
    b = res["bench"]
    assert b["complete"] and b["rates"]["copy_gbps"] > 0 and b["rates"]["bf16_tflops"] > 0
    assert {r["op"] for r in b["rows"]} == OPS
    for r in b["rows"]:
        duo = r["sides"]["duo"]
        if duo["status"] != "OK":  # an op that does not take 16-bit logits yet (issue 12, 2a)
            assert r["dtype"] == "bf16" and "dtype" in duo["error"], (r["row"], duo)
            continue
        assert duo["median_ms"] > 0 and len(duo["times_ms"]) == duo["repeats"]
        assert r["model"]["floor"]["ms"] > 0 and r["measured_over_floor"] > 0
        for side in ("ref", "compiled"):
            if side in r["sides"]:
                assert r["sides"][side]["status"] in ("OK", "SKIPPED"), (r["row"], side, r["sides"][side])
    # exactly one torch.compile side ran in the dry run, and it ran
    compiled = [r["sides"]["compiled"] for r in b["rows"] if "compiled" in r["sides"]]
    assert sum(c["status"] == "OK" for c in compiled) == 1
    md = (out / "gpu_report.md").read_text()
    for heading in ("## Steps", "## Build", "## Real-GPU tests", "## compute-sanitizer", "## Benchmarks"):
        assert heading in md


def test_report_reads_sanitizer_outcomes(tmp_path):
    (tmp_path / "sanitizer_memcheck.log").write_text(
        "========= COMPUTE-SANITIZER\n========= Error: Device not supported\nerror 999\nexit 1\n")
    (tmp_path / "sanitizer_racecheck.log").write_text(
        "========= Invalid __global__ read of size 4 bytes\n=========     at usdm_loss_kernel\nSANITIZE_CALLS_OK 31\n"
        "========= ERROR SUMMARY: 2 errors\n")
    s = report.gpu_sanitizer(tmp_path)
    assert s["memcheck"]["status"] == "refused by the runtime"
    assert s["racecheck"]["status"] == "ERRORS" and s["racecheck"]["errors"] == 2
    assert s["racecheck"]["first_errors"] == ["========= Invalid __global__ read of size 4 bytes"]
    (tmp_path / "sanitizer_racecheck.log").write_text("SANITIZE_CALLS_OK 31\n========= ERROR SUMMARY: 0 errors\n")
    assert report.gpu_sanitizer(tmp_path)["racecheck"]["status"] == "clean"


def test_report_reads_junit_failures(tmp_path):
    (tmp_path / "tests_junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a[cuda]"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_x" name="test_b"/>'
        '<testcase classname="tests.test_x" name="test_c"><skipped message="no CUDA device"/></testcase>'
        '</testsuite></testsuites>')
    t = report.gpu_tests(tmp_path)
    assert (t["passed"], t["failures"], t["skipped"]) == (1, 1, 1)
    assert t["failed_tests"] == [{"test": "tests.test_x::test_a[cuda]", "kind": "failure", "message": "assert 1 == 2"}]


def test_cost_model_matches_the_issue_numbers():
    N, K, d = 65536, 50257, 768
    # one fp32 logits tensor is 13 GB: the loss floor reads it once and writes the gradient once
    p = cost_model.predict("usdm_loss", N, K, d, 4)
    assert p["floor"]["bytes"] == 2 * N * K * 4 and abs(N * K * 4 / 1e9 - 13.2) < 0.1
    # today's kernel: 3 sweeps + the gradient write; the 16-bit plan (2a): the same in 2 bytes
    assert p["today"]["bytes"] == 4 * N * K * 4
    assert cost_model.predict("usdm_loss", N, K, d, 2)["planned"]["bytes"] == 4 * N * K * 2
    # curriculum_embed: ~10 TFLOP per fwd+bwd, ~15 ms on tensor cores, ~200 ms on fp32 FMA
    e = cost_model.predict("curriculum_embed", N, K, d)
    assert e["floor"]["flops"] == 4 * N * K * d and 9.5e12 < e["floor"]["flops"] < 10.5e12
    assert 11 < e["floor"]["ms"] < 16 and 150 < e["today"]["ms"] < 200
    # the two-read sampler moves about half of today's three-pass bytes
    s = cost_model.predict("sample_step", N, K, d, 4)
    assert s["floor"]["bytes"] == N * K * 4 and s["planned"]["bytes"] < 0.6 * s["today"]["bytes"]
    # every row of the model has a floor no larger than what any kernel moves
    for r in cost_model.ROWS:
        for b in r.dtypes or (4,):
            q = cost_model.predict(r.op, N, K, d, b, variant=r.variant)
            for k in ("today", "planned", "duo"):
                if q[k] is not None:
                    assert q[k]["bytes"] >= q["floor"]["bytes"] and q[k]["ms"] >= q["floor"]["ms"] * 0.999, (r.op, k)
    assert "| usdm_loss" in cost_model.markdown_table()
