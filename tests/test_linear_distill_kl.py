"""duo_fast.linear_distill_kl (docs/math.md §3, the distillation KL fused with the output
layer): per-token KL and its gradients w.r.t. the student's hidden, weight and
bias against the float64 reference (reference.distill_kl on the materialized
logits + autograd), both directions, reductions, chunk sizes, bfloat16, the
teacher without a graph, torch.compile, no [N, K] tensor at GPT-2's vocabulary
(allocations tracked), and bad inputs naming the argument."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import duo_fast
from duo_fast import reference


def _problem(B=2, L=5, d=16, d_t=12, K=37, seed=0, bias=True, teacher_bias=True):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(B, L, d, generator=g),
        weight=torch.randn(K, d, generator=g) / d**0.5 * 2,
        bias=torch.randn(K, generator=g) * 0.3 if bias else None,
        t_hidden=torch.randn(B, L, d_t, generator=g),
        t_weight=torch.randn(K, d_t, generator=g) / d_t**0.5 * 2,
        t_bias=torch.randn(K, generator=g) * 0.3 if teacher_bias else None,
    )


def _params(p, device, dtype=torch.float32):
    """The student's parameters as leaves requiring grad (bias None stays None)."""
    return [None if t is None else t.clone().to(device, dtype).requires_grad_() for t in (p["hidden"], p["weight"], p["bias"])]


def _teacher(p, device, dtype=torch.float32):
    return [None if t is None else t.to(device, dtype) for t in (p["t_hidden"], p["t_weight"], p["t_bias"])]


def _reference(params, teacher, direction):
    """float64 KL of the materialized logits (reference.linear_distill_kl), differentiable
    w.r.t. float64 copies of params."""
    ref_params = [None if t is None else t.detach().cpu().double().requires_grad_() for t in params]
    kl = reference.linear_distill_kl(*ref_params, *[None if t is None else t.cpu() for t in teacher], direction)
    return kl, ref_params


def _assert_grads_close(params, ref_params, rel):
    for p, rp in zip(params, ref_params):
        if p is None:
            continue
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.shape == p.shape
        err = (p.grad.cpu().double() - rp.grad).abs().max()
        assert err <= rel * rp.grad.abs().max(), (err, rp.grad.abs().max())


@pytest.mark.parametrize("direction", ["bwd", "fwd"])
@pytest.mark.parametrize("chunk_size,bias,teacher_bias", [(1, True, True), (3, False, True), (4, True, False), (None, True, True)])
def test_matches_reference_on_full_logits(direction, chunk_size, bias, teacher_bias, device):
    # cuda: the CUDA kernel's float32 math (as tests/test_distill_kl.py)
    cuda = device != "cpu"
    p = _problem(bias=bias, teacher_bias=teacher_bias)
    params, teacher = _params(p, device), _teacher(p, device)
    kl = duo_fast.linear_distill_kl(*params, *teacher, direction, chunk_size=chunk_size)
    assert kl.shape == (2, 5) and kl.dtype == torch.float32
    ref, ref_params = _reference(params, teacher, direction)
    torch.testing.assert_close(kl.detach().cpu().double(), ref.detach(), rtol=1e-4 if cuda else 1e-5, atol=1e-6)
    w = torch.randn(kl.shape, generator=torch.Generator().manual_seed(7))
    (kl * w.to(device)).sum().backward()
    (ref * w.double()).sum().backward()
    _assert_grads_close(params, ref_params, 3e-4 if cuda else 1e-4)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("direction,chunk_size", [("bwd", 3), ("fwd", 4), ("bwd", 1000)])
