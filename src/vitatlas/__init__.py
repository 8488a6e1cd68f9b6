"""vitatlas: find the concepts inside vision transformers.

Record a ViT's activations, learn an overcomplete sparse dictionary of them (Double-Batch K-SVD or a
sparse autoencoder), and inspect, label, evaluate and intervene on every atom.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .arrays import SparseCodes
from .data.store import ActivationStore
from .dictionary import Dictionary
from .errors import VitatlasError
from .formats import load  # a vitatlas run or another library's SAE (formats/__init__)

__all__ = ["ActivationStore", "Dictionary", "SparseCodes", "VitatlasError", "load", "DBKSVD", "SAE", "evaluate", "interpret", "intervene", "intervention"]


def __getattr__(name: str):
    # Learners and evaluation import lazily so `import vitatlas` stays light.
    if name == "DBKSVD":
        from .learners.dbksvd import DBKSVD
        return DBKSVD
    if name == "SAE":
        from .learners.sae import SAE
        return SAE
    if name == "evaluate":
        from .evaluation import evaluate
        return evaluate
    if name == "interpret":  # the package, callable: vitatlas.interpret(dictionary, store, ...)
        import importlib  # not `from . import interpret`: that asks this __getattr__ again
        return importlib.import_module(".interpret", __name__)
    if name == "intervene":  # the package, callable: vitatlas.intervene(model, dictionary, images, ...)
        import importlib  # not `from . import intervene`: that asks this __getattr__ again (recursion)
        return importlib.import_module(f"{__name__}.intervene")
    if name == "intervention":
        from .intervene import intervention
        return intervention
    raise AttributeError(f"module 'vitatlas' has no attribute {name!r}")
