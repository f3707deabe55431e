"""-inf logits (masked vocabularies) are probability 0, with 0 log 0 = 0, in every
op that takes logits (usdm_loss, linear_usdm_loss, distill_kl, sample_step,
posterior): CPU kernels and the emulated CUDA kernels against the float64
reference, with -inf in the first columns (every CUDA thread's first entry), the
last columns, and scattered (also at z and x0). A row that is entirely -inf has
no distribution: NaN in the losses, an error in sampling (the policy of
duo_fast/ops.py, "Bad values"; test_bad_values.py); it never crashes or reads
out of bounds."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr

NEG_INF = -math.inf
PATTERNS = ["first", "last", "scattered"]


def _masked(rows, K, pattern, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g) * scale
    if pattern == "first":  # >= 256 columns when K allows: every thread of a 256-thread block starts on -inf
        x[:, : max(1, min(300, K - 2))] = NEG_INF
    elif pattern == "last":
        x[:, -max(1, min(300, K - 2)):] = NEG_INF
    else:
        x[torch.rand(rows, K, generator=g) < 0.4] = NEG_INF
        x[:, 1] = NEG_INF
    x[:, -1 if pattern == "first" else 0] = 1.0  # at least one finite logit per row
    return x


def _usdm_inputs(rows, K, pattern, seed):
    g = torch.Generator().manual_seed(seed + 1)
    logits = _masked(rows, K, pattern, seed)
    finite = torch.isfinite(logits)
    # half the rows pick x0 / z among the masked ids (p = 0 at the clean or noisy token)
    x0 = torch.randint(0, K, (rows,), generator=g)
    z = torch.where(torch.rand(rows, generator=g) < 0.5, x0, torch.randint(0, K, (rows,), generator=g))
    alpha = 0.05 + 0.9 * torch.rand(rows, generator=g, dtype=torch.float64)
    dalpha = -(0.5 + torch.rand(rows, generator=g, dtype=torch.float64))
    masked0, masked1 = (~finite[0]).nonzero()[0, 0], (~finite[1]).nonzero()[-1, 0]
    x0[0] = z[0] = masked0  # p = 0 at the clean token (e = 1)
    x0[1], z[1] = masked1, (masked1 + 1) % K  # p = 0 at the clean token (e = 0)
    z[2] = (~finite[2]).nonzero()[0, 0]  # p = 0 at the noisy token
    return logits, z, x0, alpha, dalpha


def _check_usdm(loss, grad, logits, z, x0, alpha, dalpha, rtol=1e-5, gtol=1e-5):
    l64 = logits.double().requires_grad_()
    ref = reference.usdm_loss(l64, z, x0, alpha, dalpha)
    ref.sum().backward()
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=1e-6)
    scale = l64.grad.abs().amax(-1, keepdim=True)
    assert ((grad.double() - l64.grad).abs() <= gtol * (l64.grad.abs() + scale)).all()
    assert (grad[~torch.isfinite(logits)] == 0).all()  # probability 0 has gradient 0


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("K", [3, 1000, 50257])
def test_usdm_loss_cpu(pattern, K):
    rows = 3 if K == 50257 else 8
    logits, z, x0, alpha, dalpha = _usdm_inputs(rows, K, pattern, K)
    lg = logits.clone().requires_grad_()
    loss = duo_fast.usdm_loss(lg, z, x0, alpha, dalpha)
    loss.sum().backward()
    _check_usdm(loss, lg.grad, logits, z, x0, alpha, dalpha)


def test_linear_usdm_loss_masked_by_bias():
    # A -inf bias masks ids for every token: the logits hidden @ W.T + bias hold -inf columns.
    K, d, N = 300, 16, 12
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, N, d, generator=g, dtype=torch.float64)
    weight = torch.randn(K, d, generator=g, dtype=torch.float64) * 0.3
    bias = torch.zeros(K, dtype=torch.float64)
    bias[:260] = NEG_INF
    bias[290:] = NEG_INF
    x0 = torch.randint(0, K, (1, N), generator=g)
    z = torch.randint(0, K, (1, N), generator=g)
    alpha = torch.tensor([0.4], dtype=torch.float64)
    dalpha = torch.tensor([-1.0], dtype=torch.float64)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss = duo_fast.linear_usdm_loss(h, w, bias.float(), z, x0, alpha, dalpha, chunk_size=5)
    loss.sum().backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference.usdm_loss(torch.nn.functional.linear(h64.float().double(), w64.float().double(), bias), z, x0, alpha, dalpha)
    ref.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    assert (w.grad[:260] == 0).all() and (w.grad[290:] == 0).all()


def _kl_inputs(rows, K, pattern, seed, both):
    s = _masked(rows, K, pattern, seed)
    t = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed + 7)) * 3.0
    if both:  # the teacher masks the same ids: every term finite
        t[~torch.isfinite(s)] = NEG_INF
    return s, t


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("direction", ["bwd", "fwd"])
@pytest.mark.parametrize("K", [5, 1000])
def test_distill_kl_cpu(pattern, direction, K):
    rows = 6
    # student masked, teacher masked at the same ids: finite KL both ways
    s, t = _kl_inputs(rows, K, pattern, K, both=True)
    sg = s.clone().requires_grad_()
    kl = duo_fast.distill_kl(sg, t, direction)
    kl.sum().backward()
    s64 = s.double().requires_grad_()
    ref = reference.distill_kl(s64, t.double(), direction)
    ref.sum().backward()
    assert torch.isfinite(ref).all() and torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sg.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    assert (sg.grad[~torch.isfinite(s)] == 0).all()
    # only the student masked: bwd is finite (0 log 0), fwd is +inf (pT > 0 against pS = 0);
    # only the teacher masked: the other way round.
    s, t = _kl_inputs(rows, K, pattern, K, both=False)
    for a, b in ((s, t), (t, s)):
        got = duo_fast.distill_kl(a, b, direction)
        want = reference.distill_kl(a.double(), b.double(), direction)
        weighting_masked = (a is s) == (direction == "bwd")
        if weighting_masked:
            assert torch.isfinite(want).all()
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        else:
            assert (want == math.inf).all() and (got == math.inf).all()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_sampling_cpu(pattern, top_p):
    K, rows = 1000, 16
    x = _masked(rows, K, pattern, 3)
    z = torch.randint(0, K, (rows,), generator=torch.Generator().manual_seed(1))
    a_t = torch.full((rows,), 0.3, dtype=torch.float64)
    a_s = torch.full((rows,), 0.7, dtype=torch.float64)
    q = duo_fast.posterior(x, z, a_t, a_s, temperature=0.8, top_p=top_p)
    ref = reference.posterior(x, z, a_t, a_s, temperature=0.8, top_p=top_p)
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-6)
    # draws stay in the support of q (kappa = 1, alpha_s = 1: z or an id of positive p)
    out = duo_fast.sample_step(x, z, a_t, torch.ones_like(a_s), top_p=top_p, seed=5)
    q1 = reference.posterior(x, z, a_t, torch.ones_like(a_s), top_p=top_p)
    assert (q1.gather(1, out[:, None]) > 0).all()


# ---------------------------------------------------------------------------------------
# the emulated CUDA kernels
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 2)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_emulated_usdm_loss(harness, emulated, mode, seed, pattern):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        for K in (3, 1000, 2053):
            rows = 6
            logits, z, x0, alpha, dalpha = _usdm_inputs(rows, K, pattern, K + seed)
            loss, grad = torch.empty(rows), torch.empty(rows, K)
            rc = emulated.df_emu_usdm_loss(ptr(logits), 0, ptr(z), ptr(x0), ptr(alpha), ptr(dalpha), ptr(loss), ptr(grad),
                                           ctypes.c_int64(rows), ctypes.c_int64(K))
            assert rc == 0
            assert torch.isfinite(loss).all(), loss
            _check_usdm(loss, grad, logits, z, x0, alpha, dalpha, rtol=1e-4, gtol=1e-4)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("direction", [0, 1])
def test_emulated_distill_kl(harness, emulated, pattern, direction):
    name = ("bwd", "fwd")[direction]
    for K in (5, 1000):
        rows = 4
        s, t = _kl_inputs(rows, K, pattern, K, both=True)
        kl, grad = torch.empty(rows), torch.empty(rows, K)
        assert emulated.df_emu_distill_kl(ptr(s), 0, ptr(t), 0, ptr(kl), ptr(grad), ctypes.c_int64(rows), ctypes.c_int64(K), direction) == 0
        s64 = s.double().requires_grad_()
        ref = reference.distill_kl(s64, t.double(), name)
        ref.sum().backward()
        torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
        assert (grad[~torch.isfinite(s)] == 0).all()
        s, t = _kl_inputs(rows, K, pattern, K, both=False)  # teacher 0 where the student is positive, or vice versa
        assert emulated.df_emu_distill_kl(ptr(s), 0, ptr(t), 0, ptr(kl), ptr(grad), ctypes.c_int64(rows), ctypes.c_int64(K), direction) == 0
        want = reference.distill_kl(s.double(), t.double(), name)
        if direction == 0:
            torch.testing.assert_close(kl.double(), want, rtol=1e-4, atol=2e-5)
        else:
            assert (want == math.inf).all() and (kl == math.inf).all()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_emulated_sampling(harness, emulated, pattern):
    K, rows = 1000, 8
    x = _masked(rows, K, pattern, 8)
    z = torch.randint(0, K, (rows,), generator=torch.Generator().manual_seed(2))
    a_t = torch.full((rows,), 0.3, dtype=torch.float64)
    a_s = torch.full((rows,), 0.7, dtype=torch.float64)
    for top_p in (1.0, 0.6):
        q = torch.empty(rows, K)
        assert emulated.df_emu_posterior(ptr(x), 0, ptr(z), ptr(a_t), ptr(a_s), ptr(q), ctypes.c_int64(rows),
                                         ctypes.c_int64(K), ctypes.c_double(1.0), ctypes.c_double(0.8), ctypes.c_double(top_p)) == 0
        ref = reference.posterior(x, z, a_t, a_s, temperature=0.8, top_p=top_p)
        torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-6)
        out = torch.empty_like(z)
        assert emulated.df_emu_sample_step(ptr(x), 0, ptr(z), ptr(a_t), ptr(a_s), ptr(out), ctypes.c_int64(rows),
                                           ctypes.c_int64(K), ctypes.c_double(1.0), ctypes.c_double(0.8),
                                           ctypes.c_double(top_p), ctypes.c_uint64(9), ctypes.c_uint64(0)) == 0
        assert torch.equal(out, torch.ops.duo_fast.sample_step(x, z, a_t, a_s, 1.0, 0.8, top_p, 9, 0))


def test_all_minus_inf_rows_do_not_crash(harness, emulated):
    # NaN in the losses, counted and z kept in sampling (the bad-values policy); every
    # output is written and ids stay in range.
    K, rows = 300, 3
    x = torch.randn(rows, K)
    x[1] = NEG_INF
    z, x0 = torch.tensor([1, 2, 3]), torch.tensor([1, 4, 3])
    a = torch.full((rows,), 0.5, dtype=torch.float64)
    d = -torch.ones(rows, dtype=torch.float64)
    loss, grad = torch.full((rows,), 7.0), torch.full((rows, K), 7.0)
    assert emulated.df_emu_usdm_loss(ptr(x), 0, ptr(z), ptr(x0), ptr(a), ptr(d), ptr(loss), ptr(grad), ctypes.c_int64(rows), ctypes.c_int64(K)) == 0
    assert torch.isfinite(loss[[0, 2]]).all() and loss[1].isnan()
    kl = torch.empty(rows)
    assert emulated.df_emu_distill_kl(ptr(x), 0, ptr(x), 0, ptr(kl), ptr(grad), ctypes.c_int64(rows), ctypes.c_int64(K), 0) == 0
    assert torch.isfinite(kl[[0, 2]]).all() and kl[1].isnan()
    c = torch.zeros(13, dtype=torch.int32)  # a name: ptr() of a temporary would point at freed memory
    emulated.df_emu_take_checks(ptr(c))
    out = torch.full((rows,), -5, dtype=torch.int64)
    assert emulated.df_emu_sample_step(ptr(x), 0, ptr(z), ptr(a), ptr(a), ptr(out), ctypes.c_int64(rows), ctypes.c_int64(K),
                                       ctypes.c_double(1.0), ctypes.c_double(1.0), ctypes.c_double(0.5), ctypes.c_uint64(1), ctypes.c_uint64(0)) == 0
    assert ((out >= 0) & (out < K)).all() and out[1] == z[1]
    q = torch.empty(rows, K)
    assert emulated.df_emu_posterior(ptr(x), 0, ptr(z), ptr(a), ptr(a), ptr(q), ctypes.c_int64(rows), ctypes.c_int64(K),
                                     ctypes.c_double(1.0), ctypes.c_double(1.0), ctypes.c_double(0.5)) == 0
    assert q[1].isnan().all() and not q[[0, 2]].isnan().any()
    c = torch.zeros(13, dtype=torch.int32)
    emulated.df_emu_take_checks(ptr(c))
    assert c[11] == 2 and c.sum() == 2  # check::kLogits, once per op
    # CPU ops: NaN losses, an error from sampling
    assert duo_fast.usdm_loss(x[None], z[None], x0[None], a[None], d[None])[0, 1].isnan()
    assert duo_fast.distill_kl(x, x)[1].isnan()
    with pytest.raises(RuntimeError, match=r"logits: 1 row\(s\) \(the first: row 1"):
        duo_fast.sample_step(x, z, a, a, top_p=0.5, seed=1)
    with pytest.raises(RuntimeError, match=r"logits: 1 row\(s\) \(the first: row 1"):
        duo_fast.posterior(x, z, a, a, top_p=0.5)
    bias = torch.full((K,), -math.inf)
    loss = duo_fast.linear_usdm_loss(torch.randn(1, rows, 4), torch.randn(K, 4), bias, z[None], x0[None], a[None], d[None])
    assert loss.isnan().all()
