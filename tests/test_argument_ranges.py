"""Arguments that were accepted and gave wrong or non-finite results now raise up
front, naming the argument, what was expected and what was given (issue 24):
tensors on mixed devices (every tensor argument of every op, wrappers and the
fused linear loss included), float arguments outside the range where the
kernels' float32 math is defined (temperature, inv_tau, dalpha), linear_usdm_loss's
dtypes, generate's meaningless arguments, check_device_errors without CUDA. The
values just inside each range are checked against the float64 reference or a
closed-form limit."""

from __future__ import annotations

import ctypes
import math
import re

import pytest
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr

FLT_MAX = float(torch.finfo(torch.float32).max)
FLT_TINY = float(torch.finfo(torch.float32).tiny)
K = 11
Z = torch.tensor([[0, 3, 5], [2, 2, 9]])
X0 = torch.tensor([[0, 4, 5], [7, 2, 1]])


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# devices: every tensor argument against the first
# ---------------------------------------------------------------------------------------


def _op_cases():
    g = _g(1)
    lg, a, d = torch.randn(2, 3, K, generator=g), torch.tensor([0.3, 0.7]), -torch.ones(2)
    lv = dict(gamma=torch.tensor([0.5, 1.0], dtype=torch.float64), inv_tau=torch.tensor([2.0, 3.0]))
    E = torch.randn(K, 4, generator=g)
    return {
        "usdm_loss": (lambda t: duo_fast.usdm_loss(t["logits"], t["z"], t["x0"], t["alpha"], t["dalpha"]),
                      dict(logits=lg, z=Z, x0=X0, alpha=a, dalpha=d)),
        "linear_usdm_loss": (lambda t: duo_fast.linear_usdm_loss(t["hidden"], t["weight"], t["bias"], t["z"], t["x0"],
                                                                 t["alpha"], t["dalpha"]),
                             dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(K, 4), bias=torch.randn(K), z=Z, x0=X0,
                                  alpha=a, dalpha=d)),
        "distill_kl": (lambda t: duo_fast.distill_kl(t["student_logits"], t["teacher_logits"]),
                       dict(student_logits=lg, teacher_logits=lg + 1)),
        "linear_distill_kl": (lambda t: duo_fast.linear_distill_kl(t["student_hidden"], t["weight"], t["bias"],
                                                                   t["teacher_hidden"], t["teacher_weight"],
                                                                   t["teacher_bias"]),
                              dict(student_hidden=torch.randn(2, 3, 4), weight=torch.randn(K, 4), bias=torch.randn(K),
                                   teacher_hidden=torch.randn(2, 3, 5), teacher_weight=torch.randn(K, 5),
                                   teacher_bias=torch.randn(K))),
        "linear_sample_step": (lambda t: duo_fast.linear_sample_step(t["hidden"], t["weight"], t["bias"], t["z"],
                                                                     t["alpha_t"], t["alpha_s"], seed=1),
                               dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(K, 4), bias=torch.randn(K), z=Z,
                                    alpha_t=a * 0.5, alpha_s=a)),
        "sample_step": (lambda t: duo_fast.sample_step(t["logits"], t["z"], t["alpha_t"], t["alpha_s"], seed=1),
                        dict(logits=lg, z=Z, alpha_t=a * 0.5, alpha_s=a)),
        "posterior": (lambda t: duo_fast.posterior(t["logits"], t["z"], t["alpha_t"], t["alpha_s"]),
                      dict(logits=lg, z=Z, alpha_t=a * 0.5, alpha_s=a)),
        "sample_zt": (lambda t: duo_fast.sample_zt(t["x0"], t["gamma"], K, gamma_s=t["gamma_s"], seed=1),
                      dict(x0=X0, gamma=lv["gamma"], gamma_s=lv["gamma"] - 1)),
        "curriculum_embed": (lambda t: duo_fast.curriculum_embed(t["x0"], t["gamma"], t["inv_tau"], t["embedding"],
                                                                 seed=1),
                             dict(x0=X0, embedding=E, **lv)),
        "curriculum_topk": (lambda t: duo_fast.curriculum_topk(t["x0"], t["gamma"], t["inv_tau"], 3, K, seed=1),
                            dict(x0=X0, **lv)),
        "curriculum_topk_embed": (lambda t: duo_fast.curriculum_topk_embed(t["x0"], t["gamma"], t["inv_tau"], 3,
                                                                           t["embedding"], seed=1),
                                  dict(x0=X0, embedding=E, **lv)),
        "canvas_step": (lambda t: duo_fast.canvas_step(t["logits"], temperature=t["temperature"], seed=1),
                        dict(logits=lg, temperature=torch.tensor([0.5, 2.0]))),
        "softmax_embed": (lambda t: duo_fast.softmax_embed(t["logits"], t["embedding"], temperature=t["temperature"]),
                          dict(logits=lg, embedding=E, temperature=torch.tensor([0.5, 2.0]))),
    }


