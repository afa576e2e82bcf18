"""The predictor: a model ready to run on prepared films, and the dataset that prepares them.

:class:`Predictor` wraps a model bundle (models/bundle.py) and returns, per film, the film
probabilities, the heatmap and the per-vertebra analysis (inference/vertebrae.py), calibrated
when the bundle is. :class:`InferenceDataset` reads each input once (pixels and, for DICOM, the
parsed header) and letterboxes it to the network's input size. Writing outputs is
inference/pipeline.py's job.
"""
from __future__ import annotations

import copy
import ctypes
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from calibration import predictor_calibration
from data.io_utils import file_fingerprint
from data.readers import ImageReadError, read_image
from data.records import VertebraRecord
from data.transforms import letterbox, normalize_intensity
from data.vertebra_targets import CROP_CONTEXT, CROP_SIZE
from inference.acceptance import checked_spacing, contrast_refusal, refusal
from inference.drawing import grey_levels
from inference.loading import open_model
from inference.vertebrae import analyse_films, image_probabilities, with_morphometry
from models.fusion import fold_batch_norms
from models.network import HEATMAP_STRIDE, FractureNet

OVERLAY_MAX_SIDE = 1024  # overlays are downsized to this long side; the .npy keeps full detail
# films per forward pass of the film network: its activations grow with the batch (about 16 MB a
# film at 384 x 320) and a CPU runs 4 films no slower per film than 8
FILM_NET_CHUNK = 4

# Reduced decoding of large films (data/readers.py, ``min_decoded_size``). The crop network reads
# each body in a window of CROP_CONTEXT x its extent, resampled to CROP_SIZE pixels; a film decoded
# reduced loses nothing it uses while that window still spans at least CROP_MARGIN decoded pixels
# per crop pixel for the smallest body the film network meets: SMALLEST_BODY_INPUT pixels of its
# input (the larger of endplate width and height; the smallest on the 2492 training films is 12.3,
# on the held-out AASCE films 14.9). The film network, at a few hundred pixels, needs less.
SMALLEST_BODY_INPUT = 12.0
CROP_MARGIN = 1.0


def min_decoded_size(image_size: tuple[int, int], point_refiner: bool = False) -> tuple[int, int] | None:
    """The smallest size (rows, columns) a film may be decoded at for a model whose film network
    takes ``image_size``: the film letterboxed into it is not enlarged, so its smallest body keeps
    ``CROP_MARGIN`` decoded pixels per crop pixel. None (full size) for a model with a point
    refiner: it places points at the film's own resolution."""
    if point_refiner:
        return None
    multiple = CROP_MARGIN * CROP_SIZE / (CROP_CONTEXT * SMALLEST_BODY_INPUT)  # decoded pixels per input pixel
    return tuple(int(np.ceil(multiple * side)) for side in image_size)


class InferenceDataset(Dataset):
    """Each input read and prepared: a dict with the network ``image``, its letterbox ``box``,
    the normalised ``pixels`` and a downsized ``display``; ``{"index", "error"}`` for an input
    that cannot be read, ``{"index", "refused"}`` for one refused by inference/acceptance.py.
    An implausible pixel spacing is dropped and named in ``warnings``.

    ``min_decoded_size`` (:func:`min_decoded_size`): a large film is decoded reduced, no smaller
    than this; its ``pixels`` and ``display`` are then the reduced film, ``pixel_grid`` says
    where they lie on the film, and ``box``, ``image_size``, ``pixel_spacing_mm`` and everything
    computed from them stay in the original film's pixels. None: every film at full size."""

    def __init__(self, paths: list[str], image_size: tuple[int, int], voi_lut: bool = False,
                 max_pixels: int = 50_000_000, min_decoded_size: tuple[int, int] | None = None):
        self.paths, self.image_size, self.voi_lut, self.max_pixels = paths, tuple(image_size), voi_lut, max_pixels
        self.min_decoded_size = min_decoded_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            stat = os.stat(path)  # taken before the read: an input changed after it no longer matches its outputs
        except OSError:
            stat = None  # the reader says what is wrong
        try:
            img = read_image(path, voi_lut=self.voi_lut, max_pixels=self.max_pixels,
                             min_decoded_size=self.min_decoded_size)
            source = file_fingerprint(path, stat)
        except ImageReadError as exc:
            return {"index": i, "error": exc.reason}
        except Exception as exc:  # a reader bug must not end a batch run
            return {"index": i, "error": f"{type(exc).__name__}: {exc}"}
        refused = refusal(img)  # inference/acceptance.py: what cannot be a spine radiograph
        if not refused:
            pixels = normalize_intensity(img.pixels)
            refused = contrast_refusal(pixels)
        if refused:
            return {"index": i, "refused": refused}
        spacing, warning = checked_spacing(img.pixel_spacing_mm)
        x, box = letterbox(pixels, self.image_size)
        box = box.on_original(img.grid)  # maps the original film's pixels, however it was decoded
        h, w = img.original_size
        f = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
        size = (max(1, round(w * f)), max(1, round(h * f)))
        display = pixels if size == pixels.shape[::-1] else cv2.resize(
            pixels, size, interpolation=cv2.INTER_AREA if size[0] < pixels.shape[1] else cv2.INTER_LINEAR)
        display = grey_levels(display)  # what the overlay is drawn on, a quarter of the float's memory
        if img.grid.reduced:  # the fingerprint names it: --resume redoes a film decoded otherwise
            source["reduction"] = round(1 / img.grid.scale[0])
        return {"index": i, "image": torch.from_numpy(x)[None], "box": box, "display": display, "pixels": pixels,
                "pixel_grid": img.grid, "image_size": (h, w), "pixel_spacing_mm": spacing,
                "warnings": [warning] if warning else [],
                "source": {**source, "format": img.source_format}, "frames": img.frames,
                "dicom": dict(img.info) if img.source_format == "dicom" else None,
                # the reader's parsed header (no pixels): identifiers and DICOM outputs read it, not the file
                "dicom_header": img.header}


