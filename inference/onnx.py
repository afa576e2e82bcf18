"""ONNX export of a checkpoint, and an onnxruntime predictor with the interface of
:class:`inference.pipeline.Predictor`.

Export::

    python -m inference.onnx --checkpoint model.ckpt --onnx model.onnx [--opset 18]

The ONNX graph takes ``image`` ``(batch, 1, H, W)`` float32 in [0, 1], with ``H, W`` the
checkpoint's ``image_size`` (fixed) and a dynamic batch, and returns the probabilities
directly: ``p_fracture``, ``p_acute``, ``p_acute_given_fracture`` ``(batch,)`` and
``heatmap`` ``(batch, H/8, W/8)``, computed with :meth:`FractureNet.probabilities`. The
checkpoint's ``vcf_model`` metadata (JSON) and its ``checkpoint_id`` (first 16 hex digits of
the checkpoint file's sha256, as :class:`~inference.pipeline.Predictor` reports it) are stored
in the model's ``metadata_props``, so predictions made with either backend name the same model.
A calibrated checkpoint's ``vcf_calibration`` (see :mod:`calibration.fit`) is stored there
too (JSON), and :class:`OnnxPredictor` applies it to the graph's outputs as
:class:`~inference.pipeline.Predictor` does; the graph itself always returns raw probabilities.
The graph is the film network only (no per-vertebra analysis); a calibration fitted on the
film probability combined with the vertebrae is then approximate, and a warning says so.

Exporter: torch's default ``torch.export``-based ("dynamo") exporter. With torch 2.14 it
exports this network with a dynamic batch and matches PyTorch to ~1e-7; the legacy
TorchScript exporter (``--exporter torchscript``) works too but is deprecated and emits tracer
warnings, so it is kept only as a fallback.
"""
from __future__ import annotations

import argparse
import io
import json
import warnings
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.io_utils import atomic_write_bytes
from training.checkpoint import CheckpointError, build_network, file_sha256, load_checkpoint
from models.network import FractureNet

INPUT_NAME = "image"
OUTPUT_NAMES = ("p_fracture", "p_acute", "p_acute_given_fracture", "heatmap")
DEFAULT_OPSET = 18
MIN_OPSET = 13
META_MODEL = "vcf_model"
META_CHECKPOINT_ID = "checkpoint_id"
META_CHECKPOINT_SHA256 = "checkpoint_sha256"
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


def export_onnx(checkpoint: str | os.PathLike, onnx_path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                sha256: str | None = None, exporter: str = "dynamo") -> Path:
    """Export ``checkpoint`` to ``onnx_path`` (written atomically); returns the path.

    Raises :class:`CheckpointError` for a missing, unsafe or foreign checkpoint."""
    import onnx

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} outside the supported range {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint, sha256=sha256)
    net, meta = build_network(ckpt, checkpoint)
    digest = file_sha256(checkpoint)
    h, w = (int(v) for v in meta["image_size"])
    module = ProbabilityHead(net).eval()
    # batch 2, not 1: an example batch of 1 invites the exporter to specialise the dimension
    example = torch.rand(2, 1, h, w)
    with torch.no_grad():
        proto = _export_proto(module, example, opset, exporter)
    props = {
        META_MODEL: json.dumps(meta, sort_keys=True),
        META_CHECKPOINT_ID: digest[:16],
        META_CHECKPOINT_SHA256: digest,
        META_OUTPUTS: json.dumps(list(OUTPUT_NAMES)),
    }
    if ckpt.get(META_CALIBRATION) is not None:
        props[META_CALIBRATION] = json.dumps(ckpt[META_CALIBRATION], sort_keys=True)
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"spine-vcf {meta.get('architecture')} ({meta.get('backbone')}) exported from checkpoint "
                        f"{digest[:16]}; research software, not for clinical use")
    onnx.checker.check_model(proto, full_check=True)
    # check before writing: a model that fails the checker never replaces an existing file
    return atomic_write_bytes(onnx_path, proto.SerializeToString())


