"""dictionary_learning (``ae.pt`` state dict + ``config.json`` whose ``trainer.dict_class`` names the class).

* AutoEncoder: ``encoder.weight`` (F, d), ``encoder.bias``, ``decoder.weight`` (d, F) — transposed —,
  one shared ``bias`` (d). relu(encoder(x − bias)); decode decoder(f) + bias. As the library's
  ``AutoEncoder.from_pretrained`` does by default, decoder columns are normalised to unit norm and the
  encoder rows and bias multiplied by the old norms (same reconstruction, codes in unit-atom units).
* AutoEncoderTopK: same layout with ``b_dec``; the k largest of relu(encoder(x − b_dec)) (its default
  ``use_threshold=False``).
* BatchTopKSAE: same layout; relu(encoder(x − b_dec)) kept where it exceeds the scalar ``threshold``
  (its default ``use_threshold=True``; a threshold of −1, never estimated, keeps every positive value).
* MatryoshkaBatchTopKSAE: W_enc (d, F), b_enc, W_dec (F, d), b_dec, ``threshold``, ``group_sizes``;
  encoded as BatchTopKSAE (every group active).
* JumpReluAutoEncoder: W_enc (d, F), b_enc, W_dec (F, d), b_dec, per-latent ``threshold``;
  relu(pre · (pre > threshold)) with pre = x @ W_enc + b_enc (no b_dec subtraction).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VitatlasError
from .options import ImportOptions, identity
from .recipe import ImportedSAE
from .tensors import Fields, load_torch_state, read_config

CFG, WEIGHTS = "config.json", "ae.pt"
CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder")


def read(path: Path, options: ImportOptions) -> ImportedSAE:
    options.unused((), "dictionary_learning")
    folder = path if path.is_dir() else path.parent
    cfg = read_config(folder / CFG, "dictionary_learning config")
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    cls = trainer.get("dict_class")
    if cls not in CLASSES:
        raise VitatlasError(f"{folder / CFG}: unknown or missing trainer.dict_class {cls!r}; supported: {', '.join(CLASSES)}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise VitatlasError(f"dictionary_learning weights not found: {weights}")
    f = Fields(load_torch_state(weights, f"dictionary_learning weights {weights}"), str(weights))
    opts: dict = {}
    if cls in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        d, n = f.matrix("W_enc")
        t = {"W_enc": f.take("W_enc", (d, n)).T, "b_enc": f.take("b_enc", (n,)), "W_dec": f.take("W_dec", (n, d)),
             "b_dec": f.take("b_dec", (d,))}
        if cls == "JumpReluAutoEncoder":
            activation, subtract = "jumprelu", False
            t["threshold"] = f.take("threshold", (n,))
        else:
            activation, subtract = "jumprelu", True
            t["threshold"] = torch.full((n,), f.scalar("threshold"), dtype=torch.float64)
    else:
        n, d = f.matrix("encoder.weight")
        t = {"W_enc": f.take("encoder.weight", (n, d)), "b_enc": f.take("encoder.bias", (n,)),
             "W_dec": f.take("decoder.weight", (d, n)).T.contiguous()}
        subtract = True
        if cls == "AutoEncoder":
            t["b_dec"] = f.take("bias", (d,))
            norms = t["W_dec"].norm(dim=1)
            if not bool((norms > 0).all()):
                raise VitatlasError(f"tensor 'decoder.weight' in {weights} has a zero column: the checkpoint is damaged")
            # AutoEncoder.normalize_decoder, which from_pretrained runs, leaves norms allclose to 1 as they are
            if not torch.allclose(norms.float(), torch.ones_like(norms.float())):
                t["W_dec"] = t["W_dec"] / norms[:, None]
                t["W_enc"], t["b_enc"] = t["W_enc"] * norms[:, None], t["b_enc"] * norms
            activation = "relu"
        else:
            t["b_dec"] = f.take("b_dec", (d,))
            if cls == "AutoEncoderTopK":
                activation = "topk"
                opts["k"] = int(f.take("k").reshape(())) if f.has("k") else int(trainer.get("k", 0))
            else:
                activation = "jumprelu"
                t["threshold"] = torch.full((n,), f.scalar("threshold"), dtype=torch.float64)
    layer = trainer.get("layer")
    found = {"model": trainer.get("lm_name"), "layer": layer if isinstance(layer, int) else None}
    source = {"format": "dictionary_learning", "architecture": cls, "file": str(weights),
              "submodule_name": trainer.get("submodule_name")}
    sae = ImportedSAE(n, activation, subtract_b_dec=subtract, source=source, device=options.device,
                      dtype=options.dtype, **opts)
    sae.set_tensors(t)
    sae.fit_info = identity(options, d, found)
    return sae
