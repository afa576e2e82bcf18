"""Geometry and intensity transforms shared by training and inference."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from data.geometry import OUTLINE


@dataclass(frozen=True)
class Letterbox:
    """Resize keeping the aspect ratio, then pad: input pixel = scale * original + pad."""

    scale: float
    pad_left: int
    pad_top: int
    out_hw: tuple[int, int]
    in_hw: tuple[int, int]

    def to_input(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        return (xy + 0.5) * self.scale - 0.5 + np.array([self.pad_left, self.pad_top])

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        return (xy + 0.5 - np.array([self.pad_left, self.pad_top])) / self.scale - 0.5

    def heatmap_to_image(self, stride: int) -> dict:
        """Affine map from heatmap pixel (column j, row i) to original-image pixel centres."""
        s = stride / self.scale
        return {"scale": s, "offset": [(0.5 * stride - self.pad_left) / self.scale - 0.5,
                                       (0.5 * stride - self.pad_top) / self.scale - 0.5]}


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