def read_onnx_metadata(onnx_path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, without loading its weights into a session."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


class OnnxPredictor:
    """An exported model run by onnxruntime, with the interface of :class:`inference.pipeline.Predictor`.

    ``device``: ``"auto"`` (CUDA when onnxruntime offers it, else CPU), ``"cpu"``, ``"cuda"``
    or ``"cuda:N"``. ``sha256``: if given, the .onnx file must have this digest.
    ``operating_point``: as for :class:`~inference.pipeline.Predictor` (a calibrated model only)."""

    def __init__(self, onnx_path: str | os.PathLike, device: str = "auto", sha256: str | None = None,
                 operating_point: str | None = None):
        import onnxruntime as ort

        self.checkpoint = Path(onnx_path)
        if not self.checkpoint.is_file():
            raise CheckpointError(f"{self.checkpoint}: ONNX model not found")
        if sha256:
            actual = file_sha256(self.checkpoint)
            if actual.lower() != sha256.lower():
                raise CheckpointError(f"{self.checkpoint}: sha256 mismatch (expected {sha256}, file has {actual})")
        try:
            props = read_onnx_metadata(self.checkpoint)
        except Exception as exc:
            raise CheckpointError(f"{self.checkpoint}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
        if META_MODEL not in props:
            raise CheckpointError(f"{self.checkpoint}: no '{META_MODEL}' metadata: not exported by inference.onnx")
        self.meta = json.loads(props[META_MODEL])
        self.checkpoint_id = props.get(META_CHECKPOINT_ID) or file_sha256(self.checkpoint)[:16]
        self.image_size = tuple(int(v) for v in self.meta["image_size"])
        from calibration.fit import predictor_calibration

        try:
            stored = json.loads(props[META_CALIBRATION]) if META_CALIBRATION in props else None
        except ValueError as exc:
            raise CheckpointError(f"{self.checkpoint}: '{META_CALIBRATION}' metadata is not JSON ({exc})") from exc
        self.calibrator, self.operating_point = predictor_calibration(stored, self.checkpoint, operating_point)
        if self.calibrator is not None and "crop_size" in self.meta:
            # fitted on the film head combined with the vertebrae, which this graph does not compute
            warnings.warn(f"{self.checkpoint}: the stored calibration and operating points were fitted on the film "
                          f"probability combined with the per-vertebra analysis; the ONNX graph has the film head "
                          f"only, so its calibrated probabilities and decisions are approximate. Use the PyTorch "
                          f"backend for calibrated decisions.", stacklevel=2)

        available = ort.get_available_providers()
        if device == "auto":
            device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if device == "cpu":
            providers: list = ["CPUExecutionProvider"]
        elif device.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise RuntimeError(f"device {device!r}: this onnxruntime has no CUDAExecutionProvider "
                                   f"(available: {', '.join(available)}); install onnxruntime-gpu or use cpu")
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            raise ValueError(f"unknown device {device!r} (auto, cpu, cuda or cuda:N)")
        self.device = device
        try:
            self.session = ort.InferenceSession(str(self.checkpoint), providers=providers)
        except Exception as exc:
            raise CheckpointError(f"{self.checkpoint}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        if sorted(self.output_names) != sorted(OUTPUT_NAMES):
            raise CheckpointError(f"{self.checkpoint}: outputs {self.output_names}, expected {list(OUTPUT_NAMES)}")

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        if isinstance(images, torch.Tensor):
            images = images.detach().to("cpu", torch.float32).numpy()
        x = np.ascontiguousarray(images, dtype=np.float32)
        expected = (1, *self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(x.shape)}; this model takes (batch, {', '.join(map(str, expected))})")
        outputs = self.session.run(self.output_names, {INPUT_NAME: x})
        probs = {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.output_names, outputs)}
        return self.calibrator.apply_probabilities(probs) if self.calibrator is not None else probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a checkpoint to ONNX (probabilities and heatmap as outputs).")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.ckpt)")
    parser.add_argument("--onnx", required=True, help="output .onnx file (written atomically)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--sha256", default=None, help="expected sha256 of the checkpoint file")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="torch.onnx exporter (default dynamo; torchscript is the deprecated legacy one)")
    args = parser.parse_args(argv)
    import onnx

    if not MIN_OPSET <= args.opset <= onnx.defs.onnx_opset_version():
        parser.error(f"--opset {args.opset} outside the supported range {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    try:
        path = export_onnx(args.checkpoint, args.onnx, opset=args.opset, sha256=args.sha256, exporter=args.exporter)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.onnx}: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
