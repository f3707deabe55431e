"""A small diffusion transformer (DiT) denoiser for uniform-state models, sized
for a CPU: the interface :mod:`duo_fast.training` expects.

Interface (any module with it works with duo_fast.training):

* ``model(x, sigma) -> logits [B, L, K]``, where ``x`` is token ids ``[B, L]``
  (int64) or soft input embeddings ``h [B, L, d]`` (the curriculum ops'
  output), and ``sigma = -log(alpha)`` is the noise level per row ``[B]``;
* ``model.embedding``: the ``[K, d]`` input embedding matrix (a Parameter),
  so the curriculum can be fused with it;
* optionally ``model(x, sigma, return_hidden=True) -> (hidden [B, L, d],
  output_layer)`` with ``output_layer`` an ``nn.Linear(d, K)``, so that
  :func:`duo_fast.linear_usdm_loss` never builds the logits.

The architecture: token embedding (or ``h``), rotary positions on queries and
keys, ``n_layers`` pre-norm blocks of non-causal attention
(``F.scaled_dot_product_attention``) and a GELU MLP, each modulated by the
noise level through adaLN-Zero (shift, scale and a zero-initialised gate from
an MLP of the sinusoidal embedding of ``sigma``), then a modulated final norm
and the output projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[cos(x f_i), sin(x f_i)], f_i = max_period^(-i / (dim/2)): [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotary_tables(length: int, head_dim: int, device, base: float = 10_000.0):
    """cos, sin [L, head_dim/2] of the rotary position embedding."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv[None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (x_i, x_{i + D/2}) by the position's angle: x [B, H, L, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.ada = nn.Linear(cond_dim, 6 * dim)  # adaLN-Zero: the gates start at 0 (the block is the identity)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, cos, sin):
        B, L, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(B, L, 3, self.n_heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D/H]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        x = x + gate1[:, None] * self.dropout(self.proj(a))
        return x + gate2[:, None] * self.dropout(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class DiT(nn.Module):
    """``DiT(vocab_size, hidden=128, n_layers=4, n_heads=4, cond_dim=128)``:
    ``forward(x, sigma, *, return_hidden=False)``; see the module docstring."""

    def __init__(self, vocab_size: int, *, hidden: int = 128, n_layers: int = 4, n_heads: int = 4,
                 cond_dim: int = 128, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        if hidden % n_heads or (hidden // n_heads) % 2:
            raise ValueError(f"duo_fast: hidden ({hidden}) must split into n_heads ({n_heads}) even-sized heads")
        self.vocab_size, self.hidden = vocab_size, hidden
        self.embedding = nn.Parameter(torch.randn(vocab_size, hidden) / math.sqrt(hidden))
        self.cond_dim = cond_dim
        self.time_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.blocks = nn.ModuleList(Block(hidden, n_heads, cond_dim, mlp_ratio, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.final_ada = nn.Linear(cond_dim, 2 * hidden)
        nn.init.zeros_(self.final_ada.weight)
        nn.init.zeros_(self.final_ada.bias)
        self.output = nn.Linear(hidden, vocab_size)
        nn.init.zeros_(self.output.weight)  # uniform predictions at the start
        nn.init.zeros_(self.output.bias)
        self._rotary = {}

    def _tables(self, length: int, device):
        key = (length, str(device))
        if key not in self._rotary:
            self._rotary[key] = rotary_tables(length, self.hidden // self.blocks[0].n_heads, device)
        return self._rotary[key]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *, return_hidden: bool = False):
        if x.dtype in (torch.int64, torch.int32):
            h = F.embedding(x, self.embedding)
        elif x.is_floating_point() and x.dim() == 3 and x.shape[-1] == self.hidden:
            h = x.to(self.embedding.dtype)
        else:
            raise ValueError(f"duo_fast: x must be token ids [B, L] or embeddings [B, L, {self.hidden}], "
                             f"got {x.dtype} {tuple(x.shape)}")
        sigma = sigma.reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(h.shape[0])
        if sigma.shape[0] != h.shape[0]:
            raise ValueError(f"duo_fast: sigma must have one value per row ({h.shape[0]}), got {sigma.shape[0]}")
        c = F.silu(self.time_mlp(sinusoidal(sigma, self.cond_dim)))
        cos, sin = self._tables(h.shape[1], h.device)
        for block in self.blocks:
            h = block(h, c, cos, sin)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = modulate(self.norm(h), shift, scale)
        if return_hidden:
            return h, self.output
        return self.output(h)
