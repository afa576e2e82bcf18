"""Per-vertebra analysis at inference: find, label, measure, grade and score each vertebra.

1. **Find** (:func:`decode_detections`): peaks of the film network's body-centre heatmap
   (3 x 3 non-maximum suppression, score >= ``min_score``); each peak's cell regresses the six
   points as offsets (data/vertebra_targets.py) and scores the 17 levels.
2. **Refine and score** (:func:`read_crops`): a square crop of the original film around each
   body goes through the crop network (models/vertebra_net.py), which places the six points at
   the film's own resolution and gives the vertebra's ``p_fracture`` and ``p_acute``. The crop
   is taken twice, the second time centred on the first pass's points. A checkpoint that holds
   a **point refiner** (models/point_refiner.py) then re-reads each body's points in a window
   of its own frame (rotated to its endplates, sized by its width and height).
   **Gaps are filled** (:func:`gap_proposals`): where the counting below finds one or two
   bodies missing between two found ones (a collapsed body whose heatmap peak merged with a
   neighbour's, or a small one under the stride-8 grid), a window is placed where the missing
   body should be, between its neighbours and shaped like them, and read the same way.
3. **Label** (:func:`assign_levels`): levels are *counted*. The bodies are ordered down the
   spine, gaps wider than 1.4 x the typical step count as missed bodies, and one offset
   places the whole run on T1-L5 (allowing a detected C6-C7 or S1-S2 at the ends); each offset
   is scored by the per-body level log-probabilities (tempered) and by whether each body is
   rib-bearing, so every body's appearance votes and the last rib (T12) anchors the count.
   ``level_confidence`` is the posterior of the chosen offset; below
   ``TRUSTED_LEVEL_CONFIDENCE`` the film says its levels cannot be trusted.
4. **Measure and grade** (data/morphometry.py): heights, ratios, Genant grade and shape from
   the refined points, in pixels and, where the file gives a pixel spacing, millimetres. Bodies
   named beyond T1-L5 are measured but not graded.

The film's ``p_fracture`` and ``p_acute`` follow the vertebrae: see :func:`image_probabilities`.
"""
from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from data.morphometry import LEVELS, grade_vertebrae
from data.geometry import OUTLINE, body_centre, body_extent, body_height, heights, points_in_polygon, unmirror_points
from data.vertebra_targets import (CROP_CONTEXT, CROP_SIZE, N_LEVELS, OFFSET_SCALE, apply_affine, crop_matrix,
                                   extract_crop, invert_affine)
from models.point_refiner import REFINER_KEY, refine_steps
from models.vertebra_net import ReadingSteps, read_in_batches, read_one

MIN_DETECTION_SCORE = 0.3
AP_VIEWS = ("AP", "PA")  # DICOM ViewPositions whose outer heights are the body's two sides
MAX_VERTEBRAE = 30
TRUSTED_LEVEL_CONFIDENCE = 0.8
# a centre-to-centre step this many times the typical step means a missed body; a missing
# collapsed body (half height) widens the step by about 1.5 x, normal steps vary by under 1.3 x
GAP_FACTOR = 1.4
MIN_CROP_SIDE = 16.0  # original pixels
CROP_PASSES = 2  # crops read per vertebra, each centred on the previous pass's points
FLIP_CROPS = False  # average the last pass with its mirror image (read_crops' flip)
OVERHANG = 2  # placements may run this many levels past T1 or L5 (a detected C6-C7 or S1-S2)
LEVEL_WEIGHT = 0.25  # weight of the per-body level evidence in the counting (see assign_levels)
RIB_WEIGHT = 0.5  # weight of the thoracic (rib-bearing) or not evidence: the anchor
# true neighbours share at most 0.16 of the smaller outline (AASCE: 11832 pairs; phantom 0.03):
# a body overlapping a higher-scoring one by more is the same vertebra read twice
MAX_BODY_OVERLAP = 0.25
MAX_GAP_FILL = 2  # a gap is filled only when it misses at most this many bodies
FILL_DRIFT = 0.3  # a filled body read farther than this x the step from its window is dropped
CROP_NET = "crop_net"  # the network name the crop readings ask for (models.vertebra_net.read_in_batches)


class CropNetwork(Protocol):
    """What reads the crops: a ``(n, 1, S, S)`` float tensor in [0, 1] in, ``points`` ``(n, 6, 2)``
    (crop pixels) and ``logits`` ``(n, 2)`` tensors out. A :class:`~models.vertebra_net.VertebraNet`
    or an ONNX graph run by onnxruntime (inference.onnx); a point refiner also carries
    ``crop_size``, ``context``, ``passes`` and ``flip`` (models/point_refiner.py)."""

    def __call__(self, crops: torch.Tensor) -> dict[str, torch.Tensor]: ...


