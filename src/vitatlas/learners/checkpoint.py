"""One checkpoint/resume mechanism for every learner that trains in steps (DBK-SVD, the SAE trainer).

A checkpoint directory holds ``state-<step>.safetensors`` (every tensor: parameters, optimizer
moments, generator states, counters) and ``state.json`` (format, the learner's identity — options
and a data fingerprint — step and position, histories, the name of the tensor file). The tensors are
written first, then the JSON, both atomically: the JSON is the commit point, so a run killed at any
moment leaves either the previous checkpoint or the new one, never a mix. Older tensor files are
removed after the commit.

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> ck = Checkpoint(tmp.name, "demo-checkpoint", "demo checkpoint")
    >>> ck.exists()
    False
    >>> ck.save(3, {"w": torch.ones(2)}, {"identity": {"seed": 0}, "history": [0.5]})
    >>> meta, tensors = ck.load({"seed": 0})
    >>> meta["step"], tensors["w"].tolist()
    (3, [1.0, 1.0])
    >>> ck.load({"seed": 1})
    Traceback (most recent call last):
    ...
    vitatlas.errors.VitatlasError: demo checkpoint in ... was made with other options or other data: ...
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import VitatlasError
from ..io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json

STATE = "state.json"
# options that say where a run trains and how often it saves, not what it computes: a checkpoint made with
# other values of these resumes (a CPU checkpoint on a GPU, a different --checkpoint-every)
RUN_ONLY_OPTIONS = ("device", "checkpoint_every")


def resume_options(config: dict) -> dict:
    """The options a checkpoint must match to be resumed: ``config`` without ``RUN_ONLY_OPTIONS``."""
    return {k: v for k, v in config.items() if k not in RUN_ONLY_OPTIONS}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


class Checkpoint:
    """A checkpoint directory (see module docstring); ``kind`` is the format tag it must carry."""

    def __init__(self, directory: str | Path, kind: str, what: str):
        self.dir, self.kind, self.what = Path(directory), kind, what

    def exists(self) -> bool:
        return (self.dir / STATE).exists()

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write the tensors, then commit ``meta`` (+ format, step, file name) as state.json."""
        name = f"state-{step:09d}.safetensors"
        atomic_save_safetensors(self.dir / name, tensors)
        atomic_write_json(self.dir / STATE, {"format": self.kind, **meta, "weights": name, "step": step})
        for old in self.dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self, identity: Any, *,
             mismatch: Callable[[Any], str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """(meta, tensors) of the committed checkpoint; refuses one whose ``identity`` differs.

        mismatch(saved_identity) -> message, to say what differs (default: other options or other data).
        """
        meta = read_json(self.dir / STATE, what=self.what)
        if not isinstance(meta, dict) or meta.get("format") != self.kind or "weights" not in meta:
            raise VitatlasError(f"{self.dir / STATE} is not a {self.what}; delete {self.dir} to start over")
        if meta.get("identity") != _jsonable(identity):
            default = (f"{self.what} in {self.dir} was made with other options or other data: use the same ones to "
                       f"resume, or delete {self.dir} to start over")
            raise VitatlasError(mismatch(meta.get("identity")) if mismatch else default)
        tensors = load_safetensors(self.dir / str(meta["weights"]), what=f"{self.what} weights")
        return meta, tensors
