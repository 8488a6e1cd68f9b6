"""Device strings: one check for every entry point (learners, models, evaluation, the CLI).

A CUDA device on a machine without one, ``cuda:3`` on a machine with one GPU or a typo is a one-line
error that says what to use instead, not an assertion deep inside torch.
"""

from __future__ import annotations

import torch

from .errors import VitatlasError


def check_device(device, error: type[VitatlasError] = VitatlasError) -> str:
    """Return ``device`` as a string once it names a CPU or an existing CUDA device; raise ``error`` if not."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise error(f"device must be a string such as 'cpu' or 'cuda', got {type(device).__name__} {device!r:.40}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise error(f"unknown device {device!r:.40}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise error(f"device {device!r} is not supported: use 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r} asked for but CUDA is not available on this machine: use device='cpu' "
                    "(vitatlas.load(run, device='cpu') for a saved run)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise error(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
