"""``vitatlas.intervene`` and ``vitatlas.intervention``: edit atoms inside a ViT's forward pass.

    >>> result = vitatlas.intervene(model, dictionary, images, edits=[{"atom": 17, "value": -2}])  # doctest: +SKIP
    >>> result.before.shape, result.after.shape     # final normed tokens (B, T, d)           # doctest: +SKIP
    >>> with vitatlas.intervention(model, dictionary, 8, [Edit(17, "ablate")]) as run:     # doctest: +SKIP
    ...     final = run.forward(images)

The function runs the model to layer L once, edits a copy of the residual stream (see ``edits``) and
runs the rest of the network twice (``forward_from``): unedited (``before``) and edited (``after``), in
batches, on the model's device. The context manager puts the same edit in a forward hook on block L,
so every pass through the model inside the ``with`` (``model.residual_streams``, ``forward_from`` from
an earlier layer, the wrapped transformers module itself) is edited.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..dictionary import Dictionary
from ..errors import VitatlasError
from ..models.base import VisionModel
from .edits import Edit, as_edits, as_max_activations, check_edits, edit_rows
from .heads import LinearProbe

TOKENS = ("all", "cls", "patches")


@dataclass
class InterventionResult:
    """What ``intervene`` returns. Token tensors are (B, T, d) on the CPU; codes (B, T, A) are the
    codes at the layer (zeros at tokens that were not edited, see ``token_mask``)."""

    before: torch.Tensor
    after: torch.Tensor
    codes: torch.Tensor
    edited_codes: torch.Tensor
    token_mask: torch.Tensor
    layer: int
    before_probs: torch.Tensor | None = None
    after_probs: torch.Tensor | None = None
    edits: list[Edit] = field(default_factory=list)

    @property
    def changed(self) -> torch.Tensor | None:
        """Where the head's prediction changed: (B,) for classification, (B, P) for segmentation."""
        if self.before_probs is None or self.after_probs is None:
            return None
        return self.before_probs.argmax(-1) != self.after_probs.argmax(-1)


# ---- argument checks shared by the function, the context and the protocols ------------------------

def resolve_layer(model: VisionModel, dictionary: Dictionary, layer: int | None) -> int:
    """The layer to edit: the dictionary's fit layer by default; any other layer is refused."""
    info = getattr(dictionary, "fit_info", None) or {}
    fit_layer = info.get("layer")
    if dictionary.d is not None and dictionary.d != model.width:
        raise VitatlasError(f"the dictionary has width {dictionary.d} but {model.name} has width {model.width}: "
                            "use the model the dictionary was fitted on")
    fit_model = info.get("model")
    if fit_model is not None and fit_model != model.name:
        raise VitatlasError(f"the dictionary was fitted on activations of {fit_model}, not {model.name}: "
                            f"load {fit_model}")
    if layer is None:
        if fit_layer is None:
            raise VitatlasError("the dictionary does not record the layer it was fitted on (fitted on an array): "
                                "pass layer=...")
        return model.resolve_layer(int(fit_layer))
    resolved = model.resolve_layer(layer)
    if fit_layer is not None and model.resolve_layer(int(fit_layer)) != resolved:
        raise VitatlasError(f"the dictionary was fitted on layer {fit_layer}, not layer {layer}: edit layer "
                            f"{fit_layer} (or fit a dictionary on layer {layer})")
    return resolved


