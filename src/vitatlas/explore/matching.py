"""Match the atoms of two runs for the compare page: by decoder cosine or by behaviour.

Decoder cosine (|cos| of unit atoms, blocked: ``evaluation.compare.decoder``) is what two dictionaries
fitted on one store are compared by: their atoms are vectors of one space. Runs fitted on different
stores — even of one model, layer and token kind — are matched the way ``vitatlas compare`` matches
them, by how their atoms fire on the same images (``evaluation.compare``), since that is the one
measure that means the same thing for every pair of runs. ``choose_matching`` says which, and why.
"""

from __future__ import annotations

import numpy as np

from ..dictionary import Dictionary
from ..evaluation.compare import decoder_best_matches, decoder_space_mismatch

DECODER = "decoder-cosine"
BEHAVIOUR = "behaviour"


def best_matches(atoms_a, atoms_b, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(index into b, signed cosine) of the best |cosine| match in ``atoms_b`` for every row of ``atoms_a``."""
    return decoder_best_matches(atoms_a, atoms_b, block)


def choose_matching(a: Dictionary, b: Dictionary) -> tuple[str, str]:
    """(``DECODER`` or ``BEHAVIOUR``, a one-line reason the page shows)."""
    reason = decoder_space_mismatch(a, b)
    if reason is not None:
        return BEHAVIOUR, f"{reason}, so decoder cosine would mean nothing"
    pa, pb = ((getattr(d, "fit_info", None) or {}).get("path") for d in (a, b))
    if pa is not None and pb is not None and pa != pb:
        return BEHAVIOUR, "the runs were fitted on different stores"
    return DECODER, "both runs are dictionaries of one activation space (fitted on the same store)"


def matched_pairs(idx_ab: np.ndarray, cos_ab: np.ndarray, idx_ba: np.ndarray, limit: int = 200) -> list[dict]:
    """The best-matched atom pairs, most similar first, flagging mutual best matches."""
    order = np.argsort(-np.abs(cos_ab), kind="stable")[:limit]
    return [{"a": int(i), "b": int(idx_ab[i]), "cosine": round(float(cos_ab[i]), 4),
             "mutual": bool(idx_ba[idx_ab[i]] == i)} for i in order]


def behaviour_pairs(comparison, limit: int = 200) -> list[dict]:
    """A's atoms by best behaviour score (untestable atoms last), with their match, r, mutual and shared."""
    m = comparison.matches[0]
    score = np.nan_to_num(m.score, nan=-1.0)
    order = np.argsort(-score, kind="stable")[:limit]
    mut, shared = comparison.mutual(0), comparison.shared(0)
    return [{"a": int(i), "b": int(m.match[i]) if m.match[i] >= 0 else None,
             "score": round(float(m.score[i]), 4) if np.isfinite(m.score[i]) else None,
             "correlation": round(float(m.correlation[i]), 4) if np.isfinite(m.correlation[i]) else None,
             "mutual": bool(mut[i]), "shared": bool(shared[i])} for i in order]
