"""``hf:REPO[/SUBFOLDER]``: a checkpoint in the local Hugging Face cache, never downloaded.

The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; a repository
lives in ``models--OWNER--NAME/snapshots/<revision>/``, the revision that ``refs/main`` names (or the
only snapshot). Nothing here reaches the network, so ``HF_HUB_OFFLINE=1`` holds whatever it is set to;
a repository that is not cached is a one-line error saying how to fetch it where there is a network.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import VitatlasError

PREFIX = "hf:"


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resolve(spec: str) -> Path:
    """``hf:owner/name[/sub/folder]`` -> the cached folder or file."""
    parts = [p for p in spec[len(PREFIX):].split("/") if p]
    if len(parts) < 2:
        raise VitatlasError(f"{spec!r} is not hf:OWNER/NAME[/SUBFOLDER]")
    repo, sub = "/".join(parts[:2]), parts[2:]
    root = cache_dir() / f"models--{parts[0]}--{parts[1]}"
    fetch = f"fetch it where there is a network (huggingface-cli download {repo}) and copy the cache here"
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        raise VitatlasError(f"{repo} is not in the local Hugging Face cache ({cache_dir()}): {fetch}")
    ref = root / "refs" / "main"
    revision = ref.read_text().strip() if ref.is_file() else None
    if revision is None or not (snapshots / revision).is_dir():
        found = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
        if len(found) != 1:
            raise VitatlasError(f"{repo} has {len(found)} cached snapshots and no refs/main naming one: give the "
                                f"snapshot folder itself (under {snapshots})")
        revision = found[0]
    path = snapshots / revision
    for part in sub:
        path = path / part
    if not path.exists():
        raise VitatlasError(f"{repo} is cached but has no {'/'.join(sub)} (revision {revision[:12]}): {fetch}")
    return path
