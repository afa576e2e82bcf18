"""Evaluation of inference outputs against a labelled manifest.

Everything here reads the formats of ``docs/formats.md``: the manifest CSV, ``vertebrae.csv``
and the outputs of ``infer.py`` (``predictions.csv``, ``<name>.json``, ``<name>_heatmap.png``);
the tables are read by ``data/tables.py``, the one reader with the one set of rules.

Conventions
-----------
* Image paths in the manifest and ``vertebrae.csv`` are resolved against the CSV's folder and
  returned as absolute, normalised strings. Tables are joined on a *key* that also resolves
  symbolic links (``os.path.realpath``), so ``/tmp/x`` and ``/private/tmp/x`` still match.
* Unknown labels (empty ``fracture`` / ``acute``) are NaN. They are left out of every metric
  (never taken as negative) and counted.
* An AUROC is NaN when the evaluated set has only one class (or is empty); ``summarise``
  turns NaN into ``None`` so that its result is JSON-serialisable.

These are research metrics. On the synthetic phantom films they say nothing about clinical
performance.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from data.tables import (absolute_path, load_manifest_table, load_predictions_table, load_vertebrae_table,
                         path_key)

__all__ = [
    "load_manifest_table",
    "load_vertebrae_table",
    "load_predictions_table",
    "join_predictions",
    "image_max_grade",
    "grade_of_images",
    "label_score_arrays",
    "json_ready",
    "truth_text",
    "read_inference_jsons",
    "binary_auroc",
    "calibration_bin_edges",
    "calibration_bins",
    "expected_calibration_error",
    "operating_points",
    "OPERATING_POINTS",
    "TARGET_SENSITIVITY",
    "TARGET_SPECIFICITY",
    "roc_points",
    "auroc_fracture",
    "auroc_acute",
    "auroc_by_grade",
    "pointing_game_table",
    "pointing_game",
    "summarise",
    "plot_roc",
    "plot_by_grade",
    "heatmap_gallery",
]

GRADES = (1, 2, 3)
# the named decision thresholds on p_fracture, shared by calibration and the report
OPERATING_POINTS = ("high_sensitivity", "balanced", "high_specificity")
TARGET_SENSITIVITY = 0.90
TARGET_SPECIFICITY = 0.95
ECE_BINS = 10


def join_predictions(predictions_csv: str | os.PathLike, manifest_csv: str | os.PathLike) -> pd.DataFrame:
    """Predictions with ``status == "ok"`` joined to the manifest on the image path (the files
    read, then :func:`join_tables`)."""
    return join_tables(load_predictions_table(predictions_csv), load_manifest_table(manifest_csv))


def join_tables(pred: pd.DataFrame, man: pd.DataFrame) -> pd.DataFrame:
    """Predictions (:func:`load_predictions_table`) with ``status == "ok"`` joined to a manifest
    (:func:`load_manifest_table`) on the image path.

    The result has the manifest's columns (``image`` as the manifest's absolute path, labels as
    float) and the prediction columns (``name``, ``p_fracture``, ``p_acute``, ...). An image
    predicted twice keeps its first ok row.

    ``df.attrs`` holds the counts: ``n_predictions`` (rows in predictions.csv), ``n_error``
    (status other than ok), ``n_unmatched`` (ok rows whose image is not in the manifest),
    ``n_duplicate`` (repeated ok rows of one image), ``n_manifest``, ``n_missing_prediction``
    (manifest images without an ok prediction; ``n_missing_error_row`` of them have an error
    row, ``n_missing_no_row`` no row at all) and ``n_joined``.
    """
    ok = pred[pred["status"] == "ok"].copy()
    numbers = ok.select_dtypes("float").columns
    ok[numbers] = ok[numbers].replace([np.inf, -np.inf], np.nan)  # an infinite score is no score
    ok["_key"] = ok["image"].map(path_key)
    n_dup = int(ok["_key"].duplicated().sum())
    ok = ok.drop_duplicates("_key", keep="first")
    man = man.copy()
    man["_key"] = man["image"].map(path_key)
    # prediction columns that the manifest also has (other than the path) keep the manifest's values
    ok = ok.rename(columns={"image": "image_prediction"})
    pred_cols = [c for c in ok.columns if c == "_key" or c not in man.columns]
    joined = man.merge(ok[pred_cols], on="_key", how="inner", validate="one_to_one")
    n_unmatched = int((~ok["_key"].isin(man["_key"])).sum())
    status_of = dict(zip(pred.loc[pred["status"] != "ok", "image"].map(path_key), pred.loc[pred["status"] != "ok", "status"]))
    missing = man.loc[~man["_key"].isin(ok["_key"]), "_key"]
    missing_status = missing.map(status_of)
    n_missing_error_row = int(missing_status.notna().sum())
    joined = joined.drop(columns="_key").reset_index(drop=True)
    joined.attrs = {
        "n_predictions": int(len(pred)),
        "n_error": int((pred["status"] != "ok").sum()),
        "n_unmatched": n_unmatched,
        "n_duplicate": n_dup,
        "n_manifest": int(len(man)),
        "n_missing_prediction": int(len(man) - len(joined)),
        "n_missing_error_row": n_missing_error_row,
        "n_missing_no_row": int(len(missing) - n_missing_error_row),
        "n_missing_refused": int((missing_status == "refused").sum()),
        "n_missing_no_spine": int((missing_status == "no_spine").sum()),
        "n_joined": int(len(joined)),
    }
    return joined


# why a manifest image is left out of the fracture metrics, or a prediction row goes unused
LEFT_OUT_REASONS = {
    "error_row": "prediction failed (error row)",
    "refused": "refused: not a readable spine radiograph (status refused)",
    "no_spine": "no spine found (status no_spine)",
    "no_prediction": "not in predictions.csv",
    "non_finite_score": "p_fracture empty, NaN or infinite",
    "missing_label": "fracture label unknown",
    "not_in_manifest": "prediction row not in the manifest",
    "duplicate_prediction": "repeated prediction row of an image",
}


def left_out(df: pd.DataFrame) -> dict[str, int]:
    """What the fracture metrics leave out of a :func:`join_tables` result, by reason (the keys
    of :data:`LEFT_OUT_REASONS`): manifest images whose prediction failed, was refused or found
    no spine, that have none, whose
    ``p_fracture`` is not a finite number, or whose ``fracture`` label is unknown; and
    prediction rows not in the manifest, or repeating an image. The first four and the images
    evaluated add up to the manifest."""
    scored = finite_scores(df["p_fracture"])
    a = df.attrs
    refused, no_spine = int(a.get("n_missing_refused", 0)), int(a.get("n_missing_no_spine", 0))
    return {"error_row": int(a.get("n_missing_error_row", 0)) - refused - no_spine, "refused": refused,
            "no_spine": no_spine, "no_prediction": int(a.get("n_missing_no_row", 0)),
            "non_finite_score": int((~scored).sum()),
            "missing_label": int((scored & df["fracture"].isna().to_numpy()).sum()),
            "not_in_manifest": int(a.get("n_unmatched", 0)), "duplicate_prediction": int(a.get("n_duplicate", 0))}


def left_out_line(counts: dict[str, int]) -> str:
    """:func:`left_out` in a line, naming only the reasons that occurred."""
    parts = [f"{n} {LEFT_OUT_REASONS[k]}" for k, n in counts.items() if n]
    return "left out: " + ("; ".join(parts) if parts else "nothing")


def finite_scores(scores: pd.Series) -> np.ndarray:
    """Which scores are finite numbers (an empty cell is NaN, so not finite)."""
    return np.isfinite(scores.to_numpy(dtype=float))


def image_max_grade(vertebrae_df: pd.DataFrame) -> pd.Series:
    """Highest ``genant_grade`` of each image (float; 0 when no vertebra is fractured).

    Indexed by the absolute image path. Vertebrae with an empty grade are ignored; an image
    whose grades are all empty gets NaN (unknown, not 0).
    """
    grades = vertebrae_df.groupby("image", sort=True)["genant_grade"].max()  # NaN-skipping
    grades.name = "max_grade"
    return grades.astype(float)


# --------------------------------------------------------------------------- AUROC
def label_score_arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if np.isnan(y).any() or np.isnan(s).any():
        raise ValueError("y_true and scores must not contain NaN (leave unknown labels out first)")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must be 0 or 1")
    return y.astype(int), s


def binary_auroc(y_true, scores) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``); NaN when fewer than two
    classes are present. Labels must be 0/1 and nothing may be NaN."""
    y, s = label_score_arrays(y_true, scores)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def roc_points(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve as ``(fpr, tpr, thresholds)`` (scikit-learn's ``roc_curve``, all thresholds
    kept). Three empty arrays when fewer than two classes are present."""
    y, s = label_score_arrays(y_true, scores)
    if len(np.unique(y)) < 2:
        empty = np.array([], dtype=float)
        return empty, empty.copy(), empty.copy()
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def _task_frame(df: pd.DataFrame, task: str, score: str | None = None) -> tuple[pd.DataFrame, str, str]:
    """Rows, label column and score column evaluated for ``task`` ("fracture" or "acute")."""
    if task == "fracture":
        score = score or "p_fracture"
        rows = df[df["fracture"].notna()]
        label = "fracture"
    elif task == "acute":
        score = score or "p_acute"
        rows = df[(df["fracture"] == 1) & df["acute"].notna()]
        label = "acute"
    else:
        raise ValueError(f"unknown task {task!r}: use 'fracture' or 'acute'")
    if score not in rows.columns:
        raise ValueError(f"no column {score!r} in the table")
    rows = rows[finite_scores(rows[score])]
    return rows, label, score


def auroc_fracture(df: pd.DataFrame, score: str = "p_fracture") -> float:
    """AUROC of ``score`` for ``fracture`` 1 vs 0; images with unknown ``fracture`` (NaN) or a
    missing score are left out."""
    rows, label, score = _task_frame(df, "fracture", score)
    return binary_auroc(rows[label], rows[score])


def auroc_acute(df: pd.DataFrame, score: str = "p_acute") -> float:
    """AUROC of ``score`` for acute vs chronic, among images with ``fracture == 1`` and a known
    ``acute`` label."""
    rows, label, score = _task_frame(df, "acute", score)
    return binary_auroc(rows[label], rows[score])


def grade_of_images(df: pd.DataFrame, max_grade: pd.Series) -> pd.Series:
    """``max_grade`` (:func:`image_max_grade`) of each row's image of ``df``, NaN where unknown."""
    by_key = {path_key(k): float(v) for k, v in max_grade.items()}
    return pd.Series([by_key.get(path_key(p), np.nan) for p in df["image"]], index=df.index, dtype=float)


def auroc_by_grade(df: pd.DataFrame, max_grade: pd.Series, score: str = "p_fracture") -> dict[int, dict]:
    """AUROC of ``score`` per Genant grade.

    For each grade g in 1..3 the positives are the images whose highest vertebral grade
    (``max_grade``, from :func:`image_max_grade`) is g, the negatives all images with
    ``fracture == 0`` (an image labelled 0 whose vertebrae say otherwise is left out of the
    negatives). Returns ``{g: {"auroc", "n_pos", "n_neg"}}``.
    """
    grade = grade_of_images(df, max_grade)
    has_score = df[score].notna()
    neg = has_score & (df["fracture"] == 0) & ~(grade > 0)
    out: dict[int, dict] = {}
    for g in GRADES:
        pos = has_score & (grade == g)
        y = np.r_[np.ones(int(pos.sum())), np.zeros(int(neg.sum()))]
        s = np.r_[df.loc[pos, score].to_numpy(float), df.loc[neg, score].to_numpy(float)]
        out[g] = {"auroc": binary_auroc(y, s), "n_pos": int(pos.sum()), "n_neg": int(neg.sum())}
    return out


# --------------------------------------------------------------------------- calibration error
def calibration_bin_edges(n_bins: int = ECE_BINS) -> np.ndarray:
    """The ``n_bins + 1`` edges of the equal-width bins on [0, 1], as torch computes them
    (``torch.linspace``: at some values, 0.6 and 0.7 among them, they differ from numpy's
    ``linspace`` in the last bit, which decides the bin of a probability lying on the edge)."""
    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64).numpy()


