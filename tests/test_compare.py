"""Comparing two dictionaries by behaviour (vitatlas.evaluation.compare) and by decoder cosine.

Kernels against slow dense float64 references; the done-when test on two stores of the same planted
data, the second in a random rotation (behaviour pairs the atoms, decoder cosine does not, shuffled
images give the null); alignment by tokens and by images; and every refused input as a one-line error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from _planted import planted
from test_cli_store import run_cli

from vitatlas import VitatlasError
from vitatlas.data.store import ActivationStore, StoreWriter
from vitatlas.evaluation.compare import compare, decoder_matches, decoder_space_mismatch
from vitatlas.evaluation.compare.activations import aggregate_rows, unit_activations
from vitatlas.evaluation.compare.align import align_stores
from vitatlas.evaluation.compare.behaviour import best_correlations
from vitatlas.evaluation.compare.report import write_compare
from vitatlas.learners.baselines import make_baseline
from vitatlas.learners.dbksvd import DBKSVD


def token_store(path, X, *, per_image, tokens="patches", layer=None, model=None, source="synthetic", labels=None):
    """A store whose rows are ``per_image`` tokens of consecutive images (positions 1..per_image, or 0 for
    one CLS row), with the manifest fields an extraction writes."""
    n_images = X.shape[0] // per_image
    positions = [0] if per_image == 1 else list(range(1, per_image + 1))
    meta = {"source": {"name": source, "spec": None}, "tokens": tokens, "layer": layer,
            "model": None if model is None else {"name": model, "revision": "r"}, "class_names": None,
            "world_size": 1, "token_positions": positions}
    writer = StoreWriter(path, d=X.shape[1], dtype="float32", identity={"test": str(path)}, meta=meta,
                         has_labels=labels is not None)
    index = np.stack([np.repeat(np.arange(n_images), per_image), np.tile(positions, n_images)], 1)
    row_labels = None if labels is None else np.repeat(labels, per_image)
    writer.write_shard(X.astype(np.float32), index, row_labels, n_images=n_images)
    writer.finish()
    return ActivationStore(path)


# ---- kernels against references --------------------------------------------------------------------

def dense_reference(A: np.ndarray, B: np.ndarray, min_active: int):
    """Best |r| both ways from the full float64 correlation matrix (untestable atoms: -1 / NaN)."""
    def ok(X):
        return ((X != 0).sum(0) >= min_active) & (X.std(0) > 0)

    oka, okb = ok(A), ok(B)
    za = np.where(oka, (A - A.mean(0)) / np.where(oka, A.std(0), 1), 0)
    zb = np.where(okb, (B - B.mean(0)) / np.where(okb, B.std(0), 1), 0)
    R = za.T @ zb / A.shape[0]
    ab = np.where(oka, np.abs(R).argmax(1), -1)
    ba = np.where(okb, np.abs(R).argmax(0), -1)
    r_ab = np.where(oka, R[np.arange(R.shape[0]), np.abs(R).argmax(1)], np.nan)
    r_ba = np.where(okb, R[np.abs(R).argmax(0), np.arange(R.shape[1])], np.nan)
    return ab, r_ab, ba, r_ba


def sparse_codes(rng, n, m, density, signed):
    X = rng.standard_normal((n, m)) * (rng.random((n, m)) < density)
    return X if signed else np.abs(X)


@pytest.mark.parametrize("signed", [False, True])
def test_blocked_correlations_match_the_dense_reference(signed):
    rng = np.random.default_rng(0)
    A, B = sparse_codes(rng, 300, 37, 0.2, signed), sparse_codes(rng, 300, 53, 0.15, signed)
    B[:, 5] = A[:, 3] * 2.0 + 0.01 * rng.standard_normal(300) * (A[:, 3] != 0)  # a planted pair
    A[:, 7] = 0.0                     # a dead atom
    A[:, 8] = 0.0
    A[:3, 8] = 1.0                    # fires on 3 units: below min_active, untestable
    B[:, 9] = 0.0
    ab, r_ab, ba, r_ba = dense_reference(A, B, min_active=5)
    # 8 * 53 * 5 bytes: blocks of 5 atoms of A, so the running column maxima are exercised
    got_ab, got_ba = best_correlations(sp.csr_matrix(A), sp.csr_matrix(B), min_active=5, block_bytes=8 * 53 * 5)
    np.testing.assert_array_equal(got_ab.match, ab)
    np.testing.assert_array_equal(got_ba.match, ba)
    # float64 both ways; the sparse product sums in another order than the dense GEMM: 1e-10 is ~1e5 ulp
    np.testing.assert_allclose(got_ab.correlation, r_ab, atol=1e-10, equal_nan=True)
    np.testing.assert_allclose(got_ba.correlation, r_ba, atol=1e-10, equal_nan=True)
    assert got_ab.match[3] == 5 and got_ab.score[3] > 0.99
    assert got_ab.match[7] == -1 and got_ab.match[8] == -1 and got_ba.match[9] == -1


def test_aggregate_rows_against_a_loop():
    rng = np.random.default_rng(1)
    codes = rng.standard_normal((11, 4)).astype(np.float32)
    starts = np.array([0, 3, 4, 9])
    ends = np.append(starts[1:], 11)
    mx, mean = aggregate_rows(codes, starts, "max"), aggregate_rows(codes, starts, "mean")
    for i, (s, e) in enumerate(zip(starts, ends)):
        block = codes[s:e]
        np.testing.assert_array_equal(mx[i], block[np.abs(block).argmax(0), np.arange(4)])  # signed, largest |v|
        np.testing.assert_allclose(mean[i], block.mean(0), rtol=1e-6)
    with pytest.raises(VitatlasError, match="unknown aggregate"):
        aggregate_rows(codes, starts, "median")


def test_unit_activations_do_not_depend_on_the_chunking(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((60, 6)).astype(np.float32)  # 15 images x 4 tokens
    store = token_store(tmp_path / "s", X, per_image=4)
    pca = make_baseline("pca", n_atoms=3, k=3).fit(store, progress=False)
    al = align_stores(store, store, "images")
    whole = unit_activations(pca, store, al.a, "max", chunk_bytes=1 << 30)
    tiny = unit_activations(pca, store, al.a, "max", chunk_bytes=4 * 3 * 5)  # 5 rows: one image per chunk
    assert whole.shape == (15, 3)
    np.testing.assert_allclose(tiny.toarray(), whole.toarray(), rtol=1e-6)
    ref = aggregate_rows(pca.encode(X), np.arange(0, 60, 4), "max")
    np.testing.assert_allclose(whole.toarray(), ref, rtol=1e-6)
    tokens = unit_activations(pca, store, align_stores(store, store).a)
    assert tokens.shape == (60, 3)


# ---- the done-when test -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """Stores of the same planted data, the second rotated, the third rotated with its images shuffled;
    a DBK-SVD fitted on each of the first two."""
    root = tmp_path_factory.mktemp("rotated")
    X, _ = planted(n=2048, d=32, m=48, k=3, seed=0)
    rng = np.random.default_rng(1)
    R, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    XR = (X @ R).astype(np.float32)
    a = ActivationStore.from_array(root / "a", X)
    b = ActivationStore.from_array(root / "b", XR)
    shuffled = ActivationStore.from_array(root / "c", XR[rng.permutation(X.shape[0])])
    da = DBKSVD(48, 3, epochs=6, sample_batch=1024, seed=0).fit(a, progress=False)
    db = DBKSVD(48, 3, epochs=6, sample_batch=1024, seed=1).fit(b, progress=False)
    return a, b, shuffled, da, db


def test_behaviour_pairs_rotated_dictionaries_and_decoder_cosine_does_not(rotated):
    a, b, _, da, db = rotated
    c = compare(da, db, a, b, progress=False)
    s = c.summary()
    assert c.alignment.mode == "tokens" and c.alignment.n_units == 2048
    assert s["shared_fraction_a"] >= 0.9 and s["shared_fraction_b"] >= 0.9
    assert s["mutual_pairs"] >= 0.8 * 48 and s["median_score_a"] > 0.9
    # the same two dictionaries by decoder cosine: the rotation hides every pair
    idx, cos = decoder_matches(da, db)
    assert np.mean(np.abs(cos) > 0.9) < 0.1
    assert c.decoder["fraction_a_over_0.9"] < 0.1
    # behaviour's pairs are the rotated atoms: atom j of B is R^T-rotated atom i of A
    pairs = c.matches[0].match
    rot = da.atoms.numpy().astype(np.float64) @ np.linalg.qr(np.random.default_rng(1).standard_normal((32, 32)))[0]
    agree = np.abs(np.sum(rot * db.atoms.numpy()[pairs], axis=1))
    assert np.mean(agree > 0.75) >= 0.9  # imperfect recovery in 6 epochs leaves a few atoms near 0.8


def test_shuffled_images_give_matches_at_the_null(rotated):
    a, _, shuffled, da, db = rotated
    s = compare(da, db, a, shuffled, progress=False).summary()
    # at the null about 1 - 0.99 of the atoms pass by chance, but one shuffling moves all 48 atoms' scores
    # together (3/48 here): allow 7; matched stores give 48/48
    assert s["shared_fraction_a"] <= 0.15 and s["shared_fraction_b"] <= 0.15
    assert s["median_score_a"] < 2 * s["median_null_score_a"]
    assert s["null_threshold_a"] < 0.2


def test_report_files(rotated, tmp_path):
    a, b, _, da, db = rotated
    c = compare(da, db, a, b, names=("plain", "rotated"), progress=False)
    report = write_compare(c, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert data["matching"] == "behaviour" and data["alignment"]["mode"] == "tokens"
    assert {"shared_fraction_a", "shared_fraction_b"} <= set(data["summary"])
    assert data["null"]["threshold_a"] == data["summary"]["null_threshold_a"]
    atoms = data["atoms"]["a"]
    assert len(atoms["match"]) == 48 and sum(atoms["shared"]) == data["summary"]["shared_a"]
    assert atoms["match"] == c.matches[0].match.tolist()
    text = report.read_text()
    assert "## Most shared atoms of plain" in text and "## Most unique atoms of rotated" in text
    assert "scores.png" in text and (tmp_path / "out" / "scores.png").stat().st_size > 1000


# ---- alignment by images, and what is refused --------------------------------------------------------

def test_cls_against_patches_aligns_by_image(tmp_path):
    rng = np.random.default_rng(3)
    P = rng.standard_normal((40 * 4, 8)).astype(np.float32)
    cls = P.reshape(40, 4, 8).max(1)  # a "CLS" that sees its image's patches
    sa = token_store(tmp_path / "cls", cls, per_image=1, tokens="cls")
    sb = token_store(tmp_path / "patches", P, per_image=4)
    da = make_baseline("pca", n_atoms=4, k=4).fit(sa, progress=False)
    db = make_baseline("pca", n_atoms=4, k=4).fit(sb, progress=False)
    c = compare(da, db, sa, sb, aggregate="mean", progress=False)
    assert c.alignment.mode == "images" and c.alignment.n_units == 40 and c.aggregate == "mean"
    with pytest.raises(VitatlasError, match="same tokens"):
        compare(da, db, sa, sb, align="tokens", progress=False)


def test_a_rerun_reuses_the_saved_activations(rotated, tmp_path, monkeypatch):
    a, b, _, da, db = rotated
    first = compare(da, db, a, b, work_dir=tmp_path / "work", progress=False)
    import vitatlas.evaluation.compare.api as api

    def fail(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(api, "unit_activations", fail)
    again = compare(da, db, a, b, work_dir=tmp_path / "work", progress=False)
    np.testing.assert_array_equal(again.matches[0].match, first.matches[0].match)
    with pytest.raises(AssertionError, match="encoded again"):  # other options: not the saved activations
        compare(da, db, a, b, work_dir=tmp_path / "work", max_images=100, progress=False)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_mismatched_inputs_are_one_line_errors(tmp_path):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((30, 6)).astype(np.float32)
    s = token_store(tmp_path / "s", X, per_image=1, tokens="cls", layer=4, model="m")
    fewer = token_store(tmp_path / "fewer", X[:20], per_image=1, tokens="cls", layer=4, model="m")
    other_src = token_store(tmp_path / "src", X, per_image=1, tokens="cls", layer=4, model="m", source="other")
    lab_a = token_store(tmp_path / "la", X, per_image=1, labels=np.arange(30) % 3)
    lab_b = token_store(tmp_path / "lb", X, per_image=1, labels=np.arange(30) % 2)
    layer8 = token_store(tmp_path / "l8", X, per_image=1, tokens="cls", layer=8, model="m")
    d4 = make_baseline("pca", n_atoms=3, k=3).fit(s, progress=False)
    d8 = make_baseline("pca", n_atoms=3, k=3).fit(layer8, progress=False)
    cases = [
        ((d4, d4, s, fewer), "hold different images"),
        ((d4, d4, s, other_src), "over different images"),
        ((d4, d4, s, layer8), "fitted on layer=4 but store"),          # a run fitted on another store
        ((d4, d4, s, s, {"aggregate": "median"}), "unknown aggregate"),
        ((d4, d4, s, s, {"align": "rows"}), "unknown alignment"),
        ((d4, d4, s, s, {"null_quantile": 1.0}), "null_quantile"),
        ((d4, d4, s, s, {"min_active": 1}), "min_active"),
        ((d4, d4, s, s, {"null_permutations": 0}), "null_permutations"),
        ((d4, d4, s, s, {"max_images": 1}), "max_images"),
        ((d4, "not a dictionary", s, s), "fitted vitatlas Dictionary"),
    ]
    for args, pattern in cases:
        kwargs = args[4] if len(args) > 4 else {}
        with pytest.raises(VitatlasError, match=pattern) as excinfo:
            compare(*args[:4], progress=False, **kwargs)
        one_line(excinfo)
    pa = make_baseline("pca", n_atoms=3, k=3).fit(lab_a, progress=False)
    with pytest.raises(VitatlasError, match="label the same image ids differently") as excinfo:
        compare(pa, pa, lab_a, lab_b, progress=False)
    one_line(excinfo)
    # decoder cosine: refused between spaces, with the reason
    with pytest.raises(VitatlasError, match="different layers") as excinfo:
        decoder_matches(d4, d8)
    one_line(excinfo)
    wide = make_baseline("pca", n_atoms=3, k=3).fit(rng.standard_normal((30, 7)).astype(np.float32), progress=False)
    assert "different widths (6 and 7)" in decoder_space_mismatch(d4, wide)
    assert decoder_space_mismatch(d4, d4) is None


def test_behaviour_match_across_layers_reports_the_refused_decoder_cosine(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((40, 6)).astype(np.float32)
    s4 = token_store(tmp_path / "l4", X, per_image=1, tokens="cls", layer=4, model="m")
    s8 = token_store(tmp_path / "l8", X * 2, per_image=1, tokens="cls", layer=8, model="m")
    d4 = make_baseline("pca", n_atoms=3, k=3).fit(s4, progress=False)
    d8 = make_baseline("pca", n_atoms=3, k=3).fit(s8, progress=False)
    c = compare(d4, d8, s4, s8, progress=False)
    assert "different layers (4 and 8)" in c.decoder["refused"]
    # X * 2: the same concepts, so every (PCA) atom matches its twin with |r| = 1
    np.testing.assert_allclose(c.matches[0].score, 1.0, atol=1e-6)
    np.testing.assert_array_equal(c.matches[0].match, np.arange(3))


# ---- the command line -------------------------------------------------------------------------------



def test_cli_writes_the_report_and_refuses_other_images(rotated, tmp_path, capsys):
    a, b, _, da, db = rotated
    run_a, run_b = da.save(tmp_path / "ra"), db.save(tmp_path / "rb")
    code, out, err = run_cli(["compare", run_a, run_b, "--acts-a", a.path, "--acts-b", b.path, "--out",
                              tmp_path / "cmp", "--no-progress"], capsys)
    assert code == 0, err
    assert "report written to" in out and "mutual pairs" in out
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["a"]["name"] == "ra" and data["summary"]["shared_fraction_a"] >= 0.9
    assert not (tmp_path / "cmp" / "work").exists()  # the resume files go once the report is written
    fewer = ActivationStore.from_array(tmp_path / "fewer", b.to_numpy()[:100])
    code, out, err = run_cli(["compare", run_a, run_b, "--acts-a", a.path, "--acts-b", fewer.path, "--out",
                              tmp_path / "bad", "--no-progress"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "hold different images" in err


def test_report_with_cards_shows_their_labels_and_refuses_cards_of_another_run(tmp_path):
    import vitatlas

    rng = np.random.default_rng(6)
    labels = np.arange(60) % 3
    X = rng.standard_normal((60, 6)).astype(np.float32) + labels[:, None] * 3.0  # classes apart
    s = token_store(tmp_path / "s", X, per_image=1, tokens="cls", labels=labels)
    d = make_baseline("kmeans", n_atoms=3, k=1).fit(s, progress=False)
    cards = tmp_path / "cards"
    vitatlas.interpret(d, s, top=4, images=False, progress=False).save(cards, progress=False)
    c = compare(d, d, s, s, names=("one", "two"), progress=False)
    text = write_compare(c, tmp_path / "out", cards_a=cards, cards_b=cards).read_text()
    assert "| top-10 class | one card | two card |" in text
    first = json.loads((cards / "atoms.jsonl").read_text().splitlines()[0])["labels"][0]
    assert f"{first['label']} (κ {first['kappa']:.2f})" in text  # the card's class label, in both card columns
    other = make_baseline("kmeans", n_atoms=4, k=1).fit(s, progress=False)
    c2 = compare(d, other, s, s, progress=False)
    with pytest.raises(VitatlasError, match="describe 3 atoms but run b has 4") as excinfo:
        write_compare(c2, tmp_path / "out2", cards_b=cards)
    one_line(excinfo)
