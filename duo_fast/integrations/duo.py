"""Drop-in backend for the Duo codebase (github ``s-sahoo/duo``).

One line, after the Duo code's modules are imported::

    import duo_fast.integrations.duo as duo_fast_duo
    duo_fast_duo.patch()                       # or: with duo_fast_duo.patch(): ...

or, with an unmodified ``main.py`` and its hydra overrides::

    python -m duo_fast.integrations.duo path/to/main.py algo=duo ...

:func:`patch` replaces methods and functions of the user's already imported
modules (``algo``, ``utils``, ``trainer_base``, ``models.dit``) by versions
built on duo_fast's ops, with the same signatures, return types, shapes and
dtypes. Five parts, each optional:

* ``schedule``: ``DUO._gamma_to_alphat_integral``, ``_gamma_to_alpha_dalpha``,
  ``_gamma_to_alpha_dalpha_cached`` and ``_prior_loss`` evaluate the exact
  Gaussian-to-uniform-state operator (:func:`duo_fast.gamma_to_alpha`, float64)
  with the exact ``dalpha/dt = dalpha/dgamma (gamma_max - gamma_min)`` instead
  of the 10^5-point table lookup and its finite difference. Every curriculum
  mode (``simple``, ``efficient_cached``, ``series``, ``sigmoid*``, ``poly*``)
  then uses the exact operator: the series and the fits approximate it, and
  are no longer computed (``_initialize_curriculum_coefficients`` loads no
  pickle, fits nothing, compiles nothing). ``Distillation._validate_configuration``
  no longer requires the integral-cache pickle. Any tokenizer works with no
  preprocessing script.
* ``curriculum``: the training branch of ``DUO.nll``. Mode ``simple``: the
  backbone's ``EmbeddingLayer`` gets ``h`` from :func:`duo_fast.curriculum_embed`
  with its own ``embedding`` (no ``[B, L, K]`` one-hot, noise, latent or
  softmax); ``z_t`` is that op's. Other modes: :func:`duo_fast.curriculum_topk`
  and the layer's own embedding bag. ``utils.sample_tempered_softmax_topk`` is
  replaced by the same function built on ``curriculum_topk``.
  ``topk_zt_rule="exact"`` (default) draws ``z_t`` with the exact law;
  ``"reference"`` reproduces the reference's rule (``z_t = x0`` whenever x0 is
  in the top k). ``models.dit.EmbeddingLayer.forward`` learns to take that
  curriculum input (anything else goes to the original).
* ``loss``: ``DUO_BASE.nll_per_token`` goes through :func:`duo_fast.usdm_loss`
  (values equal the reference's formula; float64 inputs keep the original).
  ``DUO_BASE.nll`` (the plain ELBO, also after the curriculum) and, with
  ``curriculum``, ``DUO.nll``'s curriculum branch compute the loss from the
  backbone's last hidden states and the output layer's parameters through
  :func:`duo_fast.linear_usdm_loss`: no ``[B, L, K]`` logits, no logits
  gradient, no loss temporaries (below, "the output layer fused").
* ``distillation``: ``Distillation.nll`` draws its coupled pair with
  :func:`duo_fast.sample_zt` (``gamma_s=``; no dense noise, no one-hot) and,
  for ``kl-fwd`` / ``kl-bwd``, the KL from the student's and the teacher's
  hidden states through :func:`duo_fast.linear_distill_kl` (the teacher under
  ``no_grad``; other loss types keep the original). The teacher's bookkeeping
  (made on first use, ``_maybe_update_teacher_weights``) is the original's.
* ``sampling``: ``UniformState._ancestral_update`` and ``_psi_update`` are one
  denoiser call plus one :func:`duo_fast.linear_sample_step` on its hidden
  states (``kappa`` the Psi mix, ``p_nucleus`` its ``top_p``, the
  noise-removal step ``alpha_s = 1``); no logits, no posterior of size
  ``[B, L, K]``. Classifier-free guidance (``sampling.guid_weight`` not 0 or
  1): two denoiser calls (the labels, then the unconditional label
  ``num_classes``, as the Duo code) and the guided law of
  ``_get_guided_posterior_from_xt`` per chunk. ``generate_samples`` is
  unchanged.

The output layer fused: with any of ``curriculum``, ``loss``,
``distillation``, the training step's ``_loss`` (what ``training_step`` and
``validation_step`` call) takes the token mean straight from the fused op
(the reduced ops compute the gradients in their forward: one logits GEMM per
chunk, as the unfused step). The model's ``models.dit.DDiTFinalLayer`` runs as
it is (final norm, adaLN modulation) with its ``linear`` bypassed for the call,
so the backbone returns the linear's input, cast where autocast would have
cast it; its weight and bias (cast likewise) go to the fused op, and every
gradient reaches them and the layers below as before (also under
``torch.compile`` of the backbone: one graph per state of the layer). The
logits path stays where that cannot be done exactly: another backbone (no
``DDiTFinalLayer`` ending in an ``nn.Linear``, e.g. the UNet or ``hf_dit``),
a subclass whose ``_process_model_output`` is not ``DUO_BASE``'s
``log_softmax``, guidance with such a backbone (the original; the snapshot's
own guided path raises a TypeError, see below), ``sampling.noise_removal=
greedy`` (``generate_samples``' own argmax of ``forward``), and
``patch(fuse_output_layer=False)``.

Places where the patched code differs from the pinned snapshot besides the
math: that snapshot's ``DUO.nll`` and ``Distillation.nll`` declare ``(x0,
output_tokens, current_accumulation_step, train_mode)`` while its own
``trainer_base._loss`` calls ``nll(x0, labels, output_tokens,
current_accumulation_step, train_mode)`` (a TypeError: neither class can train
or validate). Whatever parts are chosen, the patched ``nll`` accepts both calls
(where no chosen part replaces them, the originals are wrapped to). Its
``_get_ancestral_posterior`` calls ``_get_guided_posterior_from_xt(self, xt,
...)`` with ``self`` twice, so guidance never ran; the fused sampling step
forms that law as the method does. And the first element that the patched
``_ancestral_update`` / ``_psi_update`` return (the reference's dense ``p_x0``
cache) is a :class:`HiddenCache` (the step's hidden states; a
:class:`LogitsCache` of the logits on the logits path), which the next call
accepts back; uniform-state models never reuse it (``time_conditioning`` is
required), so ``generate_samples`` is unaffected.
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ..ops import (curriculum_embed, curriculum_topk, distill_kl, gamma_to_alpha, linear_distill_kl, linear_sample_step,
                   linear_usdm_loss, sample_step, sample_zt, usdm_loss)
from ..ops._common import _LOGIT_DTYPES
from . import _patching

__all__ = ["PARTS", "Patch", "patch", "CurriculumInput", "LogitsCache", "HiddenCache", "main"]

PARTS = ("schedule", "curriculum", "loss", "distillation", "sampling")
CURRICULUM_MODES = ("simple", "efficient_cached", "series", "sigmoid", "sigmoid-edge-corrected", "poly3", "poly5", "poly7", "poly9")
_MARK = _patching.MARK
_ZT_RULES = ("exact", "reference")
_NEEDS = {  # part -> modules it patches or reads (models.dit: the output layer to fuse)
    "schedule": ("algo",),
    "curriculum": ("algo", "utils", "dit"),
    "loss": ("algo", "dit"),
    "distillation": ("algo", "dit"),
    "sampling": ("trainer_base", "dit"),
}
_SYS_NAMES = {"algo": "algo", "utils": "utils", "trainer_base": "trainer_base", "dit": "models.dit"}

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------
# Objects that travel through the Duo code unchanged
# ----------------------------------------------------------------------------------


class CurriculumInput:
    """What the patched ``DUO.nll`` hands to the backbone instead of the dense
    tempered latent: the clean ids and the levels. The patched
    ``EmbeddingLayer.forward`` turns it into ``h`` with its own embedding
    matrix and records ``z_t`` here."""

    def __init__(self, x0, gamma, inv_tau, top_k: int | None, zt_rule: str):
        self.x0, self.gamma, self.inv_tau, self.top_k, self.zt_rule = x0, gamma, inv_tau, top_k, zt_rule
        self.z_t: torch.Tensor | None = None
        self.shape, self.device = x0.shape, x0.device

    def embed(self, layer, original_forward) -> torch.Tensor:
        E = layer.embedding
        if self.top_k is None:  # exact tempered softmax over all K (docs/math.md §2d)
            h, self.z_t = curriculum_embed(self.x0, self.gamma, self.inv_tau, E)
            return h
        # Duo++ top-k (docs/math.md §2e), then the layer's own weighted embedding bag.
        ids, weights, self.z_t = curriculum_topk(self.x0, self.gamma, self.inv_tau, self.top_k, E.shape[0], zt_rule=self.zt_rule)
        return original_forward(layer, ids, weights)


@dataclass
class LogitsCache:
    """The patched samplers' stand-in for the reference's dense ``p_x0`` cache:
    the model's logits at the step (``[B, L, K]``), accepted back as ``p_x0``."""

    logits: torch.Tensor


