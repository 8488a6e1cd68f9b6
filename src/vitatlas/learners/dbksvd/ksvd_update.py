"""K-SVD dictionary update, batched over atoms.

For atom j used by the samples Ω_j with coefficients γ_j, K-SVD replaces (d_j, γ_j) by the best
rank-1 approximation of the residual without atom j, restricted to those samples:

    E_j = R[Ω_j] + γ_j d_jᵀ   (|Ω_j|, d),   (d_j, γ_j) <- (u, E_j u) with u the top right singular vector.

The top singular vector comes from a few power-iteration steps warm-started from the current atom
(the previous solution is already close), never from a full SVD. ``approx=True`` gives approximate
K-SVD (AK-SVD, Rubinstein et al. 2008): one step u ∝ E_jᵀγ_j, then γ_j = E_j u. ``nonnegative=True``
keeps the codes >= 0 (for the non-negative coders): each power step uses γ = max(E u, 0), the best
non-negative codes for direction u, and so does the final one.

Atoms are shuffled and split into batches; all atoms of a batch are updated at once against the same
residual snapshot (vectorised over the non-zeros that belong to the batch — no Python loop per atom),
then the residual is corrected and the next batch sees it. Atoms no sample used, or far fewer than
the typical atom (``RARE``), are re-drawn from residual rows sampled in proportion to their energy,
each row with its share of its most used atom added back (``replace_unused``).

Data-parallel (``distributed=True``, under torchrun): each rank holds its own slice of the batch
(its rows of R, idx, val) and the same D. The power iteration only needs Eᵀw (a sum over samples:
all-reduced) and E·u (per sample: local); usage counts are all-reduced and the replacement rows of
re-drawn atoms are drawn from every rank's rows with the same random numbers, so every rank makes the
same decisions and D stays identical. ``distributed=False`` (one process) runs no collective at all.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ... import distributed as dist
from ...arrays import csr_tensor


class _Narrow:
    """Run the update's bookkeeping on one thread, its sparse products on the caller's thread count.

    The bookkeeping (sorts, CSR pointers, gathers, (atom_batch, d) elementwise work and reductions)
    is ~50 small operations per atom batch: split over 2 OpenMP threads each waits for both, and
    on a shared machine every parallel region can wait for a time slice (at 32k rows, 3,072 atoms
    and 2 threads under load 3–4: the whole update 6.6 s, against 1.2 s at one thread; 180 ms per
    1-D sort). The three products over the batch's non-zeros (``wide_``) keep every thread.
    Thread counts change none of the results (tested: a 2-thread update is bitwise the old one).
    CUDA tensors: nothing changes.
    """

    def __init__(self, device: torch.device) -> None:
        self.wide = torch.get_num_threads()
        self.narrow = device.type == "cpu" and self.wide > 1

    def __enter__(self) -> _Narrow:
        if self.narrow:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.narrow:
            torch.set_num_threads(self.wide)

    @contextlib.contextmanager
    def wide_(self):
        """The caller's thread count, inside the narrow block."""
        if not self.narrow:
            yield
            return
        torch.set_num_threads(self.wide)
        try:
            yield
        finally:
            torch.set_num_threads(1)


