"""Adapters for Hugging Face ``transformers`` ViTs: CLIP, SigLIP, DINOv2 (with or without registers), ViT.

All four families are pre-norm transformers: ``embed -> block_0 .. block_{L-1} -> final norm``. The adapter
keeps handles on those three parts and runs the blocks itself, which gives the residual stream after any
block (stopping early) and lets interventions restart the network from any block.

What "final norm" means per family (the output of ``forward_from``):
- CLIP: ``post_layernorm`` applied to *every* token. transformers only applies it to the CLS token
  (``pooler_output``); row 0 of our output equals that pooler output. ``pre_layrnorm`` belongs to the
  embedding step, so layer i is still exactly ``hidden_states[i + 1]``.
- SigLIP: ``post_layernorm`` (the model's own ``last_hidden_state``). SigLIP has no CLS token
  (``n_prefix_tokens = 0``); ``token_positions("cls")`` raises a VitatlasError rather than inventing one.
- DINOv2 / ViT: ``layernorm`` (the model's own ``last_hidden_state``). DINOv2 with registers has
  ``1 + num_register_tokens`` prefix tokens (CLS first, then the registers).

The joint image–text space (token kind ``embedding``, ``text_embeddings``): CLIP's image embedding is
``visual_projection(post_layernorm(CLS))``, SigLIP's the attention-pooling ``head`` on the final-normed
tokens (SigLIP has no projection), both as ``get_image_features`` computes them. Text goes through the
checkpoint's own tokenizer (CLIP: padded to the longest phrase, pooled at the end token; SigLIP: padded
to ``max_length`` as it was trained) and ``get_text_features``. Vision-only CLIP checkpoints have no
projection, so no embedding; a vision-only SigLIP has its head (an embedding) but no text tower.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import VitatlasError
from ..io import sha256_file
from .base import VisionModel
from .preprocess import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, ImageTransform, transform_from_hf_config

# model_type in config.json -> adapter family
FAMILIES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "vit": "vit",
}


def default_transform(family: str, image_size: int) -> ImageTransform:
    """Preprocessing used when a checkpoint ships no preprocessor_config.json (the processors' defaults)."""
    if family == "clip":
        return ImageTransform(image_size, CLIP_MEAN, CLIP_STD, "bicubic", crop=image_size, resize_mode="shortest_edge")
    if family == "siglip":
        return ImageTransform(image_size, HALF, HALF, "bicubic")
    if family == "dinov2":  # resize to 256/224 of the crop, then centre-crop, as DINOv2's processor does
        return ImageTransform(
            round(image_size * 256 / 224), IMAGENET_MEAN, IMAGENET_STD, "bicubic", crop=image_size,
            resize_mode="shortest_edge",
        )
    return ImageTransform(image_size, HALF, HALF, "bilinear")  # ViTImageProcessor defaults


class HFVisionModel(VisionModel):
    """A transformers vision tower driven block by block.

    Args:
        name: the id passed to ``load``.
        revision: hub commit or content hash of the weights.
        model: the loaded transformers model (a dual CLIP/SigLIP model or a vision-only model).
        family: ``"clip"``, ``"siglip"``, ``"dinov2"`` or ``"vit"``.
        transform: the preprocessing.
        tokenizer_source: where ``tokenizer()`` loads from (dual models only).
        device: torch device for the weights and the forward passes.
    """

    def __init__(
        self,
        name: str,
        revision: str,
        model: nn.Module,
        family: str,
        transform: ImageTransform,
        tokenizer_source: str | None = None,
        device: str | torch.device = "cpu",
    ):
        self.name, self.revision, self.family = name, revision, family
        self.device = torch.device(device)
        self._model = model.to(self.device).eval().requires_grad_(False)  # grads may still flow to hidden states
        self._tower = getattr(model, "vision_model", model)  # dual models keep the image tower here
        cfg = self._tower.config
        self._config = cfg
        self._blocks: nn.ModuleList = self._find_blocks()
        self._norm: nn.Module = self._tower.layernorm if family in ("dinov2", "vit") else self._tower.post_layernorm
        self._dtype = next(self._tower.parameters()).dtype
        self._tokenizer_source = tokenizer_source
        self._tokenizer: Any = None

        self.transform = transform
        self.preprocessing = transform.describe()
        self.patch_size = int(cfg.patch_size)
        self.image_size = transform.out_size
        self.width = int(cfg.hidden_size)
        self.n_layers = len(self._blocks)
        self.n_prefix_tokens = {"siglip": 0, "clip": 1, "vit": 1}.get(
            family, 1 + int(getattr(cfg, "num_register_tokens", 0))
        )
        if self.image_size % self.patch_size:
            raise VitatlasError(
                f"{name}: input size {self.image_size} is not a multiple of the patch size {self.patch_size}"
            )

    def _find_blocks(self) -> nn.ModuleList:
        # transformers has moved these between versions (e.g. ViT's encoder.layer -> layers)
        for path in ("encoder.layers", "encoder.layer", "layers"):
            obj: Any = self._tower
            for attr in path.split("."):
                obj = getattr(obj, attr, None)
            if isinstance(obj, nn.ModuleList):
                return obj
        raise VitatlasError(f"{self.name}: could not find the transformer blocks in {type(self._tower).__name__}")

    # ---- preprocessing -------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.transform(images)

    # ---- forward passes ------------------------------------------------------------------------
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> the residual stream entering block 0 (B, T, d)."""
        pixels = pixels.to(self.device, self._dtype)
        emb = self._tower.embeddings
        if self.family == "dinov2":  # always interpolates its position embeddings to the input size
            return emb(pixels)
        # the others need asking when the input differs from the pre-training resolution
        interpolate = tuple(pixels.shape[-2:]) != (self._config.image_size,) * 2
        hidden = emb(pixels, interpolate_pos_encoding=interpolate)
        return self._tower.pre_layrnorm(hidden) if self.family == "clip" else hidden

    def _block(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        out = self._blocks[i](hidden, None)  # no attention mask: every token attends to every token
        return out[0] if isinstance(out, tuple) else out  # older transformers returned tuples

    def residual_streams(self, pixels: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        wanted = sorted({self.resolve_layer(layer) for layer in layers})
        if not wanted:
            return {}
        out: dict[int, torch.Tensor] = {}
        # no_grad rather than inference_mode: inference tensors could not be fed to a forward_from
        # that an intervention wants to differentiate.
        with torch.no_grad():
            hidden = self.embed(pixels)
            for i in range(wanted[-1] + 1):
                hidden = self._block(i, hidden)
                if i in wanted:
                    out[i] = hidden
        return out

    def forward_from(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.device, self._dtype)
        for i in range(self.resolve_layer(layer) + 1, self.n_layers):
            hidden = self._block(i, hidden)
        return self.final_norm(hidden)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final layer norm on a residual stream (B, T, d)."""
        return self._norm(hidden)

    def token_positions(self, kind: str) -> np.ndarray:
        if kind == "cls" and self.n_prefix_tokens == 0:
            raise VitatlasError(
                f"{self.name} ({self.family}) has no CLS token: use token kind 'patches' or 'all' "
                "(mean-pool the patches for an image-level vector)"
            )
        return super().token_positions(kind)

    # ---- the joint image–text space ------------------------------------------------------------------
    @property
    def embedding_width(self) -> int | None:
        if self.family == "clip" and hasattr(self._model, "visual_projection"):
            return int(self._model.visual_projection.out_features)
        if self.family == "siglip" and getattr(self._tower, "head", None) is not None:
            return self.width
        return None

    @property
    def has_text_tower(self) -> bool:
        return self.embedding_width is not None and self.text_model() is not None

    def pool_embedding(self, last_hidden: torch.Tensor) -> torch.Tensor:
        self.require_embedding()
        with torch.no_grad():
            normed = self.final_norm(last_hidden.to(self.device, self._dtype))
            if self.family == "clip":
                return self._model.visual_projection(normed[:, 0])
            return self._tower.head(normed)

    def text_embeddings(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        model = self.text_model() if self.embedding_width is not None else None
        if model is None:
            return super().text_embeddings(texts)  # the one-line "no text tower" error
        tokenizer = self.tokenizer()
        if tokenizer is None:
            raise VitatlasError(
                f"{self.name} ships no tokenizer (tokenizer.json / tokenizer_config.json): save it next to the "
                "model with tokenizer.save_pretrained(DIR)")
        text_config = getattr(self._model.config, "text_config", None)
        max_length = int(getattr(text_config, "max_position_embeddings", 77))
        # SigLIP was trained on text padded to max_length and pools the last position
        padding = "max_length" if self.family == "siglip" else True
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(list(texts[start:start + batch_size]), padding=padding, truncation=True,
                                  max_length=max_length, return_tensors="pt")
                feats = model.get_text_features(**{k: v.to(self.device) for k, v in batch.items()})
                feats = getattr(feats, "pooler_output", feats)  # transformers 5 returns a model output
                out.append(feats.float().cpu())
        if not out:
            return torch.zeros(0, self.embedding_width)
        return torch.cat(out)

    # ---- text side, for labelling ----------------------------------------------------------------
    def text_model(self) -> nn.Module | None:
        """The full dual-encoder model (CLIPModel / SiglipModel, with ``get_text_features``), or None.

        None for vision-only checkpoints (DINOv2, ViT, CLIP/SigLIP vision towers saved alone).
        """
        return self._model if hasattr(self._model, "text_model") else None

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (loaded on first use), or None when it ships none."""
        if self._tokenizer is None and self._tokenizer_source is not None and self.text_model() is not None:
            # transformers 5 would build an empty stand-in tokenizer from nothing: ask for real files first
            if not any(_find_file(self._tokenizer_source, f) for f in ("tokenizer.json", "tokenizer_config.json")):
                return None
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_source, local_files_only=_offline())
            except (OSError, ValueError) as e:
                raise VitatlasError(f"could not load the tokenizer of {self.name}: {e}") from e
        return self._tokenizer

    def describe(self) -> dict:
        out = {**super().describe(), "family": self.family}
        if self.embedding_width is not None:
            out["embedding_width"] = self.embedding_width
        return out


# ---- loading ------------------------------------------------------------------------------------
def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read at call time (huggingface_hub reads it at import)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _not_found(spec: str, why: str) -> VitatlasError:
    return VitatlasError(
        f"could not find hf:{spec} {why}: on a connected machine run `hf download {spec}` (or "
        f"huggingface_hub.snapshot_download('{spec}')) and copy the Hugging Face cache here, "
        "or pass hf:/path/to/a/saved/model"
    )


def _resolve(spec: str) -> tuple[str, Path]:
    """hf:<spec> -> (source for from_pretrained, local directory holding config.json)."""
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise VitatlasError(f"{local} has no config.json: pass a directory written by save_pretrained")
        return str(local), local
    # a hub id is "name" or "owner/name"; anything else that is not a directory is a missing path
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec)
    if looks_like_path or local.exists():
        raise VitatlasError(f"no model directory at {spec}: pass hf:<hub repo id> or hf:<directory with config.json>")
    from transformers.utils import cached_file

    offline = _offline()
    try:
        config_file = cached_file(spec, "config.json", local_files_only=offline)
    except (OSError, ValueError) as e:
        why = "locally (HF_HUB_OFFLINE is set)" if offline else f"locally or on the hub ({type(e).__name__})"
        raise _not_found(spec, why) from e
    if config_file is None:
        raise _not_found(spec, "locally")
    return spec, Path(config_file).parent


def _find_file(source: str, filename: str) -> Path | None:
    """A file of a checkpoint (local directory, HF cache, or hub when online), or None if it has none."""
    local = Path(source) / filename
    if Path(source).is_dir():
        return local if local.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(
        source, filename, local_files_only=_offline(),
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
    )
    return Path(found) if found else None


def _revision(source_dir: Path) -> str:
    """Hub commit for cached snapshots; otherwise a SHA-256 over config and weight files."""
    match = re.search(r"snapshots[/\\]([0-9a-f]{40})", str(source_dir))
    if match:
        return match.group(1)[:12]
    h = hashlib.sha256()
    files = [source_dir / "config.json"] + sorted(
        p for p in source_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()
    )
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:12]


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports (e.g. a ViT pooler we deliberately drop)."""
    from transformers.utils import logging as tf_logging

    verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()


def _model_class(model_type: str) -> tuple[Callable[..., nn.Module], dict]:
    import transformers as tf

    classes = {
        "clip": (tf.CLIPModel, {}),
        "clip_vision_model": (tf.CLIPVisionModel, {}),
        "siglip": (tf.SiglipModel, {}),
        "siglip_vision_model": (tf.SiglipVisionModel, {}),
        "dinov2": (tf.Dinov2Model, {}),
        "dinov2_with_registers": (tf.Dinov2WithRegistersModel, {}),
        "vit": (tf.ViTModel, {"add_pooling_layer": False}),
    }
    return classes[model_type]


def load_hf(spec: str, device: str | torch.device = "cpu") -> HFVisionModel:
    """Load ``hf:<spec>``: a hub repo id (from the HF cache, or the hub when online) or a local directory."""
    from transformers import AutoConfig

    if not spec:
        raise VitatlasError("hf: needs a hub repo id or a directory, e.g. hf:openai/clip-vit-base-patch32")
    source, source_dir = _resolve(spec)
    offline = _offline() or source_dir == Path(source)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise VitatlasError(f"could not read the config of hf:{spec}: {e}") from e
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise VitatlasError(
            f"hf:{spec} is a {config.model_type!r} model; vitatlas supports {', '.join(sorted(FAMILIES))}"
        )
    cls, kwargs = _model_class(config.model_type)
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(source, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as e:
        raise VitatlasError(f"could not load the weights of hf:{spec}: {e}") from e

    vision_config = getattr(config, "vision_config", config)
    default = default_transform(family, int(vision_config.image_size))
    processor_file = _find_file(source, "preprocessor_config.json")
    transform = transform_from_hf_config(processor_file, default) if processor_file else default
    return HFVisionModel(
        name=f"hf:{spec}",
        revision=_revision(source_dir),
        model=model,
        family=family,
        transform=transform,
        tokenizer_source=source,
        device=device,
    )
