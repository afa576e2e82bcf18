"""Full evaluation report: metrics with patient-level bootstrap CIs, operating points,
calibration, per-level / per-grade AUROCs, error gallery; ``metrics.json`` and ``report.html``.

:func:`evaluate` computes everything into one JSON-serialisable dict (NaN written as
``None``); :func:`write_report` writes ``metrics.json``, the PNG plots and a self-contained
``report.html`` (plots and overlays embedded as base64). ``evaluate.py`` is the command line.

Methods (also written into the report)
--------------------------------------
* **Bootstrap**: ``n_boot`` resamples of *patients* (``patient_id`` of the manifest) with
  replacement, every image of a drawn patient taken (see :mod:`evaluation.bootstrap`); 95%
  percentile intervals. The same resamples serve every metric. Thresholds of the operating
  points are chosen once on the full set and kept fixed in the resamples, so their intervals
  do not include the uncertainty of choosing the threshold.
* **Operating points** (an image is called positive when ``p_fracture >= threshold``; the
  candidate thresholds are the distinct scores, plus one just above the highest):
  ``high_sensitivity`` = the highest threshold whose sensitivity is >= 0.90; ``balanced`` = the
  threshold with the largest Youden J (sensitivity + specificity - 1; ties: the lowest, as in
  ``calibration.fit``);
  ``high_specificity`` = the lowest threshold whose specificity is >= 0.95.
* **Calibration**: expected calibration error with 10 equal-width bins (torchmetrics'
  ``BinaryCalibrationError``, L1 norm) and its bootstrap interval from the same binning
  (:func:`evaluation.bootstrap.weighted_ece`); Brier score (scikit-learn).
* **Unknown labels** are left out of each metric and counted (``n_unknown_left_out``).

These are research metrics. On synthetic phantom films they say nothing about clinical
performance.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, cohen_kappa_score, confusion_matrix, roc_curve

from evaluation import bootstrap as B
from evaluation import metrics as M
from evaluation import vertebrae as V

__all__ = [
    "SCHEMA_VERSION",
    "OPERATING_POINTS",
    "evaluate",
    "choose_operating_points",
    "operating_point_metrics",
    "calibration_summary",
    "expected_calibration_error",
    "auroc_by_level",
    "grade_confusion",
    "vertebrae_section",
    "stored_operating_point",
    "error_cases",
    "plot_roc_pr",
    "plot_reliability",
    "plot_confusions",
    "plot_by_level",
    "plot_grade_confusion",
    "plot_vertebrae",
    "error_gallery",
    "write_report",
    "render_html",
]

SCHEMA_VERSION = 2
OPERATING_POINTS = {
    "high_sensitivity": "highest threshold with sensitivity >= 0.90",
    "balanced": "largest Youden J (sensitivity + specificity - 1)",
    "high_specificity": "lowest threshold with specificity >= 0.95",
}
TARGET_SENSITIVITY = 0.90
TARGET_SPECIFICITY = 0.95
_LEVEL_ORDER = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 14)] + [f"L{i}" for i in range(1, 7)] + ["S1"]


# --------------------------------------------------------------------------- small helpers
def _w1(n: int) -> np.ndarray:
    return np.ones((1, n))


def _metric_with_ci(point: float, draws: np.ndarray) -> dict:
    return B.summarise_draws(point, draws)


def _read_jsons(infer_dir: str | os.PathLike | None) -> list[dict]:
    """Per-image JSON records of an inference folder, with ``_key`` for joining on the image."""
    return [dict(rec, _key=M.path_key(rec["_image"])) for rec in M.read_inference_jsons(infer_dir)]


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


def _fracture_rows(df: pd.DataFrame, score: str = "p_fracture") -> tuple[np.ndarray, int]:
    has = df[score].notna().to_numpy()
    known = df["fracture"].notna().to_numpy()
    return has & known, int((has & ~known).sum())


def _acute_rows(df: pd.DataFrame, score: str) -> tuple[np.ndarray, int]:
    frac = (df["fracture"] == 1).to_numpy() & df[score].notna().to_numpy()
    known = df["acute"].notna().to_numpy()
    return frac & known, int((frac & ~known).sum())


# --------------------------------------------------------------------------- operating points
def choose_operating_points(y, s) -> dict[str, dict]:
    """Thresholds of the named operating points (see the module docstring) chosen on ``y``,
    ``s``. Returns ``{name: {"threshold", "criterion", "achieved"}}``; ``{}`` when one class is
    missing. Thresholds come from scikit-learn's ``roc_curve`` (its leading ``inf`` replaced by
    the next float above the highest score)."""
    y, s = M.label_score_arrays(y, s)
    if len(np.unique(y)) < 2:
        return {}
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    thr = thr.astype(float).copy()
    thr[~np.isfinite(thr)] = np.nextafter(float(np.max(s)), np.inf)
    spec = 1.0 - fpr
    out = {}
    ok = np.flatnonzero(tpr >= TARGET_SENSITIVITY - 1e-12)  # thr descends: first index is the highest
    out["high_sensitivity"] = {"threshold": float(thr[ok[0]]), "achieved": bool(ok.size)}
    j = tpr - fpr
    best = np.flatnonzero(j >= j.max() - 1e-12)[-1]  # ties: the lowest threshold (as calibration.fit)
    out["balanced"] = {"threshold": float(thr[best]), "achieved": True, "youden_j": float(j[best])}
    ok = np.flatnonzero(spec >= TARGET_SPECIFICITY - 1e-12)  # lowest threshold: last index
    out["high_specificity"] = {"threshold": float(thr[ok[-1]]), "achieved": bool(ok.size)}
    for name in out:
        out[name]["criterion"] = OPERATING_POINTS[name]
    return out


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
              for k in map(M.path_key, df["image"])]
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
def expected_calibration_error(y, p, n_bins: int = 10) -> float:
    """ECE (L1, ``n_bins`` equal-width bins) with torchmetrics' ``BinaryCalibrationError``;
    NaN for an empty set."""
    y, p = M.label_score_arrays(y, p)
    if y.size == 0:
        return float("nan")
    import torch
    from torchmetrics.classification import BinaryCalibrationError

    metric = BinaryCalibrationError(n_bins=n_bins, norm="l1")
    return float(metric(torch.as_tensor(np.clip(p, 0.0, 1.0), dtype=torch.float64),
                        torch.as_tensor(y, dtype=torch.long)))


def calibration_summary(y, p, W: np.ndarray | None = None, n_bins: int = 10,
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
    out["ece"] = _rename(_metric_with_ci(ece, B.weighted_ece(y, p, W, n_bins) if y.size else np.zeros(0)), "ece")
    # what sampling alone gives: perfectly calibrated probabilities p would still score this
    out["ece_if_calibrated"] = B.ece_if_calibrated(p, n_bins)
    out["brier"] = float(brier_score_loss(y.astype(int), p, labels=[0, 1])) if y.size else float("nan")
    bins = B.ece_bins(p, n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
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
        out.setdefault(M.path_key(image), set()).add(str(level).strip())
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
    grade = M.grade_lookup(df, M.image_max_grade(vert))
    neg = _negatives(df, grade)
    levels_of = _fractured_levels(vert)
    keys = [M.path_key(p) for p in df["image"]]
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
    grade = M.grade_lookup(df, M.image_max_grade(vert))
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
            truth[(M.path_key(image), str(level).strip())] = int(g)
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


def vertebrae_section(predictions_csv, vert: pd.DataFrame | None, infer_dir, records: list[dict] | None = None,
                      vertebrae_csv=None, min_level_fractured: int = 5) -> dict | None:
    """The per-vertebra evaluation (:func:`evaluation.vertebrae.summarise_vertebrae`) of the
    ``vertebrae.csv`` that ``infer.py`` wrote into ``infer_dir``, against the truth ``vert``.

    ``None`` (the report then has no per-vertebra section) when there is no truth table or the
    inference folder has no ``vertebrae.csv``. Only images with an ok row in ``predictions_csv``
    count; ``levels_trusted`` comes from the per-image JSONs (``records``)."""
    if vert is None or not infer_dir:
        return None
    predicted = Path(infer_dir) / "vertebrae.csv"
    if not predicted.is_file():
        return None
    inputs = {"predicted": str(predicted), "truth": str(vertebrae_csv) if vertebrae_csv else None}
    missing = [c for c in V.POINT_COLUMNS if c not in vert.columns]
    if missing:
        return {"available": False, "inputs": inputs,
                "note": f"not available (the truth vertebrae.csv has no point columns {missing[:3]}...)"}
    pred = V.load_predicted_vertebrae(predicted)
    table = M.load_predictions_table(predictions_csv)
    ok_images = table.loc[table["status"] == "ok", "image"].tolist()
    trusted = {r["_key"]: r["levels_trusted"] for r in (records or []) if isinstance(r.get("levels_trusted"), bool)}
    summary = V.summarise_vertebrae(pred, vert, evaluated_images=ok_images, levels_trusted=trusted or None,
                                    min_level_fractured=min_level_fractured)
    return {"available": True, "inputs": inputs, **summary}


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
    """Every metric of the report in one JSON-serialisable dict (NaN as ``None``).

    Top-level keys: ``schema_version``, ``inputs``, ``counts``, ``bootstrap``,
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
    base = M.summarise(predictions_csv, manifest_csv, vertebrae_csv, infer_dir)
    df = M.join_predictions(predictions_csv, manifest_csv)
    patients = df["patient_id"].astype(str).tolist()
    W = B.patient_bootstrap_weights(patients, n_boot, seed)
    vert = M.load_vertebrae_table(vertebrae_csv, manifest_csv) if vertebrae_csv else None
    records = _read_jsons(infer_dir)

    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "inputs": base["inputs"], "counts": base["counts"]}
    out["inputs"]["n_boot"] = int(n_boot)
    out["bootstrap"] = {"unit": "patient", "n_boot": int(n_boot), "seed": seed, "level": 0.95,
                        "interval": "percentile", "n_patients": int(len(set(patients))), "n_images": int(len(df))}
    for k in ("auroc_fracture", "auroc_acute", "auroc_acute_given_fracture"):
        if k in base:
            out[k] = base[k]

    # ROC / PR
    roc, pr = {}, {}
    sel, n_unknown = _fracture_rows(df)
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
        for name, info in choose_operating_points(y, s).items():
            ops[name] = {"criterion": info["criterion"], "achieved": info["achieved"],
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
    per_vertebra = vertebrae_section(predictions_csv, vert, infer_dir, records, vertebrae_csv, min_level_positives)
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
    keys = [M.path_key(p) for p in df["image"]]
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
    out["gallery"] = error_cases(df, infer_dir, gallery_n, bal)
    out["gallery"]["threshold"] = bal
    out["notes"] = [
        "Research metrics. On synthetic phantom films they say nothing about clinical performance.",
        f"95% intervals: percentile bootstrap over patients ({n_boot} resamples, seed {seed}); every image of a "
        "drawn patient is taken. Operating-point thresholds are chosen once on the full set and held fixed.",
        "Images with an unknown label are left out of each metric and counted (n_unknown_left_out).",
        "ECE: 10 equal-width bins, L1 (torchmetrics BinaryCalibrationError).",
        "p_acute is P(acute fracture present); among fractured images the matching probability is "
        "p_acute_given_fracture; p_acute (= p_fracture x p_acute_given_fracture) is expected to under-estimate "
        "the acute share there.",
    ]
    return M.clean_for_json(out)


# --------------------------------------------------------------------------- plots
def _figure(w, h):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _roc_tasks(df: pd.DataFrame) -> tuple[str, ...]:
    return ("fracture", "acute") if "p_acute" in df.columns else ("fracture",)


def plot_roc_pr(df: pd.DataFrame, result: dict | None = None, fig=None):
    """ROC (fracture and acute-vs-chronic) and precision-recall (fracture) curves, with the
    bootstrap bands of ``result`` (from :func:`evaluate`) when given. Returns the Figure."""
    from sklearn.metrics import precision_recall_curve

    fig = fig or _figure(12, 4.4)
    ax_roc, ax_pr = fig.subplots(1, 2)
    M.plot_roc(ax_roc, df, tasks=_roc_tasks(df))
    roc = (result or {}).get("roc") or {}
    for task, color in (("fracture", "C0"), ("acute", "C1")):
        band = (roc.get(task) or {}).get("band")
        if band:
            lo = np.array([np.nan if v is None else v for v in band["tpr_low"]], dtype=float)
            hi = np.array([np.nan if v is None else v for v in band["tpr_high"]], dtype=float)
            ax_roc.fill_between(band["fpr"], lo, hi, color=color, alpha=0.15, lw=0)
    ax_roc.set_title("ROC (band: patient bootstrap 95%)" if roc else "ROC")
    sel, _ = _fracture_rows(df)
    y, s = df["fracture"].to_numpy(float)[sel], df["p_fracture"].to_numpy(float)[sel]
    if y.size and 0 < y.sum() < y.size:
        prec, rec, _ = precision_recall_curve(y.astype(int), s)
        pr = ((result or {}).get("pr") or {}).get("fracture") or {}
        ap = pr.get("average_precision")
        label = "fracture" + (f": AP {ap:.3f}" if ap is not None else "")
        if pr.get("ci_low") is not None:
            label += f" [{pr['ci_low']:.3f}, {pr['ci_high']:.3f}]"
        ax_pr.step(rec, prec, where="post", lw=2, label=label, color="C0")
        band = pr.get("band")
        if band:
            lo = np.array([np.nan if v is None else v for v in band["precision_low"]], dtype=float)
            hi = np.array([np.nan if v is None else v for v in band["precision_high"]], dtype=float)
            ax_pr.fill_between(band["recall"], lo, hi, color="C0", alpha=0.15, lw=0)
        ax_pr.axhline(y.mean(), ls="--", c="grey", lw=1, label=f"prevalence {y.mean():.2f}")
        ax_pr.legend(loc="lower left", fontsize="small")
    else:
        ax_pr.text(0.5, 0.5, "n/a (needs both classes)", ha="center", va="center")
    ax_pr.set_xlim(0, 1)
    ax_pr.set_ylim(0, 1.02)
    ax_pr.set_xlabel("recall (sensitivity)")
    ax_pr.set_ylabel("precision (PPV)")
    ax_pr.set_title("precision-recall, fracture vs none")
    return fig


def _panel_row(fig, n: int, width: float, height: float, empty_text: str):
    """A row of ``n`` panels (one blank panel saying ``empty_text`` when ``n`` is 0)."""
    fig = fig or _figure(width * max(1, n), height)
    axes = np.atleast_1d(fig.subplots(1, max(1, n)))
    if n == 0:
        axes[0].text(0.5, 0.5, empty_text, ha="center", va="center")
        axes[0].axis("off")
    return fig, axes


def plot_reliability(calibration: dict, fig=None):
    """Reliability diagrams (observed frequency against mean predicted probability per bin,
    marker area ~ bin count) of each entry of ``result["calibration"]``. Returns the Figure."""
    names = [k for k, v in calibration.items() if v and v.get("n")]
    fig, axes = _panel_row(fig, len(names), 4.2, 4.2, "no labelled images")
    if not names:
        return fig
    for ax, name in zip(axes, names):
        c = calibration[name]
        rel = c["reliability"]
        x = [r["mean_predicted"] for r in rel]
        yv = [r["observed"] for r in rel]
        n = np.array([r["n"] for r in rel], dtype=float)
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.plot(x, yv, "-", c="C0", lw=1)
        ax.scatter(x, yv, s=20 + 180 * n / max(1.0, n.max()), c="C0", zorder=3)
        e = c["ece"]
        ttl = f"{name}\nECE {_f(e.get('ece'))} [{_f(e.get('ci_low'))}, {_f(e.get('ci_high'))}], n={c['n']}"
        ax.set_title(ttl, fontsize="small")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_aspect("equal")
    return fig


def plot_confusions(result: dict, fig=None):
    """2 x 2 confusion matrices at each operating point of ``result``. Returns the Figure."""
    ops = dict(result.get("operating_points") or {})
    st = result.get("stored_operating_point") or {}
    if st.get("available"):
        ops["stored"] = st
    fig, axes = _panel_row(fig, len(ops), 3.2, 3.4, "no operating points\n(needs both classes)")
    if not ops:
        return fig
    for ax, (name, op) in zip(axes, ops.items()):
        c = op["confusion"]
        mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(1, mat.max()))
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, str(v), ha="center", va="center", color="black" if v < mat.max() * 0.6 else "white")
        ax.set_xticks([0, 1], ["pred normal", "pred fracture"], fontsize="small")
        ax.set_yticks([0, 1], ["normal", "fracture"], fontsize="small")
        thr = op.get("threshold")
        ax.set_title(f"{name}" + (f"\nthreshold {thr:.3f}" if isinstance(thr, (int, float)) else ""), fontsize="small")
    return fig


