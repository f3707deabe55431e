"""Benchmark cases of the drop-in (duo_fast.integrations.duo): one real Duo
step built from the Duo codebase's own classes (its hydra config, algo.DUO /
algo.Distillation / algo.DUO_BASE with its models.dit.DIT), patched vs
unpatched. Needs the Duo code (``$DUO_REFERENCE_DIR`` or
``../shared/duo-reference``) and requirements-duo.txt.

Sides (each in a fresh process):

  * duo: the model built and ``duo_fast.integrations.duo.patch()`` applied
    (all parts; the output layer fused into the loss, the KL and the sampling
    step);
  * ref: the same model, unpatched: the Duo code as users run it.

Rows ``<step> (logits)`` (gpt2 sizes): the duo side alone, patched with
``fuse_output_layer=False``: the model's ``[B, L, K]`` logits into the fused
loss / KL / sampling ops, i.e. the drop-in before the output layer was fused,
measured in the same run.

Steps (BASELINES.md, "The drop-in, end to end"):

  * ``backbone``: the DiT alone, forward + backward on token ids (what no patch
    removes; ref side only).
  * ``duo-simple``: the training step's loss in the curriculum (mode
    ``simple``) + backward.
  * ``duo-topk``: the same with the efficient top-k curriculum, k = 128.
  * ``elbo``: the plain ELBO after the curriculum (``DUO_BASE``) + backward.
  * ``distill``: ``Distillation`` (kl-bwd, teacher = a copy) + backward.
  * ``sample-step``: one ``_ancestral_update`` (float64 posterior in the
    reference, ``sampling.use_float64=True`` as its default).

The training step's loss is what ``training_step`` takes: ``_loss`` (``nll``
per token, then the token mean over the attention mask). Unpatched, the
snapshot's ``_loss`` cannot call ``DUO.nll`` / ``Distillation.nll`` (see
integrations/duo.py), so that side calls them with their declared parameters
``(x0, None, None, True)`` and takes ``_loss``'s token mean itself. t is the
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
LOSS_STEPS = {"duo-simple", "duo-topk", "elbo", "distill"}

# BASELINES.md targets for the patched step: time <= x (speedup >= 1/x), memory <= y.
# Memory: issue 22 (the output layer fused); time: BASELINES.md.
TARGETS = {
    "duo-simple": Target("<= 0.5x time, <= 0.2x memory", min_speedup_ref=2.0, max_mem_ratio=0.2),
    "duo-topk": Target("<= 0.7x time, <= 0.2x memory", min_speedup_ref=1 / 0.7, max_mem_ratio=0.2),
    "elbo": Target("<= 0.8x time, <= 0.25x memory", min_speedup_ref=1.25, max_mem_ratio=0.25),
    "distill": Target("<= 0.25x memory", max_mem_ratio=0.25),
    "sample-step": Target("<= 0.3x time, <= 0.05x memory", min_speedup_ref=1 / 0.3, max_mem_ratio=0.05),
}


def _build(config: str, step: str, patched: bool, device: str, fuse: bool = True):
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
        D.patch(fuse_output_layer=fuse)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (B, L), generator=g).to(device)
    return {"model": model, "x0": x0, "valid": torch.ones_like(x0), "ref": ref, "B": B, "patched": patched}


def _drop_grad(st):
    for p in st["model"].parameters():
        p.grad = None


def _run(step: str):
    def fn(st):
        m, x0 = st["model"], st["x0"]
        if step == "backbone":
            sigma = torch.full((x0.shape[0],), 0.5, device=x0.device)
            m.backbone(x0, sigma).float().sum().backward()
        elif step in LOSS_STEPS:
            if st["patched"] or step == "elbo":  # training_step's call
                loss = m._loss(x0, None, st["valid"], None, True).loss
            else:  # the declared call, then _loss's token mean
                loss = (m.nll(x0, None, None, True) * st["valid"]).sum() / st["valid"].sum()
            loss.backward()
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
        if not config.startswith("gpt2"):
            continue
        for step in STEPS[1:]:  # the drop-in on the logits (before the output layer was fused), same run
            logits = Impl(_run(step), before_each=_drop_grad,
                          setup=lambda dev, c=config, s=step: _build(c, s, True, dev, fuse=False),
                          note="patch(fuse_output_layer=False): the model's [B, L, K] logits into the fused ops")
            out.append(Case(op=OP, name=f"{config}-{step}-logits",
                            size=f"{step} (logits): DiT h={hidden} x{blocks} K={K} B={B} L={L}",
                            setup=lambda dev: None, duo=logits, ref=None, repeats=3))
    return out
