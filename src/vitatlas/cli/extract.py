"""`vitatlas extract`: record a ViT's activations over images into an activation store.

Under ``torchrun --nproc-per-node N -m vitatlas extract ...`` the ranks split the image shards (see
``data.extract``); rank 0 alone reports.

Test hook (documented so it is not mistaken for a feature): ``VITATLAS_TEST_EXIT_AT=RANK:SHARD`` makes
that rank leave with ``os._exit(1)`` just before it writes that shard, as a killed process would; the
scale-out tests use it to check that the job stops with a one-line error and that a re-run resumes.
"""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "model_name", required=True, metavar="M",
              help="embedded:dinov2-s, or hf:<repo-or-local-path> (CLIP, SigLIP, DINOv2, ViT).")
@click.option("--data", required=True, metavar="S",
              help="embedded:fashion-mnist[:train|:test], embedded:digits, embedded:photos, an image folder, "
                   "or hf-disk:PATH.")
@click.option("--layer", "layers", type=int, multiple=True, metavar="L",
              help="Residual stream after block L (0-based; negative counts from the end). Repeatable. "
                   "Needed by every token kind but embedding.")
@click.option("--tokens", type=click.Choice(["cls", "patches", "all", "embedding"]), multiple=True, default=("cls",),
              show_default=True, help="Token kind; repeat for several stores from one forward pass (OUT/cls, "
                                      "OUT/patches). embedding: CLIP/SigLIP's projected image embedding (the joint "
                                      "image-text space), one row per image, no --layer.")
@click.option("--caption-column", default=None, metavar="NAME",
              help="Where the source's captions are: a text column of a saved HF dataset, or the caption key of an "
                   "image folder's captions.jsonl (default: found automatically). Used by interpret.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output store directory.")
@click.option("--limit", type=int, default=None, help="Use only the first N images.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True,
              help="Storage dtype; float16 halves the disk.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--shard-mb", type=float, default=64.0, show_default=True, help="Target shard size in MiB.")
def extract(model_name, data, layers, tokens, caption_column, out, limit, batch_size, dtype, device, shard_mb):
    """Extract activations (resumable: re-run the same command after an interruption).

    Under torchrun --nproc-per-node N the ranks split the images, each writing its own shards; the store is
    the same as one process makes, and a killed run resumes with any N.
    """
    from .. import distributed
    from ..data.extract import extract as run_extract
    from ..errors import VitatlasError
    from .test_hooks import exit_hook

    if shard_mb <= 0:
        raise VitatlasError(f"--shard-mb must be positive, got {shard_mb}")
    result = run_extract(model_name, data, list(layers), list(tokens), out, limit=limit, batch_size=batch_size,
                         dtype=dtype, shard_bytes=int(shard_mb * (1 << 20)), device=device,
                         caption_column=caption_column, on_shard=exit_hook())
    if not distributed.is_main():
        return
    what = ", ".join([f"layer {layer}" for layer in result.layers] + (["embedding"] if "embedding" in tokens else []))
    click.echo(f"extracted {result.n_rows} new rows from {result.n_images} images ({what}) in {result.seconds:.1f} s "
               f"({result.rows_per_second:.0f} rows/s, {result.n_skipped} skipped) -> {result.out}")
