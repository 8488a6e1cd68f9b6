"""Whether two dictionaries live in one activation space, where decoder cosine means something.

Atoms of a layer-4 dictionary and of a layer-8 one are vectors of two different spaces (even at the
same width): their cosine is a number without a meaning. Only behaviour (``behaviour``) compares them.
"""

from __future__ import annotations

from ...dictionary import STORE_IDENTITY_KEYS, Dictionary


def decoder_space_mismatch(a: Dictionary, b: Dictionary) -> str | None:
    """Why decoder cosine cannot compare ``a`` and ``b`` (one line), or None when both are of one space:
    the same width and, where both were fitted on stores, the same model, revision, layer and tokens."""
    if a.d != b.d:
        return f"the dictionaries have different widths ({a.d} and {b.d})"
    fa, fb = getattr(a, "fit_info", None) or {}, getattr(b, "fit_info", None) or {}
    if fa.get("source") != "store" or fb.get("source") != "store":
        return None  # fitted on arrays: nothing recorded says the spaces differ
    words = {"model": "models", "model_revision": "model revisions", "layer": "layers", "tokens": "token kinds"}
    for key in STORE_IDENTITY_KEYS:
        va, vb = fa.get(key), fb.get(key)
        if va is not None and vb is not None and va != vb:
            return f"the dictionaries were fitted on different {words.get(key, key)} ({va!r} and {vb!r})"
    return None
