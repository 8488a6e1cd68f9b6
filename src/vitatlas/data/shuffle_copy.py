"""A one-time shuffled copy of a store (``vitatlas store shuffle``): every row, with its index and label
rows, in one uniformly random order over the whole store, in bounded memory.

Two passes through a work directory inside the destination (``DST/shuffle-work``):

1. *Scatter*: each source shard is read whole and checked against its SHA-256 in the manifest; every row
   gets a random key in [0, 1) (source shard i's from ``default_rng([seed, i])``) and is appended, with
   its key, to the bucket file of its key's range (``n_buckets`` equal ranges, chosen so a bucket holds
   about ``memory_bytes``). Every ``memory_bytes`` of input the bucket files are synced and their lengths
   written to ``state.json``: the pass's commit point.
2. *Write*: each bucket in turn is read into memory and sorted by key (stable: ties keep the source
   order), and the rows are written as the destination's shards (``StoreWriter``: atomic files, SHA-256s,
   the manifest as the commit point); a bucket file is deleted once all its rows are committed.

The copy's order is the rows sorted by their iid random keys, a uniform random permutation, and depends
on the seed and the source alone (not on the memory or the shard size). A run killed at any moment resumes
where its last commit left it (scatter: the bucket files are cut back to the committed lengths; write: the
manifest says how many rows are done) and ends with the same copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import VitatlasError
from ..io import atomic_write_json, read_json
from .store import DEFAULT_SHARD_BYTES, ActivationStore, StoreWriter, _shard_files, rows_per_shard

BUCKET_BYTES = 256 << 20  # default rows (with their index, label and key) held in memory at once when writing
WORK_DIR = "shuffle-work"
_MANIFEST_OWN = {"format", "version", "identity", "d", "dtype", "has_labels", "n_rows", "n_images", "complete",
                 "shards"}


def shuffle_store(src: ActivationStore | str | os.PathLike, dst: str | os.PathLike, *, seed: int = 0,
                  progress: bool = False, memory_bytes: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  on_step: Callable[[int], None] | None = None) -> ActivationStore:
    """Write a copy of ``src`` at ``dst`` with its rows in a random order (see the module docstring) and
    return it. ``dst`` must not exist or be empty, unless it holds this same copy (same source and seed)
    unfinished, which is resumed, or finished, which is returned. ``on_step(n)`` is called after each
    commit (the n-th, counted over both passes; the CLI's kill-point test hook). ``memory_bytes`` (default
    ``BUCKET_BYTES``) bounds the rows held at once; ``shard_bytes`` sizes the copy's shards."""
    from tqdm.auto import tqdm

    src = src if isinstance(src, ActivationStore) else ActivationStore(src)
    memory_bytes = BUCKET_BYTES if memory_bytes is None else int(memory_bytes)
    if memory_bytes <= 0 or shard_bytes <= 0:
        raise VitatlasError(f"the shuffle's memory and shard size must be positive, got {memory_bytes} and "
                            f"{shard_bytes} bytes")
    dst = Path(dst)
    if dst.resolve() == src.path.resolve() or src.path.resolve() in dst.resolve().parents:
        raise VitatlasError(f"--out {dst} is the source store or inside it: pass a new directory")
    identity = {"shuffled_from": src.manifest.get("identity"), "seed": int(seed), "n_rows": src.n_rows,
                "source_sha256": hashlib.sha256(json.dumps([s.sha256 for s in src.shards],
                                                           sort_keys=True).encode()).hexdigest()}
    if _is_taken(dst, identity):
        raise VitatlasError(f"{dst} already exists and is not empty: pass a new --out directory (or the same "
                            "source and --seed to resume an interrupted shuffle)")
    meta = {k: v for k, v in src.manifest.items() if k not in _MANIFEST_OWN}
    meta["shuffle"] = {"from": str(src.path.resolve()), "seed": int(seed)}
    writer = StoreWriter(dst, d=src.d, dtype=str(src.dtype), identity=identity, meta=meta,
                         has_labels=src.has_labels)
    if writer.complete:
        return ActivationStore(dst)
    work = dst / WORK_DIR
    work.mkdir(exist_ok=True)
    parts = ("acts", "index", "labels", "key") if src.has_labels else ("acts", "index", "key")
    widths = {"acts": (src.d, src.dtype), "index": (2, np.dtype(np.int32)), "labels": (1, np.dtype(np.int32)),
              "key": (1, np.dtype(np.float64))}
    row_bytes = sum(widths[part][0] * widths[part][1].itemsize for part in parts)
    state_path = work / "state.json"
    if state_path.is_file():
        state = read_json(state_path, "shuffle state")
        if state.get("identity") != identity:
            raise VitatlasError(f"{state_path} belongs to another shuffle: delete {dst} and re-run")
    else:
        n_buckets = max(1, math.ceil(src.n_rows * row_bytes / memory_bytes))
        state = {"identity": identity, "n_buckets": n_buckets, "scattered": 0, "bucket_rows": [0] * n_buckets}
        atomic_write_json(state_path, state)
    n_buckets = int(state["n_buckets"])
    steps = [0]

    def step() -> None:
        steps[0] += 1
        if on_step is not None:
            on_step(steps[0])

    def bucket_path(b: int, part: str) -> Path:
        return work / f"bucket-{b:05d}.{part}"

    # ---- pass 1: scatter the rows into bucket files -------------------------------------------------
    if state["scattered"] < len(src.shards):
        for b in range(n_buckets):  # cut back what a killed run appended after its last commit
            for part in parts:
                with open(bucket_path(b, part), "ab") as f:
                    f.truncate(state["bucket_rows"][b] * widths[part][0] * widths[part][1].itemsize)
        done_rows = sum(s.rows for s in src.shards[:state["scattered"]])
        bar = tqdm(total=src.n_rows, initial=done_rows, desc="shuffle: scatter", unit="row", disable=not progress,
                   leave=False)
        files = {part: [open(bucket_path(b, part), "ab") for b in range(n_buckets)] for part in parts}
        try:
            since = 0
            for i in range(state["scattered"], len(src.shards)):
                arrays = {part: _read_checked(src, i, part) for part in parts if part != "key"}
                arrays["key"] = np.random.default_rng([seed, i]).random(src.shards[i].rows)
                bucket = np.minimum((arrays["key"] * n_buckets).astype(np.int64), n_buckets - 1)
                order = np.argsort(bucket, kind="stable")
                bounds = np.concatenate([[0], np.cumsum(np.bincount(bucket, minlength=n_buckets))])
                for part in parts:
                    moved = arrays[part][order]
                    for b in range(n_buckets):
                        if bounds[b + 1] > bounds[b]:
                            files[part][b].write(memoryview(moved[bounds[b]:bounds[b + 1]]))
                for b in range(n_buckets):
                    state["bucket_rows"][b] += int(bounds[b + 1] - bounds[b])
                since += src.shards[i].rows * row_bytes
                bar.update(src.shards[i].rows)
                if since >= memory_bytes or i == len(src.shards) - 1:  # the commit point
                    for fs in files.values():
                        for f in fs:
                            f.flush()
                            os.fsync(f.fileno())
                    state["scattered"] = i + 1
                    atomic_write_json(state_path, state)
                    since = 0
                    step()
        finally:
            bar.close()
            for fs in files.values():
                for f in fs:
                    f.close()

    # ---- pass 2: permute each bucket and write the destination's shards -----------------------------
    per_shard = rows_per_shard(src.d, str(src.dtype), int(shard_bytes))
    sizes = np.array(state["bucket_rows"], np.int64)
    ends = np.cumsum(sizes)
    done = writer.n_rows
    bar = tqdm(total=src.n_rows, initial=done, desc="shuffle: write", unit="row", disable=not progress)
    try:
        carry: dict[str, list[np.ndarray]] = {part: [] for part in parts[:-1]}
        held = 0
        for b in range(int(np.searchsorted(ends, done, side="right")), n_buckets):
            rows = _read_bucket(bucket_path, b, parts, widths, int(sizes[b]))
            perm = np.argsort(rows["key"], kind="stable")
            skip = max(0, done - int(ends[b] - sizes[b]))  # rows of this bucket already committed
            for part in parts[:-1]:
                carry[part].append(rows[part][perm[skip:]])
            held += int(sizes[b]) - skip
            while held >= per_shard or (held and b == n_buckets - 1):
                cut = min(per_shard, held)
                out = {part: _take(carry[part], cut) for part in parts[:-1]}
                writer.write_shard(out["acts"], out["index"], out.get("labels", None), n_images=0)
                held -= cut
                bar.update(cut)
                for old in range(n_buckets):  # a bucket whose rows are all committed is no longer needed
                    if ends[old] <= writer.n_rows:
                        for part in parts:
                            bucket_path(old, part).unlink(missing_ok=True)
                step()
    finally:
        bar.close()
    if writer.n_rows != src.n_rows:
        raise VitatlasError(f"internal error: the shuffled copy holds {writer.n_rows} of {src.n_rows} rows")
    writer.finish(n_images=int(src.manifest.get("n_images", 0)))
    shutil.rmtree(work, ignore_errors=True)
    return ActivationStore(dst)


