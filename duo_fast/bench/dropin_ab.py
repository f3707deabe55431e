"""The Duo drop-in's fused output layer against its logits path, interleaved in
one process (issue 22's time target: a patched step with the output layer fused
no slower than the patched step on the model's logits, within noise).

    python -m duo_fast.bench.dropin_ab                 # BASELINES' size, 8 rounds
    python -m duo_fast.bench.dropin_ab --config tiny --rounds 2 --out results/ab

``duo-fast bench --ops duo_dropin`` times every side in a fresh process, the
fused side and the logits side minutes apart, so on a shared machine they run
under different loads (the same code measured 0.87x to 1.20x there across
runs). Here each step's model is built once (``cases_duo_dropin``: the Duo
code's own classes) and the two patch states alternate call by call: after one
warm-up call of each, round r times one call of each, the order alternating
between rounds; ``.grad`` is dropped before every call. The report gives each
side's median and minimum and the ratio of the medians (fused / logits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import cases_duo_dropin as C

STEPS = ("elbo", "duo-simple", "duo-topk", "distill", "sample-step")
SIDES = ("fused", "logits")


def measure(config: str, step: str, rounds: int, device: str = "cpu") -> dict:
    """{side: [ms per call]} over ``rounds`` interleaved rounds of one step."""
    from duo_fast.integrations import duo as D

    st = C._build(config, step, False, device)
    st["patched"] = True  # the patched step's call (_loss), as the bench's duo side
    fn = C._run(step)
    times: dict[str, list[float]] = {side: [] for side in SIDES}

    def call(side: str) -> float:
        with D.patch(fuse_output_layer=side == "fused"):
            C._drop_grad(st)
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(st)
            if device != "cpu":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) * 1e3

    for side in SIDES:  # warm-up
        call(side)
    for r in range(rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            times[side].append(call(side))
    C._drop_grad(st)
    return times


def summarize(step: str, times: dict) -> dict:
    med = {side: statistics.median(times[side]) for side in SIDES}
    return {"step": step, "rounds": len(times["fused"]), **{f"{s}_median_ms": med[s] for s in SIDES},
            **{f"{s}_min_ms": min(times[s]) for s in SIDES}, "ratio": med["fused"] / med["logits"],
            "times_ms": times}


def table(rows: list[dict]) -> str:
    out = ["| step | fused median ms | logits median ms | fused / logits | fused min ms | logits min ms |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['step']} | {r['fused_median_ms']:.0f} | {r['logits_median_ms']:.0f} | {r['ratio']:.2f}x | "
                   f"{r['fused_min_ms']:.0f} | {r['logits_min_ms']:.0f} |")
    return "\n".join(out)


def _steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(STEPS)}, got {text!r}")
    return steps


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m duo_fast.bench.dropin_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(C.CONFIGS), default="gpt2", help="model size (cases_duo_dropin)")
    p.add_argument("--steps", type=_steps, default=list(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--rounds", type=_positive, default=8, help="timed calls of each side per step (default 8)")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and report.md (must not exist)")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.out is not None and args.out.exists():
        p.error(f"--out: {args.out} exists; name a new folder (nothing is overwritten)")
    C._available()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for step in args.steps:
        print(f"{step}: {args.rounds} interleaved rounds ({args.config})", file=sys.stderr, flush=True)
        rows.append(summarize(step, measure(args.config, step, args.rounds, args.device)))
        print(f"  fused {rows[-1]['fused_median_ms']:.0f} ms, logits {rows[-1]['logits_median_ms']:.0f} ms, "
              f"{rows[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
    report = table(rows)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True)
        meta = {"config": args.config, "device": args.device, "threads": torch.get_num_threads(),
                "torch": torch.__version__}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        (args.out / "report.md").write_text(
            f"# Drop-in: fused output layer vs logits path, interleaved in one process\n\n"
            f"`python -m duo_fast.bench.dropin_ab {' '.join(argv if argv is not None else sys.argv[1:])}` "
            f"({args.config}, {args.device}, {meta['threads']} threads, torch {meta['torch']})\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
