"""Tiny randomly initialised ViTs that tests build themselves (no weights are downloaded)."""

from __future__ import annotations

from pathlib import Path


def save_tiny_dinov2(path: Path, *, layers: int = 3, hidden: int = 32, image_size: int = 28, patch: int = 7,
                     seed: int = 0) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=hidden * 2, image_size=image_size, patch_size=patch)
    Dinov2Model(config).eval().save_pretrained(path)
    return path
