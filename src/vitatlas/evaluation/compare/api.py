"""``compare(dictionary_a, dictionary_b, store_a, store_b)``: which atoms two dictionaries share.

Steps: check each dictionary against its store (``dictionary.check_fitted_on``) and the stores against
each other (same images; ``align``), compute every atom's activation on the shared units
(``activations``), match atoms by correlation both ways (``behaviour``), then again with B's images
shuffled: the null. An atom is *shared* when its best score beats the null's ``null_quantile``
(default 0.99) on its side — so about 1% of atoms pass by chance when nothing is shared.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ...data.store import ActivationStore
from ...dictionary import Dictionary, check_fitted_on
from ...errors import VitatlasError
from .activations import AGGREGATES, unit_activations
from .align import Alignment, align_stores
from .behaviour import BestMatches, active_counts, best_correlations, mutual, null_threshold
from .space import decoder_space_mismatch

FORMAT = "vitatlas-compare"
FORMAT_VERSION = 1
MEASURE = ("|Pearson r| of the two atoms' activations over the same units (tokens, or images with each "
           "atom's activations aggregated per image)")


@dataclass
class Comparison:
    names: tuple[str, str]
    runs: tuple[dict, dict]
    stores: tuple[dict, dict]
    alignment: Alignment
    aggregate: str | None
    units: tuple[sp.csr_matrix, sp.csr_matrix]     # (n_units, n_atoms) activations of each side
    matches: tuple[BestMatches, BestMatches]       # a -> b, b -> a
    null: tuple[np.ndarray, np.ndarray]            # (n_permutations, n_atoms) best scores on shuffled images
    null_quantile: float
    min_active: int
    seed: int
    image_labels: np.ndarray | None = None         # (n_images,) class of each image in alignment order
    class_names: list[str] | None = None
    decoder: dict = field(default_factory=dict)

    # ---- per side ---------------------------------------------------------------------------------
    def threshold(self, side: int) -> float:
        return null_threshold(self.null[side].ravel(), self.null_quantile)

    def null_score(self, side: int) -> np.ndarray:
        """(n_atoms,) each atom's best score on shuffled images, averaged over the permutations."""
        return self.null[side].mean(axis=0)

    def shared(self, side: int) -> np.ndarray:
        score = self.matches[side].score
        return np.isfinite(score) & (score > self.threshold(side))

    def mutual(self, side: int) -> np.ndarray:
        return mutual(self.matches[side], self.matches[1 - side])

    def active(self, side: int) -> np.ndarray:
        return active_counts(self.units[side])

    def top_images(self, side: int, atom: int, n: int = 5) -> list[tuple[int, float]]:
        """(image id, activation) of the ``n`` images where ``atom`` is largest in magnitude (per image:
        its largest-magnitude unit)."""
        col = self.units[side][:, atom].tocoo()
        if col.nnz == 0:
            return []
        per_image = np.zeros(self.alignment.n_images)
        img = self.alignment.unit_image[col.row]
        mag = np.abs(col.data)
        order = np.argsort(mag)  # assign in increasing magnitude so each image keeps its largest
        per_image[img[order]] = col.data[order]
        top = np.argsort(-np.abs(per_image), kind="stable")[:n]
        return [(int(self.alignment.image_ids[i]), float(per_image[i])) for i in top if per_image[i] != 0]

    def label_of(self, image_id: int) -> str | None:
        """The class name (or number) of an image of the comparison, None when the store has no labels."""
        if self.image_labels is None:
            return None
        pos = int(np.searchsorted(self.alignment.image_ids, image_id))
        lab = int(self.image_labels[pos])
        if lab < 0:
            return None
        return self.class_names[lab] if self.class_names and lab < len(self.class_names) else str(lab)

    def summary(self) -> dict:
        out = {}
        for side, key in ((0, "a"), (1, "b")):
            sh, tested = self.shared(side), np.isfinite(self.matches[side].score)
            out[f"shared_fraction_{key}"] = round(float(sh.mean()), 4)
            out[f"shared_{key}"] = int(sh.sum())
            out[f"testable_{key}"] = int(tested.sum())
            out[f"shared_fraction_of_testable_{key}"] = round(float(sh.sum() / max(1, tested.sum())), 4)
            out[f"null_threshold_{key}"] = _r(self.threshold(side))
            out[f"median_score_{key}"] = _r(np.nanmedian(self.matches[side].score)) if tested.any() else None
            out[f"median_null_score_{key}"] = _r(np.nanmedian(self.null[side])) if tested.any() else None
        mut = self.mutual(0)
        out["mutual_pairs"] = int(mut.sum())
        out["mutual_shared_pairs"] = int((mut & self.shared(0)
                                          & self.shared(1)[np.clip(self.matches[0].match, 0, None)]).sum())
        return out

    def to_json(self) -> dict:
        def side(i: int) -> dict:
            m = self.matches[i]
            return {"match": m.match.tolist(), "score": _rl(m.score), "correlation": _rl(m.correlation),
                    "mutual": self.mutual(i).tolist(), "shared": self.shared(i).tolist(),
                    "null_score": _rl(self.null_score(i)), "active_units": self.active(i).tolist()}

        al = self.alignment
        return {"format": FORMAT, "version": FORMAT_VERSION,
                "a": {"name": self.names[0], **self.runs[0], "store": self.stores[0]},
                "b": {"name": self.names[1], **self.runs[1], "store": self.stores[1]},
                "matching": "behaviour", "measure": MEASURE,
                "alignment": {"mode": al.mode, "aggregate": self.aggregate, "n_images": al.n_images,
                              "n_units": al.n_units},
                "null": {"what": "best scores with B's images shuffled (each image paired with a random other "
                                 "image), pooled over the permutations",
                         "permutations": int(self.null[0].shape[0]), "seed": self.seed,
                         "quantile": self.null_quantile,
                         "threshold_a": _r(self.threshold(0)), "threshold_b": _r(self.threshold(1))},
                "min_active": self.min_active, "decoder_cosine": self.decoder,
                "summary": self.summary(), "atoms": {"a": side(0), "b": side(1)}}


