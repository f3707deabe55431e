"""duo_fast.distill_kl (docs/math.md §3) against the float64 reference: values and
gradients (both directions, odd K, K=2, peaked and flat logits), gradcheck-style
checks, opcheck, the emulated CUDA kernel, and bad inputs."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import duo_fast
from duo_fast import reference
from conftest import ptr


def _logits(shape, scale=3.0, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


CASES = [((2, 3, 7), 3.0), ((4, 1, 2), 1.0), ((3, 5, 257), 5.0), ((2, 2, 50257), 2.0), ((1, 3, 1000), 30.0)]


@pytest.mark.parametrize("direction", ["bwd", "fwd"])
@pytest.mark.parametrize("shape,scale", CASES)
def test_value_and_gradient_match_reference(direction, shape, scale, device):
    # cuda: float32 throughout, held to its emulated twin's / test_cuda_device_matches_cpu's 1e-4
    cuda = device != "cpu"
    s = _logits(shape, scale, 1).to(device).requires_grad_()
    t = _logits(shape, scale, 2)
    kl = duo_fast.distill_kl(s, t.to(device), direction)
    assert kl.shape == shape[:-1] and kl.dtype == torch.float32 and kl.device == s.device
    s64 = s.detach().cpu().double().requires_grad_()
    ref = reference.distill_kl(s64, t.double(), direction)
    torch.testing.assert_close(kl.cpu().double(), ref.detach(), rtol=1e-4 if cuda else 1e-5, atol=2e-5 if cuda else 1e-6)
    w = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(3))
    (kl * w.to(device)).sum().backward()
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=1e-4 if cuda else 1e-5, atol=1e-6 if cuda else 1e-7)


HALF = [torch.bfloat16, torch.float16]
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _assert_half_grad_close(grad, ref_grad, dtype):
    """A gradient written in `dtype` against the float64 reference of the same
    (upcast) logits: the float32 tolerance (1e-5 relative + 1e-7) plus one
    rounding to `dtype` (half an ulp: 2^-8 relative for bfloat16, 2^-11 for
    float16, and 2^-25 absolute below float16's smallest normal)."""
    assert grad.dtype == dtype
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    tiny = 2.0**-25 if dtype == torch.float16 else 0.0
    bound = (eps + 1e-5) * ref_grad.abs() + 1e-7 + tiny
    err = (grad.double() - ref_grad).abs()
    assert bool((err <= bound).all()), (err / bound).max()


@pytest.mark.parametrize("direction", ["bwd", "fwd"])
@pytest.mark.parametrize("sdtype,tdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
@pytest.mark.parametrize("shape,scale", [((2, 3, 7), 3.0), ((3, 5, 257), 5.0), ((1, 2, 50257), 2.0)])
def test_half_logits_read_natively(direction, sdtype, tdtype, shape, scale):
    """16-bit logits (each law its own dtype) against the float64 reference on the
    exactly upcast values: the KL within the float32 tolerance, the gradient in
    the student's dtype within one rounding."""
    s = _logits(shape, scale, 1).to(sdtype).requires_grad_()
    t = _logits(shape, scale, 2).to(tdtype)
    kl = duo_fast.distill_kl(s, t, direction)
    assert kl.dtype == torch.float32
    s64 = s.detach().double().requires_grad_()
    ref = reference.distill_kl(s64, t.double(), direction)
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    kl.sum().backward()  # grad_output = 1: the stored gradient is rounded once
    ref.sum().backward()
    _assert_half_grad_close(s.grad, s64.grad, sdtype)


@pytest.mark.parametrize("direction", ["bwd", "fwd"])
def test_gradcheck_float32(direction):
    """Finite differences on the public function (the op is float32-only, so the
    step and tolerances are float32-sized; the float64 comparison above is tight)."""
    s = _logits((2, 2, 5), 1.0, 11).requires_grad_()
    t = _logits((2, 2, 5), 1.0, 12)
    with pytest.warns(UserWarning):  # gradcheck warns about non-double inputs
        assert torch.autograd.gradcheck(lambda x: duo_fast.distill_kl(x, t, direction), (s,), eps=1e-2, atol=2e-3, rtol=2e-2)


def test_identical_distributions_give_zero():
    s = _logits((3, 4, 100), 4.0)
    for d in ("bwd", "fwd"):
        kl = duo_fast.distill_kl(s, s.clone(), d)
        assert kl.abs().max().item() < 1e-6
    # Shifting logits by a constant changes nothing.
    torch.testing.assert_close(duo_fast.distill_kl(s, s + 7.0, "bwd"), torch.zeros(3, 4), atol=1e-6, rtol=0)


def test_teacher_gets_no_gradient_and_noncontiguous_inputs():
    s = _logits((5, 3, 33), 2.0, 4).transpose(0, 1).requires_grad_()  # non-contiguous
    t = _logits((5, 3, 33), 2.0, 5).transpose(0, 1).requires_grad_()
    kl = duo_fast.distill_kl(s, t)
    kl.sum().backward()
    assert t.grad is None and s.grad.shape == s.shape
    ref = reference.distill_kl(s.detach().double(), t.detach().double())
    torch.testing.assert_close(kl.detach().double(), ref, rtol=1e-5, atol=1e-6)


def test_no_grad_path_and_double_backward_error():
    s = _logits((2, 3, 11))
    t = _logits((2, 3, 11), seed=9)
    with torch.no_grad():
        kl = duo_fast.distill_kl(s.requires_grad_(), t)
    assert not kl.requires_grad


def test_opcheck():
    s = _logits((2, 3, 9), 2.0, 6)
    t = _logits((2, 3, 9), 2.0, 7)
    for direction in (0, 1):
        torch.library.opcheck(torch.ops.duo_fast.distill_kl.default, (s, t, direction, False))
        torch.library.opcheck(torch.ops.duo_fast.distill_kl.default, (s.clone().requires_grad_(), t, direction, True))
        for sd, td in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
            sh, th = s.to(sd), t.to(td)
            torch.library.opcheck(torch.ops.duo_fast.distill_kl.default, (sh, th, direction, False))
            torch.library.opcheck(torch.ops.duo_fast.distill_kl.default, (sh.clone().requires_grad_(), th, direction, True))
        torch.library.opcheck(torch.ops.duo_fast.distill_kl.into, (s, t, direction, torch.empty_like(s)))


@pytest.mark.parametrize("direction", [0, 1])
def test_into_writes_the_gradient_into_the_given_tensor(direction):
    # distill_kl.into (the chunks of linear_distill_kl reuse one gradient block):
    # the KL and the gradient written into grad (which starts as NaN), against the
    # float64 reference with test_value_and_gradient_match_reference's tolerances.
    s, t = _logits((3, 4, 777), 2.0, 1), _logits((3, 4, 777), 2.0, 2)
    grad = torch.full_like(s, math.nan)
    kl = torch.ops.duo_fast.distill_kl.into(s, t, direction, grad)
    s64 = s.double().requires_grad_()
    ref = reference.distill_kl(s64, t.double(), ("bwd", "fwd")[direction])
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    ref.sum().backward()
    torch.testing.assert_close(grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="grad shares memory with teacher_logits"):
        torch.ops.duo_fast.distill_kl.into(s, t, direction, t)
    with pytest.raises(RuntimeError, match="grad must have student_logits's dtype"):
        torch.ops.duo_fast.distill_kl.into(s, t, direction, torch.empty_like(s, dtype=torch.float16))


def test_bad_inputs_name_the_argument():
    s, t = _logits((2, 5)), _logits((2, 5))
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        duo_fast.distill_kl(s, _logits((2, 6)))
    with pytest.raises(TypeError, match="student_logits has dtype float64"):  # float64: use the reference
        duo_fast.distill_kl(s.double(), t)
    with pytest.raises(ValueError, match="direction must be 'bwd' or 'fwd'"):
        duo_fast.distill_kl(s, t, "both")
    with pytest.raises(ValueError, match="K >= 2"):
        duo_fast.distill_kl(_logits((2, 1)), _logits((2, 1)))
    with pytest.raises(RuntimeError, match="direction must be 0"):
        torch.ops.duo_fast.distill_kl(s, t, 3, False)
    with pytest.raises(RuntimeError, match="teacher_logits has shape"):
        torch.ops.duo_fast.distill_kl(s, _logits((5, 2)), 0, False)


# ---- the CUDA kernel's own source on the CPU ----


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 3), ("thread", 0)])
@pytest.mark.parametrize("direction", [0, 1])
def test_emulated_cuda_kernel_matches_cpu(harness, emulated, mode, seed, direction):
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    try:
        for rows, K in [(3, 2), (5, 1000), (2, 50257)]:
            s = _logits((rows, K), 4.0, seed + K)
            t = _logits((rows, K), 4.0, seed + K + 1)
            kl, grad = torch.empty(rows), torch.empty(rows, K)
            rc = emulated.df_emu_distill_kl(ptr(s), 0, ptr(t), 0, ptr(kl), ptr(grad), ctypes.c_int64(rows), ctypes.c_int64(K), direction)
            assert rc == 0
            ckl, cgrad = torch.ops.duo_fast.distill_kl(s, t, direction, True)
            # float32 accumulation on the device path vs float64 on CPU.
            torch.testing.assert_close(kl, ckl, rtol=1e-4, atol=2e-5)
            torch.testing.assert_close(grad, cgrad, rtol=1e-4, atol=1e-6)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("sdtype,tdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16),
                                           (torch.float32, torch.float16)])
