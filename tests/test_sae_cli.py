"""`vitatlas fit sae`: one SAE into RUN, sweeps into RUN/<name>, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import vitatlas
from vitatlas import ActivationStore, VitatlasError
from vitatlas.cli import main


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((48, 24))
    codes = rng.random((1500, 48)) * (rng.random((1500, 48)) < 0.08)
    path = tmp_path_factory.mktemp("sae_cli") / "acts"
    ActivationStore.from_array(path, (codes @ atoms).astype(np.float32))
    return path


def run(args):
    return CliRunner().invoke(main, ["fit", "sae", *args], catch_exceptions=True, standalone_mode=False)


def test_single_sae_saved_into_run_and_resumes(acts, tmp_path):
    out = tmp_path / "run"
    args = ["--kind", "topk", "--acts", str(acts), "--atoms", "64", "--k", "4", "--out", str(out),
            "--epochs", "3", "--batch-size", "250", "--no-progress"]
    res = run(args)
    assert res.exception is None, res.output
    assert "explained_variance=" in res.output and "dead_fraction=" in res.output and "l0=4.00" in res.output
    sae = vitatlas.load(out)
    assert sae.n_atoms == 64 and sae.k == 4 and sae.optim.init == "random" and sae.config.activation.aux_relative
    assert (out / "log.jsonl").exists() and json.loads((out / "checkpoint" / "state.json").read_text())["complete"]
    lines = (out / "log.jsonl").read_text().count("\n")
    res2 = run(args)  # re-run: resumes from the finished checkpoint, no new training steps logged
    assert res2.exception is None
    assert (out / "log.jsonl").read_text().count("\n") == lines
    np.testing.assert_array_equal(vitatlas.load(out).atoms.numpy(), sae.atoms.numpy())


def test_sweep_writes_one_directory_per_combination(acts, tmp_path):
    out = tmp_path / "sweep"
    res = run(["--kind", "batchtopk", "--acts", str(acts), "--atoms", "64", "--atoms", "96", "--k", "2", "--k", "4",
               "--out", str(out), "--epochs", "2", "--batch-size", "250", "--no-progress"])
    assert res.exception is None, res.output
    names = sorted(p.name for p in out.iterdir() if (p / "config.json").exists())
    assert names == ["batchtopk-k2-n64", "batchtopk-k2-n96", "batchtopk-k4-n64", "batchtopk-k4-n96"]
    assert res.output.count("saved ") == 4
    assert vitatlas.load(out / "batchtopk-k4-n96").n_atoms == 96


def test_init_option_reaches_the_saved_run(acts, tmp_path):
    res = run(["--kind", "topk", "--acts", str(acts), "--atoms", "32", "--k", "2", "--init", "data",
               "--out", str(tmp_path / "r"), "--epochs", "1", "--batch-size", "500", "--no-progress"])
    assert res.exception is None, res.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["init"] == "data"
    res = run(["--kind", "topk", "--acts", str(acts), "--atoms", "32", "--k", "2", "--init", "pca",
               "--out", str(tmp_path / "e"), "--no-progress"])
    assert res.exception is not None and "pca" in str(res.exception)


def test_relu_default_l1_and_errors(acts, tmp_path):
    res = run(["--kind", "relu", "--acts", str(acts), "--atoms", "32", "--out", str(tmp_path / "r"), "--epochs", "1",
               "--batch-size", "500", "--no-progress"])
    assert res.exception is None, res.output
    assert vitatlas.load(tmp_path / "r").l1 > 0
    for extra, match in ([[], "needs k"], [["--k", "4", "--l1", "0.1"], "not used"],
                         [["--k", "64"], "smaller than n_latents"], [["--k", "4", "--device", "cuda:9"], "CUDA|cuda"],
                         [["--k", "4", "--groups", "8,64"], "groups is not used by a topk SAE"],
                         [["--k", "4", "--epochs", "0"], "epochs must be a positive integer"]):
        res = run(["--kind", "topk", "--acts", str(acts), "--atoms", "64", "--out", str(tmp_path / "e"),
                   "--no-progress", *extra])
        assert isinstance(res.exception, VitatlasError), res.output
        assert __import__("re").search(match, str(res.exception)), str(res.exception)
    res = run(["--kind", "topk", "--acts", str(tmp_path / "missing"), "--atoms", "64", "--k", "4", "--out",
               str(tmp_path)])
    assert isinstance(res.exception, VitatlasError)


def test_revive_option_reaches_the_saved_run_and_relu_refuses_it(acts, tmp_path):
    res = run(["--kind", "topk", "--acts", str(acts), "--atoms", "32", "--k", "2", "--revive", "lift",
               "--out", str(tmp_path / "r"), "--epochs", "1", "--batch-size", "500", "--no-progress"])
    assert res.exception is None, res.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["revive"] == "lift"
    res = run(["--kind", "relu", "--acts", str(acts), "--atoms", "32", "--revive", "lift",
               "--out", str(tmp_path / "e"), "--no-progress"])
    assert isinstance(res.exception, VitatlasError) and "revive" in str(res.exception), res.output
