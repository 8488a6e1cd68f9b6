"""Sparse autoencoders: the ``SAE`` dictionary (``learner``) and the parts it is made of.

``config`` (the option dataclasses), ``model`` (the parameters as a torch module), ``objectives`` (one
loss per family), ``kernels`` (sparse TopK decoding), ``train`` (the sweep trainer, which knows an SAE
only through its configs and ``attach``). The public names are re-exported here.
"""

from .config import (
    DEFAULT_L1,
    KINDS,
    SPARSE_KINDS,
    OptimConfig,
    SAEConfig,
    TrainConfig,
    flat_options,
    sae_options,
    upgrade_saved_options,
)
from .learner import SAE
from .train import SAESweep, fit_many

__all__ = ["DEFAULT_L1", "KINDS", "SPARSE_KINDS", "OptimConfig", "SAE", "SAEConfig", "SAESweep", "TrainConfig",
           "fit_many", "flat_options", "sae_options", "upgrade_saved_options"]
