"""Atom labels, faithfulness, specificity, label_diversity and probing on hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vitatlas.evaluation.labels import label_atoms, label_quality
from vitatlas.evaluation.probing import check_error_identity, downstream_probe, image_split, sparse_probe

ROW_LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2])  # π = (.5, .25, .25)


def _top(cols):
    return np.array(cols).T  # (N, A) from one list of rows per atom


def test_labels_precision_kappa_by_hand():
    top = _top([[0, 1, 2, 4], [4, 5, 6, -1], [0, 3, -1, -1]])
    lab = label_atoms(top, ROW_LABELS, min_support=3)
    # atom 0: classes 0,0,0,1 -> p=(.75,.25,0), p-π=(.25,0,-.25) -> label 0, κ=(.75-.5)/.5
    # atom 1: classes 1,1,2   -> p=(0,2/3,1/3), p-π=(-.5,.417,.083) -> label 1, κ=(2/3-.25)/.75
    # atom 2: only 2 top rows < min_support -> unlabelled
    np.testing.assert_array_equal(lab["label"], [0, 1, -1])
    np.testing.assert_allclose(lab["precision"][:2], [0.75, 2 / 3])
    np.testing.assert_allclose(lab["kappa"][:2], [0.5, 5 / 9])
    np.testing.assert_array_equal(lab["support"], [4, 3, 2])
    np.testing.assert_allclose(lab["prior"], [0.5, 0.25, 0.25])
    q = label_quality(lab, None, None)
    # each label used by one atom: s = 1; specificity = mean κ
    assert q["specificity"] == pytest.approx((0.5 + 5 / 9) / 2)
    assert q["specificity_sharing"] == pytest.approx(1.0)
    assert q["label_diversity"] == pytest.approx(2 / min(3, 2))
    assert q["n_labelled_atoms"] == 2


def test_enrichment_not_majority_picks_label():
    # top rows 0,0,1,1 with π=(.5,.25,.25): majority tie, but class 1 is enriched (0.5 vs 0.25)
    lab = label_atoms(_top([[0, 1, 4, 5]]), ROW_LABELS, min_support=1)
    assert lab["label"][0] == 1


def test_sharing_and_diversity_by_hand():
    top = _top([[0, 1, 2, 4], [4, 5, 6, -1], [1, 2, 3, -1]])
    lab = label_atoms(top, ROW_LABELS, min_support=3)
    np.testing.assert_array_equal(lab["label"], [0, 1, 0])
    acts = np.array([[3, 0, 1], [2, 0, 2], [2, 0, 2], [0, 0, 2],
                     [1, 3, 0], [0, 2, 0], [0, 1, 0], [0, 0, 0]], dtype=float)
    q = label_quality(lab, acts, ROW_LABELS)
    # M = 3 labelled atoms; label 0 shared by 2 -> s = 1 - 1/3, label 1 alone -> s = 1
    kappa = np.array([0.5, 5 / 9, 1.0])
    s = np.array([2 / 3, 1.0, 2 / 3])
    assert q["specificity"] == pytest.approx(np.mean(kappa * s))
    assert q["specificity_precision"] == pytest.approx(kappa.mean())
    assert q["label_diversity"] == pytest.approx(2 / 3)
    faith = [roc_auc_score(ROW_LABELS == c, acts[:, a]) for a, c in enumerate([0, 1, 0])]
    assert q["faithfulness"] == pytest.approx(np.mean(faith))
    np.testing.assert_allclose(lab["faithfulness"], faith)


def test_unlabelled_rows_are_ignored():
    row_labels = np.array([0, -1, 1, 1])
    lab = label_atoms(_top([[1, 0, -1, -1]]), row_labels, min_support=1)
    assert lab["support"][0] == 1 and lab["label"][0] == 0
    np.testing.assert_allclose(lab["prior"], [1 / 3, 2 / 3])


def test_image_split_keeps_images_together():
    ids = np.repeat(np.arange(40), 5)
    test = image_split(ids, test_fraction=0.25, seed=3)
    for i in range(40):
        assert len(set(test[ids == i])) == 1
    assert test.sum() == 10 * 5
    np.testing.assert_array_equal(test, image_split(ids, test_fraction=0.25, seed=3))


def test_sparse_probe_finds_the_informative_atom():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    acts = np.abs(rng.standard_normal((400, 30))) * 0.1
    acts[:, 7] += y * 2.0  # atom 7 fires for class 1, atom 3 for class 0
    acts[:, 3] += (1 - y) * 2.0
    test = image_split(np.arange(400), seed=0)
    r = sparse_probe(acts, y, test, sizes=(1, 5))
    assert r["sparse_probe_acc@1"] > 0.99
    noise = sparse_probe(np.abs(rng.standard_normal((400, 30))), y, test, sizes=(1,))
    assert noise["sparse_probe_acc@1"] < 0.65


def test_error_identity_is_checked():
    x = np.random.default_rng(0).standard_normal((5, 3))
    np.testing.assert_allclose(check_error_identity(x, 0.3 * x), x)
    # an x_hat so large that x̂ + (x − x̂) loses x to rounding must be refused
    with pytest.raises(AssertionError, match="error term"):
        check_error_identity(x.astype(np.float32), np.full((5, 3), 1e9, np.float32))


def test_downstream_probe_reconstruction_and_error_term():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    centers = rng.standard_normal((3, 10)) * 3
    x = centers[y] + rng.standard_normal((300, 10))
    test = image_split(np.arange(300), seed=0)
    perfect = downstream_probe(x, x, y, test)
    assert perfect["probe_acc_original"] == perfect["probe_acc_reconstructed"] == perfect["probe_acc_with_error"]
    assert perfect["probe_acc_original"] > 0.9
    zero = downstream_probe(x, np.zeros_like(x), y, test)
    assert zero["probe_acc_with_error"] == zero["probe_acc_original"]
    assert zero["probe_acc_reconstructed"] < 0.6  # a constant input gets one class for every image


def test_patch_rows_are_averaged_per_image():
    """Several rows per image (a patch store): the downstream probe sees one mean vector per image."""
    import vitatlas
    from vitatlas.learners.baselines import PCABaseline

    rng = np.random.default_rng(2)
    n_img, per = 80, 4
    y_img = rng.integers(0, 2, n_img)
    img = np.repeat(np.arange(n_img) * 7 + 3, per)  # arbitrary, non-contiguous image ids
    X = (np.repeat(y_img, per)[:, None] * 1.5 + rng.standard_normal((n_img * per, 6))).astype(np.float32)
    y = np.repeat(y_img, per)
    pca = PCABaseline(2).fit(X)
    r = vitatlas.evaluate(pca, X, y, image_ids=img)
    x_img = X.reshape(n_img, per, 6).astype(np.float64).mean(1)
    xh_img = pca.reconstruct(X).reshape(n_img, per, 6).astype(np.float64).mean(1)
    want = downstream_probe(x_img, xh_img, y_img, image_split(np.arange(n_img) * 7 + 3, seed=0))
    for key, v in want.items():
        assert r[key] == pytest.approx(v)
    assert r["probe_acc_with_error"] == r["probe_acc_original"]


def test_faithfulness_is_per_image_for_patch_rows():
    """An atom firing on one of the 8 patches of every class-1 image predicts the image label perfectly
    (AUROC 1), although per row it is zero on 7/8 of that class's rows."""
    from vitatlas.evaluation.labels import image_activations

    n_img, per = 40, 8
    y_img = np.arange(n_img) % 2
    img = np.repeat(np.arange(n_img), per)
    acts = np.zeros((n_img * per, 1), np.float32)
    acts[np.arange(n_img) * per + 3, 0] = np.where(y_img == 1, 1.0 + np.arange(n_img) / n_img, 0.0)
    img_acts, img_lab = image_activations(acts, img, np.repeat(y_img, per))
    np.testing.assert_array_equal(img_lab, y_img)
    np.testing.assert_allclose(img_acts[:, 0], acts.reshape(n_img, per).max(1))
    lab = {"label": np.array([1]), "kappa": np.array([1.0]), "prior": np.array([0.5, 0.5])}
    per_image = label_quality(dict(lab), img_acts, img_lab)["faithfulness"]
    per_row = label_quality(dict(lab), acts, np.repeat(y_img, per))["faithfulness"]
    assert per_image == pytest.approx(1.0)
    assert per_row == pytest.approx(0.5 + 0.5 / per)  # what the per-row definition would have said
    # one row per image: nothing to aggregate
    same, same_lab = image_activations(acts[:5], np.arange(5), np.zeros(5, int))
    np.testing.assert_array_equal(same, acts[:5])
