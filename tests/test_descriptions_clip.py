"""Token kind ``embedding`` and text descriptions, on tiny random CLIP / SigLIP models built here.

The tiny CLIP is saved with a tiny CLIPTokenizer (letters as byte-level BPE tokens, no merges), so the
whole path runs offline: ``vitatlas extract --tokens embedding`` -> a dictionary -> ``describe_atoms``.
"""

from __future__ import annotations

import json
import string
import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from _tiny import save_tiny_dinov2
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import roc_auc_score

import vitatlas
from vitatlas.cli import main
from vitatlas.data.extract import extract
from vitatlas.errors import VitatlasError
from vitatlas.interpret.descriptions import describe_atoms
from vitatlas.interpret.vocabulary import prompts
from vitatlas.models import load

VISION = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, image_size=28,
              patch_size=14)
VOCAB = ["apple", "sky", "red", "blue", "dog", "cat", "tree", "car"]


def tiny_tokenizer() -> tf.CLIPTokenizer:
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({".</w>": len(vocab), "<|startoftext|>": len(vocab) + 1, "<|endoftext|>": len(vocab) + 2})
    return tf.CLIPTokenizer(vocab=vocab, merges=[])


def build(kind: str, tokenizer=None) -> torch.nn.Module:
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=64,
                max_position_embeddings=40)
    if tokenizer is not None:  # CLIP pools the text at its end token: the ids must agree with the tokenizer
        text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    if kind == "clip":
        return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)).eval()
    if kind == "siglip":
        return tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=VISION)).eval()
    if kind == "siglip_vision":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)).eval()
    if kind == "clip_vision":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)).eval()
    raise KeyError(kind)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tok = tiny_tokenizer()
    for kind in ("clip", "siglip", "siglip_vision", "clip_vision"):
        build(kind, tok if kind == "clip" else None).save_pretrained(root / kind)
    tok.save_pretrained(root / "clip")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        red = i % 2 == 0
        pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        pixels[..., 0 if red else 2] += 180
        Image.fromarray(pixels).save(images / f"{i:03d}.png")
        lines.append(json.dumps({"file": f"{i:03d}.png", "caption": "a red apple" if red else "a blue sky"}))
    (images / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root


def pil_images(n=3):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 36, 3), dtype=np.uint8)) for i in range(n)]


# ---- the model side ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip_vision"])
def test_image_embeddings_match_get_image_features(saved, kind):
    model = load(f"hf:{saved / kind}")
    pixels = model.preprocess(pil_images())
    ref = build(kind)
    with torch.no_grad():
        if kind == "siglip_vision":
            expected = ref(pixel_values=pixels).pooler_output
        else:
            out = ref.get_image_features(pixel_values=pixels)
            expected = getattr(out, "pooler_output", out)
    got = model.image_embeddings(pixels)
    assert got.shape == (3, model.embedding_width)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.has_text_tower == (kind != "siglip_vision")


def test_text_embeddings_match_get_text_features(saved):
    model = load(f"hf:{saved / 'clip'}")
    texts = prompts(["apple", "striped shirt", "dog"])
    got = model.text_embeddings(texts, batch_size=2)  # two batches, padded differently
    tok = tf.AutoTokenizer.from_pretrained(saved / "clip")
    ref = build("clip", tok)
    with torch.no_grad():
        out = ref.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    torch.testing.assert_close(got, getattr(out, "pooler_output", out), atol=1e-5, rtol=1e-5)


def test_models_without_a_joint_space(saved, tmp_path):
    for path in (saved / "clip_vision", save_tiny_dinov2(tmp_path / "dino")):
        model = load(f"hf:{path}")
        assert model.embedding_width is None and not model.has_text_tower
        with pytest.raises(VitatlasError, match="no joint image-text embedding"):
            model.image_embeddings(model.preprocess(pil_images(1)))
        with pytest.raises(VitatlasError, match="no text tower"):
            model.text_embeddings(["a dog"])
        with pytest.raises(VitatlasError, match="--tokens cls"):
            extract(f"hf:{path}", str(saved / "images"), [], "embedding", tmp_path / "out", progress=False)
    siglip = load(f"hf:{saved / 'siglip'}")
    with pytest.raises(VitatlasError, match="ships no tokenizer"):
        siglip.text_embeddings(["a dog"])


# ---- extraction --------------------------------------------------------------------------------------------
def test_extract_embedding_next_to_cls(saved, tmp_path):
    out = tmp_path / "acts"
    extract(f"hf:{saved / 'clip'}", str(saved / "images"), [0], ["cls", "embedding"], out, batch_size=16,
            limit=20, progress=False)
    emb = vitatlas.ActivationStore(out / "embedding")
    cls = vitatlas.ActivationStore(out / "cls")
    assert emb.tokens == "embedding" and emb.layer is None and emb.shape == (20, 16) and cls.shape == (20, 32)
    assert emb.index[:, 0].tolist() == list(range(20)) and set(emb.index[:, 1]) == {0}
    model = load(f"hf:{saved / 'clip'}")
    src_images = [Image.open(saved / "images" / f"{i:03d}.png") for i in range(20)]
    expected = model.image_embeddings(model.preprocess(src_images)).numpy()
    np.testing.assert_allclose(emb.to_numpy(), expected, atol=1e-5)
    with pytest.raises(VitatlasError, match="takes no --layer"):
        extract(f"hf:{saved / 'clip'}", str(saved / "images"), [0], "embedding", tmp_path / "x", progress=False)
    with pytest.raises(VitatlasError, match="at least one --layer"):
        extract(f"hf:{saved / 'clip'}", str(saved / "images"), [], "cls", tmp_path / "y", progress=False)


