"""CUDA ops never synchronize the host with the GPU (issue 16, item 3).

Without a GPU: every public op runs under FakeTensorMode on fake CUDA tensors
(the Python wrappers, seeds and generators, autograd setup: what a CUDA call
runs on the host before the binding), with torch.Tensor.item and the other
host reads patched to count reads of CUDA tensors: there must be none. The
generator path is driven by stand-in CUDA generators that speak PyTorch's
``philox_state`` / ``get_state`` protocols. The device-side value checks that
replace the host checks are tested in the emulated kernels
(tests/native/exports.cpp, "device checks", under ASan, and
test_emulated_device_checks below). With a GPU: torch.cuda.set_sync_debug_mode
("error") around every op, CUDA graph capture, reproducibility under
torch.manual_seed, and the lazily raised device-check error.
"""

from __future__ import annotations

import ctypes
import functools
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

import duo_fast
from duo_fast import _random
from conftest import ptr

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def cuda_reads(monkeypatch):
    """Counts host reads (.item() and friends) of CUDA tensors."""
    calls = []
    for name in HOST_READS:
        orig = getattr(torch.Tensor, name)

        def patched(self, *args, __orig=orig, __name=name, **kwargs):
            if self.device.type == "cuda":
                calls.append(__name)
            return __orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)
    return calls


class PhiloxStateGenerator:
    """Stands in for a CUDA torch.Generator (none exists without a GPU):
    Generator.philox_state(increment) reserves ceil(increment / 4) * 4 values and
    returns (seed, offset, intragraph_offset) as CPU int64 tensors outside capture."""

    device = torch.device("cuda", 0)

    def __init__(self, seed):
        self.manual_seed(seed)

    def manual_seed(self, seed):
        self.seed, self.offset = seed, 0
        return self

    def philox_state(self, increment):
        s, o = self.seed, self.offset
        self.offset += (increment + 3) // 4 * 4
        with unset_fake_temporarily():  # real CPU tensors, as the real generator returns
            return torch.tensor([s]), torch.tensor([o]), torch.tensor([0])


class GetStateGenerator:
    """A CUDA generator of an older torch: get_state() = [seed, offset] int64 as bytes."""

    device = torch.device("cuda", 0)

    def __init__(self, seed):
        with unset_fake_temporarily():
            self.state = torch.tensor([seed, 0], dtype=torch.int64).view(torch.uint8)

    def get_state(self):
        with unset_fake_temporarily():
            return self.state.clone()

    def set_state(self, s):
        with unset_fake_temporarily():
            self.state = s.clone()


def _fake_cuda_inputs():
    B, L, K, d = 2, 3, 11, 4
    g = torch.Generator().manual_seed(0)
    cpu = dict(
        logits=torch.randn(B, L, K, generator=g),
        x0=torch.randint(0, K, (B, L), generator=g),
        z=torch.randint(0, K, (B, L), generator=g),
        alpha=torch.full((B,), 0.4, dtype=torch.float64),
        dalpha=torch.full((B,), -1.0, dtype=torch.float64),
        a_t=torch.full((B,), 0.3, dtype=torch.float64),
        a_s=torch.full((B,), 0.6, dtype=torch.float64),
        gamma=torch.zeros(B),
        emb=torch.randn(K, d, generator=g),
        hidden=torch.randn(B, L, d, generator=g),
        weight=torch.randn(K, d, generator=g),
    )
    return cpu, K


