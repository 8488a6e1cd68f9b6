"""Match the atoms of two dictionaries: for every atom of one, the most similar atom of the other.

Similarity is |cosine| between unit atoms (a K-SVD atom used with a negative sign is the same
direction), computed in blocks so two 16,384-atom dictionaries never need a 16k x 16k matrix at once.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def best_matches(atoms_a: torch.Tensor, atoms_b: torch.Tensor, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(index into b, signed cosine) of the best |cosine| match in ``atoms_b`` for every row of ``atoms_a``."""
    a = torch.nn.functional.normalize(atoms_a.detach().float().cpu(), dim=1)
    b = torch.nn.functional.normalize(atoms_b.detach().float().cpu(), dim=1)
    idx = np.empty(a.shape[0], np.int64)
    cos = np.empty(a.shape[0], np.float64)
    for s in range(0, a.shape[0], block):
        sims = a[s:s + block] @ b.T
        best = sims.abs().argmax(dim=1)
        idx[s:s + block] = best.numpy()
        cos[s:s + block] = sims.gather(1, best[:, None])[:, 0].double().numpy()
    return idx, cos


def matched_pairs(idx_ab: np.ndarray, cos_ab: np.ndarray, idx_ba: np.ndarray, limit: int = 200) -> list[dict]:
    """The best-matched atom pairs, most similar first, flagging mutual best matches."""
    order = np.argsort(-np.abs(cos_ab), kind="stable")[:limit]
    return [{"a": int(i), "b": int(idx_ab[i]), "cosine": round(float(cos_ab[i]), 4),
             "mutual": bool(idx_ba[idx_ab[i]] == i)} for i in order]
