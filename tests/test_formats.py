"""Importing other libraries' SAEs: each test writes a checkpoint in the library's documented layout
(tiny random tensors, non-zero biases), imports it, and compares vitatlas's codes and reconstructions
with an independent float64 numpy forward of that library's recipe (docs/formats.md).

Tolerance: vitatlas computes in float32 and the reference in float64, on values of order 1 with d <= 16,
so each product carries a relative error of a few float32 ulps; 1e-5 relative (of the largest value)
bounds that with room and is the issue's criterion. Selections (top-k, thresholds, matching pursuit's
argmax) are compared exactly: with these seeds no two candidates lie within that error of each other.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitatlas
from vitatlas.errors import VitatlasError
from vitatlas.formats import import_sae

D, N = 12, 48
RTOL = 1e-5


def rand(*shape, seed, scale=1.0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape) * scale).float()


def X(n=40, seed=99, shift=0.5):
    return (np.random.default_rng(seed).standard_normal((n, D)) * 2 + shift).astype(np.float32)


def close(got, want):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=RTOL * max(1.0, np.abs(want).max()))


def same_support(got, want):
    assert np.array_equal(np.asarray(got) != 0, np.asarray(want) != 0)


def np64(t):
    return t.double().numpy()


def relu(a):
    return np.maximum(a, 0)


def topk_mask(pre, k):
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(pre, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


# ---- SAELens ----------------------------------------------------------------------------------------

def saelens_tensors(arch, seed=0):
    t = {"W_dec": rand(N, D, seed=seed, scale=0.3), "b_dec": rand(D, seed=seed + 1, scale=0.5)}
    if arch != "matching_pursuit":
        t["W_enc"] = rand(D, N, seed=seed + 2, scale=0.3)
    if arch == "gated":
        t.update(b_gate=rand(N, seed=seed + 3, scale=0.2), r_mag=rand(N, seed=seed + 4, scale=0.2),
                 b_mag=rand(N, seed=seed + 5, scale=0.2))
    elif arch != "matching_pursuit":
        t["b_enc"] = rand(N, seed=seed + 3, scale=0.2)
    if arch == "jumprelu":
        t["threshold"] = rand(N, seed=seed + 6, scale=0.3).abs()
    if arch == "batchtopk":
        t["topk_threshold"] = torch.tensor(0.4, dtype=torch.float64)
    if arch == "matching_pursuit":
        t["W_dec"] = t["W_dec"] / t["W_dec"].norm(dim=1, keepdim=True)
    return t


def write_saelens(path, arch, tensors, **cfg):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "sae_weights.safetensors"))
    base = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
            "metadata": {"sae_lens_version": "6.5.0", "model_name": "hf:tiny", "hook_name": "blocks.1.hook_resid_post"}}
    (path / "cfg.json").write_text(json.dumps(base | cfg))
    return path


def ref_matching_pursuit(xc, W, threshold, max_it, stop_dup):
    out = np.zeros((xc.shape[0], W.shape[0]))
    for i, r in enumerate(xc):
        r, acts, prev = r.copy(), np.zeros(W.shape[0]), np.zeros(W.shape[0], bool)
        for _ in range(max_it):
            j = int(np.argmax(relu(W @ r)))
            v = max(0.0, float(r @ W[j]))
            acts[j] += v
            r = r - v * W[j]
            support = acts != 0
            if stop_dup and np.array_equal(support, prev):
                break
            prev = support
            if threshold > 0 and np.linalg.norm(r) < threshold:
                break
        out[i] = acts
    return out


def ref_saelens(cfg, t, x):
    """SAELens 6: process_sae_in (run-time norm, - b_dec·apply), the architecture's encode, decode, norm out."""
    t = {k: np64(v) for k, v in t.items()}
    x = x.astype(np.float64)
    arch, norm, apply = cfg["architecture"], cfg.get("normalize_activations", "none"), cfg.get("apply_b_dec_to_input", True)
    sf = cfg.get("_scaling_factor")
    if sf is not None:  # fold_activation_norm_scaling_factor (an MP SAE's W_enc is W_dec's view: W_dec unchanged)
        t["b_dec"] = t["b_dec"] / sf
        if arch != "matching_pursuit":
            t["W_dec"], t["W_enc"] = t["W_dec"] / sf, t["W_enc"] * sf
    inv = lambda y: y  # noqa: E731
    if norm == "constant_norm_rescale":
        coeff = np.sqrt(D) / np.linalg.norm(x, axis=1, keepdims=True)
        x, inv = x * coeff, (lambda y: y / coeff)
    elif norm == "layer_norm":
        mu = x.mean(axis=1, keepdims=True)
        std = (x - mu).std(axis=1, ddof=1, keepdims=True)
        x, inv = (x - mu) / (std + 1e-5), (lambda y: y * std + mu)
    sae_in = x - t["b_dec"] * apply
    W_dec = t["W_dec"]
    if arch == "matching_pursuit":
        thr = cfg.get("residual_threshold", 1e-2) / (sf or 1.0)
        z = ref_matching_pursuit(sae_in, W_dec, thr, cfg.get("max_iterations") or D, cfg.get("stop_on_duplicate_support", True))
        return z, inv(z @ W_dec + (t["b_dec"] if apply else 0))
    if arch == "gated":
        lin = sae_in @ t["W_enc"]
        z = (lin + t["b_gate"] > 0) * relu(sae_in @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"])
        return z, inv(z @ W_dec + t["b_dec"])
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    norms = np.linalg.norm(W_dec, axis=1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", arch in ("batchtopk", "matryoshka_batchtopk"))  # the training configs default to True
    if rescale:
        pre = pre * norms
    if arch == "standard":
        z = relu(pre)
    elif arch == "topk":
        z = relu(pre) * topk_mask(pre, cfg["k"])
    else:
        thr = t["threshold"] if arch == "jumprelu" else float(t["topk_threshold"])
        z = relu(pre) * (pre > thr)
    acts = z / norms if rescale else z
    return z, inv(acts @ W_dec + t["b_dec"])


SAELENS_CASES = {
    "standard": ("standard", {}),
    "topk": ("topk", {"k": 5}),
    "topk-no-b_dec": ("topk", {"k": 5, "apply_b_dec_to_input": False}),
    "topk-rescaled": ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    "jumprelu": ("jumprelu", {}),
    "gated": ("gated", {}),
    "batchtopk": ("batchtopk", {"k": 4}),
    "batchtopk-not-rescaled": ("batchtopk", {"k": 4, "rescale_acts_by_decoder_norm": False}),
    "matryoshka_batchtopk": ("batchtopk", {"k": 4, "architecture": "matryoshka_batchtopk"}),
    "matching_pursuit": ("matching_pursuit", {"residual_threshold": 0.5, "max_iterations": 6}),
    "matching_pursuit-no-b_dec": ("matching_pursuit", {"residual_threshold": 0.0, "apply_b_dec_to_input": False,
                                                       "stop_on_duplicate_support": False, "max_iterations": 5}),
    "constant_norm_rescale": ("standard", {"normalize_activations": "constant_norm_rescale"}),
    "layer_norm": ("topk", {"k": 6, "normalize_activations": "layer_norm"}),
}


@pytest.mark.parametrize("case", sorted(SAELENS_CASES))
def test_saelens_v6_matches_the_recipe(tmp_path, case):
    arch, cfg = SAELENS_CASES[case]
    tensors = saelens_tensors(arch)
    write_saelens(tmp_path / case, arch, tensors, **cfg)
    sae = vitatlas.load(tmp_path / case)
    assert isinstance(sae, vitatlas.Dictionary) and sae.learner == "imported" and sae.n_atoms == N and sae.d == D
    x = X()
    want_z, want_x = ref_saelens({"architecture": arch} | cfg, tensors, x)
    z = sae.encode(x)
    same_support(z, want_z)
    close(z, want_z)
    close(sae.reconstruct(x), want_x)
    close(sae.decode(z), want_x)  # decode right after encoding the same rows
    assert (z != 0).any() and (z == 0).any()


def test_saelens_expected_average_only_in_folds_the_scaling_factor(tmp_path):
    tensors = saelens_tensors("topk")
    write_saelens(tmp_path / "s", "topk", tensors, k=5, normalize_activations="expected_average_only_in")
    x = X()
    folded = import_sae(tmp_path / "s", scaling_factor=2.5)
    want_z, want_x = ref_saelens({"architecture": "topk", "k": 5, "_scaling_factor": 2.5}, tensors, x)
    close(folded.encode(x), want_z)
    close(folded.reconstruct(x), want_x)
    # without the factor SAELens's own load_from_disk applies no normalisation: neither does vitatlas
    plain = import_sae(tmp_path / "s")
    close(plain.encode(x), ref_saelens({"architecture": "topk", "k": 5}, tensors, x)[0])
    assert plain.source["scaling_factor"] is None and folded.source["scaling_factor"] == 2.5
    mp = saelens_tensors("matching_pursuit")
    write_saelens(tmp_path / "mp", "matching_pursuit", mp, residual_threshold=1.5,
                  normalize_activations="expected_average_only_in")
    cfg = {"architecture": "matching_pursuit", "residual_threshold": 1.5, "_scaling_factor": 0.5}
    want_z, want_x = ref_saelens(cfg, mp, x)
    got = import_sae(tmp_path / "mp", scaling_factor=0.5)
    close(got.encode(x), want_z)
    close(got.reconstruct(x), want_x)


def test_saelens_pre_6_flat_config(tmp_path):
    tensors = saelens_tensors("topk")
    path = tmp_path / "old"
    path.mkdir()
    save_file(tensors, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({
        "d_in": D, "d_sae": N, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
        "hook_point": "blocks.7.hook_resid_post", "model_name": "openai/clip", "normalize_activations": False,
        "sae_lens_version": "3.1.0"}))
    sae = vitatlas.load(path)
    assert sae.source["architecture"] == "topk" and sae.fit_info["layer"] == 7 and sae.fit_info["model"] == "openai/clip"
    x = X()
    want_z, want_x = ref_saelens({"architecture": "topk", "k": 3}, tensors, x)
    close(sae.encode(x), want_z)
    close(sae.reconstruct(x), want_x)


def test_row_dependent_decode_needs_the_rows_just_encoded(tmp_path):
    write_saelens(tmp_path / "s", "standard", saelens_tensors("standard"), normalize_activations="layer_norm")
    sae = vitatlas.load(tmp_path / "s")
    z = sae.encode(X(10))
    with pytest.raises(VitatlasError, match="depends on the input rows"):
        sae.decode(z[:3])
    fresh = vitatlas.load(tmp_path / "s")
    with pytest.raises(VitatlasError, match="normalize_activations=layer_norm"):
        fresh.decode(z)


# ---- ViT-Prisma -------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_prisma_matches_its_forward(tmp_path, activation):
    t = saelens_tensors("standard", seed=3)
    torch.save(t, tmp_path / "weights.pt")
    cfg = {"d_in": D, "d_sae": N, "activation_fn_str": activation, "activation_fn_kwargs": {"k": 4} if activation == "topk" else {},
           "normalize_activations": None, "model_name": "open-clip:laion/CLIP-ViT-B-32", "hook_point_layer": 9,
           "hook_point": "blocks.9.hook_mlp_out"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sae = vitatlas.load(tmp_path)
    assert sae.source["format"] == "prisma" and sae.fit_info["layer"] == 9
    x = X()
    T = {k: np64(v) for k, v in t.items()}
    pre = (x - T["b_dec"]) @ T["W_enc"] + T["b_enc"]  # ViT-Prisma always subtracts b_dec
    z = relu(pre) if activation == "relu" else relu(pre) * topk_mask(pre, 4)
    close(sae.encode(x), z)
    close(sae.reconstruct(x), z @ T["W_dec"] + T["b_dec"])


# ---- saev -------------------------------------------------------------------------------------------

def write_saev(path, header, t):
    with open(path, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        torch.save(t, f)
    return path


def saev_tensors(seed=5):
    return {"W_enc": rand(D, 2 * D, seed=seed, scale=0.3), "b_enc": rand(2 * D, seed=seed + 1, scale=0.2),
            "W_dec": rand(2 * D, D, seed=seed + 2, scale=0.3), "b_dec": rand(D, seed=seed + 3, scale=0.5)}


def test_saev_paper_era_with_its_data_normalisation(tmp_path):
    t = saev_tensors()
    path = write_saev(tmp_path / "sae.pt", {"d_vit": D, "exp_factor": 2, "sparsity_coeff": 4e-4, "seed": 0,
                                            "n_reinit_samples": 10, "ghost_grads": False}, t)
    mean = np.random.default_rng(1).standard_normal(D)
    np.save(tmp_path / "mean.npy", mean)
    torch.save(torch.tensor(3.5), tmp_path / "scalar.pt")
    sae = import_sae(tmp_path, scale_mean=tmp_path / "mean.npy", scale_norm=str(tmp_path / "scalar.pt"))
    assert sae.source["format"] == "saev" and sae.source["schema"] is None
    x = X()
    T = {k: np64(v) for k, v in t.items()}
    xn = (x - mean) / 3.5
    z = relu((xn - T["b_dec"]) @ T["W_enc"] + T["b_enc"])  # saev 0.1's forward subtracts b_dec
    close(sae.encode(x), z)
    close(sae.reconstruct(x), (z @ T["W_dec"] + T["b_dec"]) * 3.5 + mean)
    assert vitatlas.load(path).source["scale_norm"] == 1.0  # no options: the SAE reads normalised data as is


@pytest.mark.parametrize("header", [
    {"schema": 2, "cfg": {"d_vit": D, "exp_factor": 2, "activation": {"cls": "TopK", "params": {"top_k": 5}}}},
    {"schema": 1, "cls": "BatchTopK", "cfg": {"d_vit": D, "exp_factor": 2, "top_k": 5}},
    {"schema": 1, "cls": "SparseAutoencoderConfig",
     "cfg": {"d_vit": D, "exp_factor": 2, "activation": {"cls": "Relu", "params": {}}}},
], ids=["schema2-topk", "schema1a-batchtopk", "schema1b-relu"])
def test_saev_later_schemas(tmp_path, header):
    t = saev_tensors(seed=8)
    t["b_enc"] = t["b_enc"] - 1.5  # most pre-activations negative, so TopK keeps some negative values
    sae = import_sae(write_saev(tmp_path / "sae.pt", header, t), scale_norm=2.0)
    x = X()
    T = {k: np64(v) for k, v in t.items()}
    pre = (x / 2.0) @ T["W_enc"] + T["b_enc"]  # later saev: no b_dec subtraction
    relu_sae = "Relu" in json.dumps(header)
    z = relu(pre) if relu_sae else pre * topk_mask(pre, 5)  # TopK / BatchTopK keep the raw values
    if not relu_sae:
        assert (z < 0).any(), "the test should exercise negative top-k values"
    close(sae.encode(x), z)
    close(sae.reconstruct(x), (z @ T["W_dec"] + T["b_dec"]) * 2.0)


# ---- sparsify -------------------------------------------------------------------------------------

def write_sparsify(path, t, **cfg):
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae.safetensors"))
    base = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": 4,
            "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    (path / "cfg.json").write_text(json.dumps(base | cfg))
    return path


@pytest.mark.parametrize("activation,skip", [("topk", False), ("topk", True), ("groupmax", False)])
def test_sparsify_matches_its_forward(tmp_path, activation, skip):
    t = {"encoder.weight": rand(N, D, seed=11, scale=0.3), "encoder.bias": rand(N, seed=12, scale=0.2),
         "W_dec": rand(N, D, seed=13, scale=0.3), "b_dec": rand(D, seed=14, scale=0.5)}
    if skip:
        t["W_skip"] = rand(D, D, seed=15, scale=0.1)
    path = write_sparsify(tmp_path / "layers.6", t, activation=activation, skip_connection=skip)
    sae = vitatlas.load(path)
    assert sae.fit_info["layer"] == 6
    x = X()
    T = {k: np64(v) for k, v in t.items()}
    pre = relu((x - T["b_dec"]) @ T["encoder.weight"].T + T["encoder.bias"])
    if activation == "topk":
        z = pre * topk_mask(pre, 4)
    else:
        groups = pre.reshape(len(x), 4, N // 4)
        z = (groups == groups.max(axis=2, keepdims=True)).reshape(len(x), N) * pre
    want = z @ T["W_dec"] + T["b_dec"] + (x @ T["W_skip"].T if skip else 0)
    close(sae.encode(x), z)
    close(sae.reconstruct(x), want)


# ---- dictionary_learning -------------------------------------------------------------------------------

def write_dl(path, cls, t, **trainer):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(t, path / "ae.pt")
    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "activation_dim": D, "dict_size": N,
                                                              "lm_name": "google/gemma-2-2b", "layer": 12, **trainer},
                                                  "buffer": {"d_submodule": D}}))
    return path


def test_dictionary_learning_autoencoder_is_loaded_as_from_pretrained_does(tmp_path):
    t = {"bias": rand(D, seed=20, scale=0.5), "encoder.weight": rand(N, D, seed=21, scale=0.3),
         "encoder.bias": rand(N, seed=22, scale=0.2), "decoder.weight": rand(D, N, seed=23, scale=0.3)}
    sae = vitatlas.load(write_dl(tmp_path / "ae", "AutoEncoder", t))
    assert sae.fit_info["model"] == "google/gemma-2-2b" and sae.fit_info["layer"] == 12
    x = X()
    T = {k: np64(v) for k, v in t.items()}
    f = relu((x - T["bias"]) @ T["encoder.weight"].T + T["encoder.bias"])
    norms = np.linalg.norm(T["decoder.weight"], axis=0)
    close(sae.encode(x), f * norms)  # from_pretrained's normalize_decoder: unit columns, codes times the norms
    close(sae.reconstruct(x), f @ T["decoder.weight"].T + T["bias"])


@pytest.mark.parametrize("cls", ["AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"])
def test_dictionary_learning_sparse_classes(tmp_path, cls):
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        t = {"encoder.weight": rand(N, D, seed=30, scale=0.3), "encoder.bias": rand(N, seed=31, scale=0.2),
             "decoder.weight": rand(D, N, seed=32, scale=0.3), "b_dec": rand(D, seed=33, scale=0.5),
             "k": torch.tensor(5, dtype=torch.int), "threshold": torch.tensor(0.3)}
    else:
        t = {"W_enc": rand(D, N, seed=34, scale=0.3), "b_enc": rand(N, seed=35, scale=0.2),
             "W_dec": rand(N, D, seed=36, scale=0.3), "b_dec": rand(D, seed=37, scale=0.5)}
        t["threshold"] = (rand(N, seed=38, scale=0.3).abs() if cls == "JumpReluAutoEncoder" else torch.tensor(0.3))
        if cls == "MatryoshkaBatchTopKSAE":
            t.update(k=torch.tensor(5, dtype=torch.int), group_sizes=torch.tensor([8, 16, 24]))
    sae = vitatlas.load(write_dl(tmp_path / cls, cls, t))
    x = X()
    T = {k: np64(v) for k, v in t.items()}
    if "encoder.weight" in T:
        W_enc, b_enc, W_dec = T["encoder.weight"].T, T["encoder.bias"], T["decoder.weight"].T
    else:
        W_enc, b_enc, W_dec = T["W_enc"], T["b_enc"], T["W_dec"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ W_enc + b_enc  # apply_b_dec_to_input is False
        z = relu(pre * (pre > T["threshold"]))
    else:
        post = relu((x - T["b_dec"]) @ W_enc + b_enc)
        z = post * topk_mask(post, 5) if cls == "AutoEncoderTopK" else post * (post > T["threshold"])
    close(sae.encode(x), z)
    close(sae.reconstruct(x), z @ W_dec + T["b_dec"])


# ---- overcomplete ---------------------------------------------------------------------------------

def overcomplete_state(jump=False):
    t = {"encoder.final_block.0.weight": rand(N, D, seed=40, scale=0.3), "encoder.final_block.0.bias": rand(N, seed=41, scale=0.2),
         "dictionary._weights": rand(N, D, seed=42), "dictionary.multiplier": torch.tensor(0.3)}
    if jump:
        t["thresholds"] = rand(N, seed=43, scale=0.5) - 1.0
    return t


@pytest.mark.parametrize("kind,extra", [("relu", {}), ("topk", {"k": 4}), ("batchtopk", {"threshold": 0.25}),
                                        ("jump", {})])
def test_overcomplete_state_dicts(tmp_path, kind, extra):
    t = overcomplete_state(jump=kind == "jump")
    torch.save(t, tmp_path / "sae.pt")
    sae = vitatlas.load(tmp_path / "sae.pt", format="overcomplete", kind=kind, **extra)
    x = X()
    T = {k: np64(v) for k, v in t.items()}
    codes = relu(x @ T["encoder.final_block.0.weight"].T + T["encoder.final_block.0.bias"])
    if kind == "topk":
        codes = codes * topk_mask(codes, 4)
    elif kind == "batchtopk":
        codes = codes * (codes >= 0.25)
    elif kind == "jump":
        codes = codes * (codes >= np.exp(T["thresholds"]))
    w = T["dictionary._weights"]
    dictionary = w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-8) * np.exp(0.3)
    close(sae.encode(x), codes)
    close(sae.reconstruct(x), codes @ dictionary)


# ---- runs, detection, errors ------------------------------------------------------------------------

def test_imported_sae_saves_and_loads_as_a_vitatlas_run(tmp_path):
    write_saelens(tmp_path / "s", "gated", saelens_tensors("gated"))
    sae = vitatlas.load(tmp_path / "s", model="hf:tiny", tokens="patches")
    run = sae.save(tmp_path / "run")
    again = vitatlas.dictionary.load(run)  # the plain run loader resolves the "imported" learner
    x = X()
    assert again.learner == "imported" and again.fit_info == sae.fit_info
    np.testing.assert_array_equal(again.encode(x), sae.encode(x))  # same tensors, same computation
    np.testing.assert_array_equal(vitatlas.load(run).reconstruct(x), sae.reconstruct(x))
    atoms = again.atoms.numpy()
    np.testing.assert_allclose(np.linalg.norm(atoms, axis=1), 1, rtol=1e-6)
    with pytest.raises(VitatlasError, match="does not train it further"):
        again.fit(x)


def test_hf_cache_resolution(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--owner--saes" / "snapshots" / "abc123"
    write_saelens(snap / "blocks.1.hook_resid_post", "standard", saelens_tensors("standard"))
    (tmp_path / "hub" / "models--owner--saes" / "refs").mkdir()
    (tmp_path / "hub" / "models--owner--saes" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sae = vitatlas.load("hf:owner/saes/blocks.1.hook_resid_post")
    assert sae.source["architecture"] == "standard"
    with pytest.raises(VitatlasError, match="not in the local Hugging Face cache"):
        vitatlas.load("hf:owner/other")
    with pytest.raises(VitatlasError, match="has no blocks.2"):
        vitatlas.load("hf:owner/saes/blocks.2.hook_resid_post")
    with pytest.raises(VitatlasError, match="holds 1 SAE folders"):
        vitatlas.load("hf:owner/saes")


def _one_line(exc):
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("change,match", [
    ({"architecture": "transcoder"}, "unknown SAELens architecture 'transcoder'"),
    ({"normalize_activations": "covariance_whitening"}, "normalize_activations 'covariance_whitening'"),
    ({"d_sae": N + 1}, "tensor 'W_dec' .* has shape"),
    ({"d_in": "twelve"}, "field 'd_in' must be a positive integer"),
    ({"reshape_activations": "hook_z"}, "reads attention head outputs"),
])
def test_bad_saelens_configs(tmp_path, change, match):
    write_saelens(tmp_path / "s", "standard", saelens_tensors("standard"), **change)
    with pytest.raises(VitatlasError, match=match) as exc:
        vitatlas.load(tmp_path / "s")
    _one_line(exc)


@pytest.mark.parametrize("damage,match", [
    (lambda t: t.pop("b_enc"), "has no tensor 'b_enc'"),
    (lambda t: t.update(W_enc=t["W_enc"][:, :-1].contiguous()), "tensor 'W_enc' .* has shape \\(12, 47\\), expected \\(12, 48\\)"),
    (lambda t: t["W_dec"].__setitem__((3, 2), float("nan")), "tensor 'W_dec' .* NaN"),
    (lambda t: t["b_dec"].__setitem__(0, float("inf")), "tensor 'b_dec' .* NaN or infinite"),
])
def test_damaged_tensors_name_the_field(tmp_path, damage, match):
    t = saelens_tensors("standard")
    damage(t)
    write_saelens(tmp_path / "s", "standard", t)
    with pytest.raises(VitatlasError, match=match) as exc:
        vitatlas.load(tmp_path / "s")
    _one_line(exc)


class PickledConfig:
    """Stands for a pickled config class (ViT-Prisma's {'cfg': cfg, 'state_dict': ...} checkpoints)."""


def test_a_file_needing_more_than_weights_only_is_refused(tmp_path):
    torch.save({"cfg": PickledConfig(), "state_dict": saelens_tensors("standard")}, tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text(json.dumps({"d_in": D, "d_sae": N}))
    with pytest.raises(VitatlasError, match="PickledConfig.*weights_only=True.*state_dict") as exc:
        vitatlas.load(tmp_path)
    _one_line(exc)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(VitatlasError, match="not a readable torch file"):
        vitatlas.load(tmp_path / "junk.pt", format="overcomplete", kind="relu")


def test_detection_and_option_errors(tmp_path):
    with pytest.raises(VitatlasError, match="does not exist"):
        vitatlas.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitatlasError, match="holds no checkpoint vitatlas recognises"):
        vitatlas.load(tmp_path / "empty")
    torch.save(overcomplete_state(), tmp_path / "bare.pt")
    with pytest.raises(VitatlasError, match="cannot tell which library wrote"):
        vitatlas.load(tmp_path / "bare.pt")
    with pytest.raises(VitatlasError, match="give --kind"):
        vitatlas.load(tmp_path / "bare.pt", format="overcomplete")
    with pytest.raises(VitatlasError, match="needs --k"):
        vitatlas.load(tmp_path / "bare.pt", format="overcomplete", kind="topk")
    with pytest.raises(VitatlasError, match="needs --threshold"):
        vitatlas.load(tmp_path / "bare.pt", format="overcomplete", kind="batchtopk")
    with pytest.raises(VitatlasError, match="--k is not used"):
        vitatlas.load(tmp_path / "bare.pt", format="overcomplete", kind="relu", k=3)
    with pytest.raises(VitatlasError, match="unknown format 'keras'"):
        vitatlas.load(tmp_path / "bare.pt", format="keras")
    with pytest.raises(VitatlasError, match="unknown import option 'colour'"):
        import_sae(tmp_path / "bare.pt", format="overcomplete", colour="red")
    write_saelens(tmp_path / "s", "standard", saelens_tensors("standard"))
    with pytest.raises(VitatlasError, match="option scale-norm is not used by the SAELens format"):
        vitatlas.load(tmp_path / "s", scale_norm=2.0)
    with pytest.raises(VitatlasError, match="scaling-factor is only used with"):
        vitatlas.load(tmp_path / "s", scaling_factor=2.0)
    write_sparsify(tmp_path / "tc", {"encoder.weight": rand(N, D, seed=1)}, transcode=True)
    with pytest.raises(VitatlasError, match="transcoder"):
        vitatlas.load(tmp_path / "tc")
    write_dl(tmp_path / "dl", "GatedAutoEncoderX", {"W_enc": rand(D, N, seed=1)})
    with pytest.raises(VitatlasError, match="unknown or missing trainer.dict_class 'GatedAutoEncoderX'"):
        vitatlas.load(tmp_path / "dl")
    (tmp_path / "bad_saev.pt").write_bytes(b'{"schema": 9, "cfg": {}}\n' + b"x")
    with pytest.raises(VitatlasError, match="unknown saev schema 9"):
        vitatlas.load(tmp_path / "bad_saev.pt")
    write_saev(tmp_path / "sae.pt", {"d_vit": D, "exp_factor": 2}, saev_tensors())
    with pytest.raises(VitatlasError, match="scale-mean must be 12 finite numbers"):
        import_sae(tmp_path / "sae.pt", scale_mean=torch.zeros(5))
    with pytest.raises(VitatlasError, match="scale-norm must be a finite positive number"):
        import_sae(tmp_path / "sae.pt", scale_norm=-1.0)


def test_docstring_examples_run():
    import doctest

    import vitatlas.formats

    finder, runner = doctest.DocTestFinder(exclude_empty=True), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(vitatlas.formats, "vitatlas.formats") if t.examples]
    assert tests
    for t in tests:
        runner.run(t, out=lambda s: None)
    assert runner.summarize(verbose=False).failed == 0


def test_bad_tensors_in_the_other_formats_name_the_field(tmp_path):
    t = {"encoder.weight": rand(N, D, seed=1), "encoder.bias": rand(N, seed=2), "W_dec": rand(N, D, seed=3),
         "b_dec": rand(D, seed=4)}
    write_sparsify(tmp_path / "sp", t, skip_connection=True)
    with pytest.raises(VitatlasError, match="has no tensor 'W_skip'"):
        vitatlas.load(tmp_path / "sp")
    write_sparsify(tmp_path / "sp2", t | {"W_dec": rand(N, D + 1, seed=3)})
    with pytest.raises(VitatlasError, match="tensor 'W_dec' .* has shape \\(48, 13\\), expected \\(48, 12\\)"):
        vitatlas.load(tmp_path / "sp2")
    dl = {"bias": rand(D, seed=5), "encoder.weight": rand(N, D, seed=6), "encoder.bias": rand(N, seed=7),
          "decoder.weight": rand(D, N, seed=8)}
    dl["encoder.bias"][4] = float("nan")
    write_dl(tmp_path / "dl", "AutoEncoder", dl)
    with pytest.raises(VitatlasError, match="tensor 'encoder.bias' .* NaN"):
        vitatlas.load(tmp_path / "dl")
    oc = overcomplete_state() | {"encoder.mlp_blocks.0.0.weight": rand(D, D, seed=9)}
    torch.save(oc, tmp_path / "mlp.pt")
    with pytest.raises(VitatlasError, match="beyond one linear layer"):
        vitatlas.load(tmp_path / "mlp.pt", format="overcomplete", kind="relu")
    write_saev(tmp_path / "sae.pt", {"d_vit": D, "exp_factor": 3}, saev_tensors())
    with pytest.raises(VitatlasError, match="tensor 'W_enc' .* has shape \\(12, 24\\), expected \\(12, 36\\)"):
        vitatlas.load(tmp_path / "sae.pt")
    (tmp_path / "p").mkdir()
    torch.save(saelens_tensors("standard"), tmp_path / "p" / "weights.pt")
    (tmp_path / "p" / "config.json").write_text(json.dumps({"d_in": D, "d_sae": N, "activation_fn_str": "tanh-relu"}))
    with pytest.raises(VitatlasError, match="activation_fn_str 'tanh-relu' is not supported"):
        vitatlas.load(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text(json.dumps({"d_in": D, "d_sae": N, "normalize_activations": "layer_norm"}))
    with pytest.raises(VitatlasError, match="normalize_activations='layer_norm' is not supported for ViT-Prisma"):
        vitatlas.load(tmp_path / "p")