def decode_detections(vertebra_logits: torch.Tensor, stride: int, min_score: float = MIN_DETECTION_SCORE,
                      max_vertebrae: int = MAX_VERTEBRAE) -> list[dict]:
    """Bodies found on one film: ``score``, ``points`` (6, 2) in network-input pixels and
    ``level_logp`` (17,) log-probabilities of T1-L5. ``vertebra_logits``: (30, h, w)."""
    logits = vertebra_logits.float()
    heat = torch.sigmoid(logits[0])
    # peaks on the logits: confident sigmoids saturate to exactly 1.0 and would all tie
    peaks = logits[0] == F.max_pool2d(logits[0][None, None], 3, stride=1, padding=1)[0, 0]
    keep = peaks & (heat >= min_score)
    idx = torch.nonzero(keep, as_tuple=False)
    scores = heat[keep]
    order = torch.argsort(scores, descending=True)[:max_vertebrae]
    level_logp = torch.log_softmax(logits[13:13 + N_LEVELS], dim=0)
    found = []
    for k in order.tolist():
        i, j = idx[k].tolist()
        cell = (np.array([j, i], dtype=np.float64) + 0.5) * stride - 0.5
        offsets = logits[1:13, i, j].cpu().numpy().astype(np.float64).reshape(6, 2)
        found.append({"score": float(scores[k]), "points": cell + offsets * stride * OFFSET_SCALE,
                      "level_logp": level_logp[:, i, j].cpu().numpy().astype(np.float64)})
    return found


def spine_order(points: np.ndarray) -> np.ndarray:
    """Indices of the bodies from head to feet: along the principal axis of their centres,
    pointing down the image (robust to a tilted film or a scoliotic curve)."""
    centres = body_centre(points)
    if len(centres) < 3:
        return np.argsort(centres[:, 1], kind="stable")
    d = centres - centres.mean(axis=0)
    axis = np.linalg.svd(d, full_matrices=False)[2][0]
    if axis[1] < 0:
        axis = -axis
    return np.argsort(d @ axis, kind="stable")


def count_positions(points: np.ndarray) -> np.ndarray:
    """Each body's counted index down the spine (0 for the first), with missed bodies counted.

    A step is measured against the two bodies' own heights (bodies grow down the spine); the
    typical step is the median of the steps that are not gaps, and a step over ``GAP_FACTOR``
    times it counts as ``round(step / typical)`` levels, at least two."""
    n = len(points)
    positions = np.zeros(n, dtype=int)
    if n < 2:
        return positions
    centres = body_centre(points)
    body_heights = body_height(points)
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    relative = steps / np.maximum(0.5 * (body_heights[1:] + body_heights[:-1]), 1e-6)
    typical = float(np.median(relative[relative <= GAP_FACTOR * relative.min()]))
    jumps = np.where(relative > GAP_FACTOR * typical, np.maximum(2, np.round(relative / typical)), 1).astype(int)
    positions[1:] = np.cumsum(jumps)
    return positions


def _level_name(index: int) -> str:
    """T1-L5 by index; beyond them (a placement that runs off the ends) C7, C6, ... and S1, S2, ..."""
    if index < 0:
        return f"C{8 + index}"
    if index >= N_LEVELS:
        return f"S{index - N_LEVELS + 1}"
    return LEVELS[index]


def ordered_levels(level_logp: np.ndarray) -> np.ndarray:
    """Each body's level index, strictly increasing head to feet, maximising the summed level
    log-probabilities (levels may be skipped; a NaN row scores as uninformative). The fallback
    when the counted run does not fit on the spine: the bodies' own readings, without two
    bodies on one level. Only with more bodies than T1-L5 may indices run up to ``OVERHANG``
    past them (a C7 or S1, scoring as uninformative); with more bodies than that, each body's
    most likely level."""
    n = len(level_logp)
    extra = OVERHANG if n > N_LEVELS else 0
    slots = np.arange(-extra, N_LEVELS + extra)
    if n > len(slots):
        return np.nan_to_num(level_logp, nan=0.0).argmax(axis=1)
    outside = np.log(1.0 / N_LEVELS)
    inside = (slots >= 0) & (slots < N_LEVELS)
    score = np.full((n, len(slots)), outside - 1e-6)  # on a tie, T1-L5 rather than past them
    score[:, inside] = np.where(np.isfinite(level_logp), level_logp, outside)
    best = np.full((n, len(slots)), -np.inf)
    best[0] = score[0]
    back = np.zeros((n, len(slots)), dtype=int)
    for i in range(1, n):
        # for each slot j, the best slot at or before it for body i-1 (body i then takes j + 1)
        prefix = np.zeros(len(slots), dtype=int)
        for j in range(1, len(slots)):
            prefix[j] = j if best[i - 1, j] > best[i - 1, prefix[j - 1]] else prefix[j - 1]
        best[i, 1:] = score[i, 1:] + best[i - 1, prefix[:-1]]
        back[i, 1:] = prefix[:-1]
    j = int(np.argmax(best[-1]))
    picked = [j]
    for i in range(n - 1, 0, -1):
        j = back[i, j]
        picked.append(j)
    return slots[np.array(picked[::-1])]


