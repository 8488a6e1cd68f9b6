"""Write every atom's card PNGs and the image crops they show.

Images are loaded from the store's source on demand through a small LRU cache (the top lists of a
large dictionary name far more images than fit in memory); each image's crop is written once to
``images/``. Without images (``--no-images`` or a from-npy store) patch stores still get heatmap
cards on grey tiles; CLS stores without images get no card files.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .layout import card_name, image_name
from .render import heatmap_card, patch_card, save_png, thumbnail, top_patch_list

CACHE_IMAGES = 256  # crops (3·224² bytes each) + thumbnails kept for reuse across atoms
RENDER_THREADS = 2


class ImageCache:
    """Model-input crops and thumbnails by image id, loaded lazily, written to ``images/`` once."""

    def __init__(self, store, out: Path, enabled: bool, reuse: bool):
        self.enabled, self.out, self.reuse = enabled, out, reuse
        self.crops: OrderedDict[int, tuple] = OrderedDict()
        self.store = store
        self.source = None
        self.lock = threading.Lock()  # cards render in threads
        if enabled:
            from .images import open_store_source

            self.source = open_store_source(store)

    def get(self, image_id: int):
        """(crop PIL image or None, thumbnail array)."""
        if not self.enabled:
            return None, thumbnail(None)
        with self.lock:
            return self._get(image_id)

    def _get(self, image_id: int):
        if image_id in self.crops:
            self.crops.move_to_end(image_id)
            return self.crops[image_id]
        from .images import load_images

        crop = load_images(self.store, [image_id], source=self.source)[0]
        path = self.out / image_name(image_id)
        if not (self.reuse and path.is_file()):
            save_png(crop, path)
        self.crops[image_id] = (crop, thumbnail(crop))
        if len(self.crops) > CACHE_IMAGES:
            self.crops.popitem(last=False)
        return self.crops[image_id]


def _title(cards, a: int, negative: bool) -> str:
    rec = cards.atoms[a]
    side = rec["negative"] if negative else rec
    label = side["labels"][0] if side["labels"] else None
    text = f"atom {a}{' (negative)' if negative else ''}  freq {side['frequency']:.2g}"
    if side["max_activation"] is not None:
        text += f"  max {side['max_activation']:.3g}"
    if label is not None:
        text += f"  {label['label']} (k={label['kappa']:.2f})"
    return text


def render_all(cards, out: Path, *, progress: bool = True, reuse: bool = False) -> None:
    from tqdm.auto import tqdm

    meta = cards.meta
    patches = "patch_values" in cards.tensors
    if not (cards.has_images or patches):
        return
    cells = np.asarray(meta["patch_cells"]) if meta.get("patch_cells") is not None else None
    grid = tuple(meta["patch_grid"]) if meta.get("patch_grid") else None
    cache = ImageCache(cards.store, out, cards.has_images, reuse)
    sides = [("", False)] + ([("neg_", True)] if meta.get("signed") else [])
    arrays = {prefix: {k: cards.tensors[prefix + k].numpy() for k in ("image_ids", "values", "patch_values")
                       if prefix + k in cards.tensors} for prefix, _ in sides}

    def render_atom(a: int) -> None:
        for prefix, negative in sides:
            arr = arrays[prefix]
            ids = arr["image_ids"][a]
            n = int((ids >= 0).sum())
            if n == 0:
                continue
            suffix = "-negative" if negative else ""
            path = out / card_name(a, suffix)
            patch_path = out / card_name(a, suffix + "-patches")
            if reuse and path.is_file() and (patch_path.is_file() or not (patches and cards.has_images)):
                continue
            loaded = [cache.get(int(i)) for i in ids[:n]]
            pv = arr["patch_values"][a][:n].astype(np.float32) if patches else None
            title = _title(cards, a, negative)
            save_png(heatmap_card([t for _, t in loaded], arr["values"][a][:n], ids[:n], pv, cells, grid, title), path)
            if patches and cards.has_images and grid is not None:
                top = top_patch_list(pv, ids[:n], cells, 16)
                crops = {int(ids[slot]): loaded[slot][0] for slot, _, _ in top}
                listed = [(int(ids[slot]), cell, v) for slot, cell, v in top]
                save_png(patch_card(crops, listed, grid, f"atom {a}{' (negative)' if negative else ''}: top patches"),
                         patch_path)

    # PNG encoding and numpy release the GIL: two threads use both cores of a small machine
    with ThreadPoolExecutor(max_workers=max(1, min(RENDER_THREADS, os.cpu_count() or 1))) as pool:
        for _ in tqdm(pool.map(render_atom, range(cards.n_atoms)), total=cards.n_atoms, desc="cards", unit="atom",
                      disable=not progress):
            pass
