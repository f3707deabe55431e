"""sample_step and posterior (docs/math.md §4): the dense posterior against the float64
reference (``reference.posterior``: ``_posterior_from_x0``, the Psi mix,
temperature, nucleus filtering), the law of the draws against it by
chi-square at fixed seeds (p-value > 1e-4), zero-probability ids never drawn,
small probabilities at their rate, reproducibility, the emulated CUDA kernel
token-for-token, op conventions and errors."""

from __future__ import annotations

import ctypes
import math

import pytest
import scipy.stats as st
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _logits(rows, K, seed, scale=2.0, ties=False, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g) * scale
    if ties:  # many exact ties: the nucleus must rank them by lower id
        x = (x * 2).round() / 2
    if neg_inf:
        x[:, 1::3] = -math.inf
    return x


def _on(device, *tensors):
    """The inputs on the test's device (the `device` fixture: cpu, and cuda on a GPU)."""
    return tuple(t.to(device) for t in tensors)


def _levels(rows, seed, noise_removal=False):
    g = torch.Generator().manual_seed(seed + 1)
    a_t = torch.rand(rows, generator=g, dtype=torch.float64) * 0.9
    a_s = torch.ones_like(a_t) if noise_removal else a_t + (1 - a_t) * torch.rand(rows, generator=g, dtype=torch.float64)
    return a_t, a_s


# ---------------------------------------------------------------------------------------
# posterior vs the float64 reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 7, 50, 1000])
@pytest.mark.parametrize("kappa", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 0.9), (1.0, 0.3), (1.0, 0.01)])
def test_posterior_matches_reference(K, kappa, temperature, top_p, device):
    rows = 64
    x = _logits(rows, K, K, ties=(K == 50))
    z = torch.randint(0, K, (rows,), generator=torch.Generator().manual_seed(3))
    a_t, a_s = _levels(rows, K, noise_removal=(kappa == 0.0))
    q = duo_fast.posterior(*_on(device, x, z, a_t, a_s), kappa=kappa, temperature=temperature, top_p=top_p).cpu()
    ref = reference.posterior(x, z, a_t, a_s, kappa=kappa, temperature=temperature, top_p=top_p)
    assert q.dtype == torch.float32 and q.shape == x.shape
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_posterior_half_logits(dtype, device):
    K, rows = 333, 32
    x = _logits(rows, K, 5, scale=3.0).to(dtype)
    z = torch.randint(0, K, (rows,), generator=torch.Generator().manual_seed(1))
    a_t, a_s = _levels(rows, 9)
    q = duo_fast.posterior(*_on(device, x, z, a_t, a_s), top_p=0.8).cpu()
    # The reference sees the same 16-bit values (exactly representable in float32).
    ref = reference.posterior(x.float(), z, a_t, a_s, top_p=0.8)
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-6)


def test_posterior_zero_probability_and_extremes():
    K, rows = 40, 16
    x = _logits(rows, K, 2, neg_inf=True)
    x[0] = -math.inf
    x[0, 5] = 0.0  # a single finite logit: p is a point mass
    x[1, 7] = 80.0  # one dominant logit
    z = torch.arange(rows) % K
    a_t, a_s = _levels(rows, 4)
    q = duo_fast.posterior(x, z, a_t, a_s, temperature=0.05)
    ref = reference.posterior(x, z, a_t, a_s, temperature=0.05)
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-6)


def test_nucleus_ties_rank_lower_id_first():
    # Equal logits: top_p keeps the lowest ids of the tie group, as the stable sort does.
    K = 10
    x = torch.zeros(1, K)
    x[0, 9] = 1.0
    z = torch.tensor([0])
    a_t, a_s = torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    q = duo_fast.posterior(x, z, a_t, a_s, top_p=0.5)
    ref = reference.posterior(x, z, a_t, a_s, top_p=0.5)
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-6)
    kept = (q[0] > 0).nonzero().flatten().tolist()
    assert kept[0] == 0 and 9 in kept and kept == sorted(kept) and max(kept[:-1]) < 9


# ---------------------------------------------------------------------------------------
# the law of the draws
# ---------------------------------------------------------------------------------------


