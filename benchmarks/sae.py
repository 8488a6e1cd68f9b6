"""Benchmark: vitatlas TopK / BatchTopK SAEs against the `overcomplete` library (0.3.0), and sweeps.

Same data, same budget for both libraries: same latents, k, epochs, batch size, batches (the same
shuffled rows in the same order), Adam with the same learning rate, warm-up + cosine schedule and
gradient clipping at 1.0. Inputs are scaled so that mean ‖x‖² = d for both (vitatlas does this itself;
the peer gets the pre-scaled data, so its learning rate means the same). The peer uses its own TopK /
BatchTopK SAEs (linear encoder, l2-normalised dictionary) with its AuxK criterion
(``top_k_auxiliary_loss``), in a loop equal to its ``train_sae`` without the per-batch monitoring.
Its BatchTopK takes the batch's total number of codes (k · batch size).

1. The issue-9 table: TopK SAEs at k = 8 and k = 32 (``--ks``), 1 and 2 threads (``--thread-list``), on
   ``--rows`` rows (default 36,864) of the store (or of a planted problem without ``--store``), 1,536
   latents, batch 1,024, 20 epochs. Each configuration runs ``--rounds`` times alternating which library
   goes first; the best tokens/s of each is kept. Printed: tokens/s, explained_variance and dead_fraction
   measured on all rows after training (the same code for both), and the ratios vitatlas / peer.
2. BatchTopK at k = 32 (``--threads``), same data.
3. The time of a sweep of 4 SAEs (k = k/4, k/2, k, 2k) in one pass vs one SAE vs 4 separate fits.
4. ``init``: the dead latents of issue 19, TopK at each of ``--ks``: the default (``init="random"``,
   ``revive="none"``: AuxK alone) against ``revive="lift"``, ``revive="resample"``, ``init="data"`` and
   ``init="data", revive="lift"``, the default budget, on the same rows: explained variance, signal
   recovered, dead and dense fractions on all rows, and the latents revived.
5. ``--big`` (on by default with ``--device cuda``): TopK tokens/s at d = 768, 16,384 latents, k = 32,
   batch 4,096, random data, against the peer on the same device.

``--device cuda`` runs both libraries on the GPU (timings synchronise the device).

Install the peer (optional; skipped with the reason printed if missing)::

    pip install --no-deps overcomplete==0.3.0
    pip install einops

It imports torchvision and OpenCV only for its plotting helpers: the script puts empty ``torchvision``
and ``cv2`` modules in ``sys.modules`` when they are missing (never install torchvision next to the
CPU torch).

Usage: ``python benchmarks/sae.py [--store DIR] [--quick] [--device cpu|cuda]`` (``--quick`` < 2 min on 2
CPU cores; the default run takes about 20 minutes there, most of it the peer).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types

import numpy as np
import torch

from vitatlas import ActivationStore
from vitatlas.evaluation.metrics import reconstruction_metrics
from vitatlas.learners.sae import SAE
from vitatlas.learners.sae.train import SAESweep, _Member, epoch_seed, training_budget

# ---- the peer ---------------------------------------------------------------------------------------

def import_peer():
    """Import overcomplete's SAEs; returns (module dict, None) or (None, why it was skipped)."""
    try:
        import matplotlib
        import matplotlib.cm

        if not hasattr(matplotlib.cm, "get_cmap"):  # removed in matplotlib 3.9; overcomplete imports it
            matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
        if "torchvision" not in sys.modules:  # only its visualisation helpers need torchvision
            try:
                import torchvision  # noqa: F401
            except ImportError:
                tv = types.ModuleType("torchvision")
                tv.transforms = types.ModuleType("torchvision.transforms")
                sys.modules["torchvision"] = tv
                sys.modules["torchvision.transforms"] = tv.transforms
        if "cv2" not in sys.modules:  # and OpenCV (a default argument reads cv2.INTER_CUBIC)
            try:
                import cv2  # noqa: F401
            except ImportError:
                cv2 = types.ModuleType("cv2")
                cv2.INTER_CUBIC = 2
                sys.modules["cv2"] = cv2
        from overcomplete.sae import BatchTopKSAE, TopKSAE
        from overcomplete.sae.losses import top_k_auxiliary_loss
        return {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "loss": top_k_auxiliary_loss}, None
    except Exception as exc:  # noqa: BLE001 - any import problem means: skip the peer, say why
        return None, f"{type(exc).__name__}: {exc}"


