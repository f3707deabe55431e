"""The launcher of the Duo drop-in::

    python -m duo_fast.integrations.duo [options] path/to/duo/main.py [hydra overrides]
    duo-fast duo [options] path/to/duo/main.py [hydra overrides]

It imports the Duo code's modules from ``main.py``'s folder, patches them
(:func:`duo_fast.integrations.duo.patch`) and runs the unmodified ``main.py``
as ``__main__`` with the overrides. Besides the patch it takes care of what a
user of that ``main.py`` meets (docs/duo.md has the walk-through):

* ``wandb``: the Duo config always builds a W&B logger. Without the ``wandb``
  package, and with no ``wandb...`` override given, the launcher adds
  ``wandb=null`` and says so.
* ``algo=distillation``: the pinned ``configs/algo/distillation.yaml`` has no
  ``curriculum`` block, which ``DUO.__init__`` (Distillation's parent) reads.
  Where the chosen algo's yaml lacks it, the launcher adds it
  (``+algo.curriculum.<key>=...``, :data:`DISTILLATION_CURRICULUM`: the block of
  ``duo.yaml`` with distillation.yaml's own ``gamma_min``, ``gamma_max``,
  temperatures, ``curriculum_start/end`` and ``integral_cache_path``), each key
  unless given.
* ``--cpu``, the CPU try-out: adds ``trainer.accelerator=cpu``,
  ``trainer.devices=1`` and ``data.cache_dir=<cwd>/duo_fast_data`` (the default
  is a cluster path) unless given, and ``eval.gen_ppl_eval_model_name_or_path``
  = the data tokenizer when that is a local folder and no eval model is given
  (the default ``gpt2-large`` is a download); ``dataloader.get_dataloaders``
  checks its batch-size identity with ``trainer.devices`` in place of
  ``torch.cuda.device_count()`` (0 without CUDA, so the check always failed),
  and ``metrics.Metrics.record_generative_perplexity`` keeps the eval model on
  the CPU (``main.py``'s ``sample_eval`` passes the device where that method
  takes ``retokenize``, so the eval model went to ``'cuda'`` unless its path
  named ``llama2``).
* DDP: Lightning starts the other ranks by re-running ``sys.argv``. The
  launcher runs ``main.py`` with ``sys.argv[0]`` = ``duo_relaunch.py`` (beside
  this file) and its own options in ``$DUO_FAST_DUO_LAUNCH``, so every rank
  runs patched (running ``main.py`` itself there would train rank 0 patched and
  the others not).

Every override the launcher adds is logged, and nothing the user wrote is
changed.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import importlib.util
import json
import logging
import os
import sys
import types
from pathlib import Path

import torch

from ._patching import check_parts
from .duo import _NEEDS, _SYS_NAMES, _ZT_RULES, PARTS, Patch, patch

log = logging.getLogger("duo_fast.integrations.duo")

ENV_VAR = "DUO_FAST_DUO_LAUNCH"
RELAUNCH = Path(__file__).with_name("duo_relaunch.py")

# configs/algo/duo.yaml's curriculum block, with configs/algo/distillation.yaml's own
# values where it has them (under other names, which no code reads).
DISTILLATION_CURRICULUM = (
    ("mode", "simple"),
    ("gumbel_tau_log10_start", "${algo.gumbel_tau_log10_start}"),
    ("gumbel_tau_log10_end", "${algo.gumbel_tau_log10_end}"),
    ("start", "${algo.curriculum_start}"),
    ("end", "${algo.curriculum_end}"),
    ("gamma_min", "${algo.gamma_min}"),
    ("gamma_max", "${algo.gamma_max}"),
    ("integral_cache_path", "${algo.integral_cache_path}"),
    ("top_k", "-1"),
    ("cache_dir", "./transform_approx_coefficients"),
    ("n_series_terms", "150"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m duo_fast.integrations.duo",
        description="Run the Duo codebase's unmodified main.py with duo_fast patched in (docs/duo.md).",
    )
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--topk-zt-rule", default="exact", choices=_ZT_RULES,
                   help="z_t of the top-k curriculum: the exact law (default) or the reference's rule")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per chunk of the fused output layer (default: ~64 MiB of float32 logits)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU try-out: trainer.accelerator=cpu, trainer.devices=1, a local data.cache_dir; the "
                        "data loader's batch-size check and the gen-PPL eval model work without CUDA")
    p.add_argument("script", help="path to the Duo codebase's main.py")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="hydra overrides, passed on to main.py")
    return p


# ----------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------


def _key(override: str) -> str:
    """The config key an override sets (``+a.b=1``, ``++a.b=1``, ``~a.b``, ``a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def _given(overrides: list[str], key: str) -> bool:
    """Whether an override sets ``key`` or something under it."""
    return any(k == key or k.startswith(key + ".") for k in map(_key, overrides))


def _value(overrides: list[str], key: str) -> str | None:
    """The value of the last override of exactly ``key``."""
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and _key(o) == key]
    return values[-1] if values else None


