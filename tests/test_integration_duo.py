"""duo_fast.integrations.duo against the Duo codebase itself: each part patched
vs the original on the same inputs (values, gradients, laws of everything
random, shapes and dtypes), undo() by identity, end-to-end training and
sampling with the Duo code's own classes, memory, and the main.py launcher.

Statistical tests use fixed seeds; z-scores are held under 5 (two-sided,
~6e-7 per comparison under the null) and chi-square p-values above 1e-4.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import duo_fast
import duo_fast.integrations.duo as D
from duo_fast.integrations import _patching
from duo_fast import reference
from duo_fast.integrations.duo_reference import TINY_MODEL

import duo_codebase
from duo_codebase import K_SMALL, lightning_fit, make_config, make_tokenizer, randomize, write_text_data

ref, tok_dir = duo_codebase.ref, duo_codebase.tok_dir  # the shared fixtures

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available", "ignore::FutureWarning", "ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tok_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def build(ref, tok_dir, tok, overrides=(), cls="DUO", algo="duo"):
    cfg = make_config(ref, tok_dir, overrides, algo=algo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(ref.algo, cls)(cfg, tok)


def targets(ref):
    """(owner, name) of every object patch() replaces with all parts."""
    A, T = ref.algo, ref.trainer_base
    return [(A.DUO, "_gamma_to_alphat_integral"), (A.DUO, "_gamma_to_alpha_dalpha_cached"),
            (A.DUO, "_gamma_to_alpha_dalpha"), (A.DUO, "_initialize_curriculum_coefficients"),
            (A.DUO, "_prior_loss"), (A.Distillation, "_validate_configuration"),
            (ref.dit.EmbeddingLayer, "forward"), (A.DUO, "nll"), (ref.utils, "sample_tempered_softmax_topk"),
            (A.DUO_BASE, "nll_per_token"), (A.DUO_BASE, "nll"), (A.Distillation, "nll"), (A.DUO_BASE, "_loss"),
            (T.UniformState, "_ancestral_update"), (T.UniformState, "_psi_update")]


def zscore(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two-sample z of the means of a and b along dim 0."""
    a, b = a.double(), b.double()
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    return (a.mean(0) - b.mean(0)) / se


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    p = (k1 + k2) / (n1 + n2)
    return (k1 / n1 - k2 / n2) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))


def chi2_two_sample(c1: torch.Tensor, c2: torch.Tensor) -> float:
    """p-value that two count vectors come from one law (cells with no counts dropped)."""
    from scipy.stats import chi2_contingency

    keep = (c1 + c2) > 0
    return float(chi2_contingency(torch.stack([c1[keep], c2[keep]]).numpy())[1])


# ----------------------------------------------------------------------------------
# patch() / Patch mechanics
# ----------------------------------------------------------------------------------


def test_undo_restores_every_original_by_identity(ref, caplog):
    before = {(o, n): o.__dict__.get(n, "<absent>") for o, n in targets(ref)}
    with caplog.at_level(logging.INFO, logger="duo_fast.integrations.duo"):
        p = D.patch()
    records = [r for r in caplog.records if r.name == "duo_fast.integrations.duo"]
    assert len(records) == 1 and "DUO.nll" in records[0].getMessage() and "_psi_update" in records[0].getMessage()
    try:
        assert sorted(p.replaced) == sorted(_patching.Replaced(o, n, None, True).label for o, n in targets(ref))
        for o, n in targets(ref):
            assert o.__dict__[n] is not before[(o, n)], (o, n)
    finally:
        p.undo()
    for o, n in targets(ref):
        assert o.__dict__.get(n, "<absent>") is before[(o, n)], (o, n)
    assert "nll" not in ref.algo.DUO_BASE.__dict__ and "_loss" not in ref.algo.DUO_BASE.__dict__  # inherited: deleted
    p.undo()  # idempotent


def test_context_manager_and_no_double_patching(ref):
    original = ref.algo.DUO.nll
    with D.patch(parts=["curriculum"]) as p:
        assert ref.algo.DUO.nll is not original
        with pytest.raises(RuntimeError, match="already patched: .*DUO.nll"):
            D.patch(parts=["curriculum", "loss"])
        assert ref.algo.DUO_BASE.__dict__.get("nll") is None  # nothing changed by the refused call
        D.patch(parts=["sampling"]).undo()  # other parts are free
    assert ref.algo.DUO.nll is original and not p.active


def test_undo_keeps_what_the_user_reassigned(ref):
    """undo() after the user reassigned a patched attribute: that one is left as the
    user set it (with a warning naming it); the others are restored by identity."""
    before = {(o, n): o.__dict__.get(n, "<absent>") for o, n in targets(ref)}
    p = D.patch()

    def mine(self, *args, **kwargs):
        return "mine"

    ref.algo.DUO.nll = mine
    try:
        with pytest.warns(RuntimeWarning, match=r"left 1 attribute\(s\) alone: .*algo\.DUO\.nll"):
            p.undo()
        assert ref.algo.DUO.__dict__["nll"] is mine
        for o, n in targets(ref):
            if (o, n) != (ref.algo.DUO, "nll"):
                assert o.__dict__.get(n, "<absent>") is before[(o, n)], (o, n)
    finally:
        ref.algo.DUO.nll = before[(ref.algo.DUO, "nll")]


def test_patch_argument_errors(ref, monkeypatch):
    with pytest.raises(ValueError, match="parts must be a non-empty subset"):
        D.patch(parts=["schedule", "speed"])
    with pytest.raises(ValueError, match="parts must be a non-empty subset"):
        D.patch(parts=[])
    with pytest.raises(ValueError, match="topk_zt_rule"):
        D.patch(topk_zt_rule="biased")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
            D.patch(chunk_size=bad)
    monkeypatch.delitem(sys.modules, "trainer_base")
    with pytest.raises(RuntimeError, match=r"trainer_base= \(sys.modules\['trainer_base'\]\)"):
        D.patch(parts=["sampling"])
    D.patch(parts=["sampling"], trainer_base=ref.trainer_base).undo()  # passing it explicitly works
    monkeypatch.delitem(sys.modules, "models.dit")
    with pytest.raises(RuntimeError, match=r"dit= \(sys.modules\['models.dit'\]\)"):
        D.patch(parts=["curriculum"])


