"""Benchmark: the explorer's atom table with 16,384 atoms, and the latency of one live intervention.

1. **Atom table, 16,384 atoms.** Cards for a 16,384-atom random dictionary (d = 384) over a small random
   store are written in the documented cards layout (cards.json, atoms.jsonl with 16 top images,
   histogram, a class label and a description per atom, top.safetensors; no PNGs: the table does not
   read them). Timed: ``Explorer`` start-up, then what the atom-table page costs the server — the page,
   app.js, /api/meta and one 50-row /api/atoms page — through Starlette's TestClient, sorted by id, by
   κ (descending) and with a search; and, when Chromium and chromedriver are installed, the page load in
   headless Chromium from navigation to the table drawn (median of ``--repeats``).
2. **One live intervention** on the embedded DINOv2-S: ``--images`` Fashion-MNIST test images (digits as
   the fallback) are extracted at layer 8, a 1,536-atom random dictionary with OMP at k = 8 (the same
   encoding cost as the demo's DBK-SVD) gets its cards from ``vitatlas.interpret``, and
   ``Explorer.intervene`` (what POST /api/intervene runs: the model to layer 8, encode/edit/decode the
   257 tokens, the remaining blocks twice, the result) is timed for one image and one clamped atom,
   median of ``--repeats`` after a warm-up. ``--run/--acts/--cards`` time a real run instead.

``--device cuda`` loads the dictionaries and the model on the GPU (the table part does not use it);
``--model`` picks another model for part 2 (``hf:PATH``, or ``random:vit-b16`` / ``random:tiny``, random
weights built here, see ``benchmarks/extract.py``; layer 8 is clipped to the model's depth).

Usage: ``python benchmarks/explore.py [--threads 2] [--repeats 5] [--quick] [--device cpu] [--model M]``
(``--quick``: 4 images and 3 repeats, about a minute on 2 cores; ``--smoke``: 256 atoms, 2 images, one
repeat, the tiny random model: seconds, what the tests run). Timings on a shared machine are noisy:
report the median.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_cards(out: Path, n_atoms: int, n_images: int, top: int, class_names: list[str], seed: int = 0) -> None:
    """Cards of the documented layout with plausible content, written without the interpret pass."""
    from vitatlas.io import atomic_save_safetensors, atomic_write_json

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    ids = np.stack([rng.choice(n_images, top, replace=False) for _ in range(n_atoms)]).astype(np.int64)
    vals = -np.sort(-rng.gamma(2.0, 1.0, (n_atoms, top)), axis=1).astype(np.float32)
    edges = np.logspace(-2, 2, 17).round(5).tolist()
    with open(out / "atoms.jsonl", "w") as f:
        for a in range(n_atoms):
            label = class_names[int(rng.integers(len(class_names)))]
            kappa = float(rng.uniform(-0.1, 1.0))
            f.write(json.dumps({
                "id": a, "frequency": float(rng.uniform(0, 0.05)), "mean_activation": float(vals[a].mean()),
                "max_activation": float(vals[a, 0]),
                "top_images": [{"image": int(i), "value": float(v)} for i, v in zip(ids[a], vals[a])],
                "top_patches": [], "negative": None,
                "histogram": {"edges": edges, "counts": rng.integers(0, 500, 16).tolist()},
                "labels": [{"label": label, "precision": float(rng.uniform()), "kappa": kappa,
                            "faithfulness": float(rng.uniform(0.4, 1.0))}],
                "descriptions": [{"kind": "class", "text": label, "score": kappa, "faithfulness": None,
                                  "specificity": None, "evidence": {}}],
                "nearest_atoms": [{"atom": int(b), "cosine": 0.5} for b in rng.choice(n_atoms, 5)]}) + "\n")
    atomic_save_safetensors(out / "top.safetensors", {"image_ids": torch.from_numpy(ids),
                                                      "values": torch.from_numpy(vals)})
    atomic_write_json(out / "cards.json", {
        "format": "vitatlas-atom-cards", "version": 1, "run": {"path": None, "learner": "random",
                                                              "n_atoms": n_atoms, "d": 384},
        "store": {}, "n_atoms": n_atoms, "top": top, "rank": "max", "patch_grid": None, "has_images": False,
        "signed": False, "complete": True})


def median_time(fn, repeats: int) -> tuple[float, object, float]:
    """(median wall seconds, last result, median process CPU seconds). On a machine shared with other
    jobs the wall time includes waiting for a core; CPU time / threads is what a quiet machine would take."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(times), out, statistics.median(cpu)


