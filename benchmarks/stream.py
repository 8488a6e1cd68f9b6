"""The store stream against the machine's limits, and what its shuffle costs a fit, measured in one run.

1. Throughput (``--store-mb`` of float16 at width ``--d``): the shuffled stream's MB/s of store bytes
   and batches/s, from a cold page cache (the store's pages dropped with posix_fadvise(DONTNEED) before
   each run) against a plain sequential read of the same files, and with the pages cached against
   converting every shard to float32 whole (with numpy, and with torch, which the stream uses). Two
   streams: float32 batches checked on the CPU (what a CPU trainer gets) and batches in the store's
   dtype (what a GPU trainer is handed; it converts on the device; with ``--device cuda`` also that
   stream's float32 batches on the GPU); and ``vitatlas store shuffle`` of the store from a cold cache
   (seconds per GB, and in cold epochs of the stream). For every cold run also the disk's read requests
   per MB and their mean size, how much of the time the disk was busy (``/sys/dev/block/*/stat``), and
   the process's CPU seconds per GB: where a cold stream loses against the sequential read. Each of ``--rounds`` rounds runs everything once
   and the ratios are printed round by round (each within one round: the machine's load changes).
2. Processes: bytes each process reads (``/proc/self/io`` rchar) for one shuffled epoch
   as rank 0 of 1 and as ranks 0 and 1 of 2 (two processes at once), and each one's peak RSS.
3. Explained-variance gap: a synthetic store of ``--classes`` classes, written sorted by class and
   written again with the same rows in random order; a TopK SAE and a DBK-SVD (one epoch each) are fitted
   on both and scored on the same held-out rows. The shuffle window is set to 1/``--windows`` of the
   store (and chunks to 1/128 of a window, as at full scale), so the store is several windows long.

    python benchmarks/stream.py --quick       # a 48 MB store, 1 round, 1 seed, small fits (~25 s of CPU)
    python benchmarks/stream.py               # 2 GB store, 3 rounds, 3 seeds of 200k-row fits (~40 min, 2 shared cores)
    python benchmarks/stream.py --device cuda # fits on the GPU, and the stream handed to it
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vitatlas import ActivationStore
from vitatlas.data import store as store_module
from vitatlas.data import stream as stream_module
from vitatlas.data.batches import iter_batch_shares, iter_batches


def files_of(store: ActivationStore) -> list[Path]:
    return [f.path for f in store.shard_files()]


def store_bytes(store: ActivationStore) -> int:
    return store.n_rows * store.d * store.dtype.itemsize


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sequential_read(store: ActivationStore) -> None:
    buf = bytearray(8 << 20)
    for p in files_of(store):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def whole_shard_float32(store: ActivationStore) -> None:
    for p in files_of(store):
        np.asarray(np.load(p, mmap_mode="r"), np.float32)


def shuffled_float32(store: ActivationStore, batch: int, seed: int) -> int:
    return sum(1 for _ in iter_batches(store, batch, shuffle=True, seed=seed))


def shuffled_store_dtype(store: ActivationStore, batch: int, seed: int) -> int:
    plan = store.plan(batch, shuffle=True, seed=seed)
    return sum(1 for _ in stream_module.stream(plan, lambda rows, b, s: torch.from_numpy(rows.copy())))


def make_store(path: Path, rows: int, d: int, chunk_rows: int = 65536) -> ActivationStore:
    from vitatlas.data.store import StoreWriter, rows_per_shard

    writer = StoreWriter(path, d=d, dtype="float16", identity={"bench": rows}, has_labels=False,
                         meta={"source": {"name": "bench"}, "tokens": "given", "layer": None, "model": None,
                               "class_names": None, "world_size": 1})
    rng = np.random.default_rng(0)
    per_shard = rows_per_shard(d, "float16")
    block = rng.standard_normal((per_shard, d)).astype(np.float16)
    for start in range(0, rows, per_shard):
        n = min(per_shard, rows - start)
        ids = np.arange(start, start + n, dtype=np.int32)
        writer.write_shard(block[:n], np.stack([ids, np.zeros_like(ids)], 1), None, n_images=n)
    writer.finish()
    return ActivationStore(path)


def shuffled_copy(store: ActivationStore, to: Path) -> None:
    """``vitatlas store shuffle``: the one-time iid copy (read, scatter into buckets, sort, write, SHA-256)."""
    from vitatlas.data.shuffle_copy import shuffle_store

    copy = shuffle_store(store, to, seed=0)
    for p in copy.path.iterdir():
        p.unlink()
    copy.path.rmdir()


def whole_shard_float32_torch(store: ActivationStore) -> None:
    for p in files_of(store):
        torch.from_numpy(np.load(p, mmap_mode="c")).float()  # copy-on-write: a writable map


def shuffled_to_device(store: ActivationStore, batch: int, seed: int, device: str) -> int:
    n = sum(1 for _ in iter_batches(store, batch, shuffle=True, seed=seed, device=device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n


def disk_stat(path: Path) -> list[int] | None:
    """The block device's counters (``/sys/dev/block/MAJ:MIN/stat``) of the disk holding ``path``; None where
    there are none (not Linux, or a file system without a block device)."""
    dev = os.stat(path).st_dev
    try:
        return [int(x) for x in Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()]
    except (OSError, ValueError):
        return None


def cold_pass(files: list[Path], fn) -> dict:
    """One run of ``fn`` from a cold cache: its seconds, the disk's read requests and sectors and busy
    milliseconds (when known), and this process's CPU seconds (user, system)."""
    stream_module.drop_cache(files)
    before, cpu0, t = disk_stat(files[0]), os.times(), time.perf_counter()
    fn()
    seconds, cpu1, after = time.perf_counter() - t, os.times(), disk_stat(files[0])
    out = {"s": seconds, "user": cpu1.user - cpu0.user, "sys": cpu1.system - cpu0.system}
    if before is not None and after is not None:
        d = [b - a for a, b in zip(before, after)]
        out |= {"requests": d[0], "sectors": d[2], "busy_ms": d[9]}
    return out


