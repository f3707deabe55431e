"""canvas_step (DiffusionGemma's denoising step, csrc/include/duo_fast/canvas_step.h):
argmax exactly (ties: the first index) and the entropy to 1e-5 relative against
the float64 reference (duo_fast.reference.canvas_step, itself checked against mpmath
on nearly one-hot rows), the law of the draws by chi-square at fixed seeds
(p-value > 1e-4), -inf entries never drawn, a small probability drawn at its
rate, the same draw as sample_step's noise-removal step, reproducibility, the
emulated CUDA kernel against the CPU kernel, op conventions, bad values."""

from __future__ import annotations

import ctypes
import math

import pytest
import scipy.stats as st
import torch

import duo_fast
from duo_fast import reference as ref
from conftest import ptr

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _logits(rows, K, seed, scale=3.0, ties=False, neg_inf=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g) * scale
    if ties:  # exact ties, also of the max: argmax takes the first
        x = x.round()
        x[::3, K // 2:] = x[::3].max(-1, keepdim=True).values
    if neg_inf:
        x[:, 1::3] = -math.inf
    return x.to(dtype)


def _temps(rows, seed):
    return 0.3 + torch.rand(rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


def _check_against_reference(x, temperature, sample, argmax, entropy):
    assert sample.dtype == argmax.dtype == torch.int64 and entropy.dtype == torch.float32
    assert torch.equal(argmax.cpu(), ref.canvas_argmax(x))
    torch.testing.assert_close(entropy.cpu().double(), ref.canvas_entropy(x, temperature), rtol=1e-5, atol=1e-30)
    p = ref.canvas_probs(x, temperature)
    assert bool((p.gather(-1, sample.cpu()[..., None]) > 0).all()), "a token of probability 0 was drawn"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [2, 7, 1000, 50257])
@pytest.mark.parametrize("per_row", [False, True])
def test_matches_reference(dtype, K, per_row, device):
    rows = 40 if K > 1000 else 96
    x = _logits(rows, K, K, ties=(K == 1000), neg_inf=(K == 7), dtype=dtype)
    temperature = _temps(rows, K) if per_row else 0.7
    t_dev = temperature.to(device) if per_row else temperature
    out = duo_fast.canvas_step(x.to(device), temperature=t_dev, seed=K)
    _check_against_reference(x, temperature, *out)


def test_leading_shapes_and_temperature_forms():
    x = _logits(6, 50, 1).reshape(2, 3, 50)
    t = torch.tensor([0.5, 2.0], dtype=torch.float64)
    a = duo_fast.canvas_step(x, temperature=t, seed=4)
    b = duo_fast.canvas_step(x, temperature=t[:, None], seed=4)
    c = duo_fast.canvas_step(x, temperature=t[:, None].expand(2, 3).float(), seed=4)
    assert all(o.shape == (2, 3) for o in a)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    for u, v in zip(a, c):
        assert torch.equal(u, v)
    _check_against_reference(x, t, *a)
    empty = duo_fast.canvas_step(torch.zeros(0, 5), seed=1)
    assert all(o.shape == (0,) for o in empty)


def test_entropy_of_nearly_one_hot_rows_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 120  # H ~ 1e-85: the max entry's -p log p = log(S) / S needs ~90 digits
    x = _logits(6, 300, 2, scale=1.0)
    x[:, 17] = torch.tensor([10.0, 25.0, 40.0, 60.0, 80.0, 200.0])  # H from ~1e-2 down to ~1e-30 and 0
    h = duo_fast.canvas_step(x, seed=1)[2]
    want = []
    for row in x.double().tolist():
        m = max(row)
        w = [mpmath.e ** (mpmath.mpf(v) - m) for v in row]
        s = mpmath.fsum(w)
        want.append(float(-mpmath.fsum(wi / s * mpmath.log(wi / s) for wi in w)))
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(ref.canvas_entropy(x), want, rtol=1e-12, atol=0)  # the oracle
    # The last row: every other weight is below exp(-87), where the kernel's exp flushes to 0.
    torch.testing.assert_close(h[:5].double(), want[:5], rtol=1e-5, atol=0)
    assert 0.0 <= float(h[5]) < 1e-30


# ---------------------------------------------------------------------------------------
# the law of the draws
# ---------------------------------------------------------------------------------------


def _chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens.flatten(), minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "an id of probability 0 was drawn"
    expected = probs * counts.sum()
    mask = expected > 0
    return float(st.chisquare(counts[mask].numpy(), expected[mask].numpy() * (counts[mask].sum() / expected[mask].sum()).item()).pvalue)


@pytest.mark.parametrize("K,temperature,dtype", [(7, 1.0, torch.float32), (50, 0.6, torch.float32), (50, 1.7, torch.bfloat16)])
def test_draws_follow_softmax(K, temperature, dtype, device):
    n = 100_000
    row = _logits(1, K, 11 + K, scale=1.5, neg_inf=(K == 50), dtype=dtype)
    probs = ref.canvas_probs(row, temperature)[0]
    tokens = duo_fast.canvas_step(row.expand(n, K).to(device), temperature=temperature, seed=1234 + K)[0].cpu()
    assert _chi2_pvalue(tokens, probs) > 1e-4


def test_draws_follow_softmax_per_row_temperatures(device):
    K, n = 6, 60_000
    base = _logits(3, K, 5, scale=1.0)
    x = base.repeat(n // 3, 1)
    t = torch.tensor([0.4, 1.0, 2.5], dtype=torch.float64).repeat(n // 3)
    tokens = duo_fast.canvas_step(x.to(device), temperature=t.to(device), seed=8)[0].cpu()
    for i in range(3):
        assert _chi2_pvalue(tokens[i::3], ref.canvas_probs(base[i], t[i].item())) > 1e-4


def test_small_probability_drawn_at_its_rate():
    # p_1 = 1e-5 at K = 2; 2e6 draws, ~20 expected: Poisson two-sided p-value > 1e-4.
    n, p1 = 2_000_000, 1e-5
    logits = torch.tensor([[0.0, math.log(p1 / (1 - p1))]]).expand(n, 2)
    k = int(duo_fast.canvas_step(logits, seed=99)[0].sum())
    mu = n * p1
    assert 2 * min(st.poisson.cdf(k, mu), st.poisson.sf(k - 1, mu)) > 1e-4, (k, mu)


def test_same_draw_as_sample_steps_noise_removal_step():
    # alpha_t = 0, alpha_s = 1: sample_step's posterior is p itself, drawn with the
    # same Philox numbers and the same weights (fastmath::exp_nonpos of the same
    # scaled logits); only the totals are summed in other orders, which could move
    # a token only where u falls within ~1e-16 of a boundary.
    for K, rows in ((1000, 3000), (50257, 200)):
        x = _logits(rows, K, 3)
        a = duo_fast.canvas_step(x, temperature=0.8, seed=21)[0]
        b = duo_fast.sample_step(x, torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.float64),
                                 torch.ones(rows, dtype=torch.float64), temperature=0.8, seed=21)
        assert torch.equal(a, b), K


def test_seed_reproducible_across_threads_and_generator():
    x = _logits(256, 500, 1).reshape(4, 64, 500)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = duo_fast.canvas_step(x, seed=7)
        torch.set_num_threads(2)
        two = duo_fast.canvas_step(x, seed=7)
    finally:
        torch.set_num_threads(threads)
    for u, v in zip(one, two):
        assert torch.equal(u, v)
    torch.manual_seed(5)
    a = duo_fast.canvas_step(x)[0]
    b = duo_fast.canvas_step(x)[0]
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    assert torch.equal(duo_fast.canvas_step(x)[0], a)
    assert torch.equal(duo_fast.canvas_step(x, generator=torch.Generator().manual_seed(5))[0], a)


def test_vocabulary_of_diffusion_gemma():
    # V = 262,144 (DiffusionGemma's vocabulary), a few rows: argmax, entropy, support.
    V, rows = 262_144, 3
    x = _logits(rows, V, 0, scale=4.0, dtype=torch.bfloat16)
    x[1, 200_000:] = -math.inf
    x[2, 5] = 100.0  # a confident row
    out = duo_fast.canvas_step(x, temperature=torch.tensor([0.4, 0.8, 1.0]), seed=2)
    _check_against_reference(x, torch.tensor([0.4, 0.8, 1.0]), *out)
    assert int(out[0][1]) < 200_000 and int(out[0][2]) == 5


# ---------------------------------------------------------------------------------------
# emulated CUDA kernel vs the CPU kernel; the real GPU
# ---------------------------------------------------------------------------------------


def _emulated(emulated, x, t, seed):
    rows, K = x.shape
    sample, argmax = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.int64)
    entropy = torch.empty(rows)
    rc = emulated.df_emu_canvas_step(ptr(x), ctypes.c_int(_DTYPE_CODE[x.dtype]), ptr(t), ptr(sample), ptr(argmax),
                                     ptr(entropy), ctypes.c_int64(rows), ctypes.c_int64(K), ctypes.c_uint64(seed),
                                     ctypes.c_uint64(0))
    assert rc == 0
    return sample, argmax, entropy


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 4), ("thread", 0)])
def test_emulated_cuda_kernel_matches_cpu(harness, emulated, mode, seed):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        cases = [(7, 300, torch.float32), (1000, 40, torch.bfloat16), (2053, 24, torch.float16), (50257, 3, torch.float32)]
        if mode == "thread":  # real threads and barriers: ~100x slower, fewer rows
            cases = [(7, 8, torch.float32), (1000, 2, torch.bfloat16)]
        for K, rows, dtype in cases:
            x = _logits(rows, K, K + seed, ties=True, neg_inf=(K == 2053)).to(dtype)
            t = _temps(rows, seed)
            emu = _emulated(emulated, x, t, 31)
            cpu = torch.ops.duo_fast.canvas_step(x, t, 31, 0)
            assert torch.equal(emu[1], cpu[1]), (K, dtype)
            torch.testing.assert_close(emu[2], cpu[2], rtol=1e-6, atol=0)
            # the online total differs from the CPU's by ~1e-7 relative: a token only moves
            # where u falls that close to a CDF boundary
            assert int((emu[0] != cpu[0]).sum()) <= 1, (K, dtype)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


