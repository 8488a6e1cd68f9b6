"""From the pass's running state to per-atom records: statistics, top lists, class labels, neighbours.

Class label (description kind ``"class"``) of the positive side: the shared definition of
``vitatlas.evaluation.labels`` (``concept_labels``), the one the report and the scorecard use, on the
per-image activations the pass keeps (each atom's largest |code| on the image) for all images or a
fixed random subset (``PassSettings.faith_images``): the label is the most enriched class among the
atom's top 32 images, with its ``precision``, ``kappa``, ``faithfulness`` and ``specificity``. The
card's top images (``--top``) are only what is shown. The negative side of a signed code gets a
label of its own from its shown top images (same formulas, ``min(5, top)`` images needed), for
reading the card only: its faithfulness and specificity are null.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.store import ActivationStore
from ..dictionary import Dictionary
from ..evaluation.labels import concept_labels, label_atoms
from .render import top_patch_list
from .top_examples import SIDES, PassSettings, hist_edges

N_NEAREST = 5
N_TOP_PATCHES = 16


def nearest_atoms(atoms: torch.Tensor, n_keep: int, k: int = N_NEAREST, chunk: int = 1024
                  ) -> tuple[np.ndarray, np.ndarray]:
    """For the first ``n_keep`` atoms, the ``k`` other atoms with the largest decoder cosine."""
    D = torch.nn.functional.normalize(atoms.detach().float(), dim=1)
    k = min(k, D.shape[0] - 1)
    ids, cos = np.zeros((n_keep, k), np.int64), np.zeros((n_keep, k), np.float32)
    for s in range(0, n_keep, chunk):
        sims = D[s:min(s + chunk, n_keep)] @ D.T
        sims[torch.arange(sims.shape[0]), torch.arange(s, s + sims.shape[0])] = -torch.inf
        v, i = torch.topk(sims, k, dim=1)
        ids[s:s + sims.shape[0]], cos[s:s + sims.shape[0]] = i.cpu().numpy(), v.cpu().numpy()
    return ids, cos


def image_label_lookup(store: ActivationStore) -> np.ndarray | None:
    """label of every image id (−1 unknown or absent), or None for an unlabelled store."""
    labels = store.labels
    if labels is None or not (labels >= 0).any():
        return None
    ids = store.index[:, 0].astype(np.int64)
    lut = np.full(int(ids.max()) + 1, -1, np.int64)
    lut[ids] = labels
    return lut


def _histogram(counts: np.ndarray, edges: np.ndarray) -> dict:
    nz = np.nonzero(counts)[0]
    if not nz.size:
        return {"edges": [], "counts": []}
    lo, hi = nz[0], nz[-1]
    return {"edges": [float(e) for e in edges[lo:hi + 2]], "counts": [int(c) for c in counts[lo:hi + 1]]}


def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def side_arrays(state: dict, side: str) -> dict[str, np.ndarray]:
    """The state of one side as numpy, atoms first: values/ids (A, N), patch_values (A, N, P)."""
    out = {"values": state[f"{side}.values"].T.cpu().numpy(), "image_ids": state[f"{side}.image_ids"].T.cpu().numpy()}
    out["values"] = np.where(out["image_ids"] >= 0, out["values"], 0).astype(np.float32)
    if f"{side}.patch_values" in state:
        out["patch_values"] = state[f"{side}.patch_values"].cpu().numpy()
    for k in ("count", "total", "peak", "hist"):
        out[k] = state[f"{side}.{k}"].cpu().numpy()
    return out


def class_labels(arr: dict, lut: np.ndarray | None, s: PassSettings, state: dict, class_names: list | None,
                 with_quality: bool) -> list[list[dict]]:
    """Per atom a list with its class label (or empty), following the module docstring."""
    n_atoms = arr["image_ids"].shape[0]
    if lut is None:
        return [[] for _ in range(n_atoms)]
    faith = np.full(n_atoms, np.nan)
    spec = np.full(n_atoms, np.nan)
    if with_quality:
        scores = state["faith.scores"].cpu().numpy()
        f_labels = lut[s.faith_images] if s.faith_images.size else np.zeros(0, np.int64)
        lab, _ = concept_labels(scores, f_labels)
        faith, spec = lab["faithfulness"], lab["specificity"]
    else:
        lab = label_atoms(arr["image_ids"].T, lut, min_support=min(5, s.top))
    out = []
    for a in range(n_atoms):
        c = int(lab["label"][a])
        if c < 0:
            out.append([])
            continue
        name = class_names[c] if class_names and 0 <= c < len(class_names) else str(c)
        out.append([{"label": name, "label_id": c, "precision": _num(lab["precision"][a]),
                     "kappa": _num(lab["kappa"][a]), "support": int(lab["support"][a]),
                     "faithfulness": _num(faith[a]), "specificity": _num(spec[a])}])
    return out


def _top_images(arr: dict, a: int) -> list[dict]:
    ids, vals = arr["image_ids"][a], arr["values"][a]
    return [{"image": int(i), "value": float(v)} for i, v in zip(ids, vals) if i >= 0]


def _top_patches(arr: dict, a: int, cells: np.ndarray | None) -> list[dict]:
    if "patch_values" not in arr or cells is None:
        return []
    ids = arr["image_ids"][a]
    return [{"image": int(ids[slot]), "patch": cell, "value": v}
            for slot, cell, v in top_patch_list(arr["patch_values"][a], ids, cells, N_TOP_PATCHES)]


def _class_description(label: dict) -> dict:
    return {"kind": "class", "text": label["label"], "score": label["kappa"], "faithfulness": label["faithfulness"],
            "specificity": label["specificity"],
            "evidence": {"precision": label["precision"], "kappa": label["kappa"], "support": label["support"],
                         "label_id": label["label_id"]}}


def atom_records(dictionary: Dictionary, store: ActivationStore, state: dict, s: PassSettings,
                 cells: np.ndarray | None) -> tuple[AtomRecords, dict[str, torch.Tensor]]:
    """atoms.jsonl records (descriptions: the class label only) and the top.safetensors tensors."""
    n_rows = store.n_rows
    edges = hist_edges()
    lut = image_label_lookup(store)
    near_ids, near_cos = nearest_atoms(dictionary.atoms, s.n_atoms)
    sides = {side: side_arrays(state, side) for side in (SIDES if s.signed else SIDES[:1])}
    labels = {side: class_labels(arr, lut, s, state, store.class_names, with_quality=side == "pos")
              for side, arr in sides.items()}
    tensors: dict[str, torch.Tensor] = {}
    for side, arr in sides.items():
        prefix = "" if side == "pos" else "neg_"
        tensors[prefix + "image_ids"] = torch.from_numpy(arr["image_ids"].astype(np.int64))
        tensors[prefix + "values"] = torch.from_numpy(arr["values"])
        if "patch_values" in arr:
            tensors[prefix + "patch_values"] = torch.from_numpy(np.ascontiguousarray(arr["patch_values"]))

    return AtomRecords(n_rows, edges, sides, labels, near_ids, near_cos, cells, s.signed), tensors


class AtomRecords(Sequence):
    """The atoms.jsonl records, built on access from the pass's arrays.

    Holding 16,384 records as Python dicts costs hundreds of MB (each lists 2 × 16 top images and
    patches); the arrays behind them are the top.safetensors tensors already in memory. ``extra``
    holds further descriptions per atom (text, caption) appended after the class label.
    """

    def __init__(self, n_rows, edges, sides, labels, near_ids, near_cos, cells, signed):
        self.n_rows, self.edges, self.sides, self.labels = n_rows, edges, sides, labels
        self.near_ids, self.near_cos, self.cells, self.signed = near_ids, near_cos, cells, signed
        self.extra: list[list[dict]] | None = None

    def __len__(self) -> int:
        return self.near_ids.shape[0]

    def _side(self, side: str, a: int) -> dict:
        arr = self.sides[side]
        count = int(arr["count"][a])
        return {"frequency": count / self.n_rows,
                "mean_activation": float(arr["total"][a] / count) if count else None,
                "max_activation": float(arr["peak"][a]) if count else None,
                "top_images": _top_images(arr, a), "top_patches": _top_patches(arr, a, self.cells),
                "histogram": _histogram(arr["hist"][a], self.edges), "labels": self.labels[side][a]}

    def __getitem__(self, a):
        if isinstance(a, slice):
            return [self[i] for i in range(*a.indices(len(self)))]
        a = int(a)
        if a < 0:
            a += len(self)
        if not 0 <= a < len(self):
            raise IndexError(a)
        rec = {"id": a, **self._side("pos", a)}
        rec["negative"] = self._side("neg", a) if self.signed else None
        rec["descriptions"] = [_class_description(lab) for lab in rec["labels"]] + (self.extra[a] if self.extra else [])
        rec["nearest_atoms"] = [{"atom": int(i), "cosine": float(c)}
                                for i, c in zip(self.near_ids[a], self.near_cos[a])]
        return rec
