"""What inference accepts as a spine radiograph, and what it refuses before (or instead of) giving
a probability. The table of rules is in docs/formats.md, "Inputs inference refuses".

Read by :class:`inference.predictor.InferenceDataset` (the input rules, on the read image) and
by inference/pipeline.py (the no-spine rule, on the film network's output). A refused input
gets a ``predictions.csv`` row with ``status`` ``refused`` (or ``no_spine``) and a one-line
reason in ``error``; the run goes on. Pixel values that are NaN or infinite are refused by the
reader itself (data/readers.py), as an ``error`` row.

The no-spine threshold was chosen, not validated: it must be tested again on real films and
non-spine images with the first shipped model.
"""
from __future__ import annotations

import numpy as np

from data.readers import RadiographImage
from inference.vertebrae import MIN_DETECTION_SCORE

# DICOM Modality values of projection radiographs: computed and digital radiography,
# fluoroscopy, angiography, and "other" (secondary captures of films). A missing Modality is accepted.
RADIOGRAPH_MODALITIES = ("CR", "DX", "RF", "XA", "OT")

# BodyPartExamined values (DICOM PS3.16 Annex L defined terms, compared in capitals with
# everything but letters removed: "L-SPINE" is LSPINE) of films that show the spine. Any value
# holding SPINE is accepted as well.
SPINE_BODY_PARTS = frozenset({
    "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "COCCYX", "CTSPINE", "TLSPINE", "LSSPINE", "SACRUM",
    "CHEST", "THORAX", "RIB", "BACK", "TRUNK", "ABDOMEN", "PELVIS", "CHESTABDOMEN", "CHESTABDPELVIS",
    "ABDOMENPELVIS", "NECK", "NECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "WHOLEBODY",
})
# BodyPartExamined values that are clearly not the spine: head, limbs, joints, breast, heart.
# Values in neither list (free text such as "LWS") are accepted: only a clear mismatch is refused.
OTHER_BODY_PARTS = frozenset({
    "HEAD", "SKULL", "BRAIN", "FACE", "EYE", "ORBIT", "EAR", "IAC", "NOSE", "SINUS", "JAW", "MANDIBLE",
    "TMJ", "SELLA", "TEETH", "TOOTH", "SHOULDER", "CLAVICLE", "SCAPULA", "ARM", "UPPERARM", "HUMERUS",
    "ELBOW", "FOREARM", "RADIUS", "ULNA", "WRIST", "HAND", "FINGER", "THUMB", "UPPERLIMB", "UPRLIMB",
    "EXTREMITY", "LOWERLIMB", "LOWRLIMB", "HIP", "FEMUR", "THIGH", "KNEE", "PATELLA", "LEG", "LOWERLEG",
    "TIBIA", "FIBULA", "ANKLE", "FOOT", "HEEL", "CALCANEUS", "TOE", "BREAST", "HEART",
})
MIN_SIDE_PX = 64  # the shorter side of a film; a spine radiograph is hundreds of pixels
# radiographs, real or phantom, from 128 px up: 0.80 or more; uniform noise about 0; noise
# blurred by a 1 px Gaussian 0.78 (docs/formats.md, "Refused inputs")
MIN_NEIGHBOUR_CORRELATION = 0.3
PLAUSIBLE_SPACING_MM = (0.02, 2.0)  # detector pixels of radiographs are 0.05-0.2 mm; downsized copies a few x more
# below this strongest vertebral-body score (the score at which a body is detected) the film shows no spine
NO_SPINE_SCORE = MIN_DETECTION_SCORE


def _letters(value) -> str:
    return "".join(c for c in str(value).upper() if "A" <= c <= "Z")


