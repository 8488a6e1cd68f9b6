"""EleutherAI sparsify checkpoints: one folder per hookpoint with ``cfg.json`` + ``sae.safetensors``.

Tensors: ``encoder.weight`` (F, d), ``encoder.bias`` (F), ``W_dec`` (F, d) — the encoder's orientation —,
``b_dec`` (d), optional ``W_skip`` (d, d). Encode: relu(encoder(x − b_dec)), then the k largest per row
(``activation: topk``) or the maximum of each of k equal groups (``groupmax``). Decode: codes @ W_dec + b_dec,
plus x @ W_skipᵀ when the skip connection is there. Transcoders (``transcode: true``) predict another
layer and are refused. ``write`` is the exporter's side of the same layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VitatlasError
from ..io import atomic_save_safetensors, atomic_write_json, load_safetensors
from .options import ImportOptions, identity, layer_from_hook
from .recipe import ImportedSAE
from .tensors import Fields, config_int, read_config

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def read(path: Path, options: ImportOptions) -> ImportedSAE:
    options.unused((), "sparsify")
    folder = path if path.is_dir() else path.parent
    where = str(folder / CFG)
    cfg = read_config(folder / CFG, "sparsify config")
    if cfg.get("transcode"):
        raise VitatlasError(f"{where} is a transcoder (transcode: true): it predicts another layer's output and is not "
                            "a dictionary of its input")
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise VitatlasError(f"{where}: unknown sparsify activation {activation!r} (topk or groupmax)")
    f = Fields(load_safetensors(folder / WEIGHTS, what="sparsify weights"), str(folder / WEIGHTS))
    n, d = f.matrix("encoder.weight")
    if "d_in" in cfg and config_int(cfg, "d_in", where) != d:
        raise VitatlasError(f"tensor 'encoder.weight' in {folder / WEIGHTS} has width {d} but {where} says d_in={cfg['d_in']}")
    t = {"W_enc": f.take("encoder.weight", (n, d)), "b_enc": f.take("encoder.bias", (n,)),
         "W_dec": f.take("W_dec", (n, d)), "b_dec": f.take("b_dec", (d,))}
    if cfg.get("skip_connection") or f.has("W_skip"):
        t["W_skip"] = f.take("W_skip", (d, d))
    source = {"format": "sparsify", "architecture": activation, "file": str(folder / WEIGHTS),
              "hookpoint": folder.name}
    sae = ImportedSAE(n, activation, k=config_int(cfg, "k", where, 32), subtract_b_dec=True, source=source,
                      device=options.device, dtype=options.dtype)
    sae.set_tensors(t)
    sae.fit_info = identity(options, d, {"layer": layer_from_hook(folder.name)})
    return sae


def write(out: Path, tensors: dict[str, torch.Tensor], *, k: int, d: int, n_latents: int) -> Path:
    """A sparsify folder with SparseCoder.save_to_disk's fields (cfg.json, then d_in)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / WEIGHTS, tensors)
    atomic_write_json(out / CFG, {"activation": "topk", "expansion_factor": max(1, n_latents // d),
                                  "normalize_decoder": True, "num_latents": n_latents, "k": k,
                                  "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d})
    return out
