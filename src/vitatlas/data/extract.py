"""Extract a ViT's residual-stream activations over an image source into activation stores.

The run walks the source in fixed batches of images (image 0..B-1, B..2B-1, ...). Shards hold a fixed
number of whole batches, so a run killed at any moment resumes at the last committed shard and
replays exactly the batches an uninterrupted run would have: the finished store is the same, bit for
bit. Loading and preprocessing the next batches runs in a background thread while the model computes.

Under ``torchrun --nproc-per-node N -m vitatlas extract ...`` the ranks take the shards round-robin
(rank r computes shards r, r+N, ... of what is left), each writes its own shard files, and after every
round rank 0 commits the round's shards to the manifests in shard order. Batches are the same as in
one process, so the store is the same, file for file (only the manifest's ``world_size`` differs);
a killed run loses at most its current round and resumes with any N.

Token kind ``embedding`` (CLIP, SigLIP) stores the model's projected image embedding, one row per image
(index position 0), width ``model.embedding_width``; it takes no layer (the manifest records
``"layer": null``) and is computed from the same forward pass as the other kinds, run to the last block.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..errors import VitatlasError
from .sources import ImageSource, UnreadableImage, open_source
from .store import DTYPES, StoreWriter, ceil_to, layer_dirname, rows_per_shard

EMBEDDING = "embedding"  # the token kind that is a projected image embedding, not a residual-stream token


@dataclass(frozen=True)
class ExtractResult:
    out: Path
    layers: list[int]
    n_images: int
    n_rows: int  # rows written by this call, over all stores
    n_skipped: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.n_rows / max(self.seconds, 1e-9)


@dataclass
class _Batch:
    start: int
    ids: np.ndarray           # image ids kept (readable)
    labels: np.ndarray
    pixels: torch.Tensor | None
    skipped: list[str]


def _load_batch(model, source: ImageSource, start: int, stop: int) -> _Batch:
    images, ids, labels, skipped = [], [], [], []
    for i in range(start, stop):
        try:
            images.append(source.load(i))
        except UnreadableImage as exc:
            skipped.append(str(exc))
            continue
        ids.append(i)
        labels.append(source.label(i))
    pixels = model.preprocess(images) if images else None
    return _Batch(start, np.asarray(ids, np.int64), np.asarray(labels, np.int64), pixels, skipped)


def _prefetched(model, source: ImageSource, starts: list[int], batch_size: int, n_images: int) -> Iterator[_Batch]:
    """The batches starting at ``starts``, loaded in a background thread two batches ahead of the model."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        load = lambda s: pool.submit(_load_batch, model, source, s, min(s + batch_size, n_images))  # noqa: E731
        futures = deque(load(s) for s in starts[:2])
        for i in range(len(starts)):
            batch = futures.popleft().result()
            if i + 2 < len(starts):
                futures.append(load(starts[i + 2]))
            yield batch


def _open_writers(specs: dict, out: str, identity: dict) -> dict:
    """One StoreWriter per store. Rank 0 creates or checks the stores (and deletes a killed run's
    uncommitted files) before any other rank opens them; its refusal is every rank's error."""
    w = distributed.world()
    distributed.check_same((out, identity, sorted(map(str, specs))), "the extraction arguments")
    writers, error = {}, None
    if w.is_main:
        try:
            writers = {key: StoreWriter(**spec) for key, spec in specs.items()}
        except VitatlasError as exc:
            if not w.distributed:
                raise
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error:
        raise VitatlasError(error)
    if not w.is_main:
        writers = {key: StoreWriter(**spec, main=False) for key, spec in specs.items()}
    return writers


def _write_shard_files(writer: StoreWriter, number: int, parts: list, end: int, n_images: int) -> dict | None:
    """Write shard ``number`` of one store from its batches' parts; None when the store committed it already."""
    if writer.n_images >= end:  # this store committed the shard before a kill
        return None
    if parts:
        acts = np.concatenate([p[0] for p in parts])
        index = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts])
    else:  # every image of the shard was unreadable
        acts, index, labels = (np.zeros((0, int(writer.manifest["d"])), np.float32), np.zeros((0, 2), np.int32),
                               np.zeros(0, np.int64))
    return writer.write_shard_files(number, acts, index, labels if writer.manifest["has_labels"] else None, n_images)


def _commit_round(writers: dict, gathered: list, n_skipped: int, world_size: int) -> int:
    """Commit one round's shards (one per rank, in rank order = shard order); the new skipped total.

    Every rank applies the commits to its copy of the manifests; only rank 0's writers write them.
    """
    for item in gathered:
        if item is None:  # that rank had no shard left in this round
            continue
        entries, skipped = item
        n_skipped += skipped
        for key, writer in writers.items():
            if entries[key] is not None:
                writer.commit([entries[key]], n_skipped=n_skipped, world_size=world_size)
    return n_skipped


