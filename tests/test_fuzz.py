"""Property-based fuzzing (hypothesis) of every op against duo_fast.reference.

Each test draws an op's inputs: the vocabulary K (mostly 2..40, then sizes that are
no multiple of any vector width, and K = 2^20 with at most 2 tokens), the leading
shape (0-size batches, L = 1), dtypes, memory layouts (contiguous, a stride-2 last
dimension, transposed, expanded with stride 0), token ids int64 / int32, levels
per row ([B], [B, 1]), per token ([B, L]) or 0-dim, 1 or 2 CPU threads, masked
(-inf) logits, inplace_grad on and off; then checks the op against the float64
reference (duo_fast.reference and closed forms; the random ops against the
reference fed with the kernel's own random numbers, exported by the test hooks
of tests/native/exports.cpp), and that the other thread count gives identical
bits. The emulated CUDA kernels (tests/emulation) get the same checks at small
sizes.

Volume: the hypothesis profile (tests/conftest.py) sets the examples per test:
"ci" (default, derandomized: the same examples every run) 200, "long" 2000
(random, for nightly runs: DUO_FAST_FUZZ_PROFILE=long), "dev" 20. The
emulated-kernel tests run half as many (they are ~10x slower per example).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import traceback

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import duo_fast
from duo_fast import reference
from conftest import fuzz_examples, ptr

F64 = torch.float64
INF = math.inf
EMU = settings(max_examples=fuzz_examples(0.5), suppress_health_check=[HealthCheck.too_slow])


def lean(test):
    """Clear the locals of a failing example's frames: hypothesis keeps failures while it
    shrinks them, and an example with K = 2^20 holds ~100 MiB of tensors."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)
            raise

    return run


# ---------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------

ODD_K = [255, 257, 1000, 1023, 1025, 4099, 50257]


@st.composite
def vocab(draw, big=True, cap=None):
    """K: mostly small; often a size that is no multiple of any vector width; rarely 2^20."""
    r = draw(st.integers(0, 99))
    if big and r >= 97 and (cap is None or cap >= 1 << 20):
        return 1 << 20
    if r >= 75:
        choices = [k for k in ODD_K if cap is None or k <= cap] or [cap]
        return draw(st.sampled_from(choices))
    return draw(st.integers(2, 40 if cap is None else min(40, cap)))