@pytest.mark.parametrize("op,arg", [(op, arg) for op, (_, args) in _op_cases().items() for arg in args])
def test_a_tensor_on_another_device_is_named(op, arg):
    call, args = _op_cases()[op]
    call(args)  # all on the CPU: fine
    moved = dict(args, **{arg: args[arg].to("meta")})
    with pytest.raises(ValueError, match=r"is on (meta|cpu), expected (cpu|meta) \(the device of \w+\): every tensor "
                                         "argument must be on one device") as e:
        call(moved)
    assert re.search(rf"\b{arg}\b", str(e.value)), str(e.value)


def test_linear_usdm_loss_with_a_meta_weight_raises():
    """It returned numbers read from uninitialized memory."""
    z = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight is on meta, expected cpu \(the device of hidden\)"):
        duo_fast.linear_usdm_loss(torch.randn(2, 3, 4), torch.randn(11, 4, device="meta"), None, z, z,
                                  torch.full((2,), 0.5), -torch.ones(2))


# ---------------------------------------------------------------------------------------
# float32 range: temperature
# ---------------------------------------------------------------------------------------

T_MIN, T_MAX = 1.0 / FLT_MAX, 1.0 / FLT_TINY


@pytest.mark.parametrize("T", [1e-40, 1e-300, 1e46, 1e300, 0.0, math.inf, math.nan])
@pytest.mark.parametrize("op", ["sample_step", "posterior"])
def test_temperature_outside_float32_is_named(op, T):
    lg = torch.randn(2, 3, K, generator=_g(2))
    kw = dict(seed=1) if op == "sample_step" else {}
    with pytest.raises(ValueError, match=r"temperature must be in \[2.939e-39, 8.507e\+37\] \(1/temperature scales "
                                         r"the logits in float32: a finite, normal float32\), got"):
        getattr(duo_fast, op)(lg, Z, torch.tensor([0.2, 0.3]), torch.tensor([0.5, 0.6]), temperature=T, **kw)
    # the raw op (C++ check): the same range, named
    a_t = torch.full((2, 3), 0.2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="temperature must be in"):
        torch.ops.duo_fast.posterior(lg, Z, a_t, a_t + 0.3, 1.0, T, 1.0)


CANVAS_OPS = {
    "canvas_step": lambda lg, T: duo_fast.canvas_step(lg, temperature=T, seed=1),
    "softmax_embed": lambda lg, T: duo_fast.softmax_embed(lg, torch.eye(K), temperature=T),
}


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("T", [1e-40, 1e-300, 1e46, 1e300, 0.0, -1.0, math.inf, math.nan])
@pytest.mark.parametrize("op", list(CANVAS_OPS))
def test_canvas_temperature_outside_float32_is_named(op, T, per_row):
    """1/T scales the logits in float32 there too (T = 1e-40 gave NaN entropies)."""
    lg = torch.randn(2, 3, K, generator=_g(2))
    temp = torch.tensor([[1.0, T, 0.5], [2.0, 1.0, 1.0]], dtype=torch.float64) if per_row else T
    match = (r"temperature must be in \[2.939e-39, 8.507e\+37\] \(1/temperature scales the logits in float32: a "
             r"finite, normal float32\), got" if not per_row else
             r"temperature must be in \[2.93874e-39, 8.50706e\+37\] \(1/temperature scales the logits in float32")
    with pytest.raises((ValueError, RuntimeError), match=match):
        CANVAS_OPS[op](lg, temp)