# ---- the whole path: extract (CLI) -> dictionary -> describe_atoms ----------------------------------------
@pytest.fixture(scope="module")
def described(saved):
    out = saved / "acts"
    result = CliRunner().invoke(main, ["extract", "--model", f"hf:{saved / 'clip'}", "--data", str(saved / "images"),
                                       "--tokens", "embedding", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "(embedding)" in result.output
    store = vitatlas.ActivationStore(out)
    dictionary = vitatlas.DBKSVD(6, 2, epochs=3, nonnegative=False).fit(store, progress=False)  # signed codes
    codes = dictionary.encode(store.to_numpy())
    top = store.index[np.argsort(-codes, axis=0, kind="stable")[:8].T, 0].astype(np.int64)  # (6, 8) image ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = describe_atoms(dictionary, store, top, vocab=saved / "vocab.txt", progress=False)
    return store, dictionary, codes, top, result


def test_text_descriptions_are_the_nearest_phrases(saved, described):
    store, dictionary, codes, top, result = described
    model = load(f"hf:{saved / 'clip'}")
    text = torch.nn.functional.normalize(model.text_embeddings(prompts(VOCAB)), dim=1).numpy().astype(np.float64)
    atoms = dictionary.atoms.numpy().astype(np.float64)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    images = store.to_numpy().astype(np.float64)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    assert store.index[:, 0].tolist() == list(range(store.n_rows))
    for a, descs in enumerate(result):
        texts = [d for d in descs if d["kind"] == "text"]
        sides = [d["evidence"]["side"] for d in texts]
        assert sides == (["positive", "negative"] if (codes[:, a] < 0).any() else ["positive"])
        for d in texts:
            sign = 1.0 if d["evidence"]["side"] == "positive" else -1.0
            cos = sign * atoms[a] @ text.T
            assert d["text"] == VOCAB[int(np.argmax(cos))]
            assert d["score"] == pytest.approx(cos.max(), abs=1e-5)
            assert [p["text"] for p in d["evidence"]["phrases"]] == [VOCAB[i] for i in np.argsort(-cos)[:5]]
            # faithfulness, the slow way: AUROC of the phrase's zero-shot score for "the atom fires", over
            # every image (the phrase was chosen from the atom alone; store rows are images here)
            fires = sign * codes[:, a] > 0
            score = images @ text[VOCAB.index(d["text"])]
            expected = roc_auc_score(fires, score) if 0 < fires.sum() < fires.size else None
            assert d["faithfulness"] == pytest.approx(expected, abs=1e-6)
    checked = [d for descs in result for d in descs if d["kind"] == "text"]
    assert any(d["faithfulness"] is not None for d in checked)  # the comparison above is not all None == None
    assert any(d["evidence"]["side"] == "negative" for d in checked)  # OMP codes are signed
    # specificity: one over the number of atoms that got the same text
    texts = [{d["text"] for d in descs if d["kind"] == "text"} for descs in result]
    for descs in result:
        for d in (d for d in descs if d["kind"] == "text"):
            assert d["specificity"] == pytest.approx(1 / sum(d["text"] in t for t in texts))


def test_the_embedding_store_also_gets_caption_descriptions(described):
    result = described[-1]
    kinds = {d["kind"] for descs in result for d in descs}
    assert kinds <= {"text", "caption"} and "caption" in kinds  # the image folder carries captions.jsonl
    for descs in result:
        for d in descs:
            assert set(d) == {"kind", "text", "score", "faithfulness", "specificity", "evidence"}
            json.dumps(d)  # plain JSON: no numpy scalars


def test_text_bad_inputs(saved, described, tmp_path):
    store, dictionary, _, top, _ = described
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(VitatlasError, match="holds no phrases"):
        describe_atoms(dictionary, store, top, vocab=empty, progress=False)
    # an embedding store of a model without a text tower (a SigLIP vision tower saved alone)
    extract(f"hf:{saved / 'siglip_vision'}", str(saved / "images"), [], "embedding", tmp_path / "sv",
            limit=12, progress=False)
    sv = vitatlas.ActivationStore(tmp_path / "sv")
    d2 = vitatlas.DBKSVD(3, 1, epochs=1).fit(sv, progress=False)
    top2 = np.tile(np.arange(4), (3, 1))
    with pytest.raises(VitatlasError, match="no text tower"):
        describe_atoms(d2, sv, top2, vocab=saved / "vocab.txt", caption_column="caption", progress=False)
    with pytest.warns(UserWarning, match="no text tower"):
        result = describe_atoms(d2, sv, top2, progress=False)
    assert all(d["kind"] == "caption" for descs in result for d in descs)
