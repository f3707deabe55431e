"""duo_fast.linear_sample_step (docs/math.md §4, the reverse step fused with the output
layer): with the same seed (or generator state) the same tokens as sample_step
on the materialized logits, for every chunk size; the law of the draws by
chi-square at fixed seeds against the float64 reference posterior (ancestral,
noise removal, Psi kappa < 1, temperature, top_p); classifier-free guidance
against the reference's guided posterior, which is checked against the Duo
code's own _get_guided_posterior_from_xt; the sample_step kernel's row_offset
(CPU, opcheck, emulated CUDA kernel); no [N, K] tensor at GPT-2's vocabulary;
torch.compile; bad inputs naming the argument."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr
from test_linear_distill_kl import KWideTensors
from test_sample_step import _chi2_pvalue

F64 = torch.float64


def _problem(B=2, L=13, d=8, K=50, seed=0, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(B, L, d, generator=g),
        weight=torch.randn(K, d, generator=g) * scale,
        bias=torch.randn(K, generator=g) * 0.5 if bias else None,
        uncond=torch.randn(B, L, d, generator=g),
        z=torch.randint(0, K, (B, L), generator=g),
        a_t=0.5 * torch.rand(B, generator=g, dtype=F64),
        a_s=0.5 + 0.5 * torch.rand(B, generator=g, dtype=F64),
    )


def _on(p, device, dtype=torch.float32):
    return {k: None if v is None else v.to(device, dtype) if v.is_floating_point() and k not in ("a_t", "a_s")
            else v.to(device) for k, v in p.items()}


def _materialized(p, hidden="hidden"):
    return torch.nn.functional.linear(p[hidden], p["weight"], p["bias"])


STEP_KW = [dict(), dict(kappa=0.4), dict(temperature=0.7, top_p=0.6), dict(kappa=0.0, top_p=0.9, temperature=1.3)]


@pytest.mark.parametrize("kw", STEP_KW, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "ancestral")
@pytest.mark.parametrize("chunk_size,bias", [(1, True), (5, False), (7, True), (None, True)])
def test_same_draws_as_sample_step_on_materialized_logits(kw, chunk_size, bias, device):
    p = _on(_problem(bias=bias), device)
    out = duo_fast.linear_sample_step(p["hidden"], p["weight"], p["bias"], p["z"], p["a_t"], p["a_s"], seed=77,
                                      chunk_size=chunk_size, **kw)
    ref = duo_fast.sample_step(_materialized(p), p["z"], p["a_t"], p["a_s"], seed=77, **kw)
    assert out.shape == p["z"].shape and out.dtype == torch.int64
    assert torch.equal(out, ref)
    if device == "cpu":  # the same generator state draws the same key: the same tokens
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a = duo_fast.linear_sample_step(p["hidden"], p["weight"], p["bias"], p["z"], p["a_t"], p["a_s"], generator=g1,
                                        chunk_size=chunk_size, **kw)
        assert torch.equal(a, duo_fast.sample_step(_materialized(p), p["z"], p["a_t"], p["a_s"], generator=g2, **kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_same_draws(dtype):
    # 16-bit logits read natively; float64 ones as float32 (sample_step takes no float64)
    p = _on(_problem(seed=1), "cpu", dtype)
    out = duo_fast.linear_sample_step(p["hidden"], p["weight"], p["bias"], p["z"].int(), p["a_t"], p["a_s"], seed=5,
                                      chunk_size=3, top_p=0.8)
    logits = _materialized(p)
    ref = duo_fast.sample_step(logits if dtype != F64 else logits.float(), p["z"], p["a_t"], p["a_s"], seed=5, top_p=0.8)
    assert out.dtype == torch.int32 and torch.equal(out.long(), ref)


CASES = [
    dict(kappa=1.0, temperature=1.0, top_p=1.0, noise_removal=False),
    dict(kappa=1.0, temperature=1.0, top_p=1.0, noise_removal=True),
    dict(kappa=0.5, temperature=1.0, top_p=1.0, noise_removal=False),
    dict(kappa=0.7, temperature=1.5, top_p=0.8, noise_removal=False),
    dict(kappa=1.0, temperature=0.6, top_p=0.6, noise_removal=True),
]


def _assert_law(tokens, probs):
    """The tokens' law is probs: chi-square p-value > 1e-4 (a point mass: every token its id)."""
    if int((probs > 0).sum()) == 1:
        assert bool((tokens == probs.argmax()).all())
    else:
        assert _chi2_pvalue(tokens, probs) > 1e-4


