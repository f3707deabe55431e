"""GPU benchmarks of the GPU check (benchmarks/gpu/check.sh, step "bench").

    python -m duo_fast.bench.gpu_bench --out bench.jsonl [--dry-run] [--deadline UNIX_TIME]

Every op at a training-like size (N = 16384 and 65536 tokens, K = 50257, d = 768;
fp32 and bf16 logits where the op takes logits; DiffusionGemma's step at 256 x {1, 4}
canvas rows, V = 262,144, d = 2304, against transformers' own code) against the Duo code's own
operations (duo_fast/bench/duo_code.py: the Duo code where it imports, else its
eager copy, said in the output) eager and under torch.compile. The calls, the
reference side and the state layout are those of duo_fast/bench/cases_<op>.py
(reused, not copied); only the inputs are made here, on the device (a CPU-made
13 GB logits tensor would take longer than the measurement).

Protocol: CUDA events around each call (duo_fast.bench.common.time_call_ms), warm-up
calls first (3 for a torch.compile side: compile time is not counted), then one call
for the peak memory (torch.cuda.max_memory_allocated growth), then the median of the
repeats (fewer at big sizes). Inputs smaller than 4x the L2 cache are rotated among
copies, and the L2 is flushed (a 2x L2 buffer written) before every timed call, so
that no call finds its inputs in L2. Out-of-memory is caught per side and reported
as OOM. A side is skipped (said so) when the deadline is too close; the eager rows
of every op run first, the torch.compile sides after them. The device's copy
bandwidth and its bf16 (and fp32) GEMM rates are measured first, in the same run.

Writes one JSON line per measurement to --out as it goes, so a step killed by its
time box keeps what it measured. --dry-run: tiny sizes on the CPU, the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import duo_fast
from duo_fast import reference as R
from duo_fast.bench import cases_curriculum_embed as C_EMB
from duo_fast.bench import cases_curriculum_topk as C_TOPK
from duo_fast.bench import cases_diffusion_gemma as C_DG
from duo_fast.bench import cases_distill_kl as C_KL
from duo_fast.bench import cases_gamma_to_alpha as C_G2A
from duo_fast.bench import cases_linear_distill_kl as C_LKL
from duo_fast.bench import cases_linear_sample_step as C_LSS
from duo_fast.bench import cases_linear_usdm_loss as C_LIN
from duo_fast.bench import cases_sample_step as C_STEP
from duo_fast.bench import cases_sample_zt as C_ZT
from duo_fast.bench import cases_usdm_loss as C_LOSS
from duo_fast.bench import common, duo_code

from . import cost_model

GPU_SIZES = {"N": (16384, 65536), "K": cost_model.K_GPT2, "d": cost_model.D_MODEL, "L": 1024}
DRY_SIZES = {"N": (64,), "K": 1000, "d": 64, "L": 32}
TOPK = cost_model.TOPK
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIDE_BUDGET_MS = 8000.0  # timed calls per side, at most (repeats are cut for slow calls)
AUTOCAST_NOTE = ("16-bit rows: the Duo code's side runs under torch.autocast(bfloat16), as Lightning's "
                 "bf16-mixed precision runs it in training (log_softmax autocasts to float32)")


# ---------------------------------------------------------------------------------------
# Inputs, made on the device (same keys as the cases modules' states)
# ---------------------------------------------------------------------------------------


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _levels(B, g, device):
    gamma = R.DUO_GAMMA_MIN + (R.DUO_GAMMA_MAX - R.DUO_GAMMA_MIN) * torch.rand(B, generator=g, dtype=torch.float64,
                                                                                device=device)
    return gamma


def _batch(N, L):
    """(B, L) with B * L = N tokens: rows of length L (all N in one row when N < L)."""
    B = max(N // L, 1)
    return B, N // B


def _targets(B, L, K, g, device):
    """Levels and tokens of a loss batch: per-row alpha and dalpha/dt of the Duo
    curriculum's gamma, x0, and z equal to x0 on about half the tokens."""
    gamma = _levels(B, g, device)
    alpha, dalpha_dgamma = duo_fast.gamma_to_alpha(gamma, K)
    dalpha = (R.DUO_GAMMA_MAX - R.DUO_GAMMA_MIN) * dalpha_dgamma
    x0 = torch.randint(0, K, (B, L), generator=g, device=device)
    keep = torch.rand(B, L, generator=g, device=device) < 0.5
    z = torch.where(keep, x0, torch.randint(0, K, (B, L), generator=g, device=device))
    return {"z": z, "x0": x0, "alpha": alpha.float()[:, None], "dalpha": dalpha.float()[:, None]}


