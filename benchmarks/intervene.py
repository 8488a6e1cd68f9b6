"""Benchmark: images/s of an intervened forward pass against the plain forward pass.

Plain: ``model.residual_streams(pixels, [last])`` + the final norm (the whole ViT once).
Intervened: ``vitatlas.intervene`` with one clamp edit on all tokens at layer L — the ViT up to L once,
the encode / edit / decode of every token with the dictionary, and the rest of the network twice
(unedited ``before`` and edited ``after``), which is what a notebook or the explorer's sliders call.
Also timed: the intervened pass without the ``before`` copy (``intervention`` context, one pass).

The model is the embedded DINOv2-S (``--model``) or, with ``--tiny``, a tiny random ViT (no weights
needed); the dictionary a run directory (``--run``, e.g. a DBK-SVD or SAE run fitted on layer 8) or,
without one, a TopK SAE fitted on the spot on a few images' tokens at ``--layer``. Images are
Fashion-MNIST test images (random noise images when it is not installed).

``--device cuda`` puts the model and the dictionaries on the GPU; every timed call then ends with a
synchronisation. ``--model`` also takes ``random:vit-b16`` (a random-weight ViT-B/16, built here, nothing
downloaded; see ``benchmarks/extract.py``).

Usage: ``python benchmarks/intervene.py [--run DIR ...] [--images 32] [--batch 16] [--threads 2] [--tiny]
[--device cpu]`` (about a minute per run on 2 CPU cores with the defaults; ``--tiny --images 4 --repeats 1``
takes seconds and is what the tests run).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def images(n: int) -> list[Image.Image]:
    from vitatlas.data.sources import fashion_mnist_available, open_source

    if fashion_mnist_available():
        source = open_source("embedded:fashion-mnist:test")
        return [source.load(i) for i in range(n)]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)]


def best_of(fn, repeats: int, device: str = "cpu") -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:dinov2-s")
    parser.add_argument("--tiny", action="store_true", help="a tiny random ViT instead of --model")
    parser.add_argument("--run", action="append", default=[], help="dictionary run directory (repeatable)")
    parser.add_argument("--layer", type=int, default=8, help="layer for the on-the-spot SAE when no --run")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = args.device

    import vitatlas
    from vitatlas import models
    from vitatlas.intervene import Edit, intervene, intervention

    torch.set_num_threads(args.threads)
    # random models go to a directory removed when main ends, also after an error or a SIGTERM
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.TemporaryDirectory(prefix="vitatlas-bench-intervene-")
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _tiny import save_tiny_dinov2

        model = models.load(f"hf:{save_tiny_dinov2(Path(tmp.name) / 'tiny', image_size=56, layers=4)}",
                            device=device)
        args.layer = min(args.layer, model.n_layers - 2)
    elif args.model.startswith("random:"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from extract import random_model

        model = models.load(random_model(args.model.split(":", 1)[1], Path(tmp.name)), device=device)
        args.layer = min(args.layer, model.n_layers - 2)
    else:
        model = models.load(args.model, device=device)
    imgs = images(args.images)
    pixels = model.preprocess(imgs)
    dictionaries = {Path(r).name: vitatlas.load(r, device=device) for r in args.run}
    if not dictionaries:
        X = model.residual_streams(pixels[:8], [args.layer])[args.layer].reshape(-1, model.width).cpu().numpy()
        sae = vitatlas.SAE(kind="topk", n_latents=4 * model.width, k=8, epochs=2, device=device).fit(X, progress=False)
        sae.fit_info = {"model": model.name, "layer": args.layer}
        dictionaries = {"topk-sae (fitted here)": sae}
    last = model.n_layers - 1

    @torch.no_grad()
    def plain():
        for s in range(0, len(pixels), args.batch):
            model.forward_from(last, model.residual_streams(pixels[s:s + args.batch], [last])[last])

    plain()  # warm-up
    t_plain = best_of(plain, args.repeats, device)
    print(f"model {model.name}, {len(pixels)} images, batch {args.batch}, {args.threads} thread(s), device {device}; "
          "timings are best of {args.repeats}, on a shared machine they are noisy".replace("{args.repeats}",
                                                                                           str(args.repeats)))
    print(f"{'condition':52s} {'images/s':>9s} {'vs plain':>9s}")
    print(f"{'plain forward':52s} {len(pixels) / t_plain:9.2f} {1.0:9.2f}")
    for name, d in dictionaries.items():
        edit = [Edit(0, "clamp", 3.0, relative=False)]

        def edited(d=d, edit=edit):
            intervene(model, d, pixels, edits=edit, batch_size=args.batch)

        def hooked(d=d, edit=edit):
            with intervention(model, d, None, edit) as run:
                for s in range(0, len(pixels), args.batch):
                    run.forward(pixels[s:s + args.batch])

        for label, fn in ((f"intervene() before+after, {name}", edited), (f"intervention() one pass, {name}", hooked)):
            fn()
            t = best_of(fn, args.repeats, device)
            print(f"{label:52s} {len(pixels) / t:9.2f} {t_plain / t:9.2f}")


if __name__ == "__main__":
    main()
