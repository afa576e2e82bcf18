"""The first, 2D procedural phantom of lateral thoracolumbar spine radiographs, with exact
per-vertebra truth.

Retired: the phantom is now the 3D one (``data.phantom``, ``data/spine3d``), and nothing trains
on this drawing by default. It is kept, byte for byte, as the baseline arm of
``benchmarks.transfer`` (docs/studies/2026-12-06-transfer.md) and for tests that need small,
fast films with exact truth. Each image is drawn from a seed alone (image ``i`` of seed ``s`` is the
same whatever ``n`` is), and is written in the project's manifest and ``vertebrae.csv``
formats (see README, "Data formats").

What it draws, in a canonical frame (anterior to the left) that is then rotated, scaled,
possibly mirrored and collimated:

* vertebral bodies (a window of T4-L5) with cortical rims, trabecular texture, slightly
  concave endplates and heights growing caudally; discs; pedicles and spinous processes;
* thoracic kyphosis and lumbar lordosis that vary per image; ribs, lung fields, the
  diaphragm, bowel gas and the soft-tissue envelope;
* fractures of Genant grade 1-3 (wedge, biconcave, crush). Acute ones carry an endplate
  step with a cortical break, a sclerotic condensation band beneath the collapsed endplate
  and prevertebral soft-tissue swelling, and collapse less; chronic ones carry thick smooth
  sclerotic margins, osteophytes, narrowing of the adjacent discs and collapse more;
* confounders: physiological wedging of T11-L1 under 20 %, osteophytes, endplate sclerosis
  and Schmorl's nodes on unfractured vertebrae, osteopenia, scoliotic double contours,
  rotation, scale, exposure, scatter, quantum noise, collimation, a side marker, 12-16-bit
  output.

Usage::

    python -m data.phantom2d --out DIR --n N --seed S [--size PX]

Truth is exact: the six morphometry points written for each vertebra are the corners of the
drawn body, so heights measured from them give back the grade (see ``tests/test_phantom2d.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from data.fracture_priors import (ACUTE_GRADE_P, ACUTE_SHAPE_P, CHRONIC_GRADE_P, CHRONIC_SHAPE_P,  # noqa: F401
                                  LEVEL_FRACTURE_WEIGHT, LOSS_RANGE)
from data.io_utils import atomic_write_text, atomic_write_image
from data.morphometry import LEVELS

PHANTOM_VERSION = "1"
PHANTOM_LEVELS: tuple[str, ...] = LEVELS[3:]  # T4 ... L5
THORACOLUMBAR = ("T11", "T12", "L1")  # physiological wedging allowed here


@dataclass
class Vertebra:
    level: str
    h: float  # intact height (px, canonical frame)
    w: float  # antero-posterior depth
    heights: tuple[float, float, float]  # Ha, Hm, Hp after deformation
    grade: int = 0
    shape: str = "normal"
    acute: bool | None = None
    osteophytes: tuple[bool, bool] = (False, False)  # superior / inferior anterior spurs
    sclerotic_endplates: bool = False
    schmorl: bool = False
    # set while laying out
    origin: np.ndarray = field(default_factory=lambda: np.zeros(2))
    tangent: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0]))
    normal: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0]))
    top_ctrl: np.ndarray = field(default_factory=lambda: np.zeros(3))
    bottom_ctrl: np.ndarray = field(default_factory=lambda: np.zeros(3))
    step: tuple[float, float] | None = None  # (u position, depth) of an acute endplate step

    @property
    def fractured(self) -> bool:
        return self.grade > 0


# ----------------------------------------------------------------------------- geometry


def _quadratic_profile(ctrl: np.ndarray, w: float, u: np.ndarray) -> np.ndarray:
    """Quadratic through (-w/2, c0), (0, c1), (w/2, c2)."""
    a, m, p = ctrl
    t = u / (w / 2.0)  # -1 .. 1
    return m + (p - a) / 2.0 * t + ((a + p) / 2.0 - m) * t**2


def _step_bump(u: np.ndarray, v: Vertebra) -> np.ndarray:
    if v.step is None:
        return np.zeros_like(u)
    us, depth = v.step
    width = 0.16 * v.w
    x = (u - us) / width
    # sharp drop at us, linear recovery over `width`: a depressed endplate fragment
    return np.where((x >= 0) & (x <= 1), depth * (1 - x), 0.0)


def _top(v: Vertebra, u: np.ndarray) -> np.ndarray:
    return _quadratic_profile(v.top_ctrl, v.w, u) + _step_bump(u, v)


def _bottom(v: Vertebra, u: np.ndarray) -> np.ndarray:
    return _quadratic_profile(v.bottom_ctrl, v.w, u)


def _to_canvas(v: Vertebra, u: np.ndarray, vv: np.ndarray) -> np.ndarray:
    return v.origin[None, :] + u[:, None] * v.normal[None, :] + vv[:, None] * v.tangent[None, :]


def _body_polygon(v: Vertebra, n: int = 28) -> np.ndarray:
    u = np.linspace(-v.w / 2, v.w / 2, n)
    top = _to_canvas(v, u, _top(v, u))
    bottom = _to_canvas(v, u[::-1], _bottom(v, u[::-1]))
    return np.concatenate([top, bottom])


def _six_points(v: Vertebra) -> np.ndarray:
    u = np.array([-v.w / 2, 0.0, v.w / 2])
    sup = _to_canvas(v, u, _quadratic_profile(v.top_ctrl, v.w, u))
    inf = _to_canvas(v, u, _quadratic_profile(v.bottom_ctrl, v.w, u))
    return np.concatenate([sup, inf])  # p1..p3 superior (a, m, p), p4..p6 inferior


def _poly(img: np.ndarray, pts: np.ndarray, value: float, shift: int = 4) -> None:
    s = 1 << shift
    cv2.fillPoly(img, [np.round(pts * s).astype(np.int32)], value, lineType=cv2.LINE_AA, shift=shift)


def _polyline(img: np.ndarray, pts: np.ndarray, value: float, thickness: float, closed=False) -> None:
    s = 1 << 4
    cv2.polylines(img, [np.round(pts * s).astype(np.int32)], closed, value,
                  thickness=max(1, int(round(thickness))), lineType=cv2.LINE_AA, shift=4)


def _smooth_noise(rng: np.random.Generator, shape, sigma: tuple[float, float]) -> np.ndarray:
    n = rng.standard_normal(shape).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigmaX=sigma[1], sigmaY=sigma[0])
    return n / (n.std() + 1e-6)


# ----------------------------------------------------------------------------- sampling


def _sample_anatomy(rng: np.random.Generator, canvas_h: int) -> tuple[list[Vertebra], dict]:
    n_vis = int(rng.integers(7, 12))
    start = int(rng.integers(0, len(PHANTOM_LEVELS) - n_vis + 1))
    levels = PHANTOM_LEVELS[start : start + n_vis]
    osteoporotic = rng.random() < 0.5  # older patient: more confounders and fractures
    # Height of T4 such that the window fills 55-80 % of the canvas.
    growth = 0.035
    rel = np.array([1 + growth * PHANTOM_LEVELS.index(l) for l in levels])
    disc_rel = np.array([0.20 + 0.14 * (PHANTOM_LEVELS.index(l) / 13) for l in levels])
    fill = rng.uniform(0.55, 0.80)
    h0 = fill * canvas_h / float(np.sum(rel * (1 + disc_rel)))
    depth_ratio = rng.uniform(1.15, 1.35)
    verts = []
    for lvl, r in zip(levels, rel):
        h = h0 * r
        w = h * (depth_ratio + 0.2 * (PHANTOM_LEVELS.index(lvl) / 13))
        verts.append(Vertebra(level=lvl, h=h, w=w, heights=(h, h, h)))

    n_frac = 0
    if rng.random() < 0.5:  # about half the images carry one or more fractures
        n_frac = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    weights = np.array([LEVEL_FRACTURE_WEIGHT[v.level] for v in verts])
    order = rng.choice(len(verts), size=len(verts), replace=False, p=weights / weights.sum())
    fractured: list[int] = []
    for i in order:
        if len(fractured) >= n_frac:
            break
        # a crush needs intact neighbours as its height reference; keep fractures apart
        if any(abs(i - j) <= 1 for j in fractured):
            continue
        fractured.append(int(i))
    image_acute_bias = rng.random()
    for i in fractured:
        v = verts[i]
        v.acute = bool(rng.random() < (0.35 + 0.3 * image_acute_bias))
        grade_p = ACUTE_GRADE_P if v.acute else CHRONIC_GRADE_P
        v.grade = int(rng.choice([1, 2, 3], p=grade_p))
        shape_p = ACUTE_SHAPE_P if v.acute else CHRONIC_SHAPE_P
        shapes = list(shape_p)
        v.shape = str(rng.choice(shapes, p=list(shape_p.values())))
        if v.shape == "crush" and v.grade == 1:
            v.shape = "wedge"  # a crush with a posterior loss over 20 % is at least grade 2
        lo, hi = LOSS_RANGE[v.grade]
        if v.shape == "crush":
            lo = max(lo, 0.30)
        loss = rng.uniform(lo, hi)
        h = v.h
        if v.shape == "wedge":
            v.heights = (h * (1 - loss), h * (1 - loss * rng.uniform(0.35, 0.55)), h)
        elif v.shape == "biconcave":
            v.heights = (h * (1 - loss * rng.uniform(0.2, 0.5)), h * (1 - loss), h)
        else:  # crush: every height lost, the anterior most
            post = rng.uniform(0.27, min(loss, 0.45))
            mid = rng.uniform(post, loss)
            v.heights = (h * (1 - loss), h * (1 - mid), h * (1 - post))
        if not v.acute:
            v.osteophytes = (rng.random() < 0.8, rng.random() < 0.6)

    # Confounders on unfractured vertebrae.
    for i, v in enumerate(verts):
        if v.fractured:
            continue
        ha, hm, hp = v.heights
        if v.level in THORACOLUMBAR and rng.random() < 0.6:
            ha = v.h * (1 - rng.uniform(0.03, 0.15))  # physiological wedging, < 20 %
        hm = v.h * (1 - rng.uniform(0.0, 0.08))
        v.heights = (ha, hm, hp)
        p_osteo = 0.35 if osteoporotic else 0.12
        v.osteophytes = (rng.random() < p_osteo, rng.random() < p_osteo * 0.7)
        v.sclerotic_endplates = rng.random() < (0.2 if osteoporotic else 0.08)
        v.schmorl = rng.random() < 0.06

    style = {
        "osteopenia": rng.uniform(0.45, 0.7) if osteoporotic and rng.random() < 0.7 else rng.uniform(0.8, 1.05),
        "kyphosis": rng.uniform(0.012, 0.05),  # rad of tangent change per vertebra
        "lordosis": rng.uniform(0.02, 0.07),
        "scoliosis": rng.random() < 0.2,
        "osteoporotic": osteoporotic,
    }
    return verts, style


def _layout(verts: list[Vertebra], style: dict, rng: np.random.Generator, canvas_hw) -> None:
    """Stack vertebrae and discs along a kyphotic-lordotic curve in the canonical frame."""
    H, W = canvas_hw
    theta = rng.uniform(-0.08, 0.08)
    total = sum(v.h * 1.25 for v in verts)
    cursor = np.array([W * rng.uniform(0.50, 0.56), (H - total) / 2 + rng.uniform(-0.03, 0.03) * H])
    for i, v in enumerate(verts):
        idx = PHANTOM_LEVELS.index(v.level)
        # thoracic kyphosis bends the column one way, lumbar lordosis the other
        curvature = style["kyphosis"] if idx <= PHANTOM_LEVELS.index("T12") else -style["lordosis"]
        if v.level in ("T12", "L1"):
            curvature *= 0.3
        ha, hm, hp = v.heights
        # Slightly concave endplates. The inferior endplate stays put and the superior one
        # collapses (the common case); a biconcave fracture bows the inferior one up too.
        bottom_mid = v.h / 2 - 0.015 * v.h
        if v.shape == "biconcave":
            bottom_mid -= 0.45 * (v.h - hm)
        v.bottom_ctrl = np.array([v.h / 2, bottom_mid, v.h / 2])
        v.top_ctrl = v.bottom_ctrl - np.array([ha, hm, hp])
        # Rotate the body so that its superior endplate chord lies parallel to the endplate
        # above: a wedge then angulates the column below it, as real ones do.
        chord_tilt = np.arctan2((v.top_ctrl[2] - v.top_ctrl[0]), v.w)
        theta_v = theta + curvature / 2 - chord_tilt
        v.tangent = np.array([-np.sin(theta_v), np.cos(theta_v)])
        v.normal = np.array([np.cos(theta_v), np.sin(theta_v)])
        top_mid_v = (v.top_ctrl[0] + v.top_ctrl[2]) / 2
        v.origin = cursor - v.tangent * top_mid_v
        if v.acute and v.fractured:
            v.step = (rng.uniform(-0.42, -0.26) * v.w, rng.uniform(0.07, 0.13) * v.h)
        bottom_mid_pt = v.origin + v.tangent * (v.h / 2)
        theta = theta_v + curvature / 2
        # next disc, narrowed next to a chronic fracture or by degeneration
        disc = v.h * (0.20 + 0.14 * idx / 13) * rng.uniform(0.85, 1.15)
        nxt = verts[i + 1] if i + 1 < len(verts) else None
        if (v.fractured and not v.acute) or (nxt is not None and nxt.fractured and not nxt.acute):
            disc *= rng.uniform(0.35, 0.6)
        elif style["osteoporotic"] and rng.random() < 0.2:
            disc *= rng.uniform(0.55, 0.8)
        t_next = np.array([-np.sin(theta), np.cos(theta)])
        cursor = bottom_mid_pt + t_next * disc


# ----------------------------------------------------------------------------- rendering


def _render(verts: list[Vertebra], style: dict, rng: np.random.Generator, canvas_hw):
    H, W = canvas_hw
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    att = np.zeros((H, W), np.float32)

    # Soft-tissue envelope: the body's antero-posterior path length, thinner at the skin.
    spine_x = float(np.mean([v.origin[0] for v in verts]))
    mean_w = float(np.mean([v.w for v in verts]))
    back = spine_x + mean_w * rng.uniform(2.2, 3.0) + 0.02 * W * np.sin(yy / H * 3 + rng.uniform(0, 6))
    front = spine_x - mean_w * rng.uniform(3.5, 5.5) + 0.04 * W * np.sin(yy / H * 2 + rng.uniform(0, 6))
    inside = np.clip(np.minimum(xx - front, back - xx) / (0.12 * W), 0, 1)
    att += 1.1 * np.sqrt(inside)
    # overlapping organs and fat planes: low-frequency mottle inside the body
    att += 0.10 * _smooth_noise(rng, (H, W), (0.03 * H, 0.03 * H)) * inside
    att += 0.04 * _smooth_noise(rng, (H, W), (0.008 * H, 0.008 * H)) * inside

    # Diaphragm: lungs above (air, less attenuation), abdomen below.
    levels = [v.level for v in verts]
    pos = {v.level: v for v in verts}
    if "T11" in pos:
        dia_y = pos["T11"].origin[1] + rng.uniform(-1.5, 1.5) * pos["T11"].h
    elif PHANTOM_LEVELS.index(levels[0]) > PHANTOM_LEVELS.index("T11"):
        dia_y = -H  # window below the diaphragm
    else:
        dia_y = 2 * H  # window above it
    dome = dia_y - 0.10 * H * np.cos(np.clip((xx - (front + back) / 2) / (back - front + 1e-3) * np.pi, -np.pi / 2, np.pi / 2))
    posterior_sulcus = np.clip((xx - spine_x) / (0.3 * W), 0, 1) * 0.08 * H
    lung = 1.0 / (1.0 + np.exp(-(dome + posterior_sulcus - yy) / (0.012 * H)))
    att -= lung * rng.uniform(0.35, 0.55) * np.sqrt(inside)

    # Bowel gas below the diaphragm.
    gas = np.zeros((H, W), np.float32)
    gas_top = max(dia_y + 0.05 * H, 0)
    for _ in range(int(rng.integers(4, 22)) if gas_top < H - 1 else 0):
        cy = rng.uniform(gas_top, H)
        cx = rng.uniform(front.mean() + 0.05 * W, spine_x + mean_w * 0.6)
        ax = rng.uniform(0.01, 0.05) * W
        cv2.ellipse(gas, (int(cx), int(cy)), (int(ax), int(ax * rng.uniform(0.5, 1.2))),
                    rng.uniform(0, 180), 0, 360, float(rng.uniform(0.15, 0.35)), -1, cv2.LINE_AA)
    att -= cv2.GaussianBlur(gas, (0, 0), 2.0) * (yy > dia_y)

    bone = np.zeros((H, W), np.float32)
    soft = np.zeros((H, W), np.float32)
    density = style["osteopenia"]
    trab_tex = 1 + 0.22 * _smooth_noise(rng, (H, W), (2.2, 0.7)) + 0.12 * _smooth_noise(rng, (H, W), (0.8, 0.8))

    # Ribs overlapping the thoracic spine: oblique arcs, left and right slightly apart.
    for v in verts:
        if not v.level.startswith("T"):
            continue
        for side in (0, 1):
            base = v.origin + v.normal * (v.w * 0.45) - v.tangent * (v.h * 0.3) + side * rng.uniform(-0.2, 0.2) * v.h
            # from the costovertebral joint the rib runs back, then sweeps forward and down
            t = np.linspace(0, 1, 32)
            arc = np.stack([
                base[0] + v.w * 1.2 * np.sin(t * np.pi * 0.8) - t ** 1.3 * v.w * 4.0,
                base[1] - v.h * 0.6 * np.sin(t * np.pi) + t ** 2 * v.h * 3.5,
            ], 1)
            _polyline(bone, arc, float(0.15 * density + 0.06), 0.30 * v.h)
        # pedicle and spinous process (posterior elements)
        for part in _posterior_elements(v):
            _poly(bone, part, float(0.5 * density))
    for v in verts:
        if v.level.startswith("L"):
            for part in _posterior_elements(v):
                _poly(bone, part, float(0.55 * density))
    bone = cv2.GaussianBlur(bone, (0, 0), 1.2)

    # Vertebral bodies.
    body = np.zeros((H, W), np.float32)
    cortex = np.zeros((H, W), np.float32)
    band = np.zeros((H, W), np.float32)
    ghost = np.zeros((H, W), np.float32)
    mask_polys = []
    for v in verts:
        poly = _body_polygon(v)
        mask_polys.append(poly)
        one = np.zeros((H, W), np.float32)
        _poly(one, poly, 1.0)
        body = np.maximum(body, one)
        thick = 0.055 * v.h * (0.8 if density < 0.75 else 1.0)
        c_val = 0.6 + 0.3 * density
        if v.fractured and not v.acute:
            thick *= 1.9  # smooth, well-corticated sclerotic margins
            c_val *= 1.35
        u = np.linspace(-v.w / 2, v.w / 2, 28)
        top_line = _to_canvas(v, u, _top(v, u))
        bottom_line = _to_canvas(v, u, _bottom(v, u))
        if v.step is not None:
            # cortical break at the step: leave a gap in the superior endplate
            us = v.step[0]
            gap = (u > us - 0.04 * v.w) & (u < us + 0.05 * v.w)
            _polyline(cortex, top_line[: np.argmax(gap)], c_val, thick)
            _polyline(cortex, top_line[len(gap) - np.argmax(gap[::-1]):], c_val, thick)
            # condensation band of impacted trabeculae beneath the collapsed endplate
            offset = rng.uniform(0.12, 0.20) * v.h
            band_line = _to_canvas(v, u, _top(v, u) + offset)
            _polyline(band, band_line[2:-2], rng.uniform(0.45, 0.75), rng.uniform(0.09, 0.14) * v.h)
            # prevertebral soft-tissue swelling
            c = v.origin - v.normal * (v.w * rng.uniform(0.75, 0.95))
            cv2.ellipse(soft, (int(c[0]), int(c[1])), (int(v.w * 0.3), int(v.h * rng.uniform(1.0, 1.6))),
                        float(np.degrees(np.arctan2(v.tangent[0], v.tangent[1]))), 0, 360,
                        float(rng.uniform(0.18, 0.3)), -1, cv2.LINE_AA)
        else:
            _polyline(cortex, top_line, c_val * (1.3 if v.sclerotic_endplates else 1.0),
                      thick * (1.6 if v.sclerotic_endplates else 1.0))
        _polyline(cortex, bottom_line, c_val * (1.3 if v.sclerotic_endplates else 1.0),
                  thick * (1.6 if v.sclerotic_endplates else 1.0))
        for side in (0, -1):
            wall = np.stack([top_line[side], bottom_line[side]])
            _polyline(cortex, wall, c_val, thick * 0.9)
        # osteophytes: anterior spurs at the endplate corners
        for k, present in enumerate(v.osteophytes):
            if not present:
                continue
            corner = top_line[0] if k == 0 else bottom_line[0]
            direction = -v.normal
            along = -v.tangent if k == 0 else v.tangent
            size = v.w * rng.uniform(0.10, 0.25)
            spur = np.stack([corner + along * 0.18 * v.h, corner + direction * size + along * size * 0.6,
                             corner - along * 0.05 * v.h])
            _poly(cortex, spur, c_val * 0.9)
        if v.schmorl:
            c = v.origin + v.normal * rng.uniform(-0.1, 0.2) * v.w + v.tangent * (_top(v, np.array([0.0]))[0] + 0.12 * v.h)
            cv2.circle(band, (int(c[0]), int(c[1])), max(1, int(0.08 * v.h)), 0.35, max(1, int(0.03 * v.h)), cv2.LINE_AA)
        if style["scoliosis"]:
            _polyline(ghost, top_line + v.normal * 0.06 * v.w + v.tangent * 0.08 * v.h, 0.4, thick)
            _polyline(ghost, bottom_line + v.normal * 0.06 * v.w - v.tangent * 0.05 * v.h, 0.4, thick)
    trabecular = body * (0.55 * density + 0.15) * trab_tex
    band = cv2.GaussianBlur(band, (0, 0), 1.0) * body
    att += (cv2.GaussianBlur(trabecular, (0, 0), 0.7) + np.maximum(cortex, 0) * 0.8
            + band + ghost * 0.5 + bone + cv2.GaussianBlur(soft, (0, 0), 3.0))
    return att, mask_polys


def _posterior_elements(v: Vertebra) -> list[np.ndarray]:
    lumbar = v.level.startswith("L")

    def pt(u, vv):
        return v.origin + u * v.normal + vv * v.tangent

    hw = v.w / 2
    pedicle = np.stack([pt(hw, -0.38 * v.h), pt(hw + 0.45 * v.w, -0.30 * v.h),
                        pt(hw + 0.45 * v.w, 0.05 * v.h), pt(hw, 0.0)])
    drop = 0.3 * v.h if lumbar else 0.8 * v.h  # thoracic spinous processes slope down
    reach = 0.95 if lumbar else 0.8
    spinous = np.stack([pt(hw + 0.40 * v.w, -0.30 * v.h), pt(hw + reach * v.w, -0.15 * v.h + drop * 0.5),
                        pt(hw + reach * v.w, 0.10 * v.h + drop), pt(hw + 0.40 * v.w, 0.10 * v.h)])
    return [pedicle, spinous]


def _acquire(att: np.ndarray, rng: np.random.Generator, out_hw, affine: np.ndarray):
    """Turn an attenuation map into a processed radiograph: blur, scatter, noise, window."""
    H, W = out_hw
    mu = rng.uniform(0.9, 1.5)  # beam quality: contrast
    att = cv2.warpAffine(att, affine, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    att = cv2.GaussianBlur(att, (0, 0), rng.uniform(0.5, 1.1))  # focal spot and detector blur
    transmitted = np.exp(-mu * np.clip(att, 0, None))
    scatter = rng.uniform(0.08, 0.35)
    transmitted = (1 - scatter) * transmitted + scatter * cv2.GaussianBlur(transmitted, (0, 0), 0.08 * W)
    counts = rng.uniform(300, 3000)
    noisy = rng.poisson(np.clip(transmitted * counts, 0, None)).astype(np.float32)
    # correlated (detector) noise as well as quantum noise
    noisy += 0.02 * counts * _smooth_noise(rng, (H, W), (1.2, 1.2)) * transmitted.mean()
    signal = -np.log(np.clip(noisy, 0.5, None) / counts)  # processed: bone bright
    lo, hi = np.percentile(signal, [0.5, 99.7])
    gamma = rng.uniform(0.8, 1.25)
    img = np.clip((signal - lo) / (hi - lo + 1e-6), 0, 1) ** gamma

    # Collimation: unexposed borders read bright.
    if rng.random() < 0.7:
        t, b, l, r = (rng.uniform(0, 0.07, 4) * np.array([H, H, W, W])).astype(int)
        col = np.zeros((H, W), bool)
        col[: t] = col[H - b:] = True
        col[:, : l] = col[:, W - r:] = True
        img[col] = 0.92 + 0.04 * rng.random()
    # side marker
    if rng.random() < 0.6:
        org = (int(rng.uniform(0.04, 0.8) * W), int(rng.uniform(0.08, 0.15) * H) if rng.random() < 0.5 else int(rng.uniform(0.9, 0.96) * H))
        marker = np.zeros((H, W), np.uint8)  # putText draws on 8-bit images only
        cv2.putText(marker, str(rng.choice(["L", "R"])), org, cv2.FONT_HERSHEY_SIMPLEX, H / 500, 255,
                    max(1, H // 200), cv2.LINE_AA)
        img = np.maximum(img, marker.astype(np.float32) / 255.0)
    bits = int(rng.choice([12, 14, 16]))
    return np.round(img * (2**bits - 1)).astype(np.uint16), bits


# ----------------------------------------------------------------------------- public API


def generate_image(seed: int, index: int, size: int = 512) -> dict:
    """Draw one phantom film. Returns ``image`` (uint16), ``mask`` (uint8 labels), ``meta``
    and ``vertebrae`` (list of per-vertebra truth dicts, points in output pixels)."""
    rng = np.random.default_rng([int(seed), int(index), 7919])
    H = int(size)
    W = int(round(size * 0.8 / 8) * 8)
    pad = 0.25
    canvas = (int(H * (1 + 2 * pad)), int(W * (1 + 2 * pad)))
    verts, style = _sample_anatomy(rng, H)
    _layout(verts, style, rng, canvas)
    att, polys = _render(verts, style, rng, canvas)

    # canonical canvas -> output: rotate, scale, shift, then maybe mirror (anterior right)
    angle = rng.uniform(-7, 7)
    scale = rng.uniform(0.88, 1.12)
    centre = np.array([canvas[1] / 2, canvas[0] / 2]) + rng.uniform(-0.04, 0.04, 2) * np.array([W, H])
    affine = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, scale)
    affine[:, 2] += np.array([W / 2, H / 2]) - centre
    mirror = rng.random() < 0.5
    if mirror:
        affine = np.array([[-1, 0, W - 1], [0, 1, 0]], float) @ np.vstack([affine, [0, 0, 1]])
    image, bits = _acquire(att, rng, (H, W), affine)

    def warp_pts(p):
        return p @ affine[:, :2].T + affine[:, 2]

    mask = np.zeros((H, W), np.uint8)
    records = []
    for k, (v, poly) in enumerate(zip(verts, polys), start=1):
        poly_out = warp_pts(poly)
        _poly(mask, poly_out, k, shift=4)
        pts = warp_pts(_six_points(v))
        x0, y0 = poly_out.min(0)
        x1, y1 = poly_out.max(0)
        records.append({
            "level": v.level,
            "genant_grade": v.grade,
            "morphology": v.shape,
            "acute": "" if not v.fractured else int(bool(v.acute)),
            "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1,
            "points": pts,
            "mask_value": k,
        })
    # a crisp label mask (fillPoly with anti-aliasing blends label values at the edges)
    mask = np.zeros((H, W), np.uint8)
    for rec, poly in zip(records, polys):
        cv2.fillPoly(mask, [np.round(warp_pts(poly) * 16).astype(np.int32)], rec["mask_value"], shift=4)
    fractured = [r for r in records if r["genant_grade"] > 0]
    meta = {
        "bits_stored": bits,
        "mirrored": bool(mirror),
        "rotation_deg": float(angle),
        "osteopenia": float(style["osteopenia"]),
        "fracture": int(bool(fractured)),
        "acute": "" if not fractured else int(any(r["acute"] == 1 for r in fractured)),
    }
    return {"image": image, "mask": mask, "meta": meta, "vertebrae": records}


def _write_one(args) -> tuple[dict, list[dict]]:
    out, seed, index, size = args
    sample = generate_image(seed, index, size)
    name = f"phantom_s{seed}_{index:05d}"
    image_rel = f"images/{name}.png"
    mask_rel = f"masks/{name}.png"
    atomic_write_image(out / image_rel, sample["image"])
    atomic_write_image(out / mask_rel, sample["mask"])
    row = {
        "image": image_rel,
        "patient_id": f"phantom-s{seed}-{index:05d}",
        "fracture": sample["meta"]["fracture"],
        "acute": sample["meta"]["acute"],
        "view": "lateral",
        "mask": mask_rel,
        "bits_stored": sample["meta"]["bits_stored"],
    }
    vrows = []
    for rec in sample["vertebrae"]:
        vr = {"image": image_rel, "level": rec["level"], "genant_grade": rec["genant_grade"],
              "morphology": rec["morphology"], "acute": rec["acute"],
              "x_min": round(float(rec["x_min"]), 2), "y_min": round(float(rec["y_min"]), 2),
              "x_max": round(float(rec["x_max"]), 2), "y_max": round(float(rec["y_max"]), 2)}
        for j, (x, y) in enumerate(rec["points"], start=1):
            vr[f"p{j}x"] = round(float(x), 3)
            vr[f"p{j}y"] = round(float(y), 3)
        vr["mask_value"] = rec["mask_value"]
        vrows.append(vr)
    return row, vrows


def generate_dataset(out: str | os.PathLike, n: int, seed: int, size: int = 512,
                     workers: int | None = None, progress: bool = True) -> Path:
    """Write ``n`` phantom films with ``manifest.csv`` and ``vertebrae.csv`` under ``out``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed, i, size) for i in range(n)]
    workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1, 8)
    if workers > 1 and n > 8:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_write_one, jobs, chunksize=4), total=n,
                                desc=f"phantom seed {seed}", disable=not progress))
    else:
        results = [_write_one(j) for j in tqdm(jobs, desc=f"phantom seed {seed}", disable=not progress)]
    rows = [r for r, _ in results]
    vrows = [v for _, vs in results for v in vs]
    atomic_write_text(out / "manifest.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_text(out / "vertebrae.csv", pd.DataFrame(vrows).to_csv(index=False))
    info = {"generator": "data.phantom2d", "version": PHANTOM_VERSION, "seed": seed, "n": n, "size": size,
            "n_fractured_images": int(sum(r["fracture"] for r in rows)),
            "n_fractured_vertebrae": int(sum(1 for v in vrows if v["genant_grade"] > 0)),
            "note": "Synthetic phantom films. Not patient data; not for clinical use."}
    atomic_write_text(out / "phantom.json", json.dumps(info, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.phantom2d", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of films")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="image height in pixels (width is 0.8x)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    print("note: the 2D phantom is retired (kept as the transfer benchmark's baseline and for tests); "
          "python -m data.phantom draws the 3D one", file=sys.stderr)
    out = generate_dataset(args.out, args.n, args.seed, args.size, args.workers)
    print(f"wrote {args.n} phantom films to {out} (manifest.csv, vertebrae.csv)")


if __name__ == "__main__":
    main()
