"""The non-negative coders' NNLS solve (``coders._nnls_gram``, block principal pivoting) against the one before it.

``old``: the previous ``_nnls_gram``, kept here as the reference speed: drop the negative coordinates of
the least-squares solution and re-solve until none is negative (the "active-set guess"), then projected
coordinate descent (the library's ``_nnls_descent``, still its fallback: a Python loop of k small torch
ops per sweep, up to ``NNLS_SWEEPS``) on the rows whose KKT conditions the guess fails. ``new``: ``coders._nnls_gram``. ``guess+new``: the old guess's partition
handed to the new solver, to see whether the cheap guess first saves anything.

Problems: random supports A (d = 1.5·k, unit columns sharing a common direction, as atoms on one
DINOv2 support do) over several seeds and k, or (``--store``) the rows a real DBK-SVD fit sends to the
NNLS in its first ``--calls`` iterations (replayed with the public coder and ``partial_fit``).
Reported per problem: rows sent to the NNLS (and, with ``--store``, how many of the coded rows that is),
the seconds of each method (best of ``--repeats``), the ratio old/new, the batched solves each took,
and the largest difference from the float64 answer relative to its scale.

    python benchmarks/nnls.py                          # synthetic, k = 8, 16, 32, 3 seeds, ~1 min
    python benchmarks/nnls.py --store /tmp/acts --atoms 1536 --k 32 --calls 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vitatlas.learners.dbksvd import coders


def old_guess(Gss, rhs, x):
    """The active-set guess of the old solver: (its solution, the kept set, solves taken)."""
    k = x.shape[1]
    eye = torch.eye(k, dtype=Gss.dtype, device=Gss.device).expand_as(Gss)
    keep = x > 0
    solves = 0
    for _ in range(k):
        A = torch.where(keep.unsqueeze(2) & keep.unsqueeze(1), Gss, eye)
        sol, info = torch.linalg.solve_ex(A, torch.where(keep, rhs, torch.zeros_like(rhs)).unsqueeze(2))
        solves += 1
        sol = torch.where(keep & (info == 0).unsqueeze(1), sol.squeeze(2), torch.zeros_like(rhs))
        negative = keep & (sol < 0)
        if not bool(negative.any()):
            break
        keep &= ~negative
    return sol, keep, solves


def old_nnls(Gss, rhs, x):
    """The previous ``_nnls_gram``; returns (x, description of the work)."""
    sol, keep, solves = old_guess(Gss, rhs, x)
    x = sol.clamp(min=0)
    eps = 64 * torch.finfo(Gss.dtype).eps
    grad = torch.bmm(Gss, x.unsqueeze(2)).squeeze(2) - rhs
    tol = eps * rhs.abs().amax(dim=1, keepdim=True)
    unsettled = ((~keep & (grad < -tol)) | (keep & (sol < 0))).any(dim=1)
    sweeps, n = 0, int(unsettled.sum())
    if n:
        rows = torch.nonzero(unsettled).squeeze(1)
        x[rows], sweeps = coders._nnls_descent_counted(Gss[rows], rhs[rows], x[rows])
    return x, f"{solves} solves, {n} rows x {sweeps} sweeps"


class Count:
    """Counts the batched Cholesky factorisations ``_nnls_gram`` runs (one per pivoting iteration)."""

    def __enter__(self):
        self.n, self.f = 0, torch.linalg.cholesky_ex

        def counted(A):
            self.n += 1
            return self.f(A)
        torch.linalg.cholesky_ex = counted
        return self

    def __exit__(self, *exc):
        torch.linalg.cholesky_ex = self.f


def new_nnls(Gss, rhs, x):
    with Count() as c:
        out = coders._nnls_gram(Gss, rhs, x)
    return out, f"{c.n} solves"


def guess_new_nnls(Gss, rhs, x):
    sol, _, solves = old_guess(Gss, rhs, x)
    with Count() as c:
        out = coders._nnls_gram(Gss, rhs, sol)
    return out, f"{solves}+{c.n} solves"


METHODS = {"old": old_nnls, "new": new_nnls, "guess+new": guess_new_nnls}


def synthetic(k, seed, B, dtype):
    rng = np.random.default_rng(seed)
    d = max(k + k // 2, 2)
    A = rng.standard_normal((B, d, k)) + 3.0 * rng.standard_normal((B, d, 1))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    y = rng.standard_normal((B, d)) + 2.0 * A.sum(axis=2) / np.sqrt(k)  # mostly positive combinations
    G = torch.from_numpy(np.einsum("bdi,bdj->bij", A, A)).to(dtype)
    c = torch.from_numpy(np.einsum("bdi,bd->bi", A, y)).to(dtype)
    x = torch.linalg.solve(G, c)
    bad = (x < 0).any(dim=1)  # what _nonnegative_where_needed sends
    return G[bad], c[bad], x[bad]


def from_store(path, n_atoms, k, calls, seed, batch=8192):
    """The inputs the NNLS gets in the first ``calls`` iterations of a DBK-SVD fit on the store (and the rows coded).

    Each iteration: a fresh random batch of the store's rows is coded as the fit codes it (centred,
    non-negative Batch-OMP), the rows whose least-squares coefficients on the chosen support have a
    negative entry are kept (what ``_nonnegative_where_needed`` sends to the NNLS), then the dictionary
    takes one ``partial_fit`` iteration on that batch. Nothing in the library is patched.
    """
    from vitatlas import ActivationStore
    from vitatlas.learners.dbksvd import DBKSVD

    store = ActivationStore(path)
    rng = np.random.default_rng(seed)
    dl = DBKSVD(n_atoms, k, seed=seed, sample_batch=batch)

    def sample():
        return torch.from_numpy(np.asarray(store.rows(np.sort(rng.choice(store.n_rows, batch, replace=False))),
                                           dtype=np.float32))

    dl.partial_fit(sample())  # the fit's initial atoms and its first iteration
    got, coded = [], 0
    for _ in range(calls):
        Y = sample()
        D = dl.atoms
        Yc = Y - dl.b_dec if dl.b_dec is not None else Y
        G, C = D @ D.T, Yc @ D.T
        idx, _ = coders.batch_omp(C, G, (Yc * Yc).sum(dim=1), k, nonnegative=True)
        Gss, rhs, _ = coders._support_system(C, G, None, idx)
        x = torch.linalg.solve_ex(Gss, rhs.unsqueeze(2))[0].squeeze(2)
        bad = (x < 0).any(dim=1)
        got.append((Gss[bad], rhs[bad], x[bad]))
        coded += Y.shape[0]
        dl.partial_fit(Y)
    return got, coded


def run(name, G, c, x, repeats, methods):
    exact = coders._nnls_gram(G.double(), c.double(), torch.linalg.solve(G.double(), c.double()))
    scale = exact.abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
    times = {}
    line = f"{name:<28} rows {G.shape[0]:>5}"
    for m in methods:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            out, work = METHODS[m](G, c, x)
            best = min(best, time.perf_counter() - t)
        times[m] = best
        err = ((out.double() - exact).abs() / scale).max().item()
        line += f" | {m} {best:.4f} s ({work}; err {err:.1e})"
    if "old" in times:
        line += f" | old/new {times['old'] / times['new']:.1f}x"
        if "guess+new" in times:
            line += f", old/(guess+new) {times['old'] / times['guess+new']:.1f}x"
    print(line, flush=True)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="8,16,32")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", type=int, default=1024, help="synthetic rows drawn per problem (those with a "
                   "negative least-squares coefficient are solved)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-old", action="store_true", help="time only the new solver (the old one is slow)")
    p.add_argument("--store", help="an activation store: capture the rows of a real fit's first NNLS calls")
    p.add_argument("--atoms", type=int, default=1536)
    p.add_argument("--k", type=int, default=32, help="the fit's k with --store")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    methods = [m for m in METHODS if not (a.skip_old and m == "old")]
    dtype = getattr(torch, a.dtype)
    total = {m: 0.0 for m in methods}
    if a.store:
        got, coded = from_store(a.store, a.atoms, a.k, a.calls, a.seed)
        sent = sum(g[0].shape[0] for g in got)
        print(f"store {a.store}: {a.atoms} atoms, k = {a.k}: {sent} of {coded} coded rows "
              f"({sent / max(coded, 1):.1%}) went to the NNLS in the first {len(got)} calls")
        problems = [(f"fit call {i}", *g) for i, g in enumerate(got)]
    else:
        problems = [(f"k={k} seed={s} {a.dtype}", *synthetic(k, s, a.rows, dtype))
                    for k in map(int, a.ks.split(",")) for s in range(a.seeds)]
    for name, G, c, x in problems:
        for m, t in run(name, G, c, x, a.repeats, methods).items():
            total[m] += t
    print("total: " + ", ".join(f"{m} {t:.3f} s" for m, t in total.items())
          + (f" | old/new {total['old'] / total['new']:.1f}x" if "old" in total else ""))


if __name__ == "__main__":
    main()
