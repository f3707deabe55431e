"""Seeds for the counter-based (Philox) kernels (docs/math.md §5).

Every random op takes either an explicit integer ``seed`` (outputs are then a
pure function of the seed and the inputs: identical on CPU with any thread
count and on CUDA) or a ``torch.Generator`` (default: the global generator of
the tensors' device), from which the op draws a fresh 63-bit Philox key, which
advances the generator: ``torch.manual_seed`` makes runs reproducible and two
calls never share a stream (keys collide with probability 2^-63).

CPU tensors draw the key with ``torch.randint`` on the CPU generator. CUDA
tensors never read the device: the key is a hash of the CUDA generator's
(seed, offset), read on the host, and the generator's offset advances by one
Philox counter (``Generator.philox_state``, the reservation protocol of
PyTorch's own CUDA random kernels; ``get_state``/``set_state`` on older torch).
So a CUDA op makes no host-device round trip. Under CUDA graph capture a key
drawn on the host would be frozen into the graph (every replay the same
noise), so there the ops need an explicit ``seed``.

Inside torch.compile the CPU key is drawn in the graph (``.item()`` becomes an
unbacked SymInt, which the ops' ``SymInt seed`` schema arguments accept): each
call of the compiled function draws a fresh key, as in eager mode. The CUDA
path reads the generator's host state, which dynamo does not trace: pass
``seed`` there.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _default_generator(device: torch.device) -> torch.Generator:
    """The global generator of an accelerator device (CUDA)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _key_from_generator_state(generator: torch.Generator) -> int:
    """63-bit key from a Philox generator's (seed, offset), read on the host; the
    generator advances by one Philox counter (4 values)."""
    if hasattr(generator, "philox_state"):
        seed_t, offset_t, _ = generator.philox_state(4)  # CPU tensors outside capture: no synchronization
        seed, offset = int(seed_t), int(offset_t)
    else:  # older torch: the CUDA generator's state is [seed, offset] (int64) on the host
        state = generator.get_state()
        words = state.view(torch.int64)
        seed, offset = int(words[0]), int(words[1])
        words[1] += 4
        generator.set_state(state)
    return _splitmix64((seed & _MASK64) ^ _splitmix64(offset & _MASK64)) >> 1


def philox_seed(device: torch.device, generator: torch.Generator | None, seed: int | None) -> int:
    if seed is not None:
        if generator is not None:
            raise ValueError("duo_fast: pass either seed or generator, not both")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"duo_fast: seed must be an int, got {type(seed).__name__}")
        if not -(1 << 63) <= seed < (1 << 64):
            raise ValueError(f"duo_fast: seed must fit in 64 bits, got {seed}")
        return seed - (1 << 64) if seed >= (1 << 63) else seed  # the schema's int is signed
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"duo_fast: generator is on {generator.device}, tensors on {device}")
    if device.type == "cpu":
        # randint's bound is exclusive and must fit in int64: draw 63 bits.
        return int(torch.randint(0, (1 << 63) - 1, (1,), dtype=torch.int64, generator=generator).item())
    if _capturing(device):
        raise RuntimeError(
            "duo_fast: a random op under CUDA graph capture needs an explicit seed= (a key drawn from a "
            "generator would be fixed into the graph: every replay would repeat the same noise)"
        )
    return _key_from_generator_state(generator if generator is not None else _default_generator(device))
