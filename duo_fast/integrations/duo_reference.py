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
import importlib.machinery
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


def install_flash_attn_standin() -> bool:
    """Register the pure-PyTorch ``flash_attn`` stand-in in ``sys.modules``
    unless a real ``flash_attn`` imports; returns whether it did."""
    try:
        import flash_attn  # noqa: F401
        import flash_attn.layers.rotary  # noqa: F401

        return False
    except ImportError:
        pass
    def module(name: str) -> types.ModuleType:
        m = types.ModuleType(name)
        # A spec, so importlib.util.find_spec("flash_attn") (transformers asks) answers
        # instead of raising; there is no distribution metadata, so it is not "installed".
        m.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        return m

    root = module("flash_attn")
    root.__doc__ = "duo_fast's pure-PyTorch stand-in for flash_attn (CPU machines); see duo_fast.integrations.duo_reference"
    root.__duo_fast_standin__ = True
    layers, rotary, iface = module("flash_attn.layers"), module("flash_attn.layers.rotary"), module("flash_attn.flash_attn_interface")
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
    return True


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
    install_flash_attn_standin()
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


# ----------------------------------------------------------------------------------
# Building the Duo code's own objects offline (tests, benchmarks)
# ----------------------------------------------------------------------------------

TINY_MODEL = ("model=tiny", "model.hidden_size=64", "model.cond_dim=32", "model.n_blocks=2", "model.n_heads=4",
              "model.length=32", "model.dropout=0.0")


def word_tokenizer(vocab_size: int, folder: str | os.PathLike):
    """A word-level fast tokenizer with exactly ``vocab_size`` ids (``t0`` ...,
    then [UNK], [PAD], [BOS], [EOS]) saved to ``folder``, so that the Duo code's
    ``AutoTokenizer.from_pretrained(folder)`` (``metrics.Metrics``) loads it
    offline."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]
    vocab = {f"t{i}": i for i in range(vocab_size - len(specials))}
    vocab.update({s: vocab_size - len(specials) + i for i, s in enumerate(specials)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


def register_resolvers() -> None:
    """The OmegaConf resolvers that the Duo code's main.py registers."""
    from omegaconf import OmegaConf

    for name, fn in (("cwd", os.getcwd), ("device_count", torch.cuda.device_count), ("eval", eval),
                     ("div_up", lambda x, y: (x + y - 1) // y)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def compose_config(ref: types.SimpleNamespace, tokenizer_dir: str | os.PathLike, overrides=(), *,
                   algo: str = "duo", model=TINY_MODEL, device: str = "cpu"):
    """The Duo code's own hydra config (``configs/config.yaml`` with ``algo/duo``,
    ``data=synthetic``, the ``model`` overrides) for ``device``, then the
    dotted ``overrides`` (``key=value``). ``tokenizer_dir`` stands in for the
    gen-PPL eval model's tokenizer. ``algo="distillation"`` merges
    ``configs/algo/distillation.yaml`` over ``algo/duo.yaml`` (the pinned
    distillation.yaml lacks the ``curriculum`` block that ``DUO.__init__``
    reads)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    base = ["algo=duo", *model, "data=synthetic", f"trainer.accelerator={device}", "trainer.devices=1",
            "loader.global_batch_size=4", "loader.num_workers=1", "training.ema=0",
            f"eval.gen_ppl_eval_model_name_or_path={tokenizer_dir}",
            f"algo.curriculum.integral_cache_path={ref.path / 'integral' / 'gpt2.pkl'}"]
    with initialize_config_dir(config_dir=str(ref.path / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=base)
    OmegaConf.set_struct(cfg, False)
    if algo == "distillation":
        dist = OmegaConf.load(ref.path / "configs" / "algo" / "distillation.yaml")
        dist.integral_cache_path = str(ref.path / "integral" / "gpt2.pkl")
        cfg.algo = OmegaConf.merge(cfg.algo, dist)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides))) if overrides else cfg