def plot_by_level(by_level: dict, fig=None):
    """AUROC per level with CI whiskers; n/a levels drawn empty. Returns the Figure."""
    levels = list(by_level)
    fig = fig or _figure(max(5, 0.45 * len(levels) + 2), 3.6)
    ax = fig.subplots()
    if not levels:
        ax.text(0.5, 0.5, "no levels", ha="center", va="center")
        ax.axis("off")
        return fig
    x = np.arange(len(levels))
    vals = np.array([np.nan if by_level[l]["auroc"] is None else by_level[l]["auroc"] for l in levels], dtype=float)
    lo = np.array([np.nan if by_level[l].get("ci_low") is None else by_level[l]["ci_low"] for l in levels], dtype=float)
    hi = np.array([np.nan if by_level[l].get("ci_high") is None else by_level[l]["ci_high"] for l in levels], dtype=float)
    ax.bar(x, np.nan_to_num(vals), color="tab:blue")
    ok = np.isfinite(vals) & np.isfinite(lo)
    ax.errorbar(x[ok], vals[ok], yerr=[vals[ok] - lo[ok], hi[ok] - vals[ok]], fmt="none", ecolor="k", capsize=3)
    for xi, l, v in zip(x, levels, vals):
        ax.text(xi, (0 if np.isnan(v) else v) + 0.03, ("n/a" if np.isnan(v) else f"{v:.2f}") + f"\n{by_level[l]['n_pos']}",
                ha="center", va="bottom", fontsize="x-small")
    ax.axhline(0.5, ls="--", c="grey", lw=1)
    ax.set_xticks(x, levels, fontsize="small")
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("AUROC (vs normal images)")
    ax.set_title("AUROC by fractured level (number: positives)", fontsize="small")
    return fig


