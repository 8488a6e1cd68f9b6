"""Write a scorecard: ``scorecard.json``, ``scorecard.md`` (one table, measures x runs) and ``scorecard.png``.

The plot puts every measure on one row and every learner as one marker on it, so which learner leads
on what reads at a glance; measures where lower is better are drawn flipped (1 − value, or the
fraction of atoms in a near-duplicate pair), so right is always better.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..io import atomic_write_bytes, atomic_write_json
from .report import jsonable

ARROWS = {"higher": "↑", "lower": "↓", None: ""}
INTEGER_MEASURES = ("near_duplicate_pairs",)


def _fmt(key: str, v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if key in INTEGER_MEASURES:
        return str(int(v))
    if key == "intervention_ratio":
        return f"{v:.2f}×"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _best(card: dict, key: str, better: str | None) -> set[str]:
    vals = {n: r.get(key) for n, r in card["runs"].items()}
    vals = {n: v for n, v in vals.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if better is None or len(vals) < 2:
        return set()
    target = max(vals.values()) if better == "higher" else min(vals.values())
    return {n for n, v in vals.items() if v == target}


def table_markdown(card: dict) -> str:
    """The measures x runs table, the best value of each measure in bold (ties: all bold)."""
    names = list(card["runs"])
    lines = ["| measure | better | " + " | ".join(names) + " |", "|---|:-:|" + "---:|" * len(names)]
    for m in card["measures"]:
        key = m["key"]
        if all(card["runs"][n].get(key) is None for n in names):
            continue
        best = _best(card, key, m["better"])
        cells = [(f"**{_fmt(key, card['runs'][n].get(key))}**" if n in best else _fmt(key, card["runs"][n].get(key)))
                 for n in names]
        lines.append(f"| {m['label']} | {ARROWS[m['better']]} | " + " | ".join(cells) + " |")
    if any("intervention_beats_control" in card["runs"][n] for n in names):
        verdict = {True: "yes", False: "no", None: "—"}
        lines.append("| intervention: beats its control (≥ 2× and ≥ 0.3) | | "
                     + " | ".join(verdict[card["runs"][n].get("intervention_beats_control")] for n in names) + " |")
    return "\n".join(lines) + "\n"


def markdown(card: dict) -> str:
    s = card["setup"]
    out = ["# vitatlas scorecard", "",
           f"Every run scored on the same {s['n_images']} images ({s['n_rows']} rows; a fixed sample, seed "
           f"{s['seed']}, of the store's {s['store_images']} images, every row of each) of `{s['store']}`. "
           "Best value per measure in bold; definitions: docs/scorecard.md.", "", table_markdown(card)]
    iv = s.get("intervention")
    if iv:
        met = "" if iv.get("headline_rule_met", True) else " (the rule was not met: the smallest strength is used)"
        m = int(iv.get("features_per_class") or 1)
        edited = "one atom per class (the best F1 for its patches)" if m == 1 else \
            f"{m} atoms per class edited together (the best F1 for its patches; controls: {m} random atoms, a random " \
            "direction of the group's size)"
        out += [f"Intervention rows: segmentation protocol on {iv.get('n_held_out_images')} held-out images of "
                f"`{iv.get('data')}`, {edited}, per-class means at the headline strength "
                f"{iv.get('headline_strength'):g} × the atom's max ({iv.get('headline_rule')}{met}); sweep "
                f"{iv.get('strengths')}.", ""]
    else:
        out += ["No intervention rows: give --model, --probe and --data (or --intervene-from) to measure them.", ""]
    out += ["![each learner against the others, one row per measure](scorecard.png)", ""]
    return "\n".join(out)


def _plot_value(key: str, better: str | None, run: dict) -> float | None:
    """The value drawn for ``key``: in [0, 1] where possible, flipped so that right is better."""
    v = run.get(key)
    if key == "near_duplicate_pairs":
        v, better = run.get("near_duplicate_atoms"), "lower"
    if key in ("l0", "intervention_ratio") or v is None or not math.isfinite(v):
        return None
    return 1.0 - v if better == "lower" else v


def plot(card: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for m in card["measures"]:
        vals = {n: _plot_value(m["key"], m["better"], r) for n, r in card["runs"].items()}
        if any(v is not None for v in vals.values()):
            label = m["label"] if m["better"] != "lower" else f"1 − {m['label']}"
            if m["key"] == "near_duplicate_pairs":
                label = "1 − atoms in a near-duplicate pair"
            rows.append((label, vals))
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "oDs^vP*Xh"
    names = list(card["runs"])
    for i, name in enumerate(names):
        ys = [len(rows) - 1 - j for j, (_, vals) in enumerate(rows) if vals[name] is not None]
        xs = [vals[name] for _, vals in rows if vals[name] is not None]
        ax.scatter(xs, [y + (i - (len(names) - 1) / 2) * 0.12 for y in ys], s=46, marker=markers[i % len(markers)],
                   color=colors[i % len(colors)], label=name, zorder=3)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows][::-1], fontsize=8)
    lo = min([0.0] + [v for _, vals in rows for v in vals.values() if v is not None])
    ax.set_xlim(lo - 0.03, 1.03)
    ax.grid(axis="x", alpha=0.3)
    for y in range(len(rows)):
        ax.axhline(y, color="#eee", linewidth=0.8, zorder=0)
    ax.set_xlabel("right is better (lower-is-better measures as 1 − value)", fontsize=9)
    ax.set_title("Scorecard: each learner against the others", fontsize=10, loc="left")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.04), ncol=min(4, len(names)), frameon=False)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_scorecard(out: str | Path, card: dict) -> Path:
    """scorecard.json (setup, measures, per-run values and each run's full evaluation), scorecard.md and
    scorecard.png into ``out``; returns scorecard.md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "scorecard.json", jsonable(card))
    plot(card, out / "scorecard.png")
    path = out / "scorecard.md"
    atomic_write_bytes(path, markdown(card).encode())
    return path
