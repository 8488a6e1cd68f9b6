"""Imported SAEs as vitatlas runs: ``vitatlas import`` / ``export`` on the command line, the store checks
(another model or width refused with the usual one-line error), eval / interpret / intervene / explore
on an imported SAE, and exports that re-import with the same codes and follow the target layout field
for field (the field lists are SAELens 6's SAEConfig.to_dict() and sparsify's SparseCoder.save_to_disk).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_cli_store import run_cli
from test_explore_fixtures import LAYER, tiny_world
from test_formats import D, N, close, ref_matching_pursuit, saelens_tensors, write_saelens

import vitatlas
from vitatlas.errors import VitatlasError
from vitatlas.formats import export, import_sae

SAELENS_FIELDS = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                  "reshape_activations", "metadata", "architecture"}
SAELENS_ARCH_FIELDS = {"standard": set(), "jumprelu": set(), "topk": {"k", "rescale_acts_by_decoder_norm"},
                       "matching_pursuit": {"residual_threshold", "max_iterations", "stop_on_duplicate_support"}}
SPARSIFY_FIELDS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                   "skip_connection", "transcode", "d_in"}


def data(n=512, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, D)) * 3 + 1).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    """One tiny vitatlas SAE per family (2 steps of 128 rows each: the export is what is tested)."""
    X = data(256)
    opts = dict(n_latents=N, epochs=1, batch_size=128, seed=0)
    saes = {"relu": vitatlas.SAE(kind="relu", **opts), "topk": vitatlas.SAE(kind="topk", k=4, **opts),
            "batchtopk": vitatlas.SAE(kind="batchtopk", k=4, **opts), "jumprelu": vitatlas.SAE(kind="jumprelu", **opts),
            "matryoshka": vitatlas.SAE(kind="matryoshka", k=4, groups=(12, 24, 48), **opts),
            "matryoshka-topk": vitatlas.SAE(kind="matryoshka", k=4, base="topk", **opts)}
    for sae in saes.values():
        sae.fit(X, progress=False)
        sae.fit_info = {"source": "store", "model": "hf:tiny", "layer": 1, "tokens": "patches"}
    return saes


EXPECTED_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                 "matryoshka": "jumprelu", "matryoshka-topk": "topk"}


@pytest.mark.parametrize("family", sorted(EXPECTED_ARCH))
def test_export_saelens_reimports_with_the_same_codes(tmp_path, trained, family):
    sae = trained[family]
    out = export(sae, "saelens", tmp_path / "out")
    cfg = json.loads((out / "cfg.json").read_text())
    arch = EXPECTED_ARCH[family]
    assert cfg["architecture"] == arch
    assert set(cfg) == SAELENS_FIELDS | SAELENS_ARCH_FIELDS[arch]
    tensors = load_file(str(out / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    assert tensors["W_enc"].shape == (D, N) and tensors["W_dec"].shape == (N, D)
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["model_name"] == "hf:tiny"
    if family in ("batchtopk", "matryoshka"):  # one threshold repeated, as SAELens saves BatchTopK for inference
        assert torch.unique(tensors["threshold"]).numel() == 1
    back = vitatlas.load(out)
    X = data(200, seed=1)
    want = sae.encode(X)
    got = back.encode(X)
    assert np.array_equal(got != 0, want != 0)
    close(got, want)  # b/s and threshold/s are folded in float32: equal within rounding
    close(back.reconstruct(X), sae.reconstruct(X))
    # what the SAE reads comes back from the metadata, the store's token kind included
    assert {k: back.fit_info.get(k) for k in ("model", "layer", "tokens")} == {"model": "hf:tiny", "layer": 1,
                                                                                "tokens": "patches"}


@pytest.mark.parametrize("family", ["topk", "matryoshka-topk"])
def test_export_sparsify_reimports_with_the_same_codes(tmp_path, trained, family):
    sae = trained[family]
    out = export(sae, "sparsify", tmp_path / "layers.1")
    cfg = json.loads((out / "cfg.json").read_text())
    assert set(cfg) == SPARSIFY_FIELDS and cfg["k"] == 4 and cfg["num_latents"] == N and cfg["d_in"] == D
    assert set(load_file(str(out / "sae.safetensors"))) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    back = vitatlas.load(out)
    X = data(200, seed=2)
    close(back.encode(X), sae.encode(X))
    close(back.reconstruct(X), sae.reconstruct(X))


def test_export_refuses_what_a_format_cannot_express(tmp_path, trained):
    X = data(300)
    with pytest.raises(VitatlasError, match="sparsify SAEs are TopK SAEs and this one is a relu SAE"):
        export(trained["relu"], "sparsify", tmp_path / "a")
    with pytest.raises(VitatlasError, match="a matryoshka SAE over batchtopk"):
        export(trained["matryoshka"], "sparsify", tmp_path / "b")
    from vitatlas.learners.baselines import PCABaseline
    with pytest.raises(VitatlasError, match="a pca dictionary has signed codes"):
        export(PCABaseline(4).fit(X), "saelens", tmp_path / "c")
    ksvd = vitatlas.DBKSVD(n_atoms=16, k=3, epochs=1).fit(X, progress=False)
    with pytest.raises(VitatlasError, match="coder='omp'.*only coder='mp' with nonnegative and center"):
        export(ksvd, "saelens", tmp_path / "d")
    with pytest.raises(VitatlasError, match="sparsify cannot express"):
        export(ksvd, "sparsify", tmp_path / "e")
    with pytest.raises(VitatlasError, match="unknown export format 'onnx'"):
        export(trained["topk"], "onnx", tmp_path / "f")
    imported = vitatlas.load(export(trained["topk"], "saelens", tmp_path / "g"))
    with pytest.raises(VitatlasError, match="this run was imported"):
        export(imported, "saelens", tmp_path / "h")


class _MPConfig:
    """A DBK-SVD config with the fields the lead may add (coder, nonnegative, center) set for export."""

    def __init__(self, **kw):
        self.coder, self.nonnegative, self.center, self.refit, self.tol, self.k, self.mp_steps = (
            "mp", True, True, False, 0.0, 6, 5)
        self.__dict__.update(kw)


class _NonnegativeMPDictionary:
    """Stands in for a DBK-SVD coded by non-negative MP on centred input (not in vitatlas yet): the public
    attributes the exporter reads (learner, config, atoms, b_dec, d, n_atoms)."""

    learner = "dbksvd"

    def __init__(self, **config):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(N, D, generator=g)
        self.atoms = w / w.norm(dim=1, keepdim=True)
        self.b_dec = torch.randn(D, generator=g)
        self.d, self.n_atoms, self.config = D, N, _MPConfig(**config)
        self.fit_info = {}

    def _check_fitted(self):
        pass


def test_a_nonnegative_mp_dbksvd_exports_as_saelens_matching_pursuit(tmp_path):
    mp = _NonnegativeMPDictionary()
    out = export(mp, "saelens", tmp_path / "mp")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "matching_pursuit" and set(cfg) == SAELENS_FIELDS | SAELENS_ARCH_FIELDS["matching_pursuit"]
    assert cfg["max_iterations"] == 5 and cfg["residual_threshold"] == 0.0 and cfg["stop_on_duplicate_support"] is False
    assert set(load_file(str(out / "sae_weights.safetensors"))) == {"W_dec", "b_dec"}
    back = vitatlas.load(out)
    X = data(50)
    xc = X.astype(np.float64) - mp.b_dec.double().numpy()
    want = ref_matching_pursuit(xc, mp.atoms.double().numpy(), 0.0, 5, False)
    close(back.encode(X), want)
    for bad, match in (({"nonnegative": False}, "nonnegative=False"), ({"refit": True}, "refits its codes"),
                       ({"tol": 0.05}, "relative residual"), ({"mp_steps": None}, "runs 24 steps but keeps at most k=6")):
        with pytest.raises(VitatlasError, match=match):
            export(_NonnegativeMPDictionary(**bad), "saelens", tmp_path / "x")


# ---- the command line and the store checks ---------------------------------------------------------

def test_cli_import_and_export(tmp_path, capsys, trained):
    run = trained["topk"].save(tmp_path / "run")
    code, out, err = run_cli(["export", run, "--format", "sparsify", "--out", tmp_path / "sp"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["import", tmp_path / "sp", "--out", tmp_path / "back", "--tokens", "patches"], capsys)
    assert code == 0, err
    assert "imported sparsify topk SAE: 48 latents over width 12" in out and "tokens=patches" in out
    again = vitatlas.dictionary.load(tmp_path / "back")
    close(again.encode(data(64)), trained["topk"].encode(data(64)))
    code, out, err = run_cli(["import", tmp_path / "sp", "--out", tmp_path / "back"], capsys)
    assert code == 2 and err.startswith("error: ") and "not empty" in err and err.count("\n") == 1
    code, out, err = run_cli(["import", tmp_path / "nowhere", "--out", tmp_path / "n"], capsys)
    assert code == 2 and "does not exist" in err
    code, out, err = run_cli(["export", tmp_path / "back", "--format", "saelens", "--out", tmp_path / "again"], capsys)
    assert code == 2 and "this run was imported" in err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


def _imported_run(tmp_path, world, capsys, *extra, d=None):
    """A random SAELens TopK SAE of the tiny model's width written to disk, then `vitatlas import`ed."""
    width = d or world.model.width
    g = torch.Generator().manual_seed(3)
    t = {"W_enc": torch.randn(width, 64, generator=g) * 0.3, "b_enc": torch.randn(64, generator=g) * 0.1,
         "W_dec": torch.randn(64, width, generator=g) * 0.3, "b_dec": torch.randn(width, generator=g) * 0.1}
    src = write_saelens(tmp_path / "saelens", "topk", t, k=4, d_in=width, d_sae=64,
                        metadata={"sae_lens_version": "6.0.0", "model_name": world.model_spec,
                                  "hook_name": f"blocks.{LAYER}.hook_resid_post"})
    code, out, err = run_cli(["import", src, "--out", tmp_path / "run", *extra], capsys)
    assert code == 0, err
    return tmp_path / "run"


