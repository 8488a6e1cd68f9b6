"""Baseline dictionaries that run through the same evaluation harness as DBK-SVD and the SAEs.

Every baseline is a ``Dictionary`` (unit-norm atoms, encode, decode, save / ``vitatlas.load``):

- ``PCABaseline(k)`` (learner ``"pca"``): the top-k principal directions of the centred data. Dense
  codes, so L0 = k and n_atoms = k. ``encode(x) = (x - mean) @ Vᵀ``, ``decode(c) = c @ V + mean``: the
  best reconstruction any k-dimensional affine subspace gives (dense, so not a sparse dictionary).
- ``KMeansBaseline(n_atoms)`` (learner ``"kmeans"``): vector quantisation, L0 = 1. Lloyd's k-means on
  the data gives centroids c_j; atom j is the unit direction of ``c_j - mean`` and a sample's code is
  ``‖c_j - mean‖`` at its nearest centroid j (Euclidean), 0 elsewhere, so ``decode`` returns exactly
  that centroid (``decode(c) = c @ atoms + mean``).
- ``RandomDictionary(n_atoms, k)`` (learner ``"random"``): unit Gaussian random atoms coded by OMP with
  exactly k non-zeros: the floor any learnt dictionary must beat.
- ``SklearnDictionaryLearning(n_atoms, k)`` (learner ``"sklearn-dl"``): scikit-learn's
  ``MiniBatchDictionaryLearning`` (online L1 dictionary learning, coordinate descent) learns the atoms;
  codes are OMP with k non-zeros (what sklearn's ``transform_algorithm="omp"`` computes; here the
  batched torch OMP below, which is checked against sklearn's in the tests).

k-means and sklearn-dl fit in memory on at most ``max_rows`` rows (a fixed random subset, seed
``seed``) of a store, so that a baseline stays cheap next to the learners it is compared with
(k-means: 16,384 rows, 15 Lloyd iterations, random data rows as initial centroids, empty clusters
re-seeded on the worst-served rows; about 4 s for 5,000 × 384 rows and 1,536 centroids on 2 cores);
sklearn-dl is capped harder (default 3,072 rows, one pass in batches of 512, at most 30 coordinate-descent
iterations per sparse code while learning, atoms initialised on data rows): with 1,536 atoms a batch of 512
costs 1.5–3.5 s on one core, so the default fit took 9–11 s here (5,000 × 384 rows, 1,536 atoms, k = 8).

Each baseline's options are a frozen dataclass (``PCAConfig``, ``KMeansConfig``, ``RandomConfig``,
``SklearnDLConfig`` in ``baselines.config``) checked by ``options.check_options``; the classes are thin
wrappers over them.

    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    >>> pca = PCABaseline(3).fit(X)
    >>> pca.encode(X).shape, pca.config
    ((200, 3), PCAConfig(k=3, device='cpu', dtype='float32', batch_size=8192))
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ...arrays import ArrayLike, as_tensor
from ...data.batches import iter_batches, n_rows_and_width, rows_of
from ...dictionary import Dictionary
from ...errors import VitatlasError
from ..dbksvd.coders import code, to_dense
from ..options import Options, resolve_dtype
from .config import KMeansConfig, PCAConfig, RandomConfig, SklearnDLConfig


def fit_rows(X: ArrayLike, max_rows: int, seed: int) -> np.ndarray:
    """(m, d) float32 rows to fit on: all of X, or a fixed random subset of ``max_rows`` rows."""
    n, _ = n_rows_and_width(X)
    if n == 0:
        raise VitatlasError("X is empty (0 rows): pass at least one sample")
    ids = np.arange(n)
    if n > max_rows:
        ids = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    return as_tensor(rows_of(X, ids)).numpy()


@torch.no_grad()
def omp(x: torch.Tensor, atoms: torch.Tensor, k: int, *, chunk: int = 2048,
        gram: torch.Tensor | None = None) -> torch.Tensor:
    """Exact OMP: dense codes (B, n_atoms) with at most k non-zeros per row; k is clipped to
    min(n_atoms, d). The coder is DBK-SVD's Batch-OMP (``coders.batch_omp``, checked against sklearn)
    without screening; pass ``gram`` = atoms @ atomsᵀ to reuse it across calls."""
    k = min(int(k), *atoms.shape)
    G = atoms @ atoms.T if gram is None else gram
    idx, val = code(x @ atoms.T, G, torch.linalg.vector_norm(x, dim=1) ** 2, k, chunk=chunk)
    return to_dense(idx, val, atoms.shape[0])


class _Baseline(Dictionary):
    """Shared plumbing: the options dataclass, device/dtype and the saved tensors."""

    options: ClassVar[type[Options]]

    def _setup(self, **values) -> None:
        self.config = self.options.from_dict(values)
        self.device, self.dtype = self.config.device, resolve_dtype(self.config.dtype)
        self.d = None
        self.fit_info = {}
        self._atoms: torch.Tensor | None = None

    @property
    def n_atoms(self) -> int:  # type: ignore[override]
        return self.config.n_atoms

    @property
    def seed(self) -> int:
        return self.config.seed

    def _config(self) -> dict:
        return self.config.to_dict()

    @property
    def atoms(self) -> torch.Tensor:
        self._check_fitted()
        return self._atoms

    def _state(self) -> dict[str, torch.Tensor]:
        return {"atoms": self._atoms}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._atoms = tensors["atoms"].to(self.device, self.dtype)


class PCABaseline(_Baseline):
    """Top-k principal directions; dense codes (L0 = k). Exact: mean and scatter in float64, two passes."""

    learner = "pca"
    options = PCAConfig

    def __init__(self, k: int, **options):
        self._setup(k=k, **options)
        self._mean: torch.Tensor | None = None

    @property
    def n_atoms(self) -> int:  # type: ignore[override]
        return self.config.k

    @property
    def k(self) -> int:
        return self.config.k

    def fit(self, X: ArrayLike, *, progress: bool = False, **_) -> PCABaseline:
        n, d = n_rows_and_width(X)
        if self.k > d:
            raise VitatlasError(f"PCA with k={self.k} components needs k <= d={d}: lower k")
        total = torch.zeros(d, dtype=torch.float64)
        for x in iter_batches(X, self.config.batch_size, shuffle=False, seed=0, dtype=torch.float64):
            total += x.sum(0)
        mean = total / n
        scatter = torch.zeros(d, d, dtype=torch.float64)
        for x in iter_batches(X, self.config.batch_size, shuffle=False, seed=0, dtype=torch.float64):
            xc = x - mean
            scatter += xc.T @ xc
        evals, evecs = torch.linalg.eigh(scatter)
        comps = evecs[:, torch.argsort(evals, descending=True)[:self.k]].T  # (k, d)
        # fix each component's sign (largest |entry| positive) so fits are reproducible
        sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
        self._atoms = comps.to(self.device, self.dtype).contiguous()  # as it will be after save + load
        self._mean = mean.to(self.device, self.dtype)
        self.d = d
        self.record_fit_source(X)
        return self

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) @ self._atoms.T

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self._atoms + self._mean

    def _state(self) -> dict[str, torch.Tensor]:
        return {"atoms": self._atoms, "mean": self._mean}

    def _load_state(self, tensors, meta) -> None:
        super()._load_state(tensors, meta)
        self._mean = tensors["mean"].to(self.device, self.dtype)


class KMeansBaseline(_Baseline):
    """Lloyd's k-means; L0 = 1 (code = distance of the nearest centroid from the mean, see module doc)."""

    learner = "kmeans"
    options = KMeansConfig

    def __init__(self, n_atoms: int, **options):
        self._setup(n_atoms=n_atoms, **options)
        self._mean: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None

    @staticmethod
    def _assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of each row and its squared distance, in chunks."""
        c2 = (centroids * centroids).sum(1)
        idx, dist = [], []
        for s in range(0, x.shape[0], 4096):
            xb = x[s:s + 4096]
            d2 = (xb * xb).sum(1, keepdim=True) - 2 * xb @ centroids.T + c2
            m, j = d2.min(1)
            idx.append(j)
            dist.append(m.clamp_min(0))
        return torch.cat(idx), torch.cat(dist)

    def fit(self, X: ArrayLike, *, progress: bool = False, **_) -> KMeansBaseline:
        rows = torch.from_numpy(fit_rows(X, self.config.max_rows, self.seed)).to(self.device, self.dtype)
        n, d = rows.shape
        if self.n_atoms > n:
            raise VitatlasError(f"k-means with {self.n_atoms} centroids needs at least that many rows, got {n}")
        gen = torch.Generator().manual_seed(self.seed)
        centroids = rows[torch.randperm(n, generator=gen)[:self.n_atoms].to(self.device)].clone()
        for _ in range(self.config.n_iter):
            assign, dist = self._assign(rows, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, assign, rows)
            counts = torch.bincount(assign, minlength=self.n_atoms).to(rows.dtype)
            empty = counts == 0
            centroids = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp_min(1).unsqueeze(1))
            if bool(empty.any()):
                # re-seed empty clusters on the rows worst served by their centroid
                far = torch.argsort(dist, descending=True)[:int(empty.sum())]
                centroids[torch.nonzero(empty).squeeze(1)[:far.numel()]] = rows[far]
        mean = rows.mean(0)
        offsets = centroids - mean
        scale = offsets.norm(dim=1)
        unit = torch.zeros_like(offsets)
        unit[:, 0] = 1.0  # a centroid exactly at the mean has no direction: any unit atom, code 0
        atoms = torch.where((scale > 0).unsqueeze(1), offsets / scale.clamp_min(1e-30).unsqueeze(1), unit)
        self._atoms, self._mean, self._scale = atoms, mean, scale
        self.d = d
        self.record_fit_source(X)
        return self

    @property
    def centroids(self) -> torch.Tensor:
        return self._mean + self._scale.unsqueeze(1) * self._atoms

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        j, _ = self._assign(x, self.centroids)
        codes = torch.zeros(x.shape[0], self.n_atoms, dtype=x.dtype, device=x.device)
        codes[torch.arange(x.shape[0], device=x.device), j] = self._scale[j]
        return codes

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self._atoms + self._mean

    def _state(self) -> dict[str, torch.Tensor]:
        return {"atoms": self._atoms, "mean": self._mean, "scale": self._scale}

    def _load_state(self, tensors, meta) -> None:
        super()._load_state(tensors, meta)
        self._mean = tensors["mean"].to(self.device, self.dtype)
        self._scale = tensors["scale"].to(self.device, self.dtype)


class _OMPCoded(_Baseline):
    """Dictionaries coded by OMP with k non-zeros."""

    def __init__(self, n_atoms: int, k: int, **options):
        self._setup(n_atoms=n_atoms, k=k, **options)

    @property
    def k(self) -> int:
        return self.config.k

    def _check_k(self, d: int) -> None:
        if self.k > d:
            raise VitatlasError(f"k={self.k} non-zeros exceeds the width d={d}: OMP would fit every sample exactly; "
                                "lower k")

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        # the Gram matrix is as costly as a few thousand rows' products: compute it once per atom set
        if getattr(self, "_gram_of", None) is not self._atoms:
            self._gram_of, self._gram = self._atoms, self._atoms @ self._atoms.T
        return omp(x, self._atoms, self.k, gram=self._gram)


class RandomDictionary(_OMPCoded):
    """Unit Gaussian random atoms + OMP at k: the floor a learnt dictionary must beat."""

    learner = "random"
    options = RandomConfig

    def fit(self, X: ArrayLike, *, progress: bool = False, **_) -> RandomDictionary:
        n, d = n_rows_and_width(X)
        if n == 0:
            raise VitatlasError("X is empty (0 rows): pass at least one sample")
        for _ in iter_batches(X, 65536, shuffle=False, seed=0, d=d):
            pass  # the atoms ignore X, but bad data (NaN, Inf, wrong shape) is refused as by every learner
        self._check_k(d)
        gen = torch.Generator().manual_seed(self.seed)
        atoms = torch.randn(self.n_atoms, d, generator=gen, dtype=torch.float64)
        self._atoms = (atoms / atoms.norm(dim=1, keepdim=True)).to(self.device, self.dtype)
        self.d = d
        self.record_fit_source(X)
        return self


class SklearnDictionaryLearning(_OMPCoded):
    """scikit-learn MiniBatchDictionaryLearning atoms + OMP at k.

    Rows are divided by their root-mean-square norm before fitting (atoms are unit-norm, so this
    only makes ``alpha`` — the L1 weight sklearn learns with — independent of the data's scale).
    """

    learner = "sklearn-dl"
    options = SklearnDLConfig

    def fit(self, X: ArrayLike, *, progress: bool = False, **_) -> SklearnDictionaryLearning:
        import warnings

        from sklearn.decomposition import MiniBatchDictionaryLearning
        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits

        rows = fit_rows(X, self.config.max_rows, self.seed).astype(np.float64)
        d = rows.shape[1]
        self._check_k(d)
        rms = float(np.sqrt((rows ** 2).sum(1).mean())) or 1.0
        rows = rows / rms
        # initial atoms: random data rows (sklearn's default, a randomized SVD padded with zeros when
        # n_atoms > d, costs more than the fit and leaves most atoms empty)
        rng = np.random.default_rng(self.seed)
        init = rows[rng.choice(rows.shape[0], self.n_atoms, replace=rows.shape[0] < self.n_atoms)]
        init = init + 1e-3 * rng.standard_normal(init.shape)  # break ties between repeated rows
        init /= np.linalg.norm(init, axis=1, keepdims=True)
        learner = MiniBatchDictionaryLearning(
            n_components=self.n_atoms, alpha=self.config.alpha, max_iter=self.config.max_iter,
            batch_size=self.config.batch_size, fit_algorithm="cd", dict_init=init, transform_algorithm="omp",
            transform_n_nonzero_coefs=self.k,
            transform_max_iter=self.config.cd_max_iter, random_state=self.seed, verbose=bool(progress))
        # one BLAS thread: sklearn's per-atom update loop is a chain of small mat-vecs that run many
        # times slower with several threads (20x measured on a busy 2-core machine)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            learner.fit(rows)
        atoms = torch.from_numpy(learner.components_.copy())
        norms = atoms.norm(dim=1, keepdim=True)
        # sklearn keeps atoms at norm <= 1 and may leave unused ones at 0: give those a random direction
        gen = torch.Generator().manual_seed(self.seed)
        repl = torch.randn(atoms.shape, generator=gen, dtype=atoms.dtype)
        atoms = torch.where(norms > 1e-12, atoms, repl)
        self._atoms = (atoms / atoms.norm(dim=1, keepdim=True)).to(self.device, self.dtype)
        self.d = d
        self.record_fit_source(X)
        return self


BASELINES = {"pca": PCABaseline, "kmeans": KMeansBaseline, "random": RandomDictionary,
             "sklearn-dl": SklearnDictionaryLearning}


def make_baseline(learner: str, *, n_atoms: int, k: int, seed: int = 0, device: str = "cpu") -> Dictionary:
    """A baseline ``learner`` sized like the runs it is compared with (PCA has k atoms, k-means L0 = 1)."""
    kind = learner
    if kind == "pca":
        return PCABaseline(k, device=device)
    if kind == "kmeans":
        return KMeansBaseline(n_atoms, seed=seed, device=device)
    if kind == "random":
        return RandomDictionary(n_atoms, k, seed=seed, device=device)
    if kind == "sklearn-dl":
        return SklearnDictionaryLearning(n_atoms, k, seed=seed, device=device)
    raise VitatlasError(f"unknown baseline {kind!r}: choose from {', '.join(BASELINES)} or 'none'")
