"""Images back from a store's source: the exact crop the model saw, for cards and the explorer.

A store made by ``vitatlas extract`` records its image source (``manifest["source"]["spec"]``) and
the preprocessing (``manifest["preprocessing"]``). Re-opening the source and applying the same
resize / centre crop (not the normalisation) gives the model-input crop of every image id. Stores
made with ``store from-npy`` record no source: they have no images.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from ..data.sources import ImageSource, UnreadableImage, open_source
from ..data.store import ActivationStore
from ..errors import VitatlasError
from ..models.preprocess import ImageTransform

NO_SOURCE_NOTE = ("this store records no image source (made with `vitatlas store from-npy`): cards carry "
                  "statistics and labels only")


def has_image_source(store: ActivationStore) -> bool:
    """True when the store's manifest names a source and its preprocessing (stores made by extract)."""
    source = store.manifest.get("source") or {}
    return bool(source.get("spec")) and bool(store.manifest.get("preprocessing"))


def transform_of(store: ActivationStore) -> ImageTransform:
    """The store's preprocessing as an ImageTransform (only its resize and crop are used here)."""
    p = store.manifest.get("preprocessing") or {}
    try:
        return ImageTransform(size=int(p["size"]), mean=tuple(p.get("mean", (0, 0, 0))),
                              std=tuple(p.get("std", (1, 1, 1))), resample=p.get("resample", "bilinear"),
                              crop=p.get("crop"), resize_mode=p.get("resize_mode", "square"))
    except (KeyError, TypeError, ValueError) as exc:
        raise VitatlasError(f"store {store.path} records unreadable preprocessing ({exc}): re-extract it") from None


def open_store_source(store: ActivationStore) -> ImageSource:
    """Re-open the store's image source, checking it still holds the images the store was made from."""
    if not has_image_source(store):
        raise VitatlasError(f"store {store.path} has no images: {NO_SOURCE_NOTE}")
    recorded = store.manifest["source"]
    spec = recorded["spec"]
    try:
        source = open_source(spec)
    except VitatlasError as exc:
        raise VitatlasError(f"cannot re-open the image source {spec} of store {store.path} ({exc}); "
                            "restore it or pass --no-images for statistics only") from None
    expected = recorded.get("n_images")
    if expected is not None and len(source) != int(expected):
        # a folder that lost or gained files renumbers its images: every id would point elsewhere
        raise VitatlasError(f"the image source {spec} now holds {len(source)} images but store {store.path} was "
                            f"extracted from {expected}: restore it or pass --no-images for statistics only")
    return source


def load_images(store: ActivationStore, image_ids: Sequence[int], *, source: ImageSource | None = None
                ) -> list[Image.Image]:
    """Model-input crops (RGB, after resize and crop, before normalisation) of ``image_ids``."""
    source = source if source is not None else open_store_source(store)
    transform = transform_of(store)
    out = []
    for i in image_ids:
        i = int(i)
        if not 0 <= i < len(source):
            raise VitatlasError(f"image {i} is out of range for the source {source.spec} ({len(source)} images)")
        try:
            image = source.load(i)
        except UnreadableImage as exc:
            raise VitatlasError(f"image {i} of {source.spec} can no longer be read ({exc}); restore it or pass "
                                "--no-images") from None
        out.append(transform.resize(image))
    return out