def test_emulated_cuda_kernel_half_logits(harness, emulated, direction, sdtype, tdtype):
    """The CUDA kernel on 16-bit logits against the float64 reference on the upcast
    values: the KL within the device path's float32 tolerance, the gradient in
    the student's dtype within one rounding."""
    for rows, K in [(3, 2), (4, 1001), (2, 50257)]:
        s = _logits((rows, K), 4.0, K).to(sdtype)
        t = _logits((rows, K), 4.0, K + 1).to(tdtype)
        kl, grad = torch.empty(rows), torch.empty((rows, K), dtype=sdtype)
        rc = emulated.df_emu_distill_kl(ptr(s), DTYPE_CODE[sdtype], ptr(t), DTYPE_CODE[tdtype], ptr(kl), ptr(grad),
                                        ctypes.c_int64(rows), ctypes.c_int64(K), direction)
        assert rc == 0
        s64 = s.double().requires_grad_()
        ref = reference.distill_kl(s64, t.double(), "bwd" if direction == 0 else "fwd")
        ref.sum().backward()
        torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-4, atol=2e-5)
        # float32 entries on the device: 1e-4 relative + 1e-6 (the float32 comparison above) plus one rounding
        eps = 2.0**-8 if sdtype == torch.bfloat16 else 2.0**-11 if sdtype == torch.float16 else 0.0
        tiny = 2.0**-25 if sdtype == torch.float16 else 0.0
        err = (grad.double() - s64.grad).abs()
        assert bool((err <= (eps + 1e-4) * s64.grad.abs() + 1e-6 + tiny).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernel_matches_cpu runs this kernel's source on the CPU")
@pytest.mark.parametrize("direction", ["bwd", "fwd"])
def test_cuda_device_matches_cpu(direction):
    s = _logits((4, 8, 50257), 3.0, 1)
    t = _logits((4, 8, 50257), 3.0, 2)
    sc = s.cuda().requires_grad_()
    kl = duo_fast.distill_kl(sc, t.cuda(), direction)
    kl.sum().backward()
    sr = s.clone().requires_grad_()
    ref = duo_fast.distill_kl(sr, t, direction)
    ref.sum().backward()
    torch.testing.assert_close(kl.cpu(), ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(sc.grad.cpu(), sr.grad, rtol=1e-4, atol=1e-6)
    torch.library.opcheck(torch.ops.duo_fast.distill_kl.default, (s[:1, :2].cuda(), t[:1, :2].cuda(), 0, False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; test_emulated_cuda_kernel_half_logits runs this kernel's source on the CPU")
@pytest.mark.parametrize("direction", ["bwd", "fwd"])
@pytest.mark.parametrize("sdtype,tdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_cuda_device_half_logits(direction, sdtype, tdtype):
    """The real-GPU twin of test_emulated_cuda_kernel_half_logits."""
    s = _logits((2, 4, 50257), 3.0, 1).to(sdtype)
    t = _logits((2, 4, 50257), 3.0, 2).to(tdtype)
    sc = s.cuda().requires_grad_()
    kl = duo_fast.distill_kl(sc, t.cuda(), direction)
    kl.sum().backward()
    s64 = s.double().requires_grad_()
    ref = reference.distill_kl(s64, t.double(), direction)
    ref.sum().backward()
    torch.testing.assert_close(kl.cpu().double(), ref.detach(), rtol=1e-4, atol=2e-5)
    eps = 2.0**-8 if sdtype == torch.bfloat16 else 2.0**-11
    err = (sc.grad.cpu().double() - s64.grad).abs()
    assert sc.grad.dtype == sdtype and bool((err <= (eps + 1e-4) * s64.grad.abs() + 1e-6 + 2.0**-25).all())


@pytest.mark.parametrize("direction", ["bwd", "fwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inplace_grad_matches_reference_and_runs_once(direction, dtype):
    # inplace_grad=True scales the forward's gradient buffer in place: against the
    # float64 reference within the out-of-place bound (one more rounding of the
    # product in 16 bits), the same bits as out of place, and a second backward
    # raises naming the op.
    shape = (3, 4, 257)
    w = torch.linspace(0.5, 1.5, 12).reshape(3, 4)  # not representable in 16 bits
    t = _logits(shape, 3.0, 2).to(dtype)
    grads = []
    for inplace in (False, True):
        s = _logits(shape, 3.0, 1).to(dtype).requires_grad_()
        kl = duo_fast.distill_kl(s, t, direction, inplace_grad=inplace)
        (kl * w).sum().backward(retain_graph=True)
        grads.append(s.grad)
        if inplace:
            with pytest.raises(RuntimeError, match=r"distill_kl\(\.\.\., inplace_grad=True\) supports a single backward"):
                (kl * w).sum().backward()
    assert grads[1].dtype == dtype and torch.equal(grads[0], grads[1])
    s64 = _logits(shape, 3.0, 1).to(dtype).double().requires_grad_()
    (reference.distill_kl(s64, t.double(), direction) * w.double()).sum().backward()
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    bound = (2 * eps + 1e-5) * s64.grad.abs() + 1e-7 + (2.0**-24 if dtype == torch.float16 else 0.0)
    assert bool(((grads[1].double() - s64.grad).abs() <= bound).all())


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_grad_peak_memory_is_the_gradient(dtype):
    """inplace_grad=True: forward + backward hold one [N, K] tensor besides the
    logits, the gradient in the student's dtype: peak extra <= 1.1x the student
    logits' bytes (out of place, bfloat16 peaks at ~5x: the float32 product and
    its cast back)."""
    from test_usdm_loss import _peak_extra_bytes

    N, K = 1024, 50257
    s = _logits((N, K), 3.0, 1).to(dtype).requires_grad_()
    t = _logits((N, K), 3.0, 2).to(dtype)
    w = torch.rand(N)
    small = s[:8].detach().clone().requires_grad_()  # warm up (thread pools, autograd, the scaling path)
    (duo_fast.distill_kl(small, t[:8], inplace_grad=True) * w[:8]).sum().backward()

    def step():
        (duo_fast.distill_kl(s, t, inplace_grad=True) * w).sum().backward()

    extra = _peak_extra_bytes(step)
    nbytes = s.numel() * s.element_size()
    assert s.grad is not None and s.grad.dtype == dtype
    assert extra <= 1.1 * nbytes, f"peak extra {extra / 2**20:.1f} MiB > 1.1 x {nbytes / 2**20:.1f} MiB"
