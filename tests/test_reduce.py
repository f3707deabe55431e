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
