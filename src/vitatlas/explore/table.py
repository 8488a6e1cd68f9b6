"""The atom table: one summary row per atom, sorted, filtered and paginated on the server.

Columns are numpy arrays built once, so a query over 16,384 atoms is a few vectorised operations and
the page only ever receives ``limit`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cards import _num, best_description, best_label

# sort key -> column; text columns sort case-insensitively, numbers with NaN last in both directions
SORT_KEYS = ("id", "frequency", "max_activation", "mean_activation", "label", "precision", "kappa",
             "faithfulness", "description", "score", "match_cosine")
NUMERIC_FILTERS = ("min_frequency", "max_frequency", "min_max_activation", "min_kappa", "min_faithfulness")
MAX_LIMIT = 500


@dataclass
class Query:
    sort: str = "id"
    descending: bool = False
    q: str = ""
    label: str | None = None
    offset: int = 0
    limit: int = 50
    min_frequency: float | None = None
    max_frequency: float | None = None
    min_max_activation: float | None = None
    min_kappa: float | None = None
    min_faithfulness: float | None = None


class AtomTable:
    """Summary rows of one run's atoms (plus, with two runs, each atom's best match in the other)."""

    def __init__(self, atoms: list[dict], match: tuple[np.ndarray, np.ndarray] | None = None):
        self.rows = [summary_row(a) for a in atoms]
        n = len(self.rows)
        if match is not None:
            for row, m, c in zip(self.rows, match[0], match[1]):
                row["match"], row["match_cosine"] = int(m), round(float(c), 4)
        self.columns = {}
        for key in SORT_KEYS:
            values = [r.get(key) for r in self.rows]
            if key in ("label", "description"):
                self.columns[key] = np.array([(v or "").lower() for v in values], dtype=object)
            else:
                self.columns[key] = np.array([_num(v) for v in values], dtype=np.float64) if n else np.zeros(0)
        self._search = np.array([f"#{r['id']} {r.get('label') or ''} {r.get('description') or ''}".lower()
                                 for r in self.rows], dtype=object)
        self.labels = sorted({r["label"] for r in self.rows if r.get("label")})

    def __len__(self) -> int:
        return len(self.rows)

    def query(self, query: Query) -> dict:
        """{"total": matching atoms, "offset", "limit", "rows": the page}."""
        keep = np.ones(len(self.rows), dtype=bool)
        if query.q:
            needle = query.q.lower().strip()
            if needle.isdigit():  # an atom id typed in the search box finds that atom too
                keep &= (self.columns["id"] == int(needle)) | np.fromiter(
                    (needle in s for s in self._search), bool, len(self._search))
            else:
                keep &= np.fromiter((needle in s for s in self._search), bool, len(self._search))
        if query.label:
            keep &= self.columns["label"] == query.label.lower()
        for name, column, lower in (("min_frequency", "frequency", True), ("max_frequency", "frequency", False),
                                    ("min_max_activation", "max_activation", True), ("min_kappa", "kappa", True),
                                    ("min_faithfulness", "faithfulness", True)):
            bound = getattr(query, name)
            if bound is not None:
                col = self.columns[column]
                with np.errstate(invalid="ignore"):
                    keep &= (col >= bound) if lower else (col <= bound)
        idx = np.flatnonzero(keep)
        order = self._order(idx, query.sort, query.descending)
        page = order[query.offset:query.offset + query.limit]
        return {"total": int(idx.size), "offset": query.offset, "limit": query.limit,
                "rows": [self.rows[i] for i in page]}

    def _order(self, idx: np.ndarray, key: str, descending: bool) -> np.ndarray:
        """``idx`` sorted by column ``key``; atoms without a value go last, ties keep ascending ids."""
        col = self.columns[key][idx]
        missing = (col == "") if col.dtype == object else np.isnan(col)
        present = np.flatnonzero(~missing)
        values = col[present]
        order = np.argsort(-_dense_rank(values) if descending else values, kind="stable")
        return np.concatenate([idx[present[order]], idx[np.flatnonzero(missing)]]).astype(np.int64)


def _dense_rank(col: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(col, return_inverse=True)
    return inverse.astype(np.int64)


def summary_row(atom: dict) -> dict:
    """The table's view of one atom card."""
    label = best_label(atom) or {}
    desc = best_description(atom) or {}
    return {
        "id": int(atom["id"]),
        "frequency": _round(atom.get("frequency")),
        "max_activation": _round(atom.get("max_activation")),
        "mean_activation": _round(atom.get("mean_activation")),
        "label": label.get("label"),
        "precision": _round(label.get("precision")),
        "kappa": _round(label.get("kappa")),
        "faithfulness": _round(label.get("faithfulness")),
        "description": desc.get("text"),
        "description_kind": desc.get("kind"),
        "score": _round(desc.get("score")),
        "top_image": next((t.get("image") for t in atom.get("top_images") or [] if isinstance(t, dict)), None),
    }


def _round(value, digits: int = 5):
    v = _num(value)
    return None if np.isnan(v) else float(f"{v:.{digits}g}")
