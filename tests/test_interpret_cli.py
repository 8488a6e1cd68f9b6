"""`vitatlas interpret`: the output layout, resuming, and every bad input the issue lists."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_interpret import fake_extract_store

import vitatlas
from vitatlas import ActivationStore, VitatlasError
from vitatlas.cli import main
from vitatlas.interpret import AtomCards
from vitatlas.interpret.summary import most_specific_atoms, specific_atoms_markdown


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp_cli")
    store = fake_extract_store(root / "acts", n_images=20)
    d = vitatlas.DBKSVD(n_atoms=12, k=2, seed=0).fit(store, progress=False)
    d.save(root / "run")
    return root


def cli(*args):
    res = CliRunner().invoke(main, ["interpret", *map(str, args), "--no-progress"], catch_exceptions=True,
                             standalone_mode=False)
    return res


def test_cli_writes_the_contract_layout_and_rerun_is_a_no_op(fitted, tmp_path):
    out = tmp_path / "cards"
    res = cli(fitted / "run", "--acts", fitted / "acts", "--out", out, "--top", "4")
    assert res.exception is None, res.output
    assert "cards for 12 atoms" in res.output and "index.html" in res.output
    meta = json.loads((out / "cards.json").read_text())
    assert meta["format"] == "vitatlas-atom-cards" and meta["complete"] and meta["has_images"]
    assert meta["n_atoms"] == 12 and meta["top"] == 4 and meta["rank"] == "max" and meta["patch_grid"] == [4, 4]
    assert meta["run"]["learner"] == "dbksvd" and meta["store"]["tokens"] == "patches"
    lines = (out / "atoms.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(range(12))
    rec = json.loads(lines[0])
    for key in ("frequency", "mean_activation", "max_activation", "top_images", "top_patches", "negative",
                "histogram", "labels", "descriptions", "nearest_atoms"):
        assert key in rec
    cards = AtomCards.load(out)
    assert cards.tensors["image_ids"].shape == (12, 4) and cards.tensors["patch_values"].shape == (12, 4, 16)
    assert not (out / "checkpoint").exists()
    card = Image.open(out / "cards" / "atom-00000.png")
    assert card.width > 100 and card.height > 100
    image = Image.open(out / "images" / f"image-{rec['top_images'][0]['image']:07d}.png")
    assert image.size == (28, 28)
    html = (out / "index.html").read_text()
    assert html.count('id="atom-') == 12 and "cards/atom-00000.png" in html

    before = (out / "atoms.jsonl").read_bytes()
    res = cli(fitted / "run", "--acts", fitted / "acts", "--out", out, "--top", "4")
    assert res.exception is None and "already complete" in res.output
    assert (out / "atoms.jsonl").read_bytes() == before
    res = cli(fitted / "run", "--acts", fitted / "acts", "--out", out, "--top", "5")
    assert isinstance(res.exception, VitatlasError) and "other arguments" in str(res.exception)


def test_cli_resumes_an_interrupted_run(fitted, tmp_path):
    out = tmp_path / "cards"
    ok = cli(fitted / "run", "--acts", fitted / "acts", "--out", tmp_path / "ref", "--top", "3")
    assert ok.exception is None, ok.output
    # a run killed while rendering: statistics written, cards.json not yet complete
    shutil.copytree(tmp_path / "ref", out)
    meta = json.loads((out / "cards.json").read_text())
    (out / "cards.json").write_text(json.dumps(meta | {"complete": False}))
    (out / "cards" / "atom-00003.png").unlink()
    res = cli(fitted / "run", "--acts", fitted / "acts", "--out", out, "--top", "3")
    assert res.exception is None, res.output
    assert (out / "cards" / "atom-00003.png").is_file()
    assert (out / "atoms.jsonl").read_bytes() == (tmp_path / "ref" / "atoms.jsonl").read_bytes()


def test_no_images_and_from_npy_stores_write_statistics_only(fitted, tmp_path):
    res = cli(fitted / "run", "--acts", fitted / "acts", "--out", tmp_path / "a", "--top", "3", "--no-images",
              "--max-atoms", "5")
    assert res.exception is None, res.output
    meta = json.loads((tmp_path / "a" / "cards.json").read_text())
    assert not meta["has_images"] and "--no-images" in meta["note"] and meta["n_atoms"] == 5
    assert not (tmp_path / "a" / "images").exists()
    assert (tmp_path / "a" / "cards" / "atom-00000.png").is_file()  # heatmaps on grey tiles

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 8)).astype(np.float32)
    store = ActivationStore.from_array(tmp_path / "npy", X, rng.integers(0, 3, 40))
    d = vitatlas.DBKSVD(n_atoms=6, k=2, seed=0).fit(store, progress=False)
    cards = vitatlas.interpret(d, store, top=4, progress=False)
    assert not cards.has_images and "from-npy" in cards.meta["note"]
    cards.save(tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "index.html").is_file() and not (tmp_path / "b" / "cards").exists()
    assert all(len(a["top_images"]) <= 4 for a in cards.atoms)


def test_unopenable_source_names_the_path_and_no_images_still_works(tmp_path):
    folder = tmp_path / "photos"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / c / f"{i}.png")
    store = fake_extract_store(tmp_path / "acts", n_images=10, source=str(folder), images_per_shard=4)
    d = vitatlas.DBKSVD(n_atoms=6, k=2, seed=0).fit(store, progress=False)
    assert len(vitatlas.interpret.images.load_images(store, [9])) == 1

    (folder / "b" / "4.png").unlink()  # a file gone: ids would point at other images
    with pytest.raises(VitatlasError, match="now holds 9 images"):
        vitatlas.interpret(d, store, top=3, progress=False)
    shutil.rmtree(folder)
    with pytest.raises(VitatlasError, match=str(folder)):
        vitatlas.interpret(d, store, top=3, progress=False)
    res = cli(tmp_path / "nowhere", "--acts", tmp_path / "acts", "--out", tmp_path / "x")
    assert isinstance(res.exception, VitatlasError) and "no dictionary" in str(res.exception)
    d.save(tmp_path / "run")
    res = cli(tmp_path / "run", "--acts", tmp_path / "acts", "--out", tmp_path / "c")
    assert isinstance(res.exception, VitatlasError) and str(folder) in str(res.exception)
    assert "--no-images" in str(res.exception) and "\n" not in str(res.exception)
    res = cli(tmp_path / "run", "--acts", tmp_path / "acts", "--out", tmp_path / "c", "--no-images")
    assert res.exception is None, res.output
    assert len((tmp_path / "c" / "atoms.jsonl").read_text().splitlines()) == 6


def test_mismatched_store_is_refused(fitted, tmp_path):
    other_layer = fake_extract_store(tmp_path / "l2", n_images=4, layer=2)
    d = vitatlas.load(fitted / "run")
    with pytest.raises(VitatlasError, match="layer=1.*layer=2"):
        vitatlas.interpret(d, other_layer, progress=False)
    other_model = fake_extract_store(tmp_path / "m", n_images=4, model_name="hf:other")
    res = cli(fitted / "run", "--acts", other_model.path, "--out", tmp_path / "o")
    assert isinstance(res.exception, VitatlasError) and "model" in str(res.exception)
    wide = fake_extract_store(tmp_path / "w", n_images=4, d=20)
    with pytest.raises(VitatlasError, match="width 16 .* width 20"):
        vitatlas.interpret(d, wide, progress=False)


@pytest.mark.parametrize("args, message", [
    (["--top", "0"], "--top must be a positive"),
    (["--top", "-2"], "--top must be a positive"),
    (["--max-atoms", "0"], "--max-atoms must be positive"),
])
def test_bad_cli_arguments(fitted, tmp_path, args, message):
    res = cli(fitted / "run", "--acts", fitted / "acts", "--out", tmp_path / "o", *args)
    assert isinstance(res.exception, VitatlasError) and message in str(res.exception), res.output


def test_vocab_and_caption_column_that_cannot_apply_are_refused(fitted, tmp_path):
    (tmp_path / "words.txt").write_text("shoe\n")
    res = cli(fitted / "run", "--acts", fitted / "acts", "--out", tmp_path / "o", "--vocab", tmp_path / "words.txt")
    assert isinstance(res.exception, VitatlasError) and "--vocab" in str(res.exception)
    res = cli(fitted / "run", "--acts", fitted / "acts", "--out", tmp_path / "p", "--caption-column", "nope")
    assert isinstance(res.exception, VitatlasError) and "--caption-column" in str(res.exception)


def test_bad_top_value_type_is_a_usage_error(fitted, tmp_path):
    res = CliRunner().invoke(main, ["interpret", str(fitted / "run"), "--acts", str(fitted / "acts"), "--out",
                                    str(tmp_path / "o"), "--top", "many"])
    assert res.exit_code == 2 and "many" in res.output


def test_most_specific_atoms(fitted, tmp_path):
    res = cli(fitted / "run", "--acts", fitted / "acts", "--out", tmp_path / "c", "--top", "5")
    assert res.exception is None, res.output
    cards = AtomCards.load(tmp_path / "c")
    best = most_specific_atoms(tmp_path / "c", n=4)
    scored = [(a["labels"][0]["specificity"], a["labels"][0]["faithfulness"] or 0.0, a["id"], a["labels"][0]["label"])
              for a in cards.atoms if a["labels"] and a["labels"][0]["specificity"] is not None]
    ranked = sorted(scored, key=lambda t: (-t[0], -t[1], t[2]))
    assert [b["atom"] for b in best] == [t[2] for t in ranked[:4]]
    one_each = most_specific_atoms(tmp_path / "c", n=12, per_label=1)
    labels = [b["label"] for b in one_each]
    assert len(labels) == len(set(labels)) == len({t[3] for t in ranked})
    assert [b["atom"] for b in one_each][0] == ranked[0][2]
    assert all(b["card"].startswith("cards/atom-") for b in best)
    md = specific_atoms_markdown(tmp_path / "c", n=4, link_prefix="../c/")
    assert md.count("\n|") >= len(best) and "../c/cards/atom-" in md
