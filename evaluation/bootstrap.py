"""Patient-level bootstrap, vectorised with numpy.

A bootstrap resample draws *patients* with replacement (as many as there are patients) and
takes every image of each drawn patient, as often as the patient was drawn. Images of one
patient are correlated, so resampling images would give confidence intervals that are too
narrow.

Every resample is held as a row of integer *weights*, one per image (how many times the
image is in the resample): ``W`` has shape ``(n_boot, n_images)``. Each metric below is
written for such weights, so that all resamples are computed at once with array operations
instead of a Python loop. With all weights 1 they give the ordinary (scikit-learn) values;
the tests check that they agree.

Intervals are percentile intervals (2.5th and 97.5th percentiles of the resampled values).
Resamples in which a metric is undefined (for an AUROC: no positive or no negative drawn)
are left out of that metric's interval, and their number is reported (``n_valid``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from evaluation.metrics import ECE_BINS, expected_calibration_error

__all__ = [
    "patient_codes",
    "draw_patients",
    "patient_bootstrap_weights",
    "patient_bootstrap_indices",
    "percentile_ci",
    "weighted_auroc",
    "weighted_average_precision",
    "weighted_confusion",
    "rates_from_confusion",
    "weighted_ece",
    "ece_if_calibrated",
    "roc_band",
    "pr_band",
    "summarise_draws",
]


# --------------------------------------------------------------------------- drawing
def patient_codes(patients: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, unique_patients)``: ``codes[i]`` is the index of image i's patient."""
    values = np.asarray([str(p) for p in patients], dtype=object)
    uniq, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), uniq


def draw_patients(n_patients: int, n_boot: int, seed: int | None = 0) -> np.ndarray:
    """``(n_boot, n_patients)`` array of patient indices drawn with replacement."""
    rng = np.random.default_rng(seed)
    if n_patients == 0:
        return np.zeros((n_boot, 0), dtype=np.int64)
    return rng.integers(0, n_patients, size=(n_boot, n_patients), dtype=np.int64)


def _patient_counts(draws: np.ndarray, n_patients: int) -> np.ndarray:
    """How many times each patient is drawn in each resample, ``(n_boot, n_patients)``."""
    n_boot = draws.shape[0]
    flat = (draws + np.arange(n_boot)[:, None] * n_patients).ravel()
    return np.bincount(flat, minlength=n_boot * n_patients).reshape(n_boot, n_patients)


def patient_bootstrap_weights(patients: Sequence, n_boot: int = 1000, seed: int | None = 0) -> np.ndarray:
    """Resampling weights ``(n_boot, n_images)`` of a patient-level bootstrap.

    ``W[b, i]`` is the number of times image i's patient was drawn in resample b, so that all
    images of one patient always carry the same weight.
    """
    codes, uniq = patient_codes(patients)
    counts = _patient_counts(draw_patients(len(uniq), n_boot, seed), len(uniq))
    return counts[:, codes].astype(np.float64)


def patient_bootstrap_indices(patients: Sequence, n_boot: int = 1000, seed: int | None = 0) -> list[np.ndarray]:
    """The same resamples as :func:`patient_bootstrap_weights` (same ``seed``) as lists of
    image indices: for each drawn patient, all of that patient's images.

    ``np.bincount(indices[b], minlength=n_images)`` equals ``patient_bootstrap_weights(...)[b]``.
    Meant for inspection and tests; the metrics use the weights.
    """
    codes, uniq = patient_codes(patients)
    draws = draw_patients(len(uniq), n_boot, seed)
    images_of = [np.flatnonzero(codes == k) for k in range(len(uniq))]
    out = []
    for row in draws:
        parts = [images_of[k] for k in row]
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    return out


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, int]:
    """``(low, high, n_valid)``: percentile interval of the finite values (NaN, NaN, 0 when
    there are none)."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    a = (1.0 - level) / 2.0
    lo, hi = np.percentile(v, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi), int(v.size)


# --------------------------------------------------------------------------- helpers
def _check(y, s, W):
    y = np.asarray(y, dtype=float).ravel()
    s = np.asarray(s, dtype=float).ravel()
    W = np.atleast_2d(np.asarray(W, dtype=float))
    if y.shape != s.shape or W.shape[1] != y.shape[0]:
        raise ValueError(f"shapes differ: y {y.shape}, scores {s.shape}, weights {W.shape}")
    if not np.isin(y, (0.0, 1.0)).all() or np.isnan(s).any():
        raise ValueError("labels must be 0/1 and scores finite (leave unknown labels out first)")
    return y, s, W


def _grouped_descending(y, s, W):
    """Positive and negative weight per distinct score, scores in descending order:
    ``(P, N, thresholds)`` with ``P, N`` of shape ``(n_boot, n_distinct)``."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1] if s.size else np.zeros(0, dtype=int)
    Wp = (W * y)[:, order]
    Wn = (W * (1.0 - y))[:, order]
    if s.size == 0:
        z = np.zeros((W.shape[0], 0))
        return z, z.copy(), np.zeros(0)
    P = np.add.reduceat(Wp, starts, axis=1)
    N = np.add.reduceat(Wn, starts, axis=1)
    return P, N, s_sorted[starts]


