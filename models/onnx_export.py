"""A bundle's networks as ONNX graphs: the film network, the crop network and the point refiner.

Three graphs, each with a dynamic batch:

* **film network** (``film_net.onnx``): input ``image`` ``(batch, 1, H, W)`` float32 in [0, 1],
  with ``H, W`` the model's ``image_size`` (fixed); outputs the raw (uncalibrated)
  probabilities ``p_fracture``, ``p_acute``, ``p_acute_given_fracture`` ``(batch,)`` and
  ``heatmap`` ``(batch, H/8, W/8)`` (:meth:`FractureNet.probabilities`), and the body-centre,
  point and level maps ``vertebra_logits`` ``(batch, 30, H/8, W/8)`` that the per-vertebra
  analysis decodes. The bundle's ``model`` metadata (JSON), its id (``checkpoint_id``), name and
  version, and its calibration are stored in the graph's ``metadata_props``, so that
  :class:`inference.onnx.OnnxPredictor` reports the same model id and applies the same
  calibration.
* **crop network** (``crop_net.onnx``) and **point refiner** (``point_refiner.onnx``): input
  ``crops`` ``(batch, 1, S, S)`` float32 in [0, 1], ``S`` the network's crop size; outputs
  ``points`` ``(batch, 6, 2)`` in crop pixels and ``logits`` ``(batch, 2)`` (fractured; acute
  given a fracture). Their ``vcf_network`` metadata holds what the per-vertebra analysis needs
  to place the windows: the crop size and, for the refiner, its window context, passes and
  mirroring (``flip``).

The per-vertebra analysis between the graphs (decoding, cropping, level counting, grading) is
numpy code shared with the PyTorch backend (inference/vertebrae.py).

Exporter: torch's default ``torch.export``-based ("dynamo") exporter. With torch 2.14 it
exports these networks with a dynamic batch and matches PyTorch to ~1e-6; the legacy
TorchScript exporter (``exporter="torchscript"``) works too but is deprecated and emits tracer
warnings, so it is kept only as a fallback. A graph whose batch came out fixed (a network that
reads its batch size as a Python number) is refused rather than written.
"""
from __future__ import annotations

import io
import json

import torch
from torch import nn

from models.bundle import ONNX_FILES, Bundle
from models.network import FractureNet

INPUT_NAME = "image"
OUTPUT_NAMES = ("p_fracture", "p_acute", "p_acute_given_fracture", "heatmap")  # the film probabilities
VERTEBRA_LOGITS = "vertebra_logits"
FILM_GRAPH_OUTPUTS = OUTPUT_NAMES + (VERTEBRA_LOGITS,)
CROP_INPUT = "crops"
CROP_OUTPUTS = ("points", "logits")
CROP_NETWORKS = ("crop_net", "point_refiner")
DEFAULT_OPSET = 18
MIN_OPSET = 13
META_MODEL = "vcf_model"
META_CHECKPOINT_ID = "checkpoint_id"
META_BUNDLE = "vcf_bundle"
META_OUTPUTS = "vcf_outputs"
META_CALIBRATION = "vcf_calibration"
META_NETWORK = "vcf_network"  # a crop graph's network name and window (JSON)
META_GRAPHS = "vcf_graphs"  # a standalone film graph's companion crop graphs: {name: {file, sha256}} (JSON)


