"""Contact sheet: phantom films beside real radiographs, to compare texture and exposure.

    python -m data.contact_sheet --manifest runs/demo/data/train/manifest.csv --out sheet.png \
        [--also OTHER/manifest.csv] [--real ../shared/data/aasce/images] [--n 8]

Phantom tiles outline fractured vertebrae (red acute, blue chronic) and give the Genant grade;
``--also`` adds a row of another phantom set (e.g. the 2D phantom's films beside the 3D ones),
each tile named by the generator its folder's ``phantom.json`` records; real films (any folder
of images, e.g. the AASCE AP films) fill a last row, unannotated.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from data.io_utils import atomic_write_image
from data.readers import ImageReadError, image_suffixes, read_image
from data.tables import load_manifest_table, load_vertebrae_table
from data.transforms import letterbox, normalize_intensity

TILE = (384, 300)  # height, width


def _tile(pixels: np.ndarray) -> tuple[np.ndarray, object]:
    img, box = letterbox(normalize_intensity(pixels), TILE)
    return cv2.cvtColor((img * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR), box


def generator_name(manifest: Path) -> str:
    """"phantom 3D", "phantom 2D" or "phantom", from the set's phantom.json."""
    info = manifest.parent / "phantom.json"
    try:
        record = json.loads(info.read_text())
    except (OSError, ValueError):
        return "phantom"
    generator, version = record.get("generator", ""), str(record.get("version", ""))
    if generator == "data.phantom2d" or (generator == "data.phantom" and not version.startswith("3d")):
        return "phantom 2D"  # sets written before the 3D phantom took the name data.phantom
    return "phantom 3D" if generator == "data.phantom" else "phantom"


def phantom_tiles(manifest: Path, n: int) -> list[np.ndarray]:
    name = generator_name(manifest)
    man = load_manifest_table(manifest)
    vpath = manifest.parent / "vertebrae.csv"
    vert = load_vertebrae_table(vpath, manifest) if vpath.is_file() else None
    # show fractured films first: they are what the sheet is for
    man = pd.concat([man[man.fracture == 1], man[man.fracture != 1]]).head(n)
    tiles = []
    for _, row in man.iterrows():
        tile, box = _tile(read_image(row["image"]).pixels)
        if vert is not None:
            for _, v in vert[(vert.image == row["image"]) & (vert.genant_grade > 0)].iterrows():
                (x0, y0), (x1, y1) = box.to_input(np.array([[v.x_min, v.y_min], [v.x_max, v.y_max]]))
                colour = (40, 40, 230) if v.acute == 1 else (230, 120, 40)
                cv2.rectangle(tile, (int(x0), int(y0)), (int(x1), int(y1)), colour, 1)
                cv2.putText(tile, f"{v.level} G{int(v.genant_grade)} {'AC' if v.acute == 1 else 'CH'}",
                            (int(x1) + 2, int(y0) + 8), cv2.FONT_HERSHEY_SIMPLEX, 0.33, colour, 1, cv2.LINE_AA)
        cv2.putText(tile, f"{name} {row.get('view', '') or ''}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 220, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    return tiles


def real_tiles(folder: Path, n: int) -> list[np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in image_suffixes())
    pick = [files[i] for i in np.linspace(0, len(files) - 1, min(n, len(files))).astype(int)] if files else []
    tiles = []
    for p in pick:
        try:
            tile, _ = _tile(read_image(p).pixels)
        except ImageReadError:
            continue
        cv2.putText(tile, "real", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 220, 220), 1, cv2.LINE_AA)
        tiles.append(tile)
    return tiles


def _row(tiles: list[np.ndarray], n: int) -> np.ndarray:
    blank = np.zeros(TILE + (3,), np.uint8)
    tiles = tiles + [blank] * (n - len(tiles))
    return np.hstack(tiles[:n])


def contact_sheet(manifest: str | Path, out: str | Path, real: str | Path | None = None, n: int = 8,
                  also: str | Path | None = None) -> Path:
    rows = [_row(phantom_tiles(Path(manifest), n), n)]
    if also is not None:
        rows.append(_row(phantom_tiles(Path(also), n), n))
    if real is not None and Path(real).is_dir():
        rows.append(_row(real_tiles(Path(real), n), n))
    return atomic_write_image(out, np.vstack(rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--also", default=None, help="a second phantom manifest, shown as a second row")
    p.add_argument("--real", default=None, help="a folder of real radiographs to show beneath")
    p.add_argument("--n", type=int, default=8)
    a = p.parse_args(argv)
    print(f"wrote {contact_sheet(a.manifest, a.out, a.real, a.n, a.also)}")


if __name__ == "__main__":
    main()
