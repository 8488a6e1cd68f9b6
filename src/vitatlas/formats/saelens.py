"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``), v6 and the pre-6 flat config.

Tensors: W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in); jumprelu adds
``threshold`` (d_sae, linear); gated has b_gate, r_mag, b_mag instead of b_enc; matching_pursuit
has no encoder (tied to W_dec); batchtopk / matryoshka_batchtopk training checkpoints hold a scalar
``topk_threshold`` and run as the jumprelu SAELens saves for inference. The recipe of each
architecture is in docs/formats.md; ``export`` writes the same layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VitatlasError
from ..io import load_safetensors
from .options import ImportOptions, identity, layer_from_hook
from .recipe import ImportedSAE
from .tensors import Fields, config_int, finite_number, read_config

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "batchtopk", "matryoshka_batchtopk", "matching_pursuit")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                "activation_fn_str": "activation_fn"}


def _major(version) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def normalise_config(cfg: dict, where: str) -> dict:
    """A v6 config as SAELens reads it: a pre-6 flat config is upgraded as SAELens's
    handle_pre_6_0_config does (renamed keys, defaults, topk from activation_fn_kwargs)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    major = _major(version) if version else None
    if major is not None and major >= 6:
        return dict(cfg, metadata=meta)
    new = {PRE6_RENAMES.get(k, k): v for k, v in cfg.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    activation = new.get("activation_fn") or "relu"
    kwargs = new.get("activation_fn_kwargs") or {}
    if activation == "topk" and kwargs.get("k") is not None:
        new["architecture"], new["k"] = "topk", kwargs["k"]
    elif activation != "relu" and new["architecture"] == "standard":
        raise VitatlasError(f"{where}: activation_fn {activation!r} is not supported (only relu and topk): "
                            "re-save the SAE with SAELens 6")
    norm = new.get("normalize_activations")
    if isinstance(norm, bool):
        new["normalize_activations"] = "expected_average_only_in" if norm else "none"
    elif norm is None:
        new["normalize_activations"] = "none"
    new["metadata"] = {k: new[k] for k in ("model_name", "hook_name", "hook_layer", "context_size", "dataset_path")
                       if k in new}
    return new


def read(path: Path, options: ImportOptions) -> ImportedSAE:
    options.unused(("scaling_factor",), "SAELens")
    folder = path if path.is_dir() else path.parent
    cfg = normalise_config(read_config(folder / CFG, "SAELens config"), str(folder / CFG))
    tensors = load_safetensors(folder / WEIGHTS, what="SAELens weights")
    return from_config(cfg, tensors, options, str(folder / WEIGHTS), fmt="saelens")


def from_config(cfg: dict, tensors: dict[str, torch.Tensor], options: ImportOptions, where: str,
                fmt: str) -> ImportedSAE:
    """The recipe of one SAELens-style checkpoint (also ViT-Prisma's, whose tensors are the same)."""
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise VitatlasError(f"{where}: unknown SAELens architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMALIZATIONS:
        raise VitatlasError(f"{where}: normalize_activations {norm!r} is not supported (supported: "
                            f"{', '.join(NORMALIZATIONS)}); fold it into the weights with SAELens first")
    if cfg.get("finetuning_scaling_factor") and "scaling_factor" in tensors:
        raise VitatlasError(f"{where}: a finetuning scaling_factor is not supported: re-save the SAE with SAELens 6")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise VitatlasError(f"{where}: reshape_activations={cfg['reshape_activations']!r}: this SAE reads attention "
                            "head outputs, not the residual stream a vitatlas store holds")
    f = Fields({k: v for k, v in tensors.items() if k != "scaling_factor"}, where)
    d_in, d_sae = config_int(cfg, "d_in", where), config_int(cfg, "d_sae", where)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    training = arch in ("batchtopk", "matryoshka_batchtopk")  # checkpoints of SAELens's training classes
    if options.scaling_factor is not None and norm != "expected_average_only_in":
        raise VitatlasError(f"scaling-factor is only used with normalize_activations=expected_average_only_in, "
                            f"but {where} has {norm!r}: drop it")
    s = 1.0 if options.scaling_factor is None else finite_number(options.scaling_factor, "scaling-factor", positive=True)
    # the training configs default to rescaled pre-activations, the inference (topk) config does not
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", training)) and (arch == "topk" or training)
    # SAELens's fold_activation_norm_scaling_factor comes first: W_enc·s, W_dec/s, b_dec/s (see docs/formats.md)
    t = {"W_dec": f.take("W_dec", (d_sae, d_in)) / s, "b_dec": f.take("b_dec", (d_in,)) / s}
    opts: dict = {}
    if arch == "matching_pursuit":
        max_it = cfg.get("max_iterations")
        opts = {"residual_threshold": finite_number(cfg.get("residual_threshold", 1e-2), f"{where}: residual_threshold") / s,
                "max_iterations": None if max_it is None else config_int(cfg, "max_iterations", where),
                "stop_on_duplicate_support": bool(cfg.get("stop_on_duplicate_support", True))}
        # its W_enc is a view of W_dec, so the fold's W_enc·s and W_dec/s cancel: W_dec stays as saved
        t["W_dec"] = t["W_dec"] * s
        if not apply_b_dec:  # SAELens then neither centres the input nor adds b_dec to the output
            t["b_dec"] = torch.zeros_like(t["b_dec"])
        activation = "matching_pursuit"
    else:
        t["W_enc"] = f.take("W_enc", (d_in, d_sae)).T * s
        if arch == "gated":
            t.update(b_gate=f.take("b_gate", (d_sae,)), r_mag=f.take("r_mag", (d_sae,)),
                     b_mag=f.take("b_mag", (d_sae,)), b_enc=torch.zeros(d_sae, dtype=t["W_dec"].dtype))
            activation = "gated"
        else:
            t["b_enc"] = f.take("b_enc", (d_sae,))
            if arch == "standard":
                activation = "relu"
            elif arch == "topk":
                activation, opts = "topk", {"k": config_int(cfg, "k", where)}
            elif arch == "jumprelu":
                activation, t["threshold"] = "jumprelu", f.take("threshold", (d_sae,))
            else:  # what save_inference_model writes for BatchTopK: jumprelu, topk_threshold repeated
                activation = "jumprelu"
                threshold = f.scalar("topk_threshold") / (s if rescale else 1.0)
                t["threshold"] = torch.full((d_sae,), threshold, dtype=t["W_dec"].dtype)
            if rescale:
                # pre-activations are multiplied by ‖W_dec_i‖ and codes divided by it before decoding: the
                # same codes come from the folded weights (SAELens's _fold_norm_topk)
                norms = t["W_dec"].norm(dim=1)
                t["W_enc"], t["b_enc"] = t["W_enc"] * norms[:, None], t["b_enc"] * norms
                t["W_dec"] = t["W_dec"] / norms[:, None]
    scale = 1.0
    row_norm = norm if norm in ("constant_norm_rescale", "layer_norm") else "none"
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    layer = meta.get("hook_layer", cfg.get("hook_layer"))
    found = {"model": meta.get("model_name") or cfg.get("model_name"),
             "layer": layer if isinstance(layer, int) else layer_from_hook(hook)}
    ours = meta.get("vitatlas") if isinstance(meta.get("vitatlas"), dict) else {}
    found |= {k: ours[k] for k in ("model", "model_revision", "layer", "tokens") if ours.get(k) is not None}
    source = {"format": fmt, "architecture": arch, "file": where, "normalize_activations": norm,
              "apply_b_dec_to_input": apply_b_dec, "hook_name": hook, "model_name": found["model"]}
    if rescale:
        source["rescale_acts_by_decoder_norm"] = True
    if norm == "expected_average_only_in":
        source["scaling_factor"] = options.scaling_factor  # None: SAELens's load_from_disk applies none either
    sae = ImportedSAE(d_sae, activation, subtract_b_dec=apply_b_dec, row_norm=row_norm, scale=scale,
                      source=source, device=options.device, dtype=options.dtype, **opts)
    sae.set_tensors(t)
    sae.fit_info = identity(options, d_in, found)
    return sae
