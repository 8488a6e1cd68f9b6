"""Reconstruction / sparsity / coherence metrics against hand-computed numpy values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import vitatlas
from vitatlas.dictionary import Dictionary
from vitatlas.evaluation import evaluate
from vitatlas.evaluation.metrics import auroc, auroc_for_labels, frequency_histogram, max_coherence


class Threshold(Dictionary):
    """Test dictionary: given atoms, code = x·atoms kept only where |x·a| > t (atoms orthonormal here)."""

    kind = "random"  # any registered kind; never saved in these tests

    def __init__(self, atoms, t=0.5):
        self._a = torch.as_tensor(np.asarray(atoms, np.float32))
        self.n_atoms, self.d, self.t, self.fit_info = self._a.shape[0], self._a.shape[1], t, {}

    @property
    def atoms(self):
        return self._a

    def _encode(self, x):
        c = x @ self._a.T
        return torch.where(c.abs() > self.t, c, torch.zeros_like(c))

    def fit(self, X, **kw):
        return self

    def _config(self):
        return {}

    def _state(self):
        return {}

    def _load_state(self, tensors, meta):
        pass


X_HAND = np.array([[1.0, 0.2, 0.0],
                   [0.0, 2.0, 0.3],
                   [0.1, 0.0, 0.0]])


def test_reconstruction_metrics_by_hand():
    r = evaluate(Threshold(np.eye(3)), X_HAND, batch_size=2)
    # x̂ = [[1,0,0],[0,2,0],[0,0,0]]; errors (0,.2,0), (0,0,.3), (.1,0,0)
    sr = 1 - np.mean([0.2 / np.sqrt(1.04), 0.3 / np.sqrt(4.09), 0.1 / 0.1])
    mean = X_HAND.mean(0)
    ev = 1 - (0.04 + 0.09 + 0.01) / ((X_HAND - mean) ** 2).sum()
    assert r["signal_recovered"] == pytest.approx(sr, abs=1e-6)
    assert r["explained_variance"] == pytest.approx(ev, abs=1e-6)
    assert r["mse"] == pytest.approx(0.14 / 9, abs=1e-7)
    assert r["l0"] == pytest.approx(2 / 3)
    assert r["l0_median"] == 1.0  # per-row non-zeros (1, 1, 0)
    assert r["dead_fraction"] == pytest.approx(1 / 3)  # atom 2 never fires
    assert r["dense_fraction"] == pytest.approx(2 / 3)  # atoms 0 and 1 fire on 1/3 > 1% of rows
    assert r["max_coherence"] == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(r["atoms"]["frequency"], [1 / 3, 1 / 3, 0])
    assert r["frequency_histogram"]["n_dead"] == 1
    assert sum(r["frequency_histogram"]["counts"]) == 2


def test_dense_fraction_threshold():
    # 200 rows; atom 0 fires on 3 rows (1.5% > 1%), atom 1 on 2 rows (exactly 1%: not dense)
    X = np.zeros((200, 2))
    X[:3, 0] = 1.0
    X[3:5, 1] = 1.0
    r = evaluate(Threshold(np.eye(2)), X)
    assert r["dense_fraction"] == pytest.approx(0.5)
    assert r["dead_fraction"] == 0.0
    assert r["signal_recovered"] == pytest.approx(1.0)  # zero rows are left out of the mean


def test_max_coherence_by_hand_and_chunked():
    atoms = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    assert max_coherence(atoms) == pytest.approx(0.8)
    assert max_coherence(atoms[:1]) is None
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    g = np.abs(a @ a.T)
    np.fill_diagonal(g, 0)
    assert max_coherence(torch.from_numpy(a), chunk=7) == pytest.approx(g.max(), abs=1e-12)


def test_explained_variance_exact_with_large_mean():
    # the streamed (Chan) denominator must stay exact when the data sit far from the origin
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((500, 4)) + 1e3).astype(np.float32)
    dic = Threshold(np.eye(4), t=1e3)  # codes only where |x| > 1000
    r = evaluate(dic, X, batch_size=37)
    x = X.astype(np.float64)
    xh = np.where(np.abs(x) > 1e3, x, 0)
    ev = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert r["explained_variance"] == pytest.approx(ev, rel=1e-9)


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    scores = np.round(rng.standard_normal((300, 6)), 1)  # many ties
    scores[:, 5] = 0.0  # a constant column
    pos = rng.random((300, 6)) < 0.3
    got = auroc(scores, pos)
    want = [roc_auc_score(pos[:, j], scores[:, j]) for j in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.isnan(auroc(scores[:, :1], np.zeros(300, bool))[0])


def test_auroc_for_labels_matches_sklearn():
    rng = np.random.default_rng(3)
    scores = np.maximum(rng.standard_normal((200, 9)), 0)  # sparse-ish with ties at 0
    row_labels = rng.integers(0, 4, 200)
    atom_labels = np.array([0, 1, 2, 3, -1, 0, 1, 2, 3])
    got = auroc_for_labels(scores, row_labels, atom_labels, chunk=4)
    for a, c in enumerate(atom_labels):
        if c < 0:
            assert np.isnan(got[a])
        else:
            assert got[a] == pytest.approx(roc_auc_score(row_labels == c, scores[:, a]), abs=1e-12)


def test_frequency_histogram_bins():
    freq = np.array([0.0, 1e-3, 0.01, 0.5, 1.0, 0.0])
    h = frequency_histogram(freq, n_rows=1000)
    assert h["edges"][0] == pytest.approx(1e-3) and h["edges"][-1] == pytest.approx(1.0)
    assert h["n_dead"] == 2 and sum(h["counts"]) == 4
    assert len(h["edges"]) == 3 * 4 + 1


def test_streaming_store_equals_in_memory(tmp_path):
    from vitatlas.learners.baselines import RandomDictionary

    rng = np.random.default_rng(4)
    X = rng.standard_normal((257, 12)).astype(np.float32)
    y = rng.integers(0, 3, 257)
    store = vitatlas.ActivationStore.from_array(tmp_path / "s", X, y, shard_bytes=12 * 4 * 50)  # 6 shards
    assert len(store.shards) > 1
    dic = RandomDictionary(20, 3, seed=1).fit(X)
    a = evaluate(dic, store, batch_size=16, top_n=8)  # labels from the store
    b = evaluate(dic, X, y, batch_size=4096, top_n=8)
    for key, v in b.items():
        if isinstance(v, float):
            assert a[key] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), key
    # Batches of 16 and of 4,096 encode through different BLAS shapes (last-bit differences, see
    # tests/_tolerance.py): the same rows must be kept, but two nearly equal values may swap places.
    codes = np.abs(dic.encode(X))
    gaps = np.diff(np.sort(codes, axis=0), axis=0)
    assert gaps[gaps > 0].min() > 1e-5, "test data has near-equal codes: the top rows could change"
    np.testing.assert_array_equal(np.sort(a["atoms"]["top_rows"], axis=1), np.sort(b["atoms"]["top_rows"], axis=1))
    np.testing.assert_array_equal(a["atoms"]["label"], b["atoms"]["label"])
    # the top rows really are the largest |codes| among firing rows
    for j in range(20):
        firing = np.nonzero(codes[:, j])[0]
        want = firing[np.argsort(-codes[firing, j], kind="stable")][:8]
        got = a["atoms"]["top_rows"][j]
        np.testing.assert_array_equal(np.sort(got[got >= 0]), np.sort(want))


def test_row_subsample_when_over_memory_budget():
    from vitatlas.learners.baselines import RandomDictionary

    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 6)).astype(np.float32)
    y = rng.integers(0, 2, 300)
    dic = RandomDictionary(10, 2).fit(X)
    full = evaluate(dic, X, y)
    sub = evaluate(dic, X, y, memory_budget=4 * 10 * 100)  # room for 100 rows of activations
    assert full["settings"]["rows_for_auroc"] == 300 and sub["settings"]["rows_for_auroc"] == 100
    # the streamed metrics do not depend on the subsample
    assert sub["explained_variance"] == pytest.approx(full["explained_variance"])
    assert 0 <= sub["faithfulness"] <= 1


def test_evaluate_input_errors():
    dic = Threshold(np.eye(3))
    with pytest.raises(vitatlas.VitatlasError, match="width"):
        evaluate(dic, np.zeros((4, 5)))
    with pytest.raises(vitatlas.VitatlasError, match="labels"):
        evaluate(dic, np.ones((4, 3)), labels=np.zeros(3, int))
    with pytest.raises(vitatlas.VitatlasError, match="activation"):
        evaluate(dic, np.ones((4, 3)), activation="square")
    with pytest.raises(vitatlas.VitatlasError, match="NaN"):
        evaluate(dic, np.array([[1.0, np.nan, 0]]))


def test_vitatlas_evaluate_callable_after_submodule_import():
    import vitatlas.evaluation.metrics  # noqa: F401  (must not shadow the function)

    r = vitatlas.evaluate(Threshold(np.eye(3)), X_HAND)
    assert r["l0"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("n", [1, 6, 101])
def test_l0_median_streamed(n):
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 5))
    r = evaluate(Threshold(np.eye(5), t=0.7), X, batch_size=4)
    assert r["l0_median"] == np.median((np.abs(X) > 0.7).sum(1))


def test_reconstruction_metrics_match_evaluate():
    """The numbers the fit commands print and the report's come from the same streamed sums."""
    from vitatlas.evaluation.metrics import reconstruction_metrics

    rng = np.random.default_rng(5)
    X = rng.standard_normal((37, 3))
    X[4] = 0.0  # a zero row takes no part in signal_recovered
    dic = Threshold(np.eye(3), t=0.5)
    quick, full = reconstruction_metrics(dic, X, batch_size=8), evaluate(dic, X)
    for key in ("signal_recovered", "explained_variance", "mse", "l0", "dead_fraction", "dense_fraction"):
        assert quick[key] == pytest.approx(full[key]), key
