"""Per-GPU memory of one Duo training step at the configs' scale (issue 22): the
Duo code, the drop-in on the model's logits, and the drop-in with the output
layer fused; and the largest per-GPU batch that fits a GPU of 80 GB either way.

    python -m duo_fast.bench.dropin_memory            # the table of docs/duo.md

Scale (configs/config.yaml, configs/model/small.yaml): global batch 512 of 1024
tokens on 8 GPUs, i.e. 64 x 1024 tokens per GPU; DiT-small (hidden 768, 12
blocks, 12 heads, cond 128, MLP 4x); GPT-2's vocabulary K = 50257;
trainer.precision bf16 (autocast: the DiT's GEMMs in bf16, its norms, residual
stream and the losses' softmax in float32); AdamW; the EMA copy
(training.ema > 0). The step is the plain ELBO (DUO_BASE); bytes are the
tensors held at the step's peak (what a caching allocator must hold), not
allocator overheads or the CUDA context.

Terms, per GPU (N = tokens, K = vocabulary, d = hidden, P = parameters):

* state: P x (4 weight + 4 gradient + 8 AdamW moments + 4 EMA) bytes (float32),
  plus autocast's bf16 copies of the weights (2 P) held during the step.
* activations: what autograd saves for the backward, per token and block
  ``ACT_PER_BLOCK * d`` bytes (counted on DDiTBlock.forward under bf16 autocast,
  dropout on: the float32 residual and norm inputs and outputs and the two
  modulations, 8 x 4d; the bf16 inputs of the four linears, 4 x 2d; q and k
  after the rotary embedding and the packed qkv that v views, 2 x 2d + 6d; the
  attention output, 2d; the MLP's hidden before and after the GELU, 2 x 8d;
  two dropout masks, 2 x d: 66 d; tests/test_dropin_memory.py checks it
  against the tensors autograd saves for the Duo code's own block) in every
  block, plus the final layer's norm and modulation (3 x 4d) and its linear's
  bf16 input (2d).
* the output layer and the loss, the term that differs:
  - Duo code: ``DUO_LOSS_PEAK * N K`` bytes, the tensors alive at the peak of
    ``log_softmax`` (float32 under autocast) + ``DUO_BASE.nll_per_token`` and
    their backward on the bf16 logits, the logits included (in the forward the
    log-probabilities, ``exp``, ``x_bar_theta`` and its ``log``; in the backward
    their gradients, the two gathers' scattered gradients and the logits'
    gradient; tests/test_dropin_memory.py counts them on the Duo code's own
    method);
  - the drop-in on the logits: the bf16 logits and usdm_loss's gradient in
    their dtype (``inplace_grad``): 4 N K;
  - the drop-in with the output layer fused (linear_usdm_loss, reduction
    'sum'): per chunk of C tokens (C = 64 MiB / 4K, the ops' default on CUDA)
    the chunk's float32 logits and their gradient, 8 C K, and the bf16 chunk
    before its float32 copy, 2 C K; the weight's float32 copy for
    ``grad_hidden`` (4 K d); ``grad_hidden`` in float32 (4 N d), held from the
    forward to the backward. (The weight's gradient is in the state.)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .cost_model import K_GPT2

GPU_BYTES = 80e9
SEQ = 1024  # configs/model/small.yaml: length
SEQS_PER_GPU = 64  # configs/config.yaml: loader.global_batch_size 512 on 8 GPUs
STATE_BYTES_PER_PARAM = 4 + 4 + 8 + 4  # float32 weight, gradient, AdamW's two moments, the EMA copy
AUTOCAST_COPY_BYTES_PER_PARAM = 2  # autocast's bf16 copies of the weights
ACT_PER_BLOCK = 66  # bytes per token per block, in units of d (module docstring)
FINAL_ACT = 3 * 4 + 2  # the final layer: norm (input, output), modulation input (float32); the linear's bf16 input
DUO_LOSS_PEAK = 18  # bytes per logit at the Duo code's loss peak: the bf16 logits (2) + 4 float32 [N, K] tensors
CHUNK_BYTES = 64 << 20  # the fused ops' default chunk on CUDA: 64 MiB of float32 logits


@dataclass(frozen=True)
class DiT:
    """models.dit.DIT's shape (configs/model/small.yaml by default)."""

    hidden: int = 768
    blocks: int = 12
    cond: int = 128
    mlp: int = 4
    freq: int = 256  # TimestepEmbedder's frequency_embedding_size

    def params(self, vocab: int) -> int:
        """The parameters of models.dit.DIT(vocab_size=vocab) (adaLN, not causal)."""
        d, c, m = self.hidden, self.cond, self.mlp
        embed = vocab * d
        sigma_map = (self.freq * c + c) + (c * c + c)
        block = d + 3 * d * d + d * d + d + (d * m * d + m * d) + (m * d * d + d) + (c * 6 * d + 6 * d)
        final = d + (d * vocab + vocab) + (c * 2 * d + 2 * d)
        return embed + sigma_map + self.blocks * block + final


