"""The scorecard's new measures against slow obvious references: Moran's I, near-duplicate atoms, the
shared image-level labels, and the one definition the cards and the report share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitatlas.evaluation.labels import CONFIDENT_KAPPA, LABEL_IMAGES, concept_labels, confident_count, label_atoms
from vitatlas.evaluation.metrics import max_coherence, near_duplicates
from vitatlas.evaluation.spatial import MAX_FIRING_FRACTION, MIN_FIRING_PATCHES, morans_i, spatial_coherence


def morans_i_reference(x: np.ndarray) -> float:
    """Moran's I of one g x g map, float64, with the queen weight matrix written out cell by cell."""
    g0, g1 = x.shape
    v = x.reshape(-1).astype(np.float64)
    n = v.size
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            (ai, bi), (aj, bj) = divmod(i, g1), divmod(j, g1)
            if i != j and abs(ai - aj) <= 1 and abs(bi - bj) <= 1:
                w[i, j] = 1.0
    z = v - v.mean()
    num = sum(w[i, j] * z[i] * z[j] for i in range(n) for j in range(n))
    den = float((z * z).sum())
    return n / w.sum() * num / den if den > 0 else float("nan")


@pytest.mark.parametrize("shape", [(5, 5), (4, 7), (1, 6)])
def test_morans_i_matches_the_double_loop_on_random_maps(shape):
    rng = np.random.default_rng(sum(shape))
    maps = rng.standard_normal((3, *shape, 4))  # 3 images, 4 atoms
    maps[maps < 0.3] = 0.0  # sparse, like codes
    got = morans_i(torch.from_numpy(maps)).numpy()
    want = np.array([[morans_i_reference(maps[b, :, :, a]) for a in range(4)] for b in range(3)])
    assert np.isfinite(want).mean() >= 0.5
    # float64 both ways, sums in different orders: agreement to rounding, far below any difference I shows
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_morans_i_separates_a_blob_from_scattered_patches_and_stripes():
    g = 8
    blob = np.zeros((g, g))
    blob[2:5, 3:6] = 1.0
    stripes = (np.indices((g, g))[1] % 2).astype(float)  # 6 of a cell's 8 queen neighbours differ
    scattered = np.zeros(g * g)
    scattered[np.random.default_rng(0).choice(g * g, 9, replace=False)] = 1.0
    maps = torch.from_numpy(np.stack([blob, scattered.reshape(g, g), stripes])[..., None])
    i_blob, i_scattered, i_stripes = morans_i(maps)[:, 0].tolist()
    assert i_blob > 0.5 > i_scattered
    assert abs(i_scattered) < 0.3
    assert i_stripes < -0.3
    assert bool(torch.isnan(morans_i(torch.ones(1, g, g, 1, dtype=torch.float64))).all())  # constant: undefined


def _rows(maps: np.ndarray):
    """(images, g, g, A) maps -> activations of the rows of a patch store, image ids and cells."""
    n_img, g0, g1, n_atoms = maps.shape
    acts = maps.reshape(n_img * g0 * g1, n_atoms).astype(np.float32)
    return acts, np.repeat(np.arange(n_img) * 3 + 1, g0 * g1), np.tile(np.arange(g0 * g1), n_img)