class ProbabilityHead(nn.Module):
    """FractureNet followed by :meth:`FractureNet.probabilities`, as a tuple in
    ``FILM_GRAPH_OUTPUTS`` order (the probabilities, then the vertebra logits)."""

    def __init__(self, net: FractureNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(image)
        p = FractureNet.probabilities(out)
        return tuple(p[k] for k in OUTPUT_NAMES) + (out[VERTEBRA_LOGITS],)


class CropHead(nn.Module):
    """A crop network (a module taking a crop batch and giving ``points`` and ``logits``) as a
    tuple in ``CROP_OUTPUTS`` order."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(crops)
        return tuple(out[k].float() for k in CROP_OUTPUTS)


def _export_proto(module: nn.Module, example: torch.Tensor, input_name: str, output_names: tuple[str, ...],
                  opset: int, exporter: str):
    """The exported graph as an in-memory ``onnx.ModelProto`` (weights inside, no external data),
    its first input's dimension 0 a named (dynamic) batch."""
    import onnx

    if exporter == "dynamo":
        # the forward's own argument name keys the dynamic shape
        program = torch.onnx.export(
            module, (example,), None, dynamo=True, verbose=False, opset_version=opset,
            input_names=[input_name], output_names=list(output_names),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        proto = program.model_proto
    elif exporter == "torchscript":
        buf = io.BytesIO()
        torch.onnx.export(
            module, (example,), buf, dynamo=False, opset_version=opset,
            input_names=[input_name], output_names=list(output_names),
            dynamic_axes={name: {0: "batch"} for name in (input_name, *output_names)})
        proto = onnx.load_from_string(buf.getvalue())
    else:
        raise ValueError(f"unknown exporter {exporter!r} (dynamo or torchscript)")
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise ValueError(f"the {exporter} exporter fixed the batch of {type(module).__name__} to "
                         f"{batch.dim_value}: the network reads its batch size as a number")
    return proto


def _check_opset(opset: int) -> None:
    import onnx

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} outside the supported range {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")


def _finish(proto, props: dict[str, str], doc: str) -> bytes:
    """``proto`` with ``props`` in its ``metadata_props`` and ``doc`` as its doc string, checked and serialised."""
    import onnx

    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = doc
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _bundle_props(bundle: Bundle) -> dict[str, str]:
    return {META_CHECKPOINT_ID: bundle.id,
            META_BUNDLE: json.dumps({"name": bundle.name, "version": bundle.version, "id": bundle.id})}


def onnx_bytes(bundle: Bundle, opset: int = DEFAULT_OPSET, exporter: str = "dynamo") -> bytes:
    """The film network of ``bundle`` as a checked ONNX model (serialised), with the bundle's
    model metadata, id and calibration in its ``metadata_props``."""
    _check_opset(opset)
    meta = bundle.model
    h, w = (int(v) for v in meta["image_size"])
    module = ProbabilityHead(bundle.film_net).eval()
    # batch 2, not 1: an example batch of 1 invites the exporter to specialise the dimension
    example = torch.rand(2, 1, h, w)
    with torch.no_grad():
        proto = _export_proto(module, example, INPUT_NAME, FILM_GRAPH_OUTPUTS, opset, exporter)
    props = {META_MODEL: json.dumps(meta, sort_keys=True), **_bundle_props(bundle),
             META_OUTPUTS: json.dumps(list(FILM_GRAPH_OUTPUTS))}
    if bundle.calibration is not None:
        props[META_CALIBRATION] = json.dumps(bundle.calibration, sort_keys=True)
    return _finish(proto, props, f"spine-vcf {meta.get('architecture')} ({meta.get('backbone')}) of bundle "
                                 f"{bundle.describe()}; research software, not for clinical use")


def with_graphs(film: bytes, graphs: dict[str, dict]) -> bytes:
    """The film graph ``film`` naming a standalone export's crop graphs (``{name: {"file",
    "sha256"}}``) in its ``vcf_graphs`` metadata."""
    import onnx

    proto = onnx.load_from_string(film)
    return _finish(proto, {META_GRAPHS: json.dumps(graphs, sort_keys=True)}, proto.doc_string)


def network_window(name: str, net: nn.Module) -> dict:
    """What the per-vertebra analysis needs besides a crop network's weights: its ``name``, its
    ``crop_size`` and, for the point refiner, the window it was trained with."""
    window = {"name": name, "crop_size": int(net.crop_size)}
    if name == "point_refiner":
        window.update({"context": [float(c) for c in net.context], "passes": int(net.passes), "flip": bool(net.flip)})
    return window


def crop_onnx_bytes(net: nn.Module, name: str, opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                    bundle: Bundle | None = None) -> bytes:
    """A crop network or point refiner (``name``: ``crop_net`` or ``point_refiner``) as a checked
    ONNX model (serialised), with its window (:func:`network_window`) and, given ``bundle``, the
    bundle's id in its ``metadata_props``. ``net``: a :class:`~models.vertebra_net.VertebraNet`
    or any module with its interface and ``crop_size`` attribute."""
    if name not in CROP_NETWORKS:
        raise ValueError(f"unknown crop network {name!r} ({' or '.join(CROP_NETWORKS)})")
    _check_opset(opset)
    window = network_window(name, net)
    size = window["crop_size"]
    module = CropHead(net).eval()
    with torch.no_grad():
        proto = _export_proto(module, torch.rand(2, 1, size, size), CROP_INPUT, CROP_OUTPUTS, opset, exporter)
    props = {META_NETWORK: json.dumps(window, sort_keys=True), META_OUTPUTS: json.dumps(list(CROP_OUTPUTS))}
    if bundle is not None:
        props.update(_bundle_props(bundle))
    of = f" of bundle {bundle.describe()}" if bundle is not None else ""
    return _finish(proto, props, f"spine-vcf {name} ({getattr(net, 'backbone_name', type(net).__name__)}){of}; "
                                 f"research software, not for clinical use")


def crop_graphs(bundle: Bundle, opset: int = DEFAULT_OPSET, exporter: str = "dynamo") -> dict[str, bytes]:
    """The crop network and point refiner of ``bundle`` that it holds, as ONNX models by network name."""
    nets = {"crop_net": bundle.crop_net, "point_refiner": bundle.point_refiner if bundle.crop_net is not None else None}
    return {name: crop_onnx_bytes(net, name, opset, exporter, bundle) for name, net in nets.items() if net is not None}


def bundle_graphs(bundle: Bundle, opset: int = DEFAULT_OPSET, exporter: str = "dynamo") -> dict[str, bytes]:
    """Every network of ``bundle`` as an ONNX model, keyed by its file name in the bundle (``ONNX_FILES``)."""
    graphs = {ONNX_FILES["film_net"]: onnx_bytes(bundle, opset, exporter)}
    graphs.update({ONNX_FILES[name]: blob for name, blob in crop_graphs(bundle, opset, exporter).items()})
    return graphs