def assign_levels(points: np.ndarray, level_logp: np.ndarray, level_weight: float = LEVEL_WEIGHT,
                  rib_weight: float = RIB_WEIGHT) -> dict:
    """Count levels down the spine (see the module docstring).

    ``points`` (n, 6, 2) and ``level_logp`` (n, 17) in head-to-feet order. Every placement of
    the counted run on T1-L5 is scored by two sums over its bodies:

    * ``level_weight`` x the level log-probabilities. The weight is below 1 because one film's
      bodies are not independent witnesses: their level errors are shared (a film read one
      level off is read one level off throughout), so the plain sum is overconfident;
    * ``rib_weight`` x the log-probability that the body is thoracic (rib-bearing, the sum of
      its T1-T12 probabilities) or not, as the placement says, over that of a flat posterior
      (12/17 or 5/17). This is the anchor: the thoracolumbar junction (T12 the last
      rib-bearing body) pins a run that contains it.

    Placements may run up to ``OVERHANG`` levels past T1 or L5 (a detected C7 or S1): such a
    body's level scores as if uninformative (log 1/17) and it counts as not rib-bearing. A body
    whose ``level_logp`` row is NaN (a filled gap) votes for nothing. When the counted run is
    longer than the spine (a spuriously short step makes normal steps look like gaps), the
    bodies' own readings are used instead, kept distinct and in order (:func:`ordered_levels`),
    and the film is not trusted. Flat
    evidence spreads the posterior over many placements and is not trusted, however many bodies
    were found. The weights were chosen on validation films (benchmarks/RESULTS.md,
    benchmarks/level_counting_study.py). Returns ``levels``, ``level_confidence`` (posterior of
    the chosen placement), ``trusted``, ``positions`` (the counted index of each body, gaps
    included) and, when the run fits on the spine, ``placements`` (``starts``: the level index
    of position 0 of each placement, ``posterior``: their posterior)."""
    n = len(points)
    if n == 0:
        return {"levels": [], "level_confidence": None, "trusted": False, "positions": []}
    positions = count_positions(np.asarray(points, dtype=np.float64).reshape(-1, 6, 2))
    span = int(positions[-1])
    starts = np.arange(-OVERHANG, N_LEVELS + OVERHANG - span)
    outside = np.log(1.0 / N_LEVELS)
    known = np.isfinite(level_logp).all(axis=1)  # a NaN row: a body without level evidence (a filled gap)
    level_logp = np.where(known[:, None], level_logp, outside)
    if len(starts) == 0:  # the counted run is longer than the spine: read each body's own level
        idx = ordered_levels(level_logp)
        conf = float(np.exp([level_logp[i, k] if 0 <= k < N_LEVELS else outside for i, k in enumerate(idx)]).mean())
        return {"levels": [_level_name(int(k)) for k in idx], "level_confidence": conf,
                "trusted": False, "positions": positions.tolist()}
    thoracic = np.array([name.startswith("T") for name in LEVELS])
    # as likelihood ratios against a flat level posterior, so that a flat body favours neither
    log_thoracic = np.logaddexp.reduce(level_logp[:, thoracic], axis=1) - np.log(thoracic.mean())
    log_not = np.logaddexp.reduce(level_logp[:, ~thoracic], axis=1) - np.log(1.0 - thoracic.mean())
    log_thoracic, log_not = np.where(known, log_thoracic, 0.0), np.where(known, log_not, 0.0)
    rows = np.arange(n)
    scores = []
    for s in starts:
        idx = s + positions
        inside = (idx >= 0) & (idx < N_LEVELS)
        level = level_logp[rows[inside], idx[inside]].sum() + outside * (~inside).sum()
        ribs = np.where(inside & thoracic[np.clip(idx, 0, N_LEVELS - 1)], log_thoracic, log_not).sum()
        scores.append(level_weight * level + rib_weight * ribs)
    scores = np.array(scores)
    posterior = np.exp(scores - scores.max())
    posterior /= posterior.sum()
    best = int(np.argmax(posterior))
    conf = float(posterior[best])
    return {"levels": [_level_name(int(starts[best] + p)) for p in positions], "level_confidence": conf,
            "trusted": conf >= TRUSTED_LEVEL_CONFIDENCE, "positions": positions.tolist(),
            "placements": {"starts": starts.tolist(), "posterior": posterior.tolist()}}


