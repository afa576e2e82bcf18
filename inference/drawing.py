"""Drawing, kept apart from computing: heatmap overlays on radiographs."""
from __future__ import annotations

import cv2
import numpy as np

from data.geometry import OUTLINE


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45,
                    peak: tuple[float, float] | None = None, label: str | None = None) -> np.ndarray:
    """Blend a 0-1 heatmap (same size as ``image``, itself 0-1 grey, or uint8 grey as
    :func:`grey_levels` makes it) over the image.

    Returns a BGR uint8 picture; low heatmap values stay transparent so anatomy stays readable."""
    grey = image if image.dtype == np.uint8 else grey_levels(image)
    base = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    hm = np.clip(heatmap, 0, 1)
    colour = cv2.applyColorMap((hm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    weight = (alpha * np.clip(hm / 0.3, 0, 1)).astype(np.float32)  # fade in from p = 0 to 0.3
    # one pass, no float copies of the three channels (the nearest grey level, not the one below)
    out = cv2.blendLinear(base, colour, 1 - weight, weight)
    scale = max(out.shape[:2]) / 1024
    if peak is not None:
        cv2.drawMarker(out, (int(round(peak[0])), int(round(peak[1]))), (255, 255, 255), cv2.MARKER_CROSS,
                       max(8, int(24 * scale)), max(1, int(2 * scale)))
    if label:
        thickness = max(1, int(2 * scale))
        font = label_font_scale(label, out.shape[1] - 16, max(0.4, 0.8 * scale), thickness)
        origin = (8, max(16, int(28 * scale)))
        # white on a black outline: readable on the bright top edge of a film as on the dark
        cv2.putText(out, label, origin, cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(out, label, origin, cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def grey_levels(image: np.ndarray) -> np.ndarray:
    """A 0-1 grey image as the uint8 grey levels an overlay is drawn on."""
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def label_font_scale(label: str, width: int, font_scale: float, thickness: int) -> float:
    """``font_scale``, shrunk so that ``label`` fits in ``width`` pixels (AP films are narrow:
    the probabilities line would run off the picture)."""
    text_width = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)[0][0]
    return font_scale * min(1.0, max(width, 1) / max(text_width, 1))


# Genant grade colours (BGR): normal green, mild yellow, moderate orange, severe red.
GRADE_COLOURS = {0: (80, 200, 80), 1: (0, 220, 255), 2: (0, 140, 255), 3: (0, 0, 255)}
UNGRADED_COLOUR = (170, 170, 170)


def draw_vertebrae(overlay: np.ndarray, vertebrae: list[dict], scale: float = 1.0,
                   levels_trusted: bool | None = None) -> np.ndarray:
    """Outline each vertebra's six points in its Genant grade's colour, with its level name.

    ``scale`` maps original-image pixels to ``overlay`` pixels. Levels are written with a
    question mark when the film's ``levels_trusted`` is false (or, when it is not given,
    where ``level_confidence`` < 0.8)."""
    out = overlay.copy()
    s = max(out.shape[:2]) / 1024
    thick = max(1, int(round(2 * s)))
    for v in vertebrae:
        pts = np.asarray(v["points"], dtype=np.float64) * scale
        grade = v.get("genant_grade")
        grade = None if grade is None or not np.isfinite(float(grade)) else int(grade)
        # ungraded (a body named beyond T1-L5): grey, so it cannot be read as normal or fractured
        colour = GRADE_COLOURS.get(grade, UNGRADED_COLOUR)
        poly = np.round(pts[OUTLINE] * 16).astype(np.int32)
        cv2.polylines(out, [poly], True, colour, thick, cv2.LINE_AA, shift=4)
        for x, y in pts:
            cv2.circle(out, (int(round(x)), int(round(y))), max(2, thick + 1), colour, -1, cv2.LINE_AA)
        conf = v.get("level_confidence")
        doubtful = (not levels_trusted) if levels_trusted is not None else (conf is not None and conf < 0.8)
        name = str(v.get("level", "")) + ("?" if doubtful else "")
        if grade is not None and grade > 0:
            name += f" G{grade}"
        x_text = int(round(pts[:, 0].max() + 6 * s))
        y_text = int(round(pts[:, 1].mean() + 5 * s))
        cv2.putText(out, name, (x_text, y_text), cv2.FONT_HERSHEY_SIMPLEX, max(0.35, 0.55 * s), (0, 0, 0),
                    thick + 2, cv2.LINE_AA)
        cv2.putText(out, name, (x_text, y_text), cv2.FONT_HERSHEY_SIMPLEX, max(0.35, 0.55 * s), colour,
                    thick, cv2.LINE_AA)
    return out
