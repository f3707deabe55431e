"""Tensor-core curriculum_embed (csrc/cuda/curriculum_embed_mma.cu, sm_80+) through the
CUDA emulation.

1. The emulated warp matrix instructions (tests/emulation/cuda_emulation.h,
   reached through the wrappers of csrc/cuda/mma_sm80.cuh) against the PTX ISA
   fragment layouts, written out independently here, with a distinct value in
   every element so that any permuted fragment index fails; and a 16x16x8 tile
   loaded and multiplied the way the kernels do it against a plain matrix product.
2. The forward and backward kernels against the CPU kernel (torch.ops.duo_fast)
   within the bf16 error bound derived in _bf16_bound.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch

import duo_fast  # noqa: F401  (loads torch.ops.duo_fast: the CPU kernel)

from conftest import ptr


# --------------------------------------------------------------------------------------
# PTX ISA fragment layouts (mma.m16n8k16 .bf16, ldmatrix .m8n8 .b16), g = lane >> 2, q = lane % 4
# --------------------------------------------------------------------------------------


def a_coords(lane, i):
    """Element i (0..7) of lane's A fragment (register i // 2, half i % 2): (row, col) of A[16x16]."""
    g, q = lane >> 2, lane % 4
    row = g + 8 if i in (2, 3, 6, 7) else g
    col = 2 * q + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_coords(lane, i):
    """Element i (0..3) of lane's B fragment: (k, n) of B[16x8]."""
    g, q = lane >> 2, lane % 4
    return 2 * q + (i & 1) + (8 if i >= 2 else 0), g


def c_coords(lane, i):
    """Element i (0..3) of lane's C/D fragment: (row, col) of C[16x8]."""
    g, q = lane >> 2, lane % 4
    return g + (8 if i >= 2 else 0), 2 * q + (i & 1)


def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """bfloat16 bit patterns (int64) of float32 values, rounded to nearest even by torch."""
    return x.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def pack(lo: int, hi: int) -> int:
    return (lo & 0xFFFF) | ((hi & 0xFFFF) << 16)


def _u32(a):
    return torch.tensor(np.array(a, dtype=np.uint32).view(np.int32))


def run_mma(lib, A, B, C, a_layout=a_coords):
    """Registers of every lane from A [16,16], B [16,8] (bf16-exact floats), C [16,8] float."""
    Ab, Bb = bf16_bits(A), bf16_bits(B)
    a = [[0] * 4 for _ in range(32)]
    b = [[0] * 2 for _ in range(32)]
    c = torch.zeros(32, 4)
    for l in range(32):
        for r in range(4):
            (r0, c0), (r1, c1) = a_layout(l, 2 * r), a_layout(l, 2 * r + 1)
            a[l][r] = pack(int(Ab[r0, c0]), int(Ab[r1, c1]))
        for r in range(2):
            (k0, n0), (k1, n1) = b_coords(l, 2 * r), b_coords(l, 2 * r + 1)
            b[l][r] = pack(int(Bb[k0, n0]), int(Bb[k1, n1]))
        for i in range(4):
            c[l, i] = C[c_coords(l, i)]
    a_t, b_t, d = _u32(a).contiguous(), _u32(b).contiguous(), torch.empty(32, 4)
    assert lib.df_emu_mma_regs(ptr(a_t), ptr(b_t), ptr(c), ptr(d)) == 0
    D = torch.full((16, 8), math.nan)
    for l in range(32):
        for i in range(4):
            D[c_coords(l, i)] = d[l, i]
    return D


def _distinct_operands():
    # Integers in [-128, 127] are exact in bf16; every element distinct, products and
    # sums exact in float32 (|sum| < 2^24), so D must equal A B + C bit for bit.
    A = (torch.arange(256, dtype=torch.float32) - 128).reshape(16, 16)
    B = (torch.arange(128, dtype=torch.float32).flip(0) - 64).reshape(16, 8)
    C = torch.arange(128, dtype=torch.float32).reshape(16, 8) * 1000 + 0.5
    return A, B, C


