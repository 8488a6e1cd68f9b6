"""Sparse coders against slow references: scikit-learn's orthogonal_mp_gram and a numpy MP."""

import itertools
import time
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

from vitatlas.errors import VitatlasError
from vitatlas.learners.dbksvd import coders
from vitatlas.learners.dbksvd.coders import (
    batch_omp,
    code,
    code_signals,
    matching_pursuit,
    residual,
    sparse_decode,
    to_dense,
)


def problem(B=40, d=24, n=60, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Y = rng.standard_normal((B, d))
    return D.astype(dtype), Y.astype(dtype)


def products(D, Y):
    Dt, Yt = torch.from_numpy(D), torch.from_numpy(Y)
    return Yt @ Dt.T, Dt @ Dt.T, (Yt * Yt).sum(1)


def mp_reference(D, y, k, max_steps, tol=0.0, refit=False):
    """Slow per-sample MP in the signal domain, same rules as the batched one."""
    r = y.copy()
    coef = {}
    floor = 64 * np.finfo(y.dtype).eps * np.linalg.norm(y)
    for _ in range(max_steps):
        if r @ r <= max(tol ** 2, 16 * np.finfo(y.dtype).eps) * (y @ y):
            break
        corr = D @ r
        if len(coef) >= k:
            mask = np.full(len(corr), -1.0)
            sel = list(coef)
            mask[sel] = np.abs(corr[sel])
            j = int(np.argmax(mask))
        else:
            j = int(np.argmax(np.abs(corr)))
        if abs(corr[j]) <= floor:
            break
        coef[j] = coef.get(j, 0.0) + corr[j]
        r = r - corr[j] * D[j]
    if refit and coef:
        S = list(coef)
        sol, *_ = np.linalg.lstsq(D[S].T, y, rcond=None)
        coef = dict(zip(S, sol))
    return coef


def as_dict(idx, val):
    return {int(i): float(v) for i, v in zip(idx, val) if i >= 0}


@pytest.mark.parametrize("k", [1, 5, 9])
def test_omp_matches_sklearn_fixed_k(k):
    D, Y = problem()
    C, G, ysq = products(D, Y)
    idx, val = batch_omp(C, G, ysq, k)
    ref = orthogonal_mp_gram(D @ D.T, (Y @ D.T).T, n_nonzero_coefs=k)  # (n, B)
    for b in range(Y.shape[0]):
        mine = as_dict(idx[b].numpy(), val[b].numpy())
        theirs = {int(i): ref[i, b] for i in np.flatnonzero(ref[:, b])}
        assert set(mine) == set(theirs)
        for i in mine:
            assert abs(mine[i] - theirs[i]) < 1e-6


def test_omp_matches_sklearn_tolerance_stop():
    D, Y = problem(seed=1)
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)  # unit rows: sklearn's absolute tol == relative tol
    C, G, ysq = products(D, Y)
    tol = 0.5
    idx, val = batch_omp(C, G, ysq, 20, tol=tol)
    ref = orthogonal_mp_gram(D @ D.T, (Y @ D.T).T, tol=tol ** 2, norms_squared=(Y * Y).sum(1))
    nnz = (idx >= 0).sum(1).numpy()
    assert nnz.min() >= 1 and nnz.max() < 20 and len(set(nnz)) > 1  # tol really stopped rows at varied sizes
    for b in range(Y.shape[0]):
        mine = as_dict(idx[b].numpy(), val[b].numpy())
        theirs = {int(i): ref[i, b] for i in np.flatnonzero(ref[:, b])}
        assert set(mine) == set(theirs)
        np.testing.assert_allclose([mine[i] for i in sorted(mine)], [theirs[i] for i in sorted(mine)], atol=1e-6)
    resid = np.linalg.norm(Y - to_dense(idx, val, D.shape[0]).numpy() @ D, axis=1)
    assert (resid <= tol + 1e-9).all()


@pytest.mark.parametrize("k,steps,refit,tol", [(3, 12, False, 0.0), (5, 20, True, 0.0), (4, 6, False, 0.6),
                                               (6, 24, True, 0.4)])
def test_mp_matches_numpy_reference(k, steps, refit, tol):
    D, Y = problem(seed=2)
    C, G, ysq = products(D, Y)
    idx, val = matching_pursuit(C, G, ysq, k, max_steps=steps, refit=refit, tol=tol)
    assert ((idx >= 0).sum(1) <= k).all()
    for b in range(Y.shape[0]):
        ref = mp_reference(D, Y[b], k, steps, tol=tol, refit=refit)
        mine = as_dict(idx[b].numpy(), val[b].numpy())
        assert set(mine) == set(ref)
        for i in ref:
            assert abs(mine[i] - ref[i]) < 1e-9