def test_reduced_kl_and_gradients_match_reference(reduction, direction, chunk_size, device):
    # the gradients are computed in the forward and scaled by the scalar grad_output (2.5) in backward
    cuda = device != "cpu"
    p = _problem(L=7, seed=1)
    params, teacher = _params(p, device), _teacher(p, device)
    kl = duo_fast.linear_distill_kl(*params, *teacher, direction, chunk_size=chunk_size, reduction=reduction)
    assert kl.shape == () and kl.dtype == torch.float32
    ref, ref_params = _reference(params, teacher, direction)
    ref = ref.sum() if reduction == "sum" else ref.mean()
    torch.testing.assert_close(kl.detach().cpu().double(), ref.detach(), rtol=1e-4 if cuda else 1e-5, atol=1e-6)
    (kl * 2.5).backward()
    (ref * 2.5).backward()
    _assert_grads_close(params, ref_params, 3e-4 if cuda else 1e-4)
    with pytest.raises(RuntimeError, match=r"linear_distill_kl\(..., reduction=...\) supports a single backward"):
        kl.backward()
    with torch.no_grad():  # no gradient wanted: the value alone
        again = duo_fast.linear_distill_kl(*[t.detach() for t in params], *teacher, direction, chunk_size=chunk_size,
                                           reduction=reduction)
    torch.testing.assert_close(again.cpu().double(), ref.detach(), rtol=1e-4 if cuda else 1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bfloat16(reduction):
    """bf16 hidden and parameters (autocast-style): the chunk's logits are formed in
    bf16 and read natively; the value is the float64 KL of those bf16 logits, the
    gradients those of the float64 reference within bf16's rounding of the logits."""
    p = _problem(seed=2, d=32, d_t=32)
    params, teacher = _params(p, "cpu", torch.bfloat16), _teacher(p, "cpu", torch.bfloat16)
    kl = duo_fast.linear_distill_kl(*params, *teacher, "bwd", chunk_size=3, reduction=reduction)
    h, w, b = params
    with torch.no_grad():
        exact = reference.distill_kl(torch.nn.functional.linear(h, w, b), torch.nn.functional.linear(*teacher), "bwd")
    exact = exact if reduction == "none" else exact.mean()
    torch.testing.assert_close(kl.detach().double(), exact, rtol=1e-5, atol=1e-6)
    kl.sum().backward()
    ref, ref_params = _reference(params, teacher, "bwd")
    (ref if reduction == "none" else ref.mean()).sum().backward()
    _assert_grads_close(params, ref_params, 3e-2)


def test_teacher_gets_no_gradient_and_only_some_inputs_require_grad():
    p = _problem(seed=3)
    th = p["t_hidden"].clone().requires_grad_()
    tw = p["t_weight"].clone().requires_grad_()
    w = p["weight"].clone().requires_grad_()
    kl = duo_fast.linear_distill_kl(p["hidden"], w, p["bias"], th, tw, p["t_bias"], "fwd", chunk_size=4)
    kl.sum().backward()
    assert th.grad is None and tw.grad is None
    wr = p["weight"].double().requires_grad_()
    student = p["hidden"].double() @ wr.t() + p["bias"].double()
    teacher = p["t_hidden"].double() @ p["t_weight"].double().t() + p["t_bias"].double()
    reference.distill_kl(student, teacher, "fwd").sum().backward()
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)


