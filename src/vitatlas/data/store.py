"""The activation store: token activations on disk as sharded .npy files plus a manifest.

Layout of one store directory::

    manifest.json          what was extracted (model, layer, tokens, source, preprocessing), d, dtype,
                           row counts, and per shard its row/image counts and SHA-256 of every file;
                           ``world_size``: how many processes the run that last wrote it had (1, or N
                           under ``torchrun --nproc-per-node N``; absent in stores from before it)
    shard-00000.npy        (rows, d) activations, float16 or float32, memory-mappable
    index-00000.npy        (rows, 2) int32: (image id, token position) of every row
    labels-00000.npy       (rows,) int32 class label of the row's image, -1 if unknown (optional)

Writes are atomic and the manifest is the commit point: a shard exists for readers only once the
manifest lists it, so a run killed at any moment leaves a consistent store that a re-run resumes.
Under torchrun several processes write their own shard files of one store (never the same file) and
rank 0 alone commits them to the manifest, in shard order, once they are complete.
An extraction over several layers writes one store per layer under ``DIR/layer-XX``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..arrays import as_tensor
from ..errors import VitatlasError
from ..io import atomic_save_npy, atomic_write_json, read_json, sha256_file
from .stream import EpochPlan, ShardFile, stream

FORMAT = "vitatlas-activations"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
DEFAULT_SHARD_BYTES = 64 << 20
# rows a shuffled stream reads at a time, in bytes of float32 (the window of ``data.stream``); read at each
# call, so a benchmark can shrink it to make a small store several windows long
SHUFFLE_BUFFER_BYTES = 256 << 20


def layer_dirname(layer: int) -> str:
    return f"layer-{layer:02d}"


def _shard_files(name: str) -> dict[str, str]:
    suffix = name.split("-", 1)[1]
    return {"acts": f"shard-{suffix}.npy", "index": f"index-{suffix}.npy", "labels": f"labels-{suffix}.npy"}


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    images: int
    sha256: dict  # part -> hex digest


class ActivationStore:
    """Read-only view of a store directory; every learner's ``fit`` accepts one.

    >>> store = ActivationStore("acts/")            # doctest: +SKIP
    >>> store.n_rows, store.d, store.labels[:5]     # doctest: +SKIP
    >>> for batch in store.iter_batches(4096, shuffle=True, seed=0): ...   # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, layer: int | None = None, *, allow_incomplete: bool = False):
        path = Path(path)
        if not path.exists():
            raise VitatlasError(f"no activation store at {path}: the directory does not exist")
        path = _resolve_layer_dir(path, layer)
        self.path = path
        manifest = read_json(path / "manifest.json", what="store manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise VitatlasError(f"{path / 'manifest.json'} is not a vitatlas activation-store manifest")
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise VitatlasError(f"store {path} was written by a newer vitatlas; upgrade vitatlas to read it")
        if not manifest.get("complete", False) and not allow_incomplete:
            raise VitatlasError(
                f"store {path} is incomplete ({manifest.get('n_images', 0)} images written): re-run the same "
                "`vitatlas extract` command to finish it")
        self.manifest = manifest
        self.d = int(manifest["d"])
        self.dtype = np.dtype(manifest["dtype"])
        self.shards = [ShardInfo(s["name"], int(s["rows"]), int(s["images"]), dict(s["sha256"]))
                       for s in manifest["shards"]]
        self.n_rows = sum(s.rows for s in self.shards)
        if self.n_rows == 0 and not allow_incomplete:
            raise VitatlasError(f"store {path} holds no rows")
        self._offsets = np.cumsum([0] + [s.rows for s in self.shards])
        self._mmaps: dict[int, np.ndarray] = {}
        self._labels: np.ndarray | None = None
        self._index: np.ndarray | None = None
        self._files: list[ShardFile] | None = None

    # ---- metadata --------------------------------------------------------------------------------
    @property
    def has_labels(self) -> bool:
        return bool(self.manifest.get("has_labels", False))

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("class_names")

    @property
    def layer(self) -> int | None:
        return self.manifest.get("layer")

    @property
    def tokens(self) -> str | None:
        return self.manifest.get("tokens")

    @property
    def model(self) -> dict | None:
        return self.manifest.get("model")

    def __len__(self) -> int:
        return self.n_rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.d)

    def describe(self) -> dict:
        """A short summary that learners record as where they were fitted."""
        model = self.model or {}
        return {"source": "store", "path": str(self.path.resolve()), "n_rows": self.n_rows, "d": self.d,
                "model": model.get("name"), "model_revision": model.get("revision"), "layer": self.layer,
                "tokens": self.tokens, "data": (self.manifest.get("source") or {}).get("name")}

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, rows={self.n_rows}, d={self.d}, dtype={self.dtype})"

    # ---- raw access ------------------------------------------------------------------------------
    def _part(self, i: int, part: str, mmap: bool = True) -> np.ndarray:
        path = self.path / _shard_files(self.shards[i].name)[part]
        if not path.is_file():
            raise VitatlasError(f"store {self.path} is missing {path.name}: the store is damaged; run `vitatlas store verify {self.path}`")
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise VitatlasError(f"{path} is corrupt or truncated ({exc}); run `vitatlas store verify {self.path}` "
                                "and re-extract") from None
        expected = self.part_shape(i, part)
        if arr.shape != expected:
            raise VitatlasError(f"{path} has shape {arr.shape} but the manifest says {expected}: the store is damaged; re-extract it")
        return arr

    def part_shape(self, i: int, part: str) -> tuple[int, ...]:
        """The shape the manifest gives shard i's ``part`` file ("acts", "index" or "labels")."""
        rows = self.shards[i].rows
        return (rows, self.d) if part == "acts" else (rows, 2) if part == "index" else (rows,)

    def shard(self, i: int) -> np.ndarray:
        """Memory-mapped activations of shard i, in the stored dtype."""
        if i not in self._mmaps:
            self._mmaps[i] = self._part(i, "acts")
        return self._mmaps[i]

    def _concat_part(self, part: str) -> np.ndarray:
        return np.concatenate([self._part(i, part, mmap=False) for i in range(len(self.shards))]) if self.shards \
            else np.zeros((0, 2) if part == "index" else (0,), np.int32)

    @property
    def labels(self) -> np.ndarray | None:
        """(n_rows,) int class label of each row's image (-1 unknown), or None when the source had none."""
        if not self.has_labels:
            return None
        if self._labels is None:
            self._labels = self._concat_part("labels")
        return self._labels

    @property
    def index(self) -> np.ndarray:
        """(n_rows, 2) int: image id and token position of every row."""
        if self._index is None:
            self._index = self._concat_part("index")
        return self._index

    def __getitem__(self, idx) -> np.ndarray:
        """Rows as float32: an int, a slice, or an array of row numbers (random access)."""
        if isinstance(idx, (int, np.integer)):
            return self.rows(np.array([idx]))[0]
        if isinstance(idx, slice):
            return self.rows(np.arange(self.n_rows)[idx])
        return self.rows(np.asarray(idx))

    def rows(self, row_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Random access: float32 (len(row_ids), d) in the order given."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        if row_ids.size and (row_ids.min() < -self.n_rows or row_ids.max() >= self.n_rows):
            raise VitatlasError(f"row index out of range for a store of {self.n_rows} rows")
        row_ids = np.where(row_ids < 0, row_ids + self.n_rows, row_ids)
        out = np.empty((row_ids.size, self.d), np.float32)
        shard_of = np.searchsorted(self._offsets, row_ids, side="right") - 1
        for i in np.unique(shard_of):
            sel = shard_of == i
            out[sel] = self.shard(int(i))[row_ids[sel] - self._offsets[i]]
        return out

    def to_numpy(self) -> np.ndarray:
        """The whole store as one float32 array (only for stores that fit in RAM)."""
        return np.concatenate([np.asarray(self.shard(i), np.float32) for i in range(len(self.shards))])

    # ---- streaming -------------------------------------------------------------------------------
    def shard_files(self) -> list[ShardFile]:
        """Each shard's activation file, where its rows start and how many: what the stream reads."""
        if self._files is None:
            self._files = [self._shard_file(i) for i in range(len(self.shards))]
        return self._files

    def _shard_file(self, i: int) -> ShardFile:
        path = self.path / _shard_files(self.shards[i].name)["acts"]
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = header(f)
                offset = f.tell()
        except FileNotFoundError:
            raise VitatlasError(f"store {self.path} is missing {path.name}: the store is damaged; run "
                                f"`vitatlas store verify {self.path}`") from None
        except (ValueError, OSError, EOFError) as exc:
            raise VitatlasError(f"{path} is corrupt or truncated ({exc}); run `vitatlas store verify {self.path}` "
                                "and re-extract") from None
        expected = (self.shards[i].rows, self.d)
        if tuple(shape) != expected or fortran or np.dtype(dtype) != self.dtype:
            raise VitatlasError(f"{path} holds {'Fortran-order ' if fortran else ''}{np.dtype(dtype)} {tuple(shape)} "
                                f"but the manifest says {self.dtype} {expected}: the store is damaged; re-extract it")
        return ShardFile(path, offset, self.shards[i].rows)

    def plan(self, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool = False,
             buffer_bytes: int | None = None) -> EpochPlan:
        """The order of one epoch's batches (``data.stream``): what ``iter_batches`` streams."""
        buffer_bytes = SHUFFLE_BUFFER_BYTES if buffer_bytes is None else buffer_bytes
        return EpochPlan(self.shard_files(), self.d, self.dtype, batch_size, shuffle=shuffle, seed=seed,
                         window_rows=buffer_bytes // (4 * self.d), drop_last=drop_last)

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                     with_offsets: bool = False, buffer_bytes: int | None = None, start_batch: int = 0) -> Iterator:
        """Stream float32 batches (batch_size, d) over the whole store, read ahead in the background.

        Without shuffling, batches are consecutive rows (and ``with_offsets`` yields ``(start, batch)``
        with the batch's first row number; shuffled, its first position in the epoch). With shuffling,
        every batch is ~128 runs of consecutive rows from 1 MB chunks drawn from the whole store, read
        about ``buffer_bytes`` of float32 at a time (default ``SHUFFLE_BUFFER_BYTES``), so a store sorted
        by class still gives batches of mixed classes and memory stays bounded for stores larger than
        RAM. The same seed gives the same batches; ``start_batch`` starts the epoch at that batch.
        """
        if batch_size <= 0:
            raise VitatlasError(f"batch size must be positive, got {batch_size}")
        plan = self.plan(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, buffer_bytes=buffer_bytes)
        # np.array copies: the rows live in a window buffer the stream recycles
        convert = (lambda rows, b, start: (start, np.array(rows, np.float32))) if with_offsets else \
            (lambda rows, b, start: np.array(rows, np.float32))
        return stream(plan, convert, start_batch=start_batch)

    def iter_range(self, lo: int, hi: int, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, batch)``: float32 rows ``lo..hi-1`` in order, ``batch_size`` at a time (the last may be
        short) — one process's part of the store under torchrun. Shards are mapped one at a time and not
        cached, as in ``iter_batches``."""
        if batch_size <= 0:
            raise VitatlasError(f"batch size must be positive, got {batch_size}")
        if not 0 <= lo <= hi <= self.n_rows:
            raise VitatlasError(f"row range {lo}..{hi} is outside a store of {self.n_rows} rows")
        current, mapped = -1, None
        for start in range(lo, hi, batch_size):
            stop, pos, parts = min(start + batch_size, hi), start, []
            while pos < stop:
                i = int(np.searchsorted(self._offsets, pos, side="right")) - 1
                if i != current:
                    current, mapped = i, self._part(i, "acts")
                end = min(stop, int(self._offsets[i + 1]))
                parts.append(np.asarray(mapped[pos - self._offsets[i]:end - self._offsets[i]], dtype=np.float32))
                pos = end
            yield start, (np.concatenate(parts) if len(parts) > 1 else parts[0])

    # ---- integrity -------------------------------------------------------------------------------
    def verify(self, progress: bool = False) -> list[str]:
        """Check every file against its SHA-256 in the manifest; return the problems found (empty = ok)."""
        from tqdm.auto import tqdm

        problems = []
        for s in tqdm(self.shards, desc="verify", unit="shard", disable=not progress):
            for part, digest in s.sha256.items():
                path = self.path / _shard_files(s.name)[part]
                if not path.is_file():
                    problems.append(f"{path.name}: missing")
                elif sha256_file(path) != digest:
                    problems.append(f"{path.name}: checksum mismatch (file changed or truncated)")
        if not self.manifest.get("complete", False):
            problems.append(f"store is incomplete ({self.manifest.get('n_images', 0)} images written)")
        return problems

    @staticmethod
    def from_array(path: str | os.PathLike, X: np.ndarray, labels: np.ndarray | None = None, *,
                   dtype: str = "float32", class_names: list[str] | None = None, source: dict | None = None,
                   shard_bytes: int = DEFAULT_SHARD_BYTES) -> ActivationStore:
        """Wrap activations a user already has (e.g. precomputed CLIP embeddings) as a store.

        Each row is treated as one image with one token; labels, if given, are one int per row.
        """
        X = np.asarray(X) if not isinstance(X, np.ndarray) else X
        if X.ndim != 2 or X.shape[0] == 0:
            raise VitatlasError(f"activations must be a non-empty 2-D array (n, d), got shape {X.shape}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (X.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
                raise VitatlasError(f"labels must be {X.shape[0]} integers (one per row), got shape {labels.shape} "
                                    f"dtype {labels.dtype}")
        writer = StoreWriter(path, d=X.shape[1], dtype=dtype, identity={"from_array": True, "rows": int(X.shape[0])},
                             meta={"source": source or {"name": "array"}, "tokens": "given", "layer": None,
                                   "model": None, "class_names": class_names, "world_size": 1},
                             has_labels=labels is not None)
        rows_per_shard = max(1, shard_bytes // (X.shape[1] * np.dtype(dtype).itemsize))
        for start in range(writer.n_images, X.shape[0], rows_per_shard):
            chunk = np.asarray(X[start:start + rows_per_shard], dtype=np.float32)
            as_tensor(chunk, name="activations", first_row=start)  # NaN/Inf -> clear error; the store stays incomplete
            ids = np.arange(start, start + chunk.shape[0], dtype=np.int32)
            index = np.stack([ids, np.zeros_like(ids)], axis=1)
            writer.write_shard(chunk, index, None if labels is None else labels[start:start + rows_per_shard],
                               n_images=chunk.shape[0])
        writer.finish()
        return ActivationStore(path)


def _resolve_layer_dir(path: Path, layer: int | None) -> Path:
    """Find the store inside ``path``: itself, ``layer-XX`` for ``layer``, or the only store below it."""
    if (path / "manifest.json").exists():
        held = read_json(path / "manifest.json", "store manifest").get("layer")
        if layer is not None and held not in (layer, None):
            raise VitatlasError(f"store {path} holds layer {held}, not {layer}")
        return path
    if layer is not None and (path / layer_dirname(layer)).is_dir():
        return _resolve_layer_dir(path / layer_dirname(layer), None)
    found = sorted(str(p.parent.relative_to(path)) for pattern in ("*/manifest.json", "*/*/manifest.json")
                   for p in path.glob(pattern))
    if not found:
        raise VitatlasError(f"{path} is not an activation store (no manifest.json): create one with `vitatlas extract` "
                            "or `vitatlas store from-npy`")
    if layer is not None:
        raise VitatlasError(f"{path} has no layer {layer}; it holds {', '.join(found)}")
    if len(found) == 1:
        return path / found[0]
    raise VitatlasError(f"{path} holds several stores ({', '.join(found)}): open one, e.g. {path / found[0]}")


class StoreWriter:
    """Appends shards to a store, resumably.

    ``identity`` is what must match for a re-run to continue an existing store (model, revision, layer,
    tokens, source, dtype, ...). Opening a directory that holds a store with another identity is an
    error, so a store is never mixed from two extractions.
    """

    def __init__(self, path: str | os.PathLike, *, d: int, dtype: str, identity: dict, meta: dict,
                 has_labels: bool, main: bool = True):
        if dtype not in DTYPES:
            raise VitatlasError(f"unknown store dtype {dtype!r}: use float16 or float32")
        self.path = Path(path)
        self.main = main
        manifest_path = self.path / "manifest.json"
        if not main:  # a helper rank: rank 0 created (or checked) the store and alone writes its manifest
            if not manifest_path.is_file():
                raise VitatlasError(f"{manifest_path}, which rank 0 wrote, is not visible to this process: every "
                                    "process of a distributed extraction must see the same --out directory (on "
                                    "several machines, a shared file system)")
            self.manifest = read_json(manifest_path, "store manifest")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists():
            old = read_json(manifest_path, "store manifest")
            if old.get("identity") != identity or int(old.get("d", -1)) != d or old.get("dtype") != dtype:
                raise VitatlasError(
                    f"{self.path} already holds a different store ({_summary(old)}); pass another output "
                    "directory, or the same arguments to resume it")
            self.manifest = old
        else:
            self.manifest = {"format": FORMAT, "version": FORMAT_VERSION, "identity": identity, "d": d,
                             "dtype": dtype, **meta, "has_labels": has_labels, "n_rows": 0, "n_images": 0,
                             "complete": False, "shards": []}
            atomic_write_json(manifest_path, self.manifest)
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Delete files a killed run wrote but never committed to the manifest."""
        keep = {f for s in self.manifest["shards"] for f in _shard_files(s["name"]).values()}
        for p in self.path.iterdir():
            if p.name.endswith(".tmp") or (p.suffix == ".npy" and p.name not in keep):
                p.unlink(missing_ok=True)

    @property
    def n_images(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def write_shard(self, acts: np.ndarray, index: np.ndarray, labels: np.ndarray | None, n_images: int) -> None:
        """Write one shard (all files, then the manifest that commits it)."""
        self.commit([self.write_shard_files(len(self.manifest["shards"]), acts, index, labels, n_images)])

    def write_shard_files(self, number: int, acts: np.ndarray, index: np.ndarray, labels: np.ndarray | None,
                          n_images: int) -> dict:
        """Write the files of shard ``number`` atomically and return its manifest entry, uncommitted.

        Several processes may each write their own shards of one store at once (distributed
        extraction); only ``commit`` (rank 0) makes them part of the store, in shard order.
        """
        d = self.manifest["d"]
        if acts.ndim != 2 or acts.shape[1] != d:
            raise VitatlasError(f"shard activations must have shape (rows, {d}), got {acts.shape}")
        name = f"shard-{number:05d}"
        files = _shard_files(name)
        digests = {"acts": atomic_save_npy(self.path / files["acts"], acts.astype(self.manifest["dtype"], copy=False)),
                   "index": atomic_save_npy(self.path / files["index"], index.astype(np.int32, copy=False))}
        if self.manifest["has_labels"]:
            lab = np.full(acts.shape[0], -1, np.int32) if labels is None else np.asarray(labels, np.int32)
            digests["labels"] = atomic_save_npy(self.path / files["labels"], lab)
        return {"name": name, "rows": int(acts.shape[0]), "images": int(n_images), "sha256": digests}

    def commit(self, entries: list[dict], **meta) -> None:
        """Append written shards (``write_shard_files`` entries, next in order) to the manifest and write it.

        A helper rank (``main=False``) keeps its in-memory manifest in step without writing it.
        """
        for entry in entries:
            expected = f"shard-{len(self.manifest['shards']):05d}"
            if entry["name"] != expected:
                raise VitatlasError(f"internal error: committing {entry['name']} to {self.path} where {expected} "
                                    "comes next")
            self.manifest["shards"].append(entry)
            self.manifest["n_rows"] += entry["rows"]
            self.manifest["n_images"] += entry["images"]
        self.update_meta(**meta)

    def update_meta(self, **meta) -> None:
        self.manifest.update(meta)
        if self.main:
            atomic_write_json(self.path / "manifest.json", self.manifest)

    def finish(self, **meta) -> None:
        self.update_meta(complete=True, **meta)


def _summary(manifest: dict) -> str:
    model = (manifest.get("model") or {}).get("name", "no model")
    source = (manifest.get("source") or {}).get("name", "?")
    return f"{model}, layer {manifest.get('layer')}, tokens {manifest.get('tokens')}, data {source}, d={manifest.get('d')}"


def rows_per_shard(d: int, dtype: str, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    return max(1, shard_bytes // (d * np.dtype(dtype).itemsize))


def ceil_to(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
