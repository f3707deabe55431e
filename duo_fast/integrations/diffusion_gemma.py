"""Drop-in backend for DiffusionGemma in transformers (``models/diffusion_gemma``).

One line, after ``import transformers``::

    import duo_fast.integrations.diffusion_gemma as dg
    dg.patch()                                   # or: with dg.patch(): model.generate(...)

DiffusionGemma denoises a canvas of tokens corrupted by uniform random tokens.
Per denoising step and canvas row, transformers' ``_denoising_step`` makes
dense ``[rows, V]`` tensors after the decoder's forward: the temperature-scaled
logits, a float32 softmax for ``torch.multinomial`` (which adds its own
exponential noise of that size), ``Categorical(logits).entropy()`` for the
acceptance and again for the stopping criterion (normalized logits,
probabilities, their clamp and product each time), and a cast copy kept as the
next step's self-conditioning logits; the next forward then makes a float32
softmax of that copy and its cast for the soft embedding. :func:`patch`
replaces

* ``DiffusionGemmaGenerationMixin._denoising_step``: the decoder forward as
  before, then one :func:`duo_fast.canvas_step` (draw, argmax, entropy per row:
  O(rows) memory) at the step's temperature, the entropy-bound acceptance
  (:func:`accept_mask`, the original's choice exactly) and the sampler's own
  renoising on ``[B, L]``, the stopping criterion on the same entropies
  (:func:`stable_and_confident`). The next step's self-conditioning is the raw
  logits with their temperature (:class:`SelfConditioning`), not a scaled copy.
* ``DiffusionGemmaDecoderModel.forward``: the soft embedding
  ``softmax(logits / T) @ embed_tokens.weight * embed_scale`` through
  :func:`duo_fast.softmax_embed` (no ``[rows, V]`` probabilities), for the
  patched step's :class:`SelfConditioning` and for plain
  ``self_conditioning_logits`` tensors (T = 1) alike, whenever no gradient is
  needed (under ``torch.no_grad``, as generation runs; training keeps the
  original). ``DiffusionGemmaSelfConditioning.forward`` takes that embedding
  in place of the zeros the original forward then passes it.
* ``DiffusionGemmaGenerationMixin.generate``: unchanged, except that a streamer
  asking for logits is noted, so that the call keeps the original step.

Everything else is transformers' own code: the encoder and its cache, the
canvas loop, EOS / pad handling, ``tokens_per_forward``, the streamer's drafts
(the argmax canvas), the sampler's renoising (``torch.randint``). A call that
the patched step does not cover keeps the original step for that call, with a
one-time log line saying why: a user logits processor (anything besides the
temperature schedule), a streamer that asks for logits, another sampler or
stopping criterion than ``EntropyBoundSampler`` / ``StableAndConfidentStoppingCriteria``,
or a torch.compile'd decoder (static cache).

What changes, numerically: the draws use duo_fast's Philox streams (keys from
torch's default generator, :mod:`duo_fast._random`) instead of
``torch.multinomial``'s: the same law, other tokens for a given seed; the
entropies are computed without cancellation (~1e-7 relative, against float32
rounding of ``-sum p log p`` in the original), which can move the acceptance or
stopping decision only where an entropy sits within rounding of a tie or of a
threshold; the soft embedding uses float32 logits and probabilities (the
original rounds the scaled logits to the embedding's dtype first, bf16 for a
bf16 model, and the probabilities too).

The exact uniform-state posterior step. DiffusionGemma's sampler draws each
accepted token from the model's ``p`` and renoises the rest uniformly. The
exact reverse step of its corruption (keep the token with probability
``alpha_t``, else a uniform token) from level ``alpha_t`` to ``alpha_s`` is
the posterior ``q(z_s | z_t, x0 ~ p)`` of the uniform-state diffusion
(docs/math.md §4): a mixture of a point mass at ``z_t``, ``p`` and the uniform
law, which :func:`duo_fast.sample_step` draws exactly from the raw logits,
the step's temperature and the two levels: ``sample_step(logits, z_t, alpha_t,
alpha_s, temperature=T)`` (``alpha_s = 1``, the last step, is ``canvas_step``'s
draw with the same Philox numbers). docs/diffusion_gemma.md has the mapping of
DiffusionGemma's step count onto levels.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import logging
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from ..ops import canvas_step, softmax_embed
from ..ops._common import _LOGIT_DTYPES
from . import _patching

__all__ = ["PARTS", "Patch", "SelfConditioning", "accept_mask", "patch", "stable_and_confident"]

PARTS = ("step", "soft_embedding")
_GENERATION = "transformers.models.diffusion_gemma.generation_diffusion_gemma"
_MODELING = "transformers.models.diffusion_gemma.modeling_diffusion_gemma"

log = logging.getLogger(__name__)
_logged: set[str] = set()
# Set by the patched generate() for a call whose streamer asks for logits.
_keep_original = contextvars.ContextVar("duo_fast_diffusion_gemma_keep_original", default=None)
# (the SelfConditioning module, its soft embedding) between the patched decoder forward and that module.
_pending_soft = contextvars.ContextVar("duo_fast_diffusion_gemma_soft_embedding", default=None)


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.warning("duo_fast: DiffusionGemma keeps transformers' denoising step for this call: %s", reason)


@dataclass
class SelfConditioning:
    """What the patched step passes as the next step's ``self_conditioning_logits``:
    the decoder's raw logits ``[B, L, V]`` and the temperature of each batch row
    (float64 ``[B]``); the patched decoder forward turns them into the soft
    embedding ``softmax(logits / T) @ E * embed_scale``."""

    logits: torch.Tensor
    temperature: torch.Tensor

    def processed(self, dtype: torch.dtype) -> torch.Tensor:
        """The original's self-conditioning logits (``logits / T`` in ``dtype``), for
        code that needs them as a tensor (a dense ``[B, L, V]`` copy)."""
        return (self.logits / self.temperature.to(self.logits.dtype)[:, None, None]).to(dtype)


def accept_mask(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """``EntropyBoundSampler.accept_canvas``'s choice from per-token entropies
    ``[B, L]``: sort each row's entropies (stable: ties keep their positions'
    order), accept the prefix where ``cumsum - entropy <= entropy_bound`` (the
    sum of the accepted entropies minus the largest of them), scattered back to
    the positions. Bool ``[B, L]``."""
    sorted_entropy, order = torch.sort(entropy, dim=-1, stable=True)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= entropy_bound
    return torch.zeros_like(selected).scatter(-1, order, selected)


def stable_and_confident(criteria, argmax_canvas: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """``StableAndConfidentStoppingCriteria.__call__`` with the token entropies
    given instead of recomputed from the logits: stable (the argmax canvas equal
    to the last ``stability_threshold`` ones, kept in ``criteria``'s history as
    the original keeps it) and confident (mean entropy < ``confidence_threshold``)."""
    if criteria.stability_threshold == 0:
        stable = torch.ones((entropy.shape[0],), device=entropy.device, dtype=torch.bool)
    else:
        if criteria.argmax_canvas_history is None:
            criteria.argmax_canvas_history = torch.full(
                (criteria.stability_threshold, argmax_canvas.shape[0], argmax_canvas.shape[1]),
                -1, dtype=argmax_canvas.dtype, device=argmax_canvas.device,
            )
        stable = (criteria.argmax_canvas_history == argmax_canvas[None, :, :]).all(dim=-1).all(dim=0)
        criteria.argmax_canvas_history = torch.roll(criteria.argmax_canvas_history, shifts=-1, dims=0)
        criteria.argmax_canvas_history[-1] = argmax_canvas
    confident = torch.mean(entropy, dim=-1) < criteria.confidence_threshold
    return stable & confident


def _step_temperature(logits_processor, cur_step: int, G) -> float | None:
    """The step's temperature as LinearTemperatureScheduleLogitsProcessor computes it
    (float32 arithmetic on a 0-dim int32 step, on the CPU: no device sync); 1.0
    without one; None for any other processor (the original path)."""
    procs = list(logits_processor or [])
    if not procs:
        return 1.0
    if len(procs) != 1 or type(procs[0]) is not G.LinearTemperatureScheduleLogitsProcessor:
        return None
    p = procs[0]
    step = torch.tensor(cur_step, dtype=torch.int32)
    return float(p.t_min + ((p.t_max - p.t_min) * (step / p.max_denoising_steps)))


def _plain_forward(model, decoder_forward) -> bool:
    return (inspect.ismethod(decoder_forward) and decoder_forward.__self__ is model
            and decoder_forward.__func__ is type(model).forward)


def _step_replacements(G, *, soft_embedding: bool) -> dict:
    """soft_embedding: the decoder's soft embedding is patched too (it takes the
    step's SelfConditioning); else the step hands on the original's dense copy."""
    Mixin = G.DiffusionGemmaGenerationMixin
    step_original, generate_original = Mixin._denoising_step, Mixin.generate
    generate_sig = inspect.signature(generate_original)

    def _why_not(model, decoder_forward, sampler, logits_processor, stopping, cur_step):
        if _keep_original.get() is not None:
            return _keep_original.get(), None
        if type(sampler) is not G.EntropyBoundSampler:
            return f"the sampler is {type(sampler).__name__}, not EntropyBoundSampler", None
        if stopping is not None and type(stopping) is not G.StableAndConfidentStoppingCriteria:
            return f"the stopping criterion is {type(stopping).__name__}", None
        if not _plain_forward(model, decoder_forward):
            return "the decoder forward is torch.compile'd (a static cache)", None
        temperature = _step_temperature(logits_processor, cur_step, G)
        if temperature is None:
            names = ", ".join(type(p).__name__ for p in logits_processor)
            return f"a user logits processor ({names})", None
        return None, temperature

    def _denoising_step(self, decoder_forward, current_canvas, argmax_canvas, input_ids, decoder_position_ids,
                        self_conditioning_logits, mask_mapping, cache, finished_denoising, cur_step, sampler,
                        logits_processor, diffusion_stopping_criteria, **model_kwargs):
        why, temperature = _why_not(self, decoder_forward, sampler, logits_processor, diffusion_stopping_criteria,
                                    int(cur_step))
        if why is not None:
            _log_once(why)
            if isinstance(self_conditioning_logits, SelfConditioning):  # a patched step came first
                self_conditioning_logits = self_conditioning_logits.processed(self.model.decoder.embed_tokens.weight.dtype)
            return step_original(self, decoder_forward, current_canvas, argmax_canvas, input_ids, decoder_position_ids,
                                 self_conditioning_logits, mask_mapping, cache, finished_denoising, cur_step, sampler,
                                 logits_processor, diffusion_stopping_criteria, **model_kwargs)
        torch.compiler.cudagraph_mark_step_begin()  # as the original (a no-op outside CUDA graphs)
        outputs = decoder_forward(decoder_input_ids=current_canvas, self_conditioning_logits=self_conditioning_logits,
                                  decoder_attention_mask=mask_mapping, cache=cache,
                                  decoder_position_ids=decoder_position_ids, **model_kwargs)
        raw = outputs.logits
        if raw.dtype not in _LOGIT_DTYPES:
            raw = raw.float()
        batch = current_canvas.shape[0]
        temp_rows = torch.full((batch,), temperature, dtype=torch.float64, device=raw.device)
        # draw, argmax and entropy per canvas row: no [rows, V] tensor
        denoiser_canvas, new_argmax_canvas, entropy = canvas_step(raw, temperature=temperature)
        # EntropyBoundSampler.accept_canvas on the entropies, then its own renoising ([B, L])
        sampler.accepted_token_mask = accept_mask(entropy, sampler.entropy_bound)
        accepted_canvas = torch.where(sampler.accepted_token_mask, denoiser_canvas, current_canvas)
        new_current_canvas = G.EntropyBoundSampler.renoise_canvas(sampler, accepted_canvas, cur_step)
        if diffusion_stopping_criteria is not None:
            if finished_denoising.any():  # finished rows keep their canvases and self-conditioning
                new_argmax_canvas = torch.where(finished_denoising[:, None], argmax_canvas, new_argmax_canvas)
                new_current_canvas = torch.where(finished_denoising[:, None], current_canvas, new_current_canvas)
                if isinstance(self_conditioning_logits, SelfConditioning):
                    raw[finished_denoising] = self_conditioning_logits.logits[finished_denoising].to(raw.dtype)
                    temp_rows = torch.where(finished_denoising, self_conditioning_logits.temperature, temp_rows)
            finished_denoising |= stable_and_confident(diffusion_stopping_criteria, new_argmax_canvas, entropy)
        sc = SelfConditioning(raw, temp_rows)
        if not soft_embedding:
            return new_current_canvas, new_argmax_canvas, sc.processed(self.model.decoder.embed_tokens.weight.dtype), finished_denoising
        return new_current_canvas, new_argmax_canvas, sc, finished_denoising

    def generate(self, *args, **kwargs):
        bound = generate_sig.bind_partial(self, *args, **kwargs)
        streamer = bound.arguments.get("streamer")
        if streamer is not None and hasattr(streamer, "put_draft") and getattr(streamer, "_takes_logits", False):
            token = _keep_original.set("the streamer asks for the self-conditioning logits (_takes_logits)")
            try:
                return generate_original(self, *args, **kwargs)
            finally:
                _keep_original.reset(token)
        return generate_original(self, *args, **kwargs)

    return {(Mixin, "_denoising_step"): _denoising_step, (Mixin, "generate"): generate}


def _embed_scale(embed_tokens) -> float:
    """embed_scale as the original multiplies by it (cast to the weight's dtype),
    from the module's Python float (no read of the device buffer)."""
    scalar = getattr(embed_tokens, "scalar_embed_scale", None)
    if scalar is None:
        return float(embed_tokens.embed_scale.to(embed_tokens.weight.dtype))
    return float(torch.tensor(scalar, dtype=torch.float32).to(embed_tokens.weight.dtype))


def _soft_embedding_replacements(M) -> dict:
    Decoder, SelfCond = M.DiffusionGemmaDecoderModel, M.DiffusionGemmaSelfConditioning
    decoder_original, selfcond_original = Decoder.forward, SelfCond.forward
    decoder_sig = inspect.signature(decoder_original)

    def forward(self, *args, **kwargs):
        bound = decoder_sig.bind(self, *args, **kwargs)
        sc = bound.arguments.get("self_conditioning_logits")
        E = self.embed_tokens.weight
        if isinstance(sc, SelfConditioning):
            logits, temperature = sc.logits, sc.temperature[:, None].expand(sc.logits.shape[:-1])
        elif isinstance(sc, torch.Tensor) and sc.dtype in _LOGIT_DTYPES and sc.dim() == 3 and not (
                torch.is_grad_enabled() and (sc.requires_grad or E.requires_grad)):
            logits, temperature = sc, 1.0
        else:  # None, float64 logits, or a gradient to keep: the original
            return decoder_original(*bound.args, **bound.kwargs)
        soft = softmax_embed(logits, E, temperature=temperature, scale=_embed_scale(self.embed_tokens))
        mask = bound.arguments.get("self_conditioning_mask")
        if mask is not None:
            soft = soft * mask.to(soft.dtype)[:, None, None]
        bound.arguments["self_conditioning_logits"] = None  # the original then passes zeros to self_conditioning
        bound.arguments["self_conditioning_mask"] = None
        token = _pending_soft.set((self.self_conditioning, soft))
        try:
            return decoder_original(*bound.args, **bound.kwargs)
        finally:
            _pending_soft.reset(token)

    def self_conditioning_forward(self, inputs_embeds, self_conditioning_signal):
        pending = _pending_soft.get()
        if pending is not None and pending[0] is self:
            _pending_soft.set(None)  # once per decoder forward
            self_conditioning_signal = pending[1]
        return selfcond_original(self, inputs_embeds, self_conditioning_signal)

    return {(Decoder, "forward"): forward, (SelfCond, "forward"): self_conditioning_forward}


def _modules(module: ModuleType | None) -> tuple[ModuleType, ModuleType]:
    """(generation module, modeling module) of DiffusionGemma."""
    if module is None:
        try:
            return importlib.import_module(_GENERATION), importlib.import_module(_MODELING)
        except ImportError as e:
            raise RuntimeError(
                "duo_fast: cannot patch DiffusionGemma: transformers' models.diffusion_gemma is not importable "
                f"({e}); install transformers >= 5.11"
            ) from e
    gen = module if hasattr(module, "EntropyBoundSampler") else getattr(module, "generation_diffusion_gemma", None)
    mod = module if hasattr(module, "DiffusionGemmaSelfConditioning") else getattr(module, "modeling_diffusion_gemma", None)
    if gen is None and mod is not None:  # the modeling module: its package's generation module
        gen = sys.modules.get(mod.__name__.rsplit(".", 1)[0] + ".generation_diffusion_gemma")
    if mod is None and gen is not None:
        mod = sys.modules.get(gen.__name__.rsplit(".", 1)[0] + ".modeling_diffusion_gemma")
    if gen is None or mod is None or not hasattr(gen, "EntropyBoundSampler") or not hasattr(mod, "DiffusionGemmaSelfConditioning"):
        raise RuntimeError(
            f"duo_fast: {getattr(module, '__name__', module)!r} is not transformers' models.diffusion_gemma package or "
            "one of its generation / modeling modules"
        )
    return gen, mod


class Patch(_patching.Patch):
    """What :func:`patch` replaced. ``undo()`` restores every original object (by
    identity) that is still duo_fast's replacement and warns about the attributes
    reassigned since; a context manager (``with patch(): ...`` undoes on exit)."""

    def __init__(self, parts: tuple[str, ...]):
        super().__init__(", ".join(parts), tag="duo_fast.integrations.diffusion_gemma")
        self.parts = parts


def patch(*, module: ModuleType | None = None, parts=None) -> Patch:
    """Replace DiffusionGemma's denoising step and soft embedding with duo_fast's
    ops (see the module docstring). ``module``: transformers'
    ``models.diffusion_gemma`` package or its generation / modeling module
    (default: imported from transformers). ``parts``: a subset of :data:`PARTS`
    (``"step"``: ``_denoising_step`` and ``generate``; ``"soft_embedding"``: the
    decoder's soft embedding), None for both. Raises if any target is already
    patched. Logs one line listing what was replaced. Returns a
    :class:`Patch` (``undo()``, context manager)."""
    parts = _patching.check_parts(parts, PARTS)
    G, M = _modules(module)
    targets: dict = {}
    if "step" in parts:
        targets.update(_step_replacements(G, soft_embedding="soft_embedding" in parts))
    if "soft_embedding" in parts:
        targets.update(_soft_embedding_replacements(M))
    result = Patch(parts).replace_all(targets)  # checks every target before changing any
    log.info("duo_fast: patched DiffusionGemma (%s): %s", ", ".join(parts), ", ".join(result.replaced))
    return result
