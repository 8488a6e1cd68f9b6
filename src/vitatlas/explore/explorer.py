"""``Explorer``: everything the pages show, computed from runs, a store, atom cards and a model.

The server (``server``) and the static export (``export``) are thin layers over this object: each page's
data is one method returning plain JSON-able dicts, so the live site and the exported site show the
same thing. Arguments are assumed validated by the caller (``validate``); what can still go wrong
(an image source that moved, a failing intervention) is raised as a one-line ``VitatlasError``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.store import ActivationStore
from ..dictionary import Dictionary, check_fitted_on, load
from ..errors import VitatlasError
from .cards import CardSet, best_description, best_label
from .image_view import ImageIndex, image_atoms, iter_image_atoms
from .images import ImageCache
from .matching import DECODER, behaviour_pairs, best_matches, choose_matching, matched_pairs
from .table import AtomTable, Query

METRIC_ROWS = 8192  # rows of the store used for the compare page's reconstruction metrics
BEHAVIOUR_IMAGES = 500  # images a behaviour match on the compare page uses (a fixed sample: one page visit
# encodes them with both runs, ~257 rows an image on patch stores)


@dataclass
class Run:
    name: str
    path: Path
    dictionary: Dictionary
    cards: CardSet
    table: AtomTable | None = None
    other: str | None = None          # the run this one's atoms are matched against
    match: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_atoms(self) -> int:
        return int(self.dictionary.n_atoms)

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "learner": self.dictionary.kind,
                "n_atoms": self.n_atoms, "d": int(self.dictionary.d), "other": self.other,
                "labels": self.table.labels if self.table else [], "cards": str(self.cards.path),
                "has_patch_values": "patch_values" in self.cards.top()}


class Explorer:
    """Runs (dictionaries + their atom cards) over one activation store, and an optional live model."""

    def __init__(self, runs: list[Run], store: ActivationStore, *, live=None):
        if not runs:
            raise VitatlasError("give at least one run to explore")
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise VitatlasError(f"two runs share the name {names}: pass run directories with different names")
        self.runs = {r.name: r for r in runs}
        self.run_names = names
        self.store = store
        self.images = ImageIndex(store)
        self.image_cache = ImageCache(store)
        self.live = live
        self._metrics: dict | None = None
        self._compared: dict[tuple[str, str, int], dict] = {}
        for r in runs:
            check_fitted_on(r.dictionary, store, subject=f"run {r.path}", verb="explore")
        if len(runs) >= 2:
            for i, r in enumerate(runs):
                other = runs[1] if i == 0 else runs[0]
                r.other = other.name
                # the atom page's match: decoder cosine only where it means something (see matching)
                if choose_matching(r.dictionary, other.dictionary)[0] == DECODER:
                    r.match = best_matches(r.dictionary.atoms, other.dictionary.atoms)
        for r in runs:
            r.table = AtomTable(r.cards.atoms, r.match)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def open(cls, run_dirs: list[str | Path], acts: str | Path, *, cards: list[str | Path] | None = None,
             model: str | None = None, probe: str | Path | None = None, cards_cache: str | Path | None = None,
             device: str = "cpu", progress: bool = True) -> Explorer:
        """Load runs, the store and the cards (made with ``vitatlas.interpret`` when not given)."""
        paths = [Path(p) for p in run_dirs]
        if cards is not None and len(cards) not in (0, len(paths)):
            raise VitatlasError(f"got {len(cards)} --cards directories for {len(paths)} runs: give one per run, "
                                "in the same order, or none")
        if probe is not None and model is None:
            raise VitatlasError("--probe needs --model: the probe reads the model's final tokens")
        store = ActivationStore(acts)
        names = _run_names(paths)
        runs = []
        for i, (name, path) in enumerate(zip(names, paths)):
            dictionary = load(path, device=device)
            card_dir = Path(cards[i]) if cards else make_cards(dictionary, store, path, cards_cache, progress)
            card_set = CardSet(card_dir)
            if card_set.n_atoms != dictionary.n_atoms:
                raise VitatlasError(f"the cards in {card_dir} describe {card_set.n_atoms} atoms but run {path} has "
                                    f"{dictionary.n_atoms}: pass the cards made for this run")
            check_cards_store(card_set, store)
            runs.append(Run(name, path, dictionary, card_set))
        live = None
        if model is not None:
            from ..models import load as load_model
            from .live import LiveIntervention

            head = None
            if probe is not None:
                from ..intervene.heads import LinearProbe

                head = LinearProbe.load(probe)
            vision_model = load_model(model, device=device)
            stored = (store.model or {}).get("name")
            if stored and stored != vision_model.name:
                raise VitatlasError(f"--model {model} is not the model of store {store.path} ({stored}): pass "
                                    f"--model {stored}")
            live = LiveIntervention(vision_model, head)
        return cls(runs, store, live=live)

    # ---- pages ----------------------------------------------------------------------------------
    def run(self, name: str | None) -> Run:
        return self.runs[name or self.run_names[0]]

    def meta(self) -> dict:
        """What every page needs to know: the runs, the store, whether live edits are possible."""
        return {"runs": [self.runs[n].describe() for n in self.run_names],
                "store": {"path": str(self.store.path), "n_images": self.images.n_images,
                          "tokens": self.store.tokens, "layer": self.store.layer,
                          "model": (self.store.model or {}).get("name"), "patch_grid": self.images.grid,
                          "class_names": self.store.class_names},
                "live": None if self.live is None else self.live.describe(),
                "max_slider": 10.0}

    def atoms(self, run: str | None, query: Query) -> dict:
        r = self.run(run)
        return {"run": r.name, **r.table.query(query)}

    def atom(self, run: str | None, atom_id: int) -> dict:
        """The atom page: its card, heatmap values, card files and its match in the other run."""
        r = self.run(run)
        card = dict(r.cards.atoms[atom_id])
        out = {"run": r.name, "n_atoms": r.n_atoms, "card": card, "label": best_label(card),
               "description": best_description(card), "files": r.cards.card_files(atom_id),
               "heatmaps": r.cards.patch_values(atom_id), "patch_grid": self.images.grid,
               "negative_heatmaps": r.cards.patch_values(atom_id, negative=True) if card.get("negative") else None}
        if r.match is not None:
            other = self.runs[r.other]
            m = int(r.match[0][atom_id])
            oc = other.cards.atoms[m]
            out["match"] = {"run": other.name, "atom": m, "cosine": round(float(r.match[1][atom_id]), 4),
                            "label": (best_label(oc) or {}).get("label"),
                            "description": (best_description(oc) or {}).get("text"),
                            "top_images": [t["image"] for t in (oc.get("top_images") or [])[:6]]}
        return out

    def image(self, run: str | None, image_id: int) -> dict:
        """The image page: patch grid and the atoms active on each token, for one run."""
        r = self.run(run)
        return self._image_page(r, image_id, image_atoms(self.images, r.dictionary, image_id))

    def image_pages(self, run: str | None, image_ids):
        """(image id, ``image`` page) for many images, encoded in batches (the static export)."""
        r = self.run(run)
        for image_id, data in iter_image_atoms(self.images, r.dictionary, image_ids):
            yield image_id, self._image_page(r, image_id, data)

    def _image_page(self, r: Run, image_id: int, data: dict) -> dict:
        labels = {}
        for a, _ in data["top_atoms"]:
            lab = best_label(r.cards.atoms[a])
            labels[a] = lab.get("label") if lab else None
        return {"run": r.name, "image": image_id, "label": self.images.label_of(image_id),
                "patch_grid": self.images.grid, "n_prefix": self.images.n_prefix,
                "max_activations": {str(a): r.cards.atoms[a].get("max_activation") for a in
                                    {a for t in data["tokens"] for a, _ in t["atoms"]} | set(labels)},
                "atom_labels": {str(a): v for a, v in labels.items()}, **data}

    def intervene(self, run: str | None, image_id: int, edits: list[dict], patches: list[int] | None) -> dict:
        if self.live is None:
            raise VitatlasError("live intervention needs a model: start the explorer with --model")
        r = self.run(run)
        image = self.image_cache.pil(image_id)
        return {"run": r.name, "image": image_id, "edits": edits,
                **self.live.run(r.dictionary, image, edits, r.cards.max_activations, patches, tokens=self.edit_tokens)}

    @property
    def edit_tokens(self) -> str:
        """The tokens a live edit changes when no patch is selected: those the store (and so the runs) hold."""
        return self.store.tokens if self.store.tokens in ("cls", "patches", "all") else "all"

    def compare(self, a: str | None = None, b: str | None = None, limit: int = 200) -> dict:
        """Two runs side by side: metrics on a fixed row sample, card statistics, matched atoms."""
        if len(self.run_names) < 2:
            raise VitatlasError("the compare page needs two runs: pass two run directories")
        ra = self.run(a)
        rb = self.runs[b] if b else self.runs[ra.other]
        if ra.name == rb.name:
            raise VitatlasError("compare two different runs")
        key = (ra.name, rb.name, limit)
        if key not in self._compared:  # two A x B cosine passes: worth keeping for the next visit
            self._compared[key] = self._compare(ra, rb, limit)
        return self._compared[key]

    def _compare(self, ra: Run, rb: Run, limit: int) -> dict:
        kind, why = choose_matching(ra.dictionary, rb.dictionary)
        if kind == DECODER:
            idx_ab, cos_ab = best_matches(ra.dictionary.atoms, rb.dictionary.atoms)
            idx_ba, _ = best_matches(rb.dictionary.atoms, ra.dictionary.atoms)
            pairs = matched_pairs(idx_ab, cos_ab, idx_ba, limit)
            extra = {"mutual_matches": int((idx_ba[idx_ab] == np.arange(idx_ab.size)).sum()),
                     "cosine_histogram": _hist(np.abs(cos_ab))}
            matching = {"kind": kind, "why": why, "score": "|cosine| of the decoder atoms"}
        else:
            from ..evaluation.compare import compare

            # both runs passed check_fitted_on against this store, so both encode it: match them on it
            c = compare(ra.dictionary, rb.dictionary, self.store, self.store, names=(ra.name, rb.name),
                        max_images=BEHAVIOUR_IMAGES if self.images.n_images > BEHAVIOUR_IMAGES else None,
                        progress=False)
            pairs = behaviour_pairs(c, limit)
            s = c.summary()
            extra = {"mutual_matches": s["mutual_pairs"], "cosine_histogram": None,
                     "score_histogram": _hist(c.matches[0].score[np.isfinite(c.matches[0].score)]),
                     "null_histogram": _hist(c.null[0][np.isfinite(c.null[0])]),
                     "null_threshold": s["null_threshold_a"], "shared_fraction_a": s["shared_fraction_a"],
                     "shared_fraction_b": s["shared_fraction_b"]}
            matching = {"kind": kind, "why": why, "n_images": c.alignment.n_images, "units": c.alignment.mode,
                        "score": f"|Pearson r| of the atoms' activations on {c.alignment.n_units} {c.alignment.mode} "
                                 f"of {c.alignment.n_images} images"}
        for p in pairs:
            for side, run in (("a", ra), ("b", rb)):
                if p[side] is None:
                    p[f"{side}_label"] = p[f"{side}_description"] = None
                    continue
                card = run.cards.atoms[p[side]]
                p[f"{side}_label"] = (best_label(card) or {}).get("label")
                p[f"{side}_description"] = (best_description(card) or {}).get("text")
        metrics = self.metrics()
        return {"a": ra.name, "b": rb.name, "metrics": {n: metrics[n] for n in (ra.name, rb.name)},
                "matching": matching, **extra, "pairs": pairs}

    def metrics(self) -> dict:
        """Per run: reconstruction metrics on a fixed sample of store rows, plus atom-card statistics."""
        if self._metrics is None:
            from ..evaluation.labels import confident_count
            from ..evaluation.metrics import reconstruction_metrics

            n = min(METRIC_ROWS, self.store.n_rows)
            rows = np.sort(np.random.default_rng(0).choice(self.store.n_rows, n, replace=False))
            X = self.store.rows(rows)
            self._metrics = {}
            for name in self.run_names:
                r = self.runs[name]
                # firing statistics of a row sample are not the run's (a rare atom looks dead in 8k rows):
                # those come from the cards, which saw the whole store
                m = {k: _clean(v) for k, v in reconstruction_metrics(r.dictionary, X).items()
                     if k not in ("dead_fraction", "dense_fraction")}
                freq = np.array([_f(a.get("frequency")) for a in r.cards.atoms])
                m["dead_fraction"] = _clean(np.mean(np.nan_to_num(freq) == 0))
                # the cards' labels follow evaluation.labels; the counts and means are its definitions too
                kappas = np.array([_f((best_label(a) or {}).get("kappa")) for a in r.cards.atoms])
                faith = np.array([_f((best_label(a) or {}).get("faithfulness")) for a in r.cards.atoms])
                spec = np.array([_f((best_label(a) or {}).get("specificity")) for a in r.cards.atoms])
                mean = lambda v: _clean(np.nanmean(v)) if np.isfinite(v).any() else None  # noqa: E731
                m.update({"rows_evaluated": int(n), "learner": r.dictionary.kind, "n_atoms": r.n_atoms,
                          "labelled_atoms": int(np.isfinite(kappas).sum()),
                          "atoms_kappa_over_0.5": confident_count(kappas),
                          "mean_kappa": mean(kappas), "mean_faithfulness": mean(faith),
                          "specificity": mean(spec)})
                self._metrics[name] = m
        return self._metrics

    def image_png(self, image_id: int) -> bytes:
        """PNG of a store image: the interpret pass's file when there is one, else rendered from the source."""
        for name in self.run_names:
            path = self.runs[name].cards.image_file(image_id)
            if path is not None:
                return path.read_bytes()
        return self.image_cache.png(image_id)