def read_crops(vertebra_net: CropNetwork, image: np.ndarray, points: np.ndarray, device: torch.device,
               passes: int = 2, flip: bool = False) -> dict:
    """Refined points (n, 6, 2) in original pixels and the crop network's probabilities.

    ``flip``: the last pass also reads each crop mirrored left to right and averages the two
    readings (points and probabilities), a test-time augmentation at twice that pass's cost."""
    return read_one(read_crop_steps(image, points, passes, flip), {CROP_NET: vertebra_net}, device)


def read_crop_steps(image: np.ndarray, points: np.ndarray, passes: int = 2, flip: bool = False,
                    grid=None) -> ReadingSteps:
    """:func:`read_crops` as a reading in steps (models.vertebra_net.read_in_batches): it yields
    its crops for the network named ``CROP_NET``. ``points`` are in original film pixels;
    ``grid`` (data.transforms.PixelGrid) says where ``image``'s pixels lie on the film when it
    was decoded reduced (None: the film's own pixels)."""
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    if len(pts) == 0:
        empty = np.zeros(0)
        return {"points": pts, "p_fracture": empty, "p_acute": empty, "p_acute_given_fracture": empty}
    for k in range(passes):
        # a collapsed stage-1 guess still gets a window a body could fit in
        matrices = [crop_matrix(c, max(CROP_CONTEXT * e, MIN_CROP_SIDE)) for c, e in zip(body_centre(pts), body_extent(pts))]
        crops = np.stack([extract_crop(image, m, grid=grid) for m in matrices])[:, None].astype(np.float32)
        read, logits = yield CROP_NET, crops
        crop_pts = read.astype(np.float64)
        probs = torch.sigmoid(torch.from_numpy(logits)).numpy().astype(np.float64)
        if flip and k == passes - 1:
            read_m, logits_m = yield CROP_NET, np.ascontiguousarray(crops[..., ::-1])
            mirrored = unmirror_points(read_m.astype(np.float64), crop_pts, CROP_SIZE)
            crop_pts = (crop_pts + mirrored) / 2
            probs = (probs + torch.sigmoid(torch.from_numpy(logits_m)).numpy().astype(np.float64)) / 2
        pts = np.stack([apply_affine(invert_affine(m), p) for m, p in zip(matrices, crop_pts)])
    return {"points": pts, "p_fracture": probs[:, 0], "p_acute_given_fracture": probs[:, 1],
            "p_acute": probs[:, 0] * probs[:, 1]}


