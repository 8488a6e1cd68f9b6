"""Small, safe file helpers: atomic writes, checksums, guarded safetensors/JSON reads.

Every file vitatlas writes goes to a temporary name in the same directory and is renamed into place
only when complete, so a run killed at any moment never leaves a half-written file under a real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import VitatlasError


def _temp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _replace(tmp: Path, path: Path) -> None:
    # fsync the data before the rename so a crash cannot leave a renamed but empty file.
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs and caches are fine to share read-only
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file to stream into; it appears at ``path`` only when the block ends without an error.

    fsync=False skips the flush to disk before the rename: for many small outputs that can be made again
    (card PNGs), where one fsync each would dominate the run time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
        if fsync:
            _replace(tmp, path)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> str:
    """Write ``array`` as .npy atomically and return the SHA-256 of the file written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        digest = sha256_file(tmp)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file or raise a one-line error saying which file is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise VitatlasError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VitatlasError(f"{what} {path} is corrupt (not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc})") from None


def load_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never a pickle) or raise a one-line error if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise VitatlasError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated/garbled files
        raise VitatlasError(f"{what} {path} is corrupt or truncated ({type(exc).__name__}); re-create it") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