def check_cards_store(cards: CardSet, store: ActivationStore) -> None:
    """Refuse cards made on another store: their image ids would point at the wrong images."""
    made_on = cards.meta.get("store") or {}
    here = store.describe()
    for key in ("n_rows", "d", "model", "layer", "tokens", "data"):
        a, b = made_on.get(key), here.get(key)
        if a is not None and b is not None and a != b:
            raise VitatlasError(f"the cards in {cards.path} were made on a store with {key}={a!r}, but {store.path} "
                                f"has {key}={b!r}: pass the store the cards were made on, or make new cards")


def make_cards(dictionary: Dictionary, store: ActivationStore, run_dir: Path, cache: str | Path | None,
               progress: bool) -> Path:
    """Atom cards for a run made with ``vitatlas.interpret`` into a cache folder (reused when present)."""
    try:
        from ..interpret import interpret
    except ImportError:
        raise VitatlasError(f"no --cards given for {run_dir} and this vitatlas has no interpret module: make the "
                            "cards with `vitatlas interpret` and pass --cards") from None
    if cache is None:
        from platformdirs import user_cache_dir

        cache = Path(user_cache_dir("vitatlas")) / "explore-cards"
    key = hashlib.sha256(f"{Path(run_dir).resolve()}|{store.path.resolve()}".encode()).hexdigest()[:12]
    out = Path(cache) / f"{Path(run_dir).name}-{key}"
    if (out / "cards.json").is_file():
        try:
            from ..io import read_json

            if read_json(out / "cards.json").get("complete", True):
                return out
        except VitatlasError:
            pass
    if progress:
        print(f"making atom cards for {run_dir} into {out} (once; pass --cards to use your own)")
    interpret(dictionary, store, progress=progress, run_path=run_dir).save(out, progress=progress)
    return out


def _run_names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        base = p.resolve().name or "run"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _clean(v):
    v = float(v)
    return round(v, 5) if np.isfinite(v) else None


def _hist(values: np.ndarray, bins: int = 20) -> dict:
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 3) for e in edges], "counts": counts.tolist()}

