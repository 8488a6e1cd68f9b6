"""ViT-Prisma SAEs (``weights.pt`` + ``config.json``): SAELens-style tensors, ViT-Prisma's own config.

Tensors: W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec, in a plain torch state dict.
ViT-Prisma's ``SparseAutoencoder.forward`` always subtracts b_dec before encoding and applies
``activation_fn_str`` (relu, or topk with ``activation_fn_kwargs.k``: the k largest, then relu).
Its run-time normalisations compute a normalised input but encode the raw one, so there is no single
recipe to reproduce for them: a config with normalize_activations other than none is refused.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import VitatlasError
from .options import ImportOptions
from .recipe import ImportedSAE
from .saelens import from_config
from .tensors import config_int, load_torch_state, read_config

CFG, WEIGHTS = "config.json", "weights.pt"


def read(path: Path, options: ImportOptions) -> ImportedSAE:
    options.unused((), "ViT-Prisma")
    folder = path if path.is_dir() else path.parent
    where = str(folder / CFG)
    cfg = read_config(folder / CFG, "ViT-Prisma config")
    if not (folder / WEIGHTS).is_file():
        raise VitatlasError(f"ViT-Prisma weights not found: {folder / WEIGHTS}")
    tensors = load_torch_state(folder / WEIGHTS, f"ViT-Prisma weights {folder / WEIGHTS}")
    d_in = config_int(cfg, "d_in", where)
    d_sae = cfg.get("d_sae") or d_in * config_int(cfg, "expansion_factor", where)
    activation = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if activation == "topk":
        arch, extra = "topk", {"k": kwargs.get("k")}
    elif activation == "relu":
        arch, extra = "standard", {}
    else:
        raise VitatlasError(f"{where}: activation_fn_str {activation!r} is not supported (relu or topk)")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", False):
        raise VitatlasError(f"{where}: normalize_activations={norm!r} is not supported for ViT-Prisma SAEs (its forward "
                            "normalises the input but encodes the raw one): use an SAE trained without it")
    layer = cfg.get("hook_point_layer")
    if isinstance(layer, list) and len(layer) == 1:
        layer = layer[0]
    saelens_cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": True,
                   "normalize_activations": "none", **extra,
                   "metadata": {"model_name": cfg.get("model_name"), "hook_name": cfg.get("hook_point"),
                                **({"hook_layer": layer} if isinstance(layer, int) else {})}}
    return from_config(saelens_cfg, tensors, options, str(folder / WEIGHTS), fmt="prisma")
