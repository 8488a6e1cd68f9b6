import json

import numpy as np
import pytest

from vitatlas import ActivationStore, VitatlasError
from vitatlas.data.store import StoreWriter


def make(tmp_path, n=1000, d=16, dtype="float32", shard_rows=300, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (np.arange(n) % 3) if labels else None
    store = ActivationStore.from_array(tmp_path / "s", X, y, dtype=dtype,
                                       shard_bytes=shard_rows * d * np.dtype(dtype).itemsize)
    return store, X, y


def test_round_trip_float32_and_metadata(tmp_path):
    store, X, y = make(tmp_path)
    assert store.shape == (1000, 16) and len(store.shards) == 4
    np.testing.assert_array_equal(store.to_numpy(), X)
    np.testing.assert_array_equal(store.labels, y)
    np.testing.assert_array_equal(store.index[:, 0], np.arange(1000))
    assert store.verify() == []


def test_float16_halves_disk_and_stays_close(tmp_path):
    s16, X, _ = make(tmp_path / "a", dtype="float16")
    s32, _, _ = make(tmp_path / "b", dtype="float32")
    size = lambda s: sum(p.stat().st_size for p in s.path.glob("shard-*.npy"))  # noqa: E731
    assert size(s16) < 0.51 * size(s32) + 4096
    np.testing.assert_allclose(s16.to_numpy(), X, atol=2e-3, rtol=1e-3)
    assert s16.to_numpy().dtype == np.float32


def test_sequential_batches_cover_rows_in_order(tmp_path):
    store, X, _ = make(tmp_path)
    got = list(store.iter_batches(128, with_offsets=True))
    assert [o for o, _ in got] == list(range(0, 1000, 128))
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), X)
    assert all(len(b) == 128 for b in store.iter_batches(128, drop_last=True))


def test_shuffled_batches_are_a_reproducible_permutation(tmp_path):
    store, X, _ = make(tmp_path)
    small = 4 * 16 * 350  # buffer of ~350 rows: forces mixing across several buffers
    a = np.concatenate(list(store.iter_batches(100, shuffle=True, seed=3, buffer_bytes=small)))
    b = np.concatenate(list(store.iter_batches(100, shuffle=True, seed=3, buffer_bytes=small)))
    c = np.concatenate(list(store.iter_batches(100, shuffle=True, seed=4, buffer_bytes=small)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, X)
    order = lambda M: M[np.lexsort(M.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(order(a), order(X))


def test_random_row_access(tmp_path):
    store, X, _ = make(tmp_path)
    ids = np.array([999, 0, 301, 299, 600, -1])
    np.testing.assert_array_equal(store.rows(ids), X[ids])
    np.testing.assert_array_equal(store[5], X[5])
    np.testing.assert_array_equal(store[10:20], X[10:20])
    with pytest.raises(VitatlasError, match="out of range"):
        store.rows([1000])


def test_verify_detects_a_changed_shard(tmp_path):
    store, _, _ = make(tmp_path)
    path = store.path / "shard-00001.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = ActivationStore(store.path).verify()
    assert len(problems) == 1 and "shard-00001.npy" in problems[0] and "checksum" in problems[0]


def test_truncated_shard_is_a_clear_error(tmp_path):
    store, _, _ = make(tmp_path)
    path = store.path / "shard-00002.npy"
    path.write_bytes(path.read_bytes()[:500])
    fresh = ActivationStore(store.path)
    with pytest.raises(VitatlasError, match="corrupt or truncated"):
        fresh.to_numpy()


def test_corrupt_manifest_and_missing_paths(tmp_path):
    store, _, _ = make(tmp_path)
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(VitatlasError, match="corrupt"):
        ActivationStore(store.path)
    with pytest.raises(VitatlasError, match="does not exist"):
        ActivationStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitatlasError, match="not an activation store"):
        ActivationStore(tmp_path / "empty")


def test_incomplete_store_is_refused_unless_asked(tmp_path):
    w = StoreWriter(tmp_path / "s", d=4, dtype="float32", identity={"x": 1}, meta={}, has_labels=False)
    w.write_shard(np.ones((3, 4), np.float32), np.zeros((3, 2), np.int32), None, n_images=3)
    with pytest.raises(VitatlasError, match="incomplete"):
        ActivationStore(tmp_path / "s")
    assert ActivationStore(tmp_path / "s", allow_incomplete=True).n_rows == 3


def test_writer_refuses_a_different_store_and_removes_orphans(tmp_path):
    w = StoreWriter(tmp_path / "s", d=4, dtype="float32", identity={"model": "a"}, meta={}, has_labels=False)
    w.write_shard(np.ones((3, 4), np.float32), np.zeros((3, 2), np.int32), None, n_images=3)
    with pytest.raises(VitatlasError, match="already holds a different store"):
        StoreWriter(tmp_path / "s", d=4, dtype="float32", identity={"model": "b"}, meta={}, has_labels=False)
    # a shard written by a killed run but never committed to the manifest
    np.save(tmp_path / "s" / "shard-00001.npy", np.zeros((3, 4), np.float32))
    (tmp_path / "s" / ".shard-00002.npy.abc.tmp").write_bytes(b"half")
    w2 = StoreWriter(tmp_path / "s", d=4, dtype="float32", identity={"model": "a"}, meta={}, has_labels=False)
    assert w2.n_images == 3
    assert not (tmp_path / "s" / "shard-00001.npy").exists()
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_multi_layer_directory(tmp_path):
    for layer in (3, 7):
        ActivationStore.from_array(tmp_path / f"layer-{layer:02d}", np.ones((5, 4), np.float32))
        m = json.loads((tmp_path / f"layer-{layer:02d}" / "manifest.json").read_text())
        m["layer"] = layer
        (tmp_path / f"layer-{layer:02d}" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VitatlasError, match="several stores"):
        ActivationStore(tmp_path)
    assert ActivationStore(tmp_path, layer=7).layer == 7
    with pytest.raises(VitatlasError, match="no layer 5"):
        ActivationStore(tmp_path, layer=5)


def test_from_array_rejects_bad_input(tmp_path):
    bad = np.ones((10, 4), np.float32)
    bad[7, 2] = np.nan
    with pytest.raises(VitatlasError, match="NaN or Inf.*row 7"):
        ActivationStore.from_array(tmp_path / "a", bad)
    with pytest.raises(VitatlasError, match="non-empty 2-D"):
        ActivationStore.from_array(tmp_path / "b", np.ones(4, np.float32))
    with pytest.raises(VitatlasError, match="non-empty 2-D"):
        ActivationStore.from_array(tmp_path / "c", np.ones((0, 4), np.float32))
    with pytest.raises(VitatlasError, match="labels must be"):
        ActivationStore.from_array(tmp_path / "d", np.ones((4, 4), np.float32), labels=np.array([0.5, 1, 2, 3]))


@pytest.mark.parametrize("lo,hi,batch", [(0, 1000, 128), (250, 731, 100), (299, 301, 1), (400, 400, 7), (0, 1000, 5000)])
def test_iter_range_streams_a_rank_s_rows_across_shards(tmp_path, lo, hi, batch):
    store, X, _ = make(tmp_path)  # shards of 300 rows
    got = list(store.iter_range(lo, hi, batch))
    assert [s for s, _ in got] == list(range(lo, hi, batch))
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]) if got else X[:0], X[lo:hi])
    with pytest.raises(VitatlasError, match="outside a store"):
        next(store.iter_range(0, 1001, 10))


