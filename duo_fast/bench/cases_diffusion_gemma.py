"""Benchmark cases of the DiffusionGemma drop-in (duo_fast.integrations.diffusion_gemma):
one denoising step's work after the decoder's forward plus the next step's soft
embedding, transformers' own code (models/diffusion_gemma, 5.25) against the
patched code, each side in a fresh process. Needs transformers with
DiffusionGemma (requirements-test.txt); without it the cases are skipped.

What is timed (the same calls on both sides; only the patch differs):

  1. ``DiffusionGemmaGenerationMixin._denoising_step`` on a stand-in model whose
     forward returns precomputed logits ``[B, 256, V]`` (the model's own
     forward is not run: the logits are made in setup and excluded from time
     and memory on both sides), with the default generation config
     (LinearTemperatureScheduleLogitsProcessor t_min = 0.4, t_max = 0.8 at step
     24 of 48: T = 0.6; EntropyBoundSampler, entropy_bound = 0.1;
     StableAndConfidentStoppingCriteria). Original: logits / T, float32
     softmax, torch.multinomial, argmax, Categorical entropy for the acceptance
     and again for the stopping, renoising, the self-conditioning copy in the
     embedding's dtype. Patched: canvas_step, the same acceptance / renoising /
     stopping on [B, L], the raw logits kept.
  2. ``DiffusionGemmaDecoderModel.forward`` of a decoder without layers (its
     embedding [V, d] bf16, the self-conditioning block with intermediate size
     8: the soft embedding dominates) on the step's canvas and
     self-conditioning. Original: softmax(copy) float32, its cast, the matmul
     with embed_tokens.weight, * embed_scale. Patched: softmax_embed.

Sizes: rows = 256 x {1, 4} (B = 1, 4 canvases of 256), V = 262,144, d = 2304
(DiffusionGemma's), logits bfloat16 and float32, embedding bf16. Two kinds of
logits: "flat" (N(0, 3^2): every entry within the kept range, the soft embedding
is a dense [rows, V] x [V, d] product on both sides) and "confident" (each row:
one token at 25, the others N(-5, 3^2): a late denoising step; the patched soft
embedding keeps the entries above max - 29.1 T, a handful per row). --tiny: V =
1000, d = 64, rows = 16, for CI. The reference's peak is estimated and rows
whose estimate exceeds the memory limit are skipped.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .common import Case, CasesUnavailable, Impl, Target, ref_limit_gib

OP = "diffusion_gemma"
SEED = 23
CANVAS = 256
STEPS, CUR_STEP = 48, 24  # T = 0.4 + 0.4 * 24 / 48 = 0.6
SIZES = {  # mode: [(B, V, d)]
    "full": [(1, 262_144, 2304), (4, 262_144, 2304)],
    "quick": [(1, 262_144, 2304)],
    "tiny": [(1, 1000, 64)],
}
TINY_CANVAS = 16
# Peak extra memory of the original step + soft embedding, in bytes per logit (measured
# ~21 bytes per logit at B = 1 with float32 logits), with margin.
REF_BYTES_PER_LOGIT = 32
TARGET = Target("CPU: peak extra memory <= 0.1x the original's, time >= 5x faster", min_speedup_ref=5.0,
                max_mem_ratio=0.1)


def _available() -> None:
    try:
        import transformers.models.diffusion_gemma.generation_diffusion_gemma  # noqa: F401
    except ImportError as e:
        raise CasesUnavailable(f"transformers with DiffusionGemma is not installed ({e}); see requirements-test.txt")


def _logits(kind: str, B: int, L: int, V: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    if kind == "flat":
        x = torch.randn(B, L, V, generator=g) * 3.0
    else:
        x = torch.randn(B, L, V, generator=g) * 3.0 - 5.0
        x.scatter_(-1, torch.randint(0, V, (B, L, 1), generator=g), 25.0)
    return x.to(dtype)


def _setup(kind: str, B: int, V: int, d: int, dtype: torch.dtype, patched: bool, canvas: int):
    def setup(device):
        from transformers import DiffusionGemmaConfig, DynamicCache
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as G
        from transformers.models.diffusion_gemma import modeling_diffusion_gemma as M

        text = dict(vocab_size=V, hidden_size=d, intermediate_size=8, num_hidden_layers=0, layer_types=[],
                    num_attention_heads=1, num_key_value_heads=1, head_dim=8, global_head_dim=8, num_experts=1,
                    top_k_experts=1, moe_intermediate_size=8, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        cfg = DiffusionGemmaConfig(text_config=text, vision_config=None, canvas_length=canvas, image_token_id=V - 1,
                                   boi_token_id=V - 2, eoi_token_id=V - 3)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # the embedding made in bf16 (no float32 copy of V x d)
        try:
            decoder = M.DiffusionGemmaDecoderModel(cfg).eval().to(device)
        finally:
            torch.set_default_dtype(default)
        logits = _logits(kind, B, canvas, V, dtype).to(device)

        class StandIn(G.DiffusionGemmaGenerationMixin):
            """The generation mixin on a model whose forward returns the logits."""

            def __init__(self):
                self.config, self.model = cfg, SimpleNamespace(decoder=decoder)

            def forward(self, **kwargs):
                return SimpleNamespace(logits=logits)

        gen = G.DiffusionGemmaGenerationConfig._get_default_generation_params()
        state = {
            "model": StandIn(), "decoder": decoder, "cache": DynamicCache(config=cfg.get_text_config(decoder=True)),
            "canvas": torch.randint(0, V, (B, canvas), generator=torch.Generator().manual_seed(SEED)).to(device),
            "sampler": G.EntropyBoundSampler(gen["sampler_config"], canvas, V, STEPS),
            "processors": G.LogitsProcessorList([G.LinearTemperatureScheduleLogitsProcessor(
                t_min=gen["t_min"], t_max=gen["t_max"], max_denoising_steps=STEPS)]),
            "stopping": G.StableAndConfidentStoppingCriteria(gen["stability_threshold"], gen["confidence_threshold"]),
            "patched": patched, "patch": None,
        }
        if patched and not _patched(G):  # (a second state of the same side shares the patch)
            import duo_fast.integrations.diffusion_gemma as dg

            state["patch"] = dg.patch()  # a process that measures several sides undoes it (benchmarks/gpu)
        return state

    return setup


def _patched(G) -> bool:
    return bool(getattr(G.DiffusionGemmaGenerationMixin.__dict__["_denoising_step"], "__duo_fast_patch__", False))


@torch.no_grad()
def _step_and_soft_embedding(st):
    m, canvas = st["model"], st["canvas"]
    new_canvas, _, sc, _ = m._denoising_step(
        decoder_forward=m.forward, current_canvas=canvas, argmax_canvas=canvas, input_ids=None,
        decoder_position_ids=None, self_conditioning_logits=None, mask_mapping=None, cache=None,
        finished_denoising=torch.zeros(canvas.shape[0], dtype=torch.bool, device=canvas.device), cur_step=CUR_STEP,
        sampler=st["sampler"], logits_processor=st["processors"], diffusion_stopping_criteria=st["stopping"],
    )
    if st["patched"] != (type(sc).__name__ == "SelfConditioning"):  # each side runs what it says
        raise RuntimeError("the patched step fell back to transformers' step (see the log)" if st["patched"]
                           else "the reference side ran patched")
    return st["decoder"](decoder_input_ids=new_canvas, cache=st["cache"], self_conditioning_logits=sc).last_hidden_state


def _source() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def cases(mode: str, device: str) -> list[Case]:
    _available()
    limit = ref_limit_gib(device)
    canvas = TINY_CANVAS if mode == "tiny" else CANVAS
    out = []
    for B, V, d in SIZES[mode]:
        rows = B * canvas
        for kind in ("flat", "confident"):
            for dtype in (torch.bfloat16, torch.float32):
                dname = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
                est = REF_BYTES_PER_LOGIT * rows * V / 2**30
                notes = []
                ref = Impl(_step_and_soft_embedding, setup=_setup(kind, B, V, d, dtype, False, canvas), source=_source,
                           note="transformers' _denoising_step + the decoder's soft embedding, unpatched")
                if est > limit:
                    ref = None
                    notes.append(f"{OP} rows={rows}: the original would need ~{est:.1f} GiB > {limit:g} GiB here")
                out.append(Case(
                    op=OP, name=f"{kind}-rows{rows}-V{V}-d{d}-{dname}",
                    size=f"{kind} rows={rows} (B={B}) V={V} d={d} {dname} logits, bf16 E",
                    setup=lambda dev: None,
                    duo=Impl(_step_and_soft_embedding, setup=_setup(kind, B, V, d, dtype, True, canvas),
                             note="the same calls, duo_fast.integrations.diffusion_gemma.patch() applied"),
                    ref=ref, target=TARGET if mode != "tiny" and not str(device).startswith("cuda") else None,
                    repeats=3, notes=notes,
                ))
    return out
