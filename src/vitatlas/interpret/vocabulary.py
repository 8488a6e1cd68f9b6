"""Concept vocabularies for text descriptions: phrase lists and the prompt they are embedded in.

A vocabulary file is plain UTF-8 text, one phrase a line; blank lines and lines starting with ``#``
are skipped, repeated phrases are kept once (first occurrence). The default vocabulary
(``data/vocabulary.txt``, about 3,200 visual nouns and attributes from WordNet 3.0, built by
``scripts/build_vocabulary.py``; WordNet's licence is in ``data/LICENSE-WORDNET``) is used when no
file is given.

Each phrase is embedded by the model's text tower inside ``PROMPT`` ("a photo of a {}."), CLIP's usual
zero-shot template: a bare word ("orange") is ambiguous, a photo of one is the image-side sense.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import VitatlasError

DEFAULT_VOCABULARY = Path(__file__).parent / "data" / "vocabulary.txt"
PROMPT = "a photo of a {}."


def load_vocabulary(path: str | os.PathLike | None = None) -> list[str]:
    """The phrases of a vocabulary file (the default vocabulary when ``path`` is None)."""
    file = DEFAULT_VOCABULARY if path is None else Path(path)
    if not file.is_file():
        raise VitatlasError(f"no vocabulary file at {file}: pass a text file with one phrase a line")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VitatlasError(f"vocabulary file {file} is not UTF-8 text: write one phrase a line") from None
    phrases = [line.strip() for line in text.splitlines()]
    phrases = list(dict.fromkeys(p for p in phrases if p and not p.startswith("#")))
    if not phrases:
        raise VitatlasError(f"vocabulary file {file} holds no phrases: write one phrase a line (# starts a comment)")
    return phrases


def prompts(phrases: list[str], template: str = PROMPT) -> list[str]:
    """Phrases in the prompt template the text tower sees."""
    if "{}" not in template:
        raise VitatlasError(f"prompt template {template!r} has no {{}} for the phrase")
    return [template.format(p) for p in phrases]