def _r(v) -> float | None:
    v = float(v)
    return round(v, 5) if np.isfinite(v) else None


def _rl(values: np.ndarray) -> list:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in values]


def _run_info(dictionary: Dictionary, path) -> dict:
    info = getattr(dictionary, "fit_info", None) or {}
    return {"path": None if path is None else str(Path(path).resolve()), "learner": dictionary.learner,
            "n_atoms": int(dictionary.n_atoms), "d": int(dictionary.d),
            "fitted_on": {k: info.get(k) for k in ("path", "model", "layer", "tokens", "data") if k in info}}


def _store_info(store: ActivationStore) -> dict:
    d = store.describe()
    return {**{k: d.get(k) for k in ("path", "model", "layer", "tokens", "data", "n_rows", "d")},
            "source_spec": (store.manifest.get("source") or {}).get("spec")}


def decoder_summary(a: Dictionary, b: Dictionary, threshold: float = 0.9) -> dict:
    """Decoder cosine next to the behaviour match, or why it was refused (different spaces)."""
    reason = decoder_space_mismatch(a, b)
    if reason is not None:
        return {"refused": f"decoder cosine compares atoms of one activation space, but {reason}"}
    from .decoder import decoder_best_matches

    idx_ab, cos_ab = decoder_best_matches(a.atoms, b.atoms)
    idx_ba, _ = decoder_best_matches(b.atoms, a.atoms)
    mut = idx_ba[idx_ab] == np.arange(idx_ab.size)
    return {"median_abs_cosine_a": _r(np.median(np.abs(cos_ab))), "mutual_pairs": int(mut.sum()),
            f"fraction_a_over_{threshold}": _r(np.mean(np.abs(cos_ab) > threshold))}


def _cached(path: Path | None, identity: dict, make):
    """Unit activations from ``path`` when it holds them for ``identity``, else made and saved there: a
    re-run after an interruption skips the sides already encoded."""
    from ...io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json

    if path is None:
        return make()
    meta_path, tensor_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if meta_path.is_file() and tensor_path.is_file():
        try:
            meta = read_json(meta_path)
        except VitatlasError:
            meta = None
        if meta == identity:
            t = load_safetensors(tensor_path, what="saved unit activations")
            return sp.csr_matrix((t["data"].numpy(), t["indices"].numpy(), t["indptr"].numpy()),
                                 shape=tuple(int(v) for v in t["shape"].tolist()))
    X = make()
    atomic_save_safetensors(tensor_path, {"data": torch.from_numpy(X.data), "indices": torch.from_numpy(
        X.indices.astype(np.int64)), "indptr": torch.from_numpy(X.indptr.astype(np.int64)),
        "shape": torch.tensor(X.shape, dtype=torch.int64)})
    atomic_write_json(meta_path, identity)
    return X


