"""Adapters for vertebra landmark data sets: read them into one record structure, write them
in the project's manifest + ``vertebrae.csv`` formats (``docs/formats.md``).

Record structure (one dict per image, the same whichever reader made it)::

    {
      "image": "/abs/path/film.jpg",      # absolute path
      "patient_id": "sunhl-1th-02-Jan-2017-162",
      "size": (height, width),             # pixels; None when the file cannot be opened
      "view": "ap",                        # or "lateral", "" when unknown
      "fracture": 0.0,                     # image labels as floats, NaN = unknown
      "acute": nan,
      "vertebrae": [                       # cranio-caudal order (T1 first)
        {"level": "T1",
         "points": np.ndarray (6, 2),      # p1..p6, x/y in original-image pixels
         "box": np.ndarray (4,),           # x_min, y_min, x_max, y_max
         "genant_grade": 0.0,              # float, NaN = unknown
         "morphology": "normal",           # "" = unknown
         "acute": nan},                    # 1/0 for a fractured vertebra, NaN otherwise
        ...],
      "problems": [],                      # annotation errors found by read_aasce (the
                                           # project-format reader trusts its input: [])
    }

:func:`points_array` stacks the points of a record into ``(n, 6, 2)`` for
:func:`data.morphometry.grade_vertebrae` and :func:`data.simulate.simulate_fracture`.

AASCE / BoostNet AP films (:func:`read_aasce`)
    Four corners per vertebra: top-left, top-right, bottom-left, bottom-right as seen on the
    image. On an AP film the project's "anterior" and "posterior" columns read as the two
    *sides* of the body: the **left corner (as seen on the image) is the "anterior" column and
    the right corner the "posterior" column**; "middle" is the endplate midpoint::

        p1 = top-left      p2 = mid(top-left, top-right)       p3 = top-right
        p4 = bottom-left   p5 = mid(bottom-left, bottom-right) p6 = bottom-right

    so Ha is the left height, Hp the right height and Hm the central height. The box is the
    axis-aligned box of the four corners. These films carry no fracture: every vertebra is
    written with ``genant_grade`` 0 and ``morphology`` normal (heights measured from the
    landmarks of scoliotic spines are not always within 20 % of each other; the label is the
    truth of the film, not a re-measurement).

    The patient id is the part of the file name before the view letter (`` A ``, `` B ``,
    `` C `` ... - any single capital letter between spaces); a name without one (e.g. the
    ``coronal<k>`` files) is its own patient (the file stem).

    Some films of the set carry annotation errors (about 35 of 481: a last vertebra drawn
    at the top of the film or over the whole spine, two vertebrae on one body, crossed
    corners). :func:`landmark_problems` finds them; ``read_aasce`` returns every film with
    its ``"problems"`` (empty list for a clean film), the command line below leaves the
    flagged films out unless ``--keep-flagged``, and :func:`data.simulate.simulate_dataset`
    skips them.

Command line::

    python -m data.landmarks --aasce DIR --out OUT [--keep-flagged]

writes ``OUT/manifest.csv`` and ``OUT/vertebrae.csv`` with absolute image paths (no image is
copied), so the films can be used like any other project data set, and ``OUT/excluded.csv``
(the films left out, with their problems).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from data.geometry import POINT_COLUMNS, heights as body_heights
from data.io_utils import atomic_write_text, missing_file
from data.tables import absolute_path, label_value, read_text_table
from data.morphometry import LEVELS, level_index
from data.readers import read_image

BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]
AASCE_N_VERTEBRAE = 17
_VIEW_LETTER = re.compile(r"^(.+?) [A-Z] ")


class LandmarkError(ValueError):
    """A landmark data set that cannot be read; the message says which file and why."""


# ----------------------------------------------------------------------------- helpers


def corners_to_points(corners: np.ndarray) -> np.ndarray:
    """Four corners (tl, tr, bl, br), shape (..., 4, 2) -> six project points (..., 6, 2)."""
    c = np.asarray(corners, dtype=np.float64)
    tl, tr, bl, br = c[..., 0, :], c[..., 1, :], c[..., 2, :], c[..., 3, :]
    return np.stack([tl, (tl + tr) / 2, tr, bl, (bl + br) / 2, br], axis=-2)


def points_box(points: np.ndarray) -> np.ndarray:
    """Axis-aligned box (x_min, y_min, x_max, y_max) of a vertebra's points."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()])


