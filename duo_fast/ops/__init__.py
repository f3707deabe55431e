"""The op wrappers over the ``torch.ops.duo_fast`` custom ops, one module per op
family (``duo_fast/ops/<op>.py``): argument checks, fake (meta) kernels for
torch.compile / FakeTensor tracing, and autograd formulas. The kernels are C++
(``csrc/cpu/<op>.cpp``) and CUDA (``csrc/cuda/<op>.cu``), the math of each in
``csrc/include/duo_fast/<op>.h``; the schemas are in ``csrc/registration.cpp``.
Every wrapper dispatches on the device of its tensors.

The math contract is ``docs/math.md``; what is checked where and what happens to
NaN, inf and out-of-range values is ``docs/bad_values.md`` (one policy for every
op), with how the ops behave under torch.compile, threads and checkpointing.
"""

from .canvas_step import canvas_step
from .curriculum_embed import curriculum_embed
from .curriculum_topk import curriculum_topk, curriculum_topk_embed
from .device_checks import check_device_errors
from .distill_kl import distill_kl
from .gamma_to_alpha import gamma_to_alpha
from .linear_distill_kl import linear_distill_kl
from .linear_sample_step import linear_sample_step
from .linear_usdm_loss import linear_usdm_loss
from .sample_step import posterior, sample_step
from .sample_zt import sample_zt
from .softmax_embed import softmax_embed
from .usdm_loss import usdm_loss

__all__ = [
    "canvas_step",
    "check_device_errors",
    "curriculum_embed",
    "curriculum_topk",
    "curriculum_topk_embed",
    "distill_kl",
    "gamma_to_alpha",
    "linear_distill_kl",
    "linear_sample_step",
    "linear_usdm_loss",
    "posterior",
    "sample_step",
    "sample_zt",
    "softmax_embed",
    "usdm_loss",
]