@st.composite
def lead_shape(draw, K, max_tokens=12):
    """(B, L): B = 0 (0-size) to 3, L >= 1; at most 2 tokens when K >= 2^16."""
    cap = 2 if K >= (1 << 16) else max_tokens
    B = draw(st.integers(0, 3))
    L = draw(st.integers(1, max(1, cap // max(B, 1))))
    return B, L


LAYOUTS = ("contiguous", "strided", "transposed", "expanded")


def arrange(values, layout):
    """The same values in another memory layout. "expanded" needs values whose
    first dimension is one repeated row (made by `data`)."""
    if layout == "strided" and values.dim() >= 1 and values.numel() > 0:
        buf = values.new_zeros(*values.shape[:-1], 2 * values.shape[-1])
        buf[..., ::2] = values
        return buf[..., ::2]
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    return values


def data(make, shape, layout):
    """make(shape) -> values; for "expanded", one row along dim 0 broadcast (stride 0)."""
    if layout == "expanded" and len(shape) >= 1:
        return make((1, *shape[1:])).expand(*shape)
    return arrange(make(tuple(shape)), layout)


@st.composite
def ids(draw, shape, K, name="ids"):
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(LAYOUTS))
    dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    g = torch.Generator().manual_seed(seed)
    edge = draw(st.sampled_from(["random", "random", "zero", "last"]))

    def make(s):
        if edge == "zero":
            return torch.zeros(s, dtype=torch.int64)
        if edge == "last":
            return torch.full(s, K - 1, dtype=torch.int64)
        return torch.randint(0, K, s, generator=g)

    out = data(make, shape, layout).to(dtype)
    note(f"{name}: {layout} {dtype} {edge}")
    return out


@st.composite
def logits(draw, shape, dtypes=(torch.float32,), mask=True, name="logits"):
    """float logits with scale 0.01 to 30, sometimes ties, sometimes -inf entries
    (every row keeps one finite entry), in any layout."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 3.0, 30.0]))
    masked = draw(st.sampled_from(["none", "none", "some", "all_but_one"])) if mask else "none"
    ties = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    g = torch.Generator().manual_seed(seed)

    def make(s):
        x = torch.randn(s, generator=g) * scale
        if ties:
            x = (x * 2).round() / 2
        if masked != "none" and x.numel() > 0:
            drop = torch.rand(s, generator=g) < (0.3 if masked == "some" else 2.0)
            keep = torch.randint(0, s[-1], (*s[:-1], 1), generator=g)
            drop.scatter_(-1, keep, False)
            x[drop] = -INF
        return x.to(dtype)

    note(f"{name}: scale={scale} masked={masked} ties={ties} {dtype} {layout}")
    return data(make, shape, layout)


@st.composite
def level(draw, B, L, lo, hi, name, specials=(), dtypes=(torch.float64, torch.float32)):
    """A level per row [B], [B, 1], per token [B, L] or 0-dim, in [lo, hi] (plus the
    given special values), float32 or float64, in any layout."""
    kind = draw(st.sampled_from(["row", "row1", "token", "scalar"]))
    shape = {"row": (B,), "row1": (B, 1), "token": (B, L), "scalar": ()}[kind]
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    g = torch.Generator().manual_seed(seed)
    sp = torch.tensor(list(specials) or [lo], dtype=F64)

    def make(s):
        v = lo + (hi - lo) * torch.rand(s, generator=g, dtype=F64)
        if len(specials):
            pick = torch.rand(s, generator=g) < 0.3
            v = torch.where(pick, sp[torch.randint(0, len(sp), s, generator=g)], v)
        return v.to(dtype)

    note(f"{name}: {kind} {dtype} {layout}")
    return data(make, shape, layout) if shape else make(())


THREADS = st.sampled_from([1, 2])


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def both_thread_counts(n, fn):
    """fn() with n threads and with the other count; the outputs must be identical."""
    with threads(n):
        a = fn()
    with threads(3 - n):
        b = fn()
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                      and torch.equal(x.nan_to_num(), y.nan_to_num())), "thread count changed the result"
    return a


# ---------------------------------------------------------------------------------------
# gamma_to_alpha
# ---------------------------------------------------------------------------------------

G2A_K = [2, 3, 7, 257, 1000, 50257, 1 << 20, 1 << 24]


@st.composite
def g2a_case(draw):
    K = draw(st.sampled_from(G2A_K))
    n = draw(st.integers(0, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    layout = draw(st.sampled_from(["contiguous", "strided", "expanded"]))
    g = torch.Generator().manual_seed(seed)
    specials = torch.tensor([-INF, INF, -1e300, 1e300, -9.0, 20.0, 0.0, -40.0, 60.0], dtype=F64)

    def make(s):
        v = -12.0 + 40.0 * torch.rand(s, generator=g, dtype=F64)
        pick = torch.rand(s, generator=g) < 0.3
        return torch.where(pick, specials[torch.randint(0, len(specials), s, generator=g)], v).to(dtype)

    return K, data(make, (n,), layout)


@given(case=g2a_case(), n_threads=THREADS)
@lean
def test_gamma_to_alpha(case, n_threads):
    K, gamma = case
    alpha, dalpha = both_thread_counts(n_threads, lambda: duo_fast.gamma_to_alpha(gamma, K))
    assert alpha.dtype == gamma.dtype and alpha.shape == gamma.shape
    g = gamma.double()
    # The reference's quadrature covers |gamma| <= 700 (it overflows beyond); there the
    # the reference's accuracy: alpha within 1e-9 absolute (the reference's alpha = (K pt - 1)/(K - 1)
    # cancels for tiny alpha), dalpha within 1e-6 relative. Beyond: the limits.
    inside = g.abs() <= 700
    ra, rd = reference.gamma_to_alpha(g[inside], K)
    a_in, d_in = alpha[inside].double(), dalpha[inside].double()
    tiny = 1e-300 if gamma.dtype == torch.float64 else 1e-37  # float32 flushes below ~1e-38
    torch.testing.assert_close(a_in, ra, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(d_in, rd, rtol=2e-6, atol=tiny)
    low, high = g < -700, g > 700
    assert (alpha[low] == 1).all() and (dalpha[low] == 0).all()
    assert (alpha[high].double() <= 1e-150).all() and (dalpha[high].double().abs() <= 1e-150).all()
    assert (alpha[g == INF] == 0).all() and (dalpha[g == INF] == 0).all()
    assert ((alpha >= 0) & (alpha <= 1)).all() and (dalpha <= 0).all()


@EMU
@given(case=g2a_case())
@lean
def test_gamma_to_alpha_emulated(emulated, case):
    K, gamma = case
    g = gamma.double().contiguous()
    table = torch.empty(emulated.df_schedule_table_size(), dtype=F64)
    emulated.df_build_schedule_table(ctypes.c_int64(K), ptr(table))
    a, d = torch.empty_like(g), torch.empty_like(g)
    assert emulated.df_emu_gamma_to_alpha_f64(ptr(g), ptr(a), ptr(d), ctypes.c_int64(g.numel()), ptr(table)) == 0
    ca, cd = duo_fast.gamma_to_alpha(g, K)
    assert torch.equal(a, ca) and torch.equal(d, cd)  # the same table and header math


# ---------------------------------------------------------------------------------------
# sample_zt: against the closed form fed with the kernel's own draws
# ---------------------------------------------------------------------------------------


def latent_draws(emulated, seed, n, K):
    eps = torch.empty(n, dtype=F64)
    u = torch.empty(n, dtype=F64)
    r = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        emulated.df_latent_draw(ctypes.c_uint64(seed), ctypes.c_uint64(0), ctypes.c_uint64(i), ctypes.c_int64(K),
                                ptr(eps[i:i + 1]), ptr(u[i:i + 1]), ptr(r[i:i + 1]))
    return eps, u, r


def check_latent(z, x0, gamma, K, draws):
    """docs/math.md §2a: z = x if nu + eps_x > M else j*, M = -Phi^-1(-expm1(log U / (K - 1))),
    j* = r + (r >= x); exact except where nu + eps_x and M tie to rounding."""
    eps, u, r = draws
    x = x0.reshape(-1).long()
    g = torch.broadcast_to(gamma.double().reshape(gamma.shape[0], *([1] * (x0.dim() - 1))) if gamma.dim() == 1 else gamma.double(), x0.shape).reshape(-1)
    m = -torch.special.ndtri(-torch.expm1(torch.log(u) / (K - 1)))
    nu = torch.exp(-0.5 * g)
    want = torch.where(nu + eps > m, x, r + (r >= x).long())
    tie = (nu + eps - m).abs() <= 1e-9 * (1 + m.abs())
    got = z.reshape(-1).long()
    assert ((got == want) | tie).all(), (got, want)
    assert ((got >= 0) & (got < K)).all()


@st.composite
def zt_case(draw, big=True, cap=None):
    K = draw(vocab(big=big, cap=cap))
    B, L = draw(lead_shape(K))
    x0 = draw(ids((B, L), K, "x0"))
    specials = (-INF, INF, -30.0, 30.0)
    gamma = draw(level(B, L, -8.0, 4.0, "gamma", specials))
    gamma_s = draw(st.none() | level(B, L, -8.0, 4.0, "gamma_s", specials))
    seed = draw(st.integers(0, 2**63 - 1))
    return K, x0, gamma, gamma_s, seed


@given(case=zt_case(), n_threads=THREADS)
@lean
def test_sample_zt(emulated, case, n_threads):
    K, x0, gamma, gamma_s, seed = case
    out = both_thread_counts(n_threads, lambda: duo_fast.sample_zt(x0, gamma, K, gamma_s=gamma_s, seed=seed))
    z_t, z_s = out if gamma_s is not None else (out, None)
    assert z_t.dtype == x0.dtype and z_t.shape == x0.shape
    draws = latent_draws(emulated, seed, x0.numel(), K)
    per_token = lambda v: torch.broadcast_to(v.double().reshape(-1, *([1] * (x0.dim() - 1))) if v.dim() == 1 else v.double(), x0.shape)  # noqa: E731
    check_latent(z_t, x0, per_token(gamma), K, draws)
    if gamma_s is not None:
        check_latent(z_s, x0, per_token(gamma_s), K, draws)


@EMU
@given(case=zt_case(big=False, cap=5000))
@lean
def test_sample_zt_emulated(emulated, case):
    K, x0, gamma, gamma_s, seed = case
    n = x0.numel()
    x = x0.reshape(-1).long().contiguous()
    per_token = lambda v: torch.broadcast_to(v.double().reshape(-1, *([1] * (x0.dim() - 1))) if v.dim() == 1 else v.double(), x0.shape).reshape(-1).contiguous()  # noqa: E731
    gt = per_token(gamma)
    gs = per_token(gamma_s) if gamma_s is not None else None
    zt, zs = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    assert emulated.df_emu_sample_zt(ptr(x), ptr(gt), ptr(gs) if gs is not None else None, ptr(zt),
                                     ptr(zs) if gs is not None else None,
                                     ctypes.c_int64(n), ctypes.c_int64(K), ctypes.c_uint64(seed), ctypes.c_uint64(0)) == 0
    draws = latent_draws(emulated, seed, n, K)
    check_latent(zt, x, gt, K, draws)
    if gs is not None:
        check_latent(zs, x, gs, K, draws)


# ---------------------------------------------------------------------------------------
# usdm_loss, linear_usdm_loss
# ---------------------------------------------------------------------------------------

ALPHA_SPECIALS = (1e-6, 1e-3, 0.5, 1 - 1e-4, 1 - 1e-6)


@st.composite
def usdm_case(draw, big=True, cap=None, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    K = draw(vocab(big=big, cap=cap))
    B, L = draw(lead_shape(K))
    lg = draw(logits((B, L, K), dtypes))
    x0 = draw(ids((B, L), K, "x0"))
    same = draw(st.booleans())
    z = x0.clone() if same else draw(ids((B, L), K, "z"))
    alpha = draw(level(B, L, 0.01, 0.99, "alpha", ALPHA_SPECIALS))
    dalpha = draw(level(B, L, -3.0, 0.0, "dalpha", (0.0, -1e-8, -1.0)))
    return K, lg, z, x0, alpha, dalpha


def check_usdm(loss, grad, logits_, z, x0, alpha, dalpha, rtol=1e-5, gtol=1e-5, atol=1e-6, weighted=True):
    """Loss and gradient against autograd of the float64 reference on the same
    (upcast) logits; the tolerance of tests/test_usdm_loss.py (1e-5 relative +
    1e-6 absolute; the gradient also 1e-6 of the row's largest entry and the
    reference's own cancellation error ~1e-14 |dalpha| (1 + K alpha / (1 - alpha))).
    weighted: grad is d(sum w loss)/d logits with w = linspace(0.5, 1.5) (the op's
    backward), else d(sum loss)/d logits (a kernel's own gradient output)."""
    l64 = logits_.double().requires_grad_()
    ref = reference.usdm_loss(l64, z.long(), x0.long(), alpha, dalpha)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=atol)
    if grad is None or l64.numel() == 0:
        return
    w = torch.linspace(0.5, 1.5, ref.numel(), dtype=F64).reshape(ref.shape) if weighted else torch.ones_like(ref)
    (ref * w).sum().backward()
    K = logits_.shape[-1]
    a = torch.broadcast_to(alpha.double().reshape(-1, 1) if alpha.dim() == 1 else alpha.double(), ref.shape)
    d = torch.broadcast_to(dalpha.double().reshape(-1, 1) if dalpha.dim() == 1 else dalpha.double(), ref.shape)
    ref_err = (1e-14 * d.abs() * (1 + K * a / (1 - a)))[..., None]
    scale = l64.grad.abs().amax(-1, keepdim=True)
    want = l64.grad
    got = grad.double()
    if logits_.dtype != torch.float32:
        # A gradient beyond the 16-bit range is +-inf, as any cast: the op's gradient (cast
        # before the scaling by grad_output w) or the scaled one (cast after it) rounds to inf
        # from max (1 + 2^-(mantissa + 2)) on.
        fi = torch.finfo(logits_.dtype)
        limit = fi.max * (1 + 2.0 ** -(12 if logits_.dtype == torch.float16 else 9))
        big = torch.maximum((want / w[..., None]).abs(), want.abs())
        sure, maybe = big > limit * (1 + 1e-3), big > limit * (1 - 1e-3)
        assert torch.equal(got[sure], want[sure].sign() * INF)
        skip = sure | (maybe & got.isinf())
        got, want = got.masked_fill(skip, 0.0), want.masked_fill(skip, 0.0)
    err = (got - want).abs()
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[logits_.dtype]
    # float16's subnormal spacing, twice: the op's gradient is rounded to float16 in the forward
    # and rounded again after the scaling by grad_output (long profile: 1.5 spacings at w = 1.5)
    quantum = 2 * 2.0**-24 if logits_.dtype == torch.float16 else 0.0
    # Known float32 limit (tests/README.md, "left"): z != x0 with z or x0 masked (p = 0) in a
    # near-flat row. The entries are p_j F (C - p_j q_j) (csrc/include/duo_fast/usdm_loss.h)
    # and the bracket cancels, so the error is relative to the size of its terms, not to the
    # (possibly ~0) gradient: 1e-6 of |F| p_max (|C| + p_max q_max), from the closed forms.
    zl, xl = z.long(), x0.long()
    masked_zx = (zl != xl) & ~(torch.isfinite(logits_.gather(-1, zl[..., None]).squeeze(-1))
                               & torch.isfinite(logits_.gather(-1, xl[..., None]).squeeze(-1)))
    terms = torch.zeros_like(ref_err)
    if masked_zx.any():
        p = torch.softmax(logits_.double(), -1)
        r = K * a / (1 - a)
        q = 1 / (1 + r[..., None] * p)
        px, pz = p.gather(-1, xl[..., None]).squeeze(-1), p.gather(-1, zl[..., None]).squeeze(-1)
        qx, qz = q.gather(-1, xl[..., None]).squeeze(-1), q.gather(-1, zl[..., None]).squeeze(-1)
        Qx = (p * p * q).sum(-1) - px * px * qx
        Px = 1 - px
        ez = -K * pz * qz * qz / (1 - a)
        C = Qx - px * qx * Px - pz * ez
        F = (d / (K * a)) * r * r
        pm = p.amax(-1)
        terms = (1e-6 * F.abs() * pm * (C.abs() + pm / (1 + r * pm)) * masked_zx)[..., None]
    assert (err <= (gtol + eps) * want.abs() + (1e-6 + eps) * scale + ref_err + quantum + terms).all(), float((err / (want.abs() + scale)).max())
    assert (grad[~torch.isfinite(logits_)] == 0).all()


@given(case=usdm_case(), inplace=st.booleans(), n_threads=THREADS)
@lean
def test_usdm_loss(case, inplace, n_threads):
    K, lg, z, x0, alpha, dalpha = case

    def run():
        l = lg.detach().clone().requires_grad_()
        loss = duo_fast.usdm_loss(l, z, x0, alpha, dalpha, inplace_grad=inplace)
        w = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        (loss * w).sum().backward()
        return loss.detach(), l.grad

    loss, grad = both_thread_counts(n_threads, run)
    assert loss.shape == z.shape and loss.dtype == torch.float32 and grad.dtype == lg.dtype
    check_usdm(loss, grad, lg, z, x0, alpha, dalpha)
    with torch.no_grad():  # no gradient requested: the same loss
        assert torch.equal(duo_fast.usdm_loss(lg, z, x0, alpha, dalpha), loss)


@EMU
@given(case=usdm_case(big=False, cap=5000))
@lean
def test_usdm_loss_emulated(emulated, case):
    K, lg, z, x0, alpha, dalpha = case
    n = z.numel()
    flat = lambda v: torch.broadcast_to(v.double().reshape(-1, 1) if v.dim() == 1 else v.double(), z.shape).reshape(-1).contiguous()  # noqa: E731
    lc, zc, xc = lg.reshape(n, K).contiguous(), z.reshape(-1).long().contiguous(), x0.reshape(-1).long().contiguous()
    a, d = flat(alpha), flat(dalpha)
    loss, grad = torch.empty(n), torch.empty(n, K, dtype=lc.dtype)  # the gradient in the logits' dtype
    assert emulated.df_emu_usdm_loss(ptr(lc), _DTYPE_CODE[lc.dtype], ptr(zc), ptr(xc), ptr(a), ptr(d), ptr(loss),
                                     ptr(grad), ctypes.c_int64(n), ctypes.c_int64(K)) == 0
    # float32 entries with float sums of 16-byte vectors and block reductions on the device:
    # 1e-4 (the CPU kernel: 1e-5), one rounding to the logits' dtype
    col = lambda t: t.view(n, 1, *t.shape[1:])  # noqa: E731  (levels per token: [n, 1])
    check_usdm(col(loss), col(grad), col(lc), col(zc), col(xc), col(a), col(d), rtol=1e-4, gtol=1e-4, atol=1e-5,
               weighted=False)


@st.composite
def linear_case(draw):
    K = draw(vocab())
    B, L = draw(lead_shape(K, 10))
    d = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    hidden = data(lambda s: torch.randn(s, generator=g), (B, L, d), draw(st.sampled_from(LAYOUTS)))
    weight = arrange(torch.randn(K, d, generator=g) * draw(st.sampled_from([0.1, 1.0, 3.0])), draw(st.sampled_from(LAYOUTS)))
    bias = draw(st.sampled_from(["none", "zeros", "random", "masked"]))
    b = None if bias == "none" else torch.zeros(K) if bias == "zeros" else torch.randn(K, generator=g)
    if bias == "masked" and K > 2:
        b[torch.rand(K, generator=g) < 0.5] = -INF
        b[0] = 0.0
    x0 = draw(ids((B, L), K, "x0"))
    z = draw(ids((B, L), K, "z"))
    alpha = draw(level(B, L, 0.05, 0.95, "alpha"))
    dalpha = draw(level(B, L, -2.0, -0.1, "dalpha"))
    chunk = draw(st.none() | st.integers(1, 7))
    note(f"K={K} d={d} bias={bias} chunk={chunk}")
    return K, hidden, weight, b, z, x0, alpha, dalpha, chunk


@given(case=linear_case(), n_threads=THREADS)
@lean
def test_linear_usdm_loss(case, n_threads):
    K, hidden, weight, bias, z, x0, alpha, dalpha, chunk = case

    def run():
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        b = None if bias is None else bias.clone().requires_grad_()
        loss = duo_fast.linear_usdm_loss(h, w, b, z, x0, alpha, dalpha, chunk_size=chunk)
        loss.sum().backward()
        return (loss.detach(), h.grad, w.grad) + ((b.grad,) if b is not None else ())

    with threads(n_threads):
        loss, gh, gw, *gb = run()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    logits64 = torch.nn.functional.linear(h64, w64, b64)
    logits64.retain_grad()
    ref = reference.usdm_loss(logits64, z.long(), x0.long(), alpha, dalpha)
    # float32 GEMMs per chunk against float64 logits: 1e-4
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    if ref.numel() == 0:
        return
    ref.sum().backward()
    # The weight / hidden gradients are float32 GEMMs (torch's) of the logits' gradient G,
    # whose rows sum to 0 (softmax): their K terms cancel, so the error is relative to the
    # sums of |terms|: 1e-4 for G's own error plus the float32 dot-product bound K 2^-24
    # (Higham; at K = 2^20 the GEMM over the vocabulary is off by ~5e-4 of the sum, found by
    # the long profile: torch's float32 linear backward has the same error).
    G = logits64.grad.abs().reshape(-1, K)
    mag_h = (G @ w64.detach().abs()).reshape(h64.shape)
    mag_w = G.t() @ h64.detach().abs().reshape(-1, h64.shape[-1])
    dot = 1e-4 + K * 2.0**-24
    assert ((gh.double() - h64.grad).abs() <= dot * mag_h + 1e-7).all()
    assert ((gw.double() - w64.grad).abs() <= 1e-4 * mag_w + 1e-7).all()  # a sum over N tokens
    if gb:
        assert ((gb[0].double() - b64.grad).abs() <= 1e-4 * G.sum(0) + 1e-7).all()


# ---------------------------------------------------------------------------------------
# distill_kl
# ---------------------------------------------------------------------------------------


@st.composite
def kl_case(draw, big=True, cap=None):
    K = draw(vocab(big=big, cap=cap))
    B, L = draw(lead_shape(K))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    s = draw(logits((B, L, K), dtypes, name="student"))
    share_mask = draw(st.booleans())
    t = draw(logits((B, L, K), dtypes, mask=not share_mask, name="teacher"))
    if share_mask:  # the teacher masks the same ids: a finite KL
        t = torch.where(torch.isfinite(s), t, torch.full_like(t, -INF))
    direction = draw(st.sampled_from(["bwd", "fwd"]))
    return K, s, t, direction


def check_kl(kl, grad, s, t, direction, rtol, atol, gtol, f32=0.0):
    """f32: the relative rounding of float32 math (CUDA): log p = l - lse is formed from
    numbers of size |l| and |lse| (~100 at scale-30 logits), and the gradient pS (d - KL) of
    "bwd" subtracts log-ratios of size |d|, |KL|: its absolute error is ~f32 pS (|ls| +
    |lse_S| + |lt| + |lse_T| + |KL|), "fwd"'s pS - pT one f32 pT (|lt| + |lse_T|) more
    (long profile: 1.9e-5 and 1.6e-4 at scale-30 logits, where d - KL cancels)."""
    s64 = s.double().requires_grad_()
    ref = reference.distill_kl(s64, t.double(), direction)
    finite = torch.isfinite(ref)
    assert torch.equal(kl[~finite].double(), ref[~finite].detach())  # +inf where the other law is 0
    torch.testing.assert_close(kl[finite].double(), ref[finite].detach(), rtol=rtol, atol=atol)
    if grad is None or not finite.any():
        return
    ref[finite].sum().backward()
    rows = finite[..., None].expand(grad.shape)
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    size = lambda l: torch.where(torch.isfinite(l), l.abs(), torch.zeros_like(l)) + l.logsumexp(-1, keepdim=True).abs()  # noqa: E731
    s_size, t_size = size(s.double()), size(t.double())
    bound = f32 * (ls.exp() * (s_size + t_size + ref.detach().abs()[..., None]) + lt.exp() * t_size)
    err = (grad.double() - s64.grad).abs()
    # a 16-bit student: its gradient is written in its dtype, rounded once (half an ulp;
    # float16 subnormals: half the spacing 2^-24)
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[grad.dtype]
    quantum = 2.0**-25 if grad.dtype == torch.float16 else 0.0
    bound = bound + eps * s64.grad.abs() + quantum
    assert (err <= gtol * s64.grad.abs() + gtol * 0.1 + bound)[rows].all(), float(err[rows].max())
    assert (grad[~torch.isfinite(s) & rows] == 0).all()


@given(case=kl_case(), n_threads=THREADS)
@lean
def test_distill_kl(case, n_threads):
    K, s, t, direction = case

    def run():
        sg = s.detach().clone().requires_grad_()
        kl = duo_fast.distill_kl(sg, t, direction)
        kl[torch.isfinite(kl)].sum().backward() if kl.numel() else None
        return kl.detach(), (sg.grad if sg.grad is not None else torch.zeros_like(s))

    kl, grad = both_thread_counts(n_threads, run)
    assert kl.shape == s.shape[:-1] and kl.dtype == torch.float32
    check_kl(kl, grad if torch.isfinite(kl).any() else None, s, t, direction, 1e-5, 1e-6, 1e-5)


@EMU
@given(case=kl_case(big=False, cap=5000))
@lean
def test_distill_kl_emulated(emulated, case):
    K, s, t, direction = case
    n = s.numel() // K
    sc, tc = s.reshape(n, K).contiguous(), t.reshape(n, K).contiguous()
    kl, grad = torch.empty(n), torch.empty(n, K, dtype=sc.dtype)  # the gradient in the student's dtype
    assert emulated.df_emu_distill_kl(ptr(sc), _DTYPE_CODE[sc.dtype], ptr(tc), _DTYPE_CODE[tc.dtype], ptr(kl), ptr(grad),
                                      ctypes.c_int64(n), ctypes.c_int64(K),
                                      ("bwd", "fwd").index(direction)) == 0
    # float32 (CUDA): ~8 roundings per entry plus the block reduction of the KL (2 log2 K)
    f32 = (8 + 2 * math.log2(K)) * 2.0**-24
    check_kl(kl, grad if torch.isfinite(kl).all() else None, sc, tc, direction, 1e-4, 2e-5, 1e-4, f32=f32)


# ---------------------------------------------------------------------------------------
# sample_step, posterior
# ---------------------------------------------------------------------------------------


@st.composite
def step_case(draw, big=True, cap=None, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    K = draw(vocab(big=big, cap=cap))
    B, L = draw(lead_shape(K))
    lg = draw(logits((B, L, K), dtypes))
    z = draw(ids((B, L), K, "z"))
    a_t = draw(level(B, L, 0.0, 0.9, "alpha_t", (0.0, 0.5)))
    gap_kind = draw(st.sampled_from(["random", "equal", "one"]))
    # alpha_s >= alpha_t: the same layout kind is not needed; build per token from a_t
    at_tok = torch.broadcast_to(a_t.double().reshape(-1, 1) if a_t.dim() == 1 else a_t.double(), (B, L))
    if gap_kind == "one":
        a_s = torch.ones(B, L, dtype=F64)
    elif gap_kind == "equal":
        a_s = at_tok.clone()
        a_s[a_s == 0] = 0.5
        at_tok = torch.minimum(at_tok, a_s)
        a_t = at_tok
    else:
        u = torch.rand(B, L, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))), dtype=F64)
        a_s = at_tok + (1 - at_tok) * u
        a_s = torch.where(a_s > 0, a_s, torch.full_like(a_s, 0.25))
    kappa = draw(st.sampled_from([1.0, 1.0, 0.0, 0.3, 0.9]))
    temperature = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.1]))
    top_p = draw(st.sampled_from([1.0, 1.0]) | st.floats(0.05, 0.999))
    seed = draw(st.integers(0, 2**63 - 1))
    note(f"K={K} kappa={kappa} T={temperature} top_p={top_p} gap={gap_kind}")
    return K, lg, z, a_t, a_s, kappa, temperature, top_p, seed