def peer_batches(Xn: np.ndarray, batch: int, epochs: int, seed: int, device: str) -> list[list[torch.Tensor]]:
    """The exact batches vitatlas trains on (same permutation per epoch, last partial batch dropped)."""
    out = []
    n = Xn.shape[0]
    for e in range(epochs):
        order = np.random.default_rng(epoch_seed(seed, e)).permutation(n)
        out.append([torch.from_numpy(Xn[order[s:s + batch]]).to(device) for s in range(0, n - n % batch, batch)])
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_peer(peer, kind, Xn, n_latents, k, batch, epochs, seed, lr, warmup, total, device="cpu"):
    torch.manual_seed(seed)
    d = Xn.shape[1]
    model = peer[kind](d, n_latents, top_k=k if kind == "topk" else k * batch, device=device).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def factor(step):  # the same warm-up + cosine schedule as vitatlas
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    batches = peer_batches(Xn, batch, epochs, seed, device)
    model.train()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = 0
    for epoch in batches:
        for x in epoch:
            opt.zero_grad()
            z_pre, z, x_hat = model(x)
            loss = peer["loss"](x, x_hat, z_pre, z, model.get_dictionary())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            rows += x.shape[0]
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        sse, fired = 0.0, torch.zeros(n_latents, dtype=torch.bool, device=device)
        for s in range(0, Xn.shape[0], 4096):
            x = torch.from_numpy(Xn[s:s + 4096]).to(device)
            _, z, x_hat = model(x)
            sse += float((x - x_hat).double().pow(2).sum())
            fired |= (z != 0).any(0)
    sst = float(((Xn - Xn.mean(0)) ** 2).astype(np.float64).sum())
    return {"tokens_per_s": rows / seconds, "tokens_per_cpu_s": rows / cpu, "explained_variance": 1 - sse / sst,
            "dead_fraction": float(1 - fired.float().mean()), "seconds": seconds}


# ---- vitatlas -----------------------------------------------------------------------------------------

