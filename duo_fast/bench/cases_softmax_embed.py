"""Benchmark cases of duo_fast.softmax_embed: the soft embedding of DiffusionGemma's
self-conditioning against the expression of transformers' decoder,
``softmax(logits, float32).to(E.dtype) @ E * scale`` (the drop-in end to end:
cases_diffusion_gemma.py).

Sides (each in a fresh process): duo ``duo_fast.softmax_embed(logits, E,
temperature=0.6, scale=48)``; ref ``torch.matmul(torch.softmax(logits / 0.6,
-1, dtype=float32).to(E.dtype), E) * 48``.

Sizes: rows = 256 x {1, 4} (--quick: 256), V = 262,144, d = 2304, E bf16,
fp32 logits, "flat" (N(0, 3^2): a dense product) and "confident" (one token at
25, the rest N(-5, 3^2): a few kept entries per row) logits of
cases_diffusion_gemma; --tiny: 16 rows, V = 1000, d = 64.
"""

from __future__ import annotations

import torch

import duo_fast

from .cases_diffusion_gemma import CANVAS, SIZES, TINY_CANVAS, _logits
from .common import Case, Impl

OP = "softmax_embed"
T, SCALE = 0.6, 48.0


def _setup(kind, B, L, V, d):
    def setup(device):
        g = torch.Generator().manual_seed(5)
        E = (0.02 * torch.randn(V, d, generator=g)).to(torch.bfloat16).to(device)
        return {"logits": _logits(kind, B, L, V, torch.float32).to(device), "E": E}

    return setup


def _duo(st):
    return duo_fast.softmax_embed(st["logits"], st["E"], temperature=T, scale=SCALE)


def _ref(st):
    p = torch.softmax(st["logits"] / T, dim=-1, dtype=torch.float32).to(st["E"].dtype)
    return torch.matmul(p, st["E"]) * SCALE


def cases(mode: str, device: str) -> list[Case]:
    L = TINY_CANVAS if mode == "tiny" else CANVAS
    out = []
    for B, V, d in SIZES[mode]:
        for kind in ("flat", "confident"):
            rows = B * L
            out.append(Case(
                op=OP, name=f"{kind}-rows{rows}-V{V}-d{d}", size=f"{kind} rows={rows} V={V} d={d} fp32 logits, bf16 E",
                setup=_setup(kind, B, L, V, d),
                duo=Impl(_duo, note="duo_fast.softmax_embed(logits, E, temperature=0.6, scale=48)"),
                ref=Impl(_ref, source="torch (DiffusionGemma's decoder)",
                         note="softmax(logits / T, float32).to(bf16) @ E * scale"),
                repeats=3,
            ))
    return out
