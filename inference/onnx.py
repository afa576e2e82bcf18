"""ONNX: export a model's networks, and an onnxruntime predictor that gives what
:class:`inference.predictor.Predictor` gives.

Export (the graphs and their outputs are described in :mod:`models.onnx_export`)::

    python -m inference.onnx --model BUNDLE --bundle-out NEW_BUNDLE     # the .onnx graphs added
    python -m inference.onnx --model BUNDLE --onnx model.onnx [--opset 18]
    python -m inference.onnx --checkpoint model.ckpt --onnx model.onnx

A model with a crop network has three graphs: the film network, the crop network and the point
refiner (when it has one). In a bundle they are ``film_net.onnx``, ``crop_net.onnx`` and
``point_refiner.onnx``; a standalone export writes ``model.onnx`` (the film network) with
``model.crop_net.onnx`` and ``model.point_refiner.onnx`` beside it, named with their sha256 in
the film graph's metadata.

:class:`OnnxPredictor` runs them with onnxruntime and shares everything else with the PyTorch
:class:`~inference.predictor.Predictor`: the per-vertebra analysis (inference/vertebrae.py)
calls the crop graphs through :class:`OnnxCropNetwork`, which is called as the PyTorch crop
network is, and the calibration is applied as there. A film graph exported before the crop
graphs existed (film network only) still runs, without the per-vertebra analysis; a warning
says so. A bundle without graphs (the shipped model keeps its size budget for the weights) or a
registry name is exported once into the cache (:func:`cached_export`) and run from there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from calibration import predictor_calibration
from data.io_utils import atomic_write_bytes, missing_file
from inference.loading import open_model
from inference.predictor import Predictor
from models.bundle import (CALIBRATION_FILE, METADATA_FILE, ONNX_FILE, ONNX_FILES, BundleError, ModelError,
                           file_sha256, is_bundle, load_bundle, read_metadata)
from models.onnx_export import (CROP_INPUT, CROP_NETWORKS, CROP_OUTPUTS, DEFAULT_OPSET, FILM_GRAPH_OUTPUTS, INPUT_NAME,
                                META_CALIBRATION, META_CHECKPOINT_ID, META_GRAPHS, META_MODEL, META_NETWORK, MIN_OPSET,
                                OUTPUT_NAMES, VERTEBRA_LOGITS, bundle_graphs, crop_graphs, onnx_bytes, with_graphs)
from models.registry import REGISTRY_PATH, cache_root, resolve
from models.vertebra_net import MIN_CROPS_PER_CALL


def companion_path(onnx_path: str | os.PathLike, name: str) -> Path:
    """Where a standalone export keeps network ``name``'s graph: ``model.crop_net.onnx`` beside ``model.onnx``."""
    path = Path(onnx_path)
    return path.with_name(f"{path.stem}.{name}.onnx")


def write_standalone(bundle, onnx_path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                     exporter: str = "dynamo", film: bytes | None = None,
                     crops: dict[str, bytes] | None = None) -> list[Path]:
    """Write ``bundle``'s graphs as a standalone export at ``onnx_path`` (see the module
    docstring), each file atomically, the film graph last; returns the paths written. ``film``
    and ``crops``: graphs already exported (:func:`~models.onnx_export.onnx_bytes`,
    :func:`~models.onnx_export.crop_graphs`)."""
    film = film if film is not None else onnx_bytes(bundle, opset, exporter)
    crops = crops if crops is not None else crop_graphs(bundle, opset, exporter)
    written, graphs = [], {}
    for name, blob in crops.items():
        path = atomic_write_bytes(companion_path(onnx_path, name), blob)
        graphs[name] = {"file": path.name, "sha256": file_sha256(path)}
        written.append(path)
    # the film graph names its crop graphs, so that a predictor finds them and knows them unchanged
    written.append(atomic_write_bytes(onnx_path, with_graphs(film, graphs) if graphs else film))
    return written


def export_onnx(model, onnx_path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                sha256: str | None = None, exporter: str = "dynamo") -> Path:
    """Export the networks of ``model`` (a bundle folder, a registry name or a training
    checkpoint) to ``onnx_path`` (the film network) and its companions; returns ``onnx_path``.

    Raises :class:`~models.bundle.ModelError` for a missing, unsafe or foreign model."""
    bundle = open_model(model, sha256=sha256)
    # every graph is checked before the first is written: a model that fails the checker replaces no file
    return write_standalone(bundle, onnx_path, opset, exporter)[-1]


