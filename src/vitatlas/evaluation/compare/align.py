"""Which rows of two stores describe the same thing: the same image, or the same token of the same image.

Two dictionaries can only be compared by behaviour on inputs both have seen. The stores must be over
the same images (same image source, same image ids, and the same labels where both have labels).
Then the *units* of the comparison are either

- ``tokens``: the rows themselves, paired by (image id, token position) — when both stores hold the
  same token kind at the same positions (two learners on one store, two layers' patch tokens);
- ``images``: one unit per image, each atom's activations over that image's rows aggregated (see
  ``activations``) — when the token kinds differ (CLS against patches), or when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...data.store import ActivationStore
from ...errors import VitatlasError

MODES = ("auto", "tokens", "images")


@dataclass(frozen=True)
class Side:
    """One store's rows in unit order.

    ``rows``: store row numbers, grouped by image in ``Alignment.image_ids`` order (tokens mode: one per
    unit). ``starts``: images mode, (n_images + 1,) offsets of each image's rows in ``rows``.
    """

    rows: np.ndarray
    starts: np.ndarray | None


@dataclass(frozen=True)
class Alignment:
    mode: str                 # "tokens" or "images"
    image_ids: np.ndarray     # (n_images,) sorted image ids both stores hold (or the sample of them)
    unit_image: np.ndarray    # (n_units,) position in image_ids of each unit's image
    a: Side
    b: Side

    @property
    def n_units(self) -> int:
        return int(self.unit_image.size)

    @property
    def n_images(self) -> int:
        return int(self.image_ids.size)

    def shuffled_units(self, seed: int) -> np.ndarray:
        """A permutation of the units that pairs every image with another random image (token positions
        kept): the null, where any agreement between the two sides is chance."""
        rng = np.random.default_rng(seed)
        perm = rng.permutation(self.n_images)
        if self.mode == "images":
            return perm
        per_image = self.n_units // self.n_images  # uniform: checked when the alignment was made
        return (perm[:, None] * per_image + np.arange(per_image)[None, :]).ravel()


def _source(store: ActivationStore) -> dict:
    # n_images_used is how many were taken (--limit); the image ids compared below say which
    return {k: v for k, v in (store.manifest.get("source") or {}).items() if k != "n_images_used"}


def check_same_images(store_a: ActivationStore, store_b: ActivationStore) -> np.ndarray:
    """The sorted image ids both stores hold, refusing stores over different images (one-line errors)."""
    src_a, src_b = _source(store_a), _source(store_b)
    if src_a and src_b and src_a != src_b:
        raise VitatlasError(f"stores {store_a.path} and {store_b.path} are over different images (sources "
                            f"{src_a.get('name')!r} and {src_b.get('name')!r}): compare stores extracted from the "
                            "same --data")
    ids_a, ids_b = np.unique(store_a.index[:, 0]), np.unique(store_b.index[:, 0])
    if not np.array_equal(ids_a, ids_b):
        common = np.intersect1d(ids_a, ids_b).size
        raise VitatlasError(f"stores {store_a.path} and {store_b.path} hold different images ({ids_a.size} and "
                            f"{ids_b.size} images, {common} in common): extract both with the same --data and --limit")
    la, lb = _image_labels(store_a, ids_a), _image_labels(store_b, ids_b)
    if la is not None and lb is not None and not np.array_equal(la, lb):
        raise VitatlasError(f"stores {store_a.path} and {store_b.path} label the same image ids differently "
                            f"({int((la != lb).sum())} images): they are over different images")
    return ids_a


def _image_labels(store: ActivationStore, ids: np.ndarray) -> np.ndarray | None:
    if store.labels is None:
        return None
    out = np.full(ids.size, -1, np.int64)
    out[np.searchsorted(ids, store.index[:, 0])] = store.labels
    return out


def same_tokens(store_a: ActivationStore, store_b: ActivationStore) -> bool:
    return (store_a.tokens == store_b.tokens
            and store_a.manifest.get("token_positions") == store_b.manifest.get("token_positions"))


def align_stores(store_a: ActivationStore, store_b: ActivationStore, mode: str = "auto",
                 max_images: int | None = None, seed: int = 0) -> Alignment:
    """Pair the rows of two stores over the same images; ``max_images``: a fixed random sample of them."""
    if mode not in MODES:
        raise VitatlasError(f"unknown alignment {mode!r}: use one of {', '.join(MODES)}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer))
                                   or max_images < 2):
        raise VitatlasError(f"max_images must be an integer of at least 2, got {max_images!r}")
    ids = check_same_images(store_a, store_b)
    if mode == "auto":
        mode = "tokens" if same_tokens(store_a, store_b) else "images"
    elif mode == "tokens" and not same_tokens(store_a, store_b):
        raise VitatlasError(f"token alignment needs both stores to hold the same tokens, but {store_a.path} holds "
                            f"{store_a.tokens!r} and {store_b.path} {store_b.tokens!r}: align by images instead")
    if max_images is not None and max_images < ids.size:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=max_images, replace=False))
    if ids.size < 2:
        raise VitatlasError(f"stores {store_a.path} and {store_b.path} share {ids.size} image: a comparison needs "
                            "at least 2")
    sides, unit_image = [], None
    for store in (store_a, store_b):
        index = store.index
        keep = np.isin(index[:, 0], ids)
        rows = np.flatnonzero(keep)
        order = np.lexsort((index[rows, 1], index[rows, 0]))  # by image, then token position
        rows = rows[order]
        img_pos = np.searchsorted(ids, index[rows, 0])
        counts = np.bincount(img_pos, minlength=ids.size)
        if mode == "tokens":
            keys = index[rows].astype(np.int64)
            if unit_image is not None and not np.array_equal(keys, sides[0][1]):
                raise VitatlasError(f"stores {store_a.path} and {store_b.path} hold different token rows for the "
                                    "same images: align by images instead")
            if np.unique(counts).size != 1:
                raise VitatlasError(f"store {store.path} holds a different number of tokens for some images: align "
                                    "by images instead")
            sides.append((Side(rows, None), keys))
            unit_image = img_pos
        else:
            sides.append((Side(rows, np.concatenate([[0], np.cumsum(counts)])), None))
    if mode == "images":
        unit_image = np.arange(ids.size)
    return Alignment(mode, ids, unit_image, sides[0][0], sides[1][0])
