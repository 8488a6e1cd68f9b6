"""The quantitative intervention protocols, with their controls in the same table.

Segmentation (``segmentation_protocol``), after the vision-SAE work:
  1. Images 0..n-1 are split (seeded) into a calibration part and a held-out part.
  2. Calibration: the patch tokens at layer L are encoded with each dictionary. A *feature* is an atom
     and a sign (signed codes, e.g. K-SVD, can fire negatively; SAE codes only have the + side). For each
     class c we pick the feature whose activation best predicts "patch is labelled c": the best F1 over
     thresholds {>0, >0.1, >0.25, >0.5} × the feature's max observed activation.
  3. Held out: for each image and each class c it has patches of, the chosen feature is set to
     −strength × its max observed activation at the patches labelled c, for every strength of the
     sweep (default 0.25, 0.5, 1, 2); error term kept. The rest of the model runs (the strengths of one
     condition in one batch), the segmentation probe reads every patch, and we count
       target change rate = changed predictions among patches the unedited model predicted as c,
       other change rate  = changed predictions among the patches it predicted as anything else,
     pooled over all edits, per class, and as mean ± std over classes, at every strength.
  Controls, same patches, same images, same strengths:
     random_atom       a random atom (uniform over atoms that ever fire) set to −strength × its max;
     random_direction  the chosen edit's change to the residual stream, ‖Δ‖ per token kept, but along a
                       random unit direction (one per class, seeded) instead of along the atom;
     noop              the edit path with an edit that changes no code (scale by 1): must be 0 change.
  The "before" predictions are computed on exactly the batch that is edited, so the no-op is exact.
  4. Headline strength, one for all runs (``headline_strength``): the largest strength of the sweep at
     which every run's random_direction control changes at most ``CONTROL_CEILING`` (10%) of target
     patches, as the mean over classes — the edit is then small enough that a direction of its size
     does almost nothing, and what the atom does is its own. When no strength qualifies, the smallest
     is used and ``setup.headline_rule_met`` is false. Every condition's top-level rates are those at
     the headline strength; the whole sweep is under ``by_strength``.

Classification (``classification_protocol``): for each class c the atoms most enriched for c on the
calibration images (mean over images of the atom's max activation over the image's tokens, in units
of its max, on class-c images minus other images) are ablated — the top 1, 5 and 20 — on all tokens of
the held-out images. Reported per condition: the drop in P(c) and in accuracy on class-c images and on
other images, and as change rates the fraction of class-c (target) and other images whose prediction
changed. Controls: as many random atoms ablated, the ablation's Δ along a random direction, a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..arrays import SparseCodes
from ..data.sources import ImageSource
from ..dictionary import Dictionary
from ..errors import VitatlasError
from ..models.base import VisionModel
from .collect import image_batches, split_ids
from .core import edit_hidden, resolve_layer
from .edits import Edit
from .heads import LinearProbe
from .masks import MaskSource, check_same_length
from .maxact import RunningExtremes

CONTROLS = ("noop", "random_atom", "random_direction")
RESERVED = ("setup",) + CONTROLS
THRESHOLDS = (0.0, 0.1, 0.25, 0.5)
TOP_KS = (1, 5, 20)
STRENGTHS = (0.25, 0.5, 1.0, 2.0)
CONTROL_CEILING = 0.10


# ---- checks ---------------------------------------------------------------------------------------

def check_strength(strength: float) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise VitatlasError(f"--strength must be a number, got {strength!r}") from None
    if not math.isfinite(value):
        raise VitatlasError(f"--strength must be a finite number, got {strength!r}")
    return value


def check_strengths(strengths) -> list[float]:
    """Distinct positive finite strengths, ascending."""
    values = sorted({check_strength(v) for v in ([strengths] if np.isscalar(strengths) else strengths)})
    if not values or values[0] <= 0:
        raise VitatlasError(f"edit strengths must be positive numbers, got {strengths!r}")
    return values


def headline_strength(by_strength: dict[float, dict[str, float | None]], ceiling: float = CONTROL_CEILING
                      ) -> tuple[float, bool]:
    """(strength, rule met): the largest strength whose random-direction target rates (per-class means, one
    per run) are all <= ``ceiling``; the smallest strength when none is."""
    ok = [s for s, rates in by_strength.items() if all(r is not None and r <= ceiling for r in rates.values())]
    return (max(ok), True) if ok else (min(by_strength), False)


def check_runs(model: VisionModel, runs: dict[str, Dictionary], layer: int | None) -> int:
    """All runs edit the same layer of this model; names must not collide with the control keys."""
    if not runs:
        raise VitatlasError("give at least one run (a dictionary directory)")
    layers = {}
    for name, d in runs.items():
        if name in RESERVED or "/" in name:
            raise VitatlasError(f"run name {name!r} is reserved or has a '/': rename the run directory")
        d._check_fitted()
        layers[name] = resolve_layer(model, d, layer)
    if len(set(layers.values())) > 1:
        raise VitatlasError(f"the runs were fitted on different layers ({layers}): compare runs of one layer")
    return next(iter(layers.values()))


def check_classes(names: Sequence[str] | None, class_names: list[str]) -> list[int]:
    if not names:
        return list(range(len(class_names)))
    out = []
    for n in names:
        if n in class_names:
            out.append(class_names.index(n))
        elif str(n).isdigit() and int(n) < len(class_names):
            out.append(int(n))
        else:
            raise VitatlasError(f"class {n!r} does not exist: the classes are {', '.join(class_names)}")
    return out


def _max_array(values, n_atoms: int, name: str) -> np.ndarray:
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if arr.shape != (n_atoms,):
        raise VitatlasError(f"max activations for {name} must have one value per atom ({n_atoms}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise VitatlasError(f"max activations for {name} have NaN or Inf values")
    return arr


# ---- counting -------------------------------------------------------------------------------------

@dataclass
class Tally:
    """Changed / total predictions among target and other units, per class."""

    n_classes: int
    target_changed: np.ndarray = field(init=False)
    target_total: np.ndarray = field(init=False)
    other_changed: np.ndarray = field(init=False)
    other_total: np.ndarray = field(init=False)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        z = lambda: np.zeros(self.n_classes, np.int64)  # noqa: E731
        self.target_changed, self.target_total, self.other_changed, self.other_total = z(), z(), z(), z()

    def add(self, c: int, is_target: np.ndarray, changed: np.ndarray) -> None:
        self.target_changed[c] += int((changed & is_target).sum())
        self.target_total[c] += int(is_target.sum())
        self.other_changed[c] += int((changed & ~is_target).sum())
        self.other_total[c] += int((~is_target).sum())

    def summary(self, class_names: list[str], classes: list[int], per_class_extra: dict | None = None) -> dict:
        def rate(a, b):
            return float(a / b) if b else None

        per_class, t_rates, o_rates = {}, [], []
        for c in classes:
            t = rate(self.target_changed[c], self.target_total[c])
            o = rate(self.other_changed[c], self.other_total[c])
            per_class[class_names[c]] = {"target_change_rate": t, "other_change_rate": o,
                                         "n_target": int(self.target_total[c]), "n_other": int(self.other_total[c]),
                                         **((per_class_extra or {}).get(c, {}))}
            if t is not None:
                t_rates.append(t)
            if o is not None:
                o_rates.append(o)
        sel = np.asarray(classes)
        stat = lambda v, f: float(f(v)) if v else None  # noqa: E731
        return {
            "target_change_rate": rate(self.target_changed[sel].sum(), self.target_total[sel].sum()),
            "other_change_rate": rate(self.other_changed[sel].sum(), self.other_total[sel].sum()),
            "target_change_rate_mean": stat(t_rates, np.mean), "target_change_rate_std": stat(t_rates, np.std),
            "other_change_rate_mean": stat(o_rates, np.mean), "other_change_rate_std": stat(o_rates, np.std),
            "n_target": int(self.target_total[sel].sum()), "n_other": int(self.other_total[sel].sum()),
            "n_classes_measured": len(t_rates), **self.extra, "per_class": per_class,
        }


def best_features(codes: list[SparseCodes], labels: np.ndarray, max_pos: np.ndarray, max_neg: np.ndarray,
                  n_classes: int, thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """For each class, the (atom, sign, threshold) with the best F1 for "row is labelled c".

    ``codes`` are the rows' sparse codes (in row order, matching ``labels``); ``max_pos`` / ``max_neg``
    (A,) the largest positive and the largest negative magnitude of each atom. Rows labelled -1 count
    as negatives for every class. F1 = 2·TP / (predicted positives + actual positives).
    """
    return [feats[0] for feats in top_features(codes, labels, max_pos, max_neg, n_classes, 1, thresholds)]


def top_features(codes: list[SparseCodes], labels: np.ndarray, max_pos: np.ndarray, max_neg: np.ndarray,
                 n_classes: int, per_class: int, thresholds: Sequence[float] = THRESHOLDS) -> list[list[dict]]:
    """For each class, the ``per_class`` distinct atoms with the best F1 for "row is labelled c", best
    first; each atom with its best sign and threshold (``best_features`` is the first of each list).
    A class no atom fires on gets one entry with atom -1; a class with fewer firing atoms gets fewer."""
    # batches may keep different numbers of slots per row (a BatchTopK SAE): pad with empty slots (-1)
    width = max(c.indices.shape[1] for c in codes)
    idx = torch.cat([torch.nn.functional.pad(c.indices, (0, width - c.indices.shape[1]), value=-1)
                     for c in codes]).numpy()
    val = torch.cat([torch.nn.functional.pad(c.values, (0, width - c.values.shape[1])) for c in codes]).double().numpy()
    n_atoms = codes[0].n_atoms
    y = np.asarray(labels)
    n_pos = np.bincount(y[y >= 0], minlength=n_classes)[:n_classes]
    # best[a, c]: atom a's best F1 for class c over signs and thresholds; ties keep the first (sign, tau)
    best = np.full((n_atoms, n_classes), -1.0)
    best_sign = np.ones((n_atoms, n_classes), np.int64)
    best_tau = np.zeros((n_atoms, n_classes))
    rows = np.broadcast_to(y[:, None], idx.shape)
    for sign, scale in ((1, max_pos), (-1, max_neg)):
        if not (scale > 0).any():
            continue
        for tau in thresholds:
            active = (idx >= 0) & (sign * val > tau * scale[np.maximum(idx, 0)]) & (scale[np.maximum(idx, 0)] > 0)
            atoms, labs = idx[active], rows[active]
            predicted = np.bincount(atoms, minlength=n_atoms)
            hit = labs >= 0
            tp = np.bincount(atoms[hit] * n_classes + labs[hit], minlength=n_atoms * n_classes)
            tp = tp.reshape(n_atoms, n_classes)
            f1 = 2 * tp / np.maximum(predicted[:, None] + n_pos[None, :], 1)
            f1[predicted == 0] = -1.0  # an atom that never passes this threshold is no feature
            better = f1 > best
            best = np.where(better, f1, best)
            best_sign = np.where(better, sign, best_sign)
            best_tau = np.where(better, tau, best_tau)
    out = []
    for c in range(n_classes):
        order = np.argsort(-best[:, c], kind="stable")  # stable: among equal F1 the lower atom id first
        chosen = [{"atom": int(a), "sign": int(best_sign[a, c]), "threshold": float(best_tau[a, c]),
                   "f1": float(best[a, c])} for a in order[:per_class] if best[a, c] >= 0]
        out.append(chosen or [{"atom": -1, "sign": 1, "threshold": 0.0, "f1": -1.0}])
    return out


# ---- segmentation ---------------------------------------------------------------------------------

@dataclass
class Example:
    image_id: int
    cls: int
    labels: np.ndarray
    before: np.ndarray
    after: dict = field(default_factory=dict)  # condition -> (P,) predictions


def _setup(task: str, model: VisionModel, runs: dict[str, Dictionary], probe: LinearProbe, source: ImageSource, *,
           layer: int | None, limit: int | None, calibration: float, classes: Sequence[str] | None, seed: int):
    """The checks both protocols share; returns (layer, chosen classes, n images, held-out ids, calibration ids)."""
    if probe.task != task:
        raise VitatlasError(f"the {task} protocol needs a {task} probe; {probe.task!r} given")
    probe.check_model(model)
    layer = check_runs(model, runs, layer)
    chosen_classes = check_classes(classes, probe.class_names)
    if not 0 < calibration < 1:
        raise VitatlasError(f"the calibration fraction must be between 0 and 1, got {calibration}")
    n = min(len(source), limit) if limit else len(source)
    if n < 2:
        raise VitatlasError(f"the protocol needs at least 2 images (calibration and held out), {source.spec} gives {n}")
    held_ids, cal_ids = split_ids(n, calibration, seed)
    return layer, chosen_classes, n, held_ids, cal_ids


@torch.no_grad()
def segmentation_protocol(model: VisionModel, runs: dict[str, Dictionary], probe: LinearProbe,
                          source: ImageSource, masks: MaskSource, *, layer: int | None = None,
                          limit: int | None = None, strengths: Sequence[float] = STRENGTHS, calibration: float = 0.3,
                          max_activations: dict[str, np.ndarray] | None = None, classes: Sequence[str] | None = None,
                          seed: int = 0, batch_size: int = 16, n_examples: int = 4, progress: bool = True,
                          features_per_class: int = 1) -> dict:
    """Run the segmentation protocol (module docstring); returns the intervene.json content.

    ``features_per_class``: how many atoms are edited together per class (the best F1 first; 1, the
    vision-SAE test's choice, by default). An overcomplete dictionary spreads a class over many atoms,
    each on part of its patches: editing the top few tests the class's atoms as a group. The random-atom
    control then edits as many random atoms; the random direction keeps the group's per-token ‖Δ‖.
    """
    strengths = check_strengths(strengths)
    if isinstance(features_per_class, bool) or not isinstance(features_per_class, (int, np.integer)) \
            or features_per_class < 1:
        raise VitatlasError(f"features_per_class must be a positive integer, got {features_per_class!r}")
    check_same_length(source, masks)
    if list(masks.class_names) != list(probe.class_names):
        raise VitatlasError(f"the probe's classes ({', '.join(probe.class_names)}) differ from the mask source's "
                            f"({', '.join(masks.class_names)}): train the probe on these masks")
    setup = _setup("segmentation", model, runs, probe, source, layer=layer, limit=limit, calibration=calibration,
                   classes=classes, seed=seed)
    layer, chosen_classes, n, held_ids, cal_ids = setup
    n_classes = probe.n_classes
    prefix = model.n_prefix_tokens
    bar = tqdm(total=n, unit="img", desc="intervene segmentation", disable=not progress)

    # 1. calibration: sparse codes of every patch, per run, and the atoms' extremes
    cal_codes = {name: [] for name in runs}
    extremes = {name: RunningExtremes(d.n_atoms) for name, d in runs.items()}
    cal_labels = []
    for batch in image_batches(model, source, cal_ids, masks=masks, batch_size=batch_size):
        rows = model.residual_streams(batch.pixels, [layer])[layer][:, prefix:].reshape(-1, model.width)
        cal_labels.append(batch.patch_labels.reshape(-1))
        for name, d in runs.items():
            codes = d._encode(rows.to(d.device, d.dtype))
            extremes[name].update(codes)
            cal_codes[name].append(SparseCodes.from_dense(codes.cpu()))
        bar.update(len(batch.ids))
    labels = np.concatenate(cal_labels)
    plans = {}
    for name, d in runs.items():
        if max_activations and name in max_activations:
            max_pos = _max_array(max_activations[name], d.n_atoms, name)
            max_neg = -extremes[name].min.numpy()  # interpret's cards give the + side; - side from calibration
            source_of_max = "given"
        else:
            max_pos, max_neg = extremes[name].max.numpy(), -extremes[name].min.numpy()
            source_of_max = "calibration images"
        feats = top_features(cal_codes[name], labels, max_pos, max_neg, n_classes, features_per_class)
        plans[name] = _segmentation_plan(d, feats, max_pos, max_neg, strengths, n_classes, seed, model.width)
        plans[name]["max_source"] = source_of_max
    del cal_codes

    # 2. held out: edit class by class at every strength, count changed predictions
    first = next(iter(runs))
    keys = _internal_keys(runs)
    tallies = {(key, st): Tally(n_classes) for key in keys for st in (strengths if key != "noop" else [None])}
    probe_hits = np.zeros(2, np.int64)
    examples: list[Example] = []
    for batch in image_batches(model, source, held_ids, masks=masks, batch_size=batch_size):
        hidden = model.residual_streams(batch.pixels, [layer])[layer]
        plabels = batch.patch_labels
        for c in chosen_classes:
            sub = np.flatnonzero((plabels == c).any(axis=1))
            if sub.size == 0:
                continue
            h = hidden[torch.from_numpy(sub)]
            mask = torch.zeros(h.shape[0], h.shape[1], dtype=torch.bool)
            mask[:, prefix:] = torch.from_numpy(plabels[sub] == c)
            mask = mask.to(h.device)
            # "before" on exactly this sub-batch, so an edit that changes nothing changes no prediction
            pred_before = probe.predict(model.forward_from(layer, h)).cpu().numpy()
            labelled = plabels[sub] == c
            probe_hits += [int((pred_before[labelled] == c).sum()), int(labelled.sum())]
            is_target = pred_before == c
            afters = {}
            codes = {name: d._encode(h[mask].to(d.device, d.dtype)) for name, d in runs.items()}
            for key, (name, edits_by_strength, direction) in _conditions_for(runs, plans, c, strengths).items():
                # one forward for all strengths of a condition: the edited copies side by side in the batch
                edited = [edit_hidden(h, mask, runs[name], edits, None, direction, codes=codes[name])[0]
                          for edits in edits_by_strength.values()]
                preds = probe.predict(model.forward_from(layer, torch.cat(edited))).cpu().numpy()
                for i, st in enumerate(edits_by_strength):
                    pred_after = preds[i * h.shape[0]:(i + 1) * h.shape[0]]
                    tallies[(key, st)].add(c, is_target, pred_after != pred_before)
                    afters[(key, st)] = pred_after
            if len(examples) < n_examples and all(e.cls != c for e in examples) and c != _most_common(plabels):
                examples.append(Example(int(batch.ids[sub[0]]), c, plabels[sub[0]], pred_before[0],
                                        {k: v[0] for k, v in afters.items()}))
        bar.update(len(batch.ids))
    bar.close()

    def summary(key: str, st: float | None) -> dict:
        run_name = key.split("/")[0] if "/" in key else (first if key in CONTROLS else key)
        plan = plans[run_name]
        extra = {c: plan["per_class"][c] for c in chosen_classes} if key == run_name else \
            {c: _random_atoms_info(plan["random_atoms"][c]) for c in chosen_classes} if key.endswith("random_atom") \
            else None
        return {"kind": "atom" if key == run_name else key.split("/")[-1], "run": run_name,
                **tallies[(key, st)].summary(probe.class_names, chosen_classes, extra)}

    sweep = {key: {st: summary(key, st) for st in strengths} for key in keys if key != "noop"}
    chosen, rule_met = headline_strength(
        {st: {name: sweep[f"{name}/random_direction"][st]["target_change_rate_mean"] for name in runs}
         for st in strengths})
    result = {"setup": {
        "task": "segmentation", "model": model.name, "model_revision": model.revision, "layer": layer,
        "data": source.spec, "masks": masks.spec, "n_images": n, "n_calibration_images": len(cal_ids),
        "n_held_out_images": len(held_ids), "strength": chosen, "strengths": strengths,
        "headline_strength": chosen, "headline_rule_met": rule_met, "control_ceiling": CONTROL_CEILING,
        "headline_rule": f"the largest strength at which every run's random_direction control changes at most "
                         f"{CONTROL_CEILING:g} of target patches (mean over classes); else the smallest",
        "seed": seed, "class_names": probe.class_names, "features_per_class": int(features_per_class),
        "classes_edited": [probe.class_names[c] for c in chosen_classes], "thresholds": list(THRESHOLDS),
        "probe_metrics": probe.metrics,
        "probe_held_out_patch_accuracy": float(probe_hits[0] / max(probe_hits[1], 1)),
        "runs": {name: {"learner": d.kind, "n_atoms": d.n_atoms, "max_activation_source": plans[name]["max_source"],
                        "path": (getattr(d, "fit_info", {}) or {}).get("path")} for name, d in runs.items()},
    }}
    for key in keys:
        if key == "noop":
            result[key] = summary(key, None)
            continue
        result[key] = dict(sweep[key][chosen], strength=chosen,
                           by_strength={f"{st:g}": _curve_point(sweep[key][st]) for st in strengths})
    _publish_controls(result, runs)
    for e in examples:
        e.after = {k.replace(f"{first}/", ""): v for (k, st), v in e.after.items() if st in (chosen, None)}
    result["setup"]["examples"] = [{"image": e.image_id, "class": probe.class_names[e.cls]} for e in examples]
    return {"json": result, "examples": examples}


def _curve_point(summary: dict) -> dict:
    """One strength of a condition's sweep: its rates and per-class rates, without the repeated labels."""
    keep = ("target_change_rate", "other_change_rate", "target_change_rate_mean", "target_change_rate_std",
            "other_change_rate_mean", "other_change_rate_std", "n_target", "n_other", "n_classes_measured")
    return {**{k: summary[k] for k in keep},
            "per_class": {c: {"target_change_rate": v["target_change_rate"], "other_change_rate": v["other_change_rate"]}
                          for c, v in summary["per_class"].items()}}


def _most_common(plabels: np.ndarray) -> int:
    """The most frequent patch label of a batch (background, usually): skipped for example maps."""
    vals = plabels[plabels >= 0]
    return int(np.bincount(vals).argmax()) if vals.size else -1


def _segmentation_plan(d: Dictionary, feats: list[list[dict]], max_pos: np.ndarray, max_neg: np.ndarray,
                       strengths: Sequence[float], n_classes: int, seed: int, width: int) -> dict:
    """Per class: the chosen atoms' and as many random atoms' edits at every strength, and the random direction."""
    rng = np.random.default_rng(seed + 1)
    alive = np.flatnonzero(max_pos > 0)
    if alive.size == 0:
        raise VitatlasError("no atom of this dictionary fired on the calibration images: use more images")
    plan = {"edits": {}, "random_edits": {}, "random_atoms": {}, "directions": {}, "per_class": {}}
    for c in range(n_classes):
        chosen = [f for f in feats[c] if f["atom"] >= 0]  # none: no feature fires for this class, nothing to edit
        peaks = [float(max_pos[f["atom"]] if f["sign"] > 0 else max_neg[f["atom"]]) for f in chosen]
        plan["edits"][c] = {st: [Edit(f["atom"], "clamp", -st * f["sign"] * peak, relative=False)
                                 for f, peak in zip(chosen, peaks)] for st in strengths}
        taken = [f["atom"] for f in chosen]
        choices = np.setdiff1d(alive, taken) if alive.size > len(taken) else alive
        # one random atom per chosen one (at least one, so the control exists for a class with none); a single
        # one is drawn as before groups existed, so N = 1 keeps the same random atoms and directions
        n_random = min(max(len(chosen), 1), choices.size)
        rand = [int(rng.choice(choices))] if n_random == 1 else \
            [int(r) for r in rng.choice(choices, n_random, replace=False)]
        plan["random_atoms"][c] = rand
        plan["random_edits"][c] = {st: [Edit(r, "clamp", -st * float(max_pos[r]), relative=False) for r in rand]
                                   for st in strengths}
        plan["directions"][c] = torch.from_numpy(rng.standard_normal(width)).float()
        first = chosen[0] if chosen else feats[c][0]
        info = {"atom": first["atom"], "sign": first["sign"], "f1": first["f1"], "threshold": first["threshold"],
                "max_activation": peaks[0] if peaks else 0.0}
        if len(chosen) > 1:
            info["atoms"] = [f["atom"] for f in chosen]
            info["features"] = [dict(f, max_activation=peak) for f, peak in zip(chosen, peaks)]
        plan["per_class"][c] = info
    return plan


def _random_atoms_info(atoms: list[int]) -> dict:
    """The random-atom control's atoms as intervene.json names them: ``atom``, plus ``atoms`` for a group."""
    return {"atom": atoms[0]} if len(atoms) == 1 else {"atom": atoms[0], "atoms": atoms}


def _internal_keys(runs: dict[str, Dictionary]) -> list[str]:
    """Every measured condition once: each run, its two random controls, and the no-op."""
    return list(runs) + [f"{name}/{k}" for name in runs for k in CONTROLS[1:]] + ["noop"]


def _publish_controls(result: dict, runs: dict[str, Dictionary], suffix: str = "") -> None:
    """The contract's plain keys: ``random_atom`` / ``random_direction`` are the first run's controls;
    with several runs every run's controls stay under ``<run>/random_atom`` too."""
    first = next(iter(runs))
    for k in CONTROLS[1:]:
        key = f"{first}/{k}{suffix}"
        if key in result:
            result[f"{k}{suffix}"] = result[key] if len(runs) > 1 else result.pop(key)


def _conditions_for(runs: dict[str, Dictionary], plans: dict, c: int, strengths: Sequence[float]) -> dict:
    """condition key -> (run name, {strength: edits}, random direction or None) for class c; the no-op has
    one strength, None."""
    out = {}
    for name in runs:
        p = plans[name]
        out[name] = (name, p["edits"][c], None)
        out[f"{name}/random_atom"] = (name, p["random_edits"][c], None)
        out[f"{name}/random_direction"] = (name, p["edits"][c], p["directions"][c])
    first = next(iter(runs))
    edits = plans[first]["edits"][c][strengths[0]]
    out["noop"] = (first, {None: [Edit(edits[0].atom if edits else 0, "scale", 1.0)]}, None)
    return out


# ---- classification -------------------------------------------------------------------------------

@torch.no_grad()
def classification_protocol(model: VisionModel, runs: dict[str, Dictionary], probe: LinearProbe,
                            source: ImageSource, *, layer: int | None = None, limit: int | None = None,
                            calibration: float = 0.3, max_activations: dict[str, np.ndarray] | None = None,
                            classes: Sequence[str] | None = None, top_ks: Sequence[int] = TOP_KS, seed: int = 0,
                            batch_size: int = 16, progress: bool = True, strength: float | None = None) -> dict:
    """Run the classification protocol (module docstring); returns the intervene.json content."""
    if strength is not None:
        check_strength(strength)  # ablation has no strength; still refuse NaN
    if not source.has_labels:
        raise VitatlasError(f"{source.spec} has no image labels: the classification protocol needs them")
    if list(source.class_names) != list(probe.class_names):
        raise VitatlasError("the probe's classes differ from the data source's: train the probe on this data")
    setup = _setup("classification", model, runs, probe, source, layer=layer, limit=limit, calibration=calibration,
                   classes=classes, seed=seed)
    layer, chosen_classes, n, held_ids, cal_ids = setup
    n_classes = probe.n_classes
    bar = tqdm(total=n, unit="img", desc="intervene classification", disable=not progress)

    # 1. calibration: per image, each atom's max over tokens
    per_image = {name: [] for name in runs}
    cal_labels = []
    for batch in image_batches(model, source, cal_ids, batch_size=batch_size):
        hidden = model.residual_streams(batch.pixels, [layer])[layer]
        b, t, _ = hidden.shape
        for name, d in runs.items():
            codes = d._encode(hidden.reshape(-1, model.width).to(d.device, d.dtype)).reshape(b, t, -1)
            per_image[name].append(codes.max(dim=1).values.double().cpu())
        cal_labels.append(batch.labels)
        bar.update(len(batch.ids))
    y = np.concatenate(cal_labels)
    plans = {}
    rng = np.random.default_rng(seed + 1)
    for name, d in runs.items():
        acts = torch.cat(per_image[name]).numpy()  # (n_cal, A)
        peak = _max_array(max_activations[name], d.n_atoms, name) if max_activations and name in max_activations \
            else acts.max(0)
        rel = acts / np.where(peak > 0, peak, 1.0)
        alive = np.flatnonzero(peak > 0)
        plans[name] = {}
        for c in chosen_classes:
            inside, outside = y == c, (y != c) & (y >= 0)
            if not inside.any() or not outside.any():
                raise VitatlasError(f"class {probe.class_names[c]!r} has no calibration images (or no others): "
                                    "use more images (--limit)")
            enrichment = rel[inside].mean(0) - rel[outside].mean(0)
            order = np.argsort(-enrichment, kind="stable")
            plans[name][c] = {k: {"atoms": order[:k].tolist(),
                                  "random": rng.choice(alive, size=min(k, alive.size), replace=False).tolist(),
                                  "direction": torch.from_numpy(rng.standard_normal(model.width)).float()}
                              for k in top_ks}
    first = next(iter(runs))
    keys = [f"{name}{ctl}@top{k}" for name in runs for ctl in ("", "/random_atom", "/random_direction")
            for k in top_ks] + ["noop"]
    tallies = {key: Tally(n_classes) for key in keys}
    sums = {key: np.zeros((n_classes, 6)) for key in keys}  # dP in, dP out, dAcc in, dAcc out, n in, n out

    # 2. held out: ablate on all tokens, read the CLS probe
    for batch in image_batches(model, source, held_ids, batch_size=batch_size):
        hidden = model.residual_streams(batch.pixels, [layer])[layer]
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        p_before = probe.predict_proba(model.forward_from(layer, hidden)).cpu().numpy()
        pred_before = p_before.argmax(1)
        codes = {name: d._encode(hidden[mask].to(d.device, d.dtype)) for name, d in runs.items()}
        for c in chosen_classes:
            is_c = batch.labels == c
            for key, (name, edits, direction) in _class_conditions(runs, plans, c, top_ks).items():
                new_h, _, _ = edit_hidden(hidden, mask, runs[name], edits, None, direction, codes=codes[name])
                p_after = probe.predict_proba(model.forward_from(layer, new_h)).cpu().numpy()
                pred_after = p_after.argmax(1)
                tallies[key].add(c, is_c, pred_after != pred_before)
                dp = p_before[:, c] - p_after[:, c]
                dacc = (pred_before == batch.labels).astype(float) - (pred_after == batch.labels)
                sums[key][c] += [dp[is_c].sum(), dp[~is_c].sum(), dacc[is_c].sum(), dacc[~is_c].sum(),
                                 is_c.sum(), (~is_c).sum()]
        bar.update(len(batch.ids))
    bar.close()

    result = {"setup": {
        "task": "classification", "model": model.name, "model_revision": model.revision, "layer": layer,
        "data": source.spec, "n_images": n, "n_calibration_images": len(cal_ids), "n_held_out_images": len(held_ids),
        "top_ks": list(top_ks), "seed": seed, "class_names": probe.class_names, "probe_metrics": probe.metrics,
        "classes_edited": [probe.class_names[c] for c in chosen_classes],
        "runs": {name: {"learner": d.kind, "n_atoms": d.n_atoms} for name, d in runs.items()}}}
    for key in keys:
        s = sums[key][chosen_classes].sum(0)
        extra = {"p_drop_target": float(s[0] / max(s[4], 1)), "p_drop_other": float(s[1] / max(s[5], 1)),
                 "accuracy_drop_target": float(s[2] / max(s[4], 1)), "accuracy_drop_other": float(s[3] / max(s[5], 1))}
        tallies[key].extra = extra
        base = key.split("@")[0]
        run_name = base.split("/")[0] if "/" in base else (first if base in CONTROLS else base)
        per_class = None
        if base in runs:
            k = int(key.split("@top")[1])
            per_class = {c: {"atoms": plans[base][c][k]["atoms"]} for c in chosen_classes}
        result[key] = {"kind": "atom" if base in runs else base.split("/")[-1], "run": run_name,
                       **tallies[key].summary(probe.class_names, chosen_classes, per_class)}
    for k in top_ks:
        _publish_controls(result, runs, f"@top{k}")
    # the plain keys the contract names: each run and control at the largest top-k
    k = max(top_ks)
    for name in list(runs) + list(CONTROLS[1:]):
        result[name] = dict(result[f"{name}@top{k}"], top_k=k)
    return {"json": result, "examples": []}


def _class_conditions(runs: dict[str, Dictionary], plans: dict, c: int, top_ks: Sequence[int]) -> dict:
    """condition key -> (run name, edits, random direction or None) for class c."""
    out = {}
    for name in runs:
        for k in top_ks:
            p = plans[name][c][k]
            ablate = [Edit(a, "ablate") for a in p["atoms"]]
            out[f"{name}@top{k}"] = (name, ablate, None)
            out[f"{name}/random_atom@top{k}"] = (name, [Edit(a, "ablate") for a in p["random"]], None)
            out[f"{name}/random_direction@top{k}"] = (name, ablate, p["direction"])
    first = next(iter(runs))
    out["noop"] = (first, [Edit(plans[first][c][top_ks[0]]["atoms"][0], "scale", 1.0)], None)
    return out