@pytest.mark.parametrize("T", [T_MIN * 1.001, T_MAX * 0.999])
def test_canvas_temperature_at_the_ends_of_float32_is_the_limit(T):
    """T just above 1/FLT_MAX: the argmax (a point mass, entropy 0); just below
    1/FLT_MIN: uniform over the unmasked ids (entropy log(K - 1)); as the float64
    reference's limits."""
    lg = torch.randn(2, 3, K, generator=_g(3)) * 3
    lg[..., 4] = -math.inf
    sample, arg, ent = duo_fast.canvas_step(lg, temperature=T, seed=5)
    torch.testing.assert_close(ent.double(), reference.canvas_entropy(lg, T).float().double(), rtol=1e-5, atol=1e-6)
    assert (arg == lg.argmax(-1)).all() and (sample != 4).all()
    if T < 1:
        assert (sample == arg).all() and (ent == 0).all()
    else:
        torch.testing.assert_close(ent, torch.full_like(ent, math.log(K - 1)), rtol=1e-6, atol=0)
    h = duo_fast.softmax_embed(lg, torch.eye(K, dtype=torch.float64).float(), temperature=T)
    torch.testing.assert_close(h.double(), reference.softmax_embed(lg, torch.eye(K), temperature=T), rtol=0, atol=1e-6)


@pytest.mark.parametrize("T", [T_MIN * 1.001, T_MAX * 0.999])
def test_temperature_at_the_ends_of_float32_matches_the_reference(T):
    """logits / T was NaN (T tiny: 0 * inf at the row's max) or a masked logit was NaN
    (T huge: -inf * 0); now the limits: the argmax, and uniform over the unmasked ids."""
    lg = torch.randn(2, 3, K, generator=_g(3)) * 3
    lg[..., 4] = -math.inf
    a_t, a_s = torch.tensor([0.2, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.6], dtype=torch.float64)
    q = duo_fast.posterior(lg, Z, a_t, a_s, temperature=T)
    ref = reference.posterior(lg, Z, a_t, a_s, temperature=T)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-6)
    draws = duo_fast.sample_step(lg, Z, a_t, a_s, temperature=T, seed=5)
    assert (q.gather(-1, draws[..., None]) > 0).all()


# ---------------------------------------------------------------------------------------
# float32 range: inv_tau (the curriculum scales the noise by it in float32)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inv_tau", [1e39, 1e100, 1e300])
@pytest.mark.parametrize("op", ["curriculum_embed", "curriculum_topk", "curriculum_topk_embed"])
def test_inv_tau_beyond_float32_is_named(op, inv_tau):
    """It gave NaN embeddings above 3.4e38."""
    E = torch.randn(K, 4, generator=_g(4))
    call = {
        "curriculum_embed": lambda it: duo_fast.curriculum_embed(X0, 0.0, it, E, seed=1),
        "curriculum_topk": lambda it: duo_fast.curriculum_topk(X0, 0.0, it, 3, K, seed=1),
        "curriculum_topk_embed": lambda it: duo_fast.curriculum_topk_embed(X0, 0.0, it, 3, E, seed=1),
    }[op]
    for it in (inv_tau, torch.tensor([1.0, inv_tau], dtype=torch.float64)):
        with pytest.raises(RuntimeError, match=r"inv_tau must be finite and > 0, at most 3.40282e\+38 \(the largest "
                                               r"float32"):
            call(it)


@pytest.mark.parametrize("gamma", [-5.0, 0.0, 5.0, 1e300])
def test_inv_tau_at_float32_max_is_the_argmax_limit(gamma):
    """softmax(w inv_tau) -> the one-hot of argmax w = z_t: h = embedding[z_t]."""
    E = torch.randn(K, 4, generator=_g(5))
    h, z_t = duo_fast.curriculum_embed(X0, gamma, FLT_MAX, E, seed=2)
    torch.testing.assert_close(h, E[z_t], rtol=0, atol=1e-6)
    _, w, _ = duo_fast.curriculum_topk(X0, gamma, FLT_MAX, 3, K, seed=2)
    assert torch.isfinite(w).all() and bool(((w == 0) | (w == 1)).all()) and bool((w.sum(-1) <= 1).all())


# ---------------------------------------------------------------------------------------
# float32 range: dalpha (the loss is a float32 number)
# ---------------------------------------------------------------------------------------

DALPHA_MSG = r"dalpha must be finite and small enough that the loss is a float32: expected \|dalpha\| <= "


@pytest.mark.parametrize("alpha,dalpha", [(0.5, -math.inf), (1e-300, -1e38), (1e-30, -1e300), (0.5, -1e300),
                                          (1 - 1e-8, -1e38)])
