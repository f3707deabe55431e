"""softmax_embed (the soft embedding of DiffusionGemma's self-conditioning,
csrc/include/duo_fast/softmax_embed.h) against the float64 reference
(duo_fast.reference.softmax_embed) within derived bounds: the dropped
tail (mass < 2^-24: at most 2^-23 max|E| scale per column), float32
accumulation, and with a bf16 embedding the bf16 rounding of the probabilities
and of each GEMM tile's product (2^-8 sum_j p_j |E_jk| scale) plus the rounding
of the output to the embedding's dtype. Rows of both CPU paths (confident rows:
a gather of kept rows of E; the others: tiled GEMMs), the emulated CUDA kernels
(tensor cores and the portable one) against the CPU kernel, forward only, op
conventions, bad values."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import duo_fast
from duo_fast import reference as ref
from conftest import ptr

_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OUT_EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # rounding of h


def _rows(rows, V, seed, dtype=torch.float32, confident_every=2):
    """Logits: every `confident_every`-th row one-hot-like (every other entry far
    below the max: the CPU's sparse path), the others N(0, 2^2) (the GEMM path)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g) * 2.0
    hot = torch.randint(0, V, (rows,), generator=g)
    for r in range(0, rows, confident_every):
        x[r] = torch.randn(V, generator=g) - 80.0
        x[r, hot[r]] = 0.0
        x[r, (hot[r] + 1) % V] = -1.5  # a second kept entry
    return x.to(dtype)


def _embedding(V, d, seed, dtype=torch.float32):
    return (torch.randn(V, d, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def _bound(x, E, temperature, scale, h_ref, emb_dtype, gemm_rounding):
    """Per-entry tolerance of h (see the module docstring)."""
    p = ref.canvas_probs(x, temperature)
    Ea = E.double().abs()
    mag = p @ Ea * abs(scale)
    b = 2.0**-23 * Ea.amax(0) * abs(scale) + 2e-6 * mag + _OUT_EPS[emb_dtype] * h_ref.abs()
    if gemm_rounding:
        b = b + 2.0**-8 * mag
    return b + 1e-12


def _check(h, x, E, temperature, scale, gemm_rounding):
    h_ref = ref.softmax_embed(x, E, temperature, scale)
    assert h.dtype == E.dtype and h.shape == (*x.shape[:-1], E.shape[1])
    err = (h.cpu().double() - h_ref).abs()
    bound = _bound(x, E, temperature, scale, h_ref, E.dtype, gemm_rounding)
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(logit_dtype, emb_dtype, device):
    V, d, rows = 3001, 48, 20
    x = _rows(rows, V, 1, logit_dtype)
    E = _embedding(V, d, 2, emb_dtype)
    t = 0.4 + torch.rand(rows, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = duo_fast.softmax_embed(x.to(device), E.to(device), temperature=t.to(device), scale=math.sqrt(d))
    _check(h, x, E, t, math.sqrt(d), gemm_rounding=emb_dtype == torch.bfloat16)


def test_many_dense_rows_and_leading_shapes():
    # more rows than one GEMM chunk (256), a [B, L, V] input, a float temperature, a negative scale
    V, d = 300, 20
    x = _rows(2 * 150, V, 4, confident_every=7).reshape(2, 150, V)
    E = _embedding(V, d, 5)
    h = duo_fast.softmax_embed(x, E, temperature=0.8, scale=-2.0)
    _check(h, x, E, 0.8, -2.0, gemm_rounding=False)


def test_the_dropped_tail_stays_within_its_bound():
    # 5000 entries just below theta (log theta = -(24 + log2 V) ln 2) relative to the
    # max: their mass is < 2^-24, and with them the row goes the sparse way.
    V, d = 8192, 16
    lt = -(24 + math.log2(V)) * math.log(2)
    x = torch.full((2, V), -200.0)
    x[:, :5000] = lt - 1e-3
    x[:, 7000] = 0.0
    x[1, 7001] = lt + 1e-3  # kept
    E = _embedding(V, d, 6)
    E[:5000] = 1.0  # the dropped rows' largest possible pull
    h = duo_fast.softmax_embed(x, E)
    exact = ref.softmax_embed(x, E)
    assert float((h.double() - exact).abs().max()) <= 2.0**-23 + 1e-7
    assert float((h[0].double() - E[7000].double()).abs().max()) <= 1e-7  # the tail was dropped


def test_vocabulary_of_diffusion_gemma():
    V, d = 262_144, 32
    x = _rows(4, V, 7, torch.bfloat16)
    E = _embedding(V, d, 8, torch.bfloat16)
    h = duo_fast.softmax_embed(x, E, temperature=0.6, scale=48.0)
    _check(h, x, E, 0.6, 48.0, gemm_rounding=True)


def test_forward_only():
    x = _rows(3, 50, 1).requires_grad_()
    E = _embedding(50, 4, 1).requires_grad_()
    h = duo_fast.softmax_embed(x, E)
    assert h.requires_grad
    with pytest.raises(RuntimeError, match="softmax_embed is forward only"):
        h.sum().backward()
    with torch.no_grad():
        assert not duo_fast.softmax_embed(x, E).requires_grad


def test_opcheck():
    x = _rows(6, 33, 0).reshape(2, 3, 33)
    t = torch.full((2, 3), 0.7, dtype=torch.float64)
    for E in (_embedding(33, 5, 0), _embedding(33, 5, 0, torch.bfloat16)):
        torch.library.opcheck(torch.ops.duo_fast.softmax_embed.default, (x, E, t, 2.0))


# Rows with NaN, +inf or no finite logit raise naming logits: tests/test_bad_values.py
# (test_sampling_bad_rows_raise, every logits dtype) and the emulated kernels' counters below.


def test_neg_inf_entries_are_probability_zero():
    x = _rows(4, 30, 5)
    x[:, ::2] = -math.inf
    E = _embedding(30, 6, 2)
    _check(duo_fast.softmax_embed(x, E, temperature=1.3), x, E, 1.3, 1.0, gemm_rounding=False)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(embedding=torch.zeros(10, 4, dtype=torch.int32)), r"embedding has dtype int32"),
        (dict(embedding=torch.zeros(10)), r"embedding must be \[vocab_size, d\]"),
        (dict(embedding=torch.zeros(11, 4)), r"embedding has 11 rows, expected one per logit"),
        (dict(logits=torch.zeros(2, 10, dtype=torch.float64)), r"logits has dtype float64"),
        (dict(temperature=-1.0), r"temperature must be in \[2.939e-39, 8.507e\+37\]"),
        (dict(temperature=torch.tensor([0.5, 0.0])), r"temperature must be in \[2.93874e-39, 8.50706e\+37\]"),
        (dict(scale=math.nan), r"scale must be in \[-3.403e\+38, 3.403e\+38\] \(the output is scaled in float32\)"),
        (dict(scale=1e39), r"scale must be in \[-3.403e\+38, 3.403e\+38\]"),
        (dict(scale=-math.inf), r"scale must be in \[-3.403e\+38, 3.403e\+38\]"),
        (dict(scale="2"), r"scale must be a float"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    args = dict(logits=torch.zeros(2, 10), embedding=torch.zeros(10, 4))
    kw = {}
    for k, v in change.items():
        (args if k in args else kw)[k] = v
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        duo_fast.softmax_embed(args["logits"], args["embedding"], **kw)


def test_raw_op_checks_too():
    x, E, t = torch.zeros(2, 10), torch.zeros(10, 4), torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"embedding has 9 rows"):
        torch.ops.duo_fast.softmax_embed(x, torch.zeros(9, 4), t, 1.0)
    for scale in (math.inf, 1e300, -1e39):
        with pytest.raises(RuntimeError, match=r"scale must be in \[-3.40282e\+38, 3.40282e\+38\] \(the output is "
                                               r"scaled in float32\)"):
            torch.ops.duo_fast.softmax_embed(x, E, t, scale)
    with pytest.raises(RuntimeError, match=r"temperature must be in \[2.93874e-39, 8.50706e\+37\]"):
        torch.ops.duo_fast.softmax_embed(x, E, -t, 1.0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_scale_at_float32_max_matches_the_reference(sign):
    """The largest accepted scale: finite where the result is a float32 (1e300 gave inf)."""
    g = torch.Generator().manual_seed(4)
    x, E = torch.randn(3, 50, generator=g), torch.rand(50, 6, generator=g) * 1e-3
    scale = sign * float(torch.finfo(torch.float32).max)
    h = duo_fast.softmax_embed(x, E, scale=scale)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h.double(), ref.softmax_embed(x, E, 1.0, scale), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------
# emulated CUDA kernels vs the reference and the CPU kernel; the real GPU
# ---------------------------------------------------------------------------------------


def _emulated(emulated, x, E, t, scale, tensor_cores):
    rows, V = x.shape
    d = E.shape[1]
    h = torch.empty(rows, d)
    mx, s = torch.empty(rows), torch.empty(rows, dtype=torch.float64)
    rc = emulated.df_emu_softmax_embed(ptr(x), ctypes.c_int(_CODE[x.dtype]), ptr(t), ptr(E), ctypes.c_int(_CODE[E.dtype]),
                                       ctypes.c_int(int(tensor_cores)), ctypes.c_int64(rows), ctypes.c_int64(V),
                                       ctypes.c_int64(d), ctypes.c_double(scale), ptr(mx), ptr(s), ptr(h))
    assert rc == 0
    return h.to(E.dtype)


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("thread", 0)])
def test_emulated_cuda_kernels_match_reference_and_cpu(harness, emulated, mode, seed):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        # rows past one block of 64 (tensor cores) / 16 (portable); d over two column slices
        # of the tensor-core kernel (d = 300: (2, 192)) and not a multiple of 8
        cases = [(70, 301, 300), (5, 130, 20)] if mode == "fiber" else [(3, 70, 20)]
        for rows, V, d in cases:
            x = _rows(rows, V, V + seed, torch.bfloat16 if d == 20 else torch.float32, confident_every=3)
            t = 0.5 + torch.rand(rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            for emb_dtype, tc in [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False),
                                  (torch.float16, False)]:
                E = _embedding(V, d, d, emb_dtype)
                h = _emulated(emulated, x, E, t, 1.7, tc)
                _check(h, x, E, t, 1.7, gemm_rounding=tc)
                cpu = torch.ops.duo_fast.softmax_embed(x, E, t, 1.7)
                both = _bound(x, E, t, 1.7, ref.softmax_embed(x, E, t, 1.7), emb_dtype, True)
                assert bool(((h.double() - cpu.double()).abs() <= 2 * both).all())
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


def test_emulated_cuda_kernels_count_bad_rows(emulated):
    x = _rows(4, 40, 1)
    x[1, 3] = math.nan
    t = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    E = _embedding(40, 8, 1, torch.bfloat16)
    counters = torch.zeros(13, dtype=torch.int32)  # check::kNumArgs
    emulated.df_emu_take_checks(ptr(counters))
    for tc in (True, False):
        h = _emulated(emulated, x, E, t, 1.0, tc)
        assert bool(h[1:3].isnan().all()) and not bool(h[[0, 3]].isnan().any())
    emulated.df_emu_take_checks(ptr(counters))
    assert counters[11] == 2 and counters[12] == 2 and counters.sum() == 4  # kLogits, kTemperature, once per call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernels_match_reference_and_cpu runs these kernels' source on the CPU")
def test_cuda_device_diffusion_gemma_size():
    V, d = 262_144, 2304
    x = _rows(64, V, 9, torch.bfloat16, confident_every=4)
    for emb_dtype in (torch.bfloat16, torch.float32):
        E = _embedding(V, d, 3, emb_dtype)
        h = duo_fast.softmax_embed(x.cuda(), E.cuda(), temperature=0.6, scale=48.0).cpu()
        _check(h, x, E, 0.6, 48.0, gemm_rounding=emb_dtype == torch.bfloat16)
