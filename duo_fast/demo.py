"""``duo-fast demo``: the main job. Trains a small Duo model on a built-in
dataset whose law is known (:class:`duo_fast.datasets.MarkovChain`), distills
it with Discrete Consistency Distillation, samples both models in 1 to 64
steps, and measures the samples exactly under the true law.

Pipeline (one process, or ``torchrun --nproc_per_node=N -m duo_fast demo``):

1. base model, ``--curriculum-steps`` with the Duo curriculum (exact
   tempered-softmax input, :func:`duo_fast.curriculum_embed`), then
   ``--elbo-steps`` of the plain uniform-state ELBO (``--no-curriculum``: the
   same number of steps, all plain ELBO);
2. ``--dcd-rounds`` rounds of DCD of ``--dcd-steps`` steps each: the teacher
   is refreshed from the student at every round start and ``dt = 2^round / T``
   doubles;
3. sampling both models at 1, 2, 4, ..., 64 steps with the ancestral sampler
   and a greedy tail, an ancestral tail, and the Psi sampler;
4. metrics of every sample batch and of true samples (the floor): Gen PPL
   under the truth, entropy, impossible transitions, seconds.

Outputs in ``--out`` (default ``demo-out``): ``results.json`` (every number;
``results`` is a list of flat records), ``results.md`` (the table),
``gen_ppl.png`` (Gen PPL vs steps), ``checkpoint.pt`` (``--resume`` continues
from it). Under torchrun, only rank 0 writes and samples; every rank trains on
its own data and noise (seeds offset by the rank), gradients are averaged by
DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ._checks import MAX_VOCAB, arg_float, arg_int, writable_dir
from .datasets import MarkovChain
from .models import DiT
from .generation import generate
from .training import DCDConfig, DuoConfig, dcd_loss, duo_loss, gamma_range, refresh_teacher, unwrap

SAMPLERS = {  # name -> generate() keyword arguments
    "ancestral+greedy": {"sampler": "ancestral", "noise_removal": "greedy"},
    "ancestral": {"sampler": "ancestral", "noise_removal": "ancestral"},
    "psi": {"sampler": "psi", "kappa": "max-capped-0.1", "noise_removal": "ancestral"},
}


@dataclass
class DemoConfig:
    # data: the Markov chain
    vocab_size: int = 256
    length: int = 32
    branching: int = 4
    chain_eps: float = 1e-3
    data_seed: int = 0
    # model
    hidden: int = 64
    n_layers: int = 3
    n_heads: int = 4
    # base training
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    grad_clip: float = 1.0
    curriculum_steps: int = 1500
    elbo_steps: int = 3500
    no_curriculum: bool = False
    tau_log10_start: float = -1.0  # 1/tau = 10 at the start of the curriculum
    tau_log10_end: float = -2.0  # ... 100 at its end
    alpha_high: float = 0.99  # the Duo schedule spans T(gamma) in [alpha_low, alpha_high]
    alpha_low: float = 0.02
    # distillation: dt = 2^round / dcd_T, from 1/256 to 1/2 over 8 rounds (a 9th round, dt = 1, collapses
    # the student: see README)
    dcd_rounds: int = 8
    dcd_steps: int = 150
    dcd_lr: float = 2e-4
    dcd_T: int = 256
    # sampling
    steps: tuple = (1, 2, 4, 8, 16, 32, 64)
    samplers: tuple = tuple(SAMPLERS)
    n_samples: int = 128
    # run
    seed: int = 0
    ckpt_every: int = 250

    def training_fields(self) -> dict:
        """What a checkpoint must agree with to be resumed."""
        skip = {"steps", "samplers", "n_samples", "ckpt_every"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# --quick: the whole pipeline at a smoke-test size (seconds of training; the numbers mean nothing).
QUICK = dict(hidden=32, n_layers=2, batch_size=16, curriculum_steps=60, elbo_steps=60, dcd_rounds=3, dcd_steps=15,
             dcd_T=64, n_samples=64, steps=(1, 2, 4), ckpt_every=50)


# The range of every field, checked when the command line is parsed (argparse names the
# flag); relations between fields are checked by check_config.
FIELD_TYPES = {
    "vocab_size": arg_int(2, MAX_VOCAB), "length": arg_int(2), "branching": arg_int(2),
    "chain_eps": arg_float(0.0, 1.0, lo_open=True, hi_open=True), "data_seed": arg_int(0),
    "hidden": arg_int(2), "n_layers": arg_int(1), "n_heads": arg_int(1),
    "batch_size": arg_int(1), "lr": arg_float(0.0, lo_open=True), "warmup": arg_int(0),
    "grad_clip": arg_float(0.0, lo_open=True), "curriculum_steps": arg_int(0), "elbo_steps": arg_int(0),
    "tau_log10_start": arg_float(), "tau_log10_end": arg_float(),
    "alpha_high": arg_float(0.0, 1.0, lo_open=True, hi_open=True),
    "alpha_low": arg_float(0.0, 1.0, lo_open=True, hi_open=True),
    "dcd_rounds": arg_int(0, 62), "dcd_steps": arg_int(1), "dcd_lr": arg_float(0.0, lo_open=True),
    "dcd_T": arg_int(1), "steps": arg_int(1), "n_samples": arg_int(1), "seed": arg_int(0),
    "ckpt_every": arg_int(1),
}


def check_config(cfg: DemoConfig) -> None:
    """What the flags' own ranges cannot say: relations between fields (before any work)."""
    problems = []
    if cfg.branching > cfg.vocab_size:
        problems.append(f"--branching ({cfg.branching}) must be <= --vocab-size ({cfg.vocab_size})")
    if cfg.hidden % cfg.n_heads or (cfg.hidden // cfg.n_heads) % 2:
        problems.append(f"--hidden ({cfg.hidden}) must split into --n-heads ({cfg.n_heads}) heads of an even size")
    if not cfg.alpha_low < cfg.alpha_high:
        problems.append(f"--alpha-low ({cfg.alpha_low}) must be below --alpha-high ({cfg.alpha_high})")
    if cfg.curriculum_steps + cfg.elbo_steps < 1:
        problems.append("--curriculum-steps + --elbo-steps must be >= 1 (no base training otherwise)")
    if cfg.dcd_rounds and 2 ** (cfg.dcd_rounds - 1) > cfg.dcd_T:
        problems.append(f"--dcd-T ({cfg.dcd_T}) must be >= 2^(--dcd-rounds - 1) = {2 ** (cfg.dcd_rounds - 1)} "
                        "(the last round's dt = 2^round / T is at most 1)")
    unknown = [s for s in cfg.samplers if s not in SAMPLERS]
    if unknown:
        problems.append(f"unknown sampler(s) {unknown}; choose from {list(SAMPLERS)}")
    if problems:
        raise SystemExit("duo_fast demo: " + "; ".join(problems))


# ----------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------


def dist_setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _log(rank: int, *msg) -> None:
    if rank == 0:
        print(*msg, flush=True)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------
# Training phases
# ----------------------------------------------------------------------------------


def make_model(cfg: DemoConfig) -> DiT:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    return DiT(cfg.vocab_size, hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads, cond_dim=cfg.hidden)


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(unwrap(model).parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then constant (the Duo code's constant_warmup)."""
    return base * min(1.0, (step + 1) / max(warmup, 1))


def duo_config(cfg: DemoConfig) -> DuoConfig:
    gmin, gmax = gamma_range(cfg.vocab_size, cfg.alpha_high, cfg.alpha_low)
    end = -1 if cfg.no_curriculum else cfg.curriculum_steps - 1
    return DuoConfig(cfg.vocab_size, gamma_min=gmin, gamma_max=gmax, tau_log10_start=cfg.tau_log10_start,
                     tau_log10_end=cfg.tau_log10_end, curriculum_start=0, curriculum_end=end)


def dcd_config(cfg: DemoConfig) -> DCDConfig:
    gmin, gmax = gamma_range(cfg.vocab_size, cfg.alpha_high, cfg.alpha_low)
    return DCDConfig(cfg.vocab_size, gamma_min=gmin, gamma_max=gmax, T=cfg.dcd_T, direction="bwd")


def optimizer_step(model, opt, loss: torch.Tensor, lr: float, grad_clip: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


CHECKPOINT_KEYS = frozenset({"config", "phase", "step", "model", "opt", "student", "teacher", "base_state", "history",
                             "generators", "world"})


class Run:
    """The state of one demo run: models, optimizers, generators, progress;
    saved to and restored from ``checkpoint.pt``."""

    def __init__(self, cfg: DemoConfig, out: Path, rank: int = 0, world: int = 1, device=torch.device("cpu"),
                 progress: bool = True):
        self.cfg, self.out, self.rank, self.world, self.device = cfg, out, rank, world, device
        self.progress = progress and rank == 0
        self.chain = MarkovChain(cfg.vocab_size, cfg.length, branching=cfg.branching, eps=cfg.chain_eps,
                                 seed=cfg.data_seed)
        self.model = make_model(cfg).to(device)
        self.student = None
        self.teacher = None
        self.opt = make_optimizer(self.model, cfg.lr)
        # Per-rank streams: data batches and diffusion noise (the seed offset by the rank).
        self.data_gen = torch.Generator().manual_seed(10_000 + cfg.seed + 7919 * rank)
        self.noise_gen = torch.Generator(device).manual_seed(20_000 + cfg.seed + 7919 * rank)
        self.phase, self.step = "base", 0
        self.base_state = None
        self.history: list[dict] = []
        self.last = {}  # the last step's draws (for --rank-report)

    # -- checkpoints ------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "config": self.cfg.training_fields(), "phase": self.phase, "step": self.step,
            "model": unwrap(self.model).state_dict(), "opt": self.opt.state_dict(),
            "student": unwrap(self.student).state_dict() if self.student is not None else None,
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "base_state": self.base_state, "history": self.history,
            "generators": self._generator_states(), "world": self.world,
        }

    def _generator_states(self) -> list:
        """Every rank's (data, noise) generator states, gathered (a collective)."""
        mine = (self.data_gen.get_state(), self.noise_gen.get_state().cpu())
        if self.world == 1:
            return [mine]
        everyone = [None] * self.world
        torch.distributed.all_gather_object(everyone, mine)
        return everyone

    def save(self) -> None:
        """Called by every rank at the same steps; rank 0 writes."""
        state = self.state()
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")

    def load(self, path: Path) -> None:
        """Restore from ``path``; anything wrong with the file is one SystemExit naming it."""
        try:
            st = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # noqa: BLE001  (empty, truncated, garbage: EOFError, UnpicklingError, RuntimeError ...)
            raise SystemExit(f"duo_fast demo: cannot resume from {path}: expected a checkpoint written by duo-fast "
                             f"demo, got a file torch.load cannot read ({type(e).__name__}: {e}); start over with "
                             "--force") from None
        missing = sorted(CHECKPOINT_KEYS - set(st)) if isinstance(st, dict) else None
        if missing is None or missing:
            got = f"missing keys {missing}" if missing else f"a {type(st).__name__}"
            raise SystemExit(f"duo_fast demo: cannot resume from {path}: expected a duo-fast demo checkpoint (a dict "
                             f"with keys {sorted(CHECKPOINT_KEYS)}), got {got}; start over with --force")
        try:
            self._restore(st, path)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise SystemExit(f"duo_fast demo: cannot resume from {path}: its contents do not fit this run "
                             f"({type(e).__name__}: {e}); start over with --force") from None

    def _restore(self, st: dict, path: Path) -> None:
        if st["config"] != self.cfg.training_fields():
            diff = {k: (st["config"].get(k), v) for k, v in self.cfg.training_fields().items() if st["config"].get(k) != v}
            raise SystemExit(f"duo_fast demo: {path} was written with other settings (checkpoint, now): {diff}")
        if st["world"] != self.world:
            raise SystemExit(f"duo_fast demo: {path} was written by {st['world']} processes, not {self.world}")
        self.phase, self.step, self.base_state, self.history = st["phase"], st["step"], st["base_state"], st["history"]
        unwrap(self.model).load_state_dict(st["model"])
        if self.phase != "base":
            self._start_dcd(fresh=False)
            unwrap(self.student).load_state_dict(st["student"])
            self.teacher.load_state_dict(st["teacher"])
        self.opt.load_state_dict(st["opt"])
        data_state, noise_state = st["generators"][self.rank]
        self.data_gen.set_state(data_state)
        self.noise_gen.set_state(noise_state)

    # -- phases -----------------------------------------------------------------------

    def _batch(self) -> torch.Tensor:
        return self.chain.sample(self.cfg.batch_size, self.data_gen).to(self.device)

    def wrap(self, model):
        if self.world > 1:
            return torch.nn.parallel.DistributedDataParallel(model)
        return model

    def train_base(self) -> None:
        cfg, dcfg = self.cfg, duo_config(self.cfg)
        total = cfg.curriculum_steps + cfg.elbo_steps
        model = self.wrap(self.model)
        bar = _progress(total, self.step, "base", self.progress)
        phase = None
        while self.step < total:
            x0 = self._batch()
            out = duo_loss(model, x0, self.step, dcfg, generator=self.noise_gen)
            loss = float(out.loss.detach())
            norm = optimizer_step(model, self.opt, out.loss, lr_at(self.step, cfg.lr, cfg.warmup), cfg.grad_clip)
            self.last = {"t": out.t.detach().cpu(), "loss": loss}
            self.history.append({"phase": out.info["phase"], "step": self.step, "loss": loss, "grad_norm": norm})
            self.step += 1
            if out.info["phase"] != phase:
                phase = out.info["phase"]
                bar.set_description(f"base ({phase})")
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update(1)
            if self.step % cfg.ckpt_every == 0 or self.step == total:
                self.save()
        bar.close()
        self.base_state = {k: v.detach().clone() for k, v in unwrap(self.model).state_dict().items()}
        self._start_dcd(fresh=True)
        self.save()

    def _start_dcd(self, fresh: bool) -> None:
        if fresh:
            self.phase = "dcd"
            self.step = 0
        self.student = self.model  # the student starts from the base model; base_state keeps the base
        self.teacher = refresh_teacher(None, self.student)
        if fresh:
            self.opt = make_optimizer(self.student, self.cfg.dcd_lr)

    def distill(self) -> None:
        cfg, ccfg = self.cfg, dcd_config(self.cfg)
        total = cfg.dcd_rounds * cfg.dcd_steps
        student = self.wrap(self.student)
        bar = _progress(total, self.step, "distill (DCD)", self.progress)
        while self.step < total:
            rnd = self.step // cfg.dcd_steps
            if self.step % cfg.dcd_steps == 0:  # a new round: the teacher becomes the student
                refresh_teacher(self.teacher, self.student)
            x0 = self._batch()
            out = dcd_loss(student, self.teacher, x0, rnd, ccfg, generator=self.noise_gen)
            loss = float(out.loss.detach())
            norm = optimizer_step(student, self.opt, out.loss, cfg.dcd_lr, cfg.grad_clip)
            self.last = {"t": out.t.detach().cpu(), "loss": loss}
            self.history.append({"phase": "dcd", "step": self.step, "round": rnd, "dt": out.info["dt"],
                                 "loss": loss, "grad_norm": norm})
            self.step += 1
            bar.set_postfix(round=rnd, dt=f"{out.info['dt']:.3g}", kl=f"{loss:.3f}")
            bar.update(1)
            if self.step % cfg.ckpt_every == 0 or self.step == total:
                self.save()
        bar.close()
        self.phase = "sample"
        self.save()

    # -- sampling and metrics ----------------------------------------------------------

    def models(self) -> dict:
        base = make_model(self.cfg).to(self.device)
        base.load_state_dict(self.base_state)
        return {"base": base.eval(), "distilled": unwrap(self.student).eval()}

    def evaluate(self) -> dict:
        cfg, dcfg = self.cfg, duo_config(self.cfg)
        truth = self.chain.metrics(self.chain.sample(cfg.n_samples, torch.Generator().manual_seed(99)))
        records = []
        runs = [(m, s, n) for m in ("base", "distilled") for s in cfg.samplers for n in cfg.steps]
        bar = _progress(len(runs), 0, "sampling", self.progress)
        models = self.models()
        for model_name, sampler, n_steps in runs:
            model = models[model_name]
            t0 = time.perf_counter()
            x = generate(lambda z, sigma, m=model: m(z, sigma), cfg.n_samples, cfg.length, cfg.vocab_size,
                         steps=n_steps, schedule="duo", gamma_min=dcfg.gamma_min, gamma_max=dcfg.gamma_max,
                         time_input="sigma", device=self.device, seed=cfg.seed + 1, progress=False,
                         **SAMPLERS[sampler])
            seconds = time.perf_counter() - t0
            records.append({"model": model_name, "sampler": sampler, "steps": n_steps, "seconds": seconds,
                            **self.chain.metrics(x)})
            bar.set_postfix(model=model_name, sampler=sampler, steps=n_steps)
            bar.update(1)
        bar.close()
        return {"truth": truth, "entropy_rate": self.chain.entropy_rate(), "results": records}


# ----------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------


def table(report: dict) -> str:
    lines = ["| model | sampler | steps | Gen PPL | entropy | unigram entropy | impossible | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['gen_ppl']:.2f} | {r['entropy']:.3f} | "
                     f"{r['unigram_entropy']:.3f} | {r['impossible_frac']:.4f} | {r['seconds']:.2f} |")
    t = report["truth"]
    lines.append(f"| data (true samples) | — | — | {t['gen_ppl']:.2f} | {t['entropy']:.3f} | {t['unigram_entropy']:.3f} | "
                 f"{t['impossible_frac']:.4f} | — |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("duo_fast demo: matplotlib is not installed; no plot (pip install matplotlib)", file=sys.stderr)
        return None
    samplers = sorted({r["sampler"] for r in report["results"]}, key=list(SAMPLERS).index)
    fig, axes = plt.subplots(1, len(samplers), figsize=(5 * len(samplers), 4), squeeze=False, sharey=True)
    for ax, sampler in zip(axes[0], samplers):
        for model, style in (("base", "o-"), ("distilled", "s-")):
            rs = sorted((r for r in report["results"] if r["model"] == model and r["sampler"] == sampler),
                        key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in rs], [r["gen_ppl"] for r in rs], style, label=model)
        ax.axhline(report["truth"]["gen_ppl"], color="k", ls="--", lw=1, label="data (floor)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_title(sampler)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("Gen PPL under the true law")
    axes[0][0].legend()
    fig.suptitle("duo_fast demo: base vs distilled (DCD)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duo-fast demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DemoConfig()
    p.add_argument("--quick", action="store_true", help="a small run for a smoke test (< 2 minutes on 2 cores)")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--force", action="store_true",
                   help="start over in an OUT that holds a checkpoint (overwriting it; without --force or --resume "
                        "such an OUT is refused)")
    p.add_argument("--no-curriculum", action="store_true", help="ablation: the same budget, plain ELBO only")
    p.add_argument("--threads", type=arg_int(1), default=1,
                   help="torch threads per process (default 1: the model is small enough that a second thread "
                        "gains little, and one thread is not slowed down by other load on the machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--rank-report", default=None,
                   help="diagnostic: every rank writes its parameters and last draws to DIR/rank<k>.pt after training")
    p.add_argument("--no-sample", action="store_true", help="train (and distill) only")
    for f in dataclasses.fields(DemoConfig):
        if f.name == "no_curriculum":
            continue
        flag = "--" + f.name.replace("_", "-").lower()
        default = getattr(d, f.name)
        if f.name == "samplers":
            p.add_argument(flag, dest=f.name, choices=list(SAMPLERS), nargs="+", default=None,
                           help=f"default {' '.join(default)}")
        elif isinstance(default, tuple):
            p.add_argument(flag, dest=f.name, type=FIELD_TYPES[f.name], nargs="+", default=None,
                           help=f"default {' '.join(map(str, default))}")
        else:
            p.add_argument(flag, dest=f.name, type=FIELD_TYPES[f.name], default=None, help=f"default {default}")
    return p


def config_from_args(args) -> DemoConfig:
    values = dict(QUICK) if args.quick else {}
    for f in dataclasses.fields(DemoConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    values["no_curriculum"] = args.no_curriculum
    cfg = DemoConfig(**values)
    check_config(cfg)
    return cfg


def run(cfg: DemoConfig, out: Path, *, resume: bool = False, force: bool = False, progress: bool = True,
        sample: bool = True, rank_report: str | None = None) -> dict | None:
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not (resume or force):  # never overwrite a run silently
        raise SystemExit(f"duo_fast demo: {ckpt} exists (an earlier run): pass --resume to continue it, or --force to "
                         "start over and overwrite it (or choose another --out)")
    writable_dir(out, "--out")  # before any work: a bad --out fails now, not at the first checkpoint
    rank, world, device = dist_setup()
    r = Run(cfg, out, rank, world, device, progress)
    if resume:
        if not ckpt.exists():
            raise SystemExit(f"duo_fast demo: --resume but {ckpt} does not exist")
        r.load(ckpt)
        _log(rank, f"resumed from {ckpt}: phase {r.phase}, step {r.step}")
    _log(rank, f"data: {r.chain}; floor Gen PPL exp(entropy rate) = {math.exp(r.chain.entropy_rate()):.3f}")
    _log(rank, f"model: DiT hidden={cfg.hidden} layers={cfg.n_layers} "
               f"({sum(p.numel() for p in r.model.parameters()) / 1e6:.2f} M parameters), {world} process(es) on {device}")
    t0 = time.perf_counter()
    if r.phase == "base":
        r.train_base()
    if r.phase == "dcd":
        r.distill()
    train_s = time.perf_counter() - t0
    if rank_report is not None:
        Path(rank_report).mkdir(parents=True, exist_ok=True)
        torch.save({"params": [p.detach().cpu() for p in unwrap(r.student).parameters()], "last": r.last,
                    "history": r.history}, Path(rank_report) / f"rank{rank}.pt")
    if world > 1:
        torch.distributed.barrier()
    if rank != 0 or not sample:
        if world > 1:
            torch.distributed.destroy_process_group()
        return None
    report = r.evaluate()
    report.update({"config": dataclasses.asdict(cfg), "train_seconds": train_s, "world_size": world,
                   "device": str(device), "threads": torch.get_num_threads(), "history": r.history})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    md = table(report)
    (out / "results.md").write_text(md + "\n")
    png = plot(report, out / "gen_ppl.png")
    print("\n" + md)
    print(f"\ntraining {train_s:.0f} s; wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f", {png}" if png else ""))
    if world > 1:
        torch.distributed.destroy_process_group()
    return report


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.resume and args.force:
        p.error("--resume and --force exclude each other (continue the checkpoint, or overwrite it)")
    cfg = config_from_args(args)
    torch.set_num_threads(args.threads)
    run(cfg, Path(args.out), resume=args.resume, force=args.force, progress=not args.no_progress,
        sample=not args.no_sample, rank_report=args.rank_report)
