"""Dtype sets and argument checks shared by the op wrappers of this package."""

from __future__ import annotations

import torch

from .._checks import check_real, check_same_device, check_tensor, check_vocab, per_token_level, token_ids


_FLOAT_LEVELS = (torch.float32, torch.float64)
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EMBEDDING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_ids_like(t: torch.Tensor, t_name: str, z: torch.Tensor, x0: torch.Tensor | None = None) -> None:
    """z (and x0) must have t's leading shape ([..., K] or [..., d]) and device."""
    lead = tuple(t.shape[:-1])
    for ids, name in ((z, "z"), (x0, "x0")):
        if ids is None:
            continue
        if tuple(ids.shape) != lead:
            raise ValueError(f"duo_fast: {name} has shape {tuple(ids.shape)}, expected the leading shape of {t_name}, {lead}")
        check_same_device(t, t_name, ids, name)


def _curriculum_levels(x0: torch.Tensor, gamma, inv_tau) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma and inv_tau (tensors or Python floats) as float64 levels of x0's shape."""
    # torch.full, not torch.tensor: no host-to-device copy (a synchronization on CUDA)
    as_level = lambda v: v if isinstance(v, torch.Tensor) else torch.full((), float(v), dtype=torch.float64, device=x0.device)  # noqa: E731
    return per_token_level(as_level(gamma), "gamma", x0), per_token_level(as_level(inv_tau), "inv_tau", x0)


def _check_x0_embedding(x0: torch.Tensor, embedding: torch.Tensor) -> int:
    """x0 int64 / int32 and embedding [K, d] (float32/bf16/fp16) on its device; returns K."""
    token_ids(x0, "x0")
    check_tensor(embedding, "embedding", _EMBEDDING_DTYPES)
    if embedding.dim() != 2:
        raise ValueError(f"duo_fast: embedding must be [vocab_size, d], got shape {tuple(embedding.shape)}")
    check_same_device(x0, "x0", embedding, "embedding")
    return check_vocab(embedding.shape[0], "embedding.shape[0] (the vocabulary size)")


def _logits_and_temperature(logits, temperature) -> torch.Tensor:
    """canvas_step / softmax_embed: checks logits ([..., V], float32/bf16/fp16); returns the
    temperature (a float, or per row: [B], [B, 1] or the leading shape) as float64 of
    logits' leading shape."""
    check_tensor(logits, "logits", _LOGIT_DTYPES)
    if logits.dim() < 1:
        raise ValueError("duo_fast: logits must be [..., K], got a 0-dim tensor")
    check_vocab(logits.shape[-1], "logits.size(-1) (the vocabulary size)")
    lead = logits.select(-1, 0)  # a view: the leading shape and device
    if isinstance(temperature, torch.Tensor):
        check_same_device(logits, "logits", temperature, "temperature")
        return per_token_level(temperature, "temperature", lead, "logits[..., 0]")
    t = check_real(temperature, "temperature", 0.0, float("inf"), lo_open=True, hi_open=True)
    # torch.full, not torch.tensor: no host-to-device copy (a synchronization on CUDA)
    return torch.full(lead.shape, t, dtype=torch.float64, device=logits.device)
