"""Sparse probing (accuracy from the best few atoms) and the downstream linear-probe check.

Both split by *image* (never by row, so patches of one image never sit on both sides): a fixed
permutation (seed ``seed``) of the distinct image ids puts ``test_fraction`` of them in the test set.

- ``sparse_probe_acc@m`` (m = 1, 5, 20): for each class c, one-vs-rest. Atoms are scored on the train
  rows by mean activation on class-c rows minus mean activation on the other rows; the m best
  (min(m, A) when the dictionary has fewer atoms) are the features of a logistic regression
  (standardised features, balanced class weights) fitted on the train rows. The score is its
  *balanced* accuracy on the test rows (chance = 0.5 whatever the class balance); reported is the
  mean over classes.
- Downstream (``probe_acc_original`` / ``probe_acc_reconstructed`` / ``probe_acc_with_error``): a
  multinomial logistic regression is trained on the original activations of the train images (for a
  patch store, the mean of each image's rows; for a CLS store, its one row) and scored (plain
  accuracy) on the test images' original activations, on their reconstructions, and on reconstruction
  + error term. The last must equal the original: the identity is checked on every call.
"""

from __future__ import annotations

import warnings

import numpy as np

SPARSE_PROBE_SIZES = (1, 5, 20)


def image_split(image_ids: np.ndarray, *, test_fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    """Boolean (n,) mask of test rows: all rows of a random ``test_fraction`` of the distinct images."""
    uniq = np.unique(image_ids)
    perm = np.random.default_rng(seed).permutation(uniq.size)
    n_test = int(round(test_fraction * uniq.size))
    if uniq.size >= 2:
        n_test = min(max(n_test, 1), uniq.size - 1)
    test_ids = uniq[perm[:n_test]]
    return np.isin(image_ids, test_ids)


def _logreg(**kw):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000, **kw)


def sparse_probe(acts: np.ndarray, labels: np.ndarray, test: np.ndarray,
                 sizes: tuple[int, ...] = SPARSE_PROBE_SIZES) -> dict:
    """``{"sparse_probe_acc@m": mean balanced accuracy}`` (NaN when no class can be probed).

    acts: (n, A) activations; labels: (n,) classes ≥ 0; test: (n,) bool test rows.
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    train = ~test
    results: dict[int, list[float]] = {m: [] for m in sizes}
    classes = np.unique(labels)
    # per-class sums of the train activations in one pass: (C, A), no per-class copies of acts
    y_tr = labels[train]
    class_sum = np.zeros((classes.size, acts.shape[1]))
    total = np.zeros(acts.shape[1])
    for s in range(0, acts.shape[0], 8192):
        blk, tr = acts[s:s + 8192], train[s:s + 8192]
        onehot = (labels[s:s + 8192][tr, None] == classes[None, :]).astype(np.float64)
        class_sum += onehot.T @ blk[tr]
        total += blk[tr].sum(0, dtype=np.float64)
    n_c = np.array([(y_tr == c).sum() for c in classes], dtype=np.float64)
    n_tr = y_tr.size
    for ci, c in enumerate(classes):
        y = labels == c
        if y[train].all() or not y[train].any() or y[test].all() or not y[test].any():
            continue  # a class missing from one side cannot be probed
        score = class_sum[ci] / n_c[ci] - (total - class_sum[ci]) / (n_tr - n_c[ci])
        order = np.argsort(-score, kind="stable")
        for m in sizes:
            cols = order[:min(m, acts.shape[1])]
            sub = acts[:, cols]  # (n, m): copy only the chosen columns
            x_tr, x_te = sub[train], sub[test]
            scaler = StandardScaler().fit(x_tr)
            clf = _logreg(class_weight="balanced")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                clf.fit(scaler.transform(x_tr), y[train])
            pred = clf.predict(scaler.transform(x_te))
            results[m].append(balanced_accuracy_score(y[test], pred))
    return {f"sparse_probe_acc@{m}": float(np.mean(v)) if v else float("nan") for m, v in results.items()}


def check_error_identity(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """Return reconstruction + error term, after checking that it equals the original x."""
    error = x - x_hat
    with_error = x_hat + error
    scale = max(float(np.abs(x).max()), 1.0)
    if not np.allclose(with_error, x, rtol=1e-6, atol=1e-6 * scale):
        raise AssertionError("reconstruction + error term differs from the original activations")
    return with_error


def downstream_probe(x_img: np.ndarray, x_hat_img: np.ndarray, y_img: np.ndarray, test: np.ndarray) -> dict:
    """Linear probe trained on original per-image activations, scored on original / reconstructed /
    reconstructed + error test activations. x_img, x_hat_img: (m, d); y_img: (m,); test: (m,) bool."""
    from sklearn.preprocessing import StandardScaler

    nan = {"probe_acc_original": float("nan"), "probe_acc_reconstructed": float("nan"),
           "probe_acc_with_error": float("nan")}
    train = ~test
    if np.unique(y_img[train]).size < 2 or not test.any():
        return nan
    scaler = StandardScaler().fit(x_img[train])
    clf = _logreg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(scaler.transform(x_img[train]), y_img[train])
    x_te, xh_te = x_img[test], x_hat_img[test]
    acc = lambda z: float((clf.predict(scaler.transform(z)) == y_img[test]).mean())  # noqa: E731
    return {"probe_acc_original": acc(x_te), "probe_acc_reconstructed": acc(xh_te),
            "probe_acc_with_error": acc(check_error_identity(x_te, xh_te))}
