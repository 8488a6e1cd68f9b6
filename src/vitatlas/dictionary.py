"""The ``Dictionary`` interface shared by every learner, and ``vitatlas.load``.

A K-SVD dictionary, an SAE and a PCA baseline are three ways to produce the same thing: unit-norm
``atoms`` (n_atoms, d), an encoder (activations -> sparse codes) and a decoder (codes -> activations).
Evaluation, labelling, the explorer and interventions take a ``Dictionary`` and never ask which
learner made it.

A subclass sets ``learner`` (its key in ``LEARNERS``, written to config.json) and implements
``_encode`` / ``_decode`` on torch tensors already validated and on the right device, ``atoms``,
``fit`` / ``partial_fit``, and the save hooks ``_config`` (its options: the fields of its frozen options
dataclass), ``_state`` and ``_load_state`` (``_saved_options`` may upgrade options saved by an older
version). The base class gives it input checking, numpy/torch type mirroring, chunked encoding,
the sparse code form, and save/load as safetensors plus JSON.

On disk a dictionary is a directory holding ``config.json`` (learner, sizes, constructor options,
where it was fitted and by how many processes: ``fit_info.world_size``, absent in runs saved before it)
and ``dictionary.safetensors`` (its tensors). Nothing is ever unpickled.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch

from . import distributed
from .arrays import ArrayLike, SparseCodes, as_tensor
from .data.batches import is_store, iter_batches, n_rows_and_width
from .errors import VitatlasError
from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json

FORMAT = "vitatlas-dictionary"
FORMAT_VERSION = 1

# learner key (config.json "learner") -> "module:Class". Resolved lazily so importing vitatlas stays fast.
LEARNERS: dict[str, str] = {
    "dbksvd": "vitatlas.learners.dbksvd:DBKSVD",
    "sae": "vitatlas.learners.sae:SAE",
    "pca": "vitatlas.learners.baselines:PCABaseline",
    "kmeans": "vitatlas.learners.baselines:KMeansBaseline",
    "random": "vitatlas.learners.baselines:RandomDictionary",
    "sklearn-dl": "vitatlas.learners.baselines:SklearnDictionaryLearning",
    "imported": "vitatlas.formats.recipe:ImportedSAE",  # another library's SAE (vitatlas import)
}

# ---- the interface -------------------------------------------------------------------------------

class Dictionary(ABC):
    """Atoms + encoder + decoder. See the module docstring for what subclasses implement."""

    learner: ClassVar[str]  # registry key in LEARNERS (an SAE's family is ``SAE.family``)
    n_atoms: int
    d: int | None = None  # set by fit/partial_fit/load
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    encode_batch_size: int = 4096
    fit_info: dict  # where the dictionary was fitted (store manifest summary), set by record_fit_source

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__ and "learner" not in cls.__dict__:
            cls.learner = cls.__dict__["kind"]  # subclasses written before ``learner`` named it ``kind``

    @property
    def kind(self) -> str:
        """Deprecated spelling of ``learner`` (kept for code and reports written before it)."""
        return self.learner

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
    def fit(self, X: ArrayLike, **kwargs) -> Dictionary:
        ...

    def partial_fit(self, X: ArrayLike) -> Dictionary:
        raise VitatlasError(f"{type(self).__name__} does not support partial_fit")

    @abstractmethod
    def _config(self) -> dict:
        """JSON-able constructor options: ``type(self)(**_config())`` rebuilds an unfitted twin."""

    @classmethod
    def _saved_options(cls, config: dict) -> dict:
        """Options from a saved config.json, upgraded to what the constructor takes today."""
        return config

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]:
        """Tensors that, with _config, restore the fitted dictionary."""

    @abstractmethod
    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore from ``_state`` output; ``meta`` is the whole saved config.json (has d, n_atoms)."""

    # -- shared behaviour --------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.d is None:
            raise VitatlasError(f"this {type(self).__name__} is not fitted yet: call fit(X) or vitatlas.load(dir) "
                                "first")

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
        """Remember where the data came from, so a later run can refuse a store from another model, and
        how many processes fitted it (``world_size``: 1, or N under ``torchrun --nproc-per-node N``)."""
        if is_store(X):
            self.fit_info = X.describe()
        else:
            n, d = n_rows_and_width(X)
            self.fit_info = {"source": "array", "n_rows": int(n), "d": int(d)}
        self.fit_info["world_size"] = distributed.world().size

    def save(self, path: str | Path) -> Path:
        """Write config.json + dictionary.safetensors into directory ``path`` (atomically)."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(path / "dictionary.safetensors", self._state())
        atomic_write_json(path / "config.json", {
            "format": FORMAT, "version": FORMAT_VERSION, "learner": self.learner,
            "n_atoms": int(self.n_atoms), "d": int(self.d),
            "config": self._config(), "fit_info": getattr(self, "fit_info", {}),
        })
        return path

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor], device: str | None) -> Dictionary:
        config = cls._saved_options(dict(meta.get("config", {})))
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


STORE_IDENTITY_KEYS = ("model", "model_revision", "layer", "tokens")


def check_fitted_on(dictionary: Dictionary, store, *, subject: str = "the dictionary", verb: str = "use") -> None:
    """Refuse a store of another width, or of another model / revision / layer / token kind than the one
    ``dictionary`` was fitted on (recorded in ``fit_info`` by ``record_fit_source``; arrays record nothing
    to compare). ``subject`` and ``verb`` word the one-line error for the caller ("run X", "evaluate")."""
    if dictionary.d != store.d:
        raise VitatlasError(f"{subject} was fitted on width {dictionary.d} but store {store.path} has width "
                            f"{store.d}: {verb} it on the store it was fitted on")
    info = getattr(dictionary, "fit_info", None) or {}
    if info.get("source") != "store":
        return
    desc = store.describe()
    for key in STORE_IDENTITY_KEYS:
        a, b = info.get(key), desc.get(key)
        if a is not None and b is not None and a != b:
            raise VitatlasError(f"{subject} was fitted on {key}={a!r} but store {store.path} has {key}={b!r}: "
                                f"{verb} it on a store of the same model, layer and tokens")


def learner_class(learner: str) -> type[Dictionary]:
    """The class registered under ``learner`` (a config.json's "learner" field)."""
    if learner not in LEARNERS:
        raise VitatlasError(f"unknown learner {learner!r}: known learners are {', '.join(sorted(LEARNERS))}")
    module, _, name = LEARNERS[learner].partition(":")
    return getattr(importlib.import_module(module), name)


def load(path: str | Path, device: str | None = None) -> Dictionary:
    """Load any saved dictionary (DBK-SVD, SAE, baseline) from its directory.

    >>> import tempfile, numpy as np
    >>> from vitatlas.learners.baselines import PCABaseline
    >>> X = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     same = load(PCABaseline(2).fit(X).save(tmp))
    >>> same.learner, same.encode(X).shape
    ('pca', (100, 2))
    """
    path = Path(path)
    if not path.exists():
        raise VitatlasError(f"no dictionary at {path}: the directory does not exist")
    if path.is_file():
        path = path.parent
    meta = read_json(path / "config.json", what="dictionary config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise VitatlasError(f"{path / 'config.json'} is not a vitatlas dictionary config (missing format={FORMAT!r}); "
                            "another library's SAE opens with vitatlas.load or `vitatlas import`")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise VitatlasError(f"{path} was saved by a newer vitatlas (format version {meta['version']}); "
                            "upgrade vitatlas")
    tensors = load_safetensors(path / "dictionary.safetensors", what="dictionary weights")
    cls = learner_class(meta.get("learner", "?"))
    try:
        return cls._from_saved(meta, tensors, device)
    except KeyError as exc:
        raise VitatlasError(f"{path} is incomplete: tensor or key {exc} is missing; re-save the dictionary") from None
