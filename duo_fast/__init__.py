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


def _torch_mm(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _wheel_tag() -> str:
    """The local version tag of the duo_fast wheel that matches the running torch."""
    mm = _torch_mm(torch.__version__)
    cuda = torch.version.cuda
    return f"+cu{cuda.replace('.', '')}torch{mm}" if cuda else f"+cputorch{mm}"


def _check_build(path=None) -> dict | None:
    """Compare the record that the build left beside _C (_build_info.json: the torch
    and CUDA versions it was compiled against) with the running torch, before _C is
    loaded: _C uses torch's C++ ABI, which changes between torch minor versions, and
    a CUDA build links the CUDA runtime of one major version. Raises ImportError
    naming the wheel to get; returns the record (None where a build has none)."""
    import json
    from pathlib import Path

    path = Path(__file__).with_name("_build_info.json") if path is None else Path(path)
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    built, running = _torch_mm(info["torch_version"]), _torch_mm(torch.__version__)
    variant = f"CUDA {info['cuda_version']}" if info.get("cuda") else "CPU only"
    problem = None
    if built != running:
        problem = f"it was built against torch {info['torch_version']} ({variant}), but torch {torch.__version__} is installed"
    elif info.get("cuda") and not torch.version.cuda:
        problem = (f"it was built with CUDA kernels (CUDA {info['cuda_version']}) against a CUDA build of torch, "
                   f"but the installed torch {torch.__version__} is a CPU-only build")
    elif info.get("cuda") and torch.version.cuda.split(".")[0] != info["cuda_version"].split(".")[0]:
        problem = (f"it was built with CUDA {info['cuda_version']}, but the installed torch {torch.__version__} "
                   f"uses CUDA {torch.version.cuda} (the CUDA major versions must match)")
    if problem:
        spec = torch.__version__ if torch.__version__.endswith("+cpu") else torch.__version__.split("+")[0]
        raise ImportError(
            f"duo_fast {info['version']} cannot load its compiled library here: {problem}. Install the duo_fast "
            f"wheel built for this torch: duo_fast-{info['version']}{_wheel_tag()} (build it with "
            f"`tools/build_wheels.sh {spec}:{torch.version.cuda or 'cpu'}`, or "
            f"`pip install --no-build-isolation .` from the source with this torch installed), or install "
            f"torch {built}.x{' with CUDA ' + info['cuda_version'].split('.')[0] + '.x' if info.get('cuda') else ''}."
        )
    return info


_check_build()

from . import _env  # noqa: E402

_env.check()  # a malformed DUO_FAST_* variable raises here, naming it and the accepted values

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "duo_fast's compiled extension (duo_fast._C) is missing or failed to load: "
        "build it with `pip install --no-build-isolation -e .` (see README.md). "
        f"Original error: {e}"
    ) from e

from . import generation, reference
from .ops import (
    canvas_step,
    check_device_errors,
    curriculum_embed,
    curriculum_topk,
    curriculum_topk_embed,
    distill_kl,
    gamma_to_alpha,
    linear_distill_kl,
    linear_sample_step,
    linear_usdm_loss,
    posterior,
    sample_step,
    sample_zt,
    softmax_embed,
    usdm_loss,
)
from .generation import generate

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """Backends compiled in: {'version', 'cpu', 'cuda', 'cuda_archs', 'cuda_version',
    'torch_version', 'openmp'}; 'cuda' is True for a CUDA build even where no GPU
    is visible (kernels then run only once a device is present)."""
    return dict(_C.build_info())


def empty_cache() -> int:
    """Free the gradient buffers duo_fast keeps for reuse; returns the bytes freed.

    The CPU backward kernels that produce a dense [K, d] embedding gradient
    (curriculum_topk_embed, curriculum_embed) take buffers of 16 MiB and more from
    a small cache: when a gradient is freed (``optimizer.zero_grad()``, or
    ``param.grad = None``) its buffer is kept, and the next backward of the same
    shape reuses it instead of asking the kernel for fresh pages (which it must
    fault in and zero: at GPT-2's vocabulary, 147 MiB per step). At most 2 buffers
    and ``DUO_FAST_GRAD_CACHE_MB`` MiB (default 4096; 0 turns the cache off) are kept; they stay resident until reused or
    freed here. Like ``torch.cuda.empty_cache()``, this never frees memory that
    a live tensor uses. CUDA gradients use torch's own caching allocator.
    """
    return int(_C.grad_cache_empty())


def cache_info() -> dict:
    """The kept gradient buffers: {'bytes', 'buffers', 'limit_bytes'} (see empty_cache).
    Raises ValueError if DUO_FAST_GRAD_CACHE_MB is not a whole number >= 0."""
    _env.check("DUO_FAST_GRAD_CACHE_MB")
    return dict(_C.grad_cache_info())


__all__ = [
    "build_info",
    "cache_info",
    "canvas_step",
    "check_device_errors",
    "curriculum_embed",
    "curriculum_topk",
    "curriculum_topk_embed",
    "distill_kl",
    "empty_cache",
    "gamma_to_alpha",
    "generate",
    "generation",
    "linear_distill_kl",
    "linear_sample_step",
    "linear_usdm_loss",
    "posterior",
    "reference",
    "sample_step",
    "sample_zt",
    "softmax_embed",
    "usdm_loss",
]
