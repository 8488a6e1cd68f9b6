"""The segmentation / classification protocols, mask sources, the F1 atom choice and the CLI, on a tiny ViT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny import save_tiny_dinov2
from click.testing import CliRunner
from PIL import Image

import vitatlas
from vitatlas.arrays import SparseCodes
from vitatlas.cli import main
from vitatlas.data.sources import ArraySource, fashion_mnist_available, open_source
from vitatlas.errors import VitatlasError
from vitatlas.intervene.heads import LinearProbe, model_identity
from vitatlas.intervene.masks import FashionMNISTMasks, open_data_with_masks, patch_labels
from vitatlas.intervene.probes import train_probe
from vitatlas.intervene.protocol import (
    best_features,
    check_strengths,
    classification_protocol,
    headline_strength,
    segmentation_protocol,
    top_features,
)
from vitatlas.models import load

LAYER = 1
N_IMAGES = 24


def _shape_image(rng, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """A 28x28 image with a bright square (class 1) or a dark-grey disc (class 2) on black (class 0)."""
    img = np.zeros((28, 28, 3), np.uint8)
    mask = np.zeros((28, 28), np.uint8)
    cy, cx = rng.integers(9, 19, size=2)
    yy, xx = np.mgrid[:28, :28]
    region = (np.abs(yy - cy) < 7) & (np.abs(xx - cx) < 7) if kind == 1 else (yy - cy) ** 2 + (xx - cx) ** 2 < 49
    img[region] = (230, 230, 230) if kind == 1 else (90, 60, 120)
    mask[region] = kind
    return img, mask


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, an image folder with images/ + masks/, two fitted runs saved to disk, and a probe."""
    root = tmp_path_factory.mktemp("intervene")
    model_dir = save_tiny_dinov2(root / "model")
    model = load(f"hf:{model_dir}")
    data = root / "shapes"
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        kind = 1 + i % 2
        img, mask = _shape_image(rng, kind)
        for sub, arr in (("images", img), ("masks", mask)):
            (data / sub / f"k{kind}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(data / sub / f"k{kind}" / f"{i:03d}.png")
    (data / "masks" / "classes.txt").write_text("background\nsquare\ndisc\n")
    source = open_source(str(data / "images"))
    pixels = model.preprocess([source.load(i) for i in range(len(source))])
    X = model.residual_streams(pixels, [LAYER])[LAYER][:, 1:].reshape(-1, model.width).numpy()
    runs = {}
    learners = (("ksvd", vitatlas.DBKSVD(n_atoms=24, k=3)),
                ("sae", vitatlas.SAE(kind="topk", n_latents=24, k=3, epochs=2, batch_size=128)))
    for name, d in learners:
        d.fit(X, progress=False)
        d.fit_info = {"source": "store", "model": model.name, "layer": LAYER}
        d.save(root / name)
        runs[name] = root / name
    return {"root": root, "model_dir": model_dir, "model": model, "data": data, "runs": runs}


def _f1(truth: np.ndarray, pred: np.ndarray) -> float:
    tp = float((truth & pred).sum())
    return 2 * tp / (truth.sum() + pred.sum()) if truth.sum() + pred.sum() else 0.0


@pytest.fixture(scope="module")
def seg_probe(world):
    """A segmentation probe on the shapes folder, trained once for the tests below."""
    source, masks = open_data_with_masks(str(world["data"]))
    return train_probe(world["model"], source, "segmentation", masks=masks, progress=False)


def test_f1_choice_matches_a_slow_reference():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    n, n_atoms, n_classes = 400, 12, 3
    dense = np.where(rng.random((n, n_atoms)) < 0.2, rng.normal(size=(n, n_atoms)), 0.0).astype(np.float32)
    labels = rng.integers(-1, n_classes, size=n)
    dense[labels == 2, 5] = np.abs(dense[labels == 2, 5]) + 1.0  # atom 5 (+) marks class 2
    codes = [SparseCodes.from_dense(torch.from_numpy(part)) for part in (dense[:200], dense[200:])]
    max_pos, max_neg = np.maximum(dense.max(0), 0), np.maximum(-dense.min(0), 0)
    got = best_features(codes, labels, max_pos, max_neg, n_classes)
    for c in range(n_classes):
        best = -1.0
        for a in range(n_atoms):  # every atom, sign and threshold, one by one
            for sign, peak in ((1, max_pos[a]), (-1, max_neg[a])):
                if peak <= 0:
                    continue
                for tau in (0.0, 0.1, 0.25, 0.5):
                    best = max(best, _f1(labels == c, sign * dense[:, a] > tau * peak))
        assert got[c]["f1"] == pytest.approx(best, abs=1e-12)
        a, s, tau = got[c]["atom"], got[c]["sign"], got[c]["threshold"]
        peak = max_pos[a] if s > 0 else max_neg[a]
        assert f1_score(labels == c, s * dense[:, a] > tau * peak, zero_division=0.0) == pytest.approx(best)
    assert got[2]["atom"] == 5 and got[2]["sign"] == 1


def test_top_features_rank_atoms_by_their_best_f1():
    """The top m atoms per class equal a slow ranking of every atom by its best F1 over signs and thresholds."""
    rng = np.random.default_rng(4)
    n, n_atoms, n_classes, m = 500, 15, 3, 4
    dense = np.where(rng.random((n, n_atoms)) < 0.25, rng.normal(size=(n, n_atoms)), 0.0).astype(np.float32)
    labels = rng.integers(-1, n_classes, size=n)
    for a, strength in ((2, 2.0), (7, 1.0), (11, 0.5)):  # three atoms mark class 1, ever more weakly
        dense[labels == 1, a] = np.abs(dense[labels == 1, a]) + strength
    dense[:, 14] = 0.0  # an atom that never fires is never chosen
    codes = [SparseCodes.from_dense(torch.from_numpy(part)) for part in (dense[:250], dense[250:])]
    max_pos, max_neg = np.maximum(dense.max(0), 0), np.maximum(-dense.min(0), 0)
    got = top_features(codes, labels, max_pos, max_neg, n_classes, m)
    for c in range(n_classes):
        per_atom = {}
        for a in range(n_atoms):
            for sign, peak in ((1, max_pos[a]), (-1, max_neg[a])):
                if peak <= 0:
                    continue
                for tau in (0.0, 0.1, 0.25, 0.5):
                    per_atom[a] = max(per_atom.get(a, -1.0), _f1(labels == c, sign * dense[:, a] > tau * peak))
        want = sorted(per_atom.values(), reverse=True)[:m]
        assert [f["f1"] for f in got[c]] == pytest.approx(want, abs=1e-12)
        assert len({f["atom"] for f in got[c]}) == m and 14 not in {f["atom"] for f in got[c]}
        for f in got[c]:  # each entry's sign and threshold give the F1 it reports
            peak = max_pos[f["atom"]] if f["sign"] > 0 else max_neg[f["atom"]]
            assert _f1(labels == c, f["sign"] * dense[:, f["atom"]] > f["threshold"] * peak) == pytest.approx(f["f1"])
    assert [f["atom"] for f in got[1][:3]] == [2, 7, 11]
    assert [fs[0] for fs in got] == best_features(codes, labels, max_pos, max_neg, n_classes)


def test_fashion_mnist_patch_labels_follow_the_majority_of_pixels():
    from types import SimpleNamespace

    from vitatlas.models import ImageTransform

    # 28 px input kept as is, 7 px patches: each patch is a 7x7 block of the original
    model = SimpleNamespace(transform=ImageTransform(28), patch_size=7, image_size=28)
    rng = np.random.default_rng(1)
    images = np.where(rng.random((3, 28, 28)) < 0.5, 0, rng.integers(1, 256, (3, 28, 28))).astype(np.uint8)
    masks = FashionMNISTMasks(ArraySource("embedded:fashion-mnist:test", images, np.array([3, 0, 9]),
                                          ["c"] * 10))
    assert masks.class_names[-1] == "background" and len(masks.class_names) == 11
    for i in range(3):
        got = patch_labels(model, masks.label_map(i))
        blocks = images[i].reshape(4, 7, 4, 7).transpose(0, 2, 1, 3).reshape(16, 49)
        expected = np.where((blocks == 0).sum(1) > 49 / 2, 10, [3, 0, 9][i])
        assert np.array_equal(got, expected)


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST is not installed")
def test_fashion_mnist_masks_are_found():
    source, masks = open_data_with_masks("embedded:fashion-mnist:test")
    assert len(masks) == len(source) == 10_000
    label_map = masks.label_map(0)
    assert set(np.unique(label_map)) <= {10, source.label(0)}


def test_hf_dataset_mask_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(2)
    pairs = [_shape_image(rng, 1 + i % 2) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p[0]) for p in pairs],
                                     "annotation": [Image.fromarray(p[1]) for p in pairs]})
    ds = ds.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    source, masks = open_data_with_masks(f"hf-disk:{tmp_path / 'ds'}")
    assert len(masks) == len(source) == 4 and masks.class_names == ["class 0", "class 1", "class 2"]
    assert np.array_equal(masks.label_map(1), pairs[1][1])