def _per_tok(v, shape):
    """A level (a float, 0-dim, [B], [B, 1] or [B, L]) as float64 of the leading shape."""
    v = torch.as_tensor(v, dtype=F64)
    return torch.broadcast_to(v.double().reshape(-1, *([1] * (len(shape) - 1))) if v.dim() == 1 else v.double(), shape)


def _flat_level(v, shape):
    return _per_tok(v, shape).reshape(-1).contiguous()


def nucleus_variants(top_p):
    """The nucleus boundary is defined up to the rounding of the cumulative mass: the
    kernel (float weights, double sums) may keep one rank more or less than the
    float64 reference exactly at a tie with top_p. Any of these is accepted."""
    return [top_p] if top_p >= 1.0 else [top_p, top_p * (1 + 1e-6), top_p * (1 - 1e-6)]


def check_posterior(q, lg, z, a_t, a_s, kappa, temperature, top_p, atol):
    errs = []
    for p in nucleus_variants(top_p):
        ref = reference.posterior(lg.float(), z.long(), a_t, a_s, kappa=kappa, temperature=temperature, top_p=p)
        errs.append(float((q.double() - ref).abs().max()) if ref.numel() else 0.0)
    assert min(errs) <= atol, errs


def mixture(p_z, a_t, a_s, kappa, K):
    """docs/math.md §4 as a mixture: masses of the point mass at z, of p and of the uniform law."""
    d = K * a_t * p_z + 1 - a_t
    r = a_t / a_s
    post = ((K * a_t * p_z + r - a_t) / d, (a_s - a_t) / d, (1 - r) * (1 - a_s) / d)
    pc = (a_s * K * a_t * p_z / d, a_s * (1 - a_t) / d, 1 - a_s)
    return tuple(kappa * x + (1 - kappa) * y for x, y in zip(post, pc))


