"""Write an evaluation report: metrics.json, per-atom JSON, report.md and PNG plots.

Layout of a report directory::

    metrics.json          one object per evaluated run or baseline (DESIGN.md metric names)
    atoms/<name>.json     per-atom results (frequency, label, faithfulness, specificity, top rows)
    report.md             side-by-side table, metric definitions, data and settings
    pareto.png            explained_variance and signal_recovered against l0: a curve per learner over k
    frequency.png         atom firing-frequency histograms
    top_images.png        top images of the most specific atoms (only when the store's images open)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes, atomic_write_json

TABLE_COLUMNS = ["signal_recovered", "explained_variance", "mse", "l0", "dead_fraction", "dense_fraction",
                 "max_coherence", "near_duplicate_pairs", "faithfulness", "specificity", "n_confident_atoms",
                 "label_diversity", "spatial_coherence", "sparse_probe_acc@1",
                 "sparse_probe_acc@5", "sparse_probe_acc@20", "probe_acc_original", "probe_acc_reconstructed",
                 "probe_acc_with_error"]

FORMULAS = """\
Notation: x is one row of the store, x̂ = decode(encode(x)) its reconstruction, n rows, d the width, A atoms.

- `signal_recovered` = 1 − mean over rows with ‖x‖ > 0 of ‖x − x̂‖ / ‖x‖.
- `explained_variance` = 1 − Σ‖x − x̂‖² / Σ‖x − mean‖² (mean of the evaluated rows; FVU = 1 − this).
- `mse` = Σ‖x − x̂‖² / (n·d).
- `l0` = mean number of non-zero codes per row (metrics.json also has `l0_median`; the baselines are fitted
  at the first run's median, rounded, unless `--k` is given).
- `dead_fraction` = fraction of atoms never non-zero on the evaluated rows; `dense_fraction` = fraction of
  atoms non-zero on more than 1% of the rows.
- `max_coherence` = max over atom pairs i ≠ j of |cos(a_i, a_j)|; `near_duplicate_pairs` = pairs with
  |cos| > 0.9 (metrics.json also has `near_duplicate_atoms`, the fraction of atoms in such a pair).
- Atom labels: an atom's image activation = the max over the image's evaluated rows of its activation
  ({activation_note}). T_a = the {label_images} images with the largest image activation among the images
  where atom a fires (labelled images only); p_a(c) = fraction of T_a in class c, π_c = class frequency
  over the images. Label l_a = argmax_c p_a(c) − π_c; an atom is labelled when |T_a| ≥ {min_support}.
  The atom cards use the same definition (docs/scorecard.md).
- `faithfulness` = mean over labelled atoms of AUROC over images of (image activation of a, "image has
  class l_a"); for a CLS store an image is one row.
- `specificity` = mean over labelled atoms of κ_a · s_a, with κ_a = (p_a(l_a) − π_l)/(1 − π_l) (chance-
  corrected precision of the top images) and s_a = 1 − (m_l − 1)/M (m_l atoms share label l among M
  labelled atoms). `n_confident_atoms` = labelled atoms with κ_a > 0.5.
- `spatial_coherence` (patch stores) = mean over atoms of the mean Moran's I (queen contiguity, 8
  neighbours) of the atom's activation map on the patch grid, over the images with every patch evaluated
  where it fires on at least 4 patches and at most 90% of them (docs/scorecard.md).
- `label_diversity` = distinct labels among labelled atoms / min(number of classes, M).
- `sparse_probe_acc@m`: per class, one-vs-rest logistic regression on the m atoms with the largest
  (mean activation in class − mean activation outside) on the train images; balanced accuracy on the
  test images ({test_pct}% of the images, seed {seed}), averaged over classes (chance = 0.5).
- `probe_acc_*`: a multinomial logistic regression trained on the original activations of the train images
  (mean of an image's rows), accuracy on the test images' original activations, reconstructions, and
  reconstruction + error term (checked equal to the original on every run).
"""


@dataclass
class RunResult:
    """One evaluated dictionary: its name, metrics and where it came from."""

    name: str
    metrics: dict
    kind: str
    path: str | None = None
    baseline: bool = False
    config: dict = field(default_factory=dict)
    fit_info: dict = field(default_factory=dict)
    curve: str | None = None  # trade-off curve to join; default: the name without its k / l1 token


def jsonable(value):
    """numpy / torch / NaN -> plain JSON (NaN and Inf become null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # torch tensors
        return jsonable(value.tolist())
    return value


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


_SPARSITY_TOKEN = re.compile(r"(^|[-_])(k\d+|l1_[0-9.e+-]+?)(?=$|-n\d|[-_][a-z])")


def curve_name(result: RunResult) -> str:
    """The trade-off curve a run belongs to: its name without the sparsity token (``topk-k32-n1536`` ->
    ``topk-n1536``, ``dbksvd-k8`` -> ``dbksvd``), so runs that differ only in k (or l1) join one curve."""
    if result.curve:
        return result.curve
    return _SPARSITY_TOKEN.sub("", result.name).strip("-_") or result.kind


def _pareto(out: Path, results: list[RunResult], plt) -> str:
    """explained_variance and signal_recovered against l0: one line per learner over its runs at several k,
    baselines as reference markers, labels in a legend (never printed over each other)."""
    from matplotlib.ticker import FuncFormatter

    metrics = [("explained_variance", "explained_variance"), ("signal_recovered", "signal_recovered")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    curves: dict[tuple[bool, str], list[RunResult]] = {}
    for r in results:
        if r.metrics.get("l0") is not None:
            curves.setdefault((r.baseline, curve_name(r)), []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    baseline_markers = iter("sD^vP*Xph" * 3)
    style = {}
    for i, (baseline, name) in enumerate(sorted(curves, key=lambda c: (c[0], c[1]))):
        style[(baseline, name)] = (colors[i % len(colors)], next(baseline_markers) if baseline else "o")
    for ax, (key, label) in zip(axes, metrics):
        values = [r.metrics.get(key) for rs in curves.values() for r in rs]
        values = [v for v in values if v is not None and math.isfinite(v)]
        # a very negative floor (e.g. random atoms) would squash everything else: clip it to the bottom edge
        floor = min([v for v in values if v >= -0.2] + [0.0]) - 0.05
        for (baseline, name), rs in sorted(curves.items(), key=lambda c: (c[0][0], c[0][1])):
            pts = sorted((max(float(r.metrics["l0"]), 1e-3), r.metrics.get(key)) for r in rs
                         if r.metrics.get(key) is not None and math.isfinite(r.metrics.get(key)))
            if not pts:
                continue
            color, marker = style[(baseline, name)]
            xs, ys = [x for x, _ in pts], [max(y, floor) for _, y in pts]
            off = [y for _, y in pts if y < floor]
            legend = f"{name} (baseline)" if baseline else name
            if off:
                legend += f" ({key} {min(off):.2f}, off scale)"
            ax.plot(xs, ys, linestyle="--" if baseline else "-", marker=marker, color=color,
                    markersize=7 if baseline else 5, linewidth=1.2 if baseline else 2, label=legend,
                    alpha=0.85 if baseline else 1.0)
        if values:
            ax.set_ylim(floor - 0.03, max(1.0, max(values)) + 0.02)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 2, not 2×10⁰
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(int(v))[0] in "25" else ""))
        ax.set_xlabel("l0 (non-zeros per row, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("Reconstruction against sparsity", fontsize=10, loc="left")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(labels) - 1) // 4), 1, 1))
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    return "pareto.png"


def _plots(out: Path, results: list[RunResult]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [_pareto(out, results, plt)]

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results:
        h = r.metrics.get("frequency_histogram")
        if not h:
            continue
        edges = np.asarray(h["edges"])
        ax.stairs(h["counts"], edges, label=f"{r.name} ({h['n_dead']} dead)")
    ax.set_xscale("log")
    ax.set_xlabel("atom firing frequency (fraction of rows)")
    ax.set_ylabel("atoms")
    ax.set_title("Atom frequency histogram")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frequency.png", dpi=110)
    plt.close(fig)
    written.append("frequency.png")
    return written


def _top_images(out: Path, results: list[RunResult], store, n_atoms: int = 6, n_images: int = 6) -> str:
    """Grid of the top images of each run's most specific atoms; returns a note for the report."""
    if store is None:
        return "skipped: the data was not an activation store."
    spec = (store.manifest.get("source") or {}).get("spec")
    if not spec:
        return "skipped: the store does not record an image source (e.g. it was built from an array)."
    try:
        from ..data.sources import open_source

        source = open_source(spec)
    except Exception as exc:  # any failure to reach the images only costs the grid
        return f"skipped: the image source {spec!r} could not be opened ({type(exc).__name__}: {exc})."
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if not r.baseline and "specificity" in r.metrics.get("_atoms", {})] or \
        [r for r in results if "specificity" in r.metrics.get("_atoms", {})]
    if not runs:
        return "skipped: no run has labelled atoms."
    index = store.index
    rows = []
    for r in runs:
        atoms = r.metrics["_atoms"]
        spec_a = np.nan_to_num(np.asarray(atoms["specificity"], dtype=float), nan=-1.0)
        for a in np.argsort(-spec_a, kind="stable")[:n_atoms]:
            if spec_a[a] < 0:
                break
            imgs = []
            for row in atoms["top_rows"][a]:
                if row < 0:
                    break
                img = int(index[row, 0])
                if img not in imgs:
                    imgs.append(img)
                if len(imgs) == n_images:
                    break
            names = atoms.get("label_name")
            label = names[a] if names and names[a] else str(int(atoms["label"][a]))
            rows.append((r.name, int(a), float(spec_a[a]), label, imgs))
    if not rows:
        return "skipped: no labelled atoms to show."
    fig, axes = plt.subplots(len(rows), n_images, figsize=(1.6 * n_images, 1.7 * len(rows)), squeeze=False)
    try:
        for i, (name, a, s, label, imgs) in enumerate(rows):
            for j in range(n_images):
                ax = axes[i][j]
                ax.axis("off")
                if j < len(imgs):
                    ax.imshow(source.image(imgs[j]), cmap="gray")
            axes[i][0].set_title(f"{name} atom {a}: {label} (specificity {s:.2f})", fontsize=7, loc="left")
        fig.tight_layout()
        fig.savefig(out / "top_images.png", dpi=90)
    except Exception as exc:
        return f"skipped: reading images from {spec!r} failed ({type(exc).__name__}: {exc})."
    finally:
        plt.close(fig)
    return "![top images](top_images.png)\n\nRows: the most specific atoms of each run; columns: their top images."


def write_report(out: str | Path, results: list[RunResult], *, store=None, data: dict | None = None,
                 notes: list[str] | None = None) -> Path:
    """Write metrics.json, atoms/*.json, PNG plots and report.md into ``out``; return report.md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = data or {}
    summary = []
    for r in results:
        m = {k: v for k, v in r.metrics.items() if not k.startswith("_") and k != "atoms"}
        atoms = r.metrics.get("atoms") or r.metrics.get("_atoms")
        if atoms is not None:
            r.metrics["_atoms"] = atoms
            atomic_write_json(out / "atoms" / f"{safe_name(r.name)}.json", jsonable(atoms))
        summary.append(jsonable({"name": r.name, "kind": r.kind, "baseline": r.baseline, "path": r.path,
                                 **m, "config": r.config, "fit_info": r.fit_info}))
    atomic_write_json(out / "metrics.json", summary)
    plots = _plots(out, results)
    (out / "top_images.png").unlink(missing_ok=True)  # never leave a grid from an older report
    grid_note = _top_images(out, results, store)

    settings = next((r.metrics.get("settings", {}) for r in results), {})
    lines = ["# vitatlas evaluation report", "", "## Results", ""]
    head = ["run", "kind", "n_atoms"] + TABLE_COLUMNS
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in results:
        name = f"{r.name} (baseline)" if r.baseline else r.name
        cells = [name, r.kind, _fmt(r.metrics.get("n_atoms"))] + [_fmt(r.metrics.get(c)) for c in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "— = not available (no labels, or not defined for this dictionary).", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Plots", "", "![explained variance and signal recovered against l0, one curve per learner](pareto.png)", "",
              "![atom frequency histogram](frequency.png)", "", "## Top images", "", grid_note, "",
              "## Metric definitions", "",
              FORMULAS.format(label_images=settings.get("label_images", "?"),
                              min_support=settings.get("min_support", "?"),
                              test_pct=round(100 * settings.get("test_fraction", 0.25)),
                              seed=settings.get("seed", 0),
                              activation_note="absolute value of the code" if settings.get("activation", "abs") == "abs"
                              else "here the signed code value"),
              "## Data and settings", ""]
    for k, v in data.items():
        lines.append(f"- {k}: {_fmt(v) if not isinstance(v, (dict, list)) else jsonable(v)}")
    lines.append(f"- evaluation settings: {jsonable(settings)}")
    lines += ["", "### Runs", ""]
    for r in results:
        lines.append(f"- **{r.name}** ({r.kind}{', baseline' if r.baseline else ''}){': ' + r.path if r.path else ''}")
        lines.append(f"  - config: `{jsonable(r.config)}`")
        if r.fit_info:
            lines.append(f"  - fitted on: `{jsonable(r.fit_info)}`")
    lines += ["", f"Files: metrics.json, atoms/*.json, {', '.join(plots)}"
              + (", top_images.png" if (out / 'top_images.png').exists() else "") + "."]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
