"""Mask sources: per-patch class labels for the segmentation probe and protocol.

A mask source gives, for image i of an image source, a label map (H, W) of class ids (255 = ignore)
at the image's own resolution. ``patch_labels`` moves it through the model's resize/crop geometry
(nearest neighbour, so ids stay ids) and gives each patch the majority class of its pixels
(-1 when most of its pixels are ignored).

Sources:
    Fashion-MNIST (``embedded:fashion-mnist[...]``): exact labels — a pixel is background when it
        is 0, else the image's garment class; so a patch is background when most of its pixels are 0.
        11 classes: the 10 garments (same ids as the image labels) then ``background`` (10).
        ``embedded:digits`` gets the same pixel masks (10 digits, then background).
    an image folder ``DIR`` laid out as ``DIR/images/...`` and a ``DIR/masks/...`` twin: the mask of
        ``images/a/b.jpg`` is ``masks/a/b.png`` (any image suffix), pixel value = class id; class names
        from ``DIR/masks/classes.txt`` (one per line, line i = id i) or ``class 0``, ``class 1``, ...
    an explicit mask folder (``--masks PATH``): mask files matched to the images in sorted order.
    a Hugging Face dataset saved to disk with a second image column named like mask/annotation/
        segmentation/label (ADE20K style).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.sources import (
    FASHION_MNIST_CLASSES,
    IMAGE_SUFFIXES,
    ArraySource,
    HFDiskSource,
    ImageSource,
    UnreadableImage,
    open_source,
)
from ..errors import VitatlasError
from ..models.base import VisionModel

IGNORE = 255
MASK_COLUMN_HINTS = ("mask", "annotation", "segmentation", "label")


class MaskSource:
    """Label maps for the images of a source, in the same order."""

    class_names: list[str]
    spec: str

    def __len__(self) -> int:
        raise NotImplementedError

    def label_map(self, i: int) -> np.ndarray:
        raise NotImplementedError


class FashionMNISTMasks(MaskSource):
    """Background where the pixel is 0, else the image's class (the last class id is background).

    Made for Fashion-MNIST (garment classes, id 10 = background); scikit-learn's digits (black
    background too) get the same treatment."""

    def __init__(self, source: ArraySource):
        self.source, self.spec = source, source.spec + " (pixel masks)"
        self.class_names = list(source.class_names or FASHION_MNIST_CLASSES) + ["background"]

    def __len__(self) -> int:
        return len(self.source)

    def label_map(self, i: int) -> np.ndarray:
        pixels = np.asarray(self.source.images[i])
        if pixels.ndim == 3:
            pixels = pixels.max(axis=2)
        return np.where(pixels == 0, len(self.class_names) - 1, self.source.label(i)).astype(np.uint8)


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)  # palette images give their indices, which is what ids are
    except (OSError, ValueError, SyntaxError) as exc:
        raise VitatlasError(f"mask {path} cannot be read ({type(exc).__name__})") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.max(initial=0) > IGNORE:
        raise VitatlasError(f"mask {path} has class ids above {IGNORE}: vitatlas reads 8-bit class-id masks")
    return arr.astype(np.uint8)


def _class_names_file(folder: Path, n_hint: int) -> list[str]:
    names_file = folder / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if names:
            return names
    return [f"class {i}" for i in range(n_hint)]


class FileMasks(MaskSource):
    """One mask file per image (already matched, same order as the image source)."""

    def __init__(self, spec: str, files: list[Path], class_names: list[str] | None, limit: int | None):
        self.spec, self.files = spec, files
        if class_names is None:  # ids seen in the masks that will be used
            top = 0
            for f in files[:limit]:
                arr = _read_mask(f)
                top = max(top, int(arr[arr != IGNORE].max(initial=0)))
            class_names = [f"class {i}" for i in range(top + 1)]
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.files)

    def label_map(self, i: int) -> np.ndarray:
        arr = _read_mask(self.files[i])
        if arr[arr != IGNORE].max(initial=0) >= len(self.class_names):
            raise VitatlasError(f"mask {self.files[i]} has class id {int(arr[arr != IGNORE].max())} but only "
                                f"{len(self.class_names)} class names are known: add them to classes.txt")
        return arr


class HFMasks(MaskSource):
    """The mask column of a saved Hugging Face dataset (ADE20K style: pixel value = class id)."""

    def __init__(self, source: HFDiskSource, limit: int | None = None):
        import datasets

        cols = [c for c, f in source.ds.features.items() if isinstance(f, datasets.Image) and c != source.image_col]
        named = [c for c in cols if any(h in c.lower() for h in MASK_COLUMN_HINTS)]
        if not named:
            raise VitatlasError(f"{source.spec} has no mask column (a second image column named like "
                                f"{'/'.join(MASK_COLUMN_HINTS)}); columns: {', '.join(source.ds.features)}")
        self.source, self.column, self.spec = source, named[0], f"{source.spec}#{named[0]}"
        top = 0  # ids seen in the masks that will be used
        for i in range(min(len(source), limit) if limit else len(source)):
            arr = self.label_map(i)
            top = max(top, int(arr[arr != IGNORE].max(initial=0)))
        self.class_names = [f"class {i}" for i in range(top + 1)]

    def __len__(self) -> int:
        return len(self.source)

    def label_map(self, i: int) -> np.ndarray:
        img = self.source.ds[int(i)][self.column]
        arr = np.asarray(img)
        return (arr[..., 0] if arr.ndim == 3 else arr).astype(np.uint8)


def _match_files(image_files: list[Path], image_root: Path, mask_root: Path) -> list[Path]:
    masks = []
    for f in image_files:
        rel = f.relative_to(image_root).with_suffix("")
        found = [mask_root / rel.with_suffix(s) for s in (".png", *sorted(IMAGE_SUFFIXES))]
        hit = next((m for m in found if m.is_file()), None)
        if hit is None:
            raise VitatlasError(f"no mask for {f} in {mask_root} (looked for {rel}.png): every image needs a mask")
        masks.append(hit)
    return masks


def _mask_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def open_data_with_masks(data: str, masks: str | None = None, *, limit: int | None = None,
                         ) -> tuple[ImageSource, MaskSource]:
    """The image source of ``data`` and its mask source (see the module docstring for the forms)."""
    folder = Path(data)
    if masks is None and folder.is_dir() and (folder / "images").is_dir() and (folder / "masks").is_dir():
        source = open_source(str(folder / "images"))
        files = _mask_files(folder / "masks")
        if len(files) != len(source):
            raise VitatlasError(f"the mask source {folder / 'masks'} has {len(files)} masks but the image source "
                                f"{folder / 'images'} has {len(source)} images: give every image one mask")
        names_file = folder / "masks" / "classes.txt"
        names = _class_names_file(folder / "masks", 0) if names_file.is_file() else None
        return source, FileMasks(str(folder / "masks"), _match_files(source.files, folder / "images",
                                                                         folder / "masks"), names, limit)
    source = open_source(data)
    if masks is not None:
        root = Path(masks)
        if not root.is_dir():
            raise VitatlasError(f"mask folder {masks} does not exist")
        files = _mask_files(root)
        if len(files) != len(source):
            raise VitatlasError(f"the mask source {masks} has {len(files)} masks but the image source {data} "
                                f"has {len(source)} images: give every image one mask, in the same sorted order")
        names = _class_names_file(root, 0) if (root / "classes.txt").is_file() else None
        return source, FileMasks(str(root), files, names, limit)
    if isinstance(source, ArraySource) and source.spec.startswith(("embedded:fashion-mnist", "embedded:digits")):
        return source, FashionMNISTMasks(source)
    if isinstance(source, HFDiskSource):
        return source, HFMasks(source, limit)
    raise VitatlasError(f"{data} has no patch labels: use embedded:fashion-mnist, a folder with images/ and masks/ "
                        "sub-folders, a saved Hugging Face dataset with a mask column, or pass --masks DIR")


def check_same_length(source: ImageSource, masks: MaskSource) -> None:
    if len(masks) != len(source):
        raise VitatlasError(f"the mask source {masks.spec} has {len(masks)} masks but the image source "
                            f"{source.spec} has {len(source)} images")


def patch_labels(model: VisionModel, label_map: np.ndarray) -> np.ndarray:
    """A label map (H, W) -> (P,) int64 patch labels in the model's patch order (-1 = ignore)."""
    transform = getattr(model, "transform", None)
    image = Image.fromarray(np.ascontiguousarray(label_map, dtype=np.uint8))
    if transform is not None:
        resized = np.asarray(dataclasses.replace(transform, resample="nearest").resize(image))[..., 0]
    else:
        resized = np.asarray(image.resize((model.image_size, model.image_size), Image.Resampling.NEAREST))
    p = model.patch_size
    g = resized.shape[0] // p
    blocks = resized[:g * p, :g * p].reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, p * p)
    counts = np.stack([np.bincount(b, minlength=256) for b in blocks])  # (P, 256)
    ignore = counts[:, IGNORE].copy()
    counts[:, IGNORE] = 0
    labels = counts.argmax(1).astype(np.int64)  # ties go to the lower id (garments before background)
    labels[ignore * 2 > p * p] = -1
    return labels


def load_item(source: ImageSource, masks: MaskSource | None, i: int) -> tuple[Image.Image, int, np.ndarray | None]:
    """(image, image label, label map or None); UnreadableImage propagates so callers can skip."""
    image = source.load(i)
    return image, source.label(i), (masks.label_map(i) if masks is not None else None)


__all__ = ["FashionMNISTMasks", "FileMasks", "HFMasks", "MaskSource", "UnreadableImage", "check_same_length",
           "load_item", "open_data_with_masks", "patch_labels"]