# ----------------------------------------------------------------------------------
# The output layer without its logits
# ----------------------------------------------------------------------------------


class _LinearInput(torch.nn.Module):
    """Stands in for ``DDiTFinalLayer.linear`` during a fused call: it returns
    the linear's input as the linear would have read it (cast to the autocast
    dtype where autocast is on for its device, as autocast casts a linear's
    inputs), so the unmodified ``DDiTFinalLayer.forward`` (final norm, adaLN
    modulation) and ``DIT.forward`` return the output layer's hidden states.
    One instance for every layer: torch.compile guards on the submodule, so the
    two states of a layer (its linear, this) compile once each."""

    def forward(self, x):
        dev = x.device.type
        if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
            return x.to(torch.get_autocast_dtype(dev))
        return x


_LINEAR_INPUT = _LinearInput()


@dataclass
class _Head:
    """The output layer's input and parameters as its linear would have used
    them: ``logits = hidden @ weight.T + bias`` (weight and bias in the hidden
    states' dtype: autocast's casts, differentiable)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def logits(self) -> torch.Tensor:
        """The dense logits (for the cases kept on the logits path)."""
        with torch.autocast(self.hidden.device.type, enabled=False):
            return F.linear(self.hidden, self.weight, self.bias)


# Tokens per chunk of the fused loss and KL on the CPU: the fewest whose float32
# logits take 32 MiB (167 at K = 50257). A host process's memory is the high-water
# mark of its heap plus its mmapped blocks, and glibc's malloc serves blocks of
# 32 MiB and more by mmap and gives them back when they are freed, while smaller
# ones stay in the heap: a chunk's logits and gradient just over 32 MiB leave no
# trace once the chunk is done (the gradients that come later in the step do not
# pile on them). On CUDA the ops' default (~64 MiB; the caching allocator reuses
# blocks). The sampling step takes the op's default everywhere: it has no gradient,
# so its one [chunk, K] buffer is the only large block, and longer chunks make
# faster GEMMs (the weight is packed once per chunk).
_CPU_CHUNK_BYTES = 32 << 20


def _chunk_size(chunk_size: int | None, head: _Head) -> int | None:
    """patch(chunk_size=...) where given, else the training ops' default for the
    head's device."""
    if chunk_size is not None or head.hidden.device.type != "cpu":
        return chunk_size
    return -(-_CPU_CHUNK_BYTES // (4 * head.weight.shape[0]))


def _run_backbone(model, backbone, x, sigma, labels=None, weights=None):
    """TrainerBase.forward's backbone call (its sigma processing and autocast),
    without _process_model_output."""
    sigma = model._process_sigma(sigma)
    # As TrainerBase.forward (which, on a machine without CUDA, autocast disables anyway).
    with torch.amp.autocast("cuda", dtype=torch.float32, enabled=torch.cuda.is_available()):
        return backbone(x=x, sigma=sigma, class_cond=labels, weights=weights)


def _output_head(model, backbone, x, sigma, labels=None, weights=None, *, dit, raw_ok) -> _Head | None:
    """The output layer's hidden states and parameters for one backbone call, the
    ``[B, L, K]`` logits never formed; None (nothing run) where the output layer
    is not a ``models.dit.DDiTFinalLayer`` ending in an ``nn.Linear`` (another
    backbone) or the model post-processes its logits otherwise than DUO_BASE's
    ``log_softmax``: the caller keeps the logits path."""
    layer = getattr(getattr(backbone, "_orig_mod", backbone), "output_layer", None)  # _orig_mod: torch.compile's wrapper
    if (dit is None or type(model)._process_model_output not in raw_ok or not isinstance(layer, dit.DDiTFinalLayer)
            or type(layer.linear) is not torch.nn.Linear):
        return None
    linear = layer.linear
    layer.linear = _LINEAR_INPUT
    try:
        hidden = _run_backbone(model, backbone, x, sigma, labels, weights)
    finally:
        layer.linear = linear
    if hidden.dim() < 2 or hidden.shape[-1] != linear.in_features:
        raise RuntimeError(
            f"duo_fast: the backbone returned shape {tuple(hidden.shape)} with its output layer's linear bypassed, not "
            f"the [..., {linear.in_features}] hidden states: it transforms the output layer's result; patch it with "
            "fuse_output_layer=False"
        )
    weight, bias = linear.weight, linear.bias
    if weight.dtype != hidden.dtype:  # autocast's casts of the linear's parameters
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    return _Head(hidden, weight, bias)


# ----------------------------------------------------------------------------------
# Shared helpers of the replacements
# ----------------------------------------------------------------------------------


def _raw_logits(model, xt, sigma, labels=None, weights=None, nn_input_idxs=None, *, raw_ok=()):
    """``TrainerBase.forward`` without ``_process_model_output`` when that is the
    plain ``log_softmax`` of DUO_BASE (our ops are invariant to the shift it
    adds, so skipping it saves an ``[N, K]`` tensor); else ``forward``'s own
    output, which is a log-probability and as valid an input."""
    if type(model)._process_model_output not in raw_ok:
        return model.forward(xt, sigma, labels=labels, weights=weights, nn_input_idxs=nn_input_idxs)
    x = xt if nn_input_idxs is None else nn_input_idxs
    return _run_backbone(model, model.backbone, x, sigma, labels, weights)


def _nll_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any, Any]:
    """(labels, output_tokens, current_accumulation_step, train_mode) from either
    trainer_base's call ``nll(x0, labels, output_tokens, step, train_mode)`` (four
    positional after x0) or DUO's declared ``nll(x0, output_tokens, step, train_mode)``."""
    names = ("labels", "output_tokens", "current_accumulation_step", "train_mode")
    if len(args) == 4 or "labels" in kwargs:
        values = dict(zip(names, args))
    else:
        values = dict(zip(names[1:], args))
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"nll() got an unexpected keyword argument {k!r}")
        if k in values:
            raise TypeError(f"nll() got multiple values for argument {k!r}")
        values[k] = v
    return values.get("labels"), values.get("output_tokens"), values.get("current_accumulation_step"), values.get("train_mode", False)