def _loss_state(N, K, L, dtype, seed=1):
    B, L = _batch(N, L)

    def setup(device):
        g = _gen(device, seed)
        st = _targets(B, L, K, g, device)
        logits = torch.randn(B, L, K, generator=g, device=device, dtype=torch.float32).to(dtype)
        return {"logits": logits.requires_grad_(True), **st, "K": K}

    return setup


def _kl_state(N, K, L, dtype, seed=2):
    B, L = _batch(N, L)

    def setup(device):
        g = _gen(device, seed)
        s = torch.randn(B, L, K, generator=g, device=device).to(dtype)
        t = torch.randn(B, L, K, generator=g, device=device).to(dtype)
        return {"student": s.requires_grad_(True), "teacher": t, "K": K}

    return setup


def _step_state(N, K, L, dtype, seed=3):
    B, L = _batch(N, L)

    def setup(device):
        g = _gen(device, seed)
        logits = (2.0 * torch.randn(B, L, K, generator=g, device=device)).to(dtype)
        return {"logits": logits, "z": torch.randint(0, K, (B, L), generator=g, device=device),
                "alpha_t": torch.full((B, 1), 0.3, dtype=torch.float64, device=device),
                "alpha_s": torch.full((B, 1), 0.6, dtype=torch.float64, device=device), "top_p": 1.0, "K": K}

    return setup


def _zt_state(N, K, L, coupled, seed=4):
    B, L = _batch(N, L)

    def setup(device):
        g = _gen(device, seed)
        lv = _levels(2 * B, g, device).view(2, B)
        lo, hi = lv.min(0).values, lv.max(0).values
        return {"x0": torch.randint(0, K, (B, L), generator=g, device=device),
                "gamma": hi if coupled else lv[0], "gamma_s": lo if coupled else None, "K": K}

    return setup


def _cur_state(N, K, L, d, grad, seed=5):
    B, L = _batch(N, L)

    def setup(device):
        g = _gen(device, seed)
        gamma = _levels(B, g, device)
        E = (0.02 * torch.randn(K, d, generator=g, device=device))
        return {"x0": torch.randint(0, K, (B, L), generator=g, device=device), "gamma": gamma,
                "gamma32": gamma.float(), "E": E.requires_grad_(grad), "K": K}

    return setup


def _linear_state(N, K, L, d, seed=6):
    B, L = _batch(N, L)

    def setup(device):
        g = _gen(device, seed)
        st = _targets(B, L, K, g, device)
        return {"hidden": torch.randn(B, L, d, generator=g, device=device).requires_grad_(True),
                "W": (0.02 * torch.randn(K, d, generator=g, device=device)).requires_grad_(True),
                "b": torch.zeros(K, device=device).requires_grad_(True), **st, "K": K}

    return setup


def _linear_kl_state(N, K, L, d, seed=8):
    """_linear_state (the student) + a teacher of the same width, no gradient."""
    student = _linear_state(N, K, L, d, seed)

    def setup(device):
        st = student(device)
        g = _gen(device, seed + 100)
        B, L2 = st["z"].shape
        return {**st, "t_hidden": torch.randn(B, L2, d, generator=g, device=device),
                "t_W": 0.02 * torch.randn(K, d, generator=g, device=device),
                "t_b": 0.1 * torch.randn(K, generator=g, device=device)}

    return setup


def _linear_step_state(N, K, L, d, seed=9):
    B, L = _batch(N, L)

    def setup(device):
        g = _gen(device, seed)
        return {"hidden": torch.randn(B, L, d, generator=g, device=device),
                "W": 2.0 / d**0.5 * torch.randn(K, d, generator=g, device=device),
                "b": 0.1 * torch.randn(K, generator=g, device=device),
                "z": torch.randint(0, K, (B, L), generator=g, device=device),
                "alpha_t": torch.full((B, 1), 0.3, dtype=torch.float64, device=device),
                "alpha_s": torch.full((B, 1), 0.6, dtype=torch.float64, device=device), "top_p": 1.0, "K": K}

    return setup


