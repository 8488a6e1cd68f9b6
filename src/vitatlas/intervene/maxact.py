"""Each atom's maximum observed activation: the unit of relative edit values.

Normally it comes from the interpret pass (``atoms.jsonl``, field ``max_activation``); without one it is
computed here as a streamed max of the codes over a store, an array or a tensor (never the whole code
matrix in memory). Signed codes (K-SVD) also have a most negative activation; ``max_activations``
returns both so a caller can edit the negative side of an atom.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..arrays import ArrayLike
from ..data.batches import iter_batches, n_rows_and_width
from ..dictionary import Dictionary
from ..errors import VitatlasError


class RunningExtremes:
    """Running per-atom max and min of codes fed batch by batch."""

    def __init__(self, n_atoms: int):
        self.max = torch.zeros(n_atoms, dtype=torch.float64)
        self.min = torch.zeros(n_atoms, dtype=torch.float64)
        self.rows = 0

    def update(self, codes: torch.Tensor) -> None:
        if codes.shape[0] == 0:
            return
        c = codes.detach().to("cpu", torch.float64)
        self.max = torch.maximum(self.max, c.max(0).values)
        self.min = torch.minimum(self.min, c.min(0).values)
        self.rows += c.shape[0]


@torch.no_grad()
def max_activations(dictionary: Dictionary, X: ArrayLike, *, max_rows: int | None = None, batch_size: int = 4096,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(max (A,), min (A,)) of the codes of X's rows (a store is streamed); the first ``max_rows`` only."""
    dictionary._check_fitted()
    n, _ = n_rows_and_width(X)
    total = min(n, max_rows) if max_rows else n
    ext = RunningExtremes(dictionary.n_atoms)
    bar = tqdm(total=total, unit="row", desc="max activations", disable=not progress)
    for x in iter_batches(X, batch_size, shuffle=False, seed=0, device=dictionary.device, dtype=dictionary.dtype,
                          d=dictionary.d):
        x = x[: total - ext.rows]
        ext.update(dictionary._encode(x))
        bar.update(x.shape[0])
        if ext.rows >= total:
            break
    bar.close()
    return ext.max.numpy(), ext.min.numpy()


def from_cards(path: str | Path, n_atoms: int) -> np.ndarray:
    """``max_activation`` of every atom from an interpret output directory (atoms.jsonl)."""
    path = Path(path)
    file = path / "atoms.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise VitatlasError(f"no atoms.jsonl at {path}: pass the directory written by `vitatlas interpret`")
    values: list[Any] = []
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                peak = record["max_activation"]
                if peak is None and not record.get("frequency"):
                    peak = 0.0  # a dead atom never fired on the cards' store: no observed maximum, no edit size
                values.append(float(peak))
            except (ValueError, KeyError, TypeError):
                raise VitatlasError(f"{file} line {line_no} has no numeric max_activation") from None
    if len(values) != n_atoms:
        raise VitatlasError(f"{file} describes {len(values)} atoms but the dictionary has {n_atoms}: "
                            "use the cards of this run")
    return np.asarray(values, dtype=np.float64)
