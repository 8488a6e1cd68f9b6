"""overcomplete SAEs: a bare state dict, so ``kind`` (and ``k``, a BatchTopK ``threshold``) come as options.

Tensors (the default linear encoder): ``encoder.final_block.0.weight`` (F, d), ``encoder.final_block.0.bias``
(F), ``dictionary._weights`` (F, d), ``dictionary.multiplier`` (scalar; absent or 0 when unused).
codes = relu(encoder(x)) (no centring), then: relu — as is; topk — the k largest per row; batchtopk —
kept where ≥ threshold (the running threshold is not saved: give it); jump — kept where
≥ exp(``thresholds``). Decoder (what eval mode fuses): the rows of ``_weights`` divided by
(‖row‖ + 1e-8), times exp(multiplier); there is no decoder bias.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import VitatlasError
from .options import ImportOptions, identity
from .recipe import ImportedSAE
from .tensors import Fields, finite_number, load_weights

KINDS = ("relu", "topk", "batchtopk", "jump")
PREFIX = "encoder.final_block.0."


def read(path: Path, options: ImportOptions) -> ImportedSAE:
    options.unused(("kind", "k", "threshold"), "overcomplete")
    kind = options.kind
    if kind not in KINDS:
        raise VitatlasError(f"an overcomplete state dict does not say its kind: give --kind {'|'.join(KINDS)}"
                            + (f" (got {kind!r})" if kind else ""))
    if path.is_dir():
        raise VitatlasError(f"{path} is a folder: give the overcomplete state dict file itself")
    tensors = load_weights(path, "overcomplete state dict")
    f = Fields(tensors, str(path))
    if not f.has(PREFIX + "weight"):
        extra = sorted(k for k in tensors if k.startswith("encoder."))[:4]
        raise VitatlasError(f"{path} has no tensor '{PREFIX}weight' (encoder tensors: {extra or 'none'}): only the "
                            "default linear encoder is supported")
    n, d = f.matrix(PREFIX + "weight")
    others = sorted(k for k in tensors if k.startswith("encoder.") and not k.startswith(PREFIX))
    if others:
        raise VitatlasError(f"{path} has encoder tensors {others[:4]} beyond one linear layer: only the default linear "
                            "encoder is supported")
    w = f.take("dictionary._weights", (n, d))
    mult = f.scalar("dictionary.multiplier") if f.has("dictionary.multiplier") else 0.0
    W_dec = w / (w.norm(dim=1, keepdim=True) + 1e-8) * math.exp(mult)
    t = {"W_enc": f.take(PREFIX + "weight", (n, d)), "b_enc": f.take(PREFIX + "bias", (n,)), "W_dec": W_dec,
         "b_dec": torch.zeros(d, dtype=W_dec.dtype)}
    opts: dict = {}
    if kind == "topk":
        if options.k is None:
            raise VitatlasError("an overcomplete topk SAE needs --k (its top_k is not in the state dict)")
        activation, opts["k"] = "topk", int(options.k)
    elif kind == "batchtopk":
        if options.threshold is None:
            raise VitatlasError("an overcomplete batchtopk SAE needs --threshold: its running threshold is an attribute, "
                                "not saved in the state dict (read sae.running_threshold in overcomplete)")
        activation = "jumprelu"
        t["threshold"] = torch.full((n,), finite_number(options.threshold, "threshold"), dtype=W_dec.dtype)
    elif kind == "jump":
        activation = "jumprelu"
        t["threshold"] = f.take("thresholds", (n,)).exp()
    else:
        activation = "relu"
    if options.k is not None and kind != "topk":
        raise VitatlasError(f"--k is not used by an overcomplete {kind} SAE: drop it")
    if options.threshold is not None and kind != "batchtopk":
        raise VitatlasError(f"--threshold is not used by an overcomplete {kind} SAE: drop it")
    source = {"format": "overcomplete", "architecture": kind, "file": str(path), "multiplier": mult}
    sae = ImportedSAE(n, activation, subtract_b_dec=False, inclusive=True, source=source, device=options.device,
                      dtype=options.dtype, **opts)
    sae.set_tensors(t)
    sae.fit_info = identity(options, d, {})
    return sae