def _algo_lacks_curriculum(configs: Path, overrides: list[str]) -> bool:
    """Whether the chosen algo (``algo=...``) is Distillation (which reads
    algo.curriculum through DUO.__init__) and its yaml has no curriculum block."""
    name = _value(overrides, "algo")
    if name is None:
        return False
    path = configs / "algo" / f"{name}.yaml"
    if not path.is_file():
        return False
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    return cfg.get("name") == "distillation" and "curriculum" not in cfg


def added_overrides(overrides: list[str], *, configs: Path, cpu: bool, wandb_installed: bool | None = None) -> list[str]:
    """The overrides the launcher adds to ``overrides`` (module docstring); none
    for a key the user set."""
    if wandb_installed is None:
        wandb_installed = importlib.util.find_spec("wandb") is not None
    out = []
    if not wandb_installed and not _given(overrides, "wandb"):
        out.append("wandb=null")
    if _algo_lacks_curriculum(configs, overrides):
        out += [f"+algo.curriculum.{k}={v}" for k, v in DISTILLATION_CURRICULUM if not _given(overrides, f"algo.curriculum.{k}")]
    if cpu:
        defaults = {"trainer.accelerator": "cpu", "trainer.devices": "1",
                    "data.cache_dir": str(Path.cwd() / "duo_fast_data")}
        out += [f"{k}={v}" for k, v in defaults.items() if not _given(overrides, k)]
        tok = _value(overrides, "data.tokenizer_name_or_path")
        if tok is not None and Path(tok).is_dir() and not _given(overrides, "eval.gen_ppl_eval_model_name_or_path"):
            out.append(f"eval.gen_ppl_eval_model_name_or_path={tok}")
    return out


# ----------------------------------------------------------------------------------
# CPU try-out: the two places where main.py's run assumes CUDA
# ----------------------------------------------------------------------------------


def _cpu_replacements(dataloader, metrics) -> dict:
    get_dataloaders = dataloader.get_dataloaders
    record = metrics.Metrics.record_generative_perplexity

    def get_dataloaders_cpu(config, *args, **kwargs):
        # The original asserts global batch = per-device batch x nodes x torch.cuda.device_count()
        # x accumulation; the devices of a CPU run are trainer.devices.
        devices = config.trainer.devices
        try:
            devices = int(devices) if isinstance(devices, (int, str)) else len(devices)  # a count, or a list of ids
        except (TypeError, ValueError):
            raise SystemExit(f"duo_fast --cpu: trainer.devices must be a number of devices, got {devices!r}") from None
        count = torch.cuda.device_count
        torch.cuda.device_count = lambda: devices
        try:
            return get_dataloaders(config, *args, **kwargs)
        finally:
            torch.cuda.device_count = count

    def record_generative_perplexity(self, text_samples, max_length, retokenize=True, device="cuda"):
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        return record(self, text_samples, max_length, retokenize, device)

    return {(dataloader, "get_dataloaders"): get_dataloaders_cpu,
            (metrics.Metrics, "record_generative_perplexity"): record_generative_perplexity}


