"""DBK-SVD's options: one frozen dataclass whose fields declare their constraints (see ``options``).

    >>> DBKSVDConfig(n_atoms=64, k=4, coder="mp").coder
    'mp'
    >>> DBKSVDConfig(n_atoms=64, k=4, candidates=0)
    Traceback (most recent call last):
    ...
    vitatlas.errors.OptionError: candidates must be one of 'auto' or a positive integer or None (exact coding), got 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..options import (
    Choice,
    Device,
    DType,
    Either,
    Flag,
    Int,
    Ints,
    Options,
    Real,
    option,
    require_enough_atoms,
    require_prefix_sizes,
)
from .coders import CODERS

# What runs and checkpoints saved before an option existed did: a saved config without the key means this.
LEGACY_VALUES = {"center": False, "nonnegative": False, "dup_threshold": 0.97}


@dataclass(frozen=True)
class DBKSVDConfig(Options):
    """DBK-SVD's options (all JSON-able; ``DBKSVD._config()`` returns these fields)."""

    what: ClassVar[str] = "DBK-SVD"
    n_atoms: int = option(rule=Int(min=1), doc="number of atoms")
    k: int = option(rule=Int(min=1), doc="atoms per sample")
    coder: str = option("omp", Choice(tuple(CODERS), what="coder"),
                        "'omp' (Batch-OMP) or 'mp' (matching pursuit, up to mp_steps = 4k steps)")
    epochs: int | None = option(None, Int(min=1, optional=True), "passes over the data (None: >= 160 iterations)")
    sample_batch: int | None = option(None, Int(min=1, optional=True),
                                      "samples per iteration (None: 8·n_atoms in [4096, 2²⁸/n_atoms])")
    atom_batch: int | None = option(None, Int(min=1, optional=True),
                                    "atoms updated in parallel against one snapshot (None: n_atoms / 8)")
    n_power: int = option(2, Int(min=1), "power-iteration steps of the rank-1 update")
    memory: float = option(3.0, Real(min=0), "weight of an atom's old direction in its update, in units of this "
                           "batch's energy along it, ramped up from 0 over the fit (0: plain K-SVD)")
    stop_tol: float = option(1e-4, Real(min=0, max=1, max_open=True),
                             "end a stage once the atoms move less than this (median 1 − |cos| between iterations) "
                             "for 3 iterations in a row in which no atom was re-drawn; 0: run every iteration")
    center: bool = option(True, Flag(), "subtract the data mean before coding (kept as the decoder bias ``b_dec``, "
                          "added back by decode), as an SAE's b_dec")
    nonnegative: bool = option(True, Flag(), "codes >= 0: each atom is one direction (coders pick the largest "
                               "positive correlation; the K-SVD update keeps the codes >= 0)")
    dup_threshold: float = option(0.7, Real(min=0, max=1, min_open=True),
                                  "re-draw the less used atom of any pair with |cos| above this (runs saved "
                                  "without it: 0.97)")
    approx: bool = option(False, Flag(), "AK-SVD (one step from the codes)")
    refit: bool = option(True, Flag(), "least-squares refit after matching pursuit")
    tol: float = option(0.0, Real(min=0, max=1, max_open=True), "stop coding a sample at this relative residual")
    mp_steps: int | None = option(None, Int(min=1, optional=True), "matching-pursuit steps (None: 4k)")
    candidates: int | str | None = option("auto", Either((Choice(("auto",)), Int(min=1)), optional=True,
                                                         none_means="exact coding"),
                                          "screening width while fitting ('auto': max(4k, 64); None: exact)")
    groups: tuple[int, ...] | None = option(None, Ints(min=1, optional=True), "Matryoshka prefix sizes")
    device: str = option("cpu", Device(), "'cpu' or 'cuda[:N]'")
    dtype: str = option("float32", DType(), "'float32' or 'float64'")
    seed: int = option(0, Int(min=0), "initial atoms, shuffling and re-drawn atoms")
    checkpoint_every: int = option(20, Int(min=1), "iterations between checkpoints")

    def check_rules(self) -> None:
        require_enough_atoms(self.k, self.n_atoms)
        require_prefix_sizes(self.groups, self.n_atoms, "n_atoms", first_at_least=self.k)
