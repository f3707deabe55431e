"""The reverse process of uniform-state models (docs/math.md §4): noise schedules
for sampling, the Psi-sampler's kappa schedules and the generation loop
(``trainer_base.Diffusion.generate_samples`` of the reference), with every step
drawn by the fused :func:`duo_fast.sample_step` kernel from the denoiser's
logits (no probabilities are materialized).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

from ._checks import check_real, check_vocab
from .ops import check_device_errors, gamma_to_alpha, sample_step
from ._checks import check_temperature

SCHEDULES = ("loglinear", "cosine", "duo")
SAMPLERS = ("ancestral", "psi")
NOISE_REMOVAL = ("ancestral", "greedy", "none")

SCHEDULE_EPS = 1e-3  # configs/noise/{log-linear,cosine}.yaml: eps
SAMPLING_EPS = 1e-5  # generate_samples(eps=1e-5): the last time of the grid
DUO_GAMMA_MIN = -3.5  # configs/algo/duo.yaml curriculum.gamma_min
DUO_GAMMA_MAX = -1.75  # configs/algo/duo.yaml curriculum.gamma_max


def schedule_alpha(
    t: torch.Tensor,
    schedule: str = "loglinear",
    *,
    vocab_size: int | None = None,
    eps: float = SCHEDULE_EPS,
    gamma_min: float = DUO_GAMMA_MIN,
    gamma_max: float = DUO_GAMMA_MAX,
) -> torch.Tensor:
    """alpha(t) (float64) of a sampling schedule (trainer_base noise classes):

    * ``"loglinear"``: ``1 - (1 - eps) t``;
    * ``"cosine"``: ``1 - cos(pi/2 (1 - (1 - eps) t))``;
    * ``"duo"``: ``T(gamma_min + t (gamma_max - gamma_min))`` through
      :func:`duo_fast.gamma_to_alpha` (needs ``vocab_size``).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule == "loglinear":
        return 1.0 - (1.0 - eps) * t
    if schedule == "cosine":
        return 1.0 - torch.cos(0.5 * math.pi * (1.0 - (1.0 - eps) * t))
    if schedule == "duo":
        if vocab_size is None:
            raise ValueError('duo_fast: schedule="duo" needs vocab_size')
        return gamma_to_alpha(gamma_min + t * (gamma_max - gamma_min), check_vocab(vocab_size))[0]
    raise ValueError(f"duo_fast: schedule must be one of {SCHEDULES}, got {schedule!r}")


def time_grid(steps: int, eps: float = SAMPLING_EPS) -> torch.Tensor:
    """``linspace(1, eps, steps + 1)`` in float64: step i goes from ``ts[i]`` to
    ``ts[i + 1]`` (``_get_sampling_time_profile`` with the linear profile)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"duo_fast: steps must be an int >= 1, got {steps!r}")
    return torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)


# <kind>-<eta>: eta an unsigned decimal number; a sign, another dash (the Duo code reads the text
# after the last dash: "2e-2" would be 2 there) or trailing text is malformed.
_KAPPA_MODE = re.compile(r"(constant-remdm|constant|max-capped|max-rescale)-((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE]\+?[0-9]+)?)")


def psi_kappas(mode, alphas: torch.Tensor) -> torch.Tensor:
    """The Psi-sampler's kappa per step (``_mode_to_psi_kappas``), float64 of
    length ``len(alphas) - 1``, from the schedule's alphas on the time grid.

    ``mode``: a float in [0, 1] or a sequence of one per step, or a string:
    ``"pure-posterior"`` (1), ``"pure-pc"`` (0), ``"constant-<eta>"`` (eta),
    or the ReMDM-style ``"max-capped-<eta>"``, ``"max-rescale-<eta>"``,
    ``"constant-remdm-<eta>"``, where with ``a_t = alphas[i]``,
    ``a_s = alphas[i + 1]`` and ``sigma_max = min(eta, (1 - a_s) / a_t)``:
    max-capped ``sigma = sigma_max`` (eta where a_t = 0), max-rescale
    ``sigma = eta sigma_max`` (eta where a_t = 0), constant-remdm
    ``sigma = eta``; then ``kappa = clip(1 - sigma / (1 - a_s), 0, 1)``.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    n = alphas.numel() - 1
    if not isinstance(mode, str):
        k = torch.as_tensor(mode, dtype=torch.float64)
        if k.dim() == 0:
            k = k.expand(n)
        if k.shape != (n,):
            raise ValueError(f"duo_fast: kappa must be a float or {n} values (one per step), got shape {tuple(k.shape)}")
        if bool(((k < 0) | (k > 1) | k.isnan()).any()):
            raise ValueError("duo_fast: kappa values must be in [0, 1]")
        return k.clone()
    if mode == "pure-posterior":
        return torch.ones(n, dtype=torch.float64)
    if mode == "pure-pc":
        return torch.zeros(n, dtype=torch.float64)
    m = _KAPPA_MODE.fullmatch(mode)
    if m is None:
        raise ValueError(
            f"duo_fast: kappa mode must be 'pure-posterior', 'pure-pc', 'constant-<eta>', 'max-capped-<eta>', "
            f"'max-rescale-<eta>' or 'constant-remdm-<eta>' with eta a number >= 0, got {mode!r} (unknown kappa mode)"
        )
    kind, eta = m.group(1), float(m.group(2))
    if kind == "constant":
        return torch.full((n,), check_real(eta, f"kappa mode {mode!r}: eta", 0.0, 1.0), dtype=torch.float64)
    check_real(eta, f"kappa mode {mode!r}: eta", 0.0, math.inf, hi_open=True, why="a finite sigma")
    a_t, a_s = alphas[:-1], alphas[1:]
    sigma_max = torch.clamp((1 - a_s) / a_t, max=eta)
    if kind == "max-capped":
        sigma = torch.where(a_t == 0, torch.full_like(a_t, eta), sigma_max)
    elif kind == "max-rescale":
        sigma = torch.where(a_t > 0, sigma_max, torch.ones_like(a_t)) * eta
    else:  # constant-remdm
        sigma = torch.full_like(a_t, eta)
    return torch.clamp(1 - sigma / (1 - a_s), 0.0, 1.0)


