"""Benchmark cases of the Duo++ top-k curriculum input (docs/math.md §2e):
duo_fast.curriculum_topk (sampling only) and duo_fast.curriculum_topk_embed
(fwd+bwd, and forward alone), d = 768; sizes, inputs and setup as in
cases_curriculum_embed.py.

Targets (N=2048, K=50257, d=768; docs/benchmarks.md):
  * curriculum_topk (k=128): >= 10x reference (at 1 and 2 threads), peak <= reference;
  * curriculum_topk_embed fwd+bwd (k=128): >= 3x the Duo path
    (sample_tempered_softmax_topk + F.embedding_bag), 1 and 2 threads, peak <=
    reference (both sides pay the dense [K, d] float32 embedding gradient, 147 MiB);
    forward alone <= 1.1x curriculum_topk + F.embedding_bag. GB/s of these rows
    against the id-sorted bag's floor (E read once, dE written once: ~0.3 GB per
    fwd+bwd at N=2048, k=128, d=768).

Reference sides: utils.sample_tempered_softmax_topk (float64 order statistics,
Floyd's ids), and for the embed rows EmbeddingLayer.forward(ids, weights)
(F.embedding_bag, mode="sum", per_sample_weights) + backward; the forward-alone
row's reference is duo_fast.curriculum_topk followed by the Duo code's
EmbeddingLayer.forward (the bag), no backward. k in {32, 128} (k=128 at K=50257
carries the target).
"""

from __future__ import annotations

import torch

import duo_fast

from . import duo_code
from .cases_curriculum_embed import INV_TAU, SEED, _drop_grad, _setup, sizes
from .common import Case, Impl, Target


def _topk_duo(k):
    return lambda st: duo_fast.curriculum_topk(st["x0"], st["gamma"], INV_TAU, k, st["K"], seed=SEED)


def _topk_ref(k):
    def fn(st):
        return duo_code.topk_curriculum(duo_code.reference(), st["x0"], st["gamma32"], INV_TAU, k, st["K"])

    return fn


def _topk_embed_duo(k):
    def fn(st):
        h, z = duo_fast.curriculum_topk_embed(st["x0"], st["gamma"], INV_TAU, k, st["E"], seed=SEED)
        h.sum().backward()
        return z

    return fn


def _topk_embed_ref(k):
    def fn(st):
        w, ids, z = duo_code.topk_curriculum(duo_code.reference(), st["x0"], st["gamma32"], INV_TAU, k, st["K"])
        st["layer"](ids, weights=w).sum().backward()
        return z

    return fn


def _topk_embed_fwd_duo(k):
    def fn(st):
        with torch.no_grad():
            return duo_fast.curriculum_topk_embed(st["x0"], st["gamma"], INV_TAU, k, st["E"], seed=SEED)

    return fn


def _topk_then_bag_fwd(k):
    """duo_fast.curriculum_topk, then the Duo code's EmbeddingLayer.forward (the bag)."""

    def fn(st):
        with torch.no_grad():
            ids, w, z = duo_fast.curriculum_topk(st["x0"], st["gamma"], INV_TAU, k, st["K"], seed=SEED)
            return st["layer"](ids, weights=w), z

    return fn


def _bag_bytes(N: int, K: int, d: int, k: int, backward: bool) -> int:
    """Floor of the id-sorted embedding bag (issue 13): E read once (float32) and h
    written once, the (id, weight) entries written; with the backward, dh read
    once, the entries read back and dE [K, d] float32 written once."""
    fwd = K * d * 4 + N * d * 4 + N * k * 12
    return fwd + (N * d * 4 + N * k * 12 + K * d * 4 if backward else 0)


def cases(mode: str, device: str) -> list[Case]:
    src = duo_code.source
    out = []
    for N, K, d, size, at_target in sizes(mode):
        for k in (32, 128):
            tgt = Target(">= 10x reference, peak <= reference", min_speedup_ref=10.0, max_mem_ratio=1.0) \
                if at_target and k == 128 else None
            out.append(Case(op="curriculum_topk", name=f"k{k}-N{N}-K{K}", size=f"k={k} N={N} K={K}",
                            setup=_setup(N, K, d, False), duo=Impl(_topk_duo(k), note="duo_fast.curriculum_topk"),
                            ref=Impl(_topk_ref(k), setup=_setup(N, K, d, False, ref=True), source=src,
                                     note="utils.sample_tempered_softmax_topk (float64, Floyd's ids)"),
                            target=tgt))
            tgt = Target(">= 3x reference, peak <= reference", min_speedup_ref=3.0, max_mem_ratio=1.0) \
                if at_target and k == 128 else None
            out.append(Case(op="curriculum_topk_embed", name=f"k{k}-N{N}-K{K}", size=f"fwd+bwd k={k} {size}",
                            setup=_setup(N, K, d, True), bytes_moved=_bag_bytes(N, K, d, k, True),
                            duo=Impl(_topk_embed_duo(k), before_each=_drop_grad,
                                     note="duo_fast.curriculum_topk_embed(...)[0].sum().backward()"),
                            ref=Impl(_topk_embed_ref(k), before_each=_drop_grad, setup=_setup(N, K, d, True, ref=True),
                                     source=src,
                                     note="utils.sample_tempered_softmax_topk + EmbeddingLayer.forward(ids, weights) "
                                          "(F.embedding_bag, mode='sum', per_sample_weights), autograd backward"),
                            target=tgt))
        k = 128
        if k < K:
            tgt = Target("forward <= 1.1x (speedup >= 0.91)", min_speedup_ref=1 / 1.1) if at_target else None
            out.append(Case(op="curriculum_topk_embed", name=f"fwd-k{k}-N{N}-K{K}", size=f"forward only k={k} {size}",
                            setup=_setup(N, K, d, False), bytes_moved=_bag_bytes(N, K, d, k, False),
                            duo=Impl(_topk_embed_fwd_duo(k), note="duo_fast.curriculum_topk_embed forward (no grad)"),
                            ref=Impl(_topk_then_bag_fwd(k), setup=_setup(N, K, d, False, ref=True),
                                     source=lambda: "duo_fast + " + duo_code.source(),
                                     note="this row's reference is duo_fast.curriculum_topk + the Duo code's "
                                          "EmbeddingLayer.forward (F.embedding_bag), forward only"),
                            target=tgt))
    return out
