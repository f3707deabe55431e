"""GPU cost model of every duo_fast op (issue 12, part 2e): bytes and flops, the
H200 floor, our kernel's predicted time (today's kernel and the one designed in
issue 12 parts 2a-2d), and the Duo code's predicted traffic.

One table (`ROWS`), used by benchmarks/README.md (its numbers are printed by
`python -m duo_fast.bench.cost_model`) and by the GPU check
(benchmarks/gpu/check.sh prints measured / floor next to every benchmark row).

Notation: N tokens, K vocabulary, d embedding width, E = N*K entries, b the bytes
of one logit (4 fp32, 2 bf16/fp16). Bytes are device-memory traffic, reads +
writes (the convention of the copy bandwidth: a copy of S bytes moves 2S).

* floor: the fewest bytes any implementation must move (each input read once,
  each output written once) and the fewest flops (the GEMMs; elementwise math
  is counted only where it could matter); floor time = max(bytes / copy rate,
  flops / the rate of the unit that can do them).
* ours: what our kernel moves, as written: "today" is the kernel on main,
  "planned" the kernel designed in issue 12 (2a: 16-bit logits read natively,
  2b: float32 entries, 2c: two-read sampling, 2d: tensor-core curriculum_embed).
  Predicted time = max(bytes / copy rate, flops / unit rate) (the passes overlap
  compute and memory), and never under one launch (LAUNCH_MS).
* duo: the Duo code's own operations, counted op by op from the torch calls it
  makes (each elementwise op reads its inputs and writes its output; a softmax
  over a row longer than shared memory reads it 3 times and writes once; a GEMM
  reads its operands ~once). These are predictions, not measurements.

Rates: the H200 as measured on this workplace's machines (KINDS.md): ~4.3 TB/s
device-to-device copy, ~790 TFLOP/s dense bf16 on tensor cores, ~60 TFLOP/s
plain fp32 FMA. The GPU check measures the copy and the bf16 GEMM again in the
same run and uses those.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

COPY_TBPS = 4.3  # device-to-device copy, TB/s (read + write counted)
BF16_TFLOPS = 790.0  # dense bf16 on tensor cores
FP32_TFLOPS = 60.0  # plain fp32 FMA
FP64_TFLOPS = 30.0  # H100/H200 SXM fp64 FMA (datasheet ~34): the sampling reference's float64
RATES = {"bf16_tc": BF16_TFLOPS, "fp32": FP32_TFLOPS, "fp64": FP64_TFLOPS}
LAUNCH_MS = 0.002  # one kernel launch and its completion: no call is faster (tiny ops hit this)

K_GPT2 = 50257
D_MODEL = 768
N_BASELINES = 2048  # the BASELINES sizes (docs/benchmarks.md)
N_TRAIN = 65536  # a training-like size (issue 12)
TOPK = 128
# curriculum_embed (2d, csrc/cuda/curriculum_embed_mma.cu): a block of BN tokens re-reads
# the embedding (bf16) once in the forward; a block of BK vocabulary rows re-reads dh
# (bf16) once in the backward. Both regenerate the scores from Philox once per column
# slice of EMBED_SLICE_COLS (d = 768: 2 slices) at ~EMBED_DRAW_INSTR fp32-pipe
# instructions per score (Philox4x32-10 per 4 scores, Box-Muller, exp), at
# FP32_TFLOPS / 2 instructions per second.
BN_TOKENS = 64
BK_VOCAB = 64
EMBED_SLICE_COLS = 384
EMBED_DRAW_INSTR = 60


@dataclass
class Cost:
    bytes: float
    flops: float = 0.0
    unit: str | None = None  # "bf16_tc", "fp32", "fp64" or None (flops negligible)
    note: str = ""
    # compute on another unit, in series with `flops` (no overlap assumed): fp32-pipe
    # instructions (e.g. curriculum_embed's Philox draws beside its tensor-core GEMMs)
    fp32_instr: float = 0.0

    def ms(self, copy_tbps: float = COPY_TBPS, rates: dict | None = None) -> float:
        rates = rates or RATES
        t_mem = self.bytes / (copy_tbps * 1e12)
        t_flop = self.flops / (rates[self.unit] * 1e12) if self.unit else 0.0
        t_flop += self.fp32_instr / (rates["fp32"] / 2 * 1e12)  # an FMA is 2 flops, 1 instruction
        return max(1e3 * max(t_mem, t_flop), LAUNCH_MS)


@dataclass
class Row:
    op: str
    variant: str  # what is measured ("fwd+bwd", "ancestral", ...)
    dtypes: tuple  # logits dtypes the row exists for (b = 4, 2); () for no logits
    floor: Callable[..., Cost]
    today: Callable[..., Cost | None]  # None: the op does not take this dtype today
    planned: Callable[..., Cost]
    duo: Callable[..., Cost]
    derivation: str
    planned_by: str = ""  # issue part that designs the planned kernel ("" = same as today)


# ---- per-op formulas: f(N, K, d, b) -> Cost ----------------------------------------------


def _usdm_floor(N, K, d, b):
    return Cost(2 * N * K * b, note="read the logits once, write the gradient once")


def _usdm_today(N, K, d, b):
    E = N * K
    if b == 4:
        return Cost(4 * E * 4, note="3 sweeps (log-sum-exp, reductions, gradient) + gradient write, fp32")
    # 16-bit: upcast copy, the fp32 kernel, the fp32 gradient cast back
    return Cost(E * (b + 4) + 16 * E + E * (4 + b), note="float32 copy of the logits, fp32 kernel, cast of the gradient")


def _usdm_planned(N, K, d, b):
    return Cost(4 * N * K * b, note="3 sweeps reading the logits in their dtype + gradient write in their dtype")


def _usdm_duo(N, K, d, b):
    # forward: log_softmax 3 reads (b) + 1 write (fp32 under autocast); exp; K*a*x, +1, -a
    # (3 elementwise ops); log; sum: 12 fp32 passes of 4 bytes = 48. backward: log (1r1w),
    # mul (1r1w), exp (2r1w), log_softmax (3r1w) = 11 passes = 44; a 16-bit input adds the
    # autocast cast of its gradient (4 + b).
    E = N * K
    return Cost(E * (3 * b + 4 + 44 + 44 + (0 if b == 4 else 4 + b)),
                note="log_softmax + nll_per_token + autograd, ~26 fp32 passes over [N, K]")


def _kl_floor(N, K, d, b):
    return Cost(3 * N * K * b, note="read student and teacher once, write the gradient once")


def _kl_today(N, K, d, b):
    if b != 4:
        return None  # float32 logits only today
    return Cost(7 * N * K * 4, note="3 sweeps over student and teacher + gradient write, fp32")


def _kl_planned(N, K, d, b):
    return Cost(7 * N * K * b, note="3 sweeps over both in their dtype + gradient write in the student's dtype")


def _kl_duo(N, K, d, b):
    # log_softmax of both (3b + 4 each), exp, ls - lt, product (1r1w, 2r1w, 2r1w), sum (1r);
    # backward: mul (2 x 1r1w), exp (2r1w), the accumulation (2r1w), log_softmax (3r1w)
    E = N * K
    return Cost(E * (2 * (3 * b + 4) + 4 * (2 + 3 + 3 + 1) + 4 * (2 + 2 + 3 + 3 + 4) + (0 if b == 4 else 4 + b)),
                note="two log_softmax, the inline KL, autograd: ~31 fp32 passes")


P_SCAN = 0.43 * 0.5  # ancestral alpha_t=0.3, alpha_s=0.6: ~43% of rows scan, half a row each


def _step_floor(N, K, d, b):
    return Cost(N * K * b, note="read the logits once")


def _step_today(N, K, d, b):
    return Cost((2 + P_SCAN) * N * K * b, note="max pass, weight-sum pass, scan of ~half a row in 43% of rows")


def _step_planned(N, K, d, b):
    return Cost((1 + P_SCAN) * N * K * b, note="online (max, sum) pass + the scan")


def _step_duo(N, K, d, b):
    # float64 path (sampling.use_float64=True): log_softmax, .to(float64), exp, one_hot (int64),
    # .to(float32), the 8 elementwise ops of _posterior_from_x0 in float64, and
    # sample_categorical's rand_like, +, log, -, /, argmax: counted op by op = 3b + 304 B/entry.
    return Cost(N * K * (3 * b + 304), flops=0, note="float64 posterior + Gumbel argmax, ~79 fp32-sized passes")


def _zt_floor_single(N, K, d, b):
    return Cost(16 * N, note="read x0, write z_t (int64)")


def _zt_floor_coupled(N, K, d, b):
    return Cost(24 * N, note="read x0, write z_t and z_s (int64)")


def _zt_duo_single(N, K, d, b):
    # one_hot (w8), randn (w4), alpha*x (r8w4), sigma*eps (r4w4), add (r8w4), argmax (r4)
    return Cost(48 * N * K, note="dense one-hot, noise, argmax")


def _zt_duo_coupled(N, K, d, b):
    # one_hot (w8), .to(float32) (r8w4), randn (w4), per level: alpha*x, sigma*eps, add (28), argmax (4)
    return Cost(88 * N * K, note="_sample_trajectory + 2 argmax")


def _embed_floor(N, K, d, b):
    # the two GEMMs P @ E and P^T @ dh on tensor cores; E, h, dh, dE moved once
    return Cost(8 * (K * d + N * d), flops=4 * N * K * d, unit="bf16_tc",
                note="P @ E forward, P^T @ dh backward (4 N K d flops)")


def _embed_today(N, K, d, b):
    return Cost(8 * (K * d + N * d), flops=4 * N * K * d, unit="fp32",
                note="fp32 FMA, scores regenerated from Philox in both passes")


def _embed_planned(N, K, d, b):
    # bf16 operands (copies of E and dh made once: +4 (K d + N d) bytes), fp32 accumulation;
    # the forward streams E (bf16) once per BN-token block, the backward dh (bf16) once per
    # BK-vocabulary block (an upper bound: a column slice of E, 38 MB at K = 50257, fits
    # the 50 MB L2 the concurrent blocks share); the scores are drawn in both passes,
    # once per column slice
    reread = (N / BN_TOKENS) * K * d * 2 + (K / BK_VOCAB) * N * d * 2
    slices = -(-d // EMBED_SLICE_COLS)
    return Cost(reread + 12 * (K * d + N * d), flops=4 * N * K * d, unit="bf16_tc",
                fp32_instr=2 * slices * N * K * EMBED_DRAW_INSTR,
                note=f"tensor cores; E re-read per {BN_TOKENS}-token block, dh per {BK_VOCAB}-row block; "
                     f"scores drawn twice per slice of {EMBED_SLICE_COLS} columns (in series with the GEMMs)")


def _embed_duo(N, K, d, b):
    # one_hot (w8), _q_xt_gaussian (w4 + r8w4 + r4w4 + r8w4), * 1/tau (r4w4), argmax (r4),
    # softmax (3r1w), einsum (r4), backward P^T @ dh (r4); GEMMs in fp32 (autocast float32)
    return Cost(80 * N * K, flops=4 * N * K * d, unit="fp32", note="dense latent, softmax, fp32 einsum")


def _topk_embed_floor(N, K, d, b, k=TOPK):
    return Cost(2 * N * k * d * 4 + 8 * N * d, flops=4 * N * k * d, unit="fp32",
                note="gather k embedding rows per token, scatter-add their gradient")


def _topk_embed_duo(N, K, d, b, k=TOPK):
    # the bag forward/backward as ours, plus sample_tempered_softmax_topk: ~40 float64 passes
    # over [N, k] and Floyd's loop (k iterations over [N, t]: ~N k^2/2 int64 reads, 3x)
    return Cost(2 * N * k * d * 4 + 40 * N * k * 8 + 1.5 * N * k * k * 8, note="float64 top-k order statistics, "
                "Floyd's ids (O(N k^2)), F.embedding_bag")


def _topk_floor(N, K, d, b, k=TOPK):
    return Cost(12 * N * k + 16 * N, note="write k ids (int64) and weights (fp32), read x0, write z_t")


def _topk_duo(N, K, d, b, k=TOPK):
    return Cost(40 * N * k * 8 + 1.5 * N * k * k * 8, note="float64 order statistics + Floyd's ids")


def _linear_floor(N, K, d, b):
    return Cost(2 * (N * d + K * d) * 4, flops=6 * N * K * d, unit="bf16_tc",
                note="3 GEMMs (logits, grad hidden, grad W) on tensor cores; logits never stored")


def _linear_today(N, K, d, b):
    # fp32 GEMMs: forward logits, backward recomputes them, grad hidden, grad W (8 N K d);
    # per chunk the logits go through the fused loss (4 passes) and back through 2 GEMMs
    return Cost(12 * N * K * 4, flops=8 * N * K * d, unit="fp32", note="fp32 GEMMs (logits recomputed in backward)")


def _linear_duo(N, K, d, b):
    return Cost(N * K * (4 + 3 * 4 + 92), flops=6 * N * K * d, unit="fp32",
                note="hidden @ W.T + b (fp32), the Duo loss, autograd")


def _linear_kl_floor(N, K, d, b):
    return Cost(2 * (2 * N * d + 3 * K * d) * 4, flops=8 * N * K * d, unit="bf16_tc",
                note="4 GEMMs (student and teacher logits, grad hidden, grad W) on tensor cores; logits never stored")


def _linear_kl_today(N, K, d, b):
    # reduction="sum": per chunk the two logits GEMMs (written once each), the KL kernel's
    # 3 sweeps over both + its gradient write (7 E 4), the gradient read by 2 GEMMs
    return Cost(11 * N * K * 4, flops=8 * N * K * d, unit="fp32", note="fp32 GEMMs, the fused KL per chunk")


def _linear_kl_duo(N, K, d, b):
    return Cost(2 * N * K * 4 + _kl_duo(N, K, d, 4).bytes + 2 * N * K * 4, flops=8 * N * K * d, unit="fp32",
                note="both logits GEMMs (fp32), the Duo KL, autograd")


def _linear_step_floor(N, K, d, b):
    return Cost((N * d + K * d) * 4 + 16 * N, flops=2 * N * K * d, unit="bf16_tc",
                note="the logits GEMM on tensor cores, never stored; z read, z_s written")


def _linear_step_today(N, K, d, b):
    # per chunk the logits are written by the GEMM, then read by sample_step's passes
    return Cost((3 + P_SCAN) * N * K * 4, flops=2 * N * K * d, unit="fp32",
                note="fp32 GEMM per chunk + the sample_step kernel on the chunk's logits")


def _linear_step_duo(N, K, d, b):
    return Cost(N * K * 4 + _step_duo(N, K, d, 4).bytes, flops=2 * N * K * d, unit="fp32",
                note="hidden @ W.T + b (fp32), then the float64 posterior + Gumbel argmax")


def _g2a_floor(N, K, d, b):
    return Cost(24 * N, note="read gamma, write alpha and dalpha (float64)")


def _g2a_duo(N, K, d, b):
    return Cost(24 * N * 6, note="table index, two gathers, finite difference (float64)")


# DiffusionGemma's step (duo_fast.integrations.diffusion_gemma): N canvas rows, K = V =
# 262,144, d = 2304; canvas_step + softmax_embed against transformers' own step + soft
# embedding. softmax_embed's tensor-core kernel re-reads the logits once per column slice
# of DG_SLICE_COLS and the embedding (bf16) once per block of BN_TOKENS rows.
DG_SLICE_COLS = 384
DG_EXP_INSTR = 12  # fp32-pipe instructions per weight (scaled logit, exp, select), per slice


def _dg_floor(N, K, d, b):
    return Cost(N * K * b + 2 * K * d + 2 * N * d, flops=2 * N * K * d, unit="bf16_tc",
                note="the logits and E (bf16) read once; P @ E on tensor cores")


def _dg_today(N, K, d, b):
    slices = -(-d // DG_SLICE_COLS)
    reread = max(N / BN_TOKENS, 1) * K * d * 2
    return Cost((1.5 + 2 + slices) * N * K * b + reread, flops=2 * N * K * d, unit="bf16_tc",
                fp32_instr=slices * N * K * DG_EXP_INSTR,
                note=f"canvas_step (1.5 reads), softmax_embed's row stats (2 reads) and one read per "
                     f"{DG_SLICE_COLS}-column slice; E re-read per {BN_TOKENS}-row block")


def _dg_duo(N, K, d, b):
    # per entry, op by op: / T (r b, w4), softmax (3r4 w4), multinomial (exponential w4, div r8 w4,
    # argmax r4), argmax (r4), Categorical(logits).entropy() twice (logsumexp 2r4, subtract r8 w4,
    # softmax 3r4 w4, clamp r4 w4, product r8 w4, sum r4: 64 each), the self-conditioning copy
    # (r4 w2), the next forward's softmax (3r2 w4) and cast (r4 w2), the GEMM's read of P (r2)
    E = N * K
    return Cost(E * (b + 4 + 16 + 16 + 4 + 128 + 6 + 10 + 6 + 2) + 2 * K * d, flops=2 * N * K * d,
                unit="bf16_tc", note="transformers' step: ~48 fp32-sized passes over [N, V] + the GEMM")


_same = None  # planned == today

ROWS: list[Row] = [
    Row("usdm_loss", "fwd+bwd (inplace_grad)", (4, 2), _usdm_floor, _usdm_today, _usdm_planned, _usdm_duo,
        "floor: logits read once + gradient written once (2Eb). Ours: 3 sweeps per row (log-sum-exp, the "
        "reductions, the gradient) + the gradient write = 4Eb; today a 16-bit input goes through a float32 copy "
        "(E(b+4) + 16E + E(4+b) = 28E for bf16). Duo: log_softmax + nll_per_token + autograd ~ 26 passes.",
        planned_by="2a (16-bit read natively), 2b (float32 entries, 16-byte loads)"),
    Row("distill_kl", "kl-bwd fwd+bwd", (4, 2), _kl_floor, _kl_today, _kl_planned, _kl_duo,
        "floor: both logits read once, gradient written once (3Eb). Ours: 3 sweeps over student and teacher "
        "(both log-sum-exps, the KL, the gradient) + the write = 7Eb (float32 only today). Duo: two log_softmax, "
        "the inline KL, autograd ~ 31 passes.", planned_by="2a (16-bit read natively)"),
    Row("sample_step", "ancestral", (4, 2), _step_floor, _step_today, _step_planned, _step_duo,
        "floor: the logits read once (Eb). Ours today: a max pass, a weight-sum pass, then the scan of about half "
        "a row in the ~43% of rows that draw from the model part ((2 + 0.22)Eb); planned: an online (max, sum) "
        "pass + the scan ((1 + 0.22)Eb). Duo: the float64 posterior and Gumbel argmax, counted op by op "
        "(3b + 304 bytes per entry).", planned_by="2c (two-read sampling)"),
    Row("sample_zt", "single", (), _zt_floor_single, _zt_floor_single, _zt_floor_single, _zt_duo_single,
        "floor = ours: x0 read, z_t written (16N bytes), O(1) math per token (3 numbers per token, no noise "
        "tensor). Duo: one-hot, [N, K] noise, argmax = 48 bytes per entry."),
    Row("sample_zt", "coupled", (), _zt_floor_coupled, _zt_floor_coupled, _zt_floor_coupled, _zt_duo_coupled,
        "as single, plus z_s (24N bytes). Duo: _sample_trajectory + 2 argmax = 88 bytes per entry."),
    Row("curriculum_embed", "fwd+bwd d=768", (), _embed_floor, _embed_today, _embed_planned, _embed_duo,
        "floor: the GEMMs P @ E and P^T @ dh, 4NKd flops, on tensor cores (E, h, dh, dE moved once). Ours today: "
        "the same flops on fp32 FMA (scores regenerated from Philox in both passes: no [N, K] memory). Planned "
        f"(2d): bf16 operands with fp32 accumulation, flash-attention-2 tiling; E (bf16) re-read per {BN_TOKENS}-token "
        f"block in the forward, dh (bf16) per {BK_VOCAB}-row block in the backward; the Philox scores drawn in both "
        f"passes once per {EMBED_SLICE_COLS}-column slice, ~{EMBED_DRAW_INSTR} fp32 instructions each, counted in "
        "series with the GEMMs (they dominate: ~2x the GEMM time at d = 768). Duo: the dense latent and softmax "
        "(80 bytes per entry) and the fp32 einsum (it runs under autocast(float32)).",
        planned_by="2d (tensor cores)"),
    Row("curriculum_topk_embed", f"fwd+bwd k={TOPK} d=768", (), _topk_embed_floor, _topk_embed_floor,
        _topk_embed_floor, _topk_embed_duo,
        "floor = ours: k embedding rows gathered per token (fp32) and their gradient scatter-added "
        "(2Nkd*4 bytes). Duo: the same bag plus the float64 top-k order statistics and Floyd's ids (O(N k^2))."),
    Row("curriculum_topk", f"k={TOPK}", (), _topk_floor, _topk_floor, _topk_floor, _topk_duo,
        "floor = ours: write k ids and weights per token (12Nk bytes); the math (order statistics, ndtri) is "
        "O(Nk) special functions. Duo: ~40 float64 passes over [N, k] + Floyd's loop."),
    Row("linear_usdm_loss", "fwd+bwd d=768", (), _linear_floor, _linear_today, _linear_today, _linear_duo,
        "floor: 3 GEMMs (6NKd flops) on tensor cores, the logits never stored. Ours: chunked fp32 GEMMs, the "
        "logits recomputed in backward (8NKd flops) and each chunk through the fused loss. Duo: hidden @ W.T + b "
        "and its loss on the full [N, K] logits."),
    Row("linear_distill_kl", "kl-bwd fwd+bwd d=768", (), _linear_kl_floor, _linear_kl_today, _linear_kl_today,
        _linear_kl_duo,
        "floor: 4 GEMMs (8NKd flops: student and teacher logits, grad hidden, grad W) on tensor cores, no logits "
        "stored. Ours (reduction='sum'): chunked fp32 GEMMs, the gradients in the forward, each chunk's two logits "
        "through the fused KL kernel (7 passes) and its gradient through 2 GEMMs. Duo: both [N, K] logits, its KL, "
        "autograd."),
    Row("linear_sample_step", "ancestral d=768", (), _linear_step_floor, _linear_step_today, _linear_step_today,
        _linear_step_duo,
        "floor: the logits GEMM (2NKd flops) on tensor cores, the logits never stored. Ours: a chunk's fp32 logits "
        "written by the GEMM and read by sample_step's passes. Duo: hidden @ W.T + b on the full [N, K], then its "
        "float64 posterior and Gumbel argmax."),
    Row("diffusion_gemma", "step+soft_embedding d=2304", (4, 2), _dg_floor, _dg_today, _dg_today, _dg_duo,
        "DiffusionGemma's denoising step after the forward plus the next soft embedding, N canvas rows, "
        "V = 262,144. floor: the logits read once, E (bf16) once, the GEMM P @ E (2NVd flops) on tensor cores. "
        "Ours: canvas_step (one online read + the scan of ~half a row), softmax_embed's row statistics (max, "
        "kept sum: 2 reads) and its tensor-core GEMM, which recomputes the weights per "
        f"{DG_SLICE_COLS}-column slice (6 reads at d = 2304) and re-reads E per {BN_TOKENS}-row block. "
        "'Duo code' here: transformers' own step (temperature, softmax, multinomial, argmax, the entropy twice, "
        "the self-conditioning copy, the soft embedding's softmax and cast, cuBLAS), counted op by op."),
    Row("gamma_to_alpha", "N values f64", (), _g2a_floor, _g2a_floor, _g2a_floor, _g2a_duo,
        "floor = ours: one read and two writes per value (Chebyshev expansions in registers). Duo: table lookup "
        "and finite difference (needs its integral/gpt2.pkl)."),
]

_BY_KEY = {(r.op, r.variant.split()[0]): r for r in ROWS}


def row_for(op: str, variant: str = "") -> Row | None:
    """The model row of an op (first row of that op unless variant's first word names another)."""
    if variant:
        r = _BY_KEY.get((op, variant.split()[0]))
        if r is not None:
            return r
    return next((r for r in ROWS if r.op == op), None)


def predict(op: str, N: int, K: int = K_GPT2, d: int = D_MODEL, b: int = 4, variant: str = "",
            copy_tbps: float = COPY_TBPS, rates: dict | None = None) -> dict | None:
    """The model's numbers for one benchmark row: floor bytes/flops/ms, ours (today,
    planned) bytes/ms, the Duo code's bytes/ms (the GPU check passes its measured rates)."""
    r = row_for(op, variant)
    if r is None:
        return None
    out = {"op": r.op, "variant": r.variant, "N": N, "K": K, "d": d, "b": b}
    for key, fn in (("floor", r.floor), ("today", r.today), ("planned", r.planned), ("duo", r.duo)):
        c = fn(N, K, d, b)
        out[key] = None if c is None else {"bytes": c.bytes, "flops": c.flops, "unit": c.unit,
                                           "ms": c.ms(copy_tbps, rates), "note": c.note}
    out["planned_by"] = r.planned_by
    return out


def _fmt_bytes(v):
    if v is None:
        return "—"
    for unit, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if v >= s:
            return f"{v / s:.3g} {unit}"
    return f"{v:.0f} B"


def _fmt_ms(v):
    if v is None:
        return "—"
    return f"{v:.3g}"


def _fmt_flops(c):
    if not c or not c["flops"]:
        return "—"
    return f"{c['flops'] / 1e12:.3g} TF ({c['unit']})"


def markdown_table(sizes=((N_BASELINES, "BASELINES"), (N_TRAIN, "training"))) -> str:
    """The table of benchmarks/README.md's cost model section."""
    lines = ["| op | N | logits | floor bytes | floor flops | floor ms | ours today: bytes, ms | "
             "ours planned: bytes, ms | planned by (issue 12) | Duo code bytes, ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        for N, _ in sizes:
            for b in (r.dtypes or (None,)):
                p = predict(r.op, N, b=b or 4, variant=r.variant)
                dt = {4: "fp32", 2: "bf16", None: "—"}[b]
                today = p["today"]
                planned = p["planned"]
                same = today is not None and planned["bytes"] == today["bytes"] and planned["unit"] == today["unit"]
                lines.append(
                    f"| {r.op} {r.variant} | {N} | {dt} | {_fmt_bytes(p['floor']['bytes'])} | {_fmt_flops(p['floor'])} "
                    f"| {_fmt_ms(p['floor']['ms'])} | "
                    + ("not taken today" if today is None else f"{_fmt_bytes(today['bytes'])}, {_fmt_ms(today['ms'])}")
                    + " | " + ("same as today" if same else f"{_fmt_bytes(planned['bytes'])}, {_fmt_ms(planned['ms'])}")
                    + f" | {(r.planned_by.split(' (')[0] if r.planned_by and not same else '—')}"
                    + f" | {_fmt_bytes(p['duo']['bytes'])}, {_fmt_ms(p['duo']['ms'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--derivations", action="store_true", help="also print each row's derivation")
    args = ap.parse_args(argv)
    print(markdown_table())
    if args.derivations:
        for r in ROWS:
            print(f"\n* {r.op} ({r.variant}): {r.derivation}" + (f" Planned by issue 12 {r.planned_by}." if r.planned_by else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