def _g2a_state(N, K, seed=7):
    def setup(device):
        return {"gamma": _levels(N, _gen(device, seed), device), "K": K}

    return setup


# The reference's stand-in model / embedding layer, added to a state (as cases_*.with_model)
def _with_model(setup, **kw):
    def wrapped(device):
        st = setup(device)
        if "logits" in kw:  # sample_step: the model's forward returns these logits
            kw2 = dict(kw)
            kw2["logits"] = st["logits"]
            st["model"] = duo_code.reference().Model(st["K"], device, **kw2)
        else:
            st["model"] = duo_code.reference().Model(st["K"], device, **kw)
        return st

    return wrapped


def _with_layer(setup):
    def wrapped(device):
        st = setup(device)
        impl = duo_code.reference()
        st["model"] = impl.Model(st["K"], device)
        grad = st["E"].requires_grad
        st["layer"] = impl.EmbeddingLayer(st["E"].detach())
        st["layer"].embedding.requires_grad_(grad)
        st["E"] = st["layer"].embedding
        return st

    return wrapped


# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


@dataclass
class Side:
    fn: Callable[[dict], Any]
    setup: Callable[[str], dict]
    before_each: Callable[[dict], Any] | None = None
    compile: bool = False
    autocast: torch.dtype | None = None  # run the call under torch.autocast(device, dtype)
    source: str | Callable[[], str] | None = None
    note: str = ""


@dataclass
class Row:
    op: str
    variant: str
    N: int
    K: int
    d: int
    dtype: str | None  # logits dtype name, None where the op takes no logits
    sides: dict  # side name -> Side ("duo", "ref", "compiled")
    notes: list = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.variant}-N{self.N}" + (f"-{self.dtype}" if self.dtype else "")


def _autocast_for(dtype_name, device):
    return DTYPES[dtype_name] if dtype_name and dtype_name != "fp32" else None


def _diffusion_gemma_rows(dry: bool) -> list[Row]:
    """DiffusionGemma's step + soft embedding, transformers' code patched vs not
    (duo_fast/bench/cases_diffusion_gemma.py), flat logits (a dense soft embedding);
    none where transformers has no DiffusionGemma."""
    try:
        C_DG._available()
    except common.CasesUnavailable:
        return []
    canvas, (_, V, d) = (C_DG.TINY_CANVAS, C_DG.SIZES["tiny"][0]) if dry else (C_DG.CANVAS, C_DG.SIZES["full"][0])
    out = []
    for B in (1,) if dry else (1, 4):
        for dn, dt in DTYPES.items():
            out.append(Row("diffusion_gemma", "step+soft_embedding", B * canvas, V, d, dn, {
                "duo": Side(C_DG._step_and_soft_embedding, C_DG._setup("flat", B, V, d, dt, True, canvas),
                            note="_denoising_step + the decoder's soft embedding, diffusion_gemma.patch() applied"),
                "ref": Side(C_DG._step_and_soft_embedding, C_DG._setup("flat", B, V, d, dt, False, canvas),
                            source=C_DG._source, note="transformers' _denoising_step + the decoder's soft embedding"),
            }, ["diffusion_gemma: logits N(0, 3^2) made in setup (not counted), embedding bf16; 'Duo eager' is "
                "transformers' own code here"]))
    return out


