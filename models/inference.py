"""Batch inference: probabilities and heatmaps for files, folders or manifests.

Outputs are described in ``docs/formats.md``. Every file is written atomically; an input that
cannot be read gets an ``error`` row and the run goes on.

A checkpoint calibrated by ``python -m models.calibration`` (it holds ``vcf_calibration``) gives
calibrated probabilities and a yes/no ``decision`` at an operating point (the stored default, or
the one asked for); see ``docs/formats.md``, "Calibration and operating points".
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.io_utils import atomic_save_npy, atomic_write_image, atomic_write_json, atomic_write_text
from data.discovery import find_inputs
from data.readers import ImageReadError, read_image
from data.transforms import letterbox, normalize_intensity
from models.calibration import CALIBRATION_KEY, predictor_calibration
from models.checkpoint import build_network, file_sha256, load_checkpoint
from models.network import HEATMAP_STRIDE, FractureNet
from models.visualize import overlay_heatmap

PREDICTION_COLUMNS = ["image", "name", "p_fracture", "p_acute", "p_acute_given_fracture",
                      "heatmap_peak_x", "heatmap_peak_y", "status", "error",
                      # with a calibrated checkpoint: 1/0 at the operating point (empty otherwise)
                      "decision", "operating_point"]
OVERLAY_MAX_SIDE = 1024  # overlays are downsized to this long side; the .npy keeps full detail


def collect_inputs(inputs: list[str | os.PathLike]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files, folders (recursively), manifest CSVs and DICOMDIRs into image paths.

    Returns ``(paths, problems)``: problems are inputs that could not be listed, with a reason.
    See :func:`data.discovery.find_inputs` for the rules."""
    return find_inputs([os.fspath(i) for i in inputs])


def output_names(paths: list[str]) -> list[str]:
    """A file stem per input; stems shared by several inputs get a short hash of the path."""
    stems = [Path(p).stem or Path(p).name for p in paths]
    counts = pd.Series(stems).value_counts()
    return [s if counts[s] == 1 else f"{s}_{hashlib.sha1(p.encode()).hexdigest()[:8]}" for s, p in zip(stems, paths)]


