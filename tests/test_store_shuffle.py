"""`vitatlas store shuffle` (data/shuffle_copy.py): the copy holds the same (row, index, label) multiset in an
order that mixes classes, is a function of the seed alone, resumes exactly after a kill, and refuses bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_cli_store import run_cli

from vitatlas import ActivationStore, VitatlasError
from vitatlas.data.shuffle_copy import WORK_DIR, shuffle_store

D = 6
SMALL = {"memory_bytes": 9000, "shard_bytes": 700 * D * 2}  # ~10 buckets, copy shards of 700 rows


def sorted_store(tmp_path, n=6000, classes=12, dtype="float16", labels=True):
    """A class-sorted store whose column 0/1 hold the row number (exact in float16: two numbers < 2048)."""
    y = np.sort(np.random.default_rng(1).integers(0, classes, n))
    X = np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)
    X[:, 0], X[:, 1] = np.arange(n) // 1024, np.arange(n) % 1024
    return ActivationStore.from_array(tmp_path / "src", X, y if labels else None, dtype=dtype,
                                      shard_bytes=1100 * D * np.dtype(dtype).itemsize, class_names=None)


def rows_of(store):
    """(row number, index, label) of every row in the store's order."""
    X = store.to_numpy().astype(np.float64)
    ids = (X[:, 0] * 1024 + X[:, 1]).astype(np.int64)
    lab = store.labels if store.has_labels else np.full(store.n_rows, -1)
    return np.column_stack([ids, store.index, lab]), X


def chi2(labels, prior):
    counts = np.bincount(labels, minlength=prior.size)
    expected = prior * labels.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_the_copy_holds_the_same_rows_in_a_mixed_order(tmp_path):
    src = sorted_store(tmp_path)
    copy = shuffle_store(src, tmp_path / "dst", seed=3, **SMALL)
    assert copy.verify() == [] and copy.dtype == src.dtype and copy.n_rows == src.n_rows and len(copy.shards) > 5
    assert sorted(p.name for p in copy.path.iterdir()) == sorted([p.name for p in copy.path.glob("*-0*.npy")] +
                                                                  ["manifest.json"])  # the work directory is gone
    a, xa = rows_of(src)
    b, xb = rows_of(copy)
    perm = b[:, 0]
    np.testing.assert_array_equal(np.sort(perm), np.arange(src.n_rows))  # a permutation of the rows ...
    np.testing.assert_array_equal(b, a[perm])  # ... that moved each row's index and label with it
    np.testing.assert_array_equal(xb, xa[perm])  # and its values, in the store's dtype
    for key in ("model", "layer", "tokens", "source", "class_names", "world_size", "n_images"):
        assert copy.manifest.get(key) == src.manifest.get(key), key
    assert copy.manifest["shuffle"]["seed"] == 3
    # batches of consecutive rows of the copy have the store's class mix (chi2 ~ df), the source's do not
    prior = np.bincount(src.labels) / src.n_rows
    df = prior.size - 1
    copied = [chi2(copy.labels[i:i + 500], prior) for i in range(0, copy.n_rows - 499, 500)]
    assert np.mean(copied) < 1.6 * df, np.mean(copied)
    assert np.mean([chi2(src.labels[i:i + 500], prior) for i in range(0, src.n_rows - 499, 500)]) > 100 * df
    # the order is not a local one either: row numbers are uncorrelated with positions
    assert abs(np.corrcoef(perm, np.arange(perm.size))[0, 1]) < 0.1


def test_same_seed_same_copy_whatever_the_memory_and_other_seeds_differ(tmp_path):
    src = sorted_store(tmp_path, labels=False, dtype="float32")
    first = shuffle_store(src, tmp_path / "a", seed=5, **SMALL)
    assert first.dtype == np.float32 and not first.has_labels and first.verify() == []
    a = rows_of(first)[0]
    b = rows_of(shuffle_store(src, tmp_path / "b", seed=5, memory_bytes=40_000, shard_bytes=1 << 20))[0]
    c = rows_of(shuffle_store(src, tmp_path / "c", seed=6, **SMALL))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    again = shuffle_store(src, tmp_path / "a", seed=5, **SMALL)  # a finished copy: returned as it is
    assert again.verify() == [] and np.array_equal(rows_of(again)[0], a)


