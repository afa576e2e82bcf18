"""Films of the 3D phantom: geometry, exact cone-beam projection, acquisition and truth.

One film: a patient is sampled (:mod:`data.spine3d.anatomy`), a window of the spine is chosen
(the thoracolumbar spine around the junction, the lumbar spine down to the sacrum, the
thoracic spine with its ribs, or the whole spine from the upper thoracic levels to L5 or the
sacrum, as scoliosis films show it), a cone-beam geometry (:class:`data.projector.Geometry`: lateral
facing either way, or AP; source-detector 1000-1150 mm, the spine 150-250 mm from the detector,
a few degrees of in-plane tilt and patient rotation) frames it, and the solids' line integrals
are computed exactly (:mod:`data.spine3d.raycast`). The acquisition adds detector blur, scatter,
quantum and detector noise, the exposure and the film response (:func:`data.projector.film_response`),
collimation, a side marker and a stored bit depth of 12-16.

The truth is projected from the 3D landmarks with the film's own geometry: six points per
vertebral body (lateral: the superior and inferior endplates' anterior, middle and posterior
points in the body's mid-sagittal plane; AP: their image-left, middle and image-right points in
its mid-coronal plane, as ``data.landmarks`` stores AP corners), the box and mask of the body's
outline, level, grade, shape and acuity. A vertebra is written when its whole body lies in the
exposed field. The grades measured from the written points are checked against the sampled
ones before a film is rendered; a film whose check fails is drawn again from the same stream.
"""
from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from data.geometry import AP_MIRROR
from data.morphometry import LEVELS, grade_vertebrae
from data.projector import Geometry, film_response, project_points
from data.spine3d import raycast
from data.spine3d.anatomy import (Patient, all_solids, body_outline_3d, grades_consistent, layout,
                                  sample_patient, six_points_3d)

VIEW_P_LATERAL = 0.6  # share of lateral films when both views are drawn
WINDOWS = {  # window kind: probability
    "thoracolumbar": 0.32,
    "lumbar": 0.28,
    "thoracic": 0.2,
    "whole": 0.2,  # T1-T3 down to L5 or the sacrum, as on scoliosis films: 15-18 bodies
}
COARSE = 4  # large smooth solids are rendered on a grid this many times coarser
MAX_ATTEMPTS = 20
# Above this height the bones are rendered at half the detector's resolution and upsampled (the
# detector blur spans about one pixel there); the trabecular texture stays at full resolution.
FULL_RES_ROWS = 640


def film_width(size: int) -> int:
    return int(round(size * 0.8 / 8) * 8)


def _window(rng: np.random.Generator) -> tuple[str, list[str]]:
    kind = str(rng.choice(list(WINDOWS), p=list(WINDOWS.values())))
    ext = list(LEVELS) + ["S1"]
    if kind == "thoracolumbar":
        first = int(rng.integers(5, 9))  # T6-T9
        last = min(first + int(rng.integers(8, 12)) - 1, ext.index("L5"))
    elif kind == "lumbar":
        first = int(rng.integers(ext.index("T11"), ext.index("L1") + 1))
        last = ext.index("S1")
    elif kind == "thoracic":
        first = int(rng.integers(0, 3))
        last = int(rng.integers(ext.index("T10"), ext.index("T12") + 1))
    else:
        first = int(rng.integers(0, 3))
        last = int(rng.integers(ext.index("L5"), ext.index("S1") + 1))
    return kind, ext[first:last + 1]


