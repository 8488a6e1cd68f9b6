"""The store stream (data/stream.py): shuffle statistics on a class-sorted store, determinism, resume,
per-process reads, read-ahead threads and errors."""

import threading

import numpy as np
import pytest
import torch

from vitatlas import ActivationStore, VitatlasError
from vitatlas.data import store as store_module
from vitatlas.data import stream as stream_module
from vitatlas.data.batches import iter_batch_shares, iter_batches

D = 8
ROW_BYTES = D * 2  # float16


@pytest.fixture
def small_units(monkeypatch):
    """Chunks of 20 rows, pieces of 1 row, windows of 2,400 rows (120 chunks, as a 128 MB window holds 128
    chunks of 1 MB): a 24k-row store is 10 windows long."""
    monkeypatch.setattr(stream_module, "CHUNK_BYTES", 20 * ROW_BYTES)
    monkeypatch.setattr(stream_module, "MIN_PIECE_BYTES", 1)
    monkeypatch.setattr(store_module, "SHUFFLE_BUFFER_BYTES", 2400 * 4 * D)


def sorted_store(tmp_path, sizes=(1000, 3000, 1500, 2500, 1200, 2800, 1900, 2100, 1700, 2300, 1600, 2400)):
    """Rows sorted by class (unequal class sizes, so class runs do not line up with chunks); column 0
    holds the row number (exact in float16 up to 2048 * 2, so it is stored split over two columns)."""
    y = np.repeat(np.arange(len(sizes)), sizes)
    n = y.size
    X = np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)
    X[:, 0], X[:, 1] = np.arange(n) // 1024, np.arange(n) % 1024  # integers below 2048: exact in float16
    store = ActivationStore.from_array(tmp_path / "sorted", X, y, dtype="float16", shard_bytes=3000 * ROW_BYTES)
    return store, y


def row_ids(batch) -> np.ndarray:
    b = np.asarray(batch, np.float64)
    return (b[:, 0] * 1024 + b[:, 1]).astype(np.int64)


