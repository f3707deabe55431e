"""The one report writer of duo_fast's benchmarks (no torch, no duo_fast import, so it
also runs where the build failed):

* ``duo-fast bench`` runs (duo_fast.bench.cli): the markdown table, the CSV with the
  machine, results.json, and time.png / memory.png (one bar each for duo_fast, the
  eager reference and the compiled reference per case, log scale; matplotlib);
  ``merge_runs`` joins several runs' results.json (``duo-fast bench --merge``);
* the GPU check (benchmarks/gpu/check.sh): gathers what its steps left in its work
  folder and writes $OUT/gpu_report.md and $OUT/gpu_results.json, and prints a short
  table. check.sh runs this file as a script:

    python duo_fast/bench/report.py --work WORK --out OUT [--final]

  Work folder (written by check.sh): env.json (machine, versions, commit), steps.tsv
  (one line per step: name, status, seconds, time box, detail), build.log and
  build_info.json, tests_junit.xml / tests.log, sanitizer_<tool>.log, bench.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__:
    from . import cost_model
else:  # run as a script by the GPU check: works without a built duo_fast
    import cost_model  # type: ignore[no-redef]

SIDES = ("duo", "ref", "compiled")  # duo_fast, the reference eager, torch.compile of the reference
SIDE_LABELS = {"duo": "duo_fast", "ref": "reference", "compiled": "compiled reference"}



def _fmt_ms(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _fmt_mib(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt_ratio(v, suffix="x"):
    if v is None:
        return "—"
    if v == 0:
        return f"0{suffix}"
    if v >= 100:
        return f"{v:.0f}{suffix}"
    if v >= 10:
        return f"{v:.1f}{suffix}"
    if v >= 0.01:
        return f"{v:.2f}{suffix}"
    return f"{v:.1e}{suffix}"


def _side(r, side, key):
    s = r.get(side)
    if not s:
        return None
    if "error" in s:
        return "ERR"
    return s.get(key)


def _value(r, side, key):
    v = _side(r, side, key)
    return None if v == "ERR" else v


def _ref_label(results) -> str:
    sources = {_value(r, "ref", "source") for r in results if r.get("ref")} - {None}
    return "Duo code eager ms" if sources and all("Duo code" in s for s in sources) else "reference eager ms"


def markdown(results: list[dict], env: dict) -> str:
    show_compiled = any(r.get("compiled") for r in results)
    show_gbps = any(r.get("gbps") for r in results)
    cols = ["op", "size", "duo_fast ms", _ref_label(results), "speedup vs eager"]
    if show_compiled:
        cols += ["torch.compile ms", "speedup vs compiled"]
    cols += ["duo_fast peak MiB", "eager peak MiB"]
    if show_compiled:
        cols += ["compiled peak MiB"]
    cols += ["memory duo/eager"]
    if show_gbps:
        cols += ["duo_fast GB/s", "% of copy"]
    cols += ["reference code", "target (BASELINES.md)", "status"]
    build = env.get("duo_fast_build") or {}
    copy = env.get("copy_gbps")
    lines = [
        f"duo_fast {env.get('duo_fast', '?')} benchmark — {env['mode']} — device {env['device']}"
        + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f" — {env['threads']} thread(s) — {env['cpu']} ({env['cpu_count']} CPUs) — torch {env['torch']}"
        + (f" (CUDA {env['torch_cuda']})" if env.get("torch_cuda") else "")
        + f" — duo_fast built with CUDA: {build.get('cuda_version') or 'no'} — {env['date']}"
        + f" — load average (1/5/15 min) {env['load_avg_start']} at the start, {env.get('load_avg_end', '?')} at the end",
        "",
        (f"Median of {env.get('rounds', 1)} x 5 calls (after warm-up): {env.get('rounds', 1)} fresh processes per side, "
         "the sides' order reversed every other round " if env.get("rounds", 1) > 1
         else "Median of 5 calls (after warm-up) in a fresh process per side ")
        +
        f"({env['timing']}); peak MiB = peak extra memory during one call ({env['memory_method']}). "
        "Speedup = reference time / duo_fast time (< 1: duo_fast is slower); memory = duo_fast / eager "
        "reference (where the reference needs >= 1 MiB). 'reference code': what the reference side ran — "
        "'Duo code' (the Duo codebase's own functions) or 'eager copy' (the same torch ops, where the Duo "
        "code was not found). Compare ratios, not absolute times (±50% machine noise)."
        + (f" Device copy bandwidth measured in this run: {copy:.1f} GB/s (read + write)." if copy else ""),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    footnotes: list[str] = []

    def mark(text):
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    for r in results:
        marks = []
        for side in SIDES:
            s = r.get(side)
            if s and "error" in s:
                marks.append(mark(f"{r['id']} [{SIDE_LABELS[side]}] failed: {s['error']}"))
            elif s and s.get("note"):
                marks.append(mark(f"{SIDE_LABELS[side]}: {s['note']}"))
        for n in r.get("notes", []):
            marks.append(mark(n))

        def ms(side):
            v = _side(r, side, "median_ms")
            return v if v == "ERR" else _fmt_ms(v)

        def mib(side):
            v = _side(r, side, "peak_mib")
            return v if v == "ERR" else _fmt_mib(v)

        row = [f"{r['op']} {' '.join(marks)}".strip(), r["size"], ms("duo"), ms("ref"), _fmt_ratio(r.get("speedup_ref"))]
        if show_compiled:
            row += [ms("compiled"), _fmt_ratio(r.get("speedup_compiled"))]
        row += [mib("duo"), mib("ref")]
        if show_compiled:
            row += [mib("compiled")]
        row += [_fmt_ratio(r.get("mem_ratio_ref"))]
        if show_gbps:
            row += [f"{r['gbps']:.1f}" if r.get("gbps") else "—",
                    f"{r['pct_of_copy']:.0f}%" if r.get("pct_of_copy") else "—"]
        row += [_value(r, "ref", "source") or "—", r.get("target") or "—", r.get("status") or "—"]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    if footnotes:
        lines.append("")
        lines += [f"[{i + 1}] {t}" for i, t in enumerate(footnotes)]
    return "\n".join(lines)


# ---- CSV ---------------------------------------------------------------------------------

MACHINE_COLUMNS = ["date", "cpu", "cpu_count", "threads", "device", "gpu", "torch", "torch_cuda",
                   "duo_fast", "duo_fast_cuda", "duo_fast_cuda_archs", "python", "mode", "copy_gbps",
                   "load_avg_start", "load_avg_end"]
CSV_COLUMNS = ["op", "case", "size", "duo_ms", "ref_ms", "compiled_ms", "speedup_ref", "speedup_compiled",
               "duo_peak_mib", "ref_peak_mib", "compiled_peak_mib", "mem_ratio_ref", "duo_gbps", "pct_of_copy",
               "ref_source", "target", "status", "duo_first_call_ms", "ref_first_call_ms", "compiled_first_call_ms",
               "errors"] + MACHINE_COLUMNS


def csv_rows(results: list[dict], env: dict) -> list[dict]:
    build = env.get("duo_fast_build") or {}
    machine = {k: env.get(k, "") for k in MACHINE_COLUMNS}
    machine["duo_fast_cuda"] = build.get("cuda_version") or ""
    machine["duo_fast_cuda_archs"] = build.get("cuda_archs") or ""
    rows = []
    for r in results:
        errors = "; ".join(f"{s}: {r[s]['error']}" for s in SIDES if r.get(s) and "error" in r[s])
        rows.append({
            "op": r["op"], "case": r["id"], "size": r["size"],
            "duo_ms": _value(r, "duo", "median_ms"), "ref_ms": _value(r, "ref", "median_ms"),
            "compiled_ms": _value(r, "compiled", "median_ms"),
            "speedup_ref": r.get("speedup_ref"), "speedup_compiled": r.get("speedup_compiled"),
            "duo_peak_mib": _value(r, "duo", "peak_mib"), "ref_peak_mib": _value(r, "ref", "peak_mib"),
            "compiled_peak_mib": _value(r, "compiled", "peak_mib"), "mem_ratio_ref": r.get("mem_ratio_ref"),
            "duo_gbps": r.get("gbps"), "pct_of_copy": r.get("pct_of_copy"),
            "ref_source": _value(r, "ref", "source"), "target": r.get("target"), "status": r.get("status"),
            "duo_first_call_ms": _value(r, "duo", "first_call_ms"), "ref_first_call_ms": _value(r, "ref", "first_call_ms"),
            "compiled_first_call_ms": _value(r, "compiled", "first_call_ms"), "errors": errors,
            **machine,
        })
    return rows


def write_csv(path: Path, results: list[dict], env: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in csv_rows(results, env):
            w.writerow({k: "" if v is None else v for k, v in row.items()})


# ---- plots -------------------------------------------------------------------------------

PLOT_SIDES = (("duo", "duo_fast", "#1f77b4"), ("ref", "eager reference", "#ff7f0e"),
              ("compiled", "torch.compile", "#2ca02c"))
MIB_FLOOR = 0.01  # log scale: a peak below this is drawn at it


def write_plots(out: Path, results: list[dict], env: dict) -> list[Path]:
    """time.png and memory.png: per case, one horizontal bar each for duo_fast, the
    eager reference and the compiled reference (missing sides: no bar), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if any(_value(r, s, "median_ms") is not None for s, _, _ in PLOT_SIDES)]
    labels = [f"{r['id']}" for r in rows]
    title_machine = (f"{env.get('gpu') or env['cpu']}, {env['threads']} thread(s), torch {env['torch']}, "
                     f"{env['mode']}, {env['date'][:10]}")
    paths = []
    for key, fname, xlabel, floor in (("median_ms", "time.png", "median time per call (ms, log scale)", None),
                                      ("peak_mib", "memory.png", "peak extra memory (MiB, log scale)", MIB_FLOOR)):
        n = len(rows)
        fig, ax = plt.subplots(figsize=(10, 1.2 + 0.42 * max(n, 1)))
        h = 0.27
        for j, (side, name, color) in enumerate(PLOT_SIDES):
            ys, vals = [], []
            for i, r in enumerate(rows):
                v = _value(r, side, key)
                if v is None:
                    continue
                ys.append(i + (j - 1) * h)
                vals.append(max(v, floor) if floor else max(v, 1e-4))
            if vals:
                ax.barh(ys, vals, height=h, label=name, color=color)
        ax.set_xscale("log")
        ax.set_yticks(range(n))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel + (f"; < {floor} MiB drawn at {floor}" if floor else ""))
        ax.set_title(f"duo_fast vs the Duo code — {title_machine}", fontsize=9)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---- merging runs ------------------------------------------------------------------------


