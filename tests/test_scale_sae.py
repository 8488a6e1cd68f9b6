"""SAE training data-parallel over 2 gloo processes: the same SAEs as one process, one run directory, resume.

Tolerance: the runs train in float64, where 1 and 2 processes do the same arithmetic except that each
rank sums its half of the batch and the halves are added (gradients, statistics, the initial mean):
a reordering of float64 sums, about 1e-16 relative per step, grown by a few dozen Adam steps to well
under 1e-9. A top-k choice or a dead-latent decision could only flip on a near-tie closer than that,
which random data does not produce; so 1e-7 (relative and absolute) separates "same trajectory"
from "another trajectory" (a wrong normalisation or a missing reduction moves parameters by > 1e-3).
"""

from __future__ import annotations

import json
import shutil

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
from vitatlas.learners.sae import SAE, SAESweep

TOL = dict(rtol=1e-7, atol=1e-7)


def _data() -> np.ndarray:
    X, _ = planted(n=640, d=16, m=40, k=3, noise=0.05, seed=2)
    return X.astype(np.float64)


def _make(kind: str, **kw) -> SAE:
    opts = dict(n_latents=48, k=3, epochs=3, batch_size=128, seed=1, dtype="float64", dead_tokens=256)
    opts.update(kw)
    return SAE(kind=kind, **opts)


def _params(saes) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy().copy() for k, v in s.params.items()} for s in saes]


def _assert_same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for name in w:
            np.testing.assert_allclose(g[name], w[name], err_msg=name, **TOL)


def _fit_on_rank(rank: int, specs: list[tuple[str, dict]]):
    saes = [_make(kind, **kw) for kind, kw in specs]
    SAESweep(saes).fit(_data(), progress=False)
    return _params(saes), [s.fit_info["train_metrics"] for s in saes]


@pytest.mark.parametrize("specs", [
    [("topk", {})],
    [("batchtopk", {})],
    [("topk", {"k": 2}), ("batchtopk", {"n_latents": 32, "lr": 2e-3})],  # a 2-member sweep
], ids=["topk", "batchtopk", "sweep"])
def test_two_ranks_train_the_same_saes_as_one_process(specs):
    ranks = run_ranks(_fit_on_rank, specs)
    single = [_make(kind, **kw) for kind, kw in specs]
    SAESweep(single).fit(_data(), progress=False)
    want = _params(single)
    for params, metrics in ranks:
        _assert_same(params, want)  # every rank holds the single-process parameters
        for got_m, s in zip(metrics, single):
            for key in ("explained_variance", "l0", "dead_fraction"):
                assert got_m[key] == pytest.approx(s.fit_info["train_metrics"][key], rel=1e-6, abs=1e-9), key
    for s in single:  # BatchTopK's threshold comes from the global batch's top-k over both ranks
        if s.family == "batchtopk":
            assert float(s.params["threshold"]) > 0


def _killed_after(rank: int, at: int):
    stop = vanish_on_rank_1(rank, at)
    return error_or_finished(lambda: _make("topk", epochs=4).fit(_data(), progress=False, callback=stop))


def test_a_killed_rank_stops_the_job_with_a_one_line_error():
    assert_survivor_stopped_cleanly(run_until_a_rank_dies(_killed_after, 3))


# ---- the command under torchrun ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale_sae") / "acts"
    ActivationStore.from_array(path, _data().astype(np.float32))
    return path


def _cli_args(store, out) -> list[str]:
    return ["fit", "sae", "--kind", "batchtopk", "--acts", str(store), "--atoms", "48", "--k", "3", "--epochs", "3",
            "--batch-size", "128", "--dtype", "float64", "--seed", "1", "--checkpoint-every", "4", "--no-progress",
            "--out", str(out)]


def _saved(run) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    files = sorted(p for p in run.glob("*.safetensors"))
    assert files, f"no model saved in {run}"
    out = {}
    for f in files:
        out.update({k: v.numpy() for k, v in load_file(f).items()})
    return out


def _single_run(store, out):
    from click.testing import CliRunner

    from vitatlas.cli import main

    res = CliRunner().invoke(main, _cli_args(store, out), catch_exceptions=False, standalone_mode=False)
    assert res.exit_code in (0, None), res.output
    return out


def test_torchrun_fit_writes_one_run_equal_to_one_process_and_resumes_after_a_kill(store, tmp_path):
    single = _saved(_single_run(store, tmp_path / "single"))

    out = tmp_path / "dp"
    res = torchrun(_cli_args(store, out), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("saved ") == 1  # rank 0 reports (and saves) once
    got = _saved(out)
    assert set(got) == set(single)
    for name in single:
        np.testing.assert_allclose(got[name], single[name], err_msg=name, **TOL)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "epoch_end" for r in log) == 3  # one writer: one row per epoch

    # kill rank 1 after step 7 (a checkpoint was written at step 4): the job fails; a re-run resumes
    killed = tmp_path / "killed"
    res = torchrun(_cli_args(store, killed), nproc=2, env={"VITATLAS_TEST_EXIT_AT": "1:7"})
    assert_job_stopped_with_one_line_error(res)
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and not state["complete"]
    shutil.copytree(killed, tmp_path / "killed-1")
    res = torchrun(_cli_args(store, killed), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    # the checkpoint holds global sums: it also resumes in one process (another world size), to the same SAE
    _single_run(store, tmp_path / "killed-1")
    for run in (killed, tmp_path / "killed-1"):
        resumed = _saved(run)
        for name in single:
            np.testing.assert_allclose(resumed[name], single[name], err_msg=name, **TOL)
        assert json.loads((run / "checkpoint" / "state.json").read_text())["complete"]


def test_single_process_path_takes_no_collective(monkeypatch):
    # one process: nothing of the data-parallel path runs (the code is the single-process one)
    from vitatlas import distributed

    def boom(*a, **k):
        raise AssertionError("a collective was called in a single process")

    for name in ("all_reduce_", "barrier", "check_same", "all_gather_object", "shard"):
        monkeypatch.setattr(distributed, name, boom)
    sae = _make("batchtopk", epochs=1)
    sae.fit(_data(), progress=False)
    assert torch.isfinite(sae.params["W_dec"]).all()
