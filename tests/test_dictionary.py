"""The shared Dictionary machinery, tested with a minimal learner defined here."""

import json

import numpy as np
import pytest
import torch
from _tolerance import product_tolerance

import vitatlas
from vitatlas import ActivationStore, VitatlasError
from vitatlas.arrays import SparseCodes, as_tensor
from vitatlas.data.batches import iter_batches
from vitatlas.dictionary import LEARNERS, Dictionary


class Nearest(Dictionary):
    """Code = the single best-correlated atom's coefficient (matching pursuit with one step)."""

    kind = "test-nearest"

    def __init__(self, n_atoms: int = 8, seed: int = 0):
        self.n_atoms, self.seed = n_atoms, seed
        self._atoms = None

    @property
    def atoms(self):
        return self._atoms

    def fit(self, X, **kwargs):
        X = as_tensor(X)
        g = torch.Generator().manual_seed(self.seed)
        atoms = X[torch.randperm(X.shape[0], generator=g)[: self.n_atoms]]
        self._atoms = atoms / atoms.norm(dim=1, keepdim=True)
        self.d = X.shape[1]
        self.record_fit_source(X)
        return self

    def _encode(self, x):
        corr = x @ self._atoms.T
        best = corr.abs().argmax(dim=1)
        codes = torch.zeros_like(corr)
        codes[torch.arange(len(x)), best] = corr[torch.arange(len(x)), best]
        return codes

    def _config(self):
        return {"n_atoms": self.n_atoms, "seed": self.seed}

    def _state(self):
        return {"atoms": self._atoms}

    def _load_state(self, tensors, meta):
        self._atoms = tensors["atoms"]


@pytest.fixture(autouse=True)
def register(monkeypatch):
    monkeypatch.setitem(LEARNERS, "test-nearest", f"{__name__}:Nearest")


@pytest.fixture
def data():
    return np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)


def test_numpy_in_numpy_out_torch_in_torch_out(data):
    dic = Nearest().fit(data)
    codes = dic.encode(data)
    assert isinstance(codes, np.ndarray) and codes.shape == (300, 8)
    assert isinstance(dic.encode(torch.from_numpy(data)), torch.Tensor)
    np.testing.assert_allclose(dic.reconstruct(data), codes @ dic.atoms.numpy(), atol=1e-6)
    np.testing.assert_allclose(dic.decode(codes), codes @ dic.atoms.numpy(), atol=1e-6)


def test_chunked_encoding_equals_one_shot(data):
    # Chunks of 7 rows and one call of 300 are different BLAS calls: the same atoms must be chosen, and the
    # values agree within the float32 dot-product bound (see tests/_tolerance.py), not bit for bit.
    dic = Nearest().fit(data)
    full = dic.encode(data)
    dic.encode_batch_size = 7
    chunked = dic.encode(data)
    corr = np.abs(data @ dic.atoms.numpy().T)
    top2 = np.sort(corr, axis=1)[:, -2:]
    tol = product_tolerance(data, dic.atoms.numpy())
    assert (top2[:, 1] - top2[:, 0] > 2 * tol.max()).all(), "test data has a near-tie: the choice could flip"
    np.testing.assert_array_equal(chunked != 0, full != 0)
    assert (np.abs(chunked - full) <= tol).all()


def test_sparse_codes_round_trip(data):
    dic = Nearest().fit(data)
    sparse = dic.encode_sparse(data)
    assert sparse.indices.shape == (300, 1) and sparse.n_atoms == 8
    np.testing.assert_allclose(sparse.to_dense().numpy(), dic.encode(data))
    np.testing.assert_allclose(dic.decode(sparse), dic.reconstruct(data), atol=1e-6)


def test_sparse_codes_pad_rows_with_fewer_atoms():
    dense = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    sparse = SparseCodes.from_dense(dense)
    assert sparse.indices.shape == (3, 2)
    assert sparse.indices[1].tolist() == [-1, -1] and sparse.values[1].tolist() == [0.0, 0.0]
    assert sparse.indices[2, 1] == -1
    torch.testing.assert_close(sparse.to_dense(), dense)


