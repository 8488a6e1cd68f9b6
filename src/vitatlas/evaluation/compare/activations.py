"""Each atom's activation on every unit of an alignment, as a sparse (n_units, n_atoms) matrix.

In images mode an image's rows are aggregated per atom: ``max`` keeps, per atom, the activation of
largest magnitude over the image's tokens *with its sign* (for non-negative SAE codes that is the
maximum; for signed K-SVD codes flipping an atom's sign flips its aggregate, so a matched atom of
either sign correlates with |r| = 1), ``mean`` the mean over the image's tokens (zeros included).

The matrix is built one chunk of rows at a time (dense codes of at most ``chunk_bytes``), so memory is
the chunk plus the non-zeros of the result (12 bytes each: float64 value and int32 column).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ...data.store import ActivationStore
from ...dictionary import Dictionary
from ...errors import VitatlasError
from .align import Side

AGGREGATES = ("max", "mean")
CHUNK_BYTES = 64 << 20


def aggregate_rows(codes: np.ndarray, starts: np.ndarray, how: str) -> np.ndarray:
    """(rows, A) codes of consecutive images -> (images, A); ``starts``: each image's first row (sorted,
    every image at least one row)."""
    if how == "max":
        hi = np.maximum.reduceat(codes, starts, axis=0)
        lo = np.minimum.reduceat(codes, starts, axis=0)
        return np.where(-lo > hi, lo, hi)
    if how == "mean":
        counts = np.diff(np.append(starts, codes.shape[0]))
        return np.add.reduceat(codes, starts, axis=0) / counts[:, None].astype(codes.dtype)
    raise VitatlasError(f"unknown aggregate {how!r}: use one of {', '.join(AGGREGATES)}")


def _chunks(side: Side, rows_per_chunk: int):
    """(start, stop) ranges of ``side.rows`` of at most ``rows_per_chunk`` rows (images mode: whole images,
    at least one), with the chunk's image range in images mode."""
    if side.starts is None:
        for s in range(0, side.rows.size, rows_per_chunk):
            yield s, min(s + rows_per_chunk, side.rows.size), None
        return
    starts = side.starts
    i = 0
    while i < starts.size - 1:
        j = max(i + 1, int(np.searchsorted(starts, starts[i] + rows_per_chunk, side="right")) - 1)
        yield int(starts[i]), int(starts[j]), (i, j)
        i = j


def unit_activations(dictionary: Dictionary, store: ActivationStore, side: Side, aggregate: str = "max", *,
                     chunk_bytes: int = CHUNK_BYTES, progress: bool = False, desc: str = "encode") -> sp.csr_matrix:
    """(n_units, n_atoms) float64 CSR of ``dictionary``'s codes on the units of ``side``."""
    from tqdm.auto import tqdm

    if aggregate not in AGGREGATES:
        raise VitatlasError(f"unknown aggregate {aggregate!r}: use one of {', '.join(AGGREGATES)}")
    rows_per_chunk = max(1, chunk_bytes // (4 * int(dictionary.n_atoms)))
    parts = []
    with tqdm(total=int(side.rows.size), desc=desc, unit="row", disable=not progress) as bar:
        for lo, hi, images in _chunks(side, rows_per_chunk):
            codes = np.asarray(dictionary.encode(store.rows(side.rows[lo:hi])), dtype=np.float32)
            if images is not None:
                codes = aggregate_rows(codes, side.starts[images[0]:images[1]] - lo, aggregate)
            parts.append(sp.csr_matrix(codes).astype(np.float64))  # sparse first: no dense float64 copy
            bar.update(hi - lo)
    out = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
    out.sum_duplicates()
    return out