def token_mask(model: VisionModel, batch: int, n_tokens: int, tokens: str = "all",
               patch_mask: Any = None) -> torch.Tensor:
    """(B, T) bool: the tokens to edit. ``patch_mask`` (B, P) or (P,) bool over patch tokens wins over
    ``tokens``."""
    prefix = model.n_prefix_tokens
    mask = torch.zeros(batch, n_tokens, dtype=torch.bool)
    if patch_mask is not None:
        pm = torch.as_tensor(np.asarray(patch_mask.cpu() if isinstance(patch_mask, torch.Tensor) else patch_mask))
        if pm.dtype != torch.bool:
            raise VitatlasError(f"patch_mask must be boolean, got dtype {pm.dtype}")
        if pm.ndim == 1:
            pm = pm.expand(batch, -1)
        if pm.ndim != 2 or pm.shape != (batch, n_tokens - prefix):
            raise VitatlasError(f"patch_mask must have shape ({batch}, {n_tokens - prefix}) (images, patches) "
                                f"or ({n_tokens - prefix},), got {tuple(pm.shape)}")
        mask[:, prefix:] = pm
        return mask
    if tokens not in TOKENS:
        raise VitatlasError(f"unknown tokens {tokens!r}: use one of {', '.join(TOKENS)} or a patch_mask")
    if tokens == "all":
        mask[:] = True
    elif tokens == "patches":
        mask[:, prefix:] = True
    else:
        if prefix == 0:
            raise VitatlasError(f"{model.name} has no CLS token: use tokens='patches' or 'all'")
        mask[:, 0] = True
    return mask


def as_pixels(model: VisionModel, images: Any) -> torch.Tensor:
    """A list of PIL images (or one) -> preprocessed pixels; a (B, 3, H, W) tensor passes through."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise VitatlasError(f"pixels must have shape (B, 3, H, W), got {tuple(images.shape)}")
        return images
    if isinstance(images, (list, tuple)):
        if not images:
            raise VitatlasError("no images given: pass at least one PIL image")
        return model.preprocess(list(images))
    raise VitatlasError(f"images must be PIL images or a (B, 3, H, W) pixel tensor, got {type(images).__name__}")


def edit_hidden(hidden: torch.Tensor, mask: torch.Tensor, dictionary: Dictionary, edits: Sequence[Edit],
                max_activations: torch.Tensor | None, direction: torch.Tensor | None = None,
                codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edit the tokens ``mask`` (B, T) of ``hidden`` (B, T, d). Returns (hidden', codes, edited codes),
    the codes as (n_masked, A) rows in mask order; ``codes`` may be given when already computed."""
    mask = mask.to(hidden.device)
    rows = hidden[mask]
    out = hidden.clone()
    if rows.shape[0] == 0:
        empty = torch.zeros(0, dictionary.n_atoms)
        return out, empty, empty
    new_rows, codes, edited = edit_rows(rows, dictionary, edits, max_activations, direction=direction, codes=codes)
    out[mask] = new_rows
    return out, codes, edited


def _dense_codes(mask: torch.Tensor, rows: torch.Tensor, n_atoms: int) -> torch.Tensor:
    out = torch.zeros(*mask.shape, n_atoms)
    out[mask] = rows.float().cpu()
    return out


def _check_dictionary(dictionary: Any) -> None:
    if not isinstance(dictionary, Dictionary):
        raise VitatlasError("dictionary must be a vitatlas Dictionary (vitatlas.load(run_dir)), "
                            f"got {type(dictionary).__name__}")
    dictionary._check_fitted()


# ---- the function -------------------------------------------------------------------------------