def check_draws(out, lg, z, a_t, a_s, kappa, temperature, top_p, draws, K):
    """Each token against the reference fed with the kernel's uniforms (u_part picks
    the mixture part, u_cat the inverse CDF of the nucleus-filtered p, the uniform
    part's id): exact except within 1e-5 of a boundary of the cumulative sums."""
    u_part, u_cat, uid = draws
    rows = out.numel()
    lgf = lg.float().reshape(rows, K)
    zf, at, as_ = z.reshape(-1).long(), a_t.reshape(-1), a_s.reshape(-1)
    outf = out.reshape(-1).long()
    for r in range(rows):
        ok = False
        for p_top in nucleus_variants(top_p):
            lp = reference.nucleus_filter(torch.log_softmax(lgf[r].double() / temperature, -1), p_top)
            p = lp.exp()
            mz, mp, mu = mixture(float(p[zf[r]]), float(at[r]), float(as_[r]), kappa, K)
            total = mz + mp + mu
            t = float(u_part[r]) * total
            parts = {i for i, edge in enumerate([0.0, mz, mz + mp]) if t >= edge - 1e-9 * total}
            parts &= {i for i, edge in enumerate([mz, mz + mp, total]) if t < edge + 1e-9 * total}
            cum = torch.cumsum(p, 0)
            j = int(outf[r])
            for part in parts:
                if part == 0 and j == int(zf[r]):
                    ok = True
                if part == 2 and j == int(uid[r]):
                    ok = True
                if part == 1 and p[j] > 0:
                    lo = float(cum[j - 1]) if j > 0 else 0.0
                    u = float(u_cat[r])
                    ok = ok or (lo - 1e-5 <= u <= float(cum[j]) + 1e-5)
        assert ok, (r, int(outf[r]), top_p)


