"""duo_fast.linear_usdm_loss (docs/math.md §3, fused linear + loss): values and gradients
w.r.t. hidden, weight and bias against the float64 reference applied to the full
logits, chunk-size independence, memory independent of N, and bad inputs."""

from __future__ import annotations

import pytest
import torch

import duo_fast
from duo_fast import reference


def _problem(B=2, L=5, d=16, K=37, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, d, generator=g)
    weight = torch.randn(K, d, generator=g) / d**0.5
    b = torch.randn(K, generator=g) * 0.1 if bias else None
    x0 = torch.randint(0, K, (B, L), generator=g)
    z = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, K, (B, L), generator=g))
    alpha = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=torch.float64)
    dalpha = -(0.5 + torch.rand(B, generator=g, dtype=torch.float64))
    return hidden, weight, b, z, x0, alpha, dalpha


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_on_full_logits(chunk_size, bias, device):
    # cuda: the CUDA usdm_loss's float32 entries (1e-4, as tests/test_usdm_loss.py)
    cuda = device != "cpu"
    hidden, weight, b, z, x0, alpha, dalpha = _problem(bias=bias)
    params = [t.clone().to(device).requires_grad_() for t in ([hidden, weight] + ([b] if bias else []))]
    loss = duo_fast.linear_usdm_loss(params[0], params[1], params[2] if bias else None, z.to(device), x0.to(device),
                                     alpha.to(device), dalpha.to(device), chunk_size=chunk_size).cpu()
    ref_params = [p.detach().cpu().double().requires_grad_() for p in params]
    logits = ref_params[0] @ ref_params[1].t() + (ref_params[2] if bias else 0)
    ref = reference.usdm_loss(logits, z, x0, alpha, dalpha)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4 if cuda else 1e-5, atol=1e-5)
    w = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7))
    (loss * w).sum().backward()
    (ref * w.double()).sum().backward()
    for p, rp in zip(params, ref_params):
        scale = rp.grad.abs().max()
        assert ((p.grad.cpu().double() - rp.grad).abs() <= (3e-4 if cuda else 1e-4) * scale).all()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_size,bias", [(3, True), (4, False), (1000, True)])
def test_reduced_loss_and_gradients_match_reference(reduction, chunk_size, bias, device):
    # reduction="sum" / "mean": the gradients are computed in the forward and scaled
    # by the scalar grad_output in backward (2.5 here: the scaling is exercised).
    cuda = device != "cpu"
    hidden, weight, b, z, x0, alpha, dalpha = _problem(L=7, bias=bias)
    params = [t.clone().to(device).requires_grad_() for t in ([hidden, weight] + ([b] if bias else []))]
    loss = duo_fast.linear_usdm_loss(params[0], params[1], params[2] if bias else None, z.to(device), x0.to(device),
                                     alpha.to(device), dalpha.to(device), chunk_size=chunk_size, reduction=reduction)
    assert loss.shape == () and loss.dtype == torch.float32
    ref_params = [p.detach().cpu().double().requires_grad_() for p in params]
    ref = reference.linear_usdm_loss(ref_params[0], ref_params[1], ref_params[2] if bias else None, z, x0, alpha, dalpha)
    ref = ref.sum() if reduction == "sum" else ref.mean()
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=1e-4 if cuda else 1e-5, atol=1e-5)
    (loss * 2.5).backward()
    (ref * 2.5).backward()
    for p, rp in zip(params, ref_params):
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
        assert ((p.grad.cpu().double() - rp.grad).abs() <= (3e-4 if cuda else 1e-4) * rp.grad.abs().max()).all()
    with pytest.raises(RuntimeError, match="supports a single backward"):
        loss.backward()
    with torch.no_grad():  # no gradient wanted: the value alone
        again = duo_fast.linear_usdm_loss(*[p.detach() for p in params[:2]], params[2].detach() if bias else None,
                                          z.to(device), x0.to(device), alpha.to(device), dalpha.to(device),
                                          chunk_size=chunk_size, reduction=reduction)
    torch.testing.assert_close(again.cpu().double(), ref.detach(), rtol=1e-4 if cuda else 1e-5, atol=1e-5)


def test_reduced_only_some_inputs_require_grad_and_bad_reduction():
    hidden, weight, b, z, x0, alpha, dalpha = _problem()
    w = weight.clone().requires_grad_()
    duo_fast.linear_usdm_loss(hidden, w, b, z, x0, alpha, dalpha, chunk_size=4, reduction="mean").backward()
    wr = weight.double().requires_grad_()
    reference.linear_usdm_loss(hidden.double(), wr, b, z, x0, alpha, dalpha).mean().backward()
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        duo_fast.linear_usdm_loss(hidden, w, b, z, x0, alpha, dalpha, reduction="avg")


def test_only_some_inputs_require_grad():
    hidden, weight, b, z, x0, alpha, dalpha = _problem()
    w = weight.clone().requires_grad_()
    duo_fast.linear_usdm_loss(hidden, w, b, z, x0, alpha, dalpha, chunk_size=4).sum().backward()
    assert w.grad is not None and w.grad.shape == weight.shape


def test_peak_memory_does_not_grow_with_tokens():
    """Chunks of 128 tokens x K=10000 (5 MiB of logits each): going from N=512 to
    N=8192 tokens, full logits (and their gradient) would add >= 293 MiB of peak
    memory; the chunked op adds only allocator noise (measured 0-55 MiB here, at
    any N), so the growth must stay well below the O(N K) amount."""
    def peak_mib(N):
        hidden, weight, b, z, x0, alpha, dalpha = _problem(B=1, L=N, d=32, K=10000, seed=N)
        hidden.requires_grad_()
        weight.requires_grad_()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = int(open("/proc/self/statm").read().split()[1]) * 4096
        duo_fast.linear_usdm_loss(hidden, weight, b, z, x0, alpha, dalpha, chunk_size=128).sum().backward()
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
        return (int(hwm.split()[1]) * 1024 - base) / 2**20

    full_logits_growth = (8192 - 512) * 10000 * 4 / 2**20  # 293 MiB
    small, large = peak_mib(512), peak_mib(8192)
    assert large - small < 0.4 * full_logits_growth, (small, large)


def test_bad_inputs_name_the_argument():
    hidden, weight, b, z, x0, alpha, dalpha = _problem()
    with pytest.raises(ValueError, match="weight must be"):
        duo_fast.linear_usdm_loss(hidden, weight[:, :3], b, z, x0, alpha, dalpha)
    with pytest.raises(ValueError, match="bias has shape"):
        duo_fast.linear_usdm_loss(hidden, weight, b[:3], z, x0, alpha, dalpha)
    with pytest.raises(ValueError, match="z has shape"):
        duo_fast.linear_usdm_loss(hidden, weight, b, z[:, :2], x0, alpha, dalpha)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        duo_fast.linear_usdm_loss(hidden, weight, b, z, x0, alpha, dalpha, chunk_size=0)
    with pytest.raises(RuntimeError, match="x0 holds token ids"):
        duo_fast.linear_usdm_loss(hidden, weight, b, z, x0 + 37, alpha, dalpha)
