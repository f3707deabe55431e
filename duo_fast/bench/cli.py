"""``duo-fast bench``: duo_fast against the Duo code's own operations, each side in a
fresh process: markdown table, CSV and plots of time, peak memory, ratios and
achieved bandwidth.

    duo-fast bench                           # --quick (default): small sizes, minutes
    duo-fast bench --full                    # the target sizes of docs/benchmarks.md (an hour, GiBs of RAM)
    duo-fast bench --tiny                    # seconds per op: a first try, CI (alias --smoke)
    duo-fast bench --ops usdm_loss,sample_step --threads 1 --out results/
    duo-fast bench --device cuda             # CUDA tensors, CUDA-event timing (needs a GPU)
    duo-fast bench --list                    # case ids of the chosen mode
    duo-fast bench --merge RUN [RUN ...] --out DIR   # one table and plots from several runs

(also `python -m duo_fast bench`). Every side of every case (duo_fast, the Duo code
eager, torch.compile of it) is measured in its own fresh process (`python -m
duo_fast.bench --one <case-id> --side <side>`, internal), with
torch.set_num_threads(--threads): warm-up, one call for the peak extra memory, then
the median of 5 calls. With --rounds R every side runs R times (R fresh processes,
the order of the sides reversed every other round) and its time is the median of all
R x 5 calls: on a shared machine whose speed drifts, this keeps a slow spell from
landing on one side only. The device's copy bandwidth is measured the same way in
the same run: the GB/s column is compared with it.

Writes into --out (default ./duo_fast_bench): report.md (the table), results.csv
(one row per case, with the machine: CPU, threads, GPU, torch/CUDA/duo_fast
versions, timestamp), results.json (everything), time.png and memory.png
(duo_fast.bench.report; needs matplotlib). The table is also printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from . import common
from .report import markdown, merge_runs, write_csv, write_plots

DEFAULT_OUT = "duo_fast_bench"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
    p.add_argument("--merge", nargs="+", metavar="RUN", default=None,
                   help="measure nothing: join the results.json of earlier runs (files or folders; an op's rows "
                        "come from the last run that has it) into one report and plots in --out")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one case ...
    p.add_argument("--side", default="duo", choices=common.SIDES, help=argparse.SUPPRESS)  # ... one side
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv=None, *, prog: str = "duo-fast bench", default_out: str | None = DEFAULT_OUT) -> int:
    args = parse_args(argv, prog, default_out)
    if args.merge:
        return merge_main(args)
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




def merge_main(args) -> int:
    """--merge: one report (table, CSV, JSON, plots) from several runs' results.json."""
    if not args.out:
        print("error: --merge needs --out (the folder for the merged report)", file=sys.stderr)
        return 2
    results, env = merge_runs([Path(p) for p in args.merge])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, env)
    (out / "report.md").write_text(table + "\n")
    write_csv(out / "results.csv", results, env)
    (out / "results.json").write_text(json.dumps({"environment": env, "results": results}, indent=1))
    written = [out / "report.md", out / "results.csv", out / "results.json"]
    if not args.no_plots:
        written += write_plots(out, results, env)
    print(table)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
