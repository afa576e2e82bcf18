"""Manifest and per-vertebra CSVs: loading, validation and patient-grouped splits.

Formats are documented in ``docs/formats.md``. Validation collects *every* problem and
raises one :class:`ManifestError` listing them all, so a user fixes a bad manifest in one
pass instead of one training crash at a time.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.io_utils import missing_file
from data.morphometry import EXTRA_LEVELS, LEVELS, MORPHOLOGIES
from data.tables import (MANIFEST_COLUMNS, TRUTH_VERTEBRA_COLUMNS, ManifestError, absolute_path, label_value,
                         path_key, read_text_table, read_text_table_before_break)

REQUIRED_COLUMNS = MANIFEST_COLUMNS
SPLITS = ("train", "val", "test")
VERTEBRA_COLUMNS = TRUTH_VERTEBRA_COLUMNS


def _label(value, column: str, row: int, problems: list[str]) -> float:
    """A label by the tables' one rule (data.tables.label_value); an unknown value is reported and read as NaN."""
    parsed = label_value(value)
    if parsed is None:
        problems.append(f"row {row}: {column} has unknown value {str(value).strip()!r} (expected 1, 0 or empty)")
        return float("nan")
    return parsed


@dataclass
class Manifest:
    """A validated manifest: ``images`` has one row per image with absolute paths and float
    labels (NaN = unknown); ``vertebrae`` one row per vertebra, or None."""

    path: Path
    images: pd.DataFrame
    vertebrae: pd.DataFrame | None

    def __len__(self) -> int:
        return len(self.images)

    def vertebrae_of(self, image: str) -> pd.DataFrame:
        if self.vertebrae is None:
            return pd.DataFrame(columns=VERTEBRA_COLUMNS)
        return self.vertebrae[self.vertebrae["image"] == image]


