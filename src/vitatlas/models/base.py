"""The interface every vision-model adapter implements.

An adapter wraps one ViT and gives vitatlas the four things it needs from a model:
its preprocessing, the residual stream after chosen blocks, a choice of tokens, and a way to run the
rest of the network from a block onwards on a modified residual stream (for interventions).

Layer numbering: layer ``i`` is the residual stream *after* block ``i`` (0-based); negative numbers
count from the end, so ``-1`` is the output of the last block (before the final layer norm).

Token kinds: ``cls``, ``patches`` and ``all`` are rows of the residual stream at a layer; ``embedding``
is the model's projected image embedding, one row per image, in the joint image–text space of a
dual encoder (CLIP: ``visual_projection`` of the final-normed CLS; SigLIP: the attention-pooling head
on the final-normed tokens), i.e. what ``get_image_features`` returns. Only models with such a space
have it (``embedding_width`` is not None); the others, the embedded DINOv2-S included, raise a
one-line error rather than pass off a CLS vector as a joint-space embedding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import VitatlasError

TOKEN_KINDS = ("cls", "patches", "all", "embedding")
STREAM_KINDS = ("cls", "patches", "all")  # the kinds that are rows of the residual stream at a layer


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
        if kind == "embedding":
            raise VitatlasError("token kind 'embedding' is one row per image, not a token of the residual stream: "
                                "use image_embeddings() / pool_embedding()")
        raise VitatlasError(f"unknown token kind {kind!r}: use one of {', '.join(TOKEN_KINDS)}")

    # ---- the joint image–text space (dual encoders only) ---------------------------------------
    @property
    def embedding_width(self) -> int | None:
        """Width of the projected image embedding (token kind ``embedding``), or None when the model has none."""
        return None

    @property
    def has_text_tower(self) -> bool:
        """True when ``text_embeddings`` can embed phrases into the same space as ``image_embeddings``."""
        return False

    def require_embedding(self) -> int:
        """``embedding_width``, or the one-line error saying this model has no joint image–text space."""
        if self.embedding_width is None:
            raise VitatlasError(
                f"{self.name} has no joint image-text embedding: --tokens embedding needs a Hugging Face CLIP or "
                "SigLIP model (hf:<path>); use --tokens cls for an image-level vector of this model")
        return self.embedding_width

    def pool_embedding(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block (B, T, d) -> projected image embeddings (B, D)."""
        self.require_embedding()
        raise NotImplementedError(f"{type(self).__name__} declares an embedding_width but no pool_embedding")

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> projected image embeddings (B, D) (``get_image_features``)."""
        self.require_embedding()
        last = self.n_layers - 1
        with torch.no_grad():
            return self.pool_embedding(self.residual_streams(pixels, [last])[last])

    def text_embeddings(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """Phrases -> text embeddings (len(texts), D) in the space of ``image_embeddings`` (not normalised)."""
        raise VitatlasError(
            f"{self.name} has no text tower: text descriptions need a Hugging Face CLIP or SigLIP dual model "
            "saved with its text tower and tokenizer")

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