def rows(dry: bool) -> list[Row]:
    S = DRY_SIZES if dry else GPU_SIZES
    K, d, L = S["K"], S["d"], S["L"]
    src = duo_code.source
    out: list[Row] = _diffusion_gemma_rows(dry)
    for N in S["N"]:
        for dn, dt in DTYPES.items():
            ac = dt if dn != "fp32" else None
            st = _loss_state(N, K, L, dt)
            out.append(Row("usdm_loss", "fwd_bwd", N, K, d, dn, {
                "duo": Side(C_LOSS.duo_fwd_bwd, st, C_LOSS._drop_grad,
                            note="duo_fast.usdm_loss(..., inplace_grad=True).sum().backward()"),
                "ref": Side(C_LOSS.ref_fwd_bwd, _with_model(st), C_LOSS._drop_grad, autocast=ac, source=src,
                            note=C_LOSS.REF_NOTE),
                "compiled": Side(C_LOSS.ref_fwd_bwd, _with_model(st), C_LOSS._drop_grad, compile=True, autocast=ac,
                                 source=src, note=C_LOSS.COMPILED_NOTE),
            }, [AUTOCAST_NOTE] if ac else []))
            st = _kl_state(N, K, L, dt)
            out.append(Row("distill_kl", "bwd_fwd_bwd", N, K, d, dn, {
                "duo": Side(C_KL.duo_fwd_bwd, st, C_KL._drop_grad, note='duo_fast.distill_kl(s, t, "bwd", inplace_grad=True) fwd+bwd'),
                "ref": Side(C_KL.ref_fwd_bwd, _with_model(st), C_KL._drop_grad, autocast=ac, source=src,
                            note="Distillation.nll's kl-bwd (log_softmax of both, inline KL), autograd"),
                "compiled": Side(C_KL.ref_fwd_bwd, _with_model(st), C_KL._drop_grad, compile=True, autocast=ac,
                                 source=src, note="torch.compile of the same"),
            }, [AUTOCAST_NOTE] if ac else []))
            st = _step_state(N, K, L, dt)
            f64, f32 = (_float32_levels(_with_model(st, use_float64=u, p_nucleus=1.0, logits=None), *STEP_LEVELS)
                        for u in (True, False))
            out.append(Row("sample_step", "ancestral", N, K, d, dn, {
                "duo": Side(C_STEP._duo_fn, st, note="duo_fast.sample_step(logits, z, 0.3, 0.6, seed=...)"),
                "ref": Side(C_STEP._ref_fn(False), f64, autocast=ac, source=src,
                            note="the Duo code's _ancestral_update, float64 (its default sampling.use_float64=True)"),
                "compiled": Side(C_STEP._ref_fn(False), f32, compile=True, autocast=ac, source=src,
                                 note="torch.compile of _ancestral_update in float32 (use_float64=False)"),
            }, [AUTOCAST_NOTE] if ac else []))
        for coupled in (False, True):
            st = _zt_state(N, K, L, coupled)
            ref_st = _float32_levels(_with_model(st), *("gamma", "gamma_s")[:1 + coupled])
            out.append(Row("sample_zt", "coupled" if coupled else "single", N, K, d, None, {
                "duo": Side(C_ZT._duo_coupled if coupled else C_ZT._duo_single, st, note="duo_fast.sample_zt"),
                "ref": Side(C_ZT._ref_coupled if coupled else C_ZT._ref_single, ref_st,
                            source=src, note="dense one-hot + noise + argmax (Duo code)"),
                "compiled": Side(C_ZT._ref_coupled if coupled else C_ZT._ref_single,
                                 ref_st, compile=True, source=src,
                                 note="torch.compile of the same"),
            }))
        st = _cur_state(N, K, L, d, True)
        out.append(Row("curriculum_embed", "fwd_bwd", N, K, d, None, {
            "duo": Side(C_EMB._embed_duo, st, C_EMB._drop_grad, note="duo_fast.curriculum_embed fwd+bwd"),
            "ref": Side(C_EMB._embed_ref, _with_layer(st), C_EMB._drop_grad, source=src,
                        note="DUO.nll's simple curriculum + EmbeddingLayer (softmax @ E), backward w.r.t. E"),
            "compiled": Side(C_EMB._embed_ref, _with_layer(st), C_EMB._drop_grad, compile=True, source=src,
                             note="torch.compile of the same"),
        }, [f"torch.backends.cuda.matmul.allow_tf32 = {torch.backends.cuda.matmul.allow_tf32} (the Duo side's "
            "fp32 einsum)"]))
        st = _cur_state(N, K, L, d, True)
        out.append(Row("curriculum_topk_embed", f"k{TOPK}_fwd_bwd", N, K, d, None, {
            "duo": Side(C_TOPK._topk_embed_duo(TOPK), st, C_EMB._drop_grad, note="duo_fast.curriculum_topk_embed fwd+bwd"),
            "ref": Side(C_TOPK._topk_embed_ref(TOPK), _with_layer(st), C_EMB._drop_grad, source=src,
                        note="sample_tempered_softmax_topk + F.embedding_bag, backward"),
        }))
        st = _cur_state(N, K, L, d, False)
        out.append(Row("curriculum_topk", f"k{TOPK}", N, K, d, None, {
            "duo": Side(C_TOPK._topk_duo(TOPK), st, note="duo_fast.curriculum_topk"),
            "ref": Side(C_TOPK._topk_ref(TOPK), _with_layer(st), source=src, note="sample_tempered_softmax_topk"),
        }))
        st = _linear_state(N, K, L, d)
        out.append(Row("linear_usdm_loss", "fwd_bwd", N, K, d, None, {
            "duo": Side(C_LIN._duo, st, C_LIN._drop_grads, note="duo_fast.linear_usdm_loss fwd+bwd (chunked)"),
            "ref": Side(C_LIN._ref, _with_model(st), C_LIN._drop_grads, source=src,
                        note="hidden @ W.T + b, the Duo code's loss, autograd"),
            "compiled": Side(C_LIN._ref, _with_model(st), C_LIN._drop_grads, compile=True, source=src,
                             note="torch.compile of the same"),
        }))
        st = _linear_kl_state(N, K, L, d)
        out.append(Row("linear_distill_kl", "kl-bwd_fwd_bwd", N, K, d, None, {
            "duo": Side(C_LKL._duo, st, C_LIN._drop_grads,
                        note="duo_fast.linear_distill_kl(..., 'bwd', reduction='sum') fwd+bwd (chunked)"),
            "ref": Side(C_LKL._ref, _with_model(st), C_LIN._drop_grads, source=src,
                        note="both models' hidden @ W.T + b (the teacher's under no_grad), the Duo KL, autograd"),
        }))
        st = _linear_step_state(N, K, L, d)
        out.append(Row("linear_sample_step", "ancestral", N, K, d, None, {
            "duo": Side(C_LSS._duo, st, note="duo_fast.linear_sample_step(hidden, W, b, z, 0.3, 0.6, seed=...)"),
            "ref": Side(C_LSS._ref, _float32_levels(_with_model(st, use_float64=True, p_nucleus=1.0), *STEP_LEVELS),
                        source=src,
                        note="hidden @ W.T + b, then the Duo code's _ancestral_update, float64"),
        }))
        st = _g2a_state(N, K)
        sides = {"duo": Side(C_G2A._duo, st, note="duo_fast.gamma_to_alpha on N float64 levels")}
        notes = []
        ref = duo_code.reference()
        if ref.integral_cache_path:
            sides["ref"] = Side(C_G2A._ref, _g2a_ref(st, ref), source=src,
                                note="DUO._gamma_to_alpha_dalpha_cached (table + finite difference)")
        else:
            notes.append("gamma_to_alpha: no reference side (the Duo code's table integral/gpt2.pkl is not here; "
                         "the quadrature of duo_fast.reference runs on the CPU, ~1 ms per value)")
        out.append(Row("gamma_to_alpha", "f64", N, K, d, None, sides, notes))
    return out