def test_dalpha_beyond_a_float32_loss_is_named(alpha, dalpha):
    """These gave inf and NaN losses (the weight dalpha / (K alpha) overflowed)."""
    lg = torch.randn(2, 3, K, generator=_g(6)).requires_grad_()
    a, d = torch.full((2,), alpha, dtype=torch.float64), torch.full((2,), dalpha, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=DALPHA_MSG + ".*got dalpha = -"):
        duo_fast.usdm_loss(lg, Z, X0, a, d)
    with pytest.raises(RuntimeError, match=DALPHA_MSG):
        duo_fast.linear_usdm_loss(torch.randn(2, 3, 4), torch.randn(K, 4), None, Z, X0, a, d)


@pytest.mark.parametrize("vocab", [11, 1000])
@pytest.mark.parametrize("alpha", [1e-300, 1e-30, 1e-3, 0.5, 1 - 1e-6, 1 - 1e-12])
def test_dalpha_at_the_edge_of_the_range_gives_finite_values(vocab, alpha):
    """The largest accepted |dalpha| (read from the error message) on flat and peaked
    rows: a finite loss and gradient; where 80 digits resolve the loss (alpha not
    tiny: below ~1e-3 its terms cancel to O(alpha^2)), the mpmath oracle's value
    (the float64 reference is off by 1% at alpha = 1 - 1e-12), and the reference's
    gradient where it is accurate."""
    g = _g(7)
    lg = torch.randn(4, vocab, generator=g) * torch.tensor([[0.0], [1.0], [10.0], [40.0]])
    z, x0 = torch.tensor([1, 2, 3, 3]), torch.tensor([1, 5, 3, 0])
    a = torch.full((4,), alpha, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=DALPHA_MSG) as e:
        duo_fast.usdm_loss(lg, z, x0, a, torch.full((4,), -1e307, dtype=torch.float64))
    limit = float(re.search(r"expected \|dalpha\| <= ([0-9.e+-]+)", str(e.value)).group(1))
    d = torch.full((4,), -limit * 0.999, dtype=torch.float64)
    lgr = lg.clone().requires_grad_()
    loss = duo_fast.usdm_loss(lgr, z, x0, a, d)
    (grad,) = torch.autograd.grad(loss.sum(), lgr)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    if alpha < 1e-3:
        return
    pytest.importorskip("mpmath")
    import mp_oracle

    want = torch.tensor([float(mp_oracle.usdm_loss(lg[i].tolist(), int(z[i]), int(x0[i]), alpha, float(d[i])))
                         for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7 * limit)
    if alpha <= 0.5:
        l64 = lg.double().requires_grad_()
        (gref,) = torch.autograd.grad(reference.usdm_loss(l64, z, x0, a, d).sum(), l64)
        gref = gref.detach()
        torch.testing.assert_close(grad.detach().double(), gref, rtol=2e-4, atol=2e-4 * float(gref.abs().max()))


def test_emulated_cuda_kernels_count_the_range_violations(emulated):
    """The device-side checks use the same predicates: the row is NaN and counted."""
    from test_bad_values import CHECK, _take

    _take(emulated)
    rows, vocab = 3, 300
    logits = torch.randn(rows, vocab, generator=_g(8))
    z, x0 = torch.tensor([1, 2, 3]), torch.tensor([1, 5, 3])
    a = torch.tensor([0.3, 0.5, 1e-300], dtype=torch.float64)
    d = torch.tensor([-1.0, -math.inf, -1e38], dtype=torch.float64)
    loss, grad = torch.empty(rows), torch.empty(rows, vocab)
    assert emulated.df_emu_usdm_loss(ptr(logits), 0, ptr(z), ptr(x0), ptr(a), ptr(d), ptr(loss), ptr(grad),
                                     ctypes.c_int64(rows), ctypes.c_int64(vocab)) == 0
    c = _take(emulated)
    assert c[CHECK["dalpha"]] == 2 and c.sum() == 2, c
    assert loss[1:].isnan().all() and grad[1:].isnan().all()
    torch.testing.assert_close(loss[0].double(), reference.usdm_loss(logits[:1].double(), z[:1], x0[:1], a[:1], d[:1])[0],
                               rtol=1e-4, atol=1e-6)
    n, k = 4, 3
    x = torch.tensor([1, 2, 3, 4])
    gam = torch.zeros(n, dtype=torch.float64)
    it = torch.tensor([1.0, 1e39, FLT_MAX, 2.0], dtype=torch.float64)
    ids, w, zt = torch.empty(n, k, dtype=torch.int64), torch.empty(n, k), torch.empty(n, dtype=torch.int64)
    assert emulated.df_emu_curriculum_topk(ptr(x), ptr(gam), ptr(it), ptr(ids), ptr(w), ptr(zt), ctypes.c_int64(n),
                                           ctypes.c_int64(k), ctypes.c_int64(vocab), 0, ctypes.c_uint64(3),
                                           ctypes.c_uint64(0)) == 0
    c = _take(emulated)
    assert c[CHECK["inv_tau"]] == 1 and c.sum() == 1, c
    assert bool(((w[2] == 0) | (w[2] == 1)).all()) and w[2].sum() <= 1  # at 3.4e38: the argmax limit, as on CPU
    # canvas_step / softmax_embed: a per-row temperature whose inverse is not a normal float32
    x = torch.randn(4, vocab, generator=_g(9))
    t = torch.tensor([1.0, 1e-40, T_MIN * 1.001, 1e38], dtype=torch.float64)
    sample, arg, ent = (torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64), torch.empty(4))
    assert emulated.df_emu_canvas_step(ptr(x), ctypes.c_int(0), ptr(t), ptr(sample), ptr(arg), ptr(ent),
                                       ctypes.c_int64(4), ctypes.c_int64(vocab), ctypes.c_uint64(3),
                                       ctypes.c_uint64(0)) == 0
    c = _take(emulated)
    assert c[CHECK["temperature"]] == 2 and c.sum() == 2, c
    assert ent[[1, 3]].isnan().all() and (sample[[1, 3]] == 0).all()
    assert ent[2] == 0 and sample[2] == arg[2] == x[2].argmax()  # just inside: the argmax limit, as on CPU
    E = torch.randn(vocab, 8, generator=_g(10))
    h, mx, ss = torch.empty(4, 8), torch.empty(4), torch.empty(4, dtype=torch.float64)
    assert emulated.df_emu_softmax_embed(ptr(x), ctypes.c_int(0), ptr(t), ptr(E), ctypes.c_int(0), ctypes.c_int(0),
                                         ctypes.c_int64(4), ctypes.c_int64(vocab), ctypes.c_int64(8),
                                         ctypes.c_double(1.0), ptr(mx), ptr(ss), ptr(h)) == 0
    c = _take(emulated)
    assert c[CHECK["temperature"]] == 2 and c.sum() == 2, c
    assert h[[1, 3]].isnan().all() and torch.isfinite(h[[0, 2]]).all()
    torch.testing.assert_close(h[2], E[x[2].argmax()])


