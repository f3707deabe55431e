"""Benchmark cases of duo_fast.canvas_step: DiffusionGemma's per-row draw, argmax
and entropy against the torch calls of transformers' ``_denoising_step`` that
compute them (the drop-in end to end: cases_diffusion_gemma.py).

Sides (each in a fresh process):

  * duo: ``duo_fast.canvas_step(logits, temperature=0.6, seed=...)``.
  * ref: ``processed = logits / T``; ``torch.multinomial(softmax(processed, float32))``;
    ``argmax(processed)``; ``Categorical(logits=processed).entropy()`` (once: the
    step computes it twice, for the acceptance and for the stopping).

Sizes: rows = 256 x {1, 4} (--quick: 256), V = 262,144, fp32 and bf16 logits,
N(0, 3^2) (cases_diffusion_gemma's "flat" logits); --tiny: 16 rows, V = 1000.
"""

from __future__ import annotations

import torch

import duo_fast

from .cases_diffusion_gemma import CANVAS, SIZES, TINY_CANVAS, _logits
from .common import Case, Impl, Target

OP = "canvas_step"
T = 0.6


def _setup(B, L, V, dtype):
    def setup(device):
        return {"logits": _logits("flat", B, L, V, dtype).to(device)}

    return setup


def _duo(st):
    return duo_fast.canvas_step(st["logits"], temperature=T, seed=3)


def _ref(st):
    processed = st["logits"] / T
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    V = probs.shape[-1]
    sample = torch.multinomial(probs.view(-1, V), num_samples=1).view(processed.shape[:-1])
    return sample, torch.argmax(processed, dim=-1), torch.distributions.Categorical(logits=processed).entropy()


def cases(mode: str, device: str) -> list[Case]:
    L = TINY_CANVAS if mode == "tiny" else CANVAS
    out = []
    for B, V, _ in SIZES[mode]:
        for dtype, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            rows = B * L
            out.append(Case(
                op=OP, name=f"rows{rows}-V{V}-{dn}", size=f"rows={rows} V={V} {dn} logits",
                setup=_setup(B, L, V, dtype),
                duo=Impl(_duo, note="duo_fast.canvas_step(logits, temperature=0.6, seed=...)"),
                ref=Impl(_ref, source="torch (DiffusionGemma's step)",
                         note="logits / T, float32 softmax, torch.multinomial, argmax, Categorical(logits).entropy()"),
                target=Target(f"peak O(rows): <= {rows * 24 / 2**20 + 2:.1f} MiB + a scratch row per thread",
                              max_mem_mib=rows * 24 / 2**20 + 2 + 2 * V * 4 / 2**20),
                repeats=3,
            ))
    return out
