"""``AtomCards``: what the interpret pass found for every atom, and its files on disk.

Directory layout (the contract the explorer reads)::

    cards.json       run, store, settings; ``complete`` is written true last (the commit point)
    atoms.jsonl      one JSON object per atom, in atom order (see ``atom_record``)
    top.safetensors  image_ids (A, N) int64 (−1 padding), values (A, N) float32 (0 at padding),
                     patch_values (A, N, P) float16 (patch/all-token stores), and neg_* for signed codes
    images/image-0000412.png          model-input crop of every image in some top list
    cards/atom-00017.png              top images with heatmaps (+ -patches.png, -negative.png)
    index.html

Negative side (signed codes): the atom's negation treated as an atom of its own, so its values are
magnitudes (−code > 0), sorted descending like the positive side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import VitatlasError
from ..io import atomic_write_json, atomic_writer, load_safetensors, read_json
from .tensorfile import save_safetensors

FORMAT = "vitatlas-atom-cards"
FORMAT_VERSION = 1


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, streamed to a temporary file renamed into place (no whole-file string)."""
    with atomic_writer(path) as f:
        for rec in records:
            f.write((json.dumps(rec) + "\n").encode())


@dataclass
class AtomCards:
    """Per-atom top images, statistics, labels and descriptions (``vitatlas.interpret``'s result).

    ``meta`` is cards.json, ``atoms`` the atoms.jsonl records, ``tensors`` top.safetensors. Built by
    ``vitatlas.interpret``; ``save(dir)`` writes everything (cards PNGs too), ``AtomCards.load(dir)``
    reads it back without the store.
    """

    meta: dict
    atoms: list[dict]
    tensors: dict[str, torch.Tensor]
    store: object = field(default=None, repr=False)  # the ActivationStore, to load images when saving

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)

    @property
    def has_images(self) -> bool:
        return bool(self.meta.get("has_images"))

    def atom(self, i: int) -> dict:
        """The record of atom ``i`` (as in atoms.jsonl)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise VitatlasError(f"atom id must be an integer, got {type(i).__name__}")
        if not 0 <= int(i) < self.n_atoms:
            raise VitatlasError(f"atom {int(i)} is out of range: these cards hold atoms 0..{self.n_atoms - 1}")
        return self.atoms[int(i)]

    def max_activations(self) -> np.ndarray:
        """(A,) each atom's largest observed activation (0 for atoms that never fire): for interventions."""
        return np.array([a["max_activation"] or 0.0 for a in self.atoms], np.float32)

    # ---- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path, *, progress: bool = True, reuse_images: bool = False, render: bool = True
             ) -> Path:
        """Write the directory layout above. ``reuse_images`` keeps PNGs already there (a resumed run);
        ``render=False`` writes no PNGs (statistics, top lists and index.html only)."""
        from .html import write_index
        from .render_cards import render_all

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / "cards.json", self.meta | {"complete": False})
        save_safetensors(path / "top.safetensors", self.tensors)
        _write_jsonl(path / "atoms.jsonl", self.atoms)
        if render:
            render_all(self, path, progress=progress, reuse=reuse_images)
        write_index(self, path)
        self.meta["complete"] = True
        atomic_write_json(path / "cards.json", self.meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> AtomCards:
        path = Path(path)
        meta = read_json(path / "cards.json", what="atom cards")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise VitatlasError(f"{path / 'cards.json'} is not a vitatlas atom-cards file")
        if meta.get("version", 0) > FORMAT_VERSION:
            raise VitatlasError(f"{path} was written by a newer vitatlas; upgrade vitatlas to read it")
        if not meta.get("complete"):
            raise VitatlasError(f"the cards in {path} are incomplete: re-run the same `vitatlas interpret` command")
        lines = (path / "atoms.jsonl").read_text().splitlines() if (path / "atoms.jsonl").is_file() else []
        try:
            atoms = [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError:
            raise VitatlasError(f"{path / 'atoms.jsonl'} is corrupt: re-run `vitatlas interpret`") from None
        if len(atoms) != meta.get("n_atoms"):
            raise VitatlasError(f"{path / 'atoms.jsonl'} holds {len(atoms)} atoms but cards.json says "
                                f"{meta.get('n_atoms')}: re-run `vitatlas interpret`")
        return cls(meta, atoms, load_safetensors(path / "top.safetensors", "top examples"))