def test_spatial_coherence_planted_clustered_atom_beats_random_atom():
    """Atom 0 fires on one random 3x3 blob per image, atom 1 on 9 random patches: coherence tells them apart."""
    rng = np.random.default_rng(1)
    g, n_img = 10, 12
    maps = np.zeros((n_img, g, g, 2))
    for b in range(n_img):
        r, c = rng.integers(0, g - 3, 2)
        maps[b, r:r + 3, c:c + 3, 0] = rng.uniform(0.5, 1.5, (3, 3))
        cells = rng.choice(g * g, 9, replace=False)
        maps[b, cells // g, cells % g, 1] = rng.uniform(0.5, 1.5, 9)
    out = spatial_coherence(*_rows(maps), [g, g])
    per_atom = out["atoms"]["spatial_coherence"]
    assert per_atom[0] > 0.4 and abs(per_atom[1]) < 0.15
    assert out["atoms"]["spatial_images"].tolist() == [n_img, n_img]
    assert out["spatial_coherence"] == pytest.approx(per_atom.mean())
    # each image's I equals the reference, so the mean is the mean of the references
    want = np.mean([morans_i_reference(maps[b, :, :, 0]) for b in range(n_img)])
    assert per_atom[0] == pytest.approx(want, rel=1e-5)  # float32 sums over 100 cells: ~1e-7 relative each


def test_spatial_coherence_thresholds_and_incomplete_images():
    g = 6
    maps = np.zeros((3, g, g, 3))
    maps[:, 0, :MIN_FIRING_PATCHES - 1, 0] = 1.0           # too few firing patches
    maps[:, :, :, 1] = np.random.default_rng(2).uniform(0.1, 1, (3, g, g))  # fires everywhere
    assert g * g > MAX_FIRING_FRACTION * g * g
    maps[:, 1:3, 1:3, 2] = 1.0                             # 4 patches: measured
    acts, ids, cells = _rows(maps)
    out = spatial_coherence(acts, ids, cells, [g, g])
    assert out["atoms"]["spatial_images"].tolist() == [0, 0, 3]
    assert np.isnan(out["atoms"]["spatial_coherence"][:2]).all()
    assert out["spatial_coherence_atoms"] == 1
    # drop one row of the first image: that image no longer counts; a non-patch row (-1) is ignored
    keep = np.ones(len(ids), bool)
    keep[5] = False
    cells2 = cells.copy()
    cells2[40] = -1  # a CLS-like row of image 2 (its cell 4 is now missing too)
    out2 = spatial_coherence(acts[keep], ids[keep], cells2[keep], [g, g])
    assert out2["spatial_coherence_images"] == 1
    assert out2["atoms"]["spatial_images"].tolist() == [0, 0, 1]


def test_near_duplicates_by_hand_and_against_the_pairwise_reference():
    atoms = torch.tensor([[1.0, 0, 0], [0.95, 0.1, 0], [0, 1.0, 0], [0, 0, 0], [-1.0, 0.05, 0]])
    got = near_duplicates(atoms)
    # pairs over 0.9: (0,1), (0,4), (1,4); the zero atom is in none
    assert got == {"near_duplicate_pairs": 3, "near_duplicate_atoms": pytest.approx(3 / 5)}
    rng = np.random.default_rng(3)
    a = rng.standard_normal((60, 4))
    a[30:] = a[:30] + 0.2 * rng.standard_normal((30, 4))
    u = a / np.linalg.norm(a, axis=1, keepdims=True)
    cos = np.abs(u @ u.T)
    np.fill_diagonal(cos, 0)
    want_pairs = int((np.triu(cos, 1) > 0.9).sum())
    got = near_duplicates(torch.from_numpy(a), chunk=7)
    assert got["near_duplicate_pairs"] == want_pairs > 0
    assert got["near_duplicate_atoms"] == pytest.approx((cos > 0.9).any(1).mean())
    assert max_coherence(torch.from_numpy(a)) == pytest.approx(cos.max())


def test_concept_labels_use_the_top_images_and_count_confident_atoms():
    """Labels from the 32 best images (not rows); κ > 0.5 counted once, by one function."""
    rng = np.random.default_rng(4)
    n_img = 200
    y = np.arange(n_img) % 4
    acts = np.zeros((n_img, 3), np.float32)
    acts[:, 0] = np.where(y == 2, rng.uniform(1, 2, n_img), rng.uniform(0, 0.5, n_img))  # class 2, clean
    acts[:, 1] = rng.uniform(0, 1, n_img)                                                 # no class
    acts[:3, 2] = [3.0, 2.0, 1.0]                                                         # 3 images: too few
    lab, summary = concept_labels(acts, y)
    # reference: label_atoms over the top LABEL_IMAGES images of each column by value
    top = np.argsort(-acts, axis=0, kind="stable")[:LABEL_IMAGES]
    top = np.where(np.take_along_axis(acts, top, 0) > 0, top, -1)
    want = label_atoms(top, y, min_support=5)
    np.testing.assert_array_equal(lab["label"], want["label"])
    np.testing.assert_allclose(lab["kappa"], want["kappa"], equal_nan=True)
    assert lab["label"][0] == 2 and lab["kappa"][0] == pytest.approx(1.0) and lab["label"][2] == -1
    assert summary["n_labelled_atoms"] == 2
    assert summary["n_confident_atoms"] == confident_count(lab["kappa"]) == 1
    assert summary["confident_fraction"] == pytest.approx(1 / 3)
    assert lab["faithfulness"][0] == pytest.approx(1.0)
    assert confident_count(np.array([np.nan, CONFIDENT_KAPPA, CONFIDENT_KAPPA + 1e-9])) == 1


def test_evaluate_keeps_whole_images_under_a_memory_budget_and_checks_the_grid():
    from vitatlas import VitatlasError
    from vitatlas.evaluation import evaluate
    from vitatlas.learners.baselines import RandomDictionary

    rng = np.random.default_rng(6)
    g, n_img = 3, 20
    X = rng.standard_normal((n_img * g * g, 5)).astype(np.float32)
    ids = np.repeat(np.arange(n_img), g * g)
    cells = np.tile(np.arange(g * g), n_img)
    y = np.repeat(np.arange(n_img) % 2, g * g)
    dic = RandomDictionary(6, 5, seed=0).fit(X)  # 5 of 6 atoms per row: every 3x3 map qualifies or not by value
    out = evaluate(dic, X, y, image_ids=ids, patch_grid=[g, g], patch_cells=cells, memory_budget=4 * 6 * 50)
    assert out["settings"]["rows_for_auroc"] == 45  # 5 whole images of 9 rows fit in room for 50 rows
    assert out["spatial_coherence_images"] == 5
    assert out["settings"]["images_for_labels"] == n_img  # the image maxima are not cut by the row budget
    with pytest.raises(VitatlasError, match="patch_cells"):
        evaluate(dic, X, y, image_ids=ids, patch_grid=[g, g], patch_cells=cells[:-1])
