"""DBK-SVD: the K-SVD update against numpy SVD, the learner on a planted problem, edge cases, save/load,
checkpoint resume, Matryoshka prefixes and the CLI."""

import functools
import sys

import numpy as np
import pytest
import torch
from _planted import planted as planted_problem
from _planted import recovered

import vitatlas
from vitatlas import ActivationStore, VitatlasError
from vitatlas.evaluation.metrics import reconstruction_metrics
from vitatlas.learners.dbksvd import DBKSVD
from vitatlas.learners.dbksvd.coders import batch_omp, sparse_decode
from vitatlas.learners.dbksvd.ksvd_update import duplicates, ksvd_update, replace_unused, update_atom_batch

# K-SVD codes are signed: planted codes have random signs and magnitudes in [1, 2]
planted = functools.partial(planted_problem, n=8000, low=1.0, high=2.0, signed=True)
# the plain K-SVD of the papers (signed codes, no bias) for the signed, zero-mean planted problems; the
# defaults (centred, non-negative) are for activations
SIGNED = dict(center=False, nonnegative=False)


def small(seed=0, n=600, d=16):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ---- the K-SVD update --------------------------------------------------------------------------

def coded(seed=0, n_atoms=30, d=16, B=200, k=3):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Y = torch.from_numpy(rng.standard_normal((B, d)))
    Dt = torch.from_numpy(D)
    idx, val = batch_omp(Y @ Dt.T, Dt @ Dt.T, (Y * Y).sum(1), k)
    return Y, Dt, idx, val, Y - sparse_decode(idx, val, Dt)


def restricted_residual(R, D, idx, val, j):
    om = (idx == j).any(1).numpy()
    gam = val.numpy()[idx.numpy() == j]
    return R.numpy()[om] + gam[:, None] * D[j].numpy()


def test_one_atom_update_matches_numpy_svd():
    Y, D, idx, val, R = coded()
    j = 5
    U, S, Vt = np.linalg.svd(restricted_residual(R, D, idx, val, j), full_matrices=False)
    D2, R2, v2 = D.clone(), R.clone(), val.clone()
    update_atom_batch(R2, D2, idx, v2, torch.tensor([j]), n_power=200)
    sign = np.sign(D2[j].numpy() @ Vt[0])
    np.testing.assert_allclose(D2[j].numpy(), sign * Vt[0], atol=1e-6)
    np.testing.assert_allclose(v2.numpy()[idx.numpy() == j], sign * S[0] * U[:, 0], atol=1e-6)
    torch.testing.assert_close(R2, Y - sparse_decode(idx, v2, D2))  # residual kept consistent
    others = idx != j
    assert torch.equal(v2[others], val[others]) and torch.equal(D2[torch.arange(30) != j], D[torch.arange(30) != j])


def nonnegative_rank1_reference(E, d, n_power):
    """Slow non-negative rank-1 update: power steps with the codes clamped at 0 (v = max(E u, 0))."""
    u = d
    for _ in range(n_power):
        w = E.T @ np.maximum(E @ u, 0)
        u = w / np.linalg.norm(w) if np.linalg.norm(w) > 0 else u
    return u, np.maximum(E @ u, 0)


@pytest.mark.parametrize("n_power", [1, 3])
def test_nonnegative_atom_update_matches_numpy_reference(n_power):
    rng = np.random.default_rng(4)
    D = rng.standard_normal((30, 16))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Y = torch.from_numpy(rng.standard_normal((200, 16)))
    Dt = torch.from_numpy(D)
    # random supports and small codes: some samples point away from their atoms, their E·u are clamped
    idx = torch.from_numpy(np.stack([rng.choice(30, 3, replace=False) for _ in range(200)]))
    val = torch.from_numpy(rng.uniform(0, 0.3, idx.shape))
    R = Y - sparse_decode(idx, val, Dt)
    atoms = torch.tensor([2, 5, 11])
    D2, R2, v2 = Dt.clone(), R.clone(), val.clone()
    update_atom_batch(R2, D2, idx, v2, atoms, n_power=n_power, nonnegative=True)
    for j in atoms.tolist():  # atoms of one batch see the same residual snapshot
        u, v = nonnegative_rank1_reference(restricted_residual(R, Dt, idx, val, j), D[j], n_power)
        np.testing.assert_allclose(D2[j].numpy(), u, atol=1e-10)
        np.testing.assert_allclose(v2.numpy()[idx.numpy() == j], v, atol=1e-10)
    assert (v2 >= 0).all() and (v2 == 0).any()  # some codes were clamped
    torch.testing.assert_close(R2, Y - sparse_decode(idx, v2, D2))  # residual kept consistent
    # signed, the same update gives some negative codes: the option is what keeps them >= 0
    v3 = val.clone()
    update_atom_batch(R.clone(), Dt.clone(), idx, v3, atoms, n_power=n_power)
    assert (v3 < 0).any()


