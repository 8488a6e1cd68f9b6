"""Match atoms by behaviour: the Pearson correlation of two atoms' activations over the same units.

For every atom of A its best match in B is the atom with the largest |r| (and the other way round);
|r| is the score (a K-SVD atom used with the opposite sign is the same concept), the signed r is kept.
A match is mutual when each atom is the other's best match. Atoms that fire on fewer than
``min_active`` units (or never vary) are *untestable*: with a handful of non-zeros any two of them can
correlate by chance, so they get no match (index -1, score NaN).

The A x B correlation matrix is never held whole: A's atoms go in blocks of about ``block_bytes`` of
float64 scores against all of B (a sparse product), and each block leaves its row maxima (A's best
matches) and updates the running column maxima (B's best matches). Memory is the two sparse activation
matrices plus one block (and the sparse product it comes from): 16,384 x 16,384 atoms over 100k units
with 64 non-zeros a unit peaked at 1.5 GB and took 64 s a pass on 2 shared cores (benchmarks/compare.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

BLOCK_BYTES = 256 << 20


@dataclass
class BestMatches:
    """For each atom of one side: its best match on the other (-1: untestable) and the signed r."""

    match: np.ndarray        # (n,) int64
    correlation: np.ndarray  # (n,) float64, NaN for untestable atoms

    @property
    def score(self) -> np.ndarray:
        return np.abs(self.correlation)


def column_stats(X: sp.csr_matrix, min_active: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: mean, standard deviation (population) and whether it is testable."""
    n = X.shape[0]
    mean = np.asarray(X.sum(axis=0)).ravel() / n
    sq = np.asarray(X.multiply(X).sum(axis=0)).ravel() / n
    std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    active = np.bincount(X.indices[X.data != 0], minlength=X.shape[1])
    # a std at float noise level is a constant column (centring cancels to rounding error)
    testable = (active >= min_active) & (std > 1e-12 * np.maximum(np.sqrt(sq), 1e-300))
    return mean, std, testable


def active_counts(X: sp.csr_matrix) -> np.ndarray:
    return np.bincount(X.indices[X.data != 0], minlength=X.shape[1])


def best_correlations(A: sp.csr_matrix, B: sp.csr_matrix, *, min_active: int = 5, block_bytes: int = BLOCK_BYTES,
                      progress: bool = False, desc: str = "match") -> tuple[BestMatches, BestMatches]:
    """Best |r| matches of A's atoms in B and of B's atoms in A; rows of A and B are the same units."""
    from tqdm.auto import tqdm

    n, na, nb = A.shape[0], A.shape[1], B.shape[1]
    mean_a, std_a, ok_a = column_stats(A, min_active)
    mean_b, std_b, ok_b = column_stats(B, min_active)
    inv_b = np.where(ok_b, 1.0 / np.where(ok_b, std_b, 1.0), 0.0)  # untestable columns score 0, never win
    At = A.T.tocsr()
    a_match, a_r = np.full(na, -1, np.int64), np.full(na, np.nan)
    b_match, b_r, b_best = np.full(nb, -1, np.int64), np.full(nb, np.nan), np.full(nb, -1.0)
    block = max(1, block_bytes // (8 * max(nb, 1)))
    for s in tqdm(range(0, na, block), desc=desc, unit="block", disable=not progress):
        e = min(s + block, na)
        prod = (At[s:e] @ B).toarray()
        prod /= n
        prod -= mean_a[s:e, None] * mean_b[None, :]          # covariance
        inv_a = np.where(ok_a[s:e], 1.0 / np.where(ok_a[s:e], std_a[s:e], 1.0), 0.0)
        prod *= inv_a[:, None]
        prod *= inv_b[None, :]
        np.clip(prod, -1.0, 1.0, out=prod)                   # rounding can step just past +-1
        absr = np.abs(prod)
        rows = np.arange(e - s)
        best = absr.argmax(axis=1)
        live = ok_a[s:e]
        a_match[s:e] = np.where(live, best, -1)
        a_r[s:e] = np.where(live, prod[rows, best], np.nan)
        col = absr.argmax(axis=0)
        col_val = absr[col, np.arange(nb)]
        better = col_val > b_best
        b_best[better] = col_val[better]
        b_match[better] = col[better] + s
        b_r[better] = prod[col[better], np.flatnonzero(better)]
    # a B atom is unmatched when it is untestable, or when only untestable A atoms (score 0) were left
    bad = ~ok_b | (b_match < 0) | ~ok_a[np.clip(b_match, 0, None)]
    b_match[bad] = -1
    b_r[bad] = np.nan
    return BestMatches(a_match, a_r), BestMatches(b_match, b_r)


def mutual(ab: BestMatches, ba: BestMatches) -> np.ndarray:
    """(n_a,) bool: atom i of A and its best match j in B are each other's best match."""
    ok = ab.match >= 0
    out = np.zeros(ab.match.size, bool)
    out[ok] = ba.match[ab.match[ok]] == np.flatnonzero(ok)
    return out


def null_threshold(null_scores: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of best-match scores against shuffled images (untestable atoms left out)."""
    finite = null_scores[np.isfinite(null_scores)]
    return float(np.quantile(finite, quantile)) if finite.size else float("nan")
