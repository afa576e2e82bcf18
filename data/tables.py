"""The one reader of the project's tables: manifests, ``vertebrae.csv`` (truth and predicted) and
``predictions.csv`` (docs/formats.md), with one set of rules:

* every cell is read as text, so nothing becomes NaN behind the reader's back (a patient
  called ``NA`` stays ``NA``);
* a label (``fracture``, ``acute``) is ``1``/``0`` (also ``1.0``/``0.0``, ``true``/``false`` in
  any case) or empty = unknown (NaN); anything else is a problem;
* a ``genant_grade`` is 0-3 or empty; other numbers are numbers or empty (NaN);
* **paths**: a relative ``image`` (or ``mask``) is taken from the folder of the manifest (of
  the CSV itself for ``predictions.csv`` and a predicted ``vertebrae.csv``) and kept as an
  absolute, normalised path (:func:`absolute_path`); tables are joined on :func:`path_key`,
  which also resolves symbolic links.

Problems are collected and raised together as one :class:`TableError` naming the file and rows.
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from data.geometry import POINT_COLUMNS
from data.records import FilmRecord, VertebraRecord

__all__ = [
    "TableError",
    "ManifestError",
    "MANIFEST_COLUMNS",
    "TRUTH_VERTEBRA_COLUMNS",
    "PREDICTED_VERTEBRA_REQUIRED",
    "absolute_path",
    "path_key",
    "read_text_table",
    "read_text_table_before_break",
    "unparsable_csv",
    "label_value",
    "label_column",
    "number_column",
    "load_manifest_table",
    "load_vertebrae_table",
    "load_predicted_vertebrae",
    "load_predictions_table",
]

MANIFEST_COLUMNS = ("image", "patient_id", "fracture", "acute")
TRUTH_VERTEBRA_COLUMNS = ("image", "level", "genant_grade", "morphology", "acute",
                          "x_min", "y_min", "x_max", "y_max", *POINT_COLUMNS)
# what the per-vertebra evaluation needs of a predicted vertebrae.csv; its other columns may be absent
PREDICTED_VERTEBRA_REQUIRED = ["image", "level", "p_fracture", "p_acute", "genant_grade", *POINT_COLUMNS]
GRADES = (0.0, 1.0, 2.0, 3.0)
_TRUE = {"1", "1.0", "true"}
_FALSE = {"0", "0.0", "false"}


class TableError(ValueError):
    """A table with problems: ``path`` and ``problems`` (each naming its row); ``str()`` is one line."""

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        shown = "; ".join(self.problems[:10]) + (f"; ... ({len(self.problems) - 10} more)" if len(self.problems) > 10 else "")
        super().__init__(f"{self.path}: {len(self.problems)} problem(s): {shown}")

    def lines(self) -> list[str]:
        """The error as a command prints it: ``PATH: N problem(s):``, then a line per problem."""
        return [f"{self.path}: {len(self.problems)} problem(s):", *(f"  {p}" for p in self.problems)]


class ManifestError(TableError):
    """A manifest (or the vertebrae.csv beside it) with problems."""


# --------------------------------------------------------------------------- paths
def absolute_path(p: str, base: str | os.PathLike) -> str:
    """Absolute, normalised form of ``p`` (a relative path is taken from ``base``)."""
    p = os.path.expanduser(str(p).strip())
    if not os.path.isabs(p):
        p = os.path.join(os.fspath(base), p)
    return os.path.normpath(os.path.abspath(p))


def path_key(p: str) -> str:
    """Join key for an image path: symbolic links resolved, case-normalised where the OS is."""
    return os.path.normcase(os.path.realpath(str(p)))


# --------------------------------------------------------------------------- cells
def read_text_table(path: str | os.PathLike, error: type[TableError] = TableError) -> pd.DataFrame:
    """Every column as text (header names stripped); an unreadable file is a ``error``."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pandas raises several types for a malformed CSV
        raise error(path, [unparsable_csv(path, exc)]) from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def unparsable_csv(path: str | os.PathLike, exc: Exception) -> str:
    """The problem of a CSV that pandas cannot parse, naming the row (line of the file, the
    header being row 1) where it breaks; pandas names a row of its own count, or none."""
    found = _csv_break(path)
    if found is not None:
        return found[1]
    return f"cannot parse CSV: {type(exc).__name__}: {' '.join(str(exc).split())}"