def _run_every_op(t, K, rand, backward=True):
    """Every public op on the tensors t; rand: dict(seed=...) or dict(generator=...).
    backward=False (fake tensors: the autograd engine needs a real device) runs the
    ops' Python backward functions directly instead of loss.backward()."""
    duo_fast.gamma_to_alpha(t["gamma"], K)
    duo_fast.sample_zt(t["x0"], t["gamma"], K, gamma_s=t["gamma"] - 1, **rand())
    s = t["logits"].clone().requires_grad_()
    kl = duo_fast.distill_kl(s, t["logits"] + 1)
    lg = t["logits"].clone().requires_grad_()
    loss = duo_fast.usdm_loss(lg, t["z"], t["x0"], t["alpha"], t["dalpha"])
    lg2 = t["logits"].clone().requires_grad_()
    loss2 = duo_fast.usdm_loss(lg2, t["z"], t["x0"], t["alpha"], t["dalpha"], inplace_grad=True)
    h, w = t["hidden"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
    lin = duo_fast.linear_usdm_loss(h, w, None, t["z"], t["x0"], t["alpha"], t["dalpha"], chunk_size=4)
    h3, w3 = t["hidden"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
    lkl = duo_fast.linear_distill_kl(h3, w3, None, t["hidden"] + 1, t["weight"], None, chunk_size=4)
    duo_fast.sample_step(t["logits"], t["z"], t["a_t"], t["a_s"], top_p=0.9, **rand())
    duo_fast.linear_sample_step(t["hidden"], t["weight"], None, t["z"], t["a_t"], t["a_s"], top_p=0.9, chunk_size=4,
                                **rand())
    duo_fast.linear_sample_step(t["hidden"], t["weight"], None, t["z"], t["a_t"], t["a_s"], kappa=0.5, chunk_size=4,
                                guidance=(t["hidden"] + 1, 2.0), **rand())
    duo_fast.posterior(t["logits"], t["z"], t["a_t"], t["a_s"], kappa=0.5)
    duo_fast.canvas_step(t["logits"], temperature=t["a_s"], **rand())
    duo_fast.canvas_step(t["logits"], temperature=0.7, **rand())
    duo_fast.softmax_embed(t["logits"], t["emb"], temperature=t["a_s"], scale=3.0)
    ids, wts, _ = duo_fast.curriculum_topk(t["x0"], 0.5, 2.0, 3, K, **rand())  # float levels: torch.full on the device
    e = t["emb"].clone().requires_grad_()
    hk, _ = duo_fast.curriculum_topk_embed(t["x0"], t["gamma"], 2.0, 3, e, **rand())
    e2 = t["emb"].clone().requires_grad_()
    he, _ = duo_fast.curriculum_embed(t["x0"], t["gamma"], 2.0, e2, **rand())
    if backward:
        for out in (kl, loss, loss2, lin, lkl, hk, he):
            (out * 2).sum().backward()
        return
    from types import SimpleNamespace

    from duo_fast.ops._inplace_grad import _FusedGradInplace, _fused_grad_backward
    from duo_fast.ops._linear_chunks import LinearRows
    from duo_fast.ops.curriculum_embed import _curriculum_embed_backward
    from duo_fast.ops.curriculum_topk import _topk_embed_backward
    from duo_fast.ops.linear_distill_kl import _kl_rows
    from duo_fast.ops.linear_usdm_loss import _usdm_rows

    ones = torch.ones_like(loss)
    g = torch.ones_like(t["logits"])
    # called as autograd calls them: without grad mode (no create_graph)
    with torch.no_grad():
        _fused_grad_backward(SimpleNamespace(saved_tensors=(g,), compute_grad=True,
                                             needs_input_grad=(True,) + (False,) * 5),
                             ones, "usdm_loss", "logits", {3: "alpha", 4: "dalpha"}, 6)
        # a broadcast grad_output (after .sum()): the CPU shortcut reads its value, CUDA must not
        _FusedGradInplace.backward(SimpleNamespace(grad=g.clone(), name="usdm_loss", wrt="logits", levels={}, n_rest=4),
                                   torch.ones((), device=loss.device).expand(loss.shape))
        lctx = SimpleNamespace(saved_tensors=(h, w, None, t["z"].reshape(-1), t["x0"].reshape(-1),
                                              t["alpha"][:, None].expand(2, 3).reshape(-1),
                                              t["dalpha"][:, None].expand(2, 3).reshape(-1)),
                               row_op=_usdm_rows, chunk_size=4, what="linear_usdm_loss",
                               names=("hidden", "weight", "bias", "z", "x0", "alpha", "dalpha"),
                               needs_input_grad=(False, True, True) + (False,) * 8)
        LinearRows.backward(lctx, ones.reshape(-1))
        kctx = SimpleNamespace(saved_tensors=(h3, w3, None, (t["hidden"] + 1).reshape(-1, t["hidden"].shape[-1]),
                                              t["weight"], None),
                               row_op=functools.partial(_kl_rows, direction=0), chunk_size=4, what="linear_distill_kl",
                               names=("student_hidden", "weight", "bias", "teacher_hidden", "teacher_weight",
                                      "teacher_bias"),
                               needs_input_grad=(False, True, True) + (False,) * 7)
        LinearRows.backward(kctx, ones.reshape(-1))
        ectx = SimpleNamespace(saved_tensors=(ids, wts), needs_input_grad=(False,) * 4 + (True,), vocab_size=K,
                               embedding_dtype=torch.float32)
        _topk_embed_backward(ectx, torch.ones_like(hk), None, None, None)
        lvl = torch.zeros(t["x0"].shape, dtype=torch.float64, device=t["x0"].device)
        cctx = SimpleNamespace(saved_tensors=(t["x0"], lvl, lvl + 2, lvl), needs_input_grad=(False,) * 3 + (True,),
                               vocab_size=K, embedding_dtype=torch.float32, seed=1, offset=0)
        _curriculum_embed_backward(cctx, torch.ones_like(he), None, None)


@pytest.mark.parametrize("randomness", ["seed", "philox_state", "get_state"])
def test_cuda_wrappers_never_read_the_device(cuda_reads, monkeypatch, randomness):
    cpu, K = _fake_cuda_inputs()
    gens = []
    if randomness == "philox_state":
        monkeypatch.setattr(_random, "_default_generator", lambda device: gens[0])
    # A generator's state is real host memory (CPU tensors): read it outside fake mode.
    real_key = _random._key_from_generator_state

    def key_outside_fake_mode(generator):
        with unset_fake_temporarily():
            return real_key(generator)

    monkeypatch.setattr(_random, "_key_from_generator_state", key_outside_fake_mode)
    with FakeTensorMode() as mode:
        t = {k: mode.from_tensor(v).to("cuda") for k, v in cpu.items()}
        assert t["logits"].device.type == "cuda"
        if randomness == "seed":
            rand = lambda: dict(seed=7)  # noqa: E731
        elif randomness == "philox_state":
            gens.append(PhiloxStateGenerator(3))
            rand = lambda: dict()  # noqa: E731  (the device's default generator)
        else:
            gens.append(GetStateGenerator(3))
            rand = lambda: dict(generator=gens[0])  # noqa: E731
        _run_every_op(t, K, rand, backward=False)
    assert cuda_reads == [], cuda_reads
    if randomness == "philox_state":
        assert gens[0].offset == 4 * 9  # one Philox counter per random op call (9 of them in _run_every_op)
    if randomness == "get_state":
        assert gens[0].state.view(torch.int64)[1].item() == 4 * 9


def test_cuda_keys_reproducible_and_distinct():
    g = PhiloxStateGenerator(123)
    keys = [_random.philox_seed(torch.device("cuda", 0), g, None) for _ in range(50)]
    assert len(set(keys)) == 50 and all(0 <= k < (1 << 63) for k in keys)
    g.manual_seed(123)  # what torch.manual_seed does to the CUDA generators
    assert [_random.philox_seed(torch.device("cuda", 0), g, None) for _ in range(50)] == keys
    assert _random.philox_seed(torch.device("cuda", 0), PhiloxStateGenerator(124), None) != keys[0]
    # the older get_state protocol gives the same keys for the same (seed, offset)
    old = GetStateGenerator(123)
    assert [_random.philox_seed(torch.device("cuda", 0), old, None) for _ in range(3)] == keys[:3]
    # an explicit seed passes through unchanged
    assert _random.philox_seed(torch.device("cuda", 0), None, 99) == 99


def test_cpu_keys_unchanged():
    # CPU tensors keep drawing the key with torch.randint on the CPU generator.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    want = torch.randint(0, (1 << 63) - 1, (1,), dtype=torch.int64, generator=g2).item()
    assert _random.philox_seed(torch.device("cpu"), g1, None) == want


def test_generator_under_capture_needs_a_seed(monkeypatch):
    monkeypatch.setattr(_random, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="explicit seed="):
        _random.philox_seed(torch.device("cuda", 0), PhiloxStateGenerator(1), None)
    assert _random.philox_seed(torch.device("cuda", 0), None, 5) == 5


@pytest.mark.parametrize("mode,seed", [("fiber", 0), ("fiber", 2), ("thread", 0)])
def test_emulated_device_checks(harness, emulated, mode, seed):
    # The CUDA kernels check the values the host no longer reads: invalid ids and
    # levels are counted per argument, their rows get NaN / in-range ids, valid rows
    # are unaffected (compared with the CPU op on the valid rows).
    harness.configure_emulation(emulated, mode=mode, seed=seed)
    take = lambda: (lambda c: (emulated.df_emu_take_checks(ptr(c)), c)[1])(torch.zeros(13, dtype=torch.int32))  # noqa: E731
    try:
        take()
        K, rows = 50, 6
        logits = torch.randn(rows, K, generator=torch.Generator().manual_seed(1))
        x0 = torch.tensor([1, K, 3, -1, 5, 6])
        z = torch.tensor([1, 2, K + 9, 4, 5, 7])
        alpha = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, math.nan], dtype=torch.float64)
        dalpha = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
        loss, grad = torch.empty(rows), torch.empty(rows, K)
        assert emulated.df_emu_usdm_loss(ptr(logits), 0, ptr(z), ptr(x0), ptr(alpha), ptr(dalpha), ptr(loss), ptr(grad),
                                         ctypes.c_int64(rows), ctypes.c_int64(K)) == 0
        c = take()
        assert c.tolist() == [2, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # x0, z, ids, alpha, ...
        assert loss[1:].isnan().all() and grad[1:].isnan().all()
        cl, cg = torch.ops.duo_fast.usdm_loss(logits[:1], z[:1], x0[:1], alpha[:1], dalpha[:1], True)
        torch.testing.assert_close(loss[:1], cl, rtol=1e-4, atol=1e-5)
        # sample_step / posterior: z out of range, alpha_t = 1, alpha_s < alpha_t
        zs = torch.tensor([1, -2, 3, 4, 5, 6])
        a_t = torch.tensor([0.2, 0.2, 1.0, 0.5, 0.2, 0.2], dtype=torch.float64)
        a_s = torch.tensor([0.5, 0.5, 1.0, 0.4, 0.5, 0.5], dtype=torch.float64)
        out, q = torch.empty(rows, dtype=torch.int64), torch.empty(rows, K)
        assert emulated.df_emu_sample_step(ptr(logits), 0, ptr(zs), ptr(a_t), ptr(a_s), ptr(out), ctypes.c_int64(rows),
                                           ctypes.c_int64(K), ctypes.c_double(1.0), ctypes.c_double(1.0),
                                           ctypes.c_double(0.7), ctypes.c_uint64(3), ctypes.c_uint64(0)) == 0
        assert emulated.df_emu_posterior(ptr(logits), 0, ptr(zs), ptr(a_t), ptr(a_s), ptr(q), ctypes.c_int64(rows),
                                         ctypes.c_int64(K), ctypes.c_double(1.0), ctypes.c_double(1.0), ctypes.c_double(0.7)) == 0
        c = take()
        assert c.tolist() == [0, 2, 0, 0, 0, 2, 2, 0, 0, 0, 0, 0, 0]  # z, alpha_t, alpha_s (row 2 fails both)
        assert ((out >= 0) & (out < K)).all() and (out[1:4] == 0).all()
        assert q[1:4].isnan().all() and not q[[0, 4, 5]].isnan().any()
        ok = torch.tensor([0, 4, 5])
        cq = torch.ops.duo_fast.posterior(logits[ok], zs[ok], a_t[ok], a_s[ok], 1.0, 1.0, 0.7)
        torch.testing.assert_close(q[ok], cq, rtol=0, atol=1e-7)
    finally:
        harness.configure_emulation(emulated, mode="fiber", seed=0)


# ---------------------------------------------------------------------------------------
# on a GPU
# ---------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device; test_cuda_wrappers_never_read_the_device and test_emulated_device_checks cover this without one",
)


