"""The SAE training losses, one small function per family, each returning a typed ``Objective``.

Every function takes the module, a batch ``x`` (B, d) in normalised units, the dead-latent mask for
AuxK (or None) and AuxK's width, and returns the loss to back-propagate plus the batch statistics the
trainer accumulates (no host sync). Reconstruction terms are ‖x - x̂‖²/d (≈ relative to the signal,
since mean ‖x‖² = d after normalisation); the penalties are described in the ``sae`` docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import sae_kernels as K
from .sae_config import uses_batch_threshold
from .sae_model import SAEModule


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


def _recon(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).pow(2).sum(1).mean() / x.shape[1]


def _finish(loss, x, x_hat, live, fired, **extra) -> Objective:
    return Objective(loss=loss, sse=(x - x_hat).detach().float().pow(2).sum(), nnz=live.sum(), fired=fired, **extra)


def relu_objective(m: SAEModule, x: torch.Tensor, dead, aux_k: int) -> Objective:
    """ReLU + L1 on z·‖W_dec‖, relative to the signal norm (‖x_n‖ ≈ sqrt(d)) so one l1 fits every width."""
    pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc)
    z = F.relu(pre)
    penalty = (z * m.W_dec.norm(dim=1)).sum(1).mean() / math.sqrt(x.shape[1])
    x_hat = z @ m.W_dec + m.b_dec
    live = z.detach() > 0
    return _finish(_recon(x, x_hat) + m.config.activation.l1 * penalty, x, x_hat, live, live.any(0))


def jumprelu_objective(m: SAEModule, x: torch.Tensor, dead, aux_k: int) -> Objective:
    """JumpReLU with learned thresholds, an L0 penalty and straight-through pseudo-derivatives."""
    act = m.config.activation
    pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc)
    th = m.log_threshold.exp()
    z = K.jumprelu(pre, th, act.bandwidth)
    penalty = K.step(pre, th, act.bandwidth).sum(1).mean()
    x_hat = z @ m.W_dec + m.b_dec
    live = z.detach() > 0
    return _finish(_recon(x, x_hat) + act.l1 * penalty, x, x_hat, live, live.any(0))


def _choose(m: SAEModule, pre: torch.Tensor):
    """The winners of a topk/batchtopk batch: (pattern, batch threshold or None)."""
    if uses_batch_threshold(m.config.activation):
        return K.batch_topk_pattern(pre, m.config.activation.k)
    return K.topk_pattern(pre, m.config.activation.k), None


def _sparse_codes(m: SAEModule, x: torch.Tensor):
    """Winners of a topk/batchtopk batch: (xc, pre, pattern, values, batch threshold or None)."""
    xc = x - m.b_dec
    with torch.no_grad():
        pre = F.linear(xc, m.W_enc, m.b_enc)
    pat, threshold = _choose(m, pre)
    vals = F.relu(K.gather_codes(pre, xc, m.W_enc, m.b_enc, pat))
    return xc, pre, pat, vals, threshold


# AuxK decodes densely over the dead latents when they are fewer than this many times aux_k: a GEMM
# over the c dead columns beats the sparse kernels over B * aux_k entries by about this factor per entry
# (measured on CPU: 47 GMAC/s for the GEMM against 5-7 for the CSR products at 1 thread)
AUX_DENSE_RATIO = 8


def _with_auxk(m: SAEModule, loss, x, x_hat, pre, dead, aux_k: int):
    """Add AuxK: the dead latents' ``aux_k`` largest pre-activations reconstruct the residual."""
    coef = m.config.activation.aux_coef
    if dead is None or coef <= 0:
        return loss, None
    dead_idx = torch.nonzero(dead).squeeze(1)
    c = dead_idx.numel()
    if not c:
        return loss, None
    ka = min(aux_k, c)
    e = (x - x_hat).detach()
    if c <= AUX_DENSE_RATIO * ka:
        pre_sub = pre[:, dead_idx]
        if ka < c:
            keep = torch.zeros_like(pre_sub).scatter_(1, torch.topk(pre_sub, ka, dim=1, sorted=False).indices, 1.0)
        else:
            keep = torch.ones_like(pre_sub)
        e_hat = K.subset_decode(pre_sub, keep, x, m.b_dec, m.W_enc, m.b_enc, m.W_dec, dead_idx)
    else:
        with torch.no_grad():
            idx = dead_idx[torch.topk(pre[:, dead_idx], ka, dim=1, sorted=False).indices]
        apat = K.SparsePattern.from_topk(idx, m.config.n_latents)
        e_hat, _ = K.sparse_codes_decode(pre, x, m.b_dec, m.W_enc, m.b_enc, m.W_dec, apat)
    aux = _recon(e, e_hat)
    return loss + coef * aux, aux.detach()


def topk_objective(m: SAEModule, x: torch.Tensor, dead, aux_k: int) -> Objective:
    """TopK / BatchTopK: the encoder GEMM, the top-k, a sparse decode of the winners, AuxK on dead latents."""
    with torch.no_grad():
        pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc)
    pat, threshold = _choose(m, pre)
    dec, vals = K.sparse_codes_decode(pre, x, m.b_dec, m.W_enc, m.b_enc, m.W_dec, pat)
    x_hat = dec + m.b_dec
    sse = (x - x_hat).pow(2).sum()
    loss, aux = _with_auxk(m, sse / (x.shape[0] * x.shape[1]), x, x_hat, pre, dead, aux_k)
    live = vals > 0
    return Objective(loss=loss, sse=sse.detach().float(), nnz=live.sum(), fired=pat.cols[live],
                     batch_threshold=threshold, aux=aux)


def matryoshka_objective(m: SAEModule, x: torch.Tensor, dead, aux_k: int) -> Objective:
    """Mean reconstruction loss of the nested prefixes (each adds its group's winners), plus AuxK."""
    xc, pre, pat, vals, threshold = _sparse_codes(m, x)
    groups = m.config.prefix_sizes()
    gid = torch.bucketize(pat.cols, torch.tensor(groups[:-1], device=x.device), right=True)
    x_hat = m.b_dec.expand_as(x)
    losses = []
    for g in range(len(groups)):
        keep = gid == g
        x_hat = x_hat + K.sparse_decode(vals[keep], m.W_dec, pat.select(keep))
        losses.append(_recon(x, x_hat))
    loss, aux = _with_auxk(m, torch.stack(losses).mean(), x, x_hat, pre, dead, aux_k)
    live = vals.detach() > 0
    return _finish(loss, x, x_hat, live, pat.cols[live], batch_threshold=threshold, aux=aux)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "relu": relu_objective, "jumprelu": jumprelu_objective, "topk": topk_objective,
    "batchtopk": topk_objective, "matryoshka": matryoshka_objective,
}
