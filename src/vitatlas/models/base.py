"""The interface every vision-model adapter implements.

An adapter wraps one ViT and gives vitatlas the four things it needs from a model:
its preprocessing, the residual stream after chosen blocks, a choice of tokens, and a way to run the
rest of the network from a block onwards on a modified residual stream (for interventions).

Layer numbering: layer ``i`` is the residual stream *after* block ``i`` (0-based); negative numbers
count from the end, so ``-1`` is the output of the last block (before the final layer norm).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import VitatlasError

TOKEN_KINDS = ("cls", "patches", "all")


class VisionModel(ABC):
    """A ViT with hooks on its residual stream.

    Attributes every adapter sets:
        name: the id the user passed to ``vitatlas.models.load`` (e.g. ``"embedded:dinov2-s"``).
        revision: a string that changes whenever the weights change (a checksum or hub commit).
        n_layers: number of transformer blocks.
        width: residual-stream width d.
        image_size: side of the square input in pixels.
        n_prefix_tokens: tokens before the patch tokens (CLS plus any register tokens).
        preprocessing: a JSON-able description of the preprocessing, written to store manifests.
    """

    name: str
    revision: str
    n_layers: int
    width: int
    image_size: int
    n_prefix_tokens: int = 1
    preprocessing: dict

    # ---- preprocessing -------------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any mode, any size) -> float32 pixels (B, 3, H, W), ready for the model."""

    # ---- forward passes ------------------------------------------------------------------------
    @abstractmethod
    def residual_streams(self, pixels: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Run the model and return {layer: hidden (B, T, d)} for each resolved layer in ``layers``.

        Stops after the deepest requested block (no wasted compute). ``layers`` may be negative;
        keys of the result are the resolved non-negative indices.
        """

    @abstractmethod
    def forward_from(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run blocks ``layer+1 .. n_layers-1`` and the final norm on ``hidden`` (B, T, d).

        Returns the final normed hidden states (B, T, d). ``forward_from(l, residual_streams(x,[l])[l])``
        equals the model's own last hidden state for x.
        """

    # ---- shared helpers ------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens per image at the default resolution (prefix tokens plus patches)."""
        return self.n_prefix_tokens + self.n_patches

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    patch_size: int

    def resolve_layer(self, layer: int) -> int:
        """Map a possibly negative layer index to 0..n_layers-1, or raise a one-line error."""
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
            raise VitatlasError(f"layer must be an integer, got {layer!r}")
        resolved = int(layer) + self.n_layers if layer < 0 else int(layer)
        if not 0 <= resolved < self.n_layers:
            raise VitatlasError(
                f"layer {layer} is out of range for {self.name}, which has {self.n_layers} blocks: "
                f"use 0..{self.n_layers - 1} (or -{self.n_layers}..-1 from the end)"
            )
        return resolved

    def token_positions(self, kind: str) -> np.ndarray:
        """Token positions (into the T axis) kept for a token kind: 'cls', 'patches' or 'all'."""
        if kind == "cls":
            return np.array([0], dtype=np.int64)
        if kind == "patches":
            return np.arange(self.n_prefix_tokens, self.n_tokens, dtype=np.int64)
        if kind == "all":
            return np.arange(self.n_tokens, dtype=np.int64)
        raise VitatlasError(f"unknown token kind {kind!r}: use one of {', '.join(TOKEN_KINDS)}")

    def describe(self) -> dict:
        """What a store manifest records about the model."""
        return {
            "name": self.name,
            "revision": self.revision,
            "n_layers": self.n_layers,
            "width": self.width,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "n_prefix_tokens": self.n_prefix_tokens,
        }
