"""Image sources: where the images to extract activations from come from.

A source is opened from a spec string:

    embedded:fashion-mnist[:train|:test]   70,000 Fashion-MNIST images (Debian package dataset-fashion-mnist)
    embedded:digits                        scikit-learn's 1,797 labelled 8x8 digits (always available)
    embedded:photos                        scikit-image's offline sample photos (labels = photo names)
    PATH/TO/FOLDER                         an image folder; sub-folder names become labels
    hf-disk:PATH  (or a folder holding a dataset saved with datasets' save_to_disk)

Every source is indexable: ``len(src)``, ``src.load(i)`` (a PIL image, or UnreadableImage),
``src.label(i)`` (int, -1 if unknown), ``src.class_names``. Sources are deterministic, so image ``i``
is the same image on every run; that is what makes an interrupted extraction resumable.

Captions (for the caption descriptions of ``vitatlas interpret``): ``src.captions(i)`` is the list of
caption strings of image ``i`` (empty when it has none) and ``src.caption_column`` names where they come
from, None when the source carries no text.
- a saved Hugging Face dataset: the column ``caption_column`` (a string or a list of strings per row);
  without one, a string column named caption, captions, text or sentence is used when there is one;
- an image folder: a ``captions.jsonl`` at its root, one JSON object a line, ``{"file": "cats/1.png",
  "caption": "a cat on a sofa"}`` (``file`` relative to the folder, ``file_name`` also accepted; the
  caption a string or a list of strings; an image may appear on several lines). ``caption_column``
  names the caption key (default ``caption``).
A ``caption_column`` the source does not have is a one-line error.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import VitatlasError

FASHION_MNIST_DIR = Path(os.environ.get("VITATLAS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
PHOTO_NAMES = ["astronaut", "camera", "cat", "chelsea", "coffee", "coins", "horse", "hubble_deep_field",
               "immunohistochemistry", "moon", "page", "rocket", "text", "brick", "grass", "gravel", "logo",
               "retina", "colorwheel"]


class UnreadableImage(Exception):
    """An image that exists in the source but cannot be decoded; extraction skips it."""


CAPTIONS_FILE = "captions.jsonl"
CAPTION_COLUMNS = ("caption", "captions", "text", "sentence")  # found without --caption-column


class ImageSource:
    spec: str
    class_names: list[str] | None = None
    caption_column: str | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def label(self, i: int) -> int:
        return -1

    @property
    def has_labels(self) -> bool:
        return self.class_names is not None

    def name_of(self, i: int) -> str:
        """A human-readable name of image i, used in warnings about unreadable files."""
        return f"{self.spec}#{i}"

    def image(self, i: int) -> Image.Image:
        """Image i for display (reports, explorer), or a one-line error."""
        if not 0 <= i < len(self):
            raise VitatlasError(f"image {i} is out of range for {self.spec} ({len(self)} images)")
        try:
            return self.load(i)
        except UnreadableImage as exc:
            raise VitatlasError(f"image {i} of {self.spec} cannot be read: {exc}") from None

    @property
    def has_captions(self) -> bool:
        return self.caption_column is not None

    def captions(self, i: int) -> list[str]:
        """The captions of image i (an empty list when the source or the image has none)."""
        return []

    def describe(self) -> dict:
        return {"spec": self.spec, "name": self.spec, "n_images": len(self), "class_names": self.class_names,
                "caption_column": self.caption_column}


class ArraySource(ImageSource):
    """Images held in a uint8 array (n, H, W) or (n, H, W, 3) with int labels."""

    def __init__(self, spec: str, images: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None):
        self.spec, self.images, self.labels, self.class_names = spec, images, labels, class_names

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def label(self, i: int) -> int:
        return -1 if self.labels is None else int(self.labels[i])


def _read_idx(path: Path, header: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise VitatlasError(f"{path} is corrupt or truncated ({exc}); reinstall dataset-fashion-mnist") from None
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


@lru_cache(maxsize=2)
def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise VitatlasError(
            f"Fashion-MNIST is not installed ({images_path} missing): run `apt-get install dataset-fashion-mnist` "
            "(or set VITATLAS_FASHION_MNIST_DIR), or use --data embedded:digits")
    images = _read_idx(images_path, 16)
    labels = _read_idx(labels_path, 8)
    if images.size != labels.size * 784:
        raise VitatlasError(f"{images_path} and {labels_path} disagree in size: the files are truncated; reinstall "
                            "dataset-fashion-mnist")
    return images.reshape(-1, 28, 28), labels.astype(np.int64)


def fashion_mnist_available() -> bool:
    return (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


def _fashion_source(spec: str, split: str) -> ImageSource:
    if split == "all":
        a, b = _fashion_mnist("train"), _fashion_mnist("test")
        images, labels = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
    else:
        images, labels = _fashion_mnist(split)
    return ArraySource(spec, images, labels, FASHION_MNIST_CLASSES)


def _digits_source(spec: str) -> ImageSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return ArraySource(spec, images, digits.target.astype(np.int64), [str(i) for i in range(10)])


class PhotoSource(ImageSource):
    """scikit-image's sample photos that ship with the package (no download)."""

    def __init__(self, spec: str):
        import skimage.data

        self.spec = spec
        self.names = [n for n in PHOTO_NAMES if hasattr(skimage.data, n)]
        self.class_names = list(self.names)
        self._skdata = skimage.data

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> Image.Image:
        array = getattr(self._skdata, self.names[i])()
        if array.dtype != np.uint8:
            array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array)

    def label(self, i: int) -> int:
        return i

    def name_of(self, i: int) -> str:
        return self.names[i]