def refusal(image: RadiographImage) -> str | None:
    """Why ``image`` cannot be a spine radiograph (one line), or None when it is accepted: a
    DICOM modality other than :data:`RADIOGRAPH_MODALITIES`, a BodyPartExamined clearly not
    the spine, a side under :data:`MIN_SIDE_PX`, or every pixel of one value."""
    info = image.info if image.source_format == "dicom" else {}
    modality = str(info.get("Modality", "") or "").strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return f"modality {modality} is not a projection radiograph (accepted: {', '.join(RADIOGRAPH_MODALITIES)})"
    body_part = str(info.get("BodyPartExamined", "") or "").strip()
    if body_part and _letters(body_part) in OTHER_BODY_PARTS and "SPINE" not in _letters(body_part):
        return f"body part examined {body_part} is not the spine, chest or abdomen"
    h, w = image.original_size  # the film as stored, however it was decoded
    if min(h, w) < MIN_SIDE_PX:
        return f"image of {w} x {h} px is too small (a side under {MIN_SIDE_PX} px)"
    lo, hi = float(image.pixels.min()), float(image.pixels.max())
    if hi <= lo:
        return f"constant image: every pixel has the value {lo:.4g}"
    return None


def contrast_refusal(normalised: np.ndarray) -> str | None:
    """Why a film whose contrast-normalised pixels (data.transforms.normalize_intensity) are
    blank or noise is refused: at least 99 % of its pixels share one value, so the network
    would see an empty image; or neighbouring pixels are uncorrelated (below
    ``MIN_NEIGHBOUR_CORRELATION``), as in noise and never in a radiograph."""
    if float(normalised.max()) <= 0.0:
        return "no contrast: at least 99 % of the pixels have one value"
    r = neighbour_correlation(normalised)
    if r < MIN_NEIGHBOUR_CORRELATION:
        return f"no structure: neighbouring pixels are uncorrelated (r = {r:.2f}), as in noise, not a radiograph"
    return None


def neighbour_correlation(pixels: np.ndarray, max_lines: int = 256) -> float:
    """Pearson correlation of each pixel with its neighbour, along the rows and along the
    columns (at most ``max_lines`` evenly spaced lines each), whichever is higher: detail
    periodic in one direction (grid lines) does not make a film look like noise. 1.0 for an
    image with no variation along either."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        return 1.0
    return max(_row_correlation(pixels, max_lines), _row_correlation(pixels.T, max_lines))


def _row_correlation(pixels: np.ndarray, max_rows: int) -> float:
    rows = np.asarray(pixels[::max(1, pixels.shape[0] // max_rows)], dtype=np.float64)
    if rows.shape[1] < 2:
        return 1.0
    left, right = rows[:, :-1].ravel(), rows[:, 1:].ravel()
    left, right = left - left.mean(), right - right.mean()
    scale = np.sqrt(float(left @ left) * float(right @ right))
    return float(left @ right) / scale if scale > 0 else 1.0


def checked_spacing(spacing_mm) -> tuple[tuple[float, float] | None, str | None]:
    """``(spacing, warning)``: a pixel spacing outside :data:`PLAUSIBLE_SPACING_MM` is ignored
    (the film is read, its heights are given in pixels only) and the warning says so."""
    if spacing_mm is None:
        return None, None
    lo, hi = PLAUSIBLE_SPACING_MM
    if all(lo <= float(s) <= hi for s in spacing_mm):
        return tuple(spacing_mm), None
    shown = " x ".join(f"{float(s):.4g}" for s in spacing_mm)
    return None, (f"pixel spacing {shown} mm is outside {lo:g}-{hi:g} mm: ignored, no heights in mm")


def no_spine_reason(spine_score: float | None, min_score: float = NO_SPINE_SCORE) -> str | None:
    """Why a film is reported as ``no_spine`` instead of given a probability: the film network's
    strongest vertebral-body score is below ``min_score`` (0 turns the rule off; a score of
    None is not known, e.g. from an ONNX film graph exported without the vertebra maps)."""
    if spine_score is None or spine_score >= min_score:
        return None
    return f"no spine found: the strongest vertebral-body score is {spine_score:.3f}, below {min_score:g}"