def bench_table(tmp: Path, n_atoms: int, repeats: int, device: str, browser: bool = True) -> None:
    from starlette.testclient import TestClient

    from vitatlas import ActivationStore
    from vitatlas.explore import Explorer, Run, create_app
    from vitatlas.explore.cards import CardSet
    from vitatlas.learners.baselines import RandomDictionary

    print(f"\n== atom table: {n_atoms} atoms ==")
    rng = np.random.default_rng(0)
    n_images = 512
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    store = ActivationStore.from_array(tmp / "store", rng.standard_normal((n_images, 384)).astype(np.float32),
                                       rng.integers(0, 10, n_images), class_names=classes)
    dictionary = RandomDictionary(n_atoms=n_atoms, k=8, device=device).fit(store)
    t = time.perf_counter()
    write_cards(tmp / "cards", n_atoms, n_images, 16, classes)
    print(f"cards written in {time.perf_counter() - t:.1f} s (setup, not timed below)")

    t, c = time.perf_counter(), time.process_time()
    explorer = Explorer([Run("random", tmp / "run", dictionary, CardSet(tmp / "cards"))], store)
    print(f"Explorer start-up (read {n_atoms} cards, build the table): {time.perf_counter() - t:.2f} s wall, "
          f"{time.process_time() - c:.2f} s CPU")
    client = TestClient(create_app(explorer))

    def page_load(query: str):
        for path in ("/", "/static/app.js", "/static/style.css", "/api/meta", f"/api/atoms?limit=50&{query}"):
            r = client.get(path)
            assert r.status_code == 200, (path, r.text[:200])
        return r.json()

    queries = (("by id", "sort=id"), ("by kappa, descending", "sort=-kappa"),
               ("search 'sandal'", "q=sandal&sort=-frequency"), ("filter label + kappa", "label=Bag&min_kappa=0.5"))
    for name, query in queries:
        page_load(query)  # warm-up
        seconds, page, cpu = median_time(lambda q=query: page_load(q), repeats)
        print(f"table page (server side), {name:24s}: {1000 * seconds:7.1f} ms wall, {1000 * cpu:7.1f} ms CPU "
              f"({page['total']} atoms match)")
    if browser:
        browser_page_load(explorer, repeats, tmp / "chromium-profile")


