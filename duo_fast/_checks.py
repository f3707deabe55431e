"""Argument checks shared by the public wrappers: each error names the argument
and says what was expected and what was given."""

from __future__ import annotations

import torch

MIN_VOCAB = 2
MAX_VOCAB = 1 << 24  # mirrors duo_fast::kMaxVocab (csrc/include/duo_fast/common.h)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # 3.4e38: kernels that scale by a level in float32
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # 1.2e-38: the smallest normal float32


def check_tensor(t, name: str, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"duo_fast: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"duo_fast: {name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of {names}")


ID_DTYPES = (torch.int64, torch.int32)


def token_ids(t, name: str) -> torch.Tensor:
    """Token ids as the kernels read them: int64 (like torch.nn.functional.embedding,
    int32 is accepted too and converted: an O(N) copy, no host synchronization;
    ops return integer outputs in the dtype of their input ids)."""
    check_tensor(t, name)
    if t.dtype not in ID_DTYPES:
        raise TypeError(
            f"duo_fast: {name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of int64, int32 (token ids)"
        )
    return t if t.dtype == torch.int64 else t.long()


def check_vocab(vocab_size, name: str = "vocab_size") -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"duo_fast: {name} must be an int, got {type(vocab_size).__name__}")
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"duo_fast: {name} must be in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab_size}")
    return vocab_size


def check_same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    """Every tensor of ``(name, tensor)`` pairs (None skipped) on the first one's device."""
    first = None
    for name, t in named:
        if t is None:
            continue
        if first is None:
            first = (name, t)
        elif t.device != first[1].device:
            raise ValueError(
                f"duo_fast: {name} is on {t.device}, expected {first[1].device} (the device of {first[0]}): "
                "every tensor argument must be on one device"
            )


def per_token_level(level, name: str, like: torch.Tensor, like_name: str = "x0") -> torch.Tensor:
    """A per-row ([B], [B, 1]) or per-token ([B, L]) level as a contiguous float64
    tensor of ``like``'s shape (O(N) bytes; the kernels read one value per token)."""
    check_tensor(level, name)
    if not level.is_floating_point():
        raise TypeError(f"duo_fast: {name} must be a floating tensor, got {str(level.dtype).replace('torch.', '')}")
    check_same_device((like_name, like), (name, level))
    shape = tuple(like.shape)
    rows = shape[0] if shape else 1
    if level.dim() == 1 and level.shape[0] == rows:
        level = level.reshape(rows, *([1] * (like.dim() - 1)))  # [B] -> [B, 1, ...]
    elif not (level.dim() == 0 or tuple(level.shape) == shape or tuple(level.shape) == (rows,) + (1,) * (like.dim() - 1)):
        raise ValueError(
            f"duo_fast: {name} has shape {tuple(level.shape)}; expected [B], [B, 1] or {list(shape)} for {like_name} of shape {list(shape)}"
        )
    out = torch.broadcast_to(level, shape)
    return out.to(torch.float64).contiguous()


def check_real(value, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
               why: str = "") -> float:
    """A Python real in [lo, hi] (open ends where asked), as a float; ``why`` says
    where the range comes from."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"duo_fast: {name} must be a float, got {type(value).__name__}")
    v = float(value)
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        num = lambda x: repr(float(x)) if len(repr(float(x))) <= 8 else f"{x:.4g}"  # noqa: E731
        interval = f"{'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"
        raise ValueError(f"duo_fast: {name} must be in {interval}{f' ({why})' if why else ''}, got {value!r}")
    return v


# ---- command-line arguments (argparse types: errors name the flag, the range and the text) ----


def _interval(lo, hi, lo_open=False, hi_open=False) -> str:
    if hi is None:
        return f" {'>' if lo_open else '>='} {lo}" if lo is not None else ""
    if lo is None:
        return f" {'<' if hi_open else '<='} {hi}"
    return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _arg_type(convert, kind: str, lo, hi, lo_open: bool = False, hi_open: bool = False):
    """An argparse ``type``: ``convert(text)``, finite, in the interval (None: unbounded)."""

    def parse(text: str):
        import argparse
        import math

        want = f"expected {kind}{_interval(lo, hi, lo_open, hi_open)}"
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{want}, got {text!r}") from None
        ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (
            hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"{want}, got {text!r}")
        return v

    return parse


def arg_int(lo: int | None = None, hi: int | None = None):
    """An argparse ``type``: an integer in [lo, hi] (None: unbounded)."""
    return _arg_type(int, "an integer", lo, hi)


def arg_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse ``type``: a finite float in the interval (open ends where asked)."""
    return _arg_type(float, "a finite number", lo, hi, lo_open, hi_open)


def writable_dir(path, flag: str) -> None:
    """Create folder ``path`` (and its parents) if needed and check that a file can be
    written in it: an error naming ``flag`` up front, not after the work."""
    import os
    import tempfile
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SystemExit(f"error: {flag} {str(p)!r} exists and is not a folder: expected a folder to write into")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SystemExit(f"error: {flag} {str(p)!r}: expected a folder duo_fast can create and write into, got "
                         f"{type(e).__name__}: {e.strerror or e}") from None


def check_temperature(temperature) -> float:
    """1/temperature scales the logits in float32 (sample_step, canvas_step,
    softmax_embed; csrc/include/duo_fast/device_check.h valid_temperature): it must be a finite, normal float32 (below 1/FLT_MAX the scale is inf
    and the row's max gives 0 * inf = NaN; above 1/FLT_MIN it flushes to 0 and a -inf
    logit gives NaN)."""
    return check_real(temperature, "temperature", 1.0 / FLOAT32_MAX, 1.0 / FLOAT32_TINY,
                      why="1/temperature scales the logits in float32: a finite, normal float32")