def test_an_imported_sae_goes_through_eval_interpret_intervene_and_explore(tmp_path, world, capsys):
    from vitatlas.explore import Explorer
    from vitatlas.intervene import Edit, intervene

    run = _imported_run(tmp_path, world, capsys, "--tokens", "patches")
    code, out, err = run_cli(["eval", run, "--acts", world.store_path, "--out", tmp_path / "report",
                              "--baselines", "none"], capsys)
    assert code == 0, err
    assert (tmp_path / "report").is_dir()
    sae = vitatlas.load(run)
    store = vitatlas.ActivationStore(world.store_path)
    cards = vitatlas.interpret(sae, store, top=3, progress=False, images=False)
    assert len(cards.atoms) == 64
    cards_dir = cards.save(tmp_path / "cards", progress=False)
    explorer = Explorer.open([run], world.store_path, cards=[cards_dir], progress=False)
    assert list(explorer.runs) == ["run"]
    from vitatlas.data.sources import open_source
    source = open_source("embedded:digits")
    images = [source.image(i) for i in range(2)]
    result = intervene(world.model, sae, images, edits=[Edit(0, "scale", 1.0)])
    assert torch.equal(result.after, result.before)  # a no-op edit adds exactly nothing
    clamped = intervene(world.model, sae, images, edits=[Edit(0, "clamp", 5.0, relative=False)])
    assert not torch.equal(clamped.after, clamped.before)


