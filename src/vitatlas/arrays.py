"""Input checking and the sparse-code form: the floor every other module stands on.

Nothing here knows about stores, learners or models: ``as_tensor`` turns whatever a user passes into
a checked (n, d) tensor with one-line errors, and ``SparseCodes`` is the (indices, values) form that
coders, learners and evaluation exchange.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from .errors import VitatlasError

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
        return to_dense(self.indices, self.values, self.n_atoms)

    @staticmethod
    def from_dense(codes: torch.Tensor) -> SparseCodes:
        nnz = (codes != 0).sum(dim=1)
        width = int(nnz.max().item()) if codes.shape[0] else 0
        # topk on |codes| puts the non-zeros first; positions past each row's nnz are padding.
        values, indices = torch.topk(codes.abs(), k=width, dim=1) if width else (codes[:, :0], codes[:, :0].long())
        values = torch.gather(codes, 1, indices)
        pad = torch.arange(width, device=codes.device).unsqueeze(0) >= nnz.unsqueeze(1)
        indices = indices.masked_fill(pad, -1)
        values = values.masked_fill(pad, 0)
        return SparseCodes(indices, values, codes.shape[1])


def to_dense(idx: torch.Tensor, val: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Padded sparse codes (B, k) with -1 padding -> dense (B, n_atoms)."""
    dense = torch.zeros(idx.shape[0], n_atoms + 1, dtype=val.dtype, device=val.device)
    # padding (-1) goes to the extra last column, which is dropped
    dense.scatter_add_(1, torch.where(idx >= 0, idx, n_atoms), val)
    return dense[:, :n_atoms]


# ---- input checking ------------------------------------------------------------------------------

def csr_tensor(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int],
               **kwargs) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without its once-per-process "beta" and "invariant checks" warnings.

    vitatlas uses CSR tensors as kernels (sparse codes, K-SVD patterns), so the warnings say nothing to
    its users. They are spent once, silenced (``spend_csr_warnings``), instead of wrapping every
    construction in ``warnings.catch_warnings``, which swaps process-wide state and is not safe on the
    coders' worker threads.
    """
    spend_csr_warnings()
    return torch.sparse_csr_tensor(crow, cols, values, size=size, **kwargs)


_csr_warnings_spent = False


def spend_csr_warnings() -> None:
    """Let torch's once-per-process CSR warnings fire now, silenced (call it before starting threads)."""
    global _csr_warnings_spent
    if not _csr_warnings_spent:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one = torch.ones(1)
            torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), one, size=(1, 1)) @ one.view(1, 1)
        _csr_warnings_spent = True


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
        raise not_2d(name, tuple(t.shape))
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


def not_2d(name: str, shape: tuple) -> VitatlasError:
    hint = " (use X.reshape(1, -1) for a single sample)" if len(shape) == 1 else ""
    return VitatlasError(f"{name} must be 2-D (n_samples, d), got shape {shape}{hint}")