def test_shards_written_apart_are_committed_in_order(tmp_path):
    w = StoreWriter(tmp_path / "s", d=2, dtype="float32", identity={"x": 1}, meta={}, has_labels=False)
    rows = lambda v: (np.full((3, 2), v, np.float32), np.zeros((3, 2), np.int32))  # noqa: E731
    second = w.write_shard_files(1, *rows(1.0), None, n_images=3)  # another process's shard, written first
    first = w.write_shard_files(0, *rows(0.0), None, n_images=3)
    with pytest.raises(VitatlasError, match="shard-00000 comes next"):
        w.commit([second])
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"] == []  # nothing committed
    helper = StoreWriter(tmp_path / "s", d=2, dtype="float32", identity={"x": 1}, meta={}, has_labels=False,
                         main=False)
    w.commit([first, second])
    helper.commit([first, second])  # a helper rank keeps its copy in step without writing
    w.finish()
    store = ActivationStore(tmp_path / "s")
    np.testing.assert_array_equal(store.to_numpy()[:, 0], [0, 0, 0, 1, 1, 1])
    assert store.verify() == [] and helper.manifest["shards"] == store.manifest["shards"]
    with pytest.raises(VitatlasError, match="not visible to this process"):
        StoreWriter(tmp_path / "nowhere", d=2, dtype="float32", identity={}, meta={}, has_labels=False, main=False)


def test_iter_row_range_is_the_same_for_stores_arrays_and_tensors(tmp_path):
    import torch

    from vitatlas.data.batches import iter_row_range

    store, X, _ = make(tmp_path)
    for data in (store, X, torch.from_numpy(X)):
        got = list(iter_row_range(data, range(123, 877), 200))
        assert [s for s, _ in got] == [123, 323, 523, 723]
        np.testing.assert_array_equal(torch.cat([b for _, b in got]).numpy(), X[123:877])
    bad = X.copy()
    bad[500, 3] = np.nan
    with pytest.raises(VitatlasError, match="500"):  # the row number in the whole data set
        list(iter_row_range(bad, range(400, 600), 64))
