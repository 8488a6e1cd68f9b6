"""Write a vitatlas dictionary in another library's layout: SAELens or sparsify (``vitatlas export``).

A vitatlas SAE encodes c = act((s·x − b_dec) @ W_encᵀ + b_enc) / s (``s`` its input scale). Every
activation it has is positively homogeneous once its threshold is scaled too, so the same codes come
from an SAE on the raw x with b_dec/s, b_enc/s and threshold/s; decode c @ W_dec + b_dec/s is already
in that form. That is what is written, so the target library computes vitatlas's codes exactly:

* SAELens: relu -> ``standard``; topk (and Matryoshka over topk) -> ``topk``; jumprelu ->
  ``jumprelu`` with its per-latent threshold; batchtopk (and Matryoshka over batchtopk) -> ``jumprelu``
  with its one threshold repeated, as SAELens saves its own BatchTopK SAEs for inference.
* sparsify: topk SAEs only (relu(encoder(x − b_dec)) then the top k; W_dec in the encoder's orientation).
* SAELens ``matching_pursuit``: a DBK-SVD whose coder is non-negative matching pursuit on centred
  input (config ``coder="mp"``, ``nonnegative``, ``center``, no least-squares refit, no relative
  tolerance, ``mp_steps`` <= k so its cap of k atoms per sample never bites) with its atoms as the tied
  decoder and its centring bias ``b_dec`` as b_dec.

Anything else (an OMP encoder, signed codes, an imported SAE) is refused with a one-line reason.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..dictionary import Dictionary
from ..errors import VitatlasError
from ..io import atomic_save_safetensors, atomic_write_json
from . import sparsify
from .saelens import CFG, WEIGHTS

TARGETS = ("saelens", "sparsify")
SAELENS_LAYOUT_VERSION = "6.0.0"  # the v6 layout this writes: SAELens reads any 6.x folder as v6


def export(dictionary: Dictionary, fmt: str, out: str | Path) -> Path:
    """Write ``dictionary`` to folder ``out`` in format ``fmt`` (saelens | sparsify); returns ``out``."""
    if fmt not in TARGETS:
        raise VitatlasError(f"unknown export format {fmt!r}: use one of {', '.join(TARGETS)}")
    dictionary._check_fitted()
    out = Path(out)
    learner = dictionary.learner
    if learner == "sae":
        family, tensors, extra = _sae_in_raw_units(dictionary)
        if fmt == "sparsify":
            if family != "topk":
                raise VitatlasError(f"sparsify SAEs are TopK SAEs and this one is {_describe(dictionary)}: export it "
                                    "with --format saelens")
            return sparsify.write(out, {"encoder.weight": tensors["W_enc"], "encoder.bias": tensors["b_enc"],
                                        "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]},
                                  k=extra["k"], d=int(dictionary.d), n_latents=int(dictionary.n_atoms))
        arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[family]
        weights = {"W_enc": tensors["W_enc"].T.contiguous(), "b_enc": tensors["b_enc"], "W_dec": tensors["W_dec"],
                   "b_dec": tensors["b_dec"]}
        if family == "jumprelu":
            weights["threshold"] = tensors["threshold"]
        return _write_saelens(out, dictionary, arch, weights, {"k": extra["k"], "rescale_acts_by_decoder_norm": False}
                              if family == "topk" else {})
    if learner == "dbksvd":
        if fmt != "saelens":
            raise VitatlasError("a DBK-SVD dictionary codes by matching pursuit, which sparsify cannot express: export "
                                "it with --format saelens (when its coding is non-negative MP on centred input)")
        weights, cfg = _matching_pursuit(dictionary)
        return _write_saelens(out, dictionary, "matching_pursuit", weights, cfg)
    if learner == "imported":
        raise VitatlasError(f"this run was imported ({dictionary.source.get('format')} {dictionary.source.get('file')}): "
                            "export writes SAEs trained by vitatlas; the original checkpoint is the export")
    raise VitatlasError(f"a {learner} dictionary has signed codes and no SAE encoder: {fmt} cannot express it")


def _describe(sae) -> str:
    base = getattr(sae.config.activation, "base", None)
    return f"a {sae.family} SAE" + (f" over {base}" if base else "")


@torch.no_grad()
def _sae_in_raw_units(sae) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(target family, tensors on the raw input, extra options) of a vitatlas SAE (see the module docstring)."""
    p = {k: v.detach().double().cpu() for k, v in sae.params.items()}
    s = float(p["scale"])
    act = sae.config.activation
    family = act.family if act.family != "matryoshka" else act.base
    t = {"W_enc": p["W_enc"], "b_enc": p["b_enc"] / s, "W_dec": p["W_dec"], "b_dec": p["b_dec"] / s}
    extra: dict = {"k": getattr(act, "k", None)}
    if family == "jumprelu":
        t["threshold"] = p["log_threshold"].exp() / s
    elif family == "batchtopk":
        threshold = float(p["threshold"])
        if threshold < 0:
            raise VitatlasError("this BatchTopK SAE has no learned threshold yet (it was never fitted to the end): "
                                "fit it first")
        family, t["threshold"] = "jumprelu", torch.full((sae.n_atoms,), threshold / s, dtype=torch.float64)
    return family, {k: v.float() for k, v in t.items()}, extra


