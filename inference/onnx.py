"""ONNX: export a model's film network, and an onnxruntime predictor with the interface of
:class:`inference.pipeline.Predictor`.

Export (the graph and its outputs are described in :mod:`models.onnx_export`)::

    python -m inference.onnx --model BUNDLE --onnx model.onnx [--opset 18]
    python -m inference.onnx --model BUNDLE --bundle-out NEW_BUNDLE     # film_net.onnx added
    python -m inference.onnx --checkpoint model.ckpt --onnx model.onnx

The graph has four outputs, ``p_fracture``, ``p_acute``, ``p_acute_given_fracture`` and
``heatmap``: the film network only, with raw probabilities. :class:`OnnxPredictor` reads a
bundle holding ``film_net.onnx`` or a .onnx file, and applies the stored calibration to the
graph's outputs as :class:`~inference.pipeline.Predictor` does; a calibration fitted on the film
probability combined with the vertebrae is then approximate, and a warning says so.
"""
from __future__ import annotations

import argparse
import json
import warnings
import os
import sys
from pathlib import Path

import numpy as np
import torch

from calibration import predictor_calibration
from data.io_utils import atomic_write_bytes, missing_file
from inference.loading import open_model
from models.bundle import (CALIBRATION_FILE, ONNX_FILE, BundleError, ModelError, file_sha256, is_bundle,
                           read_metadata)
from models.onnx_export import (DEFAULT_OPSET, INPUT_NAME, META_CALIBRATION, META_CHECKPOINT_ID, META_MODEL, MIN_OPSET,
                                 OUTPUT_NAMES, onnx_bytes)

def export_onnx(model, onnx_path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                sha256: str | None = None, exporter: str = "dynamo") -> Path:
    """Export the film network of ``model`` (a bundle folder, a registry name or a training
    checkpoint) to ``onnx_path`` (written atomically); returns the path.

    Raises :class:`~models.bundle.ModelError` for a missing, unsafe or foreign model."""
    bundle = open_model(model, sha256=sha256)
    # checked before writing: a model that fails the checker never replaces an existing file
    return atomic_write_bytes(onnx_path, onnx_bytes(bundle, opset, exporter))


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

        source = Path(onnx_path)
        if is_bundle(source):
            self.meta, stored, self.checkpoint_id, self.checkpoint = self._from_bundle(source, sha256)
        else:
            self.meta, stored, self.checkpoint_id = self._from_file(source, sha256)
            self.checkpoint = source
        self.image_size = tuple(int(v) for v in self.meta["image_size"])
        self.calibrator, self.operating_point = predictor_calibration(stored, source, operating_point)
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
            raise BundleError(f"{self.checkpoint}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        if sorted(self.output_names) != sorted(OUTPUT_NAMES):
            raise BundleError(f"{self.checkpoint}: outputs {self.output_names}, expected {list(OUTPUT_NAMES)}")

    @staticmethod
    def _from_bundle(folder: Path, sha256: str | None) -> tuple[dict, dict | None, str, Path]:
        """(model metadata, stored calibration, model id, .onnx path) of a bundle with film_net.onnx."""
        meta = read_metadata(folder)
        if ONNX_FILE not in meta["files"]:
            raise BundleError(f"{folder}: the bundle has no {ONNX_FILE}; export one with "
                              f"`python -m inference.onnx --model {folder} --bundle-out NEW_BUNDLE` or use --backend torch")
        if sha256 and file_sha256(folder / "metadata.json").lower() != sha256.lower():
            raise BundleError(f"{folder}: sha256 of metadata.json does not match {sha256}")
        for name in (ONNX_FILE, CALIBRATION_FILE):
            if name in meta["files"] and file_sha256(folder / name) != meta["files"][name]:
                raise BundleError(f"{folder / name}: sha256 does not match metadata.json (the file was changed or damaged)")
        stored = json.loads((folder / CALIBRATION_FILE).read_text()) if CALIBRATION_FILE in meta["files"] else None
        return meta["model"], stored, str(meta.get("id")), folder / ONNX_FILE

    @staticmethod
    def _from_file(path: Path, sha256: str | None) -> tuple[dict, dict | None, str]:
        """(model metadata, stored calibration, model id) of a .onnx file of :func:`export_onnx`."""
        if not path.is_file():
            raise BundleError(f"{path}: {missing_file(path, 'ONNX model')} (a bundle folder holds metadata.json)")
        if sha256:
            actual = file_sha256(path)
            if actual.lower() != sha256.lower():
                raise BundleError(f"{path}: sha256 mismatch (expected {sha256}, file has {actual})")
        try:
            props = read_onnx_metadata(path)
        except Exception as exc:
            raise BundleError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
        if META_MODEL not in props:
            raise BundleError(f"{path}: no '{META_MODEL}' metadata: not exported by inference.onnx")
        try:
            stored = json.loads(props[META_CALIBRATION]) if META_CALIBRATION in props else None
        except ValueError as exc:
            raise BundleError(f"{path}: '{META_CALIBRATION}' metadata is not JSON ({exc})") from exc
        return json.loads(props[META_MODEL]), stored, props.get(META_CHECKPOINT_ID) or file_sha256(path)[:16]

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
    parser = argparse.ArgumentParser(description="Export a model's film network to ONNX (probabilities and heatmap "
                                                 "as outputs).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a bundle folder or a registry name")
    source.add_argument("--checkpoint", help="a training checkpoint (.ckpt)")
    parser.add_argument("--onnx", default=None, help="output .onnx file (written atomically)")
    parser.add_argument("--bundle-out", default=None,
                        help="write a new version of the bundle with film_net.onnx added (the input is not changed)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--sha256", default=None, help="expected sha256 of the checkpoint file or of metadata.json")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="torch.onnx exporter (default dynamo; torchscript is the deprecated legacy one)")
    args = parser.parse_args(argv)
    import onnx

    if not args.onnx and not args.bundle_out:
        parser.error("give --onnx FILE, --bundle-out FOLDER or both")
    if not MIN_OPSET <= args.opset <= onnx.defs.onnx_opset_version():
        parser.error(f"--opset {args.opset} outside the supported range {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    try:
        bundle = open_model(args.model or args.checkpoint, sha256=args.sha256)
        blob = onnx_bytes(bundle, args.opset, args.exporter)
        if args.onnx:
            print(atomic_write_bytes(args.onnx, blob))
        if args.bundle_out:
            new = bundle.derive("onnx export", note=f"film network exported to {ONNX_FILE} (opset {args.opset})")
            new.extra_files[ONNX_FILE] = blob
            print(new.save(args.bundle_out))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.onnx or args.bundle_out}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
