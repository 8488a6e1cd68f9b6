"""`vitatlas store`: inspect, verify and create activation stores."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def store():
    """Inspect, verify or create activation stores."""


@store.command()
@click.argument("path", type=click.Path())
@click.option("--layer", type=int, default=None, help="Layer to open in a multi-layer store.")
def info(path, layer):
    """Print a summary of a store."""
    import numpy as np

    from ..data.store import ActivationStore

    s = ActivationStore(path, layer=layer, allow_incomplete=True)
    model = s.model or {}
    source = s.manifest.get("source") or {}
    size = sum(p.stat().st_size for p in s.path.glob("*.npy"))
    click.echo(f"store      {s.path}")
    click.echo(f"status     {'complete' if s.manifest.get('complete') else 'INCOMPLETE (re-run extract to finish)'}")
    click.echo(f"model      {model.get('name', '-')} (revision {model.get('revision', '-')})")
    click.echo(f"layer      {s.layer}   tokens {s.tokens}")
    click.echo(f"data       {source.get('spec', source.get('name', '-'))}")
    click.echo(f"rows       {s.n_rows} x d={s.d} ({s.dtype}), {len(s.shards)} shard(s), {size / 2**20:.1f} MiB")
    click.echo(f"images     {s.manifest.get('n_images', 0)} ({s.manifest.get('n_skipped', 0)} skipped)")
    click.echo(f"written by {s.manifest.get('world_size', 1)} process(es) in its last run"
               + ("" if "world_size" in s.manifest else " (not recorded: an older store)"))
    if s.has_labels and s.n_rows:
        counts = np.bincount(s.labels[s.labels >= 0]) if (s.labels >= 0).any() else np.zeros(0, int)
        names = s.class_names or [str(i) for i in range(len(counts))]
        click.echo(f"labels     {len(counts)} classes: " + ", ".join(f"{names[i]}={c}" for i, c in enumerate(counts)))
    if s.n_rows:
        sample = s.rows(np.linspace(0, s.n_rows - 1, min(s.n_rows, 2048)).astype(int))
        norms = np.linalg.norm(sample, axis=1)
        click.echo(f"norms      mean {norms.mean():.3g}, min {norms.min():.3g}, max {norms.max():.3g} (sample)")


@store.command()
@click.argument("path", type=click.Path())
@click.option("--layer", type=int, default=None)
def verify(path, layer):
    """Check every shard against the SHA-256 in the manifest."""
    from ..data.store import ActivationStore
    from ..errors import VitatlasError

    s = ActivationStore(path, layer=layer, allow_incomplete=True)
    problems = s.verify(progress=True)
    if problems:
        raise VitatlasError(f"store {s.path} failed verification: {'; '.join(problems)}")
    click.echo(f"ok: {len(s.shards)} shard(s), {s.n_rows} rows verified in {s.path}")


@store.command("shuffle")
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New directory for the copy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the order (same seed, same copy).")
@click.option("--layer", type=int, default=None, help="Layer to copy from a multi-layer store.")
@click.option("--memory-mb", type=float, default=256, show_default=True,
              help="Rows held in memory at once (the order does not depend on it).")
@click.option("--shard-mb", type=float, default=64, show_default=True, help="Size of the copy's shards.")
def shuffle(src, out, seed, layer, memory_mb, shard_mb):
    """Write a copy of a store with its rows in a random order over the whole store (resumable).

    Rows keep their index and label rows and the store's dtype; memory stays bounded (rows are scattered
    into bucket files, then each bucket is permuted in memory). Re-run the same command to resume a killed
    copy. Test hook: ``VITATLAS_TEST_EXIT_AT=0:N`` leaves after the copy's N-th commit.
    """
    import time

    from ..data.shuffle_copy import shuffle_store
    from ..data.store import ActivationStore
    from .test_hooks import exit_hook

    t = time.perf_counter()
    s = shuffle_store(ActivationStore(src, layer=layer), out, seed=seed, progress=True,
                      memory_bytes=int(memory_mb * (1 << 20)), shard_bytes=int(shard_mb * (1 << 20)),
                      on_step=exit_hook())
    click.echo(f"shuffled {s.n_rows} rows x d={s.d} ({s.dtype}) in {time.perf_counter() - t:.1f} s -> {s.path}")


@store.command("from-npy")
@click.argument("file", type=click.Path())
@click.option("--labels", "labels_file", type=click.Path(), default=None,
              help=".npy of ints, or a text file with one label (int or class name) per line.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True)
def from_npy(file, labels_file, out, dtype):
    """Wrap an (n, d) .npy of embeddings you already have (e.g. CLIP) as a store."""
    import numpy as np

    from ..data.store import ActivationStore
    from ..errors import VitatlasError

    path = Path(file)
    if not path.is_file():
        raise VitatlasError(f"no such file: {path}")
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise VitatlasError(f"{path} is not a readable .npy array ({exc})") from None
    labels, class_names = (None, None) if labels_file is None else _read_labels(Path(labels_file))
    if labels is not None and len(labels) != X.shape[0]:
        raise VitatlasError(f"{labels_file} has {len(labels)} labels but {path} has {X.shape[0]} rows")
    s = ActivationStore.from_array(out, X, labels, dtype=dtype, class_names=class_names,
                                   source={"name": str(path), "spec": None})
    click.echo(f"wrote {s.n_rows} x {s.d} ({dtype}) to {s.path}")


def _read_labels(path: Path):
    import numpy as np

    from ..errors import VitatlasError

    if not path.is_file():
        raise VitatlasError(f"no such labels file: {path}")
    if path.suffix == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise VitatlasError(f"{path} is not a readable .npy array ({exc})") from None
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise VitatlasError(f"{path} must hold one integer label per row, got shape {labels.shape} dtype {labels.dtype}")
        return labels.astype(np.int64), None
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if all(line.lstrip("-").isdigit() for line in lines):
        return np.array([int(x) for x in lines], np.int64), None
    names = sorted(set(lines))
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[x] for x in lines], np.int64), names
