"""curriculum_topk / curriculum_topk_embed (docs/math.md §2e): outputs against the
float64 reference fed with the kernel's own random inputs (exported test hook
df_topk_draws), the law of z_t against pt(gamma) (z-scores < 5), ids uniform at
every rank (chi-square p > 1e-4) and distinct, the reference rule's bias, the
embedding bag and its backward against F.embedding_bag, the emulated CUDA
kernels token-for-token, reproducibility, op conventions and errors."""

from __future__ import annotations

import ctypes
import math

import pytest
import scipy.stats as st
import torch
import torch.nn.functional as F

import duo_fast
from duo_fast import reference
from conftest import ptr


def _inputs(n, K, seed, gamma_lo=-4.0, gamma_hi=1.0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, K, (n,), generator=g)
    gamma = gamma_lo + (gamma_hi - gamma_lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return x0, gamma


def _draws(emulated, seed, x0, k, K):
    n = x0.numel()
    u = torch.empty(n, k, dtype=torch.float64)
    xi = torch.empty(n, dtype=torch.float64)
    ranks = torch.empty(n, k, dtype=torch.int64)
    for t in range(n):
        emulated.df_topk_draws(
            ctypes.c_uint64(seed), ctypes.c_uint64(0), ctypes.c_uint64(t), ctypes.c_int64(k), ctypes.c_int64(K),
            ctypes.c_int64(int(x0[t])), ptr(u[t]), ptr(xi[t:t + 1]), ptr(ranks[t]),
        )
    return reference.TopKDraws(u, xi, ranks)


@pytest.mark.parametrize(
    "K,k", [(2, 1), (3, 2), (50, 1), (50, 7), (50, 49), (1000, 32), (50257, 1), (50257, 128)]
)
@pytest.mark.parametrize("inv_tau", [1.0, 10.0, 1e4])
def test_matches_reference_given_the_same_draws(emulated, K, k, inv_tau):
    n, seed = 64, 1000 + K + k
    x0, gamma = _inputs(n, K, seed)
    ids, w, z = duo_fast.curriculum_topk(x0, gamma, inv_tau, k, K, seed=seed)
    _, _, z_ref_rule = duo_fast.curriculum_topk(x0, gamma, inv_tau, k, K, zt_rule="reference", seed=seed)
    draws = _draws(emulated, seed, x0, k, K)
    r_ids, r_w, r_z = reference.curriculum_topk(x0, gamma, inv_tau, k, K, draws=draws)
    _, _, r_zr = reference.curriculum_topk(x0, gamma, inv_tau, k, K, zt_rule="reference", draws=draws)
    assert ids.shape == (n, k) and w.dtype == torch.float32
    assert torch.equal(ids, r_ids)
    assert torch.equal(z, r_z) and torch.equal(z_ref_rule, r_zr)
    # float32 weights from float64 math: 1e-6 relative (+ float32 underflow).
    torch.testing.assert_close(w.double(), r_w, rtol=1e-6, atol=1e-30)


def test_all_weights_underflow_gives_one_hot_on_the_largest(emulated):
    # Very low temperature and a tiny tail: exp(kept/tau - log Z) can underflow for all
    # but the largest; at inv_tau = 1e4 with gamma high the weights concentrate.
    K, k, n, seed = 1000, 16, 32, 77
    x0, gamma = _inputs(n, K, seed, 2.0, 6.0)
    ids, w, z = duo_fast.curriculum_topk(x0, gamma, 1e4, k, K, seed=seed)
    r_ids, r_w, _ = reference.curriculum_topk(x0, gamma, 1e4, k, K, draws=_draws(emulated, seed, x0, k, K))
    torch.testing.assert_close(w.double(), r_w, rtol=1e-6, atol=1e-30)
    assert torch.allclose(w.sum(-1), torch.ones(n), atol=1e-5) or bool((w.sum(-1) <= 1 + 1e-5).all())


def test_k1_weight_below_float32_is_the_one_hot(emulated):
    # Regression (found by tests/test_fuzz.py): k = 1, the x-entry in the top 1 and a large
    # inv_tau: the tail term n e^{S^2/2} dwarfs e_x / tau and the float64 weight of the kept
    # entry is ~1e-245, which the op's float32 weights hold as 0, so the op applies the
    # one-hot rule (weight 1) where the reference did not (it tested for float64 underflow).
    # The reference now decides underflow in float32, the dtype the op returns.
    K, k, n, seed = 2, 1, 64, 0
    x0, _ = _inputs(n, K, 5)
    gamma = torch.full((n,), -1.0367, dtype=torch.float64)
    ids, w, z = duo_fast.curriculum_topk(x0, gamma, 68.7734, k, K, seed=seed)
    draws = _draws(emulated, seed, x0, k, K)
    r_ids, r_w, r_z = reference.curriculum_topk(x0, gamma, 68.7734, k, K, draws=draws)
    assert torch.equal(ids, r_ids) and torch.equal(z, r_z)
    torch.testing.assert_close(w.double(), r_w, rtol=1e-6, atol=1e-30)
    # the case itself: x in the top 1 (the kept id is x0) with the one-hot weight
    assert int(((w[:, 0] == 1) & (ids[:, 0] == x0)).sum()) >= 10
    h, _ = duo_fast.curriculum_topk_embed(x0, gamma, 68.7734, k, torch.tensor([[1.5], [-0.25]]), seed=seed)
    r_h, _ = reference.curriculum_topk_embed(x0, gamma, 68.7734, k, torch.tensor([[1.5], [-0.25]]), draws=draws)
    torch.testing.assert_close(h.double(), r_h, rtol=1e-6, atol=0)


@pytest.mark.parametrize("K", [2, 27, 1000, 50257])
def test_z_marginal_is_exact(K, device):
    # P(z_t = x) = pt(gamma) for the exact rule, at several gammas (z-score < 5).
    n, k = 60_000, min(16, K - 1)
    for gamma in (-5.0, -3.0, -1.75, 0.5):
        x0 = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(K))
        _, _, z = duo_fast.curriculum_topk(x0.to(device), torch.full((n,), gamma, dtype=torch.float64, device=device), 1.0, k,
                                           K, seed=int(K - 10 * gamma))
        z = z.cpu()
        p_hat = float((z == x0).double().mean())
        p = float(reference.pt_from_gamma(torch.tensor([gamma], dtype=torch.float64), K)[0])
        zscore = abs(p_hat - p) / math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert zscore < 5, (K, gamma, p_hat, p)


