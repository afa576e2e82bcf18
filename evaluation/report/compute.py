"""Computing the evaluation report: every metric in one JSON-serialisable dict, written as
``metrics.json`` (NaN as ``None``). Nothing here draws: plots are :mod:`evaluation.report.plots`,
the page :mod:`evaluation.report.page`.

The inputs (predictions.csv, the manifest, the truth vertebrae.csv, the inference folder's JSONs
and vertebrae.csv) are read once, by :func:`load_inputs`, and passed down.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, cohen_kappa_score, confusion_matrix

from data.tables import path_key
from evaluation import bootstrap as B
from evaluation import metrics as M
from evaluation import vertebrae as V
from evaluation.metrics import (ECE_BINS, TARGET_SENSITIVITY, TARGET_SPECIFICITY, calibration_bin_edges, calibration_bins,
                                expected_calibration_error, operating_points)

__all__ = [
    "SCHEMA_VERSION",
    "ReportInputs",
    "load_inputs",
    "evaluate",
    "evaluate_inputs",
    "operating_point_metrics",
    "calibration_summary",
    "auroc_by_level",
    "grade_confusion",
    "vertebrae_section",
    "stored_operating_point",
    "error_cases",
    "fracture_rows",
]

SCHEMA_VERSION = 2
_LEVEL_ORDER = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 14)] + [f"L{i}" for i in range(1, 7)] + ["S1"]


# --------------------------------------------------------------------------- the inputs, read once
@dataclass
class ReportInputs:
    """The inputs of one report, each file read once (:func:`load_inputs`)."""

    predictions_csv: str
    manifest_csv: str
    vertebrae_csv: str | None
    infer_dir: str | None
    predictions: pd.DataFrame  # every row of predictions.csv (evaluation.metrics.load_predictions_table)
    joined: pd.DataFrame  # ok predictions joined to the manifest (evaluation.metrics.join_tables)
    truth_vertebrae: pd.DataFrame | None  # the truth vertebrae.csv
    records: list[dict] | None  # the inference folder's per-image JSONs, with ``_key``; None without a folder
    predicted_vertebrae: pd.DataFrame | None  # the inference folder's vertebrae.csv, when it can be evaluated

    def described(self) -> dict:
        """The input paths, as ``metrics.json`` records them."""
        return {"predictions": str(self.predictions_csv), "manifest": str(self.manifest_csv),
                "vertebrae": str(self.vertebrae_csv) if self.vertebrae_csv else None,
                "infer_dir": str(self.infer_dir) if self.infer_dir else None}


def load_inputs(predictions_csv, manifest_csv, vertebrae_csv=None, infer_dir=None) -> ReportInputs:
    """Read the report's inputs once. ``vertebrae_csv`` (truth) and ``infer_dir`` may be None.
    The inference folder's ``vertebrae.csv`` is read only where it will be evaluated (truth
    vertebrae with their points given)."""
    predictions = M.load_predictions_table(predictions_csv)
    joined = M.join_tables(predictions, M.load_manifest_table(manifest_csv))
    truth = M.load_vertebrae_table(vertebrae_csv, manifest_csv) if vertebrae_csv else None
    records = None
    if infer_dir is not None:
        records = [dict(rec, _key=path_key(rec["_image"])) for rec in M.read_inference_jsons(infer_dir)]
    predicted = None
    if truth is not None and infer_dir and all(c in truth.columns for c in V.POINT_COLUMNS):
        path = Path(infer_dir) / "vertebrae.csv"
        predicted = V.load_predicted_vertebrae(path) if path.is_file() else None
    return ReportInputs(str(predictions_csv), str(manifest_csv), vertebrae_csv, infer_dir, predictions, joined,
                        truth, records, predicted)


# --------------------------------------------------------------------------- small helpers
def _w1(n: int) -> np.ndarray:
    return np.ones((1, n))


def _metric_with_ci(point: float, draws: np.ndarray) -> dict:
    return B.summarise_draws(point, draws)


def _as_float(v) -> float:
    try:
        return float(v) if v is not None and not isinstance(v, bool) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------- discrimination
def _discrimination(y: np.ndarray, s: np.ndarray, W: np.ndarray, n_unknown: int) -> tuple[dict, dict]:
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    counts = {"n_pos": n_pos, "n_neg": n_neg, "n_unknown_left_out": int(n_unknown)}
    W1 = _w1(y.size)
    auc = B.weighted_auroc(y, s, W1)[0] if y.size else float("nan")
    roc = {**_rename(_metric_with_ci(auc, B.weighted_auroc(y, s, W) if y.size else np.zeros(0)), "auroc"), **counts}
    ap = B.weighted_average_precision(y, s, W1)[0] if n_pos else float("nan")
    pr = {**_rename(_metric_with_ci(ap, B.weighted_average_precision(y, s, W) if y.size else np.zeros(0)),
                    "average_precision"),
          "prevalence": n_pos / (n_pos + n_neg) if n_pos + n_neg else float("nan"), **counts}
    if n_pos and n_neg:
        band = B.roc_band(y, s, W)
        roc["band"] = {"fpr": band["fpr"].tolist(), "tpr_low": band["lo"].tolist(), "tpr_high": band["hi"].tolist()}
        pband = B.pr_band(y, s, W)
        pr["band"] = {"recall": pband["recall"].tolist(), "precision_low": pband["lo"].tolist(),
                      "precision_high": pband["hi"].tolist()}
    return roc, pr


def _rename(d: dict, name: str) -> dict:
    d = dict(d)
    d[name] = d.pop("value")
    return {name: d[name], **{k: v for k, v in d.items() if k != name}}


def fracture_rows(df: pd.DataFrame, score: str = "p_fracture") -> tuple[np.ndarray, int]:
    """Rows with a score and a known fracture label, and how many scored rows have an unknown one."""
    has = df[score].notna().to_numpy()
    known = df["fracture"].notna().to_numpy()
    return has & known, int((has & ~known).sum())


def _acute_rows(df: pd.DataFrame, score: str) -> tuple[np.ndarray, int]:
    frac = (df["fracture"] == 1).to_numpy() & df[score].notna().to_numpy()
    known = df["acute"].notna().to_numpy()
    return frac & known, int((frac & ~known).sum())


# --------------------------------------------------------------------------- operating points
def operating_point_metrics(y, s, W, threshold: float) -> dict:
    """Confusion counts and sensitivity, specificity, PPV, NPV (each with its bootstrap CI over
    the weight rows ``W``) at a fixed ``threshold`` (positive when ``s >= threshold``)."""
    y = np.asarray(y, dtype=float)
    s = np.asarray(s, dtype=float)
    c1 = B.weighted_confusion(y, s, _w1(y.size), threshold)
    point = B.rates_from_confusion(c1)
    draws = B.rates_from_confusion(B.weighted_confusion(y, s, W, threshold))
    out = {"threshold": float(threshold), "confusion": {k: int(round(float(v[0]))) for k, v in c1.items()}}
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        out[k] = _metric_with_ci(float(point[k][0]), draws[k])
    return out


def _parse_decision(value) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        return v if v in (0.0, 1.0) else float("nan")
    text = str(value).strip().lower()
    if text in {"1", "1.0", "true", "yes", "positive", "pos", "fracture", "fractured", "abnormal"}:
        return 1.0
    if text in {"0", "0.0", "false", "no", "negative", "neg", "normal", "no fracture", "none"}:
        return 0.0
    return float("nan")


def _json_decision(rec: dict) -> tuple[float, str | None, float | None, dict]:
    """(decision 1/0/NaN, operating point name, threshold, extra) of one per-image JSON.

    The format of ``infer.py`` with a calibrated checkpoint (docs/formats.md) is ``decision``:
    ``{operating_point, threshold, fracture: true/false, validation_sensitivity,
    validation_specificity}``. Also read: ``decision`` as a plain yes/no value beside an
    ``operating_point`` that is a dict (``name``, ``threshold``), a number (the threshold) or a
    name (with a sibling ``threshold``)."""
    dec = rec.get("decision")
    op = rec.get("operating_point")
    name, thr, extra = None, None, {}
    if isinstance(dec, dict):
        name, thr = dec.get("operating_point", dec.get("name")), dec.get("threshold")
        extra = {k: dec[k] for k in ("validation_sensitivity", "validation_specificity") if k in dec}
        d = _parse_decision(dec.get("fracture", dec.get("decision")))
    else:
        d = _parse_decision(dec)
    if isinstance(op, dict):
        name = op.get("name", name)
        thr = op.get("threshold", thr)
        if not math.isfinite(d):
            d = _parse_decision(op.get("decision"))
    elif isinstance(op, (int, float)) and not isinstance(op, bool):
        thr = op if thr is None else thr
    elif isinstance(op, str) and op:
        name = name or op
        thr = rec.get("threshold") if thr is None else thr
    try:
        thr = float(thr) if thr is not None else None
    except (TypeError, ValueError):
        thr = None
    if thr is not None and not math.isfinite(thr):
        thr = None
    return d, (str(name) if name not in (None, "") else None), thr, extra


def stored_operating_point(df: pd.DataFrame, records: list[dict] | None = None) -> dict | None:
    """The operating point that inference stored, if any (docs/formats.md: with a calibrated
    checkpoint, predictions.csv has ``decision`` 1/0 and ``operating_point`` columns and each
    JSON a ``decision`` dict). Decisions come from the ``decision`` column when it has any,
    else from the JSONs (without an explicit yes/no there, ``p_fracture >= threshold``); the
    name and threshold from the ``operating_point`` column and the JSONs. Returns ``{"source",
    "name", "threshold", "decision"}`` (plus the stored ``validation_sensitivity`` /
    ``validation_specificity`` when all images agree), ``decision`` a float array aligned with
    ``df`` (1/0/NaN), or ``None`` when nothing was stored."""
    by_key = {r["_key"]: r for r in (records or [])}
    parsed = [(_json_decision(by_key[k]) if k in by_key else (float("nan"), None, None, {}))
              for k in map(path_key, df["image"])]
    names = {p[1] for p in parsed if p[1]}
    thresholds = {p[2] for p in parsed if p[2] is not None}
    extras = [p[3] for p in parsed if p[3]]
    dec = None
    source = None
    if "decision" in df.columns:
        col = np.array([_parse_decision(v) for v in df["decision"]], dtype=float)
        if np.isfinite(col).any():
            dec, source = col, "predictions.csv `decision` column"
            if "operating_point" in df.columns:
                names |= {str(v).strip() for v in df["operating_point"] if str(v).strip()}
    if dec is None:
        if not names and not thresholds and not any(math.isfinite(p[0]) for p in parsed):
            return None
        p_f = df["p_fracture"].to_numpy(float)
        dec = np.array([p[0] if math.isfinite(p[0]) else
                        (float(pf >= p[2]) if p[2] is not None and math.isfinite(pf) else np.nan)
                        for p, pf in zip(parsed, p_f)], dtype=float)
        source = "per-image JSON `decision` / `operating_point`"
        if not np.isfinite(dec).any():
            return None
    out = {"source": source, "name": ", ".join(sorted(names)) or None,
           "threshold": (next(iter(thresholds)) if len(thresholds) == 1 else (sorted(thresholds) or None)),
           "decision": dec}
    if extras and all(e == extras[0] for e in extras):
        out.update(extras[0])
    return out


def _decision_metrics(y: np.ndarray, dec: np.ndarray, W: np.ndarray) -> dict:
    # a decision is a threshold of 0.5 on the 0/1 decision itself
    return operating_point_metrics(y, dec, W, 0.5)


# --------------------------------------------------------------------------- calibration
def calibration_summary(y, p, W: np.ndarray | None = None, n_bins: int = ECE_BINS,
                        patients=None, n_boot: int = 1000, seed: int | None = 0) -> dict:
    """ECE (with bootstrap CI), Brier score and the reliability table of probabilities ``p``
    for outcomes ``y``. Pass resampling weights ``W`` (``(n_boot, n)``) or ``patients`` (then
    ``n_boot`` patient resamples are drawn with ``seed``)."""
    y = np.asarray(y, dtype=float)
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    if W is None:
        W = B.patient_bootstrap_weights(patients if patients is not None else range(y.size), n_boot, seed)
    out: dict[str, Any] = {"n": int(y.size), "n_bins": n_bins}
    ece = expected_calibration_error(y, p, n_bins) if y.size else float("nan")
    draws = expected_calibration_error(y, p, n_bins, weights=W) if y.size else np.zeros(0)
    out["ece"] = _rename(_metric_with_ci(ece, draws), "ece")
    # what sampling alone gives: perfectly calibrated probabilities p would still score this
    out["ece_if_calibrated"] = B.ece_if_calibrated(p, n_bins)
    out["brier"] = float(brier_score_loss(y.astype(int), p, labels=[0, 1])) if y.size else float("nan")
    bins = calibration_bins(p, n_bins)
    edges = calibration_bin_edges(n_bins)
    rel = []
    for b in range(n_bins + 1):
        sel = bins == b
        if not sel.any():
            continue
        lo = float(edges[b]) if b < n_bins else 1.0
        hi = float(edges[b + 1]) if b < n_bins else 1.0
        rel.append({"bin_low": lo, "bin_high": hi, "n": int(sel.sum()),
                    "mean_predicted": float(p[sel].mean()), "observed": float(y[sel].mean())})
    out["reliability"] = rel
    return out


# --------------------------------------------------------------------------- by level / grade
def _level_sort_key(level: str):
    level = str(level)
    return (_LEVEL_ORDER.index(level), "") if level in _LEVEL_ORDER else (len(_LEVEL_ORDER), level)


def _fractured_levels(vert: pd.DataFrame) -> dict[str, set]:
    rows = vert[(vert["genant_grade"] > 0)]
    out: dict[str, set] = {}
    if "level" not in rows.columns:
        return out
    for image, level in zip(rows["image"], rows["level"]):
        out.setdefault(path_key(image), set()).add(str(level).strip())
    return out


def _negatives(df: pd.DataFrame, grade: pd.Series) -> np.ndarray:
    return (df["p_fracture"].notna() & (df["fracture"] == 0) & ~(grade > 0)).to_numpy()


def auroc_by_level(df: pd.DataFrame, vert: pd.DataFrame, W: np.ndarray | None = None,
                   min_positives: int = 5) -> dict[str, dict]:
    """AUROC of ``p_fracture`` per vertebral level: positives are the images with a fractured
    vertebra (``genant_grade > 0``) at the level, negatives all images labelled normal (as in
    :func:`evaluation.metrics.auroc_by_grade`). Levels with fewer than ``min_positives``
    positives get ``auroc`` NaN and a ``note``. Returns ``{level: {"auroc", "ci_low",
    "ci_high", "n_pos", "n_neg", ...}}`` in spinal order."""
    grade = M.grade_of_images(df, M.image_max_grade(vert))
    neg = _negatives(df, grade)
    levels_of = _fractured_levels(vert)
    keys = [path_key(p) for p in df["image"]]
    all_levels = sorted({str(v).strip() for v in vert.get("level", pd.Series(dtype=str)) if str(v).strip()},
                        key=_level_sort_key)
    W = _w1(len(df)) if W is None else W
    out = {}
    for level in all_levels:
        pos = np.array([level in levels_of.get(k, ()) for k in keys]) & df["p_fracture"].notna().to_numpy()
        out[level] = _subset_auroc(df, pos, neg, W, min_positives)
    return out


def _subset_auroc(df, pos, neg, W, min_positives: int = 1) -> dict:
    sel = pos | neg
    y = pos[sel].astype(float)
    s = df["p_fracture"].to_numpy(float)[sel]
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos < max(1, min_positives) or n_neg == 0:
        note = f"n/a: {n_pos} positive(s), fewer than {min_positives}" if n_pos < min_positives else "n/a: no negatives"
        return {"auroc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_valid": 0,
                "n_pos": n_pos, "n_neg": n_neg, "note": note}
    r = _rename(_metric_with_ci(B.weighted_auroc(y, s, _w1(y.size))[0], B.weighted_auroc(y, s, W[:, sel])), "auroc")
    return {**r, "n_pos": n_pos, "n_neg": n_neg}


def _by_grade_with_ci(df: pd.DataFrame, vert: pd.DataFrame, W: np.ndarray) -> dict:
    grade = M.grade_of_images(df, M.image_max_grade(vert))
    neg = _negatives(df, grade)
    has = df["p_fracture"].notna().to_numpy()
    return {str(g): _subset_auroc(df, has & (grade == g).to_numpy(), neg, W, 1) for g in M.GRADES}


def grade_confusion(vert: pd.DataFrame, records: list[dict]) -> dict:
    """Genant grade confusion matrix (truth rows 0-3 x predicted columns 0-3) of the vertebrae
    predicted in the per-image JSONs (``vertebrae``: list of ``{"level", "genant_grade"}``),
    matched to ``vertebrae.csv`` by image and level. ``{"available": False, "note"}`` when no
    JSON has per-vertebra predictions."""
    preds = {}
    n_images = 0
    for rec in records:
        verts = rec.get("vertebrae")
        if not isinstance(verts, list) or not verts:
            continue
        used = False
        for v in verts:
            if not isinstance(v, dict) or "level" not in v or v.get("genant_grade") is None:
                continue
            try:
                g = float(v["genant_grade"])
            except (TypeError, ValueError):
                continue
            if not math.isfinite(g):
                continue
            preds[(rec["_key"], str(v["level"]).strip())] = int(min(3, max(0, round(g))))
            used = True
        n_images += used
    if not preds:
        return {"available": False, "note": "not available (no per-vertebra predictions)"}
    truth = {}
    for image, level, g in zip(vert["image"], vert.get("level", pd.Series([""] * len(vert))), vert["genant_grade"]):
        if pd.notna(g):
            truth[(path_key(image), str(level).strip())] = int(g)
    matched = [(truth[k], p) for k, p in preds.items() if k in truth]
    pred_images = {k[0] for k in preds}
    missed = [k for k in truth if k[0] in pred_images and k not in preds]
    out = {"available": True, "labels": [0, 1, 2, 3], "n_images": int(n_images), "n_matched": len(matched),
           "n_predicted_unmatched": int(len(preds) - len(matched)),
           "n_truth_not_predicted": int(len(missed))}
    if matched:
        t, p = np.array(matched).T
        out["matrix"] = confusion_matrix(t, p, labels=[0, 1, 2, 3]).tolist()
        out["accuracy"] = float((t == p).mean())
        out["kappa_quadratic"] = (float(cohen_kappa_score(t, p, labels=[0, 1, 2, 3], weights="quadratic"))
                                  if len(set(t) | set(p)) > 1 else float("nan"))
        fr_t, fr_p = t > 0, p > 0
        out["vertebra_sensitivity"] = float(fr_p[fr_t].mean()) if fr_t.any() else float("nan")
        out["vertebra_specificity"] = float((~fr_p[~fr_t]).mean()) if (~fr_t).any() else float("nan")
    else:
        out["matrix"] = [[0] * 4 for _ in range(4)]
        out["note"] = "no predicted vertebra matched vertebrae.csv (image and level)"
    return out


def vertebrae_section(inputs: ReportInputs, min_level_fractured: int = 5) -> dict | None:
    """The per-vertebra evaluation (:func:`evaluation.vertebrae.summarise_vertebrae`) of the
    ``vertebrae.csv`` that ``infer.py`` wrote into the inference folder, against the truth
    vertebrae.

    ``None`` (the report then has no per-vertebra section) when there is no truth table or the
    inference folder has no ``vertebrae.csv``. Only images with an ok row in predictions.csv
    count; ``levels_trusted`` comes from the per-image JSONs."""
    vert, infer_dir = inputs.truth_vertebrae, inputs.infer_dir
    if vert is None or not infer_dir:
        return None
    predicted = Path(infer_dir) / "vertebrae.csv"
    if not predicted.is_file():
        return None
    described = {"predicted": str(predicted), "truth": str(inputs.vertebrae_csv) if inputs.vertebrae_csv else None}
    missing = [c for c in V.POINT_COLUMNS if c not in vert.columns]
    if missing:
        return {"available": False, "inputs": described,
                "note": f"not available (the truth vertebrae.csv has no point columns {missing[:3]}...)"}
    table = inputs.predictions
    ok_images = table.loc[table["status"] == "ok", "image"].tolist()
    trusted = {r["_key"]: r["levels_trusted"] for r in (inputs.records or [])
               if isinstance(r.get("levels_trusted"), bool)}
    summary = V.summarise_vertebrae(inputs.predicted_vertebrae, vert, evaluated_images=ok_images,
                                    levels_trusted=trusted or None, min_level_fractured=min_level_fractured)
    return {"available": True, "inputs": described, **summary}


# --------------------------------------------------------------------------- gallery
def error_cases(df: pd.DataFrame, infer_dir: str | os.PathLike | None = None, n: int = 4,
                threshold: float | None = None) -> dict:
    """The ``n`` worst false negatives (fractured images with the lowest ``p_fracture``) and
    the ``n`` worst false positives (normal images with the highest), each with ``name``,
    ``image``, ``p_fracture``, ``truth``, ``overlay`` (the ``<name>_heatmap.png`` path, or
    ``None`` when it is not in ``infer_dir``) and, given a ``threshold``, ``error`` (whether the
    image is misclassified at it)."""
    scored = df[df["p_fracture"].notna()]

    def rows(sub):
        out = []
        for _, r in sub.iterrows():
            png = Path(infer_dir) / f"{r['name']}_heatmap.png" if infer_dir else None
            out.append({"name": str(r["name"]), "image": str(r["image"]), "patient_id": str(r["patient_id"]),
                        "p_fracture": float(r["p_fracture"]), "truth": M.truth_text(r),
                        "overlay": str(png) if png is not None and png.is_file() else None,
                        "error": (None if threshold is None else
                                  bool((r["p_fracture"] >= threshold) != (r["fracture"] == 1)))})
        return out

    fn = scored[scored["fracture"] == 1].sort_values(["p_fracture", "name"], ascending=[True, True]).head(n)
    fp = scored[scored["fracture"] == 0].sort_values(["p_fracture", "name"], ascending=[False, True]).head(n)
    return {"false_negatives": rows(fn), "false_positives": rows(fp)}


# --------------------------------------------------------------------------- evaluate
def evaluate(predictions_csv, manifest_csv, vertebrae_csv=None, infer_dir=None, n_boot: int = 1000,
             seed: int | None = 0, min_level_positives: int = 5, gallery_n: int = 4) -> dict:
    """:func:`evaluate_inputs` of the files (read once by :func:`load_inputs`)."""
    return evaluate_inputs(load_inputs(predictions_csv, manifest_csv, vertebrae_csv, infer_dir), n_boot=n_boot,
                           seed=seed, min_level_positives=min_level_positives, gallery_n=gallery_n)


def evaluate_inputs(inputs: ReportInputs, n_boot: int = 1000, seed: int | None = 0, min_level_positives: int = 5,
                    gallery_n: int = 4) -> dict:
    """Every metric of the report in one JSON-serialisable dict (NaN as ``None``).

    Top-level keys: ``schema_version``, ``inputs``, ``counts``, ``left_out``
    (:func:`evaluation.metrics.left_out`: what the fracture metrics leave out, by reason), ``bootstrap``,
    ``auroc_fracture``, ``auroc_acute`` (, ``auroc_acute_given_fracture``) (point values, as in
    :func:`evaluation.metrics.summarise`), ``roc`` and ``pr`` (per task, with CI and counts),
    ``by_grade``, ``by_level``, ``operating_points``, ``stored_operating_point``,
    ``grade_confusion``, ``calibration`` (``p_fracture``, ``p_acute``, ``p_acute_given_fracture``
    and, when the JSONs carry it, ``p_fracture_uncalibrated``), ``inference_calibration`` (the
    JSONs' ``calibration`` record, or ``None``), ``pointing_game`` (and ``pointing_game_head``,
    the dense head's own peak, when the JSONs carry it), ``gallery``, ``notes``; and
    ``vertebrae`` (:func:`vertebrae_section`) only when ``infer_dir`` holds a ``vertebrae.csv``
    and ``vertebrae_csv`` is given.
    """
    df, vert, records = inputs.joined, inputs.truth_vertebrae, inputs.records or []
    base = M.summarise_tables(df, vert, inputs.records, inputs.described())
    patients = df["patient_id"].astype(str).tolist()
    W = B.patient_bootstrap_weights(patients, n_boot, seed)

    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "inputs": base["inputs"], "counts": base["counts"],
                           "left_out": base["left_out"]}
    out["inputs"]["n_boot"] = int(n_boot)
    out["bootstrap"] = {"unit": "patient", "n_boot": int(n_boot), "seed": seed, "level": 0.95,
                        "interval": "percentile", "n_patients": int(len(set(patients))), "n_images": int(len(df))}
    for k in ("auroc_fracture", "auroc_acute", "auroc_acute_given_fracture"):
        if k in base:
            out[k] = base[k]

    # ROC / PR
    roc, pr = {}, {}
    sel, n_unknown = fracture_rows(df)
    y, s = df["fracture"].to_numpy(float)[sel], df["p_fracture"].to_numpy(float)[sel]
    roc["fracture"], pr["fracture"] = _discrimination(y, s, W[:, sel], n_unknown)
    for name, score in (("acute", "p_acute"), ("acute_given_fracture", "p_acute_given_fracture")):
        if score in df.columns:
            asel, an = _acute_rows(df, score)
            roc[name], pr[name] = _discrimination(df["acute"].to_numpy(float)[asel], df[score].to_numpy(float)[asel],
                                                  W[:, asel], an)
    out["roc"], out["pr"] = roc, pr

    # by grade / level
    out["by_grade"] = _by_grade_with_ci(df, vert, W) if vert is not None else None
    out["by_level"] = (auroc_by_level(df, vert, W, min_level_positives) if vert is not None else None)
    out["by_level_min_positives"] = int(min_level_positives)

    # operating points
    ops: dict[str, Any] = {}
    if y.size and len(np.unique(y)) == 2:
        for name, info in operating_points(y, s).items():
            achieved = {"high_sensitivity": info["sensitivity"] >= TARGET_SENSITIVITY - 1e-12,
                        "high_specificity": info["specificity"] >= TARGET_SPECIFICITY - 1e-12}.get(name, True)
            ops[name] = {"criterion": info["criterion"], "achieved": bool(achieved),
                         **operating_point_metrics(y, s, W[:, sel], info["threshold"])}
            if "youden_j" in info:
                ops[name]["youden_j"] = info["youden_j"]
    out["operating_points"] = ops or None
    stored = stored_operating_point(df, records)
    if stored is None:
        out["stored_operating_point"] = {"available": False,
                                         "note": "not available (no `decision` column, no `operating_point` in the JSONs)"}
    else:
        dec = stored.pop("decision")
        dsel = sel & np.isfinite(dec)
        m = _decision_metrics(df["fracture"].to_numpy(float)[dsel], dec[dsel], W[:, dsel])
        m.pop("threshold")
        out["stored_operating_point"] = {"available": True, **stored, "n_without_decision": int((sel & ~np.isfinite(dec)).sum()),
                                         **m}

    # grade confusion
    if vert is None:
        out["grade_confusion"] = {"available": False, "note": "not available (no vertebrae.csv)"}
    else:
        out["grade_confusion"] = grade_confusion(vert, records)
    per_vertebra = vertebrae_section(inputs, min_level_positives)
    if per_vertebra is not None:
        out["vertebrae"] = per_vertebra

    # calibration
    cal = {"p_fracture": {"population": "images with a known fracture label", "n_unknown_left_out": n_unknown,
                          **calibration_summary(y, s, W[:, sel])}}
    for score in ("p_acute", "p_acute_given_fracture"):
        if score in df.columns:
            asel, an = _acute_rows(df, score)
            cal[score] = {"population": "fractured images with a known acute label (outcome: acute)",
                          "n_unknown_left_out": an,
                          **calibration_summary(df["acute"].to_numpy(float)[asel], df[score].to_numpy(float)[asel],
                                                W[:, asel])}
    # probabilities before the checkpoint's calibration, when inference recorded them
    by_key = {r["_key"]: r for r in records}
    keys = [path_key(p) for p in df["image"]]
    unc = np.array([_as_float(by_key.get(k, {}).get("p_fracture_uncalibrated")) for k in keys], dtype=float)
    usel = sel & np.isfinite(unc)
    if usel.any():
        cal["p_fracture_uncalibrated"] = {
            "population": "images with a known fracture label (p_fracture before calibration, from the JSONs)",
            "n_unknown_left_out": n_unknown, **calibration_summary(df["fracture"].to_numpy(float)[usel], unc[usel],
                                                                   W[:, usel])}
    out["calibration"] = cal
    applied = []
    for k in keys:
        c = by_key.get(k, {}).get("calibration")
        if isinstance(c, dict) and c not in applied:
            applied.append(c)
    out["inference_calibration"] = (applied[0] if len(applied) == 1 else applied) or None

    out["pointing_game"] = base["pointing_game"]
    if base.get("pointing_game_head"):
        out["pointing_game_head"] = base["pointing_game_head"]
    bal = (ops.get("balanced") or {}).get("threshold")
    out["gallery"] = error_cases(df, inputs.infer_dir, gallery_n, bal)
    out["gallery"]["threshold"] = bal
    out["notes"] = [
        "Research metrics. On synthetic phantom films they say nothing about clinical performance.",
        f"95% intervals: percentile bootstrap over patients ({n_boot} resamples, seed {seed}); every image of a "
        "drawn patient is taken. Operating-point thresholds are chosen once on the full set and held fixed.",
        "Images with an unknown label are left out of each metric and counted (n_unknown_left_out).",
        f"ECE: {ECE_BINS} equal-width bins, L1 (evaluation.metrics.expected_calibration_error, as torchmetrics' "
        "BinaryCalibrationError).",
        "p_acute is P(acute fracture present); among fractured images the matching probability is "
        "p_acute_given_fracture; p_acute (= p_fracture x p_acute_given_fracture) is expected to under-estimate "
        "the acute share there.",
    ]
    return M.json_ready(out)
