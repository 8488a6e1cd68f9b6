"""Heads that read an intervention's effect: a linear probe on the model's final normed tokens.

A ``LinearProbe`` is multinomial logistic regression (softmax over classes, L2-regularised, fitted with
L-BFGS on standardised features). For ``task="classification"`` it reads the final CLS token (the mean
patch token for models without one); for ``task="segmentation"`` it reads every final patch token.

On disk a probe is a directory: ``probe.safetensors`` (weight (C, d), bias (C,), feature mean/std) and
``probe.json`` (task, class names, the model it was trained on — name, revision, width, layer "final"
— and its held-out metrics). A probe trained on another model is refused by ``check_model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import VitatlasError
from ..io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from ..models.base import VisionModel

FORMAT = "vitatlas-probe"
TASKS = ("classification", "segmentation")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise VitatlasError(f"unknown task {task!r}: use classification or segmentation")
    return task


def model_identity(model: VisionModel) -> dict:
    return {"name": model.name, "revision": model.revision, "width": int(model.width),
            "n_layers": int(model.n_layers), "n_prefix_tokens": int(model.n_prefix_tokens), "layer": "final"}


def features_of(final: torch.Tensor, task: str, n_prefix_tokens: int) -> torch.Tensor:
    """Final normed tokens (B, T, d) -> probe inputs: (B, d) for classification, (B, P, d) for segmentation."""
    if task == "segmentation":
        return final[:, n_prefix_tokens:]
    return final[:, 0] if n_prefix_tokens > 0 else final[:, n_prefix_tokens:].mean(dim=1)


@dataclass
class LinearProbe:
    """Softmax regression on final tokens. ``weight`` (C, d), ``bias`` (C,), ``mean``/``std`` (d,)."""

    task: str
    class_names: list[str]
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    model: dict
    metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_prefix_tokens(self) -> int:
        return int(self.model.get("n_prefix_tokens", 1))

    # ---- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, X: torch.Tensor, y: torch.Tensor, *, task: str, class_names: list[str], model: dict,
            l2: float = 1e-4, max_iter: int = 200) -> LinearProbe:
        """Fit on features X (n, d) and labels y (n,) in 0..C-1 (negative labels are ignored)."""
        check_task(task)
        X = torch.as_tensor(X, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.int64).to(X.device)
        keep = y >= 0
        X, y = X[keep], y[keep]
        if X.shape[0] == 0:
            raise VitatlasError("no labelled rows to train the probe on")
        n_classes = len(class_names)
        if int(y.max()) >= n_classes:
            raise VitatlasError(f"label {int(y.max())} has no class name (only {n_classes} classes)")
        mean = X.mean(0)
        std = X.std(0).clamp_min(1e-6)
        Z = (X - mean) / std
        W = torch.zeros(n_classes, X.shape[1], dtype=X.dtype, device=X.device, requires_grad=True)
        b = torch.zeros(n_classes, dtype=X.dtype, device=X.device, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(Z @ W.T + b, y) + l2 * (W * W).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(task=task, class_names=list(class_names), weight=W.detach().cpu(), bias=b.detach().cpu(),
                   mean=mean.cpu(), std=std.cpu(), model=dict(model))

    # ---- prediction ------------------------------------------------------------------------------
    def logits_of_features(self, feats: torch.Tensor) -> torch.Tensor:
        dev = feats.device
        z = (feats.float() - self.mean.to(dev)) / self.std.to(dev)
        return z @ self.weight.to(dev).T + self.bias.to(dev)

    def predict_proba(self, final_tokens: torch.Tensor) -> torch.Tensor:
        """Final normed tokens (B, T, d) -> probabilities (B, C) or, for segmentation, (B, P, C)."""
        if final_tokens.ndim != 3 or final_tokens.shape[-1] != self.weight.shape[1]:
            raise VitatlasError(f"the probe expects final tokens (B, T, {self.weight.shape[1]}), "
                                f"got shape {tuple(final_tokens.shape)}")
        feats = features_of(final_tokens, self.task, self.n_prefix_tokens)
        return torch.softmax(self.logits_of_features(feats), dim=-1)

    def predict(self, final_tokens: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(final_tokens).argmax(-1)

    def check_model(self, model: VisionModel) -> None:
        """Refuse a model other than the one the probe was trained on."""
        mine = (self.model.get("name"), self.model.get("revision"), self.model.get("width"))
        theirs = (model.name, model.revision, int(model.width))
        if mine != theirs:
            raise VitatlasError(f"this probe was trained on {mine[0]} (revision {mine[1]}, width {mine[2]}), "
                                f"not on {theirs[0]} (revision {theirs[1]}, width {theirs[2]}): "
                                "train a probe for this model with `vitatlas probe train`")

    def class_index(self, name: str | int) -> int:
        """A class by name or index, or a one-line error listing the classes."""
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            if 0 <= int(name) < self.n_classes:
                return int(name)
        elif name in self.class_names:
            return self.class_names.index(name)
        raise VitatlasError(f"class {name!r} does not exist: the probe's classes are {', '.join(self.class_names)}")

    # ---- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(path / "probe.safetensors", {"weight": self.weight, "bias": self.bias,
                                                              "mean": self.mean, "std": self.std})
        atomic_write_json(path / "probe.json", {
            "format": FORMAT, "version": 1, "task": self.task, "class_names": self.class_names,
            "model": self.model, "d": int(self.weight.shape[1]), "metrics": self.metrics, "info": self.info})
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        path = Path(path)
        if path.is_file():
            path = path.parent
        if not path.exists():
            raise VitatlasError(f"no probe at {path}: train one with `vitatlas probe train ... --out {path}`")
        meta = read_json(path / "probe.json", what="probe description")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise VitatlasError(f"{path / 'probe.json'} is not a vitatlas probe (missing format={FORMAT!r})")
        t = load_safetensors(path / "probe.safetensors", what="probe weights")
        try:
            probe = cls(task=check_task(meta["task"]), class_names=list(meta["class_names"]), weight=t["weight"],
                        bias=t["bias"], mean=t["mean"], std=t["std"], model=dict(meta["model"]),
                        metrics=meta.get("metrics", {}), info=meta.get("info", {}))
        except KeyError as exc:
            raise VitatlasError(f"probe {path} is incomplete ({exc} missing): train it again") from None
        if probe.weight.shape != (probe.n_classes, int(meta.get("d", probe.weight.shape[1]))):
            raise VitatlasError(f"probe {path} is damaged: weight shape {tuple(probe.weight.shape)} does not match "
                                f"{probe.n_classes} classes")
        return probe


def segmentation_scores(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> dict:
    """Pixel(patch) accuracy and mIoU (mean over classes present in truth or prediction); -1 truth ignored."""
    keep = truth >= 0
    pred, truth = pred[keep], truth[keep]
    ious = {}
    for c in range(n_classes):
        inter = int(((pred == c) & (truth == c)).sum())
        union = int(((pred == c) | (truth == c)).sum())
        if union:
            ious[c] = inter / union
    return {"accuracy": float((pred == truth).mean()) if truth.size else float("nan"),
            "miou": float(np.mean(list(ious.values()))) if ious else float("nan"),
            "iou_per_class": {int(c): float(v) for c, v in ious.items()}, "n_patches": int(truth.size)}
