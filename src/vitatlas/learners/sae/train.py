"""Training loop for sparse autoencoders: streaming batches, sweeps, checkpoints, logs.

``SAESweep([sae_a, sae_b, ...]).fit(X)`` trains several SAEs in one pass over the same batches: each
batch is read, converted and moved to the device once, then every SAE takes its step on it. One SAE's
``SAE.fit`` is a sweep of one, so a sweep gives exactly the SAEs that separate fits give (same seeds,
same batches). Members must have equal ``TrainConfig``s (epochs, batch size, seed, device, dtype, ...);
their models and ``OptimConfig``s (lr, warm-up, ...) may differ.

Data: ``iter_batches`` with shuffling seeded per epoch (``seed * 1_000_003 + epoch``), so an
ActivationStore larger than RAM streams shard by shard; the last partial batch of an epoch is dropped
(BatchTopK thresholds and the learning-rate schedule assume full batches). Before the first step the
data mean and mean squared norm are estimated on up to ``INIT_ROWS`` shuffled rows; they set every
member's input scale and b_dec. With ``init="data"`` the first n_latents of those shuffled rows (more
are read when needed; the same rows on every rank) give the decoder's directions and the next
``SCALE_ROWS`` the encoder's scale (``model.SAEModule.initial``).

Budget (``training_budget``): ``epochs`` whole passes when given, else ``tokens`` rows, else the
default ``default_rows(n)``: 3 passes over the data, at least 1M rows (about a thousand Adam steps at
batch 1,024, what a TopK SAE needs to settle: on the DINOv2-S demo store, 384k rows, 1536 latents,
k = 8, 1 pass gave explained variance 0.824, 2 passes 0.835, 3 passes 0.842, where the old 6 passes
gave 0.849) and at most 8 passes (a 36k-row store trains 8
passes, 288 steps, instead of the 50 passes the old "at least 2,000 steps" default gave it). The
budget may end part-way through a pass. With a progress bar the trainer prints the budget (rows,
passes, steps) at the start and, after ``ETA_STEPS`` steps, the measured time per step and the time
left.

Silent latents (``revive``, ``sae.resample``; off by default): every revive window (LIFT_TOKENS tokens
for "lift", ``dead_tokens`` for "resample") the latents that did not fire in it are lifted or resampled
on that step's batch, after the optimizer step.

The step is the encoder GEMM, the top-k and O(B·k·d) sparse work (``kernels``); AuxK decodes
densely over the dead latents when there are few of them (three (B, dead, d) GEMMs beat the sparse
kernels when aux_k is a large part of them); Adam is the fused (single-pass) implementation; the
per-step statistics stay on the device (no host sync) in float64 scalars.

Checkpoints (``checkpoint_dir``, through the shared ``checkpoint.Checkpoint``): ``state-<step>.safetensors``
(parameters, Adam moments, dead-latent counters, epoch accumulators of every member) and ``state.json``
(step, epoch and batch position in the data stream, options, data fingerprint), written atomically in
that order, the JSON being the commit point. There is no other random state: batch order derives from
the seed and the epoch, so a run killed
at any moment and re-run resumes from the last checkpoint and ends bit-identical on CPU. A checkpoint
made with other options or other data is refused.

Logs: a tqdm bar (postfix: explained_variance, l0, dead_fraction) and, with ``log_dir``, one JSON line
per SAE every ``log_every`` steps and at each epoch end in ``log_dir/log.jsonl``.

Data-parallel (under torchrun, ``vitatlas.distributed``): every rank streams the same global batches (same
seed, same order) and reads and trains on only its contiguous share of each (``distributed.shard``,
through ``iter_batch_shares``: N processes read the store once between them). The losses are this
rank's sums divided by the *global* batch's row count, and each SAE's gradients are summed over the ranks
in one flat all-reduce, so every rank takes the single-process step on the global batch (up to float
rounding in the order of the sums). Also reduced: the latents that fired (a max-all-reduce of the mask:
dead-latent counters, AuxK), BatchTopK's global top-(rows·k) (``objectives.global_batch_topk_pattern``),
the epoch accumulators (when read), the initial mean and scale. Options and data are checked to be the
same on every rank (``check_same``); rank 0 alone writes checkpoints (holding global sums, so a run resumes
with any number of processes) and logs; the others wait at a barrier. For one process none of this runs.

    >>> import numpy as np
    >>> from vitatlas.learners.sae import SAE
    >>> X = np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32)
    >>> sweep = SAESweep([SAE(kind="topk", n_latents=32, k=k, epochs=1, batch_size=128) for k in (2, 4)])
    >>> [s.name for s in sweep.fit(X, progress=False)]
    ['topk-k2-n32', 'topk-k4-n32']
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ... import distributed
from ...arrays import ArrayLike
from ...data.batches import data_fingerprint, iter_batch_shares, iter_batches, n_rows_and_width
from ...dictionary import Dictionary
from ...errors import VitatlasError
from ...io import read_json
from ..checkpoint import STATE as CHECKPOINT_STATE
from ..checkpoint import Checkpoint, resume_options
from ..options import resolve_device, resolve_dtype
from . import kernels as K
from .config import ADDED_OPTIONS, SPARSE_KINDS, OptimConfig, SAEConfig, TrainConfig, upgrade_saved_options
from .model import SAEModule
from .objectives import OBJECTIVES
from .resample import LIFT_TOKENS, lift_dead, resample_dead, resample_schedule, resample_seed


class SAE(Protocol):
    """What the trainer needs of a ``vitatlas.SAE`` (learner.py imports this trainer, not the reverse)."""

    config: SAEConfig
    optim: OptimConfig
    train_config: TrainConfig
    fit_info: dict
    device: str
    dtype: torch.dtype
    name: str
    module: SAEModule | None

    def attach(self, module: SAEModule) -> None: ...
    def record_fit_source(self, X: ArrayLike) -> None: ...
    def _config(self) -> dict: ...

CHECKPOINT_FORMAT = "vitatlas-sae-checkpoint"
INIT_ROWS = 32768
SCALE_ROWS = 4096  # rows (after the decoder's) that fit the encoder's initial scale (``model.encoder_scale``)
# The default budget (epochs and tokens not given), in rows: DEFAULT_EPOCHS passes over the data, but at
# least MIN_DEFAULT_ROWS (an SAE needs about a thousand Adam steps to settle) and at most
# MAX_DEFAULT_EPOCHS passes (a small store is not repeated dozens of times: give ``tokens`` for that).
DEFAULT_EPOCHS = 3
MIN_DEFAULT_ROWS = 1_000_000
MAX_DEFAULT_EPOCHS = 8
RANK_SUMS = ("sse", "sst", "nnz", "loss")  # epoch accumulators each rank sums over its own rows
ETA_STEPS = 20  # steps measured before the time estimate is printed (the first one is left out: warm-up)


def default_lr(n_latents: int) -> float:
    """8e-4 · sqrt(16384 / n_latents), clipped to [2e-4, 4e-3].

    The 1/sqrt(n) scaling is Gao et al.'s (2024); the constant is 4x theirs because vitatlas runs are
    short (thousands of steps, not millions) and inputs are normalised (mean ‖x‖² = d).
    """
    return float(min(4e-3, max(2e-4, 8e-4 * math.sqrt(16384 / n_latents))))


@dataclass(frozen=True)
class Budget:
    """How long a run trains: ``steps`` steps of ``batch_size`` rows, ``steps_per_epoch`` per pass."""

    steps: int
    steps_per_epoch: int
    batch_size: int
    n_rows: int

    @property
    def rows(self) -> int:
        return self.steps * min(self.batch_size, self.n_rows)

    @property
    def epochs(self) -> int:
        """Passes started (the last one may stop part-way)."""
        return math.ceil(self.steps / self.steps_per_epoch)

    def describe(self) -> str:
        return (f"{self.rows:,} rows = {self.steps / self.steps_per_epoch:.3g} epochs of {self.n_rows:,} rows = "
                f"{self.steps:,} steps of {min(self.batch_size, self.n_rows):,}")


def default_rows(n_rows: int) -> int:
    """The default budget: DEFAULT_EPOCHS passes, at least MIN_DEFAULT_ROWS, at most MAX_DEFAULT_EPOCHS passes."""
    return int(min(MAX_DEFAULT_EPOCHS * n_rows, max(DEFAULT_EPOCHS * n_rows, MIN_DEFAULT_ROWS)))


def training_budget(train: TrainConfig, n_rows: int) -> Budget:
    """Steps from ``epochs`` (whole passes), else ``tokens`` (rows), else ``default_rows(n_rows)``."""
    per_step = min(train.batch_size, n_rows)
    steps_per_epoch = n_rows // train.batch_size if n_rows >= train.batch_size else 1
    if train.epochs is not None:
        steps = train.epochs * steps_per_epoch
    elif train.tokens is not None:
        steps = max(1, round(train.tokens / per_step))
    else:
        rows = default_rows(n_rows)
        # whole passes when the default is a number of passes (no pass of a few steps at the end)
        steps = rows // n_rows * steps_per_epoch if rows % n_rows == 0 else max(1, round(rows / per_step))
    return Budget(steps, steps_per_epoch, train.batch_size, n_rows)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class _Member:
    """Training state of one SAE: optimizer, schedule, dead-latent counters, epoch accumulators."""

    def __init__(self, sae: SAE, n_rows: int, budget: Budget):
        self.sae, optim = sae, sae.optim
        self.total_steps = budget.steps
        self.base_lr = optim.lr if optim.lr is not None else default_lr(sae.config.n_latents)
        auto_warmup = min(1000, max(1, self.total_steps // 20))
        self.warmup = optim.warmup_steps if optim.warmup_steps is not None else auto_warmup
        # dead after 10M tokens without firing (Gao et al.), but within one pass over the data and an eighth of
        # the budget, so AuxK starts reviving dead latents early in a short run (3 passes: after 3/8 of a pass)
        self.dead_window = optim.dead_tokens if optim.dead_tokens is not None else \
            max(1, min(10_000_000, n_rows, budget.rows // 8))
        self.objective = OBJECTIVES[sae.config.family]
        self.revive = getattr(sae.config.activation, "revive", "none")
        # resampling: latents dead for the AuxK window, in the first RESAMPLE_UNTIL of the run; lifting: latents
        # silent for LIFT_TOKENS tokens (rarer ones are dead on most scorecard samples), all along the run
        self.revive_window = min(self.dead_window, LIFT_TOKENS) if self.revive == "lift" else self.dead_window
        self.resample_every, self.resample_until = resample_schedule(
            budget.steps, self.revive_window, min(budget.batch_size, n_rows)) if self.revive != "none" else (0, 0)
        if self.revive == "lift":
            self.resample_until = budget.steps
        self.revived = 0  # latents lifted or resampled so far in this process (fit_info)
        self.opt: torch.optim.Adam | None = None
        self.history: dict[str, float] = {}

    @property
    def module(self) -> SAEModule:
        return self.sae.module

    def start(self) -> None:
        """Create optimizer and counters for the (initialised) parameters."""
        sae, m, dev = self.sae, self.module, self.sae.device
        act = sae.config.activation
        self.aux_k = getattr(act, "aux_k", None) or max(1, m.d // 2)
        m.requires_grad_(True)
        main = [p for name, p in m.named_parameters() if name != "log_threshold"]
        groups = [{"params": main, "lr_scale": 1.0}]
        if hasattr(m, "log_threshold"):
            # JumpReLU thresholds move in log space; at the shared lr they could not travel far enough
            # in a short run (measured: 0.1 -> 0.14 in 160 steps while pre-activations were ~1)
            groups.append({"params": [m.log_threshold], "lr_scale": act.threshold_lr_scale})
        # the fused Adam makes one pass over each parameter (3x faster than the loop on CPU)
        self.fused = torch.device(dev).type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(groups, lr=self.base_lr, betas=(0.9, 0.999), fused=self.fused or None)
        n = sae.config.n_latents
        self.since_fired = torch.zeros(n, dtype=torch.long, device=dev)
        self.fired_epoch = torch.zeros(n, dtype=torch.bool, device=dev)
        self.th_updates = 0
        self.reset_acc()

    def reset_acc(self) -> None:
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.sae.device)  # noqa: E731
        self.acc = {"sse": z(), "sst": z(), "nnz": z(), "rows": z(), "loss": z(), "steps": z()}

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def step(self, x_raw: torch.Tensor, step: int, rows: int | None = None) -> None:
        """One step on ``x_raw``: the whole batch, or when data-parallel this rank's share of a global batch
        of ``rows`` rows (losses over the global row count, gradients summed over the ranks)."""
        sae, m = self.sae, self.module
        x = x_raw * m.scale
        dead = self.since_fired >= self.dead_window if sae.config.family in SPARSE_KINDS else None
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if (sae.train_config.amp and x.device.type == "cuda") \
            else contextlib.nullcontext()
        with amp:
            out = self.objective(m, x, dead, self.aux_k, rows)
        out.loss.backward()
        if rows is not None:
            self._all_reduce_grads()
        K.remove_parallel_grad(m.W_dec, m.W_dec.grad)
        if sae.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(m.trainable(), sae.optim.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step) * group["lr_scale"]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        K.normalize_rows_(m.W_dec.data)
        with torch.no_grad():
            b = x.shape[0] if rows is None else rows  # the global batch's rows
            self.since_fired += b
            fired = out.fired if rows is None else self._fired_anywhere(out.fired)
            self.since_fired[fired] = 0
            self.fired_epoch[fired] = True
            if out.batch_threshold is not None:
                # running mean over the first updates, then an EMA (so short runs are not biased to step 0)
                th = m.threshold
                self.th_updates += 1
                mom = min(sae.config.activation.threshold_momentum, 1.0 - 1.0 / float(self.th_updates))
                th.copy_(mom * th + (1 - mom) * out.batch_threshold.to(th.dtype))
            a = self.acc
            a["sse"] += out.sse.double()
            a["sst"] += (x - self._batch_mean(x, rows)).pow_(2).sum().double()  # about the global batch mean
            a["nnz"] += out.nnz.double()
            a["rows"] += b
            a["loss"] += out.loss.detach().double()
            a["steps"] += 1
        done = step + 1
        if self.resample_every and done % self.resample_every == 0 and done <= self.resample_until:
            self._revive(x, done, rows)

    def _revive(self, x: torch.Tensor, done: int, rows: int | None) -> None:
        """Lift (``resample.lift_dead``) or resample (``resample.resample_dead``) the latents silent for the
        revive window after ``done`` steps, on this step's batch; they start a new window."""
        dead = self.since_fired >= self.revive_window
        if not bool(dead.any()):
            return
        if self.revive == "lift":
            chosen = lift_dead(self.module, x, dead, rows)
        else:
            g = torch.Generator().manual_seed(resample_seed(self.sae.train_config.seed, done))
            chosen = resample_dead(self.module, x, dead, self.opt, g, rows)
        self.since_fired[chosen.to(self.since_fired.device)] = 0
        self.revived += int(chosen.numel())

    @staticmethod
    def _batch_mean(x: torch.Tensor, rows: int | None) -> torch.Tensor:
        """The mean of the global batch: this rank holds only its share of it when data-parallel."""
        if rows is None:
            return x.mean(0)
        total = x.sum(0)
        distributed.all_reduce_(total)
        return total / rows

    # -- data-parallel reductions (never called for one process) ------------------------------------------
    def _all_reduce_grads(self) -> None:
        """Sum every parameter's gradient over the ranks in one flat all-reduce."""
        params = list(self.module.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        distributed.all_reduce_(flat, "sum")
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def _fired_anywhere(self, fired: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the latents that fired on any rank (``fired``: this rank's indices or bool mask)."""
        n = self.sae.config.n_latents
        mask = fired.clone() if fired.dtype == torch.bool else \
            torch.zeros(n, dtype=torch.bool, device=fired.device).index_fill_(0, fired, True)
        return distributed.all_reduce_(mask, "max")

    def global_acc(self) -> dict[str, torch.Tensor]:
        """The epoch accumulators over all ranks (this process's own for one process)."""
        if not distributed.world().distributed:
            return self.acc
        packed = distributed.all_reduce_(torch.stack([self.acc[k] for k in RANK_SUMS]), "sum")
        return {**self.acc, **dict(zip(RANK_SUMS, packed))}

    def metrics(self) -> dict[str, float]:
        """Running metrics over the current epoch (training estimates, normalised units)."""
        a = {k: float(v) for k, v in self.global_acc().items()}
        if a["rows"] == 0:
            return dict(self.history)
        return {"loss": a["loss"] / a["steps"],
                "explained_variance": 1.0 - a["sse"] / max(a["sst"], 1e-30),
                "l0": a["nnz"] / a["rows"],
                "dead_fraction": float((self.since_fired >= self.dead_window).float().mean())}

    def end_epoch(self) -> dict[str, float]:
        m = self.metrics()
        m["dead_fraction"] = float(1.0 - self.fired_epoch.float().mean())  # did not fire this epoch
        self.history = m
        self.fired_epoch.zero_()
        self.reset_acc()
        return m

    def finish(self) -> None:
        if self.module is not None:
            self.module.requires_grad_(False)

    # -- checkpoint state ----------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        m = self.module
        out = {f"{prefix}p.{n}": t.detach() for n, t in m.tensors().items()}
        for name, param in m.named_parameters():
            for key, val in self.opt.state.get(param, {}).items():
                out[f"{prefix}adam.{name}.{key}"] = torch.as_tensor(val)
        out[f"{prefix}since_fired"] = self.since_fired
        out[f"{prefix}fired_epoch"] = self.fired_epoch.to(torch.uint8)
        out[f"{prefix}th_updates"] = torch.tensor(self.th_updates, dtype=torch.long)
        out.update({f"{prefix}acc.{k}": v for k, v in self.global_acc().items()})
        return out

    def load_state(self, t: dict[str, torch.Tensor], prefix: str, d: int) -> None:
        sae, dev = self.sae, self.sae.device
        saved = {k[len(prefix) + 2:]: v for k, v in t.items() if k.startswith(prefix + "p.")}
        sae.attach(SAEModule.from_tensors(sae.config, d, saved, device=dev, dtype=sae.dtype))
        self.start()
        for name, param in self.module.named_parameters():
            st = {key.rsplit(".", 1)[1]: v for key, v in t.items() if key.startswith(f"{prefix}adam.{name}.")}
            if st:
                self.opt.state[param] = {k: (v if k == "step" and not self.fused else v.to(dev)) for k, v in st.items()}
        self.since_fired = t[f"{prefix}since_fired"].to(dev)
        self.fired_epoch = t[f"{prefix}fired_epoch"].to(dev).bool()
        self.th_updates = int(t[f"{prefix}th_updates"])
        self.acc = {k: t[f"{prefix}acc.{k}"].to(dev) for k in self.acc}
        if not distributed.is_main():  # the saved sums are global: rank 0 carries them on, the others restart at 0
            for k in RANK_SUMS:
                self.acc[k].zero_()


class _Eta:
    """Prints one line with the measured time per step and the estimated time left, after ETA_STEPS steps."""

    def __init__(self, start_step: int, total: int, bar):
        self.start, self.total, self.bar = start_step, total, bar
        self.t_first: float | None = None

    def tick(self, step: int) -> None:
        if self.bar is None:
            return
        if step == self.start + 1:  # the first step pays one-off costs (allocations, imports)
            self.t_first = time.perf_counter()
        elif self.t_first is not None and step == self.start + 1 + ETA_STEPS:
            per_step = (time.perf_counter() - self.t_first) / ETA_STEPS
            left = (self.total - step) * per_step
            self.bar.write(f"sae: {per_step * 1000:.0f} ms/step over the first steps: about {_duration(left)} "
                           f"for the {self.total - step:,} steps left")
            self.t_first = None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class SAESweep:
    """Several SAEs trained in one pass over the same batches (see module docstring)."""

    def __init__(self, saes: Sequence[SAE]):
        saes = list(saes)
        if not saes:
            raise VitatlasError("an SAE sweep needs at least one SAE")
        if not all(isinstance(s, Dictionary) and isinstance(getattr(s, "train_config", None), TrainConfig)
                   for s in saes):
            raise VitatlasError("SAESweep takes a list of vitatlas.SAE objects")
        first = saes[0].train_config
        for s in saes[1:]:
            if s.train_config != first:
                diff = [k for k in TrainConfig.names() if getattr(s.train_config, k) != getattr(first, k)]
                raise VitatlasError(f"all SAEs of a sweep must share their training options "
                                    f"({', '.join(TrainConfig.names())}); {s.name} differs in {', '.join(diff)}")
        if len({id(s) for s in saes}) != len(saes):
            raise VitatlasError("the same SAE object appears twice in the sweep")
        self.saes = saes
        self.train = first

    def fit(self, X: ArrayLike, *, checkpoint_dir: str | Path | None = None, progress: bool = True,
            log_dir: str | Path | None = None, callback: Callable[[int, dict], Any] | None = None) -> list[SAE]:
        from tqdm.auto import tqdm

        tc = self.train
        device, dtype = resolve_device(tc.device), resolve_dtype(tc.dtype)
        n, d = n_rows_and_width(X)
        if n == 0:
            raise VitatlasError("X is empty (0 rows): pass at least one sample")
        budget = training_budget(tc, n)
        drop_last = n >= tc.batch_size
        members = [_Member(s, n, budget) for s in self.saes]
        total = budget.steps
        for s in self.saes:
            s.record_fit_source(X)
        w = distributed.world()
        if w.distributed and min(tc.batch_size, n) < w.size:
            raise VitatlasError(f"batch_size {min(tc.batch_size, n)} is smaller than the {w.size} processes: every "
                                "rank needs rows of each batch; use a larger batch_size or fewer processes")

        ckpt = Checkpoint(checkpoint_dir, CHECKPOINT_FORMAT, "SAE checkpoint") if checkpoint_dir is not None else None
        fingerprint = data_fingerprint(X, n, d) if (ckpt is not None or w.distributed) else None
        identity = self._identity(d, fingerprint) if ckpt is not None else None
        if w.distributed:  # every rank must train the same SAEs on the same data, and see the same checkpoint
            distributed.check_same({"saes": [s._config() for s in self.saes], "rows": n, "d": d, "data": fingerprint,
                                    "checkpoint": ckpt is not None and ckpt.exists()}, "the SAE options and data")
        step, epoch, pos = 0, 0, 0
        if ckpt is not None and ckpt.exists():
            step, epoch, pos = self._resume(ckpt, members, d, identity)
            distributed.barrier("loading the SAE checkpoint")  # nobody overwrites it while another rank reads
        else:
            # data init: each member's first n_latents shuffled rows become its decoder rows, the next
            # SCALE_ROWS set its encoder's scale
            want_rows = max((m.sae.config.n_latents for m in members if m.sae.optim.init == "data"), default=0)
            mean, scale, rows = self._data_stats(X, d, device, dtype, tc.seed, want_rows and want_rows + SCALE_ROWS)
            for m in members:
                n_init = m.sae.config.n_latents + SCALE_ROWS
                data_rows = rows[:n_init] * scale if m.sae.optim.init == "data" else None
                m.sae.attach(SAEModule.initial(m.sae.config, d, mean * scale, scale, seed=tc.seed,
                                               device=device, dtype=dtype, rows=data_rows))
                m.start()

        progress = progress and w.is_main  # one bar and one log: rank 0's
        if log_dir is not None and w.is_main:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(log_dir) / "log.jsonl", "a") if log_dir is not None and w.is_main else None
        bar = tqdm(total=total, initial=step, desc="sae" if len(members) == 1 else f"sae x{len(members)}",
                   unit="step", disable=not progress, dynamic_ncols=True)
        if progress:
            bar.write(f"sae: training budget {budget.describe()}" + (f", resuming at step {step:,}" if step else ""))
        eta = _Eta(step, total, bar if progress else None)
        t0, rows_done = time.perf_counter(), 0
        try:
            while step < total:
                # each rank reads only its share of every global batch; a resumed epoch starts at batch pos
                shares = iter_batch_shares(X, tc.batch_size, shuffle=True, seed=epoch_seed(tc.seed, epoch),
                                           device=device, dtype=dtype, drop_last=drop_last, d=d, start_batch=pos)
                for b_idx, (rows, x) in enumerate(shares, start=pos):
                    for m in members:
                        m.step(x, step, rows if w.distributed else None)
                    step, pos, rows_done = step + 1, b_idx + 1, rows_done + rows
                    bar.update(1)
                    eta.tick(step)
                    if step % tc.log_every == 0 or callback is not None:
                        metrics = {m.sae.name: m.metrics() for m in members}
                        if step % tc.log_every == 0:
                            self._log(log, bar, members, metrics, step, epoch, rows_done / (time.perf_counter() - t0))
                        if callback is not None:
                            callback(step, metrics)
                    if ckpt is not None and step % tc.checkpoint_every == 0:
                        self._save(ckpt, members, identity, step, epoch, pos, complete=False)
                    if step >= total:
                        break  # the budget may end part-way through a pass
                epoch, pos = self._end_epoch(log, bar, members, step, epoch, rows_done, t0)
            if pos:  # resumed from a checkpoint taken on the budget's last step, before its pass was closed
                epoch, pos = self._end_epoch(log, bar, members, step, epoch, rows_done, t0)
            if ckpt is not None:
                self._save(ckpt, members, identity, step, epoch, 0, complete=True)
        finally:
            bar.close()
            if log is not None:
                log.close()
            for m in members:
                m.finish()
        for m in members:
            m.sae.fit_info = dict(m.sae.fit_info, train_metrics=dict(m.history), steps=step)
            if m.resample_every:
                m.sae.fit_info["revived_latents"] = m.revived
        return self.saes

    def _end_epoch(self, log, bar, members, step, epoch, rows_done, t0) -> tuple[int, int]:
        ends = {m.sae.name: m.end_epoch() for m in members}
        self._log(log, bar, members, ends, step, epoch, rows_done / max(time.perf_counter() - t0, 1e-9),
                  event="epoch_end")
        return epoch + 1, 0

    # -- helpers -------------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def _data_stats(X: ArrayLike, d: int, device: str, dtype: torch.dtype, seed: int,
                    want_rows: int = 0) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Mean (d,) and input scale sqrt(d / mean ‖x‖²) from up to INIT_ROWS shuffled rows, and the first
        ``want_rows`` of those shuffled rows (all of them when the data has fewer; float64 on the CPU) for
        a data initialisation: more than INIT_ROWS are read when more are wanted."""
        total = torch.zeros(d, dtype=torch.float64, device=device)
        sq = torch.zeros((), dtype=torch.float64, device=device)
        rows, n_kept = 0, 0
        kept: list[torch.Tensor] = []
        w = distributed.world()
        for x in iter_batches(X, 8192, shuffle=True, seed=seed + 7919, device=device, dtype=dtype, d=d):
            if n_kept < want_rows:  # the global batch's rows: the same on every rank
                kept.append(x[:want_rows - n_kept].to("cpu", torch.float64))
                n_kept += kept[-1].shape[0]
            if rows < INIT_ROWS:  # the statistics: whole batches up to INIT_ROWS rows
                rows += x.shape[0]
                if w.distributed:  # each rank sums its part of the same rows; the sums are reduced below
                    part = distributed.shard(x.shape[0])
                    x = x[part.start:part.stop]
                total += x.sum(0, dtype=torch.float64)  # float64 sums of the training dtype's rows
                sq += (x * x).sum(dtype=torch.float64)
            if rows >= INIT_ROWS and n_kept >= want_rows:
                break
        if w.distributed:
            distributed.all_reduce_(total)
            distributed.all_reduce_(sq)
        msq = float(sq) / rows
        if not msq > 0:
            raise VitatlasError("X is all zeros: an SAE cannot be fitted to it")
        init_rows = torch.cat(kept) if kept else torch.zeros(0, d, dtype=torch.float64)
        return total / rows, math.sqrt(d / msq), init_rows

    @staticmethod
    def _log(log, bar, members, metrics: dict, step: int, epoch: int, tokens_per_s: float, event: str = "step") -> None:
        if log is not None:
            now = time.time()
            for m in members:
                row = {"event": event, "sae": m.sae.name, "step": step, "epoch": epoch, "lr": m.lr_at(max(0, step - 1)),
                       **metrics[m.sae.name], "tokens_per_s": tokens_per_s, "time": now}
                log.write(json.dumps(row) + "\n")
            log.flush()
        vals = list(metrics.values())
        if not vals or not vals[0]:
            return
        if len(vals) == 1:
            v = vals[0]
            bar.set_postfix(loss=f"{v['loss']:.4f}", ev=f"{v['explained_variance']:.3f}", l0=f"{v['l0']:.1f}",
                            dead=f"{v['dead_fraction']:.3f}")
        else:
            ev = [v["explained_variance"] for v in vals]
            bar.set_postfix(ev=f"{min(ev):.3f}..{max(ev):.3f}")

    def _identity(self, d: int, fingerprint: str) -> dict:
        """What a checkpoint must match to be resumed: the options that shape the training and the data (not
        where it runs or how often it saves, so a CPU checkpoint resumes on a GPU)."""
        return {"configs": [resume_options(s._config()) for s in self.saes], "d": d, "data": fingerprint}

    @staticmethod
    def _save(ckpt: Checkpoint, members, identity, step, epoch, pos, complete) -> None:
        """Rank 0 writes (every rank holds the same parameters; the accumulators are reduced first)."""
        tensors: dict[str, torch.Tensor] = {}
        for i, m in enumerate(members):
            tensors.update(m.state(f"m{i}."))
        if distributed.is_main():
            ckpt.save(step, tensors, {"identity": identity, "epoch": epoch, "batch": pos, "complete": complete,
                                      "history": [m.history for m in members]})
        distributed.barrier("writing the SAE checkpoint")

    @staticmethod
    def _resume(ckpt: Checkpoint, members, d: int, identity: dict) -> tuple[int, int, int]:
        def mismatch(saved) -> str:
            if not isinstance(saved, dict) or saved.get("d") != d or saved.get("data") != identity["data"]:
                return (f"checkpoint in {ckpt.dir} was made on different data; use another checkpoint directory or "
                        "delete it")
            missing = _options_added_since(saved)
            if missing:
                old = ", ".join(f"{k}={v!r}" for k, v in missing.items())
                return (f"checkpoint in {ckpt.dir} was written by an older vitatlas, before the SAE options "
                        f"{', '.join(missing)} (it trains with {old}); pass {old} to resume it, or delete it")
            return (f"checkpoint in {ckpt.dir} was made with different SAE options; re-run with the same options or "
                    "delete it")

        saved = _saved_identity(ckpt)
        if isinstance(saved, dict) and isinstance(saved.get("configs"), list) and _options_added_since(saved) and \
                {**saved, "configs": [upgrade_saved_options(c) for c in saved["configs"]]} == identity:
            identity = saved  # an older trainer's checkpoint of these very options: it resumes as it was written
        meta, tensors = ckpt.load(identity, mismatch=mismatch)
        try:
            for i, m in enumerate(members):
                m.load_state(tensors, f"m{i}.", d)
                m.history = dict(meta.get("history", [{}] * len(members))[i])
        except KeyError as exc:
            raise VitatlasError(f"SAE checkpoint in {ckpt.dir} is incomplete (missing {exc}); delete it to start "
                                "over") from None
        return int(meta["step"]), int(meta["epoch"]), int(meta["batch"])


def _saved_identity(ckpt: Checkpoint):
    """The identity recorded in the checkpoint (None when unreadable: ``Checkpoint.load`` then says why)."""
    try:
        meta = read_json(ckpt.dir / CHECKPOINT_STATE, what="SAE checkpoint")
    except VitatlasError:
        return None
    return meta.get("identity") if isinstance(meta, dict) else None


def _options_added_since(saved: dict) -> dict:
    """``ADDED_OPTIONS`` (name: the value an older trainer used) that a saved identity's SAEs lack."""
    configs = saved.get("configs") if isinstance(saved, dict) else None
    if not isinstance(configs, list):
        return {}
    lacking = {}
    for c in configs:
        if isinstance(c, dict):
            lacking.update({k: v for k, v in upgrade_saved_options(c).items() if k in ADDED_OPTIONS and k not in c})
    return lacking


def fit_many(saes: Sequence[SAE], X: ArrayLike, **kwargs) -> list[SAE]:
    """Train several SAEs in one pass over the same batches (``SAESweep(saes).fit(X, **kwargs)``)."""
    return SAESweep(saes).fit(X, **kwargs)