@pytest.mark.parametrize("coder", ["mp", "omp"])
def test_float32_close_to_float64_and_zero_rows(coder):
    D, Y = problem(seed=3)
    Y[[0, 7]] = 0.0
    out = {}
    for dt in (np.float32, np.float64):
        C, G, ysq = products(D.astype(dt), Y.astype(dt))
        out[dt] = code(C, G, ysq, 4, coder=coder)
    i32, v32 = out[np.float32]
    i64, v64 = out[np.float64]
    assert v32.dtype == torch.float32 and v64.dtype == torch.float64
    assert torch.isfinite(v32).all() and torch.isfinite(v64).all()
    for b in (0, 7):  # zero rows: zero codes, not NaN
        assert (i64[b] == -1).all() and (v64[b] == 0).all()
    agree = (torch.sort(i32, 1).values == torch.sort(i64, 1).values).all(1).float().mean()
    assert agree > 0.9
    d32 = to_dense(i32, v32, D.shape[0]).double()
    d64 = to_dense(i64, v64, D.shape[0])
    same = (torch.sort(i32, 1).values == torch.sort(i64, 1).values).all(1)
    assert torch.allclose(d32[same], d64[same], atol=1e-4)


def test_exactly_sparse_signal_is_recovered_and_stops():
    D, _ = problem(n=50, d=30, seed=4)
    rng = np.random.default_rng(4)
    Y = np.zeros((10, 30))
    truth = []
    for b in range(10):
        S = rng.choice(50, 3, replace=False)
        c = rng.uniform(1, 2, 3) * rng.choice([-1, 1], 3)
        Y[b] = c @ D[S]
        truth.append(dict(zip(S.tolist(), c)))
    C, G, ysq = products(D, Y)
    idx, val = batch_omp(C, G, ysq, 8)  # k larger than needed: stops once the residual vanishes
    nnz = (idx >= 0).sum(1)
    assert (nnz < 8).all() and (nnz == 3).float().mean() >= 0.8
    resid = np.linalg.norm(Y - to_dense(idx, val, 50).numpy() @ D, axis=1)
    assert resid.max() < 1e-7
    for b in range(10):
        mine = as_dict(idx[b].numpy(), val[b].numpy())
        assert set(truth[b]) <= set(mine)
        if len(mine) == 3:
            assert max(abs(mine[i] - truth[b][i]) for i in mine) < 1e-8


