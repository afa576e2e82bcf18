"""Probability calibration and operating points, fitted on labelled validation images.

A network's raw probabilities are rarely calibrated (a 0.8 need not mean "fractured 8 times in
10"), and a calibration that holds on one site's films need not hold on another's. This module
refits a calibration for a checkpoint on a labelled validation set, picks decision thresholds
(operating points) on the calibrated validation probabilities, and writes them into a *new*
checkpoint; inference (:class:`inference.pipeline.Predictor`, and the ONNX backend through the
model's metadata) then reports calibrated probabilities and a yes/no decision.

Refit for a new site on that site's labelled validation films (every labelled row is used)::

    python -m calibration.fit --checkpoint best.ckpt --manifest SITE_VAL.csv \\
        [--method temperature|platt|beta|isotonic|none|auto] [--select-by brier|ece] \\
        [--operating-point balanced|high_sensitivity|high_specificity] [--out NEW.ckpt]

It prints the fitted parameters, the operating points with their validation sensitivity and
specificity, and the path of the new checkpoint (default ``<stem>_calibrated.ckpt`` beside the
input). ``--split val`` uses only the manifest's patient-grouped validation split instead (the
split training used: ``val_fraction`` and ``split_seed`` from the checkpoint's data-module
hyper-parameters, else 0.15 and 0).

Per-vertebra probabilities: where a ``vertebrae.csv`` lies beside the manifest, the crop
network's ``p_fracture`` of each vertebra found is first combined with its measured height
loss by a logistic regression fitted on those films' vertebrae (matched to the truth as
evaluation/vertebrae.py does; see inference.vertebrae.combine_with_morphometry). The film
probabilities are then formed from the film head and the (combined) vertebrae as inference
forms them, and calibrated.

Methods (fitted separately for the two image heads, ``p_fracture`` on images whose ``fracture``
is known, ``p_acute_given_fracture`` on fractured images whose acuity is known; unknown labels
are never used):

* ``temperature``: ``p = sigmoid(logit / T)`` with one ``T > 0`` per head minimising the
  negative log-likelihood (bounded to 0.01-100). Monotone: the ranking (AUROC) is unchanged.
* ``platt``: ``p = sigmoid(a * logit + b)`` with ``a > 0`` and ``b`` per head minimising the
  negative log-likelihood (Platt scaling on the logit). Temperature scaling can only sharpen or
  soften; the intercept also corrects a model that over- or under-calls fractures as a whole
  (a shifted base rate at a new site). Monotone: the ranking is unchanged.
* ``beta``: ``p = sigmoid(a * ln p - b * ln(1 - p) + c)`` with ``a, b > 0`` and ``c`` per head
  minimising the negative log-likelihood (beta calibration, Kull, Silva Filho and Flach 2017).
  Platt scaling is the case ``a = b``; otherwise the low and the high end are corrected apart,
  which a logistic map of the logit cannot do. Monotone: the ranking is unchanged.
* ``isotonic``: a non-decreasing piecewise-linear map fitted by scikit-learn's
  ``IsotonicRegression``; its knots are stored as plain lists. Monotone but not strictly
  (ties appear); needs more data than temperature scaling.
* ``none``: probabilities are left as they are; only the operating points are fitted.
* ``auto``: the one of the five whose film ``p_fracture`` has the lowest out-of-fold Brier
  score in a patient-grouped cross-validation on the same images (below); ties go to the
  simpler method. The Brier score is a proper score (it rewards calibration and sharpness
  together) and, on a few hundred films, much less noisy than the 10-bin ECE.
  ``--select-by ece`` minimises the out-of-fold ECE instead, for a site whose figure of merit
  is the ECE.

Whatever the method, the fit reports that cross-validation (``method_selection`` in the stored
calibration): each method is fitted on all but one of up to ``CV_FOLDS`` patient-grouped folds
and scored on the fold left out, so the Brier score, ECE and NLL it prints are honest
estimates on unseen patients of the same site, unlike the in-sample figures after the fit
(isotonic regression's in-sample ECE is 0 by construction). The per-vertebra combiner below is
refitted within each fold too (on the fold's training images), so no fold is scored with
anything fitted on its own images; the stored combiner is the one fitted on all the images.

A head without both classes among its labelled images keeps the identity map
(``fitted_heads`` says which were fitted). ``p_acute`` is always recomputed as
``p_fracture * p_acute_given_fracture`` from the calibrated heads. The heatmap is not
calibrated.

Operating points, on the *calibrated* validation ``p_fracture`` (decision: ``p >= threshold``;
candidate thresholds are the validation probabilities themselves plus one just above the
largest):

* ``high_sensitivity``: the highest threshold whose sensitivity is >= 0.90;
* ``balanced``: the threshold maximising Youden's J = sensitivity + specificity - 1 (the
  lowest such threshold on ties);
* ``high_specificity``: the lowest threshold whose specificity is >= 0.95.

Their sensitivity / specificity are measured on the same images the calibration was fitted
on, so they are optimistic estimates; check them on a held-out set.

Stored as ``ckpt["vcf_calibration"]`` (plain Python types only, so ``torch.load(...,
weights_only=True)`` still reads the checkpoint); see ``docs/formats.md``, "Calibration and
operating points".
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data.tables import load_vertebrae_table, path_key
from inference.records import VertebraRecord
from training.checkpoint import CheckpointError

CALIBRATION_KEY = "vcf_calibration"
CALIBRATION_FORMAT = 1
METHODS = ("temperature", "platt", "beta", "isotonic", "none")
SIMPLEST_FIRST = ("none", "temperature", "platt", "beta", "isotonic")  # choose_method's tie order
CV_FOLDS = 5  # patient-grouped folds of the method-selection cross-validation
HEADS = ("p_fracture", "p_acute_given_fracture")
OPERATING_POINTS = ("high_sensitivity", "balanced", "high_specificity")
TARGET_SENSITIVITY = 0.90
TARGET_SPECIFICITY = 0.95
TEMPERATURE_BOUNDS = (0.01, 100.0)
PLATT_SLOPE_BOUNDS = (0.01, 100.0)  # a > 0 keeps the map increasing (the ranking unchanged)
PLATT_INTERCEPT_BOUND = 20.0
MIN_PER_CLASS = 30  # the CLI warns below this many fractured or normal images
PROB_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before taking their logit


class CalibrationError(CheckpointError):
    """A calibration that cannot be fitted, or a stored one that cannot be used."""


# --------------------------------------------------------------------------- fitting
def _known(values, labels) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    if values.shape != labels.shape:
        raise ValueError(f"{values.shape[0]} values but {labels.shape[0]} labels")
    keep = ~np.isnan(labels) & np.isfinite(values)
    values, labels = values[keep], labels[keep]
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN (unknown)")
    return values, labels


def _both_classes(labels: np.ndarray) -> bool:
    return bool((labels == 1).any() and (labels == 0).any())


def binary_nll(logits, labels) -> float:
    """Mean negative log-likelihood of 0/1 labels under ``sigmoid(logits)`` (numerically stable)."""
    z, y = _known(logits, labels)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits, labels) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``sigmoid(logits / T)``.

    Only entries whose label is known (0 or 1; NaN is skipped) are used; both classes must be
    present. ``T`` is searched on a log scale within ``TEMPERATURE_BOUNDS`` (perfectly separable
    data would otherwise drive it to 0)."""
    from scipy.optimize import minimize_scalar

    z, y = _known(logits, labels)
    if not _both_classes(y):
        raise CalibrationError("temperature scaling needs labelled images of both classes")
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)

    def nll(log_t: float) -> float:
        s = z * math.exp(-log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x))


