"""Point refinement: a third stage that re-reads each body's six points in its own frame.

The crop network (models/vertebra_net.py) reads a square window 1.8 x the body's larger
extent, unrotated. On an AP film a body is about 1.7 x wider than tall, so that window spans
about three bodies vertically and the body's height gets only ~30 of its 96 pixels; on a
scoliotic spine the body is also tilted in it. The refiner reads a window in the body's own
frame instead: rotated so that its endplates run horizontally, ``WIDTH_CONTEXT`` x its width
wide and ``HEIGHT_CONTEXT`` x its height tall, resampled to ``REFINE_SIZE`` square (so the
two axes are scaled differently). Its network is a :class:`VertebraNet` (only the points are
used), started from the crop network's weights.

It only moves points: the vertebra's ``p_fracture`` and ``p_acute`` stay the crop network's.
The morphometry (heights, grade, height loss) is measured on the refined points.

Fit it on a model's own training split; it is stored in a new version of the model's bundle
(``point_refiner.safetensors``, its config in ``metadata.json``)::

    python -m training.point_refiner --model BUNDLE --manifest M.csv --out NEW_BUNDLE [--epochs 6]

Inference (``infer.py``) uses it whenever the bundle holds one. Training checkpoints stored it
under the ``point_refiner`` key (``{"state_dict", "config", "training"}``; :func:`load_refiner`),
which the export to a bundle reads. Calibrate the new version again
(``python -m calibration``): the morphometry combiner is fitted on the heights the points give.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from data.geometry import body_height, endplate_width, unmirror_points
from data.vertebra_targets import apply_affine, crop_matrix, extract_crop, invert_affine
from models.vertebra_net import ReadingSteps, VertebraNet, read_one

log = logging.getLogger(__name__)

REFINER_KEY = "point_refiner"
REFINE_SIZE = 96
WIDTH_CONTEXT = 1.7  # window width / mean endplate length
HEIGHT_CONTEXT = 2.2  # window height / mean body height
REFINE_PASSES = 2  # reads per body, each in the frame of the previous reading
# the last pass also reads the window mirrored and averages the two readings: on the AASCE validation
# films the median point error fell by 0.05 and 0.17 points of the height (benchmarks/RESULTS.md)
REFINE_FLIP = True
MIN_SIDE = 8.0  # original pixels: a collapsed guess still gets a window
# Training windows are placed as far off as the crop network's readings leave them. Measured on
# 40 AASCE validation films (crop readings from truth-placed windows, 2 passes): centre off by
# sd 0.05 of the width along the endplates and 0.09 of the height across them; width and height
# off by sd 0.12 and 0.15 in log ratio; tilt off by sd 4.7 degrees.
JITTER_SHIFT, JITTER_SHIFT_MAX = (0.06, 0.10), 0.25  # (along, across) the endplates
JITTER_SCALE, JITTER_SCALE_MAX = 0.14, 0.35  # log ratio, width and height drawn apart
JITTER_ANGLE_DEG = 6.0
# Training loss units. "height": each point's distance to the truth in original pixels, as a
# fraction of the body's height, the unit the benchmark reports (the window is scaled more
# along the endplates than across them, so window pixels under-weight the along-endplate error,
# the larger part on AP films). "window": the mean absolute error in window pixels (refiners
# stored before the option).
LOSS_UNITS = ("height", "window")


def body_frames(points: np.ndarray) -> dict[str, np.ndarray]:
    """Each body's centre (n, 2), tilt (n,, radians), width and height (n,) in pixels.

    The tilt is the mean endplate direction's, folded into (-90, 90] degrees so that a window
    is never turned upside down (anterior stays on whichever side the film has it)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    direction = (p[:, 2] - p[:, 0]) + (p[:, 5] - p[:, 3])
    # fold into (-90, 90]: point the endplate direction rightwards (straight down counts as up)
    eps = 1e-9 * np.linalg.norm(direction, axis=1)
    flip = (direction[:, 0] < -eps) | ((np.abs(direction[:, 0]) <= eps) & (direction[:, 1] < 0))
    direction = np.where(flip[:, None], -direction, direction)
    return {"centre": p.mean(axis=1), "angle": np.arctan2(direction[:, 1], direction[:, 0]),
            "width": endplate_width(p), "height": body_height(p)}


def frame_matrix(centre, angle: float, width: float, height: float, out: int = REFINE_SIZE,
                 context: tuple[float, float] = (WIDTH_CONTEXT, HEIGHT_CONTEXT)) -> np.ndarray:
    """2x3 affine map from original pixels to the window's pixels: rotate by ``-angle`` about
    ``centre``, then scale each axis so the window spans ``context[0] * width`` by
    ``context[1] * height``. The window is at least ``MIN_SIDE`` and at most 3:1 per side
    (a collapsed body's height is never read from a sliver)."""
    side_x = max(context[0] * float(width), MIN_SIDE)
    side_y = max(context[1] * float(height), MIN_SIDE, side_x / 3)
    side_x = max(side_x, side_y / 3)
    return crop_matrix(centre, (side_x, side_y), math.degrees(angle), out)