# ----------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------


def test_schedule_exact_against_oracle_and_table(ref):
    """Patched alpha / dalpha equal the float64 oracle; the original table agrees
    to its resolution (~2.5e-5 in pt) and its finite difference to a few %."""
    import pickle

    K = 50257
    with open(ref.path / "integral" / "gpt2.pkl", "rb") as f:
        cache = pickle.load(f)
    cache["pt"], cache["grad_pt"] = torch.from_numpy(cache["pt"]), torch.from_numpy(cache["grad_pt"])
    class Me:  # the attributes of a DUO that these methods read
        vocab_size, integral_cache, gamma_min, gamma_max = K, cache, -3.5, -1.75

        def _gamma_to_alphat_integral(self, g):
            return ref.algo.DUO._gamma_to_alphat_integral(self, g)

    me = Me()
    gamma = torch.linspace(-3.5, -1.75, 41)
    a_orig = ref.algo.DUO._gamma_to_alphat_integral(me, gamma)
    a_o, d_o = ref.algo.DUO._gamma_to_alpha_dalpha_cached(me, gamma)
    prior_orig = ref.algo.DUO._prior_loss(me)
    a_true, dadg_true = reference.gamma_to_alpha(gamma.double(), K)
    with D.patch(parts=["schedule"]):
        a = ref.algo.DUO._gamma_to_alphat_integral(me, gamma)
        a2, d = ref.algo.DUO._gamma_to_alpha_dalpha_cached(me, gamma)
        prior = ref.algo.DUO._prior_loss(me)
    assert a.dtype == a_orig.dtype == torch.float64 and a.shape == a_orig.shape
    assert d.dtype == d_o.dtype and d.shape == d_o.shape
    torch.testing.assert_close(a, a_true, rtol=0, atol=1e-9)
    torch.testing.assert_close(a2, a_true, rtol=0, atol=1e-9)
    torch.testing.assert_close(d, dadg_true * 1.75, rtol=1e-6, atol=0)
    assert (a - a_orig).abs().max() < 3e-5  # the table's nearest-index resolution
    assert ((d - d_o) / d).abs().max() < 0.05  # the reference's finite difference
    assert isinstance(prior, float) and abs(prior - prior_orig) < 1e-3 * abs(prior_orig) + 1e-6
    a1 = float(reference.gamma_to_alpha(torch.tensor([-1.75], dtype=torch.float64), K)[0])
    exact = (a1 + (1 - a1) / K) * math.log((K - 1) * a1 + 1) + (1 - 1 / K) * (1 - a1) * math.log(1 - a1)
    assert prior == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("mode", D.CURRICULUM_MODES)
def test_no_pickle_needed_once_patched(ref, tok_dir, tok, tmp_path, mode):
    missing = str(tmp_path / "no-such.pkl")
    overrides = [f"algo.curriculum.mode={mode}", f"algo.curriculum.integral_cache_path={missing}",
                 f"algo.curriculum.cache_dir={tmp_path}"]
    if mode in ("simple", "efficient_cached"):
        with pytest.raises(FileNotFoundError):
            build(ref, tok_dir, tok, overrides)
    with D.patch(parts=["schedule"]):
        m = build(ref, tok_dir, tok, overrides)
        gamma = torch.tensor([-3.0, -2.0])
        alpha, dalpha = m._gamma_to_alpha_dalpha(gamma, (gamma + 3.5) / 1.75)
    a_true, dadg = reference.gamma_to_alpha(gamma.double(), K_SMALL)
    torch.testing.assert_close(alpha, a_true, rtol=0, atol=1e-9)
    torch.testing.assert_close(dalpha, dadg * 1.75, rtol=1e-6, atol=0)
    assert list(tmp_path.iterdir()) == []  # no fitted coefficients written


def test_distillation_validates_without_pickle(ref, tok_dir, tok, tmp_path):
    overrides = [f"algo.integral_cache_path={tmp_path / 'no.pkl'}",
                 f"algo.curriculum.integral_cache_path={tmp_path / 'no.pkl'}"]
    with pytest.raises((AssertionError, FileNotFoundError)):
        build(ref, tok_dir, tok, overrides, cls="Distillation", algo="distillation")
    with D.patch(parts=["schedule"]):
        m = build(ref, tok_dir, tok, overrides, cls="Distillation", algo="distillation")
        m.loss_type = "mse"
        with pytest.raises(AssertionError):
            m._validate_configuration()


# ----------------------------------------------------------------------------------
# curriculum
# ----------------------------------------------------------------------------------


def _reference_simple_input(ref, model, x0, gamma, inv_tau):
    """The original DUO.nll simple branch: dense latent, its argmax, and the
    EmbeddingLayer's softmax @ E of the tempered latent."""
    one_hot = torch.nn.functional.one_hot(x0, model.vocab_size)
    xt = ref.algo.DUO._q_xt_gaussian(model, one_hot, gamma) * inv_tau
    return ref.dit.EmbeddingLayer.forward(model.backbone.vocab_embed, xt), xt.argmax(-1)


