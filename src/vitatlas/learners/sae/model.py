"""The SAE's parameters as a private ``nn.Module``, their initialisation and the inference activation.

``SAEModule`` holds W_dec, b_dec, W_enc, b_enc (and JumpReLU's log-thresholds) as parameters and the
input scale (and BatchTopK's global threshold) as buffers, so ``state_dict()`` / ``named_parameters()``
give what checkpoints and the optimizer need. Its methods are the model in normalised units; the SAE
class (``sae.learner``) undoes the input scale at the ``Dictionary`` interface.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import VitatlasError
from .config import SAEConfig, uses_batch_threshold

CORE = ("W_dec", "b_dec", "W_enc", "b_enc")


def data_directions(random: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(n, d) float64: row i is ``rows[i] - mean`` for the first min(n, len(rows)) rows, ``random[i]``
    for the others and where a data row equals the mean (no direction). Not normalised."""
    w = random.clone()
    take = min(w.shape[0], rows.shape[0])
    centred = rows[:take].to(torch.float64).cpu() - mean.to(torch.float64).cpu()
    if take:
        norms = centred.norm(dim=1)
        has_direction = norms > 1e-6 * float(norms.max())
        w[:take][has_direction] = centred[has_direction]
    return w


@torch.no_grad()
def encoder_scale(config: SAEConfig, w: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor) -> float:
    """The c of W_enc = c · W_dec that reconstructs ``rows`` best (least squares) at the start (b_enc = 0).

    With data directions a row's winners all point near it, so the unscaled sum of its k (or, for ReLU,
    all positive) contributions overshoots it k-fold (measured: explained variance -130 over the first
    125 steps at k = 32): Adam then spends the warm-up shrinking the encoder. TopK and ReLU are positively
    homogeneous and b_enc is 0, so scaling the encoder scales the reconstruction x̂₁ (made with c = 1)
    exactly: c = Σ⟨x − b, x̂₁⟩ / Σ‖x̂₁‖² (1 without rows or without any code). BatchTopK, Matryoshka and
    JumpReLU get the TopK (or ReLU) value: their own activations are not defined before training."""
    if rows.shape[0] == 0:
        return 1.0
    xc = rows.to(torch.float64).cpu() - mean.to(torch.float64).cpu()
    pre = xc @ w.T
    k = getattr(config.activation, "k", None)
    if k is None:
        z = pre.clamp_min(0)
    else:
        vals, idx = torch.topk(pre, min(k, pre.shape[1]), dim=1)
        z = torch.zeros_like(pre).scatter_(1, idx, vals.clamp_min(0))
    x1 = z @ w
    energy = float(x1.pow(2).sum())
    return float((xc * x1).sum()) / energy if energy > 0 else 1.0


class SAEModule(nn.Module):
    """Parameters of one SAE of width d (see the ``sae.learner`` docstring for the model)."""

    def __init__(self, config: SAEConfig, d: int, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        n, kw = config.n_latents, dict(device=device, dtype=dtype)
        self.config, self.d = config, d
        self.W_dec = nn.Parameter(torch.empty(n, d, **kw))
        self.b_dec = nn.Parameter(torch.empty(d, **kw))
        self.W_enc = nn.Parameter(torch.empty(n, d, **kw))
        self.b_enc = nn.Parameter(torch.empty(n, **kw))
        self.register_buffer("scale", torch.empty((), **kw))
        if config.family == "jumprelu":
            self.log_threshold = nn.Parameter(torch.empty(n, **kw))
        if uses_batch_threshold(config.activation):
            self.register_buffer("threshold", torch.empty((), **kw))

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def initial(cls, config: SAEConfig, d: int, mean: torch.Tensor, scale: float, *, seed: int, device: str,
                dtype: torch.dtype, rows: torch.Tensor | None = None) -> SAEModule:
        """Fresh parameters: unit-norm decoder rows, encoder = decoder, b_dec = ``mean`` (the data mean in
        normalised units), BatchTopK threshold -1 (not estimated yet).

        rows: None for random decoder rows (Gaussian directions), else data rows in normalised units
        whose directions about ``mean`` become the first n_latents decoder rows (``init="data"``; latents
        beyond them, and rows equal to the mean, stay random), the encoder scaled by ``encoder_scale`` on
        the rows after those."""
        m = cls(config, d, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(config.n_latents, d, generator=g, dtype=torch.float64)
        enc_scale = 1.0
        if rows is not None:
            take = min(config.n_latents, rows.shape[0])
            w = data_directions(w, rows[:take], mean)
            w /= w.norm(dim=1, keepdim=True)
            # held-out rows when there are any (a row's own latent fits it exactly), else the same rows
            enc_scale = encoder_scale(config, w, rows[take:] if rows.shape[0] > take else rows, mean)
        w /= w.norm(dim=1, keepdim=True)
        m.W_dec.copy_(w)
        m.W_enc.copy_(w * enc_scale)
        m.b_dec.copy_(mean)
        m.b_enc.zero_()
        m.scale.fill_(scale)
        if hasattr(m, "log_threshold"):
            m.log_threshold.fill_(math.log(config.activation.threshold_init))
        if hasattr(m, "threshold"):
            m.threshold.fill_(-1.0)
        return m.requires_grad_(False)

    @classmethod
    def from_tensors(cls, config: SAEConfig, d: int, tensors: dict[str, torch.Tensor], *, device: str,
                     dtype: torch.dtype) -> SAEModule:
        """Restore from saved tensors; a missing name raises KeyError (the loader reports it), a wrong
        shape a VitatlasError."""
        m = cls(config, d, device=device, dtype=dtype)
        state = m.state_dict()
        for name, want in state.items():
            have = tensors[name]
            if tuple(have.shape) != tuple(want.shape):
                raise VitatlasError(f"saved SAE tensor {name} has shape {tuple(have.shape)}, expected "
                                    f"{tuple(want.shape)}: the file is damaged")
        m.load_state_dict({name: tensors[name] for name in state})
        return m.requires_grad_(False)

    # -- what the trainer uses ------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        """Parameters in the optimizer's (and gradient clipping's) order."""
        return [p for _, p in self.named_parameters()]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer by name (what is saved)."""
        return dict(self.state_dict(keep_vars=True))

    # -- inference (normalised units) -----------------------------------------------------------------
    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        return F.linear(x_n - self.b_dec, self.W_enc, self.b_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The inference activation of the family on pre-activations."""
        act = self.config.activation
        if act.family == "relu":
            return F.relu(pre)
        if act.family == "jumprelu":
            return pre * (pre > self.log_threshold.exp())
        if uses_batch_threshold(act):
            if float(self.threshold) < 0:
                raise VitatlasError("this BatchTopK SAE has no learned threshold yet: fit it first")
            return pre * (pre > self.threshold)
        vals, idx = torch.topk(pre, act.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, idx, F.relu(vals))
