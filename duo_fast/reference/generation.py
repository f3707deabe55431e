"""Oracle of generate (docs/math.md §4): sampling schedules, the Psi sampler's kappas
and the reverse loop of generate_samples."""

import torch

from ._common import DUO_GAMMA_MAX, DUO_GAMMA_MIN, SAMPLING_EPS, SCHEDULE_EPS, _F64, _f64
from .gamma_to_alpha import cosine_alpha, gamma_schedule, loglinear_alpha
from .sample_step import sample_step


def schedule_alpha(t, schedule="loglinear", *, vocab_size=None,
                   eps=SCHEDULE_EPS, gamma_min=DUO_GAMMA_MIN,
                   gamma_max=DUO_GAMMA_MAX):
  """alpha(t) of a sampling schedule: "loglinear", "cosine" or "duo"."""
  if schedule == "loglinear":
    return loglinear_alpha(t, eps)[0]
  if schedule == "cosine":
    return cosine_alpha(t, eps)[0]
  if schedule == "duo":
    return gamma_schedule(t, vocab_size, gamma_min, gamma_max)[0]
  raise ValueError(schedule)


def psi_kappas(mode, alphas):
  """trainer_base._mode_to_psi_kappas for one segment covering the whole grid:
  kappa for each step i (levels alphas[i] -> alphas[i + 1]), float64 of length
  len(alphas) - 1 (the reference appends a trailing 1 for the grid's last
  point, which no step uses). Written per step with Python floats."""
  a = [float(v) for v in _f64(alphas).flatten()]
  n = len(a) - 1
  if not isinstance(mode, str):
    k = _f64(mode).flatten()
    return (k.expand(n) if k.numel() == 1 else k).clone()
  if mode == "pure-posterior":
    return torch.ones(n, dtype=_F64)
  if mode == "pure-pc":
    return torch.zeros(n, dtype=_F64)
  eta = float(mode.split("-")[-1])
  if mode.startswith("constant-") and not mode.startswith("constant-remdm"):
    return torch.full((n,), eta, dtype=_F64)
  out = []
  for i in range(n):
    at, as_ = a[i], a[i + 1]
    cap = min(eta, (1 - as_) / at) if at != 0 else eta
    if mode.startswith("max-capped-"):
      sigma = eta if at == 0 else cap
    elif mode.startswith("max-rescale-"):
      sigma = (cap if at > 0 else 1.0) * eta
    elif mode.startswith("constant-remdm"):
      sigma = eta
    else:
      raise ValueError(mode)
    out.append(min(max(1 - sigma / (1 - as_), 0.0), 1.0))
  return torch.tensor(out, dtype=_F64)


@torch.no_grad()
def generate(denoiser, batch_size, length, vocab_size, *, steps,
             schedule="loglinear", sampler="ancestral",
             noise_removal="ancestral", kappa=1.0, top_p=1.0,
             temperature=1.0, eps=SAMPLING_EPS, schedule_eps=SCHEDULE_EPS,
             time_input="t", device="cpu", generator=None):
  """Reverse process of trainer_base.Diffusion.generate_samples for
  uniform-state models.

  Time grid: ts = linspace(1, eps, steps + 1) (float64; the reference uses
  float32). z starts uniform on [0, K). Step i = 0..steps-1 calls
  denoiser(z, t) at t = ts[i] and samples z ~ q(z_s) with
  alpha_t = alpha(ts[i]), alpha_s = alpha(ts[i+1]). Then, at t = ts[-1] = eps:
    noise_removal="ancestral": one more denoiser call and a step to alpha_s = 1;
    "greedy": z = argmax of that call's logits; "none": no call.
  So the denoiser sees steps (+1 unless "none") time values.
  denoiser(z [B, L] int64, t [B] float64) -> logits [B, L, K];
  time_input="sigma" passes -log(alpha(t)) instead (what the reference's
  backbone receives). alpha(t) is the schedule ("loglinear", "cosine",
  "duo") with its own eps = schedule_eps (configs/noise: 1e-3).
  sampler="ancestral" (kappa ignored) or "psi": kappa is a float, a
  length-`steps` sequence or a mode string of psi_kappas; the final
  noise-removal step is ancestral.
  """
  K = int(vocab_size)
  if sampler not in ("ancestral", "psi"):
    raise ValueError(sampler)
  if noise_removal not in ("ancestral", "greedy", "none"):
    raise ValueError(noise_removal)
  ts = torch.linspace(1.0, eps, steps + 1, dtype=_F64)
  kappas = torch.ones(steps, dtype=_F64)
  if sampler == "psi":
    kappas = psi_kappas(kappa, torch.stack(
      [schedule_alpha(t.reshape(1), schedule, vocab_size=K, eps=schedule_eps)[0] for t in ts]))

  def alpha(t):
    return schedule_alpha(torch.full((batch_size,), float(t), dtype=_F64),
                          schedule, vocab_size=K, eps=schedule_eps)

  def call(z, t):
    tt = torch.full((batch_size,), float(t), dtype=_F64, device=device)
    if time_input == "sigma":
      tt = -torch.log(alpha(t)).to(device)
    elif time_input != "t":
      raise ValueError(time_input)
    return denoiser(z, tt)

  z = torch.randint(0, K, (batch_size, length), generator=generator,
                    device=device)
  for i in range(steps):
    logits = call(z, ts[i])
    z = sample_step(logits, z, alpha(ts[i]).to(device),
                    alpha(ts[i + 1]).to(device), kappa=float(kappas[i]),
                    temperature=temperature, top_p=top_p,
                    generator=generator)
  if noise_removal == "ancestral":
    logits = call(z, ts[-1])
    a0 = alpha(ts[-1]).to(device)
    z = sample_step(logits, z, a0, torch.ones_like(a0),
                    temperature=temperature, top_p=top_p,
                    generator=generator)
  elif noise_removal == "greedy":
    z = call(z, ts[-1]).argmax(-1)
  return z