def test_reference_rule_reproduces_the_reference_bias():
    # zt_rule="reference": z = x iff in top-k; matches reference.curriculum_topk's
    # frequency (two-sample z < 5) and exceeds pt(gamma) for k >= 2.
    K, k, n, gamma = 1000, 32, 40_000, -1.0
    x0 = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(0))
    g = torch.full((n,), gamma, dtype=torch.float64)
    _, _, z = duo_fast.curriculum_topk(x0, g, 1.0, k, K, zt_rule="reference", seed=3)
    _, _, zr = reference.curriculum_topk(x0, g, 1.0, k, K, zt_rule="reference", generator=torch.Generator().manual_seed(4))
    a, b = float((z == x0).double().mean()), float((zr == x0).double().mean())
    pooled = (a + b) / 2
    assert abs(a - b) / math.sqrt(2 * pooled * (1 - pooled) / n) < 5
    p = float(reference.pt_from_gamma(torch.tensor([gamma], dtype=torch.float64), K)[0])
    assert a > p + 5 * math.sqrt(p * (1 - p) / n)


def test_ids_uniform_at_every_rank_and_distinct(device):
    K, k, n, x = 50, 10, 60_000, 7
    x0 = torch.full((n,), x, device=device)
    ids, w, z = (t.cpu() for t in duo_fast.curriculum_topk(x0, torch.full((n,), 1.0, dtype=torch.float64, device=device),
                                                            1.0, k, K, seed=11))
    in_topk = ids[:, -1] == x
    # distinct in every row, never x except the in-top-k slot
    s, _ = ids.sort(-1)
    assert bool((s[:, 1:] != s[:, :-1]).all())
    assert not bool((ids[:, :-1] == x).any())
    others = torch.tensor([j for j in range(K) if j != x])
    for rank in range(k):
        col = ids[:, rank] if rank < k - 1 else ids[~in_topk, rank]
        counts = torch.bincount(col, minlength=K)[others].numpy()
        assert st.chisquare(counts).pvalue > 1e-4, rank
    # the top ids appear as z too (no gap: the reference's Floyd order never gives z > K-k-1)
    assert int(z[z != x].max()) == K - 1