def test_emulated_mma_matches_the_matrix_product_exactly(emulated):
    A, B, C = _distinct_operands()
    D = run_mma(emulated, A, B, C)
    assert torch.equal(D.double(), A.double() @ B.double() + C.double())


def test_a_permuted_fragment_index_fails(emulated):
    # The same product with registers 1 and 2 of A swapped (a plausible slip) must
    # differ: the distinct values make every fragment index observable.
    A, B, C = _distinct_operands()

    def swapped(lane, i):
        return a_coords(lane, {2: 4, 3: 5, 4: 2, 5: 3}.get(i, i))

    D = run_mma(emulated, A, B, C, a_layout=swapped)
    assert not torch.equal(D.double(), A.double() @ B.double() + C.double())


@pytest.mark.parametrize("x", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_emulated_ldmatrix_fragment_layout(emulated, x, trans):
    mats = torch.arange(4 * 8 * 8, dtype=torch.int64).reshape(4, 8, 8) * 37 % 65521  # distinct b16 values
    mats16 = mats.to(torch.int32).to(torch.int16).contiguous()  # the bits (values < 2^16)
    # lane 8m + r addresses row 7 - r of matrix m (rows are per-lane addresses, not implied);
    # lanes past 8x address rows of matrix 3 that must be ignored.
    mat_of = torch.tensor([l // 8 if l < 8 * x else 3 for l in range(32)], dtype=torch.int32)
    row_of = torch.tensor([7 - l % 8 if l < 8 * x else l % 8 for l in range(32)], dtype=torch.int32)
    out = torch.zeros(32, 4, dtype=torch.int32)
    assert emulated.df_emu_ldmatrix(ptr(mats16), ptr(mat_of), ptr(row_of), ptr(out), x, int(trans)) == 0
    got = out.to(torch.int64) & 0xFFFFFFFF
    for m in range(x):
        M = mats[m][[7 - r for r in range(8)]]  # row r of matrix m as addressed
        if trans:
            M = M.T
        for l in range(32):
            g, q = l >> 2, l % 4
            assert int(got[l, m]) == pack(int(M[g, 2 * q]), int(M[g, 2 * q + 1])), (m, l)
    assert bool((got[:, x:] == 0).all())  # registers past .x untouched


@pytest.mark.parametrize("a_trans", [0, 1])
def test_emulated_tile_product_like_the_kernels(emulated, a_trans):
    g = torch.Generator().manual_seed(a_trans)
    A, B = torch.randn(16, 16, generator=g), torch.randn(16, 8, generator=g)
    D = torch.empty(16, 8)
    assert emulated.df_emu_gemm_tile(ptr(A), ptr(B), ptr(D), a_trans) == 0
    want = A.bfloat16().double() @ B.bfloat16().double()  # products exact; one rounding of the sum
    torch.testing.assert_close(D.double(), want, rtol=2**-23, atol=1e-6)


def test_bf16_round_to_nearest_even(emulated):
    emulated.df_bf16_rn_bits.restype = ctypes.c_uint32
    emulated.df_bf16_rn_bits.argtypes = [ctypes.c_float]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(2000, generator=g) * 10 ** torch.randint(-30, 30, (2000,), generator=g).float(),
        torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, -(1.0 + 3 * 2**-8),
                      3.3895314e38, math.inf, -math.inf, 1e-40, -1e-41]),
    ])
    want = bf16_bits(x)
    got = torch.tensor([emulated.df_bf16_rn_bits(float(v)) for v in x])
    assert torch.equal(got, want)
    nan = emulated.df_bf16_rn_bits(math.nan)
    assert (nan & 0x7F80) == 0x7F80 and (nan & 0x7F) != 0


# --------------------------------------------------------------------------------------
# The kernels against the CPU kernel
# --------------------------------------------------------------------------------------


