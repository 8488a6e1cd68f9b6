"""Reviving silent latents of a top-k SAE (issue 19, the ``revive`` option of topk/batchtopk/matryoshka).

A TopK latent fires only where its pre-activation is among the row's k largest. On the demo store
(DINOv2-S layer-8 patches of 1,000 Fashion-MNIST images, 1,536 latents, k = 8, AuxK alone) only 2% of the
latents never fire on all 256k rows, yet 47% fire on fewer than 26 of them (once per 10k rows), so 15% never
fire on the scorecard's 51k rows: silent latents are mostly rare ones, a little below their rows' k-th
largest pre-activation (median gap 0.06 in normalised units at k = 8, 0.7 at k = 4). Two remedies:

* ``revive="lift"`` (``lift_dead``): every ``LIFT_TOKENS`` tokens (at most ``dead_tokens``),
  all along the run, each latent that did not fire in that window gets its encoder bias raised just
  enough to win the top-k on its best row of the current batch (its smallest gap below that row's k-th
  largest pre-activation, plus 1% of the batch's mean k-th largest). The reconstruction gradient then
  decides what it becomes; a latent the data does not want falls silent and is lifted again, so every
  latent fires at least about once per window. (BatchTopK and Matryoshka: the row's k-th largest stands
  in for the batch threshold.)
* ``revive="resample"`` (``resample_dead``): every ``dead_tokens`` tokens during the first
  ``RESAMPLE_UNTIL`` of the budget, each latent silent that long is re-initialised from a row of the
  batch drawn with probability proportional to its squared reconstruction error ‖x - x̂‖², without
  replacement: decoder row = (x - b_dec)/‖x - b_dec‖, encoder row = that direction times the live
  latents' mean encoder norm, b_enc = the least >= 0 that puts its pre-activation on that row 1% above
  the row's k-th largest, Adam first moments 0 and second moments the live rows' mean (so its next steps
  have the others' size, not the ~30x larger step of a zeroed second moment). Bricken et al. (2023)'s
  resampling, with a top-k encoder scale instead of their 0.2 x (which suits a ReLU SAE).

Measured on that store (``vitatlas scorecard --max-images 200``, 51k rows), k = 8 / k = 4, dead fraction and
explained variance: AuxK alone (random init, the default) 0.147 / 0.849 dead at 0.843 / 0.781; resample
0.127 / 0.488 at 0.835 / 0.782; lift over dead_tokens (125k tokens) 0.115 / 0.329 at 0.841 / 0.782; lift
over 16k tokens (LIFT_TOKENS) 0.025 / 0.079 at 0.835 / 0.758, over 32k 0.071 / 0.172 at 0.836 / 0.770,
over 4k 0.002 / 0.007 at 0.816 / 0.689; with init="data" 0.027 / 0.073 at 0.855 / 0.800 (init="data"
alone: 0.320 / 0.509 at 0.859 / 0.818). Lifting lowers the concept rows of the card and blurs planted
atoms (the ``sae.learner`` docstring), so ``revive`` stays "none" by default.

Lifting is deterministic; resampling draws with a CPU generator seeded from the training seed and the
step, so a resumed run revives exactly as an uninterrupted one. Data-parallel: lifting reduces the gaps
over the ranks; resampling draws from rank 0's share of the global batch and broadcasts the new rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import distributed
from .model import SAEModule

LIFT_TOKENS = 16384  # revive="lift": a latent silent for this many tokens is lifted (at most dead_tokens)
RESAMPLE_UNTIL = 0.5  # resampling stops after this fraction of the budget (revived latents need steps to settle)


def resample_schedule(total_steps: int, dead_window: int, rows_per_step: int) -> tuple[int, int]:
    """(every, until): resample at the steps s with s % every == 0 and 0 < s <= until.

    every: the steps of one dead window (a latent resampled at one check has a whole window to fire
    before the next); until: ``RESAMPLE_UNTIL`` of the budget."""
    every = max(1, round(dead_window / max(1, rows_per_step)))
    return every, int(RESAMPLE_UNTIL * total_steps)


def resample_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) * 7919 + 17


@torch.no_grad()
def resample_dead(m: SAEModule, x: torch.Tensor, dead: torch.Tensor, opt: torch.optim.Optimizer | None,
                  generator: torch.Generator, rows: int | None = None) -> torch.Tensor:
    """Re-initialise the latents in ``dead`` ((n,) bool) from the rows of ``x`` (B, d, normalised units) with
    the largest reconstruction error; returns the indices of the latents resampled (at most B of them: the
    others wait for the next resampling step).

    rows: the global batch's row count when data-parallel (``x`` is this rank's share of it)."""
    n = m.W_dec.shape[0]
    w = distributed.world()
    b = x.shape[0] if rows is None else len(distributed.shard(rows, rank=0))  # rank 0's rows draw
    dead_idx = torch.nonzero(dead).squeeze(1).cpu()
    c = min(int(dead_idx.numel()), b)
    if c == 0:
        return dead_idx[:0]
    chosen = dead_idx[torch.randperm(dead_idx.numel(), generator=generator)[:c]]
    dirs = x.new_zeros(c, x.shape[1])
    if not w.distributed or w.is_main:
        xc = x - m.b_dec
        pre = F.linear(xc, m.W_enc, m.b_enc)
        k = min(getattr(m.config.activation, "k", n), n)
        vals, idx = torch.topk(pre, k, dim=1)
        z = torch.zeros_like(pre).scatter_(1, idx, F.relu(vals))
        err = (xc - z @ m.W_dec).pow(2).sum(1).double().cpu()
        weights = err + 1e-12 * float(err.max()) + 1e-300  # every row drawable (an exact fit is not an error)
        picked = torch.multinomial(weights, c, replacement=False, generator=generator).to(x.device)
        dirs = xc[picked]
        norms = dirs.norm(dim=1, keepdim=True)
        dirs = torch.where(norms > 0, dirs / norms.clamp_min(1e-30), m.W_dec[chosen.to(x.device)])
        kth = vals[picked, -1]
    else:
        norms, kth = x.new_zeros(c, 1), x.new_zeros(c)
    if w.distributed:
        for t in (dirs, norms, kth):
            distributed.broadcast_(t, 0)
    live = ~dead
    enc_norm = m.W_enc[live].norm(dim=1).mean() if bool(live.any()) else m.W_enc.norm(dim=1).mean()
    at = chosen.to(x.device)
    m.W_dec[at] = dirs.to(m.W_dec.dtype)
    m.W_enc[at] = (dirs * enc_norm).to(m.W_enc.dtype)
    # the bias that makes it win on its own row: its pre-activation there 1% above the row's k-th largest
    m.b_enc[at] = (1.01 * kth.clamp_min(0) - enc_norm * norms[:, 0]).clamp_min(0).to(m.b_enc.dtype)
    if opt is not None:
        for p in (m.W_dec, m.W_enc, m.b_enc):
            state = opt.state.get(p)
            if not state:
                continue
            state["exp_avg"][at] = 0
            sq = state["exp_avg_sq"]
            state["exp_avg_sq"][at] = sq[live].mean(0) if bool(live.any()) else 0
    return chosen


@torch.no_grad()
def lift_dead(m: SAEModule, x: torch.Tensor, dead: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Raise the encoder bias of each latent in ``dead`` just enough that it would win the top-k on its best
    row of ``x``: b_enc += (the row's k-th largest pre-activation - the latent's) + 1% of the mean k-th
    largest, at the row where that gap is smallest. Returns the indices lifted.

    rows: the global batch's row count when data-parallel (the gaps are reduced over the ranks)."""
    dead_idx = torch.nonzero(dead).squeeze(1)
    if dead_idx.numel() == 0:
        return dead_idx
    n = m.W_dec.shape[0]
    pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc)
    k = min(getattr(m.config.activation, "k", n), n)
    kth = torch.topk(pre, k, dim=1).values[:, -1]
    gap = (kth[:, None] - pre[:, dead_idx]).min(0).values  # (dead,) how far below firing on its best row
    level = kth.sum().reshape(1)
    if rows is not None:
        gap = -distributed.all_reduce_(-gap, "max")  # the smallest gap over every rank's rows
        level = distributed.all_reduce_(level, "sum")
    level = level[0] / (rows or x.shape[0])
    m.b_enc[dead_idx] += gap.clamp_min(0) + 0.01 * level.abs()
    return dead_idx