def _chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens.flatten(), minlength=probs.numel()).double()
    n = counts.sum()
    expected = probs * n
    assert counts[probs == 0].sum() == 0, "an id of probability 0 was drawn"
    mask = expected > 0
    return float(st.chisquare(counts[mask].numpy(), expected[mask].numpy() * (counts[mask].sum() / expected[mask].sum()).item()).pvalue)


CASES = [
    dict(kappa=1.0, temperature=1.0, top_p=1.0, noise_removal=False),  # ancestral
    dict(kappa=1.0, temperature=1.0, top_p=1.0, noise_removal=True),  # noise removal (alpha_s = 1)
    dict(kappa=0.5, temperature=1.0, top_p=1.0, noise_removal=False),  # Psi mix
    dict(kappa=0.0, temperature=1.0, top_p=1.0, noise_removal=False),  # pure predictor-corrector
    dict(kappa=1.0, temperature=0.5, top_p=1.0, noise_removal=False),
    dict(kappa=1.0, temperature=1.0, top_p=0.6, noise_removal=True),
    dict(kappa=0.7, temperature=1.5, top_p=0.8, noise_removal=False),
]


@pytest.mark.parametrize("K", [7, 50])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_draws_follow_posterior(K, case, device):
    n = 200_000
    row = _logits(1, K, 11 + K, scale=1.5, neg_inf=(K == 50))
    z0 = 3
    a_t = torch.tensor([0.35], dtype=torch.float64)
    a_s = torch.tensor([1.0 if case["noise_removal"] else 0.6], dtype=torch.float64)
    kw = dict(kappa=case["kappa"], temperature=case["temperature"], top_p=case["top_p"])
    probs = reference.posterior(row, torch.tensor([z0]), a_t, a_s, **kw)[0]
    logits = row.expand(n, K)
    z = torch.full((n,), z0)
    tokens = duo_fast.sample_step(*_on(device, logits, z, a_t.expand(n), a_s.expand(n)), seed=1234 + K, **kw).cpu()
    assert _chi2_pvalue(tokens, probs) > 1e-4


