"""The metrics the fit commands print: measured on a fixed sample of the store's rows.

Encoding a whole store again after a fit costs as much as a good part of the fit (measured: 63 s after a
26 s DBK-SVD fit on the demo's 384k rows); a fixed sample of 65,536 rows gives the same figures to about
three digits. ``vitatlas eval`` is the full evaluation.
"""

from __future__ import annotations

import numpy as np

FIT_METRIC_ROWS = 65_536


def metric_sample(store, max_rows: int = FIT_METRIC_ROWS, seed: int = 0):
    """(rows to measure on, what they are): the whole store, or the same fixed random rows on every rank."""
    n = store.n_rows
    if n <= max_rows:
        return store, f"all {n:,} rows"
    ids = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    return store.rows(ids), f"{max_rows:,} sampled rows of {n:,}"
