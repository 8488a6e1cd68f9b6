"""Edits inside a tiny random ViT: the no-op identity, the error term, the expected direction, batching,
the context manager, token masks and the bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny import save_tiny_dinov2
from PIL import Image

import vitatlas
from vitatlas.errors import VitatlasError
from vitatlas.intervene import Edit, intervene, intervention
from vitatlas.intervene.core import edit_hidden, token_mask
from vitatlas.intervene.edits import apply_edits, as_edits
from vitatlas.intervene.heads import LinearProbe, model_identity
from vitatlas.intervene.maxact import max_activations
from vitatlas.learners.baselines import PCABaseline
from vitatlas.models import load

LAYER = 1


def _images(n: int, seed: int = 0, bright: bool | None = None) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    if bright is None:
        return [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(n)]
    base = 200 if bright else 40
    return [Image.fromarray(np.clip(base + rng.normal(0, 25, (28, 28, 3)), 0, 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_dinov2(tmp_path_factory.mktemp("tiny") / "dinov2")
    return path, load(f"hf:{path}")


@pytest.fixture(scope="module")
def dictionaries(tiny):
    """A DBK-SVD, a TopK SAE and a PCA baseline fitted on layer-1 tokens, marked as fitted there."""
    _, model = tiny
    pixels = model.preprocess(_images(12, bright=None) + _images(6, 1, True) + _images(6, 2, False))
    X = model.residual_streams(pixels, [LAYER])[LAYER].reshape(-1, model.width).numpy()
    out = {
        "dbksvd": vitatlas.DBKSVD(n_atoms=24, k=3).fit(X, progress=False),
        "sae": vitatlas.SAE(kind="topk", n_latents=24, k=3, epochs=2, batch_size=128, seed=0).fit(X, progress=False),
        "pca": PCABaseline(k=6).fit(X),
    }
    for d in out.values():
        d.fit_info = {"source": "store", "model": model.name, "layer": LAYER}
    return out


def _reference_final(path, pixels: torch.Tensor) -> torch.Tensor:
    """The transformers model's own last hidden state, independent of the adapter."""
    from transformers import Dinov2Model

    with torch.no_grad():
        return Dinov2Model.from_pretrained(path).eval()(pixel_values=pixels).last_hidden_state


@pytest.mark.parametrize("kind", ["dbksvd", "sae", "pca"])
def test_noop_edit_reproduces_the_model(tiny, dictionaries, kind):
    path, model = tiny
    images = _images(3, seed=5)
    d = dictionaries[kind]
    noops = [Edit(0, "scale", 1.0), Edit(1, "add", 0.0, relative=False)]
    result = intervene(model, d, images, edits=noops)
    reference = _reference_final(path, model.preprocess(images))
    rel = (result.after - reference).abs().max() / reference.abs().max()
    assert rel <= 1e-5
    assert torch.equal(result.after, result.before)  # the edit path adds exactly nothing


@pytest.mark.parametrize("kind", ["dbksvd", "sae"])
def test_error_term_is_added_back(tiny, dictionaries, kind):
    _, model = tiny
    d = dictionaries[kind]
    hidden = model.residual_streams(model.preprocess(_images(2, seed=7)), [LAYER])[LAYER]
    mask = token_mask(model, 2, hidden.shape[1], "all")
    edits = [Edit(4, "clamp", 3.0, relative=False), Edit(9, "ablate")]
    new_hidden, codes, edited = edit_hidden(hidden, mask, d, edits, None)
    # float64 reference of x' = decode(f') + (x - decode(f)) with the dictionary's own codes
    x = hidden.reshape(-1, model.width).double().numpy()
    f = d.encode(hidden.reshape(-1, model.width)).double().numpy()
    f2 = f.copy()
    f2[:, 4], f2[:, 9] = 3.0, 0.0
    W = d.atoms.double().numpy()
    bias = (d.decode(np.zeros((1, d.n_atoms), np.float32)).astype(np.float64))  # SAE decoder bias, 0 for K-SVD
    decode = lambda c: c @ W + bias  # noqa: E731  (both learners decode linearly: codes @ atoms + bias)
    expected = decode(f2) + (x - decode(f))
    got = new_hidden.reshape(-1, model.width).double().numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(x).max()
    # the part the dictionary cannot explain is unchanged: x' - decode(f') == x - decode(f)
    assert np.allclose(got - decode(f2), x - decode(f), atol=1e-4 * np.abs(x).max())
    # and the edit reached the model's output
    after = model.forward_from(LAYER, new_hidden)
    assert not torch.allclose(after, model.forward_from(LAYER, hidden))