def _loss_dtype(alpha_t, dalpha_t) -> torch.dtype:
    """The dtype DUO_BASE.nll_per_token's formula returns for logits of at most
    float32 (type promotion of its inputs with float32)."""
    dt = torch.promote_types(alpha_t.dtype, torch.float32)
    return torch.promote_types(dt, dalpha_t.dtype) if torch.is_tensor(dalpha_t) else dt


def _fused_nll(logits, xt, x0, alpha_t, dalpha_t, *, inplace_grad: bool) -> torch.Tensor:
    """usdm_loss on ``[B, L, K]`` logits with DUO_BASE.nll_per_token's conventions
    (``alpha_t`` ``[B, 1]`` or ``[B, L]``, ``dalpha_t`` a tensor or a float) and
    its output dtype."""
    dtype = torch.promote_types(_loss_dtype(alpha_t, dalpha_t), logits.dtype)
    if not torch.is_tensor(dalpha_t):
        dalpha_t = torch.full_like(alpha_t, float(dalpha_t), dtype=torch.float64)
    loss = usdm_loss(logits, xt, x0, alpha_t, dalpha_t, inplace_grad=inplace_grad)
    return loss.to(dtype)


class _UsdmTerms:
    """The ELBO of a batch from the output layer's hidden states (no logits):
    DUO_BASE.nll's per-token ``[B, L]`` or ``_loss``'s token mean, through
    :func:`duo_fast.linear_usdm_loss`."""

    def __init__(self, head: _Head, z, x0, alpha, dalpha, chunk_size):
        self.head, self.z, self.x0, self.alpha, self.dalpha = head, z, x0, alpha, dalpha
        self.dtype, self.chunk_size = _loss_dtype(alpha, dalpha), chunk_size

    def _loss(self, dalpha, reduction: str) -> torch.Tensor:
        h = self.head
        # the dtypes autocast chose are in the head: the chunks' GEMMs run in them, in backward too
        with torch.autocast(h.hidden.device.type, enabled=False):
            return linear_usdm_loss(h.hidden, h.weight, h.bias, self.z, self.x0, self.alpha, dalpha,
                                    chunk_size=_chunk_size(self.chunk_size, h), reduction=reduction)

    def per_token(self) -> torch.Tensor:
        return self._loss(self.dalpha, "none").to(self.dtype)

    def token_mean(self, valid, num_tokens) -> torch.Tensor:
        """sum_i valid_i loss_i / num_tokens. The loss is linear in dalpha (its factor
        dalpha / (K alpha), docs/math.md §3), so the weights go into dalpha and the reduced
        op computes the gradients in its forward: one logits GEMM per chunk, not two."""
        w = valid.to(torch.float64) / num_tokens
        return self._loss(self.dalpha.to(torch.float64) * w, "sum").to(self.dtype)


