"""Per-atom class labels and their quality: faithfulness, specificity, label_diversity.

One definition, shared by ``vitatlas eval`` (the report), ``vitatlas interpret`` (the atom cards), the
explorer and the scorecard (``concept_labels``); docs/scorecard.md quotes it.

Notation: an atom's *image activation* is the maximum over the image's evaluated rows of its
activation |code| (for a CLS store, one row per image, the row's activation). An atom *fires* on an
image when that is > 0. Only images with a known label (>= 0) take part; π_c = fraction of those
images with class c.

- Top images T_a: the ``LABEL_IMAGES`` (32) images with the largest image activation among the images
  where atom a fires (fewer if it fired on fewer). Images, not rows: a patch atom's top 32 rows can
  come from two or three images, which would make its label an accident of those images.
- p_a(c) = fraction of T_a with class c. The atom's label is the most *enriched* class,
  l_a = argmax_c (p_a(c) − π_c) (ties: the smallest class id). An atom is *labelled* when
  |T_a| >= ``MIN_SUPPORT`` (5); other atoms get label −1 and take no part in the averages below.
- ``faithfulness`` = mean over labelled atoms of AUROC over images of (the atom's image activation,
  image class == l_a): a patch atom for "sandal strap" fires on a few patches of every sandal image,
  and a per-row AUROC would drown it in the zero rows.
- ``specificity`` = mean over labelled atoms of κ_a · s_a, where
  κ_a = (p_a(l_a) − π_{l_a}) / (1 − π_{l_a})  — precision of the top images for the label, corrected
  for chance (0 = no better than the base rate, 1 = every top image has the label), and
  s_a = 1 − (m_{l_a} − 1) / M  — how much the label belongs to this atom rather than to others:
  m_c = number of labelled atoms whose label is c, M = number of labelled atoms (s = 1 when the
  atom is alone with its label, → 0 when every atom has the same label; with M atoms spread evenly
  over C classes s ≈ 1 − 1/C). Reported alongside: ``specificity_precision`` = mean κ_a and
  ``specificity_sharing`` = mean s_a.
- ``n_confident_atoms`` = number of labelled atoms with κ_a > ``CONFIDENT_KAPPA`` (0.5), and
  ``confident_fraction`` = that over all atoms: the count the cards and the explorer show.
- ``label_diversity`` = (number of distinct labels among labelled atoms) / min(C, M), with C the
  number of classes present among the labelled images: DESIGN's "distinct labels over atoms",
  normalised by the most distinct labels M atoms could carry, so 1 = the atoms cover as many classes
  as they possibly can, whatever the dictionary size.
"""

from __future__ import annotations

import numpy as np
import torch

from .metrics import auroc_for_labels

LABEL_IMAGES = 32
MIN_SUPPORT = 5
CONFIDENT_KAPPA = 0.5


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


def top_images(image_acts: np.ndarray, n: int = LABEL_IMAGES) -> np.ndarray:
    """(min(n, m), A) positions (rows of ``image_acts`` (m, A)) of each atom's top images, best first,
    −1 where the atom fires on fewer images (image activation <= 0)."""
    t = torch.from_numpy(np.ascontiguousarray(image_acts, dtype=np.float32))
    n = min(n, t.shape[0])
    values, pos = torch.topk(t, n, dim=0)
    return torch.where(values > 0, pos, -1).numpy()


def confident_count(kappa: np.ndarray) -> int:
    """Labelled atoms with κ > CONFIDENT_KAPPA (NaN = unlabelled, not counted)."""
    k = np.asarray(kappa, dtype=np.float64)
    return int((np.nan_to_num(k, nan=-np.inf) > CONFIDENT_KAPPA).sum())


def concept_labels(image_acts: np.ndarray, image_labels: np.ndarray) -> tuple[dict, dict]:
    """The module docstring's labels and their quality, from per-image activations.

    image_acts: (m, A) image activations (``image_activations``) of m images; image_labels: (m,) their
    classes (−1 unknown: dropped). Returns (per-atom arrays: label, precision, kappa, support, prior,
    faithfulness, sharing, specificity; summary: faithfulness, specificity, specificity_precision,
    specificity_sharing, label_diversity, n_labelled_atoms, n_confident_atoms, confident_fraction).
    """
    image_labels = np.asarray(image_labels)
    keep = image_labels >= 0
    if not keep.all():
        image_acts, image_labels = image_acts[keep], image_labels[keep]
    lab = label_atoms(top_images(image_acts), image_labels, min_support=MIN_SUPPORT)
    summary = label_quality(lab, image_acts, image_labels)
    summary["n_confident_atoms"] = confident_count(lab["kappa"])
    summary["confident_fraction"] = summary["n_confident_atoms"] / max(image_acts.shape[1], 1)
    return lab, summary
