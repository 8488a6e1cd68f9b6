"""evaluate and the interpret top-examples pass on 2 gloo ranks equal 1 process; world_size provenance."""

import json

import numpy as np
import pytest
from _dist import run_ranks, torchrun
from test_interpret import fake_extract_store

import vitatlas
from vitatlas import ActivationStore
from vitatlas.dictionary import check_fitted_on
from vitatlas.evaluation import evaluate
from vitatlas.evaluation.metrics import reconstruction_metrics
from vitatlas.interpret.api import _settings
from vitatlas.interpret.top_examples import rank_rows, top_examples_pass
from vitatlas.learners.baselines import PCABaseline, make_baseline

N_IMAGES = 29  # 464 rows of 16 patches: the rank boundary (row 232) cuts image 14 in two for evaluate
RTOL = 1e-5    # float32 codes of batches of other shapes differ in the last bits (see tests/_tolerance.py)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-eval")
    store = fake_extract_store(root / "patches", n_images=N_IMAGES, images_per_shard=8)
    run = make_baseline("random", n_atoms=24, k=3, seed=0).fit(store).save(root / "run")  # signed OMP codes
    return root, store, vitatlas.load(run)


def _pass(dictionary, store, checkpoint_dir):
    s = _settings(dictionary, store, top=5, rank="max", n_atoms=int(dictionary.n_atoms), seed=0)
    state = top_examples_pass(dictionary, store, s, progress=False, checkpoint_dir=checkpoint_dir)
    return {k: v.cpu().numpy() for k, v in state.items()}


def _on_each_rank(rank, root):
    store, dictionary = ActivationStore(root / "patches"), vitatlas.load(root / "run")
    metrics = evaluate(dictionary, store, batch_size=64)
    state = _pass(dictionary, store, root / f"ckpt-{rank}")  # a checkpoint dir per rank: the files must differ
    fitted = PCABaseline(4).fit(store.to_numpy()[:100], progress=False)
    recon = reconstruction_metrics(dictionary, store, batch_size=100)  # what the fit commands print
    return metrics, state, fitted.fit_info["world_size"], list(rank_rows(store.index[:, 0]))[::16], recon


def test_evaluate_and_the_top_examples_pass_on_two_ranks_equal_one_process(setup):
    root, store, dictionary = setup
    ref = evaluate(dictionary, store, batch_size=64)
    ref_state = _pass(dictionary, store, None)
    out = run_ranks(_on_each_rank, root, world_size=2)
    (m0, s0, ws0, rows0, r0), (m1, s1, ws1, rows1, r1) = out
    assert ws0 == ws1 == 2 and dictionary.fit_info["world_size"] == 1
    assert rows0[0] == 0 and rows1[0] == rows0[-1] + 16 and (rows1[-1] + 16) == store.n_rows  # whole images

    for r in (r0, r1):
        assert r == pytest.approx(reconstruction_metrics(dictionary, store), rel=RTOL, abs=1e-7)
    for m in (m0, m1):  # every rank holds the whole result
        assert m["n_rows"] == ref["n_rows"] == store.n_rows
        for key, value in ref.items():
            if isinstance(value, float):
                assert m[key] == pytest.approx(value, rel=RTOL, abs=1e-7), key
        assert m["l0_median"] == ref["l0_median"] and m["frequency_histogram"] == ref["frequency_histogram"]
        np.testing.assert_array_equal(m["atoms"]["top_rows"], ref["atoms"]["top_rows"])  # no ties in float codes
        np.testing.assert_allclose(m["atoms"]["top_values"], ref["atoms"]["top_values"], rtol=RTOL, atol=1e-6)
        np.testing.assert_array_equal(m["atoms"]["frequency"], ref["atoms"]["frequency"])
        np.testing.assert_array_equal(m["atoms"]["label"], ref["atoms"]["label"])
        np.testing.assert_allclose(m["atoms"]["faithfulness"], ref["atoms"]["faithfulness"], rtol=RTOL)

    assert sorted(s0) == sorted(ref_state) and "neg.values" in ref_state  # signed OMP codes: both sides
    for s in (s0, s1):
        for key, value in ref_state.items():
            if key.endswith("patch_values"):  # codes of the kept images; slots no image filled hold leftovers
                used = ref_state[key.replace("patch_values", "image_ids")].T >= 0   # (A, N)
                np.testing.assert_allclose(s[key][used].astype(np.float64), value[used].astype(np.float64),
                                           rtol=1e-3, atol=1e-3, err_msg=key)  # float16
            elif key.endswith(("image_ids", "count", "hist")):
                np.testing.assert_array_equal(s[key], value, err_msg=key)
            else:
                np.testing.assert_allclose(s[key].astype(np.float64), value.astype(np.float64), rtol=RTOL,
                                           atol=1e-6, err_msg=key)
    files = sorted(p.name for p in (root / "ckpt-1").iterdir())
    assert files == ["top-state-rank1-of-2.safetensors"]  # rank 1 wrote its own part only
    assert "top-state.safetensors" in {p.name for p in (root / "ckpt-0").iterdir()}  # rank 0: the whole state
    again = _pass(dictionary, store, root / "ckpt-0")  # one process reuses the finished 2-rank pass
    for key, value in s0.items():
        np.testing.assert_array_equal(again[key], value)


