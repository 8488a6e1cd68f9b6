import numpy as np
import pytest
from PIL import Image

from vitatlas import VitatlasError
from vitatlas.data import sources
from vitatlas.data.sources import UnreadableImage, open_source


def test_digits_are_always_there():
    src = open_source("embedded:digits")
    assert len(src) == 1797 and src.class_names == [str(i) for i in range(10)]
    img = src.load(0)
    assert img.size == (8, 8) and src.label(0) == 0
    assert np.asarray(img).max() <= 255


def test_photos_load_offline():
    src = open_source("embedded:photos")
    assert len(src) >= 10
    for i in range(len(src)):
        assert min(src.load(i).size) >= 64


@pytest.mark.skipif(not sources.fashion_mnist_available(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_splits():
    test = open_source("embedded:fashion-mnist:test")
    assert len(test) == 10_000 and test.load(0).size == (28, 28) and test.label(0) == 9
    assert len(open_source("embedded:fashion-mnist")) == 70_000
    assert test.class_names[0] == "T-shirt/top"


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path)
    sources._fashion_mnist.cache_clear()
    try:
        with pytest.raises(VitatlasError, match="apt-get install dataset-fashion-mnist"):
            open_source("embedded:fashion-mnist:test")
    finally:
        sources._fashion_mnist.cache_clear()


def test_unknown_and_missing_sources():
    with pytest.raises(VitatlasError, match="unknown embedded data set"):
        open_source("embedded:imagenet")
    with pytest.raises(VitatlasError, match="split"):
        open_source("embedded:fashion-mnist:val")
    with pytest.raises(VitatlasError, match="neither an embedded data set .* nor an existing folder"):
        open_source("/no/such/folder")


def test_image_folder_labels_and_corrupt_files(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((10, 12, 3), i * 50, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    src = open_source(str(tmp_path))
    assert src.class_names == ["cat", "dog"] and len(src) == 5
    assert [src.label(i) for i in range(len(src))] == [0, 0, 1, 1, 1]
    broken = [i for i in range(len(src)) if src.files[i].name == "broken.jpg"][0]
    with pytest.raises(UnreadableImage, match="broken.jpg"):
        src.load(broken)
    with pytest.raises(VitatlasError, match="cannot be read"):
        src.image(broken)


def test_empty_folder_and_file_are_errors(tmp_path):
    with pytest.raises(VitatlasError, match="holds no images"):
        open_source(str(tmp_path))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(VitatlasError, match="is a file"):
        open_source(str(tmp_path / "x.txt"))


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(np.full((9, 9, 3), i * 20, np.uint8)) for i in range(4)]
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"img": images, "y": [0, 1, 1, 0]}, features=features).save_to_disk(tmp_path / "ds")
    src = open_source(f"hf-disk:{tmp_path / 'ds'}")
    assert len(src) == 4 and src.class_names == ["a", "b"] and src.label(2) == 1
    assert src.load(1).size == (9, 9)
    assert len(open_source(str(tmp_path / "ds"))) == 4
