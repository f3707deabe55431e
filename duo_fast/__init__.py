"""duo_fast: fast CPU and CUDA kernels for uniform-state discrete diffusion
language models (the Diffusion Duality / Duo family), as PyTorch custom ops.

    import duo_fast
    alpha, dalpha_dgamma = duo_fast.gamma_to_alpha(gamma, vocab_size=50257)

``duo_fast.reference`` holds the pure-PyTorch float64 versions of every op
(the oracle of the tests); ``duo_fast.build_info()`` says which backends and
CUDA architectures were compiled in.
"""

from __future__ import annotations

# torch first: _C needs torch's libraries (libc10, libtorch_cpu, and for a CUDA build
# libtorch_cuda, libc10_cuda, libcudart) and has no RUNPATH of its own to find them;
# importing torch loads them, and _C's dependencies resolve to those by soname.
import torch  # noqa: F401

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "duo_fast's compiled extension (duo_fast._C) is missing or failed to load: "
        "build it with `pip install --no-build-isolation -e .` (see README.md). "
        f"Original error: {e}"
    ) from e

from . import reference, sampling
from .ops import (
    check_device_errors,
    curriculum_embed,
    curriculum_topk,
    curriculum_topk_embed,
    distill_kl,
    gamma_to_alpha,
    linear_usdm_loss,
    posterior,
    sample_step,
    sample_zt,
    usdm_loss,
)
from .sampling import generate

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """Backends compiled in: {'version', 'cpu', 'cuda', 'cuda_archs', 'cuda_version',
    'torch_version', 'openmp'}; 'cuda' is True for a CUDA build even where no GPU
    is visible (kernels then run only once a device is present)."""
    return dict(_C.build_info())


__all__ = [
    "build_info",
    "check_device_errors",
    "curriculum_embed",
    "curriculum_topk",
    "curriculum_topk_embed",
    "distill_kl",
    "gamma_to_alpha",
    "generate",
    "linear_usdm_loss",
    "posterior",
    "reference",
    "sample_step",
    "sample_zt",
    "sampling",
    "usdm_loss",
]
