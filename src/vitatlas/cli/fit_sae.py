"""``vitatlas fit sae``: train one sparse autoencoder, or a sweep of them in one pass over the store.

Every repeatable option (--k, --l1, --atoms, --lr) multiplies the sweep: one SAE per combination, all
trained on the same batches (each batch read once). With one SAE the model is saved into RUN; with
several, each goes to RUN/<name> (e.g. RUN/topk-k32-n1536). Checkpoints go to RUN/checkpoint and a
re-run of the same command resumes there; metrics are logged to RUN/log.jsonl. The last lines report
explained_variance, l0 and dead_fraction of every SAE over the whole store.

Under ``torchrun --nproc-per-node N -m vitatlas fit sae ...`` the ranks split every global batch
(data-parallel, see ``learners.sae.train``); rank 0 alone writes the checkpoint, the log and the models.

Test hook (documented so it is not mistaken for a feature): ``VITATLAS_TEST_EXIT_AT=RANK:STEP`` makes
that rank leave with ``os._exit(1)`` right after that training step, as a killed process would; the
scale-out tests use it to check that the job stops with a one-line error and that a re-run resumes.
"""

from __future__ import annotations

import click

from . import parse_groups


@click.command("sae")
@click.option("--kind", type=click.Choice(["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]), default="topk",
              show_default=True, help="SAE family.")
@click.option("--acts", required=True, type=click.Path(file_okay=False), help="Activation store directory.")
@click.option("--atoms", "n_latents", required=True, type=int, multiple=True, help="Latents (repeatable).")
@click.option("--k", type=int, multiple=True, help="Active latents per sample: topk/batchtopk/matryoshka (repeatable).")
@click.option("--l1", type=float, multiple=True, help="Sparsity coefficient: relu/jumprelu (repeatable).")
@click.option("--lr", type=float, multiple=True, help="Learning rate (repeatable; default depends on --atoms).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--groups", default=None, help="Matryoshka prefix sizes, e.g. 96,384,1536 (last = --atoms).")
@click.option("--base", type=click.Choice(["topk", "batchtopk"]), default=None,
              help="Matryoshka activation (default: batchtopk).")
@click.option("--init", type=click.Choice(["data", "random"]), default=None,
              help="Decoder rows at the start: random directions (default) or directions of data rows.")
@click.option("--revive", type=click.Choice(["none", "lift", "resample"]), default=None,
              help="What to do with latents that stop firing (topk/batchtopk/matryoshka): leave them to AuxK "
                   "(none, the default), lift their encoder bias, or resample them from badly reconstructed rows.")
@click.option("--epochs", type=int, default=None, help="Passes over the store (default: the --tokens budget).")
@click.option("--tokens", type=int, default=None,
              help="Training budget in rows (default: 3 passes, at least 1M rows, at most 8 passes).")
@click.option("--batch-size", type=int, default=1024, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Steps between checkpoints.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def sae(kind, acts, n_latents, k, l1, lr, out, groups, base, init, revive, epochs, tokens, batch_size, device, dtype, seed, checkpoint_every,
        no_progress):
    """Train sparse autoencoders (resumes from OUT/checkpoint when re-run)."""
    import itertools
    import time
    from pathlib import Path

    from .. import distributed
    from ..data.store import ActivationStore
    from ..errors import VitatlasError
    from ..evaluation.metrics import reconstruction_metrics
    from ..learners.sae import SAE, SAESweep
    from .fit_summary import metric_sample
    from .test_hooks import exit_hook

    # every option is checked by the SAE's own declared constraints (one line each, naming the option);
    # options a family does not use (--k on relu, --groups on topk) are refused there too
    family_options = {name: value for name, value in (("groups", parse_groups(groups)), ("base", base),
                                                      ("init", init), ("revive", revive)) if value is not None}
    saes = [SAE(kind=kind, n_latents=n, k=kk, l1=c, lr=rate, epochs=epochs, tokens=tokens, batch_size=batch_size,
                device=device, dtype=dtype, seed=seed, checkpoint_every=checkpoint_every, **family_options)
            for n, kk, c, rate in itertools.product(n_latents, k or [None], l1 or [None], lr or [None])]
    store = ActivationStore(acts)
    names = [s.name for s in saes]
    if len(set(names)) != len(names):
        raise VitatlasError("the same SAE is asked for twice (repeated --k/--l1/--atoms/--lr value)")
    out = Path(out)
    start = time.perf_counter()
    SAESweep(saes).fit(store, checkpoint_dir=out / "checkpoint", progress=not no_progress, log_dir=out,
                       callback=exit_hook())
    fit_s = time.perf_counter() - start
    main = distributed.is_main()
    sample, measured_on = metric_sample(store)
    for s in saes:
        where = out if len(saes) == 1 else out / s.name
        if main:
            s.save(where)
        m = reconstruction_metrics(s, sample)  # every rank: the evaluation splits its rows when data-parallel
        if main:
            click.echo(f"saved {where}: explained_variance={m['explained_variance']:.4f} l0={m['l0']:.2f} "
                       f"dead_fraction={m['dead_fraction']:.4f} signal_recovered={m['signal_recovered']:.4f} "
                       f"(on {measured_on})")
    distributed.barrier("waiting for rank 0 to save the SAEs")
    if main:
        click.echo(f"fit_seconds={fit_s:.1f} total_seconds={time.perf_counter() - start:.1f}")
