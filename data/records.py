"""The output schema: one film record and one vertebra record, with their JSON and CSV forms.

``<name>.json`` is :meth:`FilmRecord.to_json_dict`, a ``predictions.csv`` row is
:meth:`FilmRecord.prediction_row` (or :func:`error_row` for an input that failed) and the
``vertebrae.csv`` rows are :meth:`FilmRecord.vertebra_rows`. The column lists
(``PREDICTION_COLUMNS``, ``VERTEBRA_COLUMNS``) and the numeric columns a reader parses are derived
from the fields, so an output field is added in one place: a field of one of the two classes
(and its line in ``docs/formats.md``).

How a field is written is said in its ``metadata``:

* ``json``: False for a field that exists only in the CSV (default True);
* ``omit_if_none``: the JSON key is left out when the value is None (else written as ``null``);
* ``csv``: False for a field that exists only in the JSON; a :class:`Spread` for a field that
  becomes several columns; by default one column named like the field.

Field order is column order; a field added at the end (or in a subclass) becomes the last column.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from data.geometry import HEIGHT_NAMES, POINT_COLUMNS

__all__ = [
    "RecordError",
    "Spread",
    "VertebraRecord",
    "FilmRecord",
    "PREDICTION_COLUMNS",
    "VERTEBRA_COLUMNS",
    "error_row",
    "STATUSES",
    "vertebra_rows",
]

RATIO_NAMES = ("anterior_posterior", "middle_posterior")


class RecordError(ValueError):
    """A JSON record that does not follow the schema (unknown or missing keys)."""


@dataclass(frozen=True)
class Spread:
    """A field written as several CSV columns: ``cells(value)`` gives ``{column: cell}``."""

    columns: tuple[str, ...]
    cells: Callable[[Any], dict]
    numeric: bool = True


def _by_key(columns: tuple[str, ...], keys: tuple) -> Spread:
    """Columns holding ``value[key]`` (empty when the value is None)."""
    def cells(value) -> dict:
        return {c: (None if value is None else value[k]) for c, k in zip(columns, keys)}
    return Spread(columns, cells)


def _point_cells(columns, keys):
    def cells(value) -> dict:
        return {c: (None if value is None else value[i][a]) for c, (i, a) in zip(columns, keys)}
    return cells


POINTS = Spread(tuple(POINT_COLUMNS), _point_cells(POINT_COLUMNS, tuple((i, a) for i in range(6) for a in range(2))))


def _decision_cells(decision: dict | None) -> dict:
    if not decision:
        return {"decision": "", "operating_point": ""}
    return {"decision": "1" if decision["fracture"] else "0", "operating_point": decision["operating_point"]}


JSON_ONLY = {"csv": False}
CSV_ONLY = {"json": False}
OPTIONAL = {"csv": False, "omit_if_none": True}


class _Record:
    """The JSON and CSV machinery shared by the two records (fields come from the subclasses)."""

    @classmethod
    def _fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def json_keys(cls) -> list[str]:
        return [f.name for f in cls._fields() if f.metadata.get("json", True)]

    @classmethod
    def csv_columns(cls) -> list[str]:
        columns = []
        for f in cls._fields():
            spec = f.metadata.get("csv", True)
            if isinstance(spec, Spread):
                columns += spec.columns
            elif spec:
                columns.append(f.name)
        return columns

    @classmethod
    def numeric_columns(cls) -> list[str]:
        """The CSV columns a reader parses as numbers (floats and integers, not flags)."""
        hints = typing.get_type_hints(cls)
        columns = []
        for f in cls._fields():
            spec = f.metadata.get("csv", True)
            if isinstance(spec, Spread):
                columns += spec.columns if spec.numeric else []
            elif spec and _is_number(hints[f.name]):
                columns.append(f.name)
        return columns

    def csv_cells(self) -> dict:
        cells = {}
        for f in self._fields():
            spec = f.metadata.get("csv", True)
            value = getattr(self, f.name)
            if isinstance(spec, Spread):
                cells.update(spec.cells(value))
            elif spec:
                cells[f.name] = value
        return cells

    def _json_items(self) -> dict:
        out = {}
        for f in self._fields():
            if not f.metadata.get("json", True):
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = value
        return out

    @classmethod
    def _check_keys(cls, d: dict, what: str) -> None:
        keys = set(cls.json_keys())
        unknown = sorted(set(d) - keys)
        if unknown:
            raise RecordError(f"{what}: unknown key(s) {unknown}")
        required = [f.name for f in cls._fields() if f.metadata.get("json", True)
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise RecordError(f"{what}: missing key(s) {missing}")


def _is_number(hint) -> bool:
    args = typing.get_args(hint) or (hint,)
    return any(a in (int, float) for a in args) and bool not in args


@dataclass(kw_only=True)
class VertebraRecord(_Record):
    """One predicted vertebra (an entry of the film JSON's ``vertebrae``; a ``vertebrae.csv`` row).

    Points and heights are in original-image pixels; see docs/formats.md, "Per-vertebra outputs"."""

    level: str
    level_confidence: float | None
    # the film's: a vertebra's level is as trustworthy as its film's count (set by FilmRecord)
    levels_trusted: bool | None = field(default=None, metadata=CSV_ONLY)
    detection_score: float
    p_fracture: float
    p_acute: float
    genant_grade: int | None  # None: a body named beyond T1-L5 is measured, not graded
    morphology: str | None
    heights: dict[str, float] = field(metadata={"csv": _by_key(tuple(f"height_{h}" for h in HEIGHT_NAMES),
                                                                HEIGHT_NAMES)})
    heights_mm: dict[str, float] | None = field(metadata={"csv": _by_key(
        tuple(f"height_{h}_mm" for h in HEIGHT_NAMES), HEIGHT_NAMES)})
    height_ratios: dict[str, float] = field(metadata={"csv": _by_key(tuple(f"ratio_{r}" for r in RATIO_NAMES),
                                                                      RATIO_NAMES)})
    points: list[list[float]] = field(metadata={"csv": POINTS})
    height_loss: float | None = field(metadata=JSON_ONLY)
    p_acute_given_fracture: float = field(metadata=JSON_ONLY)
    # the crop network's p_fracture before the morphometry combiner (only where one was applied)
    p_fracture_crop: float | None = field(default=None, metadata=OPTIONAL)
    p_fracture_uncalibrated: float | None = field(default=None, metadata=OPTIONAL)

    def to_json_dict(self) -> dict:
        return self._json_items()

    @classmethod
    def from_json_dict(cls, d: dict, levels_trusted: bool | None = None) -> "VertebraRecord":
        cls._check_keys(d, "vertebra record")
        return cls(**d, levels_trusted=levels_trusted)

    @property
    def graded(self) -> bool:
        return self.height_loss is not None


@dataclass(kw_only=True)
class FilmRecord(_Record):
    """One film's predictions: ``<name>.json`` and its ``predictions.csv`` row (docs/formats.md,
    "Inference outputs")."""

    vertebra_type: ClassVar[type] = VertebraRecord

    image: str
    name: str
    p_fracture: float
    p_acute: float
    p_acute_given_fracture: float
    heatmap_peak: list[float] = field(metadata={"csv": _by_key(("heatmap_peak_x", "heatmap_peak_y"), (0, 1))})
    status: str = field(default="ok", metadata=CSV_ONLY)
    error: str = field(default="", metadata=CSV_ONLY)
    # with a calibrated model: the threshold decision (columns ``decision`` 1/0 and ``operating_point``)
    decision: dict | None = field(default=None, metadata={
        "omit_if_none": True, "csv": Spread(("decision", "operating_point"), _decision_cells, numeric=False)})
    p_fracture_image_head: float = field(metadata=JSON_ONLY)
    heatmap_peak_value: float = field(metadata=JSON_ONLY)
    heatmap_peak_head: list[float] = field(metadata=JSON_ONLY)
    heatmap_peak_head_value: float = field(metadata=JSON_ONLY)
    image_size: list[int] = field(metadata=JSON_ONLY)
    pixel_spacing_mm: list[float] | None = field(metadata=JSON_ONLY)
    heatmap: dict = field(metadata=JSON_ONLY)  # npy, png, shape, to_image
    vertebrae: list[VertebraRecord] = field(default_factory=list, metadata=JSON_ONLY)
    level_confidence: float | None = field(default=None, metadata=JSON_ONLY)
    levels_trusted: bool = field(default=False, metadata=JSON_ONLY)
    vertebra_error: str | None = field(default=None, metadata=OPTIONAL)
    checkpoint_id: str | None = field(default=None, metadata=JSON_ONLY)
    model: dict | None = field(default=None, metadata=JSON_ONLY)
    note: str = field(default="Research software trained on synthetic data unless stated otherwise; "
                              "not for clinical use.", metadata=JSON_ONLY)
    p_fracture_uncalibrated: float | None = field(default=None, metadata=OPTIONAL)
    calibration: dict | None = field(default=None, metadata=OPTIONAL)
    dicom: dict | None = field(default=None, metadata=OPTIONAL)  # UIDs and modality, never identifiers
    patient: dict | None = field(default=None, metadata=OPTIONAL)  # only with keep_identifiers
    dicom_outputs: dict | None = field(default=None, metadata=OPTIONAL)
    frames: int | None = field(default=None, metadata=OPTIONAL)  # only for a multi-frame input (the first is read)
    # what the outputs were made from: the input's size, mtime_ns, sha256, format and the run's options
    fingerprint: dict | None = field(default=None, metadata=OPTIONAL)
    warnings: list[str] | None = field(default=None, metadata=OPTIONAL)  # e.g. an implausible pixel spacing ignored

    def __post_init__(self) -> None:
        for v in self.vertebrae:
            v.levels_trusted = self.levels_trusted

    def to_json_dict(self) -> dict:
        out = self._json_items()
        out["vertebrae"] = [v.to_json_dict() for v in self.vertebrae]
        return out

    @classmethod
    def from_json_dict(cls, d: dict) -> "FilmRecord":
        """The record of a written ``<name>.json``; :class:`RecordError` when it does not fit."""
        if not isinstance(d, dict):
            raise RecordError(f"film record: expected a JSON object, got {type(d).__name__}")
        cls._check_keys(d, f"film record {d.get('name', '?')}")
        trusted = bool(d.get("levels_trusted", False))
        vertebrae = [cls.vertebra_type.from_json_dict(v, levels_trusted=trusted) for v in d.get("vertebrae") or []]
        return cls(**{**d, "vertebrae": vertebrae})

    def prediction_row(self) -> dict:
        """Its ``predictions.csv`` row."""
        return self.csv_cells()

    def vertebra_rows(self) -> list[dict]:
        """Its ``vertebrae.csv`` rows: the film's ``image`` and ``name``, then each vertebra's cells."""
        return [{"image": self.image, "name": self.name, **v.csv_cells()} for v in self.vertebrae]

    @classmethod
    def vertebra_columns(cls) -> list[str]:
        return ["image", "name"] + cls.vertebra_type.csv_columns()


def vertebra_rows(image: str, name: str, vertebrae: list[dict], levels_trusted: bool | None) -> list[dict]:
    """``vertebrae.csv`` rows of per-vertebra results given as JSON entries (e.g. straight from
    inference.vertebrae.analyse_film), without a whole film record."""
    return [{"image": image, "name": name, **VertebraRecord.from_json_dict(v, levels_trusted).csv_cells()}
            for v in vertebrae]


STATUSES = ("ok", "error", "refused", "no_spine")  # a predictions.csv row's status (docs/formats.md)


def error_row(image: str, name: str, error: str, status: str = "error") -> dict:
    """The ``predictions.csv`` row of an input without outputs: ``error`` (unreadable, or
    writing failed), ``refused`` (not a spine radiograph) or ``no_spine`` (the model found no
    spine); ``error`` holds the one-line reason."""
    if status not in STATUSES[1:]:
        raise ValueError(f"error_row: status {status!r} is not one of {STATUSES[1:]}")
    return {"image": image, "name": name, "status": status, "error": " ".join(str(error).split())}  # one line


PREDICTION_COLUMNS = FilmRecord.csv_columns()
VERTEBRA_COLUMNS = FilmRecord.vertebra_columns()
