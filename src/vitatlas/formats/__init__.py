"""Other libraries' SAE checkpoints in and out of a ``Dictionary`` (docs/formats.md has every recipe).

``vitatlas.load("a/saelens/folder")`` or ``vitatlas.load("hf:owner/repo/blocks.9.hook_resid_post")``
opens one; ``import_sae(src, format=None, **options)`` reads SAELens, ViT-Prisma, saev, sparsify,
dictionary_learning and overcomplete checkpoints as an ``ImportedSAE`` (a real ``Dictionary``: cards,
eval, the explorer and interventions take it; it saves as a vitatlas run). ``load(path)`` opens a
vitatlas run or any of those; ``export(dictionary, fmt, out)`` writes a vitatlas SAE as SAELens or
sparsify, a DBK-SVD with non-negative MP coding as SAELens matching_pursuit.

Floors: this package stands above ``learners`` (floor 5): it reads dictionaries through their public
attributes. ``vitatlas.load`` in the package root is this package's ``load``; ``vitatlas.dictionary.load``
stays the loader of vitatlas runs (and resolves the saved "imported" learner lazily, by name).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..dictionary import Dictionary
from ..dictionary import load as load_run
from ..errors import VitatlasError
from . import dictionary_learning, hub, overcomplete, prisma, saelens, saev, sparsify
from .detect import FORMATS, detect
from .export import TARGETS, export
from .options import ImportOptions
from .recipe import ImportedSAE

READERS = {"saelens": saelens.read, "prisma": prisma.read, "saev": saev.read, "sparsify": sparsify.read,
           "dictionary_learning": dictionary_learning.read, "overcomplete": overcomplete.read}
ALIASES = {"sae_lens": "saelens", "sae-lens": "saelens", "vit-prisma": "prisma", "vit_prisma": "prisma",
           "dictionary-learning": "dictionary_learning", "eai-sparsify": "sparsify"}

__all__ = ["FORMATS", "TARGETS", "ImportOptions", "ImportedSAE", "detect", "export", "import_sae", "load",
           "resolve"]


def resolve(src: str | Path) -> Path:
    """A local path, or ``hf:REPO[/SUBFOLDER]`` from the local Hugging Face cache."""
    if isinstance(src, str) and src.startswith(hub.PREFIX):
        return hub.resolve(src)
    return Path(src)


def _options(options: dict) -> ImportOptions:
    known = {f.name for f in fields(ImportOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise VitatlasError(f"unknown import option {unknown[0]!r}: known options are {', '.join(sorted(known))}")
    return ImportOptions(**options)


def import_sae(src: str | Path, format: str | None = None, **options) -> ImportedSAE:
    """Read another library's checkpoint (folder or file) as an ``ImportedSAE``.

    ``format``: one of FORMATS (detected from the files when None). ``options``: the fields of
    ``ImportOptions`` (kind, k, threshold, scale_mean, scale_norm, scaling_factor, model, layer, tokens,
    device, dtype).
    """
    path = resolve(src)
    opts = _options(options)
    if format is None:
        format, path = detect(path)
    else:
        format = ALIASES.get(format, format)
        if format not in READERS:
            raise VitatlasError(f"unknown format {format!r}: use one of {', '.join(READERS)}")
        if not path.exists():
            raise VitatlasError(f"no checkpoint at {path}: the path does not exist")
        if format == "saev" and path.is_dir():
            path = path / "sae.pt"
    if format == "vitatlas":
        raise VitatlasError(f"{path} is already a vitatlas run: open it with vitatlas.load")
    return READERS[format](path, opts)


def load(path: str | Path, device: str | None = None, *, format: str | None = None, **options) -> Dictionary:
    """Open a vitatlas run, or any checkpoint ``import_sae`` reads (``hf:REPO[/SUBFOLDER]`` too).

    >>> import tempfile, numpy as np
    >>> from vitatlas.learners.baselines import PCABaseline
    >>> X = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     load(PCABaseline(2).fit(X).save(tmp)).learner
    'pca'
    """
    resolved = resolve(path)
    found, where = ("vitatlas", resolved) if format == "vitatlas" else (None, resolved)
    if format is None and resolved.exists():
        found, where = detect(resolved)
    if found == "vitatlas":
        if options:
            raise VitatlasError(f"import options ({', '.join(sorted(options))}) do not apply to a vitatlas run: drop them")
        return load_run(where, device=device)
    if device is not None:
        options["device"] = device
    return import_sae(resolved, format=format, **options)
