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


def check_vocab(vocab_size, name: str = "vocab_size") -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"duo_fast: {name} must be an int, got {type(vocab_size).__name__}")
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"duo_fast: {name} must be in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab_size}")
    return vocab_size