def _atoms_digest(dictionary: Dictionary) -> str:
    return hashlib.sha256(dictionary.atoms.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def compare(dictionary_a: Dictionary, dictionary_b: Dictionary, store_a: ActivationStore | str | os.PathLike,
            store_b: ActivationStore | str | os.PathLike, *, align: str = "auto", aggregate: str = "max",
            max_images: int | None = None, null_quantile: float = 0.99, null_permutations: int = 3,
            min_active: int = 5, seed: int = 0,
            names: tuple[str, str] = ("a", "b"), paths: tuple = (None, None), work_dir: str | os.PathLike | None = None,
            progress: bool = True) -> Comparison:
    """Match the atoms of two dictionaries by behaviour on the same images.

    align: ``"tokens"`` (rows paired by image and token position), ``"images"`` (one unit per image,
    activations aggregated by ``aggregate``: ``"max"`` or ``"mean"``) or ``"auto"`` (tokens when both
    stores hold the same tokens). max_images: a fixed random sample of the images (``seed``).
    null_quantile: the quantile of the shuffled-image scores an atom must beat to count as shared, pooled
    over ``null_permutations`` shufflings (more: a steadier threshold, one more matching pass each).
    min_active: atoms firing on fewer units are untestable. work_dir: keep each side's activations there
    so that a re-run resumes.
    """
    for name, d in (("dictionary_a", dictionary_a), ("dictionary_b", dictionary_b)):
        if not isinstance(d, Dictionary):
            raise VitatlasError(f"{name} must be a fitted vitatlas Dictionary, got {type(d).__name__}")
        d._check_fitted()
    if aggregate not in AGGREGATES:
        raise VitatlasError(f"unknown aggregate {aggregate!r}: use one of {', '.join(AGGREGATES)}")
    if isinstance(null_quantile, bool) or not isinstance(null_quantile, (int, float)) or not 0 < null_quantile < 1:
        raise VitatlasError(f"null_quantile must be a number between 0 and 1 (exclusive), got {null_quantile!r}")
    if isinstance(null_permutations, bool) or not isinstance(null_permutations, (int, np.integer)) \
            or null_permutations < 1:
        raise VitatlasError(f"null_permutations must be a positive integer, got {null_permutations!r}")
    if isinstance(min_active, bool) or not isinstance(min_active, (int, np.integer)) or min_active < 2:
        raise VitatlasError(f"min_active must be an integer of at least 2, got {min_active!r}")
    stores = [s if isinstance(s, ActivationStore) else ActivationStore(s) for s in (store_a, store_b)]
    for name, d, s in zip(names, (dictionary_a, dictionary_b), stores):
        check_fitted_on(d, s, subject=f"run {name}", verb="compare")
    alignment = align_stores(stores[0], stores[1], align, max_images, seed)
    work = Path(work_dir) if work_dir is not None else None
    units = []
    for key, name, d, s, side in (("a", names[0], dictionary_a, stores[0], alignment.a),
                                  ("b", names[1], dictionary_b, stores[1], alignment.b)):
        identity = {"store": str(s.path.resolve()), "store_rows": s.n_rows, "atoms": _atoms_digest(d),
                    "learner": d.learner, "mode": alignment.mode, "aggregate": aggregate,
                    "rows": hashlib.sha256(side.rows.tobytes()).hexdigest()[:16]}
        units.append(_cached(None if work is None else work / f"units-{key}", identity,
                             lambda d=d, s=s, side=side, name=name: unit_activations(
                                 d, s, side, aggregate, progress=progress, desc=f"encode {name}")))
    ab, ba = best_correlations(units[0], units[1], min_active=min_active, progress=progress, desc="match")
    nulls = []
    for p in range(null_permutations):
        perm = alignment.shuffled_units(seed + 1 + p)
        nulls.append(best_correlations(units[0], units[1][perm], min_active=min_active, progress=progress,
                                       desc=f"null {p + 1}/{null_permutations} (shuffled images)"))
    null_a = np.stack([n[0].score for n in nulls])
    null_b = np.stack([n[1].score for n in nulls])
    labels = None
    if stores[0].labels is not None:
        labels = np.full(alignment.n_images, -1, np.int64)
        pos = np.searchsorted(alignment.image_ids, stores[0].index[:, 0])
        inside = pos < alignment.n_images
        inside[inside] &= alignment.image_ids[pos[inside]] == stores[0].index[inside, 0]
        labels[pos[inside]] = stores[0].labels[inside]
    return Comparison(names=tuple(names), runs=(_run_info(dictionary_a, paths[0]), _run_info(dictionary_b, paths[1])),
                      stores=(_store_info(stores[0]), _store_info(stores[1])), alignment=alignment,
                      aggregate=aggregate if alignment.mode == "images" else None, units=(units[0], units[1]),
                      matches=(ab, ba), null=(null_a, null_b), null_quantile=float(null_quantile),
                      min_active=int(min_active), seed=int(seed), image_labels=labels,
                      class_names=stores[0].class_names, decoder=decoder_summary(dictionary_a, dictionary_b))
