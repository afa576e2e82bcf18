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

from data.geometry import POINT_COLUMNS, body_height
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


def film_vertebrae(rows) -> tuple | None:
    """One film's vertebrae with six finite points, from its rows of ``vertebrae.csv`` (a
    DataFrame): points (K, 6, 2), level codes, fracture and acute labels and Genant grades (NaN
    unknown); None when it has none. Training samples and the training cache (data/cache.py)
    both take the vertebrae in this order."""
    if rows is None or len(rows) == 0:
        return None
    pts = rows[POINT_COLUMNS].to_numpy(dtype=float).reshape(-1, 6, 2)
    good = np.isfinite(pts).all(axis=(1, 2))
    rows, pts = rows[good], pts[good]
    if len(rows) == 0:
        return None
    grade = rows["genant_grade"].to_numpy(dtype=float)
    fracture = np.where(np.isnan(grade), np.nan, (grade > 0).astype(float))
    acute = rows["acute"].to_numpy(dtype=float) if "acute" in rows else np.full(len(rows), np.nan)
    acute = np.where(fracture == 1, acute, np.nan)
    levels = [level_code(v) for v in rows["level"]] if "level" in rows else [-1] * len(rows)
    return pts, levels, fracture, acute, grade


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


def extract_crop(image: np.ndarray, matrix: np.ndarray, out: int = CROP_SIZE, grid=None) -> np.ndarray:
    """Resample the crop; a large window is blurred first so the downsampling does not alias.

    ``grid`` (a :class:`data.transforms.PixelGrid`): where ``image``'s pixels lie on the film
    whose pixels ``matrix`` maps from, when the film was decoded reduced; None: the same pixels."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if grid is not None and grid.reduced:  # from the decoded pixels: through the grid's inverse
        matrix = matrix @ np.linalg.inv(grid.matrix())
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
    g = (pts.mean(axis=1) + 0.5) / stride - 0.5  # grid coordinates of the centres
    cells = np.round(g).astype(int)  # (j, i) per body
    inside = (cells[:, 0] >= 0) & (cells[:, 0] < w) & (cells[:, 1] >= 0) & (cells[:, 1] < h)
    if not inside.any():
        return {"centre": centre, "offsets": offsets, "offset_mask": mask, "level": level}
    # every body's Gaussian at once (the training loader's hot spot), then the largest per cell
    sigma = np.clip(0.25 * body_height(pts[inside]) / stride, 0.5, 2.0)[:, None, None]
    gx, gy = g[inside, 0, None, None], g[inside, 1, None, None]
    dx2 = (np.arange(w, dtype=np.float64)[None, None, :] - gx) ** 2
    dy2 = (np.arange(h, dtype=np.float64)[None, :, None] - gy) ** 2
    centre[0] = np.exp(-(dx2 + dy2) / (2 * sigma ** 2)).astype(np.float32).max(axis=0)
    for k in np.flatnonzero(inside):  # in order: a later body on the same cell wins, as it always has
        j, i = cells[k]
        centre[0, i, j] = 1.0
        cell = (np.array([j, i], dtype=np.float64) + 0.5) * stride - 0.5
        offsets[:, i, j] = ((pts[k] - cell) / (stride * OFFSET_SCALE)).reshape(-1)
        mask[i, j] = 1.0
        level[i, j] = levels[k]
    return {"centre": centre, "offsets": offsets, "offset_mask": mask, "level": level}
