"""The policy for bad values (hardening issue; duo_fast/ops.py, "Bad values"), op
by op, on CPU and on the emulated CUDA kernels:

* levels (gamma, gamma_s, alpha, dalpha, alpha_t, alpha_s, inv_tau) NaN or out of
  range: an error naming the argument, in every op (gamma_to_alpha included);
* logits into the losses (usdm_loss, linear_usdm_loss, distill_kl): a row with NaN,
  +inf or no finite logit gives a NaN value and a NaN gradient row, the other rows
  unchanged (checked against the reference);
* logits into sampling (sample_step, posterior, generate): such a row raises
  (CPU), or is counted on the device with z kept / a NaN row (emulated CUDA);
* what a denoiser can get wrong in generate: shape, dtype, device, type;
* int32 token ids in every op: the same outputs as int64, in int32.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr

NAN, INF = math.nan, math.inf
BAD_ROWS = {
    "nan": lambda row: row.index_fill_(0, torch.tensor([1]), NAN),
    "all_nan": lambda row: row.fill_(NAN),
    "posinf": lambda row: row.index_fill_(0, torch.tensor([2]), INF),
    "all_neginf": lambda row: row.fill_(-INF),
}
N_CHECKS = 13  # check::kNumArgs (csrc/include/duo_fast/device_check.h)
CHECK = dict(x0=0, z=1, ids=2, alpha=3, dalpha=4, alpha_t=5, alpha_s=6, gamma=7, inv_tau=8, gamma_nan=9, gamma_s_nan=10,
             logits=11, temperature=12)


def _rows(rows, K, seed, bad, bad_row=1):
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)) * 2
    BAD_ROWS[bad](x[bad_row])
    return x


# ---------------------------------------------------------------------------------------
# levels: NaN raises in every op
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gamma_to_alpha_nan_raises_and_limits(dtype):
    with pytest.raises(RuntimeError, match=r"gamma must not be NaN, got 1 NaN"):
        duo_fast.gamma_to_alpha(torch.tensor([0.0, NAN, 1.0], dtype=dtype), 100)
    a, d = duo_fast.gamma_to_alpha(torch.tensor([-INF, INF], dtype=dtype), 100)
    assert a.tolist() == [1.0, 0.0] and d.tolist() == [0.0, 0.0]
    assert duo_fast.gamma_to_alpha(torch.empty(0, dtype=dtype), 100)[0].numel() == 0


def test_sample_zt_nan_levels_raise_and_inf_limits():
    x0 = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(RuntimeError, match=r"gamma must not be NaN"):
        duo_fast.sample_zt(x0, torch.tensor([0.0, NAN]), 10, seed=1)
    with pytest.raises(RuntimeError, match=r"gamma_s must not be NaN"):
        duo_fast.sample_zt(x0, torch.tensor([0.0, 1.0]), 10, gamma_s=torch.tensor([[0.0, 0, 0], [0, NAN, 0]]), seed=1)
    # -inf: alpha = 1, z = x0; +inf: alpha = 0, uniform (z = x0 with probability 1/K)
    z_t, z_s = duo_fast.sample_zt(x0.repeat(1000, 1), torch.full((2000,), INF), 10,
                                  gamma_s=torch.full((2000,), -INF), seed=3)
    assert torch.equal(z_s, x0.repeat(1000, 1))
    p_hat = float((z_t == x0.repeat(1000, 1)).double().mean())
    assert abs(p_hat - 0.1) < 5 * math.sqrt(0.09 / 6000)


@pytest.mark.parametrize("bad,arg,match", [
    (dict(alpha=NAN), "alpha", r"alpha must be in \(0, 1\)"),
    (dict(dalpha=NAN), "dalpha", r"dalpha must be <= 0"),
])
def test_usdm_loss_nan_levels_raise(bad, arg, match):
    K = 7
    lv = dict(alpha=0.5, dalpha=-1.0)
    lv.update(bad)
    logits, z = torch.randn(2, 3, K), torch.zeros(2, 3, dtype=torch.int64)
    levels = {k: torch.tensor([v, 0.5 if k == "alpha" else -1.0], dtype=torch.float64) for k, v in lv.items()}
    with pytest.raises(RuntimeError, match=match):
        duo_fast.usdm_loss(logits, z, z, levels["alpha"], levels["dalpha"])
    with pytest.raises(RuntimeError, match=match):
        duo_fast.linear_usdm_loss(torch.randn(2, 3, 4), torch.randn(K, 4), None, z, z, levels["alpha"], levels["dalpha"])


@pytest.mark.parametrize("which", ["alpha_t", "alpha_s"])
@pytest.mark.parametrize("op", ["sample_step", "posterior"])
def test_sampling_nan_levels_raise(which, op):
    a = dict(alpha_t=torch.tensor([0.2, 0.3], dtype=torch.float64), alpha_s=torch.tensor([0.5, 0.6], dtype=torch.float64))
    a[which][1] = NAN
    kw = dict(seed=1) if op == "sample_step" else {}
    with pytest.raises(RuntimeError, match=which):
        getattr(duo_fast, op)(torch.randn(2, 5), torch.tensor([0, 1]), a["alpha_t"], a["alpha_s"], **kw)


@pytest.mark.parametrize("which,value,match", [
    ("gamma", NAN, "gamma must be finite"), ("gamma", INF, "gamma must be finite"), ("gamma", -INF, "gamma must be finite"),
    ("inv_tau", NAN, "inv_tau must be finite and > 0"), ("inv_tau", INF, "inv_tau must be finite and > 0"),
    ("inv_tau", 0.0, "inv_tau must be finite and > 0"),
])
@pytest.mark.parametrize("op", ["curriculum_embed", "curriculum_topk", "curriculum_topk_embed"])
def test_curriculum_bad_levels_raise(which, value, match, op):
    K = 9
    x0 = torch.tensor([[1, 2], [3, 4]])
    lv = dict(gamma=torch.tensor([0.0, 1.0], dtype=torch.float64), inv_tau=torch.tensor([1.0, 2.0], dtype=torch.float64))
    lv[which][0] = value
    E = torch.randn(K, 3)
    args = {
        "curriculum_embed": (x0, lv["gamma"], lv["inv_tau"], E),
        "curriculum_topk": (x0, lv["gamma"], lv["inv_tau"], 2, K),
        "curriculum_topk_embed": (x0, lv["gamma"], lv["inv_tau"], 2, E),
    }[op]
    with pytest.raises(RuntimeError, match=match):
        getattr(duo_fast, op)(*args, seed=1)
    # a Python float level goes through the same check
    with pytest.raises(RuntimeError, match=match):
        getattr(duo_fast, op)(*args[:1], *((value, 1.0) if which == "gamma" else (0.0, value)), *args[3:], seed=1)


# ---------------------------------------------------------------------------------------
# logits into losses: NaN rows, no error
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", list(BAD_ROWS))
@pytest.mark.parametrize("inplace_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_usdm_loss_bad_rows_give_nan_rows(bad, inplace_grad, dtype):
    K, rows = 300, 4
    logits = _rows(rows, K, 1, bad).to(dtype)
    z, x0 = torch.tensor([3, 1, 4, 1]), torch.tensor([3, 5, 9, 2])
    alpha = torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    dalpha = -torch.ones(rows, dtype=torch.float64)
    lg = logits.clone().requires_grad_()
    loss = duo_fast.usdm_loss(lg, z, x0, alpha, dalpha, inplace_grad=inplace_grad)
    loss.sum().backward()
    assert loss[1].isnan() and lg.grad[1].float().isnan().all()
    ok = torch.tensor([0, 2, 3])
    ref = reference.usdm_loss(logits[ok].double(), z[ok], x0[ok], alpha[ok], dalpha[ok])
    torch.testing.assert_close(loss[ok].double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(lg.grad[ok].float()).all()
    # the reference agrees that the row is NaN
    assert reference.usdm_loss(logits[1:2].double(), z[1:2], x0[1:2], alpha[1:2], dalpha[1:2]).isnan().all()


def test_linear_usdm_loss_nan_hidden_gives_nan_rows():
    K, d, N = 50, 8, 6
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, N, d, generator=g)
    hidden[0, 2, 3] = NAN
    weight = torch.randn(K, d, generator=g)
    z, x0 = torch.randint(0, K, (1, N), generator=g), torch.randint(0, K, (1, N), generator=g)
    a, da = torch.tensor([0.4], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    loss = duo_fast.linear_usdm_loss(h, weight, None, z, x0, a, da, chunk_size=4)
    assert loss[0, 2].isnan() and torch.isfinite(loss[0, [0, 1, 3, 4, 5]]).all()
    loss.sum().backward()
    assert h.grad[0, 2].isnan().all() and torch.isfinite(h.grad[0, [0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("bad", list(BAD_ROWS))
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("direction", ["bwd", "fwd"])
def test_distill_kl_bad_rows_give_nan_rows(bad, side, direction):
    K, rows = 200, 3
    s, t = _rows(rows, K, 2, bad), torch.randn(rows, K, generator=torch.Generator().manual_seed(3))
    if side == "teacher":
        s, t = t, _rows(rows, K, 2, bad)
    sg = s.clone().requires_grad_()
    kl = duo_fast.distill_kl(sg, t, direction)
    kl.sum().backward()
    want = reference.distill_kl(s.double(), t.double(), direction)
    assert kl[1].isnan() and want[1].isnan()
    assert sg.grad[1].isnan().all()
    torch.testing.assert_close(kl[[0, 2]].double(), want[[0, 2]], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(sg.grad[[0, 2]]).all()


def test_curriculum_nan_embedding_propagates():
    K, d = 20, 4
    E = torch.randn(K, d)
    E[5, 1] = NAN
    x0 = torch.arange(8)[None]
    h, _ = duo_fast.curriculum_embed(x0, torch.zeros(1, dtype=torch.float64), 1.0, E, seed=1)
    assert h[..., 1].isnan().all()  # every token's softmax gives row 5 a positive weight
    assert torch.isfinite(h[..., [0, 2, 3]]).all()
    h, _ = duo_fast.curriculum_topk_embed(x0, torch.zeros(1, dtype=torch.float64), 1.0, K - 1, E, seed=1)
    assert h[..., 1].isnan().all() and torch.isfinite(h[..., [0, 2, 3]]).all()  # k = K - 1: every id is in every bag


# ---------------------------------------------------------------------------------------
# logits into sampling: raise
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", list(BAD_ROWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_sampling_bad_rows_raise(bad, dtype, top_p):
    K, rows = 100, 5
    logits = _rows(rows, K, 4, bad, bad_row=3).to(dtype)
    BAD_ROWS[bad](logits[4])
    z = torch.arange(rows)
    a_t = torch.full((rows,), 0.2, dtype=torch.float64)
    a_s = torch.full((rows,), 0.6, dtype=torch.float64)
    match = r"logits: 2 row\(s\) \(the first: row 3 .*\) hold NaN, \+inf or no finite logit"
    with pytest.raises(RuntimeError, match=match):
        duo_fast.sample_step(logits, z, a_t, a_s, top_p=top_p, seed=1)
    with pytest.raises(RuntimeError, match=match):
        duo_fast.posterior(logits, z, a_t, a_s, top_p=top_p)
    with pytest.raises(RuntimeError, match=match):  # direct op calls too
        torch.ops.duo_fast.sample_step(logits, z, a_t, a_s, 1.0, 1.0, top_p, 1, 0)
    with pytest.raises(RuntimeError, match=match):  # DiffusionGemma's step ops, the same policy
        duo_fast.canvas_step(logits, temperature=0.7, seed=1)
    with pytest.raises(RuntimeError, match=match):
        duo_fast.softmax_embed(logits, torch.ones(K, 3, dtype=dtype))
    # the good rows alone still sample, and one -inf entry per row is fine
    good = logits[:3].clone()
    good[:, 7] = -INF
    out = duo_fast.sample_step(good, z[:3], a_t[:3], torch.ones(3, dtype=torch.float64), top_p=top_p, seed=2)
    q = reference.posterior(good, z[:3], a_t[:3], torch.ones(3, dtype=torch.float64), top_p=top_p)
    assert (q.gather(1, out[:, None]) > 0).all()


def test_sampling_lone_minus_inf_and_finite_extremes_are_fine():
    # Only -inf entries but one finite, huge finite logits, float16 extremes: distributions.
    K = 64
    x = torch.full((3, K), -INF)
    x[0, 5] = 0.0
    x[1] = torch.linspace(-1e38, 1e38, K)  # differences up to 2e38: exp underflows to 0, no overflow
    x[2] = torch.randn(K)
    z = torch.tensor([1, 2, 3])
    a_t, a_s = torch.full((3,), 0.3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    out = duo_fast.sample_step(x, z, a_t, a_s, seed=0)
    q = reference.posterior(x, z, a_t, a_s)
    assert (q.gather(1, out[:, None]) > 0).all()
    torch.testing.assert_close(duo_fast.posterior(x, z, a_t, a_s).double(), q, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# generate: what a denoiser can get wrong
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrong,exc,match", [
    (lambda z, K: torch.randn(*z.shape, K + 1), ValueError, r"has shape \[2, 3, 6\], expected \[batch_size, length, vocab_size\] = \[2, 3, 5\]"),
    (lambda z, K: torch.randn(*z.shape, K - 1), ValueError, r"has shape \[2, 3, 4\], expected .* = \[2, 3, 5\]"),
    (lambda z, K: torch.randn(z.numel(), K), ValueError, r"has shape \[6, 5\], expected .* = \[2, 3, 5\]"),
    (lambda z, K: torch.randn(z.shape[1], z.shape[0], K), ValueError, r"has shape \[3, 2, 5\]"),
    (lambda z, K: torch.randn(1, z.shape[1], K), ValueError, r"has shape \[1, 3, 5\]"),
    (lambda z, K: torch.randn(*z.shape, K)[None], ValueError, r"has shape \[1, 2, 3, 5\]"),
    (lambda z, K: torch.randint(0, 3, (*z.shape, K)), TypeError, r"has dtype int64, expected float32"),
    (lambda z, K: (torch.randn(*z.shape, K),), TypeError, r"is a tuple, expected a logits tensor of shape \[2, 3, 5\]"),
    (lambda z, K: torch.randn(*z.shape, K, device="meta"), ValueError, r"is on meta, expected cpu"),
])
def test_generate_rejects_a_wrong_denoiser(wrong, exc, match):
    with pytest.raises(exc, match=r"duo_fast.generate: the denoiser's output at step 0 \(t = 1\) " + match):
        duo_fast.generate(lambda z, t: wrong(z, 5), 2, 3, 5, steps=3, progress=False, seed=0)


@pytest.mark.parametrize("noise_removal", ["ancestral", "greedy"])
@pytest.mark.parametrize("bad", ["nan", "all_neginf", "posinf"])
def test_generate_diverged_denoiser_raises(noise_removal, bad):
    K, steps = 6, 3

    def denoiser(z, t):
        x = torch.randn(*z.shape, K)
        if float(t[0]) < 0.01:  # only the last call (noise removal) diverges
            BAD_ROWS[bad](x[1, 2])
        return x

    step = rf"step {steps} \((t = 1e-05|greedy noise removal)\)"
    with pytest.raises(RuntimeError, match=step + r".*logits: 1 row\(s\)"):
        duo_fast.generate(denoiser, 2, 4, K, steps=steps, noise_removal=noise_removal, progress=False, seed=0)

    def early(z, t):
        x = torch.randn(*z.shape, K)
        BAD_ROWS[bad](x[0, 0])
        return x

    with pytest.raises(RuntimeError, match=r"step 0 \(t = 1\).*logits: 1 row\(s\) \(the first: row 0"):
        duo_fast.generate(early, 2, 4, K, steps=steps, noise_removal=noise_removal, progress=False, seed=0)


def test_generate_accepts_float64_and_half_logits():
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        out = duo_fast.generate(lambda z, t: torch.randn(*z.shape, 5).to(dtype), 2, 3, 5, steps=2, progress=False, seed=0)
        assert out.shape == (2, 3) and ((out >= 0) & (out < 5)).all()


def test_check_device_errors_is_a_no_op_on_cpu():
    duo_fast.check_device_errors("cpu")
    torch.ops.duo_fast.check_device_errors(torch.empty(0))
    torch.library.opcheck(torch.ops.duo_fast.check_device_errors.default, (torch.empty(0),))


# ---------------------------------------------------------------------------------------
# int32 ids
# ---------------------------------------------------------------------------------------


def test_int32_ids_everywhere():
    K, d = 37, 5
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (3, 4), generator=g)
    z = torch.randint(0, K, (3, 4), generator=g)
    x32, z32 = x0.int(), z.int()
    gamma = torch.tensor([-2.0, 0.0, 1.0], dtype=torch.float64)
    E = torch.randn(K, d, generator=g)
    logits = torch.randn(3, 4, K, generator=g)
    a, da = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64), -torch.ones(3, dtype=torch.float64)

    def same(a64, a32):
        assert a32.dtype == torch.int32 and torch.equal(a64, a32.long())

    same(duo_fast.sample_zt(x0, gamma, K, seed=3), duo_fast.sample_zt(x32, gamma, K, seed=3))
    for o64, o32 in zip(duo_fast.sample_zt(x0, gamma, K, gamma_s=gamma - 1, seed=3),
                        duo_fast.sample_zt(x32, gamma, K, gamma_s=gamma - 1, seed=3)):
        same(o64, o32)
    ids64, w64, zt64 = duo_fast.curriculum_topk(x0, gamma, 2.0, 4, K, seed=3)
    ids32, w32, zt32 = duo_fast.curriculum_topk(x32, gamma, 2.0, 4, K, seed=3)
    same(ids64, ids32), same(zt64, zt32)
    assert torch.equal(w64, w32)
    for op in (duo_fast.curriculum_embed, lambda x, g_, t, e, seed: duo_fast.curriculum_topk_embed(x, g_, t, 3, e, seed=seed)):
        E1, E2 = E.clone().requires_grad_(), E.clone().requires_grad_()
        h64, zt64 = op(x0, gamma, 2.0, E1, seed=4)
        h32, zt32 = op(x32, gamma, 2.0, E2, seed=4)
        same(zt64, zt32)
        assert torch.equal(h64, h32)
        h64.sum().backward(), h32.sum().backward()
        assert torch.equal(E1.grad, E2.grad)
    for inplace in (False, True):
        l1, l2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss64 = duo_fast.usdm_loss(l1, z, x0, a, da, inplace_grad=inplace)
        loss32 = duo_fast.usdm_loss(l2, z32, x32, a, da, inplace_grad=inplace)
        assert torch.equal(loss64, loss32)
        loss64.sum().backward(), loss32.sum().backward()
        assert torch.equal(l1.grad, l2.grad)
    hid = torch.randn(3, 4, d, generator=g)
    assert torch.equal(duo_fast.linear_usdm_loss(hid, E, None, z, x0, a, da),
                       duo_fast.linear_usdm_loss(hid, E, None, z32, x32, a, da))
    a_t, a_s = torch.full((3,), 0.3, dtype=torch.float64), torch.full((3,), 0.6, dtype=torch.float64)
    same(duo_fast.sample_step(logits, z, a_t, a_s, seed=5), duo_fast.sample_step(logits, z32, a_t, a_s, seed=5))
    assert torch.equal(duo_fast.posterior(logits, z, a_t, a_s), duo_fast.posterior(logits, z32, a_t, a_s))
    # other integer dtypes: an error that says which are taken
    with pytest.raises(TypeError, match=r"x0 has dtype int16, expected one of int64, int32 \(token ids\)"):
        duo_fast.sample_zt(x0.short(), gamma, K, seed=1)
    with pytest.raises(TypeError, match=r"z has dtype uint8, expected one of int64, int32"):
        duo_fast.sample_step(logits, z.byte(), a_t, a_s, seed=5)
    # the raw op still takes int64 only, and says where int32 is taken
    with pytest.raises(RuntimeError, match=r"expected Long \(int64\) \(the Python functions duo_fast.\* also take int32"):
        torch.ops.duo_fast.sample_zt(x32, gamma[:, None].expand(3, 4).contiguous(), None, K, 1, 0)
    # out of range int32 ids are still caught
    bad = x32.clone()
    bad[0, 0] = K
    with pytest.raises(RuntimeError, match=r"x0 holds token ids in \[.*\], outside \[0, vocab_size\)"):
        duo_fast.sample_zt(bad, gamma, K, seed=1)


# ---------------------------------------------------------------------------------------
# the emulated CUDA kernels: counted on the device, rows marked, others unchanged
# ---------------------------------------------------------------------------------------


def _take(emulated):
    c = torch.zeros(N_CHECKS, dtype=torch.int32)
    assert emulated.df_emu_take_checks(ptr(c)) == N_CHECKS
    return c


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 3), ("thread", 0)])
def test_emulated_levels_nan(harness, emulated, mode, seed):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        _take(emulated)
        K, n = 50, 6
        x0 = torch.arange(n) * 7 % K
        gt = torch.tensor([0.0, NAN, -INF, INF, 1.0, 2.0], dtype=torch.float64)
        gs = torch.tensor([0.0, 0.0, 0.0, 0.0, NAN, 1.0], dtype=torch.float64)
        zt, zs = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
        assert emulated.df_emu_sample_zt(ptr(x0), ptr(gt), ptr(gs), ptr(zt), ptr(zs), ctypes.c_int64(n), ctypes.c_int64(K),
                                         ctypes.c_uint64(9), ctypes.c_uint64(0)) == 0
        c = _take(emulated)
        assert c[CHECK["gamma_nan"]] == 1 and c[CHECK["gamma_s_nan"]] == 1 and c.sum() == 2, c
        assert zt[[1, 4]].tolist() == [0, 0] and zs[[1, 4]].tolist() == [0, 0]
        ok = torch.tensor([0, 2, 3, 5])
        # the valid tokens as the CPU op draws them (the NaN levels replaced: same streams by position)
        ct, cs = torch.ops.duo_fast.sample_zt(x0, gt.nan_to_num(0.0, INF, -INF), gs.nan_to_num(0.0), K, 9, 0)
        assert torch.equal(zt[ok], ct[ok]) and torch.equal(zs[ok], cs[ok])
        assert zt[2] == x0[2]  # gamma = -inf
        # gamma_to_alpha: NaN counted, NaN out, the rest as on CPU
        table = torch.empty(emulated.df_schedule_table_size(), dtype=torch.float64)
        emulated.df_build_schedule_table(ctypes.c_int64(K), ptr(table))
        g = torch.tensor([0.0, NAN, -INF, INF, NAN], dtype=torch.float64)
        a, d = torch.empty_like(g), torch.empty_like(g)
        assert emulated.df_emu_gamma_to_alpha_f64(ptr(g), ptr(a), ptr(d), ctypes.c_int64(5), ptr(table)) == 0
        c = _take(emulated)
        assert c[CHECK["gamma_nan"]] == 2 and c.sum() == 2
        assert a[[1, 4]].isnan().all() and d[[1, 4]].isnan().all()
        ca, cd = duo_fast.gamma_to_alpha(g[[0, 2, 3]], K)
        assert torch.equal(a[[0, 2, 3]], ca) and torch.equal(d[[0, 2, 3]], cd)
        g32 = g.float()
        a32, d32 = torch.empty_like(g32), torch.empty_like(g32)
        assert emulated.df_emu_gamma_to_alpha_f32(ptr(g32), ptr(a32), ptr(d32), ctypes.c_int64(5), ptr(table)) == 0
        assert _take(emulated)[CHECK["gamma_nan"]] == 2 and a32[[1, 4]].isnan().all()
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 5), ("thread", 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_sampling_bad_rows(harness, emulated, mode, seed, dtype):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        _take(emulated)
        K, rows = 700, 6  # > 256 columns: every thread of a block reads a part of each row
        logits = torch.randn(rows, K, generator=torch.Generator().manual_seed(6)) * 2
        BAD_ROWS["nan"](logits[1])
        BAD_ROWS["posinf"](logits[2])
        BAD_ROWS["all_neginf"](logits[4])
        logits[5, :600] = -INF  # only -inf in the first 600 columns: fine
        logits = logits.to(dtype)
        z = torch.tensor([3, 1, 4, 1, 5, 9])
        a_t = torch.full((rows,), 0.25, dtype=torch.float64)
        a_s = torch.full((rows,), 0.75, dtype=torch.float64)
        good, bad = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 4])
        for top_p in (1.0, 0.6):
            q, out = torch.empty(rows, K), torch.full((rows,), -7, dtype=torch.int64)
            assert emulated.df_emu_posterior(ptr(logits), _DTYPE_CODE[dtype], ptr(z), ptr(a_t), ptr(a_s), ptr(q),
                                             ctypes.c_int64(rows), ctypes.c_int64(K), ctypes.c_double(1.0),
                                             ctypes.c_double(1.0), ctypes.c_double(top_p)) == 0
            assert emulated.df_emu_sample_step(ptr(logits), _DTYPE_CODE[dtype], ptr(z), ptr(a_t), ptr(a_s), ptr(out),
                                               ctypes.c_int64(rows), ctypes.c_int64(K), ctypes.c_double(1.0),
                                               ctypes.c_double(1.0), ctypes.c_double(top_p), ctypes.c_uint64(4),
                                               ctypes.c_uint64(0)) == 0
            c = _take(emulated)
            assert c[CHECK["logits"]] == 6 and c.sum() == 6, c  # 3 rows, 2 ops
            assert torch.equal(out[bad], z[bad]) and q[bad].isnan().all()
            assert not q[good].isnan().any()
            ref = reference.posterior(logits[good].float(), z[good], a_t[good], a_s[good], top_p=top_p)
            torch.testing.assert_close(q[good].double(), ref, rtol=0, atol=1e-6)
            cpu = torch.ops.duo_fast.sample_step(logits[good], z[good], a_t[good], a_s[good], 1.0, 1.0, top_p, 4, 0)
            # the CPU op numbers rows by position: same Philox stream only for row 0
            assert out[0] == cpu[0]
            assert (q[good].gather(1, out[good, None]) > 0).all()
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.parametrize("bad", list(BAD_ROWS))
def test_emulated_losses_bad_rows_give_nan(emulated, bad):
    K, rows = 700, 3
    logits = _rows(rows, K, 7, bad)
    z, x0 = torch.tensor([1, 2, 3]), torch.tensor([1, 5, 3])
    a = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    d = -torch.ones(rows, dtype=torch.float64)
    loss, grad = torch.empty(rows), torch.empty(rows, K)
    assert emulated.df_emu_usdm_loss(ptr(logits), 0, ptr(z), ptr(x0), ptr(a), ptr(d), ptr(loss), ptr(grad),
                                     ctypes.c_int64(rows), ctypes.c_int64(K)) == 0
    assert loss[1].isnan() and grad[1].isnan().all()
    ok = torch.tensor([0, 2])
    torch.testing.assert_close(loss[ok].double(), reference.usdm_loss(logits[ok].double(), z[ok], x0[ok], a[ok], d[ok]),
                               rtol=1e-4, atol=1e-5)
    assert _take(emulated).sum() == 0  # model values are not counted: they propagate
    t = torch.randn(rows, K, generator=torch.Generator().manual_seed(8))
    for s_, t_ in ((logits, t), (t, logits)):
        for direction in (0, 1):
            kl, g = torch.empty(rows), torch.empty(rows, K)
            assert emulated.df_emu_distill_kl(ptr(s_), 0, ptr(t_), 0, ptr(kl), ptr(g), ctypes.c_int64(rows), ctypes.c_int64(K),
                                              direction) == 0
            assert kl[1].isnan() and g[1].isnan().all(), (bad, direction, kl)
            want = reference.distill_kl(s_[ok].double(), t_[ok].double(), ("bwd", "fwd")[direction])
            torch.testing.assert_close(kl[ok].double(), want, rtol=1e-4, atol=2e-5)