def _matching_pursuit(dbksvd) -> tuple[dict[str, torch.Tensor], dict]:
    """SAELens matching_pursuit tensors and config of a DBK-SVD whose coding is exactly that, or a refusal."""
    c = dbksvd.config
    coder = getattr(c, "coder", None)
    nonnegative, center = getattr(c, "nonnegative", False), getattr(c, "center", False)
    if coder != "mp" or not nonnegative or not center:
        raise VitatlasError(f"SAELens matching_pursuit is non-negative matching pursuit on x - b_dec; this DBK-SVD "
                            f"codes with coder={coder!r}, nonnegative={nonnegative}, center={center}: only "
                            "coder='mp' with nonnegative and center exports to it")
    if getattr(c, "refit", False):
        raise VitatlasError("this DBK-SVD refits its codes by least squares after matching pursuit, which SAELens "
                            "matching_pursuit does not do: fit it with refit=False to export it")
    if getattr(c, "tol", 0.0):
        raise VitatlasError(f"this DBK-SVD stops at a relative residual (tol={c.tol}) and SAELens matching_pursuit at an "
                            "absolute one: fit it with tol=0 to export it")
    bias = getattr(dbksvd, "b_dec", None)
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (dbksvd.d,):
        raise VitatlasError("this DBK-SVD does not expose its centring bias (a (d,) tensor `b_dec`): it cannot be exported")
    steps = getattr(c, "mp_steps", None) or 4 * int(c.k)
    if steps > int(c.k):
        raise VitatlasError(f"this DBK-SVD's matching pursuit runs {steps} steps but keeps at most k={c.k} atoms per "
                            "sample (later steps re-weight them), which SAELens matching_pursuit cannot express: fit it "
                            f"with mp_steps <= k to export it")
    weights = {"W_dec": dbksvd.atoms.detach().float().cpu().contiguous(), "b_dec": bias.detach().float().cpu()}
    # DBK-SVD's MP may take an atom again (its coefficients add) and stops only at its step count
    return weights, {"residual_threshold": 0.0, "max_iterations": steps, "stop_on_duplicate_support": False}


def _write_saelens(out: Path, dictionary, arch: str, weights: dict[str, torch.Tensor], arch_cfg: dict) -> Path:
    """cfg.json with the fields of SAELens 6's SAEConfig.to_dict() + sae_weights.safetensors."""
    info = getattr(dictionary, "fit_info", None) or {}
    layer = info.get("layer")
    metadata = {"sae_lens_version": SAELENS_LAYOUT_VERSION, "model_name": info.get("model"),
                "hook_name": f"blocks.{layer}.hook_resid_post" if isinstance(layer, int) else None,
                "vitatlas": {k: info.get(k) for k in ("model", "model_revision", "layer", "tokens", "data")
                             if info.get(k) is not None}}
    cfg = {"d_in": int(dictionary.d), "d_sae": int(dictionary.n_atoms), "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           **arch_cfg, "metadata": metadata, "architecture": arch}
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / WEIGHTS, {k: v.float().contiguous() for k, v in weights.items()})
    atomic_write_json(out / CFG, cfg)
    return out
