"""Interventions inside the model: switch dictionary atoms off or on in a ViT's forward pass.

    vitatlas.intervene(model, dictionary, images, edits=[...])        # the function (this module is callable)
    with vitatlas.intervention(model, dictionary, layer, edits): ...  # the same edit as a context
    vitatlas.intervene.heads.LinearProbe                              # heads that read the effect

Modules: ``edits`` (the edit kernel: encode, change codes, decode, add the error term back), ``core``
(the function and the context manager), ``heads`` (linear probes), ``masks`` (patch labels),
``probes`` (probe training), ``maxact`` (max observed activations), ``protocol`` (the quantitative
segmentation and classification protocols with controls), ``report`` (intervene.json, report.md, plots).
"""

from __future__ import annotations

import sys
import types

from .core import InterventionResult, intervene, intervention
from .edits import Edit
from .heads import LinearProbe

__all__ = ["Edit", "InterventionResult", "LinearProbe", "intervene", "intervention"]


class _CallableModule(types.ModuleType):
    """``vitatlas.intervene`` is both this package and the function: calling it calls ``intervene``."""

    def __call__(self, *args, **kwargs):
        return intervene(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
