"""The explorer's JSON API through Starlette's TestClient: every route, and every bad input refused with a
4xx and a one-line message. Data: the tiny world (random DINOv2, 24 digits, two dictionaries, real
``vitatlas.interpret`` cards, a real probe and ``vitatlas.intervene`` behind POST /api/intervene)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.testclient import TestClient
from test_explore_fixtures import N_ATOMS, first_image, tiny_world

from vitatlas import VitatlasError
from vitatlas.explore import Explorer, create_app


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


@pytest.fixture(scope="module")
def explorer(world):
    return Explorer.open(world.runs, world.store_path, cards=world.cards, model=world.model_spec, probe=world.probe,
                         progress=False)


@pytest.fixture(scope="module")
def client(explorer):
    return TestClient(create_app(explorer), raise_server_exceptions=False)


def one_line_error(resp, status):
    assert resp.status_code == status, resp.text[:300]
    msg = resp.json()["error"]
    assert msg and "\n" not in msg
    return msg


# ---- pages and files --------------------------------------------------------------------------------

def test_pages_and_static_files_are_served(client):
    for path in ("/", "/index.html", "/atom.html", "/image.html", "/compare.html"):
        r = client.get(path)
        assert r.status_code == 200 and "static/app.js" in r.text, path
        assert r.headers["x-content-type-options"] == "nosniff"
    assert "function pageAtoms" in client.get("/static/app.js").text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert '"mode": "live"' in client.get("/static/config.js").text


@pytest.mark.parametrize("path", ["/static/../pyproject.toml", "/static/..%2F..%2Fpyproject.toml",
                                  "/static/explorer.py", "/cards/ksvd/..%2Fcards.json", "/cards/ksvd/atoms.jsonl",
                                  "/cards/ksvd/%2Fetc%2Fpasswd", "/images/..%2F..%2Fetc%2Fpasswd",
                                  "/etc/passwd", "/secret.html", "/cards/nope/atom-00000.png"])
def test_only_generated_files_are_reachable(client, path):
    r = client.get(path)
    assert 400 <= r.status_code < 500, (path, r.status_code)
    assert "root:" not in r.text and "[project]" not in r.text


def test_store_images_and_card_files(client, explorer, world):
    image = first_image(explorer)
    r = client.get(f"/images/{image}.png")
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(client.get("/images/999999.png"), 404)
    one_line_error(client.get("/images/abc.png"), 400)
    one_line_error(client.get(f"/images/{image}.jpg"), 404)
    card = explorer.runs["ksvd"].cards.card_files(0)
    assert card, "interpret wrote no card PNG for atom 0"
    r = client.get(f"/cards/ksvd/{card['card']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


# ---- /api/meta, /api/atoms ------------------------------------------------------------------------------

def test_meta(client):
    meta = client.get("/api/meta").json()
    assert [r["name"] for r in meta["runs"]] == ["ksvd", "sae"]
    assert meta["store"]["patch_grid"] == [4, 4] and meta["live"]["probe"]["task"] == "classification"
    one_line_error(client.get("/api/meta?x=1"), 400)


def test_atoms_table_pages_sorts_and_filters(client, explorer):
    page = client.get("/api/atoms?limit=10").json()
    assert page["total"] == N_ATOMS and [r["id"] for r in page["rows"]] == list(range(10))
    rest = client.get("/api/atoms?limit=10&offset=20").json()
    assert [r["id"] for r in rest["rows"]] == [20, 21, 22, 23]

    by_freq = client.get("/api/atoms?sort=-frequency&limit=500").json()["rows"]
    freqs = [r["frequency"] for r in by_freq if r["frequency"] is not None]
    assert freqs == sorted(freqs, reverse=True) and len(by_freq) == N_ATOMS
    expected = np.argsort([-(a["frequency"] or 0) for a in explorer.runs["ksvd"].cards.atoms], kind="stable")
    assert [r["id"] for r in by_freq] == expected.tolist()  # ties keep ascending ids
    asc = [r["max_activation"] for r in client.get("/api/atoms?sort=max_activation&limit=500").json()["rows"]]
    assert asc == sorted(asc)

    label = explorer.runs["ksvd"].table.labels[0]
    labelled = client.get(f"/api/atoms?label={label}&limit=500").json()
    assert labelled["total"] >= 1 and all(r["label"] == label for r in labelled["rows"])
    assert client.get("/api/atoms?q=%2317").json()["rows"][0]["id"] == 17
    assert client.get("/api/atoms?q=no-such-thing-anywhere").json()["total"] == 0
    k = client.get("/api/atoms?min_kappa=0.3&limit=500").json()["rows"]
    assert all(r["kappa"] is not None and r["kappa"] >= 0.3 for r in k)
    other = client.get("/api/atoms?run=sae&limit=3").json()
    assert other["run"] == "sae" and "match" in other["rows"][0]


@pytest.mark.parametrize("query,status", [
    ("sort=bogus", 400), ("sort=--id", 400), ("offset=-1", 400), ("offset=x", 400), ("limit=0", 400),
    ("limit=501", 400), ("limit=1.5", 400), ("min_kappa=nan", 400), ("min_frequency=inf", 400),
    ("min_kappa=abc", 400), ("run=nope", 404), ("q=" + "x" * 201, 400), ("colour=red", 400),
])
def test_atoms_bad_parameters(client, query, status):
    one_line_error(client.get(f"/api/atoms?{query}"), status)


# ---- /api/atoms/{id} --------------------------------------------------------------------------------------

def test_atom_card(client, explorer):
    data = client.get("/api/atoms/3?run=ksvd").json()
    card = explorer.runs["ksvd"].cards.atoms[3]
    assert data["card"]["id"] == 3 and data["card"]["top_images"] == json.loads(json.dumps(card["top_images"]))
    assert len(data["heatmaps"]) == len(card["top_images"]) and len(data["heatmaps"][0]) == 16
    # the match is the best |cosine| atom of the other run, and its value is that cosine
    a = explorer.runs["ksvd"].dictionary.atoms.numpy()[3]
    B = explorer.runs["sae"].dictionary.atoms.numpy()
    cos = B @ a / (np.linalg.norm(B, axis=1) * np.linalg.norm(a))
    assert data["match"]["atom"] == int(np.abs(cos).argmax())
    assert data["match"]["cosine"] == pytest.approx(cos[np.abs(cos).argmax()], abs=1e-3)


@pytest.mark.parametrize("path,status", [("/api/atoms/24", 404), ("/api/atoms/-1", 404), ("/api/atoms/99999999", 404),
                                         ("/api/atoms/abc", 400), ("/api/atoms/1.5", 400), ("/api/atoms/3?run=zz", 404),
                                         ("/api/atoms/3?extra=1", 400)])
def test_atom_bad_ids(client, path, status):
    one_line_error(client.get(path), status)


# ---- /api/images/{id} -------------------------------------------------------------------------------------

def test_image_patches_list_the_dictionary_codes(client, explorer):
    image = first_image(explorer)
    data = client.get(f"/api/images/{image}?run=sae").json()
    assert data["patch_grid"] == [4, 4] and len(data["tokens"]) == 16
    rows, _ = explorer.images.rows_of(image)
    codes = explorer.runs["sae"].dictionary.encode(explorer.store.rows(rows))
    for t, token in enumerate(data["tokens"]):
        assert token["patch"] == t
        assert {a for a, _ in token["atoms"]} == set(np.flatnonzero(codes[t]).tolist())
        for a, v in token["atoms"]:
            assert v == pytest.approx(codes[t, a], abs=1e-3)


@pytest.mark.parametrize("path,status", [("/api/images/100000", 404), ("/api/images/-3", 404),
                                         ("/api/images/x", 400), ("/api/images/0?run=nope", 404),
                                         ("/api/images/0?patch=1", 400)])
def test_image_bad_ids(client, path, status):
    one_line_error(client.get(path), status)


# ---- /api/intervene ------------------------------------------------------------------------------------------

def test_intervene_moves_the_prediction(client, explorer):
    image = first_image(explorer)
    noop = client.post("/api/intervene", json={"image": image, "edits": [{"atom": 0, "op": "ablate"}], "patches": [15]})
    assert noop.status_code == 200, noop.text
    big = client.post("/api/intervene", json={"image": image, "edits": [{"atom": 0, "value": 10}]})
    assert big.status_code == 200, big.text
    out = big.json()
    assert out["prediction"]["task"] == "classification" and len(out["token_change"]["patches"]) == 16
    assert out["token_change"]["max"] > 0 and out["code_change"]["atoms"][0]["atom"] == 0
    assert out["code_change"]["edited_tokens"] == 16  # a patch store's dictionary edits the 16 patch tokens
    before = [c["before"] for c in out["prediction"]["classes"]]
    after = [c["after"] for c in out["prediction"]["classes"]]
    assert before != after
    # the same edit through vitatlas.intervene directly gives the same probabilities
    from vitatlas.intervene import intervene

    run = explorer.runs["ksvd"]
    direct = intervene(explorer.live.model, run.dictionary, [explorer.image_cache.pil(image)],
                       edits=[{"atom": 0, "value": 10.0}], tokens="patches", max_activations=run.cards.max_activations,
                       head=explorer.live.probe)
    probs = direct.after_probs[0].numpy()
    for c in out["prediction"]["classes"]:
        assert c["after"] == pytest.approx(float(probs[int(c["class"])]), abs=1e-4)


@pytest.mark.parametrize("body,status", [
    ({"image": 0, "edits": [{"atom": 24, "value": 1}]}, 400),
    ({"image": 0, "edits": [{"atom": -1, "value": 1}]}, 400),
    ({"image": 0, "edits": [{"atom": True, "value": 1}]}, 400),
    ({"image": 0, "edits": [{"atom": 3, "value": 10.5}]}, 400),
    ({"image": 0, "edits": [{"atom": 3, "value": -11}]}, 400),
    ({"image": 0, "edits": [{"atom": 3, "value": "NaN"}]}, 400),
    ({"image": 0, "edits": [{"atom": 3, "value": "inf"}]}, 400),
    ({"image": 0, "edits": [{"atom": 3}]}, 400),
    ({"image": 0, "edits": [{"atom": 3, "op": "explode"}]}, 400),
    ({"image": 0, "edits": [{"atom": 3, "value": 1, "extra": 2}]}, 400),
    ({"image": 0, "edits": []}, 400),
    ({"image": 0, "edits": "atom 3"}, 400),
    ({"image": 0, "edits": [{"atom": 3, "value": 1}] * 65}, 400),
    ({"image": 99999, "edits": [{"atom": 3, "value": 1}]}, 404),
    ({"image": "zero", "edits": [{"atom": 3, "value": 1}]}, 400),
    ({"edits": [{"atom": 3, "value": 1}]}, 400),
    ({"image": 0, "edits": [{"atom": 3, "value": 1}], "run": "nope"}, 404),
    ({"image": 0, "edits": [{"atom": 3, "value": 1}], "patches": [16]}, 400),
    ({"image": 0, "edits": [{"atom": 3, "value": 1}], "patches": "all"}, 400),
    ({"image": 0, "edits": [{"atom": 3, "value": 1}], "colour": 1}, 400),
    ([1, 2], 400),
])
def test_intervene_bad_bodies(client, body, status):
    one_line_error(client.post("/api/intervene", json=body), status)


def test_intervene_bad_transport(client):
    json_header = {"content-type": "application/json"}
    one_line_error(client.post("/api/intervene", content=b"{not json", headers=json_header), 400)
    one_line_error(client.post("/api/intervene", content=b'{"image": NaN}'), 400)
    one_line_error(client.post("/api/intervene", content=b" " * (64 * 1024 + 1)), 413)
    assert client.get("/api/intervene").status_code == 405


def test_a_failing_intervention_does_not_take_the_server_down(client, explorer, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("the model fell over\nwith two lines")

    monkeypatch.setattr(explorer.live, "run", boom)
    image = first_image(explorer)
    msg = one_line_error(client.post("/api/intervene", json={"image": image, "edits": [{"atom": 1, "value": 2}]}), 500)
    assert "RuntimeError" in msg and "fell over" in msg

    def refuse(*args, **kwargs):
        raise VitatlasError("atom 1 is out of range")

    monkeypatch.setattr(explorer.live, "run", refuse)
    one_line_error(client.post("/api/intervene", json={"image": image, "edits": [{"atom": 1, "value": 2}]}), 400)
    monkeypatch.undo()
    assert client.get("/api/meta").status_code == 200
    assert client.post("/api/intervene", json={"image": image, "edits": [{"atom": 1, "value": 2}]}).status_code == 200


def test_intervene_without_a_model_is_refused(world):
    explorer = Explorer.open(world.runs[:1], world.store_path, cards=world.cards[:1], progress=False)
    client = TestClient(create_app(explorer), raise_server_exceptions=False)
    one_line_error(client.post("/api/intervene", json={"image": 0, "edits": [{"atom": 1, "value": 2}]}), 409)
    assert '"live": false' in client.get("/static/config.js").text
    one_line_error(client.get("/api/compare"), 404)  # one run: nothing to compare


def test_intervene_with_a_model_but_no_probe_shows_token_and_code_change(world):
    explorer = Explorer.open(world.runs[:1], world.store_path, cards=world.cards[:1], model=world.model_spec,
                             progress=False)
    client = TestClient(create_app(explorer), raise_server_exceptions=False)
    image = first_image(explorer)
    body = {"image": image, "edits": [{"atom": 2, "value": -5}], "patches": [0, 5]}
    out = client.post("/api/intervene", json=body).json()
    assert "prediction" not in out
    assert out["code_change"]["edited_tokens"] == 2
    changed = [p for p, v in enumerate(out["code_change"]["patches"]) if v > 0]
    assert set(changed) <= {0, 5}
    assert len(out["token_change"]["patches"]) == 16


# ---- /api/compare and the host guard --------------------------------------------------------------------------

def test_compare(client):
    data = client.get("/api/compare").json()
    assert data["a"] == "ksvd" and data["b"] == "sae"
    assert set(data["metrics"]) == {"ksvd", "sae"} and 0 < data["metrics"]["ksvd"]["explained_variance"] <= 1
    cos = [abs(p["cosine"]) for p in data["pairs"]]
    assert cos == sorted(cos, reverse=True) and len(cos) == N_ATOMS
    assert client.get("/api/compare?a=sae&b=ksvd").json()["a"] == "sae"
    one_line_error(client.get("/api/compare?a=sae&b=sae"), 400)
    one_line_error(client.get("/api/compare?a=zz"), 404)
    one_line_error(client.get("/api/compare?c=1"), 400)


def test_loopback_bind_refuses_foreign_host_headers(explorer):
    from vitatlas.explore.server import local_hosts

    app = create_app(explorer, allowed_hosts=local_hosts("127.0.0.1", 8765))
    assert TestClient(app, base_url="http://127.0.0.1:8765").get("/api/meta").status_code == 200
    assert TestClient(app, base_url="http://evil.example:8765").get("/api/meta").status_code == 400
    assert local_hosts("0.0.0.0", 8765) is None


# ---- opening runs: bad input ------------------------------------------------------------------------------------

def test_open_refuses_mismatched_inputs(world, tmp_path):
    with pytest.raises(VitatlasError, match="one per run"):
        Explorer.open(world.runs, world.store_path, cards=world.cards[:1], progress=False)
    with pytest.raises(VitatlasError, match="describe"):
        from vitatlas import SAE, ActivationStore

        other = SAE(kind="topk", n_latents=8, k=2, epochs=1, batch_size=64).fit(ActivationStore(world.store_path))
        run = other.save(tmp_path / "small")
        Explorer.open([run], world.store_path, cards=world.cards[:1], progress=False)
    with pytest.raises(VitatlasError, match="--probe needs --model"):
        Explorer.open(world.runs[:1], world.store_path, cards=world.cards[:1], probe=world.probe, progress=False)
    import shutil

    other_store = tmp_path / "cards-other-store"
    shutil.copytree(world.cards[0], other_store)
    meta = json.loads((other_store / "cards.json").read_text())
    meta["store"]["n_rows"] += 1
    (other_store / "cards.json").write_text(json.dumps(meta))
    with pytest.raises(VitatlasError, match="made on a store with n_rows"):
        Explorer.open(world.runs[:1], world.store_path, cards=[other_store], progress=False)
    with pytest.raises(VitatlasError, match="no atom cards"):
        Explorer.open(world.runs[:1], world.store_path, cards=[tmp_path / "missing"], progress=False)


def test_intervene_with_a_segmentation_probe_answers_patch_maps(world, tmp_path):
    import torch

    from vitatlas.intervene.heads import LinearProbe, model_identity

    model = world.model
    explorer = Explorer.open(world.runs[:1], world.store_path, cards=world.cards[:1], model=world.model_spec,
                             progress=False)
    images = [explorer.image_cache.pil(int(i)) for i in explorer.images.image_ids[:8]]
    with torch.no_grad():
        final = model.forward_from(1, model.residual_streams(model.preprocess(images), [1])[1])
    feats = final[:, 1:].reshape(-1, final.shape[-1])
    labels = (feats[:, 0] > feats[:, 0].median()).long()  # any two-class patch labelling will do
    probe = LinearProbe.fit(feats, labels, task="segmentation", class_names=["low", "high"],
                            model=model_identity(model)).save(tmp_path / "seg")
    explorer = Explorer.open(world.runs[:1], world.store_path, cards=world.cards[:1], model=world.model_spec,
                             probe=probe, progress=False)
    client = TestClient(create_app(explorer), raise_server_exceptions=False)
    out = client.post("/api/intervene", json={"image": first_image(explorer), "edits": [{"atom": 0, "value": 10}]})
    assert out.status_code == 200, out.text[:300]
    pred = out.json()["prediction"]
    assert pred["task"] == "segmentation" and len(pred["before_map"]) == len(pred["after_map"]) == 16
    changed = sum(b != a for b, a in zip(pred["before_map"], pred["after_map"]))
    assert pred["changed_patches"] == changed and set(pred["before_map"]) <= {0, 1}
