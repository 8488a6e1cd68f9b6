"""Sparse autoencoders (SAEs) as vitatlas dictionaries: ReLU+L1, TopK, BatchTopK, JumpReLU, Matryoshka.

    >>> sae = vitatlas.SAE(kind="topk", n_latents=1536, k=32).fit(store)     # doctest: +SKIP
    >>> codes = sae.encode(X); X_hat = sae.reconstruct(X)                    # doctest: +SKIP

Model (x in the original units of the data)::

    x_n   = s · x                                 s = sqrt(d / mean ‖x‖²), set once from the data
    pre   = (x_n - b_dec) @ W_encᵀ + b_enc        W_enc, W_dec: (n_latents, d)
    z     = activation(pre)                       relu | topk | batchtopk | jumprelu (see KINDS)
    x̂_n   = z @ W_dec + b_dec                     rows of W_dec kept unit norm = the ``atoms``

The input scale ``s`` makes the default learning rate and penalty coefficients independent of the
activations' magnitude (a common practice: mean ‖x_n‖² = d). It is stored with the model and undone
at the interface: ``encode`` returns codes c = z / s and ``decode(c) = c @ atoms + b_dec / s``, so
``atoms`` are unit norm, ``codes · atoms`` are contributions in the data's own units, and
``reconstruct(X)`` is in the original units.

Kinds (``KINDS``):

* ``relu``: z = ReLU(pre); loss = ‖x_n - x̂_n‖²/d + l1 · Σ_i z_i ‖W_dec,i‖ / sqrt(d) (the vision-SAE
  recipe: L1 on latent × decoder norm; the norm is 1 here). Both terms are relative to the signal
  (‖x_n‖² ≈ d), so one coefficient fits every width. Read as coefficients on a per-coordinate MSE
  with an L1 not divided by sqrt(d), the published 4e-4..1.6e-3 are l1 = coef·sqrt(d) ≈ 0.008..0.044
  here for d = 384..768. The default, 0.15, is stronger because vitatlas runs are short (thousands of
  steps) and a weak L1 leaves the codes dense that long: with 768 latents, d = 384 and 480 steps on a
  planted problem, l1 = 0.016 gave L0 ≈ 385 of 768, 0.15 gave L0 ≈ 53, 0.31 collapsed to L0 ≈ 1.
* ``topk``: keep the k largest pre-activations per row (then ReLU), Gao et al. 2024, with the AuxK
  loss: dead latents (no firing for ``dead_tokens`` tokens) reconstruct the residual with their
  ``aux_k`` largest pre-activations, weighted by ``aux_coef``.
* ``batchtopk``: keep the B·k largest pre-activations of the batch (mean L0 = k during training);
  a running estimate of the smallest kept value becomes a global threshold, so inference is a
  JumpReLU with mean L0 close to k (Bussmann et al. 2024). AuxK as for topk.
* ``jumprelu``: z = pre · H(pre - θ_i) with learned per-latent θ and loss ‖x_n - x̂_n‖²/d + l1 · L0,
  trained with the straight-through pseudo-derivatives of Rajamanoharan et al. 2024 (``l1`` is the
  L0 coefficient here, default 1e-2; thresholds start at ``threshold_init``, kernel width ``bandwidth``).
* ``matryoshka``: a topk/batchtopk SAE (``base``) whose loss is the mean reconstruction loss of
  nested prefixes of the latents (``groups`` = prefix sizes, default n/16, n/8, n/4, n/2, n), so the
  first latents learn coarse concepts alone (Bussmann et al. 2025, Nabeshima 2024).

Training: Adam with linear warm-up then cosine decay to 0, gradient clipping, decoder rows unit-norm
with the gradient component parallel to each row removed before the step and renormalised after,
b_dec initialised to the data mean, W_enc initialised to W_dec (the decoder transpose as encoder),
TopK decoding through sparse kernels (``sae_kernels``). See ``sae_train`` for the loop, checkpoints,
logging and sweeps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..dictionary import ArrayLike, Dictionary
from ..errors import VitatlasError
from . import sae_kernels as K
from .sae_kernels import SPARSE_KINDS
from .sae_train import SAESweep, fit_many  # noqa: F401  (SAESweep is part of this module's API)
from .options import resolve_device, resolve_dtype

KINDS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
DEFAULT_L1 = {"relu": 0.15, "jumprelu": 1e-2}


class SAE(Dictionary):
    """A sparse autoencoder dictionary. ``n_atoms == n_latents``; ``atoms`` are the decoder rows.

    Parameters (all keyword except the first three; ``_config()`` returns exactly these):
        kind: one of KINDS.
        n_latents: number of latents / atoms.
        k: active latents per sample (topk, batchtopk, matryoshka); 0 < k < n_latents.
        l1: sparsity coefficient (relu: L1 on z·‖W_dec‖/sqrt(d), default 0.15; jumprelu: on L0, default 1e-2).
        groups: matryoshka prefix sizes (increasing, last = n_latents), or None for the default.
        base: matryoshka's activation, "batchtopk" (default) or "topk".
        epochs: passes over the data; None = enough for 2000 steps (1 to 50 epochs).
        batch_size: rows per step (the last partial batch of an epoch is dropped).
        lr: Adam learning rate; None = 8e-4·sqrt(16384 / n_latents) clipped to [2e-4, 4e-3]
            (Gao et al.'s scaling with n_latents, a larger constant for short runs).
        warmup_steps: linear warm-up steps; None = 5% of the steps (at most 1000).
        grad_clip: max global gradient norm (None or 0 to disable).
        aux_coef, aux_k: AuxK weight (default 1/32) and dead latents used per row (None = d // 2).
        dead_tokens: a latent is dead after this many tokens without firing; None = min(1e7, rows).
        threshold_momentum: BatchTopK running-threshold EMA momentum.
        bandwidth, threshold_init: JumpReLU STE kernel width and initial θ (normalised units);
            threshold_lr_scale: the thresholds' learning rate relative to lr (they move in log space).
        device, dtype, seed: where and in what precision the parameters live; seed fixes init and
            batch order. On CUDA the forward pass runs under bf16 autocast when ``amp``.
        checkpoint_every, log_every: steps between checkpoints (when a directory is given) / log rows.
    """

    kind = "sae"

    def __init__(self, kind: str, n_latents: int, k: int | None = None, l1: float | None = None,
                 *, groups: Sequence[int] | None = None, base: str = "batchtopk", epochs: int | None = None,
                 batch_size: int = 1024, lr: float | None = None, warmup_steps: int | None = None,
                 grad_clip: float | None = 1.0, aux_coef: float = 1 / 32, aux_k: int | None = None,
                 dead_tokens: int | None = None, threshold_momentum: float = 0.99, bandwidth: float = 0.05,
                 threshold_init: float = 0.1, threshold_lr_scale: float = 10.0, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 amp: bool = True, checkpoint_every: int = 500, log_every: int = 50):
        if kind not in KINDS:
            raise VitatlasError(f"unknown SAE kind {kind!r}: choose one of {', '.join(KINDS)}")
        if not isinstance(n_latents, int) or isinstance(n_latents, bool) or n_latents <= 0:
            raise VitatlasError(f"n_latents must be a positive integer, got {n_latents!r}")
        if kind in SPARSE_KINDS:
            if k is None:
                raise VitatlasError(f"a {kind} SAE needs k (active latents per sample), e.g. SAE(kind={kind!r}, n_latents={n_latents}, k=32)")
            if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
                raise VitatlasError(f"k must be a positive integer, got {k!r}")
            if k >= n_latents:
                raise VitatlasError(f"k={k} must be smaller than n_latents={n_latents}")
            if l1 is not None:
                raise VitatlasError(f"l1 is not used by a {kind} SAE (its sparsity is k); drop l1 or use kind='relu'/'jumprelu'")
        else:
            if k is not None:
                raise VitatlasError(f"k is not used by a {kind} SAE (its sparsity comes from l1); drop k or use kind='topk'")
            l1 = DEFAULT_L1[kind] if l1 is None else l1
            if not isinstance(l1, (int, float)) or isinstance(l1, bool) or not math.isfinite(l1) or l1 < 0:
                raise VitatlasError(f"l1 must be a finite number >= 0, got {l1!r}")
            l1 = float(l1)
        if base not in ("topk", "batchtopk"):
            raise VitatlasError(f"matryoshka base must be 'topk' or 'batchtopk', got {base!r}")
        if groups is not None:
            if kind != "matryoshka":
                raise VitatlasError("groups is only used by kind='matryoshka'")
            groups = [int(g) for g in groups]
            if not groups or any(b <= a for a, b in zip(groups, groups[1:])) or groups[0] <= 0 \
                    or groups[-1] != n_latents:
                raise VitatlasError(f"groups must be increasing prefix sizes ending at n_latents={n_latents}, got {groups}")
        if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs <= 0):
            raise VitatlasError(f"epochs must be a positive integer or None (automatic), got {epochs!r}")
        for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                            ("log_every", log_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise VitatlasError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("warmup_steps", warmup_steps), ("aux_k", aux_k), ("dead_tokens", dead_tokens)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise VitatlasError(f"{name} must be a non-negative integer or None, got {value!r}")
        for name, value in (("lr", lr), ("grad_clip", grad_clip)):
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise VitatlasError(f"{name} must be a positive number or None, got {value!r}")
        if lr is not None and lr <= 0:
            raise VitatlasError(f"lr must be positive, got {lr!r}")
        if not 0 <= aux_coef < math.inf:
            raise VitatlasError(f"aux_coef must be >= 0, got {aux_coef!r}")
        if not 0 <= threshold_momentum < 1:
            raise VitatlasError(f"threshold_momentum must be in [0, 1), got {threshold_momentum!r}")
        if not bandwidth > 0 or not threshold_init > 0 or not threshold_lr_scale > 0:
            raise VitatlasError("bandwidth, threshold_init and threshold_lr_scale must be positive")
        if not isinstance(seed, int):
            raise VitatlasError(f"seed must be an integer, got {seed!r}")
        if not isinstance(device, str):
            raise VitatlasError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")

        self.sae_kind, self.n_latents, self.k, self.l1 = kind, n_latents, k, l1
        self.groups, self.base = groups, base
        self.epochs, self.batch_size, self.lr, self.warmup_steps = epochs, batch_size, lr, warmup_steps
        self.grad_clip, self.aux_coef, self.aux_k, self.dead_tokens = grad_clip, float(aux_coef), aux_k, dead_tokens
        self.threshold_momentum, self.bandwidth, self.threshold_init = threshold_momentum, bandwidth, threshold_init
        self.threshold_lr_scale = float(threshold_lr_scale)
        self.device, self.dtype_name, self.dtype, self.seed, self.amp = device, dtype, resolve_dtype(dtype), seed, amp
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.params: dict[str, torch.Tensor] = {}
        self.d = None
        self.fit_info = {}

    # ---- Dictionary interface ----------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:  # type: ignore[override]
        return self.n_latents

    @property
    def name(self) -> str:
        """Short run name, e.g. ``topk-k32-n1536`` or ``relu-l1_0.15-n1536``."""
        sparsity = f"k{self.k}" if self.k is not None else f"l1_{self.l1:g}"
        name = f"{self.sae_kind}-{sparsity}-n{self.n_latents}"
        return name + (f"-lr{self.lr:g}" if self.lr is not None else "")

    @property
    def atoms(self) -> torch.Tensor:
        self._check_fitted()
        return self.params["W_dec"].detach()

    @property
    def scale(self) -> float:
        return float(self.params["scale"])

    def _config(self) -> dict:
        return {"kind": self.sae_kind, "n_latents": self.n_latents, "k": self.k, "l1": self.l1,
                "groups": self.groups, "base": self.base, "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "warmup_steps": self.warmup_steps, "grad_clip": self.grad_clip,
                "aux_coef": self.aux_coef, "aux_k": self.aux_k, "dead_tokens": self.dead_tokens,
                "threshold_momentum": self.threshold_momentum, "bandwidth": self.bandwidth,
                "threshold_init": self.threshold_init, "threshold_lr_scale": self.threshold_lr_scale, "device": self.device, "dtype": self.dtype_name,
                "seed": self.seed, "amp": self.amp, "checkpoint_every": self.checkpoint_every,
                "log_every": self.log_every}

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.params.items()}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        need = ["W_dec", "b_dec", "W_enc", "b_enc", "scale"] + self._extra_param_names()
        missing = [n for n in need if n not in tensors]
        if missing:
            raise KeyError(missing[0])
        shapes = {"W_dec": (self.n_latents, self.d), "W_enc": (self.n_latents, self.d), "b_dec": (self.d,),
                  "b_enc": (self.n_latents,), "log_threshold": (self.n_latents,)}
        for n in need:
            if n in shapes and tuple(tensors[n].shape) != shapes[n]:
                raise VitatlasError(f"saved SAE tensor {n} has shape {tuple(tensors[n].shape)}, expected {shapes[n]}: the file is damaged")
        self._check_fitted()
        self.params = {n: tensors[n].to(self.device, self.dtype).clone() for n in need}

    def _extra_param_names(self) -> list[str]:
        if self.sae_kind == "jumprelu":
            return ["log_threshold"]
        if self.uses_batch_threshold:
            return ["threshold"]
        return []

    @property
    def uses_batch_threshold(self) -> bool:
        return self.sae_kind == "batchtopk" or (self.sae_kind == "matryoshka" and self.base == "batchtopk")

    def _check_fitted(self) -> None:
        super()._check_fitted()
        resolve_device(self.device)

    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) in data units -> (B, n_latents) codes in data units (z / s)."""
        p = self.params
        pre = F.linear(x * p["scale"] - p["b_dec"], p["W_enc"], p["b_enc"])
        return self._activate(pre) / p["scale"]

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Inference activation on pre-activations (normalised units)."""
        kind = self.sae_kind
        if kind == "relu":
            return F.relu(pre)
        if kind == "jumprelu":
            return pre * (pre > self.params["log_threshold"].exp())
        if self.uses_batch_threshold:
            th = self.params["threshold"]
            if float(th) < 0:
                raise VitatlasError("this BatchTopK SAE has no learned threshold yet: fit it first")
            return pre * (pre > th)
        vals, idx = torch.topk(pre, self.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, idx, F.relu(vals))

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        p = self.params
        return codes @ p["W_dec"] + p["b_dec"] / p["scale"]

    # ---- training ----------------------------------------------------------------------------------
    def fit(self, X: ArrayLike, *, checkpoint_dir: str | None = None, progress: bool = True,
            log_dir: str | None = None, callback: Callable[[int, dict], Any] | None = None) -> "SAE":
        """Train on X (array, tensor or ActivationStore) from a fresh initialisation; returns self.

        checkpoint_dir: write a checkpoint there every ``checkpoint_every`` steps and at the end, and
        resume from it when it exists (same options and data required). log_dir: append metrics to
        ``log_dir/log.jsonl``. callback(step, metrics) is called after every step (tests use it to
        simulate a kill). Final training metrics are in ``self.fit_info["train_metrics"]``.
        """
        SAESweep([self]).fit(X, checkpoint_dir=checkpoint_dir, progress=progress, log_dir=log_dir,
                             callback=callback)
        return self

    # ---- model pieces used by the trainer ----------------------------------------------------------
    def init_params(self, d: int, mean: torch.Tensor, scale: float) -> None:
        """Fresh parameters for width d; ``mean`` (d,) is the data mean in normalised units."""
        g = torch.Generator().manual_seed(self.seed)
        w = torch.randn(self.n_latents, d, generator=g, dtype=torch.float64)
        w /= w.norm(dim=1, keepdim=True)
        dev, dt = self.device, self.dtype
        self.d = d
        self.params = {
            "W_dec": w.to(dev, dt),
            "b_dec": mean.to(dev, dt).clone(),
            "W_enc": w.to(dev, dt).clone(),  # encoder = decoder transpose at init
            "b_enc": torch.zeros(self.n_latents, device=dev, dtype=dt),
            "scale": torch.tensor(scale, device=dev, dtype=dt),
        }
        if self.sae_kind == "jumprelu":
            self.params["log_threshold"] = torch.full((self.n_latents,), math.log(self.threshold_init),
                                                      device=dev, dtype=dt)
        if self.uses_batch_threshold:
            self.params["threshold"] = torch.tensor(-1.0, device=dev, dtype=dt)  # < 0: not estimated yet

    def trainable(self) -> list[str]:
        names = ["W_dec", "b_dec", "W_enc", "b_enc"]
        return names + (["log_threshold"] if self.sae_kind == "jumprelu" else [])

    def default_groups(self) -> list[int]:
        n = self.n_latents
        sizes = sorted({max(1, n // f) for f in (16, 8, 4, 2)} | {n})
        return sizes

    def train_loss(self, x: torch.Tensor, dead: torch.Tensor | None, aux_k: int) -> tuple[torch.Tensor, dict]:
        """Loss of one batch x (B, d) in normalised units, and statistics (tensors, no sync).

        dead: (n,) bool mask of dead latents for AuxK (or None). Statistics: ``sse`` Σ‖x - x̂‖²,
        ``nnz`` non-zero codes, ``fired`` latents that fired (index tensor or bool mask), and for
        BatchTopK ``threshold`` (this batch's smallest kept value).
        """
        p = self.params
        d = x.shape[1]
        xc = x - p["b_dec"]
        stats: dict[str, torch.Tensor] = {}
        if self.sae_kind in SPARSE_KINDS:
            with torch.no_grad():
                pre = F.linear(xc, p["W_enc"], p["b_enc"])
            if self.uses_batch_threshold:
                pat, stats["threshold"] = K.batch_topk_pattern(pre, self.k)
            else:
                pat = K.topk_pattern(pre, self.k)
            vals = F.relu(K.gather_codes(pre, xc, p["W_enc"], p["b_enc"], pat))
            if self.sae_kind == "matryoshka":
                groups = self.groups or self.default_groups()
                bounds = torch.tensor(groups[:-1], device=x.device)
                gid = torch.bucketize(pat.cols, bounds, right=True)
                x_hat = p["b_dec"].expand_as(x)
                losses = []
                for g in range(len(groups)):
                    keep = gid == g
                    x_hat = x_hat + K.sparse_decode(vals[keep], p["W_dec"], pat.select(keep))
                    losses.append((x - x_hat).pow(2).sum(1).mean() / d)
                recon = torch.stack(losses).mean()
            else:
                x_hat = K.sparse_decode(vals, p["W_dec"], pat) + p["b_dec"]
                recon = (x - x_hat).pow(2).sum(1).mean() / d
            loss = recon
            if dead is not None and self.aux_coef > 0:
                dead_idx = torch.nonzero(dead).squeeze(1)
                if dead_idx.numel():
                    ka = min(aux_k, dead_idx.numel())
                    with torch.no_grad():
                        idx = dead_idx[torch.topk(pre[:, dead_idx], ka, dim=1, sorted=False).indices]
                    apat = K.SparsePattern.from_topk(idx, self.n_latents)
                    avals = F.relu(K.gather_codes(pre, xc, p["W_enc"], p["b_enc"], apat))
                    e = (x - x_hat).detach()
                    e_hat = K.sparse_decode(avals, p["W_dec"], apat)
                    aux = (e - e_hat).pow(2).sum(1).mean() / d
                    loss = loss + self.aux_coef * aux
                    stats["aux"] = aux.detach()
            live = vals.detach() > 0
            stats["nnz"] = live.sum()
            stats["fired"] = pat.cols[live]
        else:
            pre = F.linear(xc, p["W_enc"], p["b_enc"])
            if self.sae_kind == "relu":
                z = F.relu(pre)
                # L1 relative to the signal norm (‖x_n‖ ≈ sqrt(d)) so one coefficient fits every width
                penalty = (z * p["W_dec"].norm(dim=1)).sum(1).mean() / math.sqrt(d)
            else:
                th = p["log_threshold"].exp()
                z = K.jumprelu(pre, th, self.bandwidth)
                penalty = K.step(pre, th, self.bandwidth).sum(1).mean()
            x_hat = z @ p["W_dec"] + p["b_dec"]
            recon = (x - x_hat).pow(2).sum(1).mean() / d
            loss = recon + self.l1 * penalty
            live = z.detach() > 0
            stats["nnz"] = live.sum()
            stats["fired"] = live.any(0)
        stats["sse"] = (x - x_hat).detach().float().pow(2).sum()
        stats["loss"] = loss.detach()
        return loss, stats
