"""Plots of the README's 2-thread table: the rows of several duo-fast bench runs."""
import json
from pathlib import Path
from duo_fast.bench import report

R = Path("benchmarks/results")
newer = {"curriculum_topk": "topk-N2048-K50257-2t", "curriculum_topk_embed": "topk-N2048-K50257-2t",
         "distill_kl": "distill_kl-N2048-K50257-2t", "linear_usdm_loss": "linear_usdm_loss-N2048-K50257-2t"}
base = json.load(open(R / "ops-N2048-K50257-2t/results.json"))
rows = []
for r in base["results"]:
    if r["op"] in newer:
        if not any(x["op"] == r["op"] for x in rows):
            rows += [x for x in json.load(open(R / newer[r["op"]] / "results.json"))["results"] if x["op"] == r["op"]]
    else:
        rows.append(r)
env = dict(json.load(open(R / "topk-N2048-K50257-2t/results.json"))["environment"], mode="full (merged runs)")
out = R / "summary-N2048-K50257-2t"
print([p.name for p in report.write_plots(out, rows, env)], len(rows))
