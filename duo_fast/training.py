"""Training uniform-state diffusion LMs with duo_fast's ops: the Duo
curriculum, the plain ELBO after it, and Discrete Consistency Distillation
(DCD). Plain functions over any denoiser, no framework.

The denoiser (e.g. :class:`duo_fast.models.DiT`) is a ``torch.nn.Module``
called as ``model(x, sigma) -> logits [B, L, K]`` where ``x`` is token ids
``[B, L]`` or soft input embeddings ``[B, L, d]``, ``sigma = -log(alpha)`` per
row, with its ``[K, d]`` input embedding matrix as ``model.embedding``; with
``linear_loss=True`` also ``model(x, sigma, return_hidden=True) -> (hidden,
output_layer)``. A ``DistributedDataParallel`` wrapper is fine (its
``.module`` is used for the embedding).

Schedules (as the Duo code, ``algo.DUO`` / ``algo.Distillation``):

* the Duo curriculum: ``gamma = gamma_min + t (gamma_max - gamma_min)``,
  ``alpha = T(gamma)`` and ``dalpha/dt = T'(gamma) (gamma_max - gamma_min)``
  exactly (:func:`duo_fast.gamma_to_alpha`); the input is the tempered softmax
  of the Gaussian latent with ``1/tau`` from ``10^-tau_log10_start`` to
  ``10^-tau_log10_end`` between ``curriculum_start`` and ``curriculum_end``
  (``_compute_gumbel_tau_inverse``), exact (:func:`duo_fast.curriculum_embed`)
  or top-k (:func:`duo_fast.curriculum_topk_embed`, Duo++);
* after it (``step > curriculum_end``): the uniform-state process
  ``q(z_t | x) = alpha onehot(x) + (1 - alpha)/K`` with a log-linear or cosine
  ``alpha(t)``, drawn exactly (keep x with probability alpha, else a uniform id);
* ``t`` is antithetic (stratified) as ``_sample_t``: ``u_i = (v_i / n + i / n)
  mod 1`` with ``v_i`` uniform, ``t = (1 - eps) u + eps``.

DCD (``Distillation.nll``): ``t ~ sample_t``, ``t <- min(t + dt, 1)``, ``s = t -
dt``; the coupled pair ``(z_t, z_s)`` shares the Gaussian noise
(:func:`duo_fast.sample_zt` with ``gamma_s``); the student at ``(z_t, t)`` is
pulled to the teacher at ``(z_s, s)`` by :func:`duo_fast.distill_kl`. ``dt =
2^round / T`` (it doubles every round) or grows linearly with the step; at the
start of every round the teacher becomes a copy of the student (or of its EMA).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .ops import curriculum_embed, curriculum_topk_embed, distill_kl, gamma_to_alpha, linear_usdm_loss, sample_zt, usdm_loss

__all__ = [
    "DuoConfig", "DCDConfig", "LossOutput", "EMA", "sample_t", "duo_levels", "noise_levels", "inv_tau",
    "q_sample", "duo_loss", "dcd_dt", "dcd_loss", "refresh_teacher", "gamma_range", "unwrap",
]


# ----------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------


@dataclass
class DuoConfig:
    """Configuration of :func:`duo_loss` (defaults: configs/algo/duo.yaml of the Duo code).

    The curriculum is on while ``step <= curriculum_end`` (``-1``: never), as
    ``DUO.nll``'s ``global_step > curriculum_end`` switch."""

    vocab_size: int
    gamma_min: float = -3.5
    gamma_max: float = -1.75
    tau_log10_start: float = -1.0
    tau_log10_end: float = -2.0
    curriculum_start: int = 100_000
    curriculum_end: int = 200_000
    curriculum: str = "exact"  # "exact" (curriculum_embed) or "topk" (curriculum_topk_embed)
    top_k: int = 128
    zt_rule: str = "exact"
    noise: str = "loglinear"  # after the curriculum: "loglinear" or "cosine"
    noise_eps: float = 1e-3
    sampling_eps: float = 1e-3
    antithetic: bool = True
    linear_loss: bool = False  # linear_usdm_loss on (hidden, output layer): no logits at all

    def __post_init__(self):
        if self.curriculum not in ("exact", "topk"):
            raise ValueError(f"duo_fast: curriculum must be 'exact' or 'topk', got {self.curriculum!r}")
        if self.noise not in ("loglinear", "cosine"):
            raise ValueError(f"duo_fast: noise must be 'loglinear' or 'cosine', got {self.noise!r}")
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"duo_fast: need gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}")


