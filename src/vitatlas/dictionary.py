"""The ``Dictionary`` interface shared by every learner, and ``vitatlas.load``.

A K-SVD dictionary, an SAE and a PCA baseline are three ways to produce the same thing: unit-norm
``atoms`` (n_atoms, d), an encoder (activations -> sparse codes) and a decoder (codes -> activations).
Evaluation, labelling, the explorer and interventions take a ``Dictionary`` and never ask which
learner made it.

A subclass implements ``_encode`` / ``_decode`` on torch tensors already validated and on the right
device, ``atoms``, ``fit`` / ``partial_fit``, and the three save hooks ``_config``, ``_state`` and
``_from_saved``. The base class gives it input checking, numpy/torch type mirroring, chunked encoding,
the sparse code form, and save/load as safetensors plus JSON.

On disk a dictionary is a directory holding ``config.json`` (learner kind, sizes, constructor options,
where it was fitted) and ``dictionary.safetensors`` (its tensors). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator, NamedTuple

import numpy as np
import torch

from .errors import VitatlasError
from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json

FORMAT = "vitatlas-dictionary"
FORMAT_VERSION = 1

# kind -> "module:Class". Resolved lazily so importing vitatlas stays fast.
LEARNERS: dict[str, str] = {
    "dbksvd": "vitatlas.learners.dbksvd:DBKSVD",
    "sae": "vitatlas.learners.sae:SAE",
    "pca": "vitatlas.learners.baselines:PCABaseline",
    "kmeans": "vitatlas.learners.baselines:KMeansBaseline",
    "random": "vitatlas.learners.baselines:RandomDictionary",
    "sklearn-dl": "vitatlas.learners.baselines:SklearnDictionaryLearning",
}

ArrayLike = Any  # numpy array, torch tensor, or anything np.asarray accepts


class SparseCodes(NamedTuple):
    """Sparse codes in fixed-width form: row i uses atoms ``indices[i]`` with weights ``values[i]``.

    indices: (n, width) int64, padded with -1 where a row uses fewer than ``width`` atoms.
    values: (n, width) float, 0 at the padded positions.
    """

    indices: torch.Tensor
    values: torch.Tensor
    n_atoms: int

    def to_dense(self) -> torch.Tensor:
        from .learners.coders import to_dense  # the coders' padded form is this one

        return to_dense(self.indices, self.values, self.n_atoms)

    @staticmethod
    def from_dense(codes: torch.Tensor) -> "SparseCodes":
        nnz = (codes != 0).sum(dim=1)
        width = int(nnz.max().item()) if codes.shape[0] else 0
        # topk on |codes| puts the non-zeros first; positions past each row's nnz are padding.
        values, indices = torch.topk(codes.abs(), k=width, dim=1) if width else (codes[:, :0], codes[:, :0].long())
        values = torch.gather(codes, 1, indices)
        pad = torch.arange(width, device=codes.device).unsqueeze(0) >= nnz.unsqueeze(1)
        indices = indices.masked_fill(pad, -1)
        values = values.masked_fill(pad, 0)
        return SparseCodes(indices, values, codes.shape[1])


# ---- input checking ------------------------------------------------------------------------------

def as_tensor(X: ArrayLike, *, d: int | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, name: str = "X", first_row: int = 0) -> torch.Tensor:
    """Check and convert activations to a 2-D finite tensor (n, d) on ``device``.

    Raises a one-line VitatlasError for: a non-numeric input, wrong number of dimensions, no rows,
    a width different from ``d``, and NaN/Inf values (naming the first bad row, offset by
    ``first_row`` so streamed batches report positions in the whole data set).
    """
    if isinstance(X, torch.Tensor):
        t = X
    else:
        try:
            arr = np.asarray(X)
            # memory-mapped stores are read-only; torch needs a writable buffer
            t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        except (TypeError, ValueError) as exc:
            raise VitatlasError(f"{name} must be a numeric array of shape (n, d); could not convert it ({exc})") from None
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise VitatlasError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.ndim != 2:
        raise _not_2d(name, tuple(t.shape))
    if t.shape[0] == 0:
        raise VitatlasError(f"{name} is empty (0 rows): pass at least one sample")
    if d is not None and t.shape[1] != d:
        raise VitatlasError(f"{name} has width {t.shape[1]} but this dictionary was fitted on width {d}")
    t = t.to(device=device, dtype=dtype)
    finite = torch.isfinite(t).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite)[0].item() + first_row
        n_bad = int((~finite).sum())
        raise VitatlasError(f"{name} has NaN or Inf values in {n_bad} row(s), first at row {bad}: clean or drop those rows first")
    return t


def _not_2d(name: str, shape: tuple) -> VitatlasError:
    hint = " (use X.reshape(1, -1) for a single sample)" if len(shape) == 1 else ""
    return VitatlasError(f"{name} must be 2-D (n_samples, d), got shape {shape}{hint}")


def is_store(X: Any) -> bool:
    from .data.store import ActivationStore  # local: avoid an import cycle
    return isinstance(X, ActivationStore)


def n_rows_and_width(X: ArrayLike) -> tuple[int, int]:
    if is_store(X):
        return X.n_rows, X.d
    shape = tuple(X.shape) if hasattr(X, "shape") else np.asarray(X).shape
    if len(shape) != 2:
        raise _not_2d("X", shape)
    return shape[0], shape[1]


def iter_batches(X: ArrayLike, batch_size: int, *, shuffle: bool, seed: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, drop_last: bool = False, d: int | None = None,
                 ) -> Iterator[torch.Tensor]:
    """Yield checked (batch, d) tensors from an array, a tensor or an ActivationStore.

    Shuffling is reproducible for a given ``seed`` (use a different seed per epoch). A store is
    streamed shard by shard, so data larger than RAM works.
    """
    if batch_size <= 0:
        raise VitatlasError(f"batch size must be positive, got {batch_size}")
    if is_store(X):
        for start, batch in X.iter_batches(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                           with_offsets=True):
            yield as_tensor(batch, d=d, device=device, dtype=dtype, first_row=start if not shuffle else 0)
        return
    n, _ = n_rows_and_width(X)
    if n == 0:
        raise VitatlasError("X is empty (0 rows): pass at least one sample")
    order = np.random.default_rng(seed).permutation(n) if shuffle else None
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    for start in range(0, stop, batch_size):
        rows = slice(start, min(start + batch_size, n)) if order is None else order[start:start + batch_size]
        if isinstance(X, torch.Tensor):
            chunk = X[rows] if order is None else X[torch.as_tensor(rows, device=X.device)]
        else:
            chunk = np.asarray(X)[rows]
        yield as_tensor(chunk, d=d, device=device, dtype=dtype, first_row=start if order is None else 0)


def rows_of(X: ArrayLike, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of an array, a tensor or an ActivationStore, as a float32 numpy array."""
    if is_store(X):
        return X.rows(ids)
    if isinstance(X, torch.Tensor):
        return X[torch.as_tensor(ids, device=X.device)].detach().float().cpu().numpy()
    return np.asarray(np.asarray(X)[ids], dtype=np.float32)


