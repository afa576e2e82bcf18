"""Geometry and intensity transforms shared by training and inference."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from data.geometry import OUTLINE


@dataclass(frozen=True)
class PixelGrid:
    """Where an image's pixels lie on the film as stored, when a reader decoded it reduced
    (data/readers.py, ``min_decoded_size``): the centre of pixel (row i, column j) is original
    pixel (``origin[0] + i / scale[0]``, ``origin[1] + j / scale[1]``), pixel centres at integers.

    ``scale``: pixels per original pixel, per axis (row, column): 1, or 1/2, 1/4, 1/8 when
    reduced. ``origin`` is ``(f - 1) / 2`` where a pixel is the mean of an f x f block (JPEG's
    DCT scaling, :func:`area_reduce`) and 0 where it is centred on the block's first pixel (a
    JPEG 2000 resolution level)."""

    original_size: tuple[int, int]  # rows, columns of the film as stored
    scale: tuple[float, float] = (1.0, 1.0)
    origin: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def reduced_by(cls, original_size: tuple[int, int], factor: int, block_centred: bool = True) -> "PixelGrid":
        """The grid of a film reduced ``factor`` times on both axes."""
        origin = (factor - 1) / 2 if block_centred else 0.0
        return cls(tuple(int(v) for v in original_size), (1.0 / factor, 1.0 / factor), (origin, origin))

    @property
    def reduced(self) -> bool:
        return self.scale != (1.0, 1.0) or self.origin != (0.0, 0.0)

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        """Points ``[..., (x, y)]`` in this grid's pixels, in original pixels."""
        xy = np.asarray(xy, dtype=np.float64)
        return xy / np.array([self.scale[1], self.scale[0]]) + np.array([self.origin[1], self.origin[0]])

    def matrix(self) -> np.ndarray:
        """The 3 x 3 affine map of (x, y) from original pixels to this grid's pixels."""
        sx, sy = self.scale[1], self.scale[0]
        return np.array([[sx, 0.0, -sx * self.origin[1]], [0.0, sy, -sy * self.origin[0]], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Letterbox:
    """Resize keeping the aspect ratio, then pad: input pixel = scale * original + pad (+ shift,
    the sub-pixel part a reduced decode may add: see :meth:`on_original`)."""

    scale: float
    pad_left: int
    pad_top: int
    out_hw: tuple[int, int]
    in_hw: tuple[int, int]
    shift: tuple[float, float] = (0.0, 0.0)  # (x, y), input pixels

    def to_input(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        return (xy + 0.5) * self.scale - 0.5 + np.array([self.pad_left + self.shift[0], self.pad_top + self.shift[1]])

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        return (xy + 0.5 - np.array([self.pad_left + self.shift[0], self.pad_top + self.shift[1]])) / self.scale - 0.5

    def heatmap_to_image(self, stride: int) -> dict:
        """Affine map from heatmap pixel (column j, row i) to original-image pixel centres."""
        s = stride / self.scale
        return {"scale": s, "offset": [(0.5 * stride - self.pad_left - self.shift[0]) / self.scale - 0.5,
                                       (0.5 * stride - self.pad_top - self.shift[1]) / self.scale - 0.5]}

    def on_original(self, grid: PixelGrid) -> "Letterbox":
        """This letterbox of an image on ``grid`` (a reduced decode) as the same map from the
        original film's pixels: every coordinate it gives back is in original pixels."""
        if not grid.reduced:
            return self
        if grid.scale[0] != grid.scale[1]:
            raise ValueError(f"a letterbox needs one scale for both axes, not {grid.scale}")
        g = grid.scale[0]
        # input = ((o - origin) * g + 0.5) * scale - 0.5 + pad = (o + 0.5) * g * scale - 0.5 + pad + shift
        shift = tuple(float(self.scale * (0.5 - g * (origin + 0.5))) for origin in (grid.origin[1], grid.origin[0]))
        return Letterbox(scale=self.scale * g, pad_left=self.pad_left, pad_top=self.pad_top, out_hw=self.out_hw,
                         in_hw=tuple(grid.original_size), shift=(self.shift[0] + shift[0], self.shift[1] + shift[1]))


def area_reduce(image: np.ndarray, factor: int) -> np.ndarray:
    """Each ``factor`` x ``factor`` block's mean, the last row and column of blocks filled by
    repeating the edge pixels: ``ceil(h / factor)`` x ``ceil(w / factor)``, each pixel centred on
    its block (:meth:`PixelGrid.reduced_by`)."""
    if factor == 1:
        return image
    h, w = image.shape[:2]
    rows, cols = -(-h // factor), -(-w // factor)
    if (rows * factor, cols * factor) != (h, w):
        image = cv2.copyMakeBorder(image, 0, rows * factor - h, 0, cols * factor - w, cv2.BORDER_REPLICATE)
    return cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA)  # an integer factor: exact block means


def letterbox(image: np.ndarray, out_hw: tuple[int, int], fill: float = 0.0) -> tuple[np.ndarray, Letterbox]:
    h, w = image.shape[:2]
    H, W = out_hw
    scale = min(H / h, W / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    top, left = (H - nh) // 2, (W - nw) // 2
    out = np.full((H, W) + image.shape[2:], fill, dtype=image.dtype)
    out[top:top + nh, left:left + nw] = resized
    return out, Letterbox(scale=scale, pad_left=left, pad_top=top, out_hw=(H, W), in_hw=(h, w))


# Above this many pixels the percentiles of normalize_intensity come from a regular grid of
# about PERCENTILE_SAMPLES pixels: 0.5 % of a million is still 5000 pixels in each tail
SUBSAMPLE_ABOVE = 2_000_000
PERCENTILE_SAMPLES = 1_000_000


def normalize_intensity(pixels: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Robust per-image contrast: the low/high percentiles map to 0/1, so bit depth and
    exposure differences between films and sites do not reach the network.

    A film of more than ``SUBSAMPLE_ABOVE`` pixels takes its percentiles on every k-th row and
    column (about ``PERCENTILE_SAMPLES`` pixels) and is scaled in float32: a 3000 x 3000 film
    in about 20 ms instead of 140. Smaller films are exact, as before."""
    if pixels.size <= SUBSAMPLE_ABOVE:
        lo, hi = np.percentile(pixels, [low, high])
        if hi - lo < 1e-6:
            return np.zeros_like(pixels, dtype=np.float32)
        return np.clip((pixels - lo) / (hi - lo), 0, 1).astype(np.float32)
    step = int(np.ceil(np.sqrt(pixels.size / PERCENTILE_SAMPLES)))
    sample = pixels[::step, ::step] if pixels.ndim == 2 else pixels.reshape(-1)[::step * step]
    lo, hi = np.percentile(sample, [low, high])
    if hi - lo < 1e-6:
        return np.zeros_like(pixels, dtype=np.float32)
    out = np.subtract(pixels, np.float32(lo), dtype=np.float32)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0, 1, out=out)




def rasterize_vertebrae(points: list[np.ndarray], out_hw: tuple[int, int]) -> np.ndarray:
    """Fill the six-point outline of each vertebra (points already in output pixels)."""
    mask = np.zeros(out_hw, np.uint8)
    for p in points:
        poly = np.round(np.asarray(p)[OUTLINE] * 16).astype(np.int32)
        cv2.fillPoly(mask, [poly], 1, shift=4)
    return mask