def points_array(record: dict) -> np.ndarray:
    """The points of all vertebrae of a record, shape (n, 6, 2), cranio-caudal order."""
    return np.stack([np.asarray(v["points"], dtype=np.float64) for v in record["vertebrae"]])


def patient_from_name(name: str) -> str:
    """Patient id of an AASCE file name: the part before `` A ``/`` B ``/`` C `` ... ."""
    m = _VIEW_LETTER.match(name)
    return m.group(1) if m else Path(name).stem


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from the file header (PIL), else by decoding (DICOM); None if unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception:
        pass
    try:

        h, w = read_image(path).pixels.shape[:2]
        return int(h), int(w)
    except Exception:
        return None


def _label(value, manifest: Path) -> float:
    """A manifest label by the tables' one rule (data.tables.label_value)."""
    parsed = label_value(value)
    if parsed is None:
        raise LandmarkError(f"{manifest}: label {str(value).strip()!r} is not 1, 0 or empty")
    return parsed


def _float(value) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _csv_value(value, integer: bool = True):
    """A label for CSV: NaN / None -> empty, numbers as integers where they are."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    v = float(value)
    if math.isnan(v):
        return ""
    return int(v) if integer and v == int(v) else v


def landmark_problems(points: np.ndarray, size: tuple[int, int] | None = None,
                      min_height_ratio: float = 0.3) -> list[str]:
    """Annotation errors in the points of one film, (n, 6, 2) in cranio-caudal order.

    One line per problem, naming the vertebra by its index (0 = first): inferior points not
    below the superior ones along the body's axis; a vertebra whose centre is not below the
    previous one's (films are upright); a vertebra reaching more than 30 % of its height
    into the one above, along its axis; a height or width over 2.5 times the film's median
    (or a width under 0.4 times); a body whose least height is under ``min_height_ratio``
    of its greatest (crossed or misplaced corners - set 0 for data sets with vertebra plana);
    points more than 2 % of the image size outside it.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    problems: list[str] = []
    if len(pts) == 0:
        return ["no vertebrae"]
    top_mid = (pts[:, 0] + pts[:, 2]) / 2
    bot_mid = (pts[:, 3] + pts[:, 5]) / 2
    axis = bot_mid - top_mid
    axis_len = np.linalg.norm(axis, axis=1)
    t = axis / np.maximum(axis_len, 1e-9)[:, None]
    along = np.einsum("nkd,nd->nk", pts[:, 3:] - pts[:, :3], t)  # heights along the axis
    heights = body_heights(pts)
    widths = np.linalg.norm(pts[:, 2] - pts[:, 0], axis=1)
    h_med, w_med = float(np.median(heights)), float(np.median(widths))
    centres = pts.mean(1)
    for k in range(len(pts)):
        if axis_len[k] < 1e-6 or axis[k, 1] <= 0 or (along[k] <= 0).any():
            problems.append(f"vertebra {k}: inferior points not below the superior ones")
        if k and centres[k, 1] <= centres[k - 1, 1]:
            problems.append(f"vertebra {k}: not below vertebra {k - 1}")
        elif k and float((top_mid[k] - bot_mid[k - 1]) @ t[k]) < -0.3 * float(heights[k].mean()):
            problems.append(f"vertebra {k}: overlaps vertebra {k - 1}")
        if heights[k].max() > 2.5 * h_med or widths[k] > 2.5 * w_med or widths[k] < 0.4 * w_med:
            problems.append(f"vertebra {k}: size far from the film's median")
        if heights[k].max() > 0 and heights[k].min() < min_height_ratio * heights[k].max():
            problems.append(f"vertebra {k}: heights {heights[k].min():.0f} and {heights[k].max():.0f} px "
                            "(crossed or misplaced corners)")
    if size is not None:
        h, w = size
        lo = -0.02 * np.array([w, h])
        hi = np.array([w - 1, h - 1]) + 0.02 * np.array([w, h])
        bad = ~((pts >= lo) & (pts <= hi)).all(axis=(1, 2))
        for k in np.flatnonzero(bad):
            problems.append(f"vertebra {k}: points outside the image")
    return problems