def test_draws_follow_posterior_per_token_levels(device):
    # Different z and levels per token: pool (z, token) cells against the summed probabilities.
    K, n = 5, 120_000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, K, generator=g).repeat(n // 4, 1)
    z = torch.arange(n) % K
    a_t = (torch.arange(n) % 3).double() * 0.2 + 0.1
    a_s = a_t + 0.25
    tokens = duo_fast.sample_step(*_on(device, logits.reshape(n // 10, 10, K), z.reshape(-1, 10), a_t.reshape(-1, 10),
                                       a_s.reshape(-1, 10)), seed=5).flatten().cpu()
    q = reference.posterior(logits, z, a_t, a_s)
    # Cells: group tokens by (row pattern, z, level): 4 * 5 * 3 = 60 patterns, lcm period 60.
    pattern = torch.arange(n) % 60
    for p in range(0, 60, 7):
        sel = pattern == p
        assert _chi2_pvalue(tokens[sel], q[sel][0]) > 1e-4


def test_small_probability_drawn_at_its_rate():
    # p_1 = 1e-6 at K = 2 (pure model part: alpha_t = 0, alpha_s = 1); 2e7 draws,
    # ~20 expected: Poisson two-sided p-value > 1e-4.
    n, p1 = 20_000_000, 1e-6
    logits = torch.tensor([[0.0, math.log(p1 / (1 - p1))]]).expand(n, 2)
    z = torch.zeros(n, dtype=torch.int64)
    tokens = duo_fast.sample_step(logits, z, torch.zeros(1, dtype=torch.float64).expand(n), torch.ones(n, dtype=torch.float64), seed=99)
    k = int(tokens.sum())
    mu = n * p1
    pval = 2 * min(st.poisson.cdf(k, mu), st.poisson.sf(k - 1, mu))
    assert pval > 1e-4, (k, mu)


def philox_u_cat(emulated, seed: int, tokens: int, offset: int = 0) -> torch.Tensor:
    """The inverse-CDF uniform of tokens 0..tokens-1 as sample_step.h defines it:
    Philox4x32-10 block (counter = token, offset; key = seed), words 2 and 3 as a
    53-bit uniform, computed here from the raw Philox round function (checked
    against Random123's known answers in test_math_headers.py)."""
    out, u32 = (ctypes.c_uint32 * 4)(), ctypes.c_uint32
    u = torch.empty(tokens, dtype=torch.float64)
    for t in range(tokens):
        emulated.df_philox(u32(t), u32(t >> 32), u32(offset), u32(offset >> 32), u32(seed), u32(seed >> 32), out)
        k = ((out[2] << 32) | out[3]) >> 11
        u[t] = min((k + 0.5) * 2.0**-53, 1.0 - 2.0**-53)
    return u


def float64_inverse_cdf(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0):
    """(first j whose float64 running sum of exp((x_j - max) / T) exceeds u * total,
    the distance of u * total to the nearest CDF boundary relative to the total)."""
    x = logits.double() / temperature
    c = (x - x.amax(-1, keepdim=True)).exp().cumsum(-1)
    target = u.unsqueeze(-1) * c[:, -1:]
    j = (c <= target).sum(-1)
    gap = torch.minimum((c.gather(1, j.unsqueeze(-1)) - target).abs(),
                        (c.gather(1, (j - 1).clamp(min=0).unsqueeze(-1)) - target).abs()).squeeze(-1)
    return j, gap / c[:, -1]


@pytest.mark.parametrize("K,scale", [(50, 1.0), (1000, 2.0), (50257, 3.0), (50257, 0.02)])
def test_model_draw_is_the_inverse_cdf_of_its_uniform(emulated, K, scale):
    # alpha_t = 0, alpha_s = 1: the pure model part, drawn by inverse CDF with the
    # token's Philox u_cat. Against a float64 CDF with the same u, recomputed here:
    # the same token except where u * total lies within the float32 weights'
    # rounding (each within ~2 ulp, so the running sum within 3e-7 of the total) of
    # a boundary. Rows of K = 50257 cross many of the kernel's 64-weight blocks
    # (scale 0.02: nearly flat rows, the boundary anywhere, ~3% of rows near one).
    rows, seed = 300, 77
    x = _logits(rows, K, K, scale=scale)
    out = torch.ops.duo_fast.sample_step(x, torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.float64),
                                         torch.ones(rows, dtype=torch.float64), 1.0, 0.7, 1.0, seed, 0)
    want, gap = float64_inverse_cdf(x, philox_u_cat(emulated, seed, rows), temperature=0.7)
    far = gap > 3e-7
    assert int(far.sum()) >= 0.9 * rows
    assert torch.equal(out[far], want[far]), (out[far] != want[far]).nonzero()[:5]


def test_no_noise_limits(device):
    K, n = 30, 2000
    logits = _logits(n, K, 7)
    z = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(2))
    # alpha_t = alpha_s: nothing moves.
    a = torch.full((n,), 0.4, dtype=torch.float64)
    assert torch.equal(duo_fast.sample_step(*_on(device, logits, z, a, a), seed=1).cpu(), z)
    # kappa = 1, alpha_t = 0, alpha_s = 1, a one-hot model: the model's token.
    target = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(3))
    onehot = torch.full((n, K), -1e4).scatter_(1, target[:, None], 0.0)
    out = duo_fast.sample_step(*_on(device, onehot, z, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)),
                               seed=2)
    assert torch.equal(out.cpu(), target)


# ---------------------------------------------------------------------------------------
# randomness conventions
# ---------------------------------------------------------------------------------------