def test_probe_trains_saves_and_loads(world, seg_probe, tmp_path):
    model = world["model"]
    probe = seg_probe
    assert probe.class_names == ["background", "square", "disc"]
    assert probe.metrics["accuracy"] > 0.5 and 0 < probe.metrics["miou"] <= 1
    probe.save(tmp_path / "p")
    again = LinearProbe.load(tmp_path / "p")
    final = torch.randn(2, model.n_tokens, model.width)
    assert torch.equal(again.predict_proba(final), probe.predict_proba(final))
    assert again.predict_proba(final).shape == (2, model.n_patches, 3)
    assert again.model["name"] == model.name and again.model["layer"] == "final"


def test_probe_fit_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] + 0.3 * rng.normal(size=300) > 0).astype(np.int64) + (X[:, 2] > 1)
    probe = LinearProbe.fit(torch.from_numpy(X), torch.from_numpy(y), task="classification",
                            class_names=["a", "b", "c"], model={}, l2=1e-4)
    ours = probe.logits_of_features(torch.from_numpy(X)).argmax(-1).numpy()
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    ref = LogisticRegression(C=1 / (2 * 1e-4 * len(X)), max_iter=2000).fit(Z, y).predict(Z)
    assert (ours == ref).mean() >= 0.98  # the same regularised objective, solved by two optimisers