# ---------------------------------------------------------------------------------------
# linear_usdm_loss: one dtype rule, checked first
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "none", "sum", "mean"])
def test_linear_usdm_loss_in_float64(mode):
    """float64 worked only with reduction='sum' in training ("logits has dtype Double"
    otherwise): now every path, against the reference."""
    g = _g(9)
    h, w, b = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(K, 4, generator=g, dtype=torch.float64), \
        torch.randn(K, generator=g, dtype=torch.float64)
    a, d = torch.tensor([0.3, 0.8], dtype=torch.float64), torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ref = reference.usdm_loss(h @ w.T + b, Z, X0, a, d)
    reduction = "none" if mode == "no_grad" else mode
    reduce = {"none": torch.sum, "sum": torch.sum, "mean": torch.mean}[reduction]
    h64 = h.clone().requires_grad_()
    ref = reference.usdm_loss(h64 @ w.T + b, Z, X0, a, d)
    want = ref if reduction == "none" else reduce(ref)
    (gref,) = torch.autograd.grad(reduce(ref), h64)
    if mode == "no_grad":
        with torch.no_grad():
            got = duo_fast.linear_usdm_loss(h, w, b, Z, X0, a, d)
    else:
        hr = h.clone().requires_grad_()
        got = duo_fast.linear_usdm_loss(hr, w, b, Z, X0, a, d, reduction=reduction)
        got.sum().backward()
        assert hr.grad.dtype == torch.float64
        torch.testing.assert_close(hr.grad, gref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args,match", [
    (dict(weight=torch.randn(K, 4, dtype=torch.float64)), r"weight has dtype float64, expected hidden's dtype float32 "
                                                          r"\(hidden, weight and bias must have one dtype\)"),
    (dict(weight=torch.randn(K, 4, dtype=torch.bfloat16)), "weight has dtype bfloat16, expected hidden's dtype float32"),
    (dict(bias=torch.zeros(K, dtype=torch.long)), "bias has dtype int64, expected one of float32, bfloat16, float16, "
                                                  "float64"),
    (dict(bias=torch.zeros(K, dtype=torch.float16)), "bias has dtype float16, expected hidden's dtype float32"),
    (dict(hidden=torch.zeros(2, 3, 4, dtype=torch.int32)), "hidden has dtype int32, expected one of float32"),
])
def test_linear_usdm_loss_dtypes_are_named(args, match):
    kw = dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(K, 4), bias=None)
    kw.update(args)
    with pytest.raises(TypeError, match=match):
        duo_fast.linear_usdm_loss(kw["hidden"], kw["weight"], kw["bias"], Z, X0, torch.full((2,), 0.5), -torch.ones(2))