class _KlTerms:
    """Distillation.nll's KL from the student's and the teacher's hidden states (no
    logits; the teacher without a graph), through :func:`duo_fast.linear_distill_kl`."""

    def __init__(self, student: _Head, teacher: _Head, direction: str, dtype, chunk_size):
        self.student, self.teacher, self.direction, self.dtype, self.chunk_size = student, teacher, direction, dtype, chunk_size

    def _kl(self, reduction: str) -> torch.Tensor:
        s, t = self.student, self.teacher
        with torch.autocast(s.hidden.device.type, enabled=False):
            return linear_distill_kl(s.hidden, s.weight, s.bias, t.hidden, t.weight, t.bias, self.direction,
                                     chunk_size=_chunk_size(self.chunk_size, s), reduction=reduction)

    def per_token(self) -> torch.Tensor:
        return self._kl("none").to(self.dtype)

    def token_mean(self, valid, num_tokens) -> torch.Tensor:
        """sum_i valid_i KL_i / num_tokens. The KL has no per-token factor to carry the
        weights: where every token has the same nonzero weight (the Duo configs'
        wrapped data: no padding) it is the mean, which the reduced op computes with
        the gradients in its forward; otherwise the per-token KL, weighted. (Telling
        the two apart reads one bool from the device.)"""
        v = valid.reshape(-1)
        if bool(((v == v[0]) & (v[0] != 0)).all()):
            return self._kl("mean").to(self.dtype)
        return (self.per_token() * valid).sum() / num_tokens


def _per_token(terms_fn: Callable) -> Callable:
    """nll(self, x0, ...) -> [B, L] from a terms function (a tensor, or terms with
    .per_token()); the terms function rides along for the patched _loss."""

    def nll(self, x0, *args, **kwargs):
        terms = terms_fn(self, x0, *_nll_args(args, kwargs))
        return terms if torch.is_tensor(terms) else terms.per_token()

    nll.__duo_fast_terms__ = terms_fn
    return nll


# ----------------------------------------------------------------------------------
# The replacements, per part. Each builder returns {(owner, name): new}.
# ----------------------------------------------------------------------------------


def _schedule_replacements(algo) -> dict:
    DUO, Distillation = algo.DUO, algo.Distillation

    def _gamma_to_alphat_integral(self, gamma_t):
        gamma_t = torch.as_tensor(gamma_t)
        return gamma_to_alpha(gamma_t.to(torch.float64), self.vocab_size)[0]

    def _gamma_to_alpha_dalpha_cached(self, gamma_t):
        # dalpha/dt = dalpha/dgamma * dgamma/dt, dgamma/dt = gamma_max - gamma_min (exact).
        alpha, dalpha_dgamma = gamma_to_alpha(gamma_t.to(torch.float64), self.vocab_size)
        return alpha, dalpha_dgamma * (self.gamma_max - self.gamma_min)

    def _gamma_to_alpha_dalpha(self, gamma_t, t):
        mode = self.config.algo.curriculum.mode
        if mode not in CURRICULUM_MODES:
            raise ValueError(mode)
        return self._gamma_to_alpha_dalpha_cached(gamma_t)

    def _initialize_curriculum_coefficients(self):
        # The exact operator needs no table, series coefficients or fits.
        if self.config.algo.curriculum.mode not in CURRICULUM_MODES:
            raise ValueError(self.config.algo.curriculum.mode)

    def _prior_loss(self):
        # KL(q(z_1 | x) || uniform) at alpha_1 = T(gamma_max), as the original, in float64.
        K = self.vocab_size
        a1 = self._gamma_to_alphat_integral(torch.tensor(float(self.gamma_max), dtype=torch.float64))
        loss = (a1 + (1 - a1) / K) * torch.log((K - 1) * a1 + 1) + (1 - 1 / K) * (1 - a1) * torch.log(1 - a1)
        return loss.item()

    def _validate_configuration(self):
        # The original's check minus the integral-cache pickle (no longer read).
        assert self.loss_type in {"kl-fwd", "kl-bwd", "posterior", "kl-posterior"}

    return {
        (DUO, "_gamma_to_alphat_integral"): _gamma_to_alphat_integral,
        (DUO, "_gamma_to_alpha_dalpha_cached"): _gamma_to_alpha_dalpha_cached,
        (DUO, "_gamma_to_alpha_dalpha"): _gamma_to_alpha_dalpha,
        (DUO, "_initialize_curriculum_coefficients"): _initialize_curriculum_coefficients,
        (DUO, "_prior_loss"): _prior_loss,
        (Distillation, "_validate_configuration"): _validate_configuration,
    }


