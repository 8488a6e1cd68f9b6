"""What the image page shows: an image's rows in the store, its patch grid, and the atoms active there.

The store's index maps each row to (image id, token position). ``ImageIndex`` inverts it once (an
argsort), so the rows of one image are found in O(log n) and encoded on demand: only that image's
tokens go through the dictionary, never the whole store.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.store import ActivationStore
from ..dictionary import Dictionary
from ..errors import VitatlasError


class ImageIndex:
    """Rows of every image of a store, and the layout of its tokens."""

    def __init__(self, store: ActivationStore):
        self.store = store
        index = store.index
        image_ids = index[:, 0].astype(np.int64)
        self._order = np.argsort(image_ids, kind="stable")
        self._sorted_ids = image_ids[self._order]
        self._positions = index[:, 1].astype(np.int64)
        self.image_ids = np.unique(self._sorted_ids)
        self._known = set(self.image_ids.tolist()) if self.image_ids.size < 5_000_000 else None
        model = store.model or {}
        self.n_prefix = int(model.get("n_prefix_tokens", 1) or 0)
        positions = np.asarray(store.manifest.get("token_positions") or [], dtype=np.int64)
        self.patch_positions = positions[positions >= self.n_prefix] if store.tokens in ("patches", "all") else \
            np.zeros(0, np.int64)
        n_patches = self.patch_positions.size
        side = int(round(math.sqrt(n_patches))) if n_patches else 0
        self.grid = (side, side) if side and side * side == n_patches else None
        self.labels = store.labels
        self.class_names = store.class_names

    def __contains__(self, image_id: int) -> bool:
        if self._known is not None:
            return int(image_id) in self._known
        i = np.searchsorted(self.image_ids, image_id)
        return i < self.image_ids.size and self.image_ids[i] == image_id

    @property
    def n_images(self) -> int:
        return int(self.image_ids.size)

    def rows_of(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, token positions) of ``image_id``, ordered by token position."""
        lo, hi = np.searchsorted(self._sorted_ids, [image_id, image_id + 1])
        if lo == hi:
            raise VitatlasError(f"image {image_id} is not in store {self.store.path}")
        rows = self._order[lo:hi]
        pos = self._positions[rows]
        order = np.argsort(pos, kind="stable")
        return rows[order], pos[order]

    def label_of(self, image_id: int) -> str | None:
        if self.labels is None:
            return None
        rows, _ = self.rows_of(image_id)
        lab = int(self.labels[rows[0]])
        if lab < 0:
            return None
        names = self.class_names
        return names[lab] if names and lab < len(names) else str(lab)


def image_atoms(index: ImageIndex, dictionary: Dictionary, image_id: int, *, per_token: int = 16,
                top_image: int = 32) -> dict:
    """The image page's data for one run: per token its active atoms, and the image's top atoms.

    Returns {"tokens": [{"position", "patch" (None for CLS), "atoms": [[atom, value], ...]}],
    "top_atoms": [[atom, max value over the image's tokens], ...]}; values are the dictionary's codes
    for the stored activations (by |value|, largest first).
    """
    return next(iter_image_atoms(index, dictionary, [image_id], per_token=per_token, top_image=top_image))[1]


@torch.no_grad()
def iter_image_atoms(index: ImageIndex, dictionary: Dictionary, image_ids, *, per_token: int = 16,
                     top_image: int = 32, rows_per_call: int = 16384):
    """(image id, ``image_atoms`` dict) for many images, encoding about ``rows_per_call`` rows at a time
    (one dictionary call per batch of images instead of one per image: the static export's hot loop)."""
    image_ids = list(image_ids)
    start = 0
    while start < len(image_ids):
        batch, rows, positions = [], [], []
        while start < len(image_ids) and (not batch or sum(r.size for r in rows) < rows_per_call):
            r, p = index.rows_of(int(image_ids[start]))
            batch.append(int(image_ids[start]))
            rows.append(r)
            positions.append(p)
            start += 1
        codes = np.asarray(dictionary.encode(index.store.rows(np.concatenate(rows))), dtype=np.float32)
        offset = 0
        for image_id, r, p in zip(batch, rows, positions):
            yield image_id, _summarise(codes[offset:offset + r.size], p, index.n_prefix, per_token, top_image)
            offset += r.size


def _summarise(codes: np.ndarray, positions: np.ndarray, n_prefix: int, per_token: int, top_image: int) -> dict:
    tokens = []
    for t, pos in enumerate(positions):
        nz = np.flatnonzero(codes[t])
        order = nz[np.argsort(-np.abs(codes[t, nz]), kind="stable")][:per_token]
        patch = int(pos - n_prefix) if pos >= n_prefix else None
        tokens.append({"position": int(pos), "patch": patch,
                       "atoms": [[int(a), round(float(codes[t, a]), 4)] for a in order]})
    peak = np.abs(codes).max(axis=0)
    signed = codes[np.abs(codes).argmax(axis=0), np.arange(codes.shape[1])]
    top = np.flatnonzero(peak > 0)
    top = top[np.argsort(-peak[top], kind="stable")][:top_image]
    return {"tokens": tokens, "top_atoms": [[int(a), round(float(signed[a]), 4)] for a in top]}