# --------------------------------------------------------------------------- metrics
def weighted_auroc(y, s, W) -> np.ndarray:
    """AUROC of each weight row (ties count one half, as in scikit-learn); NaN for a row
    without positive or negative weight. Shape ``(n_boot,)``."""
    y, s, W = _check(y, s, W)
    P, N, _ = _grouped_descending(y, s, W)
    # negatives scoring strictly lower than each group: suffix sums of N after the group
    below = N[:, ::-1].cumsum(axis=1)[:, ::-1] - N
    num = (P * (below + 0.5 * N)).sum(axis=1)
    ptot, ntot = P.sum(axis=1), N.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = num / (ptot * ntot)
    auc[(ptot == 0) | (ntot == 0)] = np.nan
    return auc


def weighted_average_precision(y, s, W) -> np.ndarray:
    """Average precision (scikit-learn's definition: sum over thresholds of the recall step
    times the precision) of each weight row; NaN for a row without positive weight."""
    y, s, W = _check(y, s, W)
    P, N, _ = _grouped_descending(y, s, W)
    tp, fp = P.cumsum(axis=1), N.cumsum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
        ptot = P.sum(axis=1)
        ap = (P * prec).sum(axis=1) / ptot
    ap[ptot == 0] = np.nan
    return ap


def weighted_confusion(y, s, W, threshold: float) -> dict[str, np.ndarray]:
    """Weighted ``tp, fn, fp, tn`` of each row, calling an image positive when
    ``score >= threshold``."""
    y, s, W = _check(y, s, W)
    pred = (s >= threshold).astype(float)
    return {"tp": W @ (y * pred), "fn": W @ (y * (1 - pred)),
            "fp": W @ ((1 - y) * pred), "tn": W @ ((1 - y) * (1 - pred))}


def rates_from_confusion(c: dict) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV and NPV from (arrays of) confusion counts; NaN where the
    denominator is 0."""
    def ratio(a, b):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)

    return {"sensitivity": ratio(c["tp"], c["tp"] + c["fn"]),
            "specificity": ratio(c["tn"], c["tn"] + c["fp"]),
            "ppv": ratio(c["tp"], c["tp"] + c["fp"]),
            "npv": ratio(c["tn"], c["tn"] + c["fn"])}


def ece_if_calibrated(p, n_bins: int = ECE_BINS, n_draws: int = 1000, seed: int = 0) -> dict:
    """The ECE that perfectly calibrated probabilities ``p`` would still show on a set of this
    size and spread: outcomes drawn as Bernoulli(p), ``n_draws`` times. Binned ECE is never 0
    on a finite set, so a measured ECE is read against this (its ``mean`` and ``p95``)."""
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    if p.size == 0:
        return {"mean": float("nan"), "p95": float("nan"), "n_draws": n_draws, "seed": seed}
    rng = np.random.default_rng(seed)
    # each draw as weights on every probability taken twice, once with outcome 1 and once with 0
    labels = np.r_[np.ones(p.size), np.zeros(p.size)]
    doubled = np.r_[p, p]
    eces = np.empty(n_draws)
    for start in range(0, n_draws, 100):  # bounded memory: 100 draws x n at a time
        y = (rng.random((min(100, n_draws - start), p.size)) < p).astype(float)
        eces[start:start + len(y)] = expected_calibration_error(labels, doubled, n_bins, weights=np.hstack([y, 1.0 - y]))
    return {"mean": float(eces.mean()), "p95": float(np.percentile(eces, 95)), "n_draws": n_draws, "seed": seed}


def weighted_ece(y, p, W, n_bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error (:func:`evaluation.metrics.expected_calibration_error`) of
    each weight row: ``sum_b |sum_{i in b} w_i (y_i - p_i)| / sum_i w_i``."""
    y, p, W = _check(y, p, W)
    return expected_calibration_error(y, p, n_bins, weights=W)