def duplicate_bodies(points: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """True for a body whose refined centre lies within half a body height of a higher-scoring
    one (two peaks on one large body, which the crops pull onto the same vertebra), or whose
    outline overlaps a higher-scoring one's by more than ``MAX_BODY_OVERLAP`` of the smaller
    outline (a reading that slid half onto its neighbour)."""
    centres = body_centre(points)
    body_heights = body_height(points)
    extents = body_extent(points)
    # hulls of p1 p3 p6 p4: the intersection below is exact for convex outlines only
    outlines = [cv2.convexHull(np.asarray(p, np.float32)[[0, 2, 5, 3]]) for p in points]
    areas = np.array([abs(cv2.contourArea(o)) for o in outlines])
    scores = np.asarray(scores)
    dup = np.zeros(len(points), dtype=bool)
    for k in np.argsort(-scores, kind="stable"):
        if dup[k]:
            continue
        d = np.linalg.norm(centres - centres[k], axis=1)
        close = (d < 0.5 * np.maximum(body_heights, body_heights[k])) & (scores <= scores[k])
        close[k] = False
        # outlines farther apart than their half-diagonals together cannot meet (bar strongly skewed ones)
        near = d < 0.75 * (extents + extents[k])
        for j in np.flatnonzero(near & ~close & ~dup & (scores <= scores[k])):
            if j != k and _overlap(outlines[k], outlines[j], min(areas[k], areas[j])) > MAX_BODY_OVERLAP:
                close[j] = True
        dup |= close
    return dup


def _overlap(a: np.ndarray, b: np.ndarray, smaller_area: float) -> float:
    """Area shared by two convex outlines, as a fraction of ``smaller_area``."""
    if smaller_area <= 0:
        return 0.0
    try:
        shared, _ = cv2.intersectConvexConvex(a, b)
    except cv2.error:  # degenerate outlines (collinear points): no overlap rule
        return 0.0
    return float(shared) / smaller_area


def _length_mm(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> float:
    row, col = spacing
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return float(np.hypot(d[0] * col, d[1] * row))


def describe_vertebrae(points: np.ndarray, labels: dict, probs: dict, scores: np.ndarray,
                       pixel_spacing_mm: tuple[float, float] | None = None, view: str | None = None) -> list[dict]:
    """The ``vertebrae`` list of a film's JSON (docs/formats.md), head to feet.

    Only bodies named T1-L5 are graded: one the count names beyond them (C6-C7, S1-S2: a
    detected sacrum or cervical body, or a T1 / L5 of a count that is off by a level) has
    ``genant_grade``, ``morphology`` and ``height_loss`` None, because the Genant grade is
    defined for thoracolumbar bodies and the sacrum's shape would read as a severe fracture;
    its ``p_fracture`` is the crop network's. Graded bodies take only graded neighbours as
    references. ``view``: ``"AP"`` or ``"PA"`` (e.g. DICOM ViewPosition) grades the two sides alike
    (data.morphometry, ``symmetric``); anything else reads p1-p4 as anterior, as on lateral films."""
    symmetric = str(view or "").strip().upper() in AP_VIEWS
    graded = grade_vertebrae(points, symmetric=symmetric) if len(points) else []
    in_range = np.array([lvl in LEVELS for lvl in labels["levels"][:len(graded)]], dtype=bool)
    if in_range.any():
        for k, g in zip(np.flatnonzero(in_range), grade_vertebrae(points[in_range], symmetric=symmetric)):
            graded[k] = g
    out = []
    for k, g in enumerate(graded):
        p = points[k]
        heights = dict(zip(("anterior", "middle", "posterior"), (float(h) for h in g["heights"])))
        mm = None
        if pixel_spacing_mm:
            mm = {name: _length_mm(p[i], p[i + 3], pixel_spacing_mm)
                  for i, name in enumerate(("anterior", "middle", "posterior"))}
        out.append({
            "level": labels["levels"][k],
            "level_confidence": labels["level_confidence"],
            "detection_score": float(scores[k]),
            "points": [[float(x), float(y)] for x, y in p],
            "heights": heights,
            "heights_mm": mm,
            "height_ratios": {k2: float(v) for k2, v in g["height_ratios"].items()},
            # None where ungraded: the combiner must not read a sacrum's shape as a fracture
            "height_loss": float(g["height_loss"]) if in_range[k] else None,
            "genant_grade": int(g["genant_grade"]) if in_range[k] else None,
            "morphology": g["morphology"] if in_range[k] else None,
            "p_fracture": float(probs["p_fracture"][k]),
            "p_acute": float(probs["p_acute"][k]),
            "p_acute_given_fracture": float(probs["p_acute_given_fracture"][k]),
        })
    return out


def combine_with_morphometry(p_crop: float, height_loss: float, combiner: dict) -> float:
    """A vertebra's ``p_fracture`` from the crop network's and its measured height loss:
    ``sigmoid(a * logit(p_crop) + b * height_loss + c)``, a logistic regression fitted on
    validation vertebrae by ``python -m calibration.fit`` (``combiner`` = ``{"coef": [a, b],
    "intercept": c}``). With ``a > 0`` it keeps the crop network's ranking among vertebrae of
    equal height loss, and lets a clearly collapsed body count even where the crop is unsure."""
    a, b = (float(c) for c in combiner["coef"])
    p = float(np.clip(p_crop, 1e-6, 1 - 1e-6))
    z = a * np.log(p / (1 - p)) + b * float(height_loss) + float(combiner["intercept"])
    return float(1.0 / (1.0 + np.exp(-z)))


def with_morphometry(vertebrae: list[dict], combiner: dict | None) -> list[dict]:
    """Copies of ``vertebrae`` whose ``p_fracture`` (and ``p_acute``) come from
    :func:`combine_with_morphometry`, keeping the crop network's as ``p_fracture_crop``;
    unchanged copies when there is no combiner, and for ungraded bodies (``height_loss`` None)."""
    out = []
    for v in vertebrae:
        v = dict(v)
        if combiner and v.get("height_loss") is not None:  # an ungraded body keeps the crop network's
            v["p_fracture_crop"] = v["p_fracture"]
            v["p_fracture"] = combine_with_morphometry(v["p_fracture"], v["height_loss"], combiner)
            v["p_acute"] = v["p_fracture"] * v["p_acute_given_fracture"]
        out.append(v)
    return out


def image_probabilities(p_image: dict, vertebrae: list[dict]) -> dict:
    """The film's probabilities, agreeing with its vertebrae.

    A film is fractured when any vertebra is, so the film's ``p_fracture`` is the larger of
    the film-level head's and the largest vertebra's; likewise ``p_acute``. No film is thus
    less likely fractured than any of its vertebrae, and a film with no vertebra found keeps
    the film-level head's values. ``p_acute_given_fracture`` is their ratio."""
    out = dict(p_image)
    vertebrae = [v for v in vertebrae if np.isfinite(v["p_fracture"]) and np.isfinite(v["p_acute"])]
    if vertebrae:
        out["p_fracture"] = max(float(p_image["p_fracture"]), max(v["p_fracture"] for v in vertebrae))
        out["p_acute"] = min(out["p_fracture"], max(float(p_image["p_acute"]), max(v["p_acute"] for v in vertebrae)))
        out["p_acute_given_fracture"] = out["p_acute"] / out["p_fracture"] if out["p_fracture"] > 0 else 0.0
    return out


def gap_proposals(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rough points (m, 6, 2) for the bodies that :func:`count_positions` counts as missing
    between two found ones (``points`` in head-to-feet order): evenly spaced between the two
    neighbours' centres, each with the neighbours' mean shape; and for each, the farthest its
    refined centre may move (``FILL_DRIFT`` x the step between the proposals). Gaps of more
    than ``MAX_GAP_FILL`` bodies are left alone (more likely the film's edge or a false
    detection)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    positions = count_positions(pts)
    centres = body_centre(pts)
    out, drift = [], []
    for i in range(len(pts) - 1):
        missing = int(positions[i + 1] - positions[i]) - 1
        if not 1 <= missing <= MAX_GAP_FILL:
            continue
        shape = 0.5 * ((pts[i] - centres[i]) + (pts[i + 1] - centres[i + 1]))
        step = np.linalg.norm(centres[i + 1] - centres[i]) / (missing + 1)
        for k in range(1, missing + 1):
            out.append(centres[i] + (centres[i + 1] - centres[i]) * k / (missing + 1) + shape)
            drift.append(FILL_DRIFT * step)
    return np.array(out, dtype=np.float64).reshape(-1, 6, 2), np.array(drift, dtype=np.float64)


def _scores_at(vertebra_logits: torch.Tensor, box, stride: int, centres: np.ndarray) -> np.ndarray:
    """The centre heatmap's value in the cells under ``centres`` (original pixels)."""
    heat = vertebra_logits[0].float()
    h, w = heat.shape
    cells = np.floor((box.to_input(centres) + 0.5) / stride)
    j = np.clip(np.nan_to_num(cells[:, 0]), 0, w - 1).astype(int)
    i = np.clip(np.nan_to_num(cells[:, 1]), 0, h - 1).astype(int)
    return torch.sigmoid(heat[torch.from_numpy(i), torch.from_numpy(j)]).cpu().numpy().astype(np.float64)


def _measurable(points: np.ndarray) -> np.ndarray:
    """A body squashed to under a pixel is a spurious peak, not a vertebra that can be measured."""
    return (heights(points).min(axis=1) >= 1.0) & np.isfinite(points).all(axis=(1, 2))


def kept_bodies(points: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The bodies that can be measured and are no higher-scoring measurable body's duplicate (a
    spurious sliver must not remove the body it lies on)."""
    keep = _measurable(points)
    keep[keep] = ~duplicate_bodies(points[keep], np.asarray(scores)[keep])
    return keep


def _fill_gaps(read: dict, scores: np.ndarray, logp: np.ndarray, vertebra_logits: torch.Tensor, box, stride: int,
               image: np.ndarray, grid=None):
    """The found bodies plus those read in the counted gaps (see :func:`gap_proposals`), in
    head-to-feet order. A filled body is dropped when the crop network moved it away from its
    window (``FILL_DRIFT``) or onto a found body. Filled bodies vote for no level (the level
    head is trained at body centres it found) and their ``detection_score`` is the centre
    heatmap's value under them. If the fills would change how the found bodies are counted,
    none is kept. A reading in steps (see :func:`read_crop_steps`)."""
    proposals, drift = gap_proposals(read["points"])
    if not len(proposals):
        return read, scores, logp
    extra = yield from read_crop_steps(image, proposals, passes=CROP_PASSES, flip=FLIP_CROPS, grid=grid)
    moved = np.linalg.norm(body_centre(extra["points"]) - body_centre(proposals), axis=1)
    extra_scores = _scores_at(vertebra_logits, box, stride, body_centre(extra["points"]))
    merged = {k: np.concatenate([read[k], extra[k]]) for k in read}
    # found bodies outrank filled ones, whatever their heatmap scores
    rank = np.concatenate([scores + 2.0, extra_scores])
    keep = kept_bodies(merged["points"], rank)
    keep[len(scores):] &= moved <= drift
    keep[:len(scores)] = True
    if not keep[len(scores):].any():
        return read, scores, logp
    order = spine_order(merged["points"][keep])
    found = np.flatnonzero(keep)[order] < len(scores)
    before = count_positions(read["points"])
    after = count_positions(merged["points"][keep][order])[found]
    if not np.array_equal(after - after[0], before - before[0]):
        return read, scores, logp
    merged = {k: v[keep] for k, v in merged.items()}
    scores = np.concatenate([scores, extra_scores])[keep]
    logp = np.concatenate([logp, np.full((len(extra_scores), logp.shape[1]), np.nan)])[keep]  # no level vote
    order = spine_order(merged["points"])
    return {k: v[order] for k, v in merged.items()}, scores[order], logp[order]


def _cells_covered(points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the cells whose centres lie inside a body's outline (points in
    heatmap cells), or of the cell under its centre when none does; empty off the grid."""
    h, w = shape
    outline = points[OUTLINE]
    lo = np.clip(np.floor(outline.min(axis=0)).astype(int), 0, [w - 1, h - 1])
    hi = np.clip(np.ceil(outline.max(axis=0)).astype(int), 0, [w - 1, h - 1])
    jj, ii = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
    inside = points_in_polygon(np.stack([jj.ravel(), ii.ravel()], axis=1), outline).reshape(jj.shape)
    if inside.any():
        return ii[inside], jj[inside]
    j, i = np.round(points.mean(axis=0)).astype(int)
    if 0 <= i < h and 0 <= j < w:
        return np.array([i]), np.array([j])
    return np.zeros(0, int), np.zeros(0, int)


def _in_cells(v: dict, to_image: dict) -> np.ndarray | None:
    """A vertebra's points in heatmap cells, or None when it has no usable points or score."""
    pts = (np.asarray(v["points"], dtype=np.float64) - np.asarray(to_image["offset"], dtype=np.float64))
    pts /= float(to_image["scale"])
    if not np.isfinite(float(v["p_fracture"])) or pts.shape != (6, 2) or not np.isfinite(pts).all():
        return None
    return pts


def fracture_map(heatmap: np.ndarray, vertebrae: list[dict], to_image: dict) -> np.ndarray:
    """The film's fracture map: each cell of the film network's dense ``heatmap`` raised to the
    ``p_fracture`` of any vertebra whose outline covers the cell's centre (the same max rule as
    the film's ``p_fracture``), so the map shows where the vertebra reading finds a fracture
    even where the dense head is unsure. A body smaller than a cell marks the cell under its
    centre. ``to_image``: the heatmap-to-original affine (``scale``, ``offset``). The vertebra
    values are their reported ``p_fracture`` (calibrated when the checkpoint is; the dense map
    is not calibrated)."""
    fused = np.array(heatmap, dtype=np.float32, copy=True)
    for v in vertebrae:
        pts = _in_cells(v, to_image)
        if pts is None:
            continue
        i, j = _cells_covered(pts, fused.shape)
        fused[i, j] = np.maximum(fused[i, j], float(v["p_fracture"]))
    return fused


def fracture_peak(heatmap: np.ndarray, vertebrae: list[dict], to_image: dict) -> tuple[list[float], float]:
    """Peak ``[x, y]`` (original pixels) and value of :func:`fracture_map`: the centre of the most
    likely fractured vertebra on the map when its ``p_fracture`` tops the dense head's maximum
    (so the peak is a body's centre, not the first cell of its outline), else the dense head's
    peak cell."""
    i, j = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    head_value = float(heatmap[i, j])
    on_map = [v for v in vertebrae
              if (pts := _in_cells(v, to_image)) is not None and len(_cells_covered(pts, heatmap.shape)[0])]
    if on_map:
        best = max(on_map, key=lambda v: v["p_fracture"])
        if best["p_fracture"] > head_value:
            x, y = np.asarray(best["points"], dtype=np.float64).mean(axis=0)
            return [float(x), float(y)], float(best["p_fracture"])
    s, (ox, oy) = to_image["scale"], to_image["offset"]
    return [float(s * j + ox), float(s * i + oy)], head_value


def _measurable_in_spine_order(read: dict, scores: np.ndarray, logp: np.ndarray):
    """The bodies of ``read`` that can be measured and are not a higher-scoring body's
    duplicate, in head-to-feet order (read points can swap two neighbours' order; the level
    counting needs it), with their ``scores`` and level ``logp``."""
    keep = kept_bodies(read["points"], scores)
    order = np.flatnonzero(keep)[spine_order(read["points"][keep])] if keep.any() else np.flatnonzero(keep)
    return {k: v[order] for k, v in read.items()}, scores[order], logp[order]


def analyse_film(vertebra_logits: torch.Tensor, box, stride: int, vertebra_net: CropNetwork,
                 image: np.ndarray, device: torch.device, pixel_spacing_mm=None,
                 min_score: float = MIN_DETECTION_SCORE, fill_gaps: bool = True,
                 point_refiner: CropNetwork | None = None, view: str | None = None, grid=None) -> dict:
    """All four steps for one film. ``image``: the normalised film pixels; ``box``: the
    letterbox that made the network input, from original film pixels; ``grid``
    (data.transforms.PixelGrid): where ``image``'s pixels lie on the film when it was decoded
    reduced. Returns ``vertebrae`` (in original pixels) and the film's level summary.

    ``point_refiner`` (models/point_refiner.py), when given, re-reads every body's points in
    its own frame after the crop network and the gap filling; the probabilities stay the crop
    network's. :func:`analyse_films` analyses many films with shared forward passes."""
    steps = film_steps(vertebra_logits, box, stride, image, pixel_spacing_mm, min_score=min_score,
                       fill_gaps=fill_gaps, point_refiner=point_refiner, view=view, grid=grid)
    return read_one(steps, _networks(vertebra_net, point_refiner), device)


def analyse_films(films: list[dict], stride: int, vertebra_net: CropNetwork, device: torch.device,
                  point_refiner: CropNetwork | None = None) -> list:
    """:func:`analyse_film` for many films at once, their crops read in shared forward passes
    (models.vertebra_net.read_in_batches); the results equal one film's at a time. Each film is
    a dict of :func:`analyse_film`'s arguments (``vertebra_logits``, ``box``, ``image``, and
    optionally ``pixel_spacing_mm``, ``view`` and ``grid``). Returns each film's result, or the
    exception its analysis raised."""
    steps = [film_steps(f["vertebra_logits"], f["box"], stride, f["image"], f.get("pixel_spacing_mm"),
                        point_refiner=point_refiner, view=f.get("view"), grid=f.get("grid")) for f in films]
    return read_in_batches(steps, _networks(vertebra_net, point_refiner), device)


def _networks(vertebra_net: CropNetwork, point_refiner: CropNetwork | None) -> dict:
    return {CROP_NET: vertebra_net, **({REFINER_KEY: point_refiner} if point_refiner is not None else {})}


def film_steps(vertebra_logits: torch.Tensor, box, stride: int, image: np.ndarray, pixel_spacing_mm=None,
               min_score: float = MIN_DETECTION_SCORE, fill_gaps: bool = True,
               point_refiner: CropNetwork | None = None, view: str | None = None, grid=None) -> ReadingSteps:
    """:func:`analyse_film` as a reading in steps: it yields its crops for the networks named
    ``CROP_NET`` and ``REFINER_KEY`` and returns the film's result."""
    found = decode_detections(vertebra_logits, stride, min_score=min_score)
    if not found:
        return {"vertebrae": [], "level_confidence": None, "levels_trusted": False}
    rough = np.stack([box.to_image(d["points"]) for d in found])
    order = spine_order(rough)
    rough = rough[order]
    scores = np.array([found[k]["score"] for k in order])
    logp = np.stack([found[k]["level_logp"] for k in order])
    read = yield from read_crop_steps(image, rough, passes=CROP_PASSES, flip=FLIP_CROPS, grid=grid)
    read, scores, logp = _measurable_in_spine_order(read, scores, logp)
    if not len(scores):
        return {"vertebrae": [], "level_confidence": None, "levels_trusted": False}
    if fill_gaps:
        read, scores, logp = yield from _fill_gaps(read, scores, logp, vertebra_logits, box, stride, image, grid)
    if point_refiner is not None:
        # the refiner may collapse a body or pull two onto one vertebra: checked as the crop reads were
        refined = yield from refine_steps(point_refiner, image, read["points"], grid=grid)
        read, scores, logp = _measurable_in_spine_order({**read, "points": refined}, scores, logp)
        if not len(scores):
            return {"vertebrae": [], "level_confidence": None, "levels_trusted": False}
    labels = assign_levels(read["points"], logp)
    vertebrae = describe_vertebrae(read["points"], labels, read, scores, pixel_spacing_mm, view=view)
    return {"vertebrae": vertebrae, "level_confidence": labels["level_confidence"], "levels_trusted": labels["trusted"]}
