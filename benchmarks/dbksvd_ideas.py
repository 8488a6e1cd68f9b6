"""The whole scorecard for each DBK-SVD idea of issue 19, each measured on its own against the old behaviour.

Each idea is a set of DBK-SVD options changed from ``legacy`` (signed codes, no centring: what every run
saved before these options did). Every idea is fitted on the same store with the same schedule, then
all of them (and, with ``--sae RUN``, a fitted SAE as the yardstick) are scored together by
``vitatlas.evaluation.scorecard`` on the same whole images: reconstruction, label faithfulness and
specificity, sparse probing, spatial coherence, redundancy, dead and dense atoms. A change to the
learner is judged on this table, not on reconstruction alone.

    python benchmarks/dbksvd_ideas.py --acts demo-out/acts/patches --out /tmp/ideas-runs --sae RUN
    python benchmarks/dbksvd_ideas.py --quick          # a tiny planted store, seconds: the smoke test

Fits are cached: a run already in OUT/<idea> is loaded, not refitted (delete it to refit).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vitatlas
from vitatlas import ActivationStore
from vitatlas.learners.dbksvd import DBKSVD

LEGACY = {"center": False, "nonnegative": False}
# idea -> options over the legacy behaviour (the library's defaults for everything else)
IDEAS = {
    "legacy": {},
    "center": {"center": True},
    "nonneg": {"nonnegative": True},
    "center_nonneg": {"center": True, "nonnegative": True},
    "cn_dup90": {"center": True, "nonnegative": True, "dup_threshold": 0.9},
    "cn_mem0": {"center": True, "nonnegative": True, "memory": 0.0},
    "default": None,  # DBKSVD's own defaults, whatever they are now
}
SHOWN = ["signal_recovered", "explained_variance", "faithfulness", "specificity", "sparse_probe_acc@5",
         "spatial_coherence", "max_coherence", "near_duplicate_pairs", "dead_fraction", "dense_fraction"]


def options_of(idea: str) -> dict:
    extra = IDEAS[idea]
    return {} if extra is None else {**LEGACY, **extra}


def fit_or_load(idea: str, store: ActivationStore, out: Path, n_atoms: int, k: int, epochs: int | None,
                device: str) -> tuple[DBKSVD, float | None]:
    run = out / idea
    if (run / "config.json").exists():
        return vitatlas.load(run, device=device), None
    start = time.perf_counter()
    model = DBKSVD(n_atoms, k, epochs=epochs, device=device, **options_of(idea)).fit(store, progress=False)
    seconds = time.perf_counter() - start
    model.save(run)
    return model, seconds


def quick_store(directory: Path) -> ActivationStore:
    """A small store of non-negative planted codes over a shared mean (the shape of ViT tokens, in miniature)."""
    rng = np.random.default_rng(0)
    d, m, n, k = 32, 64, 3000, 3
    D = rng.standard_normal((m, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    codes = np.zeros((n, m))
    for i in range(n):
        codes[i, rng.choice(m, k, replace=False)] = rng.uniform(1, 2, k)
    X = codes @ D + 3 * rng.standard_normal(d) + 0.05 * rng.standard_normal((n, d))
    return ActivationStore.from_array(directory / "acts", X.astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", help="activation store (patch tokens) to fit and score on")
    ap.add_argument("--out", help="directory of the fitted ideas (cached between runs)")
    ap.add_argument("--atoms", type=int, default=1536)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=None, help="passes over the store (default: the library's)")
    ap.add_argument("--ideas", default=",".join(IDEAS), help=f"comma-separated, of {', '.join(IDEAS)}")
    ap.add_argument("--sae", action="append", default=[], help="a fitted run to score beside them (repeatable)")
    ap.add_argument("--images", type=int, default=300, help="whole images the scorecard uses")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the table here")
    ap.add_argument("--quick", action="store_true", help="tiny planted store, 64 atoms, k=3 (seconds)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ideas = [i.strip() for i in args.ideas.split(",") if i.strip()]
    unknown = [i for i in ideas if i not in IDEAS]
    if unknown:
        sys.exit(f"unknown ideas {unknown}: use some of {', '.join(IDEAS)}")
    from vitatlas.evaluation import scorecard

    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            store = quick_store(Path(tmp))
            out, n_atoms, k, epochs = Path(tmp) / "runs", 64, 3, args.epochs or 4
        else:
            if not args.acts or not args.out:
                sys.exit("give --acts and --out (or --quick)")
            store, out, n_atoms, k, epochs = ActivationStore(args.acts), Path(args.out), args.atoms, args.k, args.epochs
        runs, fit_s = {}, {}
        for idea in ideas:
            runs[idea], fit_s[idea] = fit_or_load(idea, store, out, n_atoms, k, epochs, args.device)
        for path in args.sae:
            runs[Path(path).name] = vitatlas.load(path, device=args.device)
        card = scorecard(runs, store, max_images=None if args.quick else args.images)
    table = {name: {key: card["runs"][name].get(key) for key in SHOWN} for name in runs}
    for name in ideas:
        table[name]["options"] = "library defaults" if IDEAS[name] is None else options_of(name)
        table[name]["fit_seconds"] = fit_s[name]
    print(f"scorecard on {card['setup']['n_images']} images, {card['setup']['n_rows']} rows; "
          f"{n_atoms} atoms, k={k}")
    print(f"{'run':<16}" + "".join(f"{key[:12]:>13}" for key in SHOWN))
    for name, row in table.items():
        cells = "".join(f"{_fmt(row[key]):>13}" for key in SHOWN)
        print(f"{name:<16}{cells}")
    print(json.dumps({"runs": table}, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": card["setup"], "runs": table}, indent=1, default=str))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
