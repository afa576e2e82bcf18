"""Quantitative vertebral morphometry: heights, ratios, Genant grade and shape.

Six points per vertebra, in this order (the order of ``vertebrae.csv``)::

    p1 superior-anterior   p2 superior-middle   p3 superior-posterior
    p4 inferior-anterior   p5 inferior-middle   p6 inferior-posterior

Heights are the distances p1-p4 (Ha), p2-p5 (Hm) and p3-p6 (Hp).

The Genant semiquantitative grade comes from the loss of the smallest height against the
expected height of that vertebra: grade 0 (< 20 %), 1 (20-25 %), 2 (25-40 %), 3 (> 40 %).
The expected height is the vertebra's own posterior height, unless the posterior height
has itself collapsed (more than 20 % below the neighbours' posterior heights, a crush
fracture), in which case the neighbours' posterior heights stand in for it.

On AP (or PA) films the two outer heights are the body's two sides, not anterior and
posterior: ``grade_vertebrae(points, symmetric=True)`` grades them alike, taking the taller side
as the reference (the role of the posterior height) and the shorter as the one that may have
collapsed, so a lateral wedge reads the same on either side. The reported heights and ratios keep
the points' order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Levels in cranio-caudal order. T13 and L6 (transitional anatomy) are accepted by readers.
LEVELS: tuple[str, ...] = tuple([f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)])
EXTRA_LEVELS: tuple[str, ...] = ("T13", "L6")
MORPHOLOGIES: tuple[str, ...] = ("normal", "wedge", "biconcave", "crush")
GRADE_NAMES: tuple[str, ...] = ("normal", "mild", "moderate", "severe")

# Lower bounds of height loss for grades 1, 2, 3 (Genant 1993).
GRADE_THRESHOLDS: tuple[float, float, float] = (0.20, 0.25, 0.40)
# Posterior height below this fraction of the neighbours' counts as collapsed (crush).
CRUSH_POSTERIOR_RATIO = 0.80


def level_index(level: str) -> float:
    """Position of a level name along the spine (T1 = 0 ... L5 = 16; T13 = 11.5, L6 = 17)."""
    if level in LEVELS:
        return float(LEVELS.index(level))
    if level == "T13":
        return 11.5
    if level == "L6":
        return 17.0
    raise ValueError(f"unknown vertebral level {level!r}; expected one of T1-T12, L1-L5, T13, L6")


@dataclass(frozen=True)
class Heights:
    anterior: float
    middle: float
    posterior: float

    def as_array(self) -> np.ndarray:
        return np.array([self.anterior, self.middle, self.posterior], dtype=np.float64)


def heights_from_points(points: np.ndarray) -> Heights:
    """Anterior, middle and posterior heights from six (x, y) points, shape (6, 2)."""
    p = np.asarray(points, dtype=np.float64).reshape(6, 2)
    ha, hm, hp = (float(np.linalg.norm(p[i + 3] - p[i])) for i in range(3))
    return Heights(ha, hm, hp)


def height_loss(heights: Heights, neighbour_posterior: list[float] | None = None) -> float:
    """Fractional loss of the smallest height against the expected height (0 = intact)."""
    reference = heights.posterior
    neighbours = [h for h in (neighbour_posterior or []) if h and h > 0]
    if neighbours:
        neighbour_ref = float(np.mean(neighbours))
        if heights.posterior < CRUSH_POSTERIOR_RATIO * neighbour_ref:
            reference = neighbour_ref
    if reference <= 0:
        raise ValueError("posterior height must be positive")
    return float(max(0.0, 1.0 - min(heights.as_array()) / reference))


def genant_grade(loss: float) -> int:
    """Genant semiquantitative grade 0-3 from a fractional height loss."""
    grade = 0
    for g, threshold in enumerate(GRADE_THRESHOLDS, start=1):
        if loss >= threshold:
            grade = g
    return grade


def morphology(heights: Heights, grade: int, neighbour_posterior: list[float] | None = None) -> str:
    """Shape of a graded vertebra: wedge (anterior lost), biconcave (middle), crush (all)."""
    if grade == 0:
        return "normal"
    neighbours = [h for h in (neighbour_posterior or []) if h and h > 0]
    if neighbours and heights.posterior < CRUSH_POSTERIOR_RATIO * float(np.mean(neighbours)):
        return "crush"
    return "wedge" if heights.anterior <= heights.middle else "biconcave"


def _sides_sorted(h: Heights) -> Heights:
    """The shorter side as ``anterior`` and the taller as ``posterior`` (AP films)."""
    return Heights(min(h.anterior, h.posterior), h.middle, max(h.anterior, h.posterior))


def grade_vertebrae(points: np.ndarray, symmetric: bool = False) -> list[dict]:
    """Grade every vertebra of one image. ``points``: (n, 6, 2), in cranio-caudal order.

    Neighbours are the vertebrae directly above and below in the given order. ``symmetric``:
    the outer heights are the two sides of an AP film (module docstring). Returns one dict per
    vertebra with heights, ratios, loss, grade and morphology.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    all_heights = [heights_from_points(p) for p in pts]
    graded_heights = [_sides_sorted(h) for h in all_heights] if symmetric else all_heights
    results = []
    for i, h in enumerate(all_heights):
        g = graded_heights[i]
        neighbours = [graded_heights[j].posterior for j in (i - 1, i + 1) if 0 <= j < len(all_heights)]
        loss = height_loss(g, neighbours)
        grade = genant_grade(loss)
        results.append(
            {
                "heights": [h.anterior, h.middle, h.posterior],
                "height_ratios": {
                    "anterior_posterior": h.anterior / h.posterior if h.posterior else float("nan"),
                    "middle_posterior": h.middle / h.posterior if h.posterior else float("nan"),
                },
                "height_loss": loss,
                "genant_grade": grade,
                "morphology": morphology(g, grade, neighbours),
            }
        )
    return results