@pytest.mark.parametrize("gamma_value, inv_tau", [(-3.0, 10.0), (0.5, 100.0)])
def test_simple_curriculum_laws_match_reference(ref, tok_dir, tok, gamma_value, inv_tau):
    """P(z_t = x0) = pt(gamma) on both sides, and the mean of h agrees (z < 5 per coordinate)."""
    model = build(ref, tok_dir, tok)
    torch.manual_seed(1)
    B, L = 64, 32
    x0 = torch.full((B, L), 7)
    gamma = torch.full((B,), gamma_value)
    hs_ref, hs_new, eq_ref, eq_new = [], [], 0, 0
    with D.patch(parts=["curriculum"]):
        for _ in range(8):
            h_r, z_r = _reference_simple_input(ref, model, x0, gamma, inv_tau)
            inp = D.CurriculumInput(x0, gamma, inv_tau, None, "exact")
            h_n = model.backbone.vocab_embed(inp)
            assert h_n.shape == h_r.shape and h_n.dtype == h_r.dtype and inp.z_t.shape == z_r.shape
            hs_ref.append(h_r.reshape(-1, h_r.shape[-1]).detach())
            hs_new.append(h_n.reshape(-1, h_n.shape[-1]).detach())
            eq_ref += int((z_r == x0).sum())
            eq_new += int((inp.z_t == x0).sum())
    n = 8 * B * L
    pt = float(reference.pt_from_gamma(torch.tensor([gamma_value], dtype=torch.float64), K_SMALL)[0])
    for eq in (eq_ref, eq_new):
        assert abs(eq / n - pt) / math.sqrt(pt * (1 - pt) / n) < 5
    z = zscore(torch.cat(hs_new), torch.cat(hs_ref))
    assert z.abs().max() < 5, z


def test_topk_replacement_signature_and_laws(ref):
    """utils.sample_tempered_softmax_topk patched: same outputs' shapes/dtypes;
    the reference rule's P(z_t = x0) equals the original's, the exact rule's pt."""
    utils = ref.utils
    B, L, k, K = 64, 64, 8, K_SMALL
    gamma = torch.full((B,), -2.5)
    alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    counts = {}
    w0, i0, z0 = utils.sample_tempered_softmax_topk(x0, alpha, sigma, L, k, K, 10.0)
    counts["orig"] = sum(int((utils.sample_tempered_softmax_topk(x0, alpha, sigma, L, k, K, 10.0)[2] == x0).sum())
                         for _ in range(10))
    for rule in ("reference", "exact"):
        with D.patch(parts=["curriculum"], topk_zt_rule=rule):
            w, i, z = utils.sample_tempered_softmax_topk(x0, alpha, sigma, L, k, K, 10.0)
            assert (w.shape, w.dtype, i.shape, i.dtype, z.shape, z.dtype) == \
                   (w0.shape, w0.dtype, i0.shape, i0.dtype, z0.shape, z0.dtype)
            assert bool((w >= 0).all()) and bool((w.sum(-1) <= 1 + 1e-6).all())  # the tail holds the rest
            assert bool(((i == x0[..., None]).sum(-1) <= 1).all())
            counts[rule] = sum(int((utils.sample_tempered_softmax_topk(x0, alpha, sigma, L, k, K, 10.0)[2] == x0).sum())
                               for _ in range(10))
    n = 10 * B * L
    assert abs(two_proportion_z(counts["reference"], n, counts["orig"], n)) < 5
    pt = float(reference.pt_from_gamma(torch.tensor([-2.5], dtype=torch.float64), K)[0])
    assert abs(counts["exact"] / n - pt) / math.sqrt(pt * (1 - pt) / n) < 5
    assert counts["orig"] / n > pt + 0.05  # the reference rule over-samples x0 (docs/math.md §2e, DIFFERS)


def _fixed_t(model, t):
    model._sample_t = lambda n, accum_step: t.clone()


@pytest.mark.parametrize("mode", ["simple", "efficient_cached"])
def test_curriculum_loss_matches_original_in_expectation(ref, tok_dir, tok, mode):
    """DUO.nll training branch at a fixed step, batch and t: patched (curriculum +
    loss; original schedule on both sides) and original agree in mean (z < 5)."""
    overrides = [f"algo.curriculum.mode={mode}", "algo.curriculum.top_k=16"]
    model = build(ref, tok_dir, tok, overrides)
    randomize(model, seed=3)
    model.eval()
    B, L = 8, 32
    x0 = torch.randint(0, K_SMALL, (B, L), generator=torch.Generator().manual_seed(1))
    _fixed_t(model, torch.linspace(0.1, 0.9, B))
    torch.manual_seed(2)
    n = 60
    with torch.no_grad():
        orig = torch.stack([model.nll(x0, None, None, True).mean(0) for _ in range(n)])
        with D.patch(parts=["curriculum", "loss"], topk_zt_rule="reference" if mode != "simple" else "exact"):
            new = torch.stack([model.nll(x0, None, None, True).mean(0) for _ in range(n)])
            # trainer_base._loss's call (labels first) works too
            assert model.nll(x0, None, None, 0, True).shape == (B, L)
    assert new.dtype == orig.dtype and new.shape == orig.shape
    z = zscore(new.mean(1, keepdim=True), orig.mean(1, keepdim=True))
    assert z.abs().max() < 5, (z, new.mean(), orig.mean())


# ----------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha_dtype, logit_dtype, dalpha_kind", [
    (torch.float32, torch.float32, "tensor"), (torch.float64, torch.float32, "tensor"),
    (torch.float32, torch.bfloat16, "tensor"), (torch.float32, torch.float32, "float")])