def test_compiled_matches_eager():
    p = _problem(seed=4)
    results = []
    for run in (lambda f: f, lambda f: torch.compile(f, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        w = p["weight"].clone().requires_grad_()

        def fn(h, w):
            return (duo_fast.linear_distill_kl(h, w, p["bias"], p["t_hidden"], p["t_weight"], p["t_bias"], "bwd",
                                               chunk_size=4) * 1.5).sum()

        loss = run(fn)(p["hidden"], w)
        loss.backward()
        results.append((loss.detach(), w.grad))
    torch._dynamo.reset()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


class KWideTensors(TorchDispatchMode):
    """Records the most rows of any tensor made while active whose last dimension
    is K (logits-like: [rows, K]; the [K, d] weight and its gradient are not)."""

    def __init__(self, K: int):
        super().__init__()
        self.K, self.max_rows, self.ops = K, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.K:
                rows = t.numel() // self.K
                if rows > 1:
                    self.ops.add(str(func.overloadpacket.__name__))
                self.max_rows = max(self.max_rows, rows)
        return out


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_no_tensor_of_all_tokens_by_vocabulary(reduction):
    """At GPT-2's vocabulary, forward and backward never make a [N, K] tensor: every
    logits-like tensor has at most the default chunk's rows (333 at K = 50257)."""
    K, N, d = 50257, 700, 8
    p = _problem(B=1, L=N, d=d, d_t=d, K=K, seed=5)
    params, teacher = _params(p, "cpu"), _teacher(p, "cpu")
    chunk = duo_fast.ops._linear_chunks.default_chunk_size(K, d)
    assert chunk < N
    with KWideTensors(K) as seen:
        duo_fast.linear_distill_kl(*params, *teacher, "bwd", reduction=reduction).sum().backward()
    assert 0 < seen.max_rows <= chunk, (seen.max_rows, seen.ops)
    assert all(t.grad is not None for t in params)


def test_bad_inputs_name_the_argument():
    p = _problem()
    args = [p["hidden"], p["weight"], p["bias"], p["t_hidden"], p["t_weight"], p["t_bias"]]

    def call(i=None, value=None, *rest, **kw):
        a = list(args)
        if i is not None:
            a[i] = value
        return duo_fast.linear_distill_kl(*a, *rest, **kw)

    with pytest.raises(ValueError, match=r"weight must be \[K, d\] with d = student_hidden.size\(-1\)"):
        call(1, p["weight"][:, :3])
    with pytest.raises(ValueError, match="bias has shape"):
        call(2, p["bias"][:3])
    with pytest.raises(ValueError, match=r"teacher_weight must be \[K, d\] with d = teacher_hidden.size\(-1\)"):
        call(4, p["t_weight"][:, :3])
    with pytest.raises(ValueError, match="teacher_bias has shape"):
        call(5, p["t_bias"][:3])
    with pytest.raises(ValueError, match="teacher_weight has 36 rows"):
        duo_fast.linear_distill_kl(*args[:4], p["t_weight"][:36], None)
    with pytest.raises(ValueError, match="teacher_hidden has shape"):
        call(3, p["t_hidden"][:, :4])
    with pytest.raises(TypeError, match="teacher_hidden must be a floating tensor"):
        call(3, p["t_hidden"].long())
    with pytest.raises(TypeError, match="student_hidden must be a torch.Tensor"):
        call(0, [1.0])
    with pytest.raises(ValueError, match="direction must be 'bwd' or 'fwd'"):
        call(None, None, "kl")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        call(chunk_size=0)
    with pytest.raises(ValueError, match="reduction must be"):
        call(reduction="avg")


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_double_backward_raises(reduction):
    """The kernels' gradient has no graph: a second-order gradient must raise, not come back as 0."""
    p = _problem(seed=6)
    params = _params(p, "cpu")
    kl = duo_fast.linear_distill_kl(*params, *_teacher(p, "cpu"), "bwd", chunk_size=4, reduction=reduction)
    (g,) = torch.autograd.grad(kl.sum(), params[0], create_graph=True)
    assert not g.requires_grad  # once_differentiable: no graph through the gradient
    with pytest.raises(RuntimeError, match="does not require grad"):
        g.sum().backward()
    # a grad_output that requires grad: the error is delayed to the second backward
    kl = duo_fast.linear_distill_kl(*params, *_teacher(p, "cpu"), "bwd", chunk_size=4, reduction=reduction)
    c = torch.tensor(2.0, requires_grad=True)
    (g,) = torch.autograd.grad(kl.sum() * c, params[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_nan_hidden_gives_nan_rows():
    """Bad values propagate (docs/bad_values.md): a NaN in one token's hidden state gives
    that token a NaN KL and the NaN reaches the parameter gradients; the other tokens'
    KLs are those of the reference."""
    p = _problem(seed=7)
    params, teacher = _params(p, "cpu"), _teacher(p, "cpu")
    with torch.no_grad():
        params[0][1, 2, 3] = float("nan")
    kl = duo_fast.linear_distill_kl(*params, *teacher, "bwd", chunk_size=4)
    bad = torch.zeros(kl.shape, dtype=torch.bool)
    bad[1, 2] = True
    assert bool(kl[bad].isnan().all()) and not bool(kl[~bad].isnan().any())
    ref, _ = _reference(params, teacher, "bwd")
    torch.testing.assert_close(kl[~bad].detach().double(), ref[~bad].detach(), rtol=1e-5, atol=1e-6)
    kl.sum().backward()
    assert bool(params[0].grad[1, 2].isnan().all()) and not bool(params[0].grad[0].isnan().any())
    assert bool(params[1].grad.isnan().any())