def calibration_bins(probs, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin of each probability: ``n_bins`` equal-width bins on [0, 1], lower edge included, as
    torchmetrics' ``BinaryCalibrationError`` bins (``bucketize(p, linspace(0, 1, n_bins + 1),
    right=True) - 1``, with torch's own edges, so that a probability on an edge such as 0.6
    falls where torchmetrics puts it); p = 1.0 falls in an extra bin ``n_bins`` of its own."""
    return np.searchsorted(calibration_bin_edges(n_bins), np.asarray(probs, dtype=float), side="right") - 1


def expected_calibration_error(labels, probs, n_bins: int = ECE_BINS, weights=None):
    """Expected calibration error: equal-width bins (:func:`calibration_bins`), L1, each bin's
    |observed frequency - mean probability| weighted by its share of the samples, i.e.
    ``sum_b |sum_{i in b} w_i (y_i - p_i)| / sum_i w_i``.

    ``labels``: 0, 1 or NaN (unknown: left out, as are non-finite probabilities); ``probs`` are
    clipped to [0, 1]. ``weights``: None (every sample once; the value equals torchmetrics'
    ``BinaryCalibrationError(n_bins, norm="l1")``), one weight per sample (``(n,)``: a sample
    of weight k counts as k copies; returns a float), or a row per resample (``(k, n)``, e.g.
    bootstrap weights; returns ``(k,)``). NaN where the total weight is 0."""
    y = np.asarray(labels, dtype=float).ravel()
    p = np.asarray(probs, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.shape[0]} vs {p.shape[0]}")
    w = np.ones(y.size) if weights is None else np.asarray(weights, dtype=float)
    rows = np.atleast_2d(w)
    if w.ndim not in (1, 2) or rows.shape[1] != y.size:
        raise ValueError(f"weights of shape {w.shape} for {y.size} samples")
    keep = ~np.isnan(y) & np.isfinite(p)
    y, p, rows = y[keep], np.clip(p[keep], 0.0, 1.0), rows[:, keep]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN (unknown)")
    onehot = np.zeros((p.size, n_bins + 1))
    onehot[np.arange(p.size), calibration_bins(p, n_bins)] = 1.0
    gap = (rows * (y - p)) @ onehot
    total = rows.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ece = np.abs(gap).sum(axis=1) / total
    ece[total == 0] = np.nan
    return ece if w.ndim == 2 else float(ece[0])


# --------------------------------------------------------------------------- operating points
def operating_points(labels, probs, sensitivity: float = TARGET_SENSITIVITY,
                     specificity: float = TARGET_SPECIFICITY) -> dict[str, dict]:
    """The named decision thresholds on ``probs`` (an image is called positive when
    ``p >= threshold``; the candidates are the distinct probabilities plus one just above the
    largest):

    * ``high_sensitivity``: the highest threshold whose sensitivity is >= ``sensitivity``;
    * ``balanced``: the threshold maximising Youden's J = sensitivity + specificity - 1 (the
      lowest such threshold on ties);
    * ``high_specificity``: the lowest threshold whose specificity is >= ``specificity``.

    Each is ``{"threshold", "sensitivity", "specificity", "criterion"}`` (``balanced`` adds
    ``youden_j``), measured on the same ``labels``. Unknown labels (NaN) and non-finite
    probabilities are left out; ``ValueError`` without both classes."""
    y = np.asarray(labels, dtype=float).ravel()
    p = np.asarray(probs, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.shape[0]} vs {p.shape[0]}")
    keep = ~np.isnan(y) & np.isfinite(p)
    y, p = y[keep], p[keep]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN (unknown)")
    if not ((y == 1).any() and (y == 0).any()):
        raise ValueError("operating points need labelled images of both classes")
    candidates = np.unique(np.append(p, np.nextafter(float(p.max()), np.inf)))  # ascending
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    sens = (len(pos) - np.searchsorted(pos, candidates, side="left")) / len(pos)
    spec = np.searchsorted(neg, candidates, side="left") / len(neg)

    def point(i: int, criterion: str) -> dict:
        return {"threshold": float(candidates[i]), "sensitivity": float(sens[i]),
                "specificity": float(spec[i]), "criterion": criterion}

    ok = np.flatnonzero(sens >= sensitivity - 1e-12)
    high_sens = point(int(ok.max()), f"highest threshold with sensitivity >= {sensitivity:g}")
    j = sens + spec - 1.0
    balanced = point(int(np.flatnonzero(j >= j.max() - 1e-12).min()), "maximum Youden J (sensitivity + specificity - 1)")
    balanced["youden_j"] = float(j.max())
    ok = np.flatnonzero(spec >= specificity - 1e-12)
    high_spec = point(int(ok.min()), f"lowest threshold with specificity >= {specificity:g}")
    return {"high_sensitivity": high_sens, "balanced": balanced, "high_specificity": high_spec}


# --------------------------------------------------------------------------- pointing game
def read_inference_jsons(infer_dir: str | os.PathLike | None) -> list[dict]:
    """The ok per-image JSONs of an ``infer.py`` folder, each with ``_json`` (its file) and
    ``_image`` (the absolute image path). Other JSON files and error records are skipped."""
    if infer_dir is None or not Path(infer_dir).is_dir():
        return []
    records = []
    for path in sorted(Path(infer_dir).glob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or not rec.get("image") or rec.get("status", "ok") != "ok":
            continue
        rec = dict(rec, _json=str(path), _image=absolute_path(rec["image"], path.parent))
        records.append(rec)
    return records


def _read_prediction_jsons(predictions_json_dir: str | os.PathLike | None, peak_key: str = "heatmap_peak",
                           records: list[dict] | None = None) -> list[dict]:
    """Records with a finite peak (JSON key ``peak_key``), for the pointing game; from
    ``records`` (:func:`read_inference_jsons`) when given, else read from the folder."""
    peaks = []
    for rec in (read_inference_jsons(predictions_json_dir) if records is None else records):
        peak = rec.get(peak_key)
        if not isinstance(peak, (list, tuple)) or len(peak) != 2:
            continue
        try:
            x, y = float(peak[0]), float(peak[1])
        except (TypeError, ValueError):
            continue
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        peaks.append({"json": rec["_json"], "image": rec["_image"],
                      "name": rec.get("name", Path(rec["_json"]).stem), "x": x, "y": y})
    return peaks


def pointing_game_table(predictions_json_dir: str | os.PathLike | None, vertebrae_df: pd.DataFrame,
                        peak_key: str = "heatmap_peak", records: list[dict] | None = None) -> pd.DataFrame:
    """One row per fractured image (any vertebra with ``genant_grade > 0``) that has an ok
    per-image JSON in ``predictions_json_dir``: ``image``, ``name``, ``peak_x``, ``peak_y``,
    ``hit`` (peak inside the box of any fractured vertebra, edges included), ``levels``
    (the fractured levels) and ``hit_level``. ``records``: the folder's JSONs already read
    (:func:`read_inference_jsons`), so that they are not read again."""
    fractured = vertebrae_df[vertebrae_df["genant_grade"] > 0]
    boxes: dict[str, list[tuple]] = {}
    for row in fractured.itertuples(index=False):
        boxes.setdefault(path_key(row.image), []).append(
            (getattr(row, "level", ""), row.x_min, row.y_min, row.x_max, row.y_max))
    rows, seen = [], set()
    for rec in _read_prediction_jsons(predictions_json_dir, peak_key, records):
        key = path_key(rec["image"])
        if key not in boxes or key in seen:
            continue
        seen.add(key)
        hit_level = None
        for level, x0, y0, x1, y1 in boxes[key]:
            if x0 <= rec["x"] <= x1 and y0 <= rec["y"] <= y1:
                hit_level = level
                break
        rows.append({"image": rec["image"], "name": rec["name"], "peak_x": rec["x"], "peak_y": rec["y"],
                     "hit": hit_level is not None, "hit_level": hit_level,
                     "levels": ",".join(str(b[0]) for b in boxes[key])})
    cols = ["image", "name", "peak_x", "peak_y", "hit", "hit_level", "levels"]
    return pd.DataFrame(rows, columns=cols)


def pointing_game(predictions_json_dir: str | os.PathLike | None, vertebrae_df: pd.DataFrame,
                  peak_key: str = "heatmap_peak", records: list[dict] | None = None) -> dict:
    """Pointing game: share of fractured images whose heatmap peak lies in a fractured
    vertebra's box. Returns ``{"hits", "n", "score"}`` (score NaN when n is 0).
    ``peak_key``: ``heatmap_peak`` (the written fracture map's, dense head and vertebrae) or
    ``heatmap_peak_head`` (the dense head's alone). See :func:`pointing_game_table` for the
    per-image rows."""
    table = pointing_game_table(predictions_json_dir, vertebrae_df, peak_key, records)
    n = int(len(table))
    hits = int(table["hit"].sum()) if n else 0
    return {"hits": hits, "n": n, "score": hits / n if n else float("nan")}


# --------------------------------------------------------------------------- summary
def json_ready(obj: Any) -> Any:
    """JSON-friendly copy: numpy scalars -> Python, NaN/inf -> None, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def summarise(predictions_csv: str | os.PathLike, manifest_csv: str | os.PathLike,
              vertebrae_csv: str | os.PathLike | None = None,
              infer_dir: str | os.PathLike | None = None) -> dict:
    """All metrics in one JSON-serialisable dict (NaN written as ``None``).

    Keys: ``inputs``; ``counts`` (the join counts of :func:`join_predictions`, plus
    ``n_fracture_pos/neg``, ``n_fracture_unknown`` = images left out of the fracture AUROC
    for an unknown label, ``n_acute``, ``n_chronic``, ``n_acute_unknown`` = fractured images
    left out of the acute AUROC for an unknown label); ``auroc_fracture``; ``auroc_acute``;
    ``auroc_acute_given_fracture`` (when that column exists); ``by_grade`` and
    ``pointing_game`` (``None`` without ``vertebrae_csv``, resp. ``infer_dir``), and
    ``pointing_game_head`` (the dense head's peak alone) when the JSONs carry it.
    """
    inputs = {"predictions": str(predictions_csv), "manifest": str(manifest_csv),
              "vertebrae": str(vertebrae_csv) if vertebrae_csv else None,
              "infer_dir": str(infer_dir) if infer_dir else None}
    df = join_predictions(predictions_csv, manifest_csv)
    vert = load_vertebrae_table(vertebrae_csv, manifest_csv) if vertebrae_csv is not None else None
    records = read_inference_jsons(infer_dir) if infer_dir is not None else None
    return summarise_tables(df, vert, records, inputs)


def summarise_tables(df: pd.DataFrame, vert: pd.DataFrame | None = None, records: list[dict] | None = None,
                     inputs: dict | None = None) -> dict:
    """:func:`summarise` of tables already read: ``df`` from :func:`join_tables`, ``vert`` from
    :func:`load_vertebrae_table` (None: no ``by_grade`` / pointing game), ``records`` from
    :func:`read_inference_jsons` (None: no inference folder, no pointing game); ``inputs`` is
    written as it is."""
    counts = dict(df.attrs)
    counts.update({
        "n_fracture_pos": int((df["fracture"] == 1).sum()),
        "n_fracture_neg": int((df["fracture"] == 0).sum()),
        "n_fracture_unknown": int(df["fracture"].isna().sum()),
        "n_acute": int(((df["fracture"] == 1) & (df["acute"] == 1)).sum()),
        "n_chronic": int(((df["fracture"] == 1) & (df["acute"] == 0)).sum()),
        "n_acute_unknown": int(((df["fracture"] == 1) & df["acute"].isna()).sum()),
        "n_missing_score": int(df["p_fracture"].isna().sum()),
    })
    out: dict[str, Any] = {
        "inputs": dict(inputs or {}),
        "counts": counts,
        "left_out": left_out(df),
        "auroc_fracture": auroc_fracture(df),
        "auroc_acute": auroc_acute(df) if "p_acute" in df.columns else float("nan"),
    }
    if "p_acute_given_fracture" in df.columns:
        out["auroc_acute_given_fracture"] = auroc_acute(df, score="p_acute_given_fracture")
    out["by_grade"] = None
    out["pointing_game"] = None
    if vert is not None:
        out["by_grade"] = auroc_by_grade(df, image_max_grade(vert))
        if records is not None:
            out["pointing_game"] = pointing_game(None, vert, records=records)
            head = pointing_game(None, vert, peak_key="heatmap_peak_head", records=records)
            if head["n"]:
                out["pointing_game_head"] = head
    return json_ready(out)


# --------------------------------------------------------------------------- plots
_TASK_LABELS = {"fracture": "fracture vs none", "acute": "acute vs chronic"}


def plot_roc(ax, df: pd.DataFrame, tasks: Sequence[str] = ("fracture", "acute")):
    """Draw the ROC curve of each task ("fracture": ``p_fracture``; "acute": ``p_acute`` among
    fractured images) on ``ax``, with AUROC and counts in the legend. Returns ``ax``."""
    for task in tasks:
        rows, label, score = _task_frame(df, task)
        y = rows[label].to_numpy(float)
        fpr, tpr, _ = roc_points(y, rows[score].to_numpy(float))
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if len(fpr) == 0:
            ax.plot([], [], label=f"{_TASK_LABELS[task]}: n/a (pos {n_pos}, neg {n_neg})")
            continue
        auc = binary_auroc(y, rows[score].to_numpy(float))
        ax.plot(fpr, tpr, drawstyle="default", lw=2,
                label=f"{_TASK_LABELS[task]}: AUROC {auc:.3f} (pos {n_pos}, neg {n_neg})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize="small")
    return ax


def plot_by_grade(ax, by_grade: dict):
    """Bar chart of AUROC per Genant grade (from :func:`auroc_by_grade`, or the ``by_grade``
    of :func:`summarise`, whose keys are strings and NaN ``None``). Returns ``ax``."""
    grades = sorted(by_grade, key=lambda k: int(k))
    vals = []
    for g in grades:
        v = by_grade[g].get("auroc")
        vals.append(float("nan") if v is None else float(v))
    x = np.arange(len(grades))
    ax.bar(x, np.nan_to_num(vals, nan=0.0), color="tab:blue")
    for xi, g, v in zip(x, grades, vals):
        txt = "n/a" if math.isnan(v) else f"{v:.3f}"
        ax.text(xi, (0 if math.isnan(v) else v) + 0.02, f"{txt}\npos {by_grade[g]['n_pos']} / neg {by_grade[g]['n_neg']}",
                ha="center", va="bottom", fontsize="small")
    ax.axhline(0.5, ls="--", c="grey", lw=1)
    ax.set_xticks(x)
    ax.set_xticklabels([f"grade {int(g)}" for g in grades])
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("AUROC (vs fracture = 0)")
    return ax


def truth_text(row) -> str:
    """The label of a joined row in words: normal, fracture (acute / chronic / acuity unknown), unknown."""
    if pd.isna(row["fracture"]):
        return "unknown"
    if row["fracture"] == 0:
        return "normal"
    acute = row.get("acute", np.nan)
    return "fracture" + (" (acuity unknown)" if pd.isna(acute) else (" (acute)" if acute == 1 else " (chronic)"))


def heatmap_gallery(infer_dir: str | os.PathLike, df: pd.DataFrame, n: int = 8):
    """Figure with the ``<name>_heatmap.png`` overlays of the ``n // 2`` highest-scoring
    fractured images and the ``n - n // 2`` highest-scoring normal images (the likeliest false
    positives), titled with ``p_fracture`` and the truth. Returns a matplotlib ``Figure``
    (not registered with pyplot: show it with ``display(fig)`` in a notebook)."""
    from matplotlib.figure import Figure
    import matplotlib.image as mpimg

    infer_dir = Path(infer_dir)
    scored = df[df["p_fracture"].notna()]
    frac = scored[scored["fracture"] == 1].sort_values("p_fracture", ascending=False).head(n // 2)
    norm = scored[scored["fracture"] == 0].sort_values("p_fracture", ascending=False).head(n - n // 2)
    chosen = pd.concat([frac, norm])
    if chosen.empty:
        fig = Figure(figsize=(4, 2))
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no labelled images to show", ha="center", va="center")
        ax.axis("off")
        return fig
    ncols = min(4, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (_, row) in zip(axes, chosen.iterrows()):
        png = infer_dir / f"{row['name']}_heatmap.png"
        if png.is_file():
            ax.imshow(mpimg.imread(png), cmap="gray")
        else:
            ax.text(0.5, 0.5, f"no overlay\n{png.name}", ha="center", va="center", fontsize="small")
        ax.set_title(f"{row['name']}\np_fracture {row['p_fracture']:.3f} | truth: {truth_text(row)}",
                     fontsize="small")
        ax.axis("off")
    for ax in axes[len(chosen):]:
        ax.axis("off")
    return fig