class InferenceDataset(Dataset):
    def __init__(self, paths: list[str], image_size: tuple[int, int], voi_lut: bool = False,
                 max_pixels: int = 50_000_000):
        self.paths, self.image_size, self.voi_lut, self.max_pixels = paths, tuple(image_size), voi_lut, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            img = read_image(path, voi_lut=self.voi_lut, max_pixels=self.max_pixels)
        except ImageReadError as exc:
            return {"index": i, "error": exc.reason}
        except Exception as exc:  # a reader bug must not end a batch run
            return {"index": i, "error": f"{type(exc).__name__}: {exc}"}
        pixels = normalize_intensity(img.pixels)
        x, box = letterbox(pixels, self.image_size)
        h, w = pixels.shape
        f = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
        display = cv2.resize(pixels, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else pixels
        return {"index": i, "image": torch.from_numpy(x)[None], "box": box, "display": display,
                "image_size": (h, w), "pixel_spacing_mm": img.pixel_spacing_mm,
                "dicom": dict(img.info) if img.source_format == "dicom" else None}


def _identifiers(path: str) -> dict:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return {kw: str(ds.get(kw, "")) for kw in IDENTIFIER_KEYWORDS}


def _write_dicom_outputs(out: Path, path: str, name: str, overlay_bgr: np.ndarray, record: dict,
                         options: OutputOptions) -> dict:
    """DICOM Secondary Capture of the overlay and a Comprehensive SR, referencing the source."""
    import pydicom

    from models import dicom_out

    source = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    written = {}
    if options.dicom_sc:
        sc = dicom_out.secondary_capture(source, overlay_bgr, keep_identifiers=options.keep_identifiers)
        dicom_out.write_dicom(sc, out / f"{name}_sc.dcm")
        written["secondary_capture"] = f"{name}_sc.dcm"
    if options.dicom_sr:
        findings = {k: record[k] for k in ("p_fracture", "p_acute")}
        findings["vertebrae"] = record.get("vertebrae", [])
        sr = dicom_out.structured_report(source, findings, keep_identifiers=options.keep_identifiers)
        dicom_out.write_dicom(sr, out / f"{name}_sr.dcm")
        written["structured_report"] = f"{name}_sr.dcm"
    return written


def _collate(batch: list[dict]) -> list[dict]:
    return batch


@dataclass
class InferenceSummary:
    n_ok: int
    n_failed: int
    seconds: float
    predictions_csv: Path
    n_skipped: int = 0  # complete outputs found by --resume


@dataclass(frozen=True)
class OutputOptions:
    keep_identifiers: bool = False
    dicom_sc: bool = False
    dicom_sr: bool = False


IDENTIFIER_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate")


class Predictor:
    """A loaded checkpoint, ready to run on batches.

    With a calibrated checkpoint, the probabilities it returns are calibrated (``calibrator``)
    and ``p_fracture_uncalibrated`` is added; ``operating_point`` (default: the stored one)
    names the threshold of the ``decision`` written per image."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", sha256: str | None = None,
                 operating_point: str | None = None):
        self.checkpoint = Path(checkpoint)
        ckpt = load_checkpoint(self.checkpoint, sha256=sha256)
        self.net, self.meta = build_network(ckpt, self.checkpoint)
        self.calibrator, self.operating_point = predictor_calibration(ckpt.get(CALIBRATION_KEY), self.checkpoint,
                                                                      operating_point)
        self.checkpoint_id = file_sha256(self.checkpoint)[:16]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.net.to(self.device)
        self.image_size = tuple(self.meta["image_size"])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        out = self.net(images.to(self.device))
        probs = {k: v.float().cpu().numpy() for k, v in FractureNet.probabilities(out).items()}
        return self.calibrator.apply_probabilities(probs) if self.calibrator is not None else probs


def _heatmap_peak(heatmap: np.ndarray, to_image: dict) -> tuple[list[float], float]:
    i, j = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    s, (ox, oy) = to_image["scale"], to_image["offset"]
    return [float(s * j + ox), float(s * i + oy)], float(heatmap[i, j])


def _heatmap_on_display(heatmap: np.ndarray, box, display_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """Resample the letterboxed heatmap onto the (downsized) original image."""
    H, W = box.out_hw
    up = cv2.resize(heatmap, (W, H), interpolation=cv2.INTER_LINEAR)
    nh, nw = round(image_hw[0] * box.scale), round(image_hw[1] * box.scale)
    crop = up[box.pad_top:box.pad_top + nh, box.pad_left:box.pad_left + nw]
    return cv2.resize(crop, (display_hw[1], display_hw[0]), interpolation=cv2.INTER_LINEAR)


def _decision_of(predictor) -> tuple:
    """(calibrator, operating point name, threshold) of a predictor, or Nones without calibration."""
    cal = getattr(predictor, "calibrator", None)
    if cal is None:
        return None, None, None
    point = getattr(predictor, "operating_point", None) or cal.default
    return cal, point, cal.threshold(point)


def _decision_columns(record: dict) -> dict:
    decision = record.get("decision")
    if not decision:
        return {"decision": "", "operating_point": ""}
    return {"decision": "1" if decision["fracture"] else "0", "operating_point": decision["operating_point"]}


def _completed_row(out: Path, path: str, name: str, decision: tuple | None = None) -> dict | None:
    """The predictions row of an input whose outputs are all present (for --resume).

    The JSON is written last, so its presence means the heatmaps before it are complete.
    ``decision``: the (operating point, threshold) this run decides at, or None; an output
    decided otherwise is not complete."""
    record_path = out / f"{name}.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("image") != path:
        return None
    if not all((out / f).is_file() for f in (record["heatmap"]["npy"], record["heatmap"]["png"])):
        return None
    had = record.get("decision")
    if decision is not None and (not had or (had.get("operating_point"), had.get("threshold")) != decision):
        return None
    if decision is None and had:
        return None
    peak = record["heatmap_peak"]
    return {"image": path, "name": name, "p_fracture": record["p_fracture"], "p_acute": record["p_acute"],
            "p_acute_given_fracture": record["p_acute_given_fracture"], "heatmap_peak_x": peak[0],
            "heatmap_peak_y": peak[1], "status": "ok", "error": "", **_decision_columns(record)}


def run_inference(predictor: Predictor, inputs: list[str], out: str | os.PathLike, batch_size: int = 8,
                  num_workers: int = 0, voi_lut: bool = False, max_pixels: int = 50_000_000,
                  progress: bool = True, resume: bool = False, keep_identifiers: bool = False,
                  dicom_sc: bool = False, dicom_sr: bool = False) -> InferenceSummary:
    """Run ``predictor`` over every input and write the outputs of docs/formats.md.

    ``resume`` skips inputs whose outputs are complete. ``dicom_sc`` / ``dicom_sr`` add a
    DICOM Secondary Capture of the overlay / a Comprehensive SR for DICOM inputs. Patient
    name, ID and birth date are left out of every output unless ``keep_identifiers``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    paths, problems = collect_inputs(inputs)
    names = output_names(paths)
    rows: list[dict] = [{"image": p, "name": "", "status": "error", "error": why} for p, why in problems]
    todo = list(range(len(paths)))
    if resume:
        _, point, threshold = _decision_of(predictor)
        decision = (point, threshold) if point is not None else None
        done = {i: _completed_row(out, paths[i], names[i], decision) for i in todo}
        rows += [r for r in done.values() if r is not None]
        todo = [i for i in todo if done[i] is None]
    options = OutputOptions(keep_identifiers=keep_identifiers, dicom_sc=dicom_sc, dicom_sr=dicom_sr)
    dataset = InferenceDataset([paths[i] for i in todo], predictor.image_size, voi_lut=voi_lut, max_pixels=max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc="inference", unit="img", disable=not progress)
    for batch in loader:
        good = [b for b in batch if "error" not in b]
        for b in batch:
            if "error" in b:
                i = todo[b["index"]]
                rows.append({"image": paths[i], "name": names[i], "status": "error", "error": b["error"]})
        if good:
            probs = predictor(torch.stack([b["image"] for b in good]))
            for k, b in enumerate(good):
                i = todo[b["index"]]
                try:
                    rows.append(_write_outputs(predictor, out, paths[i], names[i], b,
                                               {key: v[k] for key, v in probs.items()}, options))
                except Exception as exc:  # e.g. a full disk: record it, keep going
                    rows.append({"image": paths[i], "name": names[i], "status": "error",
                                 "error": f"writing outputs failed: {type(exc).__name__}: {exc}"})
        bar.update(len(batch))
    bar.close()
    table = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    atomic_write_text(out / "predictions.csv", table.to_csv(index=False))
    errors = table[table["status"] != "ok"][["image", "name", "error"]]
    atomic_write_text(out / "errors.csv", errors.to_csv(index=False))
    n_failed = len(errors)
    return InferenceSummary(n_ok=len(table) - n_failed, n_failed=n_failed, seconds=time.time() - start,
                            predictions_csv=out / "predictions.csv", n_skipped=len(paths) - len(todo))


def _write_outputs(predictor: Predictor, out: Path, path: str, name: str, item: dict, p: dict,
                   options: OutputOptions = OutputOptions()) -> dict:
    heatmap = p["heatmap"].astype(np.float32)
    to_image = item["box"].heatmap_to_image(HEATMAP_STRIDE)
    peak, peak_value = _heatmap_peak(heatmap, to_image)
    atomic_save_npy(out / f"{name}_heatmap.npy", heatmap)
    display = item["display"]
    on_display = _heatmap_on_display(heatmap, item["box"], display.shape, item["image_size"])
    f = display.shape[1] / item["image_size"][1]
    overlay = overlay_heatmap(display, on_display, peak=(peak[0] * f, peak[1] * f),
                              label=f"p(fracture) {p['p_fracture']:.2f}  p(acute) {p['p_acute']:.2f}")
    atomic_write_image(out / f"{name}_heatmap.png", overlay)
    record = {
        "image": path,
        "name": name,
        "p_fracture": float(p["p_fracture"]),
        "p_acute": float(p["p_acute"]),
        "p_acute_given_fracture": float(p["p_acute_given_fracture"]),
        "heatmap_peak": peak,
        "heatmap_peak_value": peak_value,
        "image_size": list(item["image_size"]),
        "pixel_spacing_mm": list(item["pixel_spacing_mm"]) if item["pixel_spacing_mm"] else None,
        "heatmap": {"npy": f"{name}_heatmap.npy", "png": f"{name}_heatmap.png", "shape": list(heatmap.shape),
                    "to_image": to_image},
        "checkpoint_id": predictor.checkpoint_id,
        "model": {k: predictor.meta.get(k) for k in ("architecture", "backbone", "code_version", "image_size")},
        "note": "Research software trained on synthetic data unless stated otherwise; not for clinical use.",
    }
    cal, point, threshold = _decision_of(predictor)
    if cal is not None:
        if "p_fracture_uncalibrated" in p:
            record["p_fracture_uncalibrated"] = float(p["p_fracture_uncalibrated"])
        stored = cal.operating_points[point]
        record["decision"] = {"operating_point": point, "threshold": threshold,
                              "fracture": bool(record["p_fracture"] >= threshold),
                              "validation_sensitivity": stored.get("sensitivity"),
                              "validation_specificity": stored.get("specificity")}
        record["calibration"] = {"method": cal.method, "fitted_on_images": cal.info.get("n_images"),
                                 "split": cal.info.get("split"), "date": cal.info.get("date")}
    if item.get("dicom"):
        record["dicom"] = item["dicom"]  # UIDs and modality; identifiers only with keep_identifiers
        if options.keep_identifiers:
            record["patient"] = _identifiers(path)
        if options.dicom_sc or options.dicom_sr:
            record["dicom_outputs"] = _write_dicom_outputs(out, path, name, overlay, record, options)
    atomic_write_json(out / f"{name}.json", record)  # last: its presence marks a complete output
    return {"image": path, "name": name, "p_fracture": record["p_fracture"], "p_acute": record["p_acute"],
            "p_acute_given_fracture": record["p_acute_given_fracture"], "heatmap_peak_x": peak[0],
            "heatmap_peak_y": peak[1], "status": "ok", "error": "", **_decision_columns(record)}