class FolderSource(ImageSource):
    """An image folder. Files directly inside sub-folders get the sub-folder name as label."""

    def __init__(self, root: Path, caption_column: str | None = None):
        self.spec = str(root)
        self.root = root
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
        self.files = files
        # Labels only when every image sits in a class sub-folder; a mixed folder gets none.
        self.class_names = classes if classes and all(p.parent != root for p in files) else None
        self._class_index = {c: i for i, c in enumerate(classes)}
        self._captions: dict[str, list[str]] = {}
        if (root / CAPTIONS_FILE).is_file():
            self.caption_column = caption_column or "caption"
            self._captions = _read_captions_jsonl(root / CAPTIONS_FILE, self.caption_column)
        elif caption_column is not None:
            raise VitatlasError(f"--caption-column {caption_column}: {root} has no {CAPTIONS_FILE} (one JSON object a "
                                'line, e.g. {"file": "cats/1.png", "caption": "a cat"})')

    def captions(self, i: int) -> list[str]:
        return self._captions.get(self.files[i].relative_to(self.root).as_posix(), [])

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Image.Image:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img.load()
                return img.copy()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise UnreadableImage(f"{path}: {type(exc).__name__}") from None

    def label(self, i: int) -> int:
        if self.class_names is None:
            return -1
        return self._class_index[self.files[i].relative_to(self.root).parts[0]]

    def name_of(self, i: int) -> str:
        return str(self.files[i])


