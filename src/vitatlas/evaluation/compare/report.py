"""Write a ``Comparison``: compare.json, report.md, the score plot and the top-image grids.

report.md lists, for each side, its most shared atoms (highest best-match score above the null) and
its most unique ones (testable atoms with the lowest best score: nothing on the other side behaves like
them), each with its top images and their classes from the store, and — when atom cards are given —
the card's label and a link to its card image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import VitatlasError
from ...io import atomic_write_json
from .api import Comparison

N_LISTED = 10      # atoms per table of report.md
N_GRID_ATOMS = 4   # rows per side in the image grids
N_GRID_IMAGES = 5


def load_cards(path: str | os.PathLike | None, n_atoms: int, run: str):
    """The atoms.jsonl records of a cards directory made for a run of ``n_atoms`` atoms, or None."""
    if path is None:
        return None
    from ...interpret.cards import AtomCards

    cards = AtomCards.load(path)
    if cards.n_atoms != n_atoms:
        raise VitatlasError(f"the cards in {path} describe {cards.n_atoms} atoms but run {run} has {n_atoms}: pass "
                            "the cards made for this run")
    return {"path": Path(path), "atoms": cards.atoms}


def _card_label(cards, atom: int) -> str:
    if cards is None:
        return ""
    rec = cards["atoms"][atom]
    labels = rec.get("labels") or []
    text = ""
    if labels and isinstance(labels[0], dict) and labels[0].get("label") is not None:
        kappa = labels[0].get("kappa")
        text = f"{labels[0]['label']}" + (f" (κ {kappa:.2f})" if isinstance(kappa, (int, float)) else "")
    descs = [d for d in (rec.get("descriptions") or []) if isinstance(d, dict) and d.get("text")]
    if descs and descs[0]["text"] not in text:
        text = f"{text} · {descs[0]['text']}" if text else str(descs[0]["text"])
    return text


def _card_link(cards, atom: int, out: Path) -> str:
    if cards is None:
        return ""
    for ext in ("png", "webp"):
        p = cards["path"] / "cards" / f"atom-{atom:05d}.{ext}"
        if p.is_file():
            return f"[card]({os.path.relpath(p.resolve(), out.resolve())})"
    return ""


def _images_text(c: Comparison, side: int, atom: int) -> str:
    parts = []
    for img, _ in c.top_images(side, atom):
        lab = c.label_of(img)
        parts.append(f"#{img}" + (f" {lab}" if lab else ""))
    return ", ".join(parts)


def _class_mix(c: Comparison, side: int, atom: int, n: int = 10) -> str:
    """The most common class among the atom's top ``n`` images, with its share."""
    labs = [c.label_of(img) for img, _ in c.top_images(side, atom, n)]
    labs = [lab for lab in labs if lab is not None]
    if not labs:
        return ""
    names, counts = np.unique(labs, return_counts=True)
    i = int(counts.argmax())
    return f"{names[i]} {counts[i]}/{len(labs)}"


def shared_atoms(c: Comparison, side: int, n: int = N_LISTED) -> np.ndarray:
    score = np.nan_to_num(c.matches[side].score, nan=-1.0)
    order = np.argsort(-score, kind="stable")
    return np.array([i for i in order if c.shared(side)[i]][:n], dtype=np.int64)


def unique_atoms(c: Comparison, side: int, n: int = N_LISTED) -> np.ndarray:
    score = c.matches[side].score
    tested = np.flatnonzero(np.isfinite(score))
    order = tested[np.argsort(score[tested], kind="stable")]
    return order[:n]


