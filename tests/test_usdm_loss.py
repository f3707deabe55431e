"""duo_fast.usdm_loss (docs/math.md §3) against the float64 reference (DUO_BASE.nll_per_token
on log_softmax(logits)): values (1e-5 relative + 1e-6 absolute, as the issue
states for float32 logits) and gradients, across K (2, odd, 50257), alpha near 0
and 1, peaked and flat logits, z == x0 and z != x0; perfect-model losses near 0;
op conventions, errors, and the emulated CUDA kernel."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr

ALPHAS = torch.tensor([1e-6, 1e-3, 0.2, 0.5, 0.9, 1 - 1e-4, 1 - 1e-6], dtype=torch.float64)


def _batch(K, L=6, scale=3.0, seed=0, alphas=ALPHAS):
    g = torch.Generator().manual_seed(seed)
    B = alphas.numel()
    logits = torch.randn(B, L, K, generator=g) * scale
    x0 = torch.randint(0, K, (B, L), generator=g)
    noisy = torch.randint(0, K, (B, L), generator=g)
    z = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, noisy)  # both e = 1 and e = 0
    dalpha = -(0.5 + torch.rand(B, generator=g, dtype=torch.float64))
    return logits, z, x0, alphas, dalpha


def _compare(logits, z, x0, alpha, dalpha, device="cpu"):
    # device="cuda": the CUDA kernel (float32 entries, float64 sums) against the same
    # float64 reference, held to its emulated twin's tolerance (1e-4 relative, and 1e-4
    # of the row's largest gradient entry; test_emulated_cuda_kernel_matches_cpu)
    cuda = device != "cpu"
    lg = logits.clone().to(device).requires_grad_()
    loss = duo_fast.usdm_loss(lg, z.to(device), x0.to(device), torch.as_tensor(alpha).to(device),
                              torch.as_tensor(dalpha).to(device)).cpu()
    l64 = logits.double().requires_grad_()
    ref = reference.usdm_loss(l64, z, x0, alpha, dalpha)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4 if cuda else 1e-5, atol=1e-5 if cuda else 1e-6)
    w = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1))
    (loss * w).sum().backward()
    grad = lg.grad.cpu()
    (ref * w.double()).sum().backward()
    # float32 gradient: 1e-5 relative plus 1e-6 of the largest entry among the
    # tokens sharing this alpha, plus the float64 reference's own rounding: its
    # autograd of the reference's form cancels terms of size |dalpha| (1 + r), r = K alpha/(1-alpha),
    # so below ~1e-14 of that it has no correct digits (test_peaked_rows_match_exact_gradient
    # checks such rows against mpmath instead).
    lead = (-1, *([1] * (l64.dim() - 1)))
    scale = l64.grad.abs().flatten(1).amax(1).view(lead)
    a64 = torch.as_tensor(alpha, dtype=torch.float64)
    d64 = torch.as_tensor(dalpha, dtype=torch.float64)
    K = logits.shape[-1]
    ref_err = 1e-14 * (d64.abs() * (1 + K * a64 / (1 - a64)))
    ref_err = ref_err.flatten(1).amax(1).view(lead) if ref_err.dim() > 1 else ref_err.view(lead)
    err = (grad.double() - l64.grad).abs()
    rel, of_scale = (1e-4, 1e-4) if cuda else (1e-5, 1e-6)
    assert (err <= rel * l64.grad.abs() + of_scale * scale + ref_err).all(), (err / (l64.grad.abs() + scale)).max()


@pytest.mark.parametrize("K", [2, 3, 7, 257, 1000, 50257])
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])  # flat, typical, peaked
def test_matches_reference(K, scale, device):
    L = 2 if K == 50257 else 6
    _compare(*_batch(K, L=L, scale=scale, seed=K), device=device)


HALF = [torch.bfloat16, torch.float16]
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _assert_half_grad_close(grad, ref_grad, dtype, rows_ok=None):
    """A gradient written in a 16-bit dtype against the float64 reference's gradient
    of the same (exactly upcast) logits: the kernel's float32 entry (1e-5 relative +
    1e-6 of the row's largest entry, as for float32) rounded once to `dtype`: at
    most half an ulp, 2^-8 relative for bfloat16 (8 significant bits), 2^-11 for
    float16; float16 entries below its smallest normal are rounded to a multiple of
    2^-24 (absolute error 2^-25) and those above its largest value become inf
    (rows whose largest reference entry exceeds half of it are left out, and
    counted by the caller)."""
    assert grad.dtype == dtype
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    lead = (-1,) + (1,) * (ref_grad.dim() - 1) if ref_grad.dim() > 1 else (-1,)
    scale = ref_grad.abs().flatten(1).amax(1).view(lead) if ref_grad.dim() > 1 else ref_grad.abs().amax()
    fits = (scale < torch.finfo(dtype).max / 2).expand_as(ref_grad)
    tiny = 2.0**-25 if dtype == torch.float16 else 0.0
    bound = (eps + 1e-5) * ref_grad.abs() + 1e-6 * scale + tiny
    err = (grad.double() - ref_grad).abs()
    ok = (err <= bound) | ~fits
    if rows_ok is not None:
        ok = ok | ~rows_ok
    assert bool(ok.all()), (err / bound)[fits].max()
    return fits


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("K,scale", [(2, 1.0), (257, 3.0), (1000, 0.1), (1000, 30.0), (50257, 3.0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_half_logits(dtype, K, scale, inplace):
    # 16-bit logits are read natively: the loss on the same (exactly upcast) values
    # within the float32 tolerance; the gradient, written in the logits' dtype, within
    # one rounding of the float32 one (_assert_half_grad_close).
    logits, z, x0, alpha, dalpha = _batch(K, L=1 if K == 50257 else 4, scale=scale, seed=5 + K)
    lg = logits.to(dtype).requires_grad_()
    loss = duo_fast.usdm_loss(lg, z, x0, alpha, dalpha, inplace_grad=inplace)
    l64 = lg.detach().double().requires_grad_()
    ref = reference.usdm_loss(l64, z, x0, alpha, dalpha)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    # grad_output = 1 (.sum()): the stored gradient is rounded once; another
    # grad_output rounds the product to the dtype a second time (test below).
    loss.sum().backward()
    ref.sum().backward()
    # float16: gradients near alpha = 1 overflow (|grad| ~ 1e6); the rows with
    # alpha <= 0.9 must all fit.
    fits = _assert_half_grad_close(lg.grad, l64.grad, dtype)
    assert bool(fits[:5].all())


def _peak_extra_bytes(fn):
    """Peak resident memory of fn() above the resident memory before it (Linux:
    /proc/self/clear_refs resets VmHWM to the current resident set)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = int(open("/proc/self/statm").read().split()[1]) * 4096
    fn()
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    return int(hwm.split()[1]) * 1024 - base


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inplace_grad_peak_memory_is_the_gradient(dtype):
    """inplace_grad=True: forward + backward hold one [N, K] tensor besides the
    logits, the gradient, in the logits' dtype (16-bit logits are read natively:
    no float32 copy, no float32 gradient cast back), so the peak extra memory is
    at most 1.1x the logits' bytes (the rest: per-thread scratch rows of K floats
    and allocator noise). Before 16-bit logits were read natively, bfloat16 cost
    5x its bytes here."""
    N, K = 1024, 50257
    logits, z, x0, alpha, dalpha = _batch(K, L=N // ALPHAS.numel() + 1, scale=3.0, seed=1)
    logits, z, x0 = logits.flatten(0, 1)[:N], z.flatten()[:N], x0.flatten()[:N]
    a = alpha.repeat_interleave(N // ALPHAS.numel() + 1)[:N]
    d = dalpha.repeat_interleave(N // ALPHAS.numel() + 1)[:N]
    lg = logits.to(dtype).requires_grad_()
    del logits
    small = lg[:8].detach().clone().requires_grad_()  # warm up (thread pools, autograd)
    duo_fast.usdm_loss(small, z[:8], x0[:8], a[:8], d[:8], inplace_grad=True).sum().backward()

    def step():
        duo_fast.usdm_loss(lg, z, x0, a, d, inplace_grad=True).sum().backward()

    extra = _peak_extra_bytes(step)
    nbytes = lg.numel() * lg.element_size()
    assert lg.grad is not None and lg.grad.dtype == dtype
    assert extra <= 1.1 * nbytes, f"peak extra {extra / 2**20:.1f} MiB > 1.1 x {nbytes / 2**20:.1f} MiB"


def test_per_token_levels_and_noncontiguous_logits(device):
    K = 33
    logits, z, x0, _, _ = _batch(K, L=5, alphas=torch.zeros(4, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    alpha = 0.01 + 0.98 * torch.rand(4, 5, generator=g, dtype=torch.float64)
    dalpha = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    _compare(logits, z, x0, alpha, dalpha, device=device)
    _compare(logits, z, x0, alpha.float(), dalpha.float(), device=device)
    lt = logits.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not lt.is_contiguous()
    _compare(lt, z, x0, alpha, dalpha, device=device)  # clone().to(device) keeps the strides


def test_peaked_rows_match_exact_gradient():
    """Far below the batch's gradient scale the reference is not exact: check a few
    peaked rows against mpmath (120 digits) through finite differences."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 120

    def exact_loss(lg, zz, xx, a, da):
        K = len(lg)
        lg = [mp.mpf(v) for v in lg]
        a, da = mp.mpf(a), mp.mpf(da)
        m = max(lg)
        lse = m + mp.log(sum(mp.e ** (v - m) for v in lg))
        xb = [K * a * mp.e ** (v - lse) + (1 - a) for v in lg]
        e = 1 if xx == zz else 0
        c = (1 - a) / (K * a + 1 - a)
        t1 = K * (1 / ((1 - a) + K * a * e) - 1 / xb[zz])
        t2 = (-(c * e + (1 - e)) * (sum(mp.log(v) for v in xb) - K * mp.log(xb[zz]))
              - (1 - e) * (K * a / (1 - a)) * (mp.log(xb[xx]) - mp.log(xb[zz]))
              + ((K - 1) * c * e - (1 / c) * (1 - e)) * mp.log(c))
        return da / (K * a) * (t1 - t2)

    rows = [  # logits, z, x0, alpha: peaked (p ~ 1 - 1e-12 .. 1 - 1e-17), e = 0 and 1
        ([-27.2, 10.36], 1, 1, 1e-6), ([-31.7, -3.57], 0, 0, 1e-6), ([-25.4, 15.8], 1, 0, 1e-3),
        ([4.2, 33.6, 1.0], 0, 1, 0.2), ([13.9, -15.0, 0.5], 0, 0, 0.2),
    ]
    for lg, zz, xx, a in rows:
        t = torch.tensor([lg]).unsqueeze(0).requires_grad_()
        loss = duo_fast.usdm_loss(t, torch.tensor([[zz]]), torch.tensor([[xx]]), torch.tensor([a], dtype=torch.float64),
                                  torch.tensor([-0.7], dtype=torch.float64))
        loss.sum().backward()
        h = mp.mpf("1e-40")
        lg32 = [float(v) for v in t.detach()[0, 0]]
        for i in range(len(lg)):
            up = list(map(mp.mpf, lg32)); dn = list(map(mp.mpf, lg32))
            up[i] += h
            dn[i] -= h
            exact = float((exact_loss(up, zz, xx, a, -0.7) - exact_loss(dn, zz, xx, a, -0.7)) / (2 * h))
            assert abs(t.grad[0, 0, i].item() - exact) <= 1e-4 * abs(exact) + 1e-30, (lg, i, t.grad[0, 0, i].item(), exact)
        assert loss.item() == pytest.approx(float(exact_loss(lg32, zz, xx, a, -0.7)), rel=1e-5, abs=1e-7)


def _hard_rows_batch():
    """mp_oracle's hard rows as one [rows, 1] batch per vocabulary size, with the
    80-digit losses and the first-order scale F of each row (below)."""
    import mp_oracle

    by_K = {}
    for logits, z, x, alpha, dalpha in mp_oracle.hard_rows():
        by_K.setdefault(logits.numel(), []).append((logits, z, x, alpha, dalpha))
    for K, rows in by_K.items():
        logits = torch.stack([r[0] for r in rows])[:, None]
        z = torch.tensor([[r[1]] for r in rows])
        x = torch.tensor([[r[2]] for r in rows])
        alpha = torch.tensor([r[3] for r in rows], dtype=torch.float64)
        dalpha = torch.tensor([r[4] for r in rows], dtype=torch.float64)
        exact = torch.tensor([float(mp_oracle.usdm_loss(r[0].double().tolist(), r[1], r[2], r[3], r[4])) for r in rows],
                             dtype=torch.float64)
        # F = |dalpha| K (P_x + [z != x] p_z) / (1 - alpha)^2: the size of the loss's
        # first-order parts, which cancel exactly (docs/math.md §3); a float32 entry
        # (or a float64 one) carries an error of a fixed fraction of F.
        prob = torch.softmax(logits[:, 0].double(), -1)
        P_x = prob.scatter(-1, x, 0.0).sum(-1)
        p_z = prob.gather(-1, z)[:, 0] * (z != x)[:, 0]
        F = dalpha.abs() * K * (P_x + p_z) / (1 - alpha) ** 2
        yield K, logits, z, x, alpha, dalpha, exact, F


LOSS_REL, LOSS_FIRST_ORDER = 1e-5, 1e-8  # the accuracy of docs/math.md §3


def test_hard_rows_against_80_digits(device):
    """Tiny vocabularies, alpha near 0 and 1, near-perfect models (losses down to
    ~1e-32): the kernel's loss is within 1e-5 relative of an 80-digit evaluation of the
    Duo formula, or, for the tiniest losses, within 1e-8 of the first-order scale F
    (the documented bound; both entry paths, float32 and float64)."""
    for K, logits, z, x, alpha, dalpha, exact, F in _hard_rows_batch():
        loss = duo_fast.usdm_loss(logits.to(device), z.to(device), x.to(device), alpha.to(device),
                                  dalpha.to(device))[:, 0].cpu().double()
        err = (loss - exact).abs()
        bad = err > LOSS_REL * exact.abs() + LOSS_FIRST_ORDER * F
        assert not bad.any(), (K, alpha[bad], exact[bad], loss[bad])
        rel_ok = err <= LOSS_REL * exact.abs()
        assert rel_ok[exact > 1e3 * LOSS_FIRST_ORDER * F].all(), K  # relative wherever the loss is not tiny


def test_emulated_cuda_kernel_hard_rows(harness, emulated):
    """The CUDA kernel's source on the same rows and bound as test_hard_rows_against_80_digits."""
    for K, logits, z, x, alpha, dalpha, exact, F in _hard_rows_batch():
        rows = z.numel()
        loss, grad = torch.empty(z.shape), torch.empty_like(logits)
        rc = emulated.df_emu_usdm_loss(ptr(logits), 0, ptr(z), ptr(x), ptr(alpha), ptr(dalpha), ptr(loss), ptr(grad),
                                       ctypes.c_int64(rows), ctypes.c_int64(K))
        assert rc == 0
        err = (loss[:, 0].double() - exact).abs()
        assert (err <= LOSS_REL * exact.abs() + LOSS_FIRST_ORDER * F).all(), K


def test_perfect_model_has_vanishing_loss():
    """p = onehot(x0) (logits +40 at x0): the KL rate is ~0 for every alpha, and the
    fused form keeps it tiny instead of a difference of huge terms."""
    K = 1000
    logits, z, x0, alpha, dalpha = _batch(K, scale=0.0)
    logits.scatter_(-1, x0.unsqueeze(-1), 40.0)
    loss = duo_fast.usdm_loss(logits, z, x0, alpha, dalpha)
    ref = reference.usdm_loss(logits.double(), z, x0, alpha, dalpha)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert (loss[z == x0].abs() < 1e-6).all()


def test_loss_is_nonnegative_rate():
    loss = duo_fast.usdm_loss(*_batch(50, scale=4.0, seed=9))
    assert (loss > -1e-6).all()


def test_gradcheck_float32():
    logits, z, x0, alpha, dalpha = _batch(5, L=2, scale=1.0, seed=4, alphas=torch.tensor([0.3, 0.7], dtype=torch.float64))
    lg = logits.clone().requires_grad_()
    with pytest.warns(UserWarning):  # float32 inputs
        assert torch.autograd.gradcheck(
            lambda t: duo_fast.usdm_loss(t, z, x0, alpha, dalpha), (lg,), eps=1e-2, atol=5e-3, rtol=2e-2
        )


def test_no_grad_and_compile():
    logits, z, x0, alpha, dalpha = _batch(17, L=3)
    with torch.no_grad():
        out = duo_fast.usdm_loss(logits.requires_grad_(), z, x0, alpha, dalpha)
    assert not out.requires_grad

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(lg):
        return duo_fast.usdm_loss(lg, z, x0, alpha, dalpha).sum()

    lg = logits.detach().clone().requires_grad_()
    f(lg).backward()
    lg2 = logits.detach().clone().requires_grad_()
    duo_fast.usdm_loss(lg2, z, x0, alpha, dalpha).sum().backward()
    torch.testing.assert_close(lg.grad, lg2.grad)


def test_opcheck():
    logits, z, x0, alpha, dalpha = _batch(9, L=3, alphas=torch.tensor([0.2, 0.6], dtype=torch.float64))
    a = alpha[:, None].expand(2, 3).contiguous()
    d = dalpha[:, None].expand(2, 3).contiguous()
    torch.library.opcheck(torch.ops.duo_fast.usdm_loss.default, (logits, z, x0, a, d, False))
    torch.library.opcheck(torch.ops.duo_fast.usdm_loss.default, (logits.clone().requires_grad_(), z, x0, a, d, True))
    for dtype in HALF:  # read natively, gradient in the logits' dtype
        lh = logits.to(dtype)
        torch.library.opcheck(torch.ops.duo_fast.usdm_loss.default, (lh, z, x0, a, d, False))
        torch.library.opcheck(torch.ops.duo_fast.usdm_loss.default, (lh.clone().requires_grad_(), z, x0, a, d, True))
    for lt in (logits, logits.to(torch.bfloat16)):
        torch.library.opcheck(torch.ops.duo_fast.usdm_loss.into, (lt, z, x0, a, d, torch.empty_like(lt)))


def test_into_writes_the_gradient_into_the_given_tensor():
    # usdm_loss.into (the fused linear ops' chunks reuse one gradient block): the
    # loss and the gradient written into grad, against the float64 reference (the
    # tolerances of _compare for moderate alpha: 1e-5 relative, 1e-6 of the row
    # scale); the whole of grad is written (it starts as NaN).
    logits, z, x0, alpha, dalpha = _batch(1000, L=5, alphas=torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64))
    a, d = alpha[:, None].expand(z.shape).contiguous(), dalpha[:, None].expand(z.shape).contiguous()
    grad = torch.full_like(logits, math.nan)
    loss = torch.ops.duo_fast.usdm_loss.into(logits, z, x0, a, d, grad)
    l64 = logits.double().requires_grad_()
    ref = reference.usdm_loss(l64, z, x0, alpha, dalpha)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    ref.sum().backward()
    scale = l64.grad.abs().amax()
    assert ((grad.double() - l64.grad).abs() <= 1e-5 * l64.grad.abs() + 1e-6 * scale).all()
    for dtype in HALF:  # the gradient in the logits' dtype, as the default overload
        gh = torch.empty(logits.shape, dtype=dtype)
        torch.ops.duo_fast.usdm_loss.into(logits.to(dtype), z, x0, a, d, gh)
        want = torch.ops.duo_fast.usdm_loss(logits.to(dtype), z, x0, a, d, True)[1]
        assert torch.equal(gh, want)


@pytest.mark.parametrize("bad,match", [
    (lambda l: torch.empty(l.shape[0], l.shape[1], l.shape[2] + 1), "grad must have logits's shape"),
    (lambda l: torch.empty(l.shape, dtype=torch.bfloat16), "grad must have logits's dtype"),
    (lambda l: torch.empty(l.shape[2], l.shape[1], l.shape[0]).permute(2, 1, 0), "grad must be contiguous"),
    (lambda l: l, "grad shares memory with logits"),
])
def test_into_checks_grad(bad, match):
    logits, z, x0, alpha, dalpha = _batch(10, L=3, alphas=torch.tensor([0.2, 0.6], dtype=torch.float64))
    a, d = alpha[:, None].expand(z.shape).contiguous(), dalpha[:, None].expand(z.shape).contiguous()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.duo_fast.usdm_loss.into(logits, z, x0, a, d, bad(logits))


def test_into_takes_strided_inputs_in_other_storage():
    # z, x0 as stride-2 views and logits a slice of a padded tensor: no memory in
    # common with grad, so accepted (the kernel reads contiguous copies); the same
    # loss and gradient as on contiguous inputs, which the test above checks
    # against the reference.
    logits, z, x0, alpha, dalpha = _batch(50, L=4, alphas=torch.tensor([0.3, 0.7], dtype=torch.float64))
    a, d = alpha[:, None].expand(z.shape).contiguous(), dalpha[:, None].expand(z.shape).contiguous()
    padded = torch.cat([logits, torch.zeros(*logits.shape[:-1], 3)], -1)[..., :50]
    zz, xx = torch.stack([z, z], -1)[..., 0], torch.stack([x0, x0], -1)[..., 0]
    g1, g2 = torch.empty_like(logits), torch.empty_like(logits)
    l1 = torch.ops.duo_fast.usdm_loss.into(padded, zz, xx, a, d, g1)
    l2 = torch.ops.duo_fast.usdm_loss.into(logits, z, x0, a, d, g2)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_bad_inputs_name_the_argument():
    logits, z, x0, alpha, dalpha = _batch(10, L=3, alphas=torch.tensor([0.2, 0.6], dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"z holds token ids in \[.*\], outside \[0, vocab_size\) = \[0, 10\)"):
        duo_fast.usdm_loss(logits, z + 10, x0, alpha, dalpha)
    with pytest.raises(RuntimeError, match="x0 holds token ids"):
        duo_fast.usdm_loss(logits, z, x0 - 11, alpha, dalpha)
    with pytest.raises(RuntimeError, match=r"alpha must be in \(0, 1\)"):
        duo_fast.usdm_loss(logits, z, x0, torch.tensor([0.0, 0.5], dtype=torch.float64), dalpha)
    with pytest.raises(RuntimeError, match=r"alpha must be in \(0, 1\)"):
        duo_fast.usdm_loss(logits, z, x0, torch.tensor([1.0, 0.5], dtype=torch.float64), dalpha)
    with pytest.raises(RuntimeError, match="dalpha must be <= 0"):
        duo_fast.usdm_loss(logits, z, x0, alpha, -dalpha)
    with pytest.raises(ValueError, match=r"z has shape \(2, 4\)"):
        duo_fast.usdm_loss(logits, torch.zeros(2, 4, dtype=torch.int64), x0, alpha, dalpha)
    with pytest.raises(ValueError, match="alpha has shape"):
        duo_fast.usdm_loss(logits, z, x0, torch.full((3,), 0.5), dalpha)
    with pytest.raises(TypeError, match="logits has dtype float64"):  # float64: use the reference
        duo_fast.usdm_loss(logits.double(), z, x0, alpha, dalpha)
    with pytest.raises(TypeError, match="z has dtype int16"):  # int32 is taken (test_bad_values.py)
        duo_fast.usdm_loss(logits, z.short(), x0, alpha, dalpha)
    with pytest.raises(ValueError, match="vocabulary size"):
        duo_fast.usdm_loss(logits[..., :1], z * 0, x0 * 0, alpha, dalpha)


# ---- the CUDA kernel's own source on the CPU ----


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 5), ("thread", 0)])
def test_emulated_cuda_kernel_matches_reference(harness, emulated, mode, seed):
    """The CUDA kernel (float32 entries with the CPU's float64 row switch, 16-byte
    loads with a misaligned head for odd K) against the float64 reference with the
    float32 tolerance of _compare: ALPHAS take both entry paths (alpha = 1 - 1e-4
    and 1 - 1e-6 the float64 one), K = 1001 and 50257 rows start off 16-byte
    boundaries, and the scales give flat, typical and peaked rows."""
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        cases = [(2, 1.0), (1001, 3.0), (1001, 30.0), (1000, 0.1), (50257, 2.0)]
        for K, scale in cases if mode == "fiber" else cases[:2]:
            logits, z, x0, alpha, dalpha = _batch(K, L=1 if K == 50257 else 3, scale=scale, seed=seed + K)
            rows = z.numel()
            a = alpha[:, None].expand(z.shape).contiguous()
            d = dalpha[:, None].expand(z.shape).contiguous()
            loss, grad = torch.empty(z.shape), torch.empty_like(logits)
            rc = emulated.df_emu_usdm_loss(ptr(logits), 0, ptr(z), ptr(x0), ptr(a), ptr(d), ptr(loss), ptr(grad),
                                           ctypes.c_int64(rows), ctypes.c_int64(K))
            assert rc == 0
            l64 = logits.double().requires_grad_()
            ref = reference.usdm_loss(l64, z, x0, alpha, dalpha)
            ref.sum().backward()
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            scale_g = l64.grad.abs().amax(-1, keepdim=True)
            ref_err = (1e-14 * dalpha.abs() * (1 + K * alpha / (1 - alpha))).view(-1, 1, 1)
            err = (grad.double() - l64.grad).abs()
            assert (err <= 1e-5 * l64.grad.abs() + 1e-6 * scale_g + ref_err).all(), (err / (l64.grad.abs() + scale_g)).max()
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("thread", 1)])
def test_emulated_cuda_kernel_half_logits(harness, emulated, dtype, mode, seed):
    """The CUDA kernel on 16-bit logits (read natively, gradient in their dtype)
    against the float64 reference on the upcast logits: the loss within the
    float32 tolerance, the gradient within one rounding (_assert_half_grad_close)."""
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        for K, scale, offset in [(2, 1.0, 0), (1001, 3.0, 0), (1001, 3.0, 3), (50257, 2.0, 1)]:
            logits, z, x0, alpha, dalpha = _batch(K, L=1 if K == 50257 else 3, scale=scale, seed=seed + K)
            # offset: the logits start `offset` entries into their buffer, so the gradient
            # (a fresh buffer) has another alignment modulo 16 bytes: the kernel's
            # one-entry stores instead of 16-byte ones
            buf = torch.empty(logits.numel() + offset, dtype=dtype)
            lh = buf[offset:].view(logits.shape)
            lh.copy_(logits)
            a = alpha[:, None].expand(z.shape).contiguous()
            d = dalpha[:, None].expand(z.shape).contiguous()
            loss, grad = torch.empty(z.shape), torch.empty_like(lh)
            rc = emulated.df_emu_usdm_loss(ptr(lh), DTYPE_CODE[dtype], ptr(z), ptr(x0), ptr(a), ptr(d), ptr(loss),
                                           ptr(grad), ctypes.c_int64(z.numel()), ctypes.c_int64(K))
            assert rc == 0
            l64 = lh.double().requires_grad_()
            ref = reference.usdm_loss(l64, z, x0, alpha, dalpha)
            ref.sum().backward()
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            fits = _assert_half_grad_close(grad, l64.grad, dtype)
            assert bool(fits[:5].all())
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernel_matches_cpu runs this kernel's source on the CPU")
def test_cuda_device_matches_cpu():
    logits, z, x0, alpha, dalpha = _batch(50257, L=4, seed=2)
    lc = logits.cuda().requires_grad_()
    loss = duo_fast.usdm_loss(lc, z.cuda(), x0.cuda(), alpha.cuda(), dalpha.cuda())
    loss.sum().backward()
    lr = logits.clone().requires_grad_()
    ref = duo_fast.usdm_loss(lr, z, x0, alpha, dalpha)
    ref.sum().backward()
    torch.testing.assert_close(loss.cpu(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lc.grad.cpu(), lr.grad, rtol=1e-4, atol=1e-4 * lr.grad.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernel_half_logits runs this kernel's source on the CPU")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_device_half_logits(dtype, inplace):
    """The real-GPU twin of test_emulated_cuda_kernel_half_logits: 16-bit logits read
    natively on the device, against the reference on the upcast values."""
    logits, z, x0, alpha, dalpha = _batch(50257, L=2, scale=3.0, seed=7)
    lc = logits.to(dtype).cuda().requires_grad_()
    loss = duo_fast.usdm_loss(lc, z.cuda(), x0.cuda(), alpha.cuda(), dalpha.cuda(), inplace_grad=inplace)
    loss.sum().backward()
    l64 = lc.detach().cpu().double().requires_grad_()
    ref = reference.usdm_loss(l64, z, x0, alpha, dalpha)
    ref.sum().backward()
    torch.testing.assert_close(loss.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    fits = _assert_half_grad_close(lc.grad.cpu(), l64.grad, dtype)
    assert bool(fits[:5].all())


@pytest.mark.parametrize("masked", [True, False])
def test_clean_token_without_probability_in_a_flat_row(masked):
    # Regression (found by tests/test_fuzz.py's long profile): z == x0 and the model gives
    # that token ~0 probability (masked, or a logit far below the rest) in a near-flat row.
    # The gradient brackets C - p_j q_j were then the spread of p_j q_j around its mean and
    # cancelled in float (errors up to ~2e-5 of the row's largest entry); such rows (C > 0)
    # now take the float64 entries: 1e-5 relative + 1e-6 of the largest entry again.
    g = torch.Generator().manual_seed(3)
    N, K = 64, 37
    logits = torch.randn(N, K, generator=g) * 0.01
    x0 = torch.randint(0, K, (N,), generator=g)
    logits[torch.rand(N, K, generator=g) < 0.3] = -math.inf
    logits[torch.arange(N), (x0 + 1) % K] = 0.0
    logits[torch.arange(N), x0] = -math.inf if masked else -40.0
    alpha = 0.5 + 0.49 * torch.rand(N, generator=g, dtype=torch.float64)
    dalpha = -torch.rand(N, generator=g, dtype=torch.float64)
    lg = logits.clone().requires_grad_()
    loss = duo_fast.usdm_loss(lg, x0, x0, alpha, dalpha)
    loss.sum().backward()
    l64 = logits.double().requires_grad_()
    ref = reference.usdm_loss(l64, x0, x0, alpha, dalpha)
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    scale = l64.grad.abs().amax(-1, keepdim=True)
    assert ((lg.grad.double() - l64.grad).abs() <= 1e-5 * l64.grad.abs() + 1e-6 * scale).all()
    # the same loss bits without the gradient (the fuzzer caught the first version of the
    # fix taking the float64 entries only when the gradient was asked for)
    with torch.no_grad():
        assert torch.equal(duo_fast.usdm_loss(logits, x0, x0, alpha, dalpha), loss.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inplace_grad_of_half_logits_rounds_once(dtype):
    # Regression (found by tests/test_fuzz.py): with 16-bit logits the in-place backward
    # cast grad_output to the logits' dtype before scaling, a third rounding that the
    # out-of-place path does not make (errors up to 3/2 ulp). Both now give the same bits.
    K = 255
    logits, z, x0, alpha, dalpha = _batch(K, L=5, seed=4)
    logits = logits.to(dtype)
    w = torch.linspace(0.5, 1.5, alpha.numel() * 5).reshape(alpha.numel(), 5)  # not representable in 16 bits
    grads = []
    for inplace in (False, True):
        lg = logits.clone().requires_grad_()
        (duo_fast.usdm_loss(lg, z, x0, alpha, dalpha, inplace_grad=inplace) * w).sum().backward()
        grads.append(lg.grad)
    assert grads[1].dtype == dtype and torch.equal(grads[0], grads[1])


def test_inplace_grad_matches_and_runs_once():
    K = 101
    logits, z, x0, alpha, dalpha = _batch(K, L=3, seed=9)
    w = torch.randn(alpha.numel(), 3, generator=torch.Generator().manual_seed(0))
    a = logits.clone().requires_grad_()
    (duo_fast.usdm_loss(a, z, x0, alpha, dalpha) * w).sum().backward()
    for weights in (w, None):  # any grad_output, and the broadcast 1 of .sum()
        b = logits.clone().requires_grad_()
        loss = duo_fast.usdm_loss(b, z, x0, alpha, dalpha, inplace_grad=True)
        (loss * weights if weights is not None else loss).sum().backward(retain_graph=True)
        if weights is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="supports a single backward"):
            loss.sum().backward()