@pytest.mark.parametrize("coder", ["mp", "omp"])
def test_candidate_screening_agrees_with_exact_on_sparse_signals(coder):
    rng = np.random.default_rng(5)
    n, d = 200, 64
    D = rng.standard_normal((n, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    codes = np.zeros((300, n))
    for b in range(300):
        codes[b, rng.choice(n, 4, replace=False)] = rng.uniform(1, 2, 4) * rng.choice([-1, 1], 4)
    Y = codes @ D + 0.01 * rng.standard_normal((300, d))
    C, G, ysq = products(D, Y)
    exact = code(C, G, ysq, 4, coder=coder)

    def agreement(M):
        idx, val = code(C, G, ysq, 4, coder=coder, candidates=M)
        same = (torch.sort(exact[0], 1).values == torch.sort(idx, 1).values).all(1).float().mean().item()
        resid = np.linalg.norm(Y - sparse_decode(idx, val, torch.from_numpy(D)).numpy(), axis=1).mean()
        return same, resid

    # screening is an approximation whose error shrinks as the candidate set grows, and vanishes at n
    (a8, r8), (a32, r32), (a100, r100), (a200, r200) = map(agreement, (8, 32, 100, 200))
    r_exact = np.linalg.norm(Y - sparse_decode(*exact, torch.from_numpy(D)).numpy(), axis=1).mean()
    assert a8 < a32 < a100 <= a200 == 1.0 and r8 > r32 > r100 >= r200 - 1e-12
    assert a32 > 0.9 and a100 > 0.99 and abs(r200 - r_exact) < 1e-12


def test_sparse_decode_and_to_dense_match_dense_product():
    D, Y = problem(seed=6)
    C, G, ysq = products(D, Y)
    idx, val = batch_omp(C, G, ysq, 5)
    dense = to_dense(idx, val, D.shape[0])
    assert ((dense != 0).sum(1) == (idx >= 0).sum(1)).all()
    torch.testing.assert_close(sparse_decode(idx, val, torch.from_numpy(D)), dense @ torch.from_numpy(D))


@pytest.mark.parametrize("coder", ["mp", "omp"])
@pytest.mark.parametrize("candidates", [None, 16])
def test_code_signals_matches_code_on_the_full_product(coder, candidates):
    # code_signals forms Y Dᵀ in row chunks (a ragged last one here) and codes each chunk: same codes
    D, Y = problem(B=50, seed=7)
    C, G, ysq = products(D, Y)
    want = code(C, G, ysq, 5, coder=coder, candidates=candidates)
    Yt, Dt = torch.from_numpy(Y), torch.from_numpy(D)
    R = torch.full_like(Yt, float("nan"))
    got = code_signals(Yt, Dt, G, 5, coder=coder, candidates=candidates, chunk=16, residual_out=R)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(R, Yt - sparse_decode(got[0], got[1], Dt))  # every chunk's rows written


@pytest.mark.parametrize("coder", ["mp", "omp"])
def test_code_signals_on_single_threaded_workers_equals_one_thread(coder, monkeypatch):
    # with 2 torch threads the chunks go to 2 workers of one thread each: every chunk is the same
    # single-threaded computation as with 1 thread, so the codes are bit-identical
    D, Y = problem(B=203, d=32, n=96, seed=9, dtype=np.float32)
    Yt, Dt = torch.from_numpy(Y), torch.from_numpy(D)
    G = Dt @ Dt.T
    R1, R2 = torch.empty_like(Yt), torch.empty_like(Yt)
    want = code_signals(Yt, Dt, G, 5, coder=coder, candidates=20, chunk=16, residual_out=R1)  # 1 thread
    torch.set_num_threads(2)
    calls = []
    monkeypatch.setattr(coders, "_on_single_threaded_workers",
                        lambda work, n: calls.append(n) or real_workers(work, n))
    filters = list(warnings.filters)
    got = code_signals(Yt, Dt, G, 5, coder=coder, candidates=20, chunk=16, residual_out=R2)
    assert calls == [2] and torch.get_num_threads() == 2  # the workers ran; the caller's count is back
    assert warnings.filters == filters  # the workers never touch the process-wide warning filters
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(R2, R1)


real_workers = coders._on_single_threaded_workers


def test_a_failing_chunk_stops_the_workers_and_restores_the_thread_count(monkeypatch):
    D, Y = problem(B=400, d=32, n=96, seed=10, dtype=np.float32)
    Yt, Dt = torch.from_numpy(Y), torch.from_numpy(D)
    calls = itertools.count(1)  # next() on it is atomic: exactly one call is the third
    seen = []

    def failing_code(C, *args, **kwargs):
        n = next(calls)
        seen.append(n)
        if n == 3:
            raise VitatlasError("chunk 3 failed")
        if n > 3:
            time.sleep(0.02)  # slow chunks after the failure: without the stop, all 50 would be coded
        return real_code(C, *args, **kwargs)

    real_code = coders.code
    monkeypatch.setattr(coders, "code", failing_code)
    torch.set_num_threads(2)
    with pytest.raises(VitatlasError, match="chunk 3 failed"):
        code_signals(Yt, Dt, Dt @ Dt.T, 5, candidates=20, chunk=8)  # 50 chunks
    assert torch.get_num_threads() == 2
    assert len(seen) <= 5  # the other worker stopped after its chunk in flight, not after all 50


def test_residual_matches_decode():
    D, Y = problem(seed=8)
    C, G, ysq = products(D, Y)
    idx, val = batch_omp(C, G, ysq, 5)
    Yt, Dt = torch.from_numpy(Y), torch.from_numpy(D)
    torch.testing.assert_close(residual(Yt, idx, val, Dt), Yt - sparse_decode(idx, val, Dt))
    buf = torch.full((Yt.shape[0] + 3, Yt.shape[1]), float("nan"), dtype=Yt.dtype)  # a reused, larger buffer
    got = residual(Yt, idx, val, Dt, out=buf[:Yt.shape[0]])
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, Yt - sparse_decode(idx, val, Dt))


def test_bad_arguments():
    D, Y = problem()
    C, G, ysq = products(D, Y)
    with pytest.raises(VitatlasError, match="unknown coder"):
        code(C, G, ysq, 3, coder="lasso")
    with pytest.raises(VitatlasError, match="positive"):
        batch_omp(C, G, ysq, 0)
    with pytest.raises(VitatlasError, match="inconsistent"):
        matching_pursuit(C, G[:5], ysq, 3)


def test_two_level_top_abs_is_exact():
    from vitatlas.learners.dbksvd.coders import _top_abs

    C = torch.randn(200, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for M in (5, 40, 63):
        got = torch.sort(_top_abs(C, M), 1).values
        ref = torch.sort(torch.topk(C.abs(), M, dim=1).indices, 1).values
        assert torch.equal(got, ref)


@pytest.mark.parametrize("n", [512, 509])  # strided runs, and the fallback when n is not a multiple of 8
def test_argmax_abs_matches_numpy(n):
    from vitatlas.learners.dbksvd.coders import _argmax_abs

    C = torch.randn(300, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    C[::3] *= -1  # the largest |value| is often a negative one
    want = np.abs(C.numpy()).argmax(axis=1)
    assert np.array_equal(_argmax_abs(C).squeeze(1).numpy(), want)


def test_screen_keeps_the_first_choice_and_the_atoms_most_correlated_after_it():
    from vitatlas.learners.dbksvd.coders import _screen

    D, Y = problem(seed=11)
    C, G, _ = products(D, Y)
    M = 6
    cc, cand = _screen(C, G, M)
    Cn, Gn = C.numpy(), G.numpy()
    for b in range(C.shape[0]):
        j = int(np.abs(Cn[b]).argmax())
        after = np.abs(Cn[b] - Cn[b, j] * Gn[j])
        after[j] = np.inf
        assert set(cand[b].tolist()) == set(np.argsort(-after)[:M].tolist())
        np.testing.assert_array_equal(cc[b].numpy(), Cn[b, cand[b].numpy()])


# ---- non-negative coding ------------------------------------------------------------------------------

def nnls_reference(A, y):
    from scipy.optimize import nnls
    return nnls(A, y)[0]


def nn_omp_reference(D, y, k):
    """Slow non-negative OMP: pick the largest positive correlation with the least-squares residual,
    then the non-negative least-squares coefficients on the chosen support (scipy's nnls)."""
    S, r = [], y.copy()
    floor = 64 * np.finfo(y.dtype).eps * np.linalg.norm(y)
    for _ in range(k):
        if r @ r <= 16 * np.finfo(y.dtype).eps * (y @ y):
            break
        corr = D @ r
        corr[S] = -np.inf
        j = int(np.argmax(corr))
        if corr[j] <= floor:
            break
        S.append(j)
        sol, *_ = np.linalg.lstsq(D[S].T, y, rcond=None)
        r = y - D[S].T @ sol
    return dict(zip(S, nnls_reference(D[S].T, y))) if S else {}


def nn_mp_reference(D, y, k, max_steps, refit):
    """Slow non-negative MP: each step adds the largest positive correlation (inside the support once full)."""
    r, coef = y.copy(), {}
    floor = 64 * np.finfo(y.dtype).eps * np.linalg.norm(y)
    for _ in range(max_steps):
        if r @ r <= 16 * np.finfo(y.dtype).eps * (y @ y):
            break
        corr = D @ r
        if len(coef) >= k:
            keep = np.full(len(corr), -np.inf)
            keep[list(coef)] = corr[list(coef)]
            corr = keep
        j = int(np.argmax(corr))
        if corr[j] <= floor:
            break
        coef[j] = coef.get(j, 0.0) + corr[j]
        r = r - corr[j] * D[j]
    if refit and coef:
        coef = dict(zip(coef, nnls_reference(D[list(coef)].T, y)))
    return coef


def assert_same_codes(idx, val, refs, atol):
    for b, ref in enumerate(refs):
        mine = as_dict(idx[b].numpy(), val[b].numpy())
        assert set(mine) == set(ref), b
        np.testing.assert_allclose([mine[i] for i in sorted(ref)], [ref[i] for i in sorted(ref)], atol=atol)


@pytest.mark.parametrize("k", [1, 4, 7])
def test_nonnegative_omp_matches_numpy_reference(k):
    D, Y = problem(B=200, d=12, seed=11)  # few dimensions: some least-squares fits go negative
    C, G, ysq = products(D, Y)
    idx, val = batch_omp(C, G, ysq, k, nonnegative=True)
    assert (val >= 0).all()
    refs = [nn_omp_reference(D, Y[b], k) for b in range(Y.shape[0])]
    # the NNLS step really ran: some least-squares fits on these supports have negative coefficients
    if k == 7:
        assert sum(min(np.linalg.lstsq(D[list(r)].T, Y[b], rcond=None)[0]) < 0 for b, r in enumerate(refs) if r) >= 3
    assert_same_codes(idx, val, refs, 1e-8)  # float64; coordinate descent stops at round-off


@pytest.mark.parametrize("k,steps,refit", [(3, 12, False), (5, 20, True), (6, 6, False)])
def test_nonnegative_mp_matches_numpy_reference(k, steps, refit):
    D, Y = problem(seed=12)
    C, G, ysq = products(D, Y)
    idx, val = matching_pursuit(C, G, ysq, k, max_steps=steps, refit=refit, nonnegative=True)
    assert (val >= 0).all() and ((idx >= 0).sum(1) <= k).all()
    refs = [nn_mp_reference(D, Y[b], k, steps, refit) for b in range(Y.shape[0])]
    assert_same_codes(idx, val, refs, 1e-8 if refit else 1e-10)


def test_nnls_gram_matches_scipy_on_coherent_supports():
    rng = np.random.default_rng(13)
    B, k, d = 50, 6, 10
    A = rng.standard_normal((B, d, k)) + 1.5 * rng.standard_normal((B, d, 1))  # correlated columns
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    y = rng.standard_normal((B, d))
    Gss = torch.from_numpy(np.einsum("bdi,bdj->bij", A, A))
    rhs = torch.from_numpy(np.einsum("bdi,bd->bi", A, y))
    ls = torch.linalg.solve(Gss, rhs)
    x = coders._nnls_gram(Gss, rhs, ls).numpy()
    ref = np.stack([nnls_reference(A[b], y[b]) for b in range(B)])
    assert (ref == 0).any() and (ref > 0).any()  # both kinds of coordinates occur
    np.testing.assert_allclose(x, ref, atol=1e-8)
    # the coordinate descent that finishes the rows the active-set guess leaves, on its own, from 0
    x = coders._nnls_descent(Gss, rhs, torch.zeros(B, k, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(x, ref, atol=1e-8)


@pytest.mark.parametrize("coder", ["mp", "omp"])
def test_nonnegative_screened_coding_is_nonnegative_and_starts_at_the_largest_positive_correlation(coder):
    D, Y = problem(B=300, d=24, n=200, seed=14)
    Dt, Yt = torch.from_numpy(D).float(), torch.from_numpy(Y).float()
    R = torch.empty_like(Yt)
    idx, val = code_signals(Yt, Dt, Dt @ Dt.T, 5, coder=coder, candidates=20, chunk=64, residual_out=R,
                            nonnegative=True)
    assert (val >= 0).all() and ((idx >= 0).sum(1) == 5).all()
    first = (Yt @ Dt.T).argmax(dim=1)
    assert (idx == first.unsqueeze(1)).any(dim=1).all()
    torch.testing.assert_close(R, residual(Yt, idx, val, Dt), rtol=0, atol=1e-5)
    # signed coding of the same rows uses negative coefficients: the option changes the codes
    _, signed = code_signals(Yt, Dt, Dt @ Dt.T, 5, coder=coder, candidates=20, chunk=64)
    assert (signed < 0).any()


def test_run_abs_max_is_the_max_of_abs_over_the_runs():
    C = torch.randn(50, 8, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    C[::2] *= -3  # the largest |value| of many runs is a negative one
    assert torch.equal(coders._run_abs_max(C), C.abs().amax(dim=1))


@pytest.mark.parametrize("nonnegative", [False, True])
def test_screened_candidates_come_in_ascending_atom_order_and_a_scratch_buffer_changes_nothing(nonnegative):
    D, Y = problem(B=70, n=128, seed=12)
    C, G, _ = products(D, Y)
    cc, cand = coders._screen(C, G, 16, nonnegative)
    assert (cand.diff(dim=1) > 0).all()
    work = torch.full((90, 128), float("nan"), dtype=C.dtype)  # more rows than C, garbage in it
    cc2, cand2 = coders._screen(C, G, 16, nonnegative, out=work)
    assert torch.equal(cc, cc2) and torch.equal(cand, cand2)


@pytest.mark.parametrize(("coder", "nonnegative"), [("omp", False), ("omp", True), ("mp", False), ("mp", True)])
def test_screened_codes_do_not_depend_on_the_order_of_the_candidates(monkeypatch, coder, nonnegative):
    """The candidates' order (ascending since the Gram gathers read rows front to back) changes no
    support and no coefficient bit: each candidate's arithmetic is its own."""
    D, Y = problem(B=120, d=32, n=256, seed=13)
    C, G, ysq = products(D, Y)
    kw = dict(coder=coder, candidates=24, nonnegative=nonnegative, refit=True)
    want = code(C, G, ysq, 5, **kw)
    screen = coders._screen

    def shuffled(*args, **kwargs):
        cc, cand = screen(*args, **kwargs)
        perm = torch.argsort(torch.rand(cand.shape, generator=torch.Generator().manual_seed(5)), dim=1)
        return torch.gather(cc, 1, perm), torch.gather(cand, 1, perm)

    monkeypatch.setattr(coders, "_screen", shuffled)
    got = code(C, G, ysq, 5, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