def step_draws(emulated, seed, rows, K):
    u_part, u_cat = torch.empty(rows, dtype=F64), torch.empty(rows, dtype=F64)
    uid = torch.empty(rows, dtype=torch.int64)
    for r in range(rows):
        emulated.df_step_draw(ctypes.c_uint64(seed), ctypes.c_uint64(0), ctypes.c_uint64(r), ctypes.c_int64(K),
                              ptr(u_part[r:r + 1]), ptr(u_cat[r:r + 1]), ptr(uid[r:r + 1]))
    return u_part, u_cat, uid


@given(case=step_case(), n_threads=THREADS)
@lean
def test_sample_step(emulated, case, n_threads):
    K, lg, z, a_t, a_s, kappa, temperature, top_p, seed = case
    out = both_thread_counts(n_threads, lambda: duo_fast.sample_step(lg, z, a_t, a_s, kappa=kappa, temperature=temperature,
                                                                     top_p=top_p, seed=seed))
    assert out.shape == z.shape and out.dtype == z.dtype
    at, as_ = _per_tok(a_t, z.shape), _per_tok(a_s, z.shape)
    check_draws(out, lg, z, at, as_, kappa, temperature, top_p, step_draws(emulated, seed, z.numel(), K), K)


@given(case=step_case(), n_threads=THREADS)
@lean
def test_posterior(case, n_threads):
    K, lg, z, a_t, a_s, kappa, temperature, top_p, _ = case
    q = both_thread_counts(n_threads, lambda: duo_fast.posterior(lg, z, a_t, a_s, kappa=kappa, temperature=temperature,
                                                                 top_p=top_p))
    assert q.shape == lg.shape and q.dtype == torch.float32
    check_posterior(q, lg, z, a_t, a_s, kappa, temperature, top_p, 1e-6)
    if q.numel():
        torch.testing.assert_close(q.double().sum(-1), torch.ones(z.shape, dtype=F64), rtol=0, atol=1e-5)


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@EMU
@given(case=step_case(big=False, cap=5000))
@lean
def test_sample_step_and_posterior_emulated(emulated, case):
    K, lg, z, a_t, a_s, kappa, temperature, top_p, seed = case
    n = z.numel()
    lc, zc = lg.reshape(n, K).contiguous(), z.reshape(-1).long().contiguous()
    at, as_ = _per_tok(a_t, z.shape).reshape(-1).contiguous(), _per_tok(a_s, z.shape).reshape(-1).contiguous()
    q, out = torch.empty(n, K), torch.empty(n, dtype=torch.int64)
    code = _DTYPE_CODE[lg.dtype]
    assert emulated.df_emu_posterior(ptr(lc), code, ptr(zc), ptr(at), ptr(as_), ptr(q), ctypes.c_int64(n), ctypes.c_int64(K),
                                     ctypes.c_double(kappa), ctypes.c_double(temperature), ctypes.c_double(top_p)) == 0
    assert emulated.df_emu_sample_step(ptr(lc), code, ptr(zc), ptr(at), ptr(as_), ptr(out), ctypes.c_int64(n),
                                       ctypes.c_int64(K), ctypes.c_double(kappa), ctypes.c_double(temperature),
                                       ctypes.c_double(top_p), ctypes.c_uint64(seed), ctypes.c_uint64(0)) == 0
    check_posterior(q, lc, zc, at, as_, kappa, temperature, top_p, 1e-6)
    check_draws(out, lc, zc, at, as_, kappa, temperature, top_p, step_draws(emulated, seed, n, K), K)