def test_k_equals_vocab_minus_one_is_a_permutation():
    K, n = 13, 200
    x0 = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(1))
    ids, w, z = duo_fast.curriculum_topk(x0, torch.zeros(n, dtype=torch.float64), 2.0, K - 1, K, seed=2)
    for t in range(n):
        row = set(ids[t].tolist())
        assert len(row) == K - 1 and (int(x0[t]) not in row or int(ids[t, -1]) == int(x0[t]))
    # Weights are a tempered softmax with one entry (the k-th order statistic or
    # the x-entry) left to the tail / normalizer: they sum to < 1.
    total = w.sum(-1).double()
    assert bool((total < 1).all()) and bool((total > 0.5).all())


def test_reproducible_across_threads_and_generator():
    K, k = 50257, 64
    x0, gamma = _inputs(3000, K, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = duo_fast.curriculum_topk(x0, gamma, 3.0, k, K, seed=9)
        torch.set_num_threads(2)
        b = duo_fast.curriculum_topk(x0, gamma, 3.0, k, K, seed=9)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    torch.manual_seed(1)
    c = duo_fast.curriculum_topk(x0, gamma, 3.0, k, K)
    d = duo_fast.curriculum_topk(x0, gamma, 3.0, k, K)
    torch.manual_seed(1)
    assert torch.equal(duo_fast.curriculum_topk(x0, gamma, 3.0, k, K)[0], c[0])
    assert not torch.equal(c[0], d[0])


# ---------------------------------------------------------------------------------------
# the fused embedding bag
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_matches_embedding_bag_forward_and_backward(dtype, device):
    K, k, d, B, L = 300, 16, 24, 3, 40
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (B, L), generator=g)
    gamma = torch.rand(B, generator=g, dtype=torch.float64) * 3 - 3
    E = torch.randn(K, d, generator=g).to(dtype).to(device).requires_grad_(True)
    x0, gamma = x0.to(device), gamma.to(device)
    h, z = duo_fast.curriculum_topk_embed(x0, gamma, 2.0, k, E, seed=4)
    ids, w, z2 = duo_fast.curriculum_topk(x0, gamma, 2.0, k, K, seed=4)
    assert torch.equal(z, z2) and h.dtype == dtype and h.shape == (B, L, d)
    E_ref = E.detach().float().requires_grad_(True)
    h_ref = F.embedding_bag(ids.reshape(-1, k), E_ref, per_sample_weights=w.reshape(-1, k), mode="sum").reshape(B, L, d)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.float(), h_ref, **tol)
    dh = torch.randn(B, L, d, generator=g).to(device)
    (h.float() * dh).sum().backward()
    (h_ref * dh).sum().backward()
    assert E.grad.dtype == dtype
    torch.testing.assert_close(E.grad.float(), E_ref.grad, **tol)


def test_embed_backward_is_deterministic():
    K, k, d = 64, 32, 16
    x0, gamma = _inputs(512, K, 3)
    E = torch.randn(K, d).requires_grad_(True)
    grads = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        E.grad = None
        h, _ = duo_fast.curriculum_topk_embed(x0, gamma, 1.0, k, E, seed=1)
        h.sum().backward()
        grads.append(E.grad.clone())
    assert torch.equal(grads[0], grads[1])