def _cli(args):
    result = CliRunner().invoke(main, args, standalone_mode=False, catch_exceptions=True)
    return result


def test_segmentation_protocol_end_to_end(world, tmp_path):
    probe_dir = tmp_path / "probe"
    r = _cli(["probe", "train", "--model", f"hf:{world['model_dir']}", "--data", str(world["data"]),
              "--task", "segmentation", "--out", str(probe_dir), "--no-progress"])
    assert r.exception is None, r.output
    assert "mIoU" in r.output
    out = tmp_path / "out"
    r = _cli(["intervene", str(world["runs"]["ksvd"]), str(world["runs"]["sae"]), "--model",
              f"hf:{world['model_dir']}", "--data", str(world["data"]), "--task", "segmentation", "--probe",
              str(probe_dir), "--calibration", "0.5", "--out", str(out), "--no-progress"])
    assert r.exception is None, r.output
    result = json.loads((out / "intervene.json").read_text())
    for key in ("ksvd", "sae", "noop", "random_atom", "random_direction", "sae/random_atom"):
        assert {"target_change_rate", "other_change_rate", "target_change_rate_std", "per_class"} <= set(result[key])
    assert result["noop"]["target_change_rate"] == 0 and result["noop"]["other_change_rate"] == 0
    assert result["random_atom"] == result["ksvd/random_atom"]
    per_class = result["ksvd"]["per_class"]
    assert set(per_class) == {"background", "square", "disc"}
    assert all(0 <= v["target_change_rate"] <= 1 for v in per_class.values() if v["target_change_rate"] is not None)
    n_target = sum(v["n_target"] for v in per_class.values())
    assert n_target == result["ksvd"]["n_target"] == result["noop"]["n_target"]
    assert (out / "report.md").read_text().startswith("# Interventions: segmentation")
    assert (out / "change_rates.png").stat().st_size > 0 and (out / "segmentation_maps.png").is_file()
    assert "noop" in r.output and "target" in r.output
    # the strength sweep: every condition but the no-op has the whole curve, its top level is the headline's
    setup = result["setup"]
    assert setup["strengths"] == [0.25, 0.5, 1.0, 2.0] and setup["strength"] == setup["headline_strength"]
    want, met = headline_strength({st: {n: result[f"{n}/random_direction"]["by_strength"][f"{st:g}"]
                                        ["target_change_rate_mean"] for n in ("ksvd", "sae")}
                                   for st in setup["strengths"]})
    assert (setup["headline_strength"], setup["headline_rule_met"]) == (want, met)
    for key in ("ksvd", "sae", "random_direction", "sae/random_atom"):
        curve = result[key]["by_strength"]
        assert set(curve) == {"0.25", "0.5", "1", "2"}
        point = curve[f"{setup['strength']:g}"]
        assert point["target_change_rate_mean"] == result[key]["target_change_rate_mean"]
        assert point["n_target"] == result["noop"]["n_target"]
    assert "by_strength" not in result["noop"]
    report = (out / "report.md").read_text()
    assert "Does each atom beat its controls?" in report and "## Strength sweep" in report
    assert (out / "strength_sweep.png").stat().st_size > 0
    assert "its random direction" in r.output


