"""generate (docs/math.md §4 and §6): the reverse loop of the reference's generate_samples
for uniform-state models. The time grid, levels and kappas the loop uses are
checked against duo_fast.reference (written from trainer_base); its output law
against reference.generate by a two-sample chi-square (p-value > 1e-4); a
denoiser that knows the data recovers it; a uniform denoiser gives uniform
samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st
import torch

import duo_fast
from duo_fast import reference
from duo_fast.generation import psi_kappas, schedule_alpha, time_grid


class Recorder:
    """denoiser(z, t) -> logits of a fixed small model depending on z and t; records t."""

    def __init__(self, K, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(K, K, generator=g) * 1.5
        self.times = []

    def __call__(self, z, t):
        self.times.append(t.clone())
        return (self.table[z] * (1.0 + t.float()[:, None, None])).float()


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "duo"])
def test_schedules_match_reference(schedule):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    ours = schedule_alpha(t, schedule, vocab_size=50257)
    ref = reference.schedule_alpha(t, schedule, vocab_size=50257)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "mode", [0.3, "pure-posterior", "pure-pc", "constant-0.6", "max-capped-0.05", "max-rescale-0.5", "constant-remdm-0.02"]
)
@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_psi_kappas_match_reference(mode, schedule):
    alphas = reference.schedule_alpha(time_grid(16), schedule)
    ours = psi_kappas(mode, alphas)
    ref = reference.psi_kappas(mode, alphas)
    assert ours.shape == (16,)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)
    assert bool(((ours >= 0) & (ours <= 1)).all())


@pytest.mark.parametrize("noise_removal,calls", [("ancestral", 5), ("greedy", 5), ("none", 4)])
@pytest.mark.parametrize("time_input", ["t", "sigma"])
def test_denoiser_sees_the_reference_times(noise_removal, calls, time_input):
    K, steps = 6, 4
    ours, ref = Recorder(K), Recorder(K)
    duo_fast.generate(ours, 3, 2, K, steps=steps, noise_removal=noise_removal, time_input=time_input, seed=0, progress=False)
    reference.generate(ref, 3, 2, K, steps=steps, noise_removal=noise_removal, time_input=time_input,
                       generator=torch.Generator().manual_seed(0))
    assert len(ours.times) == len(ref.times) == calls
    for a, b in zip(ours.times, ref.times):
        assert a.shape == (3,)
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-12, atol=0)


def _two_sample_pvalue(a: torch.Tensor, b: torch.Tensor, cells: int) -> float:
    ca = torch.bincount(a, minlength=cells).numpy()
    cb = torch.bincount(b, minlength=cells).numpy()
    keep = (ca + cb) > 0
    return float(st.chi2_contingency(np.stack([ca[keep], cb[keep]])).pvalue)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(noise_removal="greedy"),
        dict(sampler="psi", kappa="max-capped-0.1", schedule="cosine"),
        dict(sampler="psi", kappa=0.5, top_p=0.7, temperature=0.8),
        dict(schedule="duo", noise_removal="none"),
    ],
    ids=["ancestral", "greedy", "psi-remdm-cosine", "psi-topp-temp", "duo-none"],
)
def test_output_law_matches_reference(kwargs):
    # L = 2 tokens of K = 4: the joint law over 16 cells, 20k samples each side.
    K, L, B, steps = 4, 2, 20_000, 3
    model = Recorder(K, seed=1)
    ours = duo_fast.generate(model, B, L, K, steps=steps, seed=3, progress=False, **kwargs)
    ref = reference.generate(model, B, L, K, steps=steps, generator=torch.Generator().manual_seed(4), **kwargs)
    assert ours.shape == (B, L) and ours.dtype == torch.int64
    assert _two_sample_pvalue(ours[:, 0] * K + ours[:, 1], ref[:, 0] * K + ref[:, 1], K * K) > 1e-4


@pytest.mark.parametrize("noise_removal", ["greedy", "ancestral"])
def test_denoiser_that_knows_the_data_recovers_it(noise_removal):
    K, L = 50257, 16
    data = torch.randint(0, K, (L,), generator=torch.Generator().manual_seed(0))

    def oracle(z, t):
        return torch.full((z.shape[0], L, K), -1e4).scatter_(2, data.expand(z.shape[0], L)[..., None], 0.0)

    out = duo_fast.generate(oracle, 3, L, K, steps=1, noise_removal=noise_removal, seed=1, progress=False)
    assert torch.equal(out, data.expand(3, L))


def test_uniform_denoiser_gives_uniform_samples():
    K, B, L = 11, 2000, 8

    def flat(z, t):
        return torch.zeros(*z.shape, K)

    out = duo_fast.generate(flat, B, L, K, steps=5, sampler="psi", kappa=0.5, seed=2, progress=False)
    counts = torch.bincount(out.flatten(), minlength=K).numpy()
    assert st.chisquare(counts).pvalue > 1e-4


def test_seed_and_generator_reproducible(capsys):
    K = 9
    model = Recorder(K)
    a = duo_fast.generate(model, 4, 5, K, steps=3, seed=11, progress=False)
    b = duo_fast.generate(model, 4, 5, K, steps=3, generator=torch.Generator().manual_seed(11), progress=False)
    assert torch.equal(a, b)
    torch.manual_seed(3)
    c = duo_fast.generate(model, 4, 5, K, steps=3, progress=True)
    torch.manual_seed(3)
    d = duo_fast.generate(model, 4, 5, K, steps=3, progress=False)
    assert torch.equal(c, d)
    assert "duo_fast.generate" in capsys.readouterr().err  # the tqdm bar


def test_bfloat16_and_float64_logits():
    K = 7
    model = Recorder(K)
    for cast in (torch.bfloat16, torch.float64):
        out = duo_fast.generate(lambda z, t: model(z, t).to(cast), 2, 3, K, steps=2, seed=0, progress=False)
        assert out.shape == (2, 3) and int(out.max()) < K


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(steps=2, sampler="euler"), "sampler must be one of"),
        (dict(steps=2, noise_removal="argmax"), "noise_removal must be one of"),
        (dict(steps=2, schedule="linear"), "schedule must be one of"),
        (dict(steps=2, sampler="psi", kappa=1.5), r"kappa values must be in \[0, 1\]"),
        (dict(steps=2, sampler="psi", kappa=[0.5, 0.5, 0.5]), "one per step"),
        (dict(steps=2, sampler="psi", kappa="sideways-0.1"), "unknown kappa mode"),
        (dict(steps=2, top_p=0.0), r"top_p must be in"),
        (dict(steps=2, seed=1, generator=torch.Generator()), "either seed or generator"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        duo_fast.generate(Recorder(5), 2, 2, 5, progress=False, **kwargs)