def _is_taken(dst: Path, identity: dict) -> bool:
    """Whether ``dst`` holds anything but this shuffle (begun or finished)."""
    if not dst.exists():
        return False
    if not dst.is_dir():
        return True
    entries = {p.name for p in dst.iterdir()}
    if not entries:
        return False
    if "manifest.json" not in entries:
        return True
    try:
        held = json.loads((dst / "manifest.json").read_text())
    except (OSError, ValueError):
        return True
    return not isinstance(held, dict) or held.get("identity") != identity


def _read_checked(store: ActivationStore, i: int, part: str) -> np.ndarray:
    """Shard i's ``part`` file read whole, checked against its SHA-256 in the manifest."""
    path = store.path / _shard_files(store.shards[i].name)[part]
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VitatlasError(f"cannot read {path} ({exc.strerror}): the store is damaged; run "
                            f"`vitatlas store verify {store.path}`") from None
    if hashlib.sha256(raw).hexdigest() != store.shards[i].sha256.get(part):
        raise VitatlasError(f"{path} does not match its SHA-256 in the manifest (changed or truncated): run "
                            f"`vitatlas store verify {store.path}` and re-extract it before shuffling")
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = header(f)
    expected = store.part_shape(i, part)
    if tuple(shape) != expected or fortran:
        raise VitatlasError(f"{path} has shape {tuple(shape)} but the manifest says {expected}: the store is "
                            "damaged; re-extract it")
    return np.frombuffer(raw, dtype, count=math.prod(shape), offset=f.tell()).reshape(shape)


def _read_bucket(bucket_path, b: int, parts, widths, rows: int) -> dict[str, np.ndarray]:
    out = {}
    for part in parts:
        width, dtype = widths[part]
        path = bucket_path(b, part)
        want = rows * width * dtype.itemsize
        if not path.is_file() or path.stat().st_size != want:
            raise VitatlasError(f"the shuffle's work file {path} is missing or has the wrong size: delete "
                                f"{path.parent.parent} and re-run the shuffle")
        arr = np.fromfile(path, dtype)
        out[part] = arr.reshape(rows, width) if width > 1 else arr
    return out


def _take(pieces: list[np.ndarray], n: int) -> np.ndarray:
    """The first n rows of the concatenated ``pieces`` (removed from the list)."""
    taken, got = [], 0
    while got < n:
        p = pieces[0]
        if got + len(p) <= n:
            taken.append(pieces.pop(0))
            got += len(p)
        else:
            taken.append(p[:n - got])
            pieces[0] = p[n - got:]
            got = n
    return taken[0] if len(taken) == 1 else np.concatenate(taken)
