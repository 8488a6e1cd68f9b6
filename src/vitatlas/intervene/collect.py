"""Walk an image source in batches: pixels, image labels and patch labels, skipping unreadable images."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..data.sources import ImageSource, UnreadableImage
from ..models.base import VisionModel
from .masks import MaskSource, patch_labels


@dataclass
class ImageBatch:
    ids: np.ndarray                 # (B,) image ids in the source
    pixels: torch.Tensor            # (B, 3, S, S)
    labels: np.ndarray              # (B,) image class (-1 unknown)
    patch_labels: np.ndarray | None  # (B, P) patch class (-1 ignore), when a mask source is given


def image_batches(model: VisionModel, source: ImageSource, ids: Sequence[int], *, masks: MaskSource | None = None,
                  batch_size: int = 32) -> Iterator[ImageBatch]:
    """Batches over images ``ids`` (in order); unreadable images are named in one warning and skipped."""
    ids = [int(i) for i in ids]
    skipped: list[str] = []
    for start in range(0, len(ids), batch_size):
        images, kept, labels, plabels = [], [], [], []
        for i in ids[start:start + batch_size]:
            try:
                images.append(source.load(i))
            except UnreadableImage as exc:
                skipped.append(str(exc))
                continue
            kept.append(i)
            labels.append(source.label(i))
            if masks is not None:
                plabels.append(patch_labels(model, masks.label_map(i)))
        if not kept:
            continue
        yield ImageBatch(np.asarray(kept, np.int64), model.preprocess(images), np.asarray(labels, np.int64),
                         np.stack(plabels) if masks is not None else None)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s), first: {skipped[0]}", stacklevel=2)


def final_tokens(model: VisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """The model's final normed tokens (B, T, d)."""
    last = model.n_layers - 1
    return model.forward_from(last, model.residual_streams(pixels, [last])[last])


def split_ids(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images 0..n-1 -> (first part, second part) with ``fraction`` of them in the second, random but
    reproducible; both parts sorted so sources are read in order."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    k = min(max(k, 1), n - 1) if n > 1 else 0
    return np.sort(order[k:]), np.sort(order[:k])
