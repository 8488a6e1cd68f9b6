"""Hand-written SAE gradients against autograd on dense float64 references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitatlas.learners.sae import kernels as K


def _problem(b=7, n=11, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    enc = torch.randn(n, d, generator=g, dtype=torch.float64)
    dec = torch.randn(n, d, generator=g, dtype=torch.float64)
    b_enc = torch.randn(n, generator=g, dtype=torch.float64)
    return x, enc, dec, b_enc


def _dense_mask(p: K.SparsePattern) -> torch.Tensor:
    m = torch.zeros(p.n_rows, p.n_cols, dtype=torch.bool)
    m[p.rows, p.cols] = True
    return m


def _check_sparse_vs_dense(pattern_fn):
    x, enc, dec, b_enc = _problem()
    w_out = torch.randn(x.shape[0], x.shape[1], dtype=torch.float64)  # random linear functional of output
    # sparse path
    leaves = [t.clone().requires_grad_(True) for t in (x, enc, dec, b_enc)]
    xs, es, ds, bs = leaves
    with torch.no_grad():
        pre = F.linear(xs, es, bs)
    p = pattern_fn(pre)
    vals = F.relu(K.gather_codes(pre, xs, es, bs, p))
    out = K.sparse_decode(vals, ds, p)
    ((out * w_out).sum() + out.pow(2).sum()).backward()
    # dense reference
    ref = [t.clone().requires_grad_(True) for t in (x, enc, dec, b_enc)]
    xr, er, dr, br = ref
    z = F.relu(F.linear(xr, er, br)) * _dense_mask(p)
    outr = z @ dr
    ((outr * w_out).sum() + outr.pow(2).sum()).backward()
    torch.testing.assert_close(out, outr, rtol=1e-10, atol=1e-10)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_topk_gather_and_decode_gradients_match_dense_autograd():
    _check_sparse_vs_dense(lambda pre: K.topk_pattern(pre, 3))


def test_batch_topk_gradients_match_dense_autograd_with_empty_rows():
    # the batch top-k may leave some rows with no entry at all: offsets must handle empty bags
    def pat(pre):
        p, th = K.batch_topk_pattern(pre, 2)
        kept = pre.reshape(-1)[p.flat]
        assert torch.all(kept >= th) and torch.all(kept > 0)
        return p
    _check_sparse_vs_dense(pat)
    p, _ = K.batch_topk_pattern(torch.tensor([[5.0, 4.0, 3.0], [-1.0, -2.0, 0.5], [-1.0, -1.0, -1.0]]), 1)
    assert p.rows.tolist() == [0, 0, 0] and p.cols.tolist() == [0, 1, 2]
    assert p.crow.tolist() == [0, 3, 3, 3]


def test_pattern_select_and_threshold_pattern():
    pre = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.1, 0.0]])
    p = K.threshold_pattern(pre, torch.tensor(0.2))
    assert list(zip(p.rows.tolist(), p.cols.tolist())) == [(0, 0), (0, 2), (1, 0)]
    sub = p.select(p.cols == 0)
    assert sub.crow.tolist() == [0, 1, 2] and sub.rows.tolist() == [0, 1]


def test_topk_pattern_has_exactly_k_distinct_per_row():
    pre = torch.randn(50, 40, dtype=torch.float64)
    p = K.topk_pattern(pre, 6)
    m = _dense_mask(p)
    assert (m.sum(1) == 6).all()
    ref = torch.zeros_like(m).scatter_(1, pre.topk(6, 1).indices, True)
    assert torch.equal(m, ref)


def test_remove_parallel_grad_is_gradient_on_the_sphere():
    # reference: autograd of f(w / ||w||) at unit-norm w equals (I - w w^T) grad f(w)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 6, generator=g, dtype=torch.float64)
    w /= w.norm(dim=1, keepdim=True)
    target = torch.randn(9, 6, generator=g, dtype=torch.float64)
    f = lambda v: ((v - target) ** 3).sum()  # noqa: E731
    w1 = w.clone().requires_grad_(True)
    f(w1).backward()
    grad = w1.grad.clone()
    K.remove_parallel_grad(w, grad)
    w2 = w.clone().requires_grad_(True)
    f(w2 / w2.norm(dim=1, keepdim=True)).backward()
    torch.testing.assert_close(grad, w2.grad, rtol=1e-10, atol=1e-12)
    assert (grad * w).sum(1).abs().max() < 1e-12


def _rect_ref(u):
    return ((u > -0.5) & (u < 0.5)).double()


def test_jumprelu_ste_matches_numpy_formula():
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(40, 8, generator=g, dtype=torch.float64)
    th = (torch.rand(8, generator=g, dtype=torch.float64) * 0.5 + 0.1).requires_grad_(True)
    up = torch.randn(40, 8, generator=g, dtype=torch.float64)
    pre_l = pre.clone().requires_grad_(True)
    eps = 0.3
    z = K.jumprelu(pre_l, th, eps)
    (z * up).sum().backward()
    np_pre, np_th, np_up = pre.numpy(), th.detach().numpy(), up.numpy()
    assert torch.allclose(z.detach(), torch.from_numpy(np_pre * (np_pre > np_th)))
    ref_pre = np_up * (np_pre > np_th)
    ref_th = (-(np_th / eps) * _rect_ref(torch.from_numpy((np_pre - np_th) / eps)).numpy() * np_up).sum(0)
    assert torch.allclose(pre_l.grad, torch.from_numpy(ref_pre))
    assert torch.allclose(th.grad, torch.from_numpy(ref_th))
    assert (th.grad != 0).any()  # the test exercises the kernel window

    th2 = th.detach().clone().requires_grad_(True)
    pre2 = pre.clone().requires_grad_(True)
    K.step(pre2, th2, eps).sum().backward()
    ref_th2 = (-(1 / eps) * _rect_ref(torch.from_numpy((np_pre - np_th) / eps)).numpy()).sum(0)
    assert torch.allclose(th2.grad, torch.from_numpy(ref_th2))
    assert pre2.grad is None or torch.all(pre2.grad == 0)


def test_normalize_rows():
    w = torch.randn(5, 3) * 7
    K.normalize_rows_(w)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(5))


def _dense_reference(x, b_dec, enc, b_enc, dec, mask, w_out):
    """Autograd through the dense float64 computation: out = (ReLU((x - b_dec) enc^T + b_enc) * mask) dec.

    Returns the output and the gradients of b_dec, enc, b_enc, dec (x is data: no gradient)."""
    leaves = [t.clone().requires_grad_(True) for t in (b_dec, enc, b_enc, dec)]
    bdr, er, br, dr = leaves
    out = (F.relu(F.linear(x - bdr, er, br)) * mask) @ dr
    ((out * w_out).sum() + out.pow(2).sum()).backward()
    return out.detach(), [t.grad for t in leaves]


def _problem_with_bias(b=9, n=13, d=6, seed=3):
    x, enc, dec, b_enc = _problem(b, n, d, seed)
    b_dec = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return x, b_dec, enc, b_enc, dec


def _fused(x, b_dec, enc, b_enc, dec, choose, w_out):
    leaves = [t.clone().requires_grad_(True) for t in (b_dec, enc, b_enc, dec)]
    bds, es, bs, ds = leaves
    xc = (x - bds).detach()
    with torch.no_grad():
        pre = F.linear(xc, es, bs)
    p = choose(pre)
    out, vals = K.sparse_codes_decode(pre, xc, bds, es, bs, ds, p)
    ((out * w_out).sum() + out.pow(2).sum()).backward()
    return p, pre, out, vals, [t.grad for t in leaves]


def test_fused_sparse_codes_decode_matches_dense_float64_autograd():
    x, b_dec, enc, b_enc, dec = _problem_with_bias()
    w_out = torch.randn(x.shape[0], x.shape[1], dtype=torch.float64)
    for choose in (lambda pre: K.topk_pattern(pre, 4), lambda pre: K.batch_topk_pattern(pre, 3)[0]):
        p, pre, out, vals, grads = _fused(x, b_dec, enc, b_enc, dec, choose, w_out)
        ref_out, ref_grads = _dense_reference(x, b_dec, enc, b_enc, dec, _dense_mask(p).double(), w_out)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(vals, F.relu(pre.reshape(-1)[p.flat]), rtol=0, atol=0)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_fused_path_relu_cuts_negative_winners():
    # a row whose top-k reaches negative pre-activations: those winners decode as 0 and pass no gradient
    x, b_dec, enc, b_enc, dec = _problem_with_bias(b=5, n=7, d=4, seed=8)
    b_enc = b_enc - 3.0  # most pre-activations negative
    w_out = torch.randn(5, 4, dtype=torch.float64)
    p, pre, out, vals, grads = _fused(x, b_dec, enc, b_enc, dec, lambda pre: K.topk_pattern(pre, 3), w_out)
    assert (pre.reshape(-1)[p.flat] < 0).any() and (vals == 0).any()
    ref_out, ref_grads = _dense_reference(x, b_dec, enc, b_enc, dec, _dense_mask(p).double(), w_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_subset_decode_matches_dense_float64_autograd():
    # AuxK's dense path: a column subset (the dead latents), top-2 of them per row, all gradients
    x, b_dec, enc, b_enc, dec = _problem_with_bias(b=8, n=12, d=5, seed=5)
    cols = torch.tensor([1, 4, 5, 9, 11])
    w_out = torch.randn(8, 5, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (b_dec, enc, b_enc, dec)]
    bds, es, bs, ds = leaves
    xc = (x - bds).detach()
    with torch.no_grad():
        pre = F.linear(xc, es, bs)
    pre_sub = pre[:, cols]
    keep = torch.zeros_like(pre_sub).scatter_(1, pre_sub.topk(2, dim=1).indices, 1.0)
    out = K.subset_decode(pre_sub, keep, xc, bds, es, bs, ds, cols)
    ((out * w_out).sum() + out.pow(2).sum()).backward()
    mask = torch.zeros(8, 12, dtype=torch.float64)
    mask[:, cols] = keep
    ref_out, ref_grads = _dense_reference(x, b_dec, enc, b_enc, dec, mask, w_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want in zip([t.grad for t in leaves], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (leaves[1].grad[[0, 2, 3]] == 0).all()  # latents outside the subset get nothing


def test_squared_error_matches_autograd_with_and_without_bias():
    g = torch.Generator().manual_seed(11)
    x, out0, b0 = (torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g,
                   dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64))
    out, b = out0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    sse, resid = K.squared_error((x - b).detach(), out, b)
    (3.0 * sse).backward()
    out_r, b_r = out0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    ref = (x - (out_r + b_r)).pow(2).sum()
    (3.0 * ref).backward()
    torch.testing.assert_close(sse, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(resid, (x - out0 - b0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.grad, out_r.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, b_r.grad, rtol=1e-12, atol=1e-12)
    out2 = out0.clone().requires_grad_(True)
    K.squared_error(x, out2)[0].backward()
    torch.testing.assert_close(out2.grad, -2 * (x - out0), rtol=1e-12, atol=1e-12)


# ---- the TopK objective with AuxK against a dense autograd reference ---------------------------------

def _dense_topk_loss(W_enc, b_enc, W_dec, b_dec, x, dead, k, aux_k, coef, relative):
    """The TopK + AuxK loss written plainly: dense codes, masks, autograd for every gradient."""
    b, d = x.shape
    pre = F.linear(x - b_dec, W_enc, b_enc)
    mask = torch.zeros_like(pre).scatter_(1, torch.topk(pre.detach(), k, dim=1).indices, 1.0)
    x_hat = (F.relu(pre) * mask) @ W_dec + b_dec
    loss = (x - x_hat).pow(2).sum() / (b * d)
    e = (x - x_hat).detach()
    pre_dead = pre[:, dead]
    ka = min(aux_k, int(dead.sum()))
    aux_mask = torch.zeros_like(pre_dead).scatter_(1, torch.topk(pre_dead.detach(), ka, dim=1).indices, 1.0)
    e_hat = (F.relu(pre_dead) * aux_mask) @ W_dec[dead]
    aux = (e - e_hat).pow(2).sum() / (b * d)
    if relative:
        aux = aux / (e.pow(2).sum() / (b * d))
    return loss + coef * aux, aux


def test_topk_objective_with_auxk_matches_dense_reference():
    from vitatlas.learners.sae import SAE
    from vitatlas.learners.sae import objectives as O
    from vitatlas.learners.sae.model import SAEModule

    g = torch.Generator().manual_seed(5)
    x = 3.0 * torch.randn(40, 12, generator=g, dtype=torch.float64)
    dead = torch.zeros(30, dtype=torch.bool)
    dead[[1, 4, 5, 11, 17, 20, 28]] = True
    for relative, coef in ((False, 1 / 32), (True, 0.25)):
        cfg = SAE(kind="topk", n_latents=30, k=4, aux_coef=coef, aux_relative=relative).config
        m = SAEModule.initial(cfg, 12, x.mean(0), 1.0, seed=1, device="cpu", dtype=torch.float64)
        with torch.no_grad():  # a trained-looking model: biases and an encoder that is not the decoder
            m.b_enc.copy_(0.1 * torch.randn(30, generator=g, dtype=torch.float64))
            m.W_enc.add_(0.3 * torch.randn(30, 12, generator=g, dtype=torch.float64))
        m.requires_grad_(True)
        out = O.topk_objective(m, x, dead, aux_k=3)
        out.loss.backward()
        ref = [p.detach().clone().requires_grad_(True) for p in (m.W_enc, m.b_enc, m.W_dec, m.b_dec)]
        ref_loss, ref_aux = _dense_topk_loss(*ref, x, dead, 4, 3, coef, relative)
        ref_loss.backward()
        torch.testing.assert_close(out.loss.detach(), ref_loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.aux, ref_aux.detach(), rtol=1e-12, atol=1e-12)
        for got, want in zip((m.W_enc, m.b_enc, m.W_dec, m.b_dec), ref):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
