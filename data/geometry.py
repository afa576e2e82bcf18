"""Six-point vertebral body geometry: the one home of the point order and what follows from it.

A body is six (x, y) points in original-image pixels (docs/formats.md): p1 superior-anterior,
p2 superior-middle, p3 superior-posterior, p4 inferior-anterior, p5 inferior-middle, p6
inferior-posterior. On AP films "anterior" is image-left (data/landmarks.py). Functions take
one body (6, 2) or many (n, 6, 2) and return per-body arrays.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "POINT_COLUMNS",
    "HEIGHT_NAMES",
    "OUTLINE",
    "AP_MIRROR",
    "as_points",
    "table_points",
    "body_centre",
    "heights",
    "body_height",
    "endplate_width",
    "body_extent",
    "body_axes",
    "unmirror_points",
]

# vertebrae.csv columns of the six points, in order: p1x, p1y, ..., p6x, p6y
POINT_COLUMNS = [f"p{i}{c}" for i in range(1, 7) for c in "xy"]
# the three heights, each from a superior point to the inferior point below it (p1p4, p2p5, p3p6)
HEIGHT_NAMES = ("anterior", "middle", "posterior")
# the points in order around the body: superior left to right, then inferior back (p1 p2 p3 p6 p5 p4)
OUTLINE = [0, 1, 2, 5, 4, 3]
# the point order mirrored left-right: what a horizontal flip makes of an AP film's labels
AP_MIRROR = [2, 1, 0, 5, 4, 3]


def as_points(points) -> np.ndarray:
    """``points`` as a float64 (n, 6, 2) array."""
    return np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)


def table_points(table: pd.DataFrame) -> np.ndarray:
    """(n, 6, 2) points of a ``vertebrae.csv`` table (NaN where a column is empty or absent)."""
    if not len(table):
        return np.zeros((0, 6, 2))
    cols = [pd.to_numeric(table[c], errors="coerce").to_numpy(float) if c in table.columns
            else np.full(len(table), np.nan) for c in POINT_COLUMNS]
    return np.stack(cols, axis=1).reshape(len(table), 6, 2)


def body_centre(points) -> np.ndarray:
    """(n, 2) centres: the mean of the six points."""
    return as_points(points).mean(axis=1)


def heights(points) -> np.ndarray:
    """(n, 3) anterior, middle and posterior heights (|p1p4|, |p2p5|, |p3p6|)."""
    p = as_points(points)
    return np.linalg.norm(p[:, 3:] - p[:, :3], axis=-1)


def body_height(points) -> np.ndarray:
    """(n,) mean of the three heights."""
    return heights(points).mean(axis=1)


def endplate_width(points) -> np.ndarray:
    """(n,) mean length of the two endplates (|p1p3|, |p4p6|)."""
    p = as_points(points)
    return 0.5 * (np.linalg.norm(p[:, 0] - p[:, 2], axis=-1) + np.linalg.norm(p[:, 3] - p[:, 5], axis=-1))


def body_extent(points) -> np.ndarray:
    """(n,) larger of the mean endplate width and the mean height (pixels)."""
    return np.maximum(endplate_width(points), body_height(points))


def body_axes(points) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (n, 2) along each body's endplates (p1/p4 side towards p3/p6) and across
    them (towards its inferior endplate)."""
    p = as_points(points)
    u = (p[:, 2] - p[:, 0]) + (p[:, 5] - p[:, 3])
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    v = np.stack([-u[:, 1], u[:, 0]], axis=1)
    v = v * np.sign(((p[:, 3:] - p[:, :3]).mean(axis=1) * v).sum(axis=1, keepdims=True) + 1e-12)
    return u, v


def unmirror_points(mirrored: np.ndarray, reference: np.ndarray, size: int) -> np.ndarray:
    """Points (n, 6, 2) read on horizontally mirrored ``size`` px windows, mapped back onto the
    unmirrored windows.

    Training mirrors lateral windows without relabelling (anterior stays anterior) and AP ones
    with the sides swapped (``AP_MIRROR``), so which labelling comes back depends on the view,
    which inference need not know: each body takes whichever of the two lies closer to
    ``reference``, the points read on the unmirrored window."""
    back = np.array(mirrored, dtype=np.float64)
    back[..., 0] = size - 1 - back[..., 0]
    swapped = back[:, AP_MIRROR]
    keep = np.linalg.norm(back - reference, axis=-1).sum(-1) <= np.linalg.norm(swapped - reference, axis=-1).sum(-1)
    return np.where(keep[:, None, None], back, swapped)


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Whether each of ``points`` (n, 2) lies inside the closed ``polygon`` (k, 2): the crossing
    test of matplotlib's ``Path.contains_points`` (radius 0), edge for edge, so that inference
    needs no plotting library and points on an edge fall the same way."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    tx, ty = pts[:, 0], pts[:, 1]
    inside = np.zeros(len(pts), dtype=bool)
    for k in range(len(poly)):
        x0, y0 = poly[k - 1]
        x1, y1 = poly[k]
        above0, above1 = y0 >= ty, y1 >= ty
        crosses = above0 != above1
        hit = ((y1 - ty) * (x0 - x1) >= (x1 - tx) * (y0 - y1)) == above1
        inside ^= crosses & hit
    return inside