STEP_LEVELS = ("alpha_t", "alpha_s")


def _float32_levels(setup, *keys):
    """The reference state with the levels ``keys`` in float32, as the Duo schedule
    gives them (sample_step: alpha_t, alpha_s; sample_zt: gamma, gamma_s)."""

    def wrapped(device):
        st = setup(device)
        for k in keys:
            st[k] = st[k].float()
        return st

    return wrapped


def _g2a_ref(setup, ref):
    def wrapped(device):
        st = setup(device)
        st["model"] = ref.Model(st["K"], device, integral_cache_path=ref.integral_cache_path)
        return st

    return wrapped


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


def _state_bytes(st) -> int:
    seen, total = set(), 0
    for v in st.values():
        if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            total += v.numel() * v.element_size()
    return total


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device):
    if common.is_cuda(device):  # (on the CPU the memory measurement collects anyway)
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def l2_bytes(device) -> int:
    if common.is_cuda(device):
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 60 << 20) or (60 << 20))
    return 32 << 20  # dry run: any size exercises the code


def measure(row: Row, side_name: str, device: str, dry: bool) -> dict:
    side = row.sides[side_name]
    res: dict[str, Any] = {"kind": "side", "row": row.id, "side": side_name, "note": side.note}
    t0 = time.time()
    states: list = []
    try:
        torch.manual_seed(0)
        states.append(side.setup(device))
        nbytes = _state_bytes(states[0])
        L2 = l2_bytes(device)
        small = nbytes < 4 * L2
        copies = min(8, max(1, math.ceil(4 * L2 / max(nbytes, 1)))) if small and not dry else 1
        for _ in range(copies - 1):
            states.append(side.setup(device))
        flush = torch.empty(2 * L2, dtype=torch.uint8, device=device) if small else None
        src = side.source() if callable(side.source) else side.source
        fn = side.fn
        if side.compile:
            # dry run: dynamo's tracing through the eager backend (seconds, not inductor's minutes)
            fn = torch.compile(fn, dynamic=False, backend="eager") if dry else torch.compile(fn, dynamic=False)
        ctx = (lambda: torch.autocast(device_type=torch.device(device).type, dtype=side.autocast)) \
            if side.autocast is not None else contextlib.nullcontext
        big = nbytes >= (4 << 30)
        repeats = 3 if big else (5 if nbytes >= (256 << 20) else 15)
        if dry:
            repeats = 2
        warmup = 3 if side.compile else 1
        i = 0

        def call(st):
            with ctx():
                return fn(st)

        def prep(st):
            if side.before_each is not None:
                side.before_each(st)
            if flush is not None:
                flush.fill_(1)  # evicts the inputs from L2 (outside the timed region)

        first_ms = None
        for w in range(warmup):
            st = states[i % copies]
            i += 1
            prep(st)
            ms = common.time_call_ms(lambda: call(st), device)
            first_ms = ms if first_ms is None else first_ms
        # a slow call (a kernel far off its model) must not eat the step's box: at most
        # ~SIDE_BUDGET_MS of timed calls per side (at least one)
        last_ms = ms
        if last_ms * repeats > SIDE_BUDGET_MS:
            repeats = max(1, int(SIDE_BUDGET_MS // max(last_ms, 1e-3)))
        st = states[0]
        prep(st)
        peak_mib, method = common.peak_growth_mib(lambda: call(st), device)
        times = []
        for _ in range(repeats):
            st = states[i % copies]
            i += 1
            prep(st)
            times.append(common.time_call_ms(lambda: call(st), device))
        res.update(median_ms=statistics.median(times), times_ms=times, first_call_ms=first_ms, peak_mib=peak_mib,
                   mem_method=method, repeats=repeats, warmup=warmup, input_copies=copies, l2_flush=flush is not None,
                   state_bytes=nbytes, source=src, autocast=str(side.autocast) if side.autocast else None)
    except Exception as e:  # noqa: BLE001 - every failure is a result
        if _is_oom(e):
            res.update(status="OOM", error=f"out of memory: {str(e).splitlines()[0][:300]}")
        else:
            res.update(status="ERROR", error=f"{type(e).__name__}: {str(e)[:500]}",
                       traceback=traceback.format_exc()[-2000:])
    finally:
        for st in states:  # a side that patched a library (the DiffusionGemma drop-in) undoes it
            if isinstance(st, dict) and st.get("patch") is not None:
                st["patch"].undo()
        states.clear()
        _free(device)
    res["wall_s"] = time.time() - t0
    res.setdefault("status", "OK")
    return res


def _gemm_tflops(device, n, dtype, repeats, tf32=False):
    g = _gen(device, 11)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for _ in range(3):
            common.time_call_ms(lambda: a @ b, device)
        ms = statistics.median(common.time_call_ms(lambda: a @ b, device) for _ in range(repeats))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n ** 3 / (ms * 1e-3) / 1e12, ms


def rates(device, dry) -> dict:
    """The device's copy bandwidth (GB/s, read + write), bf16 and fp32 GEMM TFLOP/s."""
    out: dict[str, Any] = {"kind": "rates"}
    try:
        mib = 16 if dry else 2048
        src = torch.ones(mib << 20, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        for _ in range(3):
            common.time_call_ms(lambda: dst.copy_(src), device)
        ms = statistics.median(common.time_call_ms(lambda: dst.copy_(src), device) for _ in range(9))
        out["copy_gbps"] = 2 * (mib << 20) / (ms * 1e-3) / 1e9
        out["copy_bytes"] = 2 * (mib << 20)
        del src, dst
        n = 256 if dry else 8192
        out["bf16_tflops"], out["bf16_gemm_ms"] = _gemm_tflops(device, n, torch.bfloat16, 3 if dry else 10)
        out["gemm_n"] = n
        n32 = 128 if dry else 4096
        out["fp32_tflops"], _ = _gemm_tflops(device, n32, torch.float32, 3 if dry else 10, tf32=False)
        out["fp32_gemm_n"] = n32
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
    _free(device)
    return out


def environment(device) -> dict:
    ref = duo_code.reference()
    info = {"kind": "env", "device": device, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "duo_fast_build": duo_fast.build_info(), "reference": ref.source, "reference_reason": ref.reason,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "python": sys.version.split()[0]}
    if common.is_cuda(device):
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, total_memory_gib=p.total_memory / 2**30,
                    capability=f"{p.major}.{p.minor}", l2_bytes=l2_bytes(device))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON-lines file (appended as measurements finish)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, the same code")
    ap.add_argument("--deadline", type=float, default=None, help="unix time after which no side starts")
    ap.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: no CUDA device", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)
    deadline = args.deadline or (time.time() + 1e9)
    f = open(args.out, "a")

    def emit(d):
        f.write(json.dumps(d) + "\n")
        f.flush()

    emit(environment(device))
    r = rates(device, args.dry_run)
    emit(r)
    print(f"bench: copy {r.get('copy_gbps', 0):.0f} GB/s, bf16 GEMM {r.get('bf16_tflops', 0):.1f} TFLOP/s, "
          f"fp32 GEMM {r.get('fp32_tflops', 0):.1f} TFLOP/s", flush=True)
    all_rows = rows(args.dry_run)
    if args.ops:
        keep = set(args.ops.split(","))
        all_rows = [x for x in all_rows if x.op in keep]
    for row in all_rows:
        emit({"kind": "row", "row": row.id, "op": row.op, "variant": row.variant, "N": row.N, "K": row.K,
              "d": row.d, "dtype": row.dtype, "sides": list(row.sides), "notes": row.notes})
    # eager sides first (every op), then the torch.compile sides (their compile takes the longest)
    plan = [(row, s) for row in all_rows for s in row.sides if s != "compiled"]
    # compiled sides by importance (each compile takes tens of seconds; the box may end first):
    # the training-step ops at the smaller size first, fp32 before bf16
    order = {"usdm_loss": 0, "sample_step": 1, "curriculum_embed": 2, "distill_kl": 3, "linear_usdm_loss": 4,
             "sample_zt": 5}
    comp = [row for row in all_rows if "compiled" in row.sides]
    comp.sort(key=lambda r: (r.N, r.dtype == "bf16", order.get(r.op, 9)))
    plan += [(row, "compiled") for row in comp]
    compiled_seen = 0
    for row, s in plan:
        if s == "compiled" and args.dry_run:
            compiled_seen += 1
            if compiled_seen > 1:  # the dry run proves the path once
                emit({"kind": "side", "row": row.id, "side": s, "status": "SKIPPED",
                      "error": "dry run: one torch.compile side only"})
                continue
        margin = 90.0 if s == "compiled" and not args.dry_run else 15.0
        if time.time() + margin > deadline:
            emit({"kind": "side", "row": row.id, "side": s, "status": "SKIPPED",
                  "error": f"not run: less than {margin:.0f} s left of the step's time box"})
            continue
        res = measure(row, s, device, args.dry_run)
        emit(res)
        ms = res.get("median_ms")
        print(f"bench: {row.id} [{s}] " + (f"{ms:.4g} ms, peak {res['peak_mib']:.4g} MiB" if ms is not None
                                           else f"{res['status']}: {res.get('error', '')[:200]}"), flush=True)
    emit({"kind": "done"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