def throughput(store: ActivationStore, batch: int, rounds: int, device: str = "cpu", copy: bool = True) -> None:
    mb = store_bytes(store) / 1e6
    windows = len(store.plan(batch, shuffle=True, seed=0).windows)
    times: dict[str, list[float]] = {}
    n_batches = -(-store.n_rows // batch)
    cold = {"sequential read (cold)": lambda: sequential_read(store),
            "shuffled stream float32 (cold)": lambda: shuffled_float32(store, batch, 1),
            "shuffled stream store dtype (cold)": lambda: shuffled_store_dtype(store, batch, 2)}
    if copy:
        cold["shuffled copy (cold; vitatlas store shuffle)"] = lambda: shuffled_copy(store, store.path.parent / "copy")
    warm = {"whole-shard float32, numpy (cached)": lambda: whole_shard_float32(store),
            "whole-shard float32, torch (cached)": lambda: whole_shard_float32_torch(store),
            "shuffled stream float32 (cached)": lambda: shuffled_float32(store, batch, 3),
            "shuffled stream store dtype (cached)": lambda: shuffled_store_dtype(store, batch, 4)}
    if device != "cpu":  # float16 over the bus, converted and checked on the device
        cold[f"shuffled stream float32 on {device} (cold)"] = lambda: shuffled_to_device(store, batch, 5, device)
        warm[f"shuffled stream float32 on {device} (cached)"] = lambda: shuffled_to_device(store, batch, 6, device)
    loads, passes = [], {}
    for _ in range(rounds):  # each round runs everything once: a ratio is taken within one round
        for name, fn in cold.items():
            passes.setdefault(name, []).append(cold_pass(files_of(store), fn))
            times.setdefault(name, []).append(passes[name][-1]["s"])
        sequential_read(store)  # warm the cache
        for name, fn in warm.items():
            times.setdefault(name, []).append(timed(fn))
        loads.append(os.getloadavg()[0])
    print(f"\n## throughput: {store.n_rows:,} rows x {store.d} float16 = {mb:.0f} MB, {len(store.shards)} shards, "
          f"batch {batch}, {windows} shuffle windows, {rounds} rounds (load average after each: "
          + ", ".join(f"{x:.1f}" for x in loads) + ")")
    print(f"{'run':48s} {'MB/s in each round':>30s} {'batches/s (best)':>17s}")
    for name, t in times.items():
        rates = " ".join(f"{mb / x:6.0f}" for x in t)
        print(f"{name:48s} {rates:>30s} {n_batches / min(t) if 'stream' in name else float('nan'):17.0f}")
    for a, b in (("shuffled stream store dtype (cold)", "sequential read (cold)"),
                 ("shuffled stream float32 (cold)", "sequential read (cold)"),
                 ("shuffled stream float32 (cached)", "whole-shard float32, numpy (cached)"),
                 ("shuffled stream float32 (cached)", "whole-shard float32, torch (cached)"),
                 ("shuffled stream store dtype (cached)", "whole-shard float32, numpy (cached)")):
        r = np.array(times[b]) / np.array(times[a])
        print(f"ratio {a} / {b}: " + " ".join(f"{x:.2f}" for x in r) + f"  (median {np.median(r):.2f})")
    gb = mb / 1e3
    print("cold runs, median over the rounds: the disk's read requests per MB and their mean size, the share of the "
          "time the disk had a request in flight, and this process's CPU seconds per GB (user + system)")
    for name, ps in passes.items():
        cpu = np.median([(p["user"] + p["sys"]) / gb for p in ps])
        split = f"user {np.median([p['user'] / gb for p in ps]):.2f} + sys {np.median([p['sys'] / gb for p in ps]):.2f}"
        if all("requests" in p for p in ps):
            per_mb = np.median([p["requests"] / mb for p in ps])
            size = np.median([p["sectors"] * 512 / 1024 / max(p["requests"], 1) for p in ps])
            busy = np.median([p["busy_ms"] / 1e3 / p["s"] for p in ps])
            print(f"  {name:46s} {per_mb:5.2f} requests/MB of {size:5.0f} KB, disk busy {busy:4.0%}, "
                  f"CPU {cpu:.2f} s/GB ({split})")
        else:
            print(f"  {name:46s} (no disk counters) CPU {cpu:.2f} s/GB ({split})")
    if copy:
        c = np.array(times["shuffled copy (cold; vitatlas store shuffle)"])
        e = np.array(times["shuffled stream store dtype (cold)"])
        print(f"shuffled copy: {' '.join(f'{x / (mb / 1e3):.1f}' for x in c)} s per GB of store, "
              f"{' '.join(f'{x:.1f}' for x in c / e)} cold epochs of the stream (median {np.median(c / e):.1f}), "
              "and as much disk again")


def rchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def vm(field: str) -> float:
    """A /proc/self/status memory figure in MB (ru_maxrss when there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(path: str, batch: int, rank: int, size: int) -> None:
    """One process's epoch of the shuffled stream (its share); prints what it read and its peak RSS."""
    store = ActivationStore(path)
    store.shard_files()  # the headers are read before counting
    base = vm("VmRSS")
    try:  # restart the peak (VmHWM) here: the imports' own peak is not the stream's
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = rchar()
    rows = 0
    for _, x in iter_batch_shares(store, batch, shuffle=True, seed=9, rank=rank, size=size):
        rows += x.shape[0]
    after = rchar()
    print(json.dumps({"rank": rank, "size": size, "rows": rows, "rchar": after - before if before >= 0 else None,
                      "max_rss_mb": vm("VmHWM"), "base_rss_mb": base}))


def processes(store: ActivationStore, batch: int) -> None:
    def run(size: int) -> list[dict]:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(store.path), str(batch), str(r), str(size)],
                                  stdout=subprocess.PIPE, text=True) for r in range(size)]
        return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]

    one, two = run(1), run(2)
    mb = store_bytes(store) / 1e6
    print(f"\n## bytes read per process, one shuffled epoch of {mb:.0f} MB (rchar: bytes the process read)")
    for r in one + two:
        print(f"rank {r['rank']} of {r['size']}: rows {r['rows']:,}  read {r['rchar'] / 1e6:.0f} MB  "
              f"peak RSS while streaming {r['max_rss_mb']:.0f} MB ({r['base_rss_mb']:.0f} MB before)")
    print(f"ratio read by each of 2 / read by 1: {two[0]['rchar'] / one[0]['rchar']:.3f}, "
          f"{two[1]['rchar'] / one[0]['rchar']:.3f}")


