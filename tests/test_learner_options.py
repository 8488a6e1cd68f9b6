"""Learner options: the one validation mechanism, fuzzed over every option of every learner.

Property (hypothesis): whatever value any single option of any learner is given — a wrong type, NaN,
±Inf, a negative or a huge number, None, a container, an arbitrary object — construction either
succeeds (the value is valid) or raises a one-line ``VitatlasError``; never another exception.
Values no option can accept (NaN, Inf, containers where a scalar is due, objects) must be refused.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitatlas import VitatlasError
from vitatlas.errors import OptionError
from vitatlas.learners.baselines import (
    KMeansBaseline,
    KMeansConfig,
    PCABaseline,
    PCAConfig,
    RandomConfig,
    RandomDictionary,
    SklearnDictionaryLearning,
    SklearnDLConfig,
)
from vitatlas.learners.dbksvd import DBKSVD, DBKSVDConfig
from vitatlas.learners.options import Choice, Either, Flag, Int, Ints, Options, Real, check_options, option
from vitatlas.learners.sae import SAE
from vitatlas.learners.sae.config import (
    ACTIVATIONS,
    BatchTopK,
    Matryoshka,
    OptimConfig,
    ReLU,
    SAEConfig,
    TopK,
    TrainConfig,
    sae_options,
)


def _sae_case(family: str):
    base = {"kind": family, "n_latents": 16}
    if family in ("topk", "batchtopk", "matryoshka"):
        base["k"] = 2
    names = ["kind", "n_latents", *ACTIVATIONS[family].names(), *OptimConfig.names(), *TrainConfig.names()]
    if "l1" not in names and "k" not in names:
        names.append("k")
    return (lambda **kw: SAE(**{**base, **kw})), names


LEARNERS = {
    "dbksvd": (lambda **kw: DBKSVD(**{"n_atoms": 16, "k": 2, **kw}), DBKSVDConfig.names()),
    "pca": (lambda **kw: PCABaseline(**{"k": 2, **kw}), PCAConfig.names()),
    "kmeans": (lambda **kw: KMeansBaseline(**{"n_atoms": 4, **kw}), KMeansConfig.names()),
    "random": (lambda **kw: RandomDictionary(**{"n_atoms": 8, "k": 2, **kw}), RandomConfig.names()),
    "sklearn-dl": (lambda **kw: SklearnDictionaryLearning(**{"n_atoms": 8, "k": 2, **kw}), SklearnDLConfig.names()),
    **{f"sae-{fam}": _sae_case(fam) for fam in ACTIVATIONS},
}

NEVER_VALID = st.one_of(
    st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")), st.just(np.float32("nan")),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(object()), st.just(b"bytes"),
    st.just(np.zeros(3)), st.just(1 + 2j),
)
ANY_BAD = st.one_of(
    NEVER_VALID,
    st.text(max_size=6),
    st.integers(max_value=-1), st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False),
    st.integers(min_value=2**31, max_value=2**90), st.floats(min_value=1e30, max_value=1e308),
    st.just(np.int64(-3)), st.just(np.float64(1e300)), st.just(0), st.just(0.0),
    st.none(), st.booleans(), st.lists(st.integers(min_value=-5, max_value=2**40), max_size=4),
)


def assert_one_line(exc: BaseException) -> None:
    assert isinstance(exc, VitatlasError), f"{type(exc).__name__}: {exc}"
    assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("learner", sorted(LEARNERS))
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_bad_option_value_is_a_one_line_error(learner, data):
    make, names = LEARNERS[learner]
    name = data.draw(st.sampled_from(names), label="option")
    never = data.draw(st.booleans(), label="never-valid")
    value = data.draw(NEVER_VALID if never else ANY_BAD, label="value")
    try:
        model = make(**{name: value})
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions escape
        assert_one_line(exc)
        return
    assert not never, f"{learner}: {name}={value!r} was accepted"
    opts = model._config()
    assert json.loads(json.dumps(opts)) == opts  # whatever was accepted saves as JSON
    assert type(model)(**opts)._config() == opts
    repr(model)


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_negative_and_nan_are_refused_for_every_numeric_option(learner):
    make, names = LEARNERS[learner]
    for name in names:
        for value in (float("nan"), -1, -1.5, "3", [1]):
            with pytest.raises(VitatlasError) as e:
                make(**{name: value})
            assert_one_line(e.value)


def test_the_issue_example():
    with pytest.raises(VitatlasError) as e:
        SAE(kind="relu", n_latents=64, aux_coef="x")
    assert_one_line(e.value)
    assert isinstance(e.value, ValueError) and "aux_coef" in str(e.value)
    with pytest.raises(OptionError, match="aux_coef must be a finite number >= 0, got 'x'"):
        SAE(kind="topk", n_latents=64, k=4, aux_coef="x")


# ---- the mechanism ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Demo(Options):
    n: int = option(4, Int(min=1))
    rate: float = option(0.5, Real(min=0, max=1, max_open=True))
    mode: str = option("a", Choice(("a", "b")))
    on: bool = option(False, Flag())
    width: int | str | None = option("auto", Either((Choice(("auto",)), Int(min=1)), optional=True))
    sizes: tuple | None = option(None, Ints(min=1, optional=True))


@pytest.mark.parametrize("field, value, message", [
    ("n", 0, "n must be a positive integer, got 0"),
    ("n", True, "n must be a positive integer, got True"),
    ("n", 2.0, "n must be a positive integer, got 2.0"),
    ("n", 2**40, "n must be a positive integer"),
    ("rate", 1.0, r"rate must be a number in \[0, 1\), got 1.0"),
    ("rate", float("nan"), "rate must be a number"),
    ("mode", "c", "mode must be one of 'a', 'b', got 'c'"),
    ("on", 1, "on must be True or False, got 1"),
    ("width", "big", r"width must be one of 'auto' or a positive integer or None \(automatic\), got 'big'"),
    ("sizes", [3, 0], "sizes must be a list of integers >= 1"),
    ("sizes", [], "sizes must be a list"),
])
def test_declared_constraints(field, value, message):
    with pytest.raises(OptionError, match=message):
        Demo(**{field: value})


def test_values_are_normalised_and_configs_compare_by_value():
    d = Demo(n=np.int64(3), rate=0, on=np.bool_(True), width=np.int32(8), sizes=[2, 5])
    assert (type(d.n), type(d.rate), type(d.on), type(d.width), d.sizes) == (int, float, bool, int, (2, 5))
    assert d == Demo(n=3, rate=0.0, on=True, width=8, sizes=(2, 5)) and hash(d) == hash(Demo(**d.to_dict()))
    assert d.to_dict()["sizes"] == [2, 5]
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.n = 4
    with pytest.raises(OptionError, match="unknown option 'm' for Demo"):
        Demo.from_dict({"m": 1})
    cfg = DBKSVD(8, 2, coder=np.str_("mp"), device=np.str_("cpu"), dtype=np.str_("float64")).config
    assert [type(v) for v in (cfg.coder, cfg.device, cfg.dtype)] == [str, str, str]  # numpy strings are strings
    with pytest.raises(OptionError, match="mode must be one of"):
        Demo(mode=1)


def test_option_error_is_a_vitatlas_error_and_a_value_error():
    assert issubclass(OptionError, VitatlasError) and issubclass(OptionError, ValueError)
    with pytest.raises(ValueError):
        DBKSVD(0, 1)


def test_every_learner_config_declares_a_rule_and_a_description_for_every_option():
    classes = [DBKSVDConfig, PCAConfig, KMeansConfig, RandomConfig, SklearnDLConfig, OptimConfig, TrainConfig,
               *ACTIVATIONS.values()]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("rule") is not None and f.metadata.get("doc"), f"{cls.__name__}.{f.name}"
    assert check_options  # the single function every config's __post_init__ runs


# ---- cross-option rules and the SAE's typed configs ------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: DBKSVD(4, 5), "n_atoms=4 is smaller than k=5"),
    (lambda: DBKSVD(16, 4, groups=[2, 16]), "groups must be increasing prefix sizes from at least 4"),
    (lambda: DBKSVD(16, 4, groups=[8, 8, 16]), "groups must be increasing"),
    (lambda: SAE(kind="topk", n_latents=8, k=8), "k=8 must be smaller than n_latents=8"),
    (lambda: SAE(kind="matryoshka", n_latents=8, k=2, groups=[4, 6]), "ending at n_latents=8"),
    (lambda: RandomDictionary(4, 5), "cannot exceed n_atoms"),
    (lambda: SAE(kind="relu", n_latents=8, base="topk"), "base is not used by a relu SAE"),
    (lambda: SAE(kind="jumprelu", n_latents=8, threshold_momentum=0.5), "threshold_momentum is not used"),
    (lambda: SAE(kind="topk", n_latents=8, k=2, bandwidth=0.1), "bandwidth is not used by a topk SAE"),
    (lambda: SAE(kind="topk", n_latents=8, k=2, l1=0.1), "l1 is not used by a topk SAE"),
    (lambda: SAE(kind="relu", n_latents=8, k=2), "k is not used by a relu SAE"),
    (lambda: SAE(kind="topk", n_latents=8), "a topk SAE needs k"),
    (lambda: SAE(kind="svm", n_latents=8), "unknown SAE kind 'svm'"),
])
def test_cross_option_rules(make, match):
    with pytest.raises(OptionError, match=match):
        make()


def test_sae_family_classes_hold_only_their_options():
    assert "k" not in ReLU.names() and "l1" not in TopK.names() and "groups" not in BatchTopK.names()
    assert {"base", "groups", "k"} <= set(Matryoshka.names())
    with pytest.raises(TypeError):
        ReLU(k=3)  # not expressible, even by hand
    model, optim, train = sae_options("matryoshka", 32, k=4, groups=[8, 32], lr=1e-3, seed=2)
    assert model == SAEConfig(Matryoshka(k=4, groups=(8, 32)), 32)
    assert optim == OptimConfig(lr=1e-3) and train == TrainConfig(seed=2)
    sae = SAE.from_configs(model, optim, train)
    assert sae.family == "matryoshka" and sae.learner == "sae" and sae.kind == "sae"
    assert SAE(**sae._config())._config() == sae._config()


def test_sweeps_compare_training_configs_with_equality():
    from vitatlas.learners.sae.train import SAESweep

    a = SAE(kind="topk", n_latents=16, k=2, lr=1e-3, batch_size=64)
    b = SAE(kind="relu", n_latents=32, lr=2e-3, batch_size=64)  # other model and optimiser: fine
    assert a.train_config == b.train_config and SAESweep([a, b]).train == a.train_config
    c = SAE(kind="topk", n_latents=16, k=2, batch_size=64, amp=False)
    with pytest.raises(VitatlasError, match="differs in amp"):
        SAESweep([a, c])


def test_legacy_flat_config_with_every_option_loads():
    """config.json before typed configs listed every option for every kind (unused ones at defaults)."""
    old = {"kind": "relu", "n_latents": 16, "k": None, "l1": 0.2, "groups": None, "base": "batchtopk",
           "epochs": 1, "batch_size": 100, "lr": None, "warmup_steps": None, "grad_clip": 1.0,
           "aux_coef": 0.03125, "aux_k": None, "dead_tokens": None, "threshold_momentum": 0.99,
           "bandwidth": 0.05, "threshold_init": 0.1, "threshold_lr_scale": 10.0, "device": "cpu",
           "dtype": "float32", "seed": 1, "amp": True, "checkpoint_every": 500, "log_every": 50}
    sae = SAE(**SAE._saved_options(old))
    assert sae.config == SAEConfig(ReLU(l1=0.2), 16) and sae.train_config.batch_size == 100
    assert math.isclose(sae.l1, 0.2) and sae.k is None


def test_fit_cli_reports_option_errors_in_one_line(tmp_path):
    from click.testing import CliRunner

    from vitatlas import ActivationStore
    from vitatlas.cli import main

    ActivationStore.from_array(tmp_path / "acts", np.ones((10, 4), np.float32))
    for args, match in ((["dbksvd", "--atoms", "0", "--k", "2"], "n_atoms must be a positive integer"),
                        (["dbksvd", "--atoms", "8", "--k", "2", "--sample-batch", "-5"], "sample_batch must be"),
                        (["dbksvd", "--atoms", "8", "--k", "2", "--stop-tol", "-1"], "stop_tol must be a number in [0, 1)"),
                        (["sae", "--kind", "relu", "--atoms", "8", "--l1", "nan"], "l1 must be a finite number"),
                        (["sae", "--kind", "relu", "--atoms", "8", "--base", "topk"], "base is not used")):
        res = CliRunner().invoke(main, ["fit", *args, "--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "o")],
                                 standalone_mode=False)
        assert isinstance(res.exception, OptionError), res.output
        assert match in str(res.exception) and "\n" not in str(res.exception)


def test_docs_list_every_option_as_declared():
    from pathlib import Path

    from vitatlas.learners.options_doc import all_tables

    text = (Path(__file__).parents[1] / "docs" / "learners.md").read_text()
    embedded = text.split("<!-- options:begin -->\n", 1)[1].split("<!-- options:end -->", 1)[0]
    assert embedded.strip() == all_tables().strip(), \
        "docs/learners.md is out of date: paste the output of python -m vitatlas.learners.options_doc"
