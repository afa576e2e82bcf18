"""Radiographs from a labelled CT: lateral and AP DRRs with truth projected from the masks.

Usage::

    python -m data.drr --ct CT.nii.gz --mask MASK.nii.gz [--grades grades.csv] --out DIR \\
        [--views lateral,ap] [--size PX] [--sdd MM] [--sod MM] [--patient-id ID]

The CT (Hounsfield units) is turned into attenuation (:func:`data.projector.hu_to_mu`) and
projected in cone-beam geometry (:mod:`data.projector`): ``lateral`` renders both facing
directions (``lateral_left``, anterior on the image left, source on the patient's left;
``lateral_right``), ``ap`` the antero-posterior film. The vertebra masks give the truth:

* the **body** of each vertebra is separated from its posterior elements
  (:func:`separate_body`): across each slice perpendicular to the spine, the spinal canal is
  the hole the vertebra's ring encloses; the body is the part of the mask in front of the
  canal's anterior wall (its largest connected part). Where no slice encloses a canal (a
  mask with gaps), the canal is the first gap behind the body in the mid-sagittal slab;
* the **six morphometry points** come from the body's endplates (:func:`body_points`): in the
  body's mid-sagittal plane for lateral films (anterior, middle and posterior, the outer two
  6 % of the body's depth inside its front and back walls), in its mid-coronal plane for AP
  films (the two sides and the middle; p1-p3 is the superior endplate from the image's left
  to its right, as ``data.landmarks`` stores AP corners). They are projected with the film's
  own geometry;
* the **level** from the label (VerSe numbering, :data:`VERSE_LEVELS`); the **grade** from
  ``--grades`` (CSV ``level,genant_grade[,morphology,acute]``). Vertebrae outside T1-L5 (T13,
  L6) keep their level and are ungraded; cervical vertebrae and labels without a level
  (sacrum, coccyx) are drawn on the film but not written.

Outputs in ``DIR`` (a CT written into a folder that holds others' films replaces only its
own rows): ``images/<patient>_<view>.png`` (16-bit), ``masks/<patient>_<view>.png`` (the
projected bodies, value k for the vertebra whose ``mask_value`` is k), ``manifest.csv`` and
``vertebrae.csv`` in the project's formats (docs/formats.md), and ``drr.json`` with each
film's geometry and pixel spacing (at the detector and at the isocentre), which the manifest
has no column for.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from data.io_utils import atomic_write_image, atomic_write_text, missing_file
from data.landmarks import manifest_row, vertebra_row
from data.morphometry import EXTRA_LEVELS, LEVELS, MORPHOLOGIES
from data.projector import (BONE_SCALE, MU_WATER_PER_MM, Geometry, Volume, film_response, fit_detector,
                            hu_to_mu, line_integrals, project_points, projected_box, to_uint16)

# VerSe label values: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 28 T13 (26 sacrum, 27 coccyx: no level).
VERSE_LEVELS: dict[int, str] = {
    **{k: f"C{k}" for k in range(1, 8)},
    **{k: f"T{k - 7}" for k in range(8, 20)},
    **{k: f"L{k - 19}" for k in range(20, 26)},
    28: "T13",
}
WRITTEN_LEVELS = set(LEVELS) | set(EXTRA_LEVELS)  # what vertebrae.csv accepts
VIEW_GROUPS = {"lateral_left": ("lateral_left",), "lateral_right": ("lateral_right",), "ap": ("ap",),
               "lateral": ("lateral_left", "lateral_right")}
DEFAULT_SDD_MM = 1000.0
DEFAULT_OBJECT_DETECTOR_MM = 200.0  # spine to detector on a lateral or AP film
POINT_INSET = 0.06  # outer points: this fraction of the body's depth (width) inside its walls
MIDDLE_SPAN = 0.4  # middle points: the least height across this central fraction of the depth
MIN_CANAL_AREA_MM2 = 20.0
MIN_CANAL_SLICES = 3
BODY_PATH_MM = 1.0  # a pixel belongs to a body's projected mask above this path length through it
SAMPLE_MM = 0.25  # grid step of the mid-sagittal / mid-coronal planes the endplates are found in


class DrrError(ValueError):
    """An input that cannot be turned into radiographs; the message names the file."""


# ----------------------------------------------------------------------------- inputs


def read_nifti(path: str | Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The array and voxel-to-world (RAS mm) affine of a NIfTI file."""
    path = Path(path)
    if not path.is_file():
        raise DrrError(f"{path}: {missing_file(path, what + ' file')}")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise DrrError(f"{path}: cannot read the {what} as NIfTI ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DrrError(f"{path}: the {what} must be a 3D volume, found shape {data.shape}")
    return data, np.asarray(image.affine, dtype=np.float64)


def read_grades(path: str | Path) -> dict[str, dict]:
    """``level -> {genant_grade, morphology, acute}`` from a CSV ``level,genant_grade[,morphology,acute]``."""
    path = Path(path)
    if not path.is_file():
        raise DrrError(f"{path}: {missing_file(path, 'grades file')}")
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("level", "genant_grade") if c not in raw.columns]
    if missing:
        raise DrrError(f"{path}: missing column(s) {', '.join(missing)} (expected level,genant_grade[,morphology,acute])")
    grades = {}
    for i, r in raw.iterrows():
        where = f"{path}: row {i + 2}"
        level = r["level"].strip()
        if level not in set(VERSE_LEVELS.values()):
            raise DrrError(f"{where}: unknown level {level!r}")
        text = r["genant_grade"].strip()
        if text not in ("", "0", "1", "2", "3"):
            raise DrrError(f"{where}: genant_grade {text!r} is not 0, 1, 2, 3 or empty")
        morph = r.get("morphology", "").strip()
        if morph and morph not in MORPHOLOGIES:
            raise DrrError(f"{where}: unknown morphology {morph!r} (expected {', '.join(MORPHOLOGIES)})")
        acute = r.get("acute", "").strip()
        if acute not in ("", "0", "1"):
            raise DrrError(f"{where}: acute {acute!r} is not 1, 0 or empty")
        grade = float(text) if text else float("nan")
        if acute and not grade > 0:
            raise DrrError(f"{where}: acute given for a vertebra without a fracture")
        grades[level] = {"genant_grade": grade, "morphology": morph or ("normal" if grade == 0 else ""),
                         "acute": float(acute) if acute else float("nan")}
    return grades