def _bf16_bound(weighted_abs: torch.Tensor) -> torch.Tensor:
    """Bound on |mma result - CPU result| for a sum S = sum_i p_i v_i of positive weights
    p_i (P) times values v_i (E or dh), both rounded to nearest bf16 (8 significant bits,
    7 stored: relative error <= u = 2^-8 each): |bf16(p) bf16(v) - p v| <= (2u + u^2) p |v|, so
    |dS| <= 2.004 u sum_i p_i |v_i| (worst case: every rounding in the same direction;
    random roundings give ~sqrt(terms) times less). The float32 accumulation
    (<= terms * 2^-24 relative for the K or N partial sums, ~1e-3 u per 100 terms per
    tile) and the CPU kernel's float error (~1e-6 relative) fit in the 5% margin over
    2.004 u ~ 2^-7 and the 1e-6 absolute term. weighted_abs = sum_i p_i |v_i|, computed
    by the CPU kernel with |E| (forward) or |dh| (backward)."""
    return 1.05 * 2.0**-7 * weighted_abs + 1e-6


def _inputs(n, K, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, K, (n,), generator=g)
    gamma = -4.0 + 5.0 * torch.rand(n, generator=g, dtype=torch.float64)
    return x0, gamma


def _run_forward(lib, x0, gamma, it, E, seed, checks=None):
    n, (K, d) = x0.numel(), E.shape
    Eb = bf16_bits(E).to(torch.int16).contiguous()
    h, z, lse = torch.empty(n, d), torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float64)
    rc = lib.df_emu_curriculum_embed_mma(
        ptr(x0), ptr(gamma), ptr(it), ptr(Eb), ctypes.c_int64(n), ctypes.c_int64(K), ctypes.c_int64(d),
        ctypes.c_uint64(seed), ctypes.c_uint64(0), ptr(h), ptr(z), ptr(lse),
        ptr(checks) if checks is not None else ctypes.c_void_p(None),
    )
    assert rc == 0
    return h, z, lse


def _run_backward(lib, dh, x0, gamma, it, lse, K, seed):
    n, d = dh.shape
    dhb = bf16_bits(dh).to(torch.int16).contiguous()
    dE = torch.full((K, d), math.nan)
    rc = lib.df_emu_curriculum_embed_backward_mma(
        ptr(dhb), ptr(x0), ptr(gamma), ptr(it), ptr(lse), ctypes.c_int64(n), ctypes.c_int64(K), ctypes.c_int64(d),
        ctypes.c_uint64(seed), ctypes.c_uint64(0), ptr(dE),
    )
    assert rc == 0
    return dE


# (K, d, n): K not a multiple of the 64-entry tile, partial token groups of 64; d = 64 and
# 96 (one column warp of 128, 8 / 12 n-tiles), 100 (bf16 staging without 16-byte
# copies), 200 (two column warps of 128, the second partly empty), 300 (two of 192, the
# second partly empty), 768 (two column slices of 384).
CASES = [(1000, 64, 70), (1023, 96, 33), (131, 100, 9), (300, 200, 65), (257, 768, 5), (50257, 64, 3)]


@pytest.mark.parametrize("K,d,n", CASES, ids=lambda v: str(v))
def test_mma_kernels_match_cpu_within_bf16_bound(emulated, K, d, n):
    seed = K + d
    x0, gamma = _inputs(n, K, seed)
    it = torch.linspace(0.5, 50.0, n, dtype=torch.float64)
    it[-1] = 1e4  # a near one-hot row
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(seed))
    h, z, lse = _run_forward(emulated, x0, gamma, it, E, seed)
    c_h, c_z, c_lse = torch.ops.duo_fast.curriculum_embed(x0, gamma, it, E, seed, 0)
    c_habs, _, _ = torch.ops.duo_fast.curriculum_embed(x0, gamma, it, E.abs(), seed, 0)  # sum_j P_j |E_jc|
    assert torch.equal(z, c_z)
    torch.testing.assert_close(lse, c_lse, rtol=0, atol=1e-7)
    err = (h - c_h).abs()
    assert bool((err <= _bf16_bound(c_habs)).all()), float((err / _bf16_bound(c_habs)).max())
    # the bound is not vacuous: the error is bf16-sized, not zero, and far above float32 rounding
    assert float(err.max()) > 0

    dh = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1))
    dE = _run_backward(emulated, dh, x0, gamma, it, c_lse, K, seed)
    c_dE = torch.ops.duo_fast.curriculum_embed_backward(dh, x0, gamma, it, c_lse, K, seed, 0)
    c_dEabs = torch.ops.duo_fast.curriculum_embed_backward(dh.abs(), x0, gamma, it, c_lse, K, seed, 0)
    err = (dE - c_dE).abs()
    assert bool((err <= _bf16_bound(c_dEabs)).all()), float((err / _bf16_bound(c_dEabs)).max())


