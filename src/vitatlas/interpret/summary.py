"""The most specific atoms of a set of cards, for reports (e.g. "the 12 most specific atoms per learner").

Specificity is the class-label score of ``build``: κ · s — chance-corrected precision of the atom's
top images for its label times how much the label is the atom's own (1 when no other atom shares it).
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

from .cards import AtomCards
from .layout import card_name


def most_specific_atoms(cards: AtomCards | str | os.PathLike, n: int = 12, per_label: int | None = None
                        ) -> list[dict]:
    """The ``n`` labelled atoms with the highest specificity, best first (ties: higher faithfulness,
    then lower id). ``per_label`` caps the atoms listed per class label: many atoms can reach the same
    specificity for one easy class, and a report reads better with several classes.

    Each entry: atom, label, kappa, precision, faithfulness, specificity, frequency, top_images
    (ids) and card (path of its card PNG relative to the cards directory).
    """
    if not isinstance(cards, AtomCards):
        cards = AtomCards.load(cards)
    scored = []
    for rec in cards.atoms:
        if not rec["labels"] or rec["labels"][0].get("specificity") is None:
            continue
        lab = rec["labels"][0]
        scored.append({"atom": rec["id"], "label": lab["label"], "kappa": lab["kappa"], "precision": lab["precision"],
                       "faithfulness": lab["faithfulness"], "specificity": lab["specificity"],
                       "frequency": rec["frequency"], "top_images": [t["image"] for t in rec["top_images"]],
                       "card": card_name(rec["id"])})
    scored.sort(key=lambda e: (-e["specificity"], -(e["faithfulness"] or 0.0), e["atom"]))
    if per_label is not None:
        taken: dict[str, int] = {}
        kept = []
        for e in scored:
            if taken.get(e["label"], 0) < per_label:
                taken[e["label"]] = taken.get(e["label"], 0) + 1
                kept.append(e)
        scored = kept
    return scored[:n]


def specific_atoms_markdown(cards_dir: str | os.PathLike, n: int = 12, link_prefix: str | None = None,
                            per_label: int | None = None) -> str:
    """A markdown table of ``most_specific_atoms`` with links to the cards.

    link_prefix: how the report reaches the cards directory (default: the directory's path as given).
    """
    cards_dir = Path(cards_dir)
    prefix = link_prefix if link_prefix is not None else f"{cards_dir.as_posix().rstrip('/')}/"
    rows = ["| atom | label | κ | precision | faithfulness | specificity | frequency | card |",
            "|---:|---|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v, spec=".3f": "–" if v is None else format(v, spec)  # noqa: E731
    for e in most_specific_atoms(cards_dir, n, per_label):
        rows.append(f"| {e['atom']} | {escape(e['label'])} | {fmt(e['kappa'])} | {fmt(e['precision'])} | "
                    f"{fmt(e['faithfulness'])} | {fmt(e['specificity'])} | {fmt(e['frequency'], '.2e')} | "
                    f"[card]({prefix}{e['card']}) |")
    return "\n".join(rows) + "\n"