# ---------------------------------------------------------------------------------------
# curriculum_topk, curriculum_topk_embed: against the reference fed with the kernel's draws
# ---------------------------------------------------------------------------------------


def topk_draws(emulated, seed, x0, k, K):
    n = x0.numel()
    x = x0.reshape(-1)
    u = torch.empty(n, k, dtype=F64)
    xi = torch.empty(n, dtype=F64)
    ranks = torch.empty(n, k, dtype=torch.int64)
    for t in range(n):
        emulated.df_topk_draws(ctypes.c_uint64(seed), ctypes.c_uint64(0), ctypes.c_uint64(t), ctypes.c_int64(k),
                               ctypes.c_int64(K), ctypes.c_int64(int(x[t])), ptr(u[t]), ptr(xi[t:t + 1]), ptr(ranks[t]))
    return reference.TopKDraws(u.reshape(*x0.shape, k), xi.reshape(x0.shape), ranks.reshape(*x0.shape, k))


@st.composite
def topk_case(draw, big=True, cap=None, embed=False):
    K = draw(vocab(big=big, cap=cap))
    B, L = draw(lead_shape(K))
    k = min(K - 1, draw(st.sampled_from([1, 2, 3, 17, 64, K - 1 if K <= 5000 else 1000])))
    x0 = draw(ids((B, L), K, "x0"))
    gamma = draw(level(B, L, -6.0, 3.0, "gamma", (-6.0, 0.0, 3.0)))
    inv_tau = draw(st.sampled_from([1.0, 0.5, 10.0]) | level(B, L, 0.5, 100.0, "inv_tau"))
    rule = draw(st.sampled_from(["exact", "reference"]))
    seed = draw(st.integers(0, 2**63 - 1))
    E = None
    if embed:
        d = draw(st.integers(1, 12))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        E = arrange(torch.randn(K, d, generator=g).to(dtype), draw(st.sampled_from(["contiguous", "strided", "transposed"])))
    note(f"K={K} k={k} rule={rule}")
    return K, k, x0, gamma, inv_tau, rule, seed, E