def fit_platt(logits, labels) -> dict:
    """``{"a", "b"}`` minimising the NLL of ``sigmoid(a * logit + b)``, with ``a`` in
    ``PLATT_SLOPE_BOUNDS`` (an increasing map) and ``|b| <= PLATT_INTERCEPT_BOUND``.

    Only entries whose label is known are used; both classes must be present."""
    from scipy.optimize import minimize

    z, y = _known(logits, labels)
    if not _both_classes(y):
        raise CalibrationError("Platt scaling needs labelled images of both classes")

    def nll_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = params
        s = a * z + b
        r = _sigmoid(s) - y  # d NLL / d s
        return float(np.mean(np.logaddexp(0.0, s) - y * s)), np.array([np.mean(r * z), np.mean(r)])

    bounds = [PLATT_SLOPE_BOUNDS, (-PLATT_INTERCEPT_BOUND, PLATT_INTERCEPT_BOUND)]
    res = minimize(nll_and_grad, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=bounds)
    return {"a": float(res.x[0]), "b": float(res.x[1])}


def _beta_features(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ln p`` and ``-ln(1 - p)`` of ``p = sigmoid(z)``, computed stably from the logit."""
    return -np.logaddexp(0.0, -z), np.logaddexp(0.0, z)


def fit_beta(logits, labels) -> dict:
    """``{"a", "b", "c"}`` minimising the NLL of ``sigmoid(a * ln p - b * ln(1 - p) + c)``,
    ``p = sigmoid(logit)``: beta calibration (Kull, Silva Filho and Flach, AISTATS 2017).

    With ``a = b`` it is Platt scaling; ``a != b`` bends the two ends apart, which a logistic map
    cannot (e.g. probabilities too high at the bottom but right at the top). ``a`` and ``b`` lie
    in ``PLATT_SLOPE_BOUNDS`` (an increasing map, the ranking unchanged), ``|c| <=
    PLATT_INTERCEPT_BOUND``. Only entries whose label is known are used; both classes must be
    present."""
    from scipy.optimize import minimize

    z, y = _known(logits, labels)
    if not _both_classes(y):
        raise CalibrationError("beta calibration needs labelled images of both classes")
    log_p, neg_log_q = _beta_features(z)

    def nll_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, c = params
        s = a * log_p + b * neg_log_q + c
        r = _sigmoid(s) - y  # d NLL / d s
        return (float(np.mean(np.logaddexp(0.0, s) - y * s)),
                np.array([np.mean(r * log_p), np.mean(r * neg_log_q), np.mean(r)]))

    bounds = [PLATT_SLOPE_BOUNDS, PLATT_SLOPE_BOUNDS, (-PLATT_INTERCEPT_BOUND, PLATT_INTERCEPT_BOUND)]
    res = minimize(nll_and_grad, x0=np.array([1.0, 1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=bounds)
    return {"a": float(res.x[0]), "b": float(res.x[1]), "c": float(res.x[2])}


def beta_formula(abc: dict) -> str:
    """``sigmoid(a * ln p - b * ln(1 - p) + c)`` with the fitted numbers, for printing."""
    a, b, c = float(abc["a"]), float(abc["b"]), float(abc["c"])
    return f"sigmoid({a:.4g} * ln p - {b:.4g} * ln(1 - p) {'-' if c < 0 else '+'} {abs(c):.4g})"


def platt_formula(ab: dict) -> str:
    """``sigmoid(a * logit + b)`` with the fitted numbers, for printing."""
    a, b = float(ab["a"]), float(ab["b"])
    return f"sigmoid({a:.4g} * logit {'-' if b < 0 else '+'} {abs(b):.4g})"


def fit_isotonic(probs, labels) -> dict:
    """A non-decreasing map ``p -> calibrated p`` (scikit-learn ``IsotonicRegression``).

    Returns ``{"x": [...], "y": [...]}``: the regression's knots as plain float lists, applied
    by linear interpolation and clipped to the end values outside ``[x[0], x[-1]]`` (what
    ``IsotonicRegression(out_of_bounds="clip").predict`` does)."""
    from sklearn.isotonic import IsotonicRegression

    p, y = _known(probs, labels)
    if not _both_classes(y):
        raise CalibrationError("isotonic calibration needs labelled images of both classes")
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
    return {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}


def expected_calibration_error(probs, labels, n_bins: int = 10) -> float:
    """ECE: the |mean p - observed rate| of equal-width probability bins, weighted by their size."""
    p, y = _known(probs, labels)
    if len(p) == 0:
        return float("nan")
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(ece)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def cross_validate_methods(logits, probs, labels, groups, n_folds: int = CV_FOLDS, refit=None) -> dict:
    """Out-of-fold Brier score, ECE and NLL of each method on one head, folds grouped by
    ``groups`` (patients).

    ``logits`` and ``probs``: the raw head outputs; ``labels``: 0, 1 or NaN (left out). ``refit``,
    when given, is called per fold as ``refit(train, test)`` with the rows' positions in the
    inputs, and returns ``(z_train, p_train, z_test, p_test)``: the raw outputs recomputed from
    what is fitted on the ``train`` rows alone (the per-vertebra combiner), so that no fold's
    score rests on anything fitted on its own images. Returns ``{"folds": k, "n_images": n,
    "scores": {method: {"brier", "ece", "nll"}}, "refitted_per_fold": bool}``, NaN scores where
    fewer than two folds could be fitted (too few patients, or a fold without both classes)."""
    from sklearn.model_selection import GroupKFold

    z = np.asarray(logits, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    g = np.asarray(groups)
    known = ~np.isnan(y)
    rows = np.flatnonzero(known)  # positions in the inputs, for refit
    z, p, y, g = z[known], p[known], y[known], g[known]
    k = min(n_folds, len(np.unique(g)))
    nan = {m: {"brier": float("nan"), "ece": float("nan"), "nll": float("nan")} for m in METHODS}
    if k < 2 or not _both_classes(y):
        return {"folds": int(k), "n_images": int(len(y)), "scores": nan, "refitted_per_fold": refit is not None}
    oof = {m: np.full(len(y), np.nan) for m in METHODS}
    for train, test in GroupKFold(n_splits=k).split(z, y, g):
        if not _both_classes(y[train]):
            continue
        z_tr, p_tr, z_te, p_te = z[train], p[train], z[test], p[test]
        if refit is not None:
            z_tr, p_tr, z_te, p_te = (np.asarray(a, dtype=np.float64) for a in refit(rows[train], rows[test]))
        # each fold's map applied as inference applies it (Calibrator.apply)
        oof["none"][test] = p_te
        temperature = Calibrator("temperature", temperature={"p_fracture": fit_temperature(z_tr, y[train])})
        oof["temperature"][test] = temperature.apply(z_te, logits=True)
        platt = Calibrator("platt", platt={"p_fracture": fit_platt(z_tr, y[train])})
        oof["platt"][test] = platt.apply(z_te, logits=True)
        beta = Calibrator("beta", beta={"p_fracture": fit_beta(z_tr, y[train])})
        oof["beta"][test] = beta.apply(z_te, logits=True)
        isotonic = Calibrator("isotonic", isotonic={"p_fracture": fit_isotonic(p_tr, y[train])})
        oof["isotonic"][test] = isotonic.apply(p_te)
    scored = ~np.isnan(oof["none"])
    if scored.sum() == 0 or len(np.unique(g[scored])) < 2:
        return {"folds": int(k), "n_images": int(len(y)), "scores": nan, "refitted_per_fold": refit is not None}
    scores = {m: {"brier": float(np.mean((q[scored] - y[scored]) ** 2)),
                  "ece": expected_calibration_error(q[scored], y[scored]),
                  "nll": binary_nll(_logit(q[scored]), y[scored])} for m, q in oof.items()}
    return {"folds": int(k), "n_images": int(scored.sum()), "scores": scores, "refitted_per_fold": refit is not None}


SELECTION_SCORES = {"brier": 5e-4, "ece": 1e-3}  # criterion -> tie margin


def choose_method(selection: dict, by: str = "brier") -> str:
    """The method with the lowest out-of-fold score ``by`` (``brier``, the default, or ``ece``);
    ties (within the criterion's margin) go to the simpler one (none, then temperature, Platt,
    beta, isotonic). Temperature when nothing could be scored."""
    if by not in SELECTION_SCORES:
        raise ValueError(f"unknown selection score {by!r} (expected {', '.join(SELECTION_SCORES)})")
    scores = selection["scores"]
    # a selection stored before a method existed does not score it: choose among those scored
    order = [m for m in SIMPLEST_FIRST if m in scores]
    values = [scores[m][by] for m in order]
    if not values or not all(math.isfinite(v) for v in values):
        return "temperature"
    best = min(values)
    return next(m for m, v in zip(order, values) if v <= best + SELECTION_SCORES[by])


# --------------------------------------------------------------------------- operating points
def _rates(p: np.ndarray, y: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity of ``p >= t`` for each threshold ``t``."""
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    sens = (len(pos) - np.searchsorted(pos, thresholds, side="left")) / len(pos)
    spec = np.searchsorted(neg, thresholds, side="left") / len(neg)
    return sens, spec


def operating_points(probs, labels, sensitivity: float = TARGET_SENSITIVITY,
                     specificity: float = TARGET_SPECIFICITY) -> dict:
    """``high_sensitivity``, ``balanced`` and ``high_specificity`` thresholds (see the module doc).

    Each is ``{"threshold", "sensitivity", "specificity", "criterion"}``; the decision is
    ``p >= threshold``."""
    p, y = _known(probs, labels)
    if not _both_classes(y):
        raise CalibrationError("operating points need labelled images of both classes")
    top = float(p.max())
    above = float(np.nextafter(top, np.inf))
    candidates = np.unique(np.append(p, above))  # ascending
    sens, spec = _rates(p, y, candidates)

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


# --------------------------------------------------------------------------- the calibrator
class Calibrator:
    """A fitted calibration: maps raw head probabilities (or logits) to calibrated ones, and
    holds the operating points. ``to_dict`` / ``from_dict`` give the stored form."""

    def __init__(self, method: str = "none", temperature: dict | None = None, isotonic: dict | None = None,
                 points: dict | None = None, default: str = "balanced", info: dict | None = None,
                 platt: dict | None = None, beta: dict | None = None):
        if method not in METHODS:
            raise CalibrationError(f"unknown calibration method {method!r} (expected {', '.join(METHODS)})")
        self.method = method
        self.temperature = {h: float((temperature or {}).get(h) or 1.0) for h in HEADS}
        self.isotonic = {h: (isotonic or {}).get(h) for h in HEADS}
        for h, table in self.isotonic.items():
            if table is not None and (len(table.get("x", [])) == 0 or len(table["x"]) != len(table.get("y", []))):
                raise CalibrationError(f"isotonic table of {h} is malformed")
        for h, t in self.temperature.items():
            if not (t > 0 and math.isfinite(t)):
                raise CalibrationError(f"temperature of {h} is {t}; it must be positive")
        self.platt = {}
        for h in HEADS:  # identity (a = 1, b = 0) where a head was not fitted
            ab = (platt or {}).get(h) or {"a": 1.0, "b": 0.0}
            try:
                a, b = float(ab["a"]), float(ab["b"])
            except (KeyError, TypeError, ValueError):
                raise CalibrationError(f"Platt parameters of {h} are malformed: {ab!r}") from None
            if not (a > 0 and math.isfinite(a) and math.isfinite(b)):
                raise CalibrationError(f"Platt slope of {h} is {a} (intercept {b}); the slope must be positive and finite")
            self.platt[h] = {"a": a, "b": b}
        self.beta = {}
        for h in HEADS:  # identity (a = b = 1, c = 0) where a head was not fitted
            abc = (beta or {}).get(h) or {"a": 1.0, "b": 1.0, "c": 0.0}
            try:
                a, b, c = float(abc["a"]), float(abc["b"]), float(abc["c"])
            except (KeyError, TypeError, ValueError):
                raise CalibrationError(f"beta calibration parameters of {h} are malformed: {abc!r}") from None
            if not (a > 0 and b > 0 and all(map(math.isfinite, (a, b, c)))):
                raise CalibrationError(f"beta calibration of {h} has a = {a}, b = {b}, c = {c}; "
                                       "a and b must be positive and all finite")
            self.beta[h] = {"a": a, "b": b, "c": c}
        self.operating_points = dict(points or {})
        if self.operating_points and default not in self.operating_points:
            raise CalibrationError(f"default operating point {default!r} is not one of "
                                   f"{', '.join(self.operating_points)}")
        self.default = default
        self.info = dict(info or {})

    @property
    def vertebra_combiner(self) -> dict | None:
        """The fitted crop-probability + morphometry combination (inference.vertebrae), if any."""
        return self.info.get("vertebra_combiner")

    # ---- applying
    def apply(self, p_or_logits, head: str = "p_fracture", logits: bool = False) -> np.ndarray:
        """Calibrated probabilities of one head (``p_fracture`` or ``p_acute_given_fracture``)
        from its raw probabilities, or from its logits with ``logits=True``."""
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r} (expected {', '.join(HEADS)})")
        x = np.asarray(p_or_logits.detach().cpu().numpy() if isinstance(p_or_logits, torch.Tensor) else p_or_logits,
                       dtype=np.float64)
        if self.method == "temperature":
            z = x if logits else _logit(x)
            return _sigmoid(z / self.temperature[head])
        if self.method == "platt":
            z = x if logits else _logit(x)
            return _sigmoid(self.platt[head]["a"] * z + self.platt[head]["b"])
        if self.method == "beta":
            log_p, neg_log_q = _beta_features(x if logits else _logit(x))
            abc = self.beta[head]
            return _sigmoid(abc["a"] * log_p + abc["b"] * neg_log_q + abc["c"])
        p = _sigmoid(x) if logits else x
        table = self.isotonic.get(head) if self.method == "isotonic" else None
        if table is None:
            return p
        return np.interp(p, table["x"], table["y"])

    def apply_probabilities(self, probs: dict) -> dict:
        """A predictor's outputs with calibrated ``p_fracture``, ``p_acute_given_fracture`` and
        ``p_acute`` (their product), plus ``p_fracture_uncalibrated``; other keys pass through."""
        out = dict(probs)
        raw = np.asarray(probs["p_fracture"])
        dtype = raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.float32
        p_f = self.apply(raw, "p_fracture").astype(dtype)
        p_ag = self.apply(np.asarray(probs["p_acute_given_fracture"]), "p_acute_given_fracture").astype(dtype)
        out["p_fracture_uncalibrated"] = raw
        out["p_fracture"], out["p_acute_given_fracture"] = p_f, p_ag
        out["p_acute"] = (p_f * p_ag).astype(dtype)
        return out

    # ---- deciding
    def threshold(self, point: str | None = None) -> float:
        name = point or self.default
        if name not in self.operating_points:
            raise CalibrationError(f"operating point {name!r} not in this calibration "
                                   f"(have: {', '.join(self.operating_points) or 'none'})")
        return float(self.operating_points[name]["threshold"])

    def decide(self, p_fracture_calibrated, point: str | None = None):
        """``p_fracture_calibrated >= threshold`` of the operating point (the default one if None)."""
        return np.asarray(p_fracture_calibrated) >= self.threshold(point)

    # ---- storing
    def to_dict(self) -> dict:
        d = {"format": CALIBRATION_FORMAT, "method": self.method}
        if self.method == "temperature":
            d["temperature"] = dict(self.temperature)
        elif self.method == "platt":
            d["platt"] = {h: dict(ab) for h, ab in self.platt.items()}
        elif self.method == "beta":
            d["beta"] = {h: dict(abc) for h, abc in self.beta.items()}
        elif self.method == "isotonic":
            d["isotonic"] = {h: (None if t is None else {"x": list(t["x"]), "y": list(t["y"])})
                             for h, t in self.isotonic.items()}
        d["operating_points"] = {k: dict(v) for k, v in self.operating_points.items()}
        d["default"] = self.default
        d.update({k: v for k, v in self.info.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        if not isinstance(d, dict):
            raise CalibrationError(f"stored calibration is a {type(d).__name__}, not a dict")
        if d.get("format", CALIBRATION_FORMAT) != CALIBRATION_FORMAT:
            raise CalibrationError(f"calibration format {d.get('format')} but this code reads format {CALIBRATION_FORMAT}")
        known = {"format", "method", "temperature", "platt", "beta", "isotonic", "operating_points", "default"}
        return cls(method=d.get("method", "none"), temperature=d.get("temperature"), isotonic=d.get("isotonic"),
                   points=d.get("operating_points"), default=d.get("default", "balanced"),
                   info={k: v for k, v in d.items() if k not in known}, platt=d.get("platt"), beta=d.get("beta"))

    def describe(self) -> str:
        """The fitted parameters in a line."""
        if self.method == "temperature":
            return "temperature: " + ", ".join(f"{h} T={t:.4g}" for h, t in self.temperature.items())
        if self.method == "platt":
            return "platt: " + ", ".join(f"{h} {platt_formula(ab)}" for h, ab in self.platt.items())
        if self.method == "beta":
            return "beta: " + ", ".join(f"{h} {beta_formula(abc)}" for h, abc in self.beta.items())
        if self.method == "isotonic":
            parts = [f"{h} " + ("identity" if t is None else f"{len(t['x'])} knots") for h, t in self.isotonic.items()]
            return "isotonic: " + ", ".join(parts)
        return "none (probabilities unchanged)"


def predictor_calibration(stored, source, operating_point: str | None = None) -> tuple[Calibrator | None, str | None]:
    """The :class:`Calibrator` and operating-point name a predictor should use.

    ``stored``: the checkpoint's ``vcf_calibration`` (or None). Raises :class:`CalibrationError`
    (a :class:`CheckpointError`) for a malformed calibration, an unknown ``operating_point``, or
    an ``operating_point`` asked of a model without calibration."""
    if stored is None:
        if operating_point:
            raise CalibrationError(f"{source}: operating point {operating_point!r} asked for, but the model has no "
                                   f"calibration; fit one with `python -m calibration.fit`")
        return None, None
    try:
        cal = Calibrator.from_dict(stored)
        point = operating_point or cal.default
        cal.threshold(point)
    except CalibrationError as exc:
        raise CalibrationError(f"{source}: {exc}") from exc
    return cal, point


# --------------------------------------------------------------------------- a checkpoint
def _select_images(manifest, ckpt: dict, split: str):
    from data.manifest import assign_splits

    images = manifest.images
    if split == "all":
        return images
    if split != "val":
        raise ValueError(f"split {split!r}: expected 'val' or 'all'")
    hp = ckpt.get("datamodule_hyper_parameters") or {}
    val_fraction = float(hp.get("val_fraction", 0.15)) if not hp.get("val_manifest") else 0.0
    splits = assign_splits(images, val_fraction=val_fraction, seed=int(hp.get("split_seed", 0) or 0))
    chosen = images[splits.to_numpy() == "val"]
    if chosen["fracture"].notna().sum() == 0:
        hint = (f"; the checkpoint was validated on a separate manifest ({hp['val_manifest']}): pass that one "
                f"with split 'all'" if hp.get("val_manifest") else "; use split 'all' for a site's validation set")
        raise CalibrationError(f"{manifest.path}: no labelled images in the validation split{hint}")
    return chosen


@torch.no_grad()
def _run_network(predictor, paths: list[str], batch_size: int, num_workers: int):
    """The uncalibrated predictor's results (``Predictor.predict``) for each readable path:
    ``(index, results, failed)``."""
    from torch.utils.data import DataLoader

    from inference.pipeline import InferenceDataset, collate_items

    loader = DataLoader(InferenceDataset(paths, predictor.image_size), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate_items)
    index, results, failed = [], [], []
    for batch in loader:
        good = [b for b in batch if "error" not in b]
        failed += [(paths[b["index"]], b["error"]) for b in batch if "error" in b]
        if not good:
            continue
        index += [b["index"] for b in good]
        for result in predictor.predict(good):
            result.pop("probs", None)  # the heatmaps are not needed here
            results.append(result)
    return np.array(index, dtype=int), results, failed


def _film_probabilities(results: list[dict], combiner: dict | None = None) -> tuple[np.ndarray, dict]:
    """Uncalibrated film probabilities exactly as inference combines them (film head and
    vertebrae, inference.vertebrae.image_probabilities; the morphometry combiner applied to each
    vertebra when given), as float64 (a float32 threshold could flip a decision), and logits."""
    from inference.vertebrae import image_probabilities, with_morphometry

    probs = {h: [] for h in HEADS}
    for r in results:
        film = image_probabilities(r["head"], with_morphometry(r.get("vertebrae") or [], combiner))
        for h in HEADS:
            probs[h].append(float(film[h]))
    probs = {h: np.asarray(v, dtype=np.float64) for h, v in probs.items()}
    logits = np.stack([_logit(probs[h]) for h in HEADS], axis=1) if results else np.zeros((0, 2))
    return logits, probs


def fit_vertebra_combiner(results: list[dict], paths: list[str], vertebrae_csv, manifest) -> dict | None:
    """Logistic regression of a vertebra being fractured on ``[logit(p_crop), height_loss]``,
    over the vertebrae found on the calibration films. Each is labelled by the truth vertebra it
    matches (evaluation.vertebrae's matching); a detection that matches none counts as
    unfractured. None when there are too few of either class (fewer than 10)."""
    from sklearn.linear_model import LogisticRegression

    from evaluation.vertebrae import match_vertebrae

    rows = []
    for path, r in zip(paths, results):
        for v in (VertebraRecord.from_json_dict(v) for v in r.get("vertebrae") or []):
            if not v.graded:  # ungraded (named beyond T1-L5): not combined, so not fitted
                continue
            rows.append({"image": path, **v.csv_cells(), "height_loss": v.height_loss})
    if not rows:
        return None
    pred = pd.DataFrame(rows)
    truth = load_vertebrae_table(vertebrae_csv, manifest)
    matches = match_vertebrae(pred, truth, evaluated_images=paths)
    label = np.zeros(len(pred))
    # detections on films without any truth vertebra cannot be labelled
    truth_keys = {path_key(p) for p in truth["image"]}
    known = np.array([path_key(p) in truth_keys for p in pred["image"]], dtype=bool)
    hit = matches[(matches["status"] == "matched") & (matches["pred_index"] >= 0)]
    for j, grade in zip(hit["pred_index"].astype(int), hit["truth_grade"]):
        if np.isnan(grade):
            known[j] = False
        else:
            label[j] = float(grade > 0)
    x = np.column_stack([_logit(pred["p_fracture"].to_numpy(float)), pred["height_loss"].to_numpy(float)])[known]
    y = label[known]
    if min(int(y.sum()), int((1 - y).sum())) < 10:
        return None
    model = LogisticRegression(C=100.0).fit(x, y)  # weak penalty: height_loss is a small number
    if model.coef_[0][0] <= 0:  # would invert the crop network's ranking: not a combination to trust
        return None
    combined = model.predict_proba(x)[:, 1]
    from sklearn.metrics import roc_auc_score

    return {"coef": [float(c) for c in model.coef_[0]], "intercept": float(model.intercept_[0]),
            "features": ["logit(p_fracture of the crop network)", "height_loss"],
            "n_vertebrae": int(len(y)), "n_fractured": int(y.sum()),
            "auroc_crop_only": float(roc_auc_score(y, x[:, 0])), "auroc_combined": float(roc_auc_score(y, combined))}


def _atomic_torch_save(obj, path: Path) -> Path:
    from data.io_utils import atomic_write_with

    return atomic_write_with(path, lambda fh: torch.save(obj, fh))


def default_output(checkpoint: str | os.PathLike) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_calibrated{checkpoint.suffix or '.ckpt'}")


def calibrate_checkpoint(checkpoint: str | os.PathLike, manifest: str | os.PathLike, out: str | os.PathLike | None = None,
                         method: str = "temperature", default_point: str = "balanced", split: str = "all",
                         device: str = "cpu", batch_size: int = 8, num_workers: int = 0,
                         sha256: str | None = None, select_by: str = "brier") -> tuple[Path, Calibrator]:
    """Fit a calibration of ``checkpoint`` on ``manifest``'s labelled images and write a new
    checkpoint (the original dict plus ``vcf_calibration``), atomically.

    ``split``: ``"all"`` (default, as on the command line: every labelled image, a site's own
    validation set) or ``"val"`` (the patient-grouped validation split training used). ``out`` defaults to
    ``<stem>_calibrated.ckpt`` beside ``checkpoint``. Returns ``(path, calibrator)``."""
    from data.manifest import label_arrays, load_manifest
    from training.checkpoint import file_sha256, load_checkpoint
    from inference.pipeline import Predictor

    if method not in METHODS + ("auto",):
        raise ValueError(f"unknown method {method!r} (expected {', '.join(METHODS + ('auto',))})")
    if default_point not in OPERATING_POINTS:
        raise ValueError(f"unknown operating point {default_point!r} (expected {', '.join(OPERATING_POINTS)})")
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint, sha256=sha256)
    predictor = Predictor(checkpoint, device=device, calibrated=False)  # refits from the raw outputs
    man = load_manifest(manifest, vertebrae=None)
    images = _select_images(man, ckpt, split)
    images = images[images["fracture"].notna()].reset_index(drop=True)
    if images.empty:
        raise CalibrationError(f"{manifest}: no image with a known fracture label")
    index, results, failed = _run_network(predictor, list(images["image"]), batch_size, num_workers)
    vertebrae_csv = Path(manifest).parent / "vertebrae.csv"
    combiner = None
    if vertebrae_csv.is_file() and results:
        combiner = fit_vertebra_combiner(results, [images["image"].iloc[i] for i in index], vertebrae_csv, manifest)
    logits, probs = _film_probabilities(results, combiner)
    if failed:
        print(f"warning: {len(failed)} unreadable image(s) left out, e.g. {failed[0][0]}: {failed[0][1]}",
              file=sys.stderr)
    used = images.iloc[index].reset_index(drop=True)
    y_frac, y_acute = label_arrays(used)
    if not _both_classes(y_frac[~np.isnan(y_frac)]):
        raise CalibrationError(f"{manifest}: calibration needs fractured and normal images; "
                               f"the {len(used)} usable image(s) have only one class")

    groups = used["patient_id"].astype(str).to_numpy() if "patient_id" in used else used["image"].astype(str).to_numpy()
    refit = None
    if combiner is not None:
        used_paths = [images["image"].iloc[i] for i in index]

        def refit(train, test):  # the combiner fitted on the fold's training images only
            fold = fit_vertebra_combiner([results[i] for i in train], [used_paths[i] for i in train],
                                         vertebrae_csv, manifest)
            z_tr, p_tr = _film_probabilities([results[i] for i in train], fold)
            z_te, p_te = _film_probabilities([results[i] for i in test], fold)
            return z_tr[:, 0], p_tr["p_fracture"], z_te[:, 0], p_te["p_fracture"]

    selection = cross_validate_methods(logits[:, 0], probs["p_fracture"], y_frac, groups, refit=refit)
    requested = method
    if method == "auto":
        method = choose_method(selection, by=select_by)
    selection.update(requested=requested, chosen=method,
                     criterion=f"lowest out-of-fold {select_by} of the film p_fracture (patient-grouped folds)"
                     if requested == "auto" else "requested")

    fitted = {}
    temperature, platt, beta, isotonic = {}, {}, {}, {}
    for col, head, y in ((0, "p_fracture", y_frac), (1, "p_acute_given_fracture", y_acute)):
        known = ~np.isnan(y)
        fitted[head] = method != "none" and _both_classes(y[known])
        if not fitted[head]:
            continue
        if method == "temperature":
            temperature[head] = fit_temperature(logits[:, col], y)
        elif method == "platt":
            platt[head] = fit_platt(logits[:, col], y)
        elif method == "beta":
            beta[head] = fit_beta(logits[:, col], y)
        else:
            isotonic[head] = fit_isotonic(probs[head], y)
    cal = Calibrator(method, temperature=temperature, isotonic=isotonic, platt=platt, beta=beta)
    p_cal = cal.apply_probabilities(probs)  # the same path inference takes
    points = operating_points(p_cal["p_fracture"], y_frac)
    metrics = {}
    for head, y in (("p_fracture", y_frac), ("p_acute_given_fracture", y_acute)):
        k = ~np.isnan(y)
        if k.any():
            metrics[head] = {
                "nll_before": binary_nll(_logit(probs[head]), y), "nll_after": binary_nll(_logit(p_cal[head]), y),
                "ece_before": expected_calibration_error(probs[head], y),
                "ece_after": expected_calibration_error(p_cal[head], y)}
    info = {
        "fitted_heads": fitted,
        "fitted_on": str(Path(manifest).resolve()),
        "split": split,
        "n_images": int(len(used)),
        "n_pos": int(np.sum(y_frac == 1)),
        "n_neg": int(np.sum(y_frac == 0)),
        "n_acute_pos": int(np.sum(y_acute == 1)),
        "n_acute_neg": int(np.sum(y_acute == 0)),
        "n_unreadable": len(failed),
        "metrics": metrics,
        "vertebra_combiner": combiner,
        "method_selection": selection,
        "source_checkpoint_sha256": file_sha256(checkpoint),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    cal = Calibrator(method, temperature=temperature, isotonic=isotonic, points=points, default=default_point,
                     info=info, platt=platt, beta=beta)
    ckpt[CALIBRATION_KEY] = cal.to_dict()
    path = Path(out) if out else default_output(checkpoint)
    _atomic_torch_save(ckpt, path)
    return path, cal


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fit a probability calibration and operating points of a checkpoint on labelled "
                    "validation images; write a new checkpoint that inference uses as it is.")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.ckpt)")
    parser.add_argument("--manifest", required=True, help="manifest CSV of labelled validation images")
    parser.add_argument("--method", choices=METHODS + ("auto",), default="temperature",
                        help="default temperature; auto: the lowest cross-validated score (--select-by)")
    parser.add_argument("--select-by", choices=tuple(SELECTION_SCORES), default="brier",
                        help="the out-of-fold score --method auto minimises (default brier, a proper score; "
                             "ece where the 10-bin ECE is the figure that matters)")
    parser.add_argument("--operating-point", choices=OPERATING_POINTS, default="balanced",
                        help="the operating point inference uses by default (default balanced)")
    parser.add_argument("--split", choices=("all", "val"), default="all",
                        help="all: every labelled row (a site's validation set; default); val: only the "
                             "manifest's patient-grouped validation split")
    parser.add_argument("--out", default=None, help="new checkpoint (default <stem>_calibrated.ckpt beside the input)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--sha256", default=None, help="refuse the checkpoint unless its sha256 matches")
    args = parser.parse_args(argv)
    from data.manifest import ManifestError

    try:
        path, cal = calibrate_checkpoint(args.checkpoint, args.manifest, out=args.out, method=args.method,
                                         default_point=args.operating_point, split=args.split, device=args.device,
                                         batch_size=args.batch_size, num_workers=args.num_workers, sha256=args.sha256,
                                         select_by=args.select_by)
    except (CheckpointError, ManifestError, ValueError) as exc:  # ValueError: e.g. a bad vertebrae.csv, named
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = cal.info
    print(f"fitted on {info['n_images']} image(s) of {info['fitted_on']} (split {info['split']}): "
          f"{info['n_pos']} fractured, {info['n_neg']} normal; acuity known on {info['n_acute_pos'] + info['n_acute_neg']}")
    if min(info["n_pos"], info["n_neg"]) < MIN_PER_CLASS:
        print(f"warning: fewer than {MIN_PER_CLASS} images of a class: the calibration and the operating points "
              f"are unreliable", file=sys.stderr)
    sel = info["method_selection"]
    print(f"out-of-fold p_fracture over {sel['n_images']} image(s), {sel['folds']} patient-grouped folds "
          f"(each method fitted without the fold it is scored on):")
    for name, s in sel["scores"].items():
        mark = "  (chosen)" if name == cal.method and sel["requested"] == "auto" else ""
        print(f"  {name:<12} Brier {s['brier']:.4f}  ECE {s['ece']:.4f}  NLL {s['nll']:.4f}{mark}")
    print(f"method {cal.describe()}")
    unfitted = [h for h, f in info["fitted_heads"].items() if not f]
    if unfitted and cal.method != "none":
        print(f"  left as identity (labels of one class only): {', '.join(unfitted)}")
    for head, m in info["metrics"].items():
        print(f"  {head}: NLL {m['nll_before']:.4f} -> {m['nll_after']:.4f}, "
              f"ECE {m['ece_before']:.4f} -> {m['ece_after']:.4f}")
    comb = info.get("vertebra_combiner")
    if comb:
        print(f"per-vertebra p_fracture = sigmoid({comb['coef'][0]:.3f} * logit(p_crop) + {comb['coef'][1]:.3f} * "
              f"height_loss + {comb['intercept']:.3f}) on {comb['n_vertebrae']} vertebrae ({comb['n_fractured']} "
              f"fractured): AUROC {comb['auroc_crop_only']:.3f} -> {comb['auroc_combined']:.3f}")
    else:
        print("per-vertebra p_fracture: the crop network's (no vertebrae.csv beside the manifest, or too few "
              "matched vertebrae of a class to combine it with the morphometry)")
    print("operating points (calibrated p_fracture >= threshold; validation sensitivity / specificity):")
    for name in OPERATING_POINTS:
        pt = cal.operating_points[name]
        mark = "  (default)" if name == cal.default else ""
        print(f"  {name:<17} threshold {pt['threshold']:.4f}  sensitivity {pt['sensitivity']:.3f}  "
              f"specificity {pt['specificity']:.3f}{mark}")
    print("(measured on the fitting images: optimistic; check on held-out data)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
