"""Sparse autoencoders (SAEs) as vitatlas dictionaries: ReLU+L1, TopK, BatchTopK, JumpReLU, Matryoshka.

    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32)
    >>> sae = SAE(kind="topk", n_latents=32, k=4, epochs=2, batch_size=128).fit(X, progress=False)
    >>> codes = sae.encode(X); X_hat = sae.reconstruct(X)
    >>> codes.shape, X_hat.shape, int((codes[0] != 0).sum())
    ((512, 32), (512, 16), 4)
    >>> sae.family, sae.learner, sae.config.activation
    ('topk', 'sae', TopK(k=4, aux_coef=0.03125, aux_k=None, aux_relative=True, revive='none'))

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
  ``aux_k`` largest pre-activations, weighted by ``aux_coef``; optionally, silent latents are lifted
  or resampled (``revive``, ``sae.resample``).
* ``batchtopk``: keep the B·k largest pre-activations of the batch (mean L0 = k during training);
  a running estimate of the smallest kept value becomes a global threshold, so inference is a
  JumpReLU with mean L0 close to k (Bussmann et al. 2024). AuxK as for topk.
* ``jumprelu``: z = pre · H(pre - θ_i) with learned per-latent θ and loss ‖x_n - x̂_n‖²/d + l1 · L0,
  trained with the straight-through pseudo-derivatives of Rajamanoharan et al. 2024 (``l1`` is the
  L0 coefficient here, default 1e-2; thresholds start at ``threshold_init``, kernel width ``bandwidth``).
* ``matryoshka``: a topk/batchtopk SAE (``base``) whose loss is the mean reconstruction loss of
  nested prefixes of the latents (``groups`` = prefix sizes, default n/16, n/8, n/4, n/2, n), so the
  first latents learn coarse concepts alone (Bussmann et al. 2025, Nabeshima 2024).

Options are three frozen dataclasses (``sae.config``): ``SAEConfig`` (the family's activation class
and ``n_latents``), ``OptimConfig`` (lr, warm-up, clipping, dead-latent window) and ``TrainConfig``
(epochs, batch size, seed, device, dtype, ...); ``SAE(kind=..., ...)`` is a thin wrapper that routes
its keyword options to them. Parameters live in a private ``nn.Module`` (``sae.model``); the losses
are one function per family (``sae.objectives``).

Training: Adam with linear warm-up then cosine decay to 0, gradient clipping, decoder rows unit-norm
with the gradient component parallel to each row removed before the step and renormalised after,
b_dec initialised to the data mean, W_dec's rows to Gaussian directions (``init="random"``, the default)
or to the directions of shuffled data rows about that mean (``init="data"``), W_enc to W_dec (the
decoder transpose as encoder; scaled by the least-squares fit of the first reconstruction with
``init="data"``), TopK decoding through sparse kernels (``sae.kernels``). See ``sae.train`` for the
loop, checkpoints, logging and sweeps.

Dead latents (issue 19), measured on the demo's store (DINOv2-S layer-8 patches of 1,000 Fashion-MNIST test
images, 256k rows), 1,536 latents, the default budget (977 steps), scored by ``vitatlas scorecard
--max-images 200`` (51k rows; dead = never fires on them), k = 8 (k = 4 in brackets):

* the defaults (``init="random"``, ``revive="none"``: AuxK alone, relative to the residual's energy): dead
  0.147 (0.849), explained variance 0.843 (0.781). Silent latents are mostly rare, not dead: on all 256k
  rows only 2% never fire, but 47% fire fewer than 26 times (see ``sae.resample``);
* ``revive="lift"``: 0.025 (0.079) dead at 0.835 (0.758), but label faithfulness 0.640 against 0.691,
  specificity 0.220 against 0.257, Moran's I 0.242 against 0.285;
* ``init="data", revive="lift"``: 0.027 (0.073) dead at 0.855 (0.800); faithfulness 0.701, specificity
  0.244, sparse probing acc@5 0.630 against 0.670, Moran's I 0.271, max coherence 0.923 against 0.692;
* ``init="data"`` alone: 0.320 (0.509) at 0.859 (0.818); ``revive="resample"``: 0.127 (0.488) at 0.835
  (0.782).

Neither revival is the default: lifting forces latents the data does not need to fire. On a planted
problem with twice as many latents as atoms (``tests/test_sae.py``'s recovery test), AuxK alone leaves
0.46 of them dead, as it should, and recovers 0.99 of the atoms at |cos| >= 0.99; lifting keeps all but
0.09 (random init) / 0.21 (data init) firing, and recovers 0.98 / 0.00 of the atoms at 0.99 (0.99 at 0.95:
the atoms are found but blurred). Resampling leaves most of them dead (0.38) and recovers 0.98 / 1.00.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...dictionary import ArrayLike, Dictionary
from ...errors import VitatlasError
from ..options import resolve_dtype
from .config import OptimConfig, SAEConfig, TrainConfig, flat_options, sae_options, upgrade_saved_options
from .model import SAEModule
from .train import SAESweep


class SAE(Dictionary):
    """A sparse autoencoder dictionary. ``n_atoms == n_latents``; ``atoms`` are the decoder rows.

    ``SAE(kind, n_latents, k=None, l1=None, **options)``: ``kind`` is the family (``KINDS``), ``k``
    the active latents per sample (topk, batchtopk, matryoshka; 0 < k < n_latents), ``l1`` the
    sparsity coefficient (relu: L1 on z·‖W_dec‖/sqrt(d), default 0.15; jumprelu: on L0, default 1e-2).
    The other options, with their constraints and defaults, are the fields of the family's activation
    class, ``OptimConfig`` and ``TrainConfig`` in ``sae.config`` (see also docs/learners.md); an option
    the family does not use (``aux_coef`` on a relu SAE) is a one-line ``OptionError``. Alternatively
    pass the configs themselves: ``SAE.from_configs(SAEConfig(TopK(k=32), 1536))``.

    Attributes: ``learner`` ("sae", the registry key), ``family`` (relu, topk, ...), ``config``,
    ``optim``, ``train_config``; ``k``, ``l1``, ``n_latents``, ``device``, ``dtype``, ``seed`` for short.
    """

    learner = "sae"

    def __init__(self, kind: str, n_latents: int, k: int | None = None, l1: float | None = None, **options):
        self._setup(*sae_options(kind, n_latents, k, l1, **options))

    @classmethod
    def from_configs(cls, config: SAEConfig, optim: OptimConfig | None = None,
                     train: TrainConfig | None = None) -> SAE:
        obj = cls.__new__(cls)
        obj._setup(config, optim or OptimConfig(), train or TrainConfig())
        return obj

    def _setup(self, config: SAEConfig, optim: OptimConfig, train: TrainConfig) -> None:
        self.config, self.optim, self.train_config = config, optim, train
        self.device, self.dtype = train.device, resolve_dtype(train.dtype)
        self._module: SAEModule | None = None
        self.d = None
        self.fit_info = {}

    @classmethod
    def _saved_options(cls, config: dict) -> dict:
        return upgrade_saved_options(config)

    # ---- names ---------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """The SAE family: relu, topk, batchtopk, jumprelu or matryoshka."""
        return self.config.family

    @property
    def n_latents(self) -> int:
        return self.config.n_latents

    @property
    def n_atoms(self) -> int:  # type: ignore[override]
        return self.config.n_latents

    @property
    def k(self) -> int | None:
        return getattr(self.config.activation, "k", None)

    @property
    def l1(self) -> float | None:
        return getattr(self.config.activation, "l1", None)

    @property
    def seed(self) -> int:
        return self.train_config.seed

    @property
    def name(self) -> str:
        """Short run name, e.g. ``topk-k32-n1536`` or ``relu-l1_0.15-n1536``."""
        sparsity = f"k{self.k}" if self.k is not None else f"l1_{self.l1:g}"
        name = f"{self.family}-{sparsity}-n{self.n_latents}"
        return name + (f"-lr{self.optim.lr:g}" if self.optim.lr is not None else "")

    # ---- Dictionary interface ----------------------------------------------------------------------
    @property
    def atoms(self) -> torch.Tensor:
        self._check_fitted()
        return self._module.W_dec.detach()

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers by name (W_dec, b_dec, W_enc, b_enc, scale, [log_]threshold)."""
        self._check_fitted()
        return self._module.tensors()

    @property
    def scale(self) -> float:
        return float(self.params["scale"])

    def _config(self) -> dict:
        return flat_options(self.config, self.optim, self.train_config)

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.params.items()}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.attach(SAEModule.from_tensors(self.config, int(meta["d"]), tensors, device=self.device,
                                                dtype=self.dtype))

    @property
    def module(self) -> SAEModule | None:
        """The parameters as a torch module (None before fitting or loading)."""
        return self._module

    def attach(self, module: SAEModule) -> None:
        """Use ``module``'s parameters from now on: how the trainer installs a fresh or restored model."""
        if module.config != self.config:
            raise VitatlasError(f"cannot attach parameters of a {module.config.family} SAE with "
                                f"{module.config.n_latents} latents to {self.name}")
        self._module, self.d = module, module.d

    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) in data units -> (B, n_latents) codes in data units (z / s)."""
        m = self._module
        return m.activate(m.pre_activations(x * m.scale)) / m.scale

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        m = self._module
        return codes @ m.W_dec + m.b_dec / m.scale

    # ---- training ----------------------------------------------------------------------------------
    def fit(self, X: ArrayLike, *, checkpoint_dir: str | None = None, progress: bool = True,
            log_dir: str | None = None, callback: Callable[[int, dict], Any] | None = None) -> SAE:
        """Train on X (array, tensor or ActivationStore) from a fresh initialisation; returns self.

        checkpoint_dir: write a checkpoint there every ``checkpoint_every`` steps and at the end, and
        resume from it when it exists (same options and data required). log_dir: append metrics to
        ``log_dir/log.jsonl``. callback(step, metrics) is called after every step (tests use it to
        simulate a kill). Final training metrics are in ``self.fit_info["train_metrics"]``.
        """
        SAESweep([self]).fit(X, checkpoint_dir=checkpoint_dir, progress=progress, log_dir=log_dir,
                             callback=callback)
        return self