def collate_items(batch: list[dict]) -> list[dict]:
    return batch


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_init(parent_pid: int, worker_id: int) -> None:
    """A DataLoader worker's start (``worker_init_fn=functools.partial(worker_init, os.getpid())``):
    it is killed when the run that started it dies, even by SIGKILL, and it dies at once on
    SIGTERM. Without this a worker blocked writing a film into the pipe of a dead run waits
    forever, holding its memory. Linux only (prctl); elsewhere the DataLoader's own check of
    its parent (every few seconds, while idle) remains."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the run's handler (tables) is not the worker's
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the run died before the signal was set
        os._exit(1)



@dataclass
class FilmPrediction:
    """What :meth:`Predictor.predict` gives for one film, before anything is written.

    ``probs``: the film's ``p_fracture``, ``p_acute``, ``p_acute_given_fracture`` (agreeing with
    its vertebrae, calibrated when the model is), ``p_fracture_image_head`` and, calibrated,
    ``p_fracture_uncalibrated``; ``head``: the film head's raw probabilities; ``heatmap``: the
    dense head's map (stride 8, network input grid); ``vertebrae``: typed records."""

    probs: dict[str, float]
    heatmap: np.ndarray
    head: dict[str, float] = field(default_factory=dict)
    vertebrae: list[VertebraRecord] = field(default_factory=list)
    level_confidence: float | None = None
    levels_trusted: bool = False
    vertebra_error: str | None = None
    # the film network's strongest vertebral-body score (None where the backend has no such output)
    spine_score: float | None = None

    def vertebra_dicts(self) -> list[dict]:
        """The vertebrae in their JSON form (what drawing and the heatmap rules read)."""
        return [v.to_json_dict() for v in self.vertebrae]