@dataclass
class DCDConfig:
    """Configuration of :func:`dcd_loss` (configs/algo/distillation.yaml)."""

    vocab_size: int
    gamma_min: float = -3.5
    gamma_max: float = -1.75
    T: int = 64  # dt = 2^round / T
    direction: str = "bwd"  # "bwd": KL(student || teacher) (kl-bwd), "fwd": KL(teacher || student)
    linear_growth: bool = False  # dt = min + (max - min) step / max_steps instead of doubling
    linear_growth_min: float = 0.001
    linear_growth_max: float = 0.25
    max_steps: int | None = None
    sampling_eps: float = 1e-3
    antithetic: bool = True

    def __post_init__(self):
        if self.direction not in ("bwd", "fwd"):
            raise ValueError(f"duo_fast: direction must be 'bwd' or 'fwd', got {self.direction!r}")
        if self.linear_growth and not self.max_steps:
            raise ValueError("duo_fast: linear_growth needs max_steps")


@dataclass
class LossOutput:
    """``loss``: the scalar to minimise (mean over tokens); ``per_token``:
    ``[B, L]``; ``t``: the times drawn ``[B]``; ``info``: what was used (phase,
    levels, temperature, dt)."""

    loss: torch.Tensor
    per_token: torch.Tensor
    t: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel (or any ``.module``) wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


# ----------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------


def sample_t(n: int, *, eps: float = 1e-3, antithetic: bool = True, generator: torch.Generator | None = None,
             device=None) -> torch.Tensor:
    """Training times in ``[eps, 1]`` (``_sample_t``): with ``antithetic`` the
    i-th time lies in the i-th of n strata, ``u_i = (v_i / n + i / n) mod 1``."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
    if antithetic:
        u = (u / n + torch.arange(n, device=u.device, dtype=torch.float64) / n) % 1
    return ((1 - eps) * u + eps).to(device)


def duo_levels(t: torch.Tensor, vocab_size: int, gamma_min: float, gamma_max: float):
    """``(gamma, alpha, dalpha/dt)`` of the Duo curriculum at times ``t`` (float64):
    ``gamma = gamma_min + t (gamma_max - gamma_min)``, ``alpha = T(gamma)``,
    ``dalpha/dt = T'(gamma) (gamma_max - gamma_min)``."""
    gamma = gamma_min + t.double() * (gamma_max - gamma_min)
    alpha, dalpha_dgamma = gamma_to_alpha(gamma, vocab_size)
    return gamma, alpha, dalpha_dgamma * (gamma_max - gamma_min)


def noise_levels(t: torch.Tensor, kind: str = "loglinear", eps: float = 1e-3):
    """``(alpha, dalpha/dt)`` (float64) of the plain schedules (``trainer_base``
    LogLinear / Cosine): ``1 - (1 - eps) t`` and ``1 - cos(pi/2 (1 - (1 - eps) t))``."""
    t = t.double()
    if kind == "loglinear":
        return 1 - (1 - eps) * t, torch.full_like(t, -(1 - eps))
    if kind == "cosine":
        u = (1 - eps) * t
        return 1 - torch.cos(0.5 * math.pi * (1 - u)), -torch.sin(0.5 * math.pi * (1 - u)) * 0.5 * math.pi * (1 - eps)
    raise ValueError(f"duo_fast: noise must be 'loglinear' or 'cosine', got {kind!r}")


def inv_tau(step: int, cfg: DuoConfig) -> float:
    """``1/tau`` at a training step (``_compute_gumbel_tau_inverse``): ``10^-start``
    before ``curriculum_start``, log-linear to ``10^-end`` at ``curriculum_end``,
    then ``10^10`` (the argmax)."""
    start, end = cfg.tau_log10_start, cfg.tau_log10_end
    if step < cfg.curriculum_start:
        log10_tau = start
    elif step < cfg.curriculum_end:
        frac = (step - cfg.curriculum_start) / (cfg.curriculum_end - cfg.curriculum_start)
        log10_tau = start + frac * (end - start)
    else:
        log10_tau = -10.0
    return 10.0 ** (-log10_tau)