# ---------------------------------------------------------------------------------------
# generate: meaningless arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=1.0), r"eps must be in \(0.0, 1.0\) \(the last time of the grid\), got 1.0"),
    (dict(eps=0.0), r"eps must be in \(0.0, 1.0\)"),
    (dict(eps=math.nan), r"eps must be in \(0.0, 1.0\)"),
    (dict(eps=1e-20), r"the 'loglinear' schedule gives alpha = 1 at t = 1e-20 \(step 3\): expected alpha\(t\) < 1 "
                      r"at every step's start; raise eps"),
    (dict(schedule_eps=1.0), r"schedule_eps must be in \[0.0, 1.0\)"),
    (dict(schedule_eps=-0.1), r"schedule_eps must be in \[0.0, 1.0\)"),
    (dict(schedule="duo", gamma_min=-1000.0), r"the 'duo' schedule gives alpha = 1 .* raise gamma_min"),
    (dict(schedule="duo", gamma_min=-1.0, gamma_max=-2.0), r"gamma_min must be in \(-inf, -2.0\)"),
    (dict(gamma_max=math.inf), r"gamma_max must be in"),
    (dict(temperature=1e-40), r"temperature must be in \[2.939e-39"),
    (dict(top_p=1.5), r"top_p must be in \(0.0, 1.0\]"),
    (dict(sampler="psi", kappa="max-capped--0.1"), r"kappa mode must be .* with eta a number >= 0, got "
                                                   r"'max-capped--0.1'"),
    (dict(sampler="psi", kappa="max-capped-nan"), "got 'max-capped-nan'"),
    (dict(sampler="psi", kappa="max-capped-0.1-0.2"), "got 'max-capped-0.1-0.2'"),
    (dict(sampler="psi", kappa="constant-0.5x"), "got 'constant-0.5x'"),
    (dict(sampler="psi", kappa="constant-remdm0.5"), "got 'constant-remdm0.5'"),
    (dict(sampler="psi", kappa="constant-remdm-2e-2"), "got 'constant-remdm-2e-2'"),  # the Duo code reads eta = 2
    (dict(sampler="psi", kappa="max-rescale-1e400"), r"kappa mode 'max-rescale-1e400': eta must be in \[0.0, inf\)"),
    (dict(sampler="psi", kappa="constant-1.5"), r"kappa mode 'constant-1.5': eta must be in \[0.0, 1.0\]"),
    (dict(kappa="pure-posteriorX"), "got 'pure-posteriorX'"),  # checked for every sampler
])
def test_generate_refuses_meaningless_arguments_before_any_call(kwargs, match):
    calls = []

    def model(z, t):
        calls.append(1)
        return torch.zeros(*z.shape, 5)

    with pytest.raises(ValueError, match=match):
        duo_fast.generate(model, 2, 3, 5, **dict(dict(steps=3, seed=0, progress=False), **kwargs))
    assert not calls


@pytest.mark.parametrize("mode", ["constant-0.5", "max-capped-0.05", "max-rescale-.5", "constant-remdm-2e+0"])
def test_well_formed_kappa_modes_match_the_reference(mode):
    from duo_fast.generation import psi_kappas, time_grid

    alphas = reference.schedule_alpha(time_grid(8), "loglinear")
    torch.testing.assert_close(psi_kappas(mode, alphas), reference.psi_kappas(mode, alphas), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------
# check_device_errors without CUDA
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA device")
def test_check_device_errors_without_cuda_is_a_no_op():
    assert duo_fast.check_device_errors() is None  # raised "Found no NVIDIA driver"
    assert duo_fast.check_device_errors("cpu") is None
    assert duo_fast.check_device_errors("meta") is None
    with pytest.raises(RuntimeError, match=r"check_device_errors: expected an available CUDA device, got "
                                           r"device='cuda:1'"):
        duo_fast.check_device_errors("cuda:1")
