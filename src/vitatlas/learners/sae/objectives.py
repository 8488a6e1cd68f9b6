"""The SAE training losses, one small function per family, each returning a typed ``Objective``.

Every function takes the module, a batch ``x`` (B, d) in normalised units, the dead-latent mask for
AuxK (or None), AuxK's width and, when data-parallel, ``rows``: the global batch's row count (losses are
this rank's sums over the global count, so summing the ranks' gradients gives the global batch's; None
for one process, where the code is exactly the single-process one), and returns the loss to
back-propagate plus the batch statistics the trainer accumulates (no host sync). Reconstruction terms are ‖x - x̂‖²/d (≈ relative to the signal,
since mean ‖x‖² = d after normalisation); the penalties are described in the ``sae.learner`` docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import distributed
from . import kernels as K
from .config import uses_batch_threshold
from .model import SAEModule


@dataclass
class Objective:
    """One batch's loss and statistics.

    loss: scalar to back-propagate. sse: Σ‖x - x̂‖² (float32, detached). nnz: non-zero codes.
    fired: latents that fired (an index tensor or a bool mask). batch_threshold: BatchTopK's smallest
    kept value of this batch. aux: the AuxK term (before its coefficient), when it was computed.
    """

    loss: torch.Tensor
    sse: torch.Tensor
    nnz: torch.Tensor
    fired: torch.Tensor
    batch_threshold: torch.Tensor | None = None
    aux: torch.Tensor | None = None


def _row_mean(v: torch.Tensor, rows: int | None) -> torch.Tensor:
    """Mean of per-row values over the batch; over the global batch of ``rows`` rows when data-parallel
    (each rank's local sum divided by the global count, so the all-reduced gradients are the global ones)."""
    return v.mean() if rows is None else v.sum() / rows


def _recon(x: torch.Tensor, x_hat: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    return _row_mean((x - x_hat).pow(2).sum(1), rows) / x.shape[1]


def _finish(loss, x, x_hat, live, fired, **extra) -> Objective:
    return Objective(loss=loss, sse=(x - x_hat).detach().float().pow(2).sum(), nnz=live.sum(), fired=fired, **extra)


def relu_objective(m: SAEModule, x: torch.Tensor, dead, aux_k: int, rows: int | None = None) -> Objective:
    """ReLU + L1 on z·‖W_dec‖, relative to the signal norm (‖x_n‖ ≈ sqrt(d)) so one l1 fits every width."""
    pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc)
    z = F.relu(pre)
    penalty = _row_mean((z * m.W_dec.norm(dim=1)).sum(1), rows) / math.sqrt(x.shape[1])
    x_hat = z @ m.W_dec + m.b_dec
    live = z.detach() > 0
    return _finish(_recon(x, x_hat, rows) + m.config.activation.l1 * penalty, x, x_hat, live, live.any(0))


def jumprelu_objective(m: SAEModule, x: torch.Tensor, dead, aux_k: int, rows: int | None = None) -> Objective:
    """JumpReLU with learned thresholds, an L0 penalty and straight-through pseudo-derivatives."""
    act = m.config.activation
    pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc)
    th = m.log_threshold.exp()
    z = K.jumprelu(pre, th, act.bandwidth)
    penalty = _row_mean(K.step(pre, th, act.bandwidth).sum(1), rows)
    x_hat = z @ m.W_dec + m.b_dec
    live = z.detach() > 0
    return _finish(_recon(x, x_hat, rows) + act.l1 * penalty, x, x_hat, live, live.any(0))


def _choose(m: SAEModule, pre: torch.Tensor, rows: int | None = None):
    """The winners of a topk/batchtopk batch: (pattern, batch threshold or None).

    rows: the global batch's row count when data-parallel; BatchTopK then keeps the global batch's
    rows·k largest entries over every rank (``global_batch_topk_pattern``).
    """
    if uses_batch_threshold(m.config.activation):
        if rows is None:
            return K.batch_topk_pattern(pre, m.config.activation.k)
        return global_batch_topk_pattern(pre, m.config.activation.k, rows)
    return K.topk_pattern(pre, m.config.activation.k), None


def global_batch_topk_pattern(pre: torch.Tensor, k: int, rows: int) -> tuple[K.SparsePattern, torch.Tensor]:
    """BatchTopK over a global batch of ``rows`` rows split across the ranks: this rank's (B, n) ``pre``.

    Exact: the global top rows·k entries are among each rank's own top rows·k, so every rank puts its
    candidates' values in its slot of a (ranks, rows·k) buffer (-inf elsewhere), one max-all-reduce
    gathers them, and every rank finds the same rows·k-th largest value; each keeps its entries at or
    above it that are positive (ties at that value, measure zero for real data, may keep a few more).
    """
    w = distributed.world()
    b, n = pre.shape
    want = rows * k
    local = torch.topk(pre.reshape(-1), min(want, b * n), sorted=False).values
    buf = pre.new_full((w.size, want), float("-inf"))
    buf[w.rank, :local.numel()] = local
    distributed.all_reduce_(buf, "max")
    top = torch.topk(buf.reshape(-1), want, sorted=False).values
    cut = top.min()
    kept = top[top > 0]
    threshold = kept.min() if kept.numel() else pre.new_zeros(())
    flat = torch.nonzero(((pre >= cut) & (pre > 0)).reshape(-1)).squeeze(1)
    return K.SparsePattern.from_flat(flat, b, n), threshold


