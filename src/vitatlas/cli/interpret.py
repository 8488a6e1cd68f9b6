"""``vitatlas interpret``: atom cards (top images, heatmaps, statistics, labels) of a fitted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..errors import VitatlasError


def _request(run: Path, store, top: int, rank: str, max_atoms, images: bool, vocab, caption_column) -> dict:
    """What must match for a re-run to continue (or skip) the cards already in --out."""
    return {"run": str(run.resolve()), "store": str(store.path.resolve()), "top": top, "rank": rank,
            "max_atoms": max_atoms, "images": images, "vocab": str(Path(vocab).resolve()) if vocab else None,
            "caption_column": caption_column}


@click.command("interpret")
@click.argument("run", type=click.Path())
@click.option("--acts", required=True, type=click.Path(), help="Activation store the run was fitted on.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the cards.")
@click.option("--top", type=int, default=16, show_default=True, help="Top images kept per atom.")
@click.option("--rank", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="Rank an image by the atom's max or mean over its patches.")
@click.option("--vocab", type=click.Path(), default=None, help="Phrase list (one per line) for text descriptions.")
@click.option("--caption-column", default=None, help="Text column of the image source for caption descriptions.")
@click.option("--max-atoms", type=int, default=None, help="Only the first N atoms.")
@click.option("--layer", type=int, default=None, help="Layer to open when --acts holds several.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-images", is_flag=True, help="Do not re-open the image source: statistics and labels only.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def interpret(run, acts, out, top, rank, vocab, caption_column, max_atoms, layer, device, no_images, progress):
    """Make atom cards for RUN over the store ACTS: OUT/atoms.jsonl, cards/*.png, index.html.

    Resumable: re-run the same command after an interruption. Under torchrun --nproc-per-node N the ranks
    share the streamed pass over the store; rank 0 writes the cards.
    """
    import numpy as np

    from .. import distributed
    from ..data.store import ActivationStore
    from ..dictionary import load
    from ..interpret.api import interpret as make_cards
    from ..io import read_json

    if top <= 0:
        raise VitatlasError(f"--top must be a positive integer, got {top}")
    if max_atoms is not None and max_atoms <= 0:
        raise VitatlasError(f"--max-atoms must be positive, got {max_atoms}")
    out = Path(out)
    store = ActivationStore(acts, layer=layer)
    dictionary = load(run, device=device)
    request = _request(Path(run), store, top, rank, max_atoms, not no_images, vocab, caption_column)
    reuse = False
    if (out / "cards.json").is_file():
        old = read_json(out / "cards.json", "atom cards")
        if old.get("request") != request:
            raise VitatlasError(f"{out} already holds cards made with other arguments ({old.get('request')}): pass "
                                "another --out, or the same arguments to resume")
        if old.get("complete"):
            if distributed.is_main():
                click.echo(f"cards already complete: {(out / 'index.html').resolve()}")
            return
        reuse = True
    cards = make_cards(dictionary, store, top=top, rank=rank, vocab=vocab, max_atoms=max_atoms, device=device,
                       images=not no_images, progress=progress, checkpoint_dir=out / "checkpoint", run_path=run,
                       caption_column=caption_column)
    if cards is None:  # a helper rank under torchrun: its part of the pass is done
        return
    cards.meta["request"] = request
    cards.save(out, progress=progress, reuse_images=reuse)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    kappas = np.array([a["labels"][0]["kappa"] for a in cards.atoms if a["labels"]], dtype=float)
    labelled = f", {int((kappas > 0.5).sum())} with a class label of kappa > 0.5" if kappas.size else ""
    click.echo(f"cards for {cards.n_atoms} atoms{labelled}{'' if cards.has_images else ' (no images)'}: "
               f"{(out / 'index.html').resolve()}")