def _geometry(patient: Patient, levels: list[str], rng: np.random.Generator, rows: int, cols: int,
              projector_view: str) -> Geometry:
    verts = [patient.by_level(lvl) for lvl in levels]
    outline = np.concatenate([body_outline_3d(v, patient.view, patient.axis, 12) for v in verts])
    iso = np.mean([v.to_world([0, 0, v.height / 2]) for v in verts], axis=0)
    sdd = rng.uniform(1000, 1150)
    oid = (patient.trunk["half_width"] if patient.view == "lateral" else patient.trunk["back"]) + rng.uniform(20, 60)
    base = Geometry(projector_view, tuple(iso), sdd, sdd - oid, rows=1, cols=1, pixel_mm=1.0)
    beam, right, down = base.axes
    turn = raycast.rotation(0, 0, np.radians(rng.uniform(-3, 3)))  # patient rotation about the long axis
    beam, right, down = turn @ beam, turn @ right, turn @ down
    tilt = np.radians(rng.uniform(-5, 5))  # in-plane tilt of the film
    right, down = np.cos(tilt) * right + np.sin(tilt) * down, -np.sin(tilt) * right + np.cos(tilt) * down
    probe = replace(base, axes=(beam, right, down))
    uv = project_points(outline, probe) - probe.principal_point()
    lo, hi = uv.min(0), uv.max(0)
    fill = rng.uniform(0.72, 0.9)
    pixel_mm = max((hi[1] - lo[1]) / (fill * rows), (hi[0] - lo[0]) / (0.7 * cols))
    centre = (lo + hi) / 2 + rng.uniform(-0.04, 0.04, 2) * np.array([cols, rows]) * pixel_mm
    return replace(probe, rows=rows, cols=cols, pixel_mm=float(pixel_mm), offset_mm=(float(centre[0]), float(centre[1])))


def _smooth_noise(rng: np.random.Generator, shape, sigma: tuple[float, float]) -> np.ndarray:
    n = rng.standard_normal(shape, dtype=np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigmaX=max(sigma[1], 0.3), sigmaY=max(sigma[0], 0.3))
    return n / (n.std() + 1e-6)


