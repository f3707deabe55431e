"""Pure-PyTorch float64 oracle for every section of docs/math.md.

Slow and memory-hungry on purpose: each function is written the obvious way,
straight from the equations, so that the fused kernels can be tested against
it. Everything is computed in float64 (float32 inputs are upcast) and returned
in float64 unless stated. Random draws come from a `torch.Generator` (None:
the global generator of the tensor's device).

Reference code: github.com/s-sahoo/duo (`algo.py`, `trainer_base.py`,
`utils.py`). Only torch and math are imported at module level; scipy is
imported lazily by the quadrature routines.

One module per op family, named as the op (``duo_fast/reference/<op>.py``); every
public name is re-exported here.
"""

from ._common import DUO_GAMMA_MAX, DUO_GAMMA_MIN, SAMPLING_EPS, SCHEDULE_EPS, TRAIN_T_EPS
from .canvas_step import canvas_argmax, canvas_entropy, canvas_probs, canvas_step
from .curriculum_embed import curriculum_embed, curriculum_embed_dense
from .curriculum_topk import TopKDraws, curriculum_topk, curriculum_topk_embed, draw_topk
from .distill_kl import distill_kl
from .gamma_to_alpha import cosine_alpha, gamma_schedule, gamma_to_alpha, loglinear_alpha, pt_from_gamma
from .linear_distill_kl import linear_distill_kl
from .linear_sample_step import guided_posterior, linear_sample_step
from .linear_usdm_loss import linear_usdm_loss
from .generation import generate, psi_kappas, schedule_alpha
from .sample_step import nucleus_filter, posterior, sample_categorical, sample_step
from .sample_zt import coupled_joint_law, latent_marginal, sample_zt, sample_zt_dense, sample_zt_o1
from .softmax_embed import softmax_embed
from .usdm_loss import usdm_loss, usdm_loss_from_log_probs, usdm_loss_value

__all__ = [
    "DUO_GAMMA_MAX",
    "DUO_GAMMA_MIN",
    "SAMPLING_EPS",
    "SCHEDULE_EPS",
    "TRAIN_T_EPS",
    "TopKDraws",
    "canvas_argmax",
    "canvas_entropy",
    "canvas_probs",
    "canvas_step",
    "cosine_alpha",
    "coupled_joint_law",
    "curriculum_embed",
    "curriculum_embed_dense",
    "curriculum_topk",
    "curriculum_topk_embed",
    "distill_kl",
    "draw_topk",
    "gamma_schedule",
    "gamma_to_alpha",
    "generate",
    "guided_posterior",
    "latent_marginal",
    "linear_distill_kl",
    "linear_sample_step",
    "linear_usdm_loss",
    "loglinear_alpha",
    "nucleus_filter",
    "posterior",
    "psi_kappas",
    "pt_from_gamma",
    "sample_categorical",
    "sample_step",
    "sample_zt",
    "sample_zt_dense",
    "sample_zt_o1",
    "schedule_alpha",
    "softmax_embed",
    "usdm_loss",
    "usdm_loss_from_log_probs",
    "usdm_loss_value",
]
