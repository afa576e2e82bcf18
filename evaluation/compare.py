"""Paired comparison of two score sets on the same images (e.g. two checkpoints on one test set).

* :func:`delong_test`: DeLong's test for two correlated AUROCs (DeLong, DeLong & Clarke-Pearson,
  Biometrics 1988), computed with the fast midrank algorithm of Sun & Xu (IEEE Signal
  Processing Letters 21(11), 2014). It treats images as independent.
* :func:`paired_auroc_test`: patient-level paired bootstrap. Each resample draws patients with
  replacement and evaluates *both* score sets on the same resampled images, so the
  correlation between them is kept and images of one patient stay together.
* :func:`paired_frame`: two ``predictions.csv`` files joined to one manifest, image by image.

Research statistics: on synthetic phantom films they compare models on the phantom task, not
clinical performance.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata

from evaluation import bootstrap as B
from evaluation import metrics as M

__all__ = ["delong_auroc_cov", "delong_test", "paired_auroc_test", "paired_frame", "compare_aurocs"]


def _labels_scores(y, *scores) -> tuple[np.ndarray, list[np.ndarray]]:
    y = np.asarray(y, dtype=float).ravel()
    out = []
    for s in scores:
        s = np.asarray(s, dtype=float).ravel()
        if s.shape != y.shape:
            raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
        out.append(s)
    if not np.isin(y, (0.0, 1.0)).all() or any(np.isnan(s).any() for s in out):
        raise ValueError("labels must be 0/1 and scores must not be NaN (leave unknown labels out first)")
    return y, out


def delong_auroc_cov(y, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of ``k`` score sets and their DeLong covariance matrix (fast algorithm).

    ``scores`` is a sequence of ``k`` arrays (or a ``(k, n)`` array). Returns ``(aucs (k,),
    cov (k, k))``. Needs at least two positives and two negatives.
    """
    y, scores = _labels_scores(y, *np.atleast_2d(np.asarray(scores, dtype=float)))
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least two positives and two negatives (got {m} and {n})")
    X = np.vstack([s[pos] for s in scores])   # (k, m)
    Y = np.vstack([s[neg] for s in scores])   # (k, n)
    Z = np.hstack([X, Y])
    tx = np.apply_along_axis(rankdata, 1, X)   # midranks within the positives
    ty = np.apply_along_axis(rankdata, 1, Y)   # within the negatives
    tz = np.apply_along_axis(rankdata, 1, Z)   # within all
    aucs = tz[:, :m].sum(axis=1) / m / n - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n          # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m    # of the negatives
    sx = np.atleast_2d(np.cov(v01))
    sy = np.atleast_2d(np.cov(v10))
    return aucs, sx / m + sy / n


def delong_test(y, a, b) -> dict:
    """DeLong's test of AUROC(a) = AUROC(b) for two score sets on the same images.

    Returns ``{"auroc_a", "auroc_b", "difference" (a - b), "se", "z", "p_value" (two-sided),
    "ci_low", "ci_high" (normal 95% interval of the difference), "n_pos", "n_neg"}``. When the
    variance of the difference is 0 (e.g. identical scores) and the difference is 0, z is 0 and
    the p-value 1.
    """
    y, (a, b) = _labels_scores(y, a, b)
    aucs, cov = delong_auroc_cov(y, [a, b])
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    var = max(var, 0.0)
    se = math.sqrt(var)
    if se <= 1e-15:
        z = 0.0 if abs(diff) <= 1e-15 else math.copysign(math.inf, diff)
        p = 1.0 if z == 0.0 else 0.0
    else:
        z = diff / se
        p = float(2.0 * norm.sf(abs(z)))
    half = 1.959963984540054 * se
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": diff, "se": se,
            "z": z, "p_value": min(1.0, p), "ci_low": diff - half, "ci_high": diff + half,
            "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum())}