def browser_page_load(explorer, repeats: int, profile: Path) -> None:
    """Navigation to the drawn table in headless Chromium, when the browser is installed."""
    chromium = os.environ.get("VITATLAS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = os.environ.get("VITATLAS_CHROMEDRIVER") or shutil.which("chromedriver")
    if not (chromium and driver_path):
        print("Chromium page load: skipped (no chromium/chromedriver; bash scripts/install_browser.sh)")
        return
    import socket
    import threading

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from vitatlas.explore import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(explorer), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", f"--user-data-dir={profile}"):  # the profile goes with the run's tmp
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        def load():
            driver.get(f"http://127.0.0.1:{port}/?sort=-kappa")
            WebDriverWait(driver, 30, poll_frequency=0.01).until(
                lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
            return driver.execute_script("return performance.now();")  # ms since navigation start

        load()
        ms = statistics.median(load() for _ in range(repeats))
        rows = driver.execute_script("return document.querySelectorAll('#atom-rows tr').length;")
        print(f"Chromium page load, navigation -> table drawn ({rows} rows of {len(explorer.runs['random'].table)}): "
              f"{ms:.0f} ms (median of {repeats})")
    finally:
        driver.quit()
        server.should_exit = True


def model_name(spec: str, tmp: Path) -> str:
    """``random:KIND`` -> an hf: model with random weights saved under ``tmp``; anything else as given."""
    if not spec.startswith("random:"):
        return spec
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from extract import random_model

    return random_model(spec.split(":", 1)[1], tmp)


def bench_intervention(tmp: Path, n_images: int, repeats: int, run: str | None, acts: str | None,
                       cards: str | None, device: str, model_spec: str) -> None:
    import vitatlas
    from vitatlas import ActivationStore, models
    from vitatlas.data.extract import extract
    from vitatlas.data.sources import fashion_mnist_available
    from vitatlas.explore import Explorer
    from vitatlas.learners.baselines import RandomDictionary

    tmp.mkdir(parents=True, exist_ok=True)
    name = model_name(model_spec, tmp)
    if run:
        print(f"\n== one live intervention: {model_spec}, the run's layer, device {device} ==")
        explorer = Explorer.open([run], acts, cards=[cards] if cards else None, model=name, device=device,
                                 progress=False)
        label = f"run {run}"
    else:
        model = models.load(name, device=device)
        layer = min(8, model.n_layers - 2)
        print(f"\n== one live intervention: {model_spec}, layer {layer}, device {device} ==")
        data = "embedded:fashion-mnist:test" if fashion_mnist_available() else "embedded:digits"
        extract(name, data, [layer], "patches", tmp / "acts", limit=n_images, batch_size=n_images,
                model=model, progress=False, device=device)
        store = ActivationStore(tmp / "acts")
        dictionary = RandomDictionary(n_atoms=1536, k=8, device=device).fit(store)
        dictionary.save(tmp / "run-random")
        vitatlas.interpret(dictionary, store, top=4, progress=False, device=device).save(tmp / "cards-random",
                                                                                         progress=False)
        explorer = Explorer.open([tmp / "run-random"], tmp / "acts", cards=[tmp / "cards-random"],
                                 model=name, device=device, progress=False)
        label = f"random 1536-atom OMP dictionary (k=8) over {n_images} images of {data}"
    image = int(explorer.images.image_ids[0])
    explorer.image_png(image)
    atom = int(explorer.image(None, image)["top_atoms"][0][0])
    edits = [{"atom": atom, "op": "clamp", "value": -2.0}]
    explorer.intervene(None, image, edits, None)  # warm-up (first forward pass allocates)
    seconds, out, cpu = median_time(lambda: explorer.intervene(None, image, edits, None), repeats)
    print(f"{label}")
    print(f"intervention (clamp atom {atom} to -2 x max on all tokens), end to end: {1000 * seconds:.0f} ms wall "
          f"(inside vitatlas.intervene: {1000 * out['seconds']:.0f} ms), {1000 * cpu:.0f} ms CPU = "
          f"{1000 * cpu / torch.get_num_threads():.0f} ms per thread; median of {repeats}, "
          f"{torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--atoms", type=int, default=16384)
    parser.add_argument("--images", type=int, default=8, help="images extracted for the intervention timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 images, 3 repeats")
    parser.add_argument("--smoke", action="store_true", help="256 atoms, 2 images, 1 repeat, random:tiny, no browser")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--model", default="embedded:dinov2-s", help="model of part 2 (hf:PATH, random:vit-b16, ...)")
    parser.add_argument("--run", help="time the intervention on this run instead (with --acts, optional --cards)")
    parser.add_argument("--acts")
    parser.add_argument("--cards")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--skip-intervention", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 4, 3
    if args.smoke:
        args.atoms, args.images, args.repeats, args.model = 256, 2, 1, "random:tiny"
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}, device: {args.device}")
    with tempfile.TemporaryDirectory(prefix="vitatlas-bench-explore-") as tmp:
        if not args.skip_table:
            bench_table(Path(tmp) / "table", args.atoms, args.repeats, args.device, browser=not args.smoke)
        if not args.skip_intervention:
            bench_intervention(Path(tmp) / "live", args.images, args.repeats, args.run, args.acts, args.cards,
                               args.device, args.model)


if __name__ == "__main__":
    main()
