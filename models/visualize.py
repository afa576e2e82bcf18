"""Drawing, kept apart from computing: heatmap overlays on radiographs."""
from __future__ import annotations

import cv2
import numpy as np


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45,
                    peak: tuple[float, float] | None = None, label: str | None = None) -> np.ndarray:
    """Blend a 0-1 heatmap (same size as ``image``, itself 0-1 grey) over the image.

    Returns a BGR uint8 picture; low heatmap values stay transparent so anatomy stays readable."""
    grey = np.clip(image * 255, 0, 255).astype(np.uint8)
    base = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    hm = np.clip(heatmap, 0, 1)
    colour = cv2.applyColorMap((hm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    weight = (alpha * np.clip(hm / 0.3, 0, 1))[..., None]  # fade in from p = 0 to 0.3
    out = (base * (1 - weight) + colour * weight).astype(np.uint8)
    scale = max(out.shape[:2]) / 1024
    if peak is not None:
        cv2.drawMarker(out, (int(round(peak[0])), int(round(peak[1]))), (255, 255, 255), cv2.MARKER_CROSS,
                       max(8, int(24 * scale)), max(1, int(2 * scale)))
    if label:
        cv2.putText(out, label, (8, max(16, int(28 * scale))), cv2.FONT_HERSHEY_SIMPLEX, max(0.4, 0.8 * scale),
                    (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
    return out