def test_headline_strength_rule_and_strength_checks():
    curve = {0.25: {"a": 0.02, "b": 0.05}, 0.5: {"a": 0.08, "b": 0.10}, 1.0: {"a": 0.09, "b": 0.3}}
    assert headline_strength(curve) == (0.5, True)        # the largest where every run's control <= 10%
    assert headline_strength({1.0: {"a": 0.2}, 2.0: {"a": 0.5}}) == (1.0, False)  # none: the smallest
    assert headline_strength({0.5: {"a": None}, 1.0: {"a": 0.01}}) == (1.0, True)  # unmeasured never qualifies
    assert check_strengths([2, 0.5, 2.0]) == [0.5, 2.0] and check_strengths(1) == [1.0]
    for bad, message in (([0.5, -1], "positive"), ([], "positive"), ([float("nan")], "finite")):
        with pytest.raises(VitatlasError, match=message):
            check_strengths(bad)


def test_each_strength_of_the_sweep_equals_that_strength_alone(world, seg_probe):
    """Batching the strengths into one forward changes no count (beyond a tie flipped by rounding)."""
    model = world["model"]
    source, masks = open_data_with_masks(str(world["data"]))
    runs = {"sae": vitatlas.load(world["runs"]["sae"])}
    kw = dict(calibration=0.5, classes=["square", "disc"], progress=False)
    sweep = segmentation_protocol(model, runs, seg_probe, source, masks, strengths=[0.5, 4.0], **kw)["json"]
    alone = segmentation_protocol(model, runs, seg_probe, source, masks, strengths=[4.0], **kw)["json"]
    for key in ("sae", "random_atom", "random_direction"):
        a, b = sweep[key]["by_strength"]["4"], alone[key]
        assert a["n_target"] == b["n_target"]
        # one patch of slack: a different batch size may round a near-tie of the probe the other way
        assert abs(a["target_change_rate"] - b["target_change_rate"]) <= 1 / max(b["n_target"], 1)
        assert abs(a["other_change_rate"] - b["other_change_rate"]) <= 1 / max(b["n_other"], 1)
    assert set(sweep["sae"]["by_strength"]) == {"0.5", "4"} and "by_strength" in alone["sae"]


def test_a_strong_targeted_edit_changes_its_target(world, seg_probe):
    """Strength 50 on the chosen atom at a class's patches changes more target than other predictions."""
    model = world["model"]
    source, masks = open_data_with_masks(str(world["data"]))
    probe = seg_probe
    runs = {"ksvd": vitatlas.load(world["runs"]["ksvd"])}
    out = segmentation_protocol(model, runs, probe, source, masks, strengths=[50.0], calibration=0.5,
                                classes=["square", "disc"], progress=False)["json"]
    assert out["ksvd"]["target_change_rate"] > out["ksvd"]["other_change_rate"]
    assert out["noop"]["target_change_rate"] == 0
    assert set(out["ksvd"]["per_class"]) == {"square", "disc"}


