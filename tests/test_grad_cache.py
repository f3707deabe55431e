"""duo_fast's cache of freed [K, d] gradient buffers (csrc/cpu/grad_cache.h):
a reused buffer is overwritten in full (poisoned with NaN before reuse, the
gradients still match the float64 references), the cache's bounds
(DUO_FAST_GRAD_CACHE_MB, 2 buffers, 16 MiB minimum), empty_cache(), a bad
limit raising with the variable's name, and buffers freed on another thread."""

from __future__ import annotations

import threading

import pytest
import torch

import duo_fast
from duo_fast import reference
from test_curriculum_embed import _noise
from test_curriculum_topk import _bag64, _inputs

MIB = 1 << 20
K = 50257  # GPT-2's vocabulary: [K, 96] float32 is 18.4 MiB, above the 16 MiB minimum


def _rounded(nbytes):
    return -(-nbytes // (2 * MIB)) * (2 * MIB)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("DUO_FAST_GRAD_CACHE_MB", raising=False)
    duo_fast.empty_cache()
    yield
    duo_fast.empty_cache()


def _topk_grad(E, seed, n=64, k=8):
    """E.grad of (h * gh).sum() for curriculum_topk_embed, and its float64 reference."""
    x0, gamma = _inputs(n, E.shape[0], seed)
    gh = torch.randn(n, E.shape[1], generator=torch.Generator().manual_seed(seed))
    h, _ = duo_fast.curriculum_topk_embed(x0, gamma, 2.0, k, E, seed=seed)
    (h * gh).sum().backward()
    ids, w, _ = duo_fast.curriculum_topk(x0, gamma, 2.0, k, E.shape[0], seed=seed)
    _, ref, _, gmag = _bag64(ids, w, E.detach(), gh)
    return ref, gmag


def _assert_bag_grad(got, ref, gmag):
    assert torch.isfinite(got).all()
    assert ((got.double() - ref).abs() <= 1e-6 * gmag + 1e-30).all()


def test_topk_embed_reuses_a_freed_gradient_and_overwrites_all_of_it():
    E = torch.randn(K, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref, gmag = _topk_grad(E, seed=1)
    _assert_bag_grad(E.grad, ref, gmag)
    first = E.grad.data_ptr()
    assert first % (2 * MIB) == 0  # huge-page aligned
    E.grad.fill_(float("nan"))  # what the next backward must not show: every row is written
    E.grad = None
    info = duo_fast.cache_info()
    assert info["buffers"] == 1 and info["bytes"] == _rounded(K * 96 * 4)
    ref, gmag = _topk_grad(E, seed=2)  # other ids: most rows are zero rows
    assert E.grad.data_ptr() == first and duo_fast.cache_info()["buffers"] == 0
    _assert_bag_grad(E.grad, ref, gmag)


def test_curriculum_embed_zeroes_a_reused_buffer(emulated):
    # curriculum_embed's backward accumulates (addmm) into its buffer: a reused one
    # must be zeroed first. Reference: P^T dh of the dense float64 formula.
    n, d, seed = 3, 96, 11
    x0, gamma = _inputs(n, K, seed)
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(3), requires_grad=True)
    dh = torch.randn(n, d, generator=torch.Generator().manual_seed(4))
    E64 = E.detach().double().requires_grad_(True)
    h_ref, _ = reference.curriculum_embed_dense(x0, gamma, 5.0, E64, noise=_noise(emulated, seed, n, K))
    (h_ref * dh.double()).sum().backward()
    for step in range(2):
        h, _ = duo_fast.curriculum_embed(x0, gamma, 5.0, E, seed=seed)
        (h * dh).sum().backward()
        torch.testing.assert_close(E.grad.double(), E64.grad, rtol=1e-5, atol=1e-7)
        E.grad.fill_(float("nan"))
        E.grad = None
        assert duo_fast.cache_info()["buffers"] == 1


def test_a_live_gradient_is_never_handed_out():
    # zero_grad(set_to_none=False) style: .grad stays alive and accumulates; the
    # second backward's own buffer is a different one (then freed into the cache).
    E = torch.randn(K, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref1, g1 = _topk_grad(E, seed=1)
    kept = E.grad.data_ptr()
    ref2, g2 = _topk_grad(E, seed=2)
    assert E.grad.data_ptr() == kept
    _assert_bag_grad(E.grad, ref1 + ref2, g1 + g2 + 1e-300)
    assert duo_fast.cache_info()["buffers"] == 1  # the second backward's, freed after the add


def test_limits_eviction_and_empty_cache(monkeypatch):
    sizes = [_rounded(K * d * 4) for d in (96, 128, 160)]  # 20, 26, 32 MiB
    assert len(set(sizes)) == 3

    def drop(d):
        E = torch.zeros(K, d, requires_grad=True)
        _topk_grad(E, seed=d, n=4, k=2)
        E.grad = None

    for d in (96, 128, 160):
        drop(d)
    info = duo_fast.cache_info()  # at most 2 buffers: the oldest went back to the kernel
    assert info == {"bytes": sizes[1] + sizes[2], "buffers": 2, "limit_bytes": 4096 * MIB}
    assert duo_fast.empty_cache() == sizes[1] + sizes[2]
    assert duo_fast.cache_info()["bytes"] == 0

    monkeypatch.setenv("DUO_FAST_GRAD_CACHE_MB", "50")  # room for one of 20 + 26 or 32 MiB
    for d in (96, 128, 160):
        drop(d)
    assert duo_fast.cache_info() == {"bytes": sizes[2], "buffers": 1, "limit_bytes": 50 * MIB}

    monkeypatch.setenv("DUO_FAST_GRAD_CACHE_MB", "0")  # off: what is kept goes at the next call ...
    assert duo_fast.cache_info() == {"bytes": 0, "buffers": 0, "limit_bytes": 0}
    drop(96)  # ... and freed buffers go back at once
    assert duo_fast.cache_info()["bytes"] == 0


def test_small_gradients_use_torchs_allocator():
    E = torch.randn(1000, 16, requires_grad=True)
    _topk_grad(E, seed=5, n=16, k=4)
    E.grad = None
    assert duo_fast.cache_info()["buffers"] == 0


def test_bad_limit_names_the_variable(monkeypatch):
    E = torch.randn(K, 96, requires_grad=True)
    _topk_grad(E, seed=1, n=4, k=2)
    monkeypatch.setenv("DUO_FAST_GRAD_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="DUO_FAST_GRAD_CACHE_MB"):
        duo_fast.cache_info()
    E.grad = None  # freeing under a bad value must not throw (the deleter uses the default)
    with pytest.raises(RuntimeError, match="DUO_FAST_GRAD_CACHE_MB"):
        _topk_grad(E, seed=2, n=4, k=2)
    monkeypatch.setenv("DUO_FAST_GRAD_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="DUO_FAST_GRAD_CACHE_MB"):
        duo_fast.cache_info()


def test_buffers_freed_on_other_threads():
    E = torch.randn(K, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grads = []
    for seed in (1, 2):
        _topk_grad(E, seed=seed, n=8, k=4)
        grads.append(E.grad)
        E.grad = None
    t = threading.Thread(target=grads.clear)  # the deleters run on this thread
    t.start()
    t.join()
    assert duo_fast.cache_info()["buffers"] == 2
    ref, gmag = _topk_grad(E, seed=3)
    _assert_bag_grad(E.grad, ref, gmag)
    assert duo_fast.cache_info()["buffers"] == 1
