"""Write a protocol's results: ``intervene.json``, ``report.md`` and plots (matplotlib, Agg backend).

    OUT/intervene.json        conditions keyed by run name and by noop / random_atom / random_direction
                              (each with target_change_rate, other_change_rate, per-class values, std),
                              plus "setup" (model, layer, data, image counts, strength, probe metrics)
    OUT/report.md             the table, per-class values, how to read it
    OUT/change_rates.png      target vs other change rate per learner and control (headline strength)
    OUT/strength_sweep.png    segmentation: target change rate against edit strength, atoms and controls
    OUT/segmentation_maps.png before/after probe maps for a few held-out images (segmentation)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.sources import ImageSource
from ..io import atomic_write_bytes, atomic_write_json
from ..models.base import VisionModel

BEATS_FACTOR = 2.0   # an atom beats its control when its target rate is >= 2x the random direction's ...
MIN_TARGET = 0.3     # ... and it changes at least 30% of its target patches (per-class means)


def beats_control(atom: float | None, control: float | None) -> bool | None:
    """The verdict the report prints: atom >= BEATS_FACTOR x control and atom >= MIN_TARGET."""
    if atom is None or control is None:
        return None
    return atom >= BEATS_FACTOR * control and atom >= MIN_TARGET


def control_comparison(result: dict) -> list[dict]:
    """Per run, at the headline strength: per-class mean target / other rates of the atom and its controls,
    the ratio to the random direction, target − other, and the verdict (segmentation)."""
    rows = []
    for name in result["setup"].get("runs", {}):
        atom = result.get(name)
        if not atom or atom.get("kind") != "atom":
            continue
        rd = result.get(f"{name}/random_direction") or result.get("random_direction") or {}
        ra = result.get(f"{name}/random_atom") or result.get("random_atom") or {}
        t, o = atom.get("target_change_rate_mean"), atom.get("other_change_rate_mean")
        t_rd = rd.get("target_change_rate_mean")
        rows.append({"run": name, "target": t, "other": o, "random_direction_target": t_rd,
                     "random_atom_target": ra.get("target_change_rate_mean"),
                     "ratio_to_random_direction": (t / t_rd) if t is not None and t_rd else None,
                     "target_minus_other": (t - o) if t is not None and o is not None else None,
                     "beats_control": beats_control(t, t_rd)})
    return rows


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _pm(m, s) -> str:
    return "–" if m is None else f"{m:.3f} ± {s:.3f}"


def condition_rows(result: dict) -> list[tuple[str, dict]]:
    """(key, condition) in table order: runs first, then controls."""
    conds = [(k, v) for k, v in result.items() if k != "setup" and isinstance(v, dict) and "target_change_rate" in v]
    return sorted(conds, key=lambda kv: (kv[1].get("kind") != "atom", kv[1].get("kind") == "noop", kv[0]))


def headline(result: dict) -> str:
    """One line per run and control: target / other change rate (pooled, and per-class mean when measured
    per class), then for segmentation whether each atom beats its random direction."""
    lines = []
    if result["setup"].get("strengths"):
        lines.append(f"at strength {result['setup']['strength']:g} (headline; per-class means in brackets)")
    for key, c in condition_rows(result):
        if "@" in key:
            continue
        lines.append(f"{key:28s} target {_fmt(c['target_change_rate'])} ({_fmt(c.get('target_change_rate_mean'))})"
                     f"  other {_fmt(c['other_change_rate'])} ({_fmt(c.get('other_change_rate_mean'))})")
    for r in control_comparison(result) if result["setup"].get("task") == "segmentation" else []:
        verdict = {True: "beats", False: "does not beat", None: "cannot be compared with"}[r["beats_control"]]
        lines.append(f"{r['run']} {verdict} its random direction")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    s = result["setup"]
    seg = s["task"] == "segmentation"
    out = [f"# Interventions: {s['task']} protocol", "",
           f"Model `{s['model']}` (revision {s.get('model_revision')}), edits at layer {s['layer']}; data "
           f"`{s['data']}`: {s['n_calibration_images']} calibration and {s['n_held_out_images']} held-out images.", ""]
    if seg:
        sweep = ", ".join(f"{v:g}" for v in s.get("strengths", [s["strength"]]))
        rule = "met" if s.get("headline_rule_met", True) else \
            "**not met**: no strength kept every random direction at or below the ceiling; the smallest is used"
        m = int(s.get("features_per_class", 1))
        chosen = "the atom (and sign) whose activation best predicts" if m == 1 else \
            f"the {m} atoms (each with its sign) whose activations best predict"
        controls = "a random atom" if m == 1 else f"{m} random atoms"
        out += [f"For each class c, {chosen} \"patch is c\" on the "
                f"calibration images (best F1 over thresholds {s['thresholds']} × its max) is set to "
                f"−strength × its max observed activation at the patches labelled c of every held-out image, "
                f"for each strength of the sweep ({sweep}), with the dictionary's error term added back. "
                "**target change rate**: changed probe predictions "
                "among patches the unedited model predicted as c; **other change rate**: among all other patches. "
                f"Controls on the same patches: `random_atom` ({controls} at −strength× its max), "
                "`random_direction` (the same per-token change ‖Δ‖ along a random unit direction), `noop` (an edit "
                "that changes no code; must be 0).", "",
                f"**Headline strength {s['strength']:g}** — {s.get('headline_rule', 'the one strength given')} "
                f"(rule {rule}). Every rate below is at this strength unless a column says otherwise; "
                "the whole curve is under `by_strength` in intervene.json and in the sweep table.", "",
                f"Probe: held-out patch accuracy {_fmt(s['probe_metrics'].get('accuracy'))}, mIoU "
                f"{_fmt(s['probe_metrics'].get('miou'))} (from `probe train`); on this protocol's held-out images "
                f"{_fmt(s.get('probe_held_out_patch_accuracy'))}.", ""]
        out += _comparison_markdown(result) + _sweep_markdown(result)
    else:
        out += ["For each class c the atoms most enriched for c on the calibration images are ablated on all tokens "
                "of the held-out images (top 1, 5, 20). target = images of class c, other = the rest; change rate = "
                "fraction whose probe prediction changed; drops are before − after.", "",
                f"Probe: held-out accuracy {_fmt(s['probe_metrics'].get('accuracy'))}.", ""]
    head = ("| condition | target change rate | other change rate | target (mean ± std over classes) "
            "| other (mean ± std) |")
    extra = " P(c) drop target | P(c) drop other | acc drop target | acc drop other |" if not seg else ""
    out += [head + extra, "|---|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if not seg else "")]
    for key, c in condition_rows(result):
        row = (f"| {key} | {_fmt(c['target_change_rate'])} | {_fmt(c['other_change_rate'])} | "
               f"{_pm(c['target_change_rate_mean'], c['target_change_rate_std'])} | "
               f"{_pm(c['other_change_rate_mean'], c['other_change_rate_std'])} |")
        if not seg:
            row += (f" {_fmt(c['p_drop_target'])} | {_fmt(c['p_drop_other'])} | {_fmt(c['accuracy_drop_target'])} | "
                    f"{_fmt(c['accuracy_drop_other'])} |")
        out.append(row)
    out += ["", "## Per class", ""]
    runs = [k for k, c in condition_rows(result) if c.get("kind") == "atom" and "@" not in k]
    for key in runs + [k for k in ("random_atom", "random_direction") if k in result]:
        control = (result.get(f"{key}/random_direction") or result.get("random_direction") or {}) if key in runs else {}
        ctl = control.get("per_class", {})
        out += [f"### {key}", "", "| class | target | other | random direction target | n target | n other | atom | F1 |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for cls, v in result[key]["per_class"].items():
            if v.get("features"):  # a group of atoms edited together (--features-per-class)
                atom = ", ".join(f"{f['atom']}{' (−)' if f['sign'] < 0 else ''}" for f in v["features"])
            else:
                atom = (",".join(map(str, v["atoms"])) or "–") if "atoms" in v else v.get("atom", "–")
                if "sign" in v and v.get("sign", 1) < 0:
                    atom = f"{atom} (−)"
            out.append(f"| {cls} | {_fmt(v['target_change_rate'])} | {_fmt(v['other_change_rate'])} | "
                       f"{_fmt(ctl.get(cls, {}).get('target_change_rate'))} | "
                       f"{v['n_target']} | {v['n_other']} | {atom} | {_fmt(v.get('f1'))} |")
        out.append("")
    if seg and s.get("examples"):
        out += ["![before/after segmentation maps](segmentation_maps.png)", ""]
    out += ["![target vs other change rate](change_rates.png)", ""]
    return "\n".join(out)


def _comparison_markdown(result: dict) -> list[str]:
    rows = control_comparison(result)
    if not rows:
        return []
    out = ["## Does each atom beat its controls?", "",
           f"Per-class means at the headline strength. An atom **beats its control** when its target change rate "
           f"is at least {BEATS_FACTOR:g}× its random direction's and at least {MIN_TARGET:g}.", "",
           "| run | atom target | atom other | random direction target | random atom target | "
           "atom ÷ random direction | target − other | beats its control |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        verdict = {True: "**yes**", False: "no", None: "–"}[r["beats_control"]]
        ratio = "–" if r["ratio_to_random_direction"] is None else f"{r['ratio_to_random_direction']:.2f}×"
        out.append(f"| {r['run']} | {_fmt(r['target'])} | {_fmt(r['other'])} | {_fmt(r['random_direction_target'])} | "
                   f"{_fmt(r['random_atom_target'])} | {ratio} | {_fmt(r['target_minus_other'])} | {verdict} |")
    return out + [""]


def _sweep_markdown(result: dict) -> list[str]:
    strengths = result["setup"].get("strengths") or []
    runs = [r["run"] for r in control_comparison(result)]
    if len(strengths) < 2 or not runs:
        return []
    out = ["## Strength sweep", "", "Target change rate (per-class mean) of each run's atom and controls, and the "
           "atom's other change rate, at every strength.", "",
           "| strength | " + " | ".join(f"{r} atom target | {r} atom other | {r} random direction | {r} random atom"
                                     for r in runs) + " |",
           "|---:|" + "---:|" * (4 * len(runs))]
    for st in strengths:
        cells = []
        for r in runs:
            pts = [(result.get(k) or {}).get("by_strength", {}).get(f"{st:g}", {})
                   for k in (r, f"{r}/random_direction", f"{r}/random_atom")]
            pts = [pts[0], pts[1] or (result.get("random_direction") or {}).get("by_strength", {}).get(f"{st:g}", {}),
                   pts[2] or (result.get("random_atom") or {}).get("by_strength", {}).get(f"{st:g}", {})]
            cells += [_fmt(pts[0].get("target_change_rate_mean")), _fmt(pts[0].get("other_change_rate_mean")),
                      _fmt(pts[1].get("target_change_rate_mean")), _fmt(pts[2].get("target_change_rate_mean"))]
        mark = " (headline)" if st == result["setup"]["strength"] else ""
        out.append(f"| {st:g}{mark} | " + " | ".join(cells) + " |")
    return out + ["", "![target change rate against strength](strength_sweep.png)", ""]


def plot_sweep(result: dict, path: Path) -> None:
    """Target change rate (per-class mean) against strength: per run its atom (solid), random direction
    (dashed) and random atom (dotted), the control ceiling and the headline strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["setup"]
    strengths = s["strengths"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(control_comparison(result)):
        name = r["run"]
        for key, style, label in ((name, "-", "atom"), (f"{name}/random_direction", "--", "random direction"),
                                  (f"{name}/random_atom", ":", "random atom")):
            cond = result.get(key) or result.get(key.split("/")[-1]) or {}
            ys = [cond.get("by_strength", {}).get(f"{st:g}", {}).get("target_change_rate_mean") for st in strengths]
            ax.plot(strengths, [np.nan if y is None else y for y in ys], style, marker="o", color=colors[i % len(colors)],
                    label=f"{name}: {label}")
    ax.axhline(s.get("control_ceiling", 0.1), color="#999", linewidth=1)
    ax.axvline(s["strength"], color="#c0392b", linewidth=1, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(strengths, [f"{v:g}" for v in strengths])
    ax.set_xlabel("edit strength (× the atom's max activation)")
    ax.set_ylabel("target change rate (mean over classes)")
    ax.set_ylim(0, 1)
    ax.set_title("Atoms against their controls; red line: headline strength", fontsize=9, loc="left")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_rates(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, c) for k, c in condition_rows(result) if "@" not in k]
    keys = {k for k, _ in rows}  # with several runs the plain control keys repeat the first run's
    rows = [(k, c) for k, c in rows if not any(f"{r}/{k}" in keys for r in result["setup"].get("runs", {}))]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 3.6))
    x = np.arange(len(rows))
    t = [c["target_change_rate"] or 0 for _, c in rows]
    o = [c["other_change_rate"] or 0 for _, c in rows]
    ts = [c["target_change_rate_std"] or 0 for _, c in rows]
    os_ = [c["other_change_rate_std"] or 0 for _, c in rows]
    ax.bar(x - 0.2, t, 0.4, yerr=ts, label="target", color="#c0392b", capsize=3)
    ax.bar(x + 0.2, o, 0.4, yerr=os_, label="other", color="#7f8c8d", capsize=3)
    ax.set_xticks(x, [k for k, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("change rate (pooled, ± std\nover classes)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{result['setup']['task']}: target vs other change rate")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_maps(result: dict, examples: list, model: VisionModel, source: ImageSource, path: Path) -> None:
    """One row per example: the image, the patch labels, the probe before, and after each run's edit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not examples:
        return
    runs = [k for k, c in condition_rows(result) if c.get("kind") == "atom"]
    cols = ["image", "labels", "before"] + [f"after {r}" for r in runs] + ["after random_direction"]
    n_classes = len(result["setup"]["class_names"])
    g = int(round(np.sqrt(len(examples[0].labels))))
    cmap = plt.get_cmap("tab20", max(n_classes, 2))
    fig, axes = plt.subplots(len(examples), len(cols), figsize=(1.7 * len(cols), 1.8 * len(examples)), squeeze=False)
    transform = getattr(model, "transform", None)
    for row, e in zip(axes, examples):
        image = source.load(e.image_id)
        row[0].imshow(transform.resize(image) if transform is not None else image)
        maps = [e.labels, e.before] + [e.after.get(r) for r in runs] + [e.after.get("random_direction")]
        for ax, m in zip(row[1:], maps):
            if m is not None:
                ax.imshow(np.where(m < 0, np.nan, m).reshape(g, g), cmap=cmap, vmin=0, vmax=max(n_classes - 1, 1),
                          interpolation="nearest")
        row[0].set_ylabel(f"#{e.image_id}\nedit {result['setup']['class_names'][e.cls]}", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], cols):
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def write_report(out: str | Path, protocol_output: dict, model: VisionModel, source: ImageSource) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = protocol_output["json"]
    atomic_write_json(out / "intervene.json", result)
    plot_rates(result, out / "change_rates.png")
    if len(result["setup"].get("strengths") or []) > 1:
        plot_sweep(result, out / "strength_sweep.png")
    if protocol_output.get("examples"):
        plot_maps(result, protocol_output["examples"], model, source, out / "segmentation_maps.png")
    atomic_write_bytes(out / "report.md", markdown(result).encode())
    return out