def _super_terms(cls, self, x0, labels, output_tokens, step, train_mode):
    """The parent class's nll as terms (its terms function where duo_fast patched it)."""
    parent = super(cls, self).nll
    terms_fn = getattr(parent, "__duo_fast_terms__", None)
    if terms_fn is not None:
        return terms_fn(self, x0, labels, output_tokens, step, train_mode)
    return parent(x0, labels, output_tokens, step, train_mode)


def _curriculum_replacements(algo, utils, dit, *, zt_rule: str, fused_loss: bool, head_dit, raw_ok, chunk_size) -> dict:
    DUO, EmbeddingLayer = algo.DUO, dit.EmbeddingLayer
    embedding_forward = EmbeddingLayer.forward

    def forward(self, x, weights=None):
        if isinstance(x, CurriculumInput):
            return x.embed(self, embedding_forward)
        return embedding_forward(self, x, weights)

    def embedded(curriculum):
        if curriculum.z_t is None:
            raise RuntimeError(
                "duo_fast: the backbone did not call models.dit.EmbeddingLayer on its input, so the patched "
                "curriculum cannot run; patch without 'curriculum' for this backbone"
            )
        return curriculum.z_t

    def terms(self, x0, labels, output_tokens, step, train_mode):
        if self.global_step > self.curriculum_end or not train_mode:
            return _super_terms(DUO, self, x0, labels, output_tokens, step, train_mode)
        t = self._sample_t(x0.shape[0], step)
        gamma_t = self.gamma_min + t * (self.gamma_max - self.gamma_min)
        alpha_t, dalpha_t = self._gamma_to_alpha_dalpha(gamma_t, t)
        alpha_t, dalpha_t = alpha_t.unsqueeze(-1), dalpha_t.unsqueeze(-1)
        sigma = self._sigma_from_alphat(alpha_t)
        cfg = self.config.algo.curriculum
        curriculum = CurriculumInput(x0, gamma_t, self._compute_gumbel_tau_inverse(),
                                     None if cfg.mode == "simple" else int(cfg.top_k), zt_rule)
        if fused_loss:
            head = _output_head(self, self.backbone, curriculum, sigma, dit=head_dit, raw_ok=raw_ok)
            if head is not None:
                return _UsdmTerms(head, embedded(curriculum), x0, alpha_t, dalpha_t, chunk_size)
        logits = _raw_logits(self, curriculum, sigma, raw_ok=raw_ok)
        z_t = embedded(curriculum)
        if fused_loss:
            return _fused_nll(logits, z_t, x0, alpha_t, dalpha_t, inplace_grad=True)
        if type(self)._process_model_output in raw_ok:
            logits = self._process_model_output(model_output=logits, xt=z_t, sigma=sigma)
        return self.nll_per_token(log_x_theta=logits, xt=z_t, x0=x0, alpha_t=alpha_t, dalpha_t=dalpha_t, low_var=False)

    def sample_tempered_softmax_topk(extra_index, alpha, sigma, l, k, vocab_size, inverse_temperature=1.0):
        assert alpha.ndim == 1
        assert sigma.ndim == 1
        if extra_index.shape != (alpha.shape[0], l):
            raise ValueError(f"duo_fast: extra_index has shape {tuple(extra_index.shape)}, expected ({alpha.shape[0]}, {l})")
        # a~ = sqrt(sigmoid(-gamma)), s~ = sqrt(sigmoid(gamma))  =>  gamma = 2 log(s~ / a~).
        gamma = 2.0 * (torch.log(sigma.to(torch.float64)) - torch.log(alpha.to(torch.float64)))
        ids, weights, z_t = curriculum_topk(extra_index, gamma, float(inverse_temperature), int(k), int(vocab_size), zt_rule=zt_rule)
        return weights.to(torch.float64), ids, z_t

    return {
        (EmbeddingLayer, "forward"): forward,
        (DUO, "nll"): _per_token(terms),
        (utils, "sample_tempered_softmax_topk"): sample_tempered_softmax_topk,
    }


