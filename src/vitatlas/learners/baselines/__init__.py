"""Baseline dictionaries (PCA, k-means, random, scikit-learn dictionary learning) for the same harness.

``dictionaries`` holds the four learners, ``config`` their option dataclasses.
"""

from .config import KMeansConfig, PCAConfig, RandomConfig, SklearnDLConfig
from .dictionaries import (
    BASELINES,
    KMeansBaseline,
    PCABaseline,
    RandomDictionary,
    SklearnDictionaryLearning,
    fit_rows,
    make_baseline,
    omp,
)

__all__ = ["BASELINES", "KMeansBaseline", "KMeansConfig", "PCABaseline", "PCAConfig", "RandomConfig",
           "RandomDictionary", "SklearnDLConfig", "SklearnDictionaryLearning", "fit_rows", "make_baseline", "omp"]