def _bag64(ids, w, E, gh):
    """float64 bag h = sum_i w_i E[id_i] and its backward (index_add of w_i gh), the reference."""
    d = E.shape[1]
    h = (w.double()[..., None] * E.double()[ids]).sum(-2)
    gE = torch.zeros(E.shape[0], d, dtype=torch.float64).index_add_(
        0, ids.reshape(-1), (w.double()[..., None] * gh.double()[..., None, :]).reshape(-1, d))
    mag = (w.double()[..., None].abs() * E.double()[ids].abs()).sum(-2)
    gmag = torch.zeros(E.shape[0], d, dtype=torch.float64).index_add_(
        0, ids.reshape(-1), (w.double()[..., None] * gh.double()[..., None, :]).abs().reshape(-1, d))
    return h, gE, mag, gmag


@pytest.mark.parametrize("path", ["sorted", "token", "auto"])
@pytest.mark.parametrize("n,k,K,d", [
    (120, 16, 300, 24),     # d not a multiple of 16: a 16-column tail
    (9000, 2, 50, 20),      # n > 8192 tokens: two token tiles (sorted forward, tiled backward)
    (40, 128, 50257, 770),  # few entries per id: most dE rows are zero rows (written, not left uninitialized)
    (700, 64, 1000, 64),
    (1100, 64, 3000, 48),   # >= 2 x 2^15 entries: the counting sort runs in one part per thread
    (1601, 64, 3000, 48),   # >= 3 x 2^15 entries: 3 uneven parts (533, 534, 534 tokens) at 3 threads
])
def test_bag_paths_match_float64_reference_and_threads(monkeypatch, path, n, k, K, d):
    # Both forwards (id-sorted, per-token; DUO_FAST_TOPK_BAG forces one) and the
    # id-sorted backward against the float64 bag; the same bits at 1, 2 and 3 threads
    # (3 > cores here: oversubscribed, and a 3-part counting sort).
    if path != "auto":
        monkeypatch.setenv("DUO_FAST_TOPK_BAG", path)
    x0, gamma = _inputs(n, K, n + k)
    g = torch.Generator().manual_seed(d)
    E = torch.randn(K, d, generator=g)
    gh = torch.randn(n, d, generator=g)
    out = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            e = E.clone().requires_grad_(True)
            h, _ = duo_fast.curriculum_topk_embed(x0, gamma, 2.0, k, e, seed=3)
            (h * gh).sum().backward()
            out.append((h.detach(), e.grad))
    finally:
        torch.set_num_threads(threads)
    for h, gE in out[1:]:
        assert torch.equal(out[0][0], h) and torch.equal(out[0][1], gE)
    ids, w, _ = duo_fast.curriculum_topk(x0, gamma, 2.0, k, K, seed=3)
    r_h, r_gE, mag, gmag = _bag64(ids, w, E, gh)
    h, gE = out[0]
    # float32 sums of k (forward) and ~n k / K (backward) terms, any order: 1e-6 of the sum of |terms|
    assert ((h.double() - r_h).abs() <= 1e-6 * (mag + 1e-30)).all()
    assert ((gE.double() - r_gE).abs() <= 1e-6 * (gmag + 1e-30)).all()
    unused = torch.ones(K, dtype=torch.bool)
    unused[ids.reshape(-1)] = False
    assert bool(unused.any()) == (n * k < 3 * K) and (gE[unused] == 0).all()