def _csv_break(path: str | os.PathLike) -> tuple[int, str] | None:
    """``(row, problem)``: the line where Python's CSV reader finds the file broken, or None."""
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh, strict=True)
            start = 1
            for _ in reader:
                start = reader.line_num + 1
    except csv.Error as err:
        if "end of data" in str(err):
            return start, f"row {start}: a quoted field is never closed (an unbalanced quote runs to the end of the file)"
        return start, f"row {start}: cannot parse CSV ({err})"
    except OSError:
        pass
    return None


def read_text_table_before_break(path: str | os.PathLike,
                                 error: type[TableError] = TableError) -> tuple[pd.DataFrame | None, list[str]]:
    """:func:`read_text_table` for a reader that lists every problem: ``(table, problems)``. A CSV
    that breaks partway (e.g. an unbalanced quote) gives the rows before the break, so that their
    problems are reported with it, and the break as its problem; the table is None when no row
    before the break can be read. Row k of the table is still line k + 2 of the file."""
    try:
        return read_text_table(path, error), []
    except error as exc:
        problems = exc.problems
    found = _csv_break(path)
    if found is None or found[0] <= 2:
        return None, problems
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            before = "".join(itertools.islice(fh, found[0] - 1))
        df = pd.read_csv(io.StringIO(before), dtype=str, keep_default_na=False, na_filter=False)
    except Exception:  # the rows before the break do not parse either: the break is the one problem
        return None, problems
    df.columns = [str(c).strip() for c in df.columns]
    return df, problems


def require_columns(df: pd.DataFrame, columns: Iterable[str], path, error: type[TableError] = TableError) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise error(path, [f"missing column(s) {', '.join(missing)} (have: {', '.join(df.columns)})"])


