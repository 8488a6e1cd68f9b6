"""A tiny world for the explorer's tests (no test functions here; the other test_explore* files use it).

A random 3-block DINOv2 (28 px, 7 px patches: a 4x4 grid), 24 digits through it into a patch store,
two small dictionaries (DBK-SVD and a TopK SAE) fitted on the store, their atom cards made by the real
``vitatlas.interpret``, and a classification probe on the model's final CLS — built once per session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _tiny import save_tiny_dinov2

N_IMAGES = 24
N_ATOMS = 24
LAYER = 1


@dataclass
class TinyWorld:
    root: Path
    model_spec: str
    model: object
    store_path: Path
    runs: list[Path]
    cards: list[Path]
    probe: Path


_WORLD: dict[str, TinyWorld] = {}


def tiny_world(tmp_path_factory) -> TinyWorld:
    """Build (once per test session) the tiny model, store, runs, cards and probe."""
    if "world" in _WORLD:
        return _WORLD["world"]
    import vitatlas
    from vitatlas import ActivationStore, models
    from vitatlas.data.extract import extract
    from vitatlas.intervene.heads import LinearProbe, model_identity

    root = tmp_path_factory.mktemp("explore-world")
    model_path = save_tiny_dinov2(root / "dinov2")
    spec = f"hf:{model_path}"
    model = models.load(spec)
    extract(spec, "embedded:digits", [LAYER], "patches", root / "acts", limit=N_IMAGES, batch_size=8,
            model=model, progress=False)
    store = ActivationStore(root / "acts")
    X = store.to_numpy()
    runs, cards = [], []
    for name, dictionary in (("ksvd", vitatlas.DBKSVD(n_atoms=N_ATOMS, k=3, epochs=2, seed=0)),
                             ("sae", vitatlas.SAE(kind="topk", n_latents=N_ATOMS, k=3, epochs=2, batch_size=64,
                                                  seed=0))):
        dictionary.fit(store, progress=False) if _takes_progress(dictionary.fit) else dictionary.fit(store)
        run_dir = dictionary.save(root / "runs" / name)
        runs.append(run_dir)
        card_dir = root / "cards" / name
        vitatlas.interpret(vitatlas.load(run_dir), store, top=4, progress=False, run_path=run_dir).save(
            card_dir, progress=False)
        cards.append(card_dir)
    assert X.shape[0] == N_IMAGES * 16

    # a probe on the final CLS, trained on the same digits (labels 0-9)
    from vitatlas.data.sources import open_source

    source = open_source("embedded:digits")
    images = [source.image(i) for i in range(64)]
    labels = torch.tensor([source.label(i) for i in range(64)])
    with torch.no_grad():
        pixels = model.preprocess(images)
        final = model.forward_from(LAYER, model.residual_streams(pixels, [LAYER])[LAYER])
    probe = LinearProbe.fit(final[:, 0], labels, task="classification", class_names=[str(i) for i in range(10)],
                            model=model_identity(model))
    probe_dir = probe.save(root / "probe")
    world = TinyWorld(root, spec, model, root / "acts", runs, cards, probe_dir)
    _WORLD["world"] = world
    return world


def _takes_progress(fn) -> bool:
    import inspect

    try:
        return "progress" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def first_image(explorer) -> int:
    return int(np.asarray(explorer.images.image_ids)[0])