def _loss_replacements(algo, dit, *, raw_ok, chunk_size) -> dict:
    DUO_BASE = algo.DUO_BASE
    nll_per_token_original = DUO_BASE.nll_per_token

    def nll_per_token(self, log_x_theta, xt, x0, alpha_t, dalpha_t, low_var=False):
        assert alpha_t.ndim == 2
        assert x0.ndim == 2
        assert xt.ndim == 2
        assert not torch.is_tensor(dalpha_t) or dalpha_t.ndim == 2
        if log_x_theta.dtype == torch.float64:  # keep float64 math where it was asked for
            return nll_per_token_original(self, log_x_theta, xt, x0, alpha_t, dalpha_t, low_var)
        return _fused_nll(log_x_theta, xt, x0, alpha_t, dalpha_t, inplace_grad=False)

    def terms(self, x0, labels, output_tokens, step, train_mode):
        # Diffusion.nll with the output layer fused into the loss.
        t = self._sample_t(x0.shape[0], step)
        assert t.shape[0] == x0.shape[0]
        if self.T > 0:
            t = (t * self.T).to(torch.int) / self.T + 1 / self.T  # t in {1/T, ..., 1}
        dalpha_t, alpha_t = self.noise(t)
        alpha_t, dalpha_t = alpha_t.unsqueeze(-1), dalpha_t.unsqueeze(-1)
        sigma = self._sigma_from_alphat(alpha_t)
        xt = self.q_xt(x0, alpha_t)
        if self.class_conditional:
            assert labels is not None
            rand = torch.rand(size=labels.shape, dtype=torch.float32, device=self.device)
            labels = torch.where(rand < self.class_cond_dropout, self.num_classes, labels)
        else:
            assert labels is None
        head = _output_head(self, self.backbone, xt, sigma, labels, dit=dit, raw_ok=raw_ok)
        if head is not None:
            return _UsdmTerms(head, xt, x0, alpha_t, dalpha_t, chunk_size)
        logits = _raw_logits(self, xt, sigma, labels=labels, raw_ok=raw_ok)
        inplace = torch.is_grad_enabled() and logits.requires_grad
        return _fused_nll(logits, xt, x0, alpha_t, dalpha_t, inplace_grad=inplace)

    return {(DUO_BASE, "nll_per_token"): nll_per_token, (DUO_BASE, "nll"): _per_token(terms)}


def _training_loss_replacements(algo) -> dict:
    """``_loss`` (what training_step and validation_step call) of DUO_BASE and its
    subclasses, where their nll is duo_fast's: the token mean straight from the
    terms, so the reduced fused ops compute the gradients in their forward."""
    DUO_BASE, Loss = algo.DUO_BASE, algo.trainer_base.Loss
    loss_original = DUO_BASE._loss

    def _loss(self, x0, labels, valid_tokens, current_accumulation_step=None, train_mode=False):
        terms_fn = getattr(type(self).nll, "__duo_fast_terms__", None)
        if terms_fn is None:  # an nll of the user's (or an unpatched one)
            return loss_original(self, x0, labels, valid_tokens, current_accumulation_step, train_mode)
        input_tokens, output_tokens, valid_tokens = self._process_model_input(x0, valid_tokens)
        terms = terms_fn(self, input_tokens, labels, output_tokens, current_accumulation_step, train_mode)
        num_tokens = valid_tokens.sum()
        if torch.is_tensor(terms):  # a logits path: the original's reduction
            assert terms.ndim == 2
            nlls = (terms * valid_tokens).sum()
            return Loss(loss=nlls / num_tokens, nlls=nlls, prior_loss=0.0, num_tokens=num_tokens)
        token_nll = terms.token_mean(valid_tokens, num_tokens)
        return Loss(loss=token_nll, nlls=token_nll * num_tokens, prior_loss=0.0, num_tokens=num_tokens)

    return {(DUO_BASE, "_loss"): _loss}


def _signature_replacements(algo, taken) -> dict:
    """The snapshot's DUO.nll and Distillation.nll declare ``(x0, output_tokens,
    current_accumulation_step, train_mode)`` while its _loss calls ``nll(x0,
    labels, output_tokens, step, train_mode)`` (a TypeError). Where no chosen
    part replaces them (and they do not take ``labels``), they are wrapped to
    accept both calls, so that any subset of parts trains."""

    def adapter(original):
        def nll(self, x0, *args, **kwargs):
            _, output_tokens, step, train_mode = _nll_args(args, kwargs)
            return original(self, x0, output_tokens, step, train_mode)

        return nll

    out = {}
    for cls in (algo.DUO, algo.Distillation):
        current = cls.__dict__.get("nll")
        if (cls, "nll") in taken or current is None or getattr(current, _MARK, False):
            continue
        if "labels" not in inspect.signature(current).parameters:
            out[(cls, "nll")] = adapter(current)
    return out


def _distillation_replacements(algo, dit, *, raw_ok, chunk_size) -> dict:
    Distillation = algo.Distillation
    nll_original = Distillation.nll

    def terms(self, x0, labels, output_tokens, step, train_mode):
        if self.loss_type not in ("kl-fwd", "kl-bwd"):
            return nll_original(self, x0, output_tokens, step, train_mode)
        t = self._sample_t(x0.shape[0], step)
        dt = self._compute_dt()
        t = torch.clip(t + dt, 0, 1)
        gamma_t = self.gamma_min + t * (self.gamma_max - self.gamma_min)
        gamma_s = self.gamma_min + (t - dt) * (self.gamma_max - self.gamma_min)
        alpha_t = self._gamma_to_alphat_integral(gamma_t).unsqueeze(-1)
        alpha_s = self._gamma_to_alphat_integral(gamma_s).unsqueeze(-1)
        # The coupled pair argmax(a~_t e_x + s~_t eps), argmax(a~_s e_x + s~_s eps), exactly (docs/math.md §2b).
        xt, xs = sample_zt(x0, gamma_t, self.vocab_size, gamma_s=gamma_s)
        sigma_t, sigma_s = self._sigma_from_alphat(alpha_t), self._sigma_from_alphat(alpha_s)
        direction = "fwd" if self.loss_type == "kl-fwd" else "bwd"
        dtype = torch.float64 if self.config.training.loss_precision == "float64" else torch.float32
        student = _output_head(self, self.backbone, xt, sigma_t, dit=dit, raw_ok=raw_ok)
        if student is not None:
            with torch.no_grad():  # the teacher's bookkeeping as _teacher_logits: made on first use, then its updates
                if self.teacher is None:
                    self.teacher = copy.deepcopy(self.backbone)
                self._maybe_update_teacher_weights()
                teacher = _output_head(self, self.teacher, xs, sigma_s, dit=dit, raw_ok=raw_ok)
            if teacher is not None:
                return _KlTerms(student, teacher, direction, dtype, chunk_size)
            student_logits = student.logits()
            teacher_logits = self._teacher_logits(xs, sigma=sigma_s)
        else:
            student_logits = _raw_logits(self, xt, sigma_t, raw_ok=raw_ok)
            teacher_logits = self._teacher_logits(xs, sigma=sigma_s)
        # float32 / bfloat16 / float16 logits (autocast) are read natively: no float32 copies
        student_logits = student_logits if student_logits.dtype in _LOGIT_DTYPES else student_logits.float()
        teacher_logits = teacher_logits if teacher_logits.dtype in _LOGIT_DTYPES else teacher_logits.float()
        inplace = torch.is_grad_enabled() and student_logits.requires_grad  # one backward per step: the lowest memory
        return distill_kl(student_logits, teacher_logits, direction, inplace_grad=inplace).to(dtype)

    return {(Distillation, "nll"): _per_token(terms)}