def test_huge_clamp_moves_the_prediction_in_the_expected_direction(tiny):
    """Bright vs dark images: clamping the atom most enriched on bright images high makes a probe say
    'bright' on dark images; clamping it far negative makes it say 'dark' on bright images."""
    _, model = tiny
    train = _images(16, 10, True) + _images(16, 11, False)
    y = np.array([1] * 16 + [0] * 16)
    hidden = model.residual_streams(model.preprocess(train), [LAYER])[LAYER]
    d = vitatlas.DBKSVD(n_atoms=16, k=2).fit(hidden.reshape(-1, model.width).numpy(), progress=False)
    d.fit_info = {"model": model.name, "layer": LAYER}
    codes = d.encode(hidden.reshape(-1, model.width)).reshape(len(train), hidden.shape[1], -1)
    per_image = codes.max(dim=1).values
    atom = int((per_image[y == 1].mean(0) - per_image[y == 0].mean(0)).argmax())
    probe = LinearProbe.fit(model.forward_from(LAYER, hidden)[:, 0], torch.tensor(y), task="classification",
                            class_names=["dark", "bright"], model=model_identity(model))
    peak = np.full(d.n_atoms, float(codes[..., atom].max()))
    dark = intervene(model, d, _images(8, 12, False), edits=[Edit(atom, "clamp", 10.0)], max_activations=peak,
                     head=probe)
    assert dark.before_probs[:, 1].mean() < 0.5 < dark.after_probs[:, 1].mean()
    assert (dark.after_probs[:, 1] > dark.before_probs[:, 1]).all()
    bright = intervene(model, d, _images(8, 13, True), edits=[Edit(atom, "clamp", -10.0)], max_activations=peak,
                       head=probe)
    assert bright.after_probs[:, 1].mean() < 0.5 < bright.before_probs[:, 1].mean()


def test_batches_and_context_manager_agree(tiny, dictionaries):
    _, model = tiny
    d = dictionaries["sae"]
    images = _images(5, seed=3)
    edits = [{"atom": 2, "value": 4.0}]  # a dict edit: clamp relative to the max activation
    peak = np.ones(d.n_atoms)
    whole = intervene(model, d, images, edits=edits, max_activations=peak)
    one_by_one = intervene(model, d, images, edits=edits, max_activations=peak, batch_size=2)
    # different batch shapes may round differently in the last bits
    assert torch.allclose(whole.after, one_by_one.after, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole.after, whole.before)
    with intervention(model, d, LAYER, edits, max_activations=peak) as run:
        inside = run.forward(images)
        hooked = model.residual_streams(model.preprocess(images), [LAYER + 1])[LAYER + 1]
    assert run.calls == 2
    assert torch.allclose(inside, whole.after, atol=1e-5, rtol=1e-5)
    # the hook is gone after the with-block
    plain = model.forward_from(LAYER, model.residual_streams(model.preprocess(images), [LAYER])[LAYER])
    assert torch.allclose(plain, whole.before, atol=1e-5, rtol=1e-5)
    assert hooked.shape == whole.after.shape
    # vitatlas.intervene is the same function (the package is callable)
    again = vitatlas.intervene(model, d, images, edits=edits, max_activations=peak)
    assert torch.equal(again.after, whole.after)


def test_token_choices_edit_only_those_tokens(tiny, dictionaries):
    _, model = tiny
    d = dictionaries["dbksvd"]
    hidden = model.residual_streams(model.preprocess(_images(2, seed=4)), [LAYER])[LAYER]
    b, t, _ = hidden.shape
    patch_mask = np.zeros((b, t - 1), bool)
    patch_mask[0, [1, 5]] = True
    patch_mask[1, 0] = True
    for tokens, pm in (("cls", None), ("patches", None), ("all", None), ("all", patch_mask)):
        mask = token_mask(model, b, t, tokens, pm)
        new, _, _ = edit_hidden(hidden, mask, d, [Edit(0, "clamp", 50.0, relative=False)], None)
        changed = (new != hidden).any(-1)
        assert torch.equal(changed & ~mask, torch.zeros_like(mask))  # nothing outside the mask moves
        assert changed[mask].any()
    assert token_mask(model, b, t, "cls").sum() == b
    assert token_mask(model, b, t, "patches")[:, 0].sum() == 0
    assert token_mask(model, b, t, patch_mask=patch_mask).sum() == 3
    result = intervene(model, d, _images(2, seed=4), edits=[Edit(0, "ablate")], patch_mask=patch_mask)
    assert result.token_mask.sum() == 3 and result.edited_codes.shape == (2, t, d.n_atoms)
    assert (result.codes[~result.token_mask] == 0).all()


def test_apply_edits_matches_the_definitions():
    codes = torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, 0.5]])
    peak = torch.tensor([2.0, 10.0, 1.0])
    out = apply_edits(codes, as_edits([Edit(0, "ablate"), Edit(1, "scale", 0.5), Edit(2, "add", 1.0)]), peak)
    assert torch.equal(out, torch.tensor([[0.0, -1.0, 4.0], [0.0, 2.0, 1.5]]))
    out = apply_edits(codes, as_edits([{"atom": 1, "value": -2}, Edit(2, "clamp", 7.0, relative=False)]), peak)
    assert torch.equal(out, torch.tensor([[1.0, -20.0, 7.0], [0.0, -20.0, 7.0]]))
    assert torch.equal(codes, torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, 0.5]]))  # input untouched


