"""The main job on the embedded default: extract -> fit DBK-SVD and a TopK SAE -> evaluate -> report.

Runs the same `vitatlas` commands a user would type (see README). Re-running resumes: a finished
extraction or fit is not redone. Environment knobs: DEMO_IMAGES (default 1500), DEMO_OUT (demo-out).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vitatlas.data.sources import fashion_mnist_available

ATOMS, K = 1536, 8


def run(*args: str) -> None:
    cmd = [sys.executable, "-m", "vitatlas", *args]
    print("\n$ vitatlas " + " ".join(args), flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        sys.exit(f"demo step failed (exit {result.returncode}): vitatlas {' '.join(args)}")


def main() -> None:
    t0 = time.perf_counter()
    n_images = int(os.environ.get("DEMO_IMAGES", "1500"))
    out = Path(os.environ.get("DEMO_OUT", "demo-out"))
    data = "embedded:fashion-mnist:test"
    if not fashion_mnist_available():
        print("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); using embedded:digits")
        data = "embedded:digits"
    acts = out / "acts"
    run("extract", "--model", "embedded:dinov2-s", "--data", data, "--layer", "8", "--tokens", "cls",
        "--tokens", "patches", "--limit", str(n_images), "--batch-size", "32", "--dtype", "float16",
        "--out", str(acts))
    patches = acts / "patches"
    run("store", "info", str(patches))
    runs = out / "runs"
    if not (runs / "dbksvd" / "config.json").exists():
        run("fit", "dbksvd", "--acts", str(patches), "--atoms", str(ATOMS), "--k", str(K),
            "--out", str(runs / "dbksvd"))
    if not (runs / "sae-topk" / "config.json").exists():
        run("fit", "sae", "--kind", "topk", "--acts", str(patches), "--atoms", str(ATOMS), "--k", str(K),
            "--out", str(runs / "sae-topk"))
    report = out / "report"
    shutil.rmtree(report, ignore_errors=True)
    run("eval", str(runs / "dbksvd"), str(runs / "sae-topk"), "--acts", str(patches), "--out", str(report),
        "--max-rows", "100000")

    metrics = json.loads((report / "metrics.json").read_text())
    rows = metrics if isinstance(metrics, list) else metrics.get("runs", metrics)
    print_headline(rows)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report: {(report / 'report.md').resolve()}")


def print_headline(rows) -> None:
    keys = ["signal_recovered", "explained_variance", "l0", "dead_fraction", "faithfulness", "specificity"]
    items = rows.items() if isinstance(rows, dict) else ((r.get("name", "?"), r) for r in rows)
    print("\n" + f"{'run':28s}" + "".join(f"{k:>20s}" for k in keys))
    for name, r in items:
        vals = [r.get(k) for k in keys]
        print(f"{str(name)[:28]:28s}" + "".join(f"{v:20.4f}" if isinstance(v, (int, float)) else f"{'-':>20s}"
                                                for v in vals))


if __name__ == "__main__":
    main()