def _ref_topk(emulated, K, k, x0, gamma, inv_tau, rule, seed):
    draws = topk_draws(emulated, seed, x0.long(), k, K)
    return reference.curriculum_topk(x0.long(), gamma, inv_tau, k, K, zt_rule=rule, draws=draws), draws


@given(case=topk_case(), n_threads=THREADS)
@lean
def test_curriculum_topk(emulated, case, n_threads):
    K, k, x0, gamma, inv_tau, rule, seed, _ = case
    ids_, w, z = both_thread_counts(n_threads, lambda: duo_fast.curriculum_topk(x0, gamma, inv_tau, k, K, zt_rule=rule, seed=seed))
    assert ids_.shape == (*x0.shape, k) and ids_.dtype == x0.dtype and z.dtype == x0.dtype and w.dtype == torch.float32
    (r_ids, r_w, r_z), _ = _ref_topk(emulated, K, k, x0, gamma, inv_tau, rule, seed)
    assert torch.equal(ids_.long(), r_ids) and torch.equal(z.long(), r_z)
    torch.testing.assert_close(w.double(), r_w, rtol=1e-6, atol=1e-30)


@given(case=topk_case(embed=True), n_threads=THREADS)
@lean
def test_curriculum_topk_embed(emulated, case, n_threads):
    K, k, x0, gamma, inv_tau, rule, seed, E = case

    def run():
        e = E.detach().clone().requires_grad_()
        h, z = duo_fast.curriculum_topk_embed(x0, gamma, inv_tau, k, e, zt_rule=rule, seed=seed)
        w = torch.linspace(-1, 1, h.numel()).reshape(h.shape).to(h.dtype)
        (h * w).sum().backward()
        return h.detach(), z, e.grad

    h, z, gE = both_thread_counts(n_threads, run)
    assert h.dtype == E.dtype and h.shape == (*x0.shape, E.shape[1]) and z.dtype == x0.dtype
    (r_ids, r_w, r_z), draws = _ref_topk(emulated, K, k, x0, gamma, inv_tau, rule, seed)
    E64 = E.double().requires_grad_()
    r_h, r_z2 = reference.curriculum_topk_embed(x0.long(), gamma, inv_tau, k, E64, zt_rule=rule, draws=draws)
    assert torch.equal(z.long(), r_z) and torch.equal(r_z2, r_z)
    eps = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[E.dtype]
    quantum = 2.0**-24 if E.dtype == torch.float16 else 0.0  # float16's subnormal spacing
    mag = (r_w[..., None].abs() * E64.detach()[r_ids].abs()).sum(-2)
    assert ((h.double() - r_h.detach()).abs() <= eps * (mag + 1e-6) + quantum).all()
    w = torch.linspace(-1, 1, h.numel()).reshape(h.shape).to(h.dtype).double()
    (r_h * w).sum().backward()
    torch.testing.assert_close(gE.double(), E64.grad, rtol=max(eps, 1e-5), atol=max(eps, 1e-5))


@EMU
@given(case=topk_case(big=False, cap=5000, embed=True))
@lean
def test_curriculum_topk_emulated(emulated, case):
    K, k, x0, gamma, inv_tau, rule, seed, E = case
    n = x0.numel()
    x = x0.reshape(-1).long().contiguous()
    g = _per_tok(gamma, x0.shape).reshape(-1).contiguous()
    it = _flat_level(inv_tau, x0.shape)
    ids_, w, z = torch.empty(n, k, dtype=torch.int64), torch.empty(n, k), torch.empty(n, dtype=torch.int64)
    r = ("exact", "reference").index(rule)
    assert emulated.df_emu_curriculum_topk(ptr(x), ptr(g), ptr(it), ptr(ids_), ptr(w), ptr(z), ctypes.c_int64(n),
                                           ctypes.c_int64(k), ctypes.c_int64(K), ctypes.c_int(r), ctypes.c_uint64(seed),
                                           ctypes.c_uint64(0)) == 0
    (r_ids, r_w, r_z), draws = _ref_topk(emulated, K, k, x, g, it, rule, seed)
    assert torch.equal(ids_, r_ids) and torch.equal(z, r_z)
    torch.testing.assert_close(w.double(), r_w, rtol=1e-6, atol=1e-30)
    Ec = E.contiguous()
    d = Ec.shape[1]
    h = torch.empty(n, d)
    ids2, w2, z2 = torch.empty(n, k, dtype=torch.int64), torch.empty(n, k), torch.empty(n, dtype=torch.int64)
    assert emulated.df_emu_curriculum_topk_embed(ptr(x), ptr(g), ptr(it), ptr(Ec), ctypes.c_int(_DTYPE_CODE[E.dtype]),
                                                 ctypes.c_int64(d), ptr(h), ptr(ids2), ptr(w2), ptr(z2), ctypes.c_int64(n),
                                                 ctypes.c_int64(k), ctypes.c_int64(K), ctypes.c_int(r),
                                                 ctypes.c_uint64(seed), ctypes.c_uint64(0)) == 0
    assert torch.equal(ids2, r_ids) and torch.equal(z2, r_z)
    r_h = (r_w[..., None] * Ec.double()[r_ids]).sum(-2)
    mag = (r_w[..., None].abs() * Ec.double()[r_ids].abs()).sum(-2)
    assert ((h.double() - r_h).abs() <= 1e-5 * (mag + 1e-6)).all()
    # the bag's backward, atomic and sorted, against a float64 scatter
    gh = torch.randn(n, d, generator=torch.Generator().manual_seed(seed % 1000))
    want = torch.zeros(K, d, dtype=F64).index_add_(0, r_ids.reshape(-1), (r_w[..., None] * gh.double()[:, None, :]).reshape(-1, d))
    got = torch.zeros(K, d)
    assert emulated.df_emu_topk_bag_backward_atomic(ptr(gh), ptr(ids2), ptr(w2), ptr(got), ctypes.c_int64(n),
                                                    ctypes.c_int64(k), ctypes.c_int64(d), ctypes.c_int64(K)) == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    sorted_ids, order = torch.sort(ids2.reshape(-1), stable=True)
    got = torch.full((K, d), float("nan"))  # every row is written, zero rows included
    assert emulated.df_emu_topk_bag_backward_sorted(ptr(gh), ptr(sorted_ids), ptr(order), ptr(w2), ptr(got),
                                                    ctypes.c_int64(n * k), ctypes.c_int64(k), ctypes.c_int64(d),
                                                    ctypes.c_int64(K)) == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# curriculum_embed: against the dense formula on the kernel's own noise
# ---------------------------------------------------------------------------------------


def curriculum_noise(emulated, seed, n, K):
    eps = torch.empty(n, K)
    for t in range(n):
        emulated.df_curriculum_noise(ctypes.c_uint64(seed), ctypes.c_uint64(0), ctypes.c_uint64(t), ctypes.c_int64(K),
                                     ptr(eps[t]))
    return eps


