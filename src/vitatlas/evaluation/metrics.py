"""Reconstruction, sparsity and coherence metrics, accumulated over streamed batches.

Definitions (names as in DESIGN.md; x is one row, x̂ its reconstruction ``decode(encode(x))``, n rows,
d the width, A the number of atoms):

- ``signal_recovered`` = 1 − mean over rows with ‖x‖ > 0 of ‖x − x̂‖ / ‖x‖
- ``explained_variance`` = 1 − Σ‖x − x̂‖² / Σ‖x − mean‖²  (mean = the evaluated rows' mean; the
  denominator is accumulated exactly in one pass with Chan's pairwise merge of per-batch means)
- ``mse`` = Σ‖x − x̂‖² / (n·d)  (mean squared error per coordinate)
- ``l0`` = mean number of non-zero codes per row (``l0_median``: their median, from an exact streamed
  histogram of the per-row counts)
- ``dead_fraction`` = fraction of atoms whose code is never non-zero on the evaluated rows
- ``dense_fraction`` = fraction of atoms non-zero on more than 1% of the rows
- ``max_coherence`` = max over atom pairs i ≠ j of |⟨a_i, a_j⟩| / (‖a_i‖‖a_j‖) (None for one atom)
- ``near_duplicate_pairs`` = number of atom pairs {i, j} with |cos(a_i, a_j)| > 0.9 (``DUPLICATE_COS``),
  ``near_duplicate_atoms`` = fraction of atoms in at least one such pair
- frequency histogram: per-atom firing frequency (fraction of rows with a non-zero code) in
  log-spaced bins, 4 per decade from 10^floor(log10(1/n)) to 1; dead atoms are counted apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import distributed
from ..data.batches import iter_rank_batches

DENSE_THRESHOLD = 0.01
DUPLICATE_COS = 0.9


@dataclass
class ReconstructionStats:
    """Streaming sums for the reconstruction and sparsity metrics (all float64)."""

    n_atoms: int
    n: int = 0
    n_nonzero_rows: int = 0
    ratio_sum: float = 0.0
    sse: float = 0.0
    d: int = 0
    mean: torch.Tensor | None = None  # running mean of x, (d,)
    m2: float = 0.0  # running Σ‖x − mean‖²
    nnz_sum: float = 0.0
    fires: torch.Tensor = field(default=None)  # (A,) int64 rows where each atom is non-zero
    nnz_hist: torch.Tensor = field(default=None)  # (A+1,) int64 rows with 0..A non-zeros

    def __post_init__(self):
        if self.fires is None:
            self.fires = torch.zeros(self.n_atoms, dtype=torch.int64)
        if self.nnz_hist is None:
            self.nnz_hist = torch.zeros(self.n_atoms + 1, dtype=torch.int64)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        """x, x_hat: (B, d); codes: (B, A) dense."""
        x = x.double()
        err = x - x_hat.double()
        norm_x = x.norm(dim=1)
        ok = norm_x > 0
        self.ratio_sum += float((err.norm(dim=1)[ok] / norm_x[ok]).sum())
        self.n_nonzero_rows += int(ok.sum())
        self.sse += float((err * err).sum())
        # Chan et al.'s merge of (count, mean, M2) keeps Σ‖x − mean‖² exact without a second pass
        b = x.shape[0]
        b_mean = x.mean(0)
        b_m2 = float(((x - b_mean) ** 2).sum())
        if self.n == 0:
            self.mean, self.m2, self.d = b_mean.cpu(), b_m2, x.shape[1]
        else:
            delta = b_mean.cpu() - self.mean
            tot = self.n + b
            self.m2 += b_m2 + float((delta * delta).sum()) * self.n * b / tot
            self.mean = self.mean + delta * (b / tot)
        self.n += b
        nz = codes != 0
        per_row = nz.sum(1).cpu()
        self.nnz_sum += float(per_row.sum())
        self.nnz_hist += torch.bincount(per_row, minlength=self.n_atoms + 1)
        self.fires += nz.sum(0).cpu()

    def all_reduce_(self) -> ReconstructionStats:
        """Combine the sums of every rank's rows (torchrun) so each rank holds the whole data's; in place.

        Counts and sums are all-reduced; the (count, mean, M2) triples are merged in rank order with the
        same pairwise formula as ``update``. A no-op for one process.
        """
        if not distributed.world().distributed:
            return self
        sums = torch.tensor([self.n_nonzero_rows, self.ratio_sum, self.sse, self.nnz_sum], dtype=torch.float64)
        distributed.all_reduce_(sums)
        self.n_nonzero_rows, self.ratio_sum, self.sse, self.nnz_sum = int(sums[0]), *map(float, sums[1:])
        distributed.all_reduce_(self.fires)
        distributed.all_reduce_(self.nnz_hist)
        parts = distributed.all_gather_object(
            (self.n, self.d, None if self.mean is None else self.mean.numpy(), self.m2))
        self.n, self.mean, self.m2 = 0, None, 0.0
        for n_b, d_b, mean_b, m2_b in parts:
            if n_b == 0:
                continue
            mean_b = torch.from_numpy(mean_b)
            if self.n == 0:
                self.n, self.d, self.mean, self.m2 = n_b, d_b, mean_b, m2_b
                continue
            delta = mean_b - self.mean
            tot = self.n + n_b
            self.m2 += m2_b + float((delta * delta).sum()) * self.n * n_b / tot
            self.mean = self.mean + delta * (n_b / tot)
            self.n = tot
        return self

    def result(self) -> dict:
        n = max(self.n, 1)
        freq = (self.fires.double() / n).numpy()
        return {
            "signal_recovered": 1.0 - self.ratio_sum / self.n_nonzero_rows if self.n_nonzero_rows else float("nan"),
            "explained_variance": 1.0 - self.sse / self.m2 if self.m2 > 0 else float("nan"),
            "mse": self.sse / (n * max(self.d, 1)),
            "l0": self.nnz_sum / n,
            "l0_median": self._median_nnz(),
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((freq > DENSE_THRESHOLD).mean()),
        }

    def _median_nnz(self) -> float:
        """Median of the per-row non-zero counts (mean of the two middle ones for an even count)."""
        if self.n == 0:
            return float("nan")
        cum = torch.cumsum(self.nnz_hist, 0)
        lo = int(torch.searchsorted(cum, torch.tensor((self.n - 1) // 2), right=True))
        hi = int(torch.searchsorted(cum, torch.tensor(self.n // 2), right=True))
        return (lo + hi) / 2

    @property
    def frequency(self) -> np.ndarray:
        """(A,) fraction of rows on which each atom fired."""
        return (self.fires.double() / max(self.n, 1)).numpy()


@torch.no_grad()
def reconstruction_metrics(model, X, batch_size: int = 4096) -> dict:
    """The reconstruction and sparsity metrics of any fitted Dictionary over all of X (an array, a
    tensor or an ActivationStore) in one streamed pass; the definitions are this module's docstring.
    What the fit commands print and what ``vitatlas.evaluate`` reports come from the same sums.

    Under torchrun every rank must call it: each streams its contiguous part of the rows and the sums
    are combined (``ReconstructionStats.all_reduce_``), so every rank returns the whole data's metrics.
    """
    model._check_fitted()
    stats = ReconstructionStats(int(model.n_atoms))
    _, batches = iter_rank_batches(X, batch_size, device=model.device, dtype=model.dtype, d=model.d)
    for x in batches:
        codes = model._encode(x)
        stats.update(x, model._decode(codes), codes)
    return stats.all_reduce_().result()


def max_coherence(atoms: torch.Tensor, chunk: int = 4096) -> float | None:
    """Largest |cos| between two distinct atoms; rows are compared in chunks (memory O(chunk·A)).

    Zero atoms are ignored. Returns None when fewer than two non-zero atoms exist.
    """
    a = atoms.detach().double().cpu()
    norms = a.norm(dim=1)
    a = a[norms > 0] / norms[norms > 0].unsqueeze(1)
    m = a.shape[0]
    if m < 2:
        return None
    best = 0.0
    for s in range(0, m, chunk):
        g = (a[s:s + chunk] @ a.T).abs_()
        idx = torch.arange(s, min(s + chunk, m))
        g[idx - s, idx] = 0.0  # an atom with itself is not a pair
        best = max(best, float(g.max()))
    return min(best, 1.0)


def near_duplicates(atoms: torch.Tensor, threshold: float = DUPLICATE_COS, chunk: int = 4096) -> dict:
    """``near_duplicate_pairs`` (pairs i < j with |cos| > threshold) and ``near_duplicate_atoms`` (fraction of
    all atoms in such a pair); zero atoms are in no pair. Chunked like ``max_coherence``."""
    a = atoms.detach().double().cpu()
    n_all = a.shape[0]
    norms = a.norm(dim=1)
    a = a[norms > 0] / norms[norms > 0].unsqueeze(1)
    m = a.shape[0]
    pairs, involved = 0, torch.zeros(m, dtype=torch.bool)
    for s in range(0, m, chunk):
        close = (a[s:s + chunk] @ a.T).abs_() > threshold
        idx = torch.arange(s, min(s + chunk, m))
        close[idx - s, idx] = False
        pairs += int(close.sum())
        involved[s:s + chunk] |= close.any(1)
    return {"near_duplicate_pairs": pairs // 2, "near_duplicate_atoms": float(involved.sum()) / max(n_all, 1)}


def frequency_histogram(freq: np.ndarray, n_rows: int, per_decade: int = 4) -> dict:
    """Log-spaced histogram of per-atom firing frequencies; dead atoms (frequency 0) counted apart."""
    lo = math.floor(math.log10(1.0 / max(n_rows, 1)))
    edges = np.logspace(lo, 0, num=(-lo) * per_decade + 1) if lo < 0 else np.array([0.1, 1.0])
    alive = freq[freq > 0]
    counts, _ = np.histogram(np.clip(alive, edges[0], edges[-1]), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist(), "n_dead": int((freq == 0).sum())}


def rank_columns(scores: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) of each column, float64."""
    from scipy.stats import rankdata

    return rankdata(scores, axis=0, method="average")


def auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per-column AUROC of ``scores`` (n, m) for the boolean targets ``positive`` (n, m) or (n,).

    Mann–Whitney form: (Σ ranks of positives − P(P+1)/2) / (P·N), ties counted as one half, exactly
    sklearn's ``roc_auc_score``. Columns without both positives and negatives give NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    pos = np.asarray(positive, dtype=bool)
    if pos.ndim == 1:
        pos = np.broadcast_to(pos[:, None], scores.shape)
    ranks = rank_columns(scores)
    n_pos = pos.sum(0).astype(np.float64)
    n_neg = scores.shape[0] - n_pos
    rank_sum = (ranks * pos).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def auroc_for_labels(scores: np.ndarray, row_labels: np.ndarray, atom_labels: np.ndarray,
                     chunk: int = 256) -> np.ndarray:
    """AUROC of column a of ``scores`` (n, A) for the target ``row_labels == atom_labels[a]``.

    Columns with atom label < 0 give NaN. Ranks are computed ``chunk`` columns at a time, and the
    positives' rank sums come from one (n, C)ᵀ @ (n, chunk) product per chunk.
    """
    n, m = scores.shape
    out = np.full(m, np.nan)
    classes = np.unique(row_labels)
    onehot = (row_labels[:, None] == classes[None, :]).astype(np.float64)  # (n, C)
    counts = onehot.sum(0)
    col_of = {int(c): i for i, c in enumerate(classes)}
    todo = np.nonzero(atom_labels >= 0)[0]
    for s in range(0, todo.size, chunk):
        cols = todo[s:s + chunk]
        ranks = rank_columns(np.asarray(scores[:, cols], dtype=np.float64))
        sums = onehot.T @ ranks  # (C, len(cols))
        for j, a in enumerate(cols):
            ci = col_of.get(int(atom_labels[a]))
            if ci is None:
                continue
            p = counts[ci]
            q = n - p
            if p > 0 and q > 0:
                out[a] = (sums[ci, j] - p * (p + 1) / 2) / (p * q)
    return out
