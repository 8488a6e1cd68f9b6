"""What every format reader shares: reading weight files safely and checking each field by name.

Weights are read from safetensors, or with ``torch.load(weights_only=True)``: a file that needs more
(a pickled config class, a whole pickled module) is refused with how to convert it. Every tensor a
recipe uses goes through ``Fields.take``, which names the field in its one-line error when it is
missing, has the wrong shape, or holds NaN / infinite values.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch

from ..errors import VitatlasError
from ..io import load_safetensors, read_json

CONVERT_HINT = ("load it once with the library that wrote it and save its plain state dict "
                "(torch.save(model.state_dict(), 'sae.pt')), or its tensors as safetensors")


def load_torch_state(source: str | Path | bytes, what: str) -> dict[str, torch.Tensor]:
    """A torch state dict from a file (or the bytes of one), never unpickling anything but tensors."""
    buffer = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        state = torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if needed is None:
            raise VitatlasError(f"{what} is not a readable torch file: it is corrupt or truncated") from None
        raise VitatlasError(f"{what} pickles a Python object ({needed.group(1)}) that torch.load(weights_only=True) "
                            f"refuses to run: {CONVERT_HINT}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise VitatlasError(f"{what} is not a readable torch file ({type(exc).__name__}): it is corrupt or truncated") from None
    return flat_state(state, what)


def flat_state(state, what: str) -> dict[str, torch.Tensor]:
    """A dict of tensors; a checkpoint that wraps it as {"state_dict": ...} is unwrapped."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitatlasError(f"{what} is not a state dict of tensors: {CONVERT_HINT}")
    return dict(state)


def load_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """safetensors or a torch state dict, by file extension."""
    if path.suffix == ".safetensors":
        return load_safetensors(path, what=what)
    if not path.is_file():
        raise VitatlasError(f"{what} not found: {path}")
    return load_torch_state(path, f"{what} {path}")


def read_config(path: Path, what: str) -> dict:
    cfg = read_json(path, what=what)
    if not isinstance(cfg, dict):
        raise VitatlasError(f"{what} {path} is not a JSON object")
    return cfg


def read_json_line(path: Path) -> tuple[dict, bytes]:
    """saev's layout: one JSON line, then the bytes of a torch state dict."""
    if not path.is_file():
        raise VitatlasError(f"saev checkpoint not found: {path}")
    data = path.read_bytes()
    head, sep, rest = data.partition(b"\n")
    try:
        header = json.loads(head.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VitatlasError(f"{path} does not start with saev's JSON header line: it is not a saev sae.pt (an "
                            "overcomplete state dict needs --format overcomplete --kind ...)") from None
    if not sep or not isinstance(header, dict):
        raise VitatlasError(f"{path} has no state dict after its JSON header line: it is not a saev sae.pt")
    return header, rest


class Fields:
    """Named access to a checkpoint's tensors with one-line errors naming the field and the file."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str):
        self.tensors, self.where = tensors, where

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.take(name).shape)

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.tensors:
            have = ", ".join(sorted(self.tensors)) or "none"
            raise VitatlasError(f"{self.where} has no tensor {name!r} (it has: {have[:200]}): the checkpoint is "
                                "incomplete or of another architecture")
        t = self.tensors[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise VitatlasError(f"tensor {name!r} in {self.where} has shape {tuple(t.shape)}, expected {tuple(shape)}: "
                                "the checkpoint does not match its config")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise VitatlasError(f"tensor {name!r} in {self.where} holds NaN or infinite values: the checkpoint is damaged")
        return t.double() if t.is_floating_point() else t

    def matrix(self, name: str) -> tuple[int, int]:
        t = self.take(name)
        if t.ndim != 2:
            raise VitatlasError(f"tensor {name!r} in {self.where} has shape {tuple(t.shape)}, expected a matrix")
        return int(t.shape[0]), int(t.shape[1])

    def scalar(self, name: str) -> float:
        t = self.take(name)
        if t.numel() != 1:
            raise VitatlasError(f"tensor {name!r} in {self.where} has shape {tuple(t.shape)}, expected one number")
        return float(t.reshape(()))


def config_int(cfg: dict, key: str, where: str, default=None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VitatlasError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
    return value


def finite_number(value, what: str, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise VitatlasError(f"{what} must be a number, got {value!r}") from None
    if v != v or v in (float("inf"), float("-inf")) or (positive and v <= 0):
        raise VitatlasError(f"{what} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return v
