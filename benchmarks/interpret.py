"""Benchmark: atom cards (``vitatlas interpret``) — wall time on a real run, peak memory at scale.

1. ``--run RUN --store DIR``: time to make the cards of every atom of RUN over the store DIR (the
   demo's 1,536-atom DBK-SVD over 384,000 DINOv2-S patch rows), split into the streaming pass
   (encode + top-k merge + statistics), building the records, and writing files (images, card PNGs,
   index.html). Each phase runs once (a second run would only re-measure the same work).
2. ``--memory``: peak resident memory of the pass, the records and writing atoms.jsonl /
   top.safetensors / index.html (no PNGs) for 16,384 atoms × 16 images on a
   synthetic patch store (256 patches per image, d = 384) and a synthetic signed dictionary (top-k
   by |x·D|, so both sides keep top lists): the issue's bound is 1 GB. Runs in a child process so the
   figure is that process's own peak (``ru_maxrss``), not this script's.

``--device cuda`` encodes and keeps the pass's running state on the GPU (the dictionary is loaded there);
the figures then add the GPU's peak allocated memory. ``--quick``: ``--memory`` with 1,024 atoms over 16
images (seconds; what the tests run).

Usage: ``python benchmarks/interpret.py [--run RUN --store DIR] [--memory] [--threads 2] [--images 120]
[--device cpu] [--quick]`` (on 2 cores the demo run takes minutes; ``--memory`` with the default 120 images
under a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def gpu_peak_mib(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20)


def bench_run(run: str, store_path: str, out: Path, device: str) -> dict:
    import vitatlas

    c0 = cpu_seconds()
    t0 = time.perf_counter()
    dictionary = vitatlas.load(run, device=device)
    store = vitatlas.ActivationStore(store_path)
    cards = vitatlas.interpret(dictionary, store, top=16, progress=True, device=device)
    t_pass, c_pass = time.perf_counter() - t0, cpu_seconds() - c0
    t1, c1 = time.perf_counter(), cpu_seconds()
    cards.save(out, progress=True)
    t_save, c_save = time.perf_counter() - t1, cpu_seconds() - c1
    kappas = np.array([a["labels"][0]["kappa"] for a in cards.atoms if a["labels"]], float)
    return {"run": run, "atoms": cards.n_atoms, "rows": store.n_rows, "pass_and_records_s": round(t_pass, 1),
            "files_s": round(t_save, 1), "total_s": round(t_pass + t_save, 1),
            # CPU seconds (user + system) of this process: on a shared machine wall time mostly measures the others
            "pass_cpu_s": round(c_pass, 1), "files_cpu_s": round(c_save, 1),
            "atoms_kappa_gt_0.5": int((kappas > 0.5).sum()), "peak_rss_mib": round(peak_rss_mib()),
            "device": device, "gpu_peak_mib": gpu_peak_mib(device), "out": str(out)}


def _memory_child(n_images: int, n_atoms: int, top: int, device: str) -> None:
    """Runs in its own process: synthetic store + dictionary, then the pass and the records."""
    import vitatlas
    from vitatlas.data.store import StoreWriter
    from vitatlas.dictionary import Dictionary

    class SignedTopK(Dictionary):
        """Random unit atoms; codes keep the k largest |x·D| with their signs (a signed, sparse code)."""

        kind = "synthetic-signed-topk"

        def __init__(self, n_atoms: int, d: int, k: int = 16, seed: int = 0, device: str = "cpu"):
            g = torch.Generator().manual_seed(seed)
            self._atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1).to(device)
            self.n_atoms, self.d, self.k, self.fit_info, self.device = n_atoms, d, k, {}, device

        @property
        def atoms(self):
            return self._atoms

        def _encode(self, x):
            z = x @ self._atoms.T
            _, idx = torch.topk(z.abs(), self.k, dim=1)
            return torch.zeros_like(z).scatter_(1, idx, z.gather(1, idx))

        def fit(self, X, **kw):
            return self

        def _config(self):
            return {}

        def _state(self):
            return {}

        def _load_state(self, tensors, meta):
            pass

    d, P = 384, 256
    # removed on success, on an error and on Ctrl-C (main turns SIGTERM into an exit too): 24 MB a run
    with tempfile.TemporaryDirectory(prefix="vitatlas-bench-interpret-") as tmp:
        root = Path(tmp)
        positions = list(range(1, P + 1))
        writer = StoreWriter(root / "store", d=d, dtype="float16", identity={"bench": True},
                             meta={"model": {"name": "synthetic", "image_size": 224, "patch_size": 14,
                                             "n_prefix_tokens": 1}, "source": {"name": "synthetic"}, "layer": 0,
                                   "tokens": "patches", "token_positions": positions}, has_labels=False)
        rng = np.random.default_rng(0)
        for start in range(0, n_images, 32):
            ids = np.arange(start, min(start + 32, n_images))
            acts = rng.standard_normal((ids.size * P, d)).astype(np.float32)
            index = np.stack([np.repeat(ids, P), np.tile(positions, ids.size)], axis=1)
            writer.write_shard(acts, index, None, n_images=ids.size)
        writer.finish()
        store = vitatlas.ActivationStore(root / "store")
        before = peak_rss_mib()
        t0 = time.perf_counter()
        cards = vitatlas.interpret(SignedTopK(n_atoms, d, device=device), store, top=top, progress=False, images=False,
                                   device=device)
        cards.save(root / "cards", progress=False, render=False)  # atoms.jsonl, top.safetensors, index.html
        seconds = time.perf_counter() - t0
        kept = sum(v.numel() * v.element_size() for v in cards.tensors.values())
        print(json.dumps({"atoms": n_atoms, "top": top, "patches_per_image": P, "images": n_images,
                          "rows": store.n_rows, "signed": cards.meta["signed"], "seconds": round(seconds, 1),
                          "top_tensors_mib": round(kept / 2**20), "peak_rss_before_pass_mib": round(before),
                          "peak_rss_mib": round(peak_rss_mib()), "device": device,
                          "gpu_peak_mib": gpu_peak_mib(device)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a fitted run directory (e.g. demo-out/runs/dbksvd/dbksvd-k8)")
    ap.add_argument("--store", help="the store it was fitted on (e.g. demo-out/acts/patches)")
    ap.add_argument("--out", default=None, help="where to write the cards (default: a temporary directory, removed afterwards)")
    ap.add_argument("--memory", action="store_true", help="peak memory for 16,384 atoms x 16 images")
    ap.add_argument("--atoms", type=int, default=16384)
    ap.add_argument("--images", type=int, default=120, help="images of the synthetic store (--memory)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--quick", action="store_true", help="--memory with 1,024 atoms over 16 images")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still removes its temporary files
    torch.set_num_threads(args.threads)
    if args.quick:
        args.memory, args.atoms, args.images = True, 1024, 16
    if args.child:
        _memory_child(args.images, args.atoms, 16, args.device)
        return
    if not args.run and not args.memory:
        ap.error("pass --run RUN --store DIR, and/or --memory")
    print(f"threads={args.threads} cpus={os.cpu_count()} load average={os.getloadavg()[0]:.1f} device={args.device}",
          flush=True)
    if args.run:
        if not args.store:
            ap.error("--run needs --store")
        if args.out:
            print(json.dumps(bench_run(args.run, args.store, Path(args.out), args.device)), flush=True)
        else:  # the cards are only timed: a temporary directory, removed afterwards
            with tempfile.TemporaryDirectory(prefix="vitatlas-cards-") as tmp:
                print(json.dumps(bench_run(args.run, args.store, Path(tmp), args.device)), flush=True)
    if args.memory:
        cmd = [sys.executable, __file__, "--child", "--atoms", str(args.atoms), "--images", str(args.images),
               "--threads", str(args.threads), "--device", args.device]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(result.stderr[-3000:])
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
