"""``vitatlas fit dbksvd``: learn a DBK-SVD dictionary from an activation store.

Checkpoints go to RUN/checkpoint (re-running the same command resumes there); the fitted dictionary
is saved into RUN (config.json + dictionary.safetensors) and a last line reports signal_recovered and
explained_variance over the whole store and the time taken.

Under ``torchrun --nproc-per-node N -m vitatlas fit dbksvd ...`` the fit is data-parallel (each rank
codes its slice of every global batch, see ``learners.dbksvd``); rank 0 alone writes the checkpoints
and the run directory and prints the last line, the evaluation splits its rows over the ranks.
Test hook: ``VITATLAS_TEST_EXIT_AT=RANK:STEP`` makes rank RANK exit abruptly after iteration STEP.
"""

from __future__ import annotations

import click

from . import parse_groups


@click.command("dbksvd")
@click.option("--acts", required=True, type=click.Path(file_okay=False), help="Activation store directory.")
@click.option("--atoms", "n_atoms", required=True, type=int, help="Number of atoms.")
@click.option("--k", required=True, type=int, help="Atoms per sample (sparsity).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--coder", type=click.Choice(["omp", "mp"]), default="omp", show_default=True)
@click.option("--epochs", type=int, default=None,
              help="Passes over the store (default: at least 160 iterations, ending early once the atoms settle).")
@click.option("--sample-batch", type=int, default=None, help="Samples per iteration (default: 8·atoms, >= 4096).")
@click.option("--atom-batch", type=int, default=None, help="Atoms updated in parallel (default: atoms/8).")
@click.option("--stop-tol", type=float, default=1e-4, show_default=True,
              help="End once the atoms move less than this (median 1-|cos| per iteration) 3 times in a row; 0: never.")
@click.option("--center/--no-center", default=None,
              help="Subtract the data mean before coding, kept as the decoder bias b_dec (default: on).")
@click.option("--nonnegative/--signed", "nonnegative", default=None,
              help="Codes >= 0, each atom one direction (default), or signed K-SVD codes.")
@click.option("--dup-threshold", type=float, default=None,
              help="Re-draw the less used atom of any pair with |cos| above this (default: 0.7).")
@click.option("--approx", is_flag=True, help="Approximate K-SVD (one power step).")
@click.option("--candidates", default="auto", show_default=True,
              help="Screening width while fitting: 'auto', 'exact' or an integer.")
@click.option("--groups", default=None, help="Matryoshka prefix sizes, e.g. 64,256,1024 (last = --atoms).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=int, default=20, show_default=True, help="Iterations between checkpoints.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def dbksvd(acts, n_atoms, k, out, coder, epochs, sample_batch, atom_batch, stop_tol, center, nonnegative,
           dup_threshold, approx, candidates, groups, device, dtype, seed, checkpoint_every, no_progress):
    """Fit a Double-Batch K-SVD dictionary (resumes from OUT/checkpoint when re-run)."""
    import time
    from pathlib import Path

    from .. import distributed
    from ..data.store import ActivationStore
    from ..errors import VitatlasError
    from ..evaluation.metrics import reconstruction_metrics
    from ..learners.dbksvd import DBKSVD
    from .fit_summary import metric_sample
    from .test_hooks import exit_hook

    if candidates == "exact":
        cand = None
    elif candidates == "auto":
        cand = "auto"
    else:
        try:
            cand = int(candidates)
        except ValueError:
            raise VitatlasError(f"--candidates must be 'auto', 'exact' or an integer, got {candidates!r}") from None
    # the options are checked by DBKSVDConfig's declared constraints before the store is opened; the
    # flags left unset keep the library's defaults
    given = {"center": center, "nonnegative": nonnegative, "dup_threshold": dup_threshold}
    model = DBKSVD(n_atoms, k, coder=coder, epochs=epochs, sample_batch=sample_batch, atom_batch=atom_batch,
                   stop_tol=stop_tol, approx=approx, candidates=cand, groups=parse_groups(groups), device=device,
                   dtype=dtype, seed=seed, checkpoint_every=checkpoint_every,
                   **{key: v for key, v in given.items() if v is not None})
    store = ActivationStore(acts)
    start = time.perf_counter()
    out = Path(out)
    model.fit(store, checkpoint_dir=out / "checkpoint", progress=not no_progress, callback=exit_hook())
    main = distributed.is_main()
    if main:
        model.save(out)
    fit_s = time.perf_counter() - start
    sample, measured_on = metric_sample(store)
    m = reconstruction_metrics(model, sample)  # every rank: the evaluation splits its rows when data-parallel
    distributed.barrier("waiting for rank 0 to save the dictionary")
    if main:
        click.echo(f"saved {out}: signal_recovered={m['signal_recovered']:.4f} "
                   f"explained_variance={m['explained_variance']:.4f} l0={m['l0']:.2f} "
                   f"(on {measured_on}) fit_seconds={fit_s:.1f} total_seconds={time.perf_counter() - start:.1f}")
