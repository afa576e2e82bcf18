"""The film network of a bundle as an ONNX graph (``film_net.onnx``).

The graph takes ``image`` ``(batch, 1, H, W)`` float32 in [0, 1], with ``H, W`` the model's
``image_size`` (fixed) and a dynamic batch, and returns the probabilities directly:
``p_fracture``, ``p_acute``, ``p_acute_given_fracture`` ``(batch,)`` and ``heatmap``
``(batch, H/8, W/8)``, computed with :meth:`FractureNet.probabilities`. It is the film network
only: no per-vertebra analysis, and raw (uncalibrated) probabilities. The bundle's ``model``
metadata (JSON), its id (``checkpoint_id``), name and version, and its calibration are stored in
the graph's ``metadata_props``, so that :class:`inference.onnx.OnnxPredictor` reports the same
model id and applies the same calibration.

Exporter: torch's default ``torch.export``-based ("dynamo") exporter. With torch 2.14 it
exports this network with a dynamic batch and matches PyTorch to ~1e-7; the legacy
TorchScript exporter (``exporter="torchscript"``) works too but is deprecated and emits tracer
warnings, so it is kept only as a fallback.
"""
from __future__ import annotations

import io
import json

import torch
from torch import nn

from models.bundle import Bundle
from models.network import FractureNet

INPUT_NAME = "image"
OUTPUT_NAMES = ("p_fracture", "p_acute", "p_acute_given_fracture", "heatmap")
DEFAULT_OPSET = 18
MIN_OPSET = 13
META_MODEL = "vcf_model"
META_CHECKPOINT_ID = "checkpoint_id"
META_BUNDLE = "vcf_bundle"
META_OUTPUTS = "vcf_outputs"
META_CALIBRATION = "vcf_calibration"


class ProbabilityHead(nn.Module):
    """FractureNet followed by :meth:`FractureNet.probabilities`, as a tuple in ``OUTPUT_NAMES`` order."""

    def __init__(self, net: FractureNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = FractureNet.probabilities(self.net(image))
        return tuple(p[k] for k in OUTPUT_NAMES)


def _export_proto(module: nn.Module, example: torch.Tensor, opset: int, exporter: str):
    """The exported graph as an in-memory ``onnx.ModelProto`` (weights inside, no external data)."""
    import onnx

    if exporter == "dynamo":
        program = torch.onnx.export(
            module, (example,), None, dynamo=True, verbose=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}})
        return program.model_proto
    if exporter == "torchscript":
        buf = io.BytesIO()
        torch.onnx.export(
            module, (example,), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)})
        return onnx.load_from_string(buf.getvalue())
    raise ValueError(f"unknown exporter {exporter!r} (dynamo or torchscript)")


def onnx_bytes(bundle: Bundle, opset: int = DEFAULT_OPSET, exporter: str = "dynamo") -> bytes:
    """The film network of ``bundle`` as a checked ONNX model (serialised), with the bundle's
    model metadata, id and calibration in its ``metadata_props``."""
    import onnx

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} outside the supported range {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    meta = bundle.model
    h, w = (int(v) for v in meta["image_size"])
    module = ProbabilityHead(bundle.film_net).eval()
    # batch 2, not 1: an example batch of 1 invites the exporter to specialise the dimension
    example = torch.rand(2, 1, h, w)
    with torch.no_grad():
        proto = _export_proto(module, example, opset, exporter)
    props = {
        META_MODEL: json.dumps(meta, sort_keys=True),
        META_CHECKPOINT_ID: bundle.id,
        META_BUNDLE: json.dumps({"name": bundle.name, "version": bundle.version, "id": bundle.id}),
        META_OUTPUTS: json.dumps(list(OUTPUT_NAMES)),
    }
    if bundle.calibration is not None:
        props[META_CALIBRATION] = json.dumps(bundle.calibration, sort_keys=True)
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"spine-vcf {meta.get('architecture')} ({meta.get('backbone')}) of bundle {bundle.describe()}; "
                        f"research software, not for clinical use")
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()
