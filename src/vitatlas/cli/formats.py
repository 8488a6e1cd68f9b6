"""``vitatlas import`` and ``vitatlas export``: other libraries' SAEs in and out of vitatlas runs."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import VitatlasError

FORMAT_CHOICES = ("saelens", "prisma", "saev", "sparsify", "dictionary_learning", "overcomplete")


def _refuse_existing(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise VitatlasError(f"{out} exists and is not empty: choose a new --out directory")


@click.command("import")
@click.argument("src")
@click.option("--out", required=True, type=click.Path(), help="Run directory to write (a vitatlas run).")
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default=None,
              help="The checkpoint's library (default: detected from the files).")
@click.option("--model", default=None, help="Model whose activations the SAE reads (default: the checkpoint's metadata).")
@click.option("--layer", type=int, default=None, help="Block index the SAE reads (default: from the checkpoint's hook name).")
@click.option("--tokens", default=None, help="Token kind the SAE reads (cls, patch, ...), as the store records it.")
@click.option("--kind", type=click.Choice(("relu", "topk", "batchtopk", "jump")), default=None,
              help="overcomplete: the SAE's kind (its state dict does not say).")
@click.option("--k", type=int, default=None, help="overcomplete topk: the active latents per row.")
@click.option("--threshold", type=float, default=None, help="overcomplete batchtopk: its running threshold.")
@click.option("--scale-mean", default=None, help="saev: the dataset mean it subtracted (a .pt/.npy/.safetensors file).")
@click.option("--scale-norm", default=None, help="saev: the norm scalar it divided by (a number or a file).")
@click.option("--scaling-factor", type=float, default=None,
              help="SAELens expected_average_only_in: the dataset's norm scaling factor (folded as SAELens does).")
def import_cmd(src, out, fmt, model, layer, tokens, kind, k, threshold, scale_mean, scale_norm, scaling_factor):
    """Read another library's SAE (SRC: a folder, a file, or hf:REPO[/SUBFOLDER] from the local HF cache)
    and save it as a vitatlas run that eval, interpret, intervene and explore take.

    \b
    Formats: SAELens (cfg.json + sae_weights.safetensors), ViT-Prisma (config.json + weights.pt),
    saev (sae.pt), sparsify (cfg.json + sae.safetensors), dictionary_learning (config.json + ae.pt),
    overcomplete (a state dict: --format overcomplete --kind relu|topk|batchtopk|jump [--k K]).
    """
    from ..formats import import_sae

    out = Path(out)
    _refuse_existing(out)
    options = {"model": model, "layer": layer, "tokens": tokens, "kind": kind, "k": k, "threshold": threshold,
               "scale_mean": scale_mean, "scale_norm": scale_norm, "scaling_factor": scaling_factor}
    sae = import_sae(src, format=fmt, **{key: v for key, v in options.items() if v is not None})
    sae.save(out)
    src_info = sae.source
    reads = ", ".join(f"{key}={sae.fit_info[key]}" for key in ("model", "layer", "tokens") if key in sae.fit_info)
    click.echo(f"imported {src_info.get('format')} {src_info.get('architecture') or src_info.get('activation')} SAE: "
               f"{sae.n_atoms} latents over width {sae.d} ({sae.activation}) -> {out}")
    click.echo(f"reads: {reads or 'model, layer and tokens unknown (give --model/--layer/--tokens to have stores checked)'}")


@click.command("export")
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(("saelens", "sparsify")), required=True,
              help="Target layout.")
@click.option("--out", required=True, type=click.Path(), help="Folder to write.")
def export_cmd(run, fmt, out):
    """Write a vitatlas SAE (or a DBK-SVD with non-negative MP coding) in SAELens or sparsify's layout."""
    from ..dictionary import load
    from ..formats import export

    out = Path(out)
    _refuse_existing(out)
    dictionary = load(run)
    export(dictionary, fmt, out)
    click.echo(f"exported {dictionary.learner} run {run} as {fmt} -> {out}")
