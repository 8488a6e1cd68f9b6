"""Benchmark: vitatlas TopK / BatchTopK SAEs against the `overcomplete` library (0.3.0), and sweeps.

Same data, same budget for both libraries: same latents, k, epochs, batch size, batches (the same
shuffled rows in the same order), Adam with the same learning rate, warm-up + cosine schedule and
gradient clipping at 1.0. Inputs are scaled so that mean ‖x‖² = d for both (vitatlas does this itself;
the peer gets the pre-scaled data, so its learning rate means the same). The peer uses its own TopK /
BatchTopK SAEs (linear encoder, l2-normalised dictionary) with its AuxK criterion
(``top_k_auxiliary_loss``), in a loop equal to its ``train_sae`` without the per-batch monitoring.
Its BatchTopK takes the batch's total number of codes (k · batch size).

Reported per data set and SAE kind: tokens/s of training, final explained_variance and dead_fraction
measured on all rows after training (the same code for both), and the ratios vitatlas / peer.
Then: the time of a sweep of 4 SAEs (k = k/4, k/2, k, 2k) in one pass vs one SAE vs 4 separate fits.

Data sets: a planted problem (d=384, random unit atoms, sparse non-negative codes, a shared mean
offset, noise) and, with ``--store DIR``, an activation store (e.g. the DINOv2-S Fashion-MNIST
activations), sub-sampled to ``--rows`` rows.

Install the peer (optional; skipped with the reason printed if missing)::

    pip install --no-deps overcomplete==0.3.0
    pip install einops opencv-python-headless scikit-image tqdm
    pip install --no-deps timm

Usage: ``python benchmarks/sae.py [--store DIR] [--quick] [--threads N]`` (``--quick`` < 2 min, default
< 10 min on 2 CPU cores; 1 thread by default for both libraries).
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
from vitatlas.learners.sae_train import SAESweep, _Member, epoch_seed

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
        from overcomplete.sae import BatchTopKSAE, TopKSAE
        from overcomplete.sae.losses import top_k_auxiliary_loss
        return {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "loss": top_k_auxiliary_loss}, None
    except Exception as exc:  # noqa: BLE001 - any import problem means: skip the peer, say why
        return None, f"{type(exc).__name__}: {exc}"


def peer_batches(Xn: np.ndarray, batch: int, epochs: int, seed: int) -> list[list[torch.Tensor]]:
    """The exact batches vitatlas trains on (same permutation per epoch, last partial batch dropped)."""
    out = []
    n = Xn.shape[0]
    for e in range(epochs):
        order = np.random.default_rng(epoch_seed(seed, e)).permutation(n)
        out.append([torch.from_numpy(Xn[order[s:s + batch]]) for s in range(0, n - n % batch, batch)])
    return out


def train_peer(peer, kind, Xn, n_latents, k, batch, epochs, seed, lr, warmup, total):
    torch.manual_seed(seed)
    d = Xn.shape[1]
    model = peer[kind](d, n_latents, top_k=k if kind == "topk" else k * batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def factor(step):  # the same warm-up + cosine schedule as vitatlas
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    batches = peer_batches(Xn, batch, epochs, seed)
    model.train()
    t0 = time.perf_counter()
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
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        sse, fired = 0.0, torch.zeros(n_latents, dtype=torch.bool)
        for s in range(0, Xn.shape[0], 4096):
            x = torch.from_numpy(Xn[s:s + 4096])
            _, z, x_hat = model(x)
            sse += float((x - x_hat).double().pow(2).sum())
            fired |= (z != 0).any(0)
    sst = float(((Xn - Xn.mean(0)) ** 2).astype(np.float64).sum())
    return {"tokens_per_s": rows / seconds, "explained_variance": 1 - sse / sst,
            "dead_fraction": float(1 - fired.float().mean()), "seconds": seconds}


# ---- vitatlas -----------------------------------------------------------------------------------------

def train_ours(kind, X, n_latents, k, batch, epochs, seed, lr):
    sae = SAE(kind=kind, n_latents=n_latents, k=k, epochs=epochs, batch_size=batch, seed=seed, lr=lr)
    rows = (X.shape[0] // batch) * batch * epochs
    t0 = time.perf_counter()
    sae.fit(X, progress=False)
    seconds = time.perf_counter() - t0
    m = reconstruction_metrics(sae, X)
    return {"tokens_per_s": rows / seconds, "explained_variance": m["explained_variance"],
            "dead_fraction": m["dead_fraction"], "seconds": seconds}


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

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None, help="activation store directory (skipped if not given)")
    ap.add_argument("--quick", action="store_true", help="small sizes, < 2 minutes")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--latents", type=int, default=None)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadiest timings on a shared machine; 0 = torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows or (8192 if args.quick else 32768)
    latents = args.latents or (768 if args.quick else 1536)
    epochs = args.epochs or (4 if args.quick else 5)
    k, batch, seed = args.k, args.batch_size, args.seed
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rows={rows} latents={latents} k={k} "
          f"epochs={epochs} batch={batch}")

    peer, why = import_peer()
    if peer is None:
        print(f"peer overcomplete skipped: {why}")

    # warm-up: the first Adam construction imports torch._dynamo (seconds); keep it out of every timing
    SAE(kind="topk", n_latents=16, k=2, epochs=1, batch_size=64).fit(planted(256, d=16, m=32, k=2), progress=False)

    datasets = [("planted", planted(rows, seed=seed))]
    if args.store:
        datasets.append(("store", from_store(args.store, rows, seed)))
    else:
        print("store: skipped (no --store DIR given)")

    table = []
    for name, X in datasets:
        d = X.shape[1]
        Xn = (X * math.sqrt(d / float((X.astype(np.float64) ** 2).sum(1).mean()))).astype(np.float32)
        steps = (X.shape[0] // batch) * epochs
        member = _Member(SAE(kind="topk", n_latents=latents, k=k, epochs=epochs, batch_size=batch), X.shape[0],
                         X.shape[0] // batch)
        lr, warmup = member.base_lr, member.warmup
        for kind in ("topk", "batchtopk"):
            ours = train_ours(kind, X, latents, k, batch, epochs, seed, lr)
            row = {"data": name, "kind": kind, "ours": ours}
            if peer is not None:
                row["peer"] = train_peer(peer, kind, Xn, latents, k, batch, epochs, seed, lr, warmup, steps)
            table.append(row)
            print_row(row)

    print("\n| data | kind | lib | tokens/s | explained_variance | dead_fraction | speed ratio | EV diff |")
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        o, p = row["ours"], row.get("peer")
        ratio = f"{o['tokens_per_s'] / p['tokens_per_s']:.2f}x" if p else "-"
        ev = f"{o['explained_variance'] - p['explained_variance']:+.4f}" if p else "-"
        print(f"| {row['data']} | {row['kind']} | vitatlas | {o['tokens_per_s']:.0f} | {o['explained_variance']:.4f} | "
              f"{o['dead_fraction']:.4f} | {ratio} | {ev} |")
        if p:
            print(f"| {row['data']} | {row['kind']} | overcomplete | {p['tokens_per_s']:.0f} | "
                  f"{p['explained_variance']:.4f} | {p['dead_fraction']:.4f} | 1.00x | |")

    # sweep of 4 vs one vs 4 separate fits, streaming from a float16 store on disk
    import tempfile
    X = datasets[-1][1]
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
        from vitatlas.data.batches import iter_batches
        t0 = time.perf_counter()
        for e in range(epochs):  # the shared part: reading, converting and checking the batches
            for _ in iter_batches(store, batch, shuffle=True, seed=epoch_seed(seed, e), drop_last=True, d=store.d):
                pass
        data_s = time.perf_counter() - t0
    print(f"\nsweep of {len(ks)} topk SAEs (k={ks}) on {datasets[-1][0]} (float16 store): one SAE {one:.1f}s, "
          f"sweep {sweep:.1f}s = {sweep / one:.2f}x one, {len(ks)} separate fits {separate:.1f}s "
          f"(sweep saves {1 - sweep / separate:.0%}); the data pass alone, the only part a sweep shares, "
          f"takes {data_s:.1f}s ({data_s / one:.0%} of one fit)")


def print_row(row):
    o, p = row["ours"], row.get("peer")
    msg = (f"{row['data']:8s} {row['kind']:9s} vitatlas {o['tokens_per_s']:8.0f} tok/s ev={o['explained_variance']:.4f} "
           f"dead={o['dead_fraction']:.4f} ({o['seconds']:.1f}s)")
    if p:
        msg += (f" | overcomplete {p['tokens_per_s']:8.0f} tok/s ev={p['explained_variance']:.4f} "
                f"dead={p['dead_fraction']:.4f} ({p['seconds']:.1f}s)")
    print(msg, flush=True)


if __name__ == "__main__":
    main()