# ----------------------------------------------------------------------------- AASCE


def read_aasce(root: str | Path) -> list[dict]:
    """Read the AASCE 2019 / BoostNet landmark set under ``root`` (see the module docstring).

    ``root`` holds ``filenames.csv``, ``landmarks.csv`` (136 numbers per row: 68 x then 68 y,
    normalised by image width / height) and ``images/``. Returns one record per row.
    """
    root = Path(root).expanduser().resolve()
    names_csv, lm_csv, img_dir = root / "filenames.csv", root / "landmarks.csv", root / "images"
    for p in (names_csv, lm_csv, img_dir):
        if not p.exists():
            raise LandmarkError(f"{p}: not found (expected an AASCE folder with filenames.csv, "
                                "landmarks.csv and images/)")
    names = pd.read_csv(names_csv, header=None, dtype=str, keep_default_na=False)[0].tolist()
    lm = pd.read_csv(lm_csv, header=None).to_numpy(dtype=np.float64)
    if lm.ndim != 2 or lm.shape[1] != 8 * AASCE_N_VERTEBRAE:
        raise LandmarkError(f"{lm_csv}: expected {8 * AASCE_N_VERTEBRAE} numbers per row, "
                            f"found {lm.shape[1] if lm.ndim == 2 else lm.shape}")
    if len(names) != len(lm):
        raise LandmarkError(f"{root}: filenames.csv has {len(names)} rows but landmarks.csv {len(lm)}")
    n_pts = 4 * AASCE_N_VERTEBRAE
    records = []
    for row, (name, values) in enumerate(zip(names, lm), start=1):
        path = img_dir / name
        size = image_size(path)
        if size is None:
            raise LandmarkError(f"{path}: image listed in row {row} of filenames.csv cannot be read")
        h, w = size
        if not np.isfinite(values).all():
            raise LandmarkError(f"{lm_csv}: row {row} has a missing or non-numeric landmark")
        xy = np.stack([values[:n_pts] * w, values[n_pts:] * h], axis=1)
        pts = corners_to_points(xy.reshape(AASCE_N_VERTEBRAE, 4, 2))
        vertebrae = [{"level": LEVELS[k], "points": pts[k], "box": points_box(pts[k]),
                      "genant_grade": 0.0, "morphology": "normal", "acute": float("nan")}
                     for k in range(AASCE_N_VERTEBRAE)]
        records.append({"image": str(path), "patient_id": patient_from_name(name), "size": (h, w),
                        "view": "ap", "fracture": 0.0, "acute": float("nan"),
                        "vertebrae": vertebrae, "problems": landmark_problems(pts, (h, w))})
    return records


# ----------------------------------------------------------------------------- project format