def _sparse_codes(m: SAEModule, x: torch.Tensor, rows: int | None = None):
    """Winners of a topk/batchtopk batch: (xc, pre, pattern, values, batch threshold or None)."""
    xc = x - m.b_dec
    with torch.no_grad():
        pre = F.linear(xc, m.W_enc, m.b_enc)
    pat, threshold = _choose(m, pre, rows)
    vals = F.relu(K.gather_codes(pre, xc, m.W_enc, m.b_enc, pat))
    return xc, pre, pat, vals, threshold


# AuxK decodes densely over the dead latents when they are fewer than this many times aux_k: a GEMM
# over the c dead columns beats the sparse kernels over B * aux_k entries by about this factor per entry
# (measured on CPU: 47 GMAC/s for the GEMM against 5-7 for the CSR products at 1 thread)
AUX_DENSE_RATIO = 8


def _with_auxk(m: SAEModule, loss, x, x_hat, pre, dead, aux_k: int, rows: int | None = None, *, xc=None,
               residual=None):
    """Add AuxK: the dead latents' ``aux_k`` largest pre-activations reconstruct the residual.

    xc (x - b_dec) and residual (x - x̂), without gradient, when the caller has them already."""
    coef = m.config.activation.aux_coef
    if dead is None or coef <= 0:
        return loss, None
    dead_idx = torch.nonzero(dead).squeeze(1)
    c = dead_idx.numel()
    if not c:
        return loss, None
    ka = min(aux_k, c)
    xc = (x - m.b_dec).detach() if xc is None else xc
    e = (x - x_hat).detach() if residual is None else residual
    if c <= AUX_DENSE_RATIO * ka:
        pre_sub = pre[:, dead_idx]
        if ka < c:
            keep = torch.zeros_like(pre_sub).scatter_(1, torch.topk(pre_sub, ka, dim=1, sorted=False).indices, 1.0)
        else:
            keep = torch.ones_like(pre_sub)
        e_hat = K.subset_decode(pre_sub, keep, xc, m.b_dec, m.W_enc, m.b_enc, m.W_dec, dead_idx)
    else:
        with torch.no_grad():
            idx = dead_idx[torch.topk(pre[:, dead_idx], ka, dim=1, sorted=False).indices]
        apat = K.SparsePattern.from_topk(idx, m.config.n_latents)
        e_hat, _ = K.sparse_codes_decode(pre, xc, m.b_dec, m.W_enc, m.b_enc, m.W_dec, apat)
    aux = K.squared_error(e, e_hat)[0] / ((rows or x.shape[0]) * x.shape[1])
    if m.config.activation.aux_relative:
        aux = aux / residual_energy(e, rows, x.shape[1])
    return loss + coef * aux, aux.detach()


def residual_energy(e: torch.Tensor, rows: int | None, d: int) -> torch.Tensor:
    """Σ‖e‖² / (rows·d) of the (global) batch's residual, without gradient: the unit of a relative AuxK
    error (1 = the dead latents explain none of the residual). Floored so an exact fit divides by no zero."""
    energy = e.detach().pow(2).sum()
    if rows is not None:
        energy = distributed.all_reduce_(energy.reshape(1), "sum")[0]
    return (energy / ((rows or e.shape[0]) * d)).clamp_min(1e-12)


def topk_objective(m: SAEModule, x: torch.Tensor, dead, aux_k: int, rows: int | None = None) -> Objective:
    """TopK / BatchTopK: the encoder GEMM, the top-k, a sparse decode of the winners, AuxK on dead latents.

    x - b_dec is formed once (without gradient) for the GEMM and every gradient; the kernels send b_dec
    its share, so the step has few passes over (B, d) and (B, n) arrays."""
    xc = (x - m.b_dec).detach()
    with torch.no_grad():
        pre = F.linear(xc, m.W_enc, m.b_enc)
    pat, threshold = _choose(m, pre, rows)
    dec, vals = K.sparse_codes_decode(pre, xc, m.b_dec, m.W_enc, m.b_enc, m.W_dec, pat)
    sse, residual = K.squared_error(xc, dec, m.b_dec)
    loss, aux = _with_auxk(m, sse / ((rows or x.shape[0]) * x.shape[1]), x, None, pre, dead, aux_k, rows, xc=xc,
                           residual=residual)
    live = vals > 0
    return Objective(loss=loss, sse=sse.detach().float(), nnz=live.sum(), fired=pat.cols[live],
                     batch_threshold=threshold, aux=aux)


def matryoshka_objective(m: SAEModule, x: torch.Tensor, dead, aux_k: int, rows: int | None = None) -> Objective:
    """Mean reconstruction loss of the nested prefixes (each adds its group's winners), plus AuxK."""
    xc, pre, pat, vals, threshold = _sparse_codes(m, x, rows)
    groups = m.config.prefix_sizes()
    gid = torch.bucketize(pat.cols, torch.tensor(groups[:-1], device=x.device), right=True)
    x_hat = m.b_dec.expand_as(x)
    losses = []
    for g in range(len(groups)):
        keep = gid == g
        x_hat = x_hat + K.sparse_decode(vals[keep], m.W_dec, pat.select(keep))
        losses.append(_recon(x, x_hat, rows))
    loss, aux = _with_auxk(m, torch.stack(losses).mean(), x, x_hat, pre, dead, aux_k, rows)
    live = vals.detach() > 0
    return _finish(loss, x, x_hat, live, pat.cols[live], batch_threshold=threshold, aux=aux)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "relu": relu_objective, "jumprelu": jumprelu_objective, "topk": topk_objective,
    "batchtopk": topk_objective, "matryoshka": matryoshka_objective,
}
