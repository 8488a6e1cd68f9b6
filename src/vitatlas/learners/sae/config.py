"""The SAE's options as frozen dataclasses: the model, how each SAE learns, and the shared data stream.

* The **activation** (one small class per family: ``ReLU``, ``TopK``, ``BatchTopK``, ``JumpReLU``,
  ``Matryoshka``) holds only the options that family uses, so ``k`` on a ReLU SAE or ``l1`` on a
  TopK SAE cannot be expressed.
* ``SAEConfig`` = activation + ``n_latents``: what the model *is*.
* ``OptimConfig``: how one SAE learns (initialisation, lr, warm-up, clipping, when a latent counts as
  dead); may differ between the members of a sweep.
* ``TrainConfig``: how the data is streamed (epochs, batch size, seed, device, dtype, ...); the
  members of a sweep train on the same batches, so their ``TrainConfig`` must be ``==``.

``sae_options(kind, n_latents, k, l1, **options)`` routes the flat keyword options of
``SAE(kind=..., ...)`` (and of a saved ``config.json``) to these classes:

    >>> model, optim, train = sae_options("topk", 64, k=4, lr=1e-3, batch_size=256)
    >>> model.activation
    TopK(k=4, aux_coef=0.03125, aux_k=None, aux_relative=True, revive='none')
    >>> optim.lr, train.batch_size
    (0.001, 256)
    >>> sae_options("relu", 64, k=4)
    Traceback (most recent call last):
    ...
    vitatlas.errors.OptionError: k is not used by a relu SAE (its sparsity comes from l1); drop k or use kind='topk'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import OptionError
from ..options import (
    Choice,
    Device,
    DType,
    Flag,
    Int,
    Ints,
    Options,
    Real,
    option,
    require_k_below,
    require_prefix_sizes,
)

SPARSE_KINDS = ("topk", "batchtopk", "matryoshka")  # sparsity from k (sparse decoding kernels)
L1_KINDS = ("relu", "jumprelu")  # sparsity from a penalty coefficient


# ---- activations (one class per SAE family) ---------------------------------------------------------

@dataclass(frozen=True)
class ReLU(Options):
    """z = ReLU(pre); loss = ‖x - x̂‖²/d + l1 · Σ z_i ‖W_dec,i‖ / sqrt(d) (see ``sae.learner`` for the default)."""

    family: ClassVar[str] = "relu"
    what: ClassVar[str] = "a relu SAE"
    l1: float = option(0.15, Real(min=0), "L1 coefficient on z·‖W_dec‖/sqrt(d)")


@dataclass(frozen=True)
class JumpReLU(Options):
    """z = pre · H(pre - θ) with learned θ, an L0 penalty and straight-through pseudo-derivatives."""

    family: ClassVar[str] = "jumprelu"
    what: ClassVar[str] = "a jumprelu SAE"
    l1: float = option(1e-2, Real(min=0), "L0 coefficient")
    bandwidth: float = option(0.05, Real(min=0, min_open=True), "straight-through kernel width")
    threshold_init: float = option(0.1, Real(min=0, min_open=True), "initial θ (normalised units)")
    threshold_lr_scale: float = option(10.0, Real(min=0, min_open=True), "θ's learning rate relative to lr")


@dataclass(frozen=True)
class TopK(Options):
    """The k largest pre-activations per row, with the AuxK loss on dead latents."""

    family: ClassVar[str] = "topk"
    what: ClassVar[str] = "a topk SAE"
    k: int = option(rule=Int(min=1), doc="active latents per sample")
    aux_coef: float = option(1 / 32, Real(min=0), "AuxK loss weight")
    aux_k: int | None = option(None, Int(min=1, optional=True), "dead latents per row in AuxK (None: d // 2)")
    aux_relative: bool = option(True, Flag(), "AuxK error relative to the residual's energy (Gao et al.), "
                                "not per coordinate")
    revive: str = option("none", Choice(("none", "resample", "lift")),
                         "what is done to latents that stop firing (sae.resample): 'none' = AuxK only, 'lift' = "
                         "their encoder bias is raised until they fire on their best row of the batch, "
                         "'resample' = new directions from badly reconstructed rows")


@dataclass(frozen=True)
class BatchTopK(TopK):
    """The B·k largest pre-activations of a batch; a running threshold makes inference a JumpReLU."""

    family: ClassVar[str] = "batchtopk"
    what: ClassVar[str] = "a batchtopk SAE"
    threshold_momentum: float = option(0.99, Real(min=0, max=1, max_open=True), "running-threshold EMA momentum")


@dataclass(frozen=True)
class Matryoshka(BatchTopK):
    """A topk/batchtopk SAE trained on the mean loss of nested latent prefixes."""

    family: ClassVar[str] = "matryoshka"
    what: ClassVar[str] = "a matryoshka SAE"
    base: str = option("batchtopk", Choice(("topk", "batchtopk")), "activation of the prefixes")
    groups: tuple[int, ...] | None = option(None, Ints(min=1, optional=True),
                                            "prefix sizes (None: n/16, n/8, n/4, n/2, n)")


ACTIVATIONS: dict[str, type[Options]] = {c.family: c for c in (ReLU, TopK, BatchTopK, JumpReLU, Matryoshka)}
KINDS = tuple(ACTIVATIONS)
DEFAULT_L1 = {"relu": ReLU.l1, "jumprelu": JumpReLU.l1}


def uses_batch_threshold(activation: Options) -> bool:
    """BatchTopK, and Matryoshka over BatchTopK, learn one global inference threshold."""
    return activation.family == "batchtopk" or (activation.family == "matryoshka" and activation.base == "batchtopk")


# ---- model, per-SAE training, shared stream ----------------------------------------------------------

@dataclass(frozen=True)
class SAEConfig(Options):
    """What the model is: its activation family (with that family's options) and its width."""

    what: ClassVar[str] = "an SAE"
    activation: Options = option(rule=None, doc="one of ReLU, TopK, BatchTopK, JumpReLU, Matryoshka")
    n_latents: int = option(rule=Int(min=1), doc="number of latents (= atoms)")

    def check_rules(self) -> None:
        if not isinstance(self.activation, tuple(ACTIVATIONS.values())):
            raise OptionError(f"activation must be one of {', '.join(c.__name__ for c in ACTIVATIONS.values())}, "
                              f"got {type(self.activation).__name__}")
        if isinstance(self.activation, TopK):
            require_k_below(self.activation.k, self.n_latents, "n_latents")
        if isinstance(self.activation, Matryoshka):
            require_prefix_sizes(self.activation.groups, self.n_latents, "n_latents")

    @property
    def family(self) -> str:
        return self.activation.family

    def default_groups(self) -> list[int]:
        n = self.n_latents
        return sorted({max(1, n // f) for f in (16, 8, 4, 2)} | {n})

    def prefix_sizes(self) -> list[int]:
        return list(self.activation.groups or self.default_groups())


@dataclass(frozen=True)
class OptimConfig(Options):
    """How one SAE learns; may differ between the members of a sweep."""

    what: ClassVar[str] = "an SAE"
    lr: float | None = option(None, Real(min=0, max=1, min_open=True, optional=True),
                              "Adam learning rate (None: 8e-4·sqrt(16384/n_latents) in [2e-4, 4e-3])")
    warmup_steps: int | None = option(None, Int(min=0, optional=True), "linear warm-up (None: 5% of steps, <= 1000)")
    grad_clip: float | None = option(1.0, Real(min=0, optional=True), "max gradient norm (None or 0: off)")
    dead_tokens: int | None = option(None, Int(min=1, optional=True),
                                     "a latent is dead after this many tokens without firing (None: min(1e7, rows, budget/8))")
    init: str = option("random", Choice(("random", "data")),
                       "decoder (= encoder) rows at the start: 'data' = directions of data rows about the mean, "
                       "'random' = Gaussian")


@dataclass(frozen=True)
class TrainConfig(Options):
    """How the data is streamed; every member of a sweep shares it (compared with ``==``)."""

    what: ClassVar[str] = "an SAE"
    epochs: int | None = option(None, Int(min=1, optional=True), "passes over the data (None: the budget in tokens)")
    tokens: int | None = option(None, Int(min=1, optional=True),
                                "rows to train on when epochs is None (None: 3 passes, >= 1M rows, <= 8 passes)")
    batch_size: int = option(1024, Int(min=1), "rows per step (the last partial batch is dropped)")
    seed: int = option(0, Int(min=0), "initialisation and batch order")
    device: str = option("cpu", Device(), "'cpu' or 'cuda[:N]'")
    dtype: str = option("float32", DType(), "'float32' or 'float64'")
    amp: bool = option(True, Flag(), "bf16 autocast for the forward pass on CUDA")
    checkpoint_every: int = option(500, Int(min=1), "steps between checkpoints")
    log_every: int = option(50, Int(min=1), "steps between log rows")

    def check_rules(self) -> None:
        if self.epochs is not None and self.tokens is not None:
            raise OptionError("give epochs or tokens, not both (tokens is the training budget in rows)")


# ---- the flat keyword form of SAE(kind=..., ...) and config.json -------------------------------------

def _owner_of(name: str) -> list[str]:
    return [fam for fam, cls in ACTIVATIONS.items() if name in cls.names()]


def sae_options(kind: str, n_latents: int, k: int | None = None, l1: float | None = None,
                **options) -> tuple[SAEConfig, OptimConfig, TrainConfig]:
    """Route ``SAE(kind, n_latents, k, l1, **options)`` to the three configs, with one-line errors."""
    kind = Choice(tuple(KINDS), what="SAE kind").check("kind", kind)
    act_cls = ACTIVATIONS[kind]
    act: dict = {}
    if kind in SPARSE_KINDS:
        if k is None:
            raise OptionError(f"a {kind} SAE needs k (the active latents per sample, e.g. k=32)")
        if l1 is not None:
            raise OptionError(f"l1 is not used by a {kind} SAE (its sparsity is k); drop l1 or use "
                              "kind='relu'/'jumprelu'")
        act["k"] = k
    else:
        if k is not None:
            raise OptionError(f"k is not used by a {kind} SAE (its sparsity comes from l1); drop k or use kind='topk'")
        if l1 is not None:
            act["l1"] = l1
    optim, train = {}, {}
    for name, value in options.items():
        if name in act_cls.names():
            act[name] = value
        elif name in OptimConfig.names():
            optim[name] = value
        elif name in TrainConfig.names():
            train[name] = value
        elif _owner_of(name):
            if value is not None:  # None means "not given", as in the flat form every option had before
                raise OptionError(f"{name} is not used by a {kind} SAE (only by {', '.join(_owner_of(name))}); "
                                  f"drop {name}" + (" or use kind='matryoshka'" if name == "groups" else ""))
        else:
            known = sorted({"k", "l1", *OptimConfig.names(), *TrainConfig.names(),
                            *(n for c in ACTIVATIONS.values() for n in c.names())})
            raise OptionError(f"unknown SAE option {name!r}: known options are {', '.join(known)}")
    activation = act_cls.from_dict(act)
    return SAEConfig(activation, n_latents), OptimConfig(**optim), TrainConfig(**train)


def flat_options(model: SAEConfig, optim: OptimConfig, train: TrainConfig) -> dict:
    """The flat, JSON-able keyword form: ``SAE(**flat_options(...))`` rebuilds the same SAE."""
    return {"kind": model.family, "n_latents": model.n_latents, **model.activation.to_dict(),
            **optim.to_dict(), **train.to_dict()}


# Options added after runs were saved, with the value every run saved before them was trained with (the
# defaults changed with them): a config.json or checkpoint without one of these keys gets that value, so
# an old run reports how it was trained and an old checkpoint resumes only with its own options.
ADDED_OPTIONS = {"init": "random", "aux_relative": False, "revive": "none"}


def upgrade_saved_options(config: dict) -> dict:
    """The options of a saved config.json (or checkpoint), upgraded to the current form.

    Written before the typed configs, it held every option for every kind (unused ones at their defaults,
    and ignored): keep only what the saved kind uses. Written before an ``ADDED_OPTIONS`` option existed:
    that option's old behaviour."""
    kind = config.get("kind")
    if kind not in ACTIVATIONS:
        return dict(config)
    used = {"kind", "n_latents", "k", "l1", *ACTIVATIONS[kind].names(), *OptimConfig.names(), *TrainConfig.names()}
    out = {k: v for k, v in config.items() if k in used}  # k=None / l1=None read as "not given"
    for name, old in ADDED_OPTIONS.items():
        if name in used and name not in out:
            out[name] = old
    return out