@torch.no_grad()
def intervene(model: VisionModel, dictionary: Dictionary, images: Any, *, layer: int | None = None,
              edits: Any = (), tokens: str = "all", patch_mask: Any = None, max_activations: Any = None,
              head: LinearProbe | None = None, batch_size: int = 32) -> InterventionResult:
    """Edit atoms of ``dictionary`` at ``layer`` for ``images`` and return final tokens before and after.

    images: PIL images or a (B, 3, H, W) pixel tensor. edits: ``Edit`` objects or dicts
    (``{"atom": 3, "value": 0}`` clamps atom 3 to 0 × its max activation). tokens: ``"all"``, ``"cls"``
    or ``"patches"``; ``patch_mask`` (B, P) bool picks patches per image instead. max_activations:
    (A,) each atom's max observed activation (needed for relative clamp/add). head: a ``LinearProbe``
    to read the effect (``before_probs`` / ``after_probs``).
    """
    _check_dictionary(dictionary)
    edit_list = as_edits(edits)
    max_acts = as_max_activations(max_activations, dictionary.n_atoms)
    check_edits(edit_list, dictionary.n_atoms, max_acts)
    layer = resolve_layer(model, dictionary, layer)
    if head is not None:
        head.check_model(model)
    if batch_size <= 0:
        raise VitatlasError(f"batch_size must be positive, got {batch_size}")
    pixels = as_pixels(model, images)
    n = pixels.shape[0]
    if patch_mask is not None and not (np.ndim(patch_mask) == 1):
        if len(patch_mask) != n:
            raise VitatlasError(f"patch_mask has {len(patch_mask)} rows but {n} images were given")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("before", "after", "codes", "edited", "mask", "bp", "ap")}
    for start in range(0, n, batch_size):
        px = pixels[start:start + batch_size]
        hidden = model.residual_streams(px, [layer])[layer]
        b, t, _ = hidden.shape
        pm = patch_mask if patch_mask is None or np.ndim(patch_mask) == 1 else patch_mask[start:start + b]
        mask = token_mask(model, b, t, tokens, pm)
        edited_hidden, codes, edited = edit_hidden(hidden, mask, dictionary, edit_list, max_acts)
        before = model.forward_from(layer, hidden)
        after = model.forward_from(layer, edited_hidden)
        parts["before"].append(before.float().cpu())
        parts["after"].append(after.float().cpu())
        parts["codes"].append(_dense_codes(mask, codes, dictionary.n_atoms))
        parts["edited"].append(_dense_codes(mask, edited, dictionary.n_atoms))
        parts["mask"].append(mask)
        if head is not None:
            parts["bp"].append(head.predict_proba(before).cpu())
            parts["ap"].append(head.predict_proba(after).cpu())
    cat = lambda k: torch.cat(parts[k]) if parts[k] else None  # noqa: E731
    return InterventionResult(before=cat("before"), after=cat("after"), codes=cat("codes"),
                              edited_codes=cat("edited"), token_mask=cat("mask"), layer=layer,
                              before_probs=cat("bp"), after_probs=cat("ap"), edits=edit_list)


# ---- the context manager --------------------------------------------------------------------------

@dataclass
class ActiveIntervention:
    """Handle yielded by ``intervention``: ``forward(images)`` runs the whole (edited) model."""

    model: VisionModel
    layer: int
    calls: int = 0

    @torch.no_grad()
    def forward(self, images: Any) -> torch.Tensor:
        """Final normed tokens (B, T, d) of the edited model."""
        hidden = self.model.residual_streams(as_pixels(self.model, images), [self.layer])[self.layer]
        return self.model.forward_from(self.layer, hidden)


def _block_module(model: VisionModel, layer: int) -> torch.nn.Module:
    blocks = getattr(model, "_blocks", None)
    if blocks is None:
        raise VitatlasError(f"{type(model).__name__} does not expose its blocks: use vitatlas.intervene(...) instead")
    return blocks[layer]


@contextmanager
def intervention(model: VisionModel, dictionary: Dictionary, layer: int | None = None, edits: Any = (), *,
                 tokens: str = "all", patch_mask: Any = None, max_activations: Any = None,
                 ) -> Iterator[ActiveIntervention]:
    """Within the ``with`` block, every forward pass of ``model`` through block ``layer`` is edited."""
    _check_dictionary(dictionary)
    edit_list = as_edits(edits)
    max_acts = as_max_activations(max_activations, dictionary.n_atoms)
    check_edits(edit_list, dictionary.n_atoms, max_acts)
    layer = resolve_layer(model, dictionary, layer)
    handle = ActiveIntervention(model, layer)

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mask = token_mask(model, hidden.shape[0], hidden.shape[1], tokens, patch_mask)
        new_hidden, _, _ = edit_hidden(hidden, mask, dictionary, edit_list, max_acts)
        handle.calls += 1
        return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden

    removable = _block_module(model, layer).register_forward_hook(hook)
    try:
        yield handle
    finally:
        removable.remove()
