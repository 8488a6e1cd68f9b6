"""The streaming top-examples pass and the atom records, checked against slow float64 references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vitatlas
from vitatlas import ActivationStore, VitatlasError
from vitatlas.data.sources import open_source
from vitatlas.data.store import StoreWriter
from vitatlas.interpret import AtomCards
from vitatlas.interpret.api import _settings
from vitatlas.interpret.build import nearest_atoms
from vitatlas.interpret.images import load_images, transform_of
from vitatlas.interpret.top_examples import hist_edges, top_examples_pass
from vitatlas.models.preprocess import ImageTransform

N_IMAGES = 30


def fake_extract_store(path, *, tokens="patches", n_images=N_IMAGES, d=16, grid=4, layer=1, source="embedded:digits",
                       images_per_shard=8, seed=0, model_name="hf:tiny"):
    """A store laid out exactly as `vitatlas extract` writes one (manifest fields, row order, index,
    labels, whole images per shard), with random activations: no model needed, so tests stay fast."""
    src = open_source(source)
    transform = ImageTransform(size=grid * 7, resample="bicubic")
    positions = [0] if tokens == "cls" else list(range(1, grid * grid + 1))
    model = {"name": model_name, "revision": "r0", "n_layers": 3, "width": d, "image_size": grid * 7,
             "patch_size": 7, "n_prefix_tokens": 1, "family": "dinov2"}
    identity = {"model": model_name, "data": source, "layer": layer, "tokens": tokens}
    meta = {"model": model, "source": src.describe() | {"n_images_used": n_images}, "layer": layer,
            "tokens": tokens, "preprocessing": transform.describe(), "class_names": src.class_names,
            "token_positions": positions}
    writer = StoreWriter(path, d=d, dtype="float32", identity=identity, meta=meta, has_labels=src.has_labels)
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((8, d))
    P = len(positions)
    for start in range(0, n_images, images_per_shard):
        ids = np.arange(start, min(start + images_per_shard, n_images))
        mix = rng.random((ids.size * P, 8)) * (rng.random((ids.size * P, 8)) < 0.4)
        acts = (mix @ basis + 0.3 * rng.standard_normal((ids.size * P, d))).astype(np.float32)
        index = np.stack([np.repeat(ids, P), np.tile(positions, ids.size)], axis=1)
        writer.write_shard(acts, index, np.repeat([src.label(int(i)) for i in ids], P), n_images=ids.size)
    writer.finish(n_skipped=0)
    return ActivationStore(path)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A patch store (16 patches per image) and a CLS store over 30 digits, laid out as extract does."""
    root = tmp_path_factory.mktemp("interp") / "acts"
    fake_extract_store(root / "patches")
    fake_extract_store(root / "cls", tokens="cls", seed=1)
    return root


@pytest.fixture(scope="module")
def ksvd(tiny_store):
    # signed OMP codes (nonnegative=False): both sides get top lists
    return vitatlas.DBKSVD(n_atoms=24, k=3, seed=0, nonnegative=False).fit(ActivationStore(tiny_store / "patches"),
                                                                       progress=False)


def slow_reference(dictionary, store, top, rank, sign=1.0):
    """Top images per atom, the slow way: dense codes of every row, grouped per image in float64."""
    codes = sign * dictionary.encode(store.to_numpy()).astype(np.float64)
    ids = store.index[:, 0]
    images, first = np.unique(ids, return_index=True)
    P = store.n_rows // images.size
    per_image = codes.reshape(images.size, P, -1)
    peak = per_image.max(1)
    score = peak if rank == "max" else per_image.mean(1)
    out = []
    for a in range(codes.shape[1]):
        fired = np.nonzero(peak[:, a] > 0)[0]
        order = fired[np.argsort(-score[fired, a], kind="stable")][:top]
        out.append((images[order], score[order, a], per_image[order, :, a]))
    return codes, out


