"""Per-vertebra geometry shared by training and inference.

Two stages find and read each vertebra (see models/vertebra_net.py):

1. The film-level network marks each vertebral body's centre on a stride-8 grid (a
   CenterNet-style heatmap), regresses the six morphometry points from that cell as offsets,
   and scores the vertebra's level (T1-L5).
2. A crop network refines the six points and gives the vertebra's fracture and acuity
   probabilities from a square crop of the *original* film around it, so that the 2-3 px
   signs of acuity are not lost to the film-level resize.

This module holds the geometry both stages agree on: the level coding, the stage-1 targets
and the crop window (an affine map from original pixels to crop pixels).
"""
from __future__ import annotations

import cv2
import numpy as np

from data.geometry import body_height
from data.morphometry import LEVELS

LEVEL_INDEX = {name: i for i, name in enumerate(LEVELS)}
N_LEVELS = len(LEVELS)
# Stage-1 channel layout: centre heatmap, 12 point offsets (x, y for p1..p6), level logits.
VERTEBRA_CHANNELS = 1 + 12 + N_LEVELS
# Offsets are stored in units of OFFSET_SCALE heatmap cells, so a body's points fall in about [-1, 1].
OFFSET_SCALE = 4.0
CROP_SIZE = 96
# Crop side = CROP_CONTEXT x the body's larger extent: the neighbouring endplates and discs stay in view.
CROP_CONTEXT = 1.8
def level_code(level) -> int:
    """0-16 for T1-L5; -1 (ignored by the loss) for transitional or missing levels."""
    return LEVEL_INDEX.get(str(level).strip(), -1)


def crop_matrix(centre, side, angle_deg: float = 0.0, out: int = CROP_SIZE) -> np.ndarray:
    """2x3 affine map from original-image pixel centres to crop pixel centres.

    The crop is a square of ``side`` original pixels (or ``(side_x, side_y)``: a rectangle,
    each axis scaled on its own) centred on ``centre``, rotated by ``angle_deg`` (training
    jitter; the point refiner's tilt), resampled to ``out`` x ``out``.
    """
    cx, cy = float(centre[0]), float(centre[1])
    side_x, side_y = (side, side) if np.ndim(side) == 0 else side
    sx, sy = out / max(float(side_x), 1e-3), out / max(float(side_y), 1e-3)
    a = np.deg2rad(angle_deg)
    c, si = np.cos(a), np.sin(a)
    half = (out - 1) / 2.0
    return np.array([[sx * c, sx * si, half - sx * (c * cx + si * cy)],
                     [-sy * si, sy * c, half - sy * (-si * cx + c * cy)]], dtype=np.float64)


def apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    return xy @ matrix[:, :2].T + matrix[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def extract_crop(image: np.ndarray, matrix: np.ndarray, out: int = CROP_SIZE) -> np.ndarray:
    """Resample the crop; a large window is blurred first so the downsampling does not alias."""
    matrix = np.asarray(matrix, dtype=np.float64)
    # the smaller of the two axes' scales (a point-refiner window scales them differently)
    zoom = float(min(np.hypot(matrix[0, 0], matrix[0, 1]), np.hypot(matrix[1, 0], matrix[1, 1])))
    src = image
    if zoom < 0.5:
        # blur only the window's source region (plus the kernel's reach), not the whole film
        sigma = 0.5 / zoom - 0.5
        corners = apply_affine(invert_affine(matrix), np.array([[-1, -1], [out, -1], [-1, out], [out, out]], float))
        margin = int(np.ceil(4 * sigma)) + 2
        x0, y0 = np.floor(corners.min(axis=0)).astype(int) - margin
        x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + margin
        h, w = image.shape[:2]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((out, out), dtype=image.dtype)
        src = cv2.GaussianBlur(np.ascontiguousarray(image[y0:y1, x0:x1]), (0, 0), sigmaX=sigma,
                               borderType=cv2.BORDER_REPLICATE)
        matrix = matrix.copy()
        matrix[:, 2] += matrix[:, :2] @ np.array([x0, y0], dtype=np.float64)
    return cv2.warpAffine(src, matrix.astype(np.float32), (out, out), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def stage1_targets(points: np.ndarray, levels: list[int], grid_hw: tuple[int, int], stride: int) -> dict:
    """Dense targets on the stride grid from vertebra points in network-input pixels.

    ``centre`` (1, h, w): a Gaussian per body, 1 at the cell holding its centre; ``offsets``
    (12, h, w) and ``level`` (h, w, -1 = none) are set at those cells only; ``offset_mask`` (h, w).
    """
    h, w = grid_hw
    centre = np.zeros((1, h, w), np.float32)
    offsets = np.zeros((12, h, w), np.float32)
    mask = np.zeros((h, w), np.float32)
    level = np.full((h, w), -1, np.int64)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    if len(pts) == 0:
        return {"centre": centre, "offsets": offsets, "offset_mask": mask, "level": level}
    ys, xs = np.mgrid[0:h, 0:w]
    heights = body_height(pts)
    for p, lvl, height in zip(pts, levels, heights):
        c = p.mean(axis=0)
        gx, gy = (c + 0.5) / stride - 0.5  # grid coordinates of the centre
        j, i = int(round(gx)), int(round(gy))
        if not (0 <= i < h and 0 <= j < w):
            continue
        sigma = float(np.clip(0.25 * height / stride, 0.5, 2.0))
        g = np.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * sigma ** 2)).astype(np.float32)
        centre[0] = np.maximum(centre[0], g)
        centre[0, i, j] = 1.0
        cell = (np.array([j, i], dtype=np.float64) + 0.5) * stride - 0.5
        offsets[:, i, j] = ((p - cell) / (stride * OFFSET_SCALE)).reshape(-1)
        mask[i, j] = 1.0
        level[i, j] = lvl
    return {"centre": centre, "offsets": offsets, "offset_mask": mask, "level": level}
