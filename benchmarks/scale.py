"""Scale-out throughput: one process against ``torchrun --nproc-per-node N`` for extraction and for SAE
and DBK-SVD fitting, each through the ``vitatlas`` command as users run it.

Each task runs in fresh output directories under a temporary folder, in these configurations:

- on CPU (default): one process with all of ``--threads`` intra-op threads (what a user gets by default),
  one process with one thread, and torchrun with ``--nproc`` processes of ``threads / nproc`` threads
  each (gloo);
- with ``--device cuda``: one process on the CPU (all threads), one process on one GPU, and, when the
  machine has several GPUs, torchrun with one process per GPU (NCCL), up to ``--nproc``.

Timings are the commands' own (``extract``'s "in X s", the fit commands' ``fit_seconds``): process
start-up, model loading and the final metrics pass are left out, and so is the rendezvous. Rounds
alternate the configurations and keep each one's best time, so a burst of load from another process
penalises none of them in particular. With 2 cores the gain of 2 processes over one 2-thread process
is bounded by what the second thread already gave; the 1-thread column shows the scaling itself.

Correctness is printed next to the speed: extraction stores must be identical file for file between one
1-thread process and the torchrun run (same batches, same per-image computation); fits print their
explained variance, which must agree up to float rounding when the learner is data-parallel.

Data: extraction uses the embedded DINOv2-S on the first ``--images`` Fashion-MNIST test images (digits
when Fashion-MNIST is not installed), layer 8, patch tokens, float16. Fits use ``--rows`` rows drawn
(seed 0) from ``--acts`` (default: /work/data/acts/patches), or random low-rank data when that store
does not exist.

    python benchmarks/scale.py --quick                 # 64 images, 12k rows, one round (~3 min on 2 cores)
    python benchmarks/scale.py                         # 256 images, 40k rows, best of 2 rounds
    python benchmarks/scale.py --tasks extract --images 128
    python benchmarks/scale.py --device cuda           # 1 GPU against the CPU (and N GPUs when present)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TASKS = ("extract", "sae", "dbksvd")
DEFAULT_ACTS = "/work/data/acts/patches"


@dataclass
class Config:
    name: str
    nproc: int
    threads: int
    device: str


@dataclass
class Result:
    seconds: list[float] = field(default_factory=list)
    quality: str = ""
    digest: str = ""
    error: str = ""

    @property
    def best(self) -> float | None:
        return min(self.seconds) if self.seconds else None


def configs(device: str, threads: int, nproc: int) -> list[Config]:
    if device == "cpu":
        return [Config(f"1 process x {threads} threads", 1, threads, "cpu"),
                Config("1 process x 1 thread", 1, 1, "cpu"),
                Config(f"torchrun {nproc} x {max(1, threads // nproc)} thread(s)", nproc, max(1, threads // nproc),
                       "cpu")]
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    out = [Config(f"1 process CPU x {threads} threads", 1, threads, "cpu"), Config("1 process, 1 GPU", 1, threads, device)]
    gpus = min(nproc, torch.cuda.device_count())
    if gpus > 1:
        out.append(Config(f"torchrun {gpus} x 1 GPU", gpus, max(1, threads // gpus), "cuda"))
    return out


def command(cfg: Config, args: list[str]) -> list[str]:
    if cfg.nproc == 1:
        return [sys.executable, "-m", "vitatlas", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
            "-m", "vitatlas", *args]


def run(cfg: Config, args: list[str], pattern: str, timeout: float) -> tuple[float, str]:
    """Run one command; its own timing (``pattern``'s group 1) and its stdout. Raises on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads), PYTHONWARNINGS="ignore")
    res = subprocess.run(command(cfg, args), capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if "error" in ln.lower()]
        raise RuntimeError((lines[-1] if lines else res.stderr.strip().splitlines()[-1] if res.stderr.strip()
                            else f"exit status {res.returncode}")[:300])
    match = re.search(pattern, res.stdout)
    if not match:
        raise RuntimeError(f"no timing in the output: {res.stdout[-300:]!r}")
    return float(match.group(1)), res.stdout


def store_digest(path: Path) -> str:
    """SHA-256 over the shard list of a store's manifest (each file's own SHA-256), not its world_size."""
    import json

    shards = json.loads((path / "manifest.json").read_text())["shards"]
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:12]


def speedup(reference: float | None, seconds: float) -> str:
    return f"{reference / seconds:.2f}x" if reference else "-"


