"""Baselines: fit / encode / decode / save / load, their L0, and references from scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitatlas
from vitatlas.learners.baselines import (
    KMeansBaseline,
    PCABaseline,
    RandomDictionary,
    SklearnDictionaryLearning,
    make_baseline,
    omp,
)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((300, 5)) @ rng.standard_normal((5, 16)) + 2.0
            + 0.1 * rng.standard_normal((300, 16))).astype(np.float32)


CASES = [("pca", lambda: PCABaseline(4), 4),
         ("kmeans", lambda: KMeansBaseline(12, n_iter=5), 1),
         ("random", lambda: RandomDictionary(24, 3), 3),
         ("sklearn-dl", lambda: SklearnDictionaryLearning(24, 3, max_rows=200, batch_size=100), 3)]


@pytest.mark.parametrize("kind,make,l0", CASES, ids=[c[0] for c in CASES])
def test_baseline_roundtrip(kind, make, l0, data, tmp_path):
    model = make().fit(data)
    assert model.kind == kind and model.d == 16
    codes = model.encode(data)
    assert codes.shape == (300, model.n_atoms)
    assert np.all((codes != 0).sum(1) == l0)
    np.testing.assert_allclose(torch.linalg.norm(model.atoms, dim=1).numpy(), 1.0, atol=1e-5)
    rec = model.reconstruct(data)
    np.testing.assert_allclose(model.decode(codes), rec, atol=1e-4)
    back = vitatlas.load(model.save(tmp_path / kind))
    assert type(back) is type(model) and back._config() == model._config()
    np.testing.assert_allclose(back.reconstruct(data), rec, atol=1e-5)
    assert back.fit_info["source"] == "array"
    r = vitatlas.evaluate(back, data)
    assert r["l0"] == pytest.approx(l0)


def test_pca_matches_sklearn(data):
    from sklearn.decomposition import PCA

    ours = PCABaseline(4).fit(data).reconstruct(data)
    ref = PCA(4, svd_solver="full").fit(data.astype(np.float64))
    np.testing.assert_allclose(ours, ref.inverse_transform(ref.transform(data.astype(np.float64))), atol=1e-4)


def test_omp_matches_sklearn():
    from sklearn.linear_model import orthogonal_mp

    rng = np.random.default_rng(1)
    D = rng.standard_normal((40, 20))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    x = rng.standard_normal((30, 20))
    ours = omp(torch.from_numpy(x), torch.from_numpy(D), 5, chunk=7).numpy()
    ref = orthogonal_mp(D.T, x.T, n_nonzero_coefs=5).T
    np.testing.assert_allclose(ours, ref, atol=1e-8)


def test_kmeans_codes_pick_nearest_centroid(data):
    km = KMeansBaseline(8, n_iter=10, seed=2).fit(data)
    cents = km.centroids.numpy()
    rec = km.reconstruct(data)
    nearest = ((data[:, None, :] - cents[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_allclose(rec, cents[nearest], atol=1e-4)
    # k-means should beat a random assignment by far
    assert ((data - rec) ** 2).sum() < 0.5 * ((data - cents[np.arange(300) % 8]) ** 2).sum()


def test_sklearn_dl_beats_random_floor(data):
    sk = SklearnDictionaryLearning(24, 3, max_rows=300, batch_size=100, max_iter=3).fit(data)
    rnd = RandomDictionary(24, 3).fit(data)
    err = lambda m: ((data - m.reconstruct(data)) ** 2).sum()  # noqa: E731
    assert err(sk) < err(rnd)


def test_baseline_validation(data):
    with pytest.raises(vitatlas.VitatlasError, match="k <= d"):
        PCABaseline(17).fit(data)
    with pytest.raises(vitatlas.VitatlasError, match="at least that many rows"):
        KMeansBaseline(400).fit(data)
    with pytest.raises(vitatlas.VitatlasError, match="exceeds the width"):
        RandomDictionary(40, 17).fit(data)
    with pytest.raises(vitatlas.VitatlasError, match="cannot exceed n_atoms"):
        RandomDictionary(4, 5)
    with pytest.raises(vitatlas.VitatlasError, match="positive integer"):
        RandomDictionary(4, 0)
    with pytest.raises(vitatlas.VitatlasError, match="unknown baseline"):
        make_baseline("ica", n_atoms=4, k=2)
    with pytest.raises(vitatlas.VitatlasError, match="not fitted"):
        RandomDictionary(4, 2).encode(data)
    with pytest.raises(vitatlas.VitatlasError, match="NaN"):
        PCABaseline(2).fit(np.array([[1.0, np.nan], [0.0, 1.0]]))
    if not torch.cuda.is_available():
        with pytest.raises(vitatlas.VitatlasError, match="CUDA is not available"):
            PCABaseline(2, device="cuda")
