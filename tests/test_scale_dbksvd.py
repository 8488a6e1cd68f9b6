"""DBK-SVD data-parallel over 2 gloo processes: the same atoms as one process, one run directory, resume.

Tolerance: the fits run in float64. With 1 or 2 processes every sample is coded by the same arithmetic
(its own row of Y Dᵀ and its own pursuit); what differs is that each rank sums its half of the batch
for Eᵀw, the usage counts and the memory energies and the halves are added: a reordering of float64
sums, about 1e-16 relative per power step, grown by a dozen iterations to far below 1e-9. A support
choice (argmax of |DᵀR|) or a re-draw could only flip on a near-tie closer than that, which random
data does not produce; 1e-7 therefore separates "the same trajectory" from "another one" (a missing
reduction or a rank-local re-draw moves atoms by more than 1e-2).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _dist import (
    assert_job_stopped_with_one_line_error,
    assert_survivor_stopped_cleanly,
    error_or_finished,
    run_ranks,
    run_until_a_rank_dies,
    torchrun,
    vanish_on_rank_1,
)
from _planted import planted

from vitatlas import ActivationStore
from vitatlas.learners.dbksvd import DBKSVD
from vitatlas.learners.dbksvd.coders import batch_omp, sparse_decode
from vitatlas.learners.dbksvd.ksvd_update import ksvd_update

TOL = dict(rtol=1e-7, atol=1e-7)
OPTS = dict(epochs=3, sample_batch=500, seed=1, dtype="float64", center=False, nonnegative=False)  # signed data
# the defaults: the data mean (summed per rank, all-reduced) as b_dec and non-negative codes
CENTRED = {**OPTS, "center": True, "nonnegative": True}


def _data(n: int = 1500, shift: float = 0.0) -> np.ndarray:
    """Planted signed data; ``shift`` adds a shared mean (for the centred fits to find)."""
    X, _ = planted(n=n, d=16, m=32, k=3, noise=0.05, seed=5, low=1.0, high=2.0, signed=True)
    return X.astype(np.float64) + shift


def _fit_on_rank(rank: int, opts: dict):
    model = DBKSVD(32, 3, **opts).fit(_data(shift=0.5 if opts["center"] else 0.0), progress=False)
    bias = None if model.b_dec is None else model.b_dec.numpy().copy()
    return model.atoms.numpy().copy(), list(model.history), model.fit_info.get("world_size"), bias


def _supports(atoms: np.ndarray, X: np.ndarray, nonnegative: bool = False) -> np.ndarray:
    D = torch.from_numpy(atoms)
    Y = torch.from_numpy(X)
    idx, _ = batch_omp(Y @ D.T, D @ D.T, (Y * Y).sum(1), 3, nonnegative=nonnegative)
    return np.sort(idx.numpy(), axis=1)


@pytest.mark.parametrize("opts", [OPTS, {**OPTS, "coder": "mp", "groups": [8, 32]}, CENTRED],
                         ids=["omp", "mp-matryoshka", "centred-nonnegative"])
def test_two_ranks_fit_the_same_atoms_as_one_process(opts):
    X = _data(shift=0.5 if opts["center"] else 0.0)
    single = DBKSVD(32, 3, **opts).fit(X, progress=False)
    out = run_ranks(_fit_on_rank, opts, world_size=2)
    (a0, h0, ws0, b0), (a1, h1, _, b1) = out
    np.testing.assert_array_equal(a0, a1)  # the ranks hold literally the same atoms
    assert h0 == h1 and ws0 == 2
    if opts["center"]:  # the same mean on both ranks, and the one a single process computes
        np.testing.assert_array_equal(b0, b1)
        np.testing.assert_allclose(b0, single.b_dec.numpy(), **TOL)
    np.testing.assert_allclose(a0, single.atoms.numpy(), **TOL)
    np.testing.assert_allclose(h0, single.history, **TOL)  # the reduced signal_recovered history
    X = X - (0 if single.b_dec is None else single.b_dec.numpy())
    same = _supports(a0, X, opts["nonnegative"]) == _supports(single.atoms.numpy(), X, opts["nonnegative"])
    assert same.all()
    assert single.history[-1] > single.history[0] + 0.02  # a fit that learned something, not a fixed point


def _update_on_rank(rank: int, opts: dict):
    """One K-SVD sweep with 2 ranks, each holding its half of the same batch (re-draws included)."""
    from vitatlas import distributed

    Y, D, idx, val = _coded()
    part = distributed.shard(Y.shape[0])
    sl = slice(part.start, part.stop)
    R = Y[sl] - sparse_decode(idx[sl], val[sl], D)
    v = val[sl].clone()
    counts = ksvd_update(R, D, idx[sl], v, generator=torch.Generator().manual_seed(0), G=D @ D.T,
                         distributed=True, **opts)
    return D.numpy(), counts.numpy(), v.numpy(), R.numpy()


def _coded():
    rng = np.random.default_rng(3)
    D = torch.from_numpy(rng.standard_normal((30, 16)))
    D /= D.norm(dim=1, keepdim=True)
    D[29] = D[28]  # an exact twin: re-drawn
    Y = torch.from_numpy(rng.standard_normal((301, 16)))
    idx, val = batch_omp(Y @ D[:28].T, D[:28] @ D[:28].T, (Y * Y).sum(1), 3)  # atoms 28, 29 unused
    return Y, D, idx, val


@pytest.mark.parametrize("opts", [dict(atom_batch=7, memory=2.0), dict(atom_batch=30, approx=True)],
                         ids=["power-memory", "approx"])
def test_a_sweep_split_over_two_ranks_equals_the_whole_batch_sweep(opts):
    Y, D, idx, val = _coded()
    R = Y - sparse_decode(idx, val, D)
    counts = ksvd_update(R, D, idx, val, generator=torch.Generator().manual_seed(0), G=D @ D.T, **opts)
    (D0, c0, v0, R0), (D1, c1, v1, R1) = run_ranks(_update_on_rank, opts, world_size=2)
    np.testing.assert_array_equal(D0, D1)
    np.testing.assert_array_equal(c0, counts.numpy())
    np.testing.assert_allclose(D0, D.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([v0, v1]), val.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([R0, R1]), R.numpy(), rtol=1e-12, atol=1e-12)


def test_single_process_path_takes_no_collective_and_is_unchanged(monkeypatch, tmp_path):
    from vitatlas import distributed

    X = _data(800).astype(np.float32)
    opts = dict(epochs=2, sample_batch=200, seed=2, checkpoint_every=3)
    plain = DBKSVD(32, 3, **opts).fit(X, progress=False)

    def boom(*a, **k):
        raise AssertionError("a collective was called in a single process")

    # (``distributed.shard`` is arithmetic, not a collective: the batch stream takes a 1-process share with it)
    for name in ("all_reduce_", "broadcast_", "broadcast_object", "barrier", "check_same", "all_gather_object"):
        monkeypatch.setattr(distributed, name, boom)
    again = DBKSVD(32, 3, **opts).fit(X, checkpoint_dir=tmp_path, progress=False)
    assert torch.equal(again.atoms, plain.atoms) and again.history == plain.history
    # the data-parallel sweep run by one process (its collectives are no-ops) is the plain sweep, bit for bit
    monkeypatch.undo()
    Y, D, idx, val = _coded()
    R = Y - sparse_decode(idx, val, D)
    D2, R2, v2 = D.clone(), R.clone(), val.clone()
    ksvd_update(R, D, idx, val, atom_batch=5, generator=torch.Generator().manual_seed(0), G=D @ D.T, memory=1.0)
    ksvd_update(R2, D2, idx, v2, atom_batch=5, generator=torch.Generator().manual_seed(0), G=D2 @ D2.T, memory=1.0,
                distributed=True)
    assert torch.equal(D, D2) and torch.equal(R, R2) and torch.equal(val, v2)


def _killed_after(rank: int, at: int):
    stop = vanish_on_rank_1(rank, at)
    return error_or_finished(lambda: DBKSVD(32, 3, **OPTS).fit(_data(), progress=False, callback=stop))


def test_a_killed_rank_stops_the_job_with_a_one_line_error():
    assert_survivor_stopped_cleanly(run_until_a_rank_dies(_killed_after, 3))


# ---- the command under torchrun ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale_dbksvd") / "acts"
    ActivationStore.from_array(path, _data().astype(np.float32))
    return path


def _cli_args(store, out) -> list[str]:
    return ["fit", "dbksvd", "--acts", str(store), "--atoms", "32", "--k", "3", "--epochs", "3", "--sample-batch",
            "500", "--dtype", "float64", "--seed", "1", "--checkpoint-every", "4", "--no-progress", "--out", str(out)]


def _atoms(run) -> np.ndarray:
    import vitatlas

    return vitatlas.load(run).atoms.numpy()


def test_torchrun_fit_writes_one_run_equal_to_one_process_and_resumes_after_a_kill(store, tmp_path):
    from click.testing import CliRunner

    from vitatlas.cli import main

    single = tmp_path / "single"
    res = CliRunner().invoke(main, _cli_args(store, single))
    assert res.exit_code == 0, res.output

    out = tmp_path / "dp"
    res = torchrun(_cli_args(store, out), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("saved ") == 1  # rank 0 reports (and saves) once
    np.testing.assert_allclose(_atoms(out), _atoms(single), **TOL)
    assert json.loads((out / "config.json").read_text())["fit_info"]["world_size"] == 2

    # rank 1 exits abruptly after iteration 6 (checkpoint at 4): the job fails with one line, a re-run resumes
    killed = tmp_path / "killed"
    res = torchrun(_cli_args(store, killed), nproc=2, env={"VITATLAS_TEST_EXIT_AT": "1:6"})
    assert_job_stopped_with_one_line_error(res)  # lost contact, or torchrun's SIGTERM came first: either says re-run
    assert json.loads((killed / "checkpoint" / "state.json").read_text())["step"] == 4
    res = torchrun(_cli_args(store, killed), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_allclose(_atoms(killed), _atoms(single), **TOL)