def _integrals_at(solids, geometry: Geometry, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Line integrals (plain, textured) of ``solids`` on a grid ``factor`` times coarser than
    the detector's, upsampled to it (``factor`` 1: on the detector itself)."""
    if factor == 1:
        plain, textured = raycast.render(solids, geometry)
        ray = raycast.ray_length(geometry)
        return (plain * ray).astype(np.float32), (textured * ray).astype(np.float32)
    rows_c, cols_c = -(-geometry.rows // factor), -(-geometry.cols // factor)
    cx, cy = geometry.principal_point()
    # coarse pixel (0, 0) sits at fine pixel ((factor - 1) / 2, (factor - 1) / 2)
    half = (factor - 1) / 2
    pp = np.array([(cx - half) / factor, (cy - half) / factor])
    pixel_c = geometry.pixel_mm * factor
    offset = (((cols_c - 1) / 2 - pp[0]) * pixel_c, ((rows_c - 1) / 2 - pp[1]) * pixel_c)
    coarse = replace(geometry, rows=rows_c, cols=cols_c, pixel_mm=pixel_c, offset_mm=tuple(map(float, offset)))
    plain, textured = raycast.render(solids, coarse)
    ray = raycast.ray_length(coarse)
    out = []
    for part in (plain, textured):
        up = cv2.resize((part * ray).astype(np.float32), (cols_c * factor, rows_c * factor), interpolation=cv2.INTER_LINEAR)
        out.append(up[: geometry.rows, : geometry.cols])
    return out[0], out[1]


def _collimation(rng: np.random.Generator, rows: int, cols: int) -> tuple[int, int, int, int] | None:
    if rng.random() >= 0.7:
        return None
    t, b, l, r = (rng.uniform(0, 0.07, 4) * np.array([rows, rows, cols, cols])).astype(int)
    return int(t), int(b), int(l), int(r)


def _truth(patient: Patient, geometry: Geometry, exposed: tuple[int, int, int, int]):
    """Records of the T1-L5 vertebrae whose body lies wholly in the exposed field."""
    x0, y0, x1, y1 = exposed
    records = []
    for v in patient.vertebrae:
        if v.level not in LEVELS:
            continue
        outline = project_points(body_outline_3d(v, patient.view, patient.axis), geometry)
        if outline[:, 0].min() < x0 + 1 or outline[:, 1].min() < y0 + 1 or \
                outline[:, 0].max() > x1 - 2 or outline[:, 1].max() > y1 - 2:
            continue
        pts = project_points(six_points_3d(v, patient.view, patient.axis), geometry)
        if patient.view == "ap" and pts[0, 0] > pts[2, 0]:
            pts = pts[AP_MIRROR]  # p1-p4 on the image's left
        records.append({"level": v.level, "genant_grade": v.grade, "morphology": v.shape,
                        "acute": "" if not v.fractured else int(bool(v.acute)),
                        "x_min": float(outline[:, 0].min()), "y_min": float(outline[:, 1].min()),
                        "x_max": float(outline[:, 0].max()), "y_max": float(outline[:, 1].max()),
                        "points": pts, "outline": outline})
    return records


def _measured_agrees(records: list[dict], view: str) -> bool:
    if not records:
        return False
    measured = grade_vertebrae(np.stack([r["points"] for r in records]), symmetric=view == "ap")
    return all(m["genant_grade"] == r["genant_grade"] and (r["genant_grade"] == 0 or m["morphology"] == r["morphology"])
               for m, r in zip(measured, records))


def _acquire(integrals: np.ndarray, rng: np.random.Generator, geometry: Geometry,
             collimation, size: int) -> tuple[np.ndarray, int, dict]:
    rows, cols = integrals.shape
    blur = max(rng.uniform(0.12, 0.3) / geometry.pixel_mm, 0.35)  # focal spot and detector
    L = cv2.GaussianBlur(integrals, (0, 0), blur)
    primary = np.exp(-L)
    spr = rng.uniform(0.1, 0.6)  # scatter-to-primary ratio behind the grid
    small = cv2.resize(primary, (max(cols // 8, 1), max(rows // 8, 1)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 0.08 * cols / 8)
    total = primary + spr * cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)
    body = L > 0.05
    # automatic exposure control: the photons reaching the detector behind the densest part of
    # the field (its 5th percentile of transmission: the spine and the thick soft tissue)
    target = rng.uniform(400, 3000)
    i0 = target / max(float(np.percentile(total[body], 5)) if body.any() else 1.0, 1e-9)
    expected = total * i0
    noisy = expected + np.sqrt(expected) * rng.standard_normal((rows, cols), dtype=np.float32)
    noisy += 0.02 * target * _smooth_noise(rng, (rows, cols), (1.2, 1.2))  # detector structure
    signal = -np.log(np.clip(noisy, 0.5, None) / i0)
    # digital radiography's dynamic-range compression: part of the large-scale signal (lungs
    # against abdomen, thick against thin trunk) is taken out, as unsharp-mask processing does
    small = cv2.resize(signal, (max(cols // 8, 1), max(rows // 8, 1)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 0.06 * rows / 8)
    signal = signal - rng.uniform(0.55, 0.85) * cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)
    signal -= float(signal.min())
    image, window = film_response(signal, gamma=rng.uniform(1.0, 1.6))
    if collimation is not None:
        t, b, l, r = collimation
        col = np.zeros((rows, cols), bool)
        col[:t] = col[rows - b:] = True
        col[:, :l] = col[:, cols - r:] = True
        image[col] = 0.92 + 0.04 * rng.random()
    if rng.random() < 0.6:
        org = (int(rng.uniform(0.04, 0.8) * cols),
               int(rng.uniform(0.08, 0.15) * rows) if rng.random() < 0.5 else int(rng.uniform(0.9, 0.96) * rows))
        marker = np.zeros((rows, cols), np.uint8)  # putText draws on 8-bit images only
        cv2.putText(marker, str(rng.choice(["L", "R"])), org, cv2.FONT_HERSHEY_SIMPLEX, rows / 500, 255,
                    max(1, rows // 200), cv2.LINE_AA)
        image = np.maximum(image, marker.astype(np.float32) / 255.0)
    bits = int(rng.choice([12, 14, 16]))
    return np.round(np.clip(image, 0, 1) * (2 ** bits - 1)).astype(np.uint16), bits, window


def generate_image(seed: int, index: int, size: int = 512, view: str = "both") -> dict:
    """Draw one film of the 3D phantom. ``view``: ``lateral``, ``ap`` or ``both`` (60 % lateral).

    Returns ``image`` (uint16), ``mask`` (uint8 labels), ``meta`` and ``vertebrae`` (per-vertebra
    truth dicts, points in output pixels). Film ``index`` of ``seed`` is the same whatever else
    is drawn; with a fixed ``view`` it is the film ``both`` draws when that film has that view.
    """
    if view not in ("lateral", "ap", "both"):
        raise ValueError(f"unknown view {view!r}; expected lateral, ap or both")
    rng = np.random.default_rng([int(seed), int(index), 3])
    draw = rng.random()
    kind = view if view != "both" else ("lateral" if draw < VIEW_P_LATERAL else "ap")
    facing = "lateral_left" if rng.random() < 0.5 else "lateral_right"
    projector_view = facing if kind == "lateral" else "ap"
    rows, cols = int(size), film_width(size)
    for _ in range(MAX_ATTEMPTS):
        patient = sample_patient(rng, kind)
        if not grades_consistent(patient):
            continue
        layout(patient, rng)
        window_kind, levels = _window(rng)
        geometry = _geometry(patient, levels, rng, rows, cols, projector_view)
        collimation = _collimation(rng, rows, cols)
        t, b, l, r = collimation or (0, 0, 0, 0)
        records = _truth(patient, geometry, (l, t, cols - r, rows - b))
        if _measured_agrees(records, kind):
            break
    else:
        raise RuntimeError(f"phantom film {index} of seed {seed}: no consistent anatomy in {MAX_ATTEMPTS} draws")
    fine, coarse = all_solids(patient, rng)
    plain, textured = _integrals_at(fine, geometry, 1 if rows <= FULL_RES_ROWS else 2)
    # Trabecular texture: a projection sums many trabeculae along each ray, so on real films it
    # is faint and smooth; a strong fine speckle is what a network would learn to key on.
    sigma_fine = 0.6 / geometry.pixel_mm_isocentre  # trabecular spacing, about 1-1.5 mm
    texture = 1.0 + patient.texture_contrast * (
        0.7 * _smooth_noise(rng, (rows, cols), (1.8 * sigma_fine, 0.9 * sigma_fine))
        + 0.35 * _smooth_noise(rng, (rows, cols), (3.0 / geometry.pixel_mm_isocentre,) * 2))
    integrals = plain + textured * np.clip(texture, 0.1, None).astype(np.float32)
    integrals += _integrals_at(coarse, geometry, COARSE)[0]
    image, bits, window = _acquire(integrals, rng, geometry, collimation, size)

    mask = np.zeros((rows, cols), np.uint8)
    for k, rec in enumerate(records, start=1):
        rec["mask_value"] = k
        hull = cv2.convexHull(np.round(rec.pop("outline") * 16).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, k, shift=4)
    fractured = [r for r in records if r["genant_grade"] > 0]
    meta = {
        "bits_stored": bits,
        "view": kind,
        "projector_view": projector_view,
        "mirrored": projector_view == "lateral_right",  # anterior on the image right
        "window": window_kind,
        "pixel_spacing_mm": float(geometry.pixel_mm),
        "pixel_spacing_isocentre_mm": float(geometry.pixel_mm_isocentre),
        "osteoporotic": bool(patient.osteoporotic),
        "fracture": int(bool(fractured)),
        "acute": "" if not fractured else int(any(r["acute"] == 1 for r in fractured)),
        "geometry": geometry.to_json(),
        "film_window": window,
        "variants": {k: bool(v) for k, v in patient.variants.items()},
    }
    return {"image": image, "mask": mask, "meta": meta, "vertebrae": records}