class Predictor:
    """A loaded model, ready to run on batches.

    ``model``: a :class:`models.bundle.Bundle`, a bundle folder, a registry name
    (models/registry.json), or a training checkpoint (converted to a bundle in memory; export it
    once with ``python -m training.export`` instead). With a calibrated model the probabilities
    it returns are calibrated (``calibrator``) and ``p_fracture_uncalibrated`` is added;
    ``operating_point`` (default: the stored one) names the threshold of the ``decision``
    written per image. ``sha256``: the expected digest of the checkpoint file, or of the
    bundle's metadata.json."""

    backend = "torch"  # what runs the networks (inference.onnx's OnnxPredictor: "onnx")

    def __init__(self, model, device: str = "auto", sha256: str | None = None,
                 operating_point: str | None = None, calibrated: bool = True, allow_download: bool = False):
        self.bundle = open_model(model, sha256=sha256, allow_download=allow_download)
        self.checkpoint = self.bundle.path or Path(str(model))
        self.meta = self.bundle.model
        # the networks run with their norms folded into their convolutions; a bundle the caller
        # holds keeps its own (it may be saved again), so its networks are folded as copies
        networks = self.bundle.networks if self.bundle is not model else copy.deepcopy(self.bundle.networks)
        for net in networks.values():
            fold_batch_norms(net.eval())
        self.net = networks["film_net"]
        self.vertebra_net = networks.get("crop_net")
        self.point_refiner = networks.get("point_refiner") if self.vertebra_net is not None else None
        stored = self.bundle.calibration if calibrated else None
        self.calibrator, self.operating_point = predictor_calibration(stored, self.checkpoint, operating_point)
        self.checkpoint_id = self.bundle.id
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # channels-last weights: oneDNN's (and cuDNN's) faster convolutions, 15-25 % less time on a CPU
        self.net.to(self.device, memory_format=torch.channels_last)
        if self.vertebra_net is not None:
            self.vertebra_net.to(self.device, memory_format=torch.channels_last)
        if self.point_refiner is not None:
            self.point_refiner.to(self.device, memory_format=torch.channels_last)
        self.image_size = tuple(self.meta["image_size"])

    def _film_net(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The film network's outputs for a batch, run ``FILM_NET_CHUNK`` films at a time."""
        parts = [self.net(images[k:k + FILM_NET_CHUNK].to(self.device)) for k in range(0, len(images), FILM_NET_CHUNK)]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    @torch.inference_mode()
    def film_outputs(self, images: torch.Tensor) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
        """The film network's raw probabilities and heatmap, and its ``vertebra_logits`` (what
        the per-vertebra analysis decodes), for a batch of prepared films. With
        ``vertebra_net`` and ``point_refiner`` (called on a crop batch tensor, giving
        ``points`` and ``logits``) this is all a backend provides: inference.onnx's
        ``OnnxPredictor`` replaces the three and shares the rest."""
        out = self._film_net(images)
        return {k: v.float().cpu().numpy() for k, v in FractureNet.probabilities(out).items()}, out["vertebra_logits"]

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Film-level heads only (calibrated when the checkpoint is)."""
        probs, _ = self.film_outputs(images)
        return self.calibrator.apply_probabilities(probs) if self.calibrator is not None else probs

    @torch.inference_mode()
    def predict(self, items: list[dict]) -> list[FilmPrediction]:
        """A :class:`FilmPrediction` per film (its probabilities agree with its vertebrae, see
        inference.vertebrae.image_probabilities). ``items`` come from :class:`InferenceDataset`.

        Calibration is monotone, so it is applied to the film head and to every vertebra before
        they are combined: the combined probability is then the calibrated one, and no vertebra
        exceeds its film."""
        raw, vertebra_logits = self.film_outputs(torch.stack([b["image"] for b in items]))
        # the strongest vertebral-body score per film (none from a film graph without the vertebra maps)
        spine_scores = ([None] * len(items) if vertebra_logits is None else
                        torch.sigmoid(vertebra_logits[:, 0].float()).amax(dim=(1, 2)).cpu().numpy().tolist())
        analysed = [None] * len(items)
        if self.vertebra_net is not None and vertebra_logits is not None:  # every film's vertebrae in shared passes
            analysed = analyse_films(
                [{"vertebra_logits": vertebra_logits[k], "box": item["box"], "image": item["pixels"],
                  "grid": item.get("pixel_grid"), "pixel_spacing_mm": item.get("pixel_spacing_mm"),
                  "view": (item.get("dicom") or {}).get("ViewPosition")} for k, item in enumerate(items)],
                HEATMAP_STRIDE, self.vertebra_net, self.device, point_refiner=self.point_refiner)
        results = []
        for k, item in enumerate(items):
            head = {key: np.float64(raw[key][k]) for key in ("p_fracture", "p_acute", "p_acute_given_fracture")}
            film = {"vertebrae": [], "level_confidence": None, "levels_trusted": False}
            if isinstance(analysed[k], Exception):  # one film's vertebra analysis does not end the batch
                film["vertebra_error"] = f"{type(analysed[k]).__name__}: {analysed[k]}"
            elif analysed[k] is not None:
                film = analysed[k]
            combiner = self.calibrator.vertebra_combiner if self.calibrator is not None else None
            film["vertebrae"] = with_morphometry(film["vertebrae"], combiner)
            combined_raw = image_probabilities(head, film["vertebrae"])
            head_raw = dict(head)
            probs = combined_raw
            if self.calibrator is not None:
                # the film: the calibration of exactly what it was fitted on (the combined film)
                probs = {key: float(v) for key, v in self.calibrator.apply_probabilities(
                    {key: np.float64(combined_raw[key]) for key in ("p_fracture", "p_acute_given_fracture")}).items()}
                head = {key: float(v) for key, v in self.calibrator.apply_probabilities(head).items()}
                for v in film["vertebrae"]:  # the same monotone map, so no vertebra passes its film
                    cal = self.calibrator.apply_probabilities(
                        {"p_fracture": np.float64(v["p_fracture"]),
                         "p_acute_given_fracture": np.float64(v["p_acute_given_fracture"])})
                    v.update({key: float(cal[key]) for key in ("p_fracture", "p_acute", "p_acute_given_fracture")})
                    v["p_fracture_uncalibrated"] = float(cal["p_fracture_uncalibrated"])
                # p_fracture already agrees; p_acute is raised where a vertebra's calibrated one is higher
                probs = image_probabilities(probs, film["vertebrae"])
            probs = {key: float(probs[key]) for key in ("p_fracture", "p_acute", "p_acute_given_fracture")}
            probs["p_fracture_image_head"] = float(head["p_fracture"])
            if self.calibrator is not None:
                probs["p_fracture_uncalibrated"] = float(combined_raw["p_fracture"])
            trusted = bool(film.get("levels_trusted", False))
            results.append(FilmPrediction(
                probs=probs, heatmap=raw["heatmap"][k], head={key: float(v) for key, v in head_raw.items()},
                vertebrae=[VertebraRecord.from_json_dict(v) for v in film["vertebrae"]],
                level_confidence=film.get("level_confidence"), levels_trusted=trusted,
                vertebra_error=film.get("vertebra_error") or None,
                spine_score=None if spine_scores[k] is None else float(spine_scores[k])))
        return results