def read_onnx_metadata(onnx_path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, without loading its weights into a session."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def onnx_session(path: Path, providers: list):
    """An onnxruntime session of the graph at ``path``, or :class:`BundleError` naming it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # idle threads sleep instead of spinning, as OMP_WAIT_POLICY=PASSIVE makes torch's do: the
    # loader workers share the cores, and a spinning pool takes their time
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        raise BundleError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc


class OnnxCropNetwork:
    """A crop network or point refiner run by onnxruntime, called as its PyTorch module is: a
    ``(n, 1, S, S)`` crop tensor in, ``points`` ``(n, 6, 2)`` and ``logits`` ``(n, 2)`` tensors
    out. It carries the attributes the per-vertebra analysis reads: ``crop_size`` and, for the
    point refiner, ``context``, ``passes`` and ``flip``."""

    min_crops_per_call = MIN_CROPS_PER_CALL  # small calls padded, as the PyTorch networks' are

    def __init__(self, session, path: Path, expected: str):
        self.session = session
        props = session.get_modelmeta().custom_metadata_map
        try:
            window = json.loads(props[META_NETWORK])
            self.name, self.crop_size = str(window["name"]), int(window["crop_size"])
            if self.name == "point_refiner":
                self.context = tuple(float(c) for c in window["context"])
                self.passes, self.flip = int(window["passes"]), bool(window["flip"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path}: no readable '{META_NETWORK}' metadata ({type(exc).__name__}: {exc}); "
                              f"not a crop graph of inference.onnx") from exc
        if self.name != expected:
            raise BundleError(f"{path}: holds the {self.name} graph, expected the {expected} one")
        outputs = [o.name for o in session.get_outputs()]
        if sorted(outputs) != sorted(CROP_OUTPUTS):
            raise BundleError(f"{path}: outputs {outputs}, expected {list(CROP_OUTPUTS)}")

    def __call__(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        x = np.ascontiguousarray(crops.detach().to("cpu", torch.float32).numpy())
        out = self.session.run(list(CROP_OUTPUTS), {CROP_INPUT: x})
        return {name: torch.from_numpy(np.asarray(v, dtype=np.float32)) for name, v in zip(CROP_OUTPUTS, out)}


def cached_export(folder: Path, opset: int = DEFAULT_OPSET) -> Path:
    """The standalone ONNX export of the bundle at ``folder``, made on first use and kept in the
    cache (``$SPINE_VCF_CACHE/onnx/<sha256 of metadata.json>/model.onnx``, with its crop graphs
    beside it). The film graph is written last, so its presence means the export is whole."""
    key = file_sha256(folder / METADATA_FILE)
    target = cache_root() / "onnx" / key / "model.onnx"
    if not target.is_file():
        print(f"{folder}: no ONNX graphs in the bundle; exporting them once to {target.parent}", file=sys.stderr)
        write_standalone(load_bundle(folder), target, opset, "dynamo")
    return target


class OnnxPredictor(Predictor):
    """An exported model run by onnxruntime: :class:`~inference.predictor.Predictor` with its
    networks replaced by the ONNX graphs (the film network by :meth:`film_outputs`, the crop
    network and point refiner by :class:`OnnxCropNetwork`), and everything else shared.

    ``onnx_path``: a bundle holding ``film_net.onnx`` (and ``crop_net.onnx``,
    ``point_refiner.onnx``), a .onnx file of a standalone export, or a bundle without graphs or a
    registry name (``registry``), exported once into the cache. ``device``: ``"auto"``
    (CUDA when onnxruntime offers it, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; the
    graphs run there (``onnx_device``), the analysis between them on the CPU. ``sha256``: if
    given, the .onnx file (or the bundle's metadata.json) must have this digest.
    ``operating_point``: as for :class:`~inference.predictor.Predictor` (a calibrated model only)."""

    backend = "onnx"

    # Predictor.__init__ is not called: it loads the PyTorch networks this predictor replaces
    def __init__(self, onnx_path: str | os.PathLike, device: str = "auto", sha256: str | None = None,
                 operating_point: str | None = None, registry: str | os.PathLike = REGISTRY_PATH):
        import onnxruntime as ort

        source = Path(onnx_path)
        if not source.exists() and not source.suffix and len(source.parts) == 1:  # a registry name
            source = resolve(str(onnx_path), registry=registry)
        if is_bundle(source) and ONNX_FILE not in read_metadata(source)["files"]:
            if sha256 and file_sha256(source / METADATA_FILE).lower() != sha256.lower():
                raise BundleError(f"{source}: sha256 of {METADATA_FILE} does not match {sha256}")
            source, sha256 = cached_export(source), None
        if is_bundle(source):
            self.meta, stored, self.checkpoint_id, self.checkpoint, crop_paths = self._from_bundle(source, sha256)
        else:
            self.meta, stored, self.checkpoint_id, crop_paths = self._from_file(source, sha256)
            self.checkpoint = source
        self.image_size = tuple(int(v) for v in self.meta["image_size"])
        self.calibrator, self.operating_point = predictor_calibration(stored, source, operating_point)

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
        self.onnx_device = device
        self.device = torch.device("cpu")  # where the per-vertebra analysis puts its tensors
        self.session = onnx_session(self.checkpoint, providers)
        outputs = [o.name for o in self.session.get_outputs()]
        if not set(OUTPUT_NAMES) <= set(outputs) or not set(outputs) <= set(FILM_GRAPH_OUTPUTS):
            raise BundleError(f"{self.checkpoint}: outputs {outputs}, expected {list(FILM_GRAPH_OUTPUTS)}")
        self.output_names = [name for name in FILM_GRAPH_OUTPUTS if name in outputs]
        crops = {name: OnnxCropNetwork(onnx_session(path, providers), path, name) for name, path in crop_paths.items()}
        self.vertebra_net = crops.get("crop_net") if VERTEBRA_LOGITS in outputs else None
        self.point_refiner = crops.get("point_refiner") if self.vertebra_net is not None else None
        if self.vertebra_net is None and "crop_size" in self.meta:
            approximate = (" Its calibrated probabilities and decisions are approximate: the calibration was fitted "
                           "on the film probability combined with the vertebrae.") if self.calibrator is not None else ""
            warnings.warn(f"{self.checkpoint}: this ONNX export has the film network only, so the per-vertebra "
                          f"analysis is skipped.{approximate} Export the crop networks too with "
                          f"`python -m inference.onnx --model BUNDLE --bundle-out NEW_BUNDLE`.", stacklevel=2)

    @staticmethod
    def _from_bundle(folder: Path, sha256: str | None) -> tuple[dict, dict | None, str, Path, dict[str, Path]]:
        """(model metadata, stored calibration, model id, film graph path, crop graph paths by
        network name) of a bundle with film_net.onnx."""
        meta = read_metadata(folder)  # a bundle without film_net.onnx was exported to the cache instead
        if sha256 and file_sha256(folder / "metadata.json").lower() != sha256.lower():
            raise BundleError(f"{folder}: sha256 of metadata.json does not match {sha256}")
        for name in (*ONNX_FILES.values(), CALIBRATION_FILE):
            if name in meta["files"] and file_sha256(folder / name) != meta["files"][name]:
                raise BundleError(f"{folder / name}: sha256 does not match metadata.json (the file was changed or damaged)")
        stored = json.loads((folder / CALIBRATION_FILE).read_text()) if CALIBRATION_FILE in meta["files"] else None
        crops = {name: folder / ONNX_FILES[name] for name in CROP_NETWORKS if ONNX_FILES[name] in meta["files"]}
        return meta["model"], stored, str(meta.get("id")), folder / ONNX_FILE, crops

    @staticmethod
    def _from_file(path: Path, sha256: str | None) -> tuple[dict, dict | None, str, dict[str, Path]]:
        """(model metadata, stored calibration, model id, crop graph paths by network name) of a
        .onnx file of :func:`export_onnx`."""
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
            graphs = json.loads(props.get(META_GRAPHS) or "{}")
        except ValueError as exc:
            raise BundleError(f"{path}: its metadata is not JSON ({exc})") from exc
        crops = {}
        for name in CROP_NETWORKS:
            if name not in graphs:
                continue
            companion = path.with_name(str(graphs[name]["file"]))
            if not companion.is_file():
                raise BundleError(f"{companion}: missing; {path.name} needs it beside it (its {name} graph)")
            if file_sha256(companion) != graphs[name]["sha256"]:
                raise BundleError(f"{companion}: sha256 does not match the one {path.name} records "
                                  f"(the file was changed or belongs to another export)")
            crops[name] = companion
        return json.loads(props[META_MODEL]), stored, props.get(META_CHECKPOINT_ID) or file_sha256(path)[:16], crops

    def film_outputs(self, images) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
        if isinstance(images, torch.Tensor):
            images = images.detach().to("cpu", torch.float32).numpy()
        x = np.ascontiguousarray(images, dtype=np.float32)
        expected = (1, *self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(x.shape)}; this model takes (batch, {', '.join(map(str, expected))})")
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, {INPUT_NAME: x})))
        logits = outputs.pop(VERTEBRA_LOGITS, None)
        probs = {name: np.asarray(v, dtype=np.float32) for name, v in outputs.items()}
        return probs, torch.from_numpy(logits) if logits is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a model's networks to ONNX: the film network (probabilities, "
                                                 "heatmap and vertebra maps), the crop network and the point refiner.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a bundle folder or a registry name")
    source.add_argument("--checkpoint", help="a training checkpoint (.ckpt)")
    parser.add_argument("--onnx", default=None,
                        help="output .onnx file of the film network, with NAME.crop_net.onnx and "
                             "NAME.point_refiner.onnx beside it (each written atomically)")
    parser.add_argument("--bundle-out", default=None,
                        help="write a new version of the bundle with the .onnx graphs added (the input is not changed)")
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
        graphs = bundle_graphs(bundle, args.opset, args.exporter)
        if args.onnx:
            crops = {name: graphs[ONNX_FILES[name]] for name in CROP_NETWORKS if ONNX_FILES[name] in graphs}
            print(write_standalone(bundle, args.onnx, film=graphs[ONNX_FILE], crops=crops)[-1])
        if args.bundle_out:
            new = bundle.derive("onnx export", note=f"networks exported to {', '.join(graphs)} (opset {args.opset})")
            new.extra_files.update(graphs)
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
