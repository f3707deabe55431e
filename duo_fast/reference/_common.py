"""Constants of the reference configuration and helpers shared by the oracle's modules."""

import math

import torch


_F64 = torch.float64
_LOG_2PI = math.log(2.0 * math.pi)

# Defaults of the reference configuration.
DUO_GAMMA_MIN = -3.5    # configs/algo/duo.yaml curriculum.gamma_min (LM1B)
DUO_GAMMA_MAX = -1.75   # configs/algo/duo.yaml curriculum.gamma_max
SCHEDULE_EPS = 1e-3     # configs/noise/{log-linear,cosine}.yaml: eps
SAMPLING_EPS = 1e-5     # trainer_base generate_samples(eps=1e-5): last t
TRAIN_T_EPS = 1e-3      # configs/config.yaml training.sampling_eps: t ~ U[eps, 1]


def _f64(v, device=None):
  """float64 tensor; Python numbers are converted without a float32 detour."""
  if isinstance(v, torch.Tensor):
    return v.to(device=device or v.device, dtype=_F64)
  return torch.tensor(v, dtype=_F64, device=device)


def _per_token(v, like):
  """Broadcast a level given as scalar, [B], [B, 1] or [B, L] to like's [B, L].

  A 1-D tensor is per batch row (docs/math.md §0), not per position.
  """
  v = _f64(v, like.device)
  if v.ndim == 1 and like.ndim >= 2:
    v = v.reshape(v.shape[0], *([1] * (like.ndim - 1)))
  return v.expand(like.shape)


def _uniform_open(shape, generator, device):
  """Uniform on (0, 1) from 53 random bits: (n + 1/2) / 2^53."""
  n = torch.randint(0, 2 ** 53, shape, generator=generator, device=device)
  return (n.to(_F64) + 0.5) * 2.0 ** -53


def _scales(gamma):
  """Gaussian signal / noise scales a~ = sqrt(sigmoid(-gamma)), s~ = sqrt(sigmoid(gamma))."""
  return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def _ndtri_upper(log_v):
  """Phi^-1(V) from log V, accurate for V near 1: -Phi^-1(1 - V)."""
  return -torch.special.ndtri(-torch.expm1(log_v))
