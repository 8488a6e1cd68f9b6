"""Card images: an atom's top images with its patch activations overlaid, and a grid of its top patches.

Heatmap: every patch is coloured with one colour map (``COLORMAP``) at alpha ∝ value / the atom's
maximum over its top images (so the strongest patch of the card is fully coloured and values are
comparable across the images of one card), the activation printed under each image. Rendered with
numpy and PIL only; images are drawn at ``THUMB`` pixels.
"""

from __future__ import annotations

import io
import math
import os
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_writer

COLORMAP = "inferno"
THUMB = 112          # side of one image on a card
PATCH_THUMB = 64     # side of one patch crop
TEXT_H = 14          # height of the caption strip under each image
HEADER_H = 20
MAX_ALPHA = 0.8      # the strongest patch stays slightly see-through
BACKGROUND = (255, 255, 255)
EMPTY = (200, 200, 200)


@lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)


@lru_cache(maxsize=1)
def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def thumbnail(image: Image.Image | None, side: int = THUMB) -> np.ndarray:
    """(side, side, 3) uint8 of an image (grey when there is none)."""
    if image is None:
        return np.full((side, side, 3), EMPTY, np.uint8)
    return np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), np.uint8)


def patch_grid_values(values: np.ndarray, cells: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(n, P) codes of images' rows -> (n, h, w) patch grids; rows that are not patches (CLS) are dropped."""
    values = np.atleast_2d(values)
    out = np.zeros((values.shape[0], grid[0] * grid[1]), np.float32)
    ok = cells >= 0
    out[:, cells[ok]] = values[:, ok]
    return out.reshape(-1, *grid)


def overlay(thumbs: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Colour thumbnails (n, S, S, 3) with heatmaps (n, h, w) in [0, 1] at alpha = MAX_ALPHA·heat."""
    side = thumbs.shape[1]
    h, w = heat.shape[1:]
    up = np.clip(heat, 0, 1)[:, (np.arange(side) * h) // side][:, :, (np.arange(side) * w) // side]  # nearest
    color = _lut()[(up * 255).astype(np.int64)]
    alpha = (MAX_ALPHA * up)[..., None]
    return (thumbs * (1 - alpha) + color * alpha).astype(np.uint8)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def heatmap_card(thumbs: list[np.ndarray], values: np.ndarray, image_ids: np.ndarray,
                 patch_values: np.ndarray | None, cells: np.ndarray | None, grid: tuple[int, int] | None,
                 title: str) -> Image.Image:
    """One card: the top images (``thumbs`` in rank order) with heatmaps and values under them.

    values: (n,) image activations; patch_values: (n, P) the atom's code on each row of each image,
    or None for a CLS store (images only); cells: (P,) grid cell of each row, −1 for non-patch rows.
    """
    n = len(thumbs)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    cell_h = THUMB + TEXT_H
    canvas = np.full((HEADER_H + rows * cell_h, cols * THUMB, 3), BACKGROUND, np.uint8)
    scale = float(patch_values.max()) if patch_values is not None and patch_values.size else 0.0
    tiles = np.stack(thumbs) if n else np.zeros((0, THUMB, THUMB, 3), np.uint8)
    if patch_values is not None and grid is not None and scale > 0:
        tiles = overlay(tiles, patch_grid_values(patch_values, cells, grid) / scale)
    for j in range(n):
        r, c = divmod(j, cols)
        y = HEADER_H + r * cell_h
        canvas[y:y + THUMB, c * THUMB:(c + 1) * THUMB] = tiles[j]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    for j in range(n):
        r, c = divmod(j, cols)
        draw.text((c * THUMB + 3, HEADER_H + r * cell_h + THUMB + 1),
                  f"{_fmt(float(values[j]))}  #{int(image_ids[j])}", fill=(0, 0, 0), font=font)
    return img


def top_patch_list(patch_values: np.ndarray, image_ids: np.ndarray, cells: np.ndarray, n: int) -> list[tuple]:
    """The ``n`` (slot, cell, value) with the largest positive values over the kept images' patches."""
    if patch_values is None or patch_values.size == 0:
        return []
    v = np.where((cells >= 0)[None, :] & (image_ids >= 0)[:, None], patch_values.astype(np.float32), -np.inf)
    flat = v.ravel()
    order = np.argsort(-flat, kind="stable")[:n]
    out = []
    for f in order:
        if not flat[f] > 0:
            break
        slot, row = divmod(int(f), v.shape[1])
        out.append((slot, int(cells[row]), float(flat[f])))
    return out


def patch_card(crops: dict[int, Image.Image], patches: list[tuple[int, int, float]], grid: tuple[int, int],
               title: str) -> Image.Image:
    """Grid of the patch crops (with half a patch of context) listed as (image id, cell, value)."""
    n = max(1, len(patches))
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    cell_h = PATCH_THUMB + TEXT_H
    img = Image.new("RGB", (max(cols * PATCH_THUMB, 160), HEADER_H + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    h, w = grid
    for j, (image_id, cell, value) in enumerate(patches):
        crop = crops[image_id]
        ph, pw = crop.height / h, crop.width / w
        pr, pc = divmod(cell, w)
        box = (pc * pw - pw / 2, pr * ph - ph / 2, (pc + 1.5) * pw, (pr + 1.5) * ph)
        tile = crop.crop(tuple(int(round(b)) for b in box)).resize((PATCH_THUMB, PATCH_THUMB),
                                                                     Image.Resampling.BILINEAR)
        td = ImageDraw.Draw(tile)
        q = PATCH_THUMB / 4  # the patch itself is the middle half of the tile
        td.rectangle((q, q, PATCH_THUMB - q, PATCH_THUMB - q), outline=tuple(int(x) for x in _lut()[220]))
        r, c = divmod(j, cols)
        y = HEADER_H + r * cell_h
        img.paste(tile, (c * PATCH_THUMB, y))
        draw.text((c * PATCH_THUMB + 2, y + PATCH_THUMB + 1), _fmt(value), fill=(0, 0, 0), font=font)
    return img


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """PNG written under a temporary name and renamed into place, fast compression.

    No fsync (unlike ``vitatlas.io``): cards are thousands of small files that can be re-rendered,
    and fsync per file cost more than the rendering itself; a killed run still never leaves a
    half-written PNG under its real name, and cards.json is only marked complete after all of them.
    """
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    with atomic_writer(path, fsync=False) as f:
        f.write(buf.getvalue())
