"""``vitatlas.interpret(dictionary, store, ...)``: atom cards for every atom of any dictionary."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import distributed
from ..data.store import ActivationStore
from ..dictionary import Dictionary, check_fitted_on
from ..errors import VitatlasError
from ..evaluation.spatial import grid_layout
from .build import atom_records
from .cards import FORMAT, FORMAT_VERSION, AtomCards
from .descriptions import describe_atoms
from .images import NO_SOURCE_NOTE, has_image_source
from .top_examples import RANKS, SIDES, PassSettings, rows_per_image, top_examples_pass

CHUNK_BYTES = 48 << 20       # dense codes of one chunk (and two temporaries of its size)
FAITH_BYTES = 32 << 20       # per-image activations kept for the faithfulness AUROC
MAX_TOP = 1024


def patch_layout(store: ActivationStore) -> tuple[list[int] | None, list[int] | None]:
    """(patch grid [h, w], grid cell of each of an image's rows with −1 for CLS/registers), or (None, None)."""
    return grid_layout(store.manifest)


def _settings(dictionary: Dictionary, store: ActivationStore, top: int, rank: str, n_atoms: int, seed: int
              ) -> PassSettings:
    P = rows_per_image(store)
    chunk = max(P, CHUNK_BYTES // (4 * 3 * n_atoms) // P * P)
    images = np.unique(store.index[:, 0]).astype(np.int64)
    cap = max(1, FAITH_BYTES // (4 * n_atoms))
    if images.size > cap:
        images = np.sort(np.random.default_rng(seed).choice(images, size=cap, replace=False))
    return PassSettings(top=top, rank=rank, n_atoms=n_atoms, signed=dictionary.kind != "sae", patches=P > 1,
                        chunk_rows=chunk, faith_images=images)


def interpret(dictionary: Dictionary, store: ActivationStore | str | os.PathLike, *, top: int = 16, rank: str = "max",
              vocab: str | os.PathLike | None = None, max_atoms: int | None = None, device: str = "cpu",
              images: bool = True, progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
              run_path: str | os.PathLike | None = None, caption_column: str | None = None,
              seed: int = 0) -> AtomCards | None:
    """Atom cards: per atom its top ``top`` images of ``store`` with per-patch codes, statistics, class
    labels, descriptions and nearest atoms. One streamed pass; see ``top_examples`` and ``build``.

    rank: ``"max"`` or ``"mean"`` over an image's rows. max_atoms: only atoms 0..max_atoms−1.
    images: re-open the store's image source (``False``: statistics only). checkpoint_dir: save the
    running state there every minute and resume from it. run_path: recorded in cards.json.
    vocab / caption_column: passed to ``descriptions.describe_atoms`` (text and caption descriptions).

    Under torchrun every rank streams its part of the store in the top-examples pass; rank 0 returns the
    cards and the other ranks ``None``.
    """
    if not isinstance(dictionary, Dictionary):
        raise VitatlasError(f"interpret needs a fitted vitatlas Dictionary, got {type(dictionary).__name__}")
    dictionary._check_fitted()
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not 1 <= top <= MAX_TOP:
        raise VitatlasError(f"top must be an integer from 1 to {MAX_TOP}, got {top!r}")
    if rank not in RANKS:
        raise VitatlasError(f"unknown rank {rank!r}: use one of {', '.join(RANKS)}")
    if max_atoms is not None and (isinstance(max_atoms, bool) or not isinstance(max_atoms, (int, np.integer))
                                  or max_atoms <= 0):
        raise VitatlasError(f"max_atoms must be a positive integer, got {max_atoms!r}")
    check_fitted_on(dictionary, store, verb="interpret")
    n_atoms = min(int(dictionary.n_atoms), int(max_atoms)) if max_atoms else int(dictionary.n_atoms)
    has_images = bool(images) and has_image_source(store)
    if has_images:
        from .images import open_store_source

        open_store_source(store)  # fail now, before the long pass, when the source is gone

    s = _settings(dictionary, store, int(top), rank, n_atoms, seed)
    state = top_examples_pass(dictionary, store, s, device=device, progress=progress, checkpoint_dir=checkpoint_dir)
    if not distributed.is_main():  # under torchrun the ranks shared the pass; rank 0 alone builds the cards
        return None
    if s.signed and int(state["neg.count"].sum()) == 0:  # codes turned out non-negative: no negative side
        state = {k: v for k, v in state.items() if not k.startswith(SIDES[1] + ".")}
        s.signed = False
    grid, cells = patch_layout(store)
    records, tensors = atom_records(dictionary, store, state, s, np.asarray(cells) if cells else None)
    described = describe_atoms(dictionary, store, tensors["image_ids"].numpy(), vocab=vocab, device=device,
                               progress=progress, caption_column=caption_column)
    records.extra = described

    note = None
    if not has_image_source(store):
        note = NO_SOURCE_NOTE
    elif not has_images:
        note = "images were not loaded (--no-images): cards carry statistics and labels only"
    meta = {"format": FORMAT, "version": FORMAT_VERSION,
            "run": {"path": str(Path(run_path).resolve()) if run_path else None, "learner": dictionary.kind,
                    "n_atoms": int(dictionary.n_atoms), "d": int(dictionary.d)},
            "store": store.describe(), "n_atoms": n_atoms, "top": int(top), "rank": rank, "patch_grid": grid,
            "patch_cells": cells, "token_positions": store.manifest.get("token_positions"),
            "rows_per_image": rows_per_image(store), "has_images": has_images, "signed": s.signed,
            "has_labels": store.labels is not None, "class_names": store.class_names, "note": note,
            "faithfulness_images": int(s.faith_images.size), "complete": False}
    return AtomCards(meta, records, tensors, store=store)
