"""``vitatlas compare``: which concepts two dictionaries share, matched by how they fire on the same images."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("compare")
@click.argument("run_a", type=click.Path())
@click.argument("run_b", type=click.Path())
@click.option("--acts-a", required=True, type=click.Path(), help="Activation store RUN_A was fitted on.")
@click.option("--acts-b", required=True, type=click.Path(), help="Activation store RUN_B was fitted on (same images).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for compare.json and report.md.")
@click.option("--layer-a", type=int, default=None, help="Layer to open when --acts-a holds several.")
@click.option("--layer-b", type=int, default=None, help="Layer to open when --acts-b holds several.")
@click.option("--cards-a", type=click.Path(), default=None, help="Atom cards of RUN_A (from `vitatlas interpret`).")
@click.option("--cards-b", type=click.Path(), default=None, help="Atom cards of RUN_B.")
@click.option("--align", type=click.Choice(["auto", "tokens", "images"]), default="auto", show_default=True,
              help="Pair rows by image and token position, or one unit per image; auto: tokens when both "
                   "stores hold the same tokens.")
@click.option("--aggregate", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="Per image (images alignment): each atom's largest-magnitude activation (signed) or its mean.")
@click.option("--max-images", type=int, default=None, help="Compare on a fixed random sample of this many images.")
@click.option("--null-quantile", type=float, default=0.99, show_default=True,
              help="An atom is shared when its score beats this quantile of the shuffled-image null.")
@click.option("--null-permutations", type=int, default=3, show_default=True,
              help="Shufflings of RUN_B's images pooled into the null (each one more matching pass).")
@click.option("--min-active", type=int, default=5, show_default=True,
              help="Atoms active on fewer units are not tested.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def compare(run_a, run_b, acts_a, acts_b, out, layer_a, layer_b, cards_a, cards_b, align, aggregate, max_images,
            null_quantile, null_permutations, min_active, seed, device, progress):
    """Match the atoms of RUN_A and RUN_B by the correlation of their activations on the same images; write
    OUT/compare.json, OUT/report.md and OUT/scores.png.

    Resumable: each side's activations are kept in OUT/work until the report is written.

    \b
    vitatlas compare runs/l4 runs/l8 --acts-a acts/layer-04/patches --acts-b acts/layer-08/patches --out cmp
    """
    import shutil

    from ..data.store import ActivationStore
    from ..dictionary import load
    from ..evaluation.compare import compare as run_compare
    from ..evaluation.compare.report import write_compare

    stores = ActivationStore(acts_a, layer=layer_a), ActivationStore(acts_b, layer=layer_b)
    dicts = load(run_a, device=device), load(run_b, device=device)
    names = _names(Path(run_a), Path(run_b))
    work = Path(out) / "work"
    result = run_compare(dicts[0], dicts[1], stores[0], stores[1], align=align, aggregate=aggregate,
                         max_images=max_images, null_quantile=null_quantile,
                         null_permutations=null_permutations, min_active=min_active, seed=seed,
                         names=names, paths=(run_a, run_b), work_dir=work, progress=progress)
    report = write_compare(result, out, cards_a=cards_a, cards_b=cards_b)
    shutil.rmtree(work, ignore_errors=True)
    s = result.summary()
    click.echo(f"{names[0]}: {s['shared_a']}/{dicts[0].n_atoms} atoms shared (null threshold {s['null_threshold_a']}); "
               f"{names[1]}: {s['shared_b']}/{dicts[1].n_atoms} (null threshold {s['null_threshold_b']}); "
               f"{s['mutual_pairs']} mutual pairs")
    click.echo(f"report written to {report}")


def _names(a: Path, b: Path) -> tuple[str, str]:
    na, nb = a.resolve().name or "a", b.resolve().name or "b"
    return (na, nb) if na != nb else (f"{na} (a)", f"{nb} (b)")
