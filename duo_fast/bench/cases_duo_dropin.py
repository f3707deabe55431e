"""Benchmark cases of the drop-in (duo_fast.integrations.duo): one real Duo
step built from the Duo codebase's own classes (its hydra config, algo.DUO /
algo.Distillation / algo.DUO_BASE with its models.dit.DIT), patched vs
unpatched. Needs the Duo code (``$DUO_REFERENCE_DIR`` or
``../shared/duo-reference``) and requirements-duo.txt.

Sides (each in a fresh process):

  * duo: the model built and ``duo_fast.integrations.duo.patch()`` applied
    (all parts);
  * ref: the same model, unpatched: the Duo code as users run it.

Steps (BASELINES.md, "The drop-in, end to end"):

  * ``backbone``: the DiT alone, forward + backward on token ids (what no patch
    removes; ref side only).
  * ``duo-simple``: ``DUO.nll`` in the curriculum (mode ``simple``) + backward.
  * ``duo-topk``: the same with the efficient top-k curriculum, k = 128.
  * ``elbo``: the plain ELBO after the curriculum (``DUO_BASE.nll``) + backward.
  * ``distill``: ``Distillation.nll`` (kl-bwd, teacher = a copy) + backward.
  * ``sample-step``: one ``_ancestral_update`` (float64 posterior in the
    reference, ``sampling.use_float64=True`` as its default).

``nll`` is called with the snapshot's declared parameters ``(x0, None, None,
True)`` (its own ``_loss`` cannot call it: see integrations/duo.py). t is the
reference's ``_sample_t``; ``.grad`` is dropped before each call.

Sizes: ``tiny`` (hidden 64, 2 blocks, 4 heads, vocab 256, B=4, L=32; the only
one in --tiny) and ``gpt2`` (hidden 256, 4 blocks, 4 heads, vocab 50257, B=4,
L=256: BASELINES' size; --quick uses B=2, L=128). Without the Duo code these
cases are skipped (CasesUnavailable).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from .common import Case, CasesUnavailable, Impl, Target

OP = "duo_dropin"

CONFIGS = {
    # name: (hidden, blocks, heads, cond_dim, vocab, B, L)
    "tiny": (64, 2, 4, 32, 256, 4, 32),
    "gpt2": (256, 4, 4, 128, 50257, 4, 256),
    "gpt2-quick": (256, 4, 4, 128, 50257, 2, 128),
}

STEPS = ("backbone", "duo-simple", "duo-topk", "elbo", "distill", "sample-step")

# BASELINES.md targets for the patched step: time <= x (speedup >= 1/x), memory <= y.
TARGETS = {
    "duo-simple": Target("<= 0.5x time, <= 0.4x memory", min_speedup_ref=2.0, max_mem_ratio=0.4),
    "duo-topk": Target("<= 0.7x time, <= 0.7x memory", min_speedup_ref=1 / 0.7, max_mem_ratio=0.7),
    "elbo": Target("<= 0.8x time, <= 0.8x memory", min_speedup_ref=1.25, max_mem_ratio=0.8),
    "sample-step": Target("<= 0.3x time, <= 0.3x memory", min_speedup_ref=1 / 0.3, max_mem_ratio=0.3),
}


def _build(config: str, step: str, patched: bool, device: str):
    from duo_fast.integrations import duo as D
    from duo_fast.integrations import duo_reference as R

    hidden, blocks, heads, cond, K, B, L = CONFIGS[config]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = R.load()
        folder = Path(tempfile.mkdtemp(prefix="duo_bench_tok_"))
        tok = R.word_tokenizer(K, folder)
        model_over = ("model=small", f"model.hidden_size={hidden}", f"model.n_blocks={blocks}", f"model.n_heads={heads}",
                      f"model.cond_dim={cond}", f"model.length={L}", "model.dropout=0.0")
        over = []
        if step == "duo-topk":
            over = ["algo.curriculum.mode=efficient_cached", "algo.curriculum.top_k=128"]
        cls, algo = "DUO", "duo"
        if step == "distill":
            cls, algo = "Distillation", "distillation"
        elif step in ("elbo", "sample-step", "backbone"):
            cls = "DUO_BASE"
        cfg = R.compose_config(ref, folder, over, algo=algo, model=model_over, device=device)
        model = getattr(ref.algo, cls)(cfg, tok).to(device)
    if patched:
        D.patch()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (B, L), generator=g).to(device)
    return {"model": model, "x0": x0, "ref": ref, "B": B}


def _drop_grad(st):
    for p in st["model"].parameters():
        p.grad = None


def _run(step: str):
    def fn(st):
        m, x0 = st["model"], st["x0"]
        if step == "backbone":
            sigma = torch.full((x0.shape[0],), 0.5, device=x0.device)
            m.backbone(x0, sigma).float().sum().backward()
        elif step in ("duo-simple", "duo-topk"):
            m.nll(x0, None, None, True).mean().backward()
        elif step == "elbo":
            m.nll(x0, None, None, None, True).mean().backward()
        elif step == "distill":
            m.nll(x0, None, None, None).mean().backward()
        elif step == "sample-step":
            with torch.no_grad():
                t = torch.full((x0.shape[0], 1), 0.5, device=x0.device)
                m._ancestral_update(x0, t, None, torch.tensor(0.1))
    return fn


def _available() -> None:
    from duo_fast.integrations.duo_reference import find_reference_dir

    if find_reference_dir() is None:
        raise CasesUnavailable("the Duo codebase was not found ($DUO_REFERENCE_DIR): the drop-in cases need it")


def cases(mode: str, device: str) -> list[Case]:
    _available()
    configs = {"full": ["tiny", "gpt2"], "quick": ["tiny", "gpt2-quick"], "tiny": ["tiny"]}[mode]
    out = []
    for config in configs:
        hidden, blocks, heads, _, K, B, L = CONFIGS[config]
        for step in STEPS:
            duo = None
            if step != "backbone":
                duo = Impl(_run(step), before_each=_drop_grad, setup=lambda dev, c=config, s=step: _build(c, s, True, dev),
                           note="the Duo code's own model, duo_fast.integrations.duo.patch() applied")
            ref = Impl(_run(step), before_each=_drop_grad, setup=lambda dev, c=config, s=step: _build(c, s, False, dev),
                       note="the Duo code's own model, unpatched", source="Duo code")
            out.append(Case(
                op=OP, name=f"{config}-{step}",
                size=f"{step}: DiT h={hidden} x{blocks} K={K} B={B} L={L}",
                setup=lambda dev: None, duo=duo, ref=ref,
                target=TARGETS.get(step) if config.startswith("gpt2") else None,
                repeats=3,
                notes=[f"{OP}: 'backbone' is the DiT alone (fwd+bwd on ids), the floor no patch removes"]
                if step == "backbone" else [],
            ))
    return out