def test_save_load_round_trip(tmp_path, data):
    dic = Nearest(n_atoms=5, seed=3).fit(data)
    dic.save(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["learner"] == "test-nearest" and meta["d"] == 6 and meta["config"] == {"n_atoms": 5, "seed": 3}
    same = vitatlas.load(tmp_path / "run")
    assert isinstance(same, Nearest) and same.fit_info == dic.fit_info
    np.testing.assert_array_equal(same.encode(data), dic.encode(data))


def test_load_errors_are_one_line(tmp_path, data):
    with pytest.raises(VitatlasError, match="does not exist"):
        vitatlas.load(tmp_path / "missing")
    run = Nearest().fit(data).save(tmp_path / "run")
    weights = run / "dictionary.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(VitatlasError, match="corrupt or truncated"):
        vitatlas.load(run)
    (run / "config.json").write_text("{")
    with pytest.raises(VitatlasError, match="corrupt"):
        vitatlas.load(run)
    (run / "config.json").write_text(json.dumps({"format": "vitatlas-dictionary", "version": 1, "learner": "zzz"}))
    Nearest().fit(data).save(tmp_path / "ok")
    (run / "dictionary.safetensors").write_bytes((tmp_path / "ok" / "dictionary.safetensors").read_bytes())
    with pytest.raises(VitatlasError, match="unknown learner 'zzz'"):
        vitatlas.load(run)
    (run / "config.json").write_text(json.dumps({"format": "vitatlas-dictionary", "version": 99}))
    with pytest.raises(VitatlasError, match="newer vitatlas"):
        vitatlas.load(run)
    (run / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(VitatlasError, match="not a vitatlas dictionary"):
        vitatlas.load(run)


def test_unfitted_and_bad_inputs(data):
    with pytest.raises(VitatlasError, match="not fitted"):
        Nearest().encode(data)
    dic = Nearest().fit(data)
    with pytest.raises(VitatlasError, match="width 5 but"):
        dic.encode(data[:, :5])
    with pytest.raises(VitatlasError, match="reshape"):
        dic.encode(data[0])
    with pytest.raises(VitatlasError, match="empty"):
        dic.encode(data[:0])
    bad = data.copy()
    bad[42, 1] = np.inf
    with pytest.raises(VitatlasError, match="row 42"):
        dic.encode(bad)
    with pytest.raises(VitatlasError, match="numeric array"):
        as_tensor(np.array([["a", "b"]]))
    with pytest.raises(VitatlasError, match="real numbers"):
        as_tensor(np.ones((2, 2), bool))
    with pytest.raises(VitatlasError, match="width 8"):
        dic.decode(np.zeros((2, 3)))


def test_iter_batches_over_array_tensor_and_store(tmp_path, data):
    store = ActivationStore.from_array(tmp_path / "s", data)
    for X in (data, torch.from_numpy(data), store):
        seq = torch.cat(list(iter_batches(X, 64, shuffle=False, seed=0)))
        np.testing.assert_array_equal(seq.numpy(), data)
        shuffled = torch.cat(list(iter_batches(X, 64, shuffle=True, seed=1)))
        assert shuffled.shape == (300, 6) and not torch.equal(shuffled, seq)
        assert all(len(b) == 64 for b in iter_batches(X, 64, shuffle=True, seed=1, drop_last=True))
    # a store written by other tools may hold NaN: streaming names the row in the whole store
    from vitatlas.data.store import StoreWriter

    bad = data.copy()
    bad[250] = np.nan
    w = StoreWriter(tmp_path / "b", d=6, dtype="float32", identity={}, meta={}, has_labels=False)
    for start in (0, 200):
        w.write_shard(bad[start:start + 200], np.zeros((len(bad[start:start + 200]), 2), np.int32), None, 100)
    w.finish()
    with pytest.raises(VitatlasError, match="row 250"):
        list(iter_batches(ActivationStore(tmp_path / "b"), 64, shuffle=False, seed=0))