def paired_auroc_test(y, scores_a, scores_b, patients, n_boot: int = 1000, seed: int | None = 0) -> dict:
    """Patient-level paired bootstrap of AUROC(a) - AUROC(b).

    Both score sets are evaluated on the same resamples (patients drawn with replacement, all
    of a drawn patient's images taken). Returns ``{"auroc_a", "auroc_b", "difference",
    "ci_low", "ci_high" (percentile 95% interval), "p_value", "n_boot", "n_valid",
    "n_patients"}``. The two-sided p-value is ``min(1, 2 * min(P(d <= 0), P(d >= 0)))`` over
    the valid resamples, each share counted as ``(1 + hits) / (1 + n_valid)``; identical
    scores give a difference of 0 and a p-value of 1.
    """
    y, (a, b) = _labels_scores(y, scores_a, scores_b)
    patients = list(patients)
    if len(patients) != y.size:
        raise ValueError(f"patients and labels differ in length: {len(patients)} vs {y.size}")
    W1 = np.ones((1, y.size))
    auc_a = float(B.weighted_auroc(y, a, W1)[0])
    auc_b = float(B.weighted_auroc(y, b, W1)[0])
    W = B.patient_bootstrap_weights(patients, n_boot, seed)
    d = B.weighted_auroc(y, a, W) - B.weighted_auroc(y, b, W)
    d = d[np.isfinite(d)]
    lo, hi, n_valid = B.percentile_ci(d)
    if n_valid:
        p_le = (1 + np.sum(d <= 0)) / (1 + n_valid)
        p_ge = (1 + np.sum(d >= 0)) / (1 + n_valid)
        p = float(min(1.0, 2 * min(p_le, p_ge)))
    else:
        p = float("nan")
    return {"auroc_a": auc_a, "auroc_b": auc_b, "difference": auc_a - auc_b, "ci_low": lo, "ci_high": hi,
            "p_value": p, "n_boot": int(n_boot), "n_valid": n_valid,
            "n_patients": int(len(set(map(str, patients))))}


def paired_frame(predictions_a: str | os.PathLike, predictions_b: str | os.PathLike,
                 manifest_csv: str | os.PathLike, score: str = "p_fracture") -> pd.DataFrame:
    """Manifest images with an ok prediction in both files: ``image``, ``name``,
    ``patient_id``, ``fracture``, ``acute``, ``p_a``, ``p_b`` (``score`` of each file).

    ``df.attrs``: ``n_a``, ``n_b`` (joined images of each file), ``n_both``, ``n_only_a``,
    ``n_only_b`` and ``n_fracture_unknown`` (paired images with an unknown label, kept in the
    frame but left out of the comparison).
    """
    da = M.join_predictions(predictions_a, manifest_csv)
    db = M.join_predictions(predictions_b, manifest_csv)
    cols = ["image", "name", "patient_id", "fracture", "acute"]
    left = da[cols + [score]].rename(columns={score: "p_a"})
    right = db[["image", score]].rename(columns={score: "p_b"})
    both = left.merge(right, on="image", how="inner")
    both = both[both["p_a"].notna() & both["p_b"].notna()].reset_index(drop=True)
    both.attrs = {"n_a": int(len(da)), "n_b": int(len(db)), "n_both": int(len(both)),
                  "n_only_a": int((~da["image"].isin(db["image"])).sum()),
                  "n_only_b": int((~db["image"].isin(da["image"])).sum()),
                  "n_fracture_unknown": int(both["fracture"].isna().sum())}
    return both


def compare_aurocs(df: pd.DataFrame, n_boot: int = 1000, seed: int | None = 0) -> dict:
    """For a :func:`paired_frame`: each AUROC with its patient-level bootstrap 95% CI, DeLong's
    test and the paired bootstrap test (images with an unknown label left out and counted).
    JSON-serialisable (NaN as ``None``)."""
    rows = df[df["fracture"].notna()]
    y = rows["fracture"].to_numpy(float)
    a, b = rows["p_a"].to_numpy(float), rows["p_b"].to_numpy(float)
    patients = rows["patient_id"].astype(str).tolist()
    W = B.patient_bootstrap_weights(patients, n_boot, seed)
    W1 = np.ones((1, len(y)))
    out: dict = {"n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum()),
                 "n_unknown_left_out": int(df["fracture"].isna().sum()),
                 "n_patients": int(len(set(patients))), "n_boot": int(n_boot), "seed": seed}
    for key, s in (("a", a), ("b", b)):
        out[f"auroc_{key}"] = B.summarise_draws(B.weighted_auroc(y, s, W1)[0], B.weighted_auroc(y, s, W))
    try:
        out["delong"] = delong_test(y, a, b)
    except ValueError as exc:
        out["delong"] = {"error": str(exc)}
    out["paired_bootstrap"] = paired_auroc_test(y, a, b, patients, n_boot, seed)
    return M.clean_for_json(out)
