"""The procedural phantom: 3D thoracolumbar spines and trunks projected as radiographs, with
exact per-vertebra truth. The project's embedded default data set.

    python -m data.phantom --out DIR --n N --seed S [--size PX] [--view lateral|ap|both] [--workers W]

writes ``N`` films (16-bit PNG; ``--view both``, the default, draws 60 % lateral films facing
either way and 40 % AP films), their body masks, ``manifest.csv`` (with a ``view`` column) and
``vertebrae.csv`` (six points, box, level, Genant grade, shape and acuity per vertebra) in the
project's formats (docs/formats.md), and ``phantom.json`` with each film's geometry and pixel
spacing (at the detector and at the isocentre), which the manifest has no column for. Film ``i``
of seed ``S`` is always the same, whatever ``N`` is.

What the films model and how: :mod:`data.spine3d` (anatomy, materials, exact cone-beam line
integrals, acquisition). The earlier 2D drawing lives on as :mod:`data.phantom2d`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from data.fracture_priors import (ACUTE_GRADE_P, ACUTE_SHAPE_P, CHRONIC_GRADE_P, CHRONIC_SHAPE_P,  # noqa: F401
                                  LEVEL_FRACTURE_WEIGHT, LOSS_RANGE)
from data.io_utils import atomic_write_image, atomic_write_text
from data.morphometry import LEVELS
from data.spine3d.render import generate_image

PHANTOM_VERSION = "3d-2"
PHANTOM_LEVELS: tuple[str, ...] = LEVELS  # T1 ... L5
VIEWS = ("lateral", "ap", "both")
__all__ = ["generate_image", "generate_dataset", "PHANTOM_LEVELS", "LOSS_RANGE", "PHANTOM_VERSION", "main"]


def _write_one(args) -> tuple[dict, list[dict], dict]:
    out, seed, index, size, view = args
    sample = generate_image(seed, index, size, view=view)
    name = f"phantom_s{seed}_{index:05d}"
    image_rel = f"images/{name}.png"
    mask_rel = f"masks/{name}.png"
    atomic_write_image(out / image_rel, sample["image"])
    atomic_write_image(out / mask_rel, sample["mask"])
    meta = sample["meta"]
    row = {"image": image_rel, "patient_id": f"phantom-s{seed}-{index:05d}", "fracture": meta["fracture"],
           "acute": meta["acute"], "view": meta["view"], "mask": mask_rel, "bits_stored": meta["bits_stored"]}
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
    film = {k: meta[k] for k in ("view", "projector_view", "window", "pixel_spacing_mm", "pixel_spacing_isocentre_mm",
                                 "osteoporotic", "variants", "geometry")}
    return row, vrows, {image_rel: film}


def generate_dataset(out: str | os.PathLike, n: int, seed: int, size: int = 512, workers: int | None = None,
                     progress: bool = True, view: str = "both") -> Path:
    """Write ``n`` phantom films with ``manifest.csv``, ``vertebrae.csv`` and ``phantom.json`` under ``out``."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed, i, size, view) for i in range(n)]
    workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1, 8)
    if workers > 1 and n > 8:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_write_one, jobs, chunksize=4), total=n,
                                desc=f"phantom seed {seed}", disable=not progress))
    else:
        results = [_write_one(j) for j in tqdm(jobs, desc=f"phantom seed {seed}", disable=not progress)]
    rows = [r for r, _, _ in results]
    vrows = [v for _, vs, _ in results for v in vs]
    films = {k: v for _, _, f in results for k, v in f.items()}
    atomic_write_text(out / "manifest.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_text(out / "vertebrae.csv", pd.DataFrame(vrows).to_csv(index=False))
    info = {"generator": "data.phantom", "version": PHANTOM_VERSION, "seed": seed, "n": n, "size": size, "view": view,
            "n_fractured_images": int(sum(r["fracture"] for r in rows)),
            "n_fractured_vertebrae": int(sum(1 for v in vrows if v["genant_grade"] > 0)),
            "note": "Synthetic phantom films. Not patient data; not for clinical use.",
            "films": films}
    atomic_write_text(out / "phantom.json", json.dumps(info, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of films")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="image height in pixels (width is 0.8x)")
    parser.add_argument("--view", choices=VIEWS, default="both", help="lateral, ap or both (60 %% lateral)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if args.n < 1 or args.size < 64:
        print(f"python -m data.phantom: --n must be at least 1 and --size at least 64 (got {args.n}, {args.size})",
              file=sys.stderr)
        raise SystemExit(2)
    out = generate_dataset(args.out, args.n, args.seed, args.size, args.workers, view=args.view)
    print(f"wrote {args.n} phantom films to {out} (manifest.csv, vertebrae.csv, phantom.json)")


if __name__ == "__main__":
    main()