def label_value(value) -> float | None:
    """1.0, 0.0 or NaN (empty) for a label cell; None when it is none of those."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return float("nan")
    text = str(value).strip().lower()
    if text == "":
        return float("nan")
    if text in _TRUE:
        return 1.0
    if text in _FALSE:
        return 0.0
    return None


def label_column(values: pd.Series, column: str, problems: list[str], row_offset: int = 2) -> pd.Series:
    """A label column as 1.0 / 0.0 / NaN; each unknown value adds a problem naming its row."""
    out = []
    for k, v in enumerate(values):
        parsed = label_value(v)
        if parsed is None:
            problems.append(f"row {k + row_offset}: {column} has unknown value {str(v).strip()!r} "
                            "(expected 1, 0 or empty)")
            parsed = float("nan")
        out.append(parsed)
    return pd.Series(out, index=values.index, dtype=float)


def number_column(values: pd.Series) -> pd.Series:
    """Numbers as float; empty (or not a number) is NaN."""
    text = values.astype(str).str.strip()
    return pd.to_numeric(text.where(text != "", None), errors="coerce").astype(float)


def _grade_problems(grades: pd.Series, problems: list[str], row_offset: int = 2) -> None:
    bad = grades.notna() & ~grades.isin(GRADES)
    for k in np.flatnonzero(bad.to_numpy()):
        problems.append(f"row {k + row_offset}: genant_grade {grades.iloc[k]:g} is not 0, 1, 2, 3 or empty")


# --------------------------------------------------------------------------- the tables
def load_manifest_table(manifest_csv: str | os.PathLike) -> pd.DataFrame:
    """A manifest as evaluation reads it: one row per image, ``image`` (and ``mask``) absolute,
    ``patient_id`` text, ``fracture`` / ``acute`` float (1.0, 0.0, NaN = unknown), other columns
    text. Refuses missing columns, empty images, unknown labels and an image listed twice."""
    manifest_csv = Path(manifest_csv)
    df = read_text_table(manifest_csv, ManifestError)
    require_columns(df, MANIFEST_COLUMNS, manifest_csv, ManifestError)
    base = manifest_csv.resolve().parent
    problems: list[str] = []
    for k in np.flatnonzero((df["image"].str.strip() == "").to_numpy()):
        problems.append(f"row {k + 2}: empty image path")
    df["image"] = [absolute_path(p, base) if str(p).strip() else "" for p in df["image"]]
    if "mask" in df.columns:
        df["mask"] = [absolute_path(p, base) if str(p).strip() else "" for p in df["mask"]]
    df["fracture"] = label_column(df["fracture"], "fracture", problems)
    df["acute"] = label_column(df["acute"], "acute", problems)
    keys = df["image"].map(path_key)
    first: dict[str, int] = {}
    for k, key in enumerate(keys):
        if df["image"].iloc[k] and key in first:
            problems.append(f"row {k + 2}: duplicate of row {first[key]} (image {df['image'].iloc[k]})")
        first.setdefault(key, k + 2)
    if problems:
        raise ManifestError(manifest_csv, problems)
    return df.reset_index(drop=True)


def load_vertebrae_table(vertebrae_csv: str | os.PathLike, manifest_csv: str | os.PathLike) -> pd.DataFrame:
    """The truth ``vertebrae.csv``, ``image`` resolved against the folder of ``manifest_csv``
    (where the format puts it). ``genant_grade``, ``acute``, the box, ``mask_value`` and the
    points become float (NaN for empty); ``level`` and ``morphology`` stay text."""
    vertebrae_csv = Path(vertebrae_csv)
    df = read_text_table(vertebrae_csv)
    require_columns(df, ("image", "genant_grade", "x_min", "y_min", "x_max", "y_max"), vertebrae_csv)
    base = Path(manifest_csv).resolve().parent
    df["image"] = [absolute_path(p, base) for p in df["image"]]
    for col in ("genant_grade", "acute", "x_min", "y_min", "x_max", "y_max", "mask_value", *POINT_COLUMNS):
        if col in df.columns:
            df[col] = number_column(df[col])
    problems: list[str] = []
    _grade_problems(df["genant_grade"], problems)
    if problems:
        raise TableError(vertebrae_csv, problems)
    return df.reset_index(drop=True)


def load_predicted_vertebrae(path: str | os.PathLike) -> pd.DataFrame:
    """``OUT/vertebrae.csv`` of ``infer.py`` (or, given a folder, the one inside it).

    Needs :data:`PREDICTED_VERTEBRA_REQUIRED`; the record's other columns are optional (empty /
    NaN when absent). ``image`` becomes absolute (relative entries are taken from the CSV's
    folder); the record's numeric columns become float. Raises ``FileNotFoundError`` or a
    :class:`TableError` naming the file."""
    path = Path(path)
    csv_path = path / "vertebrae.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: predicted vertebrae file not found")
    df = read_text_table(csv_path)
    missing = [c for c in PREDICTED_VERTEBRA_REQUIRED if c not in df.columns]
    if missing:
        raise TableError(csv_path, [f"predicted vertebrae table lacks column(s) {missing}; found {list(df.columns)}"])
    base = csv_path.resolve().parent
    problems = [f"row {k + 2}: empty image path" for k in np.flatnonzero((df["image"].str.strip() == "").to_numpy())]
    if problems:
        raise TableError(csv_path, problems)
    df["image"] = [absolute_path(p, base) for p in df["image"]]
    numeric = set(VertebraRecord.numeric_columns())
    for col in FilmRecord.vertebra_columns():
        if col == "image":
            continue
        if col in numeric:
            df[col] = number_column(df[col]) if col in df.columns else np.nan
        elif col != "levels_trusted":
            df[col] = df[col].astype(str).str.strip() if col in df.columns else ""
    _grade_problems(df["genant_grade"], problems)
    if problems:
        raise TableError(csv_path, problems)
    return df.reset_index(drop=True)


def load_predictions_table(predictions_csv: str | os.PathLike) -> pd.DataFrame:
    """``predictions.csv`` as written by ``infer.py`` (all rows, any status): the film record's
    numeric columns become float; relative ``image`` entries (``infer.py`` writes absolute ones)
    are taken from the CSV's folder."""
    predictions_csv = Path(predictions_csv)
    df = read_text_table(predictions_csv)
    require_columns(df, ("image", "p_fracture", "status"), predictions_csv)
    base = predictions_csv.resolve().parent
    df["image"] = [absolute_path(p, base) for p in df["image"]]
    df["status"] = df["status"].str.strip()
    for col in FilmRecord.numeric_columns():
        if col in df.columns:
            df[col] = number_column(df[col])
    if "name" not in df.columns:
        df["name"] = [Path(p).stem for p in df["image"]]
    if "error" not in df.columns:
        df["error"] = ""
    return df