@needs_gpu
def test_gpu_ops_do_not_synchronize():
    cpu, K = _fake_cuda_inputs()
    t = {k: v.cuda() for k, v in cpu.items()}
    rand = lambda: dict()  # noqa: E731
    _run_every_op(t, K, rand)  # warm up: schedule tables, device-check counters
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run_every_op(t, K, rand)
        _run_every_op(t, K, lambda: dict(seed=3))
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_gpu
def test_gpu_graph_capture_and_manual_seed():
    cpu, K = _fake_cuda_inputs()
    t = {k: v.cuda() for k, v in cpu.items()}
    torch.manual_seed(0)
    a = duo_fast.sample_step(t["logits"], t["z"], t["a_t"], t["a_s"])
    b = duo_fast.sample_step(t["logits"], t["z"], t["a_t"], t["a_s"])
    torch.manual_seed(0)
    assert torch.equal(duo_fast.sample_step(t["logits"], t["z"], t["a_t"], t["a_s"]), a)
    assert torch.equal(duo_fast.sample_step(t["logits"], t["z"], t["a_t"], t["a_s"]), b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up
            duo_fast.usdm_loss(t["logits"], t["z"], t["x0"], t["alpha"], t["dalpha"])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = duo_fast.usdm_loss(t["logits"], t["z"], t["x0"], t["alpha"], t["dalpha"])
        zs = duo_fast.sample_step(t["logits"], t["z"], t["a_t"], t["a_s"], seed=11)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss.cpu(), duo_fast.usdm_loss(cpu["logits"], cpu["z"], cpu["x0"], cpu["alpha"], cpu["dalpha"]), rtol=1e-4, atol=1e-5)
    assert torch.equal(zs.cpu(), duo_fast.sample_step(cpu["logits"], cpu["z"], cpu["a_t"], cpu["a_s"], seed=11))