# ----------------------------------------------------------------------------------
# Running main.py
# ----------------------------------------------------------------------------------


def run_script(script: str | Path, argv: list[str], *, parts=None, topk_zt_rule: str = "exact",
               chunk_size: int | None = None, cpu: bool = False) -> Patch:
    """Import the Duo modules from ``script``'s folder, patch them, run ``script``
    as ``__main__`` with ``sys.argv = [duo_relaunch.py, *argv, *added]`` (the
    added overrides: :func:`added_overrides`); returns the Patch (still active:
    the process is about to end)."""
    script = Path(script).resolve()
    if not script.is_file():
        raise SystemExit(f"duo_fast: no such script: {script}")
    folder = str(script.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    parts = check_parts(parts, PARTS)
    from .duo_reference import install_flash_attn_standin

    if install_flash_attn_standin():
        log.warning("duo_fast: flash_attn is not installed; using duo_fast's pure-PyTorch stand-in "
                    "(rotary embedding + scaled_dot_product_attention)")
    needed = sorted({m for p in parts for m in _NEEDS[p]} | {"algo"})
    for name in [_SYS_NAMES[m] for m in needed] + (["dataloader", "metrics"] if cpu else []):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise SystemExit(f"duo_fast: cannot import {name!r} from {folder}: {e}") from e
    result = patch(parts=parts, topk_zt_rule=topk_zt_rule, chunk_size=chunk_size)
    if cpu:
        result.replace_all(_cpu_replacements(sys.modules["dataloader"], sys.modules["metrics"]))
        if torch.cuda.is_available():
            log.info("duo_fast --cpu: CUDA is available, but this run uses the CPU")
    elif not torch.cuda.is_available() and not _given(argv, "trainer.accelerator"):
        log.warning("duo_fast: no CUDA device: main.py's defaults need one; try --cpu (docs/duo.md, 'CPU try-out')")
    added = added_overrides(argv, configs=script.parent / "configs", cpu=cpu)
    if added:
        log.info("duo_fast: added overrides: %s", " ".join(added))
    # The ranks Lightning's DDP starts re-run sys.argv: through duo_relaunch.py, patched as this one.
    os.environ[ENV_VAR] = json.dumps({"script": str(script), "parts": list(parts), "topk_zt_rule": topk_zt_rule,
                                      "chunk_size": chunk_size, "cpu": cpu})
    sys.argv = [str(RELAUNCH), *argv, *added]
    _run_as_main(script)
    return result


def _run_as_main(script: Path) -> None:
    """runpy.run_path(script, run_name="__main__") but for sys.argv[0], which
    run_path sets to the script for the run (so Lightning's DDP would start the
    other ranks on main.py, unpatched)."""
    code = compile(script.read_bytes(), str(script), "exec")
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=str(script), __builtins__=builtins, __spec__=None, __loader__=None,
                           __package__=None, __cached__=None)
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        sys.modules["__main__"] = saved


def _setup_logging() -> None:
    if not log.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _setup_logging()
    run_script(args.script, args.overrides, parts=[p for p in args.parts.split(",") if p],
               topk_zt_rule=args.topk_zt_rule, chunk_size=args.chunk_size, cpu=args.cpu)


def relaunch(argv: list[str]) -> None:
    """A rank started by Lightning's DDP (duo_relaunch.py): the first process's
    options from ``$DUO_FAST_DUO_LAUNCH``, ``argv`` its overrides (already with
    the ones the launcher added)."""
    opts = os.environ.get(ENV_VAR)
    if not opts:
        raise SystemExit(f"duo_fast: {RELAUNCH.name} is the re-entry of `python -m duo_fast.integrations.duo` for "
                         f"the processes Lightning starts; ${ENV_VAR} is not set: run the launcher instead")
    opts = json.loads(opts)
    _setup_logging()
    run_script(opts["script"], argv, parts=opts["parts"], topk_zt_rule=opts["topk_zt_rule"],
               chunk_size=opts["chunk_size"], cpu=opts["cpu"])
