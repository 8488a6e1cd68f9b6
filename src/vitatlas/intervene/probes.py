"""Train a linear probe on a model's final normed tokens (what ``vitatlas probe train`` runs).

Images are split into train and held-out parts (``held_out`` fraction, seeded); the probe is fitted on
the train part and scored on the held-out part: accuracy for classification, patch accuracy and mIoU
for segmentation. Segmentation rows are subsampled to ``max_rows`` for the fit (memory stays bounded).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.sources import ImageSource
from ..errors import VitatlasError
from ..models.base import VisionModel
from .collect import final_tokens, image_batches, split_ids
from .heads import LinearProbe, check_task, features_of, model_identity, segmentation_scores
from .masks import MaskSource, check_same_length


@torch.no_grad()
def _features(model: VisionModel, source: ImageSource, ids: np.ndarray, task: str, masks: MaskSource | None,
              batch_size: int, bar) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for batch in image_batches(model, source, ids, masks=masks, batch_size=batch_size):
        f = features_of(final_tokens(model, batch.pixels), task, model.n_prefix_tokens).float().cpu()
        if task == "segmentation":
            feats.append(f.reshape(-1, f.shape[-1]))
            labels.append(torch.from_numpy(batch.patch_labels.reshape(-1)))
        else:
            feats.append(f)
            labels.append(torch.from_numpy(batch.labels))
        bar.update(len(batch.ids))
    if not feats:
        raise VitatlasError(f"no readable images in {source.spec}")
    return torch.cat(feats), torch.cat(labels)


def train_probe(model: VisionModel, source: ImageSource, task: str, *, masks: MaskSource | None = None,
                limit: int | None = None, held_out: float = 0.2, batch_size: int = 32, max_rows: int = 200_000,
                l2: float = 1e-4, seed: int = 0, progress: bool = True) -> LinearProbe:
    """Fit a ``LinearProbe`` for ``task`` on images 0..limit-1 of ``source``; metrics on held-out images."""
    check_task(task)
    if limit is not None and limit < 2:
        raise VitatlasError(f"--limit must be at least 2 (train and held-out images), got {limit}")
    if not 0 < held_out < 1:
        raise VitatlasError(f"the held-out fraction must be between 0 and 1, got {held_out}")
    n = min(len(source), limit) if limit else len(source)
    if n < 2:
        raise VitatlasError(f"{source.spec} has {n} image(s): a probe needs at least 2 (train and held out)")
    if task == "segmentation":
        if masks is None:
            raise VitatlasError("a segmentation probe needs patch labels: give a data source with masks")
        check_same_length(source, masks)
        class_names = masks.class_names
    else:
        if not source.has_labels:
            raise VitatlasError(f"{source.spec} has no image labels: a classification probe needs labelled images")
        class_names = list(source.class_names)
    train_ids, test_ids = split_ids(n, held_out, seed)
    bar = tqdm(total=n, unit="img", desc=f"probe {task}", disable=not progress)
    X, y = _features(model, source, train_ids, task, masks, batch_size, bar)
    Xt, yt = _features(model, source, test_ids, task, masks, batch_size, bar)
    bar.close()
    if X.shape[0] > max_rows:  # segmentation: many patches per image; a random subset fits as well
        keep = torch.from_numpy(np.random.default_rng(seed).choice(X.shape[0], max_rows, replace=False))
        X, y = X[keep], y[keep]
    probe = LinearProbe.fit(X, y, task=task, class_names=class_names, model=model_identity(model), l2=l2)
    pred = probe.logits_of_features(Xt).argmax(-1).numpy()
    truth = yt.numpy()
    if task == "segmentation":
        metrics = segmentation_scores(pred, truth, probe.n_classes)
    else:
        keep = truth >= 0
        metrics = {"accuracy": float((pred[keep] == truth[keep]).mean()), "n_images": int(keep.sum())}
    train_pred = probe.logits_of_features(X).argmax(-1).numpy()
    metrics["train_accuracy"] = float((train_pred[y.numpy() >= 0] == y.numpy()[y.numpy() >= 0]).mean())
    probe.metrics = metrics
    probe.info = {"data": source.spec, "masks": getattr(masks, "spec", None), "n_images": int(n),
                  "n_train_images": int(len(train_ids)), "n_held_out_images": int(len(test_ids)),
                  "held_out_fraction": held_out, "seed": seed, "l2": l2}
    return probe