def test_nll_per_token_values_gradients_dtypes(ref, tok_dir, tok, alpha_dtype, logit_dtype, dalpha_kind):
    model = build(ref, tok_dir, tok)
    g = torch.Generator().manual_seed(5)
    B, L, K = 4, 16, K_SMALL
    raw = (torch.randn(B, L, K, generator=g) * 3).to(logit_dtype)
    x0 = torch.randint(0, K, (B, L), generator=g)
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, K, (B, L), generator=g))
    alpha = (0.05 + 0.9 * torch.rand(B, 1, generator=g)).to(alpha_dtype)
    dalpha = (-torch.rand(B, 1, generator=g) - 0.1).to(alpha_dtype) if dalpha_kind == "tensor" else -0.999

    def run():
        logits = raw.clone().requires_grad_(True)
        out = model.nll_per_token(logits.log_softmax(-1), xt, x0, alpha, dalpha)
        (out * torch.linspace(0.5, 1.5, L)).sum().backward()
        return out.detach(), logits.grad

    out_ref, grad_ref = run()
    with D.patch(parts=["loss"]):
        out_new, grad_new = run()
    assert out_new.dtype == out_ref.dtype and out_new.shape == out_ref.shape
    assert grad_new.dtype == grad_ref.dtype
    if logit_dtype == torch.bfloat16:  # the reference itself rounds p to bf16: compare within that
        torch.testing.assert_close(out_new, out_ref, rtol=2e-2, atol=2e-2)
        return
    torch.testing.assert_close(out_new, out_ref.to(out_new.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_new, grad_ref, rtol=1e-4, atol=1e-6)


def test_plain_elbo_nll_matches_original_on_same_draws(ref, tok_dir, tok):
    """DUO_BASE.nll (after the curriculum): same seed -> same t and z_t -> same loss."""
    model = build(ref, tok_dir, tok, cls="DUO_BASE")
    randomize(model, seed=4)
    model.eval()
    x0 = torch.randint(0, K_SMALL, (4, 32), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    orig = ref.trainer_base.Diffusion.nll(model, x0, None, None, None, True)
    with D.patch(parts=["loss"]):
        torch.manual_seed(11)
        new = model.nll(x0, None, None, None, True)
    assert new.shape == orig.shape and new.dtype == orig.dtype
    torch.testing.assert_close(new, orig.detach(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# The output layer fused into the losses: patched fused vs patched on the logits
# ----------------------------------------------------------------------------------

FUSED_CASES = {  # case: (class, algo config, overrides)
    "elbo": ("DUO_BASE", "duo", []),
    "simple": ("DUO", "duo", []),
    "topk": ("DUO", "duo", ["algo.curriculum.mode=efficient_cached", "algo.curriculum.top_k=16"]),
    "kl-bwd": ("Distillation", "distillation", ["algo.loss_type=kl-bwd"]),
    "kl-fwd": ("Distillation", "distillation", ["algo.loss_type=kl-fwd"]),
}


def _fused_case(ref, tok_dir, tok, case):
    cls, algo, over = FUSED_CASES[case]
    model = build(ref, tok_dir, tok, over, cls=cls, algo=algo)
    randomize(model, seed=12, std=0.1)
    _fixed_t(model, torch.linspace(0.1, 0.8, 4))
    return model


def _step_grads(model, fn, seed=5):
    """(value, gradients of the output layer's linear weight and bias, of its input
    (the backbone's last hidden states), and of every parameter) of fn()'s scalar."""
    model.zero_grad()
    seen = {}
    layer = model.backbone.output_layer

    def keep(module, args):
        if args[0].requires_grad:  # the student's (a distillation teacher, a deep copy, inherits the hook)
            args[0].retain_grad()
            seen["h"] = args[0]

    hook = layer.register_forward_pre_hook(keep)
    torch.manual_seed(seed)
    try:
        out = fn()
        out.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), seen["h"].grad.clone(), grads


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_output_layer_matches_the_logits_path(ref, tok_dir, tok, case):
    """Loss / KL and the gradients w.r.t. the output layer's weight and bias, its
    input hidden states and every parameter below: the fused patched path
    (chunks of 7 tokens) vs the patched path on the materialized logits, on the
    same draws. Through nll (per token, weighted by a non-uniform grad_output)
    and through _loss (the training step's token mean, with padding)."""
    model = _fused_case(ref, tok_dir, tok, case)
    B, L = 4, 32
    x0 = torch.randint(0, K_SMALL, (B, L), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(B, L, dtype=torch.long)
    valid[1, 20:] = 0
    w = torch.linspace(0.5, 1.5, L)
    steps = {"nll": lambda: (model.nll(x0, None, None, 0, True) * w).sum(),
             "_loss": lambda: model._loss(x0, None, valid, 0, True).loss}
    with D.patch(chunk_size=7):
        fused = {k: _step_grads(model, f) for k, f in steps.items()}
    with D.patch(fuse_output_layer=False):  # every step on the logits
        dense = {k: _step_grads(model, f) for k, f in steps.items()}
    for k in steps:
        (v, gh, g), (v0, gh0, g0) = fused[k], dense[k]
        assert v.dtype == v0.dtype
        # (atol: the KL of two close laws is a difference of float32-rounded logits' terms)
        torch.testing.assert_close(v, v0, rtol=2e-6, atol=1e-6, msg=k)
        scale = lambda t: 2e-5 * float(t.abs().max())  # noqa: E731  float32 bounds, relative to the largest entry
        torch.testing.assert_close(gh, gh0, rtol=0, atol=scale(gh0), msg=k)
        for name in ("backbone.output_layer.linear.weight", "backbone.output_layer.linear.bias"):
            torch.testing.assert_close(g[name], g0[name], rtol=0, atol=scale(g0[name]), msg=f"{k} {name}")
        assert g.keys() == g0.keys()
        for name in g0:  # below the output layer: the same, up to float32 rounding carried back through the DiT
            torch.testing.assert_close(g[name], g0[name], rtol=0, atol=1e-4 * float(g0[name].abs().max()), msg=f"{k} {name}")


def test_fused_elbo_matches_the_original_under_bf16_autocast(ref, tok_dir, tok):
    """The plain ELBO's training step (_loss) patched vs the unpatched Duo code on
    the same draws, in float32 and under CPU bf16 autocast (Lightning's
    bf16-mixed): the fused linear runs in bf16 exactly where autocast ran the
    output layer's linear (its weight and bias gradients float32, as the
    parameters)."""
    model = _fused_case(ref, tok_dir, tok, "elbo")
    x0 = torch.randint(0, K_SMALL, (4, 32), generator=torch.Generator().manual_seed(2))
    valid = torch.ones_like(x0)
    for autocast, rtol in ((False, 1e-5), (True, 2e-2)):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return model._loss(x0, None, valid, 0, True).loss

        v0, gh0, g0 = _step_grads(model, step)
        with D.patch():
            v, gh, g = _step_grads(model, step)
        torch.testing.assert_close(v, v0, rtol=rtol, atol=0)
        for name in ("backbone.output_layer.linear.weight", "backbone.output_layer.linear.bias"):
            assert g[name].dtype == torch.float32
            torch.testing.assert_close(g[name], g0[name], rtol=0, atol=rtol * float(g0[name].abs().max()), msg=name)
        torch.testing.assert_close(gh, gh0, rtol=0, atol=rtol * float(gh0.abs().max()))


def test_lightning_bf16_gradient_accumulation_patched_vs_original(ref, tok_dir, tok):
    """Lightning's own loop, bf16-mixed, 2 optimizer steps of 2 accumulated
    batches: the patched plain ELBO trains as the unpatched Duo code (same
    seeds, same draws): per-batch losses and the weights after training agree
    within bf16 rounding."""
    runs = {}
    for patched in (False, True):
        torch.manual_seed(0)
        with D.patch() if patched else contextlib.nullcontext():
            model = build(ref, tok_dir, tok, ["lr_scheduler.num_warmup_steps=1", "optim.lr=1e-3", "loader.global_batch_size=8"],
                          cls="DUO_BASE")  # 2 accumulated batches of 4
            randomize(model, seed=8, std=0.1)
            torch.manual_seed(1)
            _, losses = lightning_fit(model, K_SMALL, steps=2, precision="bf16-mixed", accumulate_grad_batches=2)
        runs[patched] = (losses, [p.detach().clone() for p in model.parameters()])
    (l0, p0), (l1, p1) = runs[False], runs[True]
    assert len(l0) == len(l1) == 4
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=2e-2, atol=0)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3 + 2e-2 * float(b.abs().max()))


def test_fused_step_with_compiled_backbone(ref, tok_dir, tok):
    """torch.compile(backbone): the output layer's linear bypassed inside the
    compiled graph (a guarded submodule: one graph per state, no recompilation
    per call); values and gradients equal the eager fused step."""
    from torch._dynamo.testing import CompileCounter

    model = _fused_case(ref, tok_dir, tok, "simple")
    x0 = torch.randint(0, K_SMALL, (4, 32), generator=torch.Generator().manual_seed(3))
    valid = torch.ones_like(x0)
    step = lambda: model._loss(x0, None, valid, 0, True).loss  # noqa: E731
    with D.patch(chunk_size=16):
        v0, gh0, g0 = _step_grads(model, step)
        eager, counter = model.backbone, CompileCounter()
        torch._dynamo.reset()
        model.backbone = torch.compile(eager, backend=counter)
        try:
            frames = []
            for _ in range(3):
                v, gh, g = _step_grads(model, step)
                frames.append(counter.frame_count)
            with torch.no_grad():  # the logits path of the same compiled backbone: the other graph(s)
                logits = model.backbone(x0, torch.full((4,), 0.5))
            frames.append(counter.frame_count)
        finally:
            model.backbone = eager
            torch._dynamo.reset()
    assert logits.shape == (4, 32, K_SMALL)
    assert frames[0] == frames[1] == frames[2] < frames[3], frames  # compiled once per state of the output layer
    torch.testing.assert_close(v, v0, rtol=1e-6, atol=0)
    torch.testing.assert_close(gh, gh0, rtol=1e-5, atol=1e-7)
    for name in g0:
        torch.testing.assert_close(g[name.replace("backbone.", "backbone._orig_mod.")], g0[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("parts", [["schedule"], ["curriculum"], ["loss"], ["distillation"], ["sampling"],
                                   ["schedule", "loss", "sampling"]])
def test_any_subset_of_parts_trains(ref, tok_dir, tok, parts):
    """The snapshot's DUO.nll / Distillation.nll cannot take _loss's call (labels
    first): whatever parts are chosen, DUO (curriculum) and Distillation train
    through _loss, as training_step calls it."""
    x0 = torch.randint(0, K_SMALL, (4, 32), generator=torch.Generator().manual_seed(4))
    valid = torch.ones_like(x0)
    for cls, algo in (("DUO", "duo"), ("Distillation", "distillation")):
        model = build(ref, tok_dir, tok, cls=cls, algo=algo)
        randomize(model, seed=9, std=0.1)
        _fixed_t(model, torch.linspace(0.1, 0.8, 4))
        with pytest.raises(TypeError):
            model._loss(x0, None, valid, 0, True)
        with D.patch(parts=parts):
            loss = model._loss(x0, None, valid, 0, True).loss
            loss.backward()
        assert math.isfinite(float(loss)) and model.backbone.output_layer.linear.weight.grad is not None


# ----------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------


def test_coupled_pair_joint_law_matches_reference(ref, tok_dir, tok):
    """Cells of ([z_t = x], [z_s = x], [z_t = z_s]): sample_zt's pair (as the
    patched Distillation.nll draws it) vs the reference's _sample_trajectory +
    argmax, both against the exact law."""
    model = build(ref, tok_dir, tok, cls="Distillation", algo="distillation")
    B, L = 64, 64
    x0 = torch.randint(0, K_SMALL, (B, L), generator=torch.Generator().manual_seed(3))
    gamma_t, gamma_s = torch.full((B,), -1.5), torch.full((B,), -2.5)

    def cells(zt, zs):
        et, es, same = zt == x0, zs == x0, zt == zs
        return torch.stack([(et & es).sum(), (et & ~es).sum(), (~et & es).sum(),
                            (~et & ~es & same).sum(), (~et & ~es & ~same).sum()])

    torch.manual_seed(3)
    c_ref, c_new = torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    for _ in range(6):
        xt, xs = model._sample_trajectory(x0, gamma_t, gamma_s)
        c_ref += cells(xt.argmax(-1), xs.argmax(-1))
        c_new += cells(*duo_fast.sample_zt(x0, gamma_t, K_SMALL, gamma_s=gamma_s))
    assert chi2_two_sample(c_new, c_ref) > 1e-4, (c_new, c_ref)
    P = reference.coupled_joint_law(torch.tensor(-1.5), torch.tensor(-2.5), K_SMALL)
    expected = torch.stack([P[1, 1], P[1, 0], P[0, 1], P[0, 0], torch.tensor(0.0, dtype=torch.float64)])
    n = int(c_new.sum())
    assert int(c_new[4]) == 0  # both != x means the same token j*
    for k in range(4):
        p = float(expected[k])
        assert abs(int(c_new[k]) / n - p) / math.sqrt(max(p * (1 - p), 1e-12) / n) < 5


@pytest.mark.parametrize("loss_type", ["kl-bwd", "kl-fwd"])
def test_distillation_nll_matches_original_in_expectation(ref, tok_dir, tok, loss_type):
    model = build(ref, tok_dir, tok, [f"algo.loss_type={loss_type}"], cls="Distillation", algo="distillation")
    randomize(model, seed=6)
    model.eval()
    B, L = 8, 32
    x0 = torch.randint(0, K_SMALL, (B, L), generator=torch.Generator().manual_seed(4))
    _fixed_t(model, torch.linspace(0.05, 0.8, B))
    torch.manual_seed(4)
    n = 120
    with torch.no_grad():
        orig = torch.stack([model.nll(x0, None, None, None).mean() for _ in range(n)])
        with D.patch(parts=["distillation"]):
            new_full = model.nll(x0, None, None, None)
            new = torch.stack([model.nll(x0, None, None, None).mean() for _ in range(n)])
    assert new_full.shape == (B, L) and new_full.dtype == torch.float32
    assert model.teacher is not None
    z = zscore(new[:, None], orig[:, None])
    assert abs(float(z)) < 5, (float(new.mean()), float(orig.mean()))


# ----------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------


def _label_conditional(ref, model, num_classes: int, guid_weight: float) -> None:
    """Make ``model`` class-conditional with guidance: its DiT (which refuses
    labels) swapped for one that conditions on them (a label shifts sigma: a
    stand-in conditioning, the rest of the DiT unchanged), as a user's
    class-conditional DiT would be."""
    class LabelDIT(ref.dit.DIT):
        def forward(self, x, sigma, class_cond=None, weights=None):
            if class_cond is not None:
                sigma = sigma + 0.5 * class_cond.to(sigma.dtype)
            return super().forward(x, sigma, None, weights)

    backbone = LabelDIT(model.config, vocab_size=model.vocab_size)
    backbone.load_state_dict(model.backbone.state_dict())
    model.backbone = backbone.eval()
    model.num_classes, model.class_conditional = num_classes, True
    model.config.sampling.guid_weight = guid_weight
    # The snapshot's _get_ancestral_posterior passes self twice to _get_guided_posterior_from_xt
    # (a TypeError); the original side of the comparison calls it as intended.
    model._get_ancestral_posterior = lambda xt, sigma, labels, alpha_s, alpha_t, p_x0: \
        model._get_guided_posterior_from_xt(xt, sigma, labels, guid_weight, alpha_s, alpha_t, p_x0)


@pytest.mark.parametrize("kind", ["ancestral", "noise_removal", "psi", "nucleus", "guided", "guided-psi"])
def test_sampling_update_law_matches_original(ref, tok_dir, tok, kind):
    """One reverse step for a fixed model and z_t, per position (chi-square of
    the token counts): the patched step from hidden states
    (``linear_sample_step``, no logits) vs the original's dense posterior and
    ``sample_categorical``, and vs ``sample_step`` on the materialized logits
    (the patched logits path); with classifier-free guidance (weight 1.5) the
    original side is the Duo code's ``_get_guided_posterior_from_xt``."""
    overrides = ["sampling.p_nucleus=0.9"] if kind == "nucleus" else []
    model = build(ref, tok_dir, tok, overrides, cls="DUO_BASE")
    randomize(model, seed=7, std=0.5)
    model.eval()
    R, L = 2000, 4
    z = torch.randint(0, K_SMALL, (1, L), generator=torch.Generator().manual_seed(8)).expand(R, L).contiguous()
    t = torch.full((R, 1), 0.6)
    dt = torch.tensor(0.2)
    labels = None
    if kind.startswith("guided"):
        _label_conditional(ref, model, num_classes=3, guid_weight=1.5)
        labels = torch.full((R,), 1)

    def step(update):
        if kind.endswith("psi"):
            return update(model, z, t, labels, dt, torch.tensor(0.5))[1]
        return update(model, z, t, labels, dt, None, noise_removal_step=(kind == "noise_removal"))[1]

    name = "_psi_update" if kind.endswith("psi") else "_ancestral_update"
    torch.manual_seed(9)
    draws = {}
    with torch.no_grad():
        draws["original"] = torch.cat([step(getattr(ref.trainer_base.UniformState, name)) for _ in range(3)])
        with D.patch(parts=["sampling"], chunk_size=1000):
            draws["fused"] = torch.cat([step(getattr(ref.trainer_base.UniformState, name)) for _ in range(3)])
            cache, _ = ref.trainer_base.UniformState._ancestral_update(model, z, t, labels, dt)
            assert isinstance(cache, D.HiddenCache) and cache.cond.hidden.shape == (R, L, 64)
            assert (cache.uncond is not None) == kind.startswith("guided")
        if not kind.startswith("guided"):
            with D.patch(parts=["sampling"], fuse_output_layer=False):
                draws["logits"] = torch.cat([step(getattr(ref.trainer_base.UniformState, name)) for _ in range(3)])
    new = draws.pop("fused")
    assert new.shape == draws["original"].shape and new.dtype == draws["original"].dtype == torch.int64
    for other, old in draws.items():
        for pos in range(L):
            c_old = torch.bincount(old[:, pos], minlength=K_SMALL)
            c_new = torch.bincount(new[:, pos], minlength=K_SMALL)
            assert chi2_two_sample(c_new, c_old) > 1e-4, (other, pos)
            if kind == "nucleus":  # ids filtered out by the original never appear in ours
                assert bool(((c_old == 0) <= (c_new == 0)).all()) or chi2_two_sample(c_new, c_old) > 1e-2


# ----------------------------------------------------------------------------------
# End to end with the Duo code's own classes
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["simple", "topk", "elbo", "distillation"])
def test_training_steps_patched(ref, tok_dir, tok, case):
    overrides = {"simple": [], "topk": ["algo.curriculum.mode=efficient_cached", "algo.curriculum.top_k=16"],
                 "elbo": ["algo.curriculum.end=-1"], "distillation": ["algo.T=64", "algo.update_teacher_every=2"]}[case]
    overrides = overrides + ["lr_scheduler.num_warmup_steps=1", "optim.lr=1e-2"]
    cls, algo = ("Distillation", "distillation") if case == "distillation" else ("DUO", "duo")
    with D.patch():
        model = build(ref, tok_dir, tok, overrides, cls=cls, algo=algo)
        randomize(model, seed=8, std=0.1)
        before = [p.detach().clone() for p in model.backbone.parameters()]
        trainer, losses = lightning_fit(model, K_SMALL, steps=3)
    assert model.global_step == 3 and len(losses) == 3
    assert all(math.isfinite(v) for v in losses), losses
    changed = sum(float((a - b.detach()).abs().sum()) for a, b in zip(before, model.backbone.parameters()))
    assert changed > 0


@pytest.mark.parametrize("predictor, extra", [("ancestral", []), ("psi", ["sampling.psi.high_mode=max-capped-0.1"]),
                                              ("ancestral", ["sampling.noise_removal=greedy"])])
def test_generate_samples_patched(ref, tok_dir, tok, predictor, extra):
    # 10 steps: the reference's _get_kappas needs >= 2 times per Psi segment.
    model = build(ref, tok_dir, tok, [f"sampling.predictor={predictor}", *extra])
    randomize(model, seed=9)
    with D.patch():
        x = model.generate_samples(num_samples=3, num_steps=10)
    assert x.shape == (3, 32) and x.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < K_SMALL


# ----------------------------------------------------------------------------------
# Memory: no [B, L, K] float tensor for the curriculum or the noise
# ----------------------------------------------------------------------------------


def _dense_allocations(fn, n_tokens: int, vocab_size: int, exclude=()) -> list[str]:
    """Names of the ops that create new storages of ``[..., K]`` tensors with
    ``n_tokens`` rows (a ``[B, L, K]`` tensor) while ``fn`` runs, forward and
    backward; ``exclude``: tensors that exist before (the parameters)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = {t.untyped_storage().data_ptr() for t in exclude}
    found = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == vocab_size \
                        and t.numel() == n_tokens * vocab_size:
                    key = t.untyped_storage().data_ptr()
                    if key not in seen:
                        seen.add(key)
                        found.append(str(func.overloadpacket.__name__))
            return out

    with Record():
        fn()
    return found


def test_patched_steps_allocate_no_dense_tensors(ref, tok_dir, tok, tmp_path):
    """At K = 50257, no tensor of N = B L rows and K columns is created (forward
    and backward) by a patched training step (``_loss``, as training_step calls
    it, and ``nll``) of the simple and top-k curriculum, the plain ELBO and the
    distillation (kl-bwd), nor by a patched sampling step (ancestral, Psi), where
    the unpatched steps create several: the logits, their gradient and the loss
    temporaries are gone, not only the curriculum's."""
    K = 50257
    folder = tmp_path / "tok50k"
    big_tok = make_tokenizer(K, folder)
    cfg_over = [f"eval.gen_ppl_eval_model_name_or_path={folder}", "model.length=16", "loader.global_batch_size=2"]
    model = build(ref, folder, big_tok, cfg_over)
    distill = build(ref, folder, big_tok, cfg_over, cls="Distillation", algo="distillation")
    for m in (model, distill):
        randomize(m, seed=10, std=0.05)
        _fixed_t(m, torch.tensor([0.3, 0.7]))
    x0 = torch.randint(0, K, (2, 16), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(x0)
    N = x0.numel()
    params = list(model.parameters()) + list(distill.parameters())
    cur = model.config.algo.curriculum
    t, dt = torch.tensor([[0.6], [0.6]]), torch.tensor(0.2)

    def train_step(m):
        m.zero_grad()
        m._loss(x0, None, valid, 0, True).loss.backward()

    def nll_step(m):
        m.zero_grad()
        m.nll(x0, None, None, 0, True).mean().backward()

    def sampling_step():
        with torch.no_grad():
            model._ancestral_update(x0, t, None, dt)
            model._psi_update(x0, t, None, dt, torch.tensor(0.5))

    # The snapshot's DUO.nll, called with its own declared parameters, and its sampling step.
    unpatched = _dense_allocations(lambda: model.nll(x0, None, None, True).mean().backward(), N, K, params)
    assert len(unpatched) >= 6, unpatched  # one-hot, noise, latent, softmax, the logits, log_softmax, ...
    assert len(_dense_allocations(sampling_step, N, K, params)) >= 4
    with D.patch(chunk_size=8):  # chunks of 8 of the N = 32 rows
        for mode, top_k, end in (("simple", -1, 200_000), ("efficient_cached", 16, 200_000), ("simple", -1, -1)):
            cur.mode, cur.top_k, model.curriculum_end = mode, top_k, end  # end = -1: the plain ELBO
            for step in (train_step, nll_step):
                assert _dense_allocations(lambda: step(model), N, K, params) == [], (mode, top_k, end, step.__name__)
        for step in (train_step, nll_step):
            assert _dense_allocations(lambda: step(distill), N, K, params) == [], ("distillation", step.__name__)
        assert distill.teacher is not None
        assert _dense_allocations(sampling_step, N, K, params) == []


# ----------------------------------------------------------------------------------
# The launcher on the Duo code's unmodified main.py
# ----------------------------------------------------------------------------------


def test_launcher_added_overrides(ref, tmp_path):
    """What the launcher adds to a user's overrides, and never over theirs:
    wandb=null without the wandb package, the CPU try-out's settings, the gen-PPL
    eval model = a local data tokenizer, distillation.yaml's missing curriculum
    block (key by key)."""
    from duo_fast.integrations.duo_launch import DISTILLATION_CURRICULUM, added_overrides

    configs = ref.path / "configs"
    assert added_overrides([], configs=configs, cpu=False, wandb_installed=True) == []
    assert added_overrides([], configs=configs, cpu=False, wandb_installed=False) == ["wandb=null"]
    assert added_overrides(["wandb.project=mine"], configs=configs, cpu=False, wandb_installed=False) == []
    tok = tmp_path / "tok"
    tok.mkdir()
    out = added_overrides([f"data.tokenizer_name_or_path={tok}", "trainer.devices=2"], configs=configs, cpu=True,
                          wandb_installed=True)
    assert out == ["trainer.accelerator=cpu", f"data.cache_dir={Path.cwd() / 'duo_fast_data'}",
                   f"eval.gen_ppl_eval_model_name_or_path={tok}"]
    out = added_overrides(["data.tokenizer_name_or_path=gpt2", "+data.cache_dir=/d"], configs=configs, cpu=True,
                          wandb_installed=True)
    assert out == ["trainer.accelerator=cpu", "trainer.devices=1"]  # a hub name is no local folder
    assert added_overrides(["algo=duo"], configs=configs, cpu=False, wandb_installed=True) == []
    out = added_overrides(["algo=distillation", "+algo.curriculum.gamma_min=-3"], configs=configs, cpu=False,
                          wandb_installed=True)
    assert out == [f"+algo.curriculum.{k}={v}" for k, v in DISTILLATION_CURRICULUM if k != "gamma_min"]


def test_distillation_config_with_the_launchers_curriculum_block(ref, tok_dir, tok, tmp_path):
    """The pinned configs/algo/distillation.yaml composed by hydra as main.py does:
    Distillation cannot be built (no algo.curriculum); with the block the
    launcher adds, it is built with distillation.yaml's own gamma range and
    temperatures and trains (patched, no integral pickle)."""
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import ConfigAttributeError

    from duo_fast.integrations.duo_launch import added_overrides
    from duo_fast.integrations.duo_reference import register_resolvers

    register_resolvers()
    base = ["algo=distillation", *TINY_MODEL, "data=synthetic", "trainer.accelerator=cpu", "trainer.devices=1",
            "loader.global_batch_size=4", "training.ema=0", f"eval.gen_ppl_eval_model_name_or_path={tok_dir}",
            f"algo.integral_cache_path={tmp_path / 'absent.pkl'}"]
    with initialize_config_dir(config_dir=str(ref.path / "configs"), version_base=None):
        bare = compose(config_name="config", overrides=base)
        cfg = compose(config_name="config", overrides=base + added_overrides(base, configs=ref.path / "configs",
                                                                             cpu=False, wandb_installed=True))
    with D.patch():
        with pytest.raises(ConfigAttributeError, match="curriculum"):
            ref.algo.Distillation(bare, tok)
        model = ref.algo.Distillation(cfg, tok)
        assert (model.gamma_min, model.gamma_max) == (cfg.algo.gamma_min, cfg.algo.gamma_max) == (-4, -1)
        randomize(model, seed=2, std=0.1)
        _fixed_t(model, torch.linspace(0.1, 0.8, 4))
        x0 = torch.randint(0, K_SMALL, (4, 32), generator=torch.Generator().manual_seed(5))
        loss = model._loss(x0, None, torch.ones_like(x0), 0, True).loss
        loss.backward()
    assert math.isfinite(float(loss))


def _launch(ref, tmp_path, *args, name):
    """`python -m duo_fast.integrations.duo --cpu <Duo main.py> args...` in tmp_path (the
    user's view: a new process, the Duo code's own main.py, hydra, Lightning)."""
    cmd = [sys.executable, "-m", "duo_fast.integrations.duo", "--cpu", str(ref.path / "main.py"), *TINY_MODEL,
           "training.ema=0", "loader.num_workers=1", "sampling.steps=4", f"hydra.run.dir={tmp_path / name}"] + list(args)
    # Duo checkpoints pickle their omegaconf config: torch >= 2.6 loads them only with weights_only off
    # (our own, trusted files).
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out


def test_launcher_trains_ddp_then_samples_on_cpu(ref, tok, tok_dir, tmp_path):
    """What a user meets, in two runs of the unmodified main.py through the
    launcher's CPU try-out, offline, on a local text dataset and a local
    tokenizer folder: (1) train algo=duo (simple curriculum) with DDP on 2 CPU
    processes (gloo), 3 steps and a validation with generate_samples; every
    rank patched. (2) mode=sample_eval on that checkpoint, its gen-PPL eval
    model (a tiny GPT-2 in the tokenizer's folder, whose name does not contain
    'llama2') on the CPU."""
    data = write_text_data(tmp_path / "data", tok)
    common = ["data=synthetic", f"data.tokenizer_name_or_path={tok_dir}", "algo=duo"]
    out = _launch(ref, tmp_path, *common, f"data.train={data}", f"data.valid={data}", "data.streaming=False",
                  "trainer.devices=2", "loader.global_batch_size=4", "trainer.max_steps=3", "trainer.val_check_interval=2",
                  "trainer.limit_val_batches=1", name="train")
    assert out.count("duo_fast: patched the Duo codebase") == 2, out[-3000:]  # rank 0 and the rank Lightning started
    added = next(line for line in out.splitlines() if line.startswith("duo_fast: added overrides:"))
    assert "trainer.accelerator=cpu" in added and "data.cache_dir=" in added and "trainer.devices" not in added
    assert ("wandb=null" in added) == (importlib.util.find_spec("wandb") is None)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    assert all(bool(v.isfinite().all()) for v in state["state_dict"].values() if v.is_floating_point())

    samples = tmp_path / "samples.json"
    _launch(ref, tmp_path, *common, "mode=sample_eval", "loader.global_batch_size=2", "loader.eval_batch_size=2",
            "sampling.num_sample_batches=1", f"eval.checkpoint_path={ckpt}", f"eval.generated_samples_path={samples}",
            name="sample")
    result = json.loads(samples.read_text())
    assert len(result["generated_seqs"]) == 2 and math.isfinite(result["generative_ppl"])