def plot_grade_confusion(gc: dict, fig=None):
    """Genant grade confusion matrix (truth x predicted). Returns the Figure."""
    fig = fig or _figure(4, 3.6)
    ax = fig.subplots()
    if not gc.get("available"):
        ax.text(0.5, 0.5, gc.get("note", "not available"), ha="center", va="center", wrap=True)
        ax.axis("off")
        return fig
    mat = np.array(gc["matrix"])
    ax.imshow(mat, cmap="Blues")
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, str(v), ha="center", va="center", fontsize="small")
    ax.set_xticks(range(4), [f"{g}" for g in range(4)])
    ax.set_yticks(range(4), [f"{g}" for g in range(4)])
    ax.set_xlabel("predicted Genant grade")
    ax.set_ylabel("true Genant grade")
    ax.set_title(f"per-vertebra grades ({gc['n_matched']} matched)", fontsize="small")
    return fig


def plot_vertebrae(section: dict, fig=None):
    """Point-error histogram and Genant grade confusion of the per-vertebra section of
    :func:`evaluate` (``result["vertebrae"]``). Returns the Figure."""
    fig = fig or _figure(9, 3.8)
    ax_err, ax_grade = fig.subplots(1, 2)
    V.plot_point_errors(ax_err, section.get("point_error") or {})
    V.plot_grade_confusion(ax_grade, section.get("grade_agreement") or {})
    return fig


