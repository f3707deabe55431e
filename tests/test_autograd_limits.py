"""What the ops do not differentiate gives an error naming it, never a silent zero
(issue 24, class 1): second-order gradients, gradients w.r.t. the inputs an op
does not differentiate, torch.func transforms; and the first-order gradients that
remain (gamma_to_alpha's, those computed under create_graph=True, an empty batch
with inplace_grad=True) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import duo_fast
from duo_fast import reference

K = 11
Z = torch.tensor([[0, 3, 5], [2, 2, 9]])
X0 = torch.tensor([[0, 4, 5], [7, 2, 1]])
A = torch.tensor([0.3, 0.8], dtype=torch.float64)
D = torch.tensor([-1.0, -2.5], dtype=torch.float64)
SECOND = r"has no second-order gradient: expected a first-order backward"


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _levels_grad(fn):
    """The error of a backward that needs a gradient w.r.t. a level."""
    with pytest.raises(RuntimeError) as e:
        fn()
    return str(e.value)


# ---------------------------------------------------------------------------------------
# second order: an error at the backward that would build it
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace_grad", [False, True])
def test_usdm_loss_and_distill_kl_refuse_create_graph(inplace_grad):
    lg = _logits(2, 3, K).requires_grad_()
    loss = duo_fast.usdm_loss(lg, Z, X0, A, D, inplace_grad=inplace_grad).sum()
    with pytest.raises(RuntimeError, match="usdm_loss " + SECOND + ".* w.r.t. logits"):
        torch.autograd.grad(loss, lg, create_graph=True)
    kl = duo_fast.distill_kl(lg, _logits(2, 3, K, seed=1), inplace_grad=inplace_grad).sum()
    with pytest.raises(RuntimeError, match="distill_kl " + SECOND + ".* w.r.t. student_logits"):
        torch.autograd.grad(kl, lg, create_graph=True)


def test_inplace_grad_messages_do_not_recommend_it_for_double_backward():
    lg = _logits(2, 3, K).requires_grad_()
    loss = duo_fast.usdm_loss(lg, Z, X0, A, D, inplace_grad=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="supports a single backward") as e:
        loss.backward()
    assert "double backward" not in str(e.value) and "neither has a second-order gradient" in str(e.value)


def test_linear_usdm_loss_first_order_under_create_graph_then_second_order_raises():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    w = torch.randn(K, 4, generator=g, requires_grad=True)
    b = torch.randn(K, generator=g, requires_grad=True)
    loss = duo_fast.linear_usdm_loss(h, w, b, Z, X0, A, D).sum()
    gh, gw, gb = torch.autograd.grad(loss, (h, w, b), create_graph=True)
    # the gradients themselves, against the float64 reference's
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    ref = reference.usdm_loss(h64 @ w64.T + b64, Z, X0, A, D).sum()
    rh, rw, rb = torch.autograd.grad(ref, (h64, w64, b64))
    for got, want in ((gh, rh), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-5)
    # a gradient penalty differentiates them again: raises (it was off by up to 1.8)
    with pytest.raises(RuntimeError, match="linear_usdm_loss " + SECOND + ".* hidden, weight and bias"):
        torch.autograd.grad(gh.pow(2).sum() + gw.pow(2).sum(), (h, w))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_linear_usdm_loss_reduced_refuses_create_graph(reduction):
    h = torch.randn(2, 3, 4, requires_grad=True)
    loss = duo_fast.linear_usdm_loss(h, torch.randn(K, 4), None, Z, X0, A, D, reduction=reduction)
    with pytest.raises(RuntimeError, match=r"reduction='sum' or 'mean'\) computes its gradients in the forward: "
                                           "expected a backward without create_graph=True"):
        torch.autograd.grad(loss, h, create_graph=True)


def _embed(E):
    return duo_fast.curriculum_embed(X0, 0.5, 3.0, E, seed=4)[0]


def _topk_embed(E):
    return duo_fast.curriculum_topk_embed(X0, 0.5, 3.0, 3, E, seed=4)[0]


@pytest.mark.parametrize("op,fn", [("curriculum_embed", _embed), ("curriculum_topk_embed", _topk_embed)])
def test_curriculum_gradient_penalty_raises(op, fn):
    E = torch.randn(K, 5, generator=torch.Generator().manual_seed(3), requires_grad=True)
    (ge,) = torch.autograd.grad(fn(E).pow(2).sum(), E, create_graph=True)
    with pytest.raises(RuntimeError, match=op + " " + SECOND + ".* w.r.t. embedding"):
        torch.autograd.grad(ge.pow(2).sum(), E)


def test_topk_embed_gradient_under_create_graph_matches_the_bag():
    """First-order use under create_graph=True stays exact: the weighted bag's gradient
    sum_i w_i grad_h[token] scattered to E[id_i] (float64 embedding_bag)."""
    E = torch.randn(K, 5, generator=torch.Generator().manual_seed(3), requires_grad=True)
    (ge,) = torch.autograd.grad(_topk_embed(E).pow(2).sum(), E, create_graph=True)
    ids, w, _ = duo_fast.curriculum_topk(X0, 0.5, 3.0, 3, K, seed=4)
    E64 = E.detach().double().requires_grad_()
    h = torch.nn.functional.embedding_bag(ids.reshape(-1, 3), E64, per_sample_weights=w.reshape(-1, 3).double(),
                                          mode="sum")
    (want,) = torch.autograd.grad(h.pow(2).sum(), E64)
    torch.testing.assert_close(ge.detach().double(), want, rtol=1e-5, atol=1e-5)


def test_gamma_to_alpha_is_differentiable_once():
    """d alpha / d gamma against the quadrature's derivative; the derivative of
    dalpha_dgamma (second order, or a loss that uses it) raises naming it."""
    g = torch.tensor([-5.0, -2.0, 0.0, 3.0, 12.0], dtype=torch.float64, requires_grad=True)
    alpha, _ = duo_fast.gamma_to_alpha(g, 50257)
    (grad,) = torch.autograd.grad((alpha * torch.arange(1.0, 6.0, dtype=torch.float64)).sum(), g)
    _, dref = reference.gamma_to_alpha(g.detach(), 50257)
    torch.testing.assert_close(grad, dref * torch.arange(1.0, 6.0, dtype=torch.float64), rtol=1e-7, atol=0)
    g32 = g.detach().float().requires_grad_()
    duo_fast.gamma_to_alpha(g32, 50257)[0].sum().backward()
    torch.testing.assert_close(g32.grad.double(), dref, rtol=1e-5, atol=1e-30)
    msg = "gamma_to_alpha is differentiable through alpha only: expected no gradient to flow into dalpha_dgamma"
    with pytest.raises(RuntimeError, match=msg):
        duo_fast.gamma_to_alpha(g, 50257)[1].sum().backward()
    (ga,) = torch.autograd.grad(duo_fast.gamma_to_alpha(g, 50257)[0].sum(), g, create_graph=True)
    with pytest.raises(RuntimeError, match=msg):
        ga.sum().backward()


# ---------------------------------------------------------------------------------------
# inputs an op does not differentiate: an error naming them
# ---------------------------------------------------------------------------------------


def _req(t):
    return t.clone().requires_grad_()


@pytest.mark.parametrize("which", ["alpha", "dalpha"])
@pytest.mark.parametrize("logits_grad", [False, True])
def test_usdm_loss_levels_are_not_differentiated(which, logits_grad):
    lv = {"alpha": A, "dalpha": D}
    lv[which] = _req(lv[which])
    lg = _logits(2, 3, K).requires_grad_(logits_grad)
    msg = _levels_grad(lambda: duo_fast.usdm_loss(lg, Z, X0, lv["alpha"], lv["dalpha"]).sum().backward())
    assert f"usdm_loss is not differentiable w.r.t. {which}: expected {which} not to require grad" in msg
    assert "compute_grad" not in msg  # the levels-only backward named an internal argument
    if logits_grad:
        msg = _levels_grad(lambda: duo_fast.usdm_loss(lg, Z, X0, lv["alpha"], lv["dalpha"], inplace_grad=True)
                           .sum().backward())
        assert f"w.r.t. {which}" in msg
    msg = _levels_grad(lambda: duo_fast.linear_usdm_loss(torch.randn(2, 3, 4, requires_grad=logits_grad),
                                                         torch.randn(K, 4), None, Z, X0, lv["alpha"], lv["dalpha"])
                       .sum().backward())
    assert f"linear_usdm_loss is not differentiable w.r.t. {which}" in msg


@pytest.mark.parametrize("which", ["logits", "alpha_t", "alpha_s"])
def test_posterior_is_not_differentiable(which):
    args = {"logits": _logits(2, 3, K), "alpha_t": torch.tensor([0.2, 0.3]), "alpha_s": torch.tensor([0.5, 0.6])}
    args[which] = _req(args[which])
    q = duo_fast.posterior(args["logits"], Z, args["alpha_t"], args["alpha_s"])
    with pytest.raises(RuntimeError, match=f"posterior is not differentiable w.r.t. {which}: expected {which} not "
                                           "to require grad"):
        q[..., 0].sum().backward()


@pytest.mark.parametrize("which", ["gamma", "inv_tau"])
@pytest.mark.parametrize("op", ["curriculum_topk", "curriculum_embed", "curriculum_topk_embed"])
def test_curriculum_levels_are_not_differentiated(which, op):
    lv = {"gamma": torch.tensor([0.5, 1.0], dtype=torch.float64), "inv_tau": torch.tensor([2.0, 3.0])}
    lv[which] = _req(lv[which])
    E = torch.randn(K, 4, requires_grad=True)
    out = {
        "curriculum_topk": lambda: duo_fast.curriculum_topk(X0, lv["gamma"], lv["inv_tau"], 3, K, seed=1)[1],
        "curriculum_embed": lambda: duo_fast.curriculum_embed(X0, lv["gamma"], lv["inv_tau"], E, seed=1)[0],
        "curriculum_topk_embed": lambda: duo_fast.curriculum_topk_embed(X0, lv["gamma"], lv["inv_tau"], 3, E, seed=1)[0],
    }[op]()
    with pytest.raises(RuntimeError, match=f"{op} is not differentiable w.r.t. {which}: expected {which} not to "
                                           "require grad"):
        out.sum().backward()


@pytest.mark.parametrize("which", ["logits", "temperature"])
def test_canvas_step_is_not_differentiable(which):
    args = {"logits": _logits(2, 3, K), "temperature": torch.tensor([0.5, 2.0])}
    args[which] = _req(args[which])
    _, _, entropy = duo_fast.canvas_step(args["logits"], temperature=args["temperature"], seed=1)
    with pytest.raises(RuntimeError, match=f"canvas_step is not differentiable w.r.t. {which}: expected {which} not "
                                           "to require grad"):
        entropy.sum().backward()


@pytest.mark.parametrize("which", ["logits", "embedding", "temperature"])
def test_softmax_embed_backward_names_the_argument(which):
    args = {"logits": _logits(2, 3, K), "embedding": torch.randn(K, 4), "temperature": torch.tensor([0.5, 2.0])}
    args[which] = _req(args[which])
    h = duo_fast.softmax_embed(args["logits"], args["embedding"], temperature=args["temperature"])
    with pytest.raises(RuntimeError, match=f"softmax_embed is forward only .*: expected {which} not to require grad"):
        h.sum().backward()


# ---------------------------------------------------------------------------------------
# torch.func: refused with a clear error (vmap of a forward still works)
# ---------------------------------------------------------------------------------------

FUNC_OPS = {
    "usdm_loss": lambda x: duo_fast.usdm_loss(x, Z, X0, A, D).sum(),
    "usdm_loss(inplace_grad)": lambda x: duo_fast.usdm_loss(x, Z, X0, A, D, inplace_grad=True).sum(),
    "distill_kl": lambda x: duo_fast.distill_kl(x, _logits(2, 3, K, seed=1)).sum(),
    "linear_usdm_loss": lambda x: duo_fast.linear_usdm_loss(x[..., :4], torch.ones(K, 4), None, Z, X0, A, D).sum(),
    "linear_distill_kl": lambda x: duo_fast.linear_distill_kl(x[..., :4], torch.ones(K, 4), None, x[..., :4].detach(),
                                                              torch.ones(K, 4), None).sum(),
    "posterior": lambda x: duo_fast.posterior(x, Z, torch.zeros(2), torch.full((2,), 0.5))[..., 0].sum(),
    "gamma_to_alpha": lambda x: duo_fast.gamma_to_alpha(x[0, 0], K)[0].sum(),
    "curriculum_embed": lambda x: duo_fast.curriculum_embed(X0, 0.0, 1.0, x[0], seed=1)[0].sum(),
    "curriculum_topk_embed": lambda x: duo_fast.curriculum_topk_embed(X0, 0.0, 1.0, 2, x[0], seed=1)[0].sum(),
    "curriculum_topk": lambda x: duo_fast.curriculum_topk(X0, x[0, 0, :2].double(), 1.0, 2, K, seed=1)[1].sum(),
    "canvas_step": lambda x: duo_fast.canvas_step(x, seed=1)[2].sum(),
    "softmax_embed": lambda x: duo_fast.softmax_embed(x, torch.ones(K, 4)).sum(),
}


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp"])
@pytest.mark.parametrize("name", list(FUNC_OPS))
def test_func_transforms_are_refused_by_name(name, transform):
    fn, x = FUNC_OPS[name], _logits(2, 3, K)
    op = name.split("(")[0]
    call = {"grad": lambda: torch.func.grad(fn)(x), "jacrev": lambda: torch.func.jacrev(fn)(x),
            "jvp": lambda: torch.func.jvp(fn, (x,), (torch.ones_like(x),))}[transform]
    with pytest.raises(NotImplementedError, match=f"duo_fast: {op} does not support torch.func transforms that "
                                                  "differentiate"):
        call()


def test_vmap_of_a_forward_still_works():
    xs = torch.stack([_logits(2, 3, K, seed=s) for s in range(3)])
    got = torch.func.vmap(lambda x: duo_fast.usdm_loss(x, Z, X0, A, D))(xs)
    want = torch.stack([reference.usdm_loss(x.double(), Z, X0, A, D) for x in xs])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# inplace_grad=True on an empty batch (was an IndexError in backward)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_inplace_grad_on_an_empty_batch(dtype, scale):
    lg = torch.randn(0, 3, K, dtype=dtype, requires_grad=True)
    e = torch.empty(0, 3, dtype=torch.int64)
    (duo_fast.usdm_loss(lg, e, e, torch.empty(0), torch.empty(0), inplace_grad=True).sum() * scale).backward()
    assert lg.grad.shape == (0, 3, K) and lg.grad.dtype == dtype
    s = torch.randn(0, K, dtype=dtype, requires_grad=True)
    (duo_fast.distill_kl(s, torch.randn(0, K), inplace_grad=True).sum() * scale).backward()
    assert s.grad.shape == (0, K)