def test_few_warm_power_steps_are_near_optimal_and_approx_is_aksvd():
    Y, D, idx, val, R = coded(seed=1)
    j = 7
    E = restricted_residual(R, D, idx, val, j)
    best = np.linalg.svd(E, compute_uv=False)[0] ** 2
    D2, R2, v2 = D.clone(), R.clone(), val.clone()
    update_atom_batch(R2, D2, idx, v2, torch.tensor([j]), n_power=3)
    gained = np.sum((E @ D2[j].numpy()) ** 2)
    assert gained >= 0.999 * best
    # AK-SVD: d = Eᵀγ/‖Eᵀγ‖, γ = E d
    gam = val.numpy()[idx.numpy() == j]
    dk = E.T @ gam
    dk /= np.linalg.norm(dk)
    D3, R3, v3 = D.clone(), R.clone(), val.clone()
    update_atom_batch(R3, D3, idx, v3, torch.tensor([j]), approx=True)
    np.testing.assert_allclose(D3[j].numpy(), dk, atol=1e-10)
    np.testing.assert_allclose(v3.numpy()[idx.numpy() == j], E @ dk, atol=1e-10)


def test_memory_update_is_the_top_eigenvector_of_the_weighted_problem():
    """memory=ρ: the atom is the top eigenvector of E_jᵀE_j + ρ‖E_j d_old‖² d_old d_oldᵀ (numpy float64)."""
    Y, D, idx, val, R = coded(seed=4)
    j, rho = 9, 2.5
    E = restricted_residual(R, D, idx, val, j)
    d_old = D[j].numpy()
    M = E.T @ E + rho * np.sum((E @ d_old) ** 2) * np.outer(d_old, d_old)
    w, V = np.linalg.eigh(M)
    D2, R2, v2 = D.clone(), R.clone(), val.clone()
    update_atom_batch(R2, D2, idx, v2, torch.tensor([j]), n_power=300, memory=rho)
    sign = np.sign(D2[j].numpy() @ V[:, -1])
    np.testing.assert_allclose(D2[j].numpy(), sign * V[:, -1], atol=1e-6)
    np.testing.assert_allclose(v2.numpy()[idx.numpy() == j], E @ D2[j].numpy(), atol=1e-10)  # codes: E u
    torch.testing.assert_close(R2, Y - sparse_decode(idx, v2, D2))
    # memory=0 is plain K-SVD, and a larger memory keeps the atom closer to where it was
    D0, D9 = D.clone(), D.clone()
    update_atom_batch(R.clone(), D0, idx, val.clone(), torch.tensor([j]), n_power=300)
    update_atom_batch(R.clone(), D9, idx, val.clone(), torch.tensor([j]), n_power=300, memory=50.0)
    assert abs(float(D9[j] @ D[j])) > abs(float(D2[j] @ D[j])) > abs(float(D0[j] @ D[j]))


