"""Extraction under torchrun: 2 gloo ranks make the same store as 1 process, file for file, and a run
killed on one rank stops with a one-line error and resumes with 1 or 2 processes to that same store
(one test: the killed run and its resume share the work of a from-scratch run, at half the start-ups)."""

import json
import shutil

import numpy as np
import pytest
import torch
from _dist import assert_job_stopped_with_one_line_error, torchrun
from _tiny import save_tiny_dinov2
from PIL import Image

from vitatlas import ActivationStore
from vitatlas.data.extract import extract

SHARD_BYTES = 16384  # tiny model (width 32, 16 patches), float32: 8 images a shard, batches of 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-extract")
    model = save_tiny_dinov2(root / "dinov2")
    folder = root / "images"
    rng = np.random.default_rng(0)
    for i in range(30):  # 31 files, 4 shards (8, 8, 8, 7 images); one unreadable image in shard 2
        cls = folder / ("a" if i < 14 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(cls / f"{i:02d}.png")
    (folder / "b" / "20x.png").write_bytes(b"\x89PNG broken")
    reference = root / "reference"
    extract_one_process(model, folder, reference)
    return model, folder, reference


def extract_one_process(model, folder, out):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank runs: the same forward, bit for bit
    try:
        extract(f"hf:{model}", str(folder), [1], ["cls", "patches"], out, batch_size=4, shard_bytes=SHARD_BYTES,
                progress=False)
    finally:
        torch.set_num_threads(threads)


def cli_args(model, folder, out):
    return ["extract", "--model", f"hf:{model}", "--data", str(folder), "--layer", "1", "--tokens", "cls",
            "--tokens", "patches", "--batch-size", "4", "--shard-mb", str(SHARD_BYTES / 2**20), "--out", str(out)]


def assert_same_store(reference, out, world_size):
    for kind in ("cls", "patches"):
        a = json.loads((reference / kind / "manifest.json").read_text())
        b = json.loads((out / kind / "manifest.json").read_text())
        assert (a.pop("world_size"), b.pop("world_size")) == (1, world_size)
        assert a == b  # same shards with the same SHA-256 of every file, counts, skipped images, identity
        assert sorted(p.name for p in (reference / kind).iterdir()) == sorted(p.name for p in (out / kind).iterdir())
        for p in (reference / kind).glob("*.npy"):
            assert p.read_bytes() == (out / kind / p.name).read_bytes()
        store = ActivationStore(out / kind)
        assert store.verify() == [] and store.manifest["n_skipped"] == 1


@pytest.mark.filterwarnings("ignore:.*unreadable")
def test_two_ranks_write_the_store_of_one_process_and_resume_it_after_a_kill_with_one_or_two(setup, tmp_path):
    """The killed 2-rank run writes shards 0 and 1 from scratch, the 2-rank resume shards 2 and 3: together
    every file of a store made by 2 ranks is checked against the one-process store."""
    model, folder, reference = setup
    killed = tmp_path / "killed"
    # rank 1 computes shards 1 and 3: it dies just before writing shard 3, in round 1, which it enters only
    # once rank 0 has committed round 0 (the ranks meet after every commit), so round 0 is on disk however
    # the two processes are scheduled
    res = torchrun(cli_args(model, folder, killed), nproc=2, env={"VITATLAS_TEST_EXIT_AT": "1:3"})
    assert_job_stopped_with_one_line_error(res)
    for kind in ("cls", "patches"):  # only round 0 (shards 0 and 1) is committed, and every file of it is whole
        partial = ActivationStore(killed / kind, allow_incomplete=True)
        assert [s.name for s in partial.shards] == ["shard-00000", "shard-00001"]
        assert partial.verify() == ["store is incomplete (16 images written)"]

    again = tmp_path / "again"
    shutil.copytree(killed, again)
    extract_one_process(model, folder, killed)  # resume with 1 process
    res = torchrun(cli_args(model, folder, again), nproc=2)  # resume with 2
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("extracted") == 1 and "from 31 images" in res.stdout  # rank 0 alone reports
    assert_same_store(reference, again, world_size=2)
    for kind in ("cls", "patches"):
        a = json.loads((reference / kind / "manifest.json").read_text())
        b = json.loads((killed / kind / "manifest.json").read_text())
        assert a["shards"] == b["shards"]
