"""What an import is told besides the checkpoint: the format's free parameters and what the SAE reads.

``ImportOptions`` carries the options that some formats need because the file does not hold them
(overcomplete's kind, k and BatchTopK threshold; saev's data normalisation; SAELens's dataset scaling
factor) and the identity of the activations the SAE reads (model, layer, tokens). ``identity`` turns
the latter, merged over the checkpoint's own metadata, into the ``fit_info`` that
``vitatlas.dictionary.check_fitted_on`` compares with a store, so a run of another model or width is
refused with the usual one-line error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import VitatlasError


@dataclass(frozen=True)
class ImportOptions:
    kind: str | None = None            # overcomplete: relu | topk | batchtopk | jump
    k: int | None = None               # overcomplete topk / batchtopk
    threshold: float | None = None     # overcomplete batchtopk (its running threshold is not saved)
    scale_mean: object = None          # saev: the dataset mean, a (d,) tensor or a file holding one
    scale_norm: object = None          # saev: the norm scalar (x / scalar), a number or a file holding one
    scaling_factor: float | None = None  # SAELens expected_average_only_in: the dataset's norm scaling factor
    model: str | None = None
    layer: int | None = None
    tokens: str | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def unused(self, allowed: tuple[str, ...], fmt: str) -> None:
        """A format-specific option given to a format that does not use it is a one-line error."""
        for name in ("kind", "k", "threshold", "scale_mean", "scale_norm", "scaling_factor"):
            if name not in allowed and getattr(self, name) is not None:
                raise VitatlasError(f"option {name.replace('_', '-')} is not used by the {fmt} format: drop it")


LAYER_PATTERNS = (r"blocks\.(\d+)\.", r"layers\.(\d+)", r"layer[._-]?(\d+)", r"^h\.(\d+)")


def layer_from_hook(hook: str | None) -> int | None:
    """The block index in a hook name such as ``blocks.9.hook_resid_post`` or ``layers.6``."""
    if not isinstance(hook, str):
        return None
    for pattern in LAYER_PATTERNS:
        m = re.search(pattern, hook)
        if m:
            return int(m.group(1))
    return None


def identity(options: ImportOptions, d: int, found: dict) -> dict:
    """fit_info for an imported SAE: the command line's model/layer/tokens over the checkpoint's own."""
    info = {"source": "store", "imported": True, "d": int(d)}
    for key in ("model", "model_revision", "layer", "tokens"):
        value = getattr(options, key, None)
        value = found.get(key) if value is None else value
        if value is not None:
            info[key] = value
    if "layer" in info and not isinstance(info["layer"], int):
        try:
            info["layer"] = int(info["layer"])
        except (TypeError, ValueError):
            raise VitatlasError(f"layer must be an integer block index, got {info['layer']!r}") from None
    return info