@needs_gpu
def test_gpu_device_checks_raise_at_a_later_call():
    cpu, K = _fake_cuda_inputs()
    t = {k: v.cuda() for k, v in cpu.items()}
    bad = t["x0"].clone()
    bad[0, 0] = K + 5
    loss = duo_fast.usdm_loss(t["logits"], t["z"], bad, t["alpha"], t["dalpha"])  # no error yet: no sync
    torch.cuda.synchronize()
    assert loss[0, 0].isnan().item() and not loss[1].isnan().any().item()
    with pytest.raises(RuntimeError, match=r"x0 holds token ids outside \[0, vocab_size\) \(1 rows or tokens\)"):
        duo_fast.posterior(t["logits"], t["z"], t["a_t"], t["a_s"])
    duo_fast.posterior(t["logits"], t["z"], t["a_t"], t["a_s"])  # reported once


@needs_gpu
def test_gpu_bad_values_raise_later_or_at_check_device_errors():
    # The bad-values policy on the device: a NaN level, a logits row without a
    # distribution; check_device_errors raises at once; generate raises before returning.
    cpu, K = _fake_cuda_inputs()
    t = {k: v.cuda() for k, v in cpu.items()}
    duo_fast.check_device_errors()  # nothing pending
    logits = t["logits"].clone()
    logits[0, 1] = math.nan
    out = duo_fast.sample_step(logits, t["z"], t["a_t"], t["a_s"], seed=1)
    torch.cuda.synchronize()
    assert out[0, 1].item() == t["z"][0, 1].item()  # the row keeps z
    with pytest.raises(RuntimeError, match=r"logits rows must hold no NaN or \+inf .* \(1 rows or tokens\)"):
        duo_fast.check_device_errors()
    duo_fast.check_device_errors()  # reported once
    duo_fast.sample_zt(t["x0"], torch.tensor([0.0, math.nan], device="cuda"), K, seed=1)
    with pytest.raises(RuntimeError, match=r"gamma must not be NaN"):
        duo_fast.gamma_to_alpha(t["gamma"], K)  # the next call raises
    duo_fast.gamma_to_alpha(torch.tensor([math.nan], device="cuda"), K)
    with pytest.raises(RuntimeError, match=r"gamma must not be NaN"):
        duo_fast.check_device_errors("cuda")
    x32 = t["x0"].int()
    assert duo_fast.sample_zt(x32, t["gamma"], K, seed=2).dtype == torch.int32

    def diverged(z, tt):
        x = torch.randn(*z.shape, K, device="cuda")
        x[0, 0] = -math.inf
        return x

    with pytest.raises(RuntimeError, match="logits rows must hold"):
        duo_fast.generate(diverged, 2, 3, K, steps=2, device="cuda", progress=False, seed=0)
