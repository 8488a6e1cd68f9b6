"""Which format a checkpoint is in, from its files alone (``--format`` overrides it).

A folder is recognised by the files each library writes: ``config.json`` with vitatlas's ``format``
field (a vitatlas run), ``cfg.json`` + ``sae_weights.safetensors`` (SAELens), ``cfg.json`` +
``sae.safetensors`` (sparsify), ``config.json`` + ``ae.pt`` (dictionary_learning), ``config.json`` +
``weights.pt`` (ViT-Prisma), ``sae.pt`` (saev). A file is recognised by its name and neighbours, or,
for saev, by its leading JSON line. overcomplete writes a bare state dict and is never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import VitatlasError

FORMATS = ("vitatlas", "saelens", "prisma", "saev", "sparsify", "dictionary_learning", "overcomplete")
FOLDER_SIGNATURES = (  # (format, files that must all be there)
    ("saelens", ("cfg.json", "sae_weights.safetensors")),
    ("sparsify", ("cfg.json", "sae.safetensors")),
    ("dictionary_learning", ("config.json", "ae.pt")),
    ("prisma", ("config.json", "weights.pt")),
)


def _is_vitatlas_run(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == "vitatlas-dictionary"
    except (OSError, ValueError, AttributeError):
        return False


def _starts_with_json_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.readline(1 << 20)
        return head.startswith(b"{") and isinstance(json.loads(head.decode()), dict)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def detect(path: Path) -> tuple[str, Path]:
    """(format, the path its reader takes) for a checkpoint folder or file."""
    if not path.exists():
        raise VitatlasError(f"no checkpoint at {path}: the path does not exist")
    if path.is_file():
        if _starts_with_json_line(path):
            return "saev", path
        folder = path.parent
        if path.name in ("config.json", "cfg.json", "dictionary.safetensors") and _is_vitatlas_run(folder):
            return "vitatlas", folder
        for fmt, files in FOLDER_SIGNATURES:
            if path.name in files and all((folder / f).is_file() for f in files):
                return fmt, folder
        raise VitatlasError(f"cannot tell which library wrote {path}: give --format ({', '.join(FORMATS[1:])}); "
                            "an overcomplete state dict needs --format overcomplete --kind ...")
    if _is_vitatlas_run(path):
        return "vitatlas", path
    for fmt, files in FOLDER_SIGNATURES:
        if all((path / f).is_file() for f in files):
            return fmt, path
    if (path / "sae.pt").is_file():
        return "saev", path / "sae.pt"
    if (path / "config.json").is_file() or (path / "dictionary.safetensors").is_file():
        return "vitatlas", path  # a damaged run: the run loader says what is wrong with it
    inner = sorted(p.name for p in path.iterdir() if p.is_dir() and any(
        all((p / f).is_file() for f in files) for _, files in FOLDER_SIGNATURES))
    if inner:
        raise VitatlasError(f"{path} holds {len(inner)} SAE folders ({', '.join(inner[:6])}{', ...' if len(inner) > 6 else ''}): "
                            "give one of them")
    raise VitatlasError(f"{path} holds no checkpoint vitatlas recognises (SAELens cfg.json + sae_weights.safetensors, "
                        "sparsify cfg.json + sae.safetensors, dictionary_learning config.json + ae.pt, ViT-Prisma "
                        "config.json + weights.pt, saev sae.pt, or a vitatlas run): give --format")
