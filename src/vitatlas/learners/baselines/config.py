"""The baselines' options: one frozen dataclass per baseline, fields with declared constraints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..options import Device, DType, Int, OptionError, Options, Real, option

_DEVICE = option("cpu", Device(), "'cpu' or 'cuda[:N]'")
_DTYPE = option("float32", DType(), "'float32' or 'float64'")
_SEED = option(0, Int(min=0), "random subset, initial atoms")


@dataclass(frozen=True)
class PCAConfig(Options):
    what: ClassVar[str] = "PCA"
    k: int = option(rule=Int(min=1), doc="components (= atoms, L0)")
    device: str = _DEVICE
    dtype: str = _DTYPE
    batch_size: int = option(8192, Int(min=1), "rows per streamed batch")


@dataclass(frozen=True)
class KMeansConfig(Options):
    what: ClassVar[str] = "k-means"
    n_atoms: int = option(rule=Int(min=1), doc="centroids")
    n_iter: int = option(15, Int(min=1), "Lloyd iterations")
    max_rows: int = option(16_384, Int(min=1), "rows fitted on (a fixed random subset)")
    seed: int = _SEED
    device: str = _DEVICE
    dtype: str = _DTYPE


def require_k_at_most_atoms(k: int, n_atoms: int) -> None:
    """OMP with k non-zeros needs at least k atoms."""
    if k > n_atoms:
        raise OptionError(f"k={k} non-zeros cannot exceed n_atoms={n_atoms}: lower k or add atoms")


@dataclass(frozen=True)
class RandomConfig(Options):
    what: ClassVar[str] = "a random dictionary"
    n_atoms: int = option(rule=Int(min=1), doc="atoms")
    k: int = option(rule=Int(min=1), doc="OMP non-zeros")
    seed: int = _SEED
    device: str = _DEVICE
    dtype: str = _DTYPE

    def check_rules(self) -> None:
        require_k_at_most_atoms(self.k, self.n_atoms)


@dataclass(frozen=True)
class SklearnDLConfig(Options):
    what: ClassVar[str] = "sklearn-dl"
    n_atoms: int = option(rule=Int(min=1), doc="atoms")
    k: int = option(rule=Int(min=1), doc="OMP non-zeros")
    alpha: float = option(0.1, Real(min=0, min_open=True), "sklearn's L1 weight while learning")
    max_iter: int = option(1, Int(min=1), "passes over the rows")
    batch_size: int = option(512, Int(min=1), "rows per mini-batch")
    max_rows: int = option(3072, Int(min=1), "rows fitted on (a fixed random subset)")
    cd_max_iter: int = option(30, Int(min=1), "coordinate-descent iterations per code while learning")
    seed: int = _SEED
    device: str = _DEVICE
    dtype: str = _DTYPE

    def check_rules(self) -> None:
        require_k_at_most_atoms(self.k, self.n_atoms)
