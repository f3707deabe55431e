"""duo_fast against the Duo code: markdown table, CSV and plots of time, peak memory,
ratios and achieved bandwidth.

    duo-fast bench                           # --quick (default): small sizes, minutes
    duo-fast bench --full                    # the BASELINES.md sizes (an hour, GiBs of RAM)
    duo-fast bench --tiny                    # seconds per op: a first try, CI (alias --smoke)
    duo-fast bench --ops usdm_loss,sample_step --threads 1 --out results/
    duo-fast bench --device cuda             # CUDA tensors, CUDA-event timing (needs a GPU)
    duo-fast bench --list                    # case ids of the chosen mode

(also `python -m duo_fast bench`, and `python -m benchmarks.report` in a source
checkout). Every side of every case (duo_fast, the Duo code eager, torch.compile of
it) is measured in its own fresh process (`python -m duo_fast.bench --one <case-id>
--side <side>`, internal), with torch.set_num_threads(--threads): warm-up, one call
for the peak extra memory, then the median of 5 calls. With --rounds R every side
runs R times (R fresh processes, the order of the sides reversed every other round)
and its time is the median of all R x 5 calls: on a shared machine whose speed
drifts, this keeps a slow spell from landing on one side only. The device's copy
bandwidth is measured the same way in the same run: the GB/s column is compared with it.

Writes into --out (default ./duo_fast_bench): report.md (the table), results.csv
(one row per case, with the machine: CPU, threads, GPU, torch/CUDA/duo_fast
versions, timestamp), results.json (everything), time.png and memory.png (one bar
each for duo_fast, the eager reference and the compiled reference per case, log
scale; needs matplotlib). The table is also printed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from . import common

DEFAULT_OUT = "duo_fast_bench"


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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def environment(args) -> dict:
    import torch

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": args.mode,
        "device": args.device,
        "threads": args.threads,
        "rounds": args.rounds,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if common.is_cuda(args.device) and torch.cuda.is_available() else "",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "",
        "load_avg_start": _load(),
        "memory_method": "cuda_max_allocated" if common.is_cuda(args.device) else "rss_" + common.rss_method(),
        "timing": "CUDA events" if common.is_cuda(args.device) else "perf_counter",
    }
    try:
        import duo_fast

        info["duo_fast"] = duo_fast.__version__
        info["duo_fast_build"] = duo_fast.build_info()
    except Exception as e:  # noqa: BLE001
        info["duo_fast"] = f"import failed: {e}"
        info["duo_fast_build"] = {}
    return info


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
        for side in common.SIDES:
            s = r.get(side)
            if s and "error" in s:
                marks.append(mark(f"{r['id']} [{common.SIDE_LABELS[side]}] failed: {s['error']}"))
            elif s and s.get("note"):
                marks.append(mark(f"{common.SIDE_LABELS[side]}: {s['note']}"))
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
        errors = "; ".join(f"{s}: {r[s]['error']}" for s in common.SIDES if r.get(s) and "error" in r[s])
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


# ---- CLI ---------------------------------------------------------------------------------


def parse_args(argv=None, prog="duo-fast bench", default_out=DEFAULT_OUT):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes (default)")
    g.add_argument("--full", dest="mode", action="store_const", const="full", help="the BASELINES.md sizes")
    g.add_argument("--tiny", "--smoke", dest="mode", action="store_const", const="tiny",
                   help="tiny sizes: seconds per case (CI, a first try)")
    g.add_argument("--mode", dest="mode", choices=common.MODES, help=argparse.SUPPRESS)
    p.set_defaults(mode="quick")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all registered)")
    p.add_argument("--match", default="", help="only the cases whose id contains this substring (e.g. N2048-K50257)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads / OMP threads per process (default 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="fresh processes per side, the sides alternating; time = median over all rounds "
                        "(default 1; 3 on a shared machine whose speed drifts)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default=default_out,
                   help=f"folder for report.md, results.csv, results.json, time.png, memory.png "
                        f"(default: {default_out or 'none: print the table only'})")
    p.add_argument("--no-plots", action="store_true", help="do not draw time.png / memory.png")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    p.add_argument("--list", action="store_true", help="list the case ids and exit")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one case ...
    p.add_argument("--side", default="duo", choices=common.SIDES, help=argparse.SUPPRESS)  # ... one side
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv=None, *, prog: str = "duo-fast bench", default_out: str | None = DEFAULT_OUT) -> int:
    args = parse_args(argv, prog, default_out)
    if args.one:
        return common.one_main(args.one, args.side, args.mode, args.device, args.threads)

    if common.is_cuda(args.device):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda given but no CUDA device is available", file=sys.stderr)
            return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] or None
    skipped: list[str] = []
    cases, errors = common.discover_cases(args.mode, args.device, ops, skipped)
    if args.match:
        cases = [c for c in cases if args.match in c.id]
    for e in errors:
        print(f"warning: case module failed: {e}", file=sys.stderr)
    for s in skipped:
        print(f"note: case module skipped: {s}", file=sys.stderr)
    if ops:
        unknown = set(ops) - {c.op for c in cases}
        if unknown:
            print(f"warning: no cases for op(s) {sorted(unknown)}", file=sys.stderr)
    if args.list:
        for c in cases:
            sides = ",".join(s for s in common.SIDES if c.impl(s) is not None)
            print(f"{c.id}\t{c.size}\t[{sides}]")
        return 0

    env = environment(args)
    t0 = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"measuring the device's copy bandwidth ({args.device})")
    copy = common.copy_bandwidth(args.mode, args.device, args.threads)
    env["copy_gbps"] = copy.get("gbps")
    if "error" in copy:
        log(f"  copy bandwidth: ERROR {copy['error']}")
        errors.append(f"copy bandwidth: {copy['error']}")
    else:
        log(f"  {copy['gbps']:.1f} GB/s")
    results = []
    for c in cases:
        log(f"running {c.id} ({c.size})")
        r = common.run_case(c, args.mode, args.device, args.threads, log=log, rounds=args.rounds)
        r["pct_of_copy"] = 100 * r["gbps"] / env["copy_gbps"] if r.get("gbps") and env.get("copy_gbps") else None
        results.append(r)
    env["total_s"] = round(time.perf_counter() - t0, 1)
    env["load_avg_end"] = _load()
    table = markdown(results, env)
    if skipped:
        table += "\n\nSkipped: " + "; ".join(skipped)
    print(table)
    print(f"\n(total {env['total_s']} s)", flush=True)
    payload = {"environment": env, "copy": copy, "results": results, "module_errors": errors, "skipped": skipped}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(payload, f, indent=1)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(table + "\n")
        write_csv(out / "results.csv", results, env)
        with open(out / "results.json", "w") as f:
            json.dump(payload, f, indent=1)
        written = [out / "report.md", out / "results.csv", out / "results.json"]
        if not args.no_plots:
            try:
                written += write_plots(out, results, env)
            except ImportError:
                print("note: matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        log("wrote " + ", ".join(str(p) for p in written))
    failed = [r["id"] for r in results if any("error" in (r.get(s) or {}) for s in common.SIDES)]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
