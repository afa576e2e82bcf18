"""Export a training checkpoint as a model bundle (models/bundle.py).

    python -m training.export --checkpoint runs/demo/best.ckpt --out runs/demo/bundle \
        [--name NAME] [--version 0.1.0] [--storage fp32|fp16|int8] [--onnx]

The checkpoint is read with ``torch.load(weights_only=True)``; the bundle keeps its networks
(film network, crop network, point refiner), its calibration, what it was trained on and its
training settings, and drops the optimizer state. ``--onnx`` also writes the networks as ONNX
graphs (``film_net.onnx``, ``crop_net.onnx``, ``point_refiner.onnx``) into the bundle
(models/onnx_export.py). The model card (README.md) is written
from the bundle.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from calibration.calibrator import CALIBRATION_KEY, Calibrator  # CALIBRATION_KEY: where checkpoints kept one
from calibration.methods import CalibrationError
from evaluation.model_card import bundle_card, manifest_composition
from models.bundle import (INTENDED_USE, MODALITIES, OUTPUTS, TASK, Bundle, BundleError, ModelError, file_sha256,
                           network_spec)
from models.onnx_export import bundle_graphs
from models.point_refiner import REFINER_KEY, load_refiner
from training.checkpoint import CheckpointError, build_network, build_vertebra_network, load_checkpoint


def _views(composition: dict | None) -> list[str]:
    views = sorted(v for v in (composition or {}).get("views", {}) if v != "unknown")
    return views or ["lateral"]


def bundle_from_checkpoint(checkpoint: str | Path, sha256: str | None = None, name: str | None = None,
                           version: str = "0.1.0") -> Bundle:
    """The bundle of a Lightning checkpoint of this project, in memory (nothing written).

    Its ``id`` is the first 16 hex digits of the checkpoint file's sha256 until it is saved,
    so outputs made from a checkpoint name the same model as before bundles."""
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint, sha256=sha256)
    film_net, model = build_network(ckpt, checkpoint)
    networks = {"film_net": film_net}
    if "crop_size" in model:
        networks["crop_net"] = build_vertebra_network(ckpt, checkpoint)
    refiner_entry = ckpt.get(REFINER_KEY)
    try:
        refiner = load_refiner(ckpt, checkpoint) if "crop_net" in networks else None
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if refiner is not None:
        networks["point_refiner"] = refiner
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    composition = manifest_composition(data.get("manifest"))
    digest = file_sha256(checkpoint)
    history = [{"step": "export", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "from": {"checkpoint": checkpoint.name, "sha256": digest}}]
    if isinstance(ckpt.get("crop_finetune"), dict):
        history.insert(0, {"step": "crop fine-tune", "record": ckpt["crop_finetune"]})
    metadata = {
        "name": name or checkpoint.parent.name or "model",
        "version": version,
        "id": digest[:16],
        "task": TASK,
        "intended_use": INTENDED_USE,
        "input": {"modality": MODALITIES, "views": _views(composition), "channels": 1,
                  "value_range": list(model.get("input_range", [0.0, 1.0])),
                  "input_size": list(model["image_size"]),
                  "preparation": "percentile intensity normalisation to [0, 1], letterboxed to input_size"},
        "outputs": OUTPUTS,
        "model": model,
        "networks": network_spec(networks, (refiner_entry or {}).get("config")),
        "training": {"hyper_parameters": ckpt.get("hyper_parameters") or {}, "data": data,
                     "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"),
                     "lightning_version": ckpt.get("pytorch-lightning_version")},
        "trained_on": composition or {"manifest": data.get("manifest"), "composition": "unknown (manifest not readable here)"},
        "history": history,
    }
    if isinstance(refiner_entry, dict):
        metadata["point_refiner_training"] = refiner_entry.get("training") or {}
    calibration = ckpt.get(CALIBRATION_KEY)
    if calibration is not None:
        try:  # refused here, not first by the inference that reads the bundle
            Calibrator.from_dict(calibration)
        except CalibrationError as exc:
            raise CalibrationError(f"{checkpoint}: {exc}") from None
    return Bundle(metadata=metadata, networks=networks, calibration=calibration)


def export_checkpoint(checkpoint: str | Path, out: str | Path, storage: str = "fp32", name: str | None = None,
                      version: str = "0.1.0", onnx: bool = False, overwrite: bool = False,
                      training_data: str | None = None) -> Path:
    """Write the bundle of ``checkpoint`` to folder ``out``; returns ``out``."""
    bundle = bundle_from_checkpoint(checkpoint, name=name, version=version)
    if onnx:
        bundle.extra_files.update(bundle_graphs(bundle))
    return bundle.save(out, storage=storage, card=lambda saved: bundle_card(saved, training_data=training_data),
                       overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a training checkpoint as a model bundle (no pickle to load).")
    p.add_argument("--checkpoint", required=True, help="a Lightning checkpoint of this project (.ckpt)")
    p.add_argument("--out", required=True, help="the bundle folder to write (must not exist, unless --overwrite)")
    p.add_argument("--name", default=None, help="bundle name (default: the checkpoint's folder name)")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--storage", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="weight storage: fp32, fp16 (half the size) or int8 (a quarter; per-channel scales)")
    p.add_argument("--onnx", action="store_true",
                   help="also write the networks as ONNX graphs (film_net.onnx, crop_net.onnx, point_refiner.onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--training-data", default=None, help="text describing the training data for the model card")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, storage=args.storage, name=args.name, version=args.version,
                                onnx=args.onnx, overwrite=args.overwrite, training_data=args.training_data)
    except (ModelError, CheckpointError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 1e6
    print(f"wrote bundle {out} ({size:.1f} MB, {args.storage})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