def gamma_range(vocab_size: int, alpha_high: float = 0.99, alpha_low: float = 0.02) -> tuple[float, float]:
    """``(gamma_min, gamma_max)`` with ``T(gamma_min) = alpha_high`` and
    ``T(gamma_max) = alpha_low`` for this vocabulary (bisection on the exact
    operator): the Duo code's ``[-3.5, -1.75]`` is ~``[0.93, 0.07]`` at K = 50257
    and would be ~``[0.996, 0.46]`` at K = 256."""
    def solve(target):
        lo, hi = -30.0, 60.0  # alpha(lo) ~ 1, alpha(hi) ~ 0; alpha decreases in gamma
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            a = float(gamma_to_alpha(torch.tensor([mid], dtype=torch.float64), vocab_size)[0])
            lo, hi = (mid, hi) if a > target else (lo, mid)
        return 0.5 * (lo + hi)

    if not 0 < alpha_low < alpha_high < 1:
        raise ValueError(f"duo_fast: need 0 < alpha_low < alpha_high < 1, got {alpha_low}, {alpha_high}")
    return solve(alpha_high), solve(alpha_low)


def q_sample(x0: torch.Tensor, alpha: torch.Tensor, vocab_size: int, generator: torch.Generator | None = None):
    """``z_t ~ q(z_t | x0) = alpha onehot(x0) + (1 - alpha)/K`` exactly: keep x0
    with probability alpha, else a uniform id (``UniformState.q_xt``)."""
    alpha = alpha.reshape(alpha.shape[0], *([1] * (x0.dim() - 1)))
    gen_device = generator.device if generator is not None else x0.device
    u = torch.rand(x0.shape, generator=generator, device=gen_device, dtype=torch.float64).to(x0.device)
    other = torch.randint(0, vocab_size, x0.shape, generator=generator, device=gen_device).to(x0.device)
    return torch.where(u < alpha, x0, other)


# ----------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------


def _denoise_loss(model, x_in, z, x0, alpha, dalpha, linear_loss: bool):
    sigma = (-torch.log(alpha)).float()
    if linear_loss:
        hidden, out = model(x_in, sigma, return_hidden=True)
        return linear_usdm_loss(hidden, out.weight, out.bias, z, x0, alpha, dalpha)
    logits = model(x_in, sigma)
    return usdm_loss(logits, z, x0, alpha, dalpha, inplace_grad=torch.is_grad_enabled() and logits.requires_grad)


def duo_loss(model: torch.nn.Module, x0: torch.Tensor, step: int, cfg: DuoConfig, *,
             generator: torch.Generator | None = None) -> LossOutput:
    """The Duo training loss of a batch ``x0 [B, L]`` at training ``step``.

    While ``step <= cfg.curriculum_end``: the curriculum input (exact tempered
    softmax by :func:`duo_fast.curriculum_embed`, or top-k by
    :func:`duo_fast.curriculum_topk_embed`) with the model's own embedding
    matrix, its ``z_t``, the Duo schedule and :func:`duo_fast.usdm_loss`
    (``inplace_grad``). After: ``z_t ~ q(z_t | x0)`` with the plain schedule
    and the same loss. ``generator`` drives every random draw (t, noise, z_t),
    so a per-rank generator gives per-rank noise."""
    if x0.dim() != 2 or x0.dtype != torch.int64:
        raise ValueError(f"duo_fast: x0 must be int64 token ids [B, L], got {x0.dtype} {tuple(x0.shape)}")
    K = cfg.vocab_size
    t = sample_t(x0.shape[0], eps=cfg.sampling_eps, antithetic=cfg.antithetic, generator=generator, device=x0.device)
    if step <= cfg.curriculum_end:
        gamma, alpha, dalpha = duo_levels(t, K, cfg.gamma_min, cfg.gamma_max)
        it = inv_tau(step, cfg)
        E = unwrap(model).embedding
        if E.shape[0] != K:
            raise ValueError(f"duo_fast: model.embedding has {E.shape[0]} rows, expected vocab_size = {K}")
        if cfg.curriculum == "exact":
            h, z = curriculum_embed(x0, gamma, it, E, generator=generator)
        else:
            h, z = curriculum_topk_embed(x0, gamma, it, cfg.top_k, E, zt_rule=cfg.zt_rule, generator=generator)
        per_token = _denoise_loss(model, h, z, x0, alpha, dalpha, cfg.linear_loss)
        info = {"phase": "curriculum", "inv_tau": it}
    else:
        alpha, dalpha = noise_levels(t, cfg.noise, cfg.noise_eps)
        z = q_sample(x0, alpha, K, generator)
        per_token = _denoise_loss(model, z, z, x0, alpha, dalpha, cfg.linear_loss)
        info = {"phase": "elbo"}
    return LossOutput(per_token.mean(), per_token, t, info)