def extract(model_name: str, data: str, layers: Sequence[int], tokens: str | Sequence[str], out: str | Path, *,
            limit: int | None = None, batch_size: int = 32, dtype: str = "float32", shard_bytes: int = 64 << 20,
            device: str = "cpu", progress: bool = True, model=None, caption_column: str | None = None,
            on_shard: Callable[[int], None] | None = None) -> ExtractResult:
    """Record the residual stream after each of ``layers`` for the images of ``data`` into ``out``.

    One layer and one token kind write a store directly in ``out``; several layers write ``out/layer-XX``
    and several token kinds (e.g. ``["cls", "patches"]``, from the same forward pass) ``.../cls``,
    ``.../patches``. Re-running the
    same call after an interruption resumes; a call with other arguments on the same ``out`` is refused.
    ``model`` may be passed pre-loaded (tests, benchmarks); otherwise ``model_name`` is loaded.
    ``tokens="embedding"`` takes ``layers=[]`` (see the module docstring). ``caption_column`` names the
    source's caption field (a column of a saved HF dataset, a key of an image folder's captions.jsonl);
    it is recorded in the manifest for the caption descriptions of ``vitatlas interpret``.
    ``on_shard(j)`` is called before this process writes shard ``j`` (tests stop a rank there).
    """
    from tqdm.auto import tqdm

    from .. import models

    if dtype not in DTYPES:
        raise VitatlasError(f"unknown --dtype {dtype!r}: use float16 or float32")
    if batch_size <= 0:
        raise VitatlasError(f"--batch-size must be positive, got {batch_size}")
    if limit is not None and limit <= 0:
        raise VitatlasError(f"--limit must be positive, got {limit}")
    kinds = [tokens] if isinstance(tokens, str) else list(dict.fromkeys(tokens))
    if not kinds:
        raise VitatlasError("give at least one --tokens kind")
    stream_kinds = [kind for kind in kinds if kind != EMBEDDING]
    layers = list(layers or [])
    if stream_kinds and not layers:
        raise VitatlasError("give at least one --layer")
    if not stream_kinds and layers:
        raise VitatlasError("--tokens embedding is the model's output embedding and takes no --layer: drop --layer "
                            "(or add --tokens cls/patches/all to record those layers too)")
    source = open_source(data, caption_column=caption_column)
    model = model if model is not None else models.load(model_name, device=device)
    layer_ids = sorted({model.resolve_layer(layer) for layer in layers})
    positions = {kind: model.token_positions(kind) for kind in stream_kinds}
    embed_width = None
    if EMBEDDING in kinds:
        embed_width = model.require_embedding()
        positions[EMBEDDING] = np.zeros(1, np.int64)  # one row per image
    w = distributed.world()
    n_images = min(len(source), limit) if limit else len(source)
    if n_images == 0:
        raise VitatlasError(f"data source {data} holds no images")

    # Shards are whole batches of images, so resumed runs replay identical batches.
    max_tokens = max(len(p) for p in positions.values())
    width = max(model.width, embed_width or 0)
    per_shard = ceil_to(max(1, rows_per_shard(width, dtype, shard_bytes) // max_tokens), batch_size)
    out = Path(out)
    identity = {"model": model.name, "revision": model.revision, "data": source.spec,
                "n_images": n_images, "batch_size": batch_size, "images_per_shard": per_shard,
                "preprocessing": model.preprocessing}
    meta = {"model": model.describe(), "source": source.describe() | {"n_images_used": n_images},
            "preprocessing": model.preprocessing, "class_names": source.class_names, "world_size": w.size}
    specs: dict[tuple[int | None, str], dict] = {}
    for layer in layer_ids:
        for kind in stream_kinds:
            path = out if len(layer_ids) == 1 else out / layer_dirname(layer)
            path = path if len(kinds) == 1 else path / kind
            specs[layer, kind] = dict(
                path=path, d=model.width, dtype=dtype, identity=identity | {"layer": layer, "tokens": kind},
                meta=meta | {"layer": layer, "tokens": kind, "token_positions": positions[kind].tolist()},
                has_labels=source.has_labels)
    if embed_width is not None:  # one store whatever the layers: out alone, else out/embedding
        specs[None, EMBEDDING] = dict(
            path=out if len(kinds) == 1 else out / EMBEDDING, d=embed_width, dtype=dtype,
            identity=identity | {"layer": None, "tokens": EMBEDDING},
            meta=meta | {"layer": None, "tokens": EMBEDDING, "token_positions": [0]}, has_labels=source.has_labels)
    writers = _open_writers(specs, str(out), identity)
    run_layers = layer_ids + ([model.n_layers - 1] if embed_width is not None else [])
    start = min(wr.n_images for wr in writers.values())  # a multiple of per_shard: only the last shard is short
    skipped_before = min(int(wr.manifest.get("n_skipped", 0)) for wr in writers.values())

    t0 = time.perf_counter()
    bar = tqdm(total=n_images, initial=start, unit="img", desc=f"extract {model.name}",
               disable=not progress or not w.is_main)
    n_skipped = skipped_before
    new_rows = 0
    # Shard j holds images [j·per_shard, (j+1)·per_shard). Ranks take the remaining shards round-robin,
    # one per round: rank r computes shard first + t·N + r in round t, then rank 0 commits the round's
    # shards in order. One process is a world of one: every round is one shard, committed at once.
    n_shards = -(-n_images // per_shard)
    first = start // per_shard if start < n_images else n_shards
    n_rounds = -(-(n_shards - first) // w.size)
    mine = [j for j in (first + t * w.size + w.rank for t in range(n_rounds)) if j < n_shards]
    my_batches = [s for j in mine for s in range(j * per_shard, min((j + 1) * per_shard, n_images), batch_size)]
    loaded = _prefetched(model, source, my_batches, batch_size, n_images)
    shard_parts: dict[tuple[int, str], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {key: [] for key in writers}
    shard_skipped = 0
    try:
        for t in range(n_rounds):
            j = first + t * w.size + w.rank
            written = None
            if j < n_shards:
                end = min((j + 1) * per_shard, n_images)
                for s in range(j * per_shard, end, batch_size):
                    batch = next(loaded)
                    for msg in batch.skipped:
                        warnings.warn(f"skipping unreadable image {msg}", stacklevel=2)
                    shard_skipped += len(batch.skipped)
                    if batch.pixels is not None:
                        with torch.inference_mode():
                            streams = model.residual_streams(batch.pixels.to(device), run_layers)
                            if embed_width is not None:
                                embedding = model.pool_embedding(streams[model.n_layers - 1])
                        for layer, kind in writers:
                            pos = positions[kind]
                            if kind == EMBEDDING:
                                acts = embedding.float().cpu().numpy()
                            else:
                                acts = streams[layer][:, torch.as_tensor(pos), :].float().cpu().numpy().reshape(
                                    -1, model.width)
                            index = np.stack([np.repeat(batch.ids, len(pos)), np.tile(pos, len(batch.ids))], axis=1)
                            shard_parts[layer, kind].append((acts, index, np.repeat(batch.labels, len(pos))))
                        new_rows += len(batch.ids) * sum(len(p) for p in positions.values())
                    done = min(s + batch_size, n_images) - s
                    bar.update(min(done * w.size, n_images - bar.n))
                    bar.set_postfix(rows_s=f"{new_rows * w.size / max(time.perf_counter() - t0, 1e-9):.0f}",
                                    skipped=n_skipped + shard_skipped)
                if on_shard is not None:
                    on_shard(j)
                written = ({key: _write_shard_files(writer, j, shard_parts[key], end, end - j * per_shard)
                            for key, writer in writers.items()}, shard_skipped)
                shard_parts = {key: [] for key in writers}
                shard_skipped = 0
            n_skipped = _commit_round(writers, distributed.all_gather_object(written), n_skipped, w.size)
            # No rank starts the next round before rank 0's manifests hold this one: without the wait, a rank
            # killed early in the next round (torchrun then stops rank 0 at once) could take this round's
            # commit with it, and a killed run would lose more than its current round.
            distributed.barrier("waiting for rank 0 to commit the finished shards")
            if w.distributed:  # between commits the bar guesses that every rank goes as fast as rank 0
                bar.n = min(wr.n_images for wr in writers.values())
                bar.refresh()
    finally:
        loaded.close()
        bar.close()
    seconds = time.perf_counter() - t0
    for writer in writers.values():
        if not writer.complete:
            writer.finish(n_skipped=n_skipped, world_size=w.size)
    if w.distributed:
        new_rows = sum(distributed.all_gather_object(new_rows))  # also waits for rank 0's manifests
    if sum(wr.n_rows for wr in writers.values()) == 0:
        raise VitatlasError(f"no image of {data} could be read ({n_skipped} unreadable): nothing was extracted")
    if n_skipped and w.is_main:
        warnings.warn(f"{n_skipped} unreadable image(s) were skipped", stacklevel=2)
    return ExtractResult(out, layer_ids, n_images, new_rows, n_skipped, seconds)
