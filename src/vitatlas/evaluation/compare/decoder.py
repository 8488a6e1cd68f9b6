"""Match atoms by decoder cosine: meaningful only for two dictionaries of one activation space.

Similarity is |cosine| between unit atoms (a K-SVD atom used with a negative sign is the same
direction), computed in blocks so two 16,384-atom dictionaries never need a 16k x 16k matrix at once.
``decoder_matches`` refuses dictionaries of different spaces with the reason (``space``).
"""

from __future__ import annotations

import numpy as np
import torch

from ...dictionary import Dictionary
from ...errors import VitatlasError
from .space import decoder_space_mismatch


@torch.no_grad()
def decoder_best_matches(atoms_a: torch.Tensor, atoms_b: torch.Tensor, block: int = 2048
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(index into b, signed cosine) of the best |cosine| match in ``atoms_b`` for every row of ``atoms_a``."""
    a = torch.nn.functional.normalize(atoms_a.detach().float().cpu(), dim=1)
    b = torch.nn.functional.normalize(atoms_b.detach().float().cpu(), dim=1)
    if a.shape[1] != b.shape[1]:
        raise VitatlasError(f"decoder cosine needs atoms of one width, got {a.shape[1]} and {b.shape[1]}")
    idx = np.empty(a.shape[0], np.int64)
    cos = np.empty(a.shape[0], np.float64)
    for s in range(0, a.shape[0], block):
        sims = a[s:s + block] @ b.T
        best = sims.abs().argmax(dim=1)
        idx[s:s + block] = best.numpy()
        cos[s:s + block] = sims.gather(1, best[:, None])[:, 0].double().numpy()
    return idx, cos


def decoder_matches(a: Dictionary, b: Dictionary) -> tuple[np.ndarray, np.ndarray]:
    """``decoder_best_matches`` of two dictionaries, refused (one line) when their spaces differ."""
    reason = decoder_space_mismatch(a, b)
    if reason is not None:
        raise VitatlasError(f"decoder cosine compares atoms of one activation space, but {reason}: match them by "
                            "behaviour on the same images (`vitatlas compare`)")
    return decoder_best_matches(a.atoms, b.atoms)
