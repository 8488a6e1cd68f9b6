"""Benchmark: vitatlas DBK-SVD against other dictionary learners, in one process on the same data.

Peers (optional; each is skipped with the reason when missing or failing):
  scikit-learn MiniBatchDictionaryLearning, dictlearn DictionaryLearning (K-SVD, and AK-SVD with parallel
  atom sweeps), SPAMS trainDL in L0 mode (pip ``spams-bin``). Install: ``pip install dictlearn spams-bin``.

For each learner: fit seconds, fraction of planted atoms recovered (|cos| >= 0.99), held-out relative
residual mean ‖x − x̂‖/‖x‖ (every dictionary is scored with the same exact k-sparse OMP, so only the
atoms are compared), and time / vitatlas time. Problems: planted A d=128/512 atoms/k=5/N=20k, B
d=384/1536/k=8/N=100k and C d=160/640/k=6/N=24k (issue 9's configuration, SPAMS with a 60 s budget),
plus a real store given by --store (a --store-rows subsample, 10% held out; e.g. DINOv2-S layer-8
patch tokens). Then one DBK-SVD iteration is timed against its dense product DᵀY alone at d=768,
3072 atoms, k=10, on a sample batch of --iter-batch rows, at 1 and 2 threads. The last lines are the
ratios issue 9 asks for: speed vs SPAMS at its recovery (target >= 20x), real-data signal_recovered
vs dictlearn AK-SVD and the bar 0.73, iteration / DᵀY (target <= 2). The iteration timing alone:
``--problems "" --peers "" --iter-threads 1,2``.

Each planted problem is drawn with every seed of --seeds (default 1,2,3, --quick 1: atoms, codes and noise; the
learners keep their own seed 0), and a per-seed table follows (issue 19): DBK-SVD's iterations, whether
it ended early, fit seconds, recovered fraction and its speed ratio against the best peer (the peer
of highest recovery, the fastest among ties; its seconds / DBK-SVD's), then the median and minimum
over the seeds. Problem D is d=96, 384 atoms, k=4, N=16k (more atoms per dimension than A and C).

    python benchmarks/dictionary_learning.py [--quick] [--problems A,B,C,D] [--seeds 1,2,3] [--store DIR]
                                             [--threads N] [--device cpu|cuda] [--memory]

``--device cuda`` runs vitatlas (and the DᵀY timing) on the GPU; the peers are CPU-only.

``--memory`` instead writes a ~4 GB float16 store (d=768) to a temporary directory, fits one epoch of
DBK-SVD on it in a child process, prints that process's peak RSS, and deletes the store.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from vitatlas.learners.dbksvd import DBKSVD
from vitatlas.learners.dbksvd.coders import batch_omp, sparse_decode

# ---- data and scoring ----------------------------------------------------------------------------

def planted(d: int, n_atoms: int, k: int, N: int, noise: float = 0.01, seed: int = 0):
    """Random unit atoms, k-sparse codes with |coef| in [1, 2] and random signs, Gaussian noise."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = np.empty((N, d), np.float32)
    for s in range(0, N, 8192):
        m = min(8192, N - s)
        idx = np.argpartition(rng.random((m, n_atoms)), k, axis=1)[:, :k]
        vals = rng.uniform(1, 2, (m, k)) * rng.choice([-1, 1], (m, k))
        X[s:s + m] = np.einsum("nk,nkd->nd", vals, D[idx]) + noise * rng.standard_normal((m, d))
    return X, D.astype(np.float32)


def recovered(D_true: np.ndarray | None, D_hat: np.ndarray) -> float:
    if D_true is None:
        return float("nan")
    D_hat = D_hat / np.maximum(np.linalg.norm(D_hat, axis=1, keepdims=True), 1e-12)
    return float((np.abs(D_true @ D_hat.T).max(axis=1) >= 0.99).mean())


