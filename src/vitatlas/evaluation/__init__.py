"""``vitatlas.evaluate``: every metric of a dictionary on a data set, in one streamed pass.

The metric definitions live with their code: reconstruction and sparsity in ``metrics``, atom labels
in ``labels``, sparse probing and the downstream probe in ``probing``. ``report`` writes them out.
"""

from __future__ import annotations

import numpy as np
import torch

from ..arrays import ArrayLike
from ..data.batches import is_store, iter_batches, n_rows_and_width
from ..dictionary import Dictionary
from ..errors import VitatlasError
from .labels import image_activations, label_atoms, label_quality
from .metrics import ReconstructionStats, frequency_histogram, max_coherence
from .probing import downstream_probe, image_split, sparse_probe

__all__ = ["evaluate"]

ACTIVATIONS = ("abs", "value")


@torch.no_grad()
def evaluate(dictionary: Dictionary, X: ArrayLike, labels: np.ndarray | None = None, *,
             image_ids: np.ndarray | None = None, class_names: list[str] | None = None,
             batch_size: int = 4096, progress: bool = False,
             top_n: int = 32, min_support: int = 5, activation: str = "abs", memory_budget: int = 1 << 30,
             max_probe_images: int = 20_000, test_fraction: float = 0.25, seed: int = 0) -> dict:
    """Evaluate ``dictionary`` on X (array, tensor or ActivationStore), streaming ``batch_size`` rows.

    labels: (n,) int class per row (−1 unknown); defaults to ``X.labels`` for a labelled store.
    image_ids: (n,) image of each row; defaults to the store's index, else one image per row.
    class_names: names of the label ids (per-atom ``label_name``); defaults to the store's.

    Returns a dict with the DESIGN.md metrics (see ``metrics`` / ``labels`` / ``probing`` for the
    exact formulas): signal_recovered, explained_variance, mse, l0, dead_fraction, dense_fraction,
    max_coherence, frequency_histogram; with labels also faithfulness, specificity (+ its two parts),
    label_diversity, n_labelled_atoms, sparse_probe_acc@1/5/20 and probe_acc_original /
    probe_acc_reconstructed / probe_acc_with_error. ``"atoms"`` holds per-atom numpy arrays
    (frequency, label, precision, kappa, sharing, faithfulness, specificity, top_rows (A, top_n) with
    −1 padding, top_values) and ``"settings"`` what was used.

    Memory: per-atom statistics and the top-``top_n`` buffers stream; the (rows, A) activation matrix
    used for AUROC (faithfulness) and sparse probing is kept only for at most
    ``memory_budget // (4·A)`` rows — all rows when they fit, otherwise a fixed random subset (seed
    ``seed``), whose size is reported as ``settings.rows_for_auroc`` (peak memory is about twice the
    budget, while ranks for AUROC are computed 256 atoms at a time). The downstream probe uses at most
    ``max_probe_images`` images (a fixed random subset when there are more).
    """
    if activation not in ACTIVATIONS:
        raise VitatlasError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if top_n <= 0:
        raise VitatlasError(f"top_n must be positive, got {top_n}")
    dictionary._check_fitted()
    n, d = n_rows_and_width(X)
    if n == 0:
        raise VitatlasError("X is empty (0 rows): nothing to evaluate")
    if d != dictionary.d:
        raise VitatlasError(f"data has width {d} but the dictionary was fitted on width {dictionary.d}")
    n_atoms = int(dictionary.n_atoms)

    if labels is None and is_store(X):
        labels = X.labels
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise VitatlasError(f"labels must be {n} integers (one per row), got shape {labels.shape}")
        labels = labels.astype(np.int64)
        if not (labels >= 0).any():
            labels = None
    if image_ids is None:
        image_ids = X.index[:, 0].astype(np.int64) if is_store(X) else np.arange(n)
    image_ids = np.asarray(image_ids)
    if image_ids.shape != (n,):
        raise VitatlasError(f"image_ids must have one entry per row ({n}), got shape {image_ids.shape}")

    rng = np.random.default_rng(seed)
    # rows whose full activation vector is kept (AUROC and sparse probing)
    cap = max(1, memory_budget // (4 * n_atoms))
    keep_rows = np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))
    keep_pos = np.full(n, -1, np.int64)
    keep_pos[keep_rows] = np.arange(keep_rows.size)
    acts_kept = np.zeros((keep_rows.size, n_atoms), np.float32) if labels is not None else None

    # images for the downstream probe: labelled ones, at most max_probe_images
    probe = labels is not None
    if probe:
        img_uniq, img_of_row = np.unique(image_ids, return_inverse=True)
        labelled_imgs = np.unique(img_of_row[labels >= 0])
        if labelled_imgs.size > max_probe_images:
            labelled_imgs = np.sort(rng.choice(labelled_imgs, size=max_probe_images, replace=False))
        slot = np.full(img_uniq.size, -1, np.int64)
        slot[labelled_imgs] = np.arange(labelled_imgs.size)
        row_slot = torch.from_numpy(np.where(labels >= 0, slot[img_of_row], -1))
        x_sum = torch.zeros(labelled_imgs.size, d, dtype=torch.float64)
        xh_sum = torch.zeros(labelled_imgs.size, d, dtype=torch.float64)
        img_count = torch.zeros(labelled_imgs.size, dtype=torch.float64)

    stats = ReconstructionStats(n_atoms)
    top_vals = torch.full((top_n, n_atoms), -float("inf"))
    top_rows = torch.full((top_n, n_atoms), -1, dtype=torch.int64)

    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"eval {dictionary.kind}", unit="row", disable=not progress)
    start = 0
    for x in iter_batches(X, batch_size, shuffle=False, seed=0, device=dictionary.device,
                          dtype=dictionary.dtype, d=d):
        b = x.shape[0]
        codes = dictionary._encode(x)
        x_hat = dictionary._decode(codes)
        stats.update(x, x_hat, codes)
        codes = codes.float().cpu()
        act = codes.abs() if activation == "abs" else codes.clone()
        # running top-N per atom among rows where the atom fires
        cand_vals = torch.cat([top_vals, act.masked_fill(codes == 0, -float("inf"))])
        cand_rows = torch.cat([top_rows, torch.arange(start, start + b).unsqueeze(1).expand(b, n_atoms)])
        top_vals, pick = torch.topk(cand_vals, k=top_n, dim=0)
        top_rows = torch.gather(cand_rows, 0, pick)
        if acts_kept is not None:
            pos = keep_pos[start:start + b]
            sel = pos >= 0
            acts_kept[pos[sel]] = act[torch.from_numpy(sel)].numpy()
        if probe:
            rs = row_slot[start:start + b]
            ok = rs >= 0
            x_sum.index_add_(0, rs[ok], x[ok.to(x.device)].double().cpu())
            xh_sum.index_add_(0, rs[ok], x_hat[ok.to(x.device)].double().cpu())
            img_count.index_add_(0, rs[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
        start += b
        bar.update(b)
    bar.close()

    top_rows = torch.where(torch.isinf(top_vals), torch.full_like(top_rows, -1), top_rows)
    out: dict = {"kind": dictionary.kind, "n_rows": n, "d": d, "n_atoms": n_atoms}
    out.update(stats.result())
    out["max_coherence"] = max_coherence(dictionary.atoms)
    freq = stats.frequency
    out["frequency_histogram"] = frequency_histogram(freq, n)
    atoms = {"frequency": freq, "top_rows": top_rows.T.numpy(), "top_values": top_vals.T.numpy()}

    if labels is not None:
        lab = label_atoms(top_rows.numpy(), labels, min_support=min(min_support, top_n))
        out.update(label_quality(lab, *image_activations(acts_kept, image_ids[keep_rows], labels[keep_rows])))
        atoms.update({k: v for k, v in lab.items() if k != "prior"})
        names = class_names if class_names is not None else (X.class_names if is_store(X) else None)
        if names:
            atoms["label_name"] = [names[c] if 0 <= c < len(names) else None for c in lab["label"].tolist()]
        kept_lab = labels[keep_rows]
        ok = kept_lab >= 0
        test = image_split(image_ids[keep_rows][ok], test_fraction=test_fraction, seed=seed)
        out.update(sparse_probe(acts_kept if ok.all() else acts_kept[ok], kept_lab[ok], test))
        have = img_count > 0
        x_img = (x_sum[have] / img_count[have].unsqueeze(1)).numpy()
        xh_img = (xh_sum[have] / img_count[have].unsqueeze(1)).numpy()
        first_row = np.full(img_uniq.size, -1, np.int64)
        lab_rows = np.nonzero(labels >= 0)[0]
        first_row[img_of_row[lab_rows[::-1]]] = lab_rows[::-1]  # any labelled row of each image
        img_ids_sel = labelled_imgs[have.numpy()]
        y_img = labels[first_row[img_ids_sel]]
        test_img = image_split(img_uniq[img_ids_sel], test_fraction=test_fraction, seed=seed)
        out.update(downstream_probe(x_img, xh_img, y_img, test_img))
    out["settings"] = {"top_n": top_n, "min_support": min(min_support, top_n), "activation": activation,
                       "rows_for_auroc": int(keep_rows.size) if labels is not None else 0,
                       "test_fraction": test_fraction, "seed": seed, "batch_size": batch_size,
                       "has_labels": labels is not None}
    out["atoms"] = atoms
    return out