class HiddenCache:
    """The patched samplers' stand-in for the reference's ``p_x0`` cache where the
    output layer is fused: the step's hidden states (conditional, and
    unconditional under guidance) with the output layer's parameters, accepted
    back as ``p_x0``."""

    def __init__(self, cond: _Head, uncond: _Head | None):
        self.cond, self.uncond = cond, uncond


def _sampling_replacements(trainer_base, dit, *, raw_ok, chunk_size) -> dict:
    UniformState = trainer_base.UniformState
    ancestral_original, psi_original = UniformState._ancestral_update, UniformState._psi_update

    def _step_setup(self, t, labels, dt, noise_removal_step):
        """alpha_t, alpha_s, the labels as _get_ancestral_posterior uses them, and the
        guidance weight (None without guidance: not class-conditional, or a weight of
        None / 0 (the unconditional model) or 1 (the conditional one))."""
        gamma = self.config.sampling.guid_weight
        guided = self.class_conditional and gamma not in (None, 0.0, 1.0)
        if labels is not None and (not self.class_conditional or gamma in (None, 0.0)):
            labels = torch.full_like(labels, self.num_classes)
        _, alpha_t = self.noise(t)
        alpha_s = torch.ones_like(alpha_t) if noise_removal_step else self.noise(t - dt)[1]
        return alpha_t, alpha_s, labels, float(gamma) if guided else None

    def _heads(self, x, alpha_t, labels, guid, p_x0) -> HiddenCache | None:
        """The step's output-layer inputs (fused path), or None (logits path)."""
        if isinstance(p_x0, HiddenCache) and (guid is None or p_x0.uncond is not None):
            return p_x0
        if p_x0 is not None and not isinstance(p_x0, HiddenCache):
            return None
        sigma = self._sigma_from_alphat(alpha_t)
        cond = _output_head(self, self.backbone, x, sigma, labels, dit=dit, raw_ok=raw_ok)
        if cond is None or guid is None:
            return None if cond is None else HiddenCache(cond, None)
        # NOTE as the Duo code: label num_classes is the class-unconditional model.
        uncond = _output_head(self, self.backbone, x, sigma, torch.full_like(labels, self.num_classes), dit=dit, raw_ok=raw_ok)
        return HiddenCache(cond, uncond)

    def _step(self, x, t, labels, dt, kappa, p_x0, noise_removal_step, original):
        alpha_t, alpha_s, labels, guid = _step_setup(self, t, labels, dt, noise_removal_step)
        assert alpha_t.ndim == 2
        heads = _heads(self, x, alpha_t, labels, guid, p_x0)
        if heads is not None:
            h = heads.cond
            guidance = None if guid is None else (heads.uncond.hidden, guid)
            # kappa q_posterior + (1 - kappa) (alpha_s q_posterior(alpha_s = 1) + (1 - alpha_s) / K): docs/math.md §4.
            z = linear_sample_step(h.hidden, h.weight, h.bias, x, alpha_t, alpha_s, kappa=kappa,
                                   top_p=float(self.p_nucleus), guidance=guidance, chunk_size=chunk_size)
            return heads, z
        if guid is not None:  # guidance on the logits path: the original's dense posteriors
            return original()
        if isinstance(p_x0, LogitsCache):
            logits = p_x0.logits
        elif p_x0 is not None:  # a probability tensor from elsewhere
            logits = p_x0.log()
        else:
            logits = _raw_logits(self, x, self._sigma_from_alphat(alpha_t), labels=labels, raw_ok=raw_ok)
        return LogitsCache(logits), sample_step(logits, x, alpha_t, alpha_s, kappa=kappa, top_p=float(self.p_nucleus))

    def _ancestral_update(self, x, t, labels, dt, p_x0=None, noise_removal_step=False):
        return _step(self, x, t, labels, dt, 1.0, p_x0, noise_removal_step,
                     lambda: ancestral_original(self, x, t, labels, dt, p_x0, noise_removal_step))

    def _psi_update(self, x, t, labels, dt, kappa, p_x0=None, noise_removal_step=False):
        return _step(self, x, t, labels, dt, float(kappa), p_x0, noise_removal_step,
                     lambda: psi_original(self, x, t, labels, dt, kappa, p_x0, noise_removal_step))

    return {(UniformState, "_ancestral_update"): _ancestral_update, (UniformState, "_psi_update"): _psi_update}