def fit_data(acts: str, rows: int, out: Path) -> str:
    """A store of ``rows`` rows of ``acts`` (seed 0), or of random low-rank data when ``acts`` is missing."""
    from vitatlas import ActivationStore

    if Path(acts).exists():
        store = ActivationStore(acts)
        ids = np.sort(np.random.default_rng(0).choice(store.n_rows, size=min(rows, store.n_rows), replace=False))
        X, what = store.rows(ids), f"{ids.size} rows of {acts} (d={store.d})"
    else:
        rng = np.random.default_rng(0)
        X = (rng.standard_normal((rows, 64)) @ rng.standard_normal((64, 384))).astype(np.float32)
        what = f"{rows} random rank-64 rows (d=384; {acts} not found)"
    ActivationStore.from_array(out, X, dtype="float32")
    print(f"fit data: {what}", flush=True)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 images, 12k rows, smaller dictionaries, one round")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: 1 GPU against the CPU")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of extract,sae,dbksvd")
    p.add_argument("--nproc", type=int, default=2, help="processes for torchrun (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the one-process run")
    p.add_argument("--rounds", type=int, default=None, help="rounds, best time kept (default 2; 1 with --quick)")
    p.add_argument("--images", type=int, default=None, help="images to extract (default 256; 64 with --quick)")
    p.add_argument("--rows", type=int, default=None, help="rows to fit on (default 40000; 12000 with --quick)")
    p.add_argument("--atoms", type=int, default=None, help="dictionary size (default 1024; 512 with --quick)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--acts", default=DEFAULT_ACTS, help=f"store to draw fit rows from (default {DEFAULT_ACTS})")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per command")
    a = p.parse_args()
    rounds = a.rounds or (1 if a.quick else 2)
    images = a.images or (64 if a.quick else 256)
    rows = a.rows or (12_000 if a.quick else 40_000)
    atoms = a.atoms or (512 if a.quick else 1024)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"unknown task(s) {bad}: choose from {', '.join(TASKS)}")
    cfgs = configs(a.device, a.threads, a.nproc)

    import torch

    from vitatlas.data.sources import fashion_mnist_available

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; {rounds} round(s), best kept", flush=True)
    data = "embedded:fashion-mnist:test" if fashion_mnist_available() else "embedded:digits"
    with tempfile.TemporaryDirectory(prefix="vitatlas-scale-") as tmp:
        tmp = Path(tmp)
        fit_store = fit_data(a.acts, rows, tmp / "fit-data") if {"sae", "dbksvd"} & set(tasks) else None
        jobs = {
            "extract": (lambda out, cfg: ["extract", "--model", "embedded:dinov2-s", "--data", data, "--layer", "8",
                                          "--tokens", "patches", "--limit", str(images), "--batch-size", "32",
                                          "--dtype", "float16", "--device", cfg.device, "--out", str(out)],
                        r"in ([\d.]+) s", images, "images"),
            "sae": (lambda out, cfg: ["fit", "sae", "--kind", "topk", "--acts", fit_store, "--atoms", str(atoms),
                                      "--k", str(a.k), "--tokens", str(2 * rows), "--batch-size", "1024",
                                      "--device", cfg.device, "--no-progress", "--out", str(out)],
                    r"fit_seconds=([\d.]+)", 2 * rows, "rows"),
            "dbksvd": (lambda out, cfg: ["fit", "dbksvd", "--acts", fit_store, "--atoms", str(atoms), "--k", str(a.k),
                                         "--epochs", "2", "--sample-batch", "8192", "--device", cfg.device,
                                         "--no-progress", "--out", str(out)],
                       r"fit_seconds=([\d.]+)", 2 * rows, "rows"),
        }
        results = {(t, c.name): Result() for t in tasks for c in cfgs}
        for r in range(rounds):
            for task in tasks:
                make_args, pattern, units, unit = jobs[task]
                for i, cfg in enumerate(cfgs):
                    res = results[task, cfg.name]
                    if res.error:
                        continue
                    out = tmp / f"{task}-{i}-{r}"
                    try:
                        seconds, stdout = run(cfg, make_args(out, cfg), pattern, a.timeout)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        res.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        print(f"  {task:7s} {cfg.name:28s} FAILED: {res.error}", flush=True)
                        continue
                    res.seconds.append(seconds)
                    if task == "extract":
                        res.digest = store_digest(out)
                    else:
                        ev = re.search(r"explained_variance=([\d.-]+)", stdout)
                        res.quality = f"EV {ev.group(1)}" if ev else ""
                    print(f"  {task:7s} {cfg.name:28s} {seconds:8.1f} s  {units / seconds:9.1f} {unit}/s "
                          f"{res.quality or res.digest}", flush=True)

        print("\n| task | configuration | seconds | throughput | vs first | vs 1 thread | check |")
        print("|---|---|---:|---:|---:|---:|---|")
        for task in tasks:
            _, _, units, unit = jobs[task]
            base = results[task, cfgs[0].name].best
            one = results[task, cfgs[1].name].best
            for cfg in cfgs:
                res = results[task, cfg.name]
                if res.best is None:
                    print(f"| {task} | {cfg.name} | failed | | | | {res.error} |")
                    continue
                check = res.quality
                if task == "extract":
                    ref = results[task, "1 process x 1 thread"].digest if a.device == "cpu" else ""
                    check = f"store {res.digest}" + (" (same as 1 thread)" if ref and res.digest == ref else "")
                print(f"| {task} | {cfg.name} | {res.best:.1f} | {units / res.best:.1f} {unit}/s | "
                      f"{speedup(base, res.best)} | {speedup(one, res.best) if a.device == 'cpu' else '-'} | {check} |")
    print("\nratios are speed-ups (time of the reference / time of the row); with 2 cores, 2 processes can at "
          "best match one 2-thread process plus what splitting the work saves")


if __name__ == "__main__":
    main()
