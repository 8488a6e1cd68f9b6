"""The live intervention behind the image page's sliders (``POST /api/intervene``).

One request = one image, a few edits (an atom and a value in units of its max observed activation,
or an ablation), optionally restricted to some patches. The model runs once to the dictionary's
layer and twice from there (``vitatlas.intervene``); the answer is what a person can read at a glance:

- with a probe: class probabilities before and after (classification), or the per-patch predicted
  class before and after (segmentation);
- always: how far every final token moved (cosine distance, a heatmap over the patches) and which
  codes changed at the edited layer (per patch, and the atoms whose codes changed most).

Requests are serialised by a lock: torch already uses every core for one forward pass.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from ..dictionary import Dictionary
from ..errors import VitatlasError


class LiveIntervention:
    """A loaded model (and optional probe) ready to answer intervention requests."""

    def __init__(self, model, probe=None):
        self.model = model
        self.probe = probe
        if probe is not None:
            probe.check_model(model)
        self._lock = threading.Lock()

    def describe(self) -> dict:
        return {"model": self.model.name, "probe": None if self.probe is None else
                {"task": self.probe.task, "class_names": list(self.probe.class_names)}}

    @torch.no_grad()
    def run(self, dictionary: Dictionary, image, edits: list[dict], max_activations: np.ndarray,
            patches: list[int] | None = None, tokens: str = "all") -> dict:
        """Apply ``edits`` to one PIL ``image`` and describe the effect (see the module docstring).

        ``tokens`` are the tokens edited when no ``patches`` are given: the kind the dictionary was
        fitted on (a CLS dictionary edits the CLS token, a patch dictionary the patch tokens).
        """
        from ..intervene.core import intervene

        prefix = int(self.model.n_prefix_tokens)
        patch_mask = None
        if patches:
            n_patches = int(self.model.n_patches)
            if max(patches) >= n_patches:
                raise VitatlasError(f"patch {max(patches)} is out of range: the model has {n_patches} patches")
            patch_mask = np.zeros(n_patches, dtype=bool)
            patch_mask[patches] = True
        start = time.perf_counter()
        with self._lock:
            result = intervene(self.model, dictionary, [image], edits=edits, tokens=tokens, patch_mask=patch_mask,
                               max_activations=max_activations, head=self.probe)
        seconds = time.perf_counter() - start
        before, after = result.before[0].float(), result.after[0].float()
        cos = torch.nn.functional.cosine_similarity(before, after, dim=-1).clamp(-1, 1)
        distance = (1 - cos).numpy()
        out = {
            "seconds": round(seconds, 4),
            "layer": int(result.layer),
            "token_change": {"cls": None if prefix == 0 else _r(distance[0]),
                             "patches": [_r(v) for v in distance[prefix:]],
                             "max": _r(distance[prefix:].max()) if distance.shape[0] > prefix else None},
            "code_change": _code_change(result.codes[0], result.edited_codes[0], result.token_mask[0], prefix),
        }
        if self.probe is not None and result.before_probs is not None:
            out["prediction"] = _prediction(self.probe, result.before_probs[0], result.after_probs[0])
        return out


def _r(v, digits: int = 5) -> float:
    return float(f"{float(v):.{digits}g}")


def _code_change(codes: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor, prefix: int) -> dict:
    """Per patch the L2 change of the codes at the layer, and the atoms that changed most overall."""
    diff = (edited - codes).float()
    per_token = diff.norm(dim=-1).numpy()
    total = diff.abs().sum(dim=0).numpy()
    top = np.flatnonzero(total > 0)
    top = top[np.argsort(-total[top], kind="stable")][:10]
    return {"patches": [_r(v) for v in per_token[prefix:]], "edited_tokens": int(mask.sum()),
            "atoms": [{"atom": int(a), "total_change": _r(total[a])} for a in top]}


def _prediction(probe, before: torch.Tensor, after: torch.Tensor) -> dict:
    names = list(probe.class_names)
    if probe.task == "classification":
        b, a = before.float().numpy(), after.float().numpy()
        order = np.argsort(-np.maximum(a, b), kind="stable")[:10]
        return {"task": "classification", "class_names": names,
                "before": {"class": names[int(b.argmax())], "probability": _r(b.max())},
                "after": {"class": names[int(a.argmax())], "probability": _r(a.max())},
                "classes": [{"class": names[c], "before": _r(b[c]), "after": _r(a[c])} for c in order]}
    pb, pa = before.argmax(-1).numpy(), after.argmax(-1).numpy()  # (P,)
    return {"task": "segmentation", "class_names": names, "before_map": pb.tolist(), "after_map": pa.tolist(),
            "changed_patches": int((pb != pa).sum()), "n_patches": int(pb.size),
            "before": {"class": _majority(pb, names)}, "after": {"class": _majority(pa, names)}}


def _majority(pred: np.ndarray, names: list[str]) -> str:
    counts = np.bincount(pred, minlength=len(names))
    return names[int(counts.argmax())]
