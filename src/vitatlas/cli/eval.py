"""``vitatlas eval``: evaluate fitted runs and baselines on an activation store and write a report."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import VitatlasError

DEFAULT_BASELINES = "pca,kmeans,random,sklearn-dl"


def find_runs(paths: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name, dir) of every saved dictionary under ``paths``: a dir with config.json is one run; any
    other dir is searched for sub-dirs holding a dictionary config.json (e.g. a sweep's RUN/<name>/)."""
    from ..io import read_json

    found: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise VitatlasError(f"run {p} does not exist: pass a directory written by `vitatlas fit`")
        if (p / "config.json").is_file():
            found.append((p.name, p))
            continue
        subs = []
        for cfg in sorted(p.rglob("config.json")):
            try:
                meta = read_json(cfg)
            except VitatlasError:
                continue
            if isinstance(meta, dict) and meta.get("format") == "vitatlas-dictionary":
                subs.append(cfg.parent)
        if not subs:
            raise VitatlasError(f"{p} holds no saved dictionary (no config.json in it or below): pass a run "
                                "directory written by `vitatlas fit`")
        found += [(f"{p.name}/{s.relative_to(p).as_posix()}", s) for s in subs]
    names: dict[str, int] = {}
    unique = []
    for name, path in found:
        names[name] = names.get(name, 0) + 1
        unique.append((name if names[name] == 1 else f"{name}#{names[name]}", path))
    return unique


@click.command("eval")
@click.argument("runs", nargs=-1, type=click.Path())
@click.option("--acts", required=True, type=click.Path(), help="Activation store to evaluate on.")
@click.option("--out", required=True, type=click.Path(), help="Report directory to write.")
@click.option("--baselines", default=DEFAULT_BASELINES, show_default=True,
              help="Comma-separated baselines to fit and evaluate (pca,kmeans,random,sklearn-dl) or 'none'.")
@click.option("--k", "k", type=int, default=None,
              help="L0 for the baselines (default: the first run's median measured l0, rounded).")
@click.option("--atoms", "n_atoms", type=int, default=None,
              help="Atoms for the baselines (default: the first run's n_atoms).")