def test_batch_update_uses_one_snapshot():
    """Atoms of one batch are each updated against the same residual (Jacobi), as if done alone."""
    Y, D, idx, val, R = coded(seed=2)
    atoms = torch.tensor([3, 11, 17, 25])
    Db, Rb, vb = D.clone(), R.clone(), val.clone()
    update_atom_batch(Rb, Db, idx, vb, atoms, n_power=4)
    for j in atoms.tolist():
        Dj, Rj, vj = D.clone(), R.clone(), val.clone()
        update_atom_batch(Rj, Dj, idx, vj, torch.tensor([j]), n_power=4)
        torch.testing.assert_close(Db[j], Dj[j])
        torch.testing.assert_close(vb[idx == j], vj[idx == j])
    torch.testing.assert_close(Rb, Y - sparse_decode(idx, vb, Db))


@pytest.mark.parametrize("n,length", [(1, 0), (5, 0), (7, 30), (100, 1000), (3, 10)])
def test_csr_row_pointer_counts_the_ids_before_each_row(n, length):
    from vitatlas.learners.dbksvd.ksvd_update import _ptr

    ids = np.sort(np.random.default_rng(n + length).integers(0, n, size=length))
    want = np.searchsorted(ids, np.arange(n + 1))  # ptr[i] = how many ids are < i
    np.testing.assert_array_equal(_ptr(torch.from_numpy(ids), n).numpy(), want)


def test_duplicates_match_the_pairwise_definition():
    rng = np.random.default_rng(5)
    n = 40
    D = rng.normal(size=(n, 12))
    for a, b in [(1, 2), (3, 4), (4, 5), (7, 30), (10, 11)]:  # near-twins, a chain, and a sign-flipped one
        D[b] = (-1 if b == 11 else 1) * D[a] + 0.01 * rng.normal(size=12)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    G = D @ D.T
    counts = rng.integers(0, 3, size=n)  # ties in usage are frequent
    counts[[1, 2, 10, 11]] = [2, 2, 2, 1]
    trainable = np.setdiff1d(np.arange(n), [7])  # atom 7 is frozen: its twin 30 always loses
    rank = np.where(np.isin(np.arange(n), trainable), counts, np.inf)
    want = np.zeros(n, dtype=bool)
    for i in trainable:
        want[i] = any(abs(G[i, j]) > 0.97 and (rank[j] > rank[i] or (rank[j] == rank[i] and j < i))
                      for j in range(n) if j != i)
    got = duplicates(torch.from_numpy(G), torch.from_numpy(counts), torch.from_numpy(trainable), 0.97)
    np.testing.assert_array_equal(got.numpy(), want)
    assert want[[2, 30, 11]].all() and not want[[1, 7, 10]].any()


def test_full_sweep_reduces_residual_and_redraws_unused_and_duplicates():
    Y, D, idx, val, R = coded(seed=3)
    D = D.clone()
    D[29] = D[28]  # an exact twin
    idx = torch.where(idx == 4, torch.full_like(idx, -1), idx)  # atom 4 unused
    val = torch.where(idx >= 0, val, torch.zeros_like(val))
    R = Y - sparse_decode(idx, val, D)
    before = R.norm()
    G = D @ D.T
    counts = torch.bincount(idx[idx >= 0], minlength=30)
    dup = duplicates(G, counts, torch.arange(30), 0.97)
    assert dup.sum() == 1 and (dup[28] or dup[29])
    loser = 28 if dup[28] else 29
    D_before = D.clone()
    ksvd_update(R, D, idx, val, atom_batch=7, G=G, generator=torch.Generator().manual_seed(0))
    assert R.norm() < before
    torch.testing.assert_close(R, Y - sparse_decode(idx, val, D))
    torch.testing.assert_close(D.norm(dim=1), torch.ones(30, dtype=D.dtype))
    assert abs(float(D[4] @ D_before[4])) < 0.99
    cos = (D @ D.T).abs().fill_diagonal_(0)
    assert cos[[4, loser]].max() < 0.97  # the re-drawn atoms are new directions, not twins
    assert (val[idx == loser] == 0).all()  # the re-drawn twin lost its codes