def dcd_dt(round: int, cfg: DCDConfig, step: int | None = None) -> float:
    """The DCD step ``dt`` (``Distillation._compute_dt``): ``2^round / T``, or with
    ``linear_growth`` ``min + (max - min) step / max_steps``."""
    if cfg.linear_growth:
        if step is None:
            raise ValueError("duo_fast: linear_growth needs the step")
        return cfg.linear_growth_min + step / cfg.max_steps * (cfg.linear_growth_max - cfg.linear_growth_min)
    return 2.0 ** round / cfg.T


def dcd_loss(student: torch.nn.Module, teacher: torch.nn.Module, x0: torch.Tensor, round: int, cfg: DCDConfig, *,
             step: int | None = None, generator: torch.Generator | None = None) -> LossOutput:
    """The DCD loss of a batch: ``KL`` between the student at ``(z_t, t)`` and the
    teacher at ``(z_s, s = t - dt)`` on one Gaussian trajectory (coupled pair of
    :func:`duo_fast.sample_zt`), by :func:`duo_fast.distill_kl` (gradient to the
    student only)."""
    K = cfg.vocab_size
    dt = dcd_dt(round, cfg, step)
    t = sample_t(x0.shape[0], eps=cfg.sampling_eps, antithetic=cfg.antithetic, generator=generator, device=x0.device)
    t = torch.clamp(t + dt, 0, 1)
    gamma_t, alpha_t, _ = duo_levels(t, K, cfg.gamma_min, cfg.gamma_max)
    gamma_s, alpha_s, _ = duo_levels(t - dt, K, cfg.gamma_min, cfg.gamma_max)
    z_t, z_s = sample_zt(x0, gamma_t, K, gamma_s=gamma_s, generator=generator)
    student_logits = student(z_t, (-torch.log(alpha_t)).float())
    with torch.no_grad():
        teacher_logits = teacher(z_s, (-torch.log(alpha_s)).float())
    student_logits = student_logits.float()
    kl = distill_kl(student_logits, teacher_logits.float(), cfg.direction,
                    inplace_grad=torch.is_grad_enabled() and student_logits.requires_grad)
    return LossOutput(kl.mean(), kl, t, {"phase": "dcd", "dt": dt, "round": round})


# ----------------------------------------------------------------------------------
# Teacher bookkeeping
# ----------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's floating parameters:
    ``shadow <- decay shadow + (1 - decay) param`` after every ``update``."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0 <= decay <= 1:
            raise ValueError(f"duo_fast: decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.shadow = [p.detach().clone() for p in unwrap(model).parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, unwrap(model).parameters()):
            s.lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, unwrap(model).parameters()):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


@torch.no_grad()
def refresh_teacher(teacher: torch.nn.Module | None, student: torch.nn.Module, ema: EMA | None = None) -> torch.nn.Module:
    """The teacher for a new DCD round (``_maybe_update_teacher_weights``): a copy
    of the student's weights, or of its EMA when given. Creates the teacher
    (a deep copy, in eval mode, no grad) when ``teacher`` is None."""
    student = unwrap(student)
    if teacher is None:
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if ema is not None:
        ema.copy_to(teacher)
    else:
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.copy_(s)
    return teacher