def heldout_residual(D_hat: np.ndarray, X: np.ndarray, k: int) -> float:
    """Mean relative residual of exact k-sparse OMP (float64) with the atoms D_hat."""
    D = torch.from_numpy(D_hat.astype(np.float64))
    D = D / D.norm(dim=1, keepdim=True).clamp(min=1e-12)
    G = D @ D.T
    out = []
    for s in range(0, X.shape[0], 1024):
        Y = torch.from_numpy(X[s:s + 1024].astype(np.float64))
        idx, val = batch_omp(Y @ D.T, G, (Y * Y).sum(1), k)
        out.append(((Y - sparse_decode(idx, val, D)).norm(dim=1) / Y.norm(dim=1).clamp(min=1e-12)).numpy())
    return float(np.concatenate(out).mean())


# ---- learners: each returns (atoms (n_atoms, d), note) -----------------------------------------

# the planted problems are signed and zero-mean: the plain K-SVD of the papers and of SPAMS (the defaults,
# centred with non-negative codes, are for activations)
SIGNED = {"center": False, "nonnegative": False}


def run_vitatlas(X, n_atoms, k, budget, threads, seed=0, **opts):
    m = DBKSVD(n_atoms, k, seed=seed, **{**SIGNED, **opts}).fit(X, progress=False)
    _sync(m.device)
    early = len(m.history) < m._step  # the schedule's step jumped past the iterations run: it ended early
    LAST_FIT.update(iterations=len(m.history), early=early)
    return m.atoms.cpu().numpy(), f"{len(m.history)} iterations{' (ended early)' if early else ''}, {m.device}"