def train_ours(kind, X, n_latents, k, batch, epochs, seed, lr, device="cpu"):
    sae = SAE(kind=kind, n_latents=n_latents, k=k, epochs=epochs, batch_size=batch, seed=seed, lr=lr, device=device)
    Xd = torch.from_numpy(X).to(device) if device != "cpu" else X  # both libraries start from data on the device
    rows = (X.shape[0] // batch) * batch * epochs
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    sae.fit(Xd, progress=False)
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = reconstruction_metrics(sae, Xd)
    return {"tokens_per_s": rows / seconds, "tokens_per_cpu_s": rows / cpu, "explained_variance": m["explained_variance"],
            "dead_fraction": m["dead_fraction"], "seconds": seconds}


def schedule(X: np.ndarray, latents: int, k: int, epochs: int, batch: int) -> tuple[float, int, int]:
    """vitatlas's learning rate, warm-up steps and total steps for this run (the peer gets the same)."""
    sae = SAE(kind="topk", n_latents=latents, k=k, epochs=epochs, batch_size=batch)
    budget = training_budget(sae.train_config, X.shape[0])
    member = _Member(sae, X.shape[0], budget)
    return member.base_lr, member.warmup, budget.steps


def normalised(X: np.ndarray) -> np.ndarray:
    return (X * math.sqrt(X.shape[1] / float((X.astype(np.float64) ** 2).sum(1).mean()))).astype(np.float32)


# ---- data -------------------------------------------------------------------------------------------

def planted(n: int, d: int = 384, m: int = 3072, k: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((m, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, m), dtype=np.float32), axis=1)[:, :k]
    vals = rng.exponential(1.0, (n, k)).astype(np.float32)
    X = np.einsum("nk,nkd->nd", vals, atoms[idx])
    X += 2.0 * atoms[0] + 0.05 * rng.standard_normal((n, d)).astype(np.float32)  # shared offset + noise
    return X.astype(np.float32)


def from_store(path: str, rows: int, seed: int = 0) -> np.ndarray:
    store = ActivationStore(path)
    ids = np.sort(np.random.default_rng(seed).choice(store.n_rows, min(rows, store.n_rows), replace=False))
    return store.rows(ids)


# ---- main ---------------------------------------------------------------------------------------------

def compare(peer, kind, X, latents, k, batch, epochs, seed, device, rounds, threads=None) -> dict:
    """Both libraries on the same run, ``rounds`` times alternating who goes first; best tokens/s of each."""
    if threads:
        torch.set_num_threads(threads)
    lr, warmup, total = schedule(X, latents, k, epochs, batch)
    Xn = normalised(X)
    best: dict[str, dict] = {}
    for r in range(rounds):
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
        for who in order:
            if who == "ours":
                res = train_ours(kind, X, latents, k, batch, epochs, seed, lr, device)
            elif peer is not None:
                res = train_peer(peer, kind, Xn, latents, k, batch, epochs, seed, lr, warmup, total, device)
            else:
                continue
            if who not in best:
                best[who] = res
            else:  # best of the rounds, wall and CPU time each
                best[who] = {**(res if res["tokens_per_s"] > best[who]["tokens_per_s"] else best[who]),
                             "tokens_per_cpu_s": max(res["tokens_per_cpu_s"], best[who]["tokens_per_cpu_s"])}
    row = {"kind": kind, "k": k, "threads": torch.get_num_threads() if device == "cpu" else "-", "ours": best["ours"]}
    if "peer" in best:
        row["peer"] = best["peer"]
    print_row(row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None, help="activation store directory (planted data if not given)")
    ap.add_argument("--quick", action="store_true", help="small sizes, < 2 minutes")
    ap.add_argument("--rows", type=int, default=None, help="rows sampled from the data (default 36864)")
    ap.add_argument("--latents", type=int, default=None)
    ap.add_argument("--ks", default=None, help="k values of the TopK table (default 8,32)")
    ap.add_argument("--k", type=int, default=32, help="k of the BatchTopK row and the sweep")
    ap.add_argument("--epochs", type=int, default=None, help="default 20")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=None, help="runs per library and configuration (default 2)")
    ap.add_argument("--thread-list", default=None, help="torch threads of the TopK table (default 1,2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the other parts (0 = torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (both libraries)")
    ap.add_argument("--big", action="store_true", help="also the d=768, 16384-latent tokens/s run (default on cuda)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: table,batchtopk,sweep,init,big")
    args = ap.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    rows = args.rows or (8192 if args.quick else 36864)
    latents = args.latents or (768 if args.quick else 1536)
    epochs = args.epochs or (4 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 2)
    ks = [int(v) for v in (args.ks or ("8,32")).split(",")]
    thread_list = [int(v) for v in (args.thread_list or ("1" if args.quick else "1,2")).split(",")]
    skip = set(filter(None, args.skip.split(",")))
    batch, seed = args.batch_size, args.seed
    print(f"torch {torch.__version__} on {device}; rows={rows} latents={latents} ks={ks} epochs={epochs} "
          f"batch={batch} rounds={rounds} threads={thread_list}")

    peer, why = import_peer()
    if peer is None:
        print(f"peer overcomplete skipped: {why}")

    # warm-up: the first Adam construction imports torch._dynamo (seconds); keep it out of every timing
    SAE(kind="topk", n_latents=16, k=2, epochs=1, batch_size=64, device=device).fit(
        planted(256, d=16, m=32, k=2), progress=False)

    if args.store:
        name, X = "store", from_store(args.store, rows, seed)
    else:
        name, X = "planted", planted(rows, seed=seed)
    print(f"data: {name}, {X.shape[0]} rows x {X.shape[1]}")

    table = []
    if "table" not in skip:
        for threads in (thread_list if device == "cpu" else [None]):
            for k in ks:
                table.append(compare(peer, "topk", X, latents, k, batch, epochs, seed, device, rounds, threads))
    if "batchtopk" not in skip:
        table.append(compare(peer, "batchtopk", X, latents, args.k, batch, epochs, seed, device, rounds,
                             args.threads or None))
    print_table(name, table)
    if "sweep" not in skip:
        if args.threads:
            torch.set_num_threads(args.threads)
        sweep_timing(X, name, latents, args.k, epochs, batch, seed)
    if "init" not in skip:
        if args.threads:
            torch.set_num_threads(args.threads)
        init_comparison(X, name, latents, ks, batch, seed, device)
    if "big" not in skip and (args.big or (device.startswith("cuda") and not args.quick)):
        if args.threads and device == "cpu":
            torch.set_num_threads(args.threads)
        n_big = 131072 if device.startswith("cuda") else 8192
        big = np.random.default_rng(seed).standard_normal((n_big, 768), dtype=np.float32)
        print(f"\nbig: {n_big} rows x 768 (random normal), 16384 latents, k=32, batch 4096, 1 epoch")
        print_table("big", [compare(peer, "topk", big, 16384, 32, 4096, 1, seed, device, 1, None)])


