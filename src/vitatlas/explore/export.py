"""Static export: the explorer as a folder of files that opens from disk or any web host.

The pages and the JS/CSS are the live site's own; instead of the JSON API they read ``data/<key>.js``
files that call ``vitatlasData(key, object)`` (a ``<script>`` tag loads from ``file://`` where
``fetch`` is refused). Everything is exported except the live intervention: the table of every
run (sorted and filtered in the browser), every atom page, the compare page, and the image pages of
the images that appear in the atoms' top lists (the most frequent ``max_images`` of them).

Files are written atomically; re-exporting into the same folder replaces them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import VitatlasError
from ..io import atomic_write_bytes
from .explorer import Explorer
from .server import PAGES, STATIC, asset, config_js, json_safe
from .table import Query

DEFAULT_MAX_IMAGES = 500
MAX_PNGS = 20_000


def _compact_atom(atom: dict) -> dict:
    """The atom page's data, smaller: heatmaps as integer percent of their maximum (the page only draws
    them as alpha), and no card PNG names (the exported pages draw the same heatmaps themselves)."""
    out = {**atom, "files": {}}
    for key in ("heatmaps", "negative_heatmaps"):
        maps = atom.get(key)
        if maps:
            scale = max((abs(v) for m in maps for v in m), default=0.0) or 1.0
            out[key] = [[int(round(100 * v / scale)) for v in m] for m in maps]
            out[key + "_scale"] = scale
    return out


def _data_file(out: Path, key: str, obj) -> None:
    payload = json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # "</" cannot end a script element inside a JSON string once escaped
    payload = payload.replace("</", "<\\/")
    # the file name is the key with the characters the page's loader also replaces (app.js loadStatic)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    atomic_write_bytes(out / "data" / f"{name}.js", f"vitatlasData({json.dumps(key)}, {payload});\n".encode())


def export_site(explorer: Explorer, out: str | Path, *, max_images: int = DEFAULT_MAX_IMAGES,
                progress: bool = True) -> Path:
    """Write the static site for ``explorer`` into ``out``; returns the path of its index.html.

    Every atom page is exported, with the PNGs of the images in the atoms' top lists (the first
    20,000 by how often they appear); image pages for the ``max_images`` most frequent of those.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VitatlasError(f"--export {out} is a file: pass a directory")
    if max_images < 0:
        raise VitatlasError(f"max_images must be >= 0, got {max_images}")
    out.mkdir(parents=True, exist_ok=True)
    for name in PAGES:
        atomic_write_bytes(out / name, asset(name))
    for name in STATIC:
        atomic_write_bytes(out / "static" / name, asset(name))
    atomic_write_bytes(out / "static" / "config.js", config_js(explorer, mode="static"))

    _data_file(out, "meta", {**explorer.meta(), "live": None})
    counts: Counter = Counter()
    total = sum(explorer.runs[n].n_atoms for n in explorer.run_names)
    bar = tqdm(total=total, desc="export atoms", unit="atom", disable=not progress)
    for name in explorer.run_names:
        run = explorer.runs[name]
        rows = run.table.query(Query(limit=len(run.table) or 1))["rows"]
        _data_file(out, f"table-{name}", {"run": name, "rows": rows})
        for a in range(run.n_atoms):
            atom = explorer.atom(name, a)
            _data_file(out, f"atom-{name}-{a}", _compact_atom(atom))
            for t in atom["card"].get("top_images") or []:
                counts[int(t["image"])] += 1
            bar.update(1)
    bar.close()
    if len(explorer.run_names) >= 2:
        _data_file(out, "compare", explorer.compare())

    images = [i for i, _ in counts.most_common() if i in explorer.images][:MAX_PNGS]
    for image_id in tqdm(images, desc="export images", unit="image", disable=not progress):
        try:
            atomic_write_bytes(out / "images" / f"{image_id}.png", explorer.image_png(image_id))
        except VitatlasError:
            pass  # the source moved: the pages show the statistics without the picture
    images = images[:max_images]
    for name in explorer.run_names:
        pages = explorer.image_pages(name, images)
        for image_id, page in tqdm(pages, total=len(images), desc=f"export image pages ({name})", unit="image",
                                   disable=not progress):
            _data_file(out, f"image-{name}-{image_id}", page)
    return out / "index.html"