def test_stores_of_another_model_or_width_are_refused(tmp_path, world, capsys):
    run = _imported_run(tmp_path / "a", world, capsys, "--model", "hf:some-other-vit")
    code, out, err = run_cli(["eval", run, "--acts", world.store_path, "--out", tmp_path / "r1", "--baselines", "none"],
                             capsys)
    assert code == 2 and "was fitted on model='hf:some-other-vit'" in err and err.count("\n") == 1
    sae = vitatlas.load(run)
    with pytest.raises(VitatlasError, match="some-other-vit"):
        vitatlas.interpret(sae, world.store_path, top=3, progress=False, images=False)
    narrow = _imported_run(tmp_path / "b", world, capsys, d=world.model.width // 2)
    code, out, err = run_cli(["eval", narrow, "--acts", world.store_path, "--out", tmp_path / "r2",
                              "--baselines", "none"], capsys)
    assert code == 2 and "width" in err
    layer2 = _imported_run(tmp_path / "c", world, capsys, "--layer", "2")
    from vitatlas.intervene import Edit, intervene
    with pytest.raises(VitatlasError, match="fitted on layer 2"):
        intervene(world.model, vitatlas.load(layer2), torch.zeros(1, 3, 28, 28), layer=LAYER, edits=[Edit(0, "ablate")])


def test_saelens_metadata_fills_model_and_layer(tmp_path):
    write_saelens(tmp_path / "s", "standard", saelens_tensors("standard"))
    sae = import_sae(tmp_path / "s")
    assert sae.fit_info == {"source": "store", "imported": True, "d": D, "model": "hf:tiny", "layer": 1}
    assert import_sae(tmp_path / "s", model="x", layer=4).fit_info["layer"] == 4


def test_a_real_nonnegative_mp_dbksvd_round_trips_through_matching_pursuit(tmp_path):
    """With DBK-SVD's own non-negative MP coder (where this vitatlas has it): the exported SAELens
    matching_pursuit computes the DBK-SVD's codes."""
    from vitatlas.learners.dbksvd import DBKSVDConfig

    if not {"nonnegative", "center"} <= set(DBKSVDConfig.names()):
        pytest.skip("this DBK-SVD has no nonnegative/center options yet")
    X = data(400)
    ksvd = vitatlas.DBKSVD(n_atoms=32, k=4, coder="mp", nonnegative=True, center=True, refit=False, mp_steps=4,
                           epochs=1, seed=0).fit(X, progress=False)
    back = vitatlas.load(export(ksvd, "saelens", tmp_path / "mp"))
    Y = data(100, seed=5)
    want, got = ksvd.encode(Y), back.encode(Y)
    assert np.array_equal(got != 0, want != 0)
    close(got, want)
    close(back.reconstruct(Y), ksvd.reconstruct(Y))