def error_gallery(gallery: dict, fig=None):
    """Overlays of the worst false negatives (top row) and false positives (bottom row) of
    ``result["gallery"]``. Returns the Figure."""
    import matplotlib.image as mpimg

    fn, fp = gallery.get("false_negatives", []), gallery.get("false_positives", [])
    ncols = max(1, len(fn), len(fp))
    fig = fig or _figure(2.8 * ncols, 6.4)
    axes = fig.subplots(2, ncols, squeeze=False)
    for r, (title, items) in enumerate((("worst false negative", fn), ("worst false positive", fp))):
        for c in range(ncols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(items):
                if c == 0:
                    ax.text(0.5, 0.5, f"no {title.split(' ', 1)[1]} candidates", ha="center", va="center", fontsize="small")
                continue
            it = items[c]
            if it["overlay"]:
                ax.imshow(mpimg.imread(it["overlay"]), cmap="gray")
            else:
                ax.text(0.5, 0.5, "no overlay", ha="center", va="center", fontsize="small")
            flag = {True: " (error at balanced thr.)", False: " (correct at balanced thr.)"}.get(it.get("error"), "")
            ax.set_title(f"{title}\n{it['name']}{flag}\np_fracture {it['p_fracture']:.3f} | {it['truth']}",
                         fontsize="x-small")
    return fig


# --------------------------------------------------------------------------- writing
def _f(v, digits: int = 3) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_f(x, digits) for x in v)
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _ci(d: dict | None, key: str) -> str:
    if not d or d.get(key) is None:
        return "n/a"
    if d.get("ci_low") is None:
        return _f(d[key])
    return f"{_f(d[key])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}]"