def test_a_group_of_atoms_per_class(world, seg_probe):
    """features_per_class=2 edits each class's two best atoms together, against two random atoms."""
    model = world["model"]
    source, masks = open_data_with_masks(str(world["data"]))
    runs = {"ksvd": vitatlas.load(world["runs"]["ksvd"])}
    kw = dict(strengths=[1.0], calibration=0.5, classes=["square", "disc"], progress=False)
    one = segmentation_protocol(model, runs, seg_probe, source, masks, **kw)["json"]
    two = segmentation_protocol(model, runs, seg_probe, source, masks, features_per_class=2, **kw)["json"]
    assert two["setup"]["features_per_class"] == 2 and one["setup"]["features_per_class"] == 1
    for cls in ("square", "disc"):
        group, single = two["ksvd"]["per_class"][cls], one["ksvd"]["per_class"][cls]
        assert group["atom"] == single["atom"] == group["atoms"][0] and len(set(group["atoms"])) == 2
        assert group["features"][0]["f1"] >= group["features"][1]["f1"]
        rand = two["random_atom"]["per_class"][cls]["atoms"]
        assert len(set(rand)) == 2 and not set(rand) & set(group["atoms"])
        assert "atoms" not in one["random_atom"]["per_class"][cls]
    assert two["noop"]["target_change_rate"] == 0 and two["noop"]["other_change_rate"] == 0
    assert two["ksvd"]["n_target"] == one["ksvd"]["n_target"]
    with pytest.raises(VitatlasError, match="features_per_class must be a positive integer"):
        segmentation_protocol(model, runs, seg_probe, source, masks, features_per_class=0, **kw)


def test_classification_protocol(world):
    model = world["model"]
    source = open_source(str(world["data"] / "images"))
    probe = train_probe(model, source, "classification", progress=False)
    runs = {"ksvd": vitatlas.load(world["runs"]["ksvd"]), "sae": vitatlas.load(world["runs"]["sae"])}
    out = classification_protocol(model, runs, probe, source, top_ks=(1, 5), calibration=0.5, progress=False)["json"]
    for key in ("ksvd", "sae", "noop", "random_atom", "random_direction", "ksvd@top1", "sae/random_atom@top5"):
        assert "target_change_rate" in out[key] and "p_drop_target" in out[key]
    assert out["noop"]["target_change_rate"] == 0 and out["noop"]["p_drop_target"] == 0
    assert out["ksvd"]["top_k"] == 5


# ---- bad input ---------------------------------------------------------------------------------------

def test_mask_source_with_another_image_count(world, tmp_path):
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(masks_dir / f"{i}.png")
    with pytest.raises(VitatlasError, match="has 3 masks but the image source"):
        open_data_with_masks(str(world["data"] / "images"), str(masks_dir))


def test_cli_bad_inputs_are_one_line_errors(world, seg_probe, tmp_path):
    probe = seg_probe
    probe.save(tmp_path / "probe")
    other = save_tiny_dinov2(tmp_path / "other", seed=3)
    LinearProbe.fit(torch.randn(10, 32), torch.arange(10) % 3, task="segmentation", class_names=probe.class_names,
                    model=model_identity(load(f"hf:{other}"))).save(tmp_path / "other-probe")
    base = ["intervene", str(world["runs"]["ksvd"]), "--model", f"hf:{world['model_dir']}", "--data",
            str(world["data"]), "--task", "segmentation", "--out", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["--probe", str(tmp_path / "probe"), "--strength", "nan"], "finite"),
        (["--probe", str(tmp_path / "probe"), "--classes", "triangle"], "class 'triangle' does not exist"),
        (["--probe", str(tmp_path / "probe"), "--layer", "2"], "fitted on layer 1, not layer 2"),
        (["--probe", str(tmp_path / "other-probe")], "probe was trained on"),
        (["--probe", str(tmp_path / "probe"), "--masks", str(world["data"] / "masks" / "k1")], "masks but the image"),
        (["--probe", str(tmp_path / "probe"), "--features-per-class", "0"], "--features-per-class must be positive"),
    ]
    for extra, message in cases:
        r = _cli(base + extra)
        assert isinstance(r.exception, VitatlasError), (extra, r.output)
        assert message in str(r.exception) and "\n" not in str(r.exception)
    # the console entry point turns it into `error: ...` and exit status 2
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vitatlas", *base, "--probe", str(tmp_path / "probe"),
                           "--strength", "nan"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1
