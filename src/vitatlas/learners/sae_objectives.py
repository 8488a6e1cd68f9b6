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


def _sparse_codes(m: SAEModule, x: torch.Tensor):
    """Winners of a topk/batchtopk batch: (xc, pre, pattern, values, batch threshold or None)."""
    xc = x - m.b_dec
    with torch.no_grad():
        pre = F.linear(xc, m.W_enc, m.b_enc)
    threshold = None
    if uses_batch_threshold(m.config.activation):
        pat, threshold = K.batch_topk_pattern(pre, m.config.activation.k)
    else:
        pat = K.topk_pattern(pre, m.config.activation.k)
    vals = F.relu(K.gather_codes(pre, xc, m.W_enc, m.b_enc, pat))
    return xc, pre, pat, vals, threshold


def _with_auxk(m: SAEModule, loss, x, x_hat, xc, pre, dead, aux_k: int):
    """Add AuxK: the dead latents' ``aux_k`` largest pre-activations reconstruct the residual."""
    coef = m.config.activation.aux_coef
    if dead is None or coef <= 0:
        return loss, None
    dead_idx = torch.nonzero(dead).squeeze(1)
    if not dead_idx.numel():
        return loss, None
    ka = min(aux_k, dead_idx.numel())
    with torch.no_grad():
        idx = dead_idx[torch.topk(pre[:, dead_idx], ka, dim=1, sorted=False).indices]
    apat = K.SparsePattern.from_topk(idx, m.config.n_latents)
    avals = F.relu(K.gather_codes(pre, xc, m.W_enc, m.b_enc, apat))
    e = (x - x_hat).detach()
    aux = _recon(e, K.sparse_decode(avals, m.W_dec, apat))
    return loss + coef * aux, aux.detach()


def topk_objective(m: SAEModule, x: torch.Tensor, dead, aux_k: int) -> Objective:
    """TopK / BatchTopK: sparse decoding of the winners, plus AuxK on dead latents."""
    xc, pre, pat, vals, threshold = _sparse_codes(m, x)
    x_hat = K.sparse_decode(vals, m.W_dec, pat) + m.b_dec
    loss, aux = _with_auxk(m, _recon(x, x_hat), x, x_hat, xc, pre, dead, aux_k)
    live = vals.detach() > 0
    return _finish(loss, x, x_hat, live, pat.cols[live], batch_threshold=threshold, aux=aux)


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
    loss, aux = _with_auxk(m, torch.stack(losses).mean(), x, x_hat, xc, pre, dead, aux_k)
    live = vals.detach() > 0
    return _finish(loss, x, x_hat, live, pat.cols[live], batch_threshold=threshold, aux=aux)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "relu": relu_objective, "jumprelu": jumprelu_objective, "topk": topk_objective,
    "batchtopk": topk_objective, "matryoshka": matryoshka_objective,
}
