"""``scorecard``: every given dictionary scored on the same images with every measure, in one table.

The measures are ``evaluate``'s (definitions in ``metrics``, ``labels``, ``probing``, ``spatial``) on
every row of one fixed, seeded sample of whole images of the store (whole images, so that per-image
labels and the patch-grid maps see each image complete), plus, when an intervention result is given,
the segmentation protocol's headline figures (``intervene.protocol``, ``intervene.report``).
docs/scorecard.md lists them all.
"""

from __future__ import annotations

import numpy as np

from ..data.store import ActivationStore
from ..dictionary import Dictionary, check_fitted_on
from ..errors import VitatlasError
from .spatial import grid_layout
from .streamed import evaluate

# (key, what the table calls it, which way is better: "higher" / "lower" / None = context)
MEASURES = [
    ("signal_recovered", "signal recovered", "higher"),
    ("explained_variance", "explained variance", "higher"),
    ("l0", "L0 (non-zeros per row)", None),
    ("faithfulness", "label faithfulness (AUROC)", "higher"),
    ("specificity", "label specificity (κ·s)", "higher"),
    ("confident_fraction", "atoms with a label of κ > 0.5", "higher"),
    ("sparse_probe_acc@5", "sparse probing acc@5", "higher"),
    ("spatial_coherence", "spatial coherence (Moran's I)", "higher"),
    ("max_coherence", "max coherence (max abs cosine)", "lower"),
    ("near_duplicate_pairs", "near-duplicate pairs (abs cosine > 0.9)", "lower"),
    ("dead_fraction", "dead atoms", "lower"),
    ("dense_fraction", "dense atoms (> 1% of rows)", "lower"),
    ("intervention_target", "intervention: target change", "higher"),
    ("intervention_other", "intervention: other change", "lower"),
    ("intervention_random_direction", "intervention: random direction's target change", "lower"),
    ("intervention_ratio", "intervention: atom ÷ random direction", "higher"),
    ("intervention_margin", "intervention: target − other", "higher"),
]
DEFAULT_IMAGES = 300


def sample_images(store: ActivationStore, max_images: int | None, seed: int = 0) -> np.ndarray:
    """Sorted rows of a fixed random sample of ``max_images`` whole images of the store (all when None or
    when the store has fewer)."""
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer))
                                   or max_images <= 0):
        raise VitatlasError(f"max_images must be a positive integer, got {max_images!r}")
    ids = store.index[:, 0]
    uniq = np.unique(ids)
    if max_images is None or uniq.size <= max_images:
        return np.arange(store.n_rows)
    chosen = np.random.default_rng(seed).choice(uniq, size=int(max_images), replace=False)
    return np.flatnonzero(np.isin(ids, chosen))


def intervention_measures(result: dict | None) -> dict[str, dict]:
    """Per run the scorecard's intervention rows from an intervene.json (segmentation): per-class mean
    target and other change rates of the atom at the headline strength, its random direction's target
    rate, their ratio and target − other."""
    if not result:
        return {}
    from ..intervene.report import control_comparison

    if (result.get("setup") or {}).get("task") != "segmentation":
        raise VitatlasError("the scorecard reads the segmentation protocol's intervene.json "
                            "(vitatlas intervene --task segmentation)")
    return {r["run"]: {"intervention_target": r["target"], "intervention_other": r["other"],
                       "intervention_random_direction": r["random_direction_target"],
                       "intervention_ratio": r["ratio_to_random_direction"],
                       "intervention_margin": r["target_minus_other"], "intervention_beats_control": r["beats_control"]}
            for r in control_comparison(result)}


def scorecard(dictionaries: dict[str, Dictionary], store: ActivationStore | str, *,
              max_images: int | None = DEFAULT_IMAGES, intervention: dict | None = None, seed: int = 0,
              batch_size: int = 4096, memory_budget: int = 1 << 30, progress: bool = False) -> dict:
    """Score every dictionary on the same ``max_images`` whole images of ``store`` (a fixed seeded sample).

    dictionaries: name -> fitted Dictionary (all fitted on this store's model, layer and tokens).
    intervention: the segmentation protocol's intervene.json content with these names as its runs
    (``vitatlas intervene``), or None to leave the intervention rows empty.
    Returns ``{"setup", "measures", "runs": {name: {measure: value}}, "metrics": {name: evaluate's dict
    without the per-atom arrays}}``; ``write_scorecard`` writes it out.
    """
    if not dictionaries:
        raise VitatlasError("give at least one dictionary to score")
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    for name, d in dictionaries.items():
        if not isinstance(d, Dictionary):
            raise VitatlasError(f"{name!r} is not a vitatlas Dictionary (vitatlas.load(run_dir)), "
                                f"got {type(d).__name__}")
        check_fitted_on(d, store, subject=f"run {name}", verb="score")
    from_intervention = intervention_measures(intervention)
    missing = [n for n in from_intervention if n not in dictionaries]
    if missing:
        raise VitatlasError(f"the intervention result has runs {', '.join(missing)} that are not being scored: "
                            "score the same runs, by the same names")
    rows = sample_images(store, max_images, seed)
    X = store.rows(rows)
    image_ids = store.index[rows, 0].astype(np.int64)
    labels = store.labels[rows] if store.labels is not None else None
    grid, cell_of_position = grid_layout(store.manifest)
    cells = None
    if grid is not None:
        positions = store.manifest["token_positions"]
        lut = np.full(max(positions) + 1, -1, np.int64)
        lut[positions] = cell_of_position
        cells = lut[store.index[rows, 1]]
    runs, metrics = {}, {}
    for name, d in dictionaries.items():
        m = evaluate(d, X, labels, image_ids=image_ids, class_names=store.class_names, patch_grid=grid,
                     patch_cells=cells, batch_size=batch_size, progress=progress, seed=seed,
                     memory_budget=memory_budget, downstream=False)
        m.pop("atoms", None)
        metrics[name] = m
        runs[name] = {key: m.get(key) for key, _, _ in MEASURES if not key.startswith("intervention")}
        runs[name].update({"n_atoms": m["n_atoms"], "kind": m["kind"], "near_duplicate_atoms": m.get("near_duplicate_atoms"),
                           "n_confident_atoms": m.get("n_confident_atoms")})
        runs[name].update(from_intervention.get(name, {}))
    setup = {"store": str(store.path.resolve()), "n_images": int(np.unique(image_ids).size), "n_rows": int(rows.size),
             "store_images": int(np.unique(store.index[:, 0]).size), "seed": seed, "patch_grid": grid,
             "has_labels": labels is not None, "class_names": store.class_names,
             "intervention": None if not intervention else {
                 k: intervention["setup"].get(k) for k in ("headline_strength", "headline_rule", "headline_rule_met",
                                                            "strengths", "n_held_out_images", "data")}
                 | {"features_per_class": intervention["setup"].get("features_per_class", 1)}}
    return {"setup": setup, "measures": [{"key": k, "label": lab, "better": b} for k, lab, b in MEASURES],
            "runs": runs, "metrics": metrics}