def read_vertebrae_csv(path: str | Path, manifest: str | Path | None = "auto",
                       image_sizes: bool = True) -> list[dict]:
    """Records from a project-format ``vertebrae.csv`` and its manifest.

    ``manifest="auto"`` uses ``manifest.csv`` beside the vertebrae file when it exists (patient
    ids, view and image labels come from it); ``None`` (or no manifest) takes the patient id
    from the image file stem and leaves the image labels to the vertebrae (fracture 1 when a
    vertebra is graded, 0 when all are graded 0). Relative image paths are resolved as the
    manifest's are, against the manifest's folder (docs/formats.md: ``image`` is as in the
    manifest); without a manifest, against the CSV's folder. Vertebrae are sorted cranio-caudally. Images of the manifest without any
    vertebra row are left out.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise LandmarkError(f"{path}: {missing_file(path, 'vertebrae file')}")
    root = path.parent
    raw = read_text_table(path)
    missing = [c for c in ["image", "level"] + POINT_COLUMNS if c not in raw.columns]
    if missing:
        raise LandmarkError(f"{path}: missing column(s): {', '.join(missing)}")

    image_info: dict[str, dict] = {}
    order: list[str] = []
    image_base = root
    mpath = root / "manifest.csv" if manifest == "auto" else (Path(manifest) if manifest else None)
    if mpath is not None and mpath.is_file():
        image_base = mpath.parent.resolve()
        mdf = read_text_table(mpath)
        for _, r in mdf.iterrows():
            img = absolute_path(r["image"], mpath.parent.resolve())
            order.append(img)
            image_info[img] = {"patient_id": r.get("patient_id", "").strip() or Path(img).stem,
                               "view": r.get("view", "").strip() if "view" in mdf.columns else "",
                               "fracture": _label(r.get("fracture", ""), mpath),
                               "acute": _label(r.get("acute", ""), mpath)}
    elif manifest not in ("auto", None):
        raise LandmarkError(f"{mpath}: {missing_file(mpath, 'manifest')}")

    groups: dict[str, list[dict]] = {}
    for i, r in raw.iterrows():
        img = absolute_path(r["image"], image_base)
        try:
            pts = np.array([float(r[c]) for c in POINT_COLUMNS], dtype=np.float64).reshape(6, 2)
        except ValueError as exc:
            raise LandmarkError(f"{path}: row {i + 2}: non-numeric point ({exc})") from None
        level = r["level"].strip()
        try:
            level_index(level)
        except ValueError as exc:
            raise LandmarkError(f"{path}: row {i + 2}: {exc}") from None
        if all(c in raw.columns and r[c].strip() for c in BOX_COLUMNS):
            box = np.array([float(r[c]) for c in BOX_COLUMNS])
        else:
            box = points_box(pts)
        groups.setdefault(img, []).append({
            "level": level, "points": pts, "box": box,
            "genant_grade": _float(r.get("genant_grade", "")),
            "morphology": r.get("morphology", "").strip() if "morphology" in raw.columns else "",
            "acute": _float(r.get("acute", "")),
        })
        if img not in image_info:
            order.append(img)
            image_info[img] = {"patient_id": Path(img).stem, "view": "", "fracture": float("nan"),
                               "acute": float("nan")}

    records = []
    for img in dict.fromkeys(order):
        if img not in groups:
            continue
        verts = sorted(groups[img], key=lambda v: level_index(v["level"]))
        info = dict(image_info[img])
        if math.isnan(info["fracture"]):
            grades = np.array([v["genant_grade"] for v in verts])
            if (grades > 0).any():
                info["fracture"] = 1.0
            elif not np.isnan(grades).any():
                info["fracture"] = 0.0
        records.append({"image": img, "patient_id": info["patient_id"],
                        "size": image_size(img) if image_sizes else None, "view": info["view"],
                        "fracture": info["fracture"], "acute": info["acute"], "vertebrae": verts,
                        "problems": []})
    return records


def vertebra_row(image: str, v: dict, decimals: int = 3) -> dict:
    """One ``vertebrae.csv`` row for a vertebra dict of a record."""
    box = np.asarray(v.get("box") if v.get("box") is not None else points_box(v["points"]))
    row = {"image": image, "level": v["level"],
           "genant_grade": _csv_value(v.get("genant_grade")),
           "morphology": v.get("morphology", "") or "",
           "acute": _csv_value(v.get("acute"))}
    for c, value in zip(BOX_COLUMNS, box):
        row[c] = round(float(value), 2)
    for j, (x, y) in enumerate(np.asarray(v["points"], dtype=np.float64).reshape(6, 2), start=1):
        row[f"p{j}x"] = round(float(x), decimals)
        row[f"p{j}y"] = round(float(y), decimals)
    return row


def manifest_row(image: str, record: dict) -> dict:
    fracture = _csv_value(record.get("fracture"))
    acute = _csv_value(record.get("acute")) if fracture == 1 else ""
    row = {"image": image, "patient_id": record["patient_id"], "fracture": fracture,
           "acute": acute, "view": record.get("view", "") or ""}
    if "split" in record:  # e.g. held-out patients marked by --test-patients-from
        row["split"] = record["split"]
    return row


def write_vertebrae_dataset(records: list[dict], out_dir: str | Path,
                            manifest_name: str = "manifest.csv",
                            vertebrae_name: str = "vertebrae.csv") -> Path:
    """Write ``manifest.csv`` + ``vertebrae.csv`` for ``records`` under ``out_dir``.

    Image paths are written absolute (no image is copied). For AASCE records that means
    ``fracture`` 0, ``acute`` empty, ``view`` ap, and every vertebra grade 0 / normal.
    Returns the manifest path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, vrows = [], []
    for rec in records:
        image = str(Path(rec["image"]).resolve())
        rows.append(manifest_row(image, rec))
        vrows.extend(vertebra_row(image, v) for v in rec["vertebrae"])
    atomic_write_text(out / vertebrae_name, pd.DataFrame(vrows).to_csv(index=False))
    return atomic_write_text(out / manifest_name, pd.DataFrame(rows).to_csv(index=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.landmarks",
        description="Write a landmark data set as a project manifest.csv + vertebrae.csv "
                    "(absolute image paths; images are not copied).")
    parser.add_argument("--aasce", required=True, help="AASCE folder (filenames.csv, landmarks.csv, images/)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--keep-flagged", action="store_true",
                        help="keep films whose landmarks have problems (see landmark_problems); "
                             "by default they are left out and listed in OUT/excluded.csv")
    parser.add_argument("--test-patients-from", default=None, metavar="MANIFEST",
                        help="mark split = test on the films of every patient that has a split = test row in "
                             "MANIFEST (e.g. the simulated-real training manifest), so that training on this "
                             "manifest too never reads the held-out patients' films")
    args = parser.parse_args(argv)
    try:
        records = read_aasce(args.aasce)
    except LandmarkError as exc:
        parser.exit(2, f"error: {exc}\n")
    flagged = [r for r in records if r.get("problems")]
    kept = records if args.keep_flagged else [r for r in records if not r.get("problems")]
    if args.test_patients_from:
        held = read_text_table(args.test_patients_from)
        if "split" not in held or "patient_id" not in held:
            parser.error(f"{args.test_patients_from}: needs patient_id and split columns")
        test_ids = set(held.loc[held["split"].str.strip() == "test", "patient_id"])
        kept = [{**r, "split": "test" if r["patient_id"] in test_ids else ""} for r in kept]
        marked = [r for r in kept if r["split"] == "test"]
        print(f"{len(marked)} films of {len({r['patient_id'] for r in marked})} patients marked split = test "
              f"({len(test_ids)} held-out patients in {args.test_patients_from})")
    manifest = write_vertebrae_dataset(kept, args.out)
    excluded = [] if args.keep_flagged else flagged
    atomic_write_text(Path(args.out) / "excluded.csv", pd.DataFrame(
        [{"image": r["image"], "problems": "; ".join(r["problems"])} for r in excluded],
        columns=["image", "problems"]).to_csv(index=False))
    n_patients = len({r["patient_id"] for r in kept})
    print(f"wrote {len(kept)} images of {n_patients} patients to {manifest} (+ vertebrae.csv); "
          f"{len(flagged)} with landmark problems {'kept' if args.keep_flagged else 'left out (excluded.csv)'}")


if __name__ == "__main__":
    main()