LAST_FIT: dict = {}  # iterations and early end of the last run_vitatlas fit


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_sklearn(X, n_atoms, k, budget, threads, seed=0):
    from sklearn.decomposition import MiniBatchDictionaryLearning

    # L1 (lasso) coding while fitting: its only fit algorithms. partial_fit on shuffled batches of 256
    # until the time budget (seconds) is spent.
    m = MiniBatchDictionaryLearning(n_components=n_atoms, alpha=0.1, batch_size=256, transform_algorithm="omp",
                                    transform_n_nonzero_coefs=k, random_state=seed)
    rng = np.random.default_rng(seed)
    t0, seen = time.perf_counter(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LARS ConvergenceWarnings flood the table otherwise
        while time.perf_counter() - t0 < budget:
            batch = X[rng.choice(X.shape[0], min(256, X.shape[0]), replace=False)]
            m.partial_fit(batch)
            seen += 256
    return m.components_, f"{budget:.0f} s budget ({seen / X.shape[0]:.2f} epochs), lasso alpha=0.1"


def run_dictlearn(X, n_atoms, k, budget, threads, seed=0, algorithm="ksvd", parallel=False):
    from dictlearn import DictionaryLearning

    iters = max(1, int(budget))
    m = DictionaryLearning(n_components=n_atoms, fit_algorithm=algorithm, n_nonzero_coefs=k, max_iter=iters,
                           atom_sweep="parallel" if parallel else "sequential", random_state=seed)
    m.fit(X)
    return m.components_, f"{iters} iterations{', parallel sweep' if parallel else ''}"


def run_spams(X, n_atoms, k, budget, threads, seed=0):
    import spams

    np.random.seed(seed)
    Xf = np.asfortranarray(X.T.astype(np.float64))
    # iter < 0 means a time budget in seconds
    D = spams.trainDL(Xf, K=n_atoms, lambda1=k, mode=3, iter=-max(1, int(budget)), batchsize=512,
                      numThreads=threads, verbose=False)
    return np.ascontiguousarray(D.T), f"{int(budget)} s time budget, L0 mode, batch 512"


# ---- one problem -----------------------------------------------------------------------------------

def compare(name, X, Xtest, D_true, n_atoms, k, budgets, threads, vit_opts):
    print(f"\n## {name}: N={X.shape[0]} d={X.shape[1]} atoms={n_atoms} k={k} (held-out {Xtest.shape[0]})")
    print(f"{'learner':<28}{'seconds':>10}{'recovered':>11}{'heldout_resid':>15}{'time/vitatlas':>15}  note")
    learners = [("vitatlas DBK-SVD", lambda: run_vitatlas(X, n_atoms, k, None, threads, **vit_opts))]
    peers = [
        ("sklearn MiniBatchDL", lambda: run_sklearn(X, n_atoms, k, budgets["sklearn"], threads)),
        ("dictlearn K-SVD", lambda: run_dictlearn(X, n_atoms, k, budgets["ksvd"], threads)),
        ("dictlearn AK-SVD parallel", lambda: run_dictlearn(X, n_atoms, k, budgets["aksvd"], threads,
                                                            algorithm="aksvd", parallel=True)),
        ("SPAMS trainDL (L0)", lambda: run_spams(X, n_atoms, k, budgets["spams"], threads)),
    ]
    learners += [(label, fn) for (label, fn), key in zip(peers, PEER_KEYS, strict=True) if key in PEERS]
    rows, base = [], None
    for label, fn in learners:
        try:
            t0 = time.perf_counter()
            atoms, note = fn()
            sec = time.perf_counter() - t0
        except ImportError as exc:
            print(f"{label:<28}{'skipped':>10}  not installed ({exc.name}): pip install dictlearn spams-bin")
            continue
        except Exception as exc:  # a peer that fails must not stop the benchmark
            print(f"{label:<28}{'skipped':>10}  failed: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        base = sec if base is None else base
        rec, res = recovered(D_true, atoms), heldout_residual(atoms, Xtest, k)
        rows.append((label, sec, rec, res))
        SUMMARY.setdefault(name, {})[label] = (sec, rec, 1 - res)
        if label == "vitatlas DBK-SVD":
            FITS[name] = dict(LAST_FIT)
        print(f"{label:<28}{sec:>10.1f}{rec:>11.3f}{res:>15.4f}{sec / base:>15.1f}  {note}", flush=True)
    return rows


PEER_KEYS = ("sklearn", "ksvd", "aksvd", "spams")
PEERS = set(PEER_KEYS)  # --peers narrows it
SUMMARY: dict[str, dict[str, tuple[float, float, float]]] = {}  # problem -> learner -> (s, recovered, signal)
FITS: dict[str, dict] = {}  # problem -> DBK-SVD's iterations and early end


def best_peer(table: dict[str, tuple[float, float, float]]) -> tuple[str, tuple[float, float, float]] | None:
    """The peer of highest recovery, the fastest among ties (None without peers)."""
    peers = [(label, row) for label, row in table.items() if label != "vitatlas DBK-SVD"]
    return min(peers, key=lambda p: (-p[1][1], p[1][0])) if peers else None


def print_seeds(seeds: dict[str, list[tuple[int, str]]]) -> None:
    """Per planted problem: one line per seed, then the median and minimum over the seeds."""
    print("\n## planted problems over seeds (DBK-SVD with its defaults; ratio = best peer's seconds / DBK-SVD's)")
    print(f"{'problem':<12}{'seed':>5}{'iters':>7}{'early':>7}{'seconds':>9}{'recovered':>11}{'ratio':>8}  best peer "
          "(recovered; DBK-SVD >= it?)")
    for problem, runs in seeds.items():
        ratios, recs, iters = [], [], []
        for seed, name in runs:
            table, fit = SUMMARY.get(name, {}), FITS.get(name)
            vit = table.get("vitatlas DBK-SVD")
            if vit is None or fit is None:
                continue
            peer = best_peer(table)
            ratio = peer[1][0] / vit[0] if peer else float("nan")
            note = (f"{peer[0]} ({peer[1][1]:.3f}; {'yes' if vit[1] >= peer[1][1] else 'NO'})" if peer
                    else "no peer ran")
            ratios.append(ratio)
            recs.append(vit[1])
            iters.append(fit["iterations"])
            print(f"{problem:<12}{seed:>5}{fit['iterations']:>7}{'yes' if fit['early'] else 'no':>7}{vit[0]:>9.1f}"
                  f"{vit[1]:>11.4f}{ratio:>8.1f}  {note}")
        if recs:
            print(f"{problem:<12}{'':>5}  median: {np.median(iters):.0f} iterations, recovered {np.median(recs):.4f}, "
                  f"ratio {np.median(ratios):.1f}x; min: recovered {min(recs):.4f}, ratio {min(ratios):.1f}x")


def time_iteration(B: int, threads: int, d=768, n_atoms=3072, k=10, seed=0, device="cpu"):
    """One DBK-SVD iteration vs its dense product DᵀY alone, on a batch of B samples.

    The product is timed two ways: ``Y @ D.T`` into a new (B, n_atoms) tensor, as a user would write it
    (its time includes faulting in the fresh pages, which swung from 2.7 to 4.1 s between runs here),
    and into an output buffer that is already in memory, the bare GEMM. The ratio that counts is
    against the bare GEMM: the stricter one.
    """
    torch.set_num_threads(threads)
    X, _ = planted(d, n_atoms, k, B, seed=seed)
    Y = torch.from_numpy(X).to(device)
    model = DBKSVD(n_atoms, k, sample_batch=B, device=device, **SIGNED)
    rng = np.random.default_rng(seed)
    model._init_from_rows(Y[torch.from_numpy(rng.choice(B, n_atoms, replace=False))], 0, n_atoms, d)
    D = model.atoms.clone()
    fresh, warm, it = [], [], []
    for _rep in range(3):
        _sync(device)
        t0 = time.perf_counter()
        C = Y @ D.T
        _sync(device)
        fresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.matmul(Y, D.T, out=C)
        _sync(device)
        warm.append(time.perf_counter() - t0)
        del C
        t0 = time.perf_counter()
        model._iteration(Y, 0, n_atoms)
        _sync(device)
        it.append(time.perf_counter() - t0)
        model.set_atoms(D)
    f, p, i = min(fresh), min(warm), min(it)
    print(f"\n## one iteration at d={d}, atoms={n_atoms}, k={k}, batch={B} ({threads} thread(s), {device})")
    print(f"DᵀY product {p:.2f} s into a buffer in memory ({f:.2f} s into a new tensor), full iteration (Gram, "
          f"screened OMP, K-SVD update) {i:.2f} s, iteration / DᵀY = {i / p:.2f} (target <= 2; {i / f:.2f} "
          "against the product into a new tensor)", flush=True)
    print(f"  repeats: DᵀY {' '.join(f'{t:.2f}' for t in warm)} s, iteration {' '.join(f'{t:.2f}' for t in it)} s, "
          f"ratios {' '.join(f'{a / b:.2f}' for a, b in zip(it, warm, strict=True))}", flush=True)
    return i / p


def print_ratios(iteration_ratios: dict[int, float], store_name: str | None) -> None:
    """The figures issue 9 asks for, from this run's tables."""
    print("\n## ratios (issue 9 targets)")
    for name, table in SUMMARY.items():
        vit, spams = table.get("vitatlas DBK-SVD"), table.get("SPAMS trainDL (L0)")
        if vit and spams and name.startswith("planted"):
            ok = "met" if vit[1] >= spams[1] and spams[0] / vit[0] >= 20 else "NOT met"
            print(f"{name}: vitatlas {spams[0] / vit[0]:.1f}x SPAMS's speed, recovery {vit[1]:.3f} vs SPAMS "
                  f"{spams[1]:.3f} (target >= 20x at >= its recovery: {ok})")
    if store_name and store_name in SUMMARY:
        table = SUMMARY[store_name]
        vit, ak = table.get("vitatlas DBK-SVD"), table.get("dictlearn AK-SVD parallel")
        if vit:
            peer = f", dictlearn AK-SVD {ak[2]:.4f} in {ak[0]:.0f} s" if ak else ", dictlearn AK-SVD skipped"
            print(f"real data: vitatlas held-out signal_recovered {vit[2]:.4f} in {vit[0]:.1f} s{peer}; "
                  f"bar 0.73: {'met' if vit[2] >= 0.73 else 'NOT met'}")
    for threads, r in iteration_ratios.items():
        print(f"iteration / DᵀY at {threads} thread(s): {r:.2f} (target <= 2: {'met' if r <= 2 else 'NOT met'})")


# ---- memory mode ----------------------------------------------------------------------------------

def memory_check(gb: float, threads: int):
    from vitatlas.data.store import StoreWriter

    d = 768
    rows = int(gb * 2 ** 30 / (2 * d))
    tmp = tempfile.mkdtemp(prefix="vitatlas-mem-")
    try:
        writer = StoreWriter(tmp, d=d, dtype="float16", identity={"bench": rows}, meta={"source": {"name": "bench"}},
                             has_labels=False)
        rng = np.random.default_rng(0)
        D = rng.standard_normal((1024, d)).astype(np.float32)
        step = 40_000
        t0 = time.perf_counter()
        for s in range(0, rows, step):
            m = min(step, rows - s)
            idx = rng.integers(0, 1024, (m, 8))
            chunk = np.einsum("nk,nkd->nd", rng.uniform(1, 2, (m, 8)).astype(np.float32), D[idx])
            ids = np.arange(s, s + m, dtype=np.int32)
            writer.write_shard(chunk, np.stack([ids, np.zeros_like(ids)], 1), None, n_images=m)
        writer.finish()
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 2 ** 30
        print(f"wrote {rows} rows x {d} float16 = {size:.2f} GiB in {time.perf_counter() - t0:.0f} s")
        code = f"""
import threading, time, torch
from vitatlas import ActivationStore
from vitatlas.learners.dbksvd import DBKSVD
peak = {{}}
def status():
    out = {{}}
    for line in open('/proc/self/status'):
        if line.startswith(('VmRSS', 'RssAnon', 'RssFile')):
            name, value = line.split(':')
            out[name] = int(value.split()[0]) / 2 ** 20
    return out
def sample():
    while True:
        for name, v in status().items():
            peak[name] = max(peak.get(name, 0.0), v)
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
torch.set_num_threads({threads})
s = ActivationStore({tmp!r})
t = time.perf_counter()
m = DBKSVD(1024, 8, epochs=1).fit(s, progress=False)
time.sleep(0.3)
import resource
hwm = [int(line.split()[1]) / 2 ** 20 for line in open('/proc/self/status') if line.startswith('VmHWM')][0]
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
print(f"fit 1 epoch: {{time.perf_counter() - t:.0f}} s, {{len(m.history)}} iterations of {{m._sample_batch()}} rows; "
      f"peak GiB (sampled every 0.1 s): anonymous (heap) {{peak['RssAnon']:.2f}}, file pages {{peak['RssFile']:.2f}}, "
      f"total RSS {{peak['VmRSS']:.2f}}; kernel's peak RSS: VmHWM {{hwm:.2f}} GiB, ru_maxrss {{maxrss:.2f}} GiB "
      f"(target < 2 GiB: {{'met' if max(hwm, maxrss) < 2 else 'NOT met'}})")
"""
        subprocess.run([sys.executable, "-c", code], check=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"deleted {tmp}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small problems and budgets (< 2 min)")
    ap.add_argument("--store", default=None, help="activation store for the real-data comparison")
    ap.add_argument("--store-atoms", type=int, default=None, help="atoms for --store (default 4·d)")
    ap.add_argument("--store-k", type=int, default=8, help="k for --store")
    ap.add_argument("--store-rows", type=int, default=40_000, help="rows sampled from --store (10%% held out)")
    ap.add_argument("--problems", default="A,B,C", help="planted problems to run (A, B, C, D; empty: none)")
    ap.add_argument("--seeds", default=None, help="seeds each planted problem is drawn with (default 1,2,3; "
                    "--quick: 1)")
    ap.add_argument("--iter-threads", default="1,2", help="thread counts for the iteration/DᵀY timing")
    ap.add_argument("--device", default="cpu", help="device for vitatlas: cpu, or cuda when present")
    ap.add_argument("--threads", type=int, default=1, help="threads for every learner (default 1: shared CPUs)")
    ap.add_argument("--iter-batch", type=int, default=None, help="batch for the iteration/DᵀY timing")
    ap.add_argument("--memory", action="store_true", help="run only the ~4 GB float16 store memory check")
    ap.add_argument("--memory-gb", type=float, default=4.2)
    ap.add_argument("--peers", default=",".join(PEER_KEYS), help="peers to run (sklearn, ksvd, aksvd, spams)")
    args = ap.parse_args()
    PEERS.intersection_update(p.strip() for p in args.peers.split(","))
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(args.threads)
    except ImportError:
        limits = contextlib.nullcontext()
    with limits:
        print(f"torch {torch.__version__}, {args.threads} thread(s) for every learner")
        if args.memory:
            memory_check(args.memory_gb, args.threads)
            return
        vit_opts = {"device": args.device}
        if args.quick:
            problems = [("planted small", 64, 256, 4, 8000, dict(sklearn=10, ksvd=5, aksvd=10, spams=10))]
        else:
            every = {
                "A": ("planted A", 128, 512, 5, 20_000, dict(sklearn=45, ksvd=6, aksvd=12, spams=45)),
                "B": ("planted B", 384, 1536, 8, 100_000, dict(sklearn=90, ksvd=1, aksvd=1, spams=90)),
                "C": ("planted C", 160, 640, 6, 24_000, dict(sklearn=30, ksvd=2, aksvd=4, spams=60)),
                "D": ("planted D", 96, 384, 4, 16_000, dict(sklearn=20, ksvd=3, aksvd=6, spams=30)),
            }
            problems = [every[p.strip().upper()] for p in args.problems.split(",") if p.strip()]
        seeds = [int(s) for s in (args.seeds or ("1" if args.quick else "1,2,3")).split(",") if s.strip()]
        by_seed: dict[str, list[tuple[int, str]]] = {}
        for problem, d, n, k, N, budgets in problems:
            for seed in seeds:
                name = f"{problem} seed {seed}"
                X, D = planted(d, n, k, N + 2000, seed=seed)
                compare(name, X[:N], X[N:], D, n, k, budgets, args.threads, vit_opts)
                by_seed.setdefault(problem, []).append((seed, name))
            print("(peers ran with the time/iteration budgets in 'note' so the run stays under ~15 min; "
                  "vitatlas with its defaults)")
        if by_seed:
            print_seeds(by_seed)
        store_name = None
        if args.store:
            from vitatlas import ActivationStore

            store = ActivationStore(args.store)
            rng = np.random.default_rng(0)
            ids = np.sort(rng.choice(store.n_rows, min(args.store_rows, store.n_rows), replace=False))
            data = store.rows(ids)
            perm = rng.permutation(data.shape[0])
            n_test = data.shape[0] // 10
            Xtr, Xte = data[perm[n_test:]], data[perm[:n_test]]
            n_atoms = args.store_atoms or 4 * store.d
            budgets = dict(sklearn=60, ksvd=2, aksvd=10, spams=60) if not args.quick else dict(sklearn=10, ksvd=1,
                                                                                                aksvd=1, spams=10)
            store_name = f"store {args.store}"
            compare(store_name, Xtr, Xte, None, n_atoms, args.store_k, budgets, args.threads,
                    {**vit_opts, "epochs": 2} if args.quick else vit_opts)
        ratios = {}
        for threads in [int(t) for t in args.iter_threads.split(",") if t.strip()]:
            with _threads(threads):
                ratios[threads] = time_iteration(args.iter_batch or (16_384 if args.quick else 100_000), threads,
                                                 device=args.device)
        torch.set_num_threads(args.threads)
        print_ratios(ratios, store_name)


def _threads(n: int):
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(n)
    except ImportError:
        return contextlib.nullcontext()


if __name__ == "__main__":
    main()