def _progress(iterable, enabled: bool, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="duo_fast.generate", unit="step")


@torch.no_grad()
def generate(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
    length: int,
    vocab_size: int,
    *,
    steps: int,
    schedule: str = "loglinear",
    sampler: str = "ancestral",
    noise_removal: str = "ancestral",
    kappa: float | Sequence[float] | str = 1.0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    eps: float = SAMPLING_EPS,
    schedule_eps: float = SCHEDULE_EPS,
    gamma_min: float = DUO_GAMMA_MIN,
    gamma_max: float = DUO_GAMMA_MAX,
    time_input: str = "t",
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample ``[batch_size, length]`` token ids from a uniform-state model
    (the reverse loop of ``generate_samples``).

    ``z`` starts uniform on ``[0, vocab_size)``. Time grid ``ts = linspace(1,
    eps, steps + 1)``; step i calls ``denoiser(z, t)`` at ``t = ts[i]`` and draws
    ``z ~ q(z_s)`` with ``alpha_t = alpha(ts[i])``, ``alpha_s = alpha(ts[i + 1])``
    by :func:`duo_fast.sample_step`. Then at ``t = eps``: ``noise_removal=
    "ancestral"`` calls the denoiser once more and steps to ``alpha_s = 1``;
    ``"greedy"`` takes the argmax of that call's logits; ``"none"`` stops.

    ``denoiser(z [B, L] int64, t [B] float64) -> logits [B, L, K]`` is any
    callable (float32, bfloat16 or float16 logits are read as they are; float64
    is cast to float32). ``time_input="sigma"`` passes ``-log(alpha(t))``
    instead of t (what the reference's backbone receives). ``schedule``:
    ``"loglinear"``, ``"cosine"`` (their eps is ``schedule_eps``) or ``"duo"``
    (:func:`schedule_alpha`, over ``[gamma_min, gamma_max]``). ``sampler="ancestral"`` ignores ``kappa``;
    ``"psi"`` uses ``kappa`` per :func:`psi_kappas` (a float, one value per
    step, or a mode string such as ``"max-capped-0.1"``); the final
    noise-removal step is ancestral. ``temperature`` and ``top_p`` apply to
    every step. Randomness: ``generator`` (default: the global generator of
    ``device``) or ``seed`` (a fresh generator seeded with it).

    The denoiser's output is checked at every call: a tensor of shape
    ``[batch_size, length, vocab_size]`` on ``device`` with a floating dtype,
    else an error naming the shape (or dtype, device) it returned and the one
    expected. A logits row with NaN, +inf or no finite entry raises (with the
    step and time; see :func:`duo_fast.sample_step`); on CUDA the error is
    found on the device, and :func:`duo_fast.check_device_errors` raises it
    before the tokens are returned (one synchronization per call of generate).
    """
    K = check_vocab(vocab_size)
    if sampler not in SAMPLERS:
        raise ValueError(f"duo_fast: sampler must be one of {SAMPLERS}, got {sampler!r}")
    if noise_removal not in NOISE_REMOVAL:
        raise ValueError(f"duo_fast: noise_removal must be one of {NOISE_REMOVAL}, got {noise_removal!r}")
    if time_input not in ("t", "sigma"):
        raise ValueError(f"duo_fast: time_input must be 't' or 'sigma', got {time_input!r}")
    for n, name in ((batch_size, "batch_size"), (length, "length")):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"duo_fast: {name} must be an int >= 1, got {n!r}")
    device = torch.device(device)
    if seed is not None:
        if generator is not None:
            raise ValueError("duo_fast: pass either seed or generator, not both")
        generator = torch.Generator(device).manual_seed(seed)

    # Every argument is checked before the first denoiser call, also those the chosen
    # schedule / sampler does not use (a malformed value is an error wherever it is).
    temperature = check_temperature(temperature)
    top_p = check_real(top_p, "top_p", 0.0, 1.0, lo_open=True)
    eps = check_real(eps, "eps", 0.0, 1.0, lo_open=True, hi_open=True, why="the last time of the grid")
    schedule_eps = check_real(schedule_eps, "schedule_eps", 0.0, 1.0, hi_open=True,
                              why="the schedules start from alpha(1) ~ schedule_eps; at 1 no noise is left")
    gamma_min = check_real(gamma_min, "gamma_min", -math.inf, gamma_max, lo_open=True, hi_open=True,
                           why="below gamma_max, finite")
    gamma_max = check_real(gamma_max, "gamma_max", gamma_min, math.inf, lo_open=True, hi_open=True,
                           why="above gamma_min, finite")
    ts = time_grid(steps, eps)
    alphas = schedule_alpha(ts, schedule, vocab_size=K, eps=schedule_eps, gamma_min=gamma_min, gamma_max=gamma_max)
    kappas = psi_kappas(kappa, alphas)  # checked for any sampler
    if sampler != "psi":
        kappas = torch.ones(steps, dtype=torch.float64)
    # Each step starts from alpha_t < 1 (the noise-removal step from alpha(eps)): a grid
    # point whose alpha rounds to 1 has no noise left to remove.
    starts = alphas[:steps + (noise_removal != "none")]
    if bool((starts >= 1).any()):
        i = int((starts >= 1).nonzero()[0])
        culprit = "gamma_min" if schedule == "duo" else "eps"
        raise ValueError(
            f"duo_fast: the {schedule!r} schedule gives alpha = 1 at t = {float(ts[i]):.6g} (step {i}): expected "
            f"alpha(t) < 1 at every step's start; raise {culprit} (eps = {eps!r}"
            + (f", gamma_min = {gamma_min!r})" if schedule == "duo" else ")")
        )

    expected = (batch_size, length, K)

    def call(z, i):
        t = alphas.new_full((batch_size,), float(ts[i]))
        if time_input == "sigma":
            t = torch.full_like(t, -math.log(float(alphas[i])))
        logits = denoiser(z, t.to(device))
        where = f"duo_fast.generate: the denoiser's output at step {i} (t = {float(ts[i]):.6g})"
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{where} is a {type(logits).__name__}, expected a logits tensor of shape {list(expected)}")
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"{where} has shape {list(logits.shape)}, expected [batch_size, length, vocab_size] = {list(expected)}"
            )
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(
                f"{where} has dtype {str(logits.dtype).replace('torch.', '')}, expected float32, bfloat16, float16 or float64"
            )
        if logits.device != z.device:
            raise ValueError(f"{where} is on {logits.device}, expected {z.device} (device={device})")
        return logits.float() if logits.dtype == torch.float64 else logits

    def step(logits, z, i, a_s, **kw):
        try:
            return sample_step(logits, z, level(i), a_s, temperature=temperature, top_p=top_p, generator=generator, **kw)
        except RuntimeError as e:
            if "logits:" not in str(e):
                raise
            raise RuntimeError(f"duo_fast.generate: step {i} (t = {float(ts[i]):.6g}): {e}") from e

    def level(i):
        return torch.full((batch_size,), float(alphas[i]), dtype=torch.float64, device=device)

    z = torch.randint(0, K, (batch_size, length), generator=generator, device=device)
    for i in _progress(range(steps), progress, steps):
        z = step(call(z, i), z, i, level(i + 1), kappa=float(kappas[i]))
    if noise_removal == "ancestral":
        z = step(call(z, steps), z, steps, torch.ones(batch_size, dtype=torch.float64, device=device))
    elif noise_removal == "greedy":
        logits = call(z, steps)
        # The argmax of a row with NaN is that NaN's id: the rows are checked as a sampled step's
        # (on CUDA this reads one flag, as check_device_errors below synchronizes anyway).
        bad = logits.isnan().any(-1) | logits.isposinf().any(-1) | (logits.amax(-1) == -math.inf)
        if bool(bad.any()):
            raise RuntimeError(
                f"duo_fast.generate: step {steps} (greedy noise removal): logits: {int(bad.sum())} row(s) hold NaN, "
                "+inf or no finite logit: no token to pick (a diverged model?)"
            )
        z = logits.argmax(-1)
    if device.type != "cpu":
        check_device_errors(device)  # errors found on the device by the steps: raise before returning tokens
    return z