def test_seed_reproducible_across_threads_and_generator():
    K = 1000
    logits = _logits(512, K, 1).reshape(8, 64, K)
    z = torch.randint(0, K, (8, 64), generator=torch.Generator().manual_seed(0))
    a_t, a_s = torch.full((8,), 0.3), torch.full((8,), 0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = duo_fast.sample_step(logits, z, a_t, a_s, top_p=0.9, seed=7)
        torch.set_num_threads(2)
        two = duo_fast.sample_step(logits, z, a_t, a_s, top_p=0.9, seed=7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.manual_seed(5)
    a = duo_fast.sample_step(logits, z, a_t, a_s)
    b = duo_fast.sample_step(logits, z, a_t, a_s)
    torch.manual_seed(5)
    assert torch.equal(duo_fast.sample_step(logits, z, a_t, a_s), a)
    assert not torch.equal(a, b)
    g = torch.Generator().manual_seed(5)
    c = duo_fast.sample_step(logits, z, a_t, a_s, generator=g)
    assert torch.equal(c, a)


# ---------------------------------------------------------------------------------------
# emulated CUDA kernels vs the CPU kernels
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 4), ("thread", 0)])
def test_emulated_cuda_kernels_match_cpu(harness, emulated, mode, seed):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        cases = [(7, 300, torch.float32), (1000, 40, torch.bfloat16), (2053, 24, torch.float16), (50257, 3, torch.float32)]
        if mode == "thread":  # real threads and barriers (for TSan-style interleavings): ~100x slower, fewer rows
            cases = [(7, 8, torch.float32), (1000, 2, torch.bfloat16)]
        for K, rows, dtype in cases:
            x = _logits(rows, K, K + seed, ties=True).to(dtype)
            z = torch.randint(0, K, (rows,), generator=torch.Generator().manual_seed(seed))
            a_t, a_s = _levels(rows, seed)
            for kappa, temperature, top_p in [(1.0, 1.0, 1.0), (0.4, 0.7, 0.5), (1.0, 1.3, 0.05)]:
                out = torch.empty_like(z)
                rc = emulated.df_emu_sample_step(
                    ptr(x), ctypes.c_int(_DTYPE_CODE[dtype]), ptr(z), ptr(a_t), ptr(a_s), ptr(out),
                    ctypes.c_int64(rows), ctypes.c_int64(K), ctypes.c_double(kappa), ctypes.c_double(temperature),
                    ctypes.c_double(top_p), ctypes.c_uint64(31), ctypes.c_uint64(0),
                )
                assert rc == 0
                cpu = torch.ops.duo_fast.sample_step(x, z, a_t, a_s, kappa, temperature, top_p, 31, 0)
                assert torch.equal(out, cpu), (K, dtype, kappa, temperature, top_p)
                q = torch.empty(rows, K)
                rc = emulated.df_emu_posterior(
                    ptr(x), ctypes.c_int(_DTYPE_CODE[dtype]), ptr(z), ptr(a_t), ptr(a_s), ptr(q),
                    ctypes.c_int64(rows), ctypes.c_int64(K), ctypes.c_double(kappa), ctypes.c_double(temperature),
                    ctypes.c_double(top_p),
                )
                assert rc == 0
                torch.testing.assert_close(q, torch.ops.duo_fast.posterior(x, z, a_t, a_s, kappa, temperature, top_p), rtol=0, atol=1e-7)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernels_match_cpu runs these kernels' source on the CPU")
