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
    no distribution). A no-op for CPU tensors, whose ops raise at the call.
    :func:`duo_fast.generate` calls it before returning its tokens."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type == "cpu":
        return
    torch.ops.duo_fast.check_device_errors.default(torch.empty(0, device=device))


@torch.library.register_fake("duo_fast::check_device_errors")
def _check_device_errors_fake(device_like):
    return None
