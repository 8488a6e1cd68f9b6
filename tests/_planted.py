"""Planted sparse-coding problems with known atoms, shared by the learner tests."""

from __future__ import annotations

import numpy as np


def planted(n: int = 8192, d: int = 64, m: int = 256, k: int = 4, noise: float = 0.01, seed: int = 0, *,
            low: float = 0.5, high: float = 2.0, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """X (n, d) float32 = k-sparse codes @ m random unit atoms + Gaussian noise; returns (X, atoms (m, d)).

    Code magnitudes are uniform in [low, high]; ``signed`` gives them random signs (K-SVD), otherwise
    they are non-negative (what ReLU-family SAEs can represent).
    """
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((m, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, m)), axis=1)[:, :k]
    vals = rng.uniform(low, high, (n, k))
    if signed:
        vals *= rng.choice([-1, 1], (n, k))
    X = np.einsum("nk,nkd->nd", vals, atoms[idx]) + noise * rng.standard_normal((n, d))
    return X.astype(np.float32), atoms


def recovered(learned: np.ndarray, true: np.ndarray, threshold: float = 0.99) -> float:
    """Share of true atoms whose best learned match has |cos| >= threshold."""
    learned = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    return float((np.abs(true @ learned.T).max(1) >= threshold).mean())
