"""Per-atom class labels and their quality: faithfulness, specificity, label_diversity.

Notation: an atom's *activation* on a row is its code value (or its absolute value, the default,
so that signed codes from OMP/PCA count in both directions); an atom *fires* on a row when its code
is non-zero. Only rows with a known label (>= 0) take part. π_c = fraction of those rows with class c.

- Top rows T_a: the ``top_n`` rows with the largest activation among the rows where atom a fires (fewer
  if it fired on fewer rows), restricted to labelled rows. Rows, not images: a patch store can put
  several patches of one image in T_a.
- p_a(c) = fraction of T_a with class c. The atom's label is the most *enriched* class,
  l_a = argmax_c (p_a(c) − π_c) (ties: the smallest class id). An atom is *labelled* when
  |T_a| >= min_support; other atoms get label −1 and take no part in the averages below.
- ``faithfulness`` = mean over labelled atoms of AUROC over *images* of (the atom's image activation,
  image class == l_a), where an image's activation is the maximum of the atom's activation over that
  image's evaluated rows (for a CLS store, one row per image, this is the row activation). Per image,
  because DESIGN defines it as predicting "image has the label": a patch atom for "sandal strap" fires
  on a few patches of every sandal image, and a per-row AUROC would drown it in the zero rows.
- ``specificity`` = mean over labelled atoms of κ_a · s_a, where
  κ_a = (p_a(l_a) − π_{l_a}) / (1 − π_{l_a})  — precision of the top rows for the label, corrected
  for chance (0 = no better than the base rate, 1 = every top row has the label), and
  s_a = 1 − (m_{l_a} − 1) / M  — how much the label belongs to this atom rather than to others:
  m_c = number of labelled atoms whose label is c, M = number of labelled atoms (s = 1 when the
  atom is alone with its label, → 0 when every atom has the same label; with M atoms spread evenly
  over C classes s ≈ 1 − 1/C). Reported alongside: ``specificity_precision`` = mean κ_a and
  ``specificity_sharing`` = mean s_a.
- ``label_diversity`` = (number of distinct labels among labelled atoms) / min(C, M), with C the
  number of classes present among the labelled rows: DESIGN's "distinct labels over atoms",
  normalised by the most distinct labels M atoms could carry, so 1 = the atoms cover as many classes
  as they possibly can, whatever the dictionary size.
"""

from __future__ import annotations

import numpy as np
import torch

from .metrics import auroc_for_labels


def label_atoms(top_rows: np.ndarray, row_labels: np.ndarray, *, min_support: int = 5) -> dict:
    """Labels from the top rows.

    top_rows: (N, A) row ids of each atom's top activations, −1 where an atom has fewer than N.
    row_labels: (n,) class of every row, −1 unknown.
    Returns per-atom arrays ``label`` (A,) (−1 = unlabelled), ``precision`` p_a(l_a), ``kappa``,
    ``support`` |T_a|, and ``prior`` (C_max,) class frequencies π.
    """
    row_labels = np.asarray(row_labels)
    known = row_labels[row_labels >= 0]
    n_cls = int(known.max()) + 1 if known.size else 0
    n_atoms = top_rows.shape[1]
    out = {"label": np.full(n_atoms, -1, np.int64), "precision": np.full(n_atoms, np.nan),
           "kappa": np.full(n_atoms, np.nan), "support": np.zeros(n_atoms, np.int64),
           "prior": np.zeros(n_cls)}
    if n_cls == 0:
        return out
    prior = np.bincount(known, minlength=n_cls) / known.size
    top_lab = np.where(top_rows >= 0, row_labels[np.clip(top_rows, 0, None)], -1)  # (N, A)
    counts = np.zeros((n_atoms, n_cls))
    for c in range(n_cls):
        counts[:, c] = (top_lab == c).sum(0)
    support = counts.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / support[:, None]
    labelled = support >= max(1, min_support)
    label = np.argmax(np.nan_to_num(p - prior[None, :], nan=-np.inf), axis=1)
    prec = p[np.arange(n_atoms), label]
    pi = prior[label]
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = np.where(pi < 1, (prec - pi) / (1 - pi), np.nan)
    out.update(label=np.where(labelled, label, -1), precision=np.where(labelled, prec, np.nan),
               kappa=np.where(labelled, kappa, np.nan), support=support.astype(np.int64), prior=prior)
    return out


def image_activations(acts: np.ndarray, image_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> images: (rows, A) activations to (images, A) maxima over each image's rows, with the
    images' labels (a row's label is its image's). Rows already one per image are returned as they are."""
    uniq, inverse = np.unique(image_ids, return_inverse=True)
    if uniq.size == image_ids.size:
        return acts, labels
    t = torch.from_numpy(acts)
    out = torch.full((uniq.size, t.shape[1]), -torch.inf, dtype=t.dtype)
    out.scatter_reduce_(0, torch.from_numpy(inverse).unsqueeze(1).expand_as(t), t, reduce="amax")
    image_labels = np.full(uniq.size, -1, np.int64)
    image_labels[inverse] = labels
    return out.numpy(), image_labels


def label_quality(labels: dict, acts: np.ndarray | None, act_labels: np.ndarray | None) -> dict:
    """faithfulness / specificity / label_diversity from ``label_atoms`` output.

    acts: (n', A) activations of the images (or rows) used for AUROC, act_labels: (n',) their classes
    (−1 are dropped); see ``image_activations``. Adds per-atom ``faithfulness``, ``sharing`` and ``specificity`` to ``labels``.
    """
    atom_label = labels["label"]
    n_atoms = atom_label.size
    lab = atom_label >= 0
    m_total = int(lab.sum())
    faith = np.full(n_atoms, np.nan)
    if acts is not None and m_total:
        keep = act_labels >= 0
        faith = (auroc_for_labels(acts, act_labels, atom_label) if keep.all()
                 else auroc_for_labels(acts[keep], act_labels[keep], atom_label))
    share_count = np.bincount(atom_label[lab], minlength=max(1, labels["prior"].size))
    sharing = np.full(n_atoms, np.nan)
    if m_total:
        sharing[lab] = 1.0 - (share_count[atom_label[lab]] - 1) / m_total
    spec = labels["kappa"] * sharing
    labels.update(faithfulness=faith, sharing=sharing, specificity=spec)
    n_cls_present = int((labels["prior"] > 0).sum())
    mean = lambda v: float(np.nanmean(v[lab])) if m_total and np.isfinite(v[lab]).any() else float("nan")  # noqa: E731
    return {
        "faithfulness": mean(faith),
        "specificity": mean(spec),
        "specificity_precision": mean(labels["kappa"]),
        "specificity_sharing": mean(sharing),
        "label_diversity": (len(set(atom_label[lab].tolist())) / min(n_cls_present, m_total)
                            if m_total and n_cls_present else float("nan")),
        "n_labelled_atoms": m_total,
    }
