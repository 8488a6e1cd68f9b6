"""The non-negative least-squares solve of the non-negative coders (``coders._nnls_gram``) against scipy.

Problems are built in the signal domain, min ‖y − A x‖ over x >= 0 with A (d, k), so scipy.optimize.nnls
solves them directly; ``_nnls_gram`` gets the Gram form G = AᵀA, c = Aᵀy and the least-squares
solution G⁻¹c, as ``_nonnegative_where_needed`` hands it over.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from vitatlas.learners.dbksvd import coders


def supports(B, k, d, seed, coherence=0.0):
    """B random unit-column supports A (B, d, k), columns sharing ``coherence`` of a common direction,
    and right-hand sides y (B, d)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((B, d, k)) + coherence * rng.standard_normal((B, d, 1))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    return A, rng.standard_normal((B, d))


def gram(A, y, dtype=torch.float64):
    G = torch.from_numpy(np.einsum("bdi,bdj->bij", A, A)).to(dtype)
    c = torch.from_numpy(np.einsum("bdi,bd->bi", A, y)).to(dtype)
    return G, c


def solve(G, c, **kw):
    return coders._nnls_gram(G, c, torch.linalg.solve(G, c), **kw)


def reference(A, y):
    return np.stack([nnls(A[b], y[b], maxiter=50 * A.shape[2])[0] for b in range(len(A))])


def assert_kkt(G, c, x, tol):
    """x >= 0, gradient G x − c zero where x > 0 and >= 0 where x = 0 (all within ``tol``·scale)."""
    G, c, x = G.double(), c.double(), x.double()
    scale = c.abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
    grad = torch.bmm(G, x.unsqueeze(2)).squeeze(2) - c
    assert (x >= 0).all()
    assert (grad[x > 0].abs() <= (tol * scale.expand_as(x))[x > 0]).all()
    assert (grad[x == 0] >= -(tol * scale.expand_as(x))[x == 0]).all()


@pytest.mark.parametrize("k", [1, 8, 32])
@pytest.mark.parametrize("coherence", [0.0, 3.0])
def test_matches_scipy_in_float64(k, coherence):
    # coherence 3: the columns share a large common direction (as DINOv2 atoms on one support do):
    # cond(G) in the thousands at k = 32, and many least-squares coefficients come out negative
    A, y = supports(120, k, max(2 * k, 4), seed=k, coherence=coherence)
    G, c = gram(A, y)
    x = solve(G, c).numpy()
    ref = reference(A, y)
    cond = np.linalg.cond(G.numpy()).max()
    # both are exact up to round-off: the data (c = Aᵀy) carry errors of eps·‖y‖ (unit columns), the
    # k × k solve multiplies them by up to cond(G), and the solve itself adds cond(G)·eps·|x|
    scale = np.abs(ref).max(axis=1, keepdims=True) + np.linalg.norm(y, axis=1, keepdims=True)
    assert (np.abs(x - ref) <= 100 * cond * np.finfo(np.float64).eps * scale).all()
    assert_kkt(G, c, torch.from_numpy(x), 1e-10)
    if k > 1:
        assert (ref == 0).any() and (ref > 0).any()  # both kinds of coordinates occur


def test_ill_conditioned_supports_and_the_kkt_conditions():
    # near-duplicate columns: cond(G) ~ 1e6–1e8
    A, y = supports(60, 8, 12, seed=3)
    A[:, :, 1] = A[:, :, 0] + 1e-3 * A[:, :, 1]
    A[:, :, 5] = A[:, :, 4] - 1e-4 * A[:, :, 5]
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    G, c = gram(A, y)
    cond = np.linalg.cond(G.numpy())
    assert cond.min() > 1e5
    x = solve(G, c)
    assert_kkt(G, c, x, 1e-7)
    ref = reference(A, y)
    scale = np.abs(ref).max(axis=1, keepdims=True) + np.linalg.norm(y, axis=1, keepdims=True)
    assert (np.abs(x.numpy() - ref) <= 100 * cond[:, None] * np.finfo(np.float64).eps * scale).all()