def test_bag_backward_writes_every_row():
    # The CPU backward's [K, d] output is uninitialized memory that it writes once,
    # zero rows included. A freed NaN buffer of the same size (below malloc's mmap
    # threshold, so its memory is likely handed out again) must not show through.
    K, k, d, n = 2000, 4, 8, 10
    x0, gamma = _inputs(n, K, 2)
    ids, w, _ = duo_fast.curriculum_topk(x0, gamma, 2.0, k, K, seed=1)
    gh = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    _, want, _, _ = _bag64(ids, w, torch.zeros(K, d), gh)
    for _ in range(3):
        junk = torch.full((K, d), math.nan)
        del junk
        got = torch.ops.duo_fast.topk_bag_backward(gh, ids, w, K, True)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sorted_bag_low_precision_embedding(monkeypatch, dtype):
    # The id-sorted forward converts each 16-bit row slice once; float32 accumulation.
    monkeypatch.setenv("DUO_FAST_TOPK_BAG", "sorted")
    n, k, K, d = 200, 32, 500, 40
    x0, gamma = _inputs(n, K, 8)
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    h, _ = duo_fast.curriculum_topk_embed(x0, gamma, 2.0, k, E, seed=5)
    ids, w, _ = duo_fast.curriculum_topk(x0, gamma, 2.0, k, K, seed=5)
    r_h, _, mag, _ = _bag64(ids, w, E, torch.zeros(n, d))
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # h rounded once to the 16-bit dtype
    assert h.dtype == dtype and ((h.double() - r_h).abs() <= eps * r_h.abs() + 1e-6 * mag + 2.0**-24).all()


def test_sorted_bag_skips_zero_weights(monkeypatch):
    # A weight that underflowed to 0 does not bring its row's inf / NaN into h
    # (both forwards skip zero-weight entries).
    K, k, d = 30, 4, 3
    x0 = torch.arange(16)[None]
    for path in ("sorted", "token"):
        monkeypatch.setenv("DUO_FAST_TOPK_BAG", path)
        ids, w, _ = duo_fast.curriculum_topk(x0, torch.full((1,), 6.0, dtype=torch.float64), 1e4, k, K, seed=1)
        assert bool((w == 0).any())
        E = torch.randn(K, d)
        zero_ids = ids[w == 0].unique()
        live = ids[w != 0].unique()
        dead = zero_ids[~torch.isin(zero_ids, live)]
        assert dead.numel() > 0
        E[dead] = math.inf
        h, _ = duo_fast.curriculum_topk_embed(x0, torch.full((1,), 6.0, dtype=torch.float64), 1e4, k, E, seed=1)
        assert torch.isfinite(h).all(), path


def test_opcheck():
    K, k, d = 40, 5, 8
    x0, gamma = _inputs(12, K, 0)
    x0, gamma = x0.reshape(3, 4), gamma.reshape(3, 4)
    it = torch.full((3, 4), 2.0, dtype=torch.float64)
    torch.library.opcheck(torch.ops.duo_fast.curriculum_topk.default, (x0, gamma, it, k, K, 0, 5, 0))
    E = torch.randn(K, d, requires_grad=True)
    torch.library.opcheck(torch.ops.duo_fast.curriculum_topk_embed.default, (x0, gamma, it, k, E, 0, 5, 0))
    ids, w, _ = duo_fast.curriculum_topk(x0, gamma, it, k, K, seed=5)
    torch.library.opcheck(torch.ops.duo_fast.topk_bag_backward.default, (torch.randn(3, 4, d), ids, w, K, True))


