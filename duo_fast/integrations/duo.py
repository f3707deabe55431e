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
  ``DUO_BASE.nll`` (the plain ELBO, also after the curriculum) feeds the
  backbone's raw logits to ``usdm_loss(..., inplace_grad=True)``: no
  ``log_softmax`` and no loss temporaries of size ``[B, L, K]``.
* ``distillation``: ``Distillation.nll`` draws its coupled pair with
  :func:`duo_fast.sample_zt` (``gamma_s=``; no dense noise, no one-hot) and the
  KL with :func:`duo_fast.distill_kl` for ``kl-fwd`` / ``kl-bwd`` (other loss
  types keep the original). The teacher's bookkeeping is the original's.
* ``sampling``: ``UniformState._ancestral_update`` and ``_psi_update`` are one
  denoiser call plus one :func:`duo_fast.sample_step` (``kappa`` the Psi mix,
  ``p_nucleus`` its ``top_p``, the noise-removal step ``alpha_s = 1``); no
  posterior of size ``[B, L, K]``. Classifier-free guidance with a weight
  other than 0 or 1 keeps the original. ``generate_samples`` is unchanged.

Two places where the patched code differs from the pinned snapshot besides
the math: that snapshot's ``DUO.nll`` and ``Distillation.nll`` declare
``(x0, output_tokens, current_accumulation_step, train_mode)`` while its own
``trainer_base._loss`` calls ``nll(x0, labels, output_tokens,
current_accumulation_step, train_mode)`` (a TypeError: neither class can train
or validate). The patched ``nll`` accepts both calls. And the first element
that the patched ``_ancestral_update`` / ``_psi_update`` return (the
reference's dense ``p_x0`` cache) is a :class:`LogitsCache` holding the model's
logits, which the next call accepts back; uniform-state models never reuse it
(``time_conditioning`` is required), so ``generate_samples`` is unaffected.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ..ops import curriculum_embed, curriculum_topk, distill_kl, gamma_to_alpha, sample_step, sample_zt, usdm_loss
from ..ops._common import _LOGIT_DTYPES

__all__ = ["PARTS", "Patch", "patch", "CurriculumInput", "LogitsCache", "main"]

PARTS = ("schedule", "curriculum", "loss", "distillation", "sampling")
CURRICULUM_MODES = ("simple", "efficient_cached", "series", "sigmoid", "sigmoid-edge-corrected", "poly3", "poly5", "poly7", "poly9")
_MARK = "__duo_fast_patch__"
_ZT_RULES = ("exact", "reference")
_NEEDS = {  # part -> modules it patches
    "schedule": ("algo",),
    "curriculum": ("algo", "utils", "dit"),
    "loss": ("algo",),
    "distillation": ("algo",),
    "sampling": ("trainer_base",),
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
    sigma = model._process_sigma(sigma)
    # As TrainerBase.forward (which, on a machine without CUDA, autocast disables anyway).
    with torch.amp.autocast("cuda", dtype=torch.float32, enabled=torch.cuda.is_available()):
        return model.backbone(x=x, sigma=sigma, class_cond=labels, weights=weights)


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


def _loss_dtype(log_x_theta, alpha_t, dalpha_t) -> torch.dtype:
    """The dtype DUO_BASE.nll_per_token's formula returns (type promotion of its
    inputs with float32)."""
    dt = torch.promote_types(torch.promote_types(log_x_theta.dtype, alpha_t.dtype), torch.float32)
    return torch.promote_types(dt, dalpha_t.dtype) if torch.is_tensor(dalpha_t) else dt


def _fused_nll(logits, xt, x0, alpha_t, dalpha_t, *, inplace_grad: bool) -> torch.Tensor:
    """usdm_loss on ``[B, L, K]`` logits with DUO_BASE.nll_per_token's conventions
    (``alpha_t`` ``[B, 1]`` or ``[B, L]``, ``dalpha_t`` a tensor or a float) and
    its output dtype."""
    dtype = _loss_dtype(logits, alpha_t, dalpha_t)
    if not torch.is_tensor(dalpha_t):
        dalpha_t = torch.full_like(alpha_t, float(dalpha_t), dtype=torch.float64)
    loss = usdm_loss(logits, xt, x0, alpha_t, dalpha_t, inplace_grad=inplace_grad)
    return loss.to(dtype)


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


def _curriculum_replacements(algo, utils, dit, *, zt_rule: str, fused_loss: bool, raw_ok) -> dict:
    DUO, EmbeddingLayer = algo.DUO, dit.EmbeddingLayer
    embedding_forward = EmbeddingLayer.forward

    def forward(self, x, weights=None):
        if isinstance(x, CurriculumInput):
            return x.embed(self, embedding_forward)
        return embedding_forward(self, x, weights)

    def nll(self, x0, *args, **kwargs):
        labels, output_tokens, step, train_mode = _nll_args(args, kwargs)
        if self.global_step > self.curriculum_end or not train_mode:
            return super(DUO, self).nll(x0, labels, output_tokens, step, train_mode)
        t = self._sample_t(x0.shape[0], step)
        gamma_t = self.gamma_min + t * (self.gamma_max - self.gamma_min)
        alpha_t, dalpha_t = self._gamma_to_alpha_dalpha(gamma_t, t)
        alpha_t, dalpha_t = alpha_t.unsqueeze(-1), dalpha_t.unsqueeze(-1)
        sigma = self._sigma_from_alphat(alpha_t)
        cfg = self.config.algo.curriculum
        curriculum = CurriculumInput(x0, gamma_t, self._compute_gumbel_tau_inverse(),
                                     None if cfg.mode == "simple" else int(cfg.top_k), zt_rule)
        logits = _raw_logits(self, curriculum, sigma, raw_ok=raw_ok)
        if curriculum.z_t is None:
            raise RuntimeError(
                "duo_fast: the backbone did not call models.dit.EmbeddingLayer on its input, so the patched "
                "curriculum cannot run; patch without 'curriculum' for this backbone"
            )
        if fused_loss:
            return _fused_nll(logits, curriculum.z_t, x0, alpha_t, dalpha_t, inplace_grad=True)
        if type(self)._process_model_output in raw_ok:
            logits = self._process_model_output(model_output=logits, xt=curriculum.z_t, sigma=sigma)
        return self.nll_per_token(log_x_theta=logits, xt=curriculum.z_t, x0=x0, alpha_t=alpha_t,
                                  dalpha_t=dalpha_t, low_var=False)

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
        (DUO, "nll"): nll,
        (utils, "sample_tempered_softmax_topk"): sample_tempered_softmax_topk,
    }


def _loss_replacements(algo, *, raw_ok) -> dict:
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

    def nll(self, x0, *args, **kwargs):
        # Diffusion.nll with the raw logits into the fused loss.
        labels, output_tokens, step, train_mode = _nll_args(args, kwargs)
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
        logits = _raw_logits(self, xt, sigma, labels=labels, raw_ok=raw_ok)
        inplace = torch.is_grad_enabled() and logits.requires_grad
        return _fused_nll(logits, xt, x0, alpha_t, dalpha_t, inplace_grad=inplace)

    return {(DUO_BASE, "nll_per_token"): nll_per_token, (DUO_BASE, "nll"): nll}


def _distillation_replacements(algo, *, raw_ok) -> dict:
    Distillation = algo.Distillation
    nll_original = Distillation.nll

    def nll(self, x0, *args, **kwargs):
        labels, output_tokens, step, train_mode = _nll_args(args, kwargs)
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
        student = _raw_logits(self, xt, self._sigma_from_alphat(alpha_t), raw_ok=raw_ok)
        teacher = self._teacher_logits(xs, sigma=self._sigma_from_alphat(alpha_s))
        # float32 / bfloat16 / float16 logits (autocast) are read natively: no float32 copies
        student = student if student.dtype in _LOGIT_DTYPES else student.float()
        teacher = teacher if teacher.dtype in _LOGIT_DTYPES else teacher.float()
        inplace = torch.is_grad_enabled() and student.requires_grad  # one backward per step: the lowest memory
        kl = distill_kl(student, teacher, "fwd" if self.loss_type == "kl-fwd" else "bwd", inplace_grad=inplace)
        if self.config.training.loss_precision == "float64":
            kl = kl.to(torch.float64)
        return kl

    return {(Distillation, "nll"): nll}


def _sampling_replacements(trainer_base, *, raw_ok) -> dict:
    UniformState = trainer_base.UniformState
    ancestral_original, psi_original = UniformState._ancestral_update, UniformState._psi_update

    def _step_setup(self, t, labels, dt, noise_removal_step):
        """alpha_t, alpha_s and the labels as _get_ancestral_posterior uses them;
        None for labels-with-guidance (kept on the original path)."""
        gamma = self.config.sampling.guid_weight
        if self.class_conditional and gamma not in (None, 0.0, 1.0):
            return None
        if labels is not None and (not self.class_conditional or gamma in (None, 0.0)):
            labels = torch.full_like(labels, self.num_classes)
        _, alpha_t = self.noise(t)
        alpha_s = torch.ones_like(alpha_t) if noise_removal_step else self.noise(t - dt)[1]
        return alpha_t, alpha_s, labels

    def _logits_for_step(self, x, alpha_t, labels, p_x0):
        if isinstance(p_x0, LogitsCache):
            return p_x0.logits
        if p_x0 is not None:  # a probability tensor from elsewhere
            return p_x0.log()
        return _raw_logits(self, x, self._sigma_from_alphat(alpha_t), labels=labels, raw_ok=raw_ok)

    def _ancestral_update(self, x, t, labels, dt, p_x0=None, noise_removal_step=False):
        setup = _step_setup(self, t, labels, dt, noise_removal_step)
        if setup is None:
            return ancestral_original(self, x, t, labels, dt, p_x0, noise_removal_step)
        alpha_t, alpha_s, labels = setup
        assert alpha_t.ndim == 2
        logits = _logits_for_step(self, x, alpha_t, labels, p_x0)
        return LogitsCache(logits), sample_step(logits, x, alpha_t, alpha_s, top_p=float(self.p_nucleus))

    def _psi_update(self, x, t, labels, dt, kappa, p_x0=None, noise_removal_step=False):
        setup = _step_setup(self, t, labels, dt, noise_removal_step)
        if setup is None:
            return psi_original(self, x, t, labels, dt, kappa, p_x0, noise_removal_step)
        alpha_t, alpha_s, labels = setup
        logits = _logits_for_step(self, x, alpha_t, labels, p_x0)
        # kappa q_posterior + (1 - kappa) (alpha_s q_posterior(alpha_s = 1) + (1 - alpha_s) / K): docs/math.md §4.
        z = sample_step(logits, x, alpha_t, alpha_s, kappa=float(kappa), top_p=float(self.p_nucleus))
        return LogitsCache(logits), z

    return {(UniformState, "_ancestral_update"): _ancestral_update, (UniformState, "_psi_update"): _psi_update}


# ----------------------------------------------------------------------------------
# patch() and Patch
# ----------------------------------------------------------------------------------


@dataclass
class _Replaced:
    owner: Any
    name: str
    original: Any
    had_own: bool  # the name was in owner.__dict__ (else it was inherited: undo deletes it)

    @property
    def label(self) -> str:
        owner = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", "?")
        module = self.owner.__name__ if isinstance(self.owner, ModuleType) else self.owner.__module__
        return f"{module}.{self.name}" if isinstance(self.owner, ModuleType) else f"{module}.{owner}.{self.name}"


class Patch:
    """What :func:`patch` replaced. ``undo()`` restores every original object (by
    identity); a context manager (``with patch(): ...`` undoes on exit)."""

    def __init__(self, parts: tuple[str, ...], replaced: list[_Replaced]):
        self.parts = parts
        self._replaced = replaced
        self.active = True

    @property
    def replaced(self) -> list[str]:
        """Qualified names of the replaced objects."""
        return [r.label for r in self._replaced]

    def undo(self) -> None:
        if not self.active:
            return
        for r in reversed(self._replaced):
            if r.had_own:
                setattr(r.owner, r.name, r.original)
            else:
                delattr(r.owner, r.name)
        self.active = False
        log.info("duo_fast: restored %d originals", len(self._replaced))

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<duo_fast Patch {state}: {', '.join(self.parts)} ({len(self._replaced)} objects)>"


def install(targets: dict, by: str) -> list[_Replaced]:
    """Set every ``(owner, name) -> new`` of ``targets`` (after checking all of them:
    raises if any is already patched, so nothing is ever wrapped twice); ``by``
    (the patching module's name) goes into the new docstrings. Returns what
    :class:`Patch` needs to undo it."""
    already = [f"{getattr(o, '__qualname__', getattr(o, '__name__', o))}.{n}" for (o, n) in targets
               if getattr(o.__dict__.get(n), _MARK, False)]
    if already:
        raise RuntimeError(
            f"duo_fast: already patched: {', '.join(already)}; call undo() on the earlier Patch first"
        )
    replaced = []
    for (owner, name), new in targets.items():
        had_own = name in owner.__dict__
        original = owner.__dict__[name] if had_own else None
        setattr(new, _MARK, True)
        new.__wrapped_original__ = original
        if had_own and callable(original):
            new.__doc__ = (original.__doc__ or "") + f"\n\n[patched by {by}]"
            new.__name__ = getattr(original, "__name__", name)
        setattr(owner, name, new)
        replaced.append(_Replaced(owner, name, original, had_own))
    return replaced


def _check_parts(parts) -> tuple[str, ...]:
    if parts is None:
        return PARTS
    if isinstance(parts, str):
        parts = [parts]
    parts = list(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"duo_fast: parts must be a non-empty subset of {PARTS}, got {parts!r}")
    return tuple(p for p in PARTS if p in parts)


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
) -> Patch:
    """Replace the Duo codebase's schedule, curriculum, loss, distillation and
    sampling with duo_fast's ops (see the module docstring for each part).

    ``algo``, ``utils``, ``trainer_base``, ``dit``: the user's imported modules
    (default ``sys.modules["algo"]``, ``["utils"]``, ``["trainer_base"]``,
    ``["models.dit"]``); only those the chosen ``parts`` need are looked up.
    ``parts``: a subset of :data:`PARTS` (None: all). ``topk_zt_rule``:
    ``"exact"`` or ``"reference"`` for the top-k curriculum's ``z_t``.
    Raises if any target is already patched (never wraps twice). Logs one line
    listing what was replaced. Returns a :class:`Patch` (``undo()``, context
    manager)."""
    parts = _check_parts(parts)
    if topk_zt_rule not in _ZT_RULES:
        raise ValueError(f"duo_fast: topk_zt_rule must be 'exact' or 'reference', got {topk_zt_rule!r}")
    needed = sorted({m for p in parts for m in _NEEDS[p]})
    mods = _resolve({"algo": algo, "utils": utils, "trainer_base": trainer_base, "dit": dit}, needed)
    algo_mod = mods.get("algo") or algo or sys.modules.get("algo")
    # Backbone outputs may skip _process_model_output where it is DUO_BASE's log_softmax.
    raw_ok = (algo_mod.DUO_BASE._process_model_output,) if algo_mod is not None and hasattr(algo_mod, "DUO_BASE") else ()

    targets: dict = {}
    if "schedule" in parts:
        targets.update(_schedule_replacements(mods["algo"]))
    if "curriculum" in parts:
        targets.update(_curriculum_replacements(mods["algo"], mods["utils"], mods["dit"], zt_rule=topk_zt_rule,
                                                fused_loss="loss" in parts, raw_ok=raw_ok))
    if "loss" in parts:
        targets.update(_loss_replacements(mods["algo"], raw_ok=raw_ok))
    if "distillation" in parts:
        targets.update(_distillation_replacements(mods["algo"], raw_ok=raw_ok))
    if "sampling" in parts:
        targets.update(_sampling_replacements(mods["trainer_base"], raw_ok=raw_ok))

    result = Patch(parts, install(targets, __name__))
    log.info("duo_fast: patched the Duo codebase (%s): %s", ", ".join(parts), ", ".join(result.replaced))
    return result