def _normalise_rows(U: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = U.norm(dim=1, keepdim=True)
    ok = norm > torch.finfo(U.dtype).tiny ** 0.5
    return torch.where(ok, U / norm.clamp(min=torch.finfo(U.dtype).tiny), fallback), ok.squeeze(1)


def _ptr(sorted_ids: torch.Tensor, n: int) -> torch.Tensor:
    """CSR row pointer of ``sorted_ids`` (ascending ints in [0, n)): counts and a running sum, O(len + n)."""
    ptr = torch.zeros(n + 1, dtype=torch.long, device=sorted_ids.device)
    torch.cumsum(torch.bincount(sorted_ids, minlength=n), 0, out=ptr[1:])
    return ptr


@torch.no_grad()
def _update_slice(R: torch.Tensor, D: torch.Tensor, val: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  a: torch.Tensor, atoms: torch.Tensor, n_power: int, approx: bool, memory: float = 0.0,
                  distributed: bool = False, nonnegative: bool = False, wide=contextlib.nullcontext) -> None:
    """Rank-1 updates of ``atoms`` from their non-zeros (rows, cols) sorted by batch slot ``a``.

    The restricted residuals E_j = R[Ω_j] + γ_j d_jᵀ are never formed: with S the (m, B) sparse
    pattern of (atom slot, sample), E·u is a sampled dense product (SDDMM) plus a rank-1 term and
    Eᵀ·w is a sparse-dense product S_w R plus a rank-1 term — O(nnz·d) work in fast sparse kernels.
    With ``distributed`` the sums over samples (Eᵀ·w, the memory energies) are all-reduced; a rank
    with no non-zero of these atoms still takes part (its share is zero). ``wide``: the context the
    sparse products run in (the caller's ``_Narrow.wide_``; by default the current thread count).
    """
    m, B = atoms.numel(), R.shape[0]
    ptr = _ptr(a, m)
    v_old = val[rows, cols]
    D_old = D[atoms]  # (m, d) copy
    # E·u is sampled sample-major (rows of R in ascending order, streamed once): 2x faster than
    # atom-major, which jumps between random rows of R; ``by_sample`` maps back to atom order.
    key, by_sample = torch.sort(rows * m + a)
    pattern = csr_tensor(_ptr(key // m, B), key % m, torch.ones_like(v_old), (B, m))

    def e_dot(U: torch.Tensor) -> torch.Tensor:  # (P,): E_p · u_{a_p} (clamped at 0 when non-negative)
        if distributed and not rows.numel():
            return v_old.clone()  # empty: this rank has no non-zero of these atoms
        with wide():
            sd = torch.sparse.sampled_addmm(pattern, R, U.T, beta=0.0).values()
        out = torch.empty_like(sd)
        out[by_sample] = sd
        out += v_old * (D_old * U).sum(dim=1)[a]
        return out.clamp_(min=0) if nonnegative else out

    def et_times(w: torch.Tensor) -> torch.Tensor:  # (m, d): Σ_{p in atom} w_p E_p
        coef = torch.zeros(m, dtype=w.dtype, device=w.device).index_add_(0, a, w * v_old)
        if not distributed:
            with wide():
                SR = csr_tensor(ptr, rows, w, (m, B)) @ R
            return SR + coef.unsqueeze(1) * D_old
        out = coef.unsqueeze(1) * D_old
        if rows.numel():
            with wide():
                out += csr_tensor(ptr, rows, w, (m, B)) @ R
        return dist.all_reduce_(out)

    if approx:
        U, _ = _normalise_rows(et_times(v_old), D_old)
    else:
        U = D_old
        prior = None
        for _ in range(n_power):
            ev = e_dot(U)
            if prior is None and memory > 0:
                # energy along the old atom in this batch (U is D_old at the first step)
                prior = memory * torch.zeros(m, dtype=ev.dtype, device=ev.device).index_add_(0, a, ev * ev)
                if distributed:
                    dist.all_reduce_(prior)
            W = et_times(ev)
            if prior is not None:
                W = W + (prior * (D_old * U).sum(dim=1)).unsqueeze(1) * D_old
            U, _ = _normalise_rows(W, U)
    # an atom whose restricted residual is zero keeps its direction; its codes become E·u = 0 anyway
    v_new = e_dot(U)
    if distributed and not rows.numel():
        D[atoms] = U  # none of this rank's samples uses these atoms: only the atoms change
        return
    # R += Σ_p (v_old_p d_old − v_new_p u) on row rows_p, as one (B, 2m) sparse × (2m, d) product
    key = torch.cat([rows * (2 * m) + a, rows * (2 * m) + a + m])
    key, order = torch.sort(key)
    r_idx = key // (2 * m)
    delta = csr_tensor(_ptr(r_idx, B), key % (2 * m), torch.cat([v_old, -v_new])[order], (B, 2 * m))
    both = torch.cat([D_old, U])
    with wide():
        R.addmm_(delta, both)  # in place: 10x faster than R += delta @ M
    val[rows, cols] = v_new
    D[atoms] = U


@torch.no_grad()
def update_atom_batch(R: torch.Tensor, D: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, atoms: torch.Tensor,
                      *, n_power: int = 3, approx: bool = False, memory: float = 0.0,
                      nonnegative: bool = False) -> None:
    """Update the atoms ``atoms`` (1-D ids) in place, all against the current residual snapshot.

    R (B, d) residual Y − Σ val·D[idx] (updated in place), D (n_atoms, d) atoms (updated in place),
    idx/val (B, k) padded sparse codes (val updated in place for the non-zeros of these atoms).
    """
    n_atoms = D.shape[0]
    local = torch.full((n_atoms + 1,), -1, dtype=torch.long, device=D.device)  # global id -> batch slot
    local[atoms] = torch.arange(atoms.numel(), device=D.device)
    slot = local[torch.where(idx >= 0, idx, n_atoms)]
    rows, cols = torch.nonzero(slot >= 0, as_tuple=True)
    a, order = torch.sort(slot[rows, cols], stable=True)
    rows, cols = rows[order], cols[order]
    _update_slice(R, D, val, rows, cols, a, atoms, n_power, approx, memory, nonnegative=nonnegative)


@torch.no_grad()
def replace_unused(D: torch.Tensor, R: torch.Tensor, unused: torch.Tensor,
                   generator: torch.Generator | None = None, distributed: bool = False,
                   codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   wide=contextlib.nullcontext) -> int:
    """Re-draw the atoms ``unused`` (1-D ids) from residual rows drawn with probability ∝ ‖r‖², in place.

    Weighted sampling without replacement (k-means++'s D² seeding): mostly rows the dictionary fits
    badly, but not only the very worst. The worst rows are outliers; an atom aimed at one is unused
    again in the next batch, so it is re-drawn forever (measured on DINOv2-S patch tokens, 1,536 atoms,
    k=8: about 100 atoms re-drawn every iteration that way, about 20 this way, and held-out
    signal_recovered 0.7213 against 0.7232). Rows without residual are never drawn; the atoms left over
    when there are fewer such rows get random unit directions. Returns how many atoms were replaced.

    With ``codes`` = (idx, val, counts) (the batch's codes and the atoms' usage counts), a drawn row r
    becomes r + γ_j d_j: its residual plus its share of its most used atom j that is not being re-drawn.
    An atom that sits between two true directions is used about twice as often as the others, and the
    residual of a row it codes is orthogonal to it (OMP), pointing between the two: a re-drawn atom
    aimed at that residual is never chosen over the merged atom and stays rarely used. r + γ_j d_j is
    the row's part along one of the two directions: the new atom takes one, the merged atom moves to
    the other. r + γ_j d_j can be a near-twin of d_j (a row d_j fits well): the twin rule re-draws it in
    a later iteration, so the learner takes bare rows in a stage's last re-draw. Measured on planted
    problems (d=96/64/32, 384/384/128 atoms): fits that ended with 99.5% (89–94% at d=32) of the atoms
    end with all of them.

    With ``distributed`` (each rank holds its contiguous slice of the batch, in rank order; ``unused`` and
    ``generator`` agree on every rank) every rank draws the same uniforms for the whole batch and the
    rows are the best over all ranks: the same rows as one process would take. ``wide``: as
    ``_update_slice``'s (the residual's energies are computed inside it).
    """
    n = unused.numel()
    if n == 0:
        return 0
    with wide():  # a pass over R: every thread (``_Narrow``)
        energy = torch.linalg.vector_norm(R, dim=1).double() ** 2  # no (B, d) temporary
    offset, total = _batch_position(R.shape[0], distributed)
    u = torch.rand(total, generator=generator, dtype=torch.float64)[offset:offset + R.shape[0]].to(R.device)
    # Efraimidis–Spirakis: the n largest log(u)/w are a sample without replacement with probabilities ∝ w
    key = torch.where(energy > torch.finfo(R.dtype).tiny, torch.log(u) / energy, -torch.inf)
    top = torch.topk(key, min(n, R.shape[0])).indices
    top = top[key[top] > -torch.inf]
    rows = R[top]
    if codes is not None and top.numel():
        rows = rows + _share_of_busiest(top, D, unused, *codes)
    if distributed:
        rows = _best_over_ranks(key[top], rows, n)
    new = torch.randn(n, D.shape[1], generator=generator, dtype=D.dtype, device="cpu").to(D.device)
    new[: rows.shape[0]] = rows
    D[unused] = new / new.norm(dim=1, keepdim=True)
    return n


def _share_of_busiest(top: torch.Tensor, D: torch.Tensor, unused: torch.Tensor, idx: torch.Tensor,
                      val: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(len(top), d): each row's share γ_j d_j of its most used atom j (not one being re-drawn)."""
    n_atoms = D.shape[0]
    i = idx[top]
    ok = i >= 0
    busy = counts.to(torch.float64).clone()
    busy[unused] = -1
    score = torch.where(ok, busy[i.clamp(min=0)], torch.full_like(busy[:1], -2.0).expand_as(i))
    pos = score.argmax(dim=1, keepdim=True)
    j = i.gather(1, pos).squeeze(1)
    g = val[top].gather(1, pos).squeeze(1)
    use = (score.gather(1, pos).squeeze(1) >= 0) & (j >= 0)
    g = torch.where(use, g, torch.zeros_like(g))
    return g.unsqueeze(1) * D[j.clamp(min=0, max=n_atoms - 1)]


def _batch_position(rows: int, distributed: bool) -> tuple[int, int]:
    """(first row of this rank's slice, rows of the whole batch); (0, rows) for one process."""
    if not distributed:
        return 0, rows
    sizes = dist.all_gather_object(rows)
    return sum(sizes[:dist.world().rank]), sum(sizes)


def _best_over_ranks(score: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` rows of largest score among every rank's candidates (rows, score), the same on all ranks.

    Candidates are gathered in rank order and sorted by (score descending, rank, local order), so
    ties are broken identically everywhere; the winners' rows then travel as plain arrays.
    """
    parts = dist.all_gather_object((score.cpu().numpy(), rows.cpu().numpy()))
    e = np.concatenate([p[0] for p in parts])
    r = np.concatenate([p[1].reshape(-1, rows.shape[1]) for p in parts])
    best = np.argsort(-e, kind="stable")[:n]
    return torch.from_numpy(np.ascontiguousarray(r[best])).to(rows.device, rows.dtype)


def duplicates(G: torch.Tensor, counts: torch.Tensor, trainable: torch.Tensor, threshold: float) -> torch.Tensor:
    """(n,) bool: trainable atoms with a more used (or frozen, or equally used and lower-id) near-twin."""
    n = G.shape[0]
    rank = counts.to(torch.float64).clone()
    frozen = torch.ones(n, dtype=torch.bool, device=G.device)
    frozen[trainable] = False
    rank[frozen] = float("inf")
    # the few twin pairs, without (n, n) temporaries beyond two masks (at 3,072 atoms the dense
    # version wrote 85 MB of fresh pages per iteration)
    i, j = torch.nonzero((G > threshold).logical_or_(G < -threshold), as_tuple=True)
    better = (rank[j] > rank[i]) | ((rank[j] == rank[i]) & (j < i))  # i == j is never better than itself
    dup = torch.zeros(n, dtype=torch.bool, device=G.device)
    dup[i[better]] = True
    return dup & ~frozen


# With ``rare``, an atom used by fewer samples of a batch than this fraction of the mean count is re-drawn
# (a zero count always is). A fit that stops with such an atom has it stuck on a few noisy rows while
# another atom covers two directions: planted problems ended with 99.5% of their atoms recovered that way.
RARE = 1 / 8


@torch.no_grad()
def ksvd_update(R: torch.Tensor, D: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, *, atom_batch: int,
                trainable: torch.Tensor | None = None, n_power: int = 3, approx: bool = False,
                generator: torch.Generator | None = None, redraw: bool = True, G: torch.Tensor | None = None,
                dup_threshold: float = 0.97, memory: float = 0.0, distributed: bool = False,
                nonnegative: bool = False, share: bool = True, rare: bool = True,
                info: dict | None = None) -> torch.Tensor:
    """One K-SVD sweep over the dictionary, in place on R, D and val.

    R (B, d) residual for codes (idx, val) (B, k); D (n_atoms, d). ``trainable`` (1-D ids, default all)
    are the atoms allowed to change; they are shuffled with ``generator`` and updated in batches of
    ``atom_batch``. Returns the per-atom usage counts (n_atoms,) of this batch of samples.

    With ``redraw``, trainable atoms used by no sample are re-drawn (with ``rare``, also those used by
    fewer samples than ``RARE`` × the mean count of the trainable atoms: the learner asks for it once
    the atoms have settled, where its early stop would otherwise end a fit with them), and so is the less used atom of every pair whose |cos| in
    ``G`` (the Gram matrix used for coding, D Dᵀ before the update) exceeds ``dup_threshold`` — two
    atoms splitting one direction would otherwise stay stuck. A re-drawn atom starts from a residual
    row plus that row's share of its busiest atom (``share``, ``replace_unused``), else from the bare
    row. ``info["redrawn"]`` (when given) is set to the number of atoms re-drawn.

    With ``distributed`` (module docstring) R, idx and val are this rank's slice of the batch, the
    counts returned are global, and D, ``generator`` and every decision stay identical on all ranks.
    """
    threads = _Narrow(D.device)  # bookkeeping on one thread, sparse products on all (``_Narrow``)
    with threads:
        return _sweep(R, D, idx, val, atom_batch=atom_batch, trainable=trainable, n_power=n_power, approx=approx,
                      generator=generator, redraw=redraw, G=G, dup_threshold=dup_threshold, memory=memory,
                      distributed=distributed, nonnegative=nonnegative, share=share, rare=rare, info=info,
                      wide=threads.wide_)


def _sweep(R, D, idx, val, *, atom_batch, trainable, n_power, approx, generator, redraw, G, dup_threshold, memory,
           distributed, nonnegative, share, rare, info, wide) -> torch.Tensor:
    """``ksvd_update``'s body, inside its ``_Narrow`` block."""
    n_atoms = D.shape[0]
    counts = torch.bincount(idx[idx >= 0], minlength=n_atoms)
    if distributed:
        dist.all_reduce_(counts)
    if trainable is None:
        trainable = torch.arange(n_atoms, device=D.device)
    order = trainable[torch.randperm(trainable.numel(), generator=generator).to(D.device)]
    # Sort all non-zeros once by the shuffled rank of their atom: each atom batch is then one slice.
    rank = torch.full((n_atoms + 1,), -1, dtype=torch.long, device=D.device)
    rank[order] = torch.arange(order.numel(), device=D.device)
    r = rank[torch.where(idx >= 0, idx, n_atoms)].flatten()
    keep = torch.nonzero(r >= 0).squeeze(1)
    r_sorted, o = torch.sort(r[keep], stable=True)
    flat = keep[o]
    rows, cols = flat // idx.shape[1], flat % idx.shape[1]
    step = max(1, atom_batch)
    bounds = torch.searchsorted(r_sorted, torch.arange(0, order.numel() + step, step, device=D.device)).tolist()
    for b, start in enumerate(range(0, order.numel(), step)):
        lo, hi = bounds[b], bounds[b + 1]
        atoms = order[start:start + step]
        if hi > lo or distributed:  # under torchrun every rank takes part in every batch's reductions
            _update_slice(R, D, val, rows[lo:hi], cols[lo:hi], r_sorted[lo:hi] - start, atoms, n_power, approx,
                          memory, distributed, nonnegative, wide)
    if redraw:
        # unused, or used far less than the typical trainable atom (see ``RARE``)
        floor = RARE * float(counts[trainable].sum()) / max(1, trainable.numel()) if rare else 0.0
        stale = counts.to(torch.float64) < max(floor, 1.0)
        hit = None
        if G is not None:
            dup = duplicates(G, counts, trainable, dup_threshold)
            stale |= dup
            hit = dup[idx.clamp(min=0)] & (idx >= 0)
        ids = trainable[stale[trainable]]
        D_old = D[ids].clone()
        # targets come from the residual *with* the twins' share removed, so a twin is not re-drawn as itself
        n_new = replace_unused(D, R, ids, generator, distributed, codes=(idx, val, counts) if share else None,
                               wide=wide)
        if info is not None:
            info["redrawn"] = n_new
        if hit is not None and bool(hit.any()):
            # the re-drawn twins were used: drop their codes and give their share back to the residual
            slot = torch.full((n_atoms,), -1, dtype=torch.long, device=D.device)
            slot[ids] = torch.arange(ids.numel(), device=D.device)
            rows, cols = torch.nonzero(hit, as_tuple=True)
            R.index_put_((rows,), val[rows, cols].unsqueeze(1) * D_old[slot[idx[rows, cols]]], accumulate=True)
            val[rows, cols] = 0
    return counts
