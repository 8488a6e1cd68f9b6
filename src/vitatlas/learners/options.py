"""Constructor options every learner checks the same way: device and dtype."""

from __future__ import annotations

import torch

from ..errors import VitatlasError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    """'float32' / 'float64' -> torch dtype, or a one-line error."""
    if name not in DTYPES:
        raise VitatlasError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    """Check a device string; a CUDA device on a machine without one is a clear error."""
    if not isinstance(device, str):
        raise VitatlasError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VitatlasError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VitatlasError(f"device {device!r} asked for but CUDA is not available on this machine: use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise VitatlasError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise VitatlasError(f"device {device!r} is not supported: use 'cpu' or 'cuda'")
    return device