def load_inputs(ct_path: str | Path, mask_path: str | Path) -> tuple[Volume, np.ndarray]:
    """The CT as an attenuation volume (1/mm) and the integer label array on the same grid."""
    hu, affine = read_nifti(ct_path, "CT")
    labels, mask_affine = read_nifti(mask_path, "mask")
    if labels.shape != hu.shape:
        raise DrrError(f"{mask_path}: mask grid {labels.shape} does not match the CT's {hu.shape} ({ct_path})")
    if not np.allclose(mask_affine, affine, atol=1e-3):
        raise DrrError(f"{mask_path}: mask affine does not match the CT's ({ct_path}): not the same grid")
    labels = np.rint(labels).astype(np.int16)
    if not np.isin(labels, [k for k, level in VERSE_LEVELS.items() if level in WRITTEN_LEVELS]).any():
        raise DrrError(f"{mask_path}: no vertebra labels of T1-L6 or T13 (VerSe values 8-25, 28) in the mask")
    return Volume(hu_to_mu(hu), affine), labels


# ----------------------------------------------------------------------------- anatomy


def voxel_world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    return np.asarray(index, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def label_centroids(labels: np.ndarray, affine: np.ndarray) -> dict[int, np.ndarray]:
    """World centroid (mm) of each vertebra label present, in cranio-caudal order."""
    present = [int(k) for k in np.unique(labels) if int(k) in VERSE_LEVELS]
    centres = ndimage.center_of_mass(np.ones_like(labels, dtype=np.uint8), labels, present)
    out = {k: voxel_world(affine, c) for k, c in zip(present, centres)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1][2]))


