"""File names inside a cards directory (shared by the writer, the page and the report helpers)."""

from __future__ import annotations


def card_name(atom: int, suffix: str = "") -> str:
    """``cards/atom-00017.png``; suffix ``-patches``, ``-negative``, ``-negative-patches``."""
    return f"cards/atom-{atom:05d}{suffix}.png"


def image_name(image_id: int) -> str:
    """``images/image-0000412.png``: the model-input crop of a store image."""
    return f"images/image-{image_id:07d}.png"