@pytest.mark.parametrize("mode,seed", [("fiber", 5), ("thread", 0)])
def test_mma_kernels_under_other_schedules(harness, emulated, mode, seed):
    # Shuffled warp order (fiber, seed 5) and one OS thread per CUDA thread: the same
    # results as the natural order (every output has one writer, sums in a fixed order).
    K, d, n = 200, 136, 66
    x0, gamma = _inputs(n, K, 1)
    it = torch.full((n,), 3.0, dtype=torch.float64)
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(3))
    dh = torch.randn(n, d, generator=torch.Generator().manual_seed(4))
    ref_h, ref_z, ref_lse = _run_forward(emulated, x0, gamma, it, E, 7)
    ref_dE = _run_backward(emulated, dh, x0, gamma, it, ref_lse, K, 7)
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        h, z, lse = _run_forward(emulated, x0, gamma, it, E, 7)
        dE = _run_backward(emulated, dh, x0, gamma, it, lse, K, 7)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)
    assert torch.equal(z, ref_z) and torch.equal(h, ref_h) and torch.equal(lse, ref_lse) and torch.equal(dE, ref_dE)


def test_mma_z_defined_when_every_score_is_nan(emulated):
    # A NaN level makes every score of that token NaN: z must be the initialised 0 and
    # the other tokens (their own Philox streams) unaffected.
    K, d, n = 300, 8, 70
    x0, gamma = _inputs(n, K, 5)
    gamma[[3, 64, 69]] = math.nan
    it = torch.full((n,), 2.0, dtype=torch.float64)
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(2))
    h, z, _ = _run_forward(emulated, x0, gamma, it, E, 8)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[[3, 64, 69]] = True
    assert bool((z[bad] == 0).all()), z[bad]
    c_h, c_z, _ = torch.ops.duo_fast.curriculum_embed(x0, gamma.nan_to_num(0.0), it, E, 8, 0)
    c_habs, _, _ = torch.ops.duo_fast.curriculum_embed(x0, gamma.nan_to_num(0.0), it, E.abs(), 8, 0)
    ok = ~bad
    assert torch.equal(z[ok], c_z[ok])
    assert bool(((h - c_h).abs()[ok] <= _bf16_bound(c_habs)[ok]).all())


def test_mma_device_side_checks(emulated):
    # device_check.h: an invalid x0 (token 0), a NaN gamma (1), inv_tau = 0 (2) are each
    # counted once (d = 300: two column slices, counted by the first only), never
    # used to index memory, and z stays a valid id; the other tokens are unaffected.
    K, d, n = 200, 300, 67
    x0, gamma = _inputs(n, K, 9)
    it = torch.full((n,), 2.0, dtype=torch.float64)
    x0[0], gamma[1], it[2] = K + 3, math.nan, 0.0
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(4))
    checks = torch.zeros(13, dtype=torch.int32)  # check::kNumArgs
    h, z, _ = _run_forward(emulated, x0, gamma, it, E, 6, checks)
    assert checks.tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]  # kX0, kGamma, kInvTau
    assert bool(((z >= 0) & (z < K)).all())
    # tokens 3.. against the CPU kernel on the same rows (token t draws Philox stream t)
    x1, g1, i1 = x0.clone(), gamma.clone(), it.clone()
    x1[0], g1[1], i1[2] = 0, 0.0, 2.0
    c_h, c_z, _ = torch.ops.duo_fast.curriculum_embed(x1, g1, i1, E, 6, 0)
    c_habs, _, _ = torch.ops.duo_fast.curriculum_embed(x1, g1, i1, E.abs(), 6, 0)
    assert torch.equal(z[3:], c_z[3:])
    assert bool(((h - c_h).abs()[3:] <= _bf16_bound(c_habs)[3:]).all())


