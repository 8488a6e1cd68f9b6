"""Tolerances for comparing two float computations that are not the same one.

BLAS picks its kernel (blocking, FMA order, vector width) by the matrix shapes, the thread count and the
CPU, so X @ Dᵀ computed in chunks of 7 rows and in one call can differ in the last bit on one machine and
agree on another (seen: 138 of 2,400 values one float32 ulp apart on an Intel Xeon, none on AMD EPYC).
Where two results come from different shapes, tests compare them within the classic a-priori bound for
a floating-point dot product instead of bit for bit: |fl(x·y) − x·y| ≤ γ_n Σ|x_i y_i|, γ_n = n·u/(1 − n·u)
(Higham, Accuracy and Stability of Numerical Algorithms, §3.1). Two such results differ by at most twice
that. Exact equality stays where the computation is literally repeated (save/load, resume, seeds).
"""

from __future__ import annotations

import numpy as np


def gamma(n: int, dtype=np.float32) -> float:
    u = np.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def product_tolerance(X: np.ndarray, D: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Elementwise bound on the difference of two evaluations of X @ Dᵀ in ``dtype``: (n, n_atoms)."""
    X64, D64 = np.abs(np.asarray(X, np.float64)), np.abs(np.asarray(D, np.float64))
    return 2 * gamma(X64.shape[1], dtype) * (X64 @ D64.T)
