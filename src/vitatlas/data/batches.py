"""Rows from an array, a tensor or an ActivationStore, through one set of functions.

Learners, evaluation and interpretation call these instead of asking which kind of data they got: a
store is streamed shard by shard (data larger than RAM works), arrays and tensors are sliced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..arrays import ArrayLike, as_tensor, not_2d
from ..errors import VitatlasError
from .store import ActivationStore
from .stream import stream


def is_store(X: Any) -> bool:
    return isinstance(X, ActivationStore)


def n_rows_and_width(X: ArrayLike) -> tuple[int, int]:
    if is_store(X):
        return X.n_rows, X.d
    shape = tuple(X.shape) if hasattr(X, "shape") else np.asarray(X).shape
    if len(shape) != 2:
        raise not_2d("X", shape)
    return shape[0], shape[1]


def iter_batches(X: ArrayLike, batch_size: int, *, shuffle: bool, seed: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, drop_last: bool = False, d: int | None = None,
                 start_batch: int = 0) -> Iterator[torch.Tensor]:
    """Yield checked (batch, d) tensors from an array, a tensor or an ActivationStore.

    Shuffling is reproducible for a given ``seed`` (use a different seed per epoch); ``start_batch``
    starts at that batch of the same sequence (a resumed epoch). A store is streamed with read-ahead
    (``data.stream``): data larger than RAM works, and a store sorted by class still gives mixed batches.
    """
    for _, x in iter_batch_shares(X, batch_size, shuffle=shuffle, seed=seed, device=device, dtype=dtype,
                                  drop_last=drop_last, d=d, start_batch=start_batch, rank=0, size=1):
        yield x


def iter_batch_shares(X: ArrayLike, batch_size: int, *, shuffle: bool, seed: int, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, drop_last: bool = False, d: int | None = None,
                      start_batch: int = 0, rank: int | None = None, size: int | None = None,
                      ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(rows, share)`` for each batch ``iter_batches`` yields: the global batch's row count and this
    process's rows of it, ``distributed.shard(rows)`` (``rank``/``size`` default to torchrun's). A store
    reads only the share's rows, so N processes together read the store once instead of N times; the
    global batches are the same for any number of processes."""
    if batch_size <= 0:
        raise VitatlasError(f"batch size must be positive, got {batch_size}")
    w = distributed.world()
    rank, size = (w.rank if rank is None else rank), (w.size if size is None else size)
    if not 0 <= rank < size:
        raise VitatlasError(f"rank {rank} is outside a world of {size} processes")
    if is_store(X):
        yield from _store_shares(X, batch_size, shuffle=shuffle, seed=seed, device=device, dtype=dtype,
                                 drop_last=drop_last, d=d, start_batch=start_batch, rank=rank, size=size)
        return
    n, _ = n_rows_and_width(X)
    if n == 0:
        raise VitatlasError("X is empty (0 rows): pass at least one sample")
    order = np.random.default_rng(seed).permutation(n) if shuffle else None
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    for start in range(max(0, start_batch) * batch_size, stop, batch_size):
        end = min(start + batch_size, n)
        part = distributed.shard(end - start, rank, size) if size > 1 else range(end - start)  # one process: all
        lo, hi = start + part.start, start + part.stop
        rows = slice(lo, hi) if order is None else order[lo:hi]
        if isinstance(X, torch.Tensor):
            chunk = X[rows] if order is None else X[torch.as_tensor(rows, device=X.device)]
        else:
            chunk = np.asarray(X)[rows]
        yield end - start, _checked(chunk, d, device, dtype, lo if order is None else 0)


def _checked(chunk, d, device, dtype, first_row) -> torch.Tensor:
    if len(chunk) == 0:  # a rank's empty share of a batch smaller than the world
        return torch.empty((0, chunk.shape[1]), dtype=dtype, device=device)
    return as_tensor(chunk, d=d, device=device, dtype=dtype, first_row=first_row)


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _converted(rows: np.ndarray, d: int | None, dtype: torch.dtype, first_row: int) -> torch.Tensor:
    """``as_tensor`` on the CPU: converted by torch into a new tensor (a copy even in the store's dtype: the
    stream recycles its window buffers; torch converts float16 to float32 ~3x faster than numpy here) and
    checked by numpy (its isfinite is ~25x faster than torch's: 7 vs 185 ms for 4096 x 768 float32)."""
    if dtype not in _NUMPY_DTYPES or rows.shape[0] == 0:
        return _checked(torch.from_numpy(rows.copy()), d, "cpu", dtype, first_row)
    out = torch.empty(rows.shape, dtype=dtype)
    out.copy_(torch.from_numpy(rows))
    if not np.isfinite(out.numpy()).all():
        as_tensor(out, d=d, dtype=dtype, first_row=first_row)  # raises the one-line error naming the row
    return out


def _store_shares(store: ActivationStore, batch_size: int, *, shuffle: bool, seed: int, device, dtype, drop_last: bool,
                  d: int | None, start_batch: int, rank: int, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    if d is not None and store.d != d:
        raise VitatlasError(f"X has width {store.d} but this dictionary was fitted on width {d}")
    plan = store.plan(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    on_cpu = torch.device(device).type == "cpu"

    def convert(rows: np.ndarray, b: int, start: int):
        first = start if not shuffle else 0
        total = min(batch_size, store.n_rows - b * batch_size)
        # on the CPU the background thread converts and checks; a GPU gets the store's dtype (half the bytes
        # for float16) and converts on arrival
        return total, first, (_converted(rows, d, dtype, first) if on_cpu else torch.from_numpy(rows.copy()))

    for total, first, t in stream(plan, convert, start_batch=start_batch, rank=rank, size=size):
        yield total, (t if on_cpu else _checked(t.to(device), d, device, dtype, first))


def iter_row_range(X: ArrayLike, rows: range, batch_size: int, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, d: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, batch)``: checked tensors of the rows ``rows`` (contiguous, e.g. ``distributed.shard(n)``)
    of an array, a tensor or an ActivationStore, in order, ``batch_size`` rows at a time."""
    if batch_size <= 0:
        raise VitatlasError(f"batch size must be positive, got {batch_size}")
    if rows.step != 1:
        raise VitatlasError("iter_row_range takes a contiguous range of rows")
    if is_store(X):
        for start, batch in X.iter_range(rows.start, rows.stop, batch_size):
            yield start, as_tensor(batch, d=d, device=device, dtype=dtype, first_row=start)
        return
    for start in range(rows.start, rows.stop, batch_size):
        chunk = X[start:min(start + batch_size, rows.stop)]
        chunk = chunk if isinstance(X, torch.Tensor) else np.asarray(chunk)
        yield start, as_tensor(chunk, d=d, device=device, dtype=dtype, first_row=start)


def iter_rank_batches(X: ArrayLike, batch_size: int, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, d: int | None = None) -> tuple[range, Iterator[torch.Tensor]]:
    """(rows, batches): the rows this process streams in order, and their checked batches. Under torchrun a
    contiguous share of the rows (``distributed.shard``); for one process all rows, through ``iter_batches``."""
    n, _ = n_rows_and_width(X)
    if not distributed.world().distributed:
        return range(n), iter_batches(X, batch_size, shuffle=False, seed=0, device=device, dtype=dtype, d=d)
    rows = distributed.shard(n)
    return rows, (x for _, x in iter_row_range(X, rows, batch_size, device=device, dtype=dtype, d=d))


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