@click.option("--max-rows", type=int, default=None, help="Evaluate on a fixed random subset of this many rows.")
@click.option("--layer", type=int, default=None, help="Layer to open when --acts holds several.")
@click.option("--batch-size", type=int, default=4096, show_default=True)
@click.option("--top-n", type=int, default=32, show_default=True,
              help="Top rows per atom kept in atoms/*.json (labels use the top 32 images, docs/scorecard.md).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def eval_cmd(runs, acts, out, baselines, k, n_atoms, max_rows, layer, batch_size, top_n, device, seed, progress):
    """Evaluate fitted RUNS (and baselines) on the store ACTS; write metrics.json, report.md and plots to OUT.

    Under torchrun --nproc-per-node N each rank evaluates its part of the rows and the statistics are
    combined; every rank fits the baselines, all evaluate rank 0's copy, and rank 0 writes the report.
    """
    import time

    import numpy as np

    from .. import distributed
    from ..data.store import ActivationStore
    from ..dictionary import check_fitted_on, load
    from ..evaluation import evaluate
    from ..evaluation.report import RunResult, safe_name, write_report
    from ..learners.baselines import BASELINES, make_baseline

    main = distributed.is_main()

    def echo(message: str, **kwargs) -> None:  # one voice under torchrun: rank 0's
        if main:
            click.echo(message, **kwargs)

    kinds = [] if baselines.strip().lower() == "none" else [b.strip() for b in baselines.split(",") if b.strip()]
    for b in kinds:
        if b not in BASELINES:
            raise VitatlasError(f"unknown baseline {b!r}: choose from {', '.join(BASELINES)} or 'none'")
    if not runs and (not kinds or k is None or n_atoms is None):
        raise VitatlasError("nothing to evaluate: pass run directories, or baselines with --k and --atoms")
    if max_rows is not None and max_rows <= 0:
        raise VitatlasError(f"--max-rows must be positive, got {max_rows}")

    store = ActivationStore(acts, layer=layer)
    loaded = []
    for name, path in find_runs(runs):
        dictionary = load(path, device=device)
        check_fitted_on(dictionary, store, subject=f"run {name}", verb="evaluate")
        loaded.append((name, path, dictionary))

    X, labels, image_ids, ids = store, None, None, None
    if max_rows is not None and max_rows < store.n_rows:
        ids = np.sort(np.random.default_rng(seed).choice(store.n_rows, size=max_rows, replace=False))
        X = store.rows(ids)
        labels = store.labels[ids] if store.labels is not None else None
        image_ids = store.index[ids, 0]
    kw = dict(labels=labels, image_ids=image_ids, class_names=store.class_names, batch_size=batch_size,
              progress=progress, top_n=top_n, seed=seed)

    def run_eval(dictionary) -> dict:
        t0 = time.perf_counter()
        metrics = evaluate(dictionary, X, **kw)
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
        echo(f"  evaluated in {metrics['eval_seconds']:.1f} s", err=True)
        if ids is not None:  # top rows as row numbers of the whole store, not of the subset
            top = metrics["atoms"]["top_rows"]
            metrics["atoms"]["top_rows"] = np.where(top >= 0, ids[np.clip(top, 0, None)], -1)
        return metrics

    results: list[RunResult] = []
    for name, path, dictionary in loaded:
        echo(f"evaluating {name} ({dictionary.kind}, {dictionary.n_atoms} atoms)", err=True)
        results.append(RunResult(name, run_eval(dictionary), dictionary.kind, str(path), False,
                                 dictionary._config(), getattr(dictionary, "fit_info", {}) or {}))

    notes = []
    if kinds:
        k = k if k is not None else max(1, int(round(results[0].metrics["l0_median"])))
        n_atoms = n_atoms if n_atoms is not None else int(results[0].metrics["n_atoms"])
        n_fit = X.shape[0] if not hasattr(X, "n_rows") else X.n_rows
        notes.append(f"baselines fitted at k={k} with {n_atoms} atoms (PCA: k components; k-means: L0 = 1)")
        for kind in kinds:
            atoms_b = min(n_atoms, n_fit) if kind == "kmeans" else n_atoms
            try:
                model = make_baseline(kind, n_atoms=atoms_b, k=k, seed=seed, device=device)
                echo(f"fitting baseline {kind}", err=True)
                t0 = time.perf_counter()
                model.fit(X, progress=False)
                fit_s = round(time.perf_counter() - t0, 2)
                echo(f"  fitted in {fit_s:.1f} s", err=True)
            except VitatlasError as exc:
                notes.append(f"baseline {kind} skipped: {exc}")
                continue
            saved = Path(out) / "baselines" / safe_name(kind)
            if main:
                model.save(saved)
            if distributed.world().distributed:  # every rank evaluates rank 0's fit, bit for bit
                distributed.barrier(f"waiting for rank 0 to save the {kind} baseline")
                if not main:
                    model = load(saved, device=device)
            echo(f"evaluating baseline {kind}", err=True)
            metrics = run_eval(model)
            metrics["fit_seconds"] = fit_s
            results.append(RunResult(kind, metrics, kind, str(Path(out) / "baselines" / kind), True,
                                     model._config(), {}))

    desc = store.describe()
    data = {"store": str(store.path.resolve()), "model": desc.get("model"), "model_revision": desc.get("model_revision"),
            "layer": desc.get("layer"), "tokens": desc.get("tokens"), "data": desc.get("data"),
            "store rows": store.n_rows, "rows evaluated": results[0].metrics["n_rows"] if results else 0,
            "d": store.d, "labels": "yes" if (labels is not None or store.labels is not None) else "no",
            "classes": store.class_names}
    if main:
        report = write_report(out, results, store=store, data=data, notes=notes)
        click.echo(f"report written to {report}")
