"""Atom cards: what every atom of a dictionary means — top images and patches, heatmaps, statistics,
class labels and descriptions, for any learner through the ``Dictionary`` interface.

``vitatlas.interpret`` is this package *and* callable: ``vitatlas.interpret(dictionary, store, ...)``
is ``vitatlas.interpret.interpret(...)`` (see ``api``), while submodules stay importable as usual
(``vitatlas.interpret.images.load_images``). Modules: ``top_examples`` (the streaming pass),
``build`` (statistics, labels, nearest atoms), ``cards`` (``AtomCards`` and its files), ``images``
(images back from the store's source), ``render`` / ``render_cards`` (card PNGs), ``html``
(index.html), ``summary`` (the most specific atoms, for reports).
"""

from __future__ import annotations

import sys
import types

from .api import interpret
from .cards import AtomCards

__all__ = ["interpret", "AtomCards"]


class _CallableModule(types.ModuleType):
    """Lets ``vitatlas.interpret(...)`` call the function while the name stays the package."""

    def __call__(self, *args, **kwargs):
        return interpret(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
