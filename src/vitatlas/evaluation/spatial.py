"""Spatial coherence: Moran's I of an atom's activation map on the patch grid.

For one image and one atom, x_i is the atom's activation (|code|, 0 where it does not fire) on patch
cell i of the g × g grid, and w_ij = 1 when cells i ≠ j touch by an edge or a corner (queen
contiguity: up to 8 neighbours), else 0. Moran's I is the standard

    I = (N / W) · Σ_ij w_ij (x_i − x̄)(x_j − x̄) / Σ_i (x_i − x̄)²,   W = Σ_ij w_ij, N = g²,

near +1 when high values sit next to high values (one blob), near E[I] = −1/(N − 1) ≈ 0 for a map
with no spatial structure, negative for a checkerboard.

An atom's ``spatial_coherence`` is the mean of I over the images where it fires on at least
``MIN_FIRING_PATCHES`` patches and on at most ``MAX_FIRING_FRACTION`` of them: with one or two firing
patches I measures nothing, and a map that fires almost everywhere says how smooth a background
atom's values are rather than whether it picks out a region. Atoms with no such image have none, and
the dictionary's ``spatial_coherence`` is the mean over the atoms that have one
(``spatial_coherence_atoms`` of them). Only images whose every patch cell was evaluated count.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_FIRING_PATCHES = 4
MAX_FIRING_FRACTION = 0.9
IMAGE_CHUNK_BYTES = 32 << 20


def grid_layout(manifest: dict) -> tuple[list[int] | None, list[int] | None]:
    """(patch grid [g, g], grid cell of each of an image's rows with −1 for CLS/registers), or (None, None),
    from a store manifest (its token positions, the model's patch size and the input size)."""
    positions = manifest.get("token_positions")
    model = manifest.get("model") or {}
    if not positions or len(positions) < 2 or not model.get("patch_size"):
        return None, None
    side = int((manifest.get("preprocessing") or {}).get("out_size") or model.get("image_size", 0))
    g = side // int(model["patch_size"])
    prefix = int(model.get("n_prefix_tokens", 1))
    cells = [p - prefix if p >= prefix else -1 for p in positions]
    if g <= 0 or max(cells) >= g * g:
        return None, None
    return [g, g], cells


def _neighbour_sum(z: torch.Tensor) -> torch.Tensor:
    """Σ over the 8 queen neighbours of every cell; z (..., g, g, A), cells off the grid count 0."""
    g0, g1 = z.shape[-3], z.shape[-2]
    p = torch.nn.functional.pad(z, (0, 0, 1, 1, 1, 1))
    out = torch.zeros_like(z)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                out += p[..., 1 + dy:1 + dy + g0, 1 + dx:1 + dx + g1, :]
    return out


def morans_i(maps: torch.Tensor) -> torch.Tensor:
    """Moran's I (queen contiguity) of each map: maps (..., g, g, A) -> (..., A); NaN for a constant map."""
    g0, g1 = maps.shape[-3], maps.shape[-2]
    z = maps - maps.mean(dim=(-3, -2), keepdim=True)
    num = (z * _neighbour_sum(z)).sum(dim=(-3, -2))
    den = (z * z).sum(dim=(-3, -2))
    w = float(_neighbour_sum(torch.ones(1, g0, g1, 1, dtype=maps.dtype)).sum())
    return torch.where(den > 0, (g0 * g1 / w) * num / torch.where(den > 0, den, 1), torch.nan)


def spatial_coherence(acts: np.ndarray, image_ids: np.ndarray, cells: np.ndarray, grid: list[int]) -> dict:
    """Per-atom and mean Moran's I (module docstring) from activations of patch rows.

    acts: (rows, A) activations (|code|); image_ids: (rows,) image of each row; cells: (rows,) grid
    cell of each row (−1: not a patch, skipped). Images missing any cell are skipped.
    Returns ``{"spatial_coherence", "spatial_coherence_atoms", "atoms": {"spatial_coherence",
    "spatial_images"}}`` (per-atom mean I, NaN where no image qualifies, and the images counted).
    """
    g0, g1 = grid
    n_cells = g0 * g1
    n_atoms = acts.shape[1]
    patch = cells >= 0
    rows = np.flatnonzero(patch)
    uniq, inv = np.unique(image_ids[rows], return_inverse=True)
    # a (images, cells) table of row numbers; an image is complete when every cell has a row
    table = np.full((uniq.size, n_cells), -1, np.int64)
    table[inv, cells[rows]] = rows
    table = table[(table >= 0).all(1)]
    total = np.zeros(n_atoms)
    counted = np.zeros(n_atoms, np.int64)
    chunk = max(1, IMAGE_CHUNK_BYTES // (4 * n_cells * max(n_atoms, 1)))
    lo, hi = MIN_FIRING_PATCHES, MAX_FIRING_FRACTION * n_cells
    for s in range(0, table.shape[0], chunk):
        # float32: sums over one image's cells; the reference test bounds the rounding
        maps = torch.from_numpy(np.asarray(acts[table[s:s + chunk].reshape(-1)], dtype=np.float32))
        maps = maps.reshape(-1, g0, g1, n_atoms)
        firing = (maps != 0).sum(dim=(1, 2))
        ok = (firing >= lo) & (firing <= hi)
        i = morans_i(maps)
        ok &= ~torch.isnan(i)
        total += torch.where(ok, i, 0).double().sum(0).numpy()
        counted += ok.sum(0).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        per_atom = np.where(counted > 0, total / np.maximum(counted, 1), np.nan)
    measured = counted > 0
    return {"spatial_coherence": float(per_atom[measured].mean()) if measured.any() else float("nan"),
            "spatial_coherence_atoms": int(measured.sum()), "spatial_coherence_images": int(table.shape[0]),
            "atoms": {"spatial_coherence": per_atom, "spatial_images": counted}}