def print_table(name: str, table: list[dict]) -> None:
    print("\n| data | kind | k | threads | lib | tokens/s | tokens/CPU-s | explained_variance | dead_fraction | "
          "speed ratio (wall) | (CPU) | EV diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        o, p = row["ours"], row.get("peer")
        ratio = f"{o['tokens_per_s'] / p['tokens_per_s']:.2f}x" if p else "-"
        cpu_ratio = f"{o['tokens_per_cpu_s'] / p['tokens_per_cpu_s']:.2f}x" if p else "-"
        ev = f"{o['explained_variance'] - p['explained_variance']:+.4f}" if p else "-"
        head = f"| {name} | {row['kind']} | {row['k']} | {row['threads']} |"
        print(f"{head} vitatlas | {o['tokens_per_s']:.0f} | {o['tokens_per_cpu_s']:.0f} | {o['explained_variance']:.4f} | "
              f"{o['dead_fraction']:.4f} | {ratio} | {cpu_ratio} | {ev} |")
        if p:
            print(f"{head} overcomplete | {p['tokens_per_s']:.0f} | {p['tokens_per_cpu_s']:.0f} | "
                  f"{p['explained_variance']:.4f} | {p['dead_fraction']:.4f} | 1.00x | 1.00x | |")


def sweep_timing(X, name, latents, k, epochs, batch, seed) -> None:
    """A sweep of 4 vs one vs 4 separate fits, streaming from a float16 store on disk."""
    import tempfile

    from vitatlas.data.batches import iter_batches

    epochs = max(1, epochs // 4)
    ks = sorted({max(1, k // 4), max(1, k // 2), k, min(latents - 1, 2 * k)})
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore.from_array(tmp + "/acts", X, dtype="float16")
        make = lambda kk: SAE(kind="topk", n_latents=latents, k=kk, epochs=epochs, batch_size=batch, seed=seed)  # noqa: E731
        t0 = time.perf_counter()
        make(k).fit(store, progress=False)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        SAESweep([make(kk) for kk in ks]).fit(store, progress=False)
        sweep = time.perf_counter() - t0
        t0 = time.perf_counter()
        for kk in ks:
            make(kk).fit(store, progress=False)
        separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        for e in range(epochs):  # the shared part: reading, converting and checking the batches
            for _ in iter_batches(store, batch, shuffle=True, seed=epoch_seed(seed, e), drop_last=True, d=store.d):
                pass
        data_s = time.perf_counter() - t0
    print(f"\nsweep of {len(ks)} topk SAEs (k={ks}, {epochs} epochs) on {name} (float16 store): one SAE {one:.1f}s, "
          f"sweep {sweep:.1f}s = {sweep / one:.2f}x one, {len(ks)} separate fits {separate:.1f}s "
          f"(sweep saves {1 - sweep / separate:.0%}); the data pass alone, the only part a sweep shares, "
          f"takes {data_s:.1f}s ({data_s / one:.0%} of one fit)")


DEAD_VARIANTS = {  # issue 19: the dead-latent options, each against the default on the same batches
    "default (init=random, revive=none)": {},
    "revive=lift": {"revive": "lift"},
    "revive=resample": {"revive": "resample"},
    "init=data": {"init": "data"},
    "init=data, revive=lift": {"init": "data", "revive": "lift"},
}


def init_comparison(X, name, latents, ks, batch, seed, device) -> None:
    """TopK SAEs at each k: the default (random init, AuxK alone) against each dead-latent option (``sae.resample``),
    the default budget, one sweep; metrics on all rows."""
    runs = [(k, label, SAE(kind="topk", n_latents=latents, k=k, batch_size=batch, seed=seed, device=device, **opts))
            for k in ks for label, opts in DEAD_VARIANTS.items()]
    t0 = time.perf_counter()
    SAESweep([s for _, _, s in runs]).fit(X, progress=False)
    seconds = time.perf_counter() - t0
    print(f"\ndead latents (issue 19): TopK, {latents} latents, default budget ({runs[0][2].fit_info['steps']} steps), "
          f"{name} {X.shape[0]} rows; metrics on all of them (dead = never fires on them); sweep of {len(runs)} in "
          f"{seconds:.0f}s")
    print("| k | options | explained_variance | signal_recovered | dead_fraction | dense_fraction | revived |")
    print("|---|---|---|---|---|---|---|")
    for k, label, s in runs:
        m = reconstruction_metrics(s, X)
        print(f"| {k} | {label} | {m['explained_variance']:.4f} | {m['signal_recovered']:.4f} | "
              f"{m['dead_fraction']:.4f} | {m['dense_fraction']:.4f} | {s.fit_info.get('revived_latents', '-')} |")


def print_row(row):
    o, p = row["ours"], row.get("peer")
    msg = (f"{row['kind']:9s} k={row['k']:<3} threads={row['threads']} vitatlas {o['tokens_per_s']:8.0f} tok/s "
           f"ev={o['explained_variance']:.4f} dead={o['dead_fraction']:.4f} ({o['seconds']:.1f}s)")
    if p:
        msg += (f" | overcomplete {p['tokens_per_s']:8.0f} tok/s ev={p['explained_variance']:.4f} "
                f"dead={p['dead_fraction']:.4f} ({p['seconds']:.1f}s) | ratio {o['tokens_per_s'] / p['tokens_per_s']:.2f}x "
                f"(CPU time {o['tokens_per_cpu_s'] / p['tokens_per_cpu_s']:.2f}x) "
                f"EV {o['explained_variance'] - p['explained_variance']:+.4f}")
    print(msg, flush=True)


if __name__ == "__main__":
    main()
