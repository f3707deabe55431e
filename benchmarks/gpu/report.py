"""The GPU check's report: gathers what benchmarks/gpu/check.sh's steps left in its
work folder and writes $OUT/gpu_report.md and $OUT/gpu_results.json; prints a
short table last. Imports no torch (it runs after every step, also when the
steps before it failed or were cut by their time box).

    python -m benchmarks.gpu.report --work WORK --out OUT [--final]

Work folder (written by check.sh): env.json (machine, versions, commit), steps.tsv
(one line per step: name, status, seconds, time box, detail), build.log and
build_info.json, tests_junit.xml / tests.log, sanitizer_<tool>.log, bench.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from . import cost_model

STEP_ORDER = ("env", "build", "tests", "sanitizer", "bench")
# what compute-sanitizer says when the runtime (gVisor) does not let it attach
REFUSED_PATTERNS = ("Device not supported", "error 999", "Unable to find any supported",
                    "Target application terminated before first instrumented API call",
                    "CUDA_ERROR_NOT_SUPPORTED")


def _read(p: Path, default=""):
    try:
        return p.read_text(errors="replace")
    except OSError:
        return default


def _json(p: Path, default=None):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return default


def steps(work: Path) -> dict:
    out = {}
    for line in _read(work / "steps.tsv").splitlines():
        parts = line.split("\t")
        if len(parts) >= 4:
            name, status, secs, box = parts[:4]
            out[name] = {"status": status, "seconds": float(secs or 0), "time_box_s": float(box or 0),
                         "detail": parts[4] if len(parts) > 4 else ""}
    return out


def tests(work: Path) -> dict:
    res: dict = {"junit": None}
    x = work / "tests_junit.xml"
    if x.is_file():
        try:
            root = ET.parse(x).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
            fails, skips = [], {}
            for case in root.iter("testcase"):
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                for tag in ("failure", "error"):
                    el = case.find(tag)
                    if el is not None:
                        fails.append({"test": name, "kind": tag, "message": (el.get("message") or "")[:400]})
                el = case.find("skipped")
                if el is not None:
                    reason = (el.get("message") or "")[:160]
                    skips[reason] = skips.get(reason, 0) + 1
            res.update(tot)
            res["failed_tests"] = fails
            res["skip_reasons"] = dict(sorted(skips.items(), key=lambda kv: -kv[1])[:10])
            res["junit"] = x.name
        except ET.ParseError as e:
            res["parse_error"] = str(e)
    log = _read(work / "tests.log")
    m = re.search(r"(\d+)(?:/\d+)? tests? collected|collected (\d+) items?(?: / (\d+) deselected)?", log)
    if m:
        res["collected_line"] = m.group(0)
    m = re.findall(r"^(\d+)(?:/\d+)? tests? collected.*$|^=+ .*(?:passed|failed|error|skipped|deselected|selected).* =+$",
                   log, re.MULTILINE)
    tail = [ln for ln in log.splitlines() if re.search(r"(passed|failed|deselected|selected|collected|error)", ln)]
    res["summary_line"] = tail[-1].strip("= ") if tail else ""
    return res


def sanitizer(work: Path) -> dict:
    out = {}
    for tool in ("memcheck", "racecheck"):
        p = work / f"sanitizer_{tool}.log"
        if not p.is_file():
            continue
        log = _read(p)
        m = re.search(r"ERROR SUMMARY: (\d+) error", log)
        rm = re.search(r"RACECHECK SUMMARY: (\d+) hazard", log)
        calls_ok = re.search(r"SANITIZE_CALLS_OK (\d+)", log)
        failed = re.search(r"SANITIZE_CALLS_FAILED.*", log)
        status = "not run"
        if "DRY RUN" in log:
            status = "dry run (calls on the CPU, no compute-sanitizer)"
        elif any(s in log for s in REFUSED_PATTERNS):
            status = "refused by the runtime"
        elif m:
            status = "clean" if int(m.group(1)) == 0 and not failed else "ERRORS"
        elif "timed out" in log:
            status = "timed out"
        out[tool] = {"status": status, "errors": int(m.group(1)) if m else None,
                     "hazards": int(rm.group(1)) if rm else None,
                     "calls_ok": int(calls_ok.group(1)) if calls_ok else None,
                     "calls_failed": failed.group(0) if failed else None,
                     "first_errors": [ln for ln in log.splitlines() if ln.startswith("========= ") and
                                      ("Invalid" in ln or "Race" in ln or "hazard" in ln.lower() or "Error" in ln)][:12],
                     "log_tail": log[-1500:]}
    return out


def bench(work: Path) -> dict:
    env, rates, rows, sides, done = {}, {}, {}, {}, False
    for line in _read(work / "bench.jsonl").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        k = d.get("kind")
        if k == "env":
            env = d
        elif k == "rates":
            rates = d
        elif k == "row":
            rows[d["row"]] = d
        elif k == "side":
            sides.setdefault(d["row"], {})[d["side"]] = d
        elif k == "done":
            done = True
    copy_tbps = (rates.get("copy_gbps") or cost_model.COPY_TBPS * 1e3) / 1e3
    measured_rates = dict(cost_model.RATES)
    if rates.get("bf16_tflops"):
        measured_rates["bf16_tc"] = rates["bf16_tflops"]
    if rates.get("fp32_tflops"):
        measured_rates["fp32"] = rates["fp32_tflops"]
    dry = env.get("device") == "cpu"
    out_rows = []
    for rid, r in rows.items():
        b = {"fp32": 4, "bf16": 2, "fp16": 2, None: 4}[r.get("dtype")]
        variant = {"sample_zt": r["variant"], "curriculum_topk_embed": "fwd+bwd", "curriculum_topk": f"k={cost_model.TOPK}"}.get(r["op"], "")
        # floors at the measured rates of this run (nominal H200 rates in the dry run: its CPU rates mean nothing)
        model = cost_model.predict(r["op"], r["N"], r["K"], r["d"], b, variant=variant,
                                   copy_tbps=cost_model.COPY_TBPS if dry else copy_tbps,
                                   rates=None if dry else measured_rates)
        s = sides.get(rid, {})
        row = {**r, "sides": s, "model": model}
        duo = s.get("duo", {})
        ms = duo.get("median_ms")
        if ms and model:
            row["measured_over_floor"] = ms / model["floor"]["ms"]
            today = model["today"] or model["planned"]
            row["gbps"] = today["bytes"] / (ms * 1e-3) / 1e9
            row["pct_of_copy"] = 100 * row["gbps"] / (copy_tbps * 1e3) if rates.get("copy_gbps") else None
            if today["flops"]:
                row["tflops"] = today["flops"] / (ms * 1e-3) / 1e12
        for side in ("ref", "compiled"):
            o = s.get(side, {}).get("median_ms")
            row[f"speedup_{side}"] = o / ms if (o and ms) else None
        out_rows.append(row)
    return {"env": env, "rates": rates, "rows": out_rows, "complete": done}


def _f(v, fmt="{:.3g}"):
    return "—" if v is None else fmt.format(v)


def _side_cell(s: dict | None) -> str:
    if not s:
        return "—"
    if s.get("status") in ("OOM", "ERROR", "SKIPPED"):
        return s["status"]
    return _f(s.get("median_ms"))


def _peak(s):
    return _f(s.get("peak_mib"), "{:.0f}") if s and s.get("peak_mib") is not None else "—"


def markdown(res: dict) -> str:
    env = res.get("env") or {}
    benv = res["bench"].get("env") or {}
    lines = [f"# duo_fast GPU check{' (DRY RUN: tiny sizes on the CPU)' if res.get('dry_run') else ''}", ""]
    lines += ["| machine | |", "|---|---|"]
    for k, label in (("date", "date"), ("commit", "commit"), ("gpu", "GPU"), ("driver", "driver"),
                     ("cpu", "CPU"), ("cpu_count", "CPUs"), ("python", "python"), ("torch", "torch"),
                     ("torch_cuda", "torch CUDA"), ("nvcc", "nvcc"), ("compute_sanitizer", "compute-sanitizer"),
                     ("kernel", "kernel")):
        if env.get(k) not in (None, ""):
            lines.append(f"| {label} | {env[k]} |")
    if benv:
        lines.append(f"| reference side | {benv.get('reference')}" + (f" ({benv.get('reference_reason')})"
                                                                      if benv.get("reference_reason") else "") + " |")
    lines += ["", "## Steps", "", "| step | status | seconds | time box s | detail |", "|---|---|---|---|---|"]
    for name in STEP_ORDER:
        st = res["steps"].get(name)
        if st:
            lines.append(f"| {name} | {st['status']} | {st['seconds']:.0f} | {st['time_box_s']:.0f} | {st['detail']} |")
        else:
            lines.append(f"| {name} | not reached | | | |")
    b = res.get("build") or {}
    lines += ["", "## Build", "", f"- build_info: `{json.dumps(b.get('build_info'))}`"]
    if b.get("log_tail"):
        lines += ["- log tail:", "", "```", b["log_tail"], "```"]
    t = res.get("tests") or {}
    lines += ["", "## Real-GPU tests", ""]
    if "tests" in t:
        lines.append(f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped "
                     f"(of {t['tests']}; selection `{res.get('test_selection', '')}`)")
        for f in t.get("failed_tests", [])[:40]:
            lines.append(f"- FAILED {f['test']}: {f['message']}")
        if t.get("skip_reasons"):
            lines.append("- skip reasons: " + "; ".join(f"{n} x {r}" for r, n in t["skip_reasons"].items()))
    lines.append(f"- pytest: {t.get('summary_line', '')}")
    lines += ["", "## compute-sanitizer", "", "| tool | status | errors | calls |", "|---|---|---|---|"]
    for tool, s in (res.get("sanitizer") or {}).items():
        lines.append(f"| {tool} | {s['status']} | {_f(s['errors'], '{}')} | {_f(s['calls_ok'], '{}')} ok"
                     + (f", {s['calls_failed']}" if s.get("calls_failed") else "") + " |")
        for e in s.get("first_errors", []):
            lines.append(f"  - `{e}`")
    bn = res["bench"]
    r = bn.get("rates") or {}
    lines += ["", "## Benchmarks", "",
              f"Measured in this run: device copy {_f(r.get('copy_gbps'), '{:.0f}')} GB/s (read + write), "
              f"bf16 GEMM {_f(r.get('bf16_tflops'), '{:.0f}')} TFLOP/s ({r.get('gemm_n')}^3), fp32 GEMM "
              f"{_f(r.get('fp32_tflops'), '{:.1f}')} TFLOP/s (no TF32). Floor = the cost model's "
              "(benchmarks/gpu/cost_model.py) least bytes / copy rate or least flops / GEMM rate at these rates; "
              "predicted = the model's time for today's kernel and for the kernel planned in issue 12 (2a-2d). "
              "GB/s and TFLOP/s count the bytes and flops of today's kernel. Times: CUDA events, median of "
              "repeats after warm-up; small inputs rotated and L2 flushed before each call. Peak = "
              "torch.cuda.max_memory_allocated growth in one call." + ("" if bn.get("complete") else
                                                                       " **The bench step did not finish: rows below "
                                                                       "without numbers were not reached.**"), "",
              "| op | N | logits | duo_fast ms | floor ms | measured / floor | predicted today / planned ms | GB/s | "
              "% copy | TFLOP/s | Duo eager ms | speedup | compiled ms | speedup | peak MiB duo / eager / compiled |",
              "|" + "---|" * 15]
    notes = []
    for row in bn["rows"]:
        s = row["sides"]
        m = row.get("model") or {}
        today = (m.get("today") or {}).get("ms") if m else None
        planned = (m.get("planned") or {}).get("ms") if m else None
        lines.append(
            f"| {row['op']} {row['variant']} | {row['N']} | {row.get('dtype') or '—'} | {_side_cell(s.get('duo'))} | "
            f"{_f(m.get('floor', {}).get('ms') if m else None)} | {_f(row.get('measured_over_floor'), '{:.2f}')} | "
            f"{_f(today)} / {_f(planned)} | {_f(row.get('gbps'), '{:.0f}')} | {_f(row.get('pct_of_copy'), '{:.0f}')} | "
            f"{_f(row.get('tflops'), '{:.1f}')} | {_side_cell(s.get('ref'))} | {_f(row.get('speedup_ref'), '{:.2f}x')} | "
            f"{_side_cell(s.get('compiled'))} | {_f(row.get('speedup_compiled'), '{:.2f}x')} | "
            f"{_peak(s.get('duo'))} / {_peak(s.get('ref'))} / {_peak(s.get('compiled'))} |")
        for side, d in s.items():
            if d.get("status") in ("OOM", "ERROR", "SKIPPED"):
                notes.append(f"{row['row']} [{side}] {d['status']}: {d.get('error', '')}")
        notes += [n for n in row.get("notes", []) if n not in notes]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def short_table(res: dict) -> str:
    st = res["steps"]
    t = res.get("tests") or {}
    lines = ["", "==== duo_fast GPU check: summary ====",
             "steps: " + ", ".join(f"{n} {st[n]['status']} ({st[n]['seconds']:.0f}s)" for n in STEP_ORDER if n in st)]
    if "tests" in t:
        lines.append(f"tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
    for tool, s in (res.get("sanitizer") or {}).items():
        lines.append(f"{tool}: {s['status']}" + (f" ({s['errors']} errors)" if s.get("errors") else ""))
    r = res["bench"].get("rates") or {}
    lines.append(f"copy {_f(r.get('copy_gbps'), '{:.0f}')} GB/s, bf16 GEMM {_f(r.get('bf16_tflops'), '{:.0f}')} TFLOP/s")
    lines.append(f"{'op':<36} {'N':>6} {'dt':>4} {'duo ms':>9} {'/floor':>7} {'vs eager':>9} {'vs comp':>8}")
    for row in res["bench"]["rows"]:
        s = row["sides"]
        lines.append(f"{(row['op'] + ' ' + row['variant'])[:36]:<36} {row['N']:>6} {(row.get('dtype') or '-'):>4} "
                     f"{_side_cell(s.get('duo')):>9} {_f(row.get('measured_over_floor'), '{:.2f}'):>7} "
                     f"{_f(row.get('speedup_ref'), '{:.2f}x') if row.get('speedup_ref') else _side_cell(s.get('ref')):>9} "
                     f"{_f(row.get('speedup_compiled'), '{:.2f}x') if row.get('speedup_compiled') else _side_cell(s.get('compiled')):>8}")
    return "\n".join(lines)


def gather(work: Path) -> dict:
    env = _json(work / "env.json", {}) or {}
    return {
        "env": env, "dry_run": bool(env.get("dry_run")), "test_selection": env.get("test_selection", ""),
        "steps": steps(work),
        "build": {"build_info": _json(work / "build_info.json"), "log_tail": _read(work / "build.log")[-1500:]},
        "tests": tests(work), "sanitizer": sanitizer(work), "bench": bench(work),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--final", action="store_true", help="print the short table")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    res = gather(work)
    (out / "gpu_results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "gpu_report.md").write_text(markdown(res))
    if args.final:
        print(short_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