def frame_matrices(points: np.ndarray, rng: np.random.Generator | None = None, out: int = REFINE_SIZE,
                   context: tuple[float, float] = (WIDTH_CONTEXT, HEIGHT_CONTEXT)) -> list[np.ndarray]:
    """One window per body, placed from ``points``; with ``rng``, jittered as in training."""
    f = body_frames(points)
    mats = []
    for centre, angle, width, height in zip(f["centre"], f["angle"], f["width"], f["height"]):
        if rng is not None:
            shift = np.clip(rng.normal(0, JITTER_SHIFT), -JITTER_SHIFT_MAX, JITTER_SHIFT_MAX)
            c, s = math.cos(angle), math.sin(angle)
            centre = centre + shift[0] * width * np.array([c, s]) + shift[1] * height * np.array([-s, c])
            width *= float(np.exp(np.clip(rng.normal(0, JITTER_SCALE), -JITTER_SCALE_MAX, JITTER_SCALE_MAX)))
            height *= float(np.exp(np.clip(rng.normal(0, JITTER_SCALE), -JITTER_SCALE_MAX, JITTER_SCALE_MAX)))
            angle += math.radians(float(rng.normal(0, JITTER_ANGLE_DEG)))
        mats.append(frame_matrix(centre, angle, width, height, out, context))
    return mats


def build_refiner(config: dict, pretrained: str | None = None) -> VertebraNet:
    """The refiner's network, carrying the window it was trained with (``context``, ``passes``).
    ``pretrained``: as for :class:`VertebraNet`."""
    net = VertebraNet(backbone=config.get("backbone", "resnet18"), crop_size=int(config.get("size", REFINE_SIZE)),
                      pretrained=pretrained)
    net.context = (float(config.get("width_context", WIDTH_CONTEXT)), float(config.get("height_context", HEIGHT_CONTEXT)))
    net.passes = int(config.get("passes", REFINE_PASSES))
    net.flip = bool(config.get("flip", False))  # refiners stored before the option: not mirrored
    return net


def refine_points(net: torch.nn.Module, image: np.ndarray, points: np.ndarray, device: torch.device,
                  passes: int | None = None, flip: bool | None = None) -> np.ndarray:
    """Refined points (n, 6, 2) in original pixels, each pass read in the frame of the last.

    ``image``: the normalised original pixels; ``points``: (n, 6, 2) in original pixels. The
    window, the number of passes and ``flip`` (the last pass also reads each window mirrored
    and averages the two readings) are the ones stored with ``net`` (:func:`build_refiner`)
    unless given here. Many films' bodies are refined together with :func:`refine_steps` and
    :func:`models.vertebra_net.read_in_batches`."""
    return read_one(refine_steps(net, image, points, passes, flip), {REFINER_KEY: net}, device)


def refine_steps(net: torch.nn.Module, image: np.ndarray, points: np.ndarray, passes: int | None = None,
                 flip: bool | None = None, grid=None) -> ReadingSteps:
    """:func:`refine_points` as a reading in steps: it yields its windows for the network named
    ``REFINER_KEY`` (``net`` gives the window, passes and flip) and returns the refined points.
    ``grid``: where ``image``'s pixels lie on the film of ``points`` (data.vertebra_targets.extract_crop)."""
    passes = int(getattr(net, "passes", REFINE_PASSES)) if passes is None else passes
    flip = bool(getattr(net, "flip", False)) if flip is None else flip
    context = tuple(getattr(net, "context", (WIDTH_CONTEXT, HEIGHT_CONTEXT)))
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    if len(pts) == 0:
        return pts
    size = int(getattr(net, "crop_size", REFINE_SIZE))
    for k in range(passes):
        mats = frame_matrices(pts, out=size, context=context)
        crops = np.stack([extract_crop(image, m, out=size, grid=grid) for m in mats])[:, None].astype(np.float32)
        read, _ = yield REFINER_KEY, crops
        read = read.astype(np.float64)
        if flip and k == passes - 1:
            mirrored, _ = yield REFINER_KEY, np.ascontiguousarray(crops[..., ::-1])
            read = (read + unmirror_points(mirrored, read, size)) / 2
        pts = np.stack([apply_affine(invert_affine(m), p) for m, p in zip(mats, read)])
    return pts


def load_refiner(ckpt: dict, path: str | Path = "checkpoint") -> VertebraNet | None:
    """The refiner stored in a checkpoint, ready to run, or None when it holds none. A malformed
    entry raises ValueError naming ``path``."""
    entry = ckpt.get(REFINER_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("state_dict"), dict):
        raise ValueError(f"{path}: malformed {REFINER_KEY!r} entry (expected a dict with a state_dict)")
    config = entry.get("config") or {}
    try:
        if not isinstance(config, dict):
            raise TypeError(f"config is a {type(config).__name__}, not a dict")
        net = build_refiner(config)
        if net.passes < 1 or min(net.context) <= 0 or net.crop_size < 16:
            raise ValueError(f"passes {net.passes}, context {net.context}, size {net.crop_size} out of range")
        net.load_state_dict(entry["state_dict"])
    except Exception as exc:  # any shape, key or value problem: the file is at fault, say which
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: the point refiner's weights or config do not fit ({detail})") from exc
    return net.eval()