# ----------------------------------------------------------------------------------
# patch() and Patch
# ----------------------------------------------------------------------------------


class Patch(_patching.Patch):
    """What :func:`patch` replaced. ``undo()`` restores every original object (by
    identity) that is still duo_fast's replacement, and warns about the attributes
    reassigned since (kept as they are); a context manager (``with patch(): ...``
    undoes on exit)."""

    def __init__(self, parts: tuple[str, ...]):
        super().__init__(", ".join(parts), tag="duo_fast.integrations.duo")
        self.parts = parts


def _resolve(modules: dict[str, ModuleType | None], needed: Iterable[str]) -> dict[str, ModuleType]:
    out, missing = {}, []
    for arg in needed:
        mod = modules.get(arg)
        if mod is None:
            mod = sys.modules.get(_SYS_NAMES[arg])
        if mod is None:
            missing.append(f"{arg}= (sys.modules[{_SYS_NAMES[arg]!r}])")
        out[arg] = mod
    if missing:
        raise RuntimeError(
            "duo_fast: cannot patch the Duo codebase: these modules are neither passed nor imported: "
            + ", ".join(missing) + ". Import the Duo code first (e.g. `import algo`), or pass the modules."
        )
    return out


def patch(
    *,
    algo: ModuleType | None = None,
    utils: ModuleType | None = None,
    trainer_base: ModuleType | None = None,
    dit: ModuleType | None = None,
    parts: Iterable[str] | str | None = None,
    topk_zt_rule: str = "exact",
    chunk_size: int | None = None,
    fuse_output_layer: bool = True,
) -> Patch:
    """Replace the Duo codebase's schedule, curriculum, loss, distillation and
    sampling with duo_fast's ops (see the module docstring for each part).

    ``algo``, ``utils``, ``trainer_base``, ``dit``: the user's imported modules
    (default ``sys.modules["algo"]``, ``["utils"]``, ``["trainer_base"]``,
    ``["models.dit"]``); only those the chosen ``parts`` need are looked up.
    ``parts``: a subset of :data:`PARTS` (None: all). ``topk_zt_rule``:
    ``"exact"`` or ``"reference"`` for the top-k curriculum's ``z_t``.
    ``chunk_size``: tokens per chunk of the fused output layer (None: for the
    losses on the CPU the fewest whose float32 logits take 32 MiB, 167 at K =
    50257; else the ops' default, about 64 MiB). ``fuse_output_layer``:
    False keeps the losses and the sampling step on the model's ``[B, L, K]``
    logits (the fused ops then take the logits).
    Raises if any target is already patched (never wraps twice). Logs one line
    listing what was replaced. Returns a :class:`Patch` (``undo()``, context
    manager)."""
    parts = _patching.check_parts(parts, PARTS)
    if topk_zt_rule not in _ZT_RULES:
        raise ValueError(f"duo_fast: topk_zt_rule must be 'exact' or 'reference', got {topk_zt_rule!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"duo_fast: chunk_size must be a positive int or None, got {chunk_size!r}")
    needed = sorted({m for p in parts for m in _NEEDS[p]})
    mods = _resolve({"algo": algo, "utils": utils, "trainer_base": trainer_base, "dit": dit}, needed)
    algo_mod = mods.get("algo") or algo or sys.modules.get("algo")
    # Backbone outputs may skip _process_model_output where it is DUO_BASE's log_softmax.
    raw_ok = (algo_mod.DUO_BASE._process_model_output,) if algo_mod is not None and hasattr(algo_mod, "DUO_BASE") else ()
    # dit=None: no output layer is recognized, every step takes the logits path
    fused = {"dit": mods.get("dit") if fuse_output_layer else None, "raw_ok": raw_ok, "chunk_size": chunk_size}

    targets: dict = {}
    if "schedule" in parts:
        targets.update(_schedule_replacements(mods["algo"]))
    if "curriculum" in parts:
        targets.update(_curriculum_replacements(mods["algo"], mods["utils"], mods["dit"], zt_rule=topk_zt_rule,
                                                fused_loss="loss" in parts, head_dit=fused["dit"], raw_ok=raw_ok,
                                                chunk_size=chunk_size))
    if "loss" in parts:
        targets.update(_loss_replacements(mods["algo"], **fused))
    if "distillation" in parts:
        targets.update(_distillation_replacements(mods["algo"], **fused))
    if {"curriculum", "loss", "distillation"} & set(parts):
        targets.update(_training_loss_replacements(mods["algo"]))
    if "sampling" in parts:
        targets.update(_sampling_replacements(mods["trainer_base"], **fused))
    if algo_mod is not None and hasattr(algo_mod, "DUO"):
        targets.update(_signature_replacements(algo_mod, targets))

    # Checks everything before changing anything: never wraps a patched object.
    result = Patch(parts).replace_all(targets)
    log.info("duo_fast: patched the Duo codebase (%s): %s", ", ".join(parts), ", ".join(result.replaced))
    return result


# ----------------------------------------------------------------------------------
# The launcher (duo_launch.py): python -m duo_fast.integrations.duo [options] main.py [overrides]
# ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m duo_fast.integrations.duo`` / ``duo-fast duo``: see
    :mod:`duo_fast.integrations.duo_launch`."""
    from .duo_launch import main as launch

    launch(argv)


if __name__ == "__main__":  # one copy of this module's classes: run the imported one
    from duo_fast.integrations.duo import main as _main

    _main()
