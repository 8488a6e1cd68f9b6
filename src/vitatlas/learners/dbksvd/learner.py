"""Double-Batch K-SVD (DBK-SVD): sparse coding + K-SVD atom updates, batched over samples and atoms.

One *iteration* takes one batch of samples Y (B, d) and the current atoms D (n_atoms, d):

1. the products C = Y Dᵀ (the one large dense product, formed in row chunks that are screened and
   coded while still in cache, so the (B, n_atoms) matrix never exists) and G = D Dᵀ;
2. sparse coding in the Gram domain (``coder="omp"`` Batch-OMP or ``"mp"`` matching pursuit), with
   each sample screened to ``candidates`` atoms (its first greedy choice and the atoms most correlated
   with the residual after it) so coding stays a small fraction of the product (see ``coders``);
3. the K-SVD update: atoms shuffled, updated in parallel batches of ``atom_batch`` against one
   residual snapshot, with their codes; unused atoms, rarely used ones once the atoms have settled,
   and the less used of two near-twins re-drawn from residual rows sampled in proportion to their
   energy, each row with its share of its most used atom added back (``ksvd_update.replace_unused``).

Sample batches are streamed (array, tensor or ActivationStore through ``iter_batches``), each gets one
iteration warm-started from the previous dictionary, for ``epochs`` passes (default: at least 160
iterations): the data never has to fit in memory. A stage ends early once its atoms settle: their
median movement 1 − |cos| between iterations stays below ``stop_tol`` for 3 iterations in a row in
which no atom was re-drawn (planted problems settle; real activations usually run the whole schedule).

With ``groups=[64, 256, 1024]`` (Matryoshka), the atoms are fitted group by group: stage g codes with
the prefix D[:groups[g]] but only updates its new atoms (initialised from residuals of the previous
prefix), so every prefix is a usable dictionary on its own.

Centring (``center``, the default): the data mean μ is computed once, in one streamed pass before the
first iteration, and every sample is coded as y − μ; μ is the decoder bias ``b_dec`` (saved with the
atoms), which ``decode`` adds back, as an SAE's. Non-negative codes (``nonnegative``, the default): the
coders pick atoms by positive correlation and keep coefficients >= 0 (``coders``), the K-SVD update keeps
the codes >= 0 (``ksvd_update``). Runs saved before these options existed load with both off.

Handling of edge cases: zero rows get zero codes (without centring); NaN/Inf rows are refused (VitatlasError naming the
row); ``k >= d`` is refused (the codes would not be sparse: every sample is fitted exactly);
``n_atoms < k`` is refused.

Data-parallel under ``torchrun`` (``vitatlas.distributed``): every rank walks the same global batch
order and reads and codes only its own contiguous slice (``distributed.shard``) of each global batch
against the same dictionary; the K-SVD update all-reduces the per-atom products Eᵀw and the usage counts, and the rows
that replace unused atoms are drawn over all ranks with the same random numbers (``ksvd_update``), so
every rank keeps the same atoms (checked, and rank 0's copy broadcast, at every checkpoint). The mean
of ``center`` is summed over each rank's share of the batches and all-reduced (float64), so it is the
same on every rank. The batch
signal_recovered and the atom movement (the early stop's measure) are reduced. Rank 0 alone writes
checkpoints; on resume rank 0 reads the checkpoint and broadcasts it. A single process runs no
collective and is unchanged. ``partial_fit`` is not split across ranks.

Options are the frozen dataclass ``DBKSVDConfig`` (``dbksvd.config``; each field declares its
constraint; ``DBKSVD(...)`` is a thin wrapper over it). Checkpoints go through the shared
``checkpoint.Checkpoint`` (state.json as the commit point, atoms and the generator state in safetensors).

    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    >>> dl = DBKSVD(n_atoms=32, k=3, epochs=2).fit(X, progress=False)
    >>> codes = dl.encode(X); X_hat = dl.reconstruct(X)
    >>> codes.shape, X_hat.shape, int((codes != 0).sum(1).max())
    ((600, 32), (600, 16), 3)
    >>> dl.config.coder, dl.config == DBKSVDConfig(n_atoms=32, k=3, epochs=2)
    ('omp', True)
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ... import distributed
from ...arrays import ArrayLike, as_tensor
from ...data.batches import data_fingerprint, is_store, iter_batch_shares, iter_batches, n_rows_and_width, rows_of
from ...dictionary import Dictionary
from ...errors import VitatlasError
from ..checkpoint import Checkpoint, resume_options
from ..options import resolve_dtype
from .coders import code_signals, residual, to_dense
from .config import LEGACY_VALUES, DBKSVDConfig
from .ksvd_update import ksvd_update

CHECKPOINT_FORMAT = "vitatlas-dbksvd-checkpoint"
# Default schedule: passes over the data until at least this many iterations. Held-out signal_recovered of
# DINOv2-S patch tokens (36k rows, 1,536 atoms, k=8) keeps rising with iterations: 0.723 after 42, 0.731
# after 162; problems whose atoms settle sooner stop early (``stop_tol``).
MIN_ITERATIONS = 160
STOP_PATIENCE = 3  # quiet iterations in a row that end a stage (``stop_tol``)
OLD_CHECKPOINT = "dbksvd-checkpoint.safetensors"  # single-file checkpoints written before state.json


class DBKSVD(Dictionary):
    """Double-Batch K-SVD dictionary learner: ``DBKSVD(n_atoms, k, **options)``.

    The options, their constraints and defaults are the fields of ``DBKSVDConfig`` (``encode`` always
    codes exactly, whatever ``candidates`` says). ``DBKSVD.from_config(cfg)`` builds one from a config.
    """

    learner = "dbksvd"

    def __init__(self, n_atoms: int, k: int, **options):
        self._setup(DBKSVDConfig.from_dict({"n_atoms": n_atoms, "k": k, **options}))

    @classmethod
    def from_config(cls, config: DBKSVDConfig) -> DBKSVD:
        obj = cls.__new__(cls)
        obj._setup(config)
        return obj

    def _setup(self, config: DBKSVDConfig) -> None:
        self.config = config
        self.device, self.dtype = config.device, resolve_dtype(config.dtype)
        self.fit_info = {}
        self.d = None
        self._D: torch.Tensor | None = None
        self._G: torch.Tensor | None = None
        # the residual of each iteration, reused while fitting: a new (batch, d) tensor per iteration
        # page-faults its memory in every time (0.3-0.5 s of a 5.5 s iteration at 100k x 768)
        self._R_buf: torch.Tensor | None = None
        self.history: list[float] = []  # signal_recovered of each iteration's batch
        self._gen = torch.Generator().manual_seed(config.seed)
        self._step = 0  # position in the planned schedule of iterations (a stopped stage skips its rest)
        self._quiet = 0  # iterations in a row in which the atoms stood still (see ``stop_tol``)
        self._move = math.inf  # the last iteration's median atom movement: rare atoms are re-drawn below stop_tol
        self._ramp = 40  # iterations over which the memory weight grows (fit sets its own total)
        self.b_dec: torch.Tensor | None = None  # (d,) data mean subtracted before coding (``center``)
        self._Yc_buf: torch.Tensor | None = None  # the centred batch, reused while fitting (as ``_R_buf``)

    # ---- Dictionary interface -------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:  # type: ignore[override]
        return self.config.n_atoms

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def seed(self) -> int:
        return self.config.seed

    def _config(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def _saved_options(cls, config: dict) -> dict:
        """A run saved before an option existed behaves as it did then (``LEGACY_VALUES``)."""
        return {**LEGACY_VALUES, **config}

    @property
    def atoms(self) -> torch.Tensor:
        self._check_fitted()
        return self._D

    def _state(self) -> dict[str, torch.Tensor]:
        return {"atoms": self._D} if self.b_dec is None else {"atoms": self._D, "b_dec": self.b_dec}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        D = tensors["atoms"]
        if D.shape != (self.n_atoms, int(meta["d"])):
            raise VitatlasError(f"saved atoms have shape {tuple(D.shape)}, expected ({self.n_atoms}, {meta['d']})")
        self.set_atoms(D)
        self._load_bias(tensors.get("b_dec"), "saved dictionary")

    def _load_bias(self, b: torch.Tensor | None, what: str) -> None:
        """Restore ``b_dec`` from saved tensors: required (shape (d,)) when centred, else absent."""
        if not self.config.center:
            self.b_dec = None
            return
        if b is None or tuple(b.shape) != (self.d,):
            got = "none" if b is None else f"shape {tuple(b.shape)}"
            raise VitatlasError(f"the {what} is centred (center=true) but holds no decoder bias b_dec of shape "
                                f"({self.d},) (got {got}): it is damaged, fit it again")
        self.b_dec = b.to(self.device, self.dtype).contiguous()

    def set_atoms(self, D: torch.Tensor) -> None:
        """Use the rows of ``D`` (n_atoms, d) as the atoms, e.g. a prefix of another dictionary or a warm start."""
        if D.ndim != 2 or D.shape[0] != self.n_atoms:
            raise VitatlasError(f"atoms must have shape ({self.n_atoms}, d); got {tuple(D.shape)}")
        self._D = D.to(self.device, self.dtype).contiguous()
        self.d = int(D.shape[1])
        self._G = None

    def _gram(self) -> torch.Tensor:
        if self._G is None:
            self._G = self._D @ self._D.T
        return self._G

    def _code(self, Y: torch.Tensor, D: torch.Tensor, G: torch.Tensor, candidates: int | None,
              residual_out: torch.Tensor | None = None):
        """Codes of the (already centred) samples Y over atoms D."""
        return code_signals(Y, D, G, self.k, coder=self.config.coder, tol=self.config.tol, refit=self.config.refit,
                            max_steps=self.config.mp_steps, candidates=candidates, residual_out=residual_out,
                            nonnegative=self.config.nonnegative)

    def _centred(self, Y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Y − b_dec (Y itself when not centred), into ``out`` if given."""
        if self.b_dec is None:
            return Y
        return torch.sub(Y, self.b_dec, out=out)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        idx, val = self._code(self._centred(x), self._D, self._gram(), None)  # encoding is exact
        return to_dense(idx, val, self.n_atoms)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = codes @ self.atoms
        return out if self.b_dec is None else out.add_(self.b_dec)

    def _fit_candidates(self, n_prefix: int) -> int | None:
        if self.config.candidates == "auto":
            return min(n_prefix, max(4 * self.k, 64))
        return self.config.candidates

    # ---- fitting --------------------------------------------------------------------------------
    def _check_width(self, d: int) -> None:
        if self.k >= d:
            raise VitatlasError(f"k={self.k} must be smaller than the data width d={d}: with k >= d every sample "
                                "is fitted exactly and the codes are not sparse")
        if self.d is not None and d != self.d:
            raise VitatlasError(f"data has width {d} but this dictionary was fitted on width {self.d}")

    def _stages(self) -> list[tuple[int, int]]:
        """(first trainable atom, prefix size) of each stage."""
        if not self.config.groups:
            return [(0, self.n_atoms)]
        bounds = [0, *self.config.groups]
        return [(bounds[i], bounds[i + 1]) for i in range(len(self.config.groups))]

    def _sample_batch(self) -> int:
        if self.config.sample_batch is not None:
            return self.config.sample_batch
        return int(min(max(8 * self.n_atoms, 4096), max(4096, (1 << 28) // self.n_atoms)))

    def _epochs(self, n: int) -> int:
        if self.config.epochs is not None:
            return self.config.epochs
        return max(1, math.ceil(MIN_ITERATIONS / math.ceil(n / self._sample_batch())))

    def _atom_batch(self, n_trainable: int) -> int:
        return self.config.atom_batch or max(1, math.ceil(n_trainable / 8))

    def _memory_weight(self) -> float:
        """Weight of each atom's previous direction in this iteration's rank-1 update.

        It grows linearly from 0 to ``memory`` over the fit (over the first 40 iterations with
        ``partial_fit``): early iterations move freely, late ones average over several batches instead
        of fitting each atom to the few samples of one batch. Measured on 90k DINOv2-S patch rows
        (1,536 atoms, k=8): held-out signal_recovered 0.691 without, 0.713 with memory=3 (0.716 with 6,
        which costs planted problems some recovery).
        """
        return self.config.memory * min(1.0, self._step / max(1, self._ramp))

    @torch.no_grad()
    def _iteration(self, Y: torch.Tensor, lo: int, hi: int, redraw: bool = True,
                   split: bool = False, share: bool = True) -> tuple[float, bool]:
        """One DBK-SVD iteration on batch Y, updating atoms [lo, hi).

        Returns the batch signal_recovered and whether the atoms stood still: no trainable atom was
        unused or re-drawn and their median movement 1 − |cos(old, new)| is below ``stop_tol``. With ``split``
        (data-parallel), Y is this rank's slice of the global batch: the update, the signal_recovered
        and the movement are over the whole global batch (module docstring). ``share``: re-drawn atoms
        start from a row's residual plus its share of its busiest atom (``ksvd_update``), else the bare row.
        """
        if self.b_dec is not None:
            self._Yc_buf = self._buffer(self._Yc_buf, Y)
            Y = self._centred(Y, out=self._Yc_buf[:Y.shape[0]])
        D = self._D[:hi].clone()
        G = D @ D.T
        R = self._residual_buffer(Y)
        idx, val = self._code(Y, D, G, self._fit_candidates(hi), residual_out=R)
        trainable = torch.arange(lo, hi, device=D.device)
        info = {"redrawn": 0}
        # once the atoms stand still (where the early stop would end the fit), re-draws also take rarely used
        # atoms and start from a row's share of its busiest atom: before that, the plain re-draw (real
        # activations never settle: their fit is unchanged, see benchmarks/README.md)
        settled = self.config.stop_tol > 0 and self._move < self.config.stop_tol
        counts = ksvd_update(R, D, idx, val, atom_batch=self._atom_batch(hi - lo), trainable=trainable,
                             n_power=self.config.n_power, approx=self.config.approx, generator=self._gen, G=G,
                             redraw=redraw, memory=self._memory_weight(), distributed=split,
                             dup_threshold=self.config.dup_threshold, nonnegative=self.config.nonnegative,
                             share=share and settled, rare=settled, info=info)
        moved = 1 - (D[lo:hi] * self._D[lo:hi]).sum(dim=1).abs()
        self._D[lo:hi] = D[lo:hi]
        self._G = None
        ynorm = Y.norm(dim=1)
        nz = ynorm > 0
        rel = torch.where(nz, R.norm(dim=1) / ynorm.clamp(min=torch.finfo(Y.dtype).tiny), torch.zeros_like(ynorm))
        stats = torch.stack([rel.sum(), torch.tensor(rel.numel(), dtype=rel.dtype, device=rel.device),
                             moved.median().to(rel.dtype),
                             torch.tensor(float(info["redrawn"] > 0 or bool((counts[lo:hi] == 0).any())),
                                          dtype=rel.dtype, device=rel.device)]).double()
        if split:  # counts are already global; the max makes the stop decision identical on every rank
            stats[:2] = distributed.all_reduce_(stats[:2].clone())
            stats[2:] = distributed.all_reduce_(stats[2:].clone(), "max")
        total, n, move, redrawn = stats.tolist()
        self._move = move
        quiet = self.config.stop_tol > 0 and move < self.config.stop_tol and not redrawn
        return 1 - total / max(n, 1.0), quiet

    def _residual_buffer(self, Y: torch.Tensor) -> torch.Tensor:
        """A (len(Y), d) view of the reused residual buffer (grown, never shrunk, while fitting)."""
        self._R_buf = self._buffer(self._R_buf, Y)
        return self._R_buf[:Y.shape[0]]

    @staticmethod
    def _buffer(buf: torch.Tensor | None, Y: torch.Tensor) -> torch.Tensor:
        """``buf`` if it can hold Y's rows (same width, dtype, device), else a new one like Y."""
        if buf is None or buf.shape[0] < Y.shape[0] or buf.shape[1:] != Y.shape[1:] or buf.dtype != Y.dtype \
                or buf.device != Y.device:
            return torch.empty_like(Y)
        return buf

    @torch.no_grad()
    def _fit_mean(self, X: ArrayLike, d: int) -> None:
        """``b_dec`` = the mean row of X (``center``), in float64, in one streamed pass (None if not centred).

        Data-parallel: each rank reads and sums only its share of every batch and the sums are
        all-reduced, so every rank gets the same mean from one read of the store between them.
        """
        if not self.config.center:
            self.b_dec = None
            return
        w = distributed.world()
        total = torch.zeros(d, dtype=torch.float64)
        count = torch.zeros(1, dtype=torch.float64)
        for _, Y in iter_batch_shares(X, self._sample_batch(), shuffle=False, seed=0, device="cpu", dtype=self.dtype,
                                      d=d):
            total += Y.sum(dim=0, dtype=torch.float64)
            count += Y.shape[0]
        if w.distributed:
            distributed.all_reduce_(total)
            distributed.all_reduce_(count)
        self.b_dec = (total / count.clamp(min=1)).to(self.device, self.dtype)

    def _init_atoms(self, X: ArrayLike, n: int, d: int) -> None:
        """Atoms = random data rows (normalised); random directions for zero rows or n < n_atoms."""
        m = self._stages()[0][1]
        rng = np.random.default_rng(self.seed)
        ids = np.sort(rng.choice(n, size=min(n, m), replace=False))
        # a store is read through a throwaway reader: random rows fault in pages all over its shards, and
        # the store's cached memory maps would keep them in this process's RSS for the whole fit
        # (a 4 GB store: +1.6 GB of peak RSS); the reader's maps close with it
        source = type(X)(X.path, allow_incomplete=True) if is_store(X) else X
        rows = as_tensor(rows_of(source, ids), d=d, dtype=self.dtype)
        del source
        if self.b_dec is not None:
            rows = rows - self.b_dec.to(rows.device)
        self._init_from_rows(rows, 0, m, d)

    def _init_from_rows(self, rows: torch.Tensor, lo: int, hi: int, d: int) -> None:
        m = hi - lo
        init = torch.randn(m, d, generator=self._gen, dtype=self.dtype)
        rows = rows.to("cpu", self.dtype)
        rows = rows[rows.norm(dim=1) > 0][:m]
        init[: rows.shape[0]] = rows
        init /= init.norm(dim=1, keepdim=True)
        if self._D is None:
            self.set_atoms(torch.zeros(self.n_atoms, d, dtype=self.dtype))
        self._D[lo:hi] = init.to(self.device)
        self._G = None

    def _init_stage_from_residual(self, Y: torch.Tensor, lo: int, hi: int) -> None:
        """Matryoshka: new atoms of a stage start as random residual rows of the previous prefix."""
        Y = self._centred(Y)
        D = self._D[:lo]
        idx, val = self._code(Y, D, D @ D.T, self._fit_candidates(lo))
        R = residual(Y, idx, val, D)
        perm = torch.randperm(R.shape[0], generator=self._gen).to(R.device)
        self._init_from_rows(R[perm], lo, hi, Y.shape[1])

    def _batches(self, X: ArrayLike, epoch_seed: int, *, split: bool, start_batch: int = 0):
        """This rank's rows of each of an epoch's batches from ``start_batch`` on (all rows when not split:
        data-parallel shares stay on the CPU, each rank moves its own to its device)."""
        if not split:
            return iter_batches(X, self._sample_batch(), shuffle=True, seed=epoch_seed, device=self.device,
                                dtype=self.dtype, d=self.d, start_batch=start_batch)
        return (Y for _, Y in iter_batch_shares(X, self._sample_batch(), shuffle=True, seed=epoch_seed, device="cpu",
                                                 dtype=self.dtype, d=self.d, start_batch=start_batch))

    def _first_batch(self, X: ArrayLike, epoch_seed: int) -> torch.Tensor:
        """The whole first global batch of an epoch (read on every rank), on this rank's device."""
        batches = self._batches(X, epoch_seed, split=False)
        try:
            return next(batches)
        finally:
            batches.close()  # stops a store stream's read-ahead threads

    def fit(self, X: ArrayLike, *, checkpoint_dir: str | Path | None = None, progress: bool = True,
            callback: Callable[[int, float], None] | None = None) -> DBKSVD:
        """Learn the dictionary from X (array, tensor or ActivationStore), streaming sample batches.

        With ``checkpoint_dir`` a checkpoint is written atomically every ``checkpoint_every`` iterations
        and at the end, and an existing one is resumed (refused if it was made with other options or
        other data). ``callback(step, signal_recovered)`` is called after every iteration (raise from
        it to stop early, e.g. KeyboardInterrupt).
        """
        from tqdm.auto import tqdm

        n, d = n_rows_and_width(X)
        if n == 0:
            raise VitatlasError("X is empty (0 rows): pass at least one sample")
        self.d = None
        self._D = None
        self.b_dec = None
        self._check_width(d)
        self.record_fit_source(X)
        fingerprint = _fingerprint(X, n, d, self._config())
        self._gen = torch.Generator().manual_seed(self.seed)
        self._step, self.history, self._quiet, self._move = 0, [], 0, math.inf
        ckpt = self._checkpoint(checkpoint_dir)
        w = distributed.world()
        if w.distributed:
            distributed.check_same({"fingerprint": fingerprint, "rows": n, "d": d,
                                    "checkpoint": None if checkpoint_dir is None else str(Path(checkpoint_dir))},
                                   "the DBK-SVD options, data and run directory")
            self._start_distributed(X, n, d, ckpt, fingerprint)
        elif ckpt is not None and ckpt.exists():
            self._load_checkpoint(ckpt, fingerprint)
        else:
            self._fit_mean(X, d)
            self._init_atoms(X, n, d)
        per_epoch, epochs = math.ceil(n / self._sample_batch()), self._epochs(n)
        total = len(self._stages()) * epochs * per_epoch
        self._ramp = total
        bar = tqdm(total=total, initial=self._step, disable=not progress or not w.is_main, desc="dbksvd",
                   unit="batch", dynamic_ncols=True)
        try:
            for lo, hi, Y, left, stage_end in self._pending_iterations(X, per_epoch, epochs, w.distributed):
                # no re-draw in a stage's last iteration (it would leave untrained atoms), and bare residual
                # rows in the one before: a row's share of its busiest atom can make a twin of it, which
                # only a later re-draw removes (``ksvd_update.replace_unused``)
                opts = dict(redraw=left > 0, share=left > 1)
                if w.distributed:  # Y is this rank's share of the global batch
                    sr, quiet = self._iteration(Y.to(self.device), lo, hi, split=True, **opts)
                else:
                    sr, quiet = self._iteration(Y, lo, hi, **opts)
                self.history.append(sr)
                self._step += 1
                self._quiet = self._quiet + 1 if quiet else 0
                done = self._step
                bar.update(1)
                bar.set_postfix(signal_recovered=f"{sr:.4f}", refresh=False)
                converged = self._quiet >= STOP_PATIENCE
                if converged:  # the rest of this stage's schedule is skipped, also on resume
                    bar.update(stage_end - self._step)
                    bar.set_postfix(signal_recovered=f"{sr:.4f}", converged=len(self.history), refresh=False)
                    self._step, self._quiet, self._move = stage_end, 0, math.inf
                if ckpt is not None and (converged or self._step % self.config.checkpoint_every == 0):
                    self._save_checkpoint(ckpt, fingerprint)
                if callback is not None:
                    callback(done, sr)
        except VitatlasError:
            self.d, self._D, self._G, self.b_dec = None, None, None, None  # bad data: no half-fitted dictionary
            raise
        finally:
            bar.close()
            self._R_buf = self._Yc_buf = None
        if w.distributed:
            self._agree_on_atoms()
        if ckpt is not None:
            self._save_checkpoint(ckpt, fingerprint)
        return self

    def _pending_iterations(self, X: ArrayLike, per_epoch: int, epochs: int, split: bool):
        """The planned schedule's iterations from ``self._step`` on: (lo, hi, batch, left, stage_end).

        Each stage (atoms [lo, hi) trainable) runs ``epochs`` passes of ``per_epoch`` batches; ``left``
        is how many of the stage's planned iterations follow this one (0: its last). Iterations
        done before the checkpoint we resumed from are skipped, and so is the rest of a stage once
        ``self._step`` jumps to its end (it stopped early). Data-parallel (``split``), the batch is this
        rank's share of the global batch (read alone, kept on the CPU).
        """
        for s, (lo, hi) in enumerate(self._stages()):
            stage_end = (s + 1) * epochs * per_epoch
            for epoch in range(epochs):
                first = (s * epochs + epoch) * per_epoch
                if self._step >= first + per_epoch:
                    continue  # done before the checkpoint we resumed from, or the stage ended early
                seed = self.seed * 100003 + s * 1009 + epoch
                start = max(0, self._step - first)  # batches done before the checkpoint we resumed from
                for b, Y in enumerate(self._batches(X, seed, split=split, start_batch=start), start=start):
                    if s > 0 and epoch == 0 and b == 0:  # needs the whole first batch, also when split
                        self._init_stage_from_residual(Y if not split else self._first_batch(X, seed), lo, hi)
                    yield lo, hi, Y, epochs * per_epoch - 1 - (epoch * per_epoch + b), stage_end
                    if self._step >= stage_end:
                        break  # the stage ended early

    def partial_fit(self, X: ArrayLike) -> DBKSVD:
        """One iteration per ``sample_batch`` rows of X, warm-started from the current atoms.

        X's rows are read in a shuffled order (a store sorted by class still gives mixed batches),
        seeded by ``seed`` and the number of iterations done so far (``partial_fit_seed``): repeated
        calls on the same X see different batches, and the same sequence of calls gives the same atoms.
        """
        if self.config.groups:
            raise VitatlasError("partial_fit does not support groups (Matryoshka stages need fit); use fit(X)")
        n, d = n_rows_and_width(X)
        self._check_width(d)
        if self._D is None:
            if not self.fit_info:
                self.record_fit_source(X)
            self._fit_mean(X, d)  # the first call's data decides the mean
            self._init_atoms(X, n, d)
        try:
            for Y in iter_batches(X, self._sample_batch(), shuffle=True, seed=partial_fit_seed(self.seed, self._step),
                                  device=self.device, dtype=self.dtype, d=self.d):
                self.history.append(self._iteration(Y, 0, self.n_atoms)[0])
                self._step += 1
        finally:
            self._R_buf = self._Yc_buf = None
        return self

    # ---- checkpoints ----------------------------------------------------------------------------
    @staticmethod
    def _checkpoint(directory: str | Path | None) -> Checkpoint | None:
        if directory is None:
            return None
        ckpt = Checkpoint(directory, CHECKPOINT_FORMAT, "DBK-SVD checkpoint")
        if not ckpt.exists() and (Path(directory) / OLD_CHECKPOINT).exists():
            warnings.warn(f"{Path(directory) / OLD_CHECKPOINT} was written by an older vitatlas and is not resumed; "
                          "the fit starts over", stacklevel=3)
        return ckpt

    def _save_checkpoint(self, ckpt: Checkpoint, fingerprint: str) -> None:
        """Rank 0 writes, once every rank agrees on the atoms (one process: just writes, no collective)."""
        w = distributed.world()
        if w.distributed:
            self._agree_on_atoms()
        if w.is_main:
            bias = {} if self.b_dec is None else {"b_dec": self.b_dec}
            ckpt.save(self._step, {"atoms": self._D, "rng": self._gen.get_state(), **bias},
                      {"identity": fingerprint, "history": self.history, "d": self.d, "quiet": self._quiet,
                       "move": None if math.isinf(self._move) else self._move})
        if w.distributed:
            distributed.barrier("writing the DBK-SVD checkpoint")

    # ---- data-parallel --------------------------------------------------------------------------
    DRIFT_TOL = 1e-4  # atoms are unit vectors: ranks that differ by more than this have diverged

    def _agree_on_atoms(self) -> None:
        """Guard against drift: every rank must hold rank 0's atoms (to round-off); adopt rank 0's copy."""
        main = self._D.clone()
        distributed.broadcast_(main, 0)
        drift = distributed.all_reduce_((main - self._D).abs().max().reshape(1).double().cpu(), "max")
        if float(drift) > self.DRIFT_TOL:
            raise VitatlasError(f"the ranks' DBK-SVD atoms diverged (max difference {float(drift):.2e}); this is a "
                                "bug: please report it, and run a single process meanwhile")
        self._D.copy_(main)
        self._G = None

    def _start_distributed(self, X: ArrayLike, n: int, d: int, ckpt: Checkpoint | None, fingerprint: str) -> None:
        """Every rank starts from the same state: the seeded initial atoms, or rank 0's checkpoint."""
        w = distributed.world()
        resume = distributed.broadcast_object(ckpt is not None and ckpt.exists())
        if not resume:
            self._fit_mean(X, d)  # all-reduced: the same on every rank
            self._init_atoms(X, n, d)  # the same seeded rows on every rank
            self._agree_on_atoms()
            return
        state, error = None, None
        if w.is_main:
            try:
                self._load_checkpoint(ckpt, fingerprint)
                state = {"step": self._step, "history": self.history, "quiet": self._quiet, "move": self._move}
            except VitatlasError as exc:
                error = str(exc)
        state, error = distributed.broadcast_object((state, error))
        if error is not None:
            raise VitatlasError(error)
        if not w.is_main:
            self.set_atoms(torch.zeros(self.n_atoms, d, dtype=self.dtype))
            self._step, self.history, self._quiet = int(state["step"]), list(state["history"]), int(state["quiet"])
            self._move = float(state["move"])
        distributed.broadcast_(self._D, 0)
        if self.config.center:
            if not w.is_main:
                self.b_dec = torch.zeros(d, dtype=self.dtype, device=self.device)
            distributed.broadcast_(self.b_dec, 0)
        rng = self._gen.get_state()
        distributed.broadcast_(rng, 0)
        self._gen.set_state(rng)

    def _load_checkpoint(self, ckpt: Checkpoint, fingerprint: str) -> None:
        meta, t = ckpt.load(fingerprint)
        if "atoms" not in t or "rng" not in t or not isinstance(meta.get("history"), list):
            raise VitatlasError(f"DBK-SVD checkpoint in {ckpt.dir} is damaged: delete {ckpt.dir} to start over")
        self.set_atoms(t["atoms"])
        self._load_bias(t.get("b_dec"), f"DBK-SVD checkpoint in {ckpt.dir}")
        self._gen.set_state(t["rng"])
        self._step = int(meta["step"])
        self.history = list(meta["history"])
        self._quiet = int(meta.get("quiet", 0))
        self._move = math.inf if meta.get("move") is None else float(meta["move"])


def partial_fit_seed(seed: int, step: int) -> int:
    """Shuffling seed of a ``partial_fit`` call made after ``step`` iterations (apart from ``fit``'s epoch seeds)."""
    return int(np.random.SeedSequence([seed, step, 0x9A27]).generate_state(1)[0])


@torch.no_grad()
def _fingerprint(X: ArrayLike, n: int, d: int, config: dict) -> str:
    """Hash of the options that shape the fit and of the data (see ``data_fingerprint``).

    Options at their ``LEGACY_VALUES`` are left out, so a checkpoint written before they existed still
    resumes under options that behave as it did.
    """
    opts = {k: v for k, v in resume_options(config).items() if not (k in LEGACY_VALUES and v == LEGACY_VALUES[k])}
    h = hashlib.sha256(json.dumps({"opts": opts}, sort_keys=True).encode())
    h.update(data_fingerprint(X, n, d).encode())
    return h.hexdigest()