def chi2(batch_labels: np.ndarray, prior: np.ndarray) -> float:
    counts = np.bincount(batch_labels, minlength=prior.size)
    expected = prior * batch_labels.size
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("pieces_per_batch", [1024, 128])  # pieces of 1 row, then of 4 rows
def test_batches_of_a_class_sorted_store_have_the_store_s_class_mix(tmp_path, small_units, monkeypatch,
                                                                     pieces_per_batch):
    monkeypatch.setattr(stream_module, "PIECES_PER_BATCH", pieces_per_batch)
    store, y = sorted_store(tmp_path)
    prior = np.bincount(y) / y.size
    df = prior.size - 1
    batch = 512
    piece = store.plan(batch, shuffle=True, seed=0).piece_rows
    assert piece == max(1, batch // pieces_per_batch)
    stats = [chi2(y[row_ids(b)], prior) for seed in range(3)
             for b in store.iter_batches(batch, shuffle=True, seed=seed, drop_last=True)]
    # iid batches give chi2 ~ df on average (a little less: rows are drawn without replacement from a
    # window); pieces of p rows of one class inflate it by at most p (the design effect of cluster sampling)
    assert np.mean(stats) < 1.5 * piece * df, np.mean(stats)
    # what the statistic is worth: the store's own order (a sequential stream) is far off, and so is a
    # shuffle local to one window of consecutive chunks (the old buffer shuffle)
    sequential = [chi2(y[row_ids(b)], prior) for b in store.iter_batches(batch, drop_last=True)]
    assert np.mean(sequential) > 100 * df
    local = np.random.default_rng(0).permutation(2400) + 4800
    assert chi2(y[local[:batch]], prior) > 20 * df


def test_every_window_samples_the_whole_store(tmp_path, small_units):
    store, y = sorted_store(tmp_path)
    plan = store.plan(512, shuffle=True, seed=3)
    classes_per_window = [np.unique(y[np.concatenate([np.arange(s, s + n) + int(store._offsets[sh])
                                                       for sh, s, n in zip(*plan.pieces(w))])]).size
                          for w in range(len(plan.windows))]
    assert len(classes_per_window) == 10 and min(classes_per_window) == 12  # every class in every window


def test_same_seed_same_batches_and_each_epoch_is_a_permutation(tmp_path, small_units):
    store, y = sorted_store(tmp_path)
    a = [row_ids(b) for b in store.iter_batches(700, shuffle=True, seed=5)]
    b = [row_ids(b) for b in store.iter_batches(700, shuffle=True, seed=5)]
    c = [row_ids(b) for b in store.iter_batches(700, shuffle=True, seed=6)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and len(a) == len(b) == -(-y.size // 700)
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    np.testing.assert_array_equal(np.sort(np.concatenate(a)), np.arange(y.size))
    dropped = list(store.iter_batches(700, shuffle=True, seed=5, drop_last=True))
    assert len(dropped) == y.size // 700 and all(len(x) == 700 for x in dropped)
    np.testing.assert_array_equal(row_ids(dropped[-1]), a[len(dropped) - 1])


@pytest.mark.parametrize("shuffle", [True, False])
def test_start_batch_resumes_the_same_sequence(tmp_path, small_units, shuffle):
    store, y = sorted_store(tmp_path)
    full = [row_ids(b) for b in iter_batches(store, 1000, shuffle=shuffle, seed=2)]
    for start in (0, 1, 2, 3, 7, 23, len(full) - 1, len(full), len(full) + 5):  # 2, 3, 7: around window ends
        resumed = [row_ids(b) for b in iter_batches(store, 1000, shuffle=shuffle, seed=2, start_batch=start)]
        assert len(resumed) == max(0, len(full) - start)
        assert all(np.array_equal(u, v) for u, v in zip(resumed, full[start:]))


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_rank_shares_cut_the_same_batches_and_read_only_their_rows(tmp_path, small_units, size, shuffle):
    store, y = sorted_store(tmp_path)
    batch = 1001  # not a multiple of the world size: shares differ by one row, lower ranks get more
    full = list(iter_batches(store, batch, shuffle=shuffle, seed=4))
    shares = [list(iter_batch_shares(store, batch, shuffle=shuffle, seed=4, rank=r, size=size)) for r in range(size)]
    for b, x in enumerate(full):
        assert all(shares[r][b][0] == x.shape[0] for r in range(size))  # the global row count
        assert torch.equal(torch.cat([shares[r][b][1] for r in range(size)]), x)
    # bytes read: each rank exactly its rows, so the ranks together read the store once
    plan = store.plan(batch, shuffle=shuffle, seed=4)
    read = []
    for r in range(size):
        counter = [0]
        rows = sum(len(x) for x in stream_module.stream(plan, lambda a, b, s: a, rank=r, size=size, counter=counter))
        assert counter[0] == rows * ROW_BYTES
        read.append(counter[0])
    one = [0]
    list(stream_module.stream(plan, lambda a, b, s: a, counter=one))
    assert one[0] == y.size * ROW_BYTES == sum(read)
    assert max(read) <= one[0] / size + batch * ROW_BYTES * len(full) / batch  # about 1/size each


def test_array_shares_cut_the_same_batches(tmp_path):
    X = np.random.default_rng(1).standard_normal((250, 4)).astype(np.float32)
    full = list(iter_batches(X, 64, shuffle=True, seed=1))
    for b, x in enumerate(full):
        parts = [list(iter_batch_shares(X, 64, shuffle=True, seed=1, rank=r, size=3))[b] for r in range(3)]
        assert [p[0] for p in parts] == [x.shape[0]] * 3
        assert torch.equal(torch.cat([p[1] for p in parts]), x)
    assert [torch.equal(u, v) for u, v in zip(full[2:], iter_batches(X, 64, shuffle=True, seed=1, start_batch=2))]
    with pytest.raises(VitatlasError, match="rank 3 is outside a world of 3"):
        next(iter_batch_shares(X, 64, shuffle=True, seed=1, rank=3, size=3))


def test_float_dtypes_are_converted_and_checked(tmp_path):
    X = np.random.default_rng(2).standard_normal((300, 5)).astype(np.float32)
    store = ActivationStore.from_array(tmp_path / "s", X, dtype="float16", shard_bytes=64 * 5 * 2)
    got = torch.cat(list(iter_batches(store, 64, shuffle=False, seed=0, dtype=torch.float64)))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.from_numpy(X.astype(np.float16).astype(np.float64)), rtol=0, atol=0)
    with pytest.raises(VitatlasError, match="width 5 but this dictionary was fitted on width 6"):
        next(iter_batches(store, 64, shuffle=False, seed=0, d=6))


def test_nan_rows_are_reported_with_their_row_number(tmp_path):
    X = np.ones((300, 4), np.float32)
    store = ActivationStore.from_array(tmp_path / "s", X, dtype="float32", shard_bytes=100 * 16)
    path = store.path / "shard-00001.npy"
    arr = np.load(path)
    arr[17, 2] = np.nan
    np.save(path, arr)  # damaged after the checksums were taken: the stream still refuses it
    with pytest.raises(VitatlasError, match="NaN or Inf values in 1 row.*first at row 117"):
        list(iter_batches(ActivationStore(store.path), 64, shuffle=False, seed=0))


def test_truncated_and_missing_shards_are_one_line_errors(tmp_path):
    X = np.ones((300, 4), np.float32)
    store = ActivationStore.from_array(tmp_path / "s", X, dtype="float32", shard_bytes=100 * 16)
    path = store.path / "shard-00002.npy"
    full = path.read_bytes()
    path.write_bytes(full[:-40])
    with pytest.raises(VitatlasError, match="shard-00002.npy is truncated .*store verify"):
        list(ActivationStore(store.path).iter_batches(50, shuffle=True, seed=0))
    path.unlink()
    with pytest.raises(VitatlasError, match="missing shard-00002.npy"):
        list(ActivationStore(store.path).iter_batches(50))
    path.write_bytes(b"not an npy file at all")
    with pytest.raises(VitatlasError, match="corrupt or truncated"):
        list(ActivationStore(store.path).iter_batches(50))


def stream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vitatlas-")]


def test_a_consumer_that_stops_early_stops_the_read_ahead(tmp_path, small_units):
    store, _ = sorted_store(tmp_path)
    batches = iter_batches(store, 100, shuffle=True, seed=0)
    next(batches)
    assert {"vitatlas-batches", "vitatlas-read"} <= set(stream_threads())  # (and vitatlas-io-* while reading)
    batches.close()  # what a `break` out of the loop does once the generator is dropped
    assert stream_threads() == []
    list(iter_batches(store, 5000, shuffle=True, seed=0))  # and a finished stream leaves none either
    assert stream_threads() == []