@st.composite
def embed_case(draw, big=True, cap=None):
    K = draw(vocab(big=big, cap=cap))
    B, L = draw(lead_shape(K, 8))
    x0 = draw(ids((B, L), K, "x0"))
    gamma = draw(level(B, L, -6.0, 3.0, "gamma", (-6.0, 0.0, 3.0)))
    inv_tau = draw(st.sampled_from([1.0, 0.5, 30.0]) | level(B, L, 0.5, 100.0, "inv_tau"))
    d = draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    E = arrange(torch.randn(K, d, generator=g).to(dtype), draw(st.sampled_from(["contiguous", "strided", "transposed"])))
    seed = draw(st.integers(0, 2**63 - 1))
    note(f"K={K} d={d} {dtype}")
    return K, x0, gamma, inv_tau, E, seed


def _dense_ref(emulated, x0, gamma, inv_tau, E, seed):
    K = E.shape[0]
    eps = curriculum_noise(emulated, seed, x0.numel(), K).reshape(*x0.shape, K)
    E64 = E.double().requires_grad_()
    h, z = reference.curriculum_embed_dense(x0.long(), gamma, inv_tau, E64, noise=eps)
    # near-ties of the two largest scores (the kernel's scores are float64 too, but
    # not necessarily summed the same way): z may differ there
    a = torch.sqrt(torch.sigmoid(-_per_tok(torch.as_tensor(gamma), x0.shape)))
    s = torch.sqrt(torch.sigmoid(_per_tok(torch.as_tensor(gamma), x0.shape)))
    w = a[..., None] * torch.nn.functional.one_hot(x0.long(), K).double() + s[..., None] * eps.double()
    top2 = w.topk(min(2, K), -1).values
    tie = (top2[..., 0] - top2[..., -1]).abs() <= 1e-12 if K >= 2 else torch.zeros(x0.shape, dtype=torch.bool)
    return h, z, E64, tie


@given(case=embed_case(), n_threads=THREADS)
@lean
def test_curriculum_embed(emulated, case, n_threads):
    K, x0, gamma, inv_tau, E, seed = case

    def run():
        e = E.detach().clone().requires_grad_()
        h, z = duo_fast.curriculum_embed(x0, gamma, inv_tau, e, seed=seed)
        w = torch.linspace(-1, 1, h.numel()).reshape(h.shape).to(h.dtype)
        (h * w).sum().backward()
        return h.detach(), z, e.grad

    with threads(n_threads):  # h: BLAS GEMMs, whose blocking may depend on the thread count: not bitwise
        h, z, gE = run()
    assert h.dtype == E.dtype and h.shape == (*x0.shape, E.shape[1]) and z.dtype == x0.dtype
    r_h, r_z, E64, tie = _dense_ref(emulated, x0, gamma, inv_tau, E, seed)
    assert ((z.long() == r_z) | tie).all()
    tol = 1e-5 if E.dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(h.double(), r_h.detach(), rtol=tol, atol=tol)
    w = torch.linspace(-1, 1, h.numel()).reshape(h.shape).to(h.dtype).double()
    (r_h * w).sum().backward()
    torch.testing.assert_close(gE.double(), E64.grad, rtol=tol, atol=tol)


@EMU
@given(case=embed_case(big=False, cap=5000))
@lean
def test_curriculum_embed_emulated(emulated, case):
    K, x0, gamma, inv_tau, E, seed = case
    n = x0.numel()
    x = x0.reshape(-1).long().contiguous()
    g = _per_tok(gamma, x0.shape).reshape(-1).contiguous()
    it = _flat_level(inv_tau, x0.shape)
    Ef = E.float().contiguous()
    d = Ef.shape[1]
    h, z, lse = torch.empty(n, d), torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=F64)
    assert emulated.df_emu_curriculum_embed(ptr(x), ptr(g), ptr(it), ptr(Ef), ctypes.c_int64(n), ctypes.c_int64(K),
                                            ctypes.c_int64(d), ctypes.c_uint64(seed), ctypes.c_uint64(0), ptr(h), ptr(z),
                                            ptr(lse)) == 0
    r_h, r_z, E64, tie = _dense_ref(emulated, x, g, it, Ef, seed)
    assert ((z == r_z) | tie).all()
    torch.testing.assert_close(h.double(), r_h.detach(), rtol=1e-5, atol=1e-5)
    dh = torch.randn(n, d, generator=torch.Generator().manual_seed(seed % 1000))
    dE = torch.empty(K, d)
    assert emulated.df_emu_curriculum_embed_backward(ptr(dh), ptr(x), ptr(g), ptr(it), ptr(lse), ctypes.c_int64(n),
                                                     ctypes.c_int64(K), ctypes.c_int64(d), ctypes.c_uint64(seed),
                                                     ctypes.c_uint64(0), ptr(dE)) == 0
    (r_h * dh.double()).sum().backward()
    torch.testing.assert_close(dE.double(), E64.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# generate: the loop over sample_step
# ---------------------------------------------------------------------------------------


@settings(max_examples=fuzz_examples(0.25))
@given(
    K=st.integers(2, 12), B=st.integers(1, 3), L=st.integers(1, 4), steps=st.integers(1, 5),
    schedule=st.sampled_from(["loglinear", "cosine", "duo"]), sampler=st.sampled_from(["ancestral", "psi"]),
    noise_removal=st.sampled_from(["ancestral", "greedy", "none"]), top_p=st.sampled_from([1.0, 0.7]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(0, 2**31 - 1),
)
@lean
def test_generate(K, B, L, steps, schedule, sampler, noise_removal, top_p, dtype, seed):
    # A denoiser that is sure of one sequence: noise removal (ancestral or greedy) lands on it;
    # without noise removal the tokens are in range. The same seed gives the same tokens.
    target = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(seed))
    calls = []

    def denoiser(z, t):
        calls.append(t)
        assert z.shape == (B, L) and t.shape == (B,)
        return (torch.nn.functional.one_hot(target, K).to(dtype) * 60.0)

    kw = dict(steps=steps, schedule=schedule, sampler=sampler, noise_removal=noise_removal, top_p=top_p,
              kappa="max-capped-0.1" if sampler == "psi" else 1.0, progress=False, seed=seed)
    out = duo_fast.generate(denoiser, B, L, K, **kw)
    assert out.shape == (B, L) and out.dtype == torch.int64 and ((out >= 0) & (out < K)).all()
    assert len(calls) == steps + (noise_removal != "none")
    if noise_removal != "none":
        assert torch.equal(out, target)
    assert torch.equal(duo_fast.generate(denoiser, B, L, K, **kw), out)