def vertebra_frames(centroids: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per label, rows (right, anterior, superior) of the vertebra's frame: superior along the
    spine (the line between its neighbours' centroids), anterior the world's anterior made
    perpendicular to it."""
    keys = list(centroids)
    frames = {}
    for n, k in enumerate(keys):
        above = centroids[keys[n - 1]] if n > 0 else centroids[k]
        below = centroids[keys[n + 1]] if n + 1 < len(keys) else centroids[k]
        axis = above - below
        if np.linalg.norm(axis) < 1e-6:
            axis = np.array([0.0, 0.0, 1.0])
        axis = axis / np.linalg.norm(axis)
        anterior = np.array([0.0, 1.0, 0.0]) - axis[1] * axis
        anterior /= np.linalg.norm(anterior)
        frames[k] = np.stack([np.cross(anterior, axis), anterior, axis])
    return frames


def _canal_front(mask: np.ndarray, affine: np.ndarray, centre: np.ndarray, frame: np.ndarray) -> float | None:
    """Anterior coordinate (mm from ``centre`` along the frame's anterior axis) of the spinal
    canal's front wall, from the holes the vertebra's ring encloses across the spine."""
    step = 1.0
    lr = np.arange(-60.0, 60.0 + step, step)
    ap = np.arange(-70.0, 70.0 + step, step)
    si = np.arange(-30.0, 30.0 + step, step)
    grid = (centre + lr[:, None, None, None] * frame[0] + ap[None, :, None, None] * frame[1]
            + si[None, None, :, None] * frame[2])
    index = np.linalg.solve(affine[:3, :3], (grid.reshape(-1, 3) - affine[:3, 3]).T)
    local = ndimage.map_coordinates(mask.astype(np.float32), index, order=1, cval=0.0).reshape(grid.shape[:3]) > 0.5
    fronts = []
    for s in range(local.shape[2]):
        ring = local[:, :, s]
        if not ring.any():
            continue
        holes = ndimage.binary_fill_holes(ring) & ~ring
        parts, n = ndimage.label(holes)
        if n == 0:
            continue
        sizes = ndimage.sum(holes, parts, range(1, n + 1)) * step * step
        best = int(np.argmax(sizes))
        if sizes[best] < MIN_CANAL_AREA_MM2:
            continue
        canal = parts == best + 1
        rows = np.flatnonzero(canal.any(1))
        mid = int(round(rows.mean()))
        middle_cols = canal[max(mid - 2, 0):mid + 3].any(0)
        fronts.append(float(ap[np.flatnonzero(middle_cols).max()]))
    if len(fronts) < MIN_CANAL_SLICES:
        return None
    return float(np.median(fronts))


def _gap_front(mask: np.ndarray, affine: np.ndarray, centre: np.ndarray, frame: np.ndarray) -> float | None:
    """Fallback: the first gap behind the body's front in the mid-sagittal slab (mm along anterior)."""
    idx = np.argwhere(mask)
    local = (voxel_world(affine, idx) - centre) @ frame.T
    slab = np.abs(local[:, 0]) <= 4.0
    if not slab.any():
        return None
    ap = np.round(local[slab, 1]).astype(int)
    occupied = np.zeros(ap.max() - ap.min() + 1, bool)
    occupied[ap - ap.min()] = True
    # from the front backwards: the first empty run of >= 2 mm ends the body
    empty = np.flatnonzero(~occupied[::-1])
    for start in empty:
        if start + 1 < len(occupied) and not occupied[::-1][start + 1]:
            return float(ap.max() - start + 0.5)
    return None


def separate_body(labels: np.ndarray, affine: np.ndarray, label: int, frame: np.ndarray,
                  name: str = "") -> np.ndarray:
    """Boolean mask (on the label grid) of the vertebral body of ``label``: the mask's part in
    front of the spinal canal's anterior wall, its largest connected part (module docstring)."""
    mask = labels == label
    idx = np.argwhere(mask)
    centre = voxel_world(affine, idx.mean(0))
    front = _canal_front(mask, affine, centre, frame)
    if front is None:
        front = _gap_front(mask, affine, centre, frame)
    if front is None:
        raise DrrError(f"{name or label}: cannot find the spinal canal to separate the vertebral body")
    anterior = (voxel_world(affine, idx) - centre) @ frame[1]
    body = np.zeros_like(mask)
    keep = idx[anterior > front]
    body[tuple(keep.T)] = True
    parts, n = ndimage.label(body)
    if n == 0:
        raise DrrError(f"{name or label}: nothing of the vertebra lies in front of its spinal canal")
    sizes = ndimage.sum(body, parts, range(1, n + 1))
    return parts == int(np.argmax(sizes)) + 1


def _extent_runs(values: np.ndarray, axis_values: np.ndarray) -> tuple[float, float] | None:
    """First and last crossing of 0.5 (linearly interpolated) of a sampled 0-1 profile."""
    inside = np.flatnonzero(values > 0.5)
    if inside.size == 0:
        return None
    lo, hi = inside[0], inside[-1]

    def crossing(a: int, b: int) -> float:  # a inside, b outside (or off the grid)
        if b < 0 or b >= len(values):
            return float(axis_values[a])
        f = (values[a] - 0.5) / max(values[a] - values[b], 1e-9)
        return float(axis_values[a] + f * (axis_values[b] - axis_values[a]))

    return crossing(lo, lo - 1), crossing(hi, hi + 1)


def _endplates(sampled: np.ndarray, a: np.ndarray, s: np.ndarray, pos: float) -> tuple[float, float] | None:
    """Inferior and superior ends (mm along the spine) of a body's plane at ``pos`` across it."""
    column = np.array([np.interp(pos, a, sampled[:, j]) for j in range(len(s))])
    return _extent_runs(column, s)


def body_points(body: np.ndarray, affine: np.ndarray, frame: np.ndarray) -> dict[str, np.ndarray]:
    """Six endplate points (world mm, (6, 3)) of a body mask: ``"lateral"`` in its
    mid-sagittal plane (anterior, middle, posterior), ``"ap"`` in its mid-coronal plane
    (patient's right side, middle, left side); superior endplate first."""
    idx = np.argwhere(body)
    centre = voxel_world(affine, idx.mean(0))
    local = (voxel_world(affine, idx) - centre) @ frame.T
    half = np.abs(local).max(0) + 4.0
    field = body.astype(np.float32)
    out = {}
    for view, across in (("lateral", 1), ("ap", 0)):
        a = np.arange(-half[across], half[across] + SAMPLE_MM, SAMPLE_MM)
        s = np.arange(-half[2], half[2] + SAMPLE_MM, SAMPLE_MM)
        plane = centre + a[:, None, None] * frame[across] + s[None, :, None] * frame[2]
        index = np.linalg.solve(affine[:3, :3], (plane.reshape(-1, 3) - affine[:3, 3]).T)
        sampled = ndimage.map_coordinates(field, index, order=1, cval=0.0).reshape(len(a), len(s))
        # the body's walls across its middle half of height
        band = np.abs(s) <= 0.25 * half[2]
        walls = [_extent_runs(sampled[:, j], a) for j in np.flatnonzero(band)]
        walls = np.array([w for w in walls if w is not None])
        if len(walls) == 0:
            raise DrrError("empty mid-plane")
        back, front = float(np.median(walls[:, 0])), float(np.median(walls[:, 1]))
        depth = front - back
        # the middle pair: the least height across the central part (a concave endplate's deepest point)
        middles = back + depth * np.linspace(0.5 - MIDDLE_SPAN / 2, 0.5 + MIDDLE_SPAN / 2, 17)
        middle_ends = [_endplates(sampled, a, s, pos) for pos in middles]
        heights = [e[1] - e[0] if e is not None else np.inf for e in middle_ends]
        middle = int(np.argmin(heights))
        if not np.isfinite(heights[middle]):
            raise DrrError("no endplate in the middle of the body")
        positions = [front - POINT_INSET * depth, float(middles[middle]), back + POINT_INSET * depth]
        superior, inferior = [], []
        for pos in positions:
            ends = _endplates(sampled, a, s, pos)
            if ends is None:
                raise DrrError("no endplate under a point")
            inferior.append(centre + pos * frame[across] + ends[0] * frame[2])
            superior.append(centre + pos * frame[across] + ends[1] * frame[2])
        out[view] = np.array(superior + inferior)
    return out


# ----------------------------------------------------------------------------- films


def film_points(points_3d: dict[str, np.ndarray], geometry: Geometry) -> np.ndarray:
    """The six projected points of a body on a film, in the project's order (AP: p1-p3 from
    the image's left to its right, as data.landmarks stores AP corners)."""
    if geometry.view == "ap":
        xy = project_points(points_3d["ap"], geometry)
        if xy[0, 0] > xy[2, 0]:  # the first side landed on the image's right
            xy = xy[[2, 1, 0, 5, 4, 3]]
        return xy
    return project_points(points_3d["lateral"], geometry)


def body_masks_on_film(bodies: list[np.ndarray], affine: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Label image: value k + 1 where the path through body k exceeds BODY_PATH_MM (the
    longest path wins where bodies overlap)."""
    best = np.zeros((geometry.rows, geometry.cols), np.float32)
    out = np.zeros((geometry.rows, geometry.cols), np.uint8)
    for k, body in enumerate(bodies):
        idx = np.argwhere(body)
        crop = Volume(body, affine).crop(idx.min(0) - 1, idx.max(0) + 2)
        crop = Volume(crop.data.astype(np.float32), crop.affine)
        path = line_integrals(crop, geometry, projected_box(crop, geometry))
        take = (path > BODY_PATH_MM) & (path > best)
        out[take] = k + 1
        best[take] = path[take]
    return out


def render_ct(ct_path: str | Path, mask_path: str | Path, out_dir: str | Path, grades_path: str | Path | None = None,
              views: tuple[str, ...] = ("lateral_left", "lateral_right", "ap"), size: int = 1024,
              sdd_mm: float = DEFAULT_SDD_MM, sod_mm: float | None = None, patient_id: str | None = None,
              progress: bool = True) -> dict:
    """Render the films of one labelled CT into ``out_dir`` (module docstring). Returns
    ``{"manifest": path, "images": [...], "vertebrae": [...], "drr": {...}}``."""
    out = Path(out_dir)
    ct_path, mask_path = Path(ct_path), Path(mask_path)
    patient = patient_id or ct_path.name.split(".")[0].removesuffix("_ct")
    grades = read_grades(grades_path) if grades_path else {}
    volume, labels = load_inputs(ct_path, mask_path)
    sod = sod_mm if sod_mm is not None else sdd_mm - DEFAULT_OBJECT_DETECTOR_MM
    centroids = label_centroids(labels, volume.affine)
    frames = vertebra_frames(centroids)
    written = [k for k in centroids if VERSE_LEVELS[k] in WRITTEN_LEVELS]
    bar = tqdm(total=len(written) + len(views), desc=patient, disable=not progress)
    bodies, points = [], []
    for k in written:
        level = VERSE_LEVELS[k]
        body = separate_body(labels, volume.affine, k, frames[k], name=f"{mask_path}: {level}")
        try:
            points.append(body_points(body, volume.affine, frames[k]))
        except DrrError as exc:
            raise DrrError(f"{mask_path}: {level}: {exc}") from None
        bodies.append(body)
        bar.update()
    isocentre = np.mean([centroids[k] for k in written], axis=0)
    image_rows, vert_rows, info = [], [], {}
    for view in views:
        geometry = fit_detector(volume.corners(), view, isocentre, size, sdd_mm, sod)
        integrals = line_integrals(volume, geometry)
        film, window = film_response(integrals)
        mask_image = body_masks_on_film(bodies, volume.affine, geometry)
        name = f"{patient}_{view}"
        image_rel, mask_rel = f"images/{name}.png", f"masks/{name}.png"
        atomic_write_image(out / image_rel, to_uint16(film))
        atomic_write_image(out / mask_rel, mask_image)
        vertebrae = []
        for n, k in enumerate(written):
            level = VERSE_LEVELS[k]
            xy = film_points(points[n], geometry)
            ys, xs = np.nonzero(mask_image == n + 1)
            box = (np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64) if len(xs)
                   else np.r_[xy.min(0), xy.max(0)])
            truth = grades.get(level, {}) if level in LEVELS else {}
            v = {"level": level, "points": xy, "box": box,
                 "genant_grade": truth.get("genant_grade", float("nan")),
                 "morphology": truth.get("morphology", ""), "acute": truth.get("acute", float("nan"))}
            vertebrae.append(v)
            vert_rows.append({**vertebra_row(image_rel, v), "mask_value": n + 1})
        grades_known = np.array([v["genant_grade"] for v in vertebrae])
        fracture = 1.0 if (grades_known > 0).any() else (0.0 if not np.isnan(grades_known).any() else float("nan"))
        acutes = np.array([v["acute"] for v in vertebrae if v["genant_grade"] > 0])
        acute = (1.0 if (acutes == 1).any() else 0.0 if len(acutes) and not np.isnan(acutes).any()
                 else float("nan")) if fracture == 1 else float("nan")
        row = manifest_row(image_rel, {"patient_id": patient, "fracture": fracture, "acute": acute,
                                       "view": "ap" if view == "ap" else "lateral"})
        image_rows.append({**row, "mask": mask_rel})
        info[image_rel] = {"ct": str(ct_path.resolve()), "mask": str(mask_path.resolve()), "patient_id": patient,
                           "view": "ap" if view == "ap" else "lateral",
                           "facing": {"lateral_left": "left", "lateral_right": "right"}.get(view, ""),
                           **geometry.to_json(), "film_window": window,
                           "hu_to_mu": {"mu_water_per_mm": MU_WATER_PER_MM, "bone_scale": BONE_SCALE}}
        bar.update()
    bar.close()
    manifest = write_outputs(out, image_rows, vert_rows, info)
    return {"manifest": manifest, "images": image_rows, "vertebrae": vert_rows, "drr": info}


def write_outputs(out: Path, image_rows: list[dict], vert_rows: list[dict], info: dict) -> Path:
    """Write manifest.csv, vertebrae.csv and drr.json, keeping other films' rows already there."""
    new_images = {r["image"] for r in image_rows}
    manifest_path, vert_path, info_path = out / "manifest.csv", out / "vertebrae.csv", out / "drr.json"
    images = pd.DataFrame(image_rows)
    vertebrae = pd.DataFrame(vert_rows)
    if manifest_path.is_file():
        old = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
        images = pd.concat([old[~old["image"].isin(new_images)], images.astype(str)], ignore_index=True)
    if vert_path.is_file():
        old = pd.read_csv(vert_path, dtype=str, keep_default_na=False)
        vertebrae = pd.concat([old[~old["image"].isin(new_images)], vertebrae.astype(str)], ignore_index=True)
    stored = {"generator": "data.drr", "images": {}}
    if info_path.is_file():
        try:
            stored = json.loads(info_path.read_text())
        except json.JSONDecodeError as exc:
            raise DrrError(f"{info_path}: not valid JSON ({exc})") from None
    stored.setdefault("images", {}).update(info)
    atomic_write_text(info_path, json.dumps(stored, indent=2) + "\n")
    atomic_write_text(vert_path, vertebrae.to_csv(index=False))
    return atomic_write_text(manifest_path, images.to_csv(index=False))


POINT_COLOURS = ((40, 40, 255), (60, 220, 60), (0, 220, 255))  # BGR: anterior/left, middle, posterior/right


def preview_image(out_dir: str | Path, image_rows: list[dict], vert_rows: list[dict], path: str | Path,
                  height: int = 512) -> Path:
    """A contact image of the films side by side, each body's projected outline (blue), its
    six points (p1/p4 red, p2/p5 green, p3/p6 yellow) and level drawn, ``height`` px tall."""
    out_dir = Path(out_dir)
    tiles = []
    for row in image_rows:
        film = cv2.imread(str(out_dir / row["image"]), cv2.IMREAD_UNCHANGED)
        labels = cv2.imread(str(out_dir / row["mask"]), cv2.IMREAD_UNCHANGED)
        scale = height / film.shape[0]
        size = (max(1, round(film.shape[1] * scale)), height)
        tile = cv2.cvtColor(cv2.resize((film // 257).astype(np.uint8), size, interpolation=cv2.INTER_AREA),
                            cv2.COLOR_GRAY2BGR)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
        for v in (v for v in vert_rows if v["image"] == row["image"]):
            outline, _ = cv2.findContours((labels == v["mask_value"]).astype(np.uint8), cv2.RETR_EXTERNAL,
                                          cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(tile, outline, -1, (255, 140, 0), 1)
            pts = np.array([[v[f"p{j}x"], v[f"p{j}y"]] for j in range(1, 7)], dtype=np.float64) * scale
            for j, (x, y) in enumerate(pts):
                cv2.circle(tile, (int(round(x)), int(round(y))), 3, POINT_COLOURS[j % 3], -1, cv2.LINE_AA)
            # the level beside the body's p1 side (anterior, or the image's left on AP films)
            x_text = int(v["x_min"] * scale) - 26 if pts[0, 0] < pts[2, 0] else int(v["x_max"] * scale) + 4
            cv2.putText(tile, v["level"], (int(np.clip(x_text, 0, size[0] - 28)), int(pts[:, 1].mean()) + 4),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 200, 255), 1, cv2.LINE_AA)
        stem = Path(row["image"]).stem
        title = next((view for view in VIEW_GROUPS if stem.endswith(view)), stem)
        cv2.putText(tile, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(np.pad(tile, ((0, 0), (0, 4), (0, 0))))
    return atomic_write_image(path, np.concatenate(tiles, axis=1)[:, :-4])


def parse_views(text: str) -> tuple[str, ...]:
    views: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part not in VIEW_GROUPS:
            raise DrrError(f"unknown view {part!r}; expected lateral, lateral_left, lateral_right or ap")
        views.extend(v for v in VIEW_GROUPS[part] if v not in views)
    if not views:
        raise DrrError("no view given")
    return tuple(views)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.drr", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", required=True, help="CT in Hounsfield units (NIfTI)")
    parser.add_argument("--mask", required=True, help="vertebra label mask on the CT's grid (NIfTI, VerSe labels)")
    parser.add_argument("--grades", default=None, help="CSV level,genant_grade[,morphology,acute]")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--views", default="lateral,ap",
                        help="comma-separated: lateral (both facings), lateral_left, lateral_right, ap")
    parser.add_argument("--size", type=int, default=1024, help="film height in pixels")
    parser.add_argument("--sdd", type=float, default=DEFAULT_SDD_MM, help="source-detector distance, mm")
    parser.add_argument("--sod", type=float, default=None,
                        help=f"source-isocentre (spine) distance, mm (default: sdd - {DEFAULT_OBJECT_DETECTOR_MM:g})")
    parser.add_argument("--patient-id", default=None, help="default: the CT file name without _ct.nii.gz")
    parser.add_argument("--preview", default=None, metavar="PNG",
                        help="also write the films side by side with the projected truth drawn")
    args = parser.parse_args(argv)
    try:
        if args.size < 16:
            raise DrrError(f"--size {args.size}: need at least 16 pixels")
        result = render_ct(args.ct, args.mask, args.out, args.grades, parse_views(args.views), args.size,
                           args.sdd, args.sod, args.patient_id)
        if args.preview:
            preview_image(args.out, result["images"], result["vertebrae"], args.preview)
    except (DrrError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    n_vert = len({r["level"] for r in result["vertebrae"]})
    print(f"wrote {len(result['images'])} films of {n_vert} vertebrae to {result['manifest']} "
          "(+ vertebrae.csv, drr.json)")


if __name__ == "__main__":
    main()
