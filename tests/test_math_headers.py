"""The shared host/device math headers (csrc/include/duo_fast): Philox4x32-10
against the Random123 known-answer vectors, the uniform/normal/index draws
against their laws, and ndtri/log_ndtr against scipy over both tails."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as st
import torch

from conftest import ptr

u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
i64 = ctypes.c_int64

# Random123 kat_vectors: philox4x32 10 (counter x4, key x2) -> output x4
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answers(emulated, ctr, key, expected):
    out = (u32 * 4)()
    emulated.df_philox(*map(u32, ctr), *map(u32, key), out)
    assert tuple(out) == expected


def _draw(lib, fn, seed, stream, offset, n):
    out = torch.empty(n, dtype=torch.float64)
    getattr(lib, fn)(u64(seed), u64(stream), u64(offset), i64(n), ptr(out))
    return out.numpy()


def test_uniforms_open_interval_and_law(emulated):
    u = _draw(emulated, "df_uniforms", 1234, 7, 0, 200_000)
    assert u.min() > 0.0 and u.max() < 1.0
    # Kolmogorov-Smirnov at a fixed seed: p-value far from 0 (threshold 1e-4).
    assert st.kstest(u, "uniform").pvalue > 1e-4
    # 53 random bits: below 1/2 the values are exact odd multiples of 2^-54.
    k = u[u < 0.5] * 2.0**54
    assert np.all(k == np.round(k)) and np.all(np.round(k) % 2 == 1)
    assert len(np.unique(u)) == u.size  # no visible quantization


def test_streams_and_offsets_are_distinct(emulated):
    a = _draw(emulated, "df_uniforms", 5, 0, 0, 64)
    b = _draw(emulated, "df_uniforms", 5, 1, 0, 64)  # next token
    c = _draw(emulated, "df_uniforms", 5, 0, 32, 64)  # offset past the 32 blocks of `a`
    d = _draw(emulated, "df_uniforms", 6, 0, 0, 64)  # other seed
    for x in (b, c, d):
        assert len(np.intersect1d(a, x)) == 0
    # Same (seed, stream, offset) regenerates the same numbers.
    assert np.array_equal(a, _draw(emulated, "df_uniforms", 5, 0, 0, 64))


def test_normals_law(emulated):
    z = _draw(emulated, "df_normals", 99, 3, 0, 200_000)
    assert st.kstest(z, "norm").pvalue > 1e-4
    # Pairs from one Box-Muller block are uncorrelated.
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 5 * (1 / np.sqrt(100_000))


def test_uniform_index_chi_square(emulated):
    n, bound = 300_000, 37
    out = (u32 * n)()
    emulated.df_uniform_index(u64(11), i64(n), u32(bound), out)
    counts = np.bincount(np.frombuffer(out, dtype=np.uint32), minlength=bound)
    assert counts.size == bound
    assert st.chisquare(counts).pvalue > 1e-4


def test_ndtri_matches_scipy_in_both_tails(emulated):
    p = np.concatenate(
        [
            np.logspace(-300, -1, 400),
            np.linspace(0.01, 0.99, 301),
            1.0 - np.logspace(-16, -1, 200),
            [5e-324, 1e-310, 0.5],
        ]
    )
    out = np.empty_like(p)
    emulated.df_ndtri(p.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), i64(p.size))
    ref = sp.ndtri(p)
    finite = np.isfinite(ref) & (ref != 0)
    rel = np.abs(out - ref) / np.abs(np.where(finite, ref, 1.0))
    normal = finite & (p >= np.finfo(np.float64).tiny)
    assert rel[normal].max() < 1e-13, (p[normal][rel[normal].argmax()], rel[normal].max())
    # Subnormal p carries few significant bits, so neither can the answer.
    assert rel[finite & ~normal].max() < 1e-4
    assert out[p == 0.5][0] == pytest.approx(0.0, abs=1e-15)
    special = np.array([0.0, 1.0, -0.5, 1.5, np.nan])
    out2 = np.empty_like(special)
    emulated.df_ndtri(special.ctypes.data_as(ctypes.c_void_p), out2.ctypes.data_as(ctypes.c_void_p), i64(5))
    assert out2[0] == -np.inf and out2[1] == np.inf and np.isnan(out2[2:]).all()


def test_ndtri_inverts_log_ndtr(emulated):
    x = np.linspace(-37, 0.5, 1001)  # above, p = Phi(x) rounds near 1 and loses x
    p = sp.ndtr(x)
    out = np.empty_like(x)
    emulated.df_ndtri(p.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), i64(x.size))
    np.testing.assert_allclose(out, x, rtol=1e-12, atol=1e-13)


def test_log_ndtr_matches_scipy(emulated):
    x = np.concatenate([np.linspace(-1e4, -40, 50), np.linspace(-40, 40, 2001), [-30.0, -30.000001, 0.0, 1e-300]])
    out = np.empty_like(x)
    emulated.df_log_ndtr(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), i64(x.size))
    ref = sp.log_ndtr(x)
    nz = ref != 0
    rel = np.abs(out[nz] - ref[nz]) / np.abs(ref[nz])
    assert rel.max() < 1e-13, (x[nz][rel.argmax()], rel.max())
    assert np.all(np.abs(out[~nz]) < 1e-300)  # scipy flushes log(1 - Q) to 0 where Q is subnormal


# ---- float32 <-> bfloat16 / float16 (duo_fast/logits.h), as the kernels convert ----


def _rounding_probe_floats():
    """float32 bit patterns that exercise every rounding decision of a conversion
    to bfloat16 / float16: every sign, exponent and top-10 mantissa bits, with the
    low 13 bits at and around each halfway point that a shift of 13..25 bits can
    meet (ties with an even and an odd kept bit, one below and one above), plus
    random low bits; infinities and NaNs included."""
    top = torch.arange(0, 1 << 19, dtype=torch.int64) << 13  # sign, exponent, 10 mantissa bits
    lows = {0, 1, (1 << 13) - 1}
    for s in range(1, 14):  # halfway points of the dropped low bits
        h = 1 << (s - 1)
        lows |= {h - 1, h, h + 1, (h | (1 << s)) & 0x1FFF}
    g = torch.Generator().manual_seed(0)
    lows |= set(torch.randint(0, 1 << 13, (8,), generator=g).tolist())
    bits = (top[:, None] | torch.tensor(sorted(lows), dtype=torch.int64)[None, :]).flatten()
    # bfloat16 drops 16 bits: its halfway points on bits 13..15 too
    extra = (torch.arange(0, 1 << 16, dtype=torch.int64) << 16)[:, None] | torch.tensor(
        [0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000, 0x17FFF & 0xFFFF], dtype=torch.int64)[None, :]
    bits = torch.cat([bits, extra.flatten()])
    return bits.numpy().astype("uint32").view("float32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float_to_16_bit_rounds_as_torch(emulated, dtype):
    """from_float<bf16_bits / f16_bits> (the kernels' gradient stores) against torch's
    conversion (round to nearest, ties to even; overflow to inf; float16 subnormals),
    bit for bit, NaN -> torch's NaN."""
    x = torch.from_numpy(_rounding_probe_floats().copy())
    out = torch.empty(x.shape, dtype=torch.int16)
    fn = emulated.df_round_bf16 if dtype == torch.bfloat16 else emulated.df_round_f16
    assert fn(ptr(x), ptr(out), i64(x.numel())) == 0
    expected = x.to(dtype).view(torch.int16)
    nan = torch.isnan(x)
    assert torch.isnan(out.view(dtype)[nan]).all()
    mismatch = (out != expected) & ~nan
    assert not bool(mismatch.any()), [(hex(int(v)), int(o) & 0xFFFF, int(e) & 0xFFFF)
                                      for v, o, e in zip(x.view(torch.int32)[mismatch][:5], out[mismatch][:5],
                                                         expected[mismatch][:5])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_to_float_is_exact(emulated, dtype):
    """to_float(bf16_bits / f16_bits) of all 2^16 bit patterns against torch's widening."""
    h = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    out = torch.empty(h.shape, dtype=torch.float32)
    fn = emulated.df_widen_bf16 if dtype == torch.bfloat16 else emulated.df_widen_f16
    assert fn(ptr(h), ptr(out), i64(h.numel())) == 0
    expected = h.view(dtype).float()
    nan = torch.isnan(expected)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out.view(torch.int32)[~nan], expected.view(torch.int32)[~nan])