def merge_runs(paths: list[Path]) -> tuple[list[dict], dict]:
    """The rows of several runs (each a results.json, or the folder holding one) as one
    table: every op's rows come from the last run that has that op, in the first run's
    order of ops; the environment is the last run's, its mode "<mode> (merged runs)"."""
    runs = [json.loads((p / "results.json" if Path(p).is_dir() else Path(p)).read_text()) for p in paths]
    if not runs:
        raise ValueError("merge_runs: no runs given")
    last_of = {}
    for i, run in enumerate(runs):
        for r in run["results"]:
            last_of[r["op"]] = i
    order = []
    for run in runs:
        for r in run["results"]:
            if r["op"] not in order:
                order.append(r["op"])
    rows = [r for op in order for r in runs[last_of[op]]["results"] if r["op"] == op]
    env = dict(runs[-1]["environment"])
    env["mode"] = f"{env.get('mode', '?')} (merged runs)"
    env["merged_from"] = [str(p) for p in paths]
    return rows, env


# ---- the GPU check's report -------------------------------------------------------------

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


def gpu_steps(work: Path) -> dict:
    out = {}
    for line in _read(work / "steps.tsv").splitlines():
        parts = line.split("\t")
        if len(parts) >= 4:
            name, status, secs, box = parts[:4]
            out[name] = {"status": status, "seconds": float(secs or 0), "time_box_s": float(box or 0),
                         "detail": parts[4] if len(parts) > 4 else ""}
    return out


def gpu_tests(work: Path) -> dict:
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


def gpu_sanitizer(work: Path) -> dict:
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


def gpu_bench_rows(work: Path) -> dict:
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


def gpu_markdown(res: dict) -> str:
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
              "(duo_fast/bench/cost_model.py) least bytes / copy rate or least flops / GEMM rate at these rates; "
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


def gpu_short_table(res: dict) -> str:
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


def gpu_gather(work: Path) -> dict:
    env = _json(work / "env.json", {}) or {}
    return {
        "env": env, "dry_run": bool(env.get("dry_run")), "test_selection": env.get("test_selection", ""),
        "steps": gpu_steps(work),
        "build": {"build_info": _json(work / "build_info.json"), "log_tail": _read(work / "build.log")[-1500:]},
        "tests": gpu_tests(work), "sanitizer": gpu_sanitizer(work), "bench": gpu_bench_rows(work),
    }


def gpu_main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The GPU check's report (benchmarks/gpu/check.sh).")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--final", action="store_true", help="print the short table")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    res = gpu_gather(work)
    (out / "gpu_results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "gpu_report.md").write_text(gpu_markdown(res))
    if args.final:
        print(gpu_short_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(gpu_main())