def test_replace_unused_draws_rows_in_proportion_to_their_residual_energy():
    # one atom re-drawn 4,000 times with different seeds: each row's frequency ~ ‖r‖² / Σ‖r‖²
    R = torch.tensor([[0.1, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    energy = (R ** 2).sum(1)
    p = (energy / energy.sum()).numpy()
    counts = np.zeros(R.shape[0])
    trials = 4000
    for seed in range(trials):
        D = torch.eye(3, dtype=torch.float64)
        assert replace_unused(D, R, torch.tensor([1]), torch.Generator().manual_seed(seed)) == 1
        row = int(np.argmax(np.abs(R.numpy() @ D[1].numpy()) / np.maximum(R.norm(dim=1).numpy(), 1e-12)))
        torch.testing.assert_close(D[1], R[row] / R[row].norm())
        counts[row] += 1
    assert counts[3] == 0  # a row without residual is never drawn
    sigma = np.sqrt(trials * p * (1 - p))
    assert (np.abs(counts - trials * p) <= 4 * sigma + 1).all(), (counts, trials * p)


def test_replace_unused_takes_every_nonzero_row_when_it_needs_them_all():
    R = torch.tensor([[0.1, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -2.0]], dtype=torch.float64)
    D = torch.zeros(4, 3, dtype=torch.float64)
    assert replace_unused(D, R, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0)) == 4
    got = {tuple(np.round(row, 6)) for row in D[:3].numpy()}  # the three non-zero rows, in some order
    assert got == {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)}
    assert abs(float(D[3].norm()) - 1) < 1e-12  # the fourth: a random unit direction


def test_replace_unused_with_zero_residual_uses_random_unit_atoms():
    D = torch.eye(4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    n = replace_unused(D, torch.zeros(3, 4, dtype=torch.float64), torch.tensor([1, 2]), gen)
    assert n == 2 and torch.isfinite(D).all()
    torch.testing.assert_close(D.norm(dim=1), torch.ones(4, dtype=torch.float64))


# ---- the learner ---------------------------------------------------------------------------------

def test_planted_problem_recovers_atoms():
    X, D = planted()
    model = DBKSVD(256, 4, **SIGNED).fit(X, progress=False)
    assert recovered(model.atoms.numpy(), D) >= 0.99
    assert model.atoms.shape == (256, 64)
    torch.testing.assert_close(model.atoms.norm(dim=1), torch.ones(256))
    m = reconstruction_metrics(model, X[:2000])
    # the memory term (default 3) trades a little planted accuracy for real-data signal: EV 0.9974 vs 0.999
    assert m["signal_recovered"] > 0.96 and m["explained_variance"] > 0.995 and m["l0"] <= 4
    plain = DBKSVD(256, 4, memory=0, **SIGNED).fit(X, progress=False)
    assert reconstruction_metrics(plain, X[:2000])["explained_variance"] > 0.999


def test_mp_coder_float64_and_approx_run_and_improve():
    X, D = planted(n=3000, seed=1)
    for opts in ({"coder": "mp", "dtype": "float64"}, {"approx": True, "candidates": None}):
        model = DBKSVD(256, 4, epochs=8, sample_batch=1000, **opts, **SIGNED).fit(X, progress=False)
        assert model.atoms.dtype == (torch.float64 if opts.get("dtype") else torch.float32)
        assert model.history[-1] > model.history[0] + 0.1
        assert recovered(model.atoms.numpy(), D, 0.95) > 0.8


def test_encode_decode_reconstruct_and_types():
    X = small()
    model = DBKSVD(40, 3, epochs=2, **SIGNED).fit(X, progress=False)
    assert model.b_dec is None
    codes = model.encode(X)
    assert isinstance(codes, np.ndarray) and codes.shape == (600, 40) and ((codes != 0).sum(1) <= 3).all()
    np.testing.assert_allclose(model.decode(codes), codes @ model.atoms.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.reconstruct(X), model.decode(codes), rtol=1e-5, atol=1e-5)
    sc = model.encode_sparse(X)
    np.testing.assert_allclose(sc.to_dense().numpy(), codes)
    t = model.encode(torch.from_numpy(X))
    assert isinstance(t, torch.Tensor)
    # encoding is exact OMP: the same as scikit-learn's on the learned atoms
    from sklearn.linear_model import orthogonal_mp_gram
    A = model.atoms.double().numpy()
    ref = orthogonal_mp_gram(A @ A.T, (X[:50].astype(np.float64) @ A.T).T, n_nonzero_coefs=3).T
    assert ((ref != 0) == (codes[:50] != 0)).all()


def test_zero_rows_get_zero_codes():
    X = small()
    X[[0, 10, 20]] = 0
    model = DBKSVD(40, 3, epochs=2, center=False).fit(X, progress=False)
    codes = model.encode(X)
    assert np.isfinite(codes).all() and (codes[[0, 10, 20]] == 0).all()
    assert np.isfinite(model.atoms.numpy()).all()


def test_centred_nonnegative_codes_the_residual_from_the_data_mean():
    X = small() + 3.0  # a large shared mean, as activation tokens have
    model = DBKSVD(40, 3, epochs=2).fit(X, progress=False)  # the defaults: centred, non-negative
    np.testing.assert_allclose(model.b_dec.numpy(), X.astype(np.float64).mean(0), atol=1e-5)
    codes = model.encode(X)
    assert (codes >= 0).all() and ((codes != 0).sum(1) == 3).all()
    A = model.atoms.double()
    Y = torch.from_numpy(X.astype(np.float64)) - model.b_dec.double()
    idx, val = batch_omp(Y @ A.T, A @ A.T, (Y * Y).sum(1), 3, nonnegative=True)
    ref = to_dense_np(idx, val, 40)
    assert ((ref != 0) == (codes != 0)).mean() > 0.99  # float32 vs float64 ties aside: the same supports
    np.testing.assert_allclose(model.decode(codes), codes @ model.atoms.numpy() + model.b_dec.numpy(), atol=1e-5)
    np.testing.assert_allclose(model.reconstruct(X), model.decode(codes), atol=1e-5)
    # centring is what fits the shared mean: without it the same budget recovers less signal
    plain = DBKSVD(40, 3, epochs=2, center=False).fit(X, progress=False)
    assert reconstruction_metrics(model, X)["signal_recovered"] > reconstruction_metrics(plain, X)["signal_recovered"]


def to_dense_np(idx, val, n):
    out = np.zeros((idx.shape[0], n))
    rows, cols = np.nonzero(idx.numpy() >= 0)
    out[rows, idx.numpy()[rows, cols]] = val.numpy()[rows, cols]
    return out


def test_centred_run_saves_and_loads_its_bias_and_a_missing_bias_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    X = small() + 1.0
    model = DBKSVD(40, 3, epochs=1).fit(X, progress=False)
    model.save(tmp_path / "d")
    again = vitatlas.load(tmp_path / "d")
    assert torch.equal(again.b_dec, model.b_dec)
    np.testing.assert_array_equal(again.reconstruct(X), model.reconstruct(X))
    save_file({"atoms": model.atoms.contiguous()}, str(tmp_path / "d" / "dictionary.safetensors"))
    with pytest.raises(VitatlasError, match="no decoder bias b_dec"):
        vitatlas.load(tmp_path / "d")


def test_runs_saved_before_the_options_behave_as_then():
    from pathlib import Path

    from vitatlas.learners.dbksvd.learner import _fingerprint

    old = vitatlas.load(Path(__file__).parent / "data" / "legacy-runs" / "dbksvd")
    assert old.config.center is False and old.config.nonnegative is False and old.config.dup_threshold == 0.97
    assert old.b_dec is None and (old.encode(small(d=12)) < 0).any()  # signed codes, as then
    # a checkpoint written before the options existed is resumed by options that behave as it did
    X = small()
    cfg = DBKSVD(40, 3, **SIGNED, dup_threshold=0.97)._config()
    before = {k: v for k, v in cfg.items() if k not in ("center", "nonnegative", "dup_threshold")}
    assert _fingerprint(X, 600, 16, cfg) == _fingerprint(X, 600, 16, before)
    assert _fingerprint(X, 600, 16, DBKSVD(40, 3)._config()) != _fingerprint(X, 600, 16, before)


def test_reproducible_for_a_seed():
    X = small()
    a = DBKSVD(40, 3, epochs=3, sample_batch=200, seed=3).fit(X, progress=False).atoms
    b = DBKSVD(40, 3, epochs=3, sample_batch=200, seed=3).fit(X, progress=False).atoms
    c = DBKSVD(40, 3, epochs=3, sample_batch=200, seed=4).fit(X, progress=False).atoms
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_partial_fit_streams_batches():
    X = small(n=1200)
    model = DBKSVD(40, 3, sample_batch=300)
    for chunk in np.split(X, 4):
        model.partial_fit(chunk)
    assert len(model.history) == 4 and model.d == 16
    before = reconstruction_metrics(model, X)["signal_recovered"]
    for _ in range(3):
        model.partial_fit(X)
    assert reconstruction_metrics(model, X)["signal_recovered"] >= before - 1e-3


def test_save_load_round_trip(tmp_path):
    X = small()
    model = DBKSVD(40, 3, epochs=2, coder="mp").fit(X, progress=False)
    model.save(tmp_path / "d")
    again = vitatlas.load(tmp_path / "d")
    assert isinstance(again, DBKSVD) and again._config() == model._config()
    np.testing.assert_array_equal(again.encode(X), model.encode(X))
    assert DBKSVD(**model._config())._config() == model._config()


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    X = small(n=1000)
    opts = dict(epochs=3, sample_batch=128, checkpoint_every=3, seed=1)
    full = DBKSVD(40, 3, **opts).fit(X, progress=False)

    def kill(step, sr):
        if step == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        DBKSVD(40, 3, **opts).fit(X, checkpoint_dir=tmp_path / "ck", progress=False, callback=kill)
    seen = []
    resumed = DBKSVD(40, 3, **opts).fit(X, checkpoint_dir=tmp_path / "ck", progress=False,
                                         callback=lambda s, sr: seen.append(s))
    assert seen[0] == 10  # resumed after the checkpoint at step 9, not from scratch
    assert torch.equal(resumed.atoms, full.atoms)
    assert resumed.history == full.history
    # other options or other data: refused with one line
    with pytest.raises(VitatlasError, match="other options or other data"):
        DBKSVD(40, 3, **{**opts, "seed": 2}).fit(X, checkpoint_dir=tmp_path / "ck", progress=False)
    with pytest.raises(VitatlasError, match="other options or other data"):
        DBKSVD(40, 3, **opts).fit(X + 1, checkpoint_dir=tmp_path / "ck", progress=False)


def test_fit_ends_once_the_atoms_settle_and_stop_tol_zero_runs_the_whole_schedule():
    X, D = planted()  # 8,192 rows, batches of 4,096: the default schedule plans 80 epochs = 160 iterations
    settled = DBKSVD(256, 4, **SIGNED).fit(X, progress=False)
    assert 10 < len(settled.history) < 80 and settled._step == 160  # the rest of the schedule was skipped
    assert recovered(settled.atoms.numpy(), D) >= 0.99
    every = DBKSVD(256, 4, epochs=20, stop_tol=0, **SIGNED).fit(X, progress=False)
    assert len(every.history) == 40


def test_matryoshka_fit_that_ends_stages_early_resumes_exactly(tmp_path):
    X, _ = planted(n=2048, m=64)
    # a loose tolerance so that both stages end early on this small problem
    opts = dict(groups=(16, 64), epochs=10, sample_batch=512, checkpoint_every=2, stop_tol=0.02, seed=3)
    steps = []
    full = DBKSVD(64, 4, **opts).fit(X, progress=False, callback=lambda s, sr: steps.append(s))
    planned = 10 * 4  # slots per stage
    stage0, stage1 = [s for s in steps if s <= planned], [s for s in steps if s > planned]
    assert stage0[-1] < planned and steps[-1] < 2 * planned and len(stage1) >= 3  # both stages ended early

    def kill(step, sr):
        if step == stage1[2]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        DBKSVD(64, 4, **opts).fit(X, checkpoint_dir=tmp_path / "ck", progress=False, callback=kill)
    resumed = DBKSVD(64, 4, **opts).fit(X, checkpoint_dir=tmp_path / "ck", progress=False)
    assert torch.equal(resumed.atoms, full.atoms) and resumed.history == full.history


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    X = small()
    DBKSVD(40, 3, epochs=1, checkpoint_every=1).fit(X, checkpoint_dir=tmp_path, progress=False)
    path = next(tmp_path.glob("state-*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(VitatlasError, match="corrupt or truncated"):
        DBKSVD(40, 3, epochs=1, checkpoint_every=1).fit(X, checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(VitatlasError, match="corrupt"):
        DBKSVD(40, 3, epochs=1, checkpoint_every=1).fit(X, checkpoint_dir=tmp_path, progress=False)


def test_checkpoint_is_json_plus_safetensors_without_json_in_a_tensor(tmp_path):
    import json

    from vitatlas.io import load_safetensors

    DBKSVD(40, 3, epochs=1, sample_batch=200, checkpoint_every=2).fit(small(), checkpoint_dir=tmp_path, progress=False)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["format"] == "vitatlas-dbksvd-checkpoint" and state["step"] == 3 and len(state["history"]) == 3
    tensors = load_safetensors(tmp_path / state["weights"])
    assert set(tensors) == {"atoms", "rng", "b_dec"} and tensors["atoms"].shape == (40, 16)
    assert tensors["b_dec"].shape == (16,)
    assert [p.name for p in tmp_path.glob("state-*.safetensors")] == [state["weights"]]  # older ones removed


def test_fit_from_store(tmp_path):
    X, D = planted(n=3000, seed=2)
    store = ActivationStore.from_array(tmp_path / "s", X, dtype="float16", shard_bytes=64 * 2 * 700)
    model = DBKSVD(256, 4, sample_batch=1000, epochs=12, **SIGNED).fit(store, progress=False)
    assert model.fit_info["source"] == "store"
    assert recovered(model.atoms.numpy(), D, 0.95) > 0.9


def test_matryoshka_prefixes_are_dictionaries():
    X, D = planted(n=4000, seed=3)
    m = DBKSVD(256, 4, groups=[32, 96, 256], sample_batch=1000, epochs=4, seed=0).fit(X, progress=False)
    plain = DBKSVD(256, 4, sample_batch=1000, epochs=4, seed=0).fit(X, progress=False)
    assert len(m.history) == 3 * 4 * 4

    def prefix_score(model, p):
        sub = DBKSVD(p, 4)
        sub.set_atoms(model.atoms[:p].clone())
        return reconstruction_metrics(sub, X[:1000])["signal_recovered"]

    assert prefix_score(m, 32) > prefix_score(plain, 32) + 0.02
    assert prefix_score(m, 32) < prefix_score(m, 96) < prefix_score(m, 256)


@pytest.mark.parametrize("bad, match", [
    (dict(n_atoms=3, k=4), "smaller than k"),
    (dict(n_atoms=10, k=0), "positive integer"),
    (dict(n_atoms=10, k=2, coder="lasso"), "unknown coder"),
    (dict(n_atoms=10, k=2, dtype="float16"), "unknown dtype"),
    (dict(n_atoms=10, k=2, candidates="many"), "candidates"),
    (dict(n_atoms=10, k=2, tol=2.0), "tol"),
    (dict(n_atoms=10, k=2, groups=[4, 8]), "groups"),
    (dict(n_atoms=10, k=2, device="tpu"), "device"),
])
def test_bad_options(bad, match):
    with pytest.raises(VitatlasError, match=match):
        DBKSVD(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_cpu_machine_is_a_clear_error():
    with pytest.raises(VitatlasError, match="CUDA is not available"):
        DBKSVD(10, 2, device="cuda")


def test_bad_data():
    X = small()
    model = DBKSVD(10, 2, epochs=1)
    bad = X.copy()
    bad[5, 3] = np.nan
    with pytest.raises(VitatlasError, match="NaN or Inf"):
        model.fit(bad, progress=False)
    bad[5, 3] = np.inf
    with pytest.raises(VitatlasError, match="NaN or Inf"):
        model.fit(bad, progress=False)
    with pytest.raises(VitatlasError, match="2-D"):
        model.fit(X[0], progress=False)
    with pytest.raises(VitatlasError, match="empty"):
        model.fit(X[:0], progress=False)
    with pytest.raises(VitatlasError, match="must be smaller than the data width"):
        DBKSVD(40, 16).fit(X, progress=False)
    with pytest.raises(VitatlasError, match="not fitted"):
        model.encode(X)
    model.fit(X, progress=False)
    with pytest.raises(VitatlasError, match="width"):
        model.encode(X[:, :8])
    with pytest.raises(VitatlasError, match="width"):
        model.partial_fit(X[:, :8])


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_fits_saves_and_resumes(tmp_path):
    from click.testing import CliRunner

    from vitatlas.cli import main

    X, _ = planted(d=16, m=32, k=2, n=1500, seed=4)
    ActivationStore.from_array(tmp_path / "acts", X)
    args = ["fit", "dbksvd", "--acts", str(tmp_path / "acts"), "--atoms", "32", "--k", "2", "--out",
            str(tmp_path / "run"), "--epochs", "3", "--sample-batch", "500", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert "signal_recovered=" in last and "explained_variance=" in last and "seconds" in last
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "checkpoint").is_dir()
    model = vitatlas.load(tmp_path / "run")
    sr = float(last.split("signal_recovered=")[1].split()[0])
    assert abs(sr - reconstruction_metrics(model, X)["signal_recovered"]) < 1e-3
    again = CliRunner().invoke(main, args)  # re-run: resumes from the finished checkpoint
    assert again.exit_code == 0 and vitatlas.load(tmp_path / "run").atoms.equal(model.atoms)
    assert model.config.center and model.config.nonnegative  # the library's defaults when no flag is given
    other = [a if a != str(tmp_path / "run") else str(tmp_path / "signed") for a in args]
    signed = CliRunner().invoke(main, [*other, "--no-center", "--signed", "--dup-threshold", "0.9"])
    assert signed.exit_code == 0, signed.output
    cfg = vitatlas.load(tmp_path / "signed").config
    assert (cfg.center, cfg.nonnegative, cfg.dup_threshold) == (False, False, 0.9)


def test_cli_error_is_one_line(tmp_path, monkeypatch, capsys):
    from vitatlas.cli import run

    ActivationStore.from_array(tmp_path / "acts", small())
    monkeypatch.setattr(sys, "argv", ["vitatlas", "fit", "dbksvd", "--acts", str(tmp_path / "acts"), "--atoms", "8",
                                      "--k", "16", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_sweep_runs_bookkeeping_on_one_thread_products_on_all_and_gets_the_same_bits(monkeypatch):
    """``ksvd_update._Narrow``: the sparse products keep the caller's threads, the rest runs on one,
    the caller's count comes back (also after an error), and the results are those of no narrowing."""
    from vitatlas.learners.dbksvd import ksvd_update as ku

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Y, D0, idx, val0, R0 = coded(seed=5, n_atoms=40, d=24, B=600, k=4)
        G = D0 @ D0.T

        def sweep():
            R, D, val = R0.clone(), D0.clone(), val0.clone()
            ksvd_update(R, D, idx, val, atom_batch=9, n_power=2, G=G, generator=torch.Generator().manual_seed(1),
                        memory=1.5, dup_threshold=0.7)
            return R, D, val

        seen = []
        sampled = torch.sparse.sampled_addmm

        def spy(*a, **kw):
            seen.append(torch.get_num_threads())
            return sampled(*a, **kw)

        monkeypatch.setattr(torch.sparse, "sampled_addmm", spy)
        narrowed = sweep()
        assert seen and set(seen) == {2} and torch.get_num_threads() == 2
        init = ku._Narrow.__init__

        def off(self, device):  # no narrowing: every operation on the caller's threads, as before
            init(self, device)
            self.narrow = False

        monkeypatch.setattr(ku._Narrow, "__init__", off)
        plain = sweep()
        for a, b in zip(narrowed, plain, strict=True):
            assert torch.equal(a, b)
        monkeypatch.undo()
        with pytest.raises(RuntimeError), ku._Narrow(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
