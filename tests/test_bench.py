"""duo-fast bench (duo_fast/bench): the reference side is the Duo code's own
functions (or an eager copy of the same torch ops where the Duo code is absent),
the CUDA-event clock, and the CLI's files at --tiny sizes.

The eager copy is checked against the Duo code itself: from the same random
state both give the same numbers, bit for bit (same ops, same order)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import duo_fast
from duo_fast.bench import cli, common, duo_code, report

ROOT = Path(__file__).resolve().parents[1]
K, B, L = 300, 2, 12


def _duo_reference():
    from duo_fast.integrations import duo_reference

    if duo_reference.find_reference_dir() is None:
        pytest.skip("Duo codebase unavailable: set $DUO_REFERENCE_DIR (the eager copy is compared with it)")
    ref = duo_code.reference()
    if ref.source != duo_code.SOURCE_DUO:
        pytest.skip(f"Duo codebase cannot be imported here: {ref.reason}")
    return ref


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "logits": 2 * torch.randn(B, L, K, generator=g),
        "x0": torch.randint(0, K, (B, L), generator=g),
        "z": torch.randint(0, K, (B, L), generator=g),
        "gamma": -3.5 + 1.75 * torch.rand(B, generator=g),
        "E": torch.randn(K, 16, generator=g),
    }


def _both(fn):
    """fn(model_class, embedding_layer_class, topk_fn) from the same random state,
    for the Duo code and for the eager copy."""
    ref = _duo_reference()
    out = []
    for impl in ((ref.Model, ref.EmbeddingLayer, ref.sample_tempered_softmax_topk),
                 (duo_code.EagerModel, duo_code.EagerEmbeddingLayer, duo_code.eager_sample_tempered_softmax_topk)):
        out.append(fn(*impl))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x, y)


def test_reference_is_the_duo_code_functions():
    ref = _duo_reference()
    import algo
    import utils

    m = ref.Model(K)
    assert m._ancestral_update.__func__ is algo.DUO_BASE._ancestral_update
    assert m._posterior_from_x0.__func__ is algo.DUO_BASE._posterior_from_x0
    assert m.nll_per_token.__func__ is algo.DUO_BASE.nll_per_token
    assert m._q_xt_gaussian.__func__ is algo.DUO._q_xt_gaussian
    assert m._sample_trajectory.__func__ is algo.Distillation._sample_trajectory
    assert ref.sample_tempered_softmax_topk is utils.sample_tempered_softmax_topk
    assert type(ref.EmbeddingLayer(torch.zeros(4, 2))).__module__ == "models.dit"
    assert duo_code.source() == "Duo code"


@pytest.mark.parametrize("use_float64", [True, False])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("noise_removal", [False, True])
def test_eager_copy_ancestral_step(use_float64, top_p, noise_removal):
    st = _inputs()
    at, as_ = torch.full((B, 1), 0.3), torch.full((B, 1), 0.7)

    def run(Model, _, __):
        m = Model(K, use_float64=use_float64, p_nucleus=top_p, logits=st["logits"])
        torch.manual_seed(11)
        return [duo_code.ancestral_step(m, st["z"], at, as_, noise_removal)]

    _assert_same(*_both(run))


def test_eager_copy_loss_and_kl():
    st = _inputs()
    alpha = torch.tensor([[0.2], [0.6]])

    def run(Model, _, __):
        m = Model(K)
        lg = st["logits"].clone().requires_grad_()
        loss = duo_code.loss(m, lg, st["z"], st["x0"], alpha, -alpha)
        loss.sum().backward()
        s = st["logits"].clone().requires_grad_()
        kl = duo_code.kl_bwd(m, s, st["logits"].flip(-1))
        kl.sum().backward()
        return [loss.detach(), lg.grad, kl.detach(), s.grad]

    _assert_same(*_both(run))


def test_eager_copy_latents_and_curricula():
    st = _inputs()

    def run(Model, Layer, topk):
        m = Model(K)
        layer = Layer(st["E"])  # the Duo layer's constructor draws its own init: before the seed
        torch.manual_seed(5)
        z1 = duo_code.latent_argmax(m, st["x0"], st["gamma"])
        zt, zs = duo_code.trajectory_argmax(m, st["x0"], st["gamma"], st["gamma"] - 1)
        h, z = duo_code.simple_curriculum(m, layer, st["x0"], st["gamma"], 10.0)
        h.sum().backward()
        g1 = layer.embedding.grad.clone()
        layer.embedding.grad = None
        w, ids, zk = duo_code.topk_curriculum(duo_code.Reference(duo_code.SOURCE_EAGER, "", Model, Layer, topk, None),
                                             st["x0"], st["gamma"], 10.0, 8, K)
        hk = layer(ids, weights=w)
        hk.sum().backward()
        return [z1, zt, zs, h.detach(), z, g1, w, ids, zk, hk.detach(), layer.embedding.grad]

    _assert_same(*_both(run))


def test_duo_code_schedule_is_the_table():
    ref = _duo_reference()
    assert ref.integral_cache_path and ref.integral_cache_path.endswith("integral/gpt2.pkl")
    m = ref.Model(50257, integral_cache_path=ref.integral_cache_path)
    gamma = torch.tensor([-3.4, -2.5, -1.8], dtype=torch.float64)
    alpha, dalpha = m._gamma_to_alpha_dalpha_cached(gamma)
    exact, dexact = duo_fast.gamma_to_alpha(gamma, 50257)
    torch.testing.assert_close(alpha, exact, rtol=0, atol=1e-4)  # a nearest-point table of 10^5 points
    torch.testing.assert_close(dalpha, (-1.75 + 3.5) * dexact, rtol=0.05, atol=0)  # its finite difference


def test_eager_copy_when_forced(monkeypatch):
    monkeypatch.setenv(duo_code.ENV_VAR, "eager")
    duo_code.reference.cache_clear()
    try:
        ref = duo_code.reference()
        assert ref.source == "eager copy" and ref.Model is duo_code.EagerModel
        assert "DUO_FAST_BENCH_REFERENCE=eager" in ref.reason
    finally:
        monkeypatch.delenv(duo_code.ENV_VAR)
        duo_code.reference.cache_clear()


class _FakeEvent:
    log: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        self.t = len(_FakeEvent.log)
        _FakeEvent.log.append(("record", self))

    def synchronize(self):
        _FakeEvent.log.append(("sync_event", self))

    def elapsed_time(self, end):
        assert self.t is not None and end.t is not None
        return 10.0 * (end.t - self.t)


def test_cuda_timing_uses_events_around_the_call(monkeypatch):
    """The CUDA branch of time_call_ms (no GPU here): synchronize, record, call,
    record, wait for the end event, elapsed_time between the two events."""
    _FakeEvent.log = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: _FakeEvent.log.append(("sync_device", device)))

    def fn():
        _FakeEvent.log.append(("call", None))

    ms = common.time_call_ms(fn, "cuda")
    kinds = [k for k, _ in _FakeEvent.log]
    assert kinds == ["sync_device", "record", "call", "record", "sync_event"]
    start, end = _FakeEvent.log[1][1], _FakeEvent.log[3][1]
    assert _FakeEvent.log[4][1] is end
    assert ms == start.elapsed_time(end) == 20.0
    med, times = common.median_ms(fn, repeats=3, warmup=1, device="cuda")
    assert times == [20.0] * 3 and med == 20.0


def test_copy_case_counts_read_and_write():
    case = common.copy_case("tiny", "cpu")
    st = case.setup("cpu")
    case.duo.fn(st)
    assert torch.equal(st["dst"], st["src"])
    assert case.bytes_moved == 2 * st["src"].numel()
    assert common.copy_case("full", "cuda").bytes_moved == 2 * (common.COPY_MIB_CUDA << 20)


def test_every_mode_lists_cases_with_a_reference():
    for mode in common.MODES:
        cases, errors = common.discover_cases(mode, "cpu")
        assert not errors, errors
        ops = {c.op for c in cases}
        assert {"usdm_loss", "sample_step", "sample_zt", "curriculum_embed", "curriculum_topk",
                "curriculum_topk_embed", "distill_kl", "gamma_to_alpha", "linear_usdm_loss", "linear_distill_kl",
                "linear_sample_step"} <= ops
        for c in cases:
            if c.ref is not None and c.op != "duo_dropin":
                assert c.ref.source is not None, c.id


def test_cli_tiny_writes_table_csv_json_and_plots(tmp_path):
    """`python -m duo_fast bench --tiny` for two ops (one with a torch.compile side),
    from outside the source tree: every output file, with its columns. The eager copy
    is the reference here (no Duo code import in each subprocess: CI time); the tests
    above check it against the Duo code."""
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(Path(duo_fast.__file__).parents[1]), DUO_FAST_BENCH_REFERENCE="eager")
    p = subprocess.run([sys.executable, "-m", "duo_fast", "bench", "--tiny", "--ops", "usdm_loss,sample_zt",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| op |"))
    for col in ("duo_fast ms", "eager ms", "torch.compile ms", "speedup vs eager", "speedup vs compiled",
                "duo_fast peak MiB", "eager peak MiB", "compiled peak MiB", "duo_fast GB/s", "% of copy",
                "reference code", "status"):
        assert col in header, (col, header)
    assert "Device copy bandwidth measured in this run" in md
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
        assert list(rows[0].keys()) == report.CSV_COLUMNS
    ids = [r["case"] for r in rows]
    assert ids == ["sample_zt/single-N64-K1000", "sample_zt/coupled-N64-K1000", "usdm_loss/fwd_bwd-N64-K1000"]
    for r in rows:
        assert float(r["duo_ms"]) > 0 and float(r["ref_ms"]) > 0 and r["errors"] == ""
        assert r["ref_source"] == "eager copy"
        assert r["cpu"] and r["threads"] == "2" and r["torch"] == torch.__version__
        assert r["duo_fast"] == duo_fast.__version__ and r["date"] and float(r["copy_gbps"]) > 0
        assert float(r["speedup_ref"]) == pytest.approx(float(r["ref_ms"]) / float(r["duo_ms"]))
    loss = rows[-1]
    assert float(loss["compiled_ms"]) > 0 and float(loss["duo_gbps"]) > 0 and float(loss["pct_of_copy"]) > 0
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["timing"] == "perf_counter" and len(data["results"]) == 3
    for name in ("time.png", "memory.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_merge_takes_each_op_from_the_last_run_that_has_it(tmp_path):
    """duo-fast bench --merge: an op's rows come from the last run that measured it,
    in the first run's order of ops (the README's table from several runs)."""
    def run(folder, mode, rows):
        folder.mkdir()
        env = dict(cli.environment(cli.parse_args(["--full"])), load_avg_end="0", total_s=1.0)
        results = [{"id": f"{op}/{name}", "op": op, "size": name, "duo": {"median_ms": ms, "peak_mib": 1.0}}
                   for op, name, ms in rows]
        (folder / "results.json").write_text(json.dumps({"environment": env, "results": results}))
        return folder

    a = run(tmp_path / "a", "full", [("usdm_loss", "x", 1.0), ("sample_step", "y", 2.0), ("distill_kl", "z", 3.0)])
    b = run(tmp_path / "b", "full", [("sample_step", "y2", 20.0), ("sample_step", "y3", 30.0)])
    out = tmp_path / "merged"
    assert cli.main(["--merge", str(a), str(b / "results.json"), "--out", str(out), "--no-plots"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [(r["op"], r["size"]) for r in data["results"]] == [("usdm_loss", "x"), ("sample_step", "y2"),
                                                               ("sample_step", "y3"), ("distill_kl", "z")]
    assert data["environment"]["mode"] == "full (merged runs)"
    assert "| sample_step | y3 |" in (out / "report.md").read_text().replace("  ", " ")


def test_rounds_alternate_the_sides_and_pool_the_calls(monkeypatch):
    """--rounds R: every side R fresh processes, the order reversed every other round;
    a side's time is the median of all its rounds' calls (worked by hand below), its
    peak the largest, a failed round reported beside the others."""
    case = next(c for c in common.discover_cases("tiny", "cpu", ["usdm_loss"], [])[0]
                if c.impl("compiled") is not None)
    calls = []
    times = {"duo": [[1, 2, 3], [10, 11, 12], [4, 5, 6]], "ref": [[20, 21, 22], [30, 31, 32], [40, 41, 42]],
             "compiled": [[7, 8, 9], None, [9, 9, 9]]}

    def fake(c, side, mode, device, threads):
        rnd = sum(1 for s, _ in calls if s == side)
        calls.append((side, rnd))
        t = times[side][rnd]
        if t is None:
            return {"error": "boom"}
        return {"median_ms": statistics.median(t), "raw_median_ms": statistics.median(t), "times_ms": t, "scale": 1.0,
                "peak_mib": 10.0 * (rnd + 1), "first_call_ms": 1.0, "bytes_moved": 1e6, "process_wall_s": 1.0}

    monkeypatch.setattr(common, "run_side_subprocess", fake)
    r = common.run_case(case, "tiny", "cpu", 2, rounds=3)
    assert [s for s, _ in calls] == ["duo", "ref", "compiled", "compiled", "ref", "duo", "duo", "ref", "compiled"]
    duo = r["duo"]  # calls 1 2 3 | 10 11 12 | 4 5 6: median 5
    assert duo["median_ms"] == 5 and duo["round_medians_ms"] == [2, 11, 5] and duo["peak_mib"] == 30.0
    assert duo["rounds"] == 3 and duo["gbps"] == pytest.approx(1e6 / 5e-3 / 1e9)
    assert r["ref"]["median_ms"] == 31
    comp = r["compiled"]  # 7 8 9 | error | 9 9 9: median 9
    assert comp["median_ms"] == 9 and comp["rounds"] == 2 and comp["round_errors"] == ["boom"]
    assert r["speedup_ref"] == pytest.approx(31 / 5)
    with pytest.raises(ValueError, match="rounds"):
        common.run_case(case, "tiny", "cpu", 2, rounds=0)
    with pytest.raises(SystemExit):
        cli.parse_args(["--rounds", "0"])
