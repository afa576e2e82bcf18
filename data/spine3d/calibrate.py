"""Measure the Hounsfield units of the phantom's material classes in the VerSe CT.

    python -m data.spine3d.calibrate --verse ../shared/data/verse

prints the measured HU beside the committed table (:mod:`data.spine3d.materials`, whose
docstring says how each class is measured and which numbers the table takes from it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from data.drr import label_centroids, load_inputs, read_nifti, separate_body, vertebra_frames
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.spine3d.calibrate",
                                     description="Measure the HU of the phantom's material classes in the VerSe CT.")
    parser.add_argument("--verse", required=True, help="folder of the VerSe subject (sub-verse012)")
    args = parser.parse_args(argv)
    if not Path(args.verse).is_dir():
        parser.exit(2, f"{args.verse}: no such folder\n")
    measured = measure_verse(args.verse)
    print(json.dumps({"measured_hu": {k: round(v, 1) for k, v in measured.items()},
                      "table_hu": MATERIAL_HU,
                      "table_mu_per_mm": {k: round(mu(k), 5) for k in MATERIAL_HU}}, indent=2))


if __name__ == "__main__":
    main()