def data_fingerprint(X: ArrayLike, n: int, d: int) -> str:
    """SHA-256 of the shape and of up to 256 rows from each end: enough to refuse another data set."""
    h = hashlib.sha256(f"{n}x{d}".encode())
    m = min(n, 256)
    for ids in (np.arange(m), np.arange(n - m, n)):
        h.update(np.ascontiguousarray(rows_of(X, ids), dtype=np.float32).tobytes())
    return h.hexdigest()


# ---- the interface -------------------------------------------------------------------------------

class Dictionary(ABC):
    """Atoms + encoder + decoder. See the module docstring for what subclasses implement."""

    kind: ClassVar[str]
    n_atoms: int
    d: int | None = None  # set by fit/partial_fit/load
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    encode_batch_size: int = 4096
    fit_info: dict  # where the dictionary was fitted (store manifest summary), set by record_fit_source

    # -- what subclasses implement -----------------------------------------------------------------
    @property
    @abstractmethod
    def atoms(self) -> torch.Tensor:
        """(n_atoms, d) unit-norm atoms (rows)."""

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) checked tensor on self.device -> dense codes (B, n_atoms)."""

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Dense codes (B, n_atoms) -> reconstructions (B, d). Default: codes @ atoms."""
        return codes @ self.atoms

    @abstractmethod
    def fit(self, X: ArrayLike, **kwargs) -> "Dictionary":
        ...

    def partial_fit(self, X: ArrayLike) -> "Dictionary":
        raise VitatlasError(f"{type(self).__name__} does not support partial_fit")

    @abstractmethod
    def _config(self) -> dict:
        """JSON-able constructor options: ``type(self)(**_config())`` rebuilds an unfitted twin."""

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]:
        """Tensors that, with _config, restore the fitted dictionary."""

    @abstractmethod
    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore from ``_state`` output; ``meta`` is the whole saved config.json (has d, n_atoms)."""

    # -- shared behaviour --------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.d is None:
            raise VitatlasError(f"this {type(self).__name__} is not fitted yet: call fit(X) or vitatlas.load(dir) first")

    def _chunks(self, X: ArrayLike) -> Iterator[torch.Tensor]:
        self._check_fitted()
        yield from iter_batches(X, self.encode_batch_size, shuffle=False, seed=0, device=self.device,
                                dtype=self.dtype, d=self.d)

    @staticmethod
    def _mirror(X: ArrayLike, out: torch.Tensor):
        """numpy in -> numpy out; torch in -> torch out (on the input's device)."""
        if isinstance(X, torch.Tensor):
            return out.to(X.device)
        return out.cpu().numpy()

    @torch.no_grad()
    def encode(self, X: ArrayLike):
        """Dense sparse codes (n, n_atoms), same array type as X."""
        return self._mirror(X, torch.cat([self._encode(x) for x in self._chunks(X)]))

    @torch.no_grad()
    def encode_sparse(self, X: ArrayLike) -> SparseCodes:
        """Codes as (indices, values) with -1 padding: memory O(n·L0) instead of O(n·n_atoms)."""
        parts = [SparseCodes.from_dense(self._encode(x)) for x in self._chunks(X)]
        width = max(p.indices.shape[1] for p in parts)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        return SparseCodes(torch.cat([pad(p.indices, -1) for p in parts]).cpu(),
                           torch.cat([pad(p.values, 0) for p in parts]).cpu(), self.n_atoms)

    @torch.no_grad()
    def decode(self, codes: ArrayLike | SparseCodes):
        """Codes (n, n_atoms) or SparseCodes -> reconstructions (n, d)."""
        self._check_fitted()
        if isinstance(codes, SparseCodes):
            return self._decode(codes.to_dense().to(self.device, self.dtype)).cpu().numpy()
        c = as_tensor(codes, d=self.n_atoms, device=self.device, dtype=self.dtype, name="codes")
        return self._mirror(codes, self._decode(c))

    @torch.no_grad()
    def reconstruct(self, X: ArrayLike):
        """decode(encode(X)), chunked so memory stays bounded."""
        return self._mirror(X, torch.cat([self._decode(self._encode(x)) for x in self._chunks(X)]))

    def record_fit_source(self, X: ArrayLike) -> None:
        """Remember where the data came from, so a later run can refuse a store from another model."""
        if is_store(X):
            self.fit_info = X.describe()
        else:
            n, d = n_rows_and_width(X)
            self.fit_info = {"source": "array", "n_rows": int(n), "d": int(d)}

    def save(self, path: str | Path) -> Path:
        """Write config.json + dictionary.safetensors into directory ``path`` (atomically)."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(path / "dictionary.safetensors", self._state())
        atomic_write_json(path / "config.json", {
            "format": FORMAT, "version": FORMAT_VERSION, "learner": self.kind,
            "n_atoms": int(self.n_atoms), "d": int(self.d),
            "config": self._config(), "fit_info": getattr(self, "fit_info", {}),
        })
        return path

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor], device: str | None) -> "Dictionary":
        config = dict(meta.get("config", {}))
        if device is not None and "device" in config:
            config["device"] = device
        obj = cls(**config)
        obj.d = int(meta["d"])
        obj.fit_info = meta.get("fit_info", {})
        obj._load_state(tensors, meta)
        return obj

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({opts})"


def learner_class(kind: str) -> type[Dictionary]:
    if kind not in LEARNERS:
        raise VitatlasError(f"unknown learner {kind!r}: known learners are {', '.join(sorted(LEARNERS))}")
    module, _, name = LEARNERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def load(path: str | Path, device: str | None = None) -> Dictionary:
    """Load any saved dictionary (DBK-SVD, SAE, baseline) from its directory."""
    path = Path(path)
    if not path.exists():
        raise VitatlasError(f"no dictionary at {path}: the directory does not exist")
    if path.is_file():
        path = path.parent
    meta = read_json(path / "config.json", what="dictionary config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise VitatlasError(f"{path / 'config.json'} is not a vitatlas dictionary config (missing format={FORMAT!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise VitatlasError(f"{path} was saved by a newer vitatlas (format version {meta['version']}); upgrade vitatlas")
    tensors = load_safetensors(path / "dictionary.safetensors", what="dictionary weights")
    cls = learner_class(meta.get("learner", "?"))
    try:
        return cls._from_saved(meta, tensors, device)
    except KeyError as exc:
        raise VitatlasError(f"{path} is incomplete: tensor or key {exc} is missing; re-save the dictionary") from None