def _save(fig, path: Path) -> Path:
    from data.io_utils import atomic_write_with

    # the format from the name, since the temporary file's name does not end in .png
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write_with(path, lambda fh: fig.savefig(fh, dpi=100, format=fmt))


def write_report(result: dict, df: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``metrics.json``, the PNG plots and ``report.html`` into ``out_dir``. ``df`` is
    :func:`evaluation.metrics.join_predictions` of the same inputs. Returns the paths."""
    from data.io_utils import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": atomic_write_json(out / "metrics.json", result)}
    # the plot of the earlier evaluate.py (fracture and acute ROC, by-grade bars)
    fig = _figure(10, 4.5)
    axes = fig.subplots(1, 2)
    M.plot_roc(axes[0], df, tasks=_roc_tasks(df))
    if result.get("by_grade"):
        M.plot_by_grade(axes[1], {int(k): v for k, v in result["by_grade"].items()})
    else:
        axes[1].axis("off")
    paths["roc"] = _save(fig, out / "roc.png")
    paths["roc_pr"] = _save(plot_roc_pr(df, result), out / "roc_pr.png")
    paths["confusion"] = _save(plot_confusions(result), out / "confusion.png")
    paths["reliability"] = _save(plot_reliability(result["calibration"]), out / "reliability.png")
    if result.get("by_level"):
        paths["by_level"] = _save(plot_by_level(result["by_level"]), out / "by_level.png")
    if (result.get("grade_confusion") or {}).get("available"):
        paths["grade_confusion"] = _save(plot_grade_confusion(result["grade_confusion"]), out / "grade_confusion.png")
    if (result.get("vertebrae") or {}).get("available"):
        paths["vertebrae"] = _save(plot_vertebrae(result["vertebrae"]), out / "vertebrae.png")
    paths["gallery"] = _save(error_gallery(result["gallery"]), out / "gallery.png")
    paths["html"] = atomic_write_text(out / "report.html", render_html(result, {k: v for k, v in paths.items()}))
    return paths


def _img(path: Path | str | None, alt: str, width: str | None = None) -> str:
    if not path or not Path(path).is_file():
        return f"<p><em>{html.escape(alt)}: image not available</em></p>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    style = f' style="max-width:{width}"' if width else ' style="max-width:100%"'
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{style}>'


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.8em 1em;border-radius:4px}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;width:220px;font-size:small}
.gallery img{width:220px}code{background:#f4f4f4;padding:0 3px}
"""


def _vertebrae_html(v: dict, image: Path | None) -> list[str]:
    """The per-vertebra section of the report (see :func:`vertebrae_section`)."""
    parts = ["<h2>Per-vertebra localisation and grading</h2>"]
    if not v.get("available"):
        parts.append(f"<p>{html.escape(v.get('note', 'not available'))}</p>")
        return parts
    c, d, pe = v["counts"], v["detection"], v["point_error"]
    la, af, aa, ga = v["level_accuracy"], v["auroc_fracture"], v["auroc_acute"], v["grade_agreement"]
    parts.append(
        "<p>Predicted vertebrae (<code>" + html.escape(str(v["inputs"]["predicted"])) + "</code>) are paired with the "
        "truth one-to-one per image on the distance between body centres (mean of the six points); a pair counts "
        f"only when that distance is below {V.GATE_FRACTION} x the truth vertebra's mean height. A truth vertebra "
        f"that no prediction matched scores {V.UNMATCHED_SCORE} in the per-vertebra AUROCs. "
        f"{c['n_evaluated_images']} image(s) evaluated; <strong>{c['n_truth_images_without_prediction']} truth "
        "image(s) without an ok prediction were left out</strong>; "
        f"{c['n_predicted_images_without_truth']} predicted image(s) without truth vertebrae left out; "
        f"{c['n_truth_without_points']} truth vertebra(e) without usable points left out.</p>")
    rows = [
        ["detection recall", _f(d.get("recall")), f"{d['n_matched']} / {d['n_truth']} truth vertebrae matched"],
        ["detection precision", _f(d.get("precision")),
         f"{d['n_matched']} / {d['n_predicted']} predictions matched ({d['n_false_positive']} false positives)"],
        ["point error, median (90th pct), pixels", f"{_f(pe['pixels'].get('median'), 2)} ({_f(pe['pixels'].get('p90'), 2)})",
         f"{pe['n_points']} points of {pe['n_vertebrae']} matched vertebrae"],
        ["point error, median (90th pct), % of mean height",
         f"{_f(pe['percent_height'].get('median'), 2)} ({_f(pe['percent_height'].get('p90'), 2)})", ""],
        ["level accuracy", _f(la.get("accuracy")),
         f"{la['n_correct']} / {la['n']} matched; {la['n_truth_level_unknown']} with no truth level left out"],
    ]
    for flag, acc in (la.get("by_levels_trusted") or {}).items():
        if isinstance(acc, dict):
            rows.append([f"level accuracy, levels_trusted {flag}", _f(acc.get("accuracy")), f"{acc['n_correct']} / {acc['n']}"])
    rows += [
        ["AUROC fracture (grade > 0 vs 0, p_fracture)", _f(af.get("auroc")),
         f"pos {af['n_pos']}, neg {af['n_neg']}; {af['n_unmatched_scored_zero']} unmatched scored 0; "
         f"{af['n_unknown_left_out']} unknown grade left out"],
        ["AUROC acute vs chronic (fractured, p_acute)", _f(aa.get("auroc")),
         f"acute {aa['n_pos']}, chronic {aa['n_neg']}; {aa['n_unmatched_scored_zero']} unmatched scored 0; "
         f"{aa['n_unknown_left_out']} unknown acuity left out"],
        ["Genant grade, quadratic-weighted kappa", _f(ga.get("kappa_quadratic")),
         f"{ga['n']} matched vertebrae with a known grade; exact agreement {_f(ga.get('exact_agreement'))}"],
    ]
    parts.append(_table(["metric", "value", "counts"], rows))
    mat = ga["matrix"]
    parts.append("<h3>Genant grade confusion (matched vertebrae)</h3>")
    parts.append(_table(["true \\ predicted", "0", "1", "2", "3"], [[g] + mat[g] for g in range(4)]))
    parts.append("<h3>Per-vertebra AUROC by truth grade and by level</h3>")
    parts.append(_table(["subset", "AUROC", "positives", "negatives", "note"],
                        [[f"grade {g} vs grade 0", _f(r.get("auroc")), r["n_pos"], r["n_neg"], ""]
                         for g, r in v["auroc_by_grade"].items()]
                        + [[f"level {lv} (fractured vs grade 0 at {lv})", _f(r.get("auroc")), r["n_pos"], r["n_neg"],
                            r.get("note", "")] for lv, r in v["auroc_by_level"].items()]))
    parts.append(_img(image, "per-vertebra point error and grade confusion"))
    return parts


def render_html(result: dict, images: dict[str, Path] | None = None) -> str:
    """The self-contained HTML page of a :func:`evaluate` result (plots from ``images``,
    embedded as base64)."""
    images = images or {}
    c = result.get("counts", {})
    roc, pr, cal = result.get("roc", {}), result.get("pr", {}), result.get("calibration", {})
    bs = result.get("bootstrap", {})
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>VCF evaluation report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>Vertebral compression fracture detection: evaluation report</h1>",
             "<p class='warn'><strong>Research code, not a medical device.</strong> Unless the inputs below are "
             "your own labelled radiographs, these numbers come from <strong>synthetic phantom films</strong>: "
             "they are <strong>not clinical performance</strong> and must not be quoted as such.</p>"]
    inputs = result.get("inputs", {})
    parts.append("<h2>Inputs</h2>" + _table(["input", "value"], [[k, "" if v is None else v] for k, v in inputs.items()]))

    # counts
    n_unk = c.get("n_fracture_unknown", 0)
    n_acute_unk = c.get("n_acute_unknown", 0)
    parts.append("<h2>Counts</h2>")
    parts.append(f"<p><strong>{n_unk} image(s) with an unknown fracture label</strong> were left out of the fracture "
                 f"metrics, and <strong>{n_acute_unk} fractured image(s) with an unknown acute label</strong> were left "
                 f"out of the acuity metrics (never taken as negative). {c.get('n_error', 0)} prediction(s) failed, "
                 f"{c.get('n_missing_prediction', 0)} manifest image(s) have no usable prediction, "
                 f"{c.get('n_unmatched', 0)} prediction(s) are not in the manifest.</p>")
    parts.append(_table(["count", "value"], [[k, v] for k, v in c.items()]))

    # headline
    rows = []
    names = {"fracture": "fracture vs none (p_fracture)", "acute": "acute vs chronic (p_acute, fractured images)",
             "acute_given_fracture": "acute vs chronic (p_acute_given_fracture)"}
    for task, r in roc.items():
        rows.append([f"AUROC {names.get(task, task)}", _ci(r, "auroc"), r["n_pos"], r["n_neg"], r["n_unknown_left_out"]])
        p = pr.get(task, {})
        rows.append([f"average precision {names.get(task, task)}", _ci(p, "average_precision"), p.get("n_pos"),
                     p.get("n_neg"), p.get("n_unknown_left_out")])
    parts.append("<h2>Discrimination</h2>")
    parts.append(f"<p>95% intervals: percentile bootstrap over <strong>patients</strong> ({bs.get('n_boot')} resamples, "
                 f"seed {bs.get('seed')}, {bs.get('n_patients')} patients, {bs.get('n_images')} images).</p>")
    parts.append(_table(["metric", "value [95% CI]", "positives", "negatives", "left out (unknown label)"], rows))
    parts.append(_img(images.get("roc_pr"), "ROC and precision-recall curves"))

    # by grade / level
    parts.append("<h2>AUROC by Genant grade and by level</h2>")
    if result.get("by_grade"):
        parts.append("<p>Positives: images whose worst vertebra has the grade (or a fractured vertebra at the level); "
                     "negatives: all images labelled normal.</p>")
        parts.append(_table(["grade", "AUROC [95% CI]", "positives", "negatives"],
                            [[g, _ci(r, "auroc"), r["n_pos"], r["n_neg"]] for g, r in result["by_grade"].items()]))
    else:
        parts.append("<p>not available (no vertebrae.csv)</p>")
    if result.get("by_level"):
        parts.append(_table(["level", "AUROC [95% CI]", "positives", "negatives", "note"],
                            [[l, _ci(r, "auroc"), r["n_pos"], r["n_neg"], r.get("note", "")]
                             for l, r in result["by_level"].items()]))
        parts.append(f"<p>Levels with fewer than {result.get('by_level_min_positives')} positives: n/a.</p>")
        parts.append(_img(images.get("by_level"), "AUROC by level"))

    # operating points
    parts.append("<h2>Operating points (fracture vs none)</h2>")
    ops = dict(result.get("operating_points") or {})
    st = result.get("stored_operating_point") or {}
    if st.get("available"):
        ops["stored (" + (st.get("name") or st.get("source", "")) + ")"] = st
    if ops:
        rows = []
        for name, op in ops.items():
            cf = op["confusion"]
            rows.append([name, op.get("criterion", st.get("source", "")), _f(op.get("threshold")),
                         _ci(op["sensitivity"], "value"), _ci(op["specificity"], "value"), _ci(op["ppv"], "value"),
                         _ci(op["npv"], "value"), f"TP {cf['tp']} FN {cf['fn']} FP {cf['fp']} TN {cf['tn']}"])
        parts.append(_table(["operating point", "criterion", "threshold", "sensitivity", "specificity", "PPV", "NPV",
                             "confusion"], rows))
        parts.append("<p>Thresholds are chosen on this set and held fixed in the bootstrap. "
                     "An image is called positive when p_fracture &gt;= threshold.</p>")
    else:
        parts.append("<p>n/a (needs fractured and normal images)</p>")
    if not st.get("available"):
        parts.append(f"<p>Stored operating point: {html.escape(st.get('note', 'not available'))}</p>")
    else:
        txt = (f"Stored operating point ({st.get('source')}): {st.get('name') or 'unnamed'}, threshold "
               f"{_f(st.get('threshold'))}")
        if "validation_sensitivity" in st or "validation_specificity" in st:
            txt += (f"; at calibration it had sensitivity {_f(st.get('validation_sensitivity'))} and specificity "
                    f"{_f(st.get('validation_specificity'))} on its fitting images")
        txt += f". {st.get('n_without_decision', 0)} labelled image(s) without a stored decision."
        parts.append(f"<p>{html.escape(txt)}</p>")
    parts.append(_img(images.get("confusion"), "confusion matrices"))

    # grade confusion
    parts.append("<h2>Genant grade confusion (per vertebra)</h2>")
    gc = result.get("grade_confusion") or {}
    if (result.get("vertebrae") or {}).get("available"):
        # matching by level would fold level errors into the grade table: the position-matched one is shown
        parts.append("<p>See <em>Per-vertebra localisation and grading</em> below: vertebrae there are matched "
                     "by position, so a wrong level name does not count as a grading error. "
                     "(<code>metrics.json</code> keeps the table matched by image and level under "
                     "<code>grade_confusion</code>.)</p>")
    elif gc.get("available"):
        mat = gc["matrix"]
        parts.append(_table(["true \\ predicted", "0", "1", "2", "3"], [[g] + mat[g] for g in range(4)]))
        parts.append(f"<p>{gc['n_matched']} vertebrae matched by image and level; accuracy {_f(gc.get('accuracy'))}, "
                     f"quadratic-weighted kappa {_f(gc.get('kappa_quadratic'))}; {gc['n_predicted_unmatched']} predicted "
                     f"vertebrae without truth, {gc['n_truth_not_predicted']} labelled vertebrae not predicted.</p>")
    else:
        parts.append(f"<p>{html.escape(gc.get('note', 'not available (no per-vertebra predictions)'))}</p>")

    if "vertebrae" in result:
        parts.extend(_vertebrae_html(result["vertebrae"], images.get("vertebrae")))

    # calibration
    parts.append("<h2>Calibration</h2>")
    rows = [[k, v.get("population", ""), _ci(v.get("ece"), "ece"),
             f"{_f((v.get('ece_if_calibrated') or {}).get('mean'))} / {_f((v.get('ece_if_calibrated') or {}).get('p95'))}",
             _f(v.get("brier")), v.get("n"), v.get("n_unknown_left_out")] for k, v in cal.items()]
    parts.append(_table(["probability", "population", "ECE [95% CI]", "ECE if calibrated (mean / 95th pct)", "Brier",
                         "n", "left out (unknown label)"], rows))
    parts.append("<p>ECE: 10 equal-width bins, L1 (torchmetrics BinaryCalibrationError). Binned ECE is above 0 on any "
                 "finite set: 'ECE if calibrated' is what these same probabilities would score if they were perfectly "
                 "calibrated (outcomes drawn from them 1000 times); an ECE above its 95th percentile is miscalibration, "
                 "not chance. p_acute is P(acute fracture present); among fractured images the matching probability is "
                 "p_acute_given_fracture.</p>")
    ic = result.get("inference_calibration")
    if ic:
        parts.append("<p>Inference applied the checkpoint's calibration: "
                     + html.escape(json.dumps(ic)) + ". p_fracture_uncalibrated (when listed above) is the "
                     "network's output before it.</p>")
    else:
        parts.append("<p>The per-image JSONs record no calibration applied at inference.</p>")
    parts.append(_img(images.get("reliability"), "reliability diagrams"))

    # pointing game
    parts.append("<h2>Heatmap pointing game</h2>")
    pg = result.get("pointing_game")
    if pg:
        parts.append(f"<p>{pg['hits']} / {pg['n']} fractured images have the fracture map's peak inside a "
                     f"fractured vertebra's box (score {_f(pg.get('score'))}).</p>")
        head = result.get("pointing_game_head")
        if head:
            parts.append(f"<p>The dense heatmap head's own peak: {head['hits']} / {head['n']} "
                         f"(score {_f(head.get('score'))}). The map's peak is the likeliest fractured vertebra's "
                         "centre where its p_fracture tops the dense head (docs/formats.md).</p>")
    else:
        parts.append("<p>not available (needs vertebrae.csv and the per-image JSONs)</p>")

    # gallery
    parts.append("<h2>Worst errors</h2>")
    gal = result.get("gallery") or {}
    if gal.get("threshold") is not None:
        parts.append(f"<p>Balanced threshold: {_f(gal['threshold'])}.</p>")
    for title, key in (("Worst false negatives (fractured, lowest p_fracture)", "false_negatives"),
                       ("Worst false positives (normal, highest p_fracture)", "false_positives")):
        parts.append(f"<h3>{title}</h3><div class='gallery'>")
        items = gal.get(key) or []
        if not items:
            parts.append("<p>none</p>")
        for it in items:
            flag = {True: "; misclassified at the balanced threshold", False: "; correct at the balanced threshold"}
            cap = html.escape(f"{it['name']} (patient {it['patient_id']}): p_fracture {it['p_fracture']:.3f}, "
                              f"{it['truth']}{flag.get(it.get('error'), '')}")
            parts.append(f"<figure>{_img(it.get('overlay'), it['name'])}<figcaption>{cap}</figcaption></figure>")
        parts.append("</div>")

    parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.get("notes", [])) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
