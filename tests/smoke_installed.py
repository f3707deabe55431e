"""Smoke test of a duo_fast build: every op once on CPU at small sizes, against
duo_fast.reference where that is cheap, otherwise against exact properties of
the op's own outputs. A few seconds.

Run as a script against an installed duo_fast (tools/smoke_wheel.sh runs it in a
fresh venv that has only the wheel and, through a .pth file, torch):

    python tests/smoke_installed.py [--expect-cuda 0|1] [--installed-under DIR]

tests/test_build.py runs the same checks on the in-tree build.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import duo_fast
from duo_fast import reference

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@check
def gamma_to_alpha():
    gamma = torch.tensor([-12.0, -3.0, 0.0, 2.5, 8.0, 25.0], dtype=torch.float64)  # the reference integrates each
    for K in (2, 1000):
        alpha, dalpha = duo_fast.gamma_to_alpha(gamma, K)
        r_alpha, r_dalpha = reference.gamma_to_alpha(gamma, K)
        _close(alpha, r_alpha, 1e-6, 1e-9, f"alpha (K={K})")
        _close(dalpha, r_dalpha, 1e-6, 1e-12, f"dalpha (K={K})")
    a32, _ = duo_fast.gamma_to_alpha(gamma.float(), 1000)
    assert a32.dtype == torch.float32


@check
def sample_zt():
    K, B, L = 50, 4, 64
    x0 = torch.randint(0, K, (B, L), generator=_gen(0))
    clean = duo_fast.sample_zt(x0, torch.full((B,), -20.0), K, seed=1)
    assert clean.dtype == torch.int64 and torch.equal(clean, x0), "gamma = -20 (alpha = 1) must keep x0"
    noisy = duo_fast.sample_zt(x0, torch.full((B,), 30.0), K, seed=1)
    assert noisy.shape == x0.shape and 0 <= int(noisy.min()) and int(noisy.max()) < K
    assert float((noisy == x0).double().mean()) < 0.2, "gamma = 30 (alpha ~ 0) must be ~uniform"
    assert torch.equal(noisy, duo_fast.sample_zt(x0, torch.full((B,), 30.0), K, seed=1)), "seeded draws repeat"
    z_t, z_s = duo_fast.sample_zt(x0, torch.full((B,), 30.0), K, gamma_s=torch.full((B,), -20.0), seed=2)
    assert torch.equal(z_s, x0) and z_t.shape == x0.shape


@check
def curriculum_embed():
    K, d, B, L = 40, 8, 2, 5
    x0 = torch.randint(0, K, (B, L), generator=_gen(3))
    E = torch.randn(K, d, generator=_gen(4))
    # Clean and cold: the tempered softmax is one-hot on x0.
    h, z = duo_fast.curriculum_embed(x0, -20.0, 1e3, E, seed=5)
    assert torch.equal(z, x0)
    _close(h, E[x0], 1e-5, 1e-5, "curriculum_embed at alpha = 1")
    # Noisy: rows of h are convex combinations of E's rows; the gradient of sum(h)
    # w.r.t. E sums to the number of tokens in every column (softmax rows sum to 1).
    Eg = E.clone().requires_grad_()
    h, z = duo_fast.curriculum_embed(x0, 0.0, 1.0, Eg, seed=6)
    assert h.shape == (B, L, d) and z.shape == (B, L) and 0 <= int(z.min()) and int(z.max()) < K
    assert bool(((h >= E.min(0).values - 1e-5) & (h <= E.max(0).values + 1e-5)).all())
    h.sum().backward()
    _close(Eg.grad.sum(0), torch.full((d,), float(B * L)), 1e-5, 1e-4, "curriculum_embed backward")


@check
def curriculum_topk():
    K, k, B, L = 30, 4, 3, 7
    x0 = torch.randint(0, K, (B, L), generator=_gen(7))
    ids, w, z = duo_fast.curriculum_topk(x0, 1.0, 2.0, k, K, seed=8)
    assert ids.shape == w.shape == (B, L, k) and w.dtype == torch.float32 and z.shape == (B, L)
    assert bool(((ids >= 0) & (ids < K)).all()) and bool(((z >= 0) & (z < K)).all())
    assert bool((ids[..., :-1] != x0[..., None]).all()), "only the last slot may hold x0"
    s = ids.sort(-1).values
    assert bool((s[..., 1:] != s[..., :-1]).all()), "ids are distinct"
    assert bool((w >= 0).all()) and bool((w.sum(-1) <= 1 + 1e-5).all())
    ids, w, z = duo_fast.curriculum_topk(x0, -20.0, 2.0, k, K, seed=8)
    assert torch.equal(z, x0) and torch.equal(ids[..., -1], x0), "at alpha = 1 x0 is the largest entry"


@check
def curriculum_topk_embed():
    K, k, d, B, L = 30, 4, 6, 2, 5
    x0 = torch.randint(0, K, (B, L), generator=_gen(9))
    E = torch.randn(K, d, generator=_gen(10))
    ids, w, z = duo_fast.curriculum_topk(x0, 0.5, 3.0, k, K, seed=11)
    Eg = E.clone().requires_grad_()
    h, z2 = duo_fast.curriculum_topk_embed(x0, 0.5, 3.0, k, Eg, seed=11)
    assert torch.equal(z, z2), "same seed: same draws as curriculum_topk"
    _close(h, (w[..., None].double() * E.double()[ids]).sum(-2), 1e-5, 1e-5, "weighted embedding bag")
    h.sum().backward()
    expected = torch.zeros(K, dtype=torch.float64).index_add_(0, ids.flatten(), w.flatten().double())
    _close(Eg.grad[:, 0], expected, 1e-5, 1e-6, "curriculum_topk_embed backward")


def _loss_batch(K, B=3, L=4, seed=12):
    g = _gen(seed)
    logits = torch.randn(B, L, K, generator=g) * 3
    x0 = torch.randint(0, K, (B, L), generator=g)
    z = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, K, (B, L), generator=g))
    alpha = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)[:B]
    dalpha = -(0.5 + torch.rand(B, generator=g, dtype=torch.float64))
    return logits, z, x0, alpha, dalpha


@check
def usdm_loss():
    logits, z, x0, alpha, dalpha = _loss_batch(37)
    lg = logits.clone().requires_grad_()
    loss = duo_fast.usdm_loss(lg, z, x0, alpha, dalpha)
    l64 = logits.double().requires_grad_()
    ref = reference.usdm_loss(l64, z, x0, alpha, dalpha)
    _close(loss, ref.detach(), 1e-5, 1e-6, "usdm_loss")
    loss.sum().backward()
    ref.sum().backward()
    _close(lg.grad, l64.grad, 1e-4, 1e-5 * float(l64.grad.abs().max()), "usdm_loss gradient")


@check
def linear_usdm_loss():
    K, d = 37, 16
    _, z, x0, alpha, dalpha = _loss_batch(K, seed=13)
    g = _gen(14)
    hidden = torch.randn(*z.shape, d, generator=g)
    weight = torch.randn(K, d, generator=g) / d**0.5
    bias = torch.randn(K, generator=g) * 0.1
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = duo_fast.linear_usdm_loss(*params, z, x0, alpha, dalpha, chunk_size=5)
    ref_params = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    ref = reference.usdm_loss(ref_params[0] @ ref_params[1].t() + ref_params[2], z, x0, alpha, dalpha)
    _close(loss, ref.detach(), 1e-5, 1e-5, "linear_usdm_loss")
    loss.sum().backward()
    ref.sum().backward()
    for name, p, rp in zip(("hidden", "weight", "bias"), params, ref_params):
        _close(p.grad, rp.grad, 0, 1e-4 * float(rp.grad.abs().max()), f"linear_usdm_loss gradient ({name})")


@check
def linear_distill_kl():
    K, d = 29, 12
    g = _gen(24)
    student = [torch.randn(2, 5, d, generator=g), torch.randn(K, d, generator=g) / d**0.5, torch.randn(K, generator=g)]
    teacher = [torch.randn(2, 5, d, generator=g), torch.randn(K, d, generator=g) / d**0.5, None]
    params = [t.clone().requires_grad_() for t in student]
    kl = duo_fast.linear_distill_kl(*params, *teacher, "fwd", chunk_size=3)
    ref_params = [t.double().requires_grad_() for t in student]
    ref = reference.linear_distill_kl(*ref_params, *teacher, "fwd")
    _close(kl, ref.detach(), 1e-5, 1e-6, "linear_distill_kl")
    kl.sum().backward()
    ref.sum().backward()
    for name, p, rp in zip(("hidden", "weight", "bias"), params, ref_params):
        _close(p.grad, rp.grad, 0, 1e-4 * float(rp.grad.abs().max()), f"linear_distill_kl gradient ({name})")


@check
def distill_kl():
    g = _gen(15)
    student, teacher = torch.randn(3, 4, 29, generator=g) * 2, torch.randn(3, 4, 29, generator=g) * 2
    for direction in ("bwd", "fwd"):
        s = student.clone().requires_grad_()
        kl = duo_fast.distill_kl(s, teacher, direction)
        s64 = student.double().requires_grad_()
        ref = reference.distill_kl(s64, teacher, direction)
        _close(kl, ref.detach(), 1e-5, 1e-6, f"distill_kl ({direction})")
        kl.sum().backward()
        ref.sum().backward()
        _close(s.grad, s64.grad, 1e-4, 1e-6, f"distill_kl gradient ({direction})")


@check
def posterior():
    K = 23
    g = _gen(16)
    logits = torch.randn(2, 5, K, generator=g) * 2
    z = torch.randint(0, K, (2, 5), generator=g)
    a_t, a_s = torch.tensor([0.3, 0.6], dtype=torch.float64), torch.tensor([0.5, 0.8], dtype=torch.float64)
    for kw in ({}, {"kappa": 0.5, "temperature": 0.7, "top_p": 0.8}):
        q = duo_fast.posterior(logits, z, a_t, a_s, **kw)
        ref = reference.posterior(logits, z, a_t, a_s, **kw)
        _close(q, ref, 1e-5, 1e-6, f"posterior {kw}")


@check
def sample_step():
    K = 23
    g = _gen(17)
    logits = torch.randn(2, 50, K, generator=g) * 2
    z = torch.randint(0, K, (2, 50), generator=g)
    a_t, a_s = torch.tensor([0.3, 0.6], dtype=torch.float64), torch.tensor([0.5, 0.8], dtype=torch.float64)
    zs = duo_fast.sample_step(logits, z, a_t, a_s, seed=18)
    assert zs.shape == z.shape and zs.dtype == torch.int64 and 0 <= int(zs.min()) and int(zs.max()) < K
    assert torch.equal(zs, duo_fast.sample_step(logits, z, a_t, a_s, seed=18)), "seeded draws repeat"
    # Noise removal (alpha_s = 1) from the top-1 nucleus: the argmax, deterministically.
    greedy = duo_fast.sample_step(logits, z, a_t, torch.ones_like(a_s), top_p=1e-6, seed=19)
    assert torch.equal(greedy, logits.argmax(-1))


@check
def linear_sample_step():
    K, d = 23, 8
    g = _gen(25)
    hidden, weight, bias = torch.randn(2, 50, d, generator=g), torch.randn(K, d, generator=g), torch.randn(K, generator=g)
    z = torch.randint(0, K, (2, 50), generator=g)
    a_t, a_s = torch.tensor([0.3, 0.6], dtype=torch.float64), torch.tensor([0.5, 0.8], dtype=torch.float64)
    zs = duo_fast.linear_sample_step(hidden, weight, bias, z, a_t, a_s, top_p=0.9, seed=26, chunk_size=7)
    # chunks of rows draw from the streams of the full call: the tokens of sample_step on the logits
    logits = torch.nn.functional.linear(hidden, weight, bias)
    assert torch.equal(zs, duo_fast.sample_step(logits, z, a_t, a_s, top_p=0.9, seed=26))
    guided = duo_fast.linear_sample_step(hidden, weight, bias, z, a_t, a_s, seed=27, guidance=(hidden.flip(0), 2.0))
    assert guided.shape == z.shape and 0 <= int(guided.min()) and int(guided.max()) < K


@check
def canvas_step():
    K = 37
    g = _gen(28)
    logits = torch.randn(2, 50, K, generator=g) * 3
    sample, argmax, entropy = duo_fast.canvas_step(logits, temperature=0.7, seed=29)
    assert torch.equal(argmax, logits.argmax(-1)) and 0 <= int(sample.min()) and int(sample.max()) < K
    _close(entropy, reference.canvas_entropy(logits, 0.7), 1e-5, 0.0, "canvas_step entropy")
    # the draw of sample_step's noise-removal step from the same numbers
    ones = torch.ones(2, dtype=torch.float64)
    assert torch.equal(sample, duo_fast.sample_step(logits, sample, 0 * ones, ones, temperature=0.7, seed=29))


@check
def softmax_embed():
    K, d = 37, 6
    g = _gen(30)
    logits, E = torch.randn(2, 5, K, generator=g) * 3, torch.randn(K, d, generator=g)
    _close(duo_fast.softmax_embed(logits, E, temperature=0.7, scale=2.0),
           reference.softmax_embed(logits, E, 0.7, 2.0), 1e-5, 1e-6, "softmax_embed")


@check
def generate():
    K, B, L, steps = 6, 3, 2, 4

    class Recorder:
        def __init__(self):
            self.table = torch.randn(K, K, generator=_gen(20)) * 1.5
            self.times = []

        def __call__(self, z, t):
            self.times.append(t.clone())
            return (self.table[z] * (1.0 + t.float()[:, None, None])).float()

    ours, ref = Recorder(), Recorder()
    out = duo_fast.generate(ours, B, L, K, steps=steps, seed=21, progress=False)
    reference.generate(ref, B, L, K, steps=steps, generator=_gen(21))
    assert out.shape == (B, L) and out.dtype == torch.int64 and 0 <= int(out.min()) and int(out.max()) < K
    assert len(ours.times) == len(ref.times) == steps + 1
    for a, b in zip(ours.times, ref.times):
        _close(a, b, 1e-12, 0, "generate: denoiser times")
    # A denoiser that knows the data recovers it.
    K, L = 1000, 8
    data = torch.randint(0, K, (L,), generator=_gen(22))

    def oracle(z, t):
        return torch.full((z.shape[0], L, K), -1e4).scatter_(2, data.expand(z.shape[0], L)[..., None], 0.0)

    out = duo_fast.generate(oracle, 2, L, K, steps=2, noise_removal="greedy", seed=23, progress=False)
    assert torch.equal(out, data.expand(2, L))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect-cuda", choices=("0", "1"), help="assert build_info()['cuda']")
    parser.add_argument("--installed-under", help="assert that duo_fast was imported from below this directory")
    args = parser.parse_args(argv)
    info = duo_fast.build_info()
    print(f"duo_fast {info['version']} from {os.path.dirname(duo_fast.__file__)}; torch {torch.__version__}; {info}")
    if args.expect_cuda is not None:
        assert info["cuda"] == (args.expect_cuda == "1"), info
    if args.installed_under is not None:
        where = os.path.realpath(duo_fast.__file__)
        under = os.path.realpath(args.installed_under)
        assert where.startswith(under + os.sep), f"duo_fast was imported from {where}, not from below {under}"
    t0 = time.perf_counter()
    for fn in CHECKS:
        fn()
    print(f"smoke: {len(CHECKS)} checks passed on CPU in {time.perf_counter() - t0:.1f} s "
          f"({', '.join(fn.__name__ for fn in CHECKS)})")


if __name__ == "__main__":
    main(sys.argv[1:])