# ---- explained-variance gap ----------------------------------------------------------------------------

def class_data(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``classes`` classes: a class mean, 24 class-specific sparse atoms and 32 shared ones, noise
    (more directions than the fits have atoms, so what a fit saw last matters)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    means = rng.standard_normal((classes, d)) * 1.5
    own = rng.standard_normal((classes, 24, d))
    shared = rng.standard_normal((32, d))
    X = means[y] + 0.2 * rng.standard_normal((n, d))
    on = rng.random((n, 24)) < 0.25
    X += np.einsum("nk,nkd->nd", on * rng.exponential(1.0, (n, 24)), own[y])
    on = rng.random((n, 32)) < 0.1
    X += (on * rng.exponential(1.0, (n, 32))) @ shared
    return X.astype(np.float32), y


def held_out_ev(dictionary, X: np.ndarray) -> float:
    R = dictionary.reconstruct(X)
    R = np.asarray(R.detach().cpu() if isinstance(R, torch.Tensor) else R, np.float64)
    return 1.0 - float(((X - R) ** 2).sum() / ((X - X.mean(0)) ** 2).sum())


def ev_gap(root: Path, n: int, d: int, classes: int, seeds: list[int], windows: int, sae_latents: int,
           atoms: int, device: str = "cpu") -> None:
    from vitatlas.learners.dbksvd import DBKSVD
    from vitatlas.learners.sae import SAE

    window_bytes = n * d * 4 // windows  # the shuffle window, counted in float32 as SHUFFLE_BUFFER_BYTES is
    store_module.SHUFFLE_BUFFER_BYTES = window_bytes
    stream_module.CHUNK_BYTES = max(d * 2, window_bytes // 2 // 128)  # 128 chunks per window, as at full scale
    stream_module.MIN_PIECE_BYTES = 4 * d * 2  # pieces of at least 4 rows (5 at ViT-S width, 2 at ViT-B)
    print(f"\n## explained-variance gap: {n:,} rows x {d}, {classes} classes, shuffle window 1/{windows} of "
          f"the store ({window_bytes / 2 / 1e6:.1f} MB float16, chunks of {stream_module.CHUNK_BYTES // (2 * d)} rows, "
          "pieces of at least 4 rows)")
    print(f"{'seed':>4s} {'learner':8s} {'sorted':>8s} {'random':>8s} {'gap':>8s}")
    gaps: dict[str, list[float]] = {"sae": [], "dbksvd": []}
    for seed in seeds:
        X, y = class_data(n + 20_000, d, classes, seed)
        test, X, y = X[:20_000], X[20_000:], y[20_000:]
        order = {"sorted": np.argsort(y, kind="stable"), "random": np.random.default_rng(seed).permutation(n)}
        stores = {k: ActivationStore.from_array(root / f"{k}-{seed}", X[o], y[o], dtype="float16", shard_bytes=16 << 20)
                  for k, o in order.items()}
        ev = {}
        for name, make in (("sae", lambda s=seed: SAE(kind="topk", n_latents=sae_latents, k=8, epochs=1,
                                                      batch_size=1024, seed=s, device=device)),
                           ("dbksvd", lambda s=seed: DBKSVD(n_atoms=atoms, k=8, epochs=1, seed=s, device=device))):
            for k, s in stores.items():
                ev[name, k] = held_out_ev(make().fit(s, progress=False), test)
            gaps[name].append(ev[name, "random"] - ev[name, "sorted"])
            print(f"{seed:4d} {name:8s} {ev[name, 'sorted']:8.4f} {ev[name, 'random']:8.4f} {gaps[name][-1]:+8.4f}")
        for s in stores.values():
            for p in s.path.iterdir():
                p.unlink()
            s.path.rmdir()
    for name, g in gaps.items():
        print(f"{name}: gap (random - sorted) mean {np.mean(g):+.4f}, max {np.max(g):+.4f} over {len(g)} seed(s)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small store, one round, one seed (well under a minute)")
    ap.add_argument("--store-mb", type=int, default=2048, help="size of the throughput store (float16)")
    ap.add_argument("--d", type=int, default=768, help="width of the throughput store")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the explained-variance gap")
    ap.add_argument("--ev-rows", type=int, default=200_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--windows", type=int, default=8, help="the store is this many shuffle windows long")
    ap.add_argument("--dir", default=None, help="where the temporary stores go (default: the system temp dir)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where the fits run and where a stream is handed")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "processes", "ev", "copy"])
    args = ap.parse_args()
    if args.quick:
        args.store_mb, args.rounds, args.seeds, args.ev_rows = 48, 1, 1, 20_000
        store_module.SHUFFLE_BUFFER_BYTES = 16 << 20  # the quick store is still several windows long
    t0 = time.perf_counter()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="vitatlas-stream-") as tmp:
        root = Path(tmp)
        if "throughput" not in args.skip or "processes" not in args.skip:
            rows = args.store_mb * (1 << 20) // (2 * args.d)
            store = make_store(root / "big", rows, args.d)
            if "throughput" not in args.skip:
                throughput(store, args.batch, args.rounds, args.device, copy="copy" not in args.skip)
            if "processes" not in args.skip:
                processes(store, args.batch)
            print(f"({time.perf_counter() - t0:.0f} s so far)")
        if "ev" not in args.skip:
            ev_gap(root, args.ev_rows, 64, args.classes, list(range(args.seeds)), args.windows,
                   sae_latents=128 if args.quick else 512, atoms=64 if args.quick else 256, device=args.device)
    print(f"({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