# --------------------------------------------------------------------------------------
# On a real GPU (skipped here): the op dispatches to these kernels on sm_80+
# --------------------------------------------------------------------------------------


def _tensor_cores():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.skipif(not _tensor_cores(), reason="no sm_80+ CUDA device; the emulated tests above run these kernels' source")
@pytest.mark.parametrize("K,d,n", [(50257, 768, 256), (1023, 96, 130)], ids=lambda v: str(v))
def test_cuda_tensor_cores_match_cpu(monkeypatch, K, d, n):
    monkeypatch.delenv("DUO_FAST_EMBED_PORTABLE", raising=False)
    x0, gamma = _inputs(n, K, 0)
    it = torch.full((n,), 3.0, dtype=torch.float64)
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(1))
    dh = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    h, z, lse = torch.ops.duo_fast.curriculum_embed(x0.cuda(), gamma.cuda(), it.cuda(), E.cuda(), 2, 0)
    dE = torch.ops.duo_fast.curriculum_embed_backward(dh.cuda(), x0.cuda(), gamma.cuda(), it.cuda(), lse, K, 2, 0)
    c_h, c_z, c_lse = torch.ops.duo_fast.curriculum_embed(x0, gamma, it, E, 2, 0)
    c_habs, _, _ = torch.ops.duo_fast.curriculum_embed(x0, gamma, it, E.abs(), 2, 0)
    c_dE = torch.ops.duo_fast.curriculum_embed_backward(dh, x0, gamma, it, c_lse, K, 2, 0)
    c_dEabs = torch.ops.duo_fast.curriculum_embed_backward(dh.abs(), x0, gamma, it, c_lse, K, 2, 0)
    assert int((z.cpu() != c_z).sum()) <= 1  # fused multiply-adds may flip a near-tie (docs/math.md §2c)
    same = z.cpu() == c_z
    torch.testing.assert_close(lse.cpu()[same], c_lse[same], rtol=0, atol=1e-5)
    assert bool(((h.cpu() - c_h).abs()[same] <= _bf16_bound(c_habs)[same]).all())
    assert bool(((dE.cpu() - c_dE).abs() <= _bf16_bound(c_dEabs) + 1e-5).all())


# --------------------------------------------------------------------------------------
# Misuse of the emulated instructions aborts with a message (tests/emulation/mma_fatal.cpp)
# --------------------------------------------------------------------------------------

MMA_FATAL = {
    "divergent": r"divergent warp: this lane (executes|calls) .*(mma\.sync|ldmatrix)",
    "global": r"ldmatrix: lane 0's row address .* is not a 16-byte-aligned shared memory row",
    "misaligned": r"ldmatrix: lane 0's row address .* is not a 16-byte-aligned shared memory row",
    "exited": r"lanes 0x00000020 of warp 0 have exited|exited while lanes .* wait for it in a warp matrix instruction",
}


@pytest.mark.parametrize("mode", ["fiber", "thread"])
@pytest.mark.parametrize("case", sorted(MMA_FATAL))
def test_emulated_matrix_instruction_misuse_aborts(harness, case, mode):
    import re
    from conftest import EMU_INCLUDES, ROOT

    exe = harness.compile_emulated([ROOT / "tests" / "emulation" / "mma_fatal.cpp"], "mma_fatal", executable=True,
                                   include_dirs=EMU_INCLUDES)
    proc = harness.run_emulated_program(exe, [case], env={"CUDA_EMU_MODE": mode}, timeout=60)
    assert proc.returncode != 0 and "did NOT abort" not in proc.stdout, proc.stdout + proc.stderr
    assert re.search(MMA_FATAL[case], proc.stderr), proc.stderr