# ---------------------------------------------------------------------------------------
# emulated CUDA kernels
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 4), ("thread", 0)])
def test_emulated_cuda_kernels_match_cpu(harness, emulated, mode, seed):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        cases = [(2, 1, 300), (50, 49, 40), (50257, 128, 300)] if mode == "fiber" else [(50, 7, 20)]
        for K, k, n in cases:
            x0, gamma = _inputs(n, K, seed + K)
            it = torch.linspace(0.5, 100.0, n, dtype=torch.float64)
            for rule in (0, 1):
                ids, w, z = torch.empty(n, k, dtype=torch.int64), torch.empty(n, k), torch.empty(n, dtype=torch.int64)
                rc = emulated.df_emu_curriculum_topk(
                    ptr(x0), ptr(gamma), ptr(it), ptr(ids), ptr(w), ptr(z), ctypes.c_int64(n), ctypes.c_int64(k),
                    ctypes.c_int64(K), ctypes.c_int(rule), ctypes.c_uint64(21), ctypes.c_uint64(0),
                )
                assert rc == 0
                c_ids, c_w, c_z = torch.ops.duo_fast.curriculum_topk(x0, gamma, it, k, K, rule, 21, 0)
                assert torch.equal(ids, c_ids) and torch.equal(z, c_z)
                # weights: the CPU's vectorized path (curriculum_topk_rows.h) rounds differently by ~1 float ulp
                torch.testing.assert_close(w, c_w, rtol=1e-6, atol=1e-30)
            d = 12
            E = torch.randn(K, d, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
            h = torch.empty(n, d)
            ids, w, z = torch.empty(n, k, dtype=torch.int64), torch.empty(n, k), torch.empty(n, dtype=torch.int64)
            rc = emulated.df_emu_curriculum_topk_embed(
                ptr(x0), ptr(gamma), ptr(it), ptr(E), ctypes.c_int(1), ctypes.c_int64(d), ptr(h), ptr(ids), ptr(w),
                ptr(z), ctypes.c_int64(n), ctypes.c_int64(k), ctypes.c_int64(K), ctypes.c_int(0), ctypes.c_uint64(21),
                ctypes.c_uint64(0),
            )
            assert rc == 0
            c_h, c_z, c_ids, c_w = torch.ops.duo_fast.curriculum_topk_embed(x0, gamma, it, k, E, 0, 21, 0)
            assert torch.equal(ids, c_ids) and torch.equal(z, c_z)
            torch.testing.assert_close(h.bfloat16(), c_h, rtol=1e-2, atol=1e-2)  # weights differ by an ulp
            gh = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
            expected = torch.ops.duo_fast.topk_bag_backward(gh, ids, w, K, True)
            got = torch.zeros(K, d)
            assert emulated.df_emu_topk_bag_backward_atomic(ptr(gh), ptr(ids), ptr(w), ptr(got), ctypes.c_int64(n), ctypes.c_int64(k), ctypes.c_int64(d), ctypes.c_int64(K)) == 0
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            flat = ids.reshape(-1)
            sorted_ids, order = torch.sort(flat, stable=True)
            got = torch.full((K, d), math.nan)  # the sorted kernel writes every row, zero rows included
            assert emulated.df_emu_topk_bag_backward_sorted(ptr(gh), ptr(sorted_ids), ptr(order), ptr(w), ptr(got), ctypes.c_int64(n * k), ctypes.c_int64(k), ctypes.c_int64(d), ctypes.c_int64(K)) == 0
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


def test_topk_launch_fills_every_sm(emulated):
    # Grid of the CUDA top-k (a warp per token, 4 per block) for N = 65536 tokens on
    # an H100 (132 SMs): every SM's 64 resident warps while the swap maps fit in
    # 128 MiB, and never fewer than one block per SM. (The old per-thread scratch
    # capped at 32 MiB gave 85 blocks of 128 threads for k = 128, 10 for k = 1024
    # and 1 for k > 4096, with one thread doing each token.)
    f = emulated.df_topk_scratch_slots
    f.restype = ctypes.c_int64
    n, sms = 65536, 132
    for k in (1, 16, 128, 512, 1024, 4096, 8192, 50256):
        slots = f(ctypes.c_int64(n), ctypes.c_int64(k), ctypes.c_int64(sms))
        cap = 4
        while cap < 2 * k:
            cap *= 2
        assert slots % 4 == 0 and slots // 4 >= sms, (k, slots)
        if k <= 512:
            assert slots * 32 >= sms * 2048, (k, slots)  # full residency
        assert slots * cap * 8 <= 128 << 20 or slots == 4 * sms, (k, slots)
    assert f(ctypes.c_int64(10), ctypes.c_int64(128), ctypes.c_int64(sms)) == 12  # no more warps than tokens
    assert f(ctypes.c_int64(1), ctypes.c_int64(50256), ctypes.c_int64(sms)) == 4


@pytest.mark.parametrize("k", [1, 7, 100])
def test_emulated_topk_warps_loop_over_tokens(harness, emulated, k):
    # sm_count = 1: 64 warps for 500 tokens, so each warp (and its swap map) serves ~8 tokens.
    K, n = 1000, 500
    x0, gamma = _inputs(n, K, k)
    it = torch.linspace(0.5, 100.0, n, dtype=torch.float64)
    emulated.df_emu_set_sm_count(ctypes.c_int64(1))
    try:
        ids, w, z = torch.empty(n, k, dtype=torch.int64), torch.empty(n, k), torch.empty(n, dtype=torch.int64)
        assert emulated.df_emu_curriculum_topk(
            ptr(x0), ptr(gamma), ptr(it), ptr(ids), ptr(w), ptr(z), ctypes.c_int64(n), ctypes.c_int64(k),
            ctypes.c_int64(K), ctypes.c_int(0), ctypes.c_uint64(3), ctypes.c_uint64(0),
        ) == 0
    finally:
        emulated.df_emu_set_sm_count(ctypes.c_int64(108))
    c_ids, c_w, c_z = torch.ops.duo_fast.curriculum_topk(x0, gamma, it, k, K, 0, 3, 0)
    assert torch.equal(ids, c_ids) and torch.equal(z, c_z)
    torch.testing.assert_close(w, c_w, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("k", [4, 300])
def test_emulated_sorted_bag_backward_splits_long_runs(harness, emulated, k):
    # A padding id in most entries (runs of ~10^4 equal ids) plus a frequent and
    # scattered ids: the deterministic backward sums each run in segments of
    # max(256, k) entries combined in segment order. Against a float64 scatter,
    # and the same bits for every schedule.
    K, d = 5000, 3
    tokens = 24000 // k + 7
    g = torch.Generator().manual_seed(k)
    ids = torch.randint(0, K, (tokens, k), generator=g)
    u = torch.rand(tokens, k, generator=g)
    ids[u < 0.6] = 0  # padding
    ids[(u >= 0.6) & (u < 0.75)] = K - 1  # a frequent word
    w = torch.rand(tokens, k, generator=g)
    gh = torch.randn(tokens, d, generator=g)
    seg = emulated.df_topk_bag_segment(ctypes.c_int64(k))
    assert seg == max(256, k)
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    assert (sorted_ids == 0).sum() > 10 * seg  # the padding run spans many segments
    terms = (w[..., None].double() * gh[:, None, :].double()).reshape(-1, d)
    want = torch.zeros(K, d, dtype=torch.float64).index_add_(0, flat, terms)
    got = []
    try:
        for mode, seed in [("fiber", 0), ("fiber", 3)]:
            harness.configure_emulation(emulated, mode=mode, seed=seed)
            out = torch.full((K, d), math.nan)  # every row written once, the unused ids' as zeros
            assert emulated.df_emu_topk_bag_backward_sorted(ptr(gh), ptr(sorted_ids), ptr(order), ptr(w), ptr(out), ctypes.c_int64(flat.numel()), ctypes.c_int64(k), ctypes.c_int64(d), ctypes.c_int64(K)) == 0
            got.append(out)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)
    # float32 sums of up to ~1.5e4 terms: 1e-5 of the row's sum of |terms|
    scale = torch.zeros(K, d, dtype=torch.float64).index_add_(0, flat, terms.abs())
    assert ((got[0].double() - want).abs() <= 1e-5 * scale).all()
    assert torch.equal(got[0], got[1])


def test_emulated_sorted_bag_backward_without_entries_writes_zeros(harness, emulated):
    # The deterministic CUDA backward's output is not zero-initialized: with no entries
    # (empty batch) the launcher still writes every row.
    K, d, k = 37, 5, 3
    ids = torch.empty(0, dtype=torch.int64)
    w, gh = torch.empty(0), torch.empty(0, d)
    out = torch.full((K, d), math.nan)
    assert emulated.df_emu_topk_bag_backward_sorted(ptr(gh), ptr(ids), ptr(ids), ptr(w), ptr(out), ctypes.c_int64(0), ctypes.c_int64(k), ctypes.c_int64(d), ctypes.c_int64(K)) == 0
    assert torch.equal(out, torch.zeros(K, d))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernels_match_cpu runs these kernels' source on the CPU")
def test_cuda_device_matches_cpu():
    K, k, d = 50257, 128, 64
    x0, gamma = _inputs(4096, K, 0)
    a = duo_fast.curriculum_topk(x0.cuda(), gamma.cuda(), 3.0, k, K, seed=2)
    b = duo_fast.curriculum_topk(x0, gamma, 3.0, k, K, seed=2)
    assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[2].cpu(), b[2])
    torch.testing.assert_close(a[1].cpu(), b[1], rtol=1e-5, atol=1e-7)
    E = torch.randn(K, d)
    Ec = E.cuda().requires_grad_(True)
    h, _ = duo_fast.curriculum_topk_embed(x0.cuda(), gamma.cuda(), 3.0, k, Ec, seed=2)
    h.sum().backward()
    Er = E.clone().requires_grad_(True)
    hr, _ = duo_fast.curriculum_topk_embed(x0, gamma, 3.0, k, Er, seed=2)
    hr.sum().backward()
    torch.testing.assert_close(h.cpu(), hr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Ec.grad.cpu(), Er.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), r"k must be in \[1, vocab_size - 1\] = \[1, 9\], got 0"),
        (dict(k=10), r"k must be in \[1, vocab_size - 1\]"),
        (dict(zt_rule="floyd"), r"zt_rule must be 'exact' or 'reference'"),
        (dict(gamma=torch.tensor([math.inf, 0.0])), r"gamma must be finite"),
        (dict(inv_tau=0.0), r"inv_tau must be finite and > 0"),
        (dict(inv_tau=torch.tensor([[1.0, -1.0]])), r"inv_tau must be finite and > 0"),
        (dict(x0=torch.tensor([[0, 10]])), r"x0 holds token ids in \[0, 10\], outside \[0, vocab_size\)"),
        (dict(x0=torch.tensor([[0, 1]], dtype=torch.int16)), r"x0 has dtype int16"),
        (dict(gamma=torch.zeros(3)), r"gamma has shape"),
        (dict(seed=1, generator=torch.Generator()), r"either seed or generator"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    args = dict(x0=torch.tensor([[0, 1]]), gamma=torch.tensor([[0.0, 0.0]]), inv_tau=1.0, k=3)
    kw = {}
    for key, v in kwargs.items():
        (args if key in args else kw)[key] = v
    if "gamma" in kwargs and kwargs["gamma"].shape == (2,):
        args["gamma"] = kwargs["gamma"][None]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        duo_fast.curriculum_topk(args["x0"], args["gamma"], args["inv_tau"], args["k"], 10, **kw)


def test_embed_bad_embedding():
    x0 = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match=r"embedding must be \[vocab_size, d\]"):
        duo_fast.curriculum_topk_embed(x0, 0.0, 1.0, 2, torch.zeros(10))
    with pytest.raises(TypeError, match=r"embedding has dtype int64"):
        duo_fast.curriculum_topk_embed(x0, 0.0, 1.0, 2, torch.zeros(10, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"x0 holds token ids"):
        duo_fast.curriculum_topk_embed(torch.tensor([[0, 12]]), 0.0, 1.0, 2, torch.zeros(10, 3))