# --------------------------------------------------------------------------- curve bands
def roc_band(y, s, W, grid: np.ndarray | None = None, level: float = 0.95) -> dict:
    """Pointwise percentile band of the ROC curve: TPR at each FPR of ``grid`` (linear
    interpolation between the curve's points) over the resamples. Returns ``{"fpr", "lo",
    "hi", "n_valid"}``."""
    y, s, W = _check(y, s, W)
    grid = np.linspace(0, 1, 101) if grid is None else np.asarray(grid, dtype=float)
    P, N, _ = _grouped_descending(y, s, W)
    tp, fp = P.cumsum(axis=1), N.cumsum(axis=1)
    ptot, ntot = P.sum(axis=1), N.sum(axis=1)
    ok = (ptot > 0) & (ntot > 0)
    rows = []
    for b in np.flatnonzero(ok):
        fpr = np.r_[0.0, fp[b] / ntot[b]]
        tpr = np.r_[0.0, tp[b] / ptot[b]]
        rows.append(np.interp(grid, fpr, tpr))
    return _band(grid, rows, level, "fpr")


def pr_band(y, s, W, grid: np.ndarray | None = None, level: float = 0.95) -> dict:
    """Pointwise percentile band of the precision-recall curve: at each recall of ``grid`` the
    interpolated precision (the highest precision at any recall >= it). Returns ``{"recall",
    "lo", "hi", "n_valid"}``."""
    y, s, W = _check(y, s, W)
    grid = np.linspace(0, 1, 101) if grid is None else np.asarray(grid, dtype=float)
    P, N, _ = _grouped_descending(y, s, W)
    tp, fp = P.cumsum(axis=1), N.cumsum(axis=1)
    ptot = P.sum(axis=1)
    rows = []
    for b in np.flatnonzero(ptot > 0):
        denom = tp[b] + fp[b]
        prec = np.where(denom > 0, tp[b] / np.where(denom > 0, denom, 1), 1.0)
        rec = tp[b] / ptot[b]
        env = np.maximum.accumulate(prec[::-1])[::-1]  # best precision at recall >= this point's
        idx = np.searchsorted(rec, grid, side="left")
        rows.append(np.where(idx < rec.size, env[np.minimum(idx, rec.size - 1)], np.nan))
    return _band(grid, rows, level, "recall")


def _band(grid, rows, level, name) -> dict:
    if not rows:
        nan = np.full(grid.shape, np.nan)
        return {name: grid, "lo": nan, "hi": nan.copy(), "n_valid": 0}
    arr = np.vstack(rows)
    a = (1.0 - level) / 2.0
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo = np.nanpercentile(arr, 100 * a, axis=0)
            hi = np.nanpercentile(arr, 100 * (1 - a), axis=0)
    return {name: grid, "lo": lo, "hi": hi, "n_valid": int(arr.shape[0])}


def summarise_draws(point: float, draws: np.ndarray, level: float = 0.95) -> dict:
    """``{"value", "ci_low", "ci_high", "n_valid"}`` for a point estimate and its resampled
    values."""
    lo, hi, n = percentile_ci(draws, level)
    value = float(point) if point is not None and math.isfinite(float(point)) else float("nan")
    return {"value": value, "ci_low": lo, "ci_high": hi, "n_valid": n}