DIT_SMALL = DiT()
VARIANTS = ("Duo code", "drop-in on the logits", "drop-in, output layer fused")


def step_bytes(tokens: int, vocab: int = K_GPT2, model: DiT = DIT_SMALL) -> dict[str, dict[str, float]]:
    """Bytes held at the peak of one ELBO training step of ``tokens`` tokens, per
    variant: {"state", "activations", "output", "total"} (module docstring)."""
    P, d = model.params(vocab), model.hidden
    state = P * (STATE_BYTES_PER_PARAM + AUTOCAST_COPY_BYTES_PER_PARAM)
    activations = tokens * d * (model.blocks * ACT_PER_BLOCK + FINAL_ACT)
    chunk = max(1, CHUNK_BYTES // (4 * vocab))
    outputs = {
        VARIANTS[0]: DUO_LOSS_PEAK * tokens * vocab,
        VARIANTS[1]: 4 * tokens * vocab,
        VARIANTS[2]: 10 * min(chunk, tokens) * vocab + 4 * vocab * d + 4 * tokens * d,
    }
    return {v: {"state": state, "activations": activations, "output": o, "total": state + activations + o}
            for v, o in outputs.items()}


def largest_batch(vocab: int = K_GPT2, model: DiT = DIT_SMALL, seq: int = SEQ, gpu_bytes: float = GPU_BYTES) -> dict[str, int]:
    """The most sequences of ``seq`` tokens per GPU whose step fits ``gpu_bytes``, per variant."""
    out = {}
    for v in VARIANTS:
        lo, hi = 0, 1
        while step_bytes(hi * seq, vocab, model)[v]["total"] <= gpu_bytes:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:  # step_bytes grows with the tokens
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if step_bytes(mid * seq, vocab, model)[v]["total"] <= gpu_bytes else (lo, mid)
        out[v] = lo
    return out


def markdown_table(seqs: int = SEQS_PER_GPU, seq: int = SEQ, vocab: int = K_GPT2, model: DiT = DIT_SMALL) -> str:
    tokens = seqs * seq
    b = step_bytes(tokens, vocab, model)
    fit = largest_batch(vocab, model, seq)
    gb = lambda v: f"{v / 1e9:.1f} GB" if v >= 1e9 else f"{v / 1e6:.0f} MB"  # noqa: E731
    lines = [f"| {seqs} x {seq} tokens per GPU, K = {vocab}, DiT hidden {model.hidden} x {model.blocks} "
             f"({model.params(vocab) / 1e6:.0f}M parameters), bf16 | output layer + loss | "
             "state (weights, gradients, AdamW, EMA) | activations | total per GPU | "
             f"largest batch in {GPU_BYTES / 1e9:.0f} GB (sequences of {seq}) |",
             "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        r = b[v]
        lines.append(f"| {v} | {gb(r['output'])} | {gb(r['state'])} | {gb(r['activations'])} | {gb(r['total'])} "
                     f"| {fit[v]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=SEQS_PER_GPU, help="sequences per GPU (default 64)")
    args = ap.parse_args(argv)
    print(markdown_table(seqs=args.seqs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
