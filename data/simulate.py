"""Compression fractures simulated on real radiographs, with exact morphometric truth.

:func:`simulate_fracture` collapses one vertebral body of a film in place of the film's own
pixels:

* **Geometry.** In the vertebra's own frame (``v`` along its axis, from the superior to the
  inferior endplate midpoint; ``u`` across it, from the p1 side to the p3 side) each column
  ``u`` is remapped along ``v`` (``cv2.remap``). The body between its endplates is compressed
  linearly so that the superior endplate comes down by ``d(u)`` and the inferior one up by
  ``e(u)`` (quadratic profiles through the displacements asked of p1..p3 / p4..p6: the
  superior endplate takes 65 % of each height's loss, the inferior 35 %; for a biconcave
  fracture the middle loss is shared equally, so both endplates bow). The compressed span
  starts a few pixels into each disc so that the endplate cortex is compressed with the body
  rather than smeared, and the compressed body is made slightly denser. The lost height is
  absorbed by the adjacent discs: from the endplate to 70 % of the way to the neighbouring
  vertebra's endplate the disc is stretched - most in its featureless middle, hardly next to
  the endplates - and its grain, smoothed by the stretch, is made up with fresh grain of the
  film's own spread; beyond that nothing moves. Across the body the displacement fades to
  zero over a quarter of the body's width on either side (smoothstep). So the region is the
  body plus its lateral margins plus the adjacent parts of both discs; every pixel outside
  it is bit-for-bit unchanged (``info["region"]``). The other vertebrae, points and pixels,
  stay where they were: the discs next to the fracture widen instead of the spine above
  settling.
* **Heights.** The anterior, middle and posterior heights fall by amounts drawn from
  :data:`data.fracture_priors.LOSS_RANGE` (clear of the grade boundaries), with the phantom's shape
  rules: a *wedge* loses the anterior height most (posterior kept, middle 35-55 % of the
  anterior loss), a *biconcave* fracture the middle height (anterior 20-50 % of it), a
  *crush* all three against the neighbours' posterior height (``data.morphometry``'s crush
  rule): posterior loss 0.27-0.45 with a loss of at least 0.30 (grade 2-3), or posterior
  loss 0.21 up to the anterior loss of 0.22-0.24 for a grade-1 crush (the only way a crush
  can be grade 1 under that rule; :func:`simulate_dataset` and :class:`FractureSynthesis`,
  like the phantom, draw no grade-1 crush). Where the film's own vertebra is already
  shorter on a side, the loss is drawn from the feasible part of the range; a request that
  cannot be met (the vertebra would have to grow, or a wedge / biconcave fracture is asked
  of a vertebra whose posterior height already reads as collapsed against its neighbours)
  raises :class:`InfeasibleFracture` (:func:`fracture_feasible` asks first).
  ``new_points`` are the mapped points, so :func:`data.morphometry.grade_vertebrae` gives
  back exactly the requested grade and shape (checked on every call).
* **Acute signs**, drawn in the film's own texture: an endplate step (a depressed fragment
  of the superior endplate between its p1 corner and its middle, cut by a discontinuity in
  the remap, with a thin cortical break at the step) and a condensation band (a brightened
  band of impacted trabeculae beneath the collapsed superior endplate, modulated by the
  local texture).
* **Chronic signs**: smooth sclerotic brightened margins along both endplates, and with
  probability 0.6 a small osteophyte at one corner (on an AP film the corners are lateral).

Every added density is a fraction of the film's local contrast (the body's robust
intensity range), so signs read alike on soft and on contrasty films.

On AP films the "anterior" column is the left side as seen on the image and the
"posterior" column the right side (see ``data.landmarks``), so a wedge is a lateral wedge.

:func:`simulate_dataset` writes simulated films (16-bit PNG) with ``manifest.csv`` and
``vertebrae.csv``; :class:`FractureSynthesis` is the same as an on-the-fly augmentation.

Command line::

    python -m data.simulate --aasce DIR --out OUT [--n N] [--seed S] [--size PX] [--limit K]
    python -m data.simulate --vertebrae-csv PATH --out OUT ...

``--n`` is the number of simulated films written per source film.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from data.io_utils import atomic_write_image, atomic_write_text
from data.landmarks import (LandmarkError, manifest_row, points_array, points_box, read_aasce,
                            read_vertebrae_csv, vertebra_row)
from data.morphometry import CRUSH_POSTERIOR_RATIO, grade_vertebrae, heights_from_points
from data.fracture_priors import (ACUTE_GRADE_P, ACUTE_SHAPE_P, CHRONIC_GRADE_P, CHRONIC_SHAPE_P,
                                  LEVEL_FRACTURE_WEIGHT, LOSS_RANGE)
from data.manifest import is_held_out
from data.readers import ImageReadError, read_image

SIMULATE_VERSION = "1"
SHAPES: tuple[str, ...] = ("wedge", "biconcave", "crush")
CRUSH_POSTERIOR_LOSS = (0.27, 0.45)  # grade 2-3 crush: posterior loss against the neighbours
# grade-1 crush: posterior loss from 0.01 past the crush rule's threshold up to the anterior loss
CRUSH1_POSTERIOR_MIN = round(1 - CRUSH_POSTERIOR_RATIO + 0.01, 6)
CRUSH1_LOSS = (0.22, 0.24)
# wedge / biconcave need Hp >= this x the neighbours' posterior height (clear of the crush rule)
NO_CRUSH_MARGIN = CRUSH_POSTERIOR_RATIO + 0.02
SHAPE_MARGIN = 1.03  # the least height must stay below the next one by this factor
TOP_SHARE = 0.65  # share of each height's loss taken by the superior endplate (rest: inferior)
BICONCAVE_BOTTOM_SHARE = 0.5  # biconcave: share of the middle loss taken by the inferior endplate
DISC_REACH = 0.7  # the warped region reaches this fraction of the way across each disc
LATERAL_MARGIN = 0.25  # lateral fade-out, as a fraction of the body's width
POINT_DECIMALS = 3


class InfeasibleFracture(ValueError):
    """The requested fracture cannot be drawn on this vertebra of this film."""


# ----------------------------------------------------------------------------- planning


def _neighbour_posterior(points: np.ndarray, index: int) -> list[float]:
    return [heights_from_points(points[j]).posterior for j in (index - 1, index + 1)
            if 0 <= j < len(points)]


def _uniform(rng: np.random.Generator, lo: float, hi: float, what: str) -> float:
    if lo > hi + 1e-12:
        raise InfeasibleFracture(what)
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def plan_heights(points: np.ndarray, index: int, grade: int, shape: str,
                 rng: np.random.Generator) -> dict:
    """Target heights (anterior, middle, posterior) for the fractured vertebra.

    Raises :class:`InfeasibleFracture` when the film's vertebra cannot be collapsed into the
    requested grade and shape (it would have to grow somewhere, or a wedge / biconcave
    fracture is asked of a vertebra whose posterior height already reads as crushed).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    if grade not in (1, 2, 3):
        raise ValueError(f"grade must be 1, 2 or 3, not {grade!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    if not 0 <= index < len(pts):
        raise IndexError(f"vertebra index {index} out of range for {len(pts)} vertebrae")
    ha0, hm0, hp0 = heights_from_points(pts[index]).as_array()
    if min(ha0, hm0, hp0) <= 1.0:
        raise InfeasibleFracture(f"vertebra {index} has a height under one pixel")
    nb = _neighbour_posterior(pts, index)
    nb_ref = float(np.mean(nb)) if nb else None
    lo, hi = LOSS_RANGE[grade]
    name = f"grade-{grade} {shape} of vertebra {index}"
    if shape in ("wedge", "biconcave"):
        if nb_ref is not None and hp0 < NO_CRUSH_MARGIN * nb_ref:
            raise InfeasibleFracture(f"{name}: its posterior height already reads as collapsed "
                                     "against the neighbours")
        ref = hp0
        if shape == "wedge":
            loss = _uniform(rng, max(lo, 1 - ha0 / ref, 1 - hm0 / (ref * SHAPE_MARGIN)), hi,
                            f"{name}: the film's vertebra is already too short")
            ha = ref * (1 - loss)
            hm = min(ref * (1 - loss * rng.uniform(0.35, 0.55)), hm0)
        else:
            loss = _uniform(rng, max(lo, 1 - hm0 / ref, 1 - ha0 / (ref * SHAPE_MARGIN)), hi,
                            f"{name}: the film's vertebra is already too short")
            hm = ref * (1 - loss)
            ha = min(ref * (1 - loss * rng.uniform(0.2, 0.5)), ha0)
        hp = hp0
        post = 0.0
    else:
        if nb_ref is None:
            raise InfeasibleFracture(f"{name}: a crush needs a neighbouring vertebra")
        ref = nb_ref
        if grade == 1:
            loss = _uniform(rng, max(CRUSH1_LOSS[0], 1 - ha0 / ref), CRUSH1_LOSS[1],
                            f"{name}: the film's vertebra is already too short")
            post = _uniform(rng, max(CRUSH1_POSTERIOR_MIN, 1 - hp0 / ref), loss,
                            f"{name}: its posterior height is already too short")
        else:
            loss = _uniform(rng, max(lo, 0.30, 1 - ha0 / ref), hi,
                            f"{name}: the film's vertebra is already too short")
            post = _uniform(rng, max(CRUSH_POSTERIOR_LOSS[0], 1 - hp0 / ref),
                            min(loss, CRUSH_POSTERIOR_LOSS[1]),
                            f"{name}: its posterior height is already too short")
        mid = _uniform(rng, max(post, 1 - hm0 / ref), loss,
                       f"{name}: its middle height is already too short")
        ha, hm, hp = ref * (1 - loss), ref * (1 - mid), ref * (1 - post)
    return {"targets": np.array([ha, hm, hp]), "before": np.array([ha0, hm0, hp0]),
            "reference": ref, "loss": loss, "posterior_loss": post}


def _frame(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, axis t (superior -> inferior) and cross direction n (p1 side -> p3 side)."""
    t = (p[3] + p[5]) / 2 - (p[0] + p[2]) / 2
    t = t / max(np.linalg.norm(t), 1e-9)
    n = np.array([t[1], -t[0]])
    if float((p[2] - p[0] + p[5] - p[3]) @ n) < 0:
        n = -n
    return p.mean(0), t, n


def _collapse(p: np.ndarray, t: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Shortening along ``t`` of each of the three point pairs that gives the target heights."""
    s = np.zeros(3)
    for k in range(3):
        D = p[k + 3] - p[k]
        along = float(D @ t)
        across2 = float(D @ D) - along**2
        disc = targets[k] ** 2 - across2
        if disc < 0 or along <= 0:
            raise InfeasibleFracture("the vertebra's points are too oblique to its axis")
        s[k] = along - math.sqrt(disc)
    return s


# ----------------------------------------------------------------------------- warp helpers


def _profile(us: np.ndarray, vs: np.ndarray, extend: str = "linear"):
    """Quadratic through three (u, v) points; outside their span linear ("linear", C1) or
    constant ("clamp")."""
    us = np.asarray(us, dtype=np.float64)
    vs = np.asarray(vs, dtype=np.float64)
    order = np.argsort(us)
    us, vs = us[order], vs[order]
    span = us[-1] - us[0]
    if span <= 1e-6 or np.min(np.diff(us)) < 1e-3 * span:
        coef = np.polyfit(us, vs, 1) if span > 1e-6 else np.array([0.0, float(np.mean(vs))])
    else:
        coef = np.polyfit(us, vs, 2)
    der = np.polyder(coef)
    lo, hi = us[0], us[-1]

    def f(u):
        u = np.asarray(u, dtype=np.float64)
        uc = np.clip(u, lo, hi)
        val = np.polyval(coef, uc)
        if extend == "linear":
            val = val + np.where(u < lo, np.polyval(der, lo), np.polyval(der, hi)) * (u - uc)
        return val

    return f


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _local(points: np.ndarray, c: np.ndarray, t: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(points, dtype=np.float64).reshape(-1, 2) - c
    return d @ n, d @ t


def _texture(img: np.ndarray, fine: float, coarse: float) -> np.ndarray:
    """Band-pass texture (between ``fine`` and ``coarse`` Gaussian scales) in units of its
    robust spread, clipped to +-2.5."""
    bp = cv2.GaussianBlur(img, (0, 0), fine) - cv2.GaussianBlur(img, (0, 0), coarse)
    s = 1.4826 * float(np.median(np.abs(bp - np.median(bp)))) + 1e-6
    return np.clip(bp / s, -2.5, 2.5).astype(np.float32)


def _brighten(img: np.ndarray, amount: np.ndarray, contrast: float) -> np.ndarray:
    """Add density: ``amount`` (0..1.5) of the film's local contrast."""
    return img + np.clip(amount, 0.0, 1.5).astype(np.float32) * np.float32(contrast)


# ----------------------------------------------------------------------------- simulation


def simulate_fracture(image: np.ndarray, points: np.ndarray, index: int, grade: int,
                      shape: str = "wedge", acute: bool = False, rng=None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Simulate a compression fracture of vertebra ``index`` of a film (module docstring).

    ``image``: float (H, W) in [0, 1], bone bright. ``points``: (n, 6, 2) for all vertebrae
    of the film in cranio-caudal order (p1..p6 of ``docs/formats.md``). ``rng``: a
    ``numpy.random.Generator`` or a seed. Returns ``(new_image float32, new_points (n, 6, 2),
    info)``; ``info`` holds ``region`` (bool (H, W): the only pixels that may differ),
    ``bbox`` (x0, y0, x1, y1) of the region, the heights before / after, the drawn loss, the
    measured grading of the vertebra and the signs drawn.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W), got shape {img.shape}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    plan = plan_heights(pts, index, grade, shape, rng)
    p = pts[index]
    c, t, n = _frame(p)
    s = _collapse(p, t, plan["targets"])
    top_share = np.full(3, TOP_SHARE)
    if shape == "biconcave":
        top_share[1] = 1 - BICONCAVE_BOTTOM_SHARE
    d_pts, e_pts = s * top_share, s * (1 - top_share)
    new_p = p.copy()
    new_p[:3] += d_pts[:, None] * t
    new_p[3:] -= e_pts[:, None] * t
    new_points = pts.copy()
    new_points[index] = new_p

    # ---- geometry in the vertebra's frame
    pu, pv = _local(p, c, t, n)
    top = _profile(pu[:3], pv[:3])
    bot = _profile(pu[3:], pv[3:])
    d_of = _profile(pu[:3], d_pts, extend="clamp")
    e_of = _profile(pu[3:], e_pts, extend="clamp")
    h_mean = float(np.mean(plan["before"]))
    u_lo, u_hi = float(pu.min()), float(pu.max())
    width = u_hi - u_lo
    m_lat = LATERAL_MARGIN * width
    if index > 0:
        qu, qv = _local(pts[index - 1][3:], c, t, n)
        upper = _profile(qu, qv)
    else:
        upper = None
    if index + 1 < len(pts):
        qu, qv = _local(pts[index + 1][:3], c, t, n)
        lower = _profile(qu, qv)
    else:
        lower = None

    def margins(u):
        if upper is not None:
            ma = np.clip(DISC_REACH * (top(u) - upper(u)), 0.08 * h_mean, 0.6 * h_mean)
        else:
            ma = np.full_like(u, 0.35 * h_mean)
        if lower is not None:
            mb = np.clip(DISC_REACH * (lower(u) - bot(u)), 0.08 * h_mean, 0.6 * h_mean)
        else:
            mb = np.full_like(u, 0.35 * h_mean)
        return ma, mb

    # acute endplate step: a depressed fragment between the p1 corner and the middle
    step = None
    if acute and pu[1] - pu[0] > 4:
        us = pu[0] + rng.uniform(0.15, 0.45) * (pu[1] - pu[0])
        sw = 0.32 * (pu[1] - pu[0])
        depth = rng.uniform(0.07, 0.13) * float(plan["targets"].mean())
        step = (us, sw, depth)

    def bump(u):
        if step is None:
            return np.zeros_like(u)
        us, sw, depth = step
        x = (u - us) / sw
        return np.where((x >= 0) & (x <= 1), depth * (1 - x), 0.0)

    def fade(u):
        return _smoothstep((u - (u_lo - m_lat)) / m_lat) * _smoothstep(((u_hi + m_lat) - u) / m_lat)

    # region outline -> crop box
    H, W = img.shape
    us_line = np.linspace(u_lo - m_lat, u_hi + m_lat, 96)
    ma_l, mb_l = margins(us_line)
    va_l = top(us_line) - ma_l
    vb_l = bot(us_line) + mb_l
    outline = np.concatenate([c + us_line[:, None] * n + va_l[:, None] * t,
                              c + us_line[:, None] * n + vb_l[:, None] * t])
    pad = 3
    x0 = int(max(0, math.floor(outline[:, 0].min()) - pad))
    y0 = int(max(0, math.floor(outline[:, 1].min()) - pad))
    x1 = int(min(W, math.ceil(outline[:, 0].max()) + pad + 1))
    y1 = int(min(H, math.ceil(outline[:, 1].max()) + pad + 1))
    if x1 <= x0 or y1 <= y0:
        raise InfeasibleFracture(f"vertebra {index} lies outside the image")
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    U = (xx - c[0]) * n[0] + (yy - c[1]) * n[1]
    V = (xx - c[0]) * t[0] + (yy - c[1]) * t[1]

    w = fade(U)
    vt, vb = top(U), bot(U)
    ma, mb = margins(U)
    va, vbb = vt - ma, vb + mb
    d = (d_of(U) + bump(U)) * w
    e = e_of(U) * w
    h = np.maximum(vb - vt, 1e-3)
    k = (h - d - e) / h
    inside_body = (w > 0) & (U >= u_lo) & (U <= u_hi)
    if inside_body.any() and float(k[inside_body].min()) < 0.15:
        raise InfeasibleFracture(f"vertebra {index}: collapse beyond 85 % of the body's height")
    k = np.maximum(k, 0.15)
    dt = np.minimum(0.05 * h_mean, 0.4 * ma)
    db = np.minimum(0.05 * h_mean, 0.4 * mb)
    A, B = vt - dt, vb + db
    Dd = d + dt * (1 - k)
    Ee = e + db * (1 - k)
    region = (w > 0) & (V >= va) & (V <= vbb)
    src = V.copy()
    above = region & (V < A + Dd)
    below = region & (V > B - Ee)
    body = region & ~above & ~below
    # Discs: the stretch is concentrated in the middle of the disc, where a disc is
    # featureless; near the endplates the texture keeps (nearly) its scale.
    La, Lb = np.maximum(A - va, 1e-6), np.maximum(vbb - B, 1e-6)
    ta = np.clip((V - va) / (La + Dd), 0, 1)
    tb = np.clip((vbb - V) / (Lb + Ee), 0, 1)
    aa = np.minimum(0.85, Dd / La)
    ab = np.minimum(0.85, Ee / Lb)
    src[above] = (va + La * (ta + aa * np.sin(2 * np.pi * ta) / (2 * np.pi)))[above]
    src[body] = (A + (V - A - Dd) / k)[body]
    src[below] = (vbb - Lb * (tb + ab * np.sin(2 * np.pi * tb) / (2 * np.pi)))[below]
    shift = src - V  # 0 outside the region: those samples land exactly on pixel centres
    map_x = (xx - x0 + shift * t[0]).astype(np.float32)
    map_y = (yy - y0 + shift * t[1]).astype(np.float32)
    crop = img[y0:y1, x0:x1]
    warped = cv2.remap(crop, map_x, map_y, interpolation=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)

    # Stretched disc: interpolation has smeared the film's grain and fine structure along
    # the axis. Keep the stretched low frequencies, shrink the stretched detail by 1/stretch
    # and make up the rest with fresh grain of the film's own spread.
    stretch = np.ones_like(V)
    stretch[above] = ((La + Dd) / (La * (1 + aa * np.cos(2 * np.pi * ta))))[above]
    stretch[below] = ((Lb + Ee) / (Lb * (1 + ab * np.cos(2 * np.pi * tb))))[below]
    keep = (1.0 / stretch).astype(np.float32)
    detail_sigma = max(2.0, 0.08 * h_mean)
    fine_sigma = max(0.7, 0.006 * h_mean)
    blur_f = cv2.GaussianBlur(crop, (0, 0), fine_sigma)
    bands = (crop - blur_f, blur_f - cv2.GaussianBlur(crop, (0, 0), detail_sigma))
    # the texture of the discs as they were (between the region's edge and the endplates)
    discs = region & (((V >= va) & (V < vt)) | ((V > vb) & (V <= vbb)))
    noise = np.zeros(crop.shape, np.float32)
    for band, (s_lo, s_hi), gain in zip(bands, ((0.5, fine_sigma), (0.15 * detail_sigma, 0.45 * detail_sigma)),
                                        (1.0, 0.5)):
        spread = 1.4826 * float(np.median(np.abs(band[discs]))) if discs.any() else 0.0
        white = rng.standard_normal(crop.shape).astype(np.float32)
        nz = cv2.GaussianBlur(white, (0, 0), s_lo) - cv2.GaussianBlur(white, (0, 0), s_hi)
        noise += nz * np.float32(gain * spread / (float(nz.std()) + 1e-9))
    low = cv2.GaussianBlur(warped, (0, 0), detail_sigma)
    out = np.where(stretch > 1.0, low + (warped - low) * keep
                   + noise * np.sqrt(np.clip(1 - keep**2, 0, 1)), warped).astype(np.float32)

    # ---- signs, in the output frame
    vt_new = vt + d
    vb_new = vb - e
    hn = np.maximum(vb_new - vt_new, 1.0)
    h_t = float(plan["targets"].mean())
    edge = max(1.0, 0.06 * width)
    body_w = _smoothstep((U - u_lo) / edge) * _smoothstep((u_hi - U) / edge)
    in_body = _smoothstep((V - vt_new) / max(1.0, 0.03 * h_t)) * \
        _smoothstep((vb_new - V) / max(1.0, 0.03 * h_t)) * body_w
    # the film's local contrast (robust range around the vertebra): every added density is
    # a fraction of it, so that signs read alike on soft and on contrasty films
    body_px = crop[(V >= vt) & (V <= vb) & (U >= u_lo) & (U <= u_hi)]
    region_range = float(np.subtract(*np.percentile(crop[region], [97, 3]))) if region.any() else 0.1
    body_range = float(np.subtract(*np.percentile(body_px, [95, 5]))) if body_px.size else 0.0
    contrast = max(body_range, 0.25 * region_range, 0.01)
    # compressed bone: the same mass in less height reads denser
    out = _brighten(out, 0.25 * np.clip(1 - k, 0, 1) * in_body, contrast)
    # trabecular-scale texture of the film (band-pass), to modulate the added density
    tex = _texture(warped, max(1.0, 0.015 * h_t), max(2.0, 0.06 * h_t))
    signs: dict = {"acute": bool(acute)}
    if acute:
        # condensation band: impacted trabeculae beneath the collapsed superior endplate
        off = rng.uniform(0.04, 0.10) * hn
        bw = rng.uniform(0.22, 0.32) * hn
        x = (V - vt_new - off) / bw
        prof = np.where((x > 0) & (x < 1), np.sin(np.pi * np.clip(x, 0, 1)) ** 2, 0.0)
        amp = rng.uniform(0.4, 0.6)
        band = amp * prof * body_w * np.clip(1 + 0.35 * tex, 0.3, 1.7)
        out = _brighten(out, band, contrast)
        signs["condensation_band"] = {"amplitude": round(float(amp), 3)}
        if step is not None:
            us, sw, depth = step
            # cortical break: a thin lucent cleft at the step through the endplate
            cleft_w = max(0.8, 0.01 * width)
            g_u = np.exp(-0.5 * ((U - us) / cleft_w) ** 2)
            g_v = _smoothstep((V - (vt_new - 0.06 * h_t)) / (0.04 * h_t)) * \
                _smoothstep(((vt_new + 0.16 * h_t) - V) / (0.06 * h_t))
            out = out - np.float32(0.35 * contrast) * (g_u * g_v).astype(np.float32)
            signs["endplate_step"] = {"u": round(float(us - pu[0]), 2), "depth_px": round(float(depth), 2)}
    else:
        # smooth sclerotic margins along both endplates
        sig = rng.uniform(0.05, 0.07) * hn
        amp = rng.uniform(0.3, 0.45)
        mod = np.clip(1 + 0.2 * cv2.GaussianBlur(tex, (0, 0), max(1.0, 0.03 * h_t)), 0.6, 1.4)
        rim = np.exp(-0.5 * ((V - vt_new - 0.8 * sig) / sig) ** 2) + \
            np.exp(-0.5 * ((V - vb_new + 0.8 * sig) / sig) ** 2)
        out = _brighten(out, amp * rim * body_w * mod, contrast)
        signs["sclerotic_margins"] = {"amplitude": round(float(amp), 3)}
        if rng.random() < 0.6:
            corner_k = int(rng.choice([0, 2, 3, 5]))
            corner = new_p[corner_k]
            outward = -n if corner_k in (0, 3) else n
            to_disc = -t if corner_k < 3 else t
            size = rng.uniform(0.07, 0.12) * width
            spur = np.stack([corner - to_disc * 0.15 * h_t,
                             corner + outward * size * 0.6 + to_disc * size * 0.05,
                             corner + outward * size + to_disc * size * 0.4,
                             corner + outward * size * 0.45 + to_disc * size * 0.3,
                             corner + to_disc * 0.04 * h_t - outward * 0.05 * width])
            sm = np.zeros(crop.shape, np.float32)
            cv2.fillPoly(sm, [np.round((spur - [x0, y0]) * 16).astype(np.int32)], 1.0,
                         lineType=cv2.LINE_AA, shift=4)
            sm = cv2.GaussianBlur(sm, (0, 0), max(0.8, 0.015 * width))
            out = _brighten(out, 0.5 * sm * mod, contrast)
            signs["osteophyte"] = {"corner": f"p{corner_k + 1}", "size_px": round(float(size), 2)}

    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    new_image = img.copy()
    new_image[y0:y1, x0:x1] = np.where(region, out, crop)
    full_region = np.zeros(img.shape, bool)
    full_region[y0:y1, x0:x1] = region

    measured = grade_vertebrae(new_points)[index]
    if measured["genant_grade"] != grade or measured["morphology"] != shape:
        raise RuntimeError(f"simulated {shape} grade {grade} measures as {measured['morphology']} "
                           f"grade {measured['genant_grade']} (loss {measured['height_loss']:.4f})")
    info = {"index": int(index), "grade": int(grade), "shape": shape, "acute": bool(acute),
            "loss": plan["loss"], "posterior_loss": plan["posterior_loss"],
            "reference_height": plan["reference"],
            "heights_before": plan["before"].tolist(),
            "heights_after": heights_from_points(new_p).as_array().tolist(),
            "measured": measured, "signs": signs, "region": full_region,
            "bbox": (x0, y0, x1, y1)}
    return new_image, new_points, info


def fracture_feasible(points: np.ndarray, index: int, grade: int, shape: str) -> bool:
    """True when :func:`simulate_fracture` can draw this fracture on this vertebra."""
    try:
        plan = plan_heights(points, index, grade, shape, np.random.default_rng(0))
        p = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)[index]
        _collapse(p, _frame(p)[1], plan["targets"])
        return True
    except InfeasibleFracture:
        return False


# ----------------------------------------------------------------------------- sampling


def _sample_spec(rng: np.random.Generator, acute_bias: float) -> tuple[int, str, bool]:
    """Grade, shape and acuity drawn like the phantom's (no grade-1 crush)."""
    acute = bool(rng.random() < 0.35 + 0.3 * acute_bias)
    grade = int(rng.choice([1, 2, 3], p=ACUTE_GRADE_P if acute else CHRONIC_GRADE_P))
    shape_p = ACUTE_SHAPE_P if acute else CHRONIC_SHAPE_P
    shape = str(rng.choice(list(shape_p), p=list(shape_p.values())))
    if shape == "crush" and grade == 1:
        shape = "wedge"
    return grade, shape, acute


def _intact(vertebrae: list[dict], i: int) -> bool:
    g = vertebrae[i].get("genant_grade")
    return g is not None and not (isinstance(g, float) and math.isnan(g)) and float(g) == 0


def _add_fractures(image: np.ndarray, points: np.ndarray, vertebrae: list[dict], n_frac: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw up to ``n_frac`` fractures on intact vertebrae with intact neighbours, kept apart.

    Returns the new image, points and one info dict per fracture drawn.
    """
    n = len(points)
    levels = [v["level"] for v in vertebrae]
    acute_bias = float(rng.random())
    infos: list[dict] = []
    taken: list[int] = []
    for _ in range(n_frac):
        grade, shape, acute = _sample_spec(rng, acute_bias)
        cand = [i for i in range(n)
                if _intact(vertebrae, i)
                and all(_intact(vertebrae, j) for j in (i - 1, i + 1) if 0 <= j < n)
                and all(abs(i - j) > 1 for j in taken)]
        weights = np.array([LEVEL_FRACTURE_WEIGHT.get(levels[i], 0.2) for i in cand], dtype=float)
        chosen = None
        if cand:
            order = rng.choice(len(cand), size=len(cand), replace=False, p=weights / weights.sum())
            for o in order:
                i = cand[int(o)]
                if fracture_feasible(points, i, grade, shape):
                    chosen = i
                    break
        if chosen is None:
            continue
        image, points, info = simulate_fracture(image, points, chosen, grade, shape, acute, rng)
        taken.append(chosen)
        infos.append(info)
    return image, points, infos


def _labelled_vertebrae(vertebrae: list[dict], points: np.ndarray, infos: list[dict]) -> list[dict]:
    out = []
    by_index = {inf["index"]: inf for inf in infos}
    for i, v in enumerate(vertebrae):
        nv = dict(v)
        nv["points"] = points[i].copy()
        if i in by_index:
            inf = by_index[i]
            nv.update(genant_grade=float(inf["grade"]), morphology=inf["shape"],
                      acute=float(inf["acute"]), box=points_box(points[i]))
        out.append(nv)
    return out


def _image_labels(vertebrae: list[dict], base_fracture: float, base_acute: float) -> tuple[float, float]:
    grades = np.array([float(v.get("genant_grade", float("nan"))) for v in vertebrae])
    fractured = [v for v, g in zip(vertebrae, grades) if g > 0]
    if fractured:
        fracture = 1.0
        acutes = np.array([float(v.get("acute", float("nan"))) for v in fractured])
        if (acutes == 1).any():
            acute = 1.0
        elif not np.isnan(acutes).any():
            acute = 0.0
        else:
            acute = float("nan")
        return fracture, acute
    if not np.isnan(grades).any():
        return 0.0, float("nan")
    return base_fracture, base_acute


class FractureSynthesis:
    """On-the-fly fracture augmentation for a dataset.

    ``aug(image, points, labels)`` returns ``(image, points, labels)``: with probability ``p``
    one fracture (grade, shape and acuity drawn like the phantom's) is simulated on an intact
    vertebra with intact neighbours, and ``labels`` is a new dict with the truth updated:
    per-vertebra ``genant_grade`` (length n), ``morphology`` and ``acute`` (1/0, NaN for
    unfractured), image-level ``fracture`` and ``acute``, and ``simulated`` (index, grade,
    shape, acute; None when nothing was drawn). Missing per-vertebra grades are taken as 0
    (``assume_intact=True``, right for landmark sets of normal spines) or block the
    vertebra. ``rng`` (seed or Generator) at construction; pass ``rng=`` to a call for
    per-sample determinism (e.g. ``np.random.default_rng([seed, epoch, index])``), which
    also avoids identical streams in forked DataLoader workers.
    """

    def __init__(self, p: float = 0.5, rng=None, assume_intact: bool = True):
        self.p = float(p)
        self.assume_intact = assume_intact
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def __call__(self, image: np.ndarray, points: np.ndarray, labels: dict | None = None, rng=None):
        rng = self.rng if rng is None else (rng if isinstance(rng, np.random.Generator)
                                            else np.random.default_rng(rng))
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
        n = len(pts)
        labels = dict(labels or {})
        grades = np.asarray(labels.get("genant_grade", np.full(n, np.nan)), dtype=float).copy()
        if self.assume_intact:
            grades = np.where(np.isnan(grades), 0.0, grades)
        morph = list(labels.get("morphology", ["normal" if g == 0 else "" for g in grades]))
        v_acute = np.asarray(labels.get("acute_vertebrae", np.full(n, np.nan)), dtype=float).copy()
        levels = list(labels.get("levels", [f"#{i}" for i in range(n)]))
        labels["simulated"] = None
        if rng.random() >= self.p:
            labels.update(genant_grade=grades, morphology=morph, acute_vertebrae=v_acute)
            return image, pts, labels
        verts = [{"level": levels[i], "genant_grade": grades[i]} for i in range(n)]
        new_image, new_pts, infos = _add_fractures(np.asarray(image, np.float32), pts, verts, 1, rng)
        for inf in infos:
            i = inf["index"]
            grades[i], morph[i], v_acute[i] = inf["grade"], inf["shape"], float(inf["acute"])
            labels["simulated"] = {k: inf[k] for k in ("index", "grade", "shape", "acute")}
        fractured = grades > 0
        base_fracture = float(labels.get("fracture", float("nan")))
        base_acute = float(labels.get("acute", float("nan")))
        if fractured.any():
            labels["fracture"] = 1.0
            known = v_acute[fractured]
            if (known == 1).any():
                labels["acute"] = 1.0
            elif not np.isnan(known).any():
                labels["acute"] = 0.0
            else:
                labels["acute"] = base_acute if base_fracture == 1 else float("nan")
        labels.update(genant_grade=grades, morphology=morph, acute_vertebrae=v_acute)
        return new_image, new_pts, labels


# ----------------------------------------------------------------------------- data set


def _safe_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem).strip("_") or "image"


def simulate_dataset(records: list[dict], out_dir: str | Path, n_per_image: int = 1,
                     p_fracture: float = 0.5, seed: int = 0, size: int | None = None,
                     progress: bool = False, skip_flagged: bool = True) -> Path:
    """Write simulated films of ``records`` (see :mod:`data.landmarks`) under ``out_dir``.

    For each record, ``n_per_image`` films: with probability ``p_fracture`` one to three
    fractures (like the phantom's: 60 / 28 / 12 %) on intact vertebrae whose neighbours are
    intact, otherwise the film unchanged. ``size``: output height in pixels (points scaled
    alike), or None for the original size. Film ``j`` of record ``r`` depends on
    ``(seed, r, j)`` only. Writes ``images/*.png`` (16-bit), ``manifest.csv`` (patient ids
    preserved, ``source_image`` = the original film), ``vertebrae.csv`` and
    ``simulate.json``. Records with landmark ``problems`` (:func:`data.landmarks.read_aasce`)
    are skipped unless ``skip_flagged=False``: their neighbours and levels cannot be trusted.
    Returns the manifest path.
    """

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, vrows = [], []
    n_frac_vertebrae = 0
    iterator = enumerate(records)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(records), desc="simulate")
    n_skipped, unreadable = 0, []
    for r, rec in iterator:
        if skip_flagged and rec.get("problems"):
            n_skipped += 1
            continue
        try:
            base = read_image(rec["image"]).pixels
        except ImageReadError as exc:  # one bad film must not cost the others
            unreadable.append({"image": str(rec["image"]), "error": str(exc)})
            print(f"warning: skipping unreadable source film: {exc}", file=sys.stderr)
            continue
        pts0 = points_array(rec)
        if size is not None:
            h0, w0 = base.shape
            scale = float(size) / h0
            nw = max(1, int(round(w0 * scale)))
            base = cv2.resize(base, (nw, int(size)), interpolation=cv2.INTER_AREA if scale < 1
                              else cv2.INTER_LINEAR)
            # pixel centres: x' = (x + 0.5) * s - 0.5
            pts0 = (pts0 + 0.5) * np.array([nw / w0, size / h0]) - 0.5
        verts0 = [dict(v, points=pts0[i], box=points_box(pts0[i]) if size is not None else v["box"])
                  for i, v in enumerate(rec["vertebrae"])]
        for j in range(n_per_image):
            rng = np.random.default_rng([int(seed), r, j, 4099])
            image, pts, infos = base, pts0, []
            if rng.random() < p_fracture:
                n_frac = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
                image, pts, infos = _add_fractures(base, pts0, verts0, n_frac, rng)
            verts = _labelled_vertebrae(verts0, pts, infos)
            fracture, acute = _image_labels(verts, rec.get("fracture", float("nan")),
                                            rec.get("acute", float("nan")))
            name = f"{r:05d}_{_safe_name(rec['image'])}_{j}.png"
            rel = f"images/{name}"
            atomic_write_image(out / rel, np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16))
            row = manifest_row(rel, dict(rec, fracture=fracture, acute=acute))
            row["source_image"] = str(rec["image"])
            row["simulated"] = ";".join(
                f"{verts[inf['index']]['level']}:{inf['shape']}:{inf['grade']}:"
                f"{'acute' if inf['acute'] else 'chronic'}" for inf in infos)
            rows.append(row)
            vrows.extend(vertebra_row(rel, v, POINT_DECIMALS) for v in verts)
            n_frac_vertebrae += len(infos)
    atomic_write_text(out / "vertebrae.csv", pd.DataFrame(vrows).to_csv(index=False))
    manifest = atomic_write_text(out / "manifest.csv", pd.DataFrame(rows).to_csv(index=False))
    summary = {"generator": "data.simulate", "version": SIMULATE_VERSION, "seed": seed,
               "n_source_images": len(records), "n_skipped_flagged": n_skipped,
               "n_skipped_unreadable": len(unreadable), "unreadable": unreadable,
               "n_per_image": n_per_image,
               "p_fracture": p_fracture, "size": size, "n_images": len(rows),
               "n_fractured_images": int(sum(1 for r in rows if r["fracture"] == 1)),
               "n_fractured_vertebrae": n_frac_vertebrae,
               "note": "Fractures simulated on real films: research use, not for clinical use."}
    atomic_write_text(out / "simulate.json", json.dumps(summary, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.simulate",
                                     description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--aasce", help="AASCE folder (filenames.csv, landmarks.csv, images/)")
    src.add_argument("--vertebrae-csv", help="project-format vertebrae.csv (manifest.csv beside it)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=1, help="simulated films per source film")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p-fracture", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=None, help="output height in pixels")
    parser.add_argument("--limit", type=int, default=None, help="use only the first K source films")
    parser.add_argument("--held-out", type=float, default=None, metavar="FRACTION",
                        help="use only the patients that `data.combine --test-fraction-of M=FRACTION` holds out "
                             "(the shipped model's test patients: 0.2, with --held-out-seed 0)")
    parser.add_argument("--held-out-seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        records = read_aasce(args.aasce) if args.aasce else read_vertebrae_csv(args.vertebrae_csv)
    except LandmarkError as exc:
        parser.exit(2, f"error: {exc}\n")
    if args.held_out is not None:
        records = [r for r in records if is_held_out(r["patient_id"], args.held_out, args.held_out_seed)]
    if args.limit is not None:
        records = records[: args.limit]
    manifest = simulate_dataset(records, args.out, n_per_image=args.n, p_fracture=args.p_fracture,
                                seed=args.seed, size=args.size, progress=True)
    summary = json.loads((manifest.parent / "simulate.json").read_text())
    print(f"wrote {summary['n_images']} films ({summary['n_fractured_images']} with fractures) to "
          f"{manifest.parent} (manifest.csv, vertebrae.csv); {summary['n_skipped_flagged']} source films "
          f"with landmark problems skipped, {summary.get('n_skipped_unreadable', 0)} unreadable")


if __name__ == "__main__":
    main()
