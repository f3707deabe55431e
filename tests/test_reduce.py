"""Warp/block reductions and the online-softmax merge of duo_fast/reduce.h, run
through the CUDA emulation (tests/native/reduce_kernels.cu) against float64
torch, for block sizes 32..1024, odd row lengths, and warp-order seeds."""

from __future__ import annotations

import ctypes

import pytest
import torch

from conftest import ptr


# Fiber mode with three warp orders at every block size; thread mode (one OS
# thread per CUDA thread, slow at 1024) up to 256.
CONFIGS = [(m, s, t) for m, s in [("fiber", 0), ("fiber", 1), ("fiber", 2)] for t in (32, 64, 160, 256, 1024)]
CONFIGS += [("thread", 0, t) for t in (32, 160, 256)]


@pytest.mark.parametrize("mode,seed,threads", CONFIGS)
def test_row_reductions(harness, emulated, mode, seed, threads):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        gen = torch.Generator().manual_seed(threads + seed)
        cols = [1, 31, 33, 1000, 2049]
        for c in cols:
            rows = 3
            x = torch.randn(rows, c, generator=gen) * 20
            x[0, 0] = 80.0  # a large value: the online max must rescale
            out = torch.empty(rows, 3)
            assert emulated.df_emu_row_reductions(ptr(x), ctypes.c_int64(rows), ctypes.c_int64(c), ptr(out), threads, 2) == 0
            xd = x.double()
            torch.testing.assert_close(out[:, 0].double(), xd.sum(1), rtol=1e-5, atol=1e-3 * c**0.5)
            assert torch.equal(out[:, 1], x.max(1).values)
            torch.testing.assert_close(out[:, 2].double(), torch.logsumexp(xd, 1), rtol=1e-6, atol=1e-5)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.parametrize("seed", [0, 3])
def test_online_softmax_skips_minus_inf(harness, emulated, seed):
    # -inf is probability 0: a thread whose first entries are -inf keeps the identity state
    # (exp(-inf - (-inf)) would be NaN); -inf first, last and scattered.
    harness.configure_emulation(emulated, mode="fiber", seed=seed)
    try:
        cols, rows = 1000, 4
        x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 5
        x[0, :300] = -float("inf")
        x[1, -300:] = -float("inf")
        x[2, ::3] = -float("inf")
        x[3, :999] = -float("inf")  # a single finite entry, at the end
        out = torch.empty(rows, 3)
        assert emulated.df_emu_row_reductions(ptr(x), ctypes.c_int64(rows), ctypes.c_int64(cols), ptr(out), 256, 2) == 0
        torch.testing.assert_close(out[:, 2].double(), torch.logsumexp(x.double(), 1), rtol=1e-6, atol=1e-5)
        assert torch.equal(out[:, 1], x.max(1).values)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


def _hist_inputs(rows, cols, seed):
    # Like the first radix byte of the top-p select: most entries in a few bins;
    # values over 2^-40 .. 2^20, so a double sum depends on its order.
    g = torch.Generator().manual_seed(seed)
    bins = torch.where(torch.rand(rows, cols, generator=g) < 0.9, torch.randint(3, 7, (rows, cols), generator=g),
                       torch.randint(-1, 64, (rows, cols), generator=g)).to(torch.int32)
    vals = torch.rand(rows, cols, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-40, 21, (rows, cols), generator=g).double())
    return bins.contiguous(), vals.contiguous()


def _histogram(emulated, bins, vals, threads, atomic):
    rows, cols = bins.shape
    out_sum, out_count = torch.empty(rows, 64, dtype=torch.float64), torch.empty(rows, 64, dtype=torch.int32)
    assert emulated.df_emu_histogram(ptr(bins), ptr(vals), ctypes.c_int64(rows), ctypes.c_int64(cols), ptr(out_sum),
                                     ptr(out_count), threads, 2, atomic) == 0
    return out_sum, out_count


@pytest.mark.parametrize("threads", [32, 256, 1024])
def test_warp_histogram_is_exact_and_deterministic(harness, emulated, threads):
    # reduce::warp_histogram_add (top-p radix passes): the right sums and counts, and the
    # same bits for every schedule (warp orders, atomics in a seeded random order,
    # thread mode). The old atomicAdd histogram gives different bits across seeds.
    import math

    bins, vals = _hist_inputs(3, 2000 if threads < 1024 else 3000, threads)
    runs = []
    try:
        for mode, seed in [("fiber", 0), ("fiber", 1), ("fiber", 2), ("fiber", 5)] + ([("thread", 0)] if threads <= 256 else []):
            harness.configure_emulation(emulated, mode=mode, seed=seed)
            runs.append(_histogram(emulated, bins, vals, threads, 0))
        for r in range(bins.shape[0]):
            for b in range(64):
                sel = bins[r] == b
                want = math.fsum(vals[r][sel].tolist())
                assert runs[0][1][r, b].item() == int(sel.sum())
                assert runs[0][0][r, b].item() == pytest.approx(want, rel=1e-13, abs=0)
        for s, c in runs[1:]:
            assert torch.equal(s, runs[0][0]) and torch.equal(c, runs[0][1])
        if threads >= 256:  # the planted (old) atomic histogram: order-dependent bits
            atomic = set()
            for seed in (1, 2, 3, 4):
                harness.configure_emulation(emulated, mode="fiber", seed=seed)
                s, c = _histogram(emulated, bins, vals, threads, 1)
                assert torch.equal(c, runs[0][1])
                atomic.add(s.numpy().tobytes())
            assert len(atomic) >= 2, "seeded atomic order left an order-dependent double sum unchanged"
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)
