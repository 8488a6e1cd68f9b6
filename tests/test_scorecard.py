"""``vitatlas.evaluation.scorecard`` and ``vitatlas scorecard``: every run on the same images, one table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_interpret import fake_extract_store

import vitatlas
from vitatlas import VitatlasError
from vitatlas.cli import main
from vitatlas.evaluation import evaluate, scorecard
from vitatlas.evaluation.scorecard_report import table_markdown, write_scorecard
from vitatlas.evaluation.scoring import MEASURES, intervention_measures, sample_images
from vitatlas.learners.baselines import PCABaseline, RandomDictionary


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorecard")
    store = fake_extract_store(root / "acts", n_images=30)
    runs = {}
    for name, d in (("ksvd", vitatlas.DBKSVD(n_atoms=24, k=3, seed=0)), ("random", RandomDictionary(24, 3, seed=0)),
                    ("pca", PCABaseline(4))):
        d.fit(store, progress=False)
        d.save(root / "runs" / name)
        runs[name] = vitatlas.load(root / "runs" / name)
    return {"root": root, "store": store, "runs": runs}


def _intervene_json(runs: dict[str, tuple[float, float, float]]) -> dict:
    """A minimal segmentation intervene.json: per run (atom target, atom other, random-direction target)."""
    out = {"setup": {"task": "segmentation", "runs": {n: {} for n in runs}, "headline_strength": 0.5,
                     "headline_rule": "rule", "headline_rule_met": True, "strengths": [0.5, 1.0],
                     "n_held_out_images": 7, "data": "shapes"}}
    for name, (t, o, rd) in runs.items():
        out[name] = {"kind": "atom", "target_change_rate_mean": t, "other_change_rate_mean": o}
        out[f"{name}/random_direction"] = {"kind": "random_direction", "target_change_rate_mean": rd}
        out[f"{name}/random_atom"] = {"kind": "random_atom", "target_change_rate_mean": rd / 2}
    return out


def test_every_run_is_scored_on_the_same_whole_images(setup):
    store, runs = setup["store"], setup["runs"]
    card = scorecard(runs, store, max_images=12, seed=3)
    rows = sample_images(store, 12, seed=3)
    ids = store.index[rows, 0]
    assert np.unique(ids).size == 12 and rows.size == 12 * 16  # every row of each of the 12 images
    assert card["setup"]["n_images"] == 12 and card["setup"]["n_rows"] == rows.size
    assert card["setup"]["patch_grid"] == [4, 4]
    for name, d in runs.items():
        # the same numbers evaluate gives on those rows, with the store's grid cells
        want = evaluate(d, store.rows(rows), store.labels[rows], image_ids=ids, patch_grid=[4, 4],
                        patch_cells=store.index[rows, 1] - 1, seed=3)
        for key, _, _ in MEASURES:
            if key.startswith("intervention"):
                assert key not in card["runs"][name]
                continue
            got, ref = card["runs"][name][key], want.get(key)
            assert (got is None and ref is None) or got == pytest.approx(ref, nan_ok=True), key
    assert np.isfinite(card["runs"]["ksvd"]["spatial_coherence"])
    assert card["runs"]["pca"]["l0"] == pytest.approx(4.0)
    assert card["runs"]["ksvd"]["near_duplicate_atoms"] == card["metrics"]["ksvd"]["near_duplicate_atoms"]
    all_rows = sample_images(store, None)
    assert all_rows.size == store.n_rows and sample_images(store, 100).size == store.n_rows


def test_the_table_json_and_plot(setup, tmp_path):
    runs = {k: setup["runs"][k] for k in ("ksvd", "random")}
    inter = _intervene_json({"ksvd": (0.8, 0.2, 0.1), "random": (0.15, 0.1, 0.1)})
    card = scorecard(runs, setup["store"], max_images=10, intervention=inter)
    assert card["runs"]["ksvd"]["intervention_ratio"] == pytest.approx(8.0)
    assert card["runs"]["ksvd"]["intervention_margin"] == pytest.approx(0.6)
    assert card["runs"]["ksvd"]["intervention_beats_control"] is True
    assert card["runs"]["random"]["intervention_beats_control"] is False  # 1.5x and under 0.3
    path = write_scorecard(tmp_path / "sc", card)
    text = path.read_text()
    table = table_markdown(card)
    assert table in text and "| measure | better | ksvd | random |" in table
    assert "| intervention: atom ÷ random direction | ↑ | **8.00×** | 1.50× |" in table
    assert "| intervention: beats its control (≥ 2× and ≥ 0.3) | | yes | no |" in table
    assert "headline strength 0.5" in text and "one atom per class" in text
    inter["setup"]["features_per_class"] = 3  # a group edit is named in the note
    grouped = scorecard(runs, setup["store"], max_images=10, intervention=inter)
    assert grouped["setup"]["intervention"]["features_per_class"] == 3
    assert "3 atoms per class edited together" in write_scorecard(tmp_path / "sc3", grouped).read_text()
    saved = json.loads((tmp_path / "sc" / "scorecard.json").read_text())
    assert set(saved) == {"setup", "measures", "runs", "metrics"} and saved["runs"]["ksvd"]["n_atoms"] == 24
    assert (tmp_path / "sc" / "scorecard.png").stat().st_size > 1000
    # the best value per measure is bold: DBK-SVD reconstructs better than random atoms
    sr = next(line for line in table.splitlines() if line.startswith("| signal recovered"))
    assert sr.split("|")[3].strip().startswith("**") and not sr.split("|")[4].strip().startswith("**")


def test_intervention_rows_need_the_segmentation_protocol_and_the_same_runs(setup):
    assert intervention_measures(None) == {}
    bad = _intervene_json({"ksvd": (0.5, 0.1, 0.1)})
    bad["setup"]["task"] = "classification"
    with pytest.raises(VitatlasError, match="segmentation"):
        intervention_measures(bad)
    with pytest.raises(VitatlasError, match="not being scored"):
        scorecard({"ksvd": setup["runs"]["ksvd"]}, setup["store"], intervention=_intervene_json({"other": (1, 0, 0)}))
    with pytest.raises(VitatlasError, match="at least one"):
        scorecard({}, setup["store"])
    with pytest.raises(VitatlasError, match="not a vitatlas Dictionary"):
        scorecard({"x": object()}, setup["store"])
    with pytest.raises(VitatlasError, match="max_images"):
        scorecard(setup["runs"], setup["store"], max_images=0)
    other = fake_extract_store(setup["root"] / "wide", n_images=4, d=8)
    with pytest.raises(VitatlasError, match="width"):
        scorecard({"ksvd": setup["runs"]["ksvd"]}, other)


def _cli(args):
    return CliRunner().invoke(main, args, standalone_mode=False, catch_exceptions=True)


def test_cli_scorecard_and_its_errors(setup, tmp_path):
    root = setup["root"]
    base = ["scorecard", str(root / "runs" / "ksvd"), str(root / "runs" / "pca"), "--acts", str(root / "acts"),
            "--max-images", "8", "--no-progress"]
    inter = tmp_path / "iv"
    inter.mkdir()
    (inter / "intervene.json").write_text(json.dumps(_intervene_json({"ksvd": (0.9, 0.3, 0.05)})))
    r = _cli(base + ["--out", str(tmp_path / "out"), "--intervene-from", str(inter)])
    assert r.exception is None, r.output
    assert "| measure | better | ksvd | pca |" in r.output and "scorecard written to" in r.output
    card = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    assert card["runs"]["ksvd"]["intervention_target"] == 0.9 and "intervention_target" not in card["runs"]["pca"]
    assert card["setup"]["n_images"] == 8
    cases = [(["--model", "hf:x"], "needs --model, --probe and --data together"),
             (["--intervene-from", str(tmp_path)], "holds no intervene.json"),
             (["--max-images", "0"], "--max-images must be positive"),
             (["--intervene-from", str(inter), "--model", "m", "--probe", "p", "--data", "d"], "not both")]
    for extra, message in cases:
        r = _cli(base + ["--out", str(tmp_path / "bad")] + extra)
        assert isinstance(r.exception, VitatlasError), (extra, r.output)
        assert message in str(r.exception) and "\n" not in str(r.exception)
    r = _cli(["scorecard", "--acts", str(root / "acts"), "--out", str(tmp_path / "bad")])
    assert isinstance(r.exception, VitatlasError) and "at least one run" in str(r.exception)
    assert not (tmp_path / "bad").exists()
