"""duo_fast against the reference: markdown table of time, peak memory and ratios.

    python -m benchmarks.report                 # --quick (default): small sizes, ~1-2 min
    python -m benchmarks.report --full          # the BASELINES.md sizes (minutes, GiBs)
    python -m benchmarks.report --ops gamma_to_alpha --threads 2 --json out.json
    python -m benchmarks.report --device cuda   # CUDA tensors (needs a GPU)
    python -m benchmarks.report --list          # case ids of the chosen mode

Every side of every case (duo_fast, reference, compiled reference) is measured in
its own fresh process (`--one <case-id> --side <side>`, internal), with
torch.set_num_threads(--threads); see benchmarks/common.py and README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

from . import common


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
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": args.mode,
        "device": args.device,
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "memory_method": "cuda_max_allocated" if args.device.startswith("cuda") else "rss_" + common.rss_method(),
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import duo_fast

        info["duo_fast"] = duo_fast.build_info()
    except Exception as e:  # noqa: BLE001
        info["duo_fast"] = f"import failed: {e}"
    return info


def markdown(results: list[dict], env: dict) -> str:
    show_compiled = any(r.get("compiled") for r in results)
    show_gbps = any(r.get("gbps") for r in results)
    cols = ["op", "size", "duo_fast ms", "reference ms", "speedup (ref/duo)"]
    if show_compiled:
        cols += ["compiled ms", "speedup vs compiled"]
    cols += ["duo_fast peak MiB", "reference peak MiB", "memory ratio (duo/ref)"]
    if show_compiled:
        cols += ["compiled peak MiB"]
    if show_gbps:
        cols += ["duo_fast GB/s"]
    cols += ["target (BASELINES.md)", "status"]
    lines = [
        f"duo_fast benchmark — {env['mode']} — device {env['device']}"
        + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f" — {env['threads']} thread(s) — {env['cpu']} — torch {env['torch']} — {env['date']}",
        "",
        "Median of 5 calls (after warm-up) in a fresh process per side; peak MiB = peak extra "
        f"memory during one call ({env['memory_method']}). Speedup = reference time / duo_fast time; "
        "memory ratio = duo_fast / reference (only where the reference needs >= 1 MiB). Compare ratios, not absolute times (±50% machine noise).",
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
        row += [mib("duo"), mib("ref"), _fmt_ratio(r.get("mem_ratio_ref"))]
        if show_compiled:
            row += [mib("compiled")]
        if show_gbps:
            row += [f"{r['gbps']:.1f}" if r.get("gbps") else "—"]
        row += [r.get("target") or "—", r.get("status") or "—"]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    if footnotes:
        lines.append("")
        lines += [f"[{i + 1}] {t}" for i, t in enumerate(footnotes)]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes (default)")
    g.add_argument("--full", dest="mode", action="store_const", const="full", help="the BASELINES.md sizes")
    g.add_argument("--mode", dest="mode", choices=["quick", "full"], help=argparse.SUPPRESS)
    p.set_defaults(mode="quick")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all registered)")
    p.add_argument("--match", default="", help="only the cases whose id contains this substring (e.g. N2048-K50257)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads / OMP threads per process (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    p.add_argument("--list", action="store_true", help="list the case ids and exit")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one case ...
    p.add_argument("--side", default="duo", choices=common.SIDES, help=argparse.SUPPRESS)  # ... one side
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return common.one_main(args.one, args.side, args.mode, args.device, args.threads)

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda given but no CUDA device is available", file=sys.stderr)
            return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] or None
    cases, errors = common.discover_cases(args.mode, args.device, ops)
    if args.match:
        cases = [c for c in cases if args.match in c.id]
    for e in errors:
        print(f"warning: case module skipped: {e}", file=sys.stderr)
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
    results = []
    for c in cases:
        print(f"running {c.id} ({c.size})", file=sys.stderr, flush=True)
        results.append(common.run_case(c, args.mode, args.device, args.threads,
                                       log=lambda s: print(s, file=sys.stderr, flush=True)))
    env["total_s"] = round(time.perf_counter() - t0, 1)
    print(markdown(results, env))
    print(f"\n(total {env['total_s']} s)", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"environment": env, "results": results, "module_errors": errors}, f, indent=1)
    failed = [r["id"] for r in results if any("error" in (r.get(s) or {}) for s in common.SIDES)]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
