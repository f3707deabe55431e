"""Seeds for the counter-based (Philox) kernels (SPEC section 5).

Every random op takes either an explicit integer ``seed`` (outputs are then a
pure function of the seed and the inputs: identical on CPU with any thread
count and on CUDA) or a ``torch.Generator`` (default: the global generator of
the tensors' device). From a generator the op draws a fresh 63-bit Philox key,
which advances the generator: ``torch.manual_seed`` makes runs reproducible and
two calls never share a stream (keys collide with probability 2^-63).
"""

from __future__ import annotations

import torch


def philox_seed(device: torch.device, generator: torch.Generator | None, seed: int | None) -> int:
    if seed is not None:
        if generator is not None:
            raise ValueError("duo_fast: pass either seed or generator, not both")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"duo_fast: seed must be an int, got {type(seed).__name__}")
        if not -(1 << 63) <= seed < (1 << 64):
            raise ValueError(f"duo_fast: seed must fit in 64 bits, got {seed}")
        return seed - (1 << 64) if seed >= (1 << 63) else seed  # the schema's int is signed
    if generator is not None:
        if generator.device.type != device.type:
            raise ValueError(f"duo_fast: generator is on {generator.device}, tensors on {device}")
        gen_device = generator.device
    else:
        gen_device = torch.device("cpu") if device.type == "cpu" else device
    # randint's bound is exclusive and must fit in int64: draw 63 bits.
    return int(torch.randint(0, (1 << 63) - 1, (1,), dtype=torch.int64, generator=generator, device=gen_device).item())
