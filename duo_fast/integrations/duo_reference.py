"""Find and import a checkout of the Duo codebase (github ``s-sahoo/duo``).

The tests and the benchmarks compare duo_fast with the Duo code's own
functions, called as they are. This module locates a checkout and imports its
modules by the top-level names they use for each other (``utils``,
``trainer_base``, ``algo``, ``models``), the way its ``main.py`` runs.

Where to look, in order: the ``path`` argument, ``$DUO_REFERENCE_DIR``, then
``../shared/duo-reference`` beside a source checkout of duo_fast. Nothing in
duo_fast needs the Duo code at run time; :func:`load` raises
:class:`ReferenceUnavailable` (with the reason) where it is absent or cannot be
imported, and callers skip or fall back.

``flash_attn`` cannot be built without a GPU. When it is not importable,
:func:`load` installs a pure-PyTorch stand-in (``sys.modules["flash_attn"]``,
marked ``__duo_fast_standin__``) with the three functions ``models/dit.py``
calls: ``layers.rotary.apply_rotary_emb_torch``,
``layers.rotary.apply_rotary_emb_qkv_`` and
``flash_attn_interface.flash_attn_varlen_qkvpacked_func``, written from their
documented semantics (rotary embedding of the first ``2 * cos.shape[-1]``
features in the non-interleaved layout; attention over the packed sequences
with ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ENV_VAR = "DUO_REFERENCE_DIR"
MODULES = ("utils", "models", "models.dit", "trainer_base", "algo")
_MARKER_FILES = ("algo.py", "trainer_base.py", "utils.py", "models/dit.py")


class ReferenceUnavailable(RuntimeError):
    """The Duo codebase is not found, or its modules cannot be imported here."""


def find_reference_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The first of ``path``, ``$DUO_REFERENCE_DIR`` and ``../shared/duo-reference``
    (beside duo_fast's source checkout) that holds the Duo code, or None."""
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "duo-reference")
    for c in candidates:
        if all((c / f).is_file() for f in _MARKER_FILES):
            return c.resolve()
    return None


# ----------------------------------------------------------------------------------
# flash_attn stand-in (pure PyTorch)
# ----------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_emb_torch(x, cos, sin, interleaved=False):
    """x: [B, S, H, D]; cos, sin: [S, R/2]. Rotates the first R features:
    x_rot = x * cos + rotate_half(x) * sin, with cos repeated as [cos, cos]."""
    if interleaved:
        raise NotImplementedError("duo_fast's flash_attn stand-in supports interleaved=False only")
    ro = cos.shape[-1] * 2
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]  # [S, 1, R]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]
    rotated = x[..., :ro] * cos + _rotate_half(x[..., :ro]) * sin
    return torch.cat((rotated, x[..., ro:]), dim=-1)


def _apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0):
    """In place on qkv [B, S, 3, H, D]: rotary embedding of q and k."""
    if seqlen_offsets != 0:
        raise NotImplementedError("duo_fast's flash_attn stand-in supports seqlen_offsets=0 only")
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    qkv[:, :, 0] = _apply_rotary_emb_torch(qkv[:, :, 0], cos, sin, interleaved)
    qkv[:, :, 1] = _apply_rotary_emb_torch(qkv[:, :, 1], cos_k, sin_k, interleaved)
    return qkv


def _flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """qkv: [total, 3, H, D] packed sequences delimited by cu_seqlens; returns [total, H, D]."""
    out = torch.empty_like(qkv[:, 0])
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = (qkv[s:e, i].transpose(0, 1)[None] for i in range(3))  # [1, H, S, D]
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
        out[s:e] = o[0].transpose(0, 1)
    return out


def _install_flash_attn_standin() -> None:
    try:
        import flash_attn  # noqa: F401
        import flash_attn.layers.rotary  # noqa: F401

        return
    except ImportError:
        pass
    root = types.ModuleType("flash_attn")
    root.__doc__ = "duo_fast's pure-PyTorch stand-in for flash_attn (CPU machines); see duo_fast.integrations.duo_reference"
    root.__duo_fast_standin__ = True
    layers = types.ModuleType("flash_attn.layers")
    rotary = types.ModuleType("flash_attn.layers.rotary")
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    rotary.apply_rotary_emb_torch = _apply_rotary_emb_torch
    rotary.apply_rotary_emb_qkv_ = _apply_rotary_emb_qkv_
    iface.flash_attn_varlen_qkvpacked_func = _flash_attn_varlen_qkvpacked_func
    root.layers, layers.rotary, root.flash_attn_interface = layers, rotary, iface
    sys.modules.update({
        "flash_attn": root,
        "flash_attn.layers": layers,
        "flash_attn.layers.rotary": rotary,
        "flash_attn.flash_attn_interface": iface,
    })


# ----------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------

_loaded: types.SimpleNamespace | None = None


def load(path: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """Import the Duo code's modules; returns a namespace with ``path``,
    ``algo``, ``utils``, ``trainer_base``, ``models`` and ``dit`` (its
    ``models.dit``). Idempotent: later calls return the same modules. Raises
    :class:`ReferenceUnavailable` naming what is missing."""
    global _loaded
    root = find_reference_dir(path)
    if root is None:
        raise ReferenceUnavailable(
            f"the Duo codebase was not found: set ${ENV_VAR} to a checkout of github.com/s-sahoo/duo "
            "(or place it at ../shared/duo-reference beside duo_fast's source)"
        )
    if _loaded is not None:
        if _loaded.path != root:
            raise ReferenceUnavailable(f"the Duo code is already imported from {_loaded.path}, not {root}")
        return _loaded
    for name in MODULES:  # a module of the same top-level name from elsewhere would shadow the Duo code's
        mod = sys.modules.get(name)
        file = getattr(mod, "__file__", None)
        if mod is not None and (file is None or not Path(file).resolve().is_relative_to(root)):
            raise ReferenceUnavailable(f"a module named {name!r} from {file} is already imported; it shadows {root / name}")
    _install_flash_attn_standin()
    sys.path.insert(0, str(root))
    try:
        mods = {name: importlib.import_module(name) for name in MODULES}
    except ImportError as e:
        sys.path.remove(str(root))
        raise ReferenceUnavailable(
            f"the Duo code at {root} needs a package that is not installed: {e} "
            "(pip install -r requirements-duo.txt)"
        ) from e
    _loaded = types.SimpleNamespace(
        path=root, algo=mods["algo"], utils=mods["utils"], trainer_base=mods["trainer_base"],
        models=mods["models"], dit=mods["models.dit"],
    )
    return _loaded
