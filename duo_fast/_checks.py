"""Argument checks shared by the public wrappers: each error names the argument
and says what was expected and what was given."""

from __future__ import annotations

import torch

MIN_VOCAB = 2
MAX_VOCAB = 1 << 24  # mirrors duo_fast::kMaxVocab (csrc/include/duo_fast/common.h)


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


def check_same_device(a: torch.Tensor, name_a: str, b: torch.Tensor, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"duo_fast: {name_a} is on {a.device} but {name_b} is on {b.device}")


def per_token_level(level, name: str, like: torch.Tensor, like_name: str = "x0") -> torch.Tensor:
    """A per-row ([B], [B, 1]) or per-token ([B, L]) level as a contiguous float64
    tensor of ``like``'s shape (O(N) bytes; the kernels read one value per token)."""
    check_tensor(level, name)
    if not level.is_floating_point():
        raise TypeError(f"duo_fast: {name} must be a floating tensor, got {str(level.dtype).replace('torch.', '')}")
    check_same_device(like, like_name, level, name)
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


def check_real(value, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """A Python real in [lo, hi] (open ends where asked), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"duo_fast: {name} must be a float, got {type(value).__name__}")
    v = float(value)
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"duo_fast: {name} must be in {interval}, got {value}")
    return v