def test_cuda_device_matches_cpu():
    K, rows = 50257, 64
    x = _logits(rows, K, 0)
    z = torch.randint(0, K, (rows,))
    a_t, a_s = _levels(rows, 0)
    for top_p in (1.0, 0.7):
        a = duo_fast.sample_step(x.cuda(), z.cuda(), a_t.cuda(), a_s.cuda(), top_p=top_p, seed=3).cpu()
        b = duo_fast.sample_step(x, z, a_t, a_s, top_p=top_p, seed=3)
        assert (a != b).sum() <= 1
        torch.testing.assert_close(duo_fast.posterior(x.cuda(), z.cuda(), a_t.cuda(), a_s.cuda(), top_p=top_p).cpu(),
                                   duo_fast.posterior(x, z, a_t, a_s, top_p=top_p), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# op conventions and errors
# ---------------------------------------------------------------------------------------


def test_opcheck():
    K = 33
    x = _logits(12, K, 0).reshape(3, 4, K)
    z = torch.randint(0, K, (3, 4))
    a_t = torch.full((3, 4), 0.2, dtype=torch.float64)
    a_s = torch.full((3, 4), 0.7, dtype=torch.float64)
    torch.library.opcheck(torch.ops.duo_fast.sample_step.default, (x, z, a_t, a_s, 0.5, 0.9, 0.8, 11, 0))
    torch.library.opcheck(torch.ops.duo_fast.posterior.default, (x, z, a_t, a_s, 0.5, 0.9, 0.8))
    torch.library.opcheck(torch.ops.duo_fast.sample_step.default, (x.bfloat16(), z, a_t, a_s, 1.0, 1.0, 1.0, 11, 0))


def test_levels_per_row_and_per_token_agree():
    K = 20
    x = _logits(6, K, 3).reshape(2, 3, K)
    z = torch.randint(0, K, (2, 3))
    a = duo_fast.sample_step(x, z, torch.tensor([0.2, 0.4]), torch.tensor([0.5, 0.6]), seed=4)
    b = duo_fast.sample_step(x, z, torch.tensor([[0.2], [0.4]]), torch.tensor([[0.5], [0.6]]), seed=4)
    c = duo_fast.sample_step(x, z, torch.tensor([0.2, 0.4])[:, None].expand(2, 3), torch.tensor([0.5, 0.6])[:, None].expand(2, 3), seed=4)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(z=torch.tensor([[0, 10]])), r"z holds token ids in \[0, 10\], outside \[0, vocab_size\) = \[0, 10\)"),
        (dict(z=torch.tensor([[0, -1]])), r"z holds token ids"),
        (dict(z=torch.tensor([0, 1])), r"z has shape"),
        (dict(z=torch.tensor([[0, 1]], dtype=torch.int16)), r"z has dtype int16"),
        (dict(logits=torch.zeros(1, 2, 10, dtype=torch.int64)), r"logits has dtype int64"),
        (dict(logits=torch.zeros(1, 2, 1)), r"vocabulary size\) must be in \[2"),
        (dict(alpha_t=torch.tensor([0.8])), r"alpha_s must be >= alpha_t"),
        (dict(alpha_t=torch.tensor([1.0]), alpha_s=torch.tensor([1.0])), r"alpha_t must be in \[0, 1\)"),
        (dict(alpha_t=torch.tensor([-0.1])), r"alpha_t must be in \[0, 1\)"),
        (dict(alpha_t=torch.tensor([0.0]), alpha_s=torch.tensor([0.0])), r"alpha_s must be in \(0, 1\]"),
        (dict(alpha_s=torch.tensor([1.5])), r"alpha_s must be in \(0, 1\]"),
        (dict(alpha_t=torch.tensor([float("nan")])), r"alpha_t must be in"),
        (dict(alpha_t=torch.tensor([0.1, 0.2, 0.3])), r"alpha_t has shape"),
        (dict(kappa=1.5), r"kappa must be in \[0.0, 1.0\]"),
        (dict(temperature=0.0), r"temperature must be in \[2.939e-39, 8.507e\+37\]"),
        (dict(top_p=0.0), r"top_p must be in \(0.0, 1.0\]"),
        (dict(top_p=1.5), r"top_p must be in"),
        (dict(seed=1, generator=torch.Generator()), r"either seed or generator"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    args = dict(logits=torch.zeros(1, 2, 10), z=torch.tensor([[0, 1]]), alpha_t=torch.tensor([0.2]),
                alpha_s=torch.tensor([0.5]))
    kw = {}
    for k, v in change.items():
        (args if k in args else kw)[k] = v
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        duo_fast.sample_step(args["logits"], args["z"], args["alpha_t"], args["alpha_s"], **kw)


def test_raw_op_checks_too():
    # Direct torch.ops calls bypass the wrapper; the C++ checks name the argument.
    x = torch.zeros(2, 10)
    z = torch.tensor([0, 12])
    a = torch.tensor([0.2, 0.2], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"z holds token ids"):
        torch.ops.duo_fast.sample_step(x, z, a, a, 1.0, 1.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"alpha_s must be >= alpha_t"):
        torch.ops.duo_fast.posterior(x, torch.tensor([0, 1]), a, a - 0.1, 1.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"top_p must be in"):
        torch.ops.duo_fast.posterior(x, torch.tensor([0, 1]), a, a, 1.0, 1.0, 2.0)