def assert_top_matches(ids, values, patch_values, reference, rtol=1e-5):
    for a, (ref_ids, ref_vals, ref_patches) in enumerate(reference):
        n = ref_ids.size
        assert (ids[a] >= 0).sum() == n
        np.testing.assert_allclose(values[a][:n], ref_vals, rtol=rtol, atol=1e-6)
        # ids must agree wherever the reference order is not a near-tie
        gaps = np.diff(ref_vals)
        clear = np.ones(n, bool)
        clear[:-1] &= np.abs(gaps) > 1e-4
        clear[1:] &= np.abs(gaps) > 1e-4
        np.testing.assert_array_equal(ids[a][:n][clear], ref_ids[clear])
        if patch_values is not None:  # kept as float16
            np.testing.assert_allclose(patch_values[a][:n][clear], ref_patches[clear], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("rank", ["max", "mean"])
def test_top_lists_and_statistics_match_the_slow_reference(tiny_store, ksvd, rank):
    store = ActivationStore(tiny_store / "patches")
    cards = vitatlas.interpret(ksvd, store, top=5, rank=rank, progress=False, images=False)
    t = {k: v.numpy() for k, v in cards.tensors.items()}
    assert cards.meta["signed"] and t["patch_values"].shape == (24, 5, 16)
    codes, ref = slow_reference(ksvd, store, 5, rank)
    assert_top_matches(t["image_ids"], t["values"], t["patch_values"], ref)
    _, neg_ref = slow_reference(ksvd, store, 5, rank, sign=-1.0)
    assert_top_matches(t["neg_image_ids"], t["neg_values"], t["neg_patch_values"], neg_ref)

    edges = hist_edges()
    for a in range(24):
        rec = cards.atom(a)
        for side, c in ((rec, codes[:, a]), (rec["negative"], -codes[:, a])):
            on = c[c > 0]
            assert side["frequency"] == pytest.approx(on.size / c.size)
            if on.size:
                assert side["mean_activation"] == pytest.approx(on.mean(), rel=1e-5)
                assert side["max_activation"] == pytest.approx(on.max(), rel=1e-5)
                counts, _ = np.histogram(np.clip(on, edges[0], edges[-1]), bins=edges)
                nz = np.nonzero(counts)[0]
                assert side["histogram"]["counts"] == counts[nz[0]:nz[-1] + 1].tolist()
                assert side["histogram"]["edges"] == pytest.approx(edges[nz[0]:nz[-1] + 2].tolist())
        assert [r["image"] for r in rec["top_images"]] == t["image_ids"][a][t["image_ids"][a] >= 0].tolist()
        vals = [r["value"] for r in rec["top_images"]]
        assert vals == sorted(vals, reverse=True)


def test_top1_image_is_where_encode_gives_the_largest_activation(tiny_store, ksvd):
    """Done-when check: the recorded top-1 image holds the row with the atom's largest code."""
    store = ActivationStore(tiny_store / "patches")
    cards = vitatlas.interpret(ksvd, store, top=3, progress=False, images=False)
    codes = ksvd.encode(store.to_numpy())
    image_of_row = store.index[:, 0]
    rng = np.random.default_rng(0)
    for a in rng.choice(24, size=10, replace=False):
        best_row = int(np.argmax(codes[:, a]))
        rec = cards.atom(int(a))
        assert rec["top_images"][0]["image"] == image_of_row[best_row]
        assert rec["top_images"][0]["value"] == pytest.approx(float(codes[best_row, a]), rel=1e-5)
        assert rec["max_activation"] == pytest.approx(float(codes[best_row, a]), rel=1e-5)


def test_images_split_across_chunks_and_nonnegative_codes(tiny_store):
    """Chunks of 7 rows cut every 16-row image; an SAE's codes are >= 0 so there is no negative side."""
    store = ActivationStore(tiny_store / "patches")
    sae = vitatlas.SAE(kind="topk", n_latents=16, k=4, seed=0).fit(store, progress=False)
    s = _settings(sae, store, 4, "max", 16, 0)
    assert not s.signed
    s.chunk_rows = 7
    state = top_examples_pass(sae, store, s, progress=False)
    _, ref = slow_reference(sae, store, 4, "max")
    assert_top_matches(state["pos.image_ids"].T.numpy(), state["pos.values"].T.numpy(),
                       state["pos.patch_values"].numpy(), ref)
    assert "neg.values" not in state


def test_resume_after_an_interruption_gives_the_same_cards(tiny_store, ksvd, tmp_path):
    store = ActivationStore(tiny_store / "patches")
    full_settings = _settings(ksvd, store, 4, "max", 24, 0)
    full_settings.chunk_rows = 48
    full = top_examples_pass(ksvd, store, full_settings, progress=False)

    calls = {"n": 0}
    real_encode = ksvd.encode

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_encode(x)

    ksvd.encode = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            top_examples_pass(ksvd, store, full_settings, progress=False, checkpoint_dir=tmp_path,
                              checkpoint_seconds=0)
    finally:
        del ksvd.encode
    assert (tmp_path / "top-state.safetensors").is_file()
    calls["n"] = 0
    resumed = top_examples_pass(ksvd, store, full_settings, progress=False, checkpoint_dir=tmp_path)
    for key in full:
        if key.endswith(".total"):
            torch.testing.assert_close(resumed[key], full[key], rtol=1e-9, atol=1e-9)
        else:
            torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    other = _settings(ksvd, store, 5, "max", 24, 0)  # another --top must not reuse this checkpoint
    with pytest.raises(VitatlasError, match="another run, store or settings"):
        top_examples_pass(ksvd, store, other, progress=False, checkpoint_dir=tmp_path)


def test_cls_store_class_labels_and_nearest_atoms(tiny_store):
    store = ActivationStore(tiny_store / "cls")
    d = vitatlas.DBKSVD(n_atoms=12, k=2, seed=1).fit(store, progress=False)
    cards = vitatlas.interpret(d, store, top=6, progress=False, images=False)
    assert "patch_values" not in cards.tensors and cards.meta["patch_grid"] is None
    labels = store.labels  # one row per image in a CLS store
    prior = np.bincount(labels) / labels.size
    act = np.abs(d.encode(torch.from_numpy(store.rows(np.arange(store.n_rows)))).numpy())
    for a in range(12):
        rec = cards.atom(a)
        assert rec["top_patches"] == []
        # the shared definition: the label comes from the 32 images of largest |code|, not the 6 shown
        fired = np.flatnonzero(act[:, a] > 0)
        top = store.index[fired[np.argsort(-act[fired, a], kind="stable")][:32], 0]
        if len(top) < 5:
            assert rec["labels"] == []
            continue
        p = np.bincount(labels[top], minlength=prior.size) / len(top)
        best = int(np.argmax(p - prior))
        lab = rec["labels"][0]
        assert lab["label_id"] == best and lab["label"] == store.class_names[best]
        assert lab["precision"] == pytest.approx(p[best])
        assert lab["kappa"] == pytest.approx((p[best] - prior[best]) / (1 - prior[best]))
        assert rec["descriptions"][0]["kind"] == "class" and rec["descriptions"][0]["score"] == lab["kappa"]
    D = d.atoms.double().numpy()
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    cos = D @ D.T
    np.fill_diagonal(cos, -np.inf)
    ids, vals = nearest_atoms(d.atoms, 12)
    np.testing.assert_array_equal(ids, np.argsort(-cos, axis=1)[:, :5])
    np.testing.assert_allclose(vals, np.sort(cos, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-6)


def test_load_images_returns_the_model_input_crop(tiny_store):
    store = ActivationStore(tiny_store / "patches")
    got = load_images(store, [3, 0])
    src = open_source("embedded:digits")
    for image, i in zip(got, [3, 0]):
        want = transform_of(store).resize(src.load(i))
        assert image.size == (28, 28) and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(want))


def test_cards_save_load_and_atom_out_of_range(tiny_store, ksvd, tmp_path):
    store = ActivationStore(tiny_store / "patches")
    cards = vitatlas.interpret(ksvd, store, top=4, max_atoms=6, progress=False)
    assert cards.n_atoms == 6 and cards.meta["run"]["n_atoms"] == 24
    cards.save(tmp_path / "c", progress=False)
    back = AtomCards.load(tmp_path / "c")
    assert back.atoms == [json.loads(json.dumps(a)) for a in cards.atoms]
    assert back.meta["complete"] and back.has_images
    for bad in (6, -1, 100):
        with pytest.raises(VitatlasError, match="out of range"):
            back.atom(bad)
    with pytest.raises(VitatlasError, match="integer"):
        back.atom("3")
    for a in range(6):
        assert (tmp_path / "c" / f"cards/atom-{a:05d}.png").is_file()
        for r in back.atom(a)["top_images"]:
            assert (tmp_path / "c" / f"images/image-{r['image']:07d}.png").is_file()
    np.testing.assert_allclose(back.max_activations(), [a["max_activation"] or 0 for a in cards.atoms])


def test_callable_package_and_importable_submodules():
    import importlib

    assert callable(vitatlas.interpret)
    assert importlib.import_module("vitatlas.interpret.images").load_images is load_images
    assert vitatlas.interpret.interpret is importlib.import_module("vitatlas.interpret.api").interpret
    with pytest.raises(VitatlasError, match="fitted vitatlas Dictionary"):
        vitatlas.interpret("not a dictionary", "nowhere")


def test_bad_arguments(tiny_store, ksvd):
    store = ActivationStore(tiny_store / "patches")
    for top in (0, -3, 2.5, True):
        with pytest.raises(VitatlasError, match="top must be an integer"):
            vitatlas.interpret(ksvd, store, top=top, progress=False)
    with pytest.raises(VitatlasError, match="unknown rank"):
        vitatlas.interpret(ksvd, store, rank="median", progress=False)
    with pytest.raises(VitatlasError, match="max_atoms"):
        vitatlas.interpret(ksvd, store, max_atoms=0, progress=False)


def test_heatmap_alpha_is_value_over_the_atoms_maximum():
    from vitatlas.interpret.render import MAX_ALPHA, THUMB, _lut, heatmap_card, overlay

    thumbs = np.full((2, 8, 8, 3), 100, np.uint8)
    heat = np.zeros((2, 2, 2))
    heat[0, 0, 1] = 1.0
    heat[1, 1, 0] = 0.5
    got = overlay(thumbs, heat).astype(np.float64)
    lut = _lut().astype(np.float64)
    np.testing.assert_allclose(got[0, :4, 4:], np.broadcast_to(100 * (1 - MAX_ALPHA) + lut[255] * MAX_ALPHA, (4, 4, 3)),
                               atol=1)
    a = MAX_ALPHA * 0.5
    np.testing.assert_allclose(got[1, 4:, :4], np.broadcast_to(100 * (1 - a) + lut[127] * a, (4, 4, 3)), atol=1)
    np.testing.assert_array_equal(got[0, 4:], 100)  # zero activation: the image is untouched
    # on a card the scale is the maximum over all its images: the weaker image gets alpha 0.8 * 1/2
    pv = np.array([[0, 2.0, 0, 0], [1.0, 0, 0, 0]], np.float32)
    card = np.asarray(heatmap_card([np.full((THUMB, THUMB, 3), 100, np.uint8)] * 2, np.array([2.0, 1.0]),
                                   np.array([5, 9]), pv, np.arange(4), (2, 2), "t"))
    from vitatlas.interpret.render import HEADER_H
    half = THUMB // 2
    np.testing.assert_allclose(card[HEADER_H + 1, THUMB + 1], 100 * (1 - a) + lut[127] * a, atol=1)
    np.testing.assert_allclose(card[HEADER_H + 1, half + 1], 100 * (1 - MAX_ALPHA) + lut[255] * MAX_ALPHA, atol=1)


def test_streamed_safetensors_read_back_by_the_reference_reader(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vitatlas.interpret.tensorfile import save_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"patch_values": torch.randn(3, 4, 5, generator=g).half(), "image_ids": torch.arange(12).reshape(3, 4),
               "values": torch.randn(7, generator=g), "empty": torch.zeros(0, 2), "t": torch.randn(4, 3).T}
    save_safetensors(tmp_path / "x.safetensors", tensors, metadata={"rows_done": "17"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"rows_done": "17"}