def _cli(src, out, *extra):
    return [sys.executable, "-m", "vitatlas", "store", "shuffle", str(src), "--out", str(out), "--seed", "2",
            "--memory-mb", "0.01", "--shard-mb", str(700 * D * 2 / (1 << 20)), *extra]


def test_a_killed_shuffle_resumes_to_the_same_copy(tmp_path):
    """The run leaves with ``os._exit`` (as under kill -9) after a commit of its scatter pass, the re-run
    after a commit of its write pass; what a kill between commits leaves (bytes appended to a bucket file, a
    half-written shard, a temporary file) is planted each time, and the last run must end with the same copy
    as an uninterrupted one."""
    src = sorted_store(tmp_path)  # 6 source shards: a scatter commit per shard, then a commit per copy shard
    full = shuffle_store(src, tmp_path / "full", seed=2, memory_bytes=int(0.01 * (1 << 20)), shard_bytes=700 * D * 2)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    out = tmp_path / "killed"
    for kill_at in (2, 8):  # the 2nd scatter commit; the 2nd copy shard of the resumed run
        killed = subprocess.run(_cli(src.path, out), env=env | {"VITATLAS_TEST_EXIT_AT": f"0:{kill_at}"},
                                capture_output=True, text=True)
        assert killed.returncode == 1, killed.stderr[-2000:]
        state = json.loads((out / WORK_DIR / "state.json").read_text())
        manifest = json.loads((out / "manifest.json").read_text())
        assert not manifest["complete"]
        if kill_at == 2:
            assert state["scattered"] == 2 and manifest["shards"] == []
            with open(out / WORK_DIR / "bucket-00001.acts", "ab") as f:
                f.write(b"rows a killed run appended after its last commit")
        else:  # a resumed run counts its commits from 1: the 4 scatter commits left, then 8 - 4 copy shards
            assert state["scattered"] == len(src.shards) and len(manifest["shards"]) == kill_at - 4
            (out / f"shard-{len(manifest['shards']):05d}.npy").write_bytes(b"\x93NUMPY half a shard")
        (out / ".index-00009.npy.x1y2.tmp").write_bytes(b"\x93NUMPY")
    again = subprocess.run(_cli(src.path, out), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    b = json.loads((out / "manifest.json").read_text())
    assert full.manifest["shards"] == b["shards"] and b["complete"]  # the same files, SHA-256 for SHA-256
    assert sorted(p.name for p in full.path.iterdir()) == sorted(p.name for p in out.iterdir())
    assert ActivationStore(out).verify() == []


def test_errors_are_one_line(tmp_path, capsys):
    src = sorted_store(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = run_cli(["store", "shuffle", src.path, "--out", tmp_path / "busy"], capsys)
    assert code == 2 and "busy already exists and is not empty" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["store", "shuffle", src.path, "--out", src.path], capsys)
    assert code == 2 and "is the source store" in err
    shuffle_store(src, tmp_path / "done", seed=0, **SMALL)
    with pytest.raises(VitatlasError, match="already exists and is not empty"):  # another seed into a finished copy
        shuffle_store(src, tmp_path / "done", seed=1, **SMALL)
    with pytest.raises(VitatlasError, match="must be positive"):
        shuffle_store(src, tmp_path / "x", memory_bytes=0)
    # a corrupt or truncated source: refused before anything is written from it
    path = src.path / "shard-00002.npy"
    path.write_bytes(path.read_bytes()[:-40])
    code, _, err = run_cli(["store", "shuffle", src.path, "--out", tmp_path / "bad"], capsys)
    errors = [line[line.index("error:"):] for line in err.splitlines() if "error:" in line]  # (beside the bar)
    assert code == 2 and len(errors) == 1 and "shard-00002.npy does not match its SHA-256" in errors[0] and \
        "store verify" in errors[0]
    code, _, err = run_cli(["store", "shuffle", tmp_path / "nowhere", "--out", tmp_path / "bad2"], capsys)
    assert code == 2 and "no activation store" in err
