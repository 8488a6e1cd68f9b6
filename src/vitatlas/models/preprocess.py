"""Image preprocessing shared by every model adapter, in PIL + numpy (no torchvision).

The transform mirrors what Hugging Face image processors do in their PIL ("slow") path, so that
a checkpoint's own ``preprocessor_config.json`` gives the same pixels here as in ``transformers``:
convert to RGB, resize the uint8 image with PIL, optionally centre-crop, scale to [0, 1], normalise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import VitatlasError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESAMPLE_BY_CODE = {int(v): k for k, v in RESAMPLE.items()}  # HF configs store PIL's integer codes
RESIZE_MODES = ("square", "shortest_edge")


@dataclass(frozen=True)
class ImageTransform:
    """PIL images -> normalised float32 pixels (B, 3, S, S).

    Attributes:
        size: resize target: the side of the square (``resize_mode="square"``) or the length of the
            shorter side, keeping the aspect ratio (``resize_mode="shortest_edge"``).
        mean, std: per-channel normalisation applied after scaling to [0, 1].
        resample: PIL filter name (``"bilinear"``, ``"bicubic"``, ...).
        crop: side of the centre crop taken after resizing, or None for no crop.
        resize_mode: ``"square"`` or ``"shortest_edge"``.
    """

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resample: str = "bilinear"
    crop: int | None = None
    resize_mode: str = "square"

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE:
            raise VitatlasError(f"unknown resample filter {self.resample!r}: use one of {', '.join(RESAMPLE)}")
        if self.resize_mode not in RESIZE_MODES:
            raise VitatlasError(f"unknown resize mode {self.resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")
        if self.size <= 0 or (self.crop is not None and not 0 < self.crop <= self.size):
            raise VitatlasError(f"bad preprocessing sizes: resize {self.size}, crop {self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise VitatlasError(f"mean and std need 3 channels and a positive std, got {self.mean}, {self.std}")
        # frozen dataclass: normalise lists (from JSON) to tuples so instances hash and compare
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def out_size(self) -> int:
        """Side of the square images this transform produces."""
        return self.crop if self.crop is not None else self.size

    def resize(self, image: Image.Image) -> Image.Image:
        """Convert to RGB, resize and centre-crop one image (still uint8 PIL)."""
        image = image.convert("RGB")  # drops alpha, expands grey/palette to 3 channels
        if self.resize_mode == "square":
            w, h = self.size, self.size
        else:  # shorter side -> size, as transformers' get_resize_output_image_size does
            short, long = sorted(image.size)
            new_long = int(self.size * long / short)
            w, h = (self.size, new_long) if image.width <= image.height else (new_long, self.size)
        image = image.resize((w, h), resample=RESAMPLE[self.resample])
        if self.crop is not None:
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
        return image

    def to_array(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> float32 (3, S, S), normalised."""
        x = np.asarray(self.resize(image), dtype=np.float32) / 255.0
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
        """PIL image(s) of any mode and size -> float32 tensor (B, 3, S, S)."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            return torch.empty(0, 3, self.out_size, self.out_size)
        for im in images:
            if not isinstance(im, Image.Image):
                raise VitatlasError(f"preprocess expects PIL images, got {type(im).__name__}")
        return torch.from_numpy(np.stack([self.to_array(im) for im in images]))

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the transform (written into store manifests)."""
        return {
            "convert": "RGB",
            "resize_mode": self.resize_mode,
            "size": self.size,
            "resample": self.resample,
            "crop": self.crop,
            "scale": "1/255",
            "mean": list(self.mean),
            "std": list(self.std),
            "out_size": self.out_size,
        }


def _side(value: Any, what: str) -> int | None:
    """Read an HF size entry (int or dict) as a square side; None when it isn't one."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        h, w = value.get("height"), value.get("width")
        if h is not None and h == w:
            return int(h)
    raise VitatlasError(f"unsupported {what} {value!r} in preprocessor_config.json: vitatlas needs square inputs")


def transform_from_hf_config(path: str | os.PathLike, default: ImageTransform) -> ImageTransform:
    """Build an ImageTransform from an HF ``preprocessor_config.json``; missing fields fall back to ``default``."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise VitatlasError(f"could not read preprocessing config {path}: {e}") from e

    # No resize in the config (or do_resize false) would feed raw image sizes to a fixed-size ViT:
    # fall back to the family default instead.
    size_entry = cfg.get("size") if cfg.get("do_resize", True) else None
    size = _side(size_entry, "size") or default.size
    if size_entry is None:
        shortest = default.resize_mode == "shortest_edge"
    else:  # an int (old CLIP configs) or {"shortest_edge": n} keeps the aspect ratio
        shortest = isinstance(size_entry, (int, float)) or "shortest_edge" in size_entry
    crop = _side(cfg.get("crop_size"), "crop_size") if cfg.get("do_center_crop", False) else None
    if not cfg.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean = tuple(cfg.get("image_mean", default.mean))
        std = tuple(cfg.get("image_std", default.std))
    resample = cfg.get("resample")
    resample_name = _RESAMPLE_BY_CODE.get(int(resample), default.resample) if resample is not None else default.resample
    return ImageTransform(
        size=size,
        mean=mean,
        std=std,
        resample=resample_name,
        crop=crop,
        resize_mode="shortest_edge" if shortest else "square",
    )