def load_manifest(path: str | Path, vertebrae: str | Path | None = "auto",
                  check_files: bool = True) -> Manifest:
    """Read and validate a manifest (and ``vertebrae.csv`` beside it when ``"auto"``)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [missing_file(path, "manifest file")])
    root = path.parent.resolve()
    raw = read_text_table(path, ManifestError)
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise ManifestError(path, [f"missing required column(s): {', '.join(missing)}"
                                   f" (have: {', '.join(raw.columns)})"])
    if raw.empty:
        raise ManifestError(path, ["manifest has no rows"])

    rows = []
    seen: dict[str, int] = {}
    for i, r in raw.iterrows():
        line = i + 2  # header is line 1
        image = r["image"].strip()
        if not image:
            problems.append(f"row {line}: empty image path")
            continue
        abs_path = absolute_path(image, root)
        if path_key(abs_path) in seen:
            problems.append(f"row {line}: duplicate of row {seen[path_key(abs_path)]} (image {image})")
            continue
        seen[path_key(abs_path)] = line
        if check_files and not Path(abs_path).is_file():
            problems.append(f"row {line}: image file not found: {image}")
        patient = r["patient_id"].strip()
        if not patient:
            problems.append(f"row {line}: empty patient_id")
        fracture = _label(r["fracture"], "fracture", line, problems)
        acute = _label(r["acute"], "acute", line, problems)
        if not math.isnan(acute) and fracture != 1.0:
            problems.append(f"row {line}: acute is {int(acute)} but fracture is "
                            f"{'unknown' if math.isnan(fracture) else int(fracture)} (acute needs fracture = 1)")
        split = r.get("split", "").strip() if "split" in raw.columns else ""
        if split and split not in SPLITS:
            problems.append(f"row {line}: unknown split {split!r} (expected train, val, test or empty)")
        mask = r.get("mask", "").strip() if "mask" in raw.columns else ""
        mask_abs = ""
        if mask:
            mask_abs = absolute_path(mask, root)
            if check_files and not Path(mask_abs).is_file():
                problems.append(f"row {line}: mask file not found: {mask}")
        rows.append({"image": abs_path, "image_rel": image, "patient_id": patient, "fracture": fracture,
                     "acute": acute, "split": split, "view": r.get("view", "") if "view" in raw.columns else "",
                     "mask": mask_abs})
    images = pd.DataFrame(rows)
    if not images.empty:
        given = images[images["split"] != ""]
        multi = given.groupby("patient_id")["split"].nunique()
        for patient in multi[multi > 1].index:
            problems.append(f"patient {patient} appears in more than one split: "
                            f"{sorted(given[given.patient_id == patient].split.unique())}")

    vert_df = None
    vpath = path.parent / "vertebrae.csv" if vertebrae == "auto" else (Path(vertebrae) if vertebrae else None)
    if vpath is not None and (vertebrae != "auto" or vpath.is_file()):
        vert_df = _load_vertebrae(vpath, root, set(seen), problems)
        if vert_df is not None and not images.empty:
            _check_consistency(images, vert_df, problems)
    if problems:
        raise ManifestError(path, problems)
    return Manifest(path=path, images=images.reset_index(drop=True), vertebrae=vert_df)


def _load_vertebrae(path: Path, root: Path, images: set[str], problems: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        problems.append(f"{path}: {missing_file(path, 'vertebrae file')}")
        return None
    # a file that breaks partway (an unbalanced quote): its break and the problems of the rows before it,
    # all in the manifest's one list
    raw, broken = read_text_table_before_break(path, ManifestError)
    broken = [f"{path.name} {p}" for p in broken]
    if raw is None:
        problems += broken
        return None
    missing = [c for c in VERTEBRA_COLUMNS if c not in raw.columns]
    if missing:
        problems += [f"{path.name}: missing column(s): {', '.join(missing)}", *broken]
        return None
    out = []
    valid_levels = set(LEVELS) | set(EXTRA_LEVELS)
    seen = set()
    for i, r in raw.iterrows():
        line = i + 2
        where = f"{path.name} row {line}"
        image = r["image"].strip()
        abs_path = absolute_path(image, root)
        if path_key(abs_path) not in images:
            problems.append(f"{where}: image {image} is not in the manifest")
        level = r["level"].strip()
        if level not in valid_levels:
            problems.append(f"{where}: unknown level {level!r}")
        if (abs_path, level) in seen:
            problems.append(f"{where}: duplicate vertebra {level} for image {image}")
        seen.add((abs_path, level))
        grade_text = r["genant_grade"].strip()
        grade = float("nan")
        if grade_text:
            try:
                grade = float(grade_text)
                if grade not in (0, 1, 2, 3):
                    raise ValueError
            except ValueError:
                problems.append(f"{where}: genant_grade {grade_text!r} is not 0, 1, 2, 3 or empty")
                grade = float("nan")
        morph = r["morphology"].strip()
        if morph and morph not in MORPHOLOGIES:
            problems.append(f"{where}: unknown morphology {morph!r} (expected {', '.join(MORPHOLOGIES)})")
        acute = _label(r["acute"], "acute", line, problems)
        if not math.isnan(acute) and not (grade > 0):
            problems.append(f"{where}: acute given for a vertebra without a fracture (genant_grade {grade_text or 'empty'})")
        coords = {}
        for c in VERTEBRA_COLUMNS[5:]:
            try:
                coords[c] = float(r[c])
            except ValueError:
                problems.append(f"{where}: {c} is not a number ({r[c]!r})")
                coords[c] = float("nan")
        rec = {"image": abs_path, "level": level, "genant_grade": grade, "morphology": morph, "acute": acute, **coords}
        mask_value = r["mask_value"].strip() if "mask_value" in raw.columns else ""
        if mask_value:
            try:
                value = float(mask_value)
            except ValueError:
                value = math.nan
            if value.is_integer():
                rec["mask_value"] = int(value)
            else:
                problems.append(f"{where}: mask_value {mask_value!r} is not an integer (a label of the mask)")
        out.append(rec)
    if broken:  # the rows after the break are unknown: no consistency check against the manifest
        problems += broken
        return None
    return pd.DataFrame(out)


def _check_consistency(images: pd.DataFrame, vert: pd.DataFrame, problems: list[str]) -> None:
    """An image labelled normal must not carry a graded fracture, and vice versa."""
    graded = vert.groupby("image")["genant_grade"].max()
    for image, label in zip(images["image"], images["fracture"]):
        if image not in graded.index or math.isnan(graded[image]) or math.isnan(label):
            continue
        if label == 0 and graded[image] > 0:
            problems.append(f"image {image}: fracture = 0 but vertebrae.csv grades a vertebra {int(graded[image])}")
        if label == 1 and graded[image] == 0 and (vert[vert.image == image]["genant_grade"] == 0).all():
            problems.append(f"image {image}: fracture = 1 but every vertebra in vertebrae.csv is grade 0")


def patient_fraction(patient: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(patient: str, fraction: float, seed: int = 0) -> bool:
    """Whether ``data.combine --test-fraction-of M=fraction --seed seed`` holds ``patient`` out
    (a hash of the id: the same answer wherever it is asked)."""
    return patient_fraction(f"test:{patient}", seed) < fraction


def assign_splits(images: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.0,
                  seed: int = 0) -> pd.Series:
    """Split by patient: rows with a ``split`` keep it; a row without one takes the split given to
    another row of its patient (a patient given ``test`` on one film must not train on another);
    the rest go by a hash of the patient id, so a patient never lands in two splits and adding
    patients does not reshuffle old ones."""
    given_splits = images.get("split", pd.Series([""] * len(images), index=images.index)).fillna("").astype(str)
    named = {p: s for p, s in zip(images["patient_id"], given_splits) if s}  # load_manifest refuses conflicts
    out = []
    for patient, given in zip(images["patient_id"], given_splits):
        given = given or named.get(patient, "")
        if given:
            out.append(given)
            continue
        f = patient_fraction(str(patient), seed)
        out.append("test" if f < test_fraction else "val" if f < test_fraction + val_fraction else "train")
    return pd.Series(out, index=images.index, name="split")


def check_apart_from_training(other: Manifest, training: pd.DataFrame, training_manifest: str | Path,
                              role: str) -> None:
    """Refuse a separate validation or test manifest (``role``) that shares an image or a patient
    with ``training`` (the training split's rows of ``training_manifest``): splits never share
    a patient. Raises one :class:`ManifestError` naming ``other``'s rows."""
    images = {path_key(p) for p in training["image"]}
    patients = set(training["patient_id"])
    problems = []
    for k, (image, patient) in enumerate(zip(other.images["image"], other.images["patient_id"])):
        row = k + 2  # a manifest that loaded has every row, the header being row 1
        if path_key(image) in images:
            problems.append(f"row {row}: image {image} is a training image of {training_manifest} "
                            f"(a {role} image must not be trained on)")
        elif patient in patients:
            problems.append(f"row {row}: patient {patient} has training images in {training_manifest} "
                            f"(splits never share a patient)")
    if problems:
        raise ManifestError(other.path, problems)


def label_arrays(images: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Targets for the two image heads: fracture, and acute given a fracture (NaN = masked)."""
    fracture = images["fracture"].to_numpy(dtype=np.float32)
    acute = images["acute"].to_numpy(dtype=np.float32)
    acute_given = np.where(fracture == 1, acute, np.nan).astype(np.float32)
    return fracture, acute_given
