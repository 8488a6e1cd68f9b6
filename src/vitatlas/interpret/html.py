"""``index.html``: a plain static page listing every atom with its statistics, label and cards.

No scripts and no server: open the file in a browser. Card images load lazily, so a page of
thousands of atoms stays responsive. The explorer builds the real app on the same files.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from ..io import atomic_write_bytes
from .layout import card_name

STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:4px 8px;border-bottom:1px solid #ddd;vertical-align:top;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:480px}.note{color:#a40}"""


def _fmt(v, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def _label(side: dict) -> str:
    if not side["labels"]:
        return "–"
    lab = side["labels"][0]
    return f"{escape(lab['label'])} (κ {_fmt(lab['kappa'], '.2f')}, precision {_fmt(lab['precision'], '.2f')})"


def _cards_cell(out: Path, a: int, suffix: str) -> str:
    parts = []
    for name in (card_name(a, suffix), card_name(a, suffix + "-patches")):
        if (out / name).is_file():
            parts.append(f'<a href="{name}"><img loading="lazy" src="{name}" alt="{name}"></a>')
    return "<br>".join(parts) or "–"


def write_index(cards, out: Path) -> Path:
    meta = cards.meta
    run, store = meta.get("run", {}), meta.get("store", {})
    rows = []
    for rec in cards.atoms:
        a = rec["id"]
        near = ", ".join(f'<a href="#atom-{n["atom"]}">{n["atom"]}</a> ({n["cosine"]:.2f})'
                         for n in rec["nearest_atoms"])
        desc = "; ".join(escape(f"{d['kind']}: {d['text']}") for d in rec["descriptions"] if d["kind"] != "class")
        cells = [f'<td id="atom-{a}">{a}</td>', f"<td>{_label(rec)}{'<br>' + desc if desc else ''}</td>",
                 f'<td class="num">{_fmt(rec["frequency"], ".2e")}</td>',
                 f'<td class="num">{_fmt(rec["mean_activation"])}</td>',
                 f'<td class="num">{_fmt(rec["max_activation"])}</td>', f"<td>{near}</td>",
                 f"<td>{_cards_cell(out, a, '')}</td>"]
        if meta.get("signed"):
            neg = rec["negative"]
            cells.append(f"<td>{_label(neg)}<br>freq {_fmt(neg['frequency'], '.2e')}, max "
                         f"{_fmt(neg['max_activation'])}<br>{_cards_cell(out, a, '-negative')}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = ["atom", "class label", "frequency", "mean", "max", "nearest atoms (cosine)", "top images"]
    if meta.get("signed"):
        head.append("negative side")
    note = f'<p class="note">{escape(meta["note"])}</p>' if meta.get("note") else ""
    html = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vitatlas atoms: {escape(str(run.get('path', '')))}</title>
<style>{STYLE}</style></head><body>
<h1>Atoms of {escape(str(run.get('learner', '?')))} ({meta['n_atoms']} of {run.get('n_atoms', '?')})</h1>
<p>run <code>{escape(str(run.get('path', '')))}</code>; store <code>{escape(str(store.get('path', '')))}</code>
({escape(str(store.get('model')))}, layer {escape(str(store.get('layer')))}, tokens {escape(str(store.get('tokens')))});
top {meta['top']} images per atom ranked by the {escape(meta['rank'])} over each image's rows.
Frequency: fraction of rows where the atom fires; mean / max: of its activation where it fires.
Heatmap alpha: activation / the atom's maximum over its top images.</p>{note}
<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>
{chr(10).join(rows)}
</table></body></html>
"""
    path = out / "index.html"
    atomic_write_bytes(path, html.encode())
    return path
