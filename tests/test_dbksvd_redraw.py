"""DBK-SVD re-draws and early stop (issue 19 part 5): a re-drawn atom starts from a residual row plus its
share of its most used atom (which splits an atom that covers two directions), rarely used atoms are
re-drawn once the atoms settle, a stage does not end while atoms are being re-drawn, and partial_fit
reads shuffled, reproducible batches."""

import math

import numpy as np
import torch
from _planted import planted, recovered

from vitatlas.learners.dbksvd import DBKSVD
from vitatlas.learners.dbksvd import learner as learner_module
from vitatlas.learners.dbksvd.coders import sparse_decode
from vitatlas.learners.dbksvd.ksvd_update import RARE, ksvd_update, replace_unused

SIGNED = dict(center=False, nonnegative=False)
E = torch.eye(4, dtype=torch.float64)


def merged_problem():
    """Atom 0 sits between e0 and e1; row 0 = 2 e0 + e2, coded with atoms 0 and 1 (= e2); rows 1-3 fit exactly."""
    D = torch.stack([(E[0] + E[1]) / math.sqrt(2), E[2], E[3], E[3]])
    Y = torch.stack([2 * E[0] + E[2], 3 * D[0], 2 * D[0], -D[0]])
    idx = torch.tensor([[0, 1], [0, -1], [0, -1], [0, -1]])
    val = torch.tensor([[math.sqrt(2), 1.0], [3.0, 0.0], [2.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    R = Y - sparse_decode(idx, val, D)
    counts = torch.bincount(idx[idx >= 0], minlength=4)
    return D, R, idx, val, counts


def test_redrawn_atom_is_the_drawn_rows_share_of_its_most_used_atom():
    D, R, idx, val, counts = merged_problem()
    torch.testing.assert_close(R[0], E[0] - E[1])  # the residual alone points between the two directions
    # reference: the drawn row (the only one with residual) plus its code on its most used atom (0, used 4x)
    want = R[0] + val[0, 0] * D[0]
    got = D.clone()
    assert replace_unused(got, R, torch.tensor([3]), torch.Generator().manual_seed(0), codes=(idx, val, counts)) == 1
    torch.testing.assert_close(got[3], want / want.norm())
    torch.testing.assert_close(got[3], E[0])  # the missing direction itself: atom 0 can now move to e1
    torch.testing.assert_close(got[:3], D[:3])
    plain = D.clone()  # without the codes: the residual row, as before
    replace_unused(plain, R, torch.tensor([3]), torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain[3], (E[0] - E[1]) / math.sqrt(2))


def test_redraw_never_takes_the_share_of_an_atom_being_redrawn():
    D, R, idx, val, counts = merged_problem()
    got = D.clone()
    # atom 0 is re-drawn itself: the row's next most used atom (1) gives the share
    replace_unused(got, R, torch.tensor([0, 3]), torch.Generator().manual_seed(0), codes=(idx, val, counts))
    want = R[0] + val[0, 1] * D[1]
    torch.testing.assert_close(got[0], want / want.norm())
    torch.testing.assert_close(got.norm(dim=1), torch.ones(4, dtype=torch.float64))  # atom 3: a random unit


def test_rarely_used_atoms_are_redrawn_and_counted():
    rng = np.random.default_rng(0)
    n_atoms, d, B, k = 30, 16, 400, 3
    D = torch.from_numpy(rng.standard_normal((n_atoms, d)))
    D /= D.norm(dim=1, keepdim=True)
    # every row uses 3 of atoms 0-27; atom 28 is used once (mean use 40: far below RARE x mean), 29 never
    idx = torch.from_numpy(np.stack([rng.choice(28, k, replace=False) for _ in range(B)]))
    idx[0, 0] = 28
    val = torch.from_numpy(rng.uniform(1, 2, (B, k)))
    Y = torch.from_numpy(rng.standard_normal((B, d)))
    R = Y - sparse_decode(idx, val, D)
    counts = torch.bincount(idx.flatten(), minlength=n_atoms)
    floor = RARE * float(counts.sum()) / n_atoms
    assert counts[28] == 1 < floor and counts[29] == 0 and int((counts < floor).sum()) == 2
    D_before, info = D.clone(), {}
    early = {}  # before the atoms settle (rare=False) only the unused atom is re-drawn
    ksvd_update(R.clone(), D.clone(), idx, val.clone(), atom_batch=8, generator=torch.Generator().manual_seed(0),
                rare=False, info=early)
    assert early["redrawn"] == 1
    ksvd_update(R, D, idx, val, atom_batch=8, generator=torch.Generator().manual_seed(0), info=info)
    assert info["redrawn"] == 2
    assert (idx == 28).sum() == 1 and abs(float(D[28] @ D_before[28])) < 0.99
    torch.testing.assert_close(D.norm(dim=1), torch.ones(n_atoms, dtype=D.dtype))


def test_planted_problem_that_kept_a_merged_atom_is_fully_recovered_and_ends_early():
    # d=32, 128 atoms, k=3: re-drawing only unused atoms from bare residual rows stopped after 13
    # iterations with 89% of the atoms (an atom between two true ones, a rarely used one beside it)
    X, D = planted(n=4096, d=32, m=128, k=3, low=1.0, high=2.0, signed=True, seed=0)
    model = DBKSVD(128, 3, **SIGNED).fit(X, progress=False)
    assert recovered(model.atoms.numpy(), D) >= 0.99
    assert len(model.history) < 80 and model._step == 160  # ended early: the schedule plans 160 iterations


def test_stage_does_not_end_while_atoms_are_redrawn(monkeypatch):
    # atoms that stand still but are re-drawn every iteration never count as settled
    real = learner_module.ksvd_update

    def always_redraws(*args, info=None, **kwargs):
        counts = real(*args, info=info, **kwargs)
        if info is not None:
            info["redrawn"] = max(1, info.get("redrawn", 0))
        return counts

    monkeypatch.setattr(learner_module, "ksvd_update", always_redraws)
    X, _ = planted(n=1024, d=16, m=32, k=2, low=1.0, high=2.0, signed=True, seed=1)
    # 32 random atoms in d = 16 come within |cos| 0.7 of each other (the default twin threshold would
    # re-draw true atoms and keep the stage going): 0.9 leaves the planted atoms alone
    opts = dict(epochs=12, sample_batch=512, stop_tol=0.5, dup_threshold=0.9, **SIGNED)
    model = DBKSVD(32, 2, **opts).fit(X, progress=False)
    assert len(model.history) == 24  # stop_tol=0.5 would end it after 3 iterations otherwise
    monkeypatch.setattr(learner_module, "ksvd_update", real)
    quiet = DBKSVD(32, 2, **opts).fit(X, progress=False)
    assert len(quiet.history) < 24


def _batches_seen(model, X, calls, monkeypatch):
    seen = []
    real = DBKSVD._iteration

    def spy(self, Y, lo, hi, *args, **kwargs):
        seen.append(Y.clone())
        return real(self, Y, lo, hi, *args, **kwargs)

    monkeypatch.setattr(DBKSVD, "_iteration", spy)
    for _ in range(calls):
        model.partial_fit(X)
    monkeypatch.setattr(DBKSVD, "_iteration", real)
    return seen


def test_partial_fit_reads_shuffled_reproducible_batches(monkeypatch):
    rng = np.random.default_rng(0)
    # sorted by class: rows 0-599 are class 0 (first coordinate 0), rows 600-1199 class 1 (first coordinate 1)
    X = rng.standard_normal((1200, 8)).astype(np.float32)
    X[:, 0] = np.repeat([0.0, 1.0], 600)
    a = DBKSVD(16, 2, sample_batch=300, seed=5)
    seen_a = _batches_seen(a, X, 2, monkeypatch)
    assert len(seen_a) == 8
    for Y in seen_a:  # without shuffling the first two batches would be class 0 alone, the last two class 1
        share = float(Y[:, 0].mean())
        assert 0.2 < share < 0.8, share
    rows = lambda Ys: {tuple(r) for r in torch.cat(Ys).numpy().round(5).tolist()}  # noqa: E731
    assert rows(seen_a[:4]) == rows(seen_a[4:]) == {tuple(r) for r in X.round(5).tolist()}  # one pass per call
    assert not torch.equal(seen_a[0], seen_a[4])  # the second call reads another order
    b = DBKSVD(16, 2, sample_batch=300, seed=5)
    seen_b = _batches_seen(b, X, 2, monkeypatch)
    assert all(torch.equal(p, q) for p, q in zip(seen_a, seen_b, strict=True))
    assert torch.equal(a.atoms, b.atoms)  # the same sequence of calls: the same atoms
    c = DBKSVD(16, 2, sample_batch=300, seed=6)
    seen_c = _batches_seen(c, X, 1, monkeypatch)
    assert not torch.equal(seen_a[0][1:], seen_c[0][1:])  # another seed, another order


def test_last_iterations_of_a_stage_redraw_from_bare_rows_then_not_at_all(monkeypatch):
    calls = []
    real = learner_module.ksvd_update

    def spy(*args, redraw=True, share=True, **kwargs):
        calls.append((redraw, share))
        return real(*args, redraw=redraw, share=share, **kwargs)

    monkeypatch.setattr(learner_module, "ksvd_update", spy)
    X, _ = planted(n=1024, d=16, m=32, k=2, low=1.0, high=2.0, signed=True, seed=2)
    DBKSVD(32, 2, epochs=3, sample_batch=256, stop_tol=0, **SIGNED).fit(X, progress=False)
    assert calls == [(True, False)] * 11 + [(False, False)]  # never settled (stop_tol=0): plain re-draws
    # settled from the second iteration on (every movement is below 0.99), never stopping early
    monkeypatch.setattr(learner_module, "STOP_PATIENCE", 10 ** 9)
    calls.clear()
    DBKSVD(32, 2, epochs=3, sample_batch=256, stop_tol=0.99, **SIGNED).fit(X, progress=False)
    assert calls == [(True, False)] + [(True, True)] * 9 + [(True, False), (False, False)]
    calls.clear()
    DBKSVD(32, 2, groups=(8, 32), epochs=1, sample_batch=256, stop_tol=0.99, **SIGNED).fit(X, progress=False)
    last = [(True, False), (False, False)]  # every stage ends so
    assert calls == [(True, False), (True, True)] + last + [(True, True)] * 2 + last
