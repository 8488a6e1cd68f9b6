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
                dtype: torch.dtype) -> SAEModule:
        """Fresh parameters: unit-norm random decoder rows, encoder = decoder, b_dec = ``mean`` (the data
        mean in normalised units), BatchTopK threshold -1 (not estimated yet)."""
        m = cls(config, d, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(config.n_latents, d, generator=g, dtype=torch.float64)
        w /= w.norm(dim=1, keepdim=True)
        m.W_dec.copy_(w)
        m.W_enc.copy_(w)
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