def test_padding_feasible_rows_and_zero_rhs():
    k, used = 8, 5
    A, y = supports(90, used, 10, seed=5, coherence=2.0)
    y[30:40] = 0  # zero right-hand sides
    y[40:60] = np.einsum("bdi,bi->bd", A[40:60], np.abs(np.random.default_rng(6).standard_normal((20, used))))
    G5, c5 = gram(A, y)
    # the coders' padded form: slots past the support get an identity row and c = 0
    G = torch.eye(k, dtype=torch.float64).repeat(len(A), 1, 1)
    G[:, :used, :used] = G5
    c = torch.zeros(len(A), k, dtype=torch.float64)
    c[:, :used] = c5
    x = solve(G, c)
    assert (x[:, used:] == 0).all()
    ref = reference(A, y)
    np.testing.assert_allclose(x[:, :used].numpy(), ref, atol=1e-10)
    assert (x[30:40] == 0).all()
    # rows whose least-squares solution is already >= 0 keep it
    ls = torch.linalg.solve(G, c)
    feasible = (ls >= 0).all(dim=1)
    assert feasible[40:60].all() and not feasible.all()
    torch.testing.assert_close(x[feasible], ls[feasible], rtol=0, atol=1e-12)
    assert_kkt(G, c, x, 1e-10)


@pytest.mark.parametrize("k", [8, 32])
def test_float32_within_condition_times_eps(k):
    A, y = supports(200, k, 2 * k, seed=7 + k, coherence=3.0)
    G64, c64 = gram(A, y)
    x64 = solve(G64, c64)
    x32 = solve(G64.float(), c64.float())
    assert x32.dtype == torch.float32 and (x32 >= 0).all()
    # Rounding G, c to float32 and a backward-stable Cholesky solve perturb the data by O(eps32)
    # (relative to |x| and ‖y‖); the NNLS solution moves by at most ~cond(G) times that, also
    # where a coordinate near 0 lands on the other side of the partition. 20·cond·eps32 bounds it here.
    cond = torch.linalg.cond(G64).unsqueeze(1)
    scale = x64.abs().amax(dim=1, keepdim=True) + torch.from_numpy(np.linalg.norm(y, axis=1, keepdims=True))
    err = (x32.double() - x64).abs()
    assert (err <= 20 * cond * torch.finfo(torch.float32).eps * scale).all()
    assert_kkt(G64, c64, x32, 20 * cond.max().item() * torch.finfo(torch.float32).eps)


def test_single_pivot_backup_rule_alone_is_exact(monkeypatch):
    # no block exchange without progress: every stall goes straight to Murty's one-coordinate rule
    monkeypatch.setattr(coders, "NNLS_PIVOTS", 0)
    A, y = supports(100, 12, 16, seed=9, coherence=3.0)
    G, c = gram(A, y)
    np.testing.assert_allclose(solve(G, c).numpy(), reference(A, y), atol=1e-9)


def test_iteration_cap_and_singular_supports_fall_back_to_coordinate_descent(monkeypatch):
    A, y = supports(40, 6, 10, seed=13, coherence=1.5)
    G, c = gram(A, y)
    ref = reference(A, y)
    finished = []
    descent = coders._nnls_descent
    monkeypatch.setattr(coders, "_nnls_descent", lambda G, c, x: finished.append(len(c)) or descent(G, c, x))
    x = solve(G, c, max_iter=1)  # rows not settled by one solve go to the descent
    assert finished and 0 < finished[0] < len(A)
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-8)
    # a duplicated atom: G_SS is singular, no Cholesky on it; the descent still reaches the optimum value
    finished.clear()
    A2 = A.copy()
    A2[:, :, 3] = A2[:, :, 2]
    G2, c2 = gram(A2, y)
    x2 = coders._nnls_gram(G2, c2, torch.linalg.lstsq(G2, c2.unsqueeze(2)).solution.squeeze(2))
    assert finished
    ref2 = reference(A2, y)
    r_mine = y - np.einsum("bdi,bi->bd", A2, x2.numpy())
    r_ref = y - np.einsum("bdi,bi->bd", A2, ref2)
    np.testing.assert_allclose((r_mine ** 2).sum(1), (r_ref ** 2).sum(1), rtol=1e-8)
    assert (x2 >= 0).all()


def test_settles_in_a_handful_of_solves(monkeypatch):
    # the point of block pivoting: few batched solves, each on fewer rows than the one before
    A, y = supports(300, 32, 48, seed=17, coherence=3.0)
    G, c = gram(A, y)
    rows = []
    chol = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda M: rows.append(M.shape[0]) or chol(M))
    x = solve(G, c)
    np.testing.assert_allclose(x.numpy(), reference(A, y), atol=1e-9)
    assert len(rows) <= 12 and rows == sorted(rows, reverse=True) and rows[-1] < rows[0]