def _law_problem(K, rows, n, d=6, seed=0, noise_removal=False):
    """``rows`` distinct (hidden, z) rows, each repeated n // rows times (tokens i, i + rows, ...)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g)
    u = torch.randn(rows, d, generator=g)
    weight, bias = torch.randn(K, d, generator=g) * 0.6, torch.randn(K, generator=g) * 0.5
    z = torch.randint(0, K, (rows,), generator=g)
    a_t = torch.tensor([0.35], dtype=F64)
    a_s = torch.tensor([1.0 if noise_removal else 0.6], dtype=F64)
    rep = n // rows
    return dict(h=h, u=u, weight=weight, bias=bias, z=z, a_t=a_t, a_s=a_s, rep=rep,
                H=h.repeat(rep, 1)[None], U=u.repeat(rep, 1)[None], Z=z.repeat(rep)[None])


GUIDED = [
    dict(guid_weight=2.0, kappa=1.0, temperature=1.0, top_p=1.0, noise_removal=False),
    dict(guid_weight=0.5, kappa=1.0, temperature=1.0, top_p=1.0, noise_removal=True),
    dict(guid_weight=3.0, kappa=0.6, temperature=1.0, top_p=1.0, noise_removal=False),
    dict(guid_weight=1.5, kappa=0.8, temperature=1.2, top_p=0.7, noise_removal=True),
    dict(guid_weight=-0.5, kappa=1.0, temperature=0.8, top_p=0.9, noise_removal=False),
]


@pytest.mark.parametrize("case", CASES + GUIDED, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_draws_follow_reference_posterior(case, device):
    """Each of 3 distinct rows repeated 20000 times (other Philox streams) against the
    float64 posterior of its logits, or the guided posterior with guidance."""
    K, rows, n = 11, 3, 60_000
    guided = "guid_weight" in case
    t = _law_problem(K, rows, n, seed=3 if guided else 2, noise_removal=case["noise_removal"])
    kw = dict(kappa=case["kappa"], temperature=case["temperature"], top_p=case["top_p"])
    on = lambda k: t[k].to(device)  # noqa: E731
    guidance = (on("U"), case["guid_weight"]) if guided else None
    tokens = duo_fast.linear_sample_step(on("H"), on("weight"), on("bias"), on("Z"), on("a_t"), on("a_s"), seed=2024,
                                         chunk_size=4096, guidance=guidance, **kw)[0].cpu()
    W, b = t["weight"].double(), t["bias"].double()
    a_t, a_s = t["a_t"].expand(rows), t["a_s"].expand(rows)
    if guided:
        probs = reference.guided_posterior(t["h"].double() @ W.t() + b, t["u"].double() @ W.t() + b, t["z"], a_t, a_s,
                                           case["guid_weight"], **kw)
    else:
        probs = reference.posterior(t["h"].double() @ W.t() + b, t["z"], a_t, a_s, **kw)
    for r in range(rows):
        _assert_law(tokens[r::rows], probs[r])


def test_guidance_weights_one_and_zero_are_the_plain_steps():
    """The Duo code's special cases: guid_weight 1 is the conditional step, 0 the
    unconditional one; the same draws as without guidance."""
    p = _problem(seed=4)
    args = (p["weight"], p["bias"], p["z"], p["a_t"], p["a_s"])
    for w, hidden in ((1.0, "hidden"), (0.0, "uncond")):
        out = duo_fast.linear_sample_step(p["hidden"], *args, seed=8, kappa=0.5, guidance=(p["uncond"], w))
        assert torch.equal(out, duo_fast.linear_sample_step(p[hidden], *args, seed=8, kappa=0.5))


@pytest.mark.parametrize("kappa,top_p,noise_removal", [(1.0, 1.0, False), (1.0, 0.6, True), (0.5, 0.8, False)])
def test_reference_guided_posterior_is_the_duo_codes(kappa, top_p, noise_removal):
    """reference.guided_posterior against the Duo code's _get_guided_posterior_from_xt
    (called on a stand-in model whose forward gives the conditional or the
    unconditional logits by label) and _psi_update's mix around it (_forward_process).
    The snapshot's _get_ancestral_posterior passes self twice to it (a TypeError),
    so the method is called directly."""
    from duo_codebase import load_reference
    from duo_fast.bench import duo_code

    ref = load_reference()
    K, B, L, w = 17, 2, 5, 2.5
    g = torch.Generator().manual_seed(6)
    cond, uncond = torch.randn(B, L, K, generator=g) * 2, torch.randn(B, L, K, generator=g) * 2
    z = torch.randint(0, K, (B, L), generator=g)
    a_t = torch.tensor([[0.2], [0.45]], dtype=F64)
    a_s = torch.ones_like(a_t) if noise_removal else torch.tensor([[0.5], [0.7]], dtype=F64)
    model = duo_code.reference().Model(K, "cpu", use_float64=True, p_nucleus=top_p)
    model.num_classes, model.neg_infinity = 10, -1000000.0
    # float64 logits: the Duo code's log_softmax in float64 too (its float32 one would differ by rounding)
    model.forward = lambda xt, sigma, labels: model._process_model_output(
        (uncond if bool((labels == model.num_classes).all()) else cond).double(), xt, sigma)
    labels = torch.zeros(B, dtype=torch.int64)
    guided = ref.trainer_base.Diffusion._get_guided_posterior_from_xt

    def duo(alpha_s):
        return guided(model, z, torch.zeros(B), labels, w, alpha_s, a_t)[1]

    q = duo(a_s)
    if kappa != 1.0:
        q = kappa * q + (1 - kappa) * ref.trainer_base.UniformState._forward_process(model, duo(torch.ones_like(a_s)), a_s)
    ours = reference.guided_posterior(cond, uncond, z, a_t, a_s, w, kappa=kappa, top_p=top_p)
    torch.testing.assert_close(ours, q.double(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("guided", [False, True])
def test_no_tensor_of_all_tokens_by_vocabulary(guided):
    """At GPT-2's vocabulary no [N, K] tensor is made: every logits-like tensor has
    at most the default chunk's rows (333 at K = 50257; 41 with guidance)."""
    K, N, d = 50257, 100 if guided else 700, 8
    p = _problem(B=1, L=N, d=d, K=K, seed=7)
    chunk = duo_fast.ops._linear_chunks.default_chunk_size(K, d) // (8 if guided else 1)
    kw = dict(guidance=(p["uncond"], 2.0), kappa=0.5) if guided else dict(top_p=0.9)
    with KWideTensors(K) as seen:
        out = duo_fast.linear_sample_step(p["hidden"], p["weight"], p["bias"], p["z"], p["a_t"], p["a_s"], seed=1, **kw)
    assert out.shape == (1, N)
    assert 0 < seen.max_rows <= chunk < N, (seen.max_rows, seen.ops)