def _caption_list(value, where: str) -> list[str]:
    """A caption field (a string, a list of strings, or null) -> a list of non-empty strings."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise VitatlasError(f"{where}: a caption must be a string or a list of strings, got {type(value).__name__}")
    return [v for v in values if v.strip()]


def _read_captions_jsonl(path: Path, key: str) -> dict[str, list[str]]:
    """captions.jsonl -> {file path relative to the folder (posix): [captions]}."""
    out: dict[str, list[str]] = {}
    seen_keys: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise VitatlasError(f"{path} line {n} is not JSON ({exc.msg}): write one JSON object a line") from None
            if not isinstance(obj, dict):
                raise VitatlasError(f"{path} line {n} is not a JSON object")
            seen_keys.update(obj)
            name = obj.get("file", obj.get("file_name"))
            if not isinstance(name, str):
                raise VitatlasError(f'{path} line {n} has no "file" (the image path relative to the folder)')
            if key in obj:
                out.setdefault(Path(name).as_posix(), []).extend(_caption_list(obj[key], f"{path} line {n}"))
    if key not in seen_keys:
        raise VitatlasError(f"caption column {key!r} does not exist in {path} (keys: "
                            f"{', '.join(sorted(seen_keys)) or 'none'}): pass --caption-column with one of them")
    return out


class HFDiskSource(ImageSource):
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (image column found automatically)."""

    def __init__(self, path: Path, spec: str, caption_column: str | None = None):
        try:
            import datasets
        except ImportError:
            raise VitatlasError("reading a saved Hugging Face dataset needs the `datasets` package: "
                                "pip install 'vitatlas[datasets]'") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises FileNotFoundError/ValueError variants
            raise VitatlasError(f"could not open the saved dataset at {path} ({type(exc).__name__}: {exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else sorted(ds)[0]
            ds = ds[split]
        image_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        if not image_cols:
            raise VitatlasError(f"the dataset at {path} has no image column (features: {', '.join(ds.features)})")
        label_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
        self.spec, self.ds, self.image_col = spec, ds, image_cols[0]
        self.label_col = label_cols[0] if label_cols else None
        self.class_names = list(ds.features[self.label_col].names) if self.label_col else None
        self.caption_column = self._caption_column(ds, caption_column, path)
        self._captions: list | None = None

    @staticmethod
    def _caption_column(ds, wanted: str | None, path: Path) -> str | None:
        import datasets

        def is_text(feature) -> bool:
            if isinstance(feature, datasets.Value):
                return feature.dtype in ("string", "large_string")
            inner = getattr(feature, "feature", None)  # Sequence / List of strings
            return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")

        if wanted is not None:
            if wanted not in ds.features:
                raise VitatlasError(f"caption column {wanted!r} does not exist in the dataset at {path} (columns: "
                                    f"{', '.join(ds.features)})")
            if not is_text(ds.features[wanted]):
                raise VitatlasError(f"caption column {wanted!r} of the dataset at {path} is not text "
                                    f"({ds.features[wanted]}): pass a string column")
            return wanted
        return next((c for c in CAPTION_COLUMNS if c in ds.features and is_text(ds.features[c])), None)

    def captions(self, i: int) -> list[str]:
        if self.caption_column is None:
            return []
        if self._captions is None:  # one column read, without decoding any image
            self._captions = list(self.ds.select_columns([self.caption_column])[self.caption_column])
        return _caption_list(self._captions[int(i)], f"{self.spec} row {i}")

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int) -> Image.Image:
        try:
            img = self.ds[int(i)][self.image_col]
        except Exception as exc:
            raise UnreadableImage(f"row {i}: {type(exc).__name__}") from None
        if img is None:
            raise UnreadableImage(f"row {i}: no image")
        return img

    def label(self, i: int) -> int:
        return -1 if self.label_col is None else int(self.ds[int(i)][self.label_col])


EMBEDDED = ("embedded:fashion-mnist", "embedded:fashion-mnist:train", "embedded:fashion-mnist:test",
            "embedded:digits", "embedded:photos")


def open_source(spec: str, caption_column: str | None = None) -> ImageSource:
    """Open an image source from its spec string (see the module docstring).

    ``caption_column``: where the captions are (see the module docstring); an error when the source has none.
    """
    if caption_column is not None and spec.startswith("embedded:"):
        raise VitatlasError(f"{spec} carries no captions: --caption-column needs an image folder with "
                            f"{CAPTIONS_FILE} or a saved Hugging Face dataset with a text column")
    if spec.startswith("embedded:"):
        parts = spec.split(":")
        if parts[1] == "fashion-mnist" and len(parts) <= 3:
            split = parts[2] if len(parts) == 3 else "all"
            if split not in ("train", "test", "all"):
                raise VitatlasError(f"unknown Fashion-MNIST split {split!r}: use embedded:fashion-mnist[:train|:test]")
            return _fashion_source(spec, split)
        if spec == "embedded:digits":
            return _digits_source(spec)
        if spec == "embedded:photos":
            return PhotoSource(spec)
        raise VitatlasError(f"unknown embedded data set {spec!r}: use one of {', '.join(EMBEDDED)}")
    if spec.startswith("hf-disk:"):
        path = Path(spec[len("hf-disk:"):])
        if not path.exists():
            raise VitatlasError(f"no saved dataset at {path}")
        return HFDiskSource(path, spec, caption_column)
    path = Path(spec)
    if not path.exists():
        raise VitatlasError(f"data source {spec!r} is neither an embedded data set ({', '.join(EMBEDDED)}) "
                            "nor an existing folder")
    if not path.is_dir():
        raise VitatlasError(f"data source {spec} is a file; pass a folder of images (sub-folders = labels)")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return HFDiskSource(path, spec, caption_column)
    source = FolderSource(path, caption_column)
    if len(source) == 0:
        raise VitatlasError(f"{path} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return source
