"""``evaluate``: every metric of one dictionary on a data set, in one streamed pass (see the package docstring)."""

from __future__ import annotations

import numpy as np
import torch

from .. import distributed
from ..arrays import ArrayLike
from ..data.batches import is_store, iter_rank_batches, n_rows_and_width
from ..dictionary import Dictionary
from ..errors import VitatlasError
from .labels import LABEL_IMAGES, MIN_SUPPORT, concept_labels
from .metrics import ReconstructionStats, frequency_histogram, max_coherence, near_duplicates
from .probing import downstream_probe, image_split, sparse_probe
from .spatial import grid_layout, spatial_coherence

__all__ = ["evaluate"]

ACTIVATIONS = ("abs", "value")


class TopActivations:
    """Running top-``top_n`` rows per atom, among the rows where the atom fires."""

    def __init__(self, top_n: int, n_atoms: int):
        self.values = torch.full((top_n, n_atoms), -float("inf"))
        self.rows = torch.full((top_n, n_atoms), -1, dtype=torch.int64)

    def update(self, act: torch.Tensor, codes: torch.Tensor, start: int) -> None:
        b, n_atoms = act.shape
        cand_vals = torch.cat([self.values, act.masked_fill(codes == 0, -float("inf"))])
        cand_rows = torch.cat([self.rows, torch.arange(start, start + b).unsqueeze(1).expand(b, n_atoms)])
        self.values, pick = torch.topk(cand_vals, k=self.values.shape[0], dim=0)
        self.rows = torch.gather(cand_rows, 0, pick)

    def all_gather_merge_(self) -> TopActivations:
        """Merge every rank's lists (torchrun) into the top ``top_n`` of all rows; in place, same on all ranks.

        Candidates are ordered by value, descending, ties by row number, ascending, so the merge does not
        depend on the rank count. A no-op for one process.
        """
        if not distributed.world().distributed:
            return self
        parts = distributed.all_gather_object((self.values.numpy(), self.rows.numpy()))
        values = torch.from_numpy(np.concatenate([v for v, _ in parts]))
        rows = torch.from_numpy(np.concatenate([r for _, r in parts]))
        pick = distributed.merge_top(values, rows, self.values.shape[0])
        self.values, self.rows = values.gather(0, pick), rows.gather(0, pick)
        return self

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_n, A) rows (−1 where fewer rows fired) and values."""
        return torch.where(torch.isinf(self.values), torch.full_like(self.rows, -1), self.rows), self.values


class KeptActivations:
    """Full activation vectors of at most ``memory_budget // (4·A)`` rows: all rows, or every row of a fixed
    random subset of whole images (an image's rows stay together, so per-image measures see whole maps)."""

    def __init__(self, n: int, n_atoms: int, memory_budget: int, rng: np.random.Generator, keep: bool,
                 image_ids: np.ndarray | None = None):
        cap = max(1, memory_budget // (4 * n_atoms))
        if n <= cap:
            self.rows = np.arange(n)
        elif image_ids is None:
            self.rows = np.sort(rng.choice(n, size=cap, replace=False))
        else:
            uniq, inverse, counts = np.unique(image_ids, return_inverse=True, return_counts=True)
            order = rng.permutation(uniq.size)
            take = order[np.cumsum(counts[order]) <= cap]
            if take.size == 0:  # one image is larger than the budget: its first rows
                self.rows = np.flatnonzero(inverse == order[0])[:cap]
            else:
                chosen = np.zeros(uniq.size, bool)
                chosen[take] = True
                self.rows = np.flatnonzero(chosen[inverse])
        self.pos = np.full(n, -1, np.int64)
        self.pos[self.rows] = np.arange(self.rows.size)
        self.acts = np.zeros((self.rows.size, n_atoms), np.float32) if keep else None

    def update(self, act: torch.Tensor, start: int) -> None:
        if self.acts is None:
            return
        pos = self.pos[start:start + act.shape[0]]
        sel = pos >= 0
        self.acts[pos[sel]] = act[torch.from_numpy(sel)].numpy()

    def all_reduce_(self) -> None:
        """Every rank filled the kept rows among its own rows and left zeros elsewhere: a sum joins them exactly."""
        if self.acts is not None:
            distributed.all_reduce_(torch.from_numpy(self.acts))


class ImageMaxima:
    """Each atom's image activation (max over the image's rows) for every labelled image, or a fixed random
    subset of at most ``memory_budget // (4·A)`` images; exact whatever the row order (a scatter max)."""

    def __init__(self, labels: np.ndarray, image_ids: np.ndarray, n_atoms: int, memory_budget: int,
                 rng: np.random.Generator):
        uniq, img_of_row = np.unique(image_ids, return_inverse=True)
        imgs = np.unique(img_of_row[labels >= 0])
        cap = max(1, memory_budget // (4 * n_atoms))
        if imgs.size > cap:
            imgs = np.sort(rng.choice(imgs, size=cap, replace=False))
        slot = np.full(uniq.size, -1, np.int64)
        slot[imgs] = np.arange(imgs.size)
        self.row_slot = torch.from_numpy(np.where(labels >= 0, slot[img_of_row], -1))
        self.image_labels = np.full(imgs.size, -1, np.int64)
        lab_rows = np.flatnonzero(labels >= 0)
        ok = slot[img_of_row[lab_rows]] >= 0
        self.image_labels[slot[img_of_row[lab_rows[ok]]]] = labels[lab_rows[ok]]  # a row's label is its image's
        self.acts = torch.zeros(imgs.size, n_atoms)  # activations are >= 0: 0 = never fired

    def update(self, act: torch.Tensor, start: int) -> None:
        rs = self.row_slot[start:start + act.shape[0]]
        ok = rs >= 0
        if ok.any():
            src = act[ok].clamp(min=0)
            self.acts.scatter_reduce_(0, rs[ok].unsqueeze(1).expand_as(src), src, reduce="amax")

    def all_reduce_(self) -> None:
        distributed.all_reduce_(self.acts, "max")


class ImageMeans:
    """Per-image sums of x and x̂ over labelled rows (at most ``max_images`` images) for the probe."""

    def __init__(self, labels: np.ndarray, image_ids: np.ndarray, d: int, max_images: int,
                 rng: np.random.Generator):
        self.labels = labels
        self.img_uniq, self.img_of_row = np.unique(image_ids, return_inverse=True)
        imgs = np.unique(self.img_of_row[labels >= 0])
        if imgs.size > max_images:
            imgs = np.sort(rng.choice(imgs, size=max_images, replace=False))
        self.images = imgs
        slot = np.full(self.img_uniq.size, -1, np.int64)
        slot[imgs] = np.arange(imgs.size)
        self.row_slot = torch.from_numpy(np.where(labels >= 0, slot[self.img_of_row], -1))
        self.x_sum = torch.zeros(imgs.size, d, dtype=torch.float64)
        self.xh_sum = torch.zeros(imgs.size, d, dtype=torch.float64)
        self.count = torch.zeros(imgs.size, dtype=torch.float64)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, start: int) -> None:
        rs = self.row_slot[start:start + x.shape[0]]
        ok = rs >= 0
        self.x_sum.index_add_(0, rs[ok], x[ok.to(x.device)].double().cpu())
        self.xh_sum.index_add_(0, rs[ok], x_hat[ok.to(x.device)].double().cpu())
        self.count.index_add_(0, rs[ok], torch.ones(int(ok.sum()), dtype=torch.float64))

    def all_reduce_(self) -> None:
        """Sum the per-image sums over ranks (an image cut by a rank boundary has rows on two ranks)."""
        for t in (self.x_sum, self.xh_sum, self.count):
            distributed.all_reduce_(t)

    def result(self, test_fraction: float, seed: int) -> dict:
        """The downstream probe on the images' mean rows (original vs reconstructed)."""
        have = self.count > 0
        x_img = (self.x_sum[have] / self.count[have].unsqueeze(1)).numpy()
        xh_img = (self.xh_sum[have] / self.count[have].unsqueeze(1)).numpy()
        first_row = np.full(self.img_uniq.size, -1, np.int64)
        lab_rows = np.nonzero(self.labels >= 0)[0]
        first_row[self.img_of_row[lab_rows[::-1]]] = lab_rows[::-1]  # any labelled row of each image
        img_ids_sel = self.images[have.numpy()]
        y_img = self.labels[first_row[img_ids_sel]]
        test_img = image_split(self.img_uniq[img_ids_sel], test_fraction=test_fraction, seed=seed)
        return downstream_probe(x_img, xh_img, y_img, test_img)


def _row_labels(labels, X: ArrayLike, n: int) -> np.ndarray | None:
    """(n,) int64 labels (−1 unknown) from the argument or a labelled store; None when none is known."""
    if labels is None and is_store(X):
        labels = X.labels
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise VitatlasError(f"labels must be {n} integers (one per row), got shape {labels.shape}")
    labels = labels.astype(np.int64)
    return labels if (labels >= 0).any() else None


def _row_images(image_ids, X: ArrayLike, n: int) -> np.ndarray:
    if image_ids is None:
        image_ids = X.index[:, 0].astype(np.int64) if is_store(X) else np.arange(n)
    image_ids = np.asarray(image_ids)
    if image_ids.shape != (n,):
        raise VitatlasError(f"image_ids must have one entry per row ({n}), got shape {image_ids.shape}")
    return image_ids


@torch.no_grad()
def evaluate(dictionary: Dictionary, X: ArrayLike, labels: np.ndarray | None = None, *,
             image_ids: np.ndarray | None = None, class_names: list[str] | None = None,
             batch_size: int = 4096, progress: bool = False,
             top_n: int = 32, activation: str = "abs", memory_budget: int = 1 << 30,
             max_probe_images: int = 20_000, test_fraction: float = 0.25, seed: int = 0,
             patch_grid: list[int] | None = None, patch_cells: np.ndarray | None = None,
             downstream: bool = True) -> dict:
    """Evaluate ``dictionary`` on X (array, tensor or ActivationStore), streaming ``batch_size`` rows.

    labels: (n,) int class per row (−1 unknown); defaults to ``X.labels`` for a labelled store.
    image_ids: (n,) image of each row; defaults to the store's index, else one image per row.
    class_names: names of the label ids (per-atom ``label_name``); defaults to the store's.
    patch_grid / patch_cells: the patch grid [g, g] and each row's grid cell (−1 not a patch), for
    spatial coherence; default from a store's manifest and index (none for an array).
    downstream: fit the downstream probe (``probe_acc_*``); the scorecard, which does not show it, skips it.

    Returns a dict with the DESIGN.md metrics (see ``metrics`` / ``labels`` / ``probing`` for the
    exact formulas): signal_recovered, explained_variance, mse, l0, dead_fraction, dense_fraction,
    max_coherence, near_duplicate_pairs / near_duplicate_atoms, frequency_histogram; with labels also
    faithfulness, specificity (+ its two parts), label_diversity, n_labelled_atoms, n_confident_atoms,
    sparse_probe_acc@1/5/20 and probe_acc_original / probe_acc_reconstructed / probe_acc_with_error;
    with a patch grid spatial_coherence (``spatial``). ``"atoms"`` holds per-atom numpy arrays
    (frequency, label, precision, kappa, sharing, faithfulness, specificity, spatial_coherence,
    top_rows (A, top_n) with −1 padding, top_values) and ``"settings"`` what was used.

    Memory: per-atom statistics and the top-``top_n`` buffers stream; the (images, A) image activations
    behind the labels and faithfulness are kept for at most ``memory_budget // (4·A)`` labelled images
    (a fixed random subset beyond, reported as ``settings.images_for_labels``); the (rows, A)
    activation matrix used for sparse probing and spatial coherence is kept only for at most
    ``memory_budget // (4·A)`` rows — all rows when they fit, otherwise every row of a fixed random
    subset of whole images (seed ``seed``), whose row count is reported as ``settings.rows_for_auroc``.
    The downstream probe uses at most ``max_probe_images`` images (a fixed random subset when there
    are more).

    >>> import numpy as np
    >>> from vitatlas.learners.baselines import PCABaseline
    >>> X = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    >>> r = evaluate(PCABaseline(8).fit(X), X)   # all 8 directions: a perfect reconstruction
    >>> round(r["explained_variance"], 5), r["l0"], r["dead_fraction"]
    (1.0, 8.0, 0.0)
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
    labels = _row_labels(labels, X, n)
    image_ids = _row_images(image_ids, X, n)

    grid, cells = patch_grid, patch_cells
    if grid is None and is_store(X):
        grid, cell_of_position = grid_layout(X.manifest)
        if grid is not None:
            lut = np.full(max(X.manifest["token_positions"]) + 1, -1, np.int64)
            lut[X.manifest["token_positions"]] = cell_of_position
            cells = lut[X.index[:, 1]]
    if grid is not None and (cells is None or np.shape(cells) != (n,)):
        raise VitatlasError(f"patch_cells must give one grid cell per row ({n}) with patch_grid")

    rng = np.random.default_rng(seed)  # drawn from in this order: kept rows, probe images, label images
    stats = ReconstructionStats(n_atoms)
    top = TopActivations(top_n, n_atoms)
    kept = KeptActivations(n, n_atoms, memory_budget, rng, keep=labels is not None or grid is not None,
                           image_ids=image_ids)
    images = ImageMeans(labels, image_ids, d, max_probe_images, rng) if labels is not None and downstream else None
    maxima = ImageMaxima(labels, image_ids, n_atoms, memory_budget, rng) if labels is not None else None

    from tqdm.auto import tqdm

    world = distributed.world()
    # torchrun: this rank's contiguous rows, then the statistics are combined
    rows, batches = iter_rank_batches(X, batch_size, device=dictionary.device, dtype=dictionary.dtype, d=d)
    bar = tqdm(total=len(rows), desc=f"eval {dictionary.learner}", unit="row", disable=not progress or not world.is_main)
    start = rows.start
    for x in batches:
        codes = dictionary._encode(x)
        x_hat = dictionary._decode(codes)
        stats.update(x, x_hat, codes)
        codes = codes.float().cpu()
        act = codes.abs() if activation == "abs" else codes.clone()
        top.update(act, codes, start)
        kept.update(act, start)
        if images is not None:
            images.update(x, x_hat, start)
        if maxima is not None:
            maxima.update(act, start)
        start += x.shape[0]
        bar.update(x.shape[0])
    bar.close()
    if world.distributed:
        stats.all_reduce_()
        top.all_gather_merge_()
        kept.all_reduce_()
        if images is not None:
            images.all_reduce_()
        if maxima is not None:
            maxima.all_reduce_()

    top_rows, top_vals = top.result()
    out: dict = {"kind": dictionary.learner, "n_rows": n, "d": d, "n_atoms": n_atoms}
    out.update(stats.result())
    out["max_coherence"] = max_coherence(dictionary.atoms)
    out.update(near_duplicates(dictionary.atoms))
    freq = stats.frequency
    out["frequency_histogram"] = frequency_histogram(freq, n)
    atoms = {"frequency": freq, "top_rows": top_rows.T.numpy(), "top_values": top_vals.T.numpy()}
    if grid is not None:
        sc = spatial_coherence(kept.acts, image_ids[kept.rows], np.asarray(cells)[kept.rows], grid)
        atoms.update(sc.pop("atoms"))
        out.update(sc)

    if labels is not None:
        lab, quality = concept_labels(maxima.acts.numpy(), maxima.image_labels)
        out.update(quality)
        atoms.update({k: v for k, v in lab.items() if k != "prior"})
        names = class_names if class_names is not None else (X.class_names if is_store(X) else None)
        if names:
            atoms["label_name"] = [names[c] if 0 <= c < len(names) else None for c in lab["label"].tolist()]
        kept_lab = labels[kept.rows]
        ok = kept_lab >= 0
        test = image_split(image_ids[kept.rows][ok], test_fraction=test_fraction, seed=seed)
        out.update(sparse_probe(kept.acts if ok.all() else kept.acts[ok], kept_lab[ok], test))
        if images is not None:
            out.update(images.result(test_fraction, seed))
    out["settings"] = {"top_n": top_n, "label_images": LABEL_IMAGES, "min_support": MIN_SUPPORT,
                       "activation": activation,
                       "rows_for_auroc": int(kept.rows.size) if labels is not None else 0,
                       "images_for_labels": int(maxima.acts.shape[0]) if maxima is not None else 0,
                       "test_fraction": test_fraction, "seed": seed, "batch_size": batch_size,
                       "has_labels": labels is not None}
    out["atoms"] = atoms
    return out

