"""The evaluation report and the `vitatlas eval` command on tiny stores."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

import vitatlas
from vitatlas.cli import main
from vitatlas.evaluation.report import TABLE_COLUMNS, RunResult, write_report
from vitatlas.learners.baselines import KMeansBaseline, PCABaseline, RandomDictionary

SECTIONS = ["# vitatlas evaluation report", "## Results", "## Plots", "## Top images", "## Metric definitions",
            "## Data and settings"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalreport")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    centers = rng.standard_normal((3, 16)) * 2
    X = (centers[y] + rng.standard_normal((300, 16))).astype(np.float32)
    store = vitatlas.ActivationStore.from_array(root / "acts", X, y, class_names=["a", "b", "c"])
    RandomDictionary(32, 3, seed=1).fit(store).save(root / "runs" / "one")
    RandomDictionary(32, 3, seed=2).fit(store).save(root / "runs" / "sweep" / "s1")
    PCABaseline(3).fit(store).save(root / "runs" / "sweep" / "s2")
    return root, store


def _png_ok(path):
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_sections_and_files(tiny, tmp_path):
    root, store = tiny
    results = []
    for m in [RandomDictionary(32, 3).fit(store), PCABaseline(3).fit(store), KMeansBaseline(16, n_iter=3).fit(store)]:
        results.append(RunResult(m.kind, vitatlas.evaluate(m, store, top_n=8), m.kind, baseline=m.kind != "random",
                                 config=m._config()))
    path = write_report(tmp_path / "rep", results, store=store, data={"store": str(store.path)})
    text = path.read_text()
    pos = [text.index(s) for s in SECTIONS]
    assert pos == sorted(pos)
    for col in TABLE_COLUMNS:
        assert f"| {col} " in text or f" {col} |" in text
    assert "| pca (baseline) | pca |" in text and "| random | random |" in text
    assert "κ_a" in text and "store:" in text
    for png in ["pareto.png", "frequency.png"]:
        assert _png_ok(tmp_path / "rep" / png)
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert [m["name"] for m in metrics] == ["random", "pca", "kmeans"]
    for m in metrics:
        for key in ["signal_recovered", "explained_variance", "mse", "l0", "dead_fraction", "dense_fraction",
                    "max_coherence", "faithfulness", "specificity", "label_diversity", "sparse_probe_acc@5",
                    "probe_acc_original", "probe_acc_with_error"]:
            assert key in m
        assert m["probe_acc_with_error"] == m["probe_acc_original"]
        assert "atoms" not in m
    atoms = json.loads((tmp_path / "rep" / "atoms" / "random.json").read_text())
    assert len(atoms["label"]) == 32 and len(atoms["top_rows"][0]) == 8
    assert "skipped" in text  # a store built from an array has no image source for the grid


def test_top_image_grid_with_a_source(tiny, tmp_path, monkeypatch):
    from PIL import Image

    root, store = tiny
    fake = types.ModuleType("vitatlas.data.sources")
    opened = []

    class Source:
        def image(self, image_id):
            opened.append(image_id)
            return Image.new("L", (8, 8), color=int(image_id) % 255)

    fake.open_source = lambda spec: Source()
    monkeypatch.setitem(sys.modules, "vitatlas.data.sources", fake)
    monkeypatch.setitem(store.manifest, "source", {"name": "fake", "spec": "fake:images"})
    m = RandomDictionary(32, 3).fit(store)
    res = [RunResult("r", vitatlas.evaluate(m, store, top_n=8), m.kind)]
    text = write_report(tmp_path / "rep", res, store=store).read_text()
    assert _png_ok(tmp_path / "rep" / "top_images.png")
    assert "top_images.png" in text and opened
    top = res[0].metrics["atoms"]["top_rows"]
    assert set(opened) <= set(store.index[top[top >= 0], 0].tolist())


def test_top_image_grid_source_failure_is_reported(tiny, tmp_path, monkeypatch):
    root, store = tiny
    fake = types.ModuleType("vitatlas.data.sources")

    def broken(spec):
        raise OSError("images are gone")

    fake.open_source = broken
    monkeypatch.setitem(sys.modules, "vitatlas.data.sources", fake)
    monkeypatch.setitem(store.manifest, "source", {"name": "fake", "spec": "fake:images"})
    m = RandomDictionary(32, 3).fit(store)
    text = write_report(tmp_path / "rep", [RunResult("r", vitatlas.evaluate(m, store, top_n=8), m.kind)],
                        store=store).read_text()
    assert "could not be opened" in text and "images are gone" in text
    assert not (tmp_path / "rep" / "top_images.png").exists()


def test_cli_eval_runs_and_baselines(tiny, tmp_path):
    root, store = tiny
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", str(root / "runs" / "one"), str(root / "runs" / "sweep"),
                                       "--acts", str(root / "acts"), "--out", str(out), "--no-progress",
                                       "--baselines", "pca,kmeans,random,sklearn-dl", "--top-n", "8"])
    assert result.exit_code == 0, result.output
    assert str(out / "report.md") in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    names = [m["name"] for m in metrics]
    assert names == ["one", "sweep/s1", "sweep/s2", "pca", "kmeans", "random", "sklearn-dl"]
    by = {m["name"]: m for m in metrics}
    assert by["pca"]["l0"] == pytest.approx(3) and by["kmeans"]["l0"] == pytest.approx(1)
    assert by["random"]["l0"] == pytest.approx(3) and by["sklearn-dl"]["l0"] == pytest.approx(3)
    assert by["pca"]["baseline"] and not by["one"]["baseline"]
    text = (out / "report.md").read_text()
    assert all(s in text for s in SECTIONS)
    assert _png_ok(out / "pareto.png") and _png_ok(out / "frequency.png")
    # baselines are saved and load back
    assert vitatlas.load(out / "baselines" / "kmeans").kind == "kmeans"


def test_cli_eval_max_rows_and_no_baselines(tiny, tmp_path):
    root, _ = tiny
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["eval", str(root / "runs" / "one"), "--acts", str(root / "acts"),
                                       "--out", str(out), "--baselines", "none", "--max-rows", "120",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    (m,) = json.loads((out / "metrics.json").read_text())
    assert m["n_rows"] == 120
    atoms = json.loads((out / "atoms" / "one.json").read_text())
    assert max(max(r) for r in atoms["top_rows"]) < 300  # row numbers of the whole store
    # a row subset is an array, not a store: the class names must still label the atoms
    named = [n for n, lab in zip(atoms["label_name"], atoms["label"]) if lab >= 0]
    assert named and set(named) <= {"a", "b", "c"}


def _manifest_with(path, **fields):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(fields)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_cli_eval_refuses_mismatched_store(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((100, 8)).astype(np.float32)
    a = vitatlas.ActivationStore.from_array(tmp_path / "a", X)
    _manifest_with(tmp_path / "a", layer=4, model={"name": "dinov2-s"}, tokens="cls")
    RandomDictionary(16, 2).fit(vitatlas.ActivationStore(tmp_path / "a")).save(tmp_path / "run")
    b = vitatlas.ActivationStore.from_array(tmp_path / "b", X)
    _manifest_with(tmp_path / "b", layer=8, model={"name": "dinov2-s"}, tokens="cls")
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(tmp_path / "run"), "--acts", str(tmp_path / "b"), "--out",
                               str(tmp_path / "o"), "--baselines", "none", "--no-progress"])
    assert isinstance(res.exception, vitatlas.VitatlasError)
    msg = str(res.exception)
    assert "layer=4" in msg and "layer=8" in msg and "\n" not in msg
    wide = vitatlas.ActivationStore.from_array(tmp_path / "w", rng.standard_normal((50, 6)).astype(np.float32))
    res = runner.invoke(main, ["eval", str(tmp_path / "run"), "--acts", str(wide.path), "--out",
                               str(tmp_path / "o"), "--baselines", "none", "--no-progress"])
    assert isinstance(res.exception, vitatlas.VitatlasError) and "width 8" in str(res.exception)
    # same model / layer / tokens: accepted
    res = runner.invoke(main, ["eval", str(tmp_path / "run"), "--acts", str(tmp_path / "a"), "--out",
                               str(tmp_path / "o"), "--baselines", "none", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert b.n_rows == a.n_rows


def test_cli_eval_bad_arguments(tiny, tmp_path):
    root, _ = tiny
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(tmp_path / "missing"), "--acts", str(root / "acts"), "--out",
                               str(tmp_path / "o")])
    assert isinstance(res.exception, vitatlas.VitatlasError) and "does not exist" in str(res.exception)
    res = runner.invoke(main, ["eval", str(root / "runs" / "one"), "--acts", str(root / "acts"), "--out",
                               str(tmp_path / "o"), "--baselines", "pca,ica"])
    assert isinstance(res.exception, vitatlas.VitatlasError) and "unknown baseline" in str(res.exception)
    (tmp_path / "empty").mkdir()
    res = runner.invoke(main, ["eval", str(tmp_path / "empty"), "--acts", str(root / "acts"), "--out",
                               str(tmp_path / "o")])
    assert isinstance(res.exception, vitatlas.VitatlasError) and "no saved dictionary" in str(res.exception)


def test_report_with_dbksvd_and_sae(tiny, tmp_path):
    """The real learners go through the same harness (skipped while they are not importable)."""
    root, store = tiny
    try:
        dbk = vitatlas.DBKSVD(24, 3, seed=0, epochs=2)
        sae = vitatlas.SAE("topk", 24, k=3, seed=0, epochs=2)
    except Exception as exc:  # a learner that is not there yet must not break the evaluation tests
        pytest.skip(f"learners unavailable: {exc}")
    results = []
    for m in (dbk, sae):
        m.fit(store, progress=False)
        back = vitatlas.load(m.save(tmp_path / m.kind))
        r = vitatlas.evaluate(back, store, top_n=8)
        assert r["l0"] <= 3 + 1e-9 and r["n_atoms"] == 24
        assert r["probe_acc_with_error"] == r["probe_acc_original"]
        results.append(RunResult(m.kind, r, m.kind))
    text = write_report(tmp_path / "rep", results, store=store).read_text()
    assert "| dbksvd | dbksvd |" in text and "| sae | sae |" in text


def test_cli_eval_baselines_only_on_unlabelled_store(tmp_path):
    X = np.random.default_rng(3).standard_normal((80, 6)).astype(np.float32)
    vitatlas.ActivationStore.from_array(tmp_path / "acts", X)
    res = CliRunner().invoke(main, ["eval", "--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "o"),
                                    "--baselines", "pca,random", "--k", "2", "--atoms", "10", "--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert [m["name"] for m in metrics] == ["pca", "random"]
    assert "faithfulness" not in metrics[0] and metrics[1]["l0"] == pytest.approx(2)
    text = (tmp_path / "o" / "report.md").read_text()
    assert "| pca (baseline) | pca | 2 |" in text and "—" in text
    res = CliRunner().invoke(main, ["eval", "--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, vitatlas.VitatlasError) and "nothing to evaluate" in str(res.exception)


def test_pareto_joins_runs_at_several_k_into_one_curve_per_learner(tmp_path):
    from vitatlas.evaluation.report import RunResult, curve_name, write_report

    def run(name, l0, ev, sr, baseline=False, kind="sae"):
        return RunResult(name, {"l0": l0, "explained_variance": ev, "signal_recovered": sr, "n_atoms": 64},
                         kind, baseline=baseline)

    results = [run(f"dbksvd-k{k}", k, 0.6 + 0.05 * i, 0.5 + 0.04 * i, kind="dbksvd") for i, k in enumerate([4, 8, 16, 32])]
    results += [run(f"topk-k{k}-n1536", k, 0.58 + 0.05 * i, 0.5 + 0.03 * i) for i, k in enumerate([4, 8, 16, 32])]
    results += [run("pca", 8, 0.61, 0.49, True, "pca"), run("random", 8, -0.9, 0.1, True, "random")]
    assert {curve_name(r) for r in results} == {"dbksvd", "topk-n1536", "pca", "random"}
    assert curve_name(RunResult("mine", {}, "sae", curve="custom")) == "custom"
    write_report(tmp_path / "rep", results)
    assert _png_ok(tmp_path / "rep" / "pareto.png")