def test_world_size_provenance_and_files_from_before_it(setup, tmp_path):
    root, store, dictionary = setup
    assert store.manifest.get("world_size") is None  # written by StoreWriter directly (as stores from before)
    cfg = json.loads((root / "run" / "config.json").read_text())
    assert cfg["fit_info"]["world_size"] == 1 and cfg["fit_info"]["source"] == "store"
    del cfg["fit_info"]["world_size"]  # a run saved before world_size was recorded
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(cfg))
    (old / "dictionary.safetensors").write_bytes((root / "run" / "dictionary.safetensors").read_bytes())
    check_fitted_on(vitatlas.load(old), store)  # still accepted on its store
    assert ActivationStore.from_array(tmp_path / "arr", np.ones((3, 2), np.float32)).manifest["world_size"] == 1


def test_eval_and_interpret_commands_under_torchrun_write_what_one_process_writes(setup, tmp_path):
    from click.testing import CliRunner

    from vitatlas.cli import main

    root, store, _ = setup
    eval_args = ["eval", str(root / "run"), "--acts", str(store.path), "--baselines", "pca", "--k", "3",
                 "--atoms", "8", "--batch-size", "64", "--no-progress"]
    cards_args = ["interpret", str(root / "run"), "--acts", str(store.path), "--top", "4", "--no-images",
                  "--no-progress"]
    for args in (eval_args + ["--out", str(tmp_path / "one")], cards_args + ["--out", str(tmp_path / "cards-one")]):
        res = CliRunner().invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
    res = torchrun(eval_args + ["--out", str(tmp_path / "two")], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("report written") == 1
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert [r["name"] for r in one] == [r["name"] for r in two] == ["run", "pca"]
    for a, b in zip(one, two):
        for key, value in a.items():
            if isinstance(value, float) and key not in ("eval_seconds", "fit_seconds"):
                assert b[key] == pytest.approx(value, rel=RTOL, abs=1e-7), (a["name"], key)
    res = torchrun(cards_args + ["--out", str(tmp_path / "cards-two")], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("cards for") == 1 and not (tmp_path / "cards-two" / "checkpoint").exists()
    lines = lambda d: [json.loads(x) for x in (d / "atoms.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(lines(tmp_path / "cards-one"), lines(tmp_path / "cards-two"), strict=True):
        assert [t["image"] for t in a["top_images"]] == [t["image"] for t in b["top_images"]]
        assert a["frequency"] == b["frequency"] and a["labels"] == b["labels"]
