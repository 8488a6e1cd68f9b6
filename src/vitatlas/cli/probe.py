"""``vitatlas probe train``: a linear probe on a model's final normed tokens (classification or segmentation)."""

from __future__ import annotations

import click

from ..errors import VitatlasError


@click.group("probe")
def probe() -> None:
    """Linear probes that read interventions' effects (see `vitatlas intervene`)."""


@probe.command("train")
@click.option("--model", "model_name", required=True, help="Model id, e.g. embedded:dinov2-s.")
@click.option("--data", required=True, help="Image source (with patch labels for segmentation).")
@click.option("--task", type=click.Choice(["classification", "segmentation"]), required=True)
@click.option("--masks", default=None, type=click.Path(), help="Mask folder matched to the images in sorted order.")
@click.option("--limit", type=int, default=None, help="Use the first N images (train + held out).")
@click.option("--held-out", type=float, default=0.2, show_default=True, help="Fraction of images held out for scoring.")
@click.option("--max-rows", type=int, default=200_000, show_default=True,
              help="Patch rows used for the fit (subsampled).")
@click.option("--l2", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Probe directory to write.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train(model_name, data, task, masks, limit, held_out, max_rows, l2, batch_size, device, seed, out, progress):
    """Fit a linear probe and report its held-out accuracy (and mIoU for segmentation)."""
    from .. import models
    from ..data.sources import open_source
    from ..intervene.masks import open_data_with_masks
    from ..intervene.probes import train_probe

    if limit is not None and limit <= 0:
        raise VitatlasError(f"--limit must be positive, got {limit}")
    if batch_size <= 0:
        raise VitatlasError(f"--batch-size must be positive, got {batch_size}")
    if task == "segmentation":
        source, mask_source = open_data_with_masks(data, masks, limit=limit)
    else:
        source, mask_source = open_source(data), None
    model = models.load(model_name, device=device)
    result = train_probe(model, source, task, masks=mask_source, limit=limit, held_out=held_out,
                         batch_size=batch_size, max_rows=max_rows, l2=l2, seed=seed, progress=progress)
    result.save(out)
    m = result.metrics
    extra = f" mIoU={m['miou']:.4f}" if "miou" in m else ""
    click.echo(f"saved {out}: {task} probe, {result.n_classes} classes, held-out accuracy={m['accuracy']:.4f}{extra} "
               f"(train {m['train_accuracy']:.4f}; {result.info['n_held_out_images']} held-out images)")
