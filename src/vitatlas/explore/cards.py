"""Read one atom-cards directory (written by ``vitatlas interpret``) for the explorer.

The layout is the one agreed in the interpretation work: ``cards.json`` (what was made), ``atoms.jsonl``
(one JSON object per atom, in atom order), ``top.safetensors`` (per atom its top image ids, values and
per-patch values for heatmaps), ``images/image-XXXXXXX.png`` and ``cards/atom-XXXXX[-patches].png``.
This module only reads it; it never writes into the directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import VitatlasError

# The only file names the explorer will ever serve out of a cards directory.
CARD_FILE = re.compile(r"^atom-\d{5,7}(-patches)?\.(png|webp)$")
IMAGE_FILE = re.compile(r"^image-\d{7,9}\.png$")


class CardSet:
    """Atom cards of one run, loaded from ``path``.

    ``atoms`` is the list of per-atom dicts (atoms.jsonl), ``meta`` the cards.json object; the
    top-activation tensors are read on first use.
    """

    def __init__(self, path: str | Path):
        from ..interpret.cards import AtomCards

        self.path = Path(path)
        if not self.path.is_dir():
            raise VitatlasError(f"no atom cards at {self.path}: make them with `vitatlas interpret RUN --acts DIR "
                                f"--out {self.path}`")
        cards = AtomCards.load(self.path)
        self.meta, self.atoms = cards.meta, cards.atoms
        self.n_atoms = len(self.atoms)
        for i, atom in enumerate(self.atoms):
            if atom.get("id") != i:
                raise VitatlasError(f"{self.path / 'atoms.jsonl'} line {i + 1} is atom {atom.get('id')!r}, "
                                    f"expected {i}: "
                                    "the file is damaged; re-run `vitatlas interpret`")
        # kept as torch tensors (float16 patch values stay float16: 16,384 atoms x 16 images x 256 patches
        # is 134 MB); one atom's rows are converted when its page is asked for
        self._top = cards.tensors

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        grid = self.meta.get("patch_grid")
        return (int(grid[0]), int(grid[1])) if grid else None

    @property
    def max_activations(self) -> np.ndarray:
        """(A,) each atom's max observed activation (0 for atoms that never fired)."""
        return np.array([float(a.get("max_activation") or 0.0) for a in self.atoms], dtype=np.float64)

    def top(self) -> dict:
        """The tensors of top.safetensors (torch, as stored)."""
        return self._top

    def patch_values(self, atom: int, negative: bool = False) -> list[list[float]] | None:
        """Per top image of ``atom``, its activation on every patch (for heatmaps), or None."""
        key = "neg_patch_values" if negative else "patch_values"
        top = self.top()
        if key not in top:
            return None
        values = top[key][atom].float().numpy()
        ids = top["neg_image_ids" if negative else "image_ids"][atom].numpy()
        return [np.round(values[j], 4).tolist() for j in range(values.shape[0]) if ids[j] >= 0]

    def file(self, folder: str, name: str) -> Path | None:
        """A generated file of this cards directory, or None when ``name`` is not one we serve."""
        pattern = CARD_FILE if folder == "cards" else IMAGE_FILE if folder == "images" else None
        if pattern is None or not pattern.match(name):
            return None
        path = self.path / folder / name
        return path if path.is_file() else None

    def image_file(self, image_id: int) -> Path | None:
        return self.file("images", f"image-{image_id:07d}.png")

    def card_files(self, atom: int) -> dict[str, str]:
        """Names of the atom's card PNGs that exist: {"card": ..., "patches": ...}."""
        out = {}
        for key, suffix in (("card", ""), ("patches", "-patches")):
            for ext in ("png", "webp"):
                name = f"atom-{atom:05d}{suffix}.{ext}"
                if (self.path / "cards" / name).is_file():
                    out[key] = name
                    break
        return out


def best_label(atom: dict) -> dict | None:
    """The atom's first class label entry, or None."""
    labels = atom.get("labels") or []
    return labels[0] if labels and isinstance(labels[0], dict) else None


def best_description(atom: dict) -> dict | None:
    """The description with the highest score (class, text or caption), or None."""
    descs = [d for d in (atom.get("descriptions") or []) if isinstance(d, dict) and d.get("text")]
    if not descs:
        return None
    return max(descs, key=lambda d: _num(d.get("score"), -np.inf))


def _num(value, default=np.nan) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if np.isfinite(v) else default
