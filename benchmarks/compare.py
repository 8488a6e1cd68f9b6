"""Benchmark: behaviour matching (``vitatlas.evaluation.compare.behaviour``) at scale, and against dense.

Two random sparse activation matrices (units x atoms, ``--nnz`` non-zeros per unit on each side, a
planted twin for every 4th atom of A so the matches are not all noise) go through the blocked
correlation match, in a child process whose peak RSS is printed. A dense float64 baseline (the full
z-scored A^T B in one GEMM, what one would write first) is timed on the same problem when it fits
under ``--dense-gb``; the last line is the ratio blocked / dense time (and the dense's memory need).

    python benchmarks/compare.py [--units 100000] [--atoms 16384] [--nnz 64] [--threads 2]
    python benchmarks/compare.py --quick      # 20k units, 4096 x 4096 atoms
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import scipy.sparse as sp


def make(units: int, atoms: int, nnz: int, seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    rng = np.random.default_rng(seed)

    def side(cols: np.ndarray) -> sp.csr_matrix:
        rows = np.repeat(np.arange(units), nnz)
        return sp.csr_matrix((rng.random(rows.size) + 0.1, (rows, cols.ravel())), shape=(units, atoms))

    cols_a = rng.integers(0, atoms, (units, nnz))
    # B fires atom j where A fires atom j for every 4th atom (a shared concept), elsewhere at random
    cols_b = np.where(cols_a % 4 == 0, cols_a, rng.integers(0, atoms, (units, nnz)))
    return side(cols_a), side(cols_b)


def child(args) -> None:
    import torch

    from vitatlas.evaluation.compare.behaviour import best_correlations

    torch.set_num_threads(args.threads)
    A, B = make(args.units, args.atoms, args.nnz, 0)
    A.sum_duplicates()
    B.sum_duplicates()
    t0 = time.perf_counter()
    ab, ba = best_correlations(A, B, min_active=5)
    blocked = time.perf_counter() - t0
    planted = np.arange(0, args.atoms, 4)
    found = float(np.mean(ab.match[planted] == planted))
    out = {"blocked_s": blocked, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "planted_found": found, "input_gb": (A.data.nbytes + A.indices.nbytes + B.data.nbytes + B.indices.nbytes) / 2**30}
    dense_gb = (args.units * args.atoms * 2 + args.atoms * args.atoms) * 8 / 2**30
    out["dense_gb"] = dense_gb
    if dense_gb <= args.dense_gb:
        t0 = time.perf_counter()
        Ad, Bd = A.toarray(), B.toarray()
        za = (Ad - Ad.mean(0)) / np.where(Ad.std(0) > 0, Ad.std(0), 1)
        zb = (Bd - Bd.mean(0)) / np.where(Bd.std(0) > 0, Bd.std(0), 1)
        R = za.T @ zb / args.units
        dense_match = np.abs(R).argmax(1)
        out["dense_s"] = time.perf_counter() - t0
        ok = ab.match >= 0
        out["agree_with_dense"] = float(np.mean(dense_match[ok] == ab.match[ok]))
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", type=int, default=100_000)
    p.add_argument("--atoms", type=int, default=16_384)
    p.add_argument("--nnz", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense-gb", type=float, default=3.0, help="run the dense baseline only under this memory")
    p.add_argument("--quick", action="store_true", help="20k units, 4096 atoms a side")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.units, args.atoms = 20_000, 4096
    if args.child:
        child(args)
        return
    cmd = [sys.executable, __file__, "--child", "--units", str(args.units), "--atoms", str(args.atoms),
           "--nnz", str(args.nnz), "--threads", str(args.threads), "--dense-gb", str(args.dense_gb)]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"{args.units:,} units, {args.atoms:,} x {args.atoms:,} atoms, {args.nnz} non-zeros per unit a side "
          f"(inputs {res['input_gb']:.2f} GB)")
    print(f"blocked match: {res['blocked_s']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB (process total), "
          f"planted twins found {res['planted_found']:.3f}")
    if "dense_s" in res:
        print(f"dense float64 baseline: {res['dense_s']:.1f} s, matches agree {res['agree_with_dense']:.4f}")
        print(f"ratio blocked / dense time: {res['blocked_s'] / res['dense_s']:.2f}")
    else:
        print(f"dense float64 baseline skipped: it needs {res['dense_gb']:.1f} GB (> --dense-gb {args.dense_gb})")


if __name__ == "__main__":
    main()