def test_compiled_matches_eager():
    p = _problem(seed=8)

    def fn(p):
        a = duo_fast.linear_sample_step(p["hidden"], p["weight"], p["bias"], p["z"], p["a_t"], p["a_s"], seed=3,
                                        chunk_size=5, kappa=0.5, top_p=0.8)
        b = duo_fast.linear_sample_step(p["hidden"], p["weight"], p["bias"], p["z"], p["a_t"], p["a_s"], seed=4,
                                        chunk_size=5, guidance=(p["uncond"], 2.0))
        return a, b

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(p)
    finally:
        torch._dynamo.reset()
    eager = fn(p)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


# ---------------------------------------------------------------------------------------
# the sample_step kernel's row_offset: rows of a larger call
# ---------------------------------------------------------------------------------------


def _rows_problem(rows=24, K=1000, seed=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, K, generator=g) * 2).to(dtype)
    z = torch.randint(0, K, (rows,), generator=g)
    a_t = 0.5 * torch.rand(rows, generator=g, dtype=F64)
    return x, z, a_t, a_t + 0.3


def test_row_offset_draws_the_rows_of_the_full_call():
    x, z, a_t, a_s = _rows_problem()
    op = torch.ops.duo_fast.sample_step.default
    full = op(x, z, a_t, a_s, 0.6, 1.1, 0.9, 123, 0)
    for s, e in ((0, 5), (5, 6), (6, 24)):
        assert torch.equal(op(x[s:e], z[s:e], a_t[s:e], a_s[s:e], 0.6, 1.1, 0.9, 123, 0, s), full[s:e])
    assert not torch.equal(op(x[5:], z[5:], a_t[5:], a_s[5:], 0.6, 1.1, 0.9, 123, 0), full[5:])  # streams 0.. differ
    with pytest.raises(RuntimeError, match="row_offset must be >= 0"):
        op(x, z, a_t, a_s, 1.0, 1.0, 1.0, 1, 0, -1)
    torch.library.opcheck(op, (x.reshape(4, 6, -1), z.reshape(4, 6), a_t.reshape(4, 6), a_s.reshape(4, 6),
                               0.5, 0.9, 0.8, 11, 0, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_kernel_row_offset_matches_cpu(emulated, dtype):
    x, z, a_t, a_s = _rows_problem(rows=12, K=2053, dtype=dtype)
    code = {torch.float32: 0, torch.bfloat16: 1}[dtype]
    for s, e, kappa, top_p in ((0, 12, 1.0, 1.0), (3, 12, 0.5, 0.7), (11, 12, 1.0, 0.3)):
        out = torch.empty(e - s, dtype=torch.int64)
        xs, zs, ats, ass = (t[s:e].contiguous() for t in (x, z, a_t, a_s))
        rc = emulated.df_emu_sample_step_rows(
            ptr(xs), ctypes.c_int(code), ptr(zs), ptr(ats), ptr(ass), ptr(out), ctypes.c_int64(e - s),
            ctypes.c_int64(x.shape[1]), ctypes.c_double(kappa), ctypes.c_double(0.9), ctypes.c_double(top_p),
            ctypes.c_uint64(41), ctypes.c_uint64(0), ctypes.c_uint64(s))
        assert rc == 0
        assert torch.equal(out, torch.ops.duo_fast.sample_step(x, z, a_t, a_s, kappa, 0.9, top_p, 41, 0)[s:e])


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    p = _problem()
    args = dict(hidden=p["hidden"], weight=p["weight"], bias=p["bias"], z=p["z"], alpha_t=p["a_t"], alpha_s=p["a_s"])

    def call(**change):
        a = dict(args)
        kw = {k: change.pop(k) for k in list(change) if k not in a}
        a.update(change)
        return duo_fast.linear_sample_step(a["hidden"], a["weight"], a["bias"], a["z"], a["alpha_t"], a["alpha_s"],
                                           seed=1, **kw)

    cases = [
        (dict(weight=p["weight"][:, :3]), ValueError, r"weight must be \[K, d\] with d = hidden.size\(-1\)"),
        (dict(bias=p["bias"][:3]), ValueError, "bias has shape"),
        (dict(z=p["z"][:, :4]), ValueError, "z has shape"),
        (dict(z=p["z"] + 50), RuntimeError, "z holds token ids"),
        (dict(alpha_t=torch.tensor([0.9, 0.9], dtype=F64)), RuntimeError, "alpha_s must be >= alpha_t"),
        (dict(kappa=2.0), ValueError, "kappa must be in"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(guidance=p["uncond"]), TypeError, r"guidance must be a pair \(uncond_hidden, guid_weight\)"),
        (dict(guidance=(p["uncond"][:, :3], 2.0)), ValueError, r"guidance\[0\] \(uncond_hidden\) has shape"),
        (dict(guidance=(p["uncond"].double(), 2.0)), TypeError, r"guidance\[0\] \(uncond_hidden\) has dtype"),
        (dict(guidance=(p["uncond"], math.nan)), ValueError, r"guidance\[1\] \(guid_weight\) must be in"),
        (dict(guidance=(p["uncond"], "2")), TypeError, r"guidance\[1\] \(guid_weight\) must be a float"),
    ]
    for change, err, match in cases:
        with pytest.raises(err, match=match):
            call(**change)
    # a row of the logits with no distribution: named, with its row in the whole call (not the chunk)
    h = p["hidden"].clone()
    h[1, 2] = math.nan  # flattened row 13 + 2 = 15
    with pytest.raises(RuntimeError, match=r"linear_sample_step: the logits hidden @ weight.T \+ bias: .*row 15 "):
        call(hidden=h, chunk_size=4)
    with pytest.raises(RuntimeError, match=r"uncond_hidden @ weight.T \+ bias"):
        call(guidance=(h, 2.0), chunk_size=4)
