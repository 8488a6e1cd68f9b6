"""``vitatlas intervene``: the quantitative intervention protocol for one or more runs, with controls."""

from __future__ import annotations

import time

import click

from ..errors import VitatlasError

STRENGTHS = (0.25, 0.5, 1.0, 2.0)  # intervene.protocol.STRENGTHS, without importing torch for --help


@click.command("intervene")
@click.argument("runs", nargs=-1, type=click.Path())
@click.option("--model", "model_name", required=True, help="Model id the runs were fitted on.")
@click.option("--data", required=True, help="Image source (with patch labels for segmentation).")
@click.option("--task", type=click.Choice(["classification", "segmentation"]), required=True)
@click.option("--probe", "probe_path", required=True, type=click.Path(), help="Probe from `vitatlas probe train`.")
@click.option("--masks", default=None, type=click.Path(), help="Mask folder matched to the images in sorted order.")
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the runs' fit layer).")
@click.option("--limit", type=int, default=None, help="Use the first N images (calibration + held out).")
@click.option("--strength", "strengths", type=float, multiple=True, default=STRENGTHS, show_default=True,
              help="Segmentation: set the chosen atom to -strength x its max observed activation; repeat for a "
                   "sweep (the headline strength is chosen from it, docs/intervene.md).")
@click.option("--features-per-class", type=int, default=1, show_default=True,
              help="Segmentation: edit the top N atoms by F1 for each class together (a class spread over "
                   "several atoms); the random-atom control edits as many random atoms.")
@click.option("--calibration", type=float, default=0.3, show_default=True,
              help="Fraction of images used to choose atoms (the rest are held out).")
@click.option("--cards", multiple=True, type=click.Path(),
              help="Interpret output dir per run (same order) giving max_activation; default: computed on the "
                   "calibration images.")
@click.option("--classes", default=None, help="Comma-separated class names to edit (default: all).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Directory for intervene.json, report.md and plots.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def intervene(runs, model_name, data, task, probe_path, masks, layer, limit, strengths, features_per_class,
              calibration, cards, classes,
              batch_size, device, seed, out, progress):
    """Edit each run's atoms inside the model and measure what changes, next to random controls."""
    from .. import load as load_dictionary
    from .. import models
    from ..data.sources import open_source
    from ..intervene.heads import LinearProbe
    from ..intervene.masks import open_data_with_masks
    from ..intervene.maxact import from_cards
    from ..intervene.protocol import check_strengths, classification_protocol, segmentation_protocol
    from ..intervene.report import headline, write_report
    from .eval import find_runs

    if not runs:
        raise VitatlasError("give at least one run directory (written by `vitatlas fit`)")
    strengths = check_strengths(strengths)
    if limit is not None and limit <= 0:
        raise VitatlasError(f"--limit must be positive, got {limit}")
    if batch_size <= 0:
        raise VitatlasError(f"--batch-size must be positive, got {batch_size}")
    if features_per_class <= 0:
        raise VitatlasError(f"--features-per-class must be positive, got {features_per_class}")
    if features_per_class != 1 and task != "segmentation":
        raise VitatlasError("--features-per-class applies to --task segmentation (classification ablates its top "
                            "1, 5 and 20 atoms)")
    found = find_runs(runs)
    dictionaries = {name: load_dictionary(path, device=device) for name, path in found}
    if cards and len(cards) != len(dictionaries):
        raise VitatlasError(f"give one --cards per run: {len(cards)} given for {len(dictionaries)} runs")
    max_acts = {name: from_cards(c, d.n_atoms) for (name, d), c in zip(dictionaries.items(), cards)} or None
    probe = LinearProbe.load(probe_path)
    if probe.task != task:
        raise VitatlasError(f"--task {task} needs a {task} probe, but {probe_path} is a {probe.task} probe")
    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    model = models.load(model_name, device=device)
    probe.check_model(model)
    t0 = time.perf_counter()
    if task == "segmentation":
        source, mask_source = open_data_with_masks(data, masks, limit=limit)
        output = segmentation_protocol(model, dictionaries, probe, source, mask_source, layer=layer, limit=limit,
                                       strengths=strengths, calibration=calibration, max_activations=max_acts,
                                       classes=class_list, seed=seed, batch_size=batch_size, progress=progress,
                                       features_per_class=features_per_class)
    else:
        source = open_source(data)
        output = classification_protocol(model, dictionaries, probe, source, layer=layer, limit=limit,
                                         calibration=calibration, max_activations=max_acts, classes=class_list,
                                         seed=seed, batch_size=batch_size, progress=progress)
    output["json"]["setup"]["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(out, output, model, source)
    click.echo(headline(output["json"]))
    click.echo(f"wrote {out}/intervene.json, report.md and plots ({output['json']['setup']['seconds']:.0f} s)")