def test_emulated_cuda_kernel_counts_bad_rows(emulated):
    x = _logits(4, 50, 1)
    x[1, 3] = math.nan
    x[2] = -math.inf
    t = torch.tensor([1.0, 1.0, 1.0, -2.0], dtype=torch.float64)
    counters = torch.zeros(13, dtype=torch.int32)  # check::kNumArgs
    emulated.df_emu_take_checks(ptr(counters))
    sample, argmax, entropy = _emulated(emulated, x, t, 3)
    emulated.df_emu_take_checks(ptr(counters))
    assert counters[11] == 2 and counters[12] == 1 and counters.sum() == 3  # kLogits, kTemperature
    assert sample[1:].tolist() == [0, 0, 0] and argmax[1:].tolist() == [0, 0, 0] and bool(entropy[1:].isnan().all())
    _check_against_reference(x[:1], 1.0, sample[:1], argmax[:1], entropy[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernel_matches_cpu runs this kernel's source on the CPU")
def test_cuda_device_matches_cpu():
    for V, dtype in [(50257, torch.float32), (262_144, torch.bfloat16)]:
        x = _logits(64, V, 0, dtype=dtype)
        t = _temps(64, 0)
        a = duo_fast.canvas_step(x.cuda(), temperature=t.cuda(), seed=3)
        b = duo_fast.canvas_step(x, temperature=t, seed=3)
        assert torch.equal(a[1].cpu(), b[1])
        torch.testing.assert_close(a[2].cpu(), b[2], rtol=1e-6, atol=0)
        assert int((a[0].cpu() != b[0]).sum()) <= 1


# ---------------------------------------------------------------------------------------
# op conventions, bad values and errors
# ---------------------------------------------------------------------------------------


def test_opcheck():
    x = _logits(12, 33, 0).reshape(3, 4, 33)
    t = _temps(12, 1).reshape(3, 4)
    torch.library.opcheck(torch.ops.duo_fast.canvas_step.default, (x, t, 11, 0))
    torch.library.opcheck(torch.ops.duo_fast.canvas_step.default, (x.bfloat16(), t, 11, 0))


@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf"])
def test_rows_without_a_distribution_raise(bad):
    x = _logits(5, 20, 3)
    {"nan": lambda r: r.index_fill_(0, torch.tensor([4]), math.nan),
     "posinf": lambda r: r.index_fill_(0, torch.tensor([4]), math.inf),
     "all_neginf": lambda r: r.fill_(-math.inf)}[bad](x[2])
    with pytest.raises(RuntimeError, match=r"logits: 1 row\(s\) \(the first: row 2 .*NaN, \+inf or no finite logit"):
        duo_fast.canvas_step(x, seed=1)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(logits=torch.zeros(2, 10, dtype=torch.int64)), r"logits has dtype int64"),
        (dict(logits=torch.zeros(2, 1)), r"vocabulary size\) must be in \[2"),
        (dict(logits=torch.tensor(1.0)), r"logits must be \[\.\.\., K\]"),
        (dict(temperature=0.0), r"temperature must be in \[2.939e-39, 8.507e\+37\]"),
        (dict(temperature=math.inf), r"temperature must be in \[2.939e-39, 8.507e\+37\]"),
        (dict(temperature=torch.tensor([0.5, -1.0])), r"temperature must be in \[2.93874e-39, 8.50706e\+37\]"),
        (dict(temperature=torch.tensor([0.5, math.nan])), r"temperature must be in \[2.93874e-39, 8.50706e\+37\]"),
        (dict(temperature=torch.tensor([0.5, 0.5, 0.5])), r"temperature has shape"),
        (dict(temperature=torch.tensor([1, 2])), r"temperature must be a floating tensor"),
        (dict(seed=1, generator=torch.Generator()), r"either seed or generator"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    args = dict(logits=torch.zeros(2, 10))
    kw = {}
    for k, v in change.items():
        (args if k in args else kw)[k] = v
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        duo_fast.canvas_step(args["logits"], **kw)


def test_raw_op_checks_too():
    x = torch.zeros(2, 10)
    with pytest.raises(RuntimeError, match=r"temperature has dtype Float"):
        torch.ops.duo_fast.canvas_step(x, torch.ones(2), 0, 0)
    with pytest.raises(RuntimeError, match=r"temperature must be in \["):
        torch.ops.duo_fast.canvas_step(x, torch.tensor([1.0, 0.0], dtype=torch.float64), 0, 0)
    with pytest.raises(RuntimeError, match=r"temperature has shape"):
        torch.ops.duo_fast.canvas_step(x, torch.ones(3, dtype=torch.float64), 0, 0)