# ----------------------------------------------------------------------------------
# The launcher: python -m duo_fast.integrations.duo [--parts ...] main.py [overrides]
# ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m duo_fast.integrations.duo",
        description="Run the Duo codebase's unmodified main.py with duo_fast patched in.",
    )
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--topk-zt-rule", default="exact", choices=_ZT_RULES,
                   help="z_t of the top-k curriculum: the exact law (default) or the reference's rule")
    p.add_argument("script", help="path to the Duo codebase's main.py")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="hydra overrides, passed on to main.py")
    return p


def run_script(script: str | Path, argv: list[str], *, parts=None, topk_zt_rule: str = "exact") -> Patch:
    """Import the Duo modules from ``script``'s folder, patch them, run ``script``
    as ``__main__`` with ``sys.argv = [script, *argv]``; returns the Patch
    (still active: the process is about to end)."""
    script = Path(script).resolve()
    if not script.is_file():
        raise SystemExit(f"duo_fast: no such script: {script}")
    folder = str(script.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    parts = _check_parts(parts)
    from .duo_reference import install_flash_attn_standin

    if install_flash_attn_standin():
        log.warning("duo_fast: flash_attn is not installed; using duo_fast's pure-PyTorch stand-in "
                    "(rotary embedding + scaled_dot_product_attention)")
    needed = sorted({m for p in parts for m in _NEEDS[p]} | {"algo"})
    for arg in needed:
        try:
            importlib.import_module(_SYS_NAMES[arg])
        except ImportError as e:
            raise SystemExit(f"duo_fast: cannot import {_SYS_NAMES[arg]!r} from {folder}: {e}") from e
    result = patch(parts=parts, topk_zt_rule=topk_zt_rule)
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    return result


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if not log.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)
    run_script(args.script, args.overrides, parts=[p for p in args.parts.split(",") if p],
               topk_zt_rule=args.topk_zt_rule)


if __name__ == "__main__":  # one copy of this module's classes: run the imported one
    from duo_fast.integrations.duo import main as _main

    _main()
