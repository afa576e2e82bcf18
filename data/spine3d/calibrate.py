"""Calibrate and check the 3D phantom against the VerSe CT.

    python -m data.spine3d.calibrate --verse ../shared/data/verse [--compare]

prints the measured HU of the phantom's material classes beside the committed table
(:mod:`data.spine3d.materials`, whose docstring says how each class is measured and which
numbers the table takes from it). ``--compare`` also compares a procedural L2 with the CT's
real L2 on lateral projections by the same projector (:func:`compare_level`): the body's
height / depth ratio from its six projected points, and the body-minus-disc line integral
(attenuation x mm along the ray through the body's centre, less that through the disc below),
which soft tissue beside the spine hardly changes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from data.drr import (VERSE_LEVELS, body_points, film_points, label_centroids, load_inputs, read_nifti,
                      separate_body, vertebra_frames)
from data.geometry import body_height, endplate_width
from data.projector import Geometry, fit_detector, line_integrals, project_points
from data.spine3d import raycast
from data.spine3d.anatomy import Mats, all_solids, layout, sample_patient, six_points_3d
from data.spine3d.materials import MATERIAL_HU, mu


def measure_verse(folder: str | Path) -> dict[str, float]:
    """HU of the material classes in the VerSe CT under ``folder`` (module docstring)."""
    folder = Path(folder)
    ct_path = folder / "sub-verse012_ct.nii.gz"
    mask_path = folder / "sub-verse012_seg-vert_msk.nii.gz"
    hu, affine = read_nifti(ct_path, "CT")
    _, labels = load_inputs(ct_path, mask_path)
    centroids = label_centroids(labels, affine)
    frames = vertebra_frames(centroids)
    cores, shells = [], []
    for label in centroids:
        body = separate_body(labels, affine, label, frames[label])
        # 3 mm inside on every axis (voxels of 3 x 1 x 1 mm)
        core = ndimage.binary_erosion(body, structure=np.ones((3, 7, 7), bool))
        shell = body & ~ndimage.binary_erosion(body)
        cores.append(hu[core])
        shells.append(hu[shell])
    outside = labels == 0
    soft = hu[outside & (hu > -30) & (hu < 150)]
    fat = hu[outside & (hu > -200) & (hu <= -30)]
    keys = list(centroids)
    disc_values = []
    inv = np.linalg.inv(affine)
    for a, b in zip(keys[:-1], keys[1:]):
        mid = (centroids[a] + centroids[b]) / 2 + 8.0 * frames[a][1]  # body centre lies in front of the centroid
        idx = np.round(inv[:3, :3] @ mid + inv[:3, 3]).astype(int)
        lo, hi = np.maximum(idx - [1, 4, 1], 0), idx + [2, 5, 2]
        box = hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        free = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == 0
        disc_values.append(box[free])
    return {"cortical_shell": float(np.percentile(np.concatenate(shells), 95)),
            "trabecular": float(np.median(np.concatenate(cores))),
            "soft": float(np.median(soft)), "fat": float(np.median(fat)),
            "disc": float(np.median(np.concatenate(disc_values)))}


def _sample(image: np.ndarray, xy: np.ndarray) -> float:
    x, y = np.round(xy).astype(int)
    return float(image[y - 1:y + 2, x - 1:x + 2].mean())


def _measures(integrals: np.ndarray, points: np.ndarray, below: np.ndarray) -> dict[str, float]:
    """Height / depth and body-minus-disc integral of a body (points (6, 2)) above ``below``."""
    disc = (points[4] + below[1]) / 2  # between its inferior middle point and the next body's superior one
    return {"height_over_depth": float(body_height(points)[0] / endplate_width(points)[0]),
            "body_minus_disc": _sample(integrals, points.mean(0)) - _sample(integrals, disc)}


def compare_level(folder: str | Path, level: str = "L2", n_phantoms: int = 20, rows: int = 512) -> dict:
    """The CT's ``level`` against ``n_phantoms`` procedural ones, lateral projections, same projector."""
    folder = Path(folder)
    volume, labels = load_inputs(folder / "sub-verse012_ct.nii.gz", folder / "sub-verse012_seg-vert_msk.nii.gz")
    centroids = label_centroids(labels, volume.affine)
    frames = vertebra_frames(centroids)
    by_level = {VERSE_LEVELS[k]: k for k in centroids}
    nxt = f"L{int(level[1:]) + 1}" if level.startswith("L") else f"T{int(level[1:]) + 1}"
    geometry = fit_detector(volume.corners(), "lateral_left", centroids[by_level[level]], rows=rows)
    integrals = line_integrals(volume, geometry)
    pts = {lvl: film_points(body_points(separate_body(labels, volume.affine, by_level[lvl], frames[by_level[lvl]]),
                                        volume.affine, frames[by_level[lvl]]), geometry) for lvl in (level, nxt)}
    real = _measures(integrals, pts[level], pts[nxt])
    phantom = []
    for i in range(n_phantoms):
        rng = np.random.default_rng([i, 17])
        patient = sample_patient(rng, "lateral")
        layout(patient, rng)
        v, below = patient.by_level(level), patient.by_level(nxt)
        if v.fractured or below.fractured:
            continue
        iso = v.to_world([0, 0, v.height / 2])
        g = Geometry("lateral_left", tuple(iso), geometry.sdd_mm, geometry.sod_mm, rows=rows, cols=rows,
                     pixel_mm=geometry.pixel_mm)
        fine, _ = all_solids(patient, rng)
        plain, textured = raycast.render(fine, g)
        L = (plain + textured) * raycast.ray_length(g)
        m = Mats.of(patient.density)
        phantom.append({**_measures(L, *(raycast_points(x, patient, g) for x in (v, below))),
                        "trabecular_mu": m.trabecular})
    keys = ("height_over_depth", "body_minus_disc")
    return {"level": level, "verse": real,
            "phantom": {k: {"median": float(np.median([p[k] for p in phantom])),
                            "range": [float(np.min([p[k] for p in phantom])), float(np.max([p[k] for p in phantom]))]}
                        for k in keys},
            "n_phantoms": len(phantom)}


def raycast_points(v, patient, geometry: Geometry) -> np.ndarray:
    """The six projected points of a procedural vertebra."""
    return project_points(six_points_3d(v, patient.view, patient.axis), geometry)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.spine3d.calibrate",
                                     description="Measure the HU of the phantom's material classes in the VerSe CT.")
    parser.add_argument("--verse", required=True, help="folder of the VerSe subject (sub-verse012)")
    parser.add_argument("--compare", action="store_true", help="also compare a procedural L2 with the CT's")
    args = parser.parse_args(argv)
    if not Path(args.verse).is_dir():
        parser.exit(2, f"{args.verse}: no such folder\n")
    measured = measure_verse(args.verse)
    print(json.dumps({"measured_hu": {k: round(v, 1) for k, v in measured.items()},
                      "table_hu": MATERIAL_HU,
                      "table_mu_per_mm": {k: round(mu(k), 5) for k in MATERIAL_HU}}, indent=2))
    if args.compare:
        print(json.dumps(compare_level(args.verse), indent=2))


if __name__ == "__main__":
    main()
