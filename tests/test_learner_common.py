"""The same interface checks on every entry of the learner registry (scikit-learn's "common checks").

Each case is a small instance of one registered learner (the SAE once per family). A new learner
added to ``vitatlas.dictionary.LEARNERS`` fails ``test_every_registered_learner_has_a_case`` until it
gets a case here, and then runs every check below. Also here: runs saved before the typed configs
still load and reconstruct the same, and every docstring example of the learners runs.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import vitatlas
from vitatlas import VitatlasError
from vitatlas.dictionary import LEARNERS
from vitatlas.learners.baselines import KMeansBaseline, PCABaseline, RandomDictionary, SklearnDictionaryLearning
from vitatlas.learners.dbksvd import DBKSVD
from vitatlas.learners.sae import SAE

SAE_SMALL = dict(n_latents=24, epochs=2, batch_size=64, checkpoint_every=3, seed=1)
CASES = {
    "dbksvd": lambda: DBKSVD(24, 3, epochs=2, sample_batch=96, checkpoint_every=2, seed=1),
    "sae-relu": lambda: SAE(kind="relu", **SAE_SMALL),
    "sae-topk": lambda: SAE(kind="topk", k=3, **SAE_SMALL),
    "sae-batchtopk": lambda: SAE(kind="batchtopk", k=3, **SAE_SMALL),
    "sae-jumprelu": lambda: SAE(kind="jumprelu", **SAE_SMALL),
    "sae-matryoshka": lambda: SAE(kind="matryoshka", k=3, groups=[6, 24], **SAE_SMALL),
    "pca": lambda: PCABaseline(4),
    "kmeans": lambda: KMeansBaseline(12, n_iter=4),
    "random": lambda: RandomDictionary(24, 3),
    "sklearn-dl": lambda: SklearnDictionaryLearning(24, 3, max_rows=200, batch_size=100),
}
IDS = sorted(CASES)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    return (rng.standard_normal((384, 6)) @ rng.standard_normal((6, 12)) + 0.1 * rng.standard_normal((384, 12))
            ).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(data):
    """One fitted instance per case, shared by the read-only checks."""
    return {name: CASES[name]().fit(data, progress=False) for name in IDS}


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, VitatlasError) and msg and "\n" not in msg, msg
    return msg


# Registry entries that are opened, never trained here: another library's SAE comes in through
# ``vitatlas import`` and has its own checks (tests/test_formats.py, tests/test_formats_runs.py).
NOT_TRAINED = {"imported": "tests/test_formats.py"}


def test_every_registered_learner_has_a_case():
    covered = {CASES[name]().learner for name in IDS}
    assert covered == set(LEARNERS) - set(NOT_TRAINED), f"add a case for: {sorted(set(LEARNERS) - covered)}"
    assert all((Path(__file__).parents[1] / f).exists() for f in NOT_TRAINED.values())


@pytest.mark.parametrize("name", IDS)
def test_shapes_types_and_units(name, fitted, data):
    m = fitted[name]
    n, d = data.shape
    assert m.d == d and isinstance(m.learner, str) and LEARNERS[m.learner]
    atoms = m.atoms
    assert isinstance(atoms, torch.Tensor) and atoms.shape == (m.n_atoms, d)
    np.testing.assert_allclose(atoms.norm(dim=1).numpy(), 1.0, atol=1e-5)
    codes = m.encode(data)
    assert isinstance(codes, np.ndarray) and codes.shape == (n, m.n_atoms) and codes.dtype == np.float32
    rec = m.reconstruct(data)
    assert isinstance(rec, np.ndarray) and rec.shape == (n, d)
    np.testing.assert_allclose(m.decode(codes), rec, rtol=1e-4, atol=1e-4)  # decode(encode(x)) == reconstruct(x)
    sparse = m.encode_sparse(data)
    np.testing.assert_allclose(sparse.to_dense().numpy(), codes)
    np.testing.assert_allclose(m.decode(sparse), rec, rtol=1e-4, atol=1e-4)
    # reconstructions are better than nothing (every learner here beats predicting 0 on this low-rank data)
    assert ((data - rec) ** 2).sum() < (data ** 2).sum()


@pytest.mark.parametrize("name", IDS)
def test_numpy_in_numpy_out_torch_in_torch_out(name, fitted, data):
    m = fitted[name]
    t = torch.from_numpy(data[:50])
    for method in (m.encode, m.reconstruct):
        out_t, out_np = method(t), method(data[:50])
        assert isinstance(out_t, torch.Tensor) and isinstance(out_np, np.ndarray)
        np.testing.assert_array_equal(out_t.numpy(), out_np)
    assert isinstance(m.decode(m.encode(t)), torch.Tensor)
    assert isinstance(m.encode(data[:50].tolist()), np.ndarray)  # anything np.asarray accepts


@pytest.mark.parametrize("name", IDS)
def test_fit_on_a_store_streams_and_is_as_good(name, fitted, data, tmp_path):
    """A store with several shards is streamed (shuffled shard by shard, so streaming learners see
    another batch order than with the array): the fit is reproducible and reconstructs about as well
    (squared error within 1.5x of the array fit's; measured 0.90x for DBK-SVD, 1.00x +- 0.003 for the rest)."""
    store = vitatlas.ActivationStore.from_array(tmp_path / "acts", data, shard_bytes=12 * 4 * 100)
    assert len(store.shards) > 1
    m = CASES[name]().fit(store, progress=False)
    again = CASES[name]().fit(store, progress=False)
    np.testing.assert_array_equal(again.atoms.numpy(), m.atoms.numpy())
    assert m.fit_info["source"] == "store"
    np.testing.assert_array_equal(m.encode(store), m.encode(data))
    err = ((data - m.reconstruct(store)) ** 2).sum()
    ref = ((data - fitted[name].reconstruct(data)) ** 2).sum()
    assert err <= 1.5 * ref + 1e-6, (err, ref)


@pytest.mark.parametrize("name", IDS)
def test_chunked_encoding_equals_one_shot(name, fitted, data):
    """encode streams encode_batch_size rows at a time; chunks of 7 give the same codes up to float
    rounding (1e-5: a matrix product over 12 terms may be blocked differently for another row count)."""
    m = CASES[name]().fit(data, progress=False)
    full = m.encode(data)
    m.encode_batch_size = 7
    np.testing.assert_allclose(m.encode(data), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", IDS)
def test_save_load_same_outputs(name, fitted, data, tmp_path):
    m = fitted[name]
    m.save(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["learner"] == m.learner and meta["config"] == m._config()
    back = vitatlas.load(tmp_path / "run")
    assert type(back) is type(m) and back._config() == m._config() and back.config == m.config
    np.testing.assert_array_equal(back.encode(data), m.encode(data))
    np.testing.assert_array_equal(back.reconstruct(data), m.reconstruct(data))
    assert back.fit_info == json.loads(json.dumps(m.fit_info))


@pytest.mark.parametrize("name", IDS)
def test_options_are_a_frozen_dataclass_and_round_trip(name):
    m = CASES[name]()
    cfg = m.config
    assert dataclasses.is_dataclass(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 5
    opts = m._config()
    assert json.loads(json.dumps(opts)) == opts  # JSON-able as saved
    twin = type(m)(**opts)
    assert twin._config() == opts and twin.config == cfg
    # one spelling per shared attribute
    assert isinstance(m.device, str) and isinstance(m.dtype, torch.dtype) and isinstance(m.n_atoms, int)
    assert opts["dtype"] in ("float32", "float64") and opts["device"] == m.device
    assert not any(hasattr(m, old) for old in ("dtype_name", "_dtype_name", "sae_kind"))
    assert m.d is None and m.fit_info == {}


@pytest.mark.parametrize("name", IDS)
def test_bad_inputs_are_one_line_errors(name, fitted, data):
    with pytest.raises(VitatlasError, match="not fitted") as e:
        CASES[name]().encode(data)
    one_line_error(e)
    m = fitted[name]
    bad = data.copy()
    bad[7, 2] = np.nan
    cases = [(m.encode, bad, "NaN or Inf"), (m.encode, data[:, :5], "width"), (m.encode, data[0], "2-D"),
             (m.encode, data[:0], "empty"), (m.reconstruct, np.array([["a", "b"]]), "numeric"),
             (m.decode, np.zeros((2, m.n_atoms + 1), np.float32), "width")]
    for method, X, match in cases:
        with pytest.raises(VitatlasError, match=match) as e:
            method(X)
        one_line_error(e)
    for X, match in ((bad, "NaN or Inf"), (data[0], "2-D"), (data[:0], "empty")):
        with pytest.raises(VitatlasError, match=match) as e:
            CASES[name]().fit(X, progress=False)
        one_line_error(e)


class Interrupt(Exception):
    pass


def _stop_at(step_to_stop):
    def callback(step, *_):
        if step == step_to_stop:
            raise Interrupt
    return callback


@pytest.mark.parametrize("name", IDS)
def test_resume_after_interruption_equals_uninterrupted_fit(name, data, tmp_path):
    make = CASES[name]
    reference = make().fit(data, progress=False)
    if "checkpoint_dir" not in inspect.signature(type(reference).fit).parameters:
        # one-shot fits (baselines) have nothing to resume: a re-run must give the same dictionary
        again = make().fit(data, progress=False)
        np.testing.assert_array_equal(again.atoms.numpy(), reference.atoms.numpy())
        return
    with pytest.raises(Interrupt):
        make().fit(data, progress=False, checkpoint_dir=tmp_path, callback=_stop_at(5))
    assert (tmp_path / "state.json").exists()
    resumed = make().fit(data, progress=False, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.atoms.numpy(), reference.atoms.numpy())  # same ops, same order: exact
    np.testing.assert_array_equal(resumed.reconstruct(data), reference.reconstruct(data))
    with pytest.raises(VitatlasError, match="other|different") as e:  # other data: refused, one line
        make().fit(data[::-1].copy(), progress=False, checkpoint_dir=tmp_path)
    one_line_error(e)


# ---- runs saved before the typed configs ------------------------------------------------------------

LEGACY = Path(__file__).parent / "data" / "legacy-runs"
LEGACY_RUNS = sorted(p.name for p in LEGACY.iterdir() if (p / "config.json").exists())


def test_legacy_runs_cover_every_learner():
    saved = {json.loads((LEGACY / r / "config.json").read_text())["learner"] for r in LEGACY_RUNS}
    assert saved == set(LEARNERS) - set(NOT_TRAINED)  # imported runs are newer than the typed configs


@pytest.mark.parametrize("run", LEGACY_RUNS)
def test_runs_saved_before_typed_configs_load_and_reconstruct_the_same(run):
    """Saved by commit 9437eaf (tests/data/legacy-runs, 12-d random data). Reconstructions were written
    by the same code on the development machine; here they are recomputed from the loaded tensors.
    Tolerance 1e-5 (rtol and atol, values are O(1)): float32 products over d = 12 and n_atoms <= 16
    terms may be summed in another order by another CPU's BLAS (a few ulps, ~1e-7); any real change —
    a dropped option, a lost or re-initialised tensor — moves them by 1e-2 or more."""
    model = vitatlas.load(LEGACY / run)
    expected = load_file(str(LEGACY / run / "expected.safetensors"))
    saved = json.loads((LEGACY / run / "config.json").read_text())
    assert model.learner == saved["learner"] and model.d == saved["d"] and model.n_atoms == saved["n_atoms"]
    if model.learner == "sae":
        assert model.family == saved["config"]["kind"]
    np.testing.assert_allclose(model.reconstruct(expected["probe"]), expected["reconstruction"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.encode(expected["probe"]), expected["codes"], rtol=1e-5, atol=1e-5)


# ---- docstring examples --------------------------------------------------------------------------

LEARNERS_DIR = Path(vitatlas.__file__).parent / "learners"
DOC_MODULES = ["vitatlas.dictionary", "vitatlas.evaluation"] + sorted(
    ".".join(("vitatlas", "learners", *p.relative_to(LEARNERS_DIR).with_suffix("").parts))
    for p in LEARNERS_DIR.rglob("*.py") if p.stem != "__init__")


def test_docstring_modules_include_the_learner_packages():
    assert {"vitatlas.learners.sae.learner", "vitatlas.learners.dbksvd.learner",
            "vitatlas.learners.baselines.dictionaries", "vitatlas.learners.options"} <= set(DOC_MODULES)


@pytest.mark.parametrize("module", DOC_MODULES)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    """Every ``>>>`` example in these modules runs on small synthetic data (none is skipped)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # an example's tempfile.mkdtemp() lands in tmp_path
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod, module) if t.examples]
    for t in tests:
        assert not any(ex.options.get(doctest.SKIP) for ex in t.examples), f"{t.name} skips an example"
        runner.run(t, out=lambda s: None)
    summary = runner.summarize(verbose=False)
    assert summary.failed == 0, f"{summary.failed} of {summary.attempted} examples failed in {module}: " \
                                f"run python -m doctest -v on it"