def _table(c: Comparison, side: int, atoms: np.ndarray, cards: tuple, out: Path) -> list[str]:
    me, other = c.names[side], c.names[1 - side]
    head = f"| {me} atom | best match in {other} | score | r | mutual | top images (class) | top-10 class |"
    with_cards = cards[side] is not None or cards[1 - side] is not None
    rows = ([head + f" {me} card | {other} card |", "|---:|---:|---:|---:|:-:|---|---|---|---|"] if with_cards
            else [head, "|---:|---:|---:|---:|:-:|---|---|"])
    mut = c.mutual(side)
    m = c.matches[side]
    for a in atoms:
        j = int(m.match[a])
        row = (f"| {a} | {j} | {m.score[a]:.3f} | {m.correlation[a]:+.3f} | {'yes' if mut[a] else ''} | "
               f"{_images_text(c, side, int(a))} | {_class_mix(c, side, int(a))} |")
        if with_cards:
            row += (f" {_card_label(cards[side], int(a))} {_card_link(cards[side], int(a), out)} |"
                    f" {_card_label(cards[1 - side], j)} {_card_link(cards[1 - side], j, out)} |")
        rows.append(row)
    if not len(atoms):
        rows.append("| – | | | | | none | |")
    return rows


def plot_scores(c: Comparison, path: Path) -> None:
    """Per side: the best-match scores against the null's (shuffled images), with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=False)
    bins = np.linspace(0, 1, 41)
    for side, ax in enumerate(axes):
        me, other = c.names[side], c.names[1 - side]
        s, nl = c.matches[side].score, c.null[side].ravel()
        ax.hist(s[np.isfinite(s)], bins=bins, alpha=0.7, label="observed")
        # the null pools its permutations: weights keep it on the per-atom scale of the observed counts
        nl = nl[np.isfinite(nl)]
        ax.hist(nl, bins=bins, alpha=0.6, weights=np.full(nl.size, 1.0 / c.null[side].shape[0]),
                label="null (shuffled images)")
        t = c.threshold(side)
        if np.isfinite(t):
            ax.axvline(t, color="k", ls="--", lw=1, label=f"null q{c.null_quantile:g} = {t:.2f}")
        ax.set_title(f"{me}: best |r| in {other} — {c.shared(side).mean():.0%} shared", fontsize=9)
        ax.set_xlabel("best-match score |r|")
        ax.set_ylabel("atoms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid(c: Comparison, path: Path, rows: list[tuple[str, int, int | None]], title: str) -> str | None:
    """Top images per listed atom: (side name, side, atom) rows; returns None when images are unavailable."""
    spec = c.stores[0].get("source_spec") or c.stores[1].get("source_spec")
    if not spec or not rows:
        return None
    try:
        from ...data.sources import open_source

        source = open_source(spec)
    except Exception:  # no image source on this machine: the tables still list the image ids
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), N_GRID_IMAGES, figsize=(1.45 * N_GRID_IMAGES, 1.6 * len(rows)),
                             squeeze=False)
    try:
        for i, (label, side, atom) in enumerate(rows):
            imgs = c.top_images(side, atom, N_GRID_IMAGES)
            for j in range(N_GRID_IMAGES):
                ax = axes[i][j]
                ax.axis("off")
                if j < len(imgs):
                    ax.imshow(source.image(imgs[j][0]), cmap="gray")
            axes[i][0].set_title(label, fontsize=7, loc="left")
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
    except Exception:
        return None
    finally:
        plt.close(fig)
    return path.name


def write_compare(c: Comparison, out: str | os.PathLike, *, cards_a=None, cards_b=None) -> Path:
    """Write compare.json, scores.png, report.md (and image grids when the images can be read) into
    ``out``; ``cards_a`` / ``cards_b``: cards directories of the two runs (optional). Returns report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cards = (load_cards(cards_a, c.matches[0].match.size, c.names[0]),
             load_cards(cards_b, c.matches[1].match.size, c.names[1]))
    data = c.to_json()
    atomic_write_json(out / "compare.json", data)
    plot_scores(c, out / "scores.png")
    s, al = data["summary"], data["alignment"]
    a, b = c.names
    unit = ("tokens paired by image and position" if al["mode"] == "tokens"
            else f"images (each atom's {al['aggregate']} over an image's tokens)")
    lines = [f"# Compare {a} and {b}", ""]
    for key, name in (("a", a), ("b", b)):
        run, st = data[key], data[key]["store"]
        lines.append(f"- **{name}**: {run['learner']}, {run['n_atoms']} atoms ({run.get('path') or 'in memory'}); "
                     f"store {st.get('path')}: model {st.get('model')}, layer {st.get('layer')}, tokens {st.get('tokens')}")
    lines += [f"- **Matching**: by behaviour, {MEASURE_SHORT}, over {al['n_units']:,} units = {unit}, "
              f"{al['n_images']:,} images.",
              f"- **Null**: the same matching with {b}'s images shuffled (seed {c.seed}); an atom is shared when its "
              f"score beats the null's {c.null_quantile:g} quantile: {s['null_threshold_a']} for {a}, "
              f"{s['null_threshold_b']} for {b}. Atoms active on fewer than {c.min_active} units are not tested.",
              f"- **Shared**: {s['shared_a']} of {a}'s {c.matches[0].match.size} atoms "
              f"(shared_fraction_a = {s['shared_fraction_a']}; {s['testable_a']} testable), {s['shared_b']} of "
              f"{b}'s {c.matches[1].match.size} (shared_fraction_b = {s['shared_fraction_b']}; "
              f"{s['testable_b']} testable); {s['mutual_pairs']} mutual best pairs, {s['mutual_shared_pairs']} of "
              "them shared on both sides.",
              f"- **Median best score**: {a} {s['median_score_a']} (null {s['median_null_score_a']}), "
              f"{b} {s['median_score_b']} (null {s['median_null_score_b']}).",
              f"- **Decoder cosine**: {_decoder_text(c.decoder)}", "",
              "![best-match scores against the null](scores.png)", ""]
    for side in (0, 1):
        me = c.names[side]
        sh, un = shared_atoms(c, side), unique_atoms(c, side)
        lines += [f"## Most shared atoms of {me}", "", *_table(c, side, sh, cards, out), "",
                  f"## Most unique atoms of {me}", "",
                  "Testable atoms whose best match is weakest: nothing on the other side fires like them.", "",
                  *_table(c, side, un, cards, out), ""]
    grid_rows, shown = [], set()
    for side in (0, 1):
        me, other = c.names[side], c.names[1 - side]
        # a mutual pair is shown once: B's list skips the atoms already shown as A's matches
        fresh = [int(a) for a in shared_atoms(c, side, N_LISTED) if (side, int(a)) not in shown]
        for atom in fresh[:N_GRID_ATOMS // 2]:
            j = int(c.matches[side].match[atom])
            shown.update({(side, atom), (1 - side, j)})
            grid_rows.append((f"{me} atom {atom} (shared, |r| {c.matches[side].score[atom]:.2f})", side, atom))
            grid_rows.append((f"  its match: {other} atom {j}", 1 - side, j))
    shared_png = _grid(c, out / "shared.png", grid_rows, "Most shared atoms and their matches: top images")
    uniq_rows = [(f"{c.names[side]} atom {atom} (unique, best |r| {c.matches[side].score[atom]:.2f})", side, int(atom))
                 for side in (0, 1) for atom in unique_atoms(c, side, N_GRID_ATOMS // 2)]
    unique_png = _grid(c, out / "unique.png", uniq_rows, "Most unique atoms: top images")
    if shared_png or unique_png:
        lines += ["## Top images", ""]
        lines += [f"![most shared]({shared_png})", ""] if shared_png else []
        lines += [f"![most unique]({unique_png})", ""] if unique_png else []
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


MEASURE_SHORT = "the |Pearson correlation| of two atoms' activations on the same units"


def _decoder_text(decoder: dict) -> str:
    if not decoder:
        return "not computed."
    if "refused" in decoder:
        return f"refused: {decoder['refused']}."
    return (f"same space, so also computed: median best |cos| {decoder.get('median_abs_cosine_a')}, "
            f"{decoder.get('mutual_pairs')} mutual pairs.")
