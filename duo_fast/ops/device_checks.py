"""check_device_errors: raise now the invalid values the CUDA kernels found
(docs/bad_values.md)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)


def check_device_errors(device: torch.device | str | int | None = None) -> None:
    """Raise now the invalid values that duo_fast's CUDA kernels found on
    ``device`` (default: the current CUDA device), instead of at the next
    duo_fast CUDA call: waits for the device (one synchronization) and raises a
    RuntimeError naming the arguments (invalid ids or levels, logits rows with
    no distribution). A no-op for CPU (and meta) devices, whose ops raise at the
    call, and, with no argument, on a machine without a CUDA device. An explicit
    CUDA device where none is available raises.
    :func:`duo_fast.generate` calls it before returning its tokens."""
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda")
    device = torch.device(device)
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise RuntimeError(f"duo_fast: check_device_errors: expected an available CUDA device, got "
                           f"device={str(device)!r} on a machine where torch.cuda.is_available() is False")
    torch.ops.duo_fast.check_device_errors.default(torch.empty(0, device=device))


@torch.library.register_fake("duo_fast::check_device_errors")
def _check_device_errors_fake(device_like):
    return None
