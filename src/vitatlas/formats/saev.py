"""saev ``sae.pt`` files: one JSON line (the config), then a torch state dict.

Tensors: W_enc (d_vit, d_sae), b_enc (d_sae), W_dec (d_sae, d_vit), b_dec (d_vit).
* No ``schema`` key (the paper-era checkpoints: the published CLIP, DINOv2 and BioCLIP SAEs, written by
  saev 0.1): ReLU of (x − b_dec) @ W_enc + b_enc, as that version's forward computes it.
* ``schema`` 1 or 2 (later saev): ``activation`` Relu / TopK / BatchTopK; encode is x @ W_enc + b_enc
  (no b_dec subtraction); TopK and BatchTopK both keep the ``top_k`` largest pre-activations of each
  row as they are (no ReLU), which is what saev's inference runs.
Decode: codes @ W_dec + b_dec. saev normalises its data outside the file, x_n = (x − mean) / scalar;
``scale_mean`` and ``scale_norm`` give them (a tensor or a .pt / .npy / .safetensors file holding it,
and a number or a file holding it), so that the SAE reads the model's raw activations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import VitatlasError
from ..io import load_safetensors
from .options import ImportOptions, identity
from .recipe import ImportedSAE
from .tensors import Fields, config_int, finite_number, load_torch_state, read_json_line

ACTIVATIONS = {"Relu": "relu", "TopK": "topk_signed", "BatchTopK": "topk_signed"}


def _activation(header: dict, where: str) -> tuple[str, dict, int | None]:
    """(activation class name, the config dict holding d_vit and exp_factor, top_k) from a saev header."""
    schema = header.get("schema")
    if schema is None:
        return "Relu", header, None
    if schema not in (1, 2):
        raise VitatlasError(f"{where}: unknown saev schema {schema!r} (known: none, 1, 2)")
    cfg = header.get("cfg")
    if not isinstance(cfg, dict):
        raise VitatlasError(f"{where}: saev schema {schema} header has no 'cfg' object")
    cls = header.get("cls", "SparseAutoencoderConfig")
    if cls in ACTIVATIONS:  # schema 1, format A: the class names the activation
        return cls, cfg, cfg.get("top_k", 32)
    act = cfg.get("activation") or {"cls": "Relu", "params": {}}
    if not isinstance(act, dict) or act.get("cls") not in ACTIVATIONS:
        raise VitatlasError(f"{where}: unknown saev activation {act!r} (known: {', '.join(ACTIVATIONS)})")
    return act["cls"], cfg, (act.get("params") or {}).get("top_k", 32)


def _tensor_from(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    path = Path(value)
    if not path.is_file():
        raise VitatlasError(f"{what} file not found: {path}")
    if path.suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as exc:
            raise VitatlasError(f"{what} {path} is not a plain .npy array ({exc})") from None
    if path.suffix == ".safetensors":
        tensors = load_safetensors(path, what=what)
        if len(tensors) != 1:
            raise VitatlasError(f"{what} {path} must hold exactly one tensor, it holds {len(tensors)}")
        return next(iter(tensors.values()))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle, zip and format errors alike: the file is refused)
        raise VitatlasError(f"{what} {path} is not a tensor file torch.load(weights_only=True) can read "
                            f"({type(exc).__name__}): save it with torch.save(tensor, path)") from None
    if not isinstance(loaded, torch.Tensor):
        raise VitatlasError(f"{what} {path} does not hold a tensor")
    return loaded


def read(path: Path, options: ImportOptions) -> ImportedSAE:
    options.unused(("scale_mean", "scale_norm"), "saev")
    where = str(path)
    header, rest = read_json_line(path)
    cls, cfg, top_k = _activation(header, where)
    d = config_int(cfg, "d_vit", where, 1024)
    n = d * config_int(cfg, "exp_factor", where, 16)
    f = Fields(load_torch_state(rest, f"saev state dict in {path}"), where)
    t = {"W_enc": f.take("W_enc", (d, n)).T, "b_enc": f.take("b_enc", (n,)),
         "W_dec": f.take("W_dec", (n, d)), "b_dec": f.take("b_dec", (d,))}
    scale = 1.0
    if options.scale_mean is not None:
        mean = _tensor_from(options.scale_mean, "scale-mean").double().reshape(-1)
        if mean.shape != (d,) or not bool(torch.isfinite(mean).all()):
            raise VitatlasError(f"scale-mean must be {d} finite numbers (the SAE's width), got shape {tuple(mean.shape)}")
        t["shift"] = mean
    if options.scale_norm is not None:
        value = options.scale_norm
        if not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = _tensor_from(value, "scale-norm")
                if value.numel() != 1:
                    raise VitatlasError(f"scale-norm must hold one number, it has shape {tuple(value.shape)}") from None
                value = float(value.reshape(()))
        scale = finite_number(value, "scale-norm", positive=True)
    activation = ACTIVATIONS[cls]
    source = {"format": "saev", "schema": header.get("schema"), "activation": cls, "file": where,
              "scale_mean": None if options.scale_mean is None else str(options.scale_mean)[:200],
              "scale_norm": scale}
    sae = ImportedSAE(n, activation, k=top_k if activation == "topk_signed" else None,
                      subtract_b_dec=header.get("schema") is None, scale=scale, source=source,
                      device=options.device, dtype=options.dtype)
    sae.set_tensors(t)
    sae.fit_info = identity(options, d, {})
    return sae
