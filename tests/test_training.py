"""duo_fast.training, duo_fast.models, duo_fast.datasets and the demo:

* the training losses equal duo_fast.reference compositions on the same random
  draws (the curriculum's own Philox noise through the test hook, the same t,
  the same z);
* schedules: antithetic t as the Duo code's _sample_t, 1/tau as
  _compute_gumbel_tau_inverse, dt doubling and linear growth as
  Distillation._compute_dt (the Duo code itself when present), the teacher
  refresh at every round start;
* the Markov dataset's exact likelihood against enumeration;
* the demo: --quick's JSON has every field; resume from a checkpoint gives the
  parameters of an uninterrupted run; two torchrun processes keep identical
  parameters while drawing different noise.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import duo_fast
from duo_fast import reference, training
from duo_fast.datasets import MarkovChain
from duo_fast.models import DiT
from conftest import ptr

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(K=37, d=16, seed=0):
    torch.manual_seed(seed)
    m = DiT(K, hidden=d, n_layers=2, n_heads=2, cond_dim=d)
    with torch.no_grad():  # the output layer and gates start at zero: make the logits depend on the input
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    return m


def curriculum_noise(emulated, key, n, K):
    eps = torch.empty(n, K)
    for t in range(n):
        emulated.df_curriculum_noise(ctypes.c_uint64(key % (1 << 64)), ctypes.c_uint64(0), ctypes.c_uint64(t),
                                     ctypes.c_int64(K), ptr(eps[t]))
    return eps


def philox_key(g: torch.Generator) -> int:
    """The key an op draws from a generator (duo_fast._random.philox_seed)."""
    return int(torch.randint(0, (1 << 63) - 1, (1,), dtype=torch.int64, generator=g).item())


# ----------------------------------------------------------------------------------
# Losses against reference compositions
# ----------------------------------------------------------------------------------


def test_duo_loss_curriculum_equals_reference_composition(emulated):
    K, B, L = 37, 3, 5
    m = tiny_model(K)
    cfg = training.DuoConfig(K, gamma_min=-3.0, gamma_max=0.5, curriculum_start=0, curriculum_end=100,
                             tau_log10_start=-1.0, tau_log10_end=-2.0)
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    g_copy = torch.Generator().manual_seed(7)
    out = training.duo_loss(m, x0, 50, cfg, generator=g)
    # The same draws, by hand: t (antithetic), then the Philox key curriculum_embed draws.
    u = torch.rand(B, generator=g_copy, dtype=torch.float64)
    u = (u / B + torch.arange(B, dtype=torch.float64) / B) % 1
    t = (1 - 1e-3) * u + 1e-3
    torch.testing.assert_close(out.t, t, rtol=0, atol=0)
    key = philox_key(g_copy)
    gamma = -3.0 + t * 3.5
    alpha, dadg = reference.gamma_to_alpha(gamma, K)
    inv_tau = 10 ** 1.5  # halfway between 10^1 and 10^2 in log10
    assert out.info["inv_tau"] == pytest.approx(inv_tau)
    eps = curriculum_noise(emulated, key, B * L, K).view(B, L, K)
    h, z = reference.curriculum_embed_dense(x0, gamma, inv_tau, m.embedding.detach(), noise=eps)
    logits = m(h.float(), (-torch.log(alpha)).float())
    expected = reference.usdm_loss(logits.detach(), z, x0, alpha[:, None], (dadg * 3.5)[:, None])
    torch.testing.assert_close(out.per_token.double(), expected, rtol=2e-4, atol=2e-5)
    out.loss.backward()
    assert m.embedding.grad is not None and bool(torch.isfinite(m.embedding.grad).all())


def test_duo_loss_elbo_equals_reference_composition():
    K, B, L = 37, 4, 6
    m = tiny_model(K)
    cfg = training.DuoConfig(K, curriculum_end=-1, noise="cosine")
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(2))
    out = training.duo_loss(m, x0, 0, cfg, generator=torch.Generator().manual_seed(3))
    gc = torch.Generator().manual_seed(3)
    t = training.sample_t(B, generator=gc)
    u = torch.rand(B, L, generator=gc, dtype=torch.float64)
    other = torch.randint(0, K, (B, L), generator=gc)
    a, da = reference.cosine_alpha(t)
    z = torch.where(u < a[:, None], x0, other)
    logits = m(z, (-torch.log(a)).float()).detach()
    expected = reference.usdm_loss(logits, z, x0, a[:, None], da[:, None])
    torch.testing.assert_close(out.per_token.double(), expected, rtol=2e-4, atol=2e-5)
    assert out.info == {"phase": "elbo"}


def test_duo_loss_topk_and_linear_loss_paths():
    K, B, L = 37, 3, 4
    m = tiny_model(K)
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(4))
    cfg = training.DuoConfig(K, curriculum_start=0, curriculum_end=10, curriculum="topk", top_k=5)
    out = training.duo_loss(m, x0, 0, cfg, generator=torch.Generator().manual_seed(5))
    out.loss.backward()
    assert out.per_token.shape == (B, L) and bool(torch.isfinite(out.per_token).all())
    # linear_usdm_loss on (hidden, output layer) equals usdm_loss on the logits, same draws
    for curriculum_end in (10, -1):
        a = training.duo_loss(m, x0, 0, training.DuoConfig(K, curriculum_end=curriculum_end),
                              generator=torch.Generator().manual_seed(6))
        b = training.duo_loss(m, x0, 0, training.DuoConfig(K, curriculum_end=curriculum_end, linear_loss=True),
                              generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(a.per_token, b.per_token, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["bwd", "fwd"])
def test_dcd_loss_equals_reference_composition(direction):
    K, B, L = 37, 4, 5
    student, teacher = tiny_model(K, seed=1), tiny_model(K, seed=2)
    cfg = training.DCDConfig(K, gamma_min=-3.0, gamma_max=0.5, T=8, direction=direction)
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(8))
    out = training.dcd_loss(student, teacher, x0, 1, cfg, generator=torch.Generator().manual_seed(9))
    gc = torch.Generator().manual_seed(9)
    dt = 2 / 8
    t = torch.clamp(training.sample_t(B, generator=gc) + dt, 0, 1)
    s = t - dt
    g_t, g_s = -3.0 + t * 3.5, -3.0 + s * 3.5
    z_t, z_s = duo_fast.sample_zt(x0, g_t, K, gamma_s=g_s, seed=philox_key(gc))
    a_t, _ = reference.gamma_to_alpha(g_t, K)
    a_s, _ = reference.gamma_to_alpha(g_s, K)
    ls = student(z_t, (-torch.log(a_t)).float()).detach()
    lt = teacher(z_s, (-torch.log(a_s)).float()).detach()
    torch.testing.assert_close(out.per_token.double(), reference.distill_kl(ls, lt, direction), rtol=1e-4, atol=1e-6)
    assert out.info["dt"] == dt and bool((out.t == t).all())
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------
# Schedules and teacher bookkeeping
# ----------------------------------------------------------------------------------


def test_inv_tau_follows_the_reference_rule():
    cfg = training.DuoConfig(10, curriculum_start=100, curriculum_end=200, tau_log10_start=-1.0, tau_log10_end=-3.0)
    assert training.inv_tau(0, cfg) == pytest.approx(10.0)
    assert training.inv_tau(99, cfg) == pytest.approx(10.0)
    assert training.inv_tau(150, cfg) == pytest.approx(100.0)
    assert training.inv_tau(200, cfg) == pytest.approx(1e10)


def test_sample_t_antithetic_strata():
    t = training.sample_t(8, eps=1e-3, generator=torch.Generator().manual_seed(0))
    u = (t - 1e-3) / (1 - 1e-3)
    # the i-th time in the i-th stratum [i/8, (i+1)/8) (the Duo code's _sample_t)
    assert (u * 8).floor().long().tolist() == list(range(8))
    g = torch.Generator().manual_seed(0)
    v = torch.rand(8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(u, (v / 8 + torch.arange(8) / 8) % 1, rtol=0, atol=1e-12)


def test_dcd_dt_doubles_and_grows_linearly():
    cfg = training.DCDConfig(10, T=64)
    assert [training.dcd_dt(r, cfg) for r in range(7)] == [2 ** r / 64 for r in range(7)]
    lin = training.DCDConfig(10, linear_growth=True, linear_growth_min=0.01, linear_growth_max=0.5, max_steps=100)
    assert training.dcd_dt(0, lin, step=50) == pytest.approx(0.01 + 0.5 * 0.49)
    with pytest.raises(ValueError, match="max_steps"):
        training.DCDConfig(10, linear_growth=True)


def test_dcd_dt_matches_the_duo_code():
    from duo_codebase import load_reference

    ref = load_reference()

    class Me:  # the attributes Distillation._compute_dt reads
        T, update_teacher_every, linear_growth_dt = 64, 10, False
        linear_growth_min, linear_growth_max = 0.001, 0.25
        trainer = type("Trainer", (), {"max_steps": 1000})()

    me = Me()
    for step in (0, 9, 10, 35, 60):
        me.global_step = step
        assert training.dcd_dt(step // 10, training.DCDConfig(10, T=64)) == ref.algo.Distillation._compute_dt(me)
    me.linear_growth_dt = True
    lin = training.DCDConfig(10, linear_growth=True, max_steps=1000)
    for step in (0, 500, 1000):
        me.global_step = step
        assert training.dcd_dt(0, lin, step=step) == pytest.approx(ref.algo.Distillation._compute_dt(me))


def test_refresh_teacher_and_ema():
    student = tiny_model(11, seed=3)
    teacher = training.refresh_teacher(None, student)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    for a, b in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(a, b)
    ema = training.EMA(student, decay=0.9)
    before = [p.detach().clone() for p in student.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update(student)
    training.refresh_teacher(teacher, student, ema)
    for a, b in zip(teacher.parameters(), before):
        torch.testing.assert_close(a, b + 0.1)  # 0.9 old + 0.1 new


def test_gamma_range_inverts_the_operator():
    gmin, gmax = training.gamma_range(256, 0.99, 0.02)
    a = duo_fast.gamma_to_alpha(torch.tensor([gmin, gmax], dtype=torch.float64), 256)[0]
    torch.testing.assert_close(a, torch.tensor([0.99, 0.02], dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_model_interface_and_errors():
    m = tiny_model(13)
    ids = torch.randint(0, 13, (2, 6))
    sigma = torch.tensor([0.1, 2.0])
    logits = m(ids, sigma)
    assert logits.shape == (2, 6, 13)
    h = torch.nn.functional.embedding(ids, m.embedding)
    torch.testing.assert_close(m(h, sigma), logits)  # ids and their embeddings give the same output
    hidden, out = m(ids, sigma, return_hidden=True)
    torch.testing.assert_close(out(hidden), logits)
    with pytest.raises(ValueError, match="token ids"):
        m(torch.randn(2, 6, 5), sigma)
    with pytest.raises(ValueError, match="one value per row"):
        m(ids, torch.ones(3))
    with pytest.raises(ValueError, match="x0 must be int64"):
        training.duo_loss(m, ids.float(), 0, training.DuoConfig(13))
    with pytest.raises(ValueError, match="curriculum must be"):
        training.DuoConfig(13, curriculum="dense")


# ----------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------


def test_markov_likelihood_against_enumeration():
    mc = MarkovChain(vocab_size=3, length=3, branching=2, eps=0.05, seed=1)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=3)))
    p = mc.log_prob(seqs).exp()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    # exact law by enumeration: p(x) = 1/K prod P
    manual = torch.tensor([1 / 3 * float(mc.P[a, b] * mc.P[b, c]) for a, b, c in seqs.tolist()], dtype=torch.float64)
    torch.testing.assert_close(p, manual, rtol=1e-12, atol=0)
    # the entropy rate is the enumerated entropy per token
    assert mc.entropy_rate() == pytest.approx(float(-(p * p.log()).sum()) / 3, rel=1e-12)
    # samples follow the law (chi-square over the 27 sequences)
    from scipy.stats import chisquare

    x = mc.sample(60_000, torch.Generator().manual_seed(2))
    idx = (x[:, 0] * 9 + x[:, 1] * 3 + x[:, 2])
    counts = torch.bincount(idx, minlength=27).double()
    assert chisquare(counts.numpy(), (p * 60_000).numpy()).pvalue > 1e-4
    m = mc.metrics(x)
    assert m["gen_ppl"] == pytest.approx(math.exp(mc.entropy_rate()), rel=0.01)
    assert set(m) == {"gen_ppl", "nll", "entropy", "unigram_entropy", "impossible_frac"}
    assert m["impossible_frac"] == pytest.approx(0.05 * 1 / 3, abs=0.005)  # eps/K per off-support id


def test_markov_chain_is_a_function_of_its_seed_and_checks_input():
    a, b = MarkovChain(seed=3), MarkovChain(seed=3)
    assert torch.equal(a.P, b.P) and not torch.equal(a.P, MarkovChain(seed=4).P)
    with pytest.raises(ValueError, match="sequences must be"):
        a.metrics(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        a.metrics(torch.full((2, 32), 256))


# ----------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------

TINY = ["--vocab-size", "16", "--length", "8", "--hidden", "16", "--n-layers", "1", "--batch-size", "8",
        "--curriculum-steps", "4", "--elbo-steps", "4", "--dcd-rounds", "2", "--dcd-steps", "3", "--dcd-t", "4",
        "--ckpt-every", "3", "--no-progress", "--threads", "1"]


def _params(path: Path) -> list[torch.Tensor]:
    st = torch.load(path, weights_only=False)
    return list(st["student"].values()) if st["student"] is not None else list(st["model"].values())


def test_resume_gives_the_uninterrupted_parameters(tmp_path, monkeypatch):
    from duo_fast import demo

    demo.main([*TINY, "--no-sample", "--out", str(tmp_path / "a")])
    # Interrupt a second run right after its checkpoint at step 6 of the base phase, then at DCD step 3.
    for crash_at in (("base", 6), ("dcd", 3)):
        real_save = demo.Run.save

        def crashing_save(self, crash_at=crash_at):
            real_save(self)
            if (self.phase, self.step) == crash_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(demo.Run, "save", crashing_save)
        out = tmp_path / f"b-{crash_at[0]}"
        with pytest.raises(KeyboardInterrupt):
            demo.main([*TINY, "--no-sample", "--out", str(out)])
        monkeypatch.setattr(demo.Run, "save", real_save)
        demo.main([*TINY, "--no-sample", "--out", str(out), "--resume"])
        for a, b in zip(_params(tmp_path / "a" / "checkpoint.pt"), _params(out / "checkpoint.pt")):
            assert torch.equal(a, b)
    with pytest.raises(SystemExit, match="other settings"):
        demo.main([*TINY, "--no-sample", "--out", str(tmp_path / "a"), "--resume", "--lr", "0.1"])


def test_teacher_refreshed_at_every_round_start(tmp_path, monkeypatch):
    from duo_fast import demo

    calls = []
    real = demo.refresh_teacher

    def spy(teacher, student, ema=None):
        if teacher is not None:  # a refresh (None: the teacher's creation)
            calls.append(len([h for h in run_history if h["phase"] == "dcd"]))
        out = real(teacher, student, ema)
        for a, b in zip(out.parameters(), training.unwrap(student).parameters()):
            assert torch.equal(a, b)
        return out

    run_history = []
    real_init = demo.Run.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        run_history.clear()
        self.history = run_history

    monkeypatch.setattr(demo, "refresh_teacher", spy)
    monkeypatch.setattr(demo.Run, "__init__", init)
    demo.main([*TINY, "--no-sample", "--out", str(tmp_path)])
    assert calls == [0, 3]  # the starts of rounds 0 and 1 (3 steps each)
    dts = [h["dt"] for h in run_history if h["phase"] == "dcd"]
    assert dts == [0.25] * 3 + [0.5] * 3


def test_demo_quick_json_has_every_field(tmp_path):
    """`duo-fast demo --quick` as CI runs it (a subprocess, like a user)."""
    out = tmp_path / "quick"
    r = subprocess.run([sys.executable, "-m", "duo_fast", "demo", "--quick", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    report = json.loads((out / "results.json").read_text())
    rec = report["results"]
    assert rec and all({"model", "sampler", "steps", "gen_ppl", "entropy", "impossible_frac", "seconds"} <= set(x)
                       for x in rec)
    assert {x["model"] for x in rec} == {"base", "distilled"}
    assert {x["sampler"] for x in rec} == {"ancestral+greedy", "ancestral", "psi"}
    assert all(math.isfinite(x["gen_ppl"]) and x["gen_ppl"] > 0 for x in rec)
    assert (out / "results.md").exists() and (out / "checkpoint.pt").exists()
    assert (out / "gen_ppl.png").stat().st_size > 1000
    assert report["truth"]["gen_ppl"] == pytest.approx(math.exp(report["entropy_rate"]), rel=0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_identical_parameters_different_noise(tmp_path):
    report = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "duo_fast", "demo", *TINY, "--no-sample", "--out", str(tmp_path / "out"),
           "--rank-report", str(report)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    r0, r1 = (torch.load(report / f"rank{k}.pt", weights_only=False) for k in (0, 1))
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # gradients were averaged: the ranks never diverge
    assert not torch.equal(r0["last"]["t"], r1["last"]["t"])  # each rank drew its own times and noise
    losses0 = [h["loss"] for h in r0["history"]]
    losses1 = [h["loss"] for h in r1["history"]]
    assert losses0 != losses1  # its own data and noise
    assert (tmp_path / "out" / "checkpoint.pt").exists()  # written by rank 0