def test_random_direction_keeps_the_norm_of_the_change(tiny, dictionaries):
    _, model = tiny
    d = dictionaries["dbksvd"]
    hidden = model.residual_streams(model.preprocess(_images(2, seed=8)), [LAYER])[LAYER]
    mask = token_mask(model, 2, hidden.shape[1], "patches")
    edit = [Edit(3, "clamp", -5.0, relative=False)]
    along_atom, _, _ = edit_hidden(hidden, mask, d, edit, None)
    u = torch.randn(model.width, generator=torch.Generator().manual_seed(0))
    along_u, _, _ = edit_hidden(hidden, mask, d, edit, None, direction=u)
    n_atom = (along_atom - hidden).norm(dim=-1)
    n_u = (along_u - hidden).norm(dim=-1)
    assert torch.allclose(n_atom, n_u, atol=1e-4)
    delta = (along_u - hidden)[mask]
    moved = delta.norm(dim=-1) > 0
    cos = torch.nn.functional.cosine_similarity(delta[moved], u.expand(int(moved.sum()), -1), dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)


def test_max_activations_is_a_streamed_max(dictionaries):
    d = dictionaries["dbksvd"]
    X = np.random.default_rng(0).normal(size=(300, d.d)).astype(np.float32)
    top, bottom = max_activations(d, X, batch_size=64)
    codes = d.encode(X).astype(np.float64)
    assert np.allclose(top, np.maximum(codes.max(0), 0)) and np.allclose(bottom, np.minimum(codes.min(0), 0))
    top50, _ = max_activations(d, X, max_rows=50, batch_size=64)
    assert np.allclose(top50, np.maximum(codes[:50].max(0), 0))


# ---- bad input --------------------------------------------------------------------------------------

def test_atom_out_of_range(tiny, dictionaries):
    _, model = tiny
    with pytest.raises(VitatlasError, match="atom 24 is out of range"):
        intervene(model, dictionaries["dbksvd"], _images(1), edits=[Edit(24, "ablate")])
    with pytest.raises(VitatlasError, match="out of range"):
        intervene(model, dictionaries["dbksvd"], _images(1), edits=[{"atom": -1, "value": 0}],
                  max_activations=np.ones(24))


def test_layer_the_dictionary_was_not_fitted_on(tiny, dictionaries):
    _, model = tiny
    with pytest.raises(VitatlasError, match="fitted on layer 1, not layer 2"):
        intervene(model, dictionaries["dbksvd"], _images(1), layer=2, edits=[Edit(0, "ablate")])
    with pytest.raises(VitatlasError, match="fitted on layer 1"):
        with intervention(model, dictionaries["dbksvd"], 0, [Edit(0, "ablate")]):
            pass


def test_nan_strength_and_missing_max(tiny, dictionaries):
    _, model = tiny
    with pytest.raises(VitatlasError, match="finite"):
        Edit(0, "clamp", float("nan"))
    with pytest.raises(VitatlasError, match="max observed activation"):
        intervene(model, dictionaries["dbksvd"], _images(1), edits=[Edit(0, "clamp", 2.0)])
    with pytest.raises(VitatlasError, match="unknown edit op"):
        Edit(0, "boost", 1.0)
    with pytest.raises(VitatlasError, match="one value per atom"):
        intervene(model, dictionaries["dbksvd"], _images(1), edits=[Edit(0, "clamp", 2.0)], max_activations=np.ones(3))


def test_probe_from_another_model_is_refused(tiny, tmp_path):
    _, model = tiny
    other = load(f"hf:{save_tiny_dinov2(tmp_path / 'other', seed=1)}")
    probe = LinearProbe.fit(torch.randn(20, other.width), torch.arange(20) % 2, task="classification",
                            class_names=["a", "b"], model=model_identity(other))
    with pytest.raises(VitatlasError, match="probe was trained on"):
        probe.check_model(model)
    probe.check_model(other)


def test_bad_images_and_masks(tiny, dictionaries):
    _, model = tiny
    d = dictionaries["dbksvd"]
    with pytest.raises(VitatlasError, match="PIL images or a"):
        intervene(model, d, "not images", edits=[Edit(0, "ablate")])
    with pytest.raises(VitatlasError, match="patch_mask must have shape"):
        intervene(model, d, _images(2), edits=[Edit(0, "ablate")], patch_mask=np.ones((2, 3), bool))
    with pytest.raises(VitatlasError, match="unknown tokens"):
        intervene(model, d, _images(1), edits=[Edit(0, "ablate")], tokens="register")


def test_max_activations_from_cards_treat_a_dead_atom_as_zero(tmp_path):
    from vitatlas.intervene.maxact import from_cards

    lines = [{"id": 0, "frequency": 0.1, "max_activation": 2.5},
             {"id": 1, "frequency": 0.0, "max_activation": None},  # dead: interpret writes null
             {"id": 2, "frequency": 0.3, "max_activation": 1.0}]
    (tmp_path / "atoms.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    np.testing.assert_array_equal(from_cards(tmp_path, 3), [2.5, 0.0, 1.0])
    lines[2]["max_activation"] = None  # fires but has no maximum: a damaged file, not a dead atom
    (tmp_path / "atoms.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(VitatlasError, match="line 3 has no numeric max_activation"):
        from_cards(tmp_path, 3)
