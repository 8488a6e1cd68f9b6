"""``vitatlas scorecard``: every run scored with every measure on the same images: one table, JSON, one plot."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import VitatlasError
from .intervene import STRENGTHS


@click.command("scorecard")
@click.argument("runs", nargs=-1, type=click.Path())
@click.option("--acts", required=True, type=click.Path(), help="Activation store the runs were fitted on.")
@click.option("--out", required=True, type=click.Path(), help="Directory for scorecard.md, .json and .png.")
@click.option("--layer", type=int, default=None, help="Layer to open when --acts holds several.")
@click.option("--max-images", type=int, default=300, show_default=True,
              help="Score on every row of this many images of the store (a fixed random sample).")
@click.option("--model", "model_name", default=None, help="Model id, for the intervention test (with --probe, --data).")
@click.option("--probe", "probe_path", default=None, type=click.Path(), help="Segmentation probe (`vitatlas probe train`).")
@click.option("--data", default=None, help="Image source with patch labels for the intervention test.")
@click.option("--masks", default=None, type=click.Path(), help="Mask folder matched to --data in sorted order.")
@click.option("--limit", type=int, default=200, show_default=True, help="Images of --data the intervention test uses.")
@click.option("--strength", "strengths", type=float, multiple=True, default=STRENGTHS, show_default=True,
              help="Edit strengths of the intervention sweep (repeat).")
@click.option("--features-per-class", type=int, default=1, show_default=True,
              help="Atoms edited together per class in the intervention test (`vitatlas intervene`).")
@click.option("--cards", multiple=True, type=click.Path(), help="Interpret output per run (max activations).")
@click.option("--intervene-from", "intervene_from", default=None, type=click.Path(),
              help="Read the intervention rows from this `vitatlas intervene --task segmentation` output instead.")
@click.option("--batch-size", type=int, default=4096, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def scorecard(runs, acts, out, layer, max_images, model_name, probe_path, data, masks, limit, strengths,
              features_per_class, cards, intervene_from, batch_size, device, seed, progress):
    """Score RUNS on the store ACTS: reconstruction, labels, sparse probing, spatial coherence, redundancy,
    dead/dense atoms and (with --model/--probe/--data) the intervention test; see docs/scorecard.md."""
    from .. import load as load_dictionary
    from ..data.store import ActivationStore
    from ..evaluation.scorecard_report import table_markdown, write_scorecard
    from ..evaluation.scoring import scorecard as score
    from ..io import read_json
    from .eval import find_runs

    if not runs:
        raise VitatlasError("give at least one run directory (written by `vitatlas fit`)")
    if max_images <= 0:
        raise VitatlasError(f"--max-images must be positive, got {max_images}")
    given = [o for o, v in (("--model", model_name), ("--probe", probe_path), ("--data", data)) if v]
    if given and len(given) < 3:
        raise VitatlasError("the intervention test needs --model, --probe and --data together: "
                            f"{', '.join(given)} given")
    if given and intervene_from:
        raise VitatlasError("give either --intervene-from or --model/--probe/--data, not both")
    store = ActivationStore(acts, layer=layer)
    found = find_runs(runs)
    dictionaries = {name: load_dictionary(path, device=device) for name, path in found}
    intervention = None
    if intervene_from:
        path = Path(intervene_from) / "intervene.json"
        if not path.is_file():
            raise VitatlasError(f"{intervene_from} holds no intervene.json: pass a `vitatlas intervene` --out directory")
        intervention = read_json(path, what="intervention result")
    elif given:
        intervention = _intervene(dictionaries, model_name, probe_path, data, masks, limit, strengths, cards, device,
                                  seed, progress, Path(out) / "intervene", features_per_class)
    card = score(dictionaries, store, max_images=max_images, intervention=intervention, seed=seed,
                 batch_size=batch_size, progress=progress)
    report = write_scorecard(out, card)
    click.echo(table_markdown(card))
    click.echo(f"scorecard written to {report}")


def _intervene(dictionaries, model_name, probe_path, data, masks, limit, strengths, cards, device, seed, progress,
               out: Path, features_per_class: int = 1) -> dict:
    """The segmentation protocol on these runs (its own report under OUT/intervene); its intervene.json."""
    from .. import models
    from ..intervene.heads import LinearProbe
    from ..intervene.masks import open_data_with_masks
    from ..intervene.maxact import from_cards
    from ..intervene.protocol import check_strengths, segmentation_protocol
    from ..intervene.report import write_report

    strengths = check_strengths(strengths)
    if limit <= 0:
        raise VitatlasError(f"--limit must be positive, got {limit}")
    if features_per_class <= 0:
        raise VitatlasError(f"--features-per-class must be positive, got {features_per_class}")
    if cards and len(cards) != len(dictionaries):
        raise VitatlasError(f"give one --cards per run: {len(cards)} given for {len(dictionaries)} runs")
    max_acts = {name: from_cards(c, d.n_atoms) for (name, d), c in zip(dictionaries.items(), cards)} or None
    probe = LinearProbe.load(probe_path)
    if probe.task != "segmentation":
        raise VitatlasError(f"the scorecard's intervention test needs a segmentation probe; {probe_path} is a "
                            f"{probe.task} probe")
    model = models.load(model_name, device=device)
    probe.check_model(model)
    source, mask_source = open_data_with_masks(data, masks, limit=limit)
    output = segmentation_protocol(model, dictionaries, probe, source, mask_source, limit=limit, strengths=strengths,
                                   max_activations=max_acts, seed=seed, progress=progress,
                                   features_per_class=features_per_class)
    write_report(out, output, model, source)
    return output["json"]
