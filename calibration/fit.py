"""Probability calibration and operating points, fitted on labelled validation images.

A network's raw probabilities are rarely calibrated (a 0.8 need not mean "fractured 8 times in
10"), and a calibration that holds on one site's films need not hold on another's. This module
refits a calibration for a model on a labelled validation set, picks decision thresholds
(operating points) on the calibrated validation probabilities, and writes them into a *new
version* of the model's bundle (``calibration.json``); inference
(:class:`inference.pipeline.Predictor`, and the ONNX backend) then reports calibrated
probabilities and a yes/no decision.

Refit for a new site on that site's labelled validation films (every labelled row is used)::

    python -m calibration --model BUNDLE --manifest SITE_VAL.csv \\
        [--method temperature|platt|beta|isotonic|none|auto] [--select-by brier|ece] \\
        [--operating-point balanced|high_sensitivity|high_specificity] [--out NEW_BUNDLE]

It prints the fitted parameters, the operating points with their validation sensitivity and
specificity, and the path of the new bundle (default ``<name>_calibrated`` beside the
input). ``--split val`` uses only the manifest's patient-grouped validation split instead (the
split training used: ``val_fraction`` and ``split_seed`` from the bundle's recorded data
settings, else 0.15 and 0).

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

The methods are the classes of :mod:`calibration.methods` (a registry: a new method is one
class); the fitted result is a :class:`calibration.calibrator.Calibrator`. ECE and the
operating points come from :mod:`evaluation.metrics`, as in the evaluation report.
:func:`fit_calibration` computes a calibration from the network's results with no file I/O;
:func:`calibrate_model` reads the model and the manifest around it and writes the new bundle.

``python -m calibration.fit`` and ``python -m calibration`` are the same command.

Stored as the bundle's ``calibration.json``; see ``docs/formats.md``, "Calibration and
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
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from torch.utils.data import DataLoader

from calibration.calibrator import HEADS, Calibrator
from calibration.methods import METHODS, CalibrationError, binary_nll, has_both_classes, logit
from data.manifest import ManifestError, assign_splits, label_arrays, load_manifest
from data.tables import load_vertebrae_table, path_key
from evaluation.metrics import OPERATING_POINTS, expected_calibration_error, operating_points
from evaluation.model_card import save_with_card
from evaluation.vertebrae import match_vertebrae
from inference.cli_args import count_at_least, device_problem
from inference.loading import open_model
from inference.predictor import FilmPrediction, InferenceDataset, Predictor, collate_items
from inference.vertebrae import image_probabilities, with_morphometry
from models.bundle import Bundle, ModelError

CV_FOLDS = 5  # patient-grouped folds of the method-selection cross-validation
MIN_PER_CLASS = 30  # the CLI warns below this many fractured or normal images
SELECTION_SCORES = {"brier": 5e-4, "ece": 1e-3}  # criterion -> tie margin


# --------------------------------------------------------------------------- method selection
def cross_validate_methods(logits, probs, labels, groups, n_folds: int = CV_FOLDS, refit=None) -> dict:
    """Out-of-fold Brier score, ECE and NLL of each registered method on one head, folds grouped
    by ``groups`` (patients).

    ``logits`` and ``probs``: the raw head outputs; ``labels``: 0, 1 or NaN (left out). ``refit``,
    when given, is called per fold as ``refit(train, test)`` with the rows' positions in the
    inputs, and returns ``(z_train, p_train, z_test, p_test)``: the raw outputs recomputed from
    what is fitted on the ``train`` rows alone (the per-vertebra combiner), so that no fold's
    score rests on anything fitted on its own images. Returns ``{"folds": k, "n_images": n,
    "scores": {method: {"brier", "ece", "nll"}}, "refitted_per_fold": bool}``, NaN scores where
    fewer than two folds could be fitted (too few patients, or a fold without both classes)."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    g = np.asarray(groups)
    known = ~np.isnan(y)
    rows = np.flatnonzero(known)  # positions in the inputs, for refit
    z, p, y, g = z[known], p[known], y[known], g[known]
    k = min(n_folds, len(np.unique(g)))
    nan = {m: {"brier": float("nan"), "ece": float("nan"), "nll": float("nan")} for m in METHODS}
    if k < 2 or not has_both_classes(y):
        return {"folds": int(k), "n_images": int(len(y)), "scores": nan, "refitted_per_fold": refit is not None}
    oof = {m: np.full(len(y), np.nan) for m in METHODS}
    for train, test in GroupKFold(n_splits=k).split(z, y, g):
        if not has_both_classes(y[train]):
            continue
        z_tr, p_tr, z_te, p_te = z[train], p[train], z[test], p[test]
        if refit is not None:
            z_tr, p_tr, z_te, p_te = (np.asarray(a, dtype=np.float64) for a in refit(rows[train], rows[test]))
        for name, cls in METHODS.items():  # each fold's map applied as inference applies it
            fitted = cls.fit(z_tr, p_tr, y[train])
            oof[name][test] = fitted.apply(z_te, logits=True) if cls.input_form == "logits" else fitted.apply(p_te)
    scored = ~np.isnan(oof[next(iter(METHODS))])
    if scored.sum() == 0 or len(np.unique(g[scored])) < 2:
        return {"folds": int(k), "n_images": int(len(y)), "scores": nan, "refitted_per_fold": refit is not None}
    scores = {m: {"brier": float(np.mean((q[scored] - y[scored]) ** 2)),
                  "ece": expected_calibration_error(y[scored], q[scored]),
                  "nll": binary_nll(logit(q[scored]), y[scored])} for m, q in oof.items()}
    return {"folds": int(k), "n_images": int(scored.sum()), "scores": scores, "refitted_per_fold": refit is not None}


def choose_method(selection: dict, by: str = "brier") -> str:
    """The method with the lowest out-of-fold score ``by`` (``brier``, the default, or ``ece``);
    ties (within the criterion's margin) go to the simpler one, in the registry's order (none,
    temperature, Platt, beta, isotonic, then any method registered later). Temperature when
    nothing could be scored."""
    if by not in SELECTION_SCORES:
        raise ValueError(f"unknown selection score {by!r} (expected {', '.join(SELECTION_SCORES)})")
    scores = selection["scores"]
    # a selection stored before a method existed does not score it: choose among those scored
    order = [m for m in METHODS if m in scores]
    values = [scores[m][by] for m in order]
    if not values or not all(math.isfinite(v) for v in values):
        return "temperature"
    best = min(values)
    return next(m for m, v in zip(order, values) if v <= best + SELECTION_SCORES[by])


# --------------------------------------------------------------------------- the per-vertebra combiner
def film_probabilities(results: list[FilmPrediction], combiner: dict | None = None) -> tuple[np.ndarray, dict]:
    """Uncalibrated film probabilities exactly as inference combines them (film head and
    vertebrae, inference.vertebrae.image_probabilities; the morphometry combiner applied to each
    vertebra when given), as float64 (a float32 threshold could flip a decision), and logits."""
    probs = {h: [] for h in HEADS}
    for r in results:
        film = image_probabilities(r.head, with_morphometry(r.vertebra_dicts(), combiner))
        for h in HEADS:
            probs[h].append(float(film[h]))
    probs = {h: np.asarray(v, dtype=np.float64) for h, v in probs.items()}
    logits = np.stack([logit(probs[h]) for h in HEADS], axis=1) if results else np.zeros((0, 2))
    return logits, probs


def fit_vertebra_combiner(results: list[FilmPrediction], paths: list[str], truth: pd.DataFrame) -> dict | None:
    """Logistic regression of a vertebra being fractured on ``[logit(p_crop), height_loss]``,
    over the vertebrae found on the calibration films (``paths``). Each is labelled by the truth
    vertebra it matches in ``truth`` (:func:`evaluation.metrics.load_vertebrae_table`;
    evaluation.vertebrae's matching); a detection that matches none counts as unfractured.
    None when there are too few of either class (fewer than 10)."""
    rows = []
    for path, r in zip(paths, results):
        for v in r.vertebrae:
            if not v.graded:  # ungraded (named beyond T1-L5): not combined, so not fitted
                continue
            rows.append({"image": path, **v.csv_cells(), "height_loss": v.height_loss})
    if not rows:
        return None
    pred = pd.DataFrame(rows)
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
    x = np.column_stack([logit(pred["p_fracture"].to_numpy(float)), pred["height_loss"].to_numpy(float)])[known]
    y = label[known]
    if min(int(y.sum()), int((1 - y).sum())) < 10:
        return None
    model = LogisticRegression(C=100.0).fit(x, y)  # weak penalty: height_loss is a small number
    if model.coef_[0][0] <= 0:  # would invert the crop network's ranking: not a combination to trust
        return None
    combined = model.predict_proba(x)[:, 1]
    return {"coef": [float(c) for c in model.coef_[0]], "intercept": float(model.intercept_[0]),
            "features": ["logit(p_fracture of the crop network)", "height_loss"],
            "n_vertebrae": int(len(y)), "n_fractured": int(y.sum()),
            "auroc_crop_only": float(roc_auc_score(y, x[:, 0])), "auroc_combined": float(roc_auc_score(y, combined))}


# --------------------------------------------------------------------------- fitting
def fit_calibration(results: list[FilmPrediction], labels_fracture, labels_acute, groups, method: str = "temperature",
                    default_point: str = "balanced", select_by: str = "brier", paths: list[str] | None = None,
                    truth_vertebrae: pd.DataFrame | None = None, info: dict | None = None) -> Calibrator:
    """The calibration of a network's uncalibrated results (``Predictor.predict``, one per film)
    against the films' labels (0, 1 or NaN per film), with no file I/O.

    ``groups``: the films' patients (the cross-validation folds). ``paths`` and
    ``truth_vertebrae`` (both or neither): the films and the truth ``vertebrae.csv`` table, to
    fit the per-vertebra combiner. ``method``: a registered method or ``"auto"`` (the lowest
    out-of-fold ``select_by``). ``info`` is added to the calibration's record (what it was fitted
    on). Raises :class:`CalibrationError` without fractured and normal films."""
    if method not in METHODS and method != "auto":
        raise ValueError(f"unknown method {method!r} (expected {', '.join([*METHODS, 'auto'])})")
    if default_point not in OPERATING_POINTS:
        raise ValueError(f"unknown operating point {default_point!r} (expected {', '.join(OPERATING_POINTS)})")
    y_frac = np.asarray(labels_fracture, dtype=np.float64)
    y_acute = np.asarray(labels_acute, dtype=np.float64)
    combiner = None
    if truth_vertebrae is not None and results:
        combiner = fit_vertebra_combiner(results, paths, truth_vertebrae)
    logits, probs = film_probabilities(results, combiner)
    if not has_both_classes(y_frac[~np.isnan(y_frac)]):
        raise CalibrationError(f"calibration needs fractured and normal images; "
                               f"the {len(results)} usable image(s) have only one class")

    def refit_combiner(train, test):  # the combiner fitted on the fold's training images only
        fold = fit_vertebra_combiner([results[i] for i in train], [paths[i] for i in train], truth_vertebrae)
        z_tr, p_tr = film_probabilities([results[i] for i in train], fold)
        z_te, p_te = film_probabilities([results[i] for i in test], fold)
        return z_tr[:, 0], p_tr["p_fracture"], z_te[:, 0], p_te["p_fracture"]

    selection = cross_validate_methods(logits[:, 0], probs["p_fracture"], y_frac, groups,
                                       refit=refit_combiner if combiner is not None else None)
    requested = method
    if method == "auto":
        method = choose_method(selection, by=select_by)
    selection.update(requested=requested, chosen=method,
                     criterion=f"lowest out-of-fold {select_by} of the film p_fracture (patient-grouped folds)"
                     if requested == "auto" else "requested")

    fitted, maps = {}, {}
    for col, head, y in ((0, "p_fracture", y_frac), (1, "p_acute_given_fracture", y_acute)):
        fitted[head] = method != "none" and has_both_classes(y[~np.isnan(y)])
        if fitted[head]:
            maps[head] = METHODS[method].fit(logits[:, col], probs[head], y)
    cal = Calibrator(method, maps=maps)
    p_cal = cal.apply_probabilities(probs)  # the same path inference takes
    metrics = {}
    for head, y in (("p_fracture", y_frac), ("p_acute_given_fracture", y_acute)):
        if (~np.isnan(y)).any():
            metrics[head] = {
                "nll_before": binary_nll(logit(probs[head]), y), "nll_after": binary_nll(logit(p_cal[head]), y),
                "ece_before": expected_calibration_error(y, probs[head]),
                "ece_after": expected_calibration_error(y, p_cal[head])}
    record = {
        "fitted_heads": fitted,
        "n_images": int(len(results)),
        "n_pos": int(np.sum(y_frac == 1)),
        "n_neg": int(np.sum(y_frac == 0)),
        "n_acute_pos": int(np.sum(y_acute == 1)),
        "n_acute_neg": int(np.sum(y_acute == 0)),
        "metrics": metrics,
        "vertebra_combiner": combiner,
        "method_selection": selection,
        **(info or {}),
    }
    return Calibrator(method, maps=cal.maps, points=operating_points(y_frac, p_cal["p_fracture"]),
                      default=default_point, info=record)


# --------------------------------------------------------------------------- a model
def _select_images(manifest, bundle: Bundle, split: str):
    images = manifest.images
    if split == "all":
        return images
    if split != "val":
        raise ValueError(f"split {split!r}: expected 'val' or 'all'")
    hp = (bundle.metadata.get("training") or {}).get("data") or {}
    val_fraction = float(hp.get("val_fraction", 0.15)) if not hp.get("val_manifest") else 0.0
    splits = assign_splits(images, val_fraction=val_fraction, seed=int(hp.get("split_seed", 0) or 0))
    chosen = images[splits.to_numpy() == "val"]
    if chosen["fracture"].notna().sum() == 0:
        hint = (f"; the model was validated on a separate manifest ({hp['val_manifest']}): pass that one "
                f"with split 'all'" if hp.get("val_manifest") else "; use split 'all' for a site's validation set")
        raise CalibrationError(f"{manifest.path}: no labelled images in the validation split{hint}")
    return chosen


@torch.no_grad()
def run_network(predictor, paths: list[str], batch_size: int, num_workers: int):
    """The uncalibrated predictor's results (``Predictor.predict``) for each readable path:
    ``(index, results, failed)``."""
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
            result.heatmap = None  # not needed here
            results.append(result)
    return np.array(index, dtype=int), results, failed


def default_output(model: str | os.PathLike) -> Path:
    """``<name>_calibrated`` beside the input model (a bundle folder or a checkpoint file)."""
    model = Path(model)
    return model.with_name(f"{model.stem if model.is_file() else model.name}_calibrated")


def calibrate_model(model, manifest: str | os.PathLike, out: str | os.PathLike | None = None,
                    method: str = "temperature", default_point: str = "balanced", split: str = "all",
                    device: str = "cpu", batch_size: int = 8, num_workers: int = 0,
                    sha256: str | None = None, select_by: str = "brier") -> tuple[Path, Calibrator]:
    """Fit a calibration of ``model`` (a bundle folder, a registry name or a training checkpoint)
    on ``manifest``'s labelled images (:func:`fit_calibration`) and write it as a new version of
    the bundle; the input is not changed.

    ``split``: ``"all"`` (default, as on the command line: every labelled image, a site's own
    validation set) or ``"val"`` (the patient-grouped validation split training used). ``out``
    defaults to ``<name>_calibrated`` beside the input. Returns ``(path, calibrator)``."""
    if method not in METHODS and method != "auto":
        raise ValueError(f"unknown method {method!r} (expected {', '.join([*METHODS, 'auto'])})")
    if default_point not in OPERATING_POINTS:
        raise ValueError(f"unknown operating point {default_point!r} (expected {', '.join(OPERATING_POINTS)})")
    bundle = open_model(model, sha256=sha256)
    predictor = Predictor(bundle, device=device, calibrated=False)  # refits from the raw outputs
    man = load_manifest(manifest, vertebrae=None)
    images = _select_images(man, bundle, split)
    images = images[images["fracture"].notna()].reset_index(drop=True)
    if images.empty:
        raise CalibrationError(f"{manifest}: no image with a known fracture label")
    index, results, failed = run_network(predictor, list(images["image"]), batch_size, num_workers)
    vertebrae_csv = Path(manifest).parent / "vertebrae.csv"
    truth = load_vertebrae_table(vertebrae_csv, manifest) if vertebrae_csv.is_file() and results else None
    if failed:
        print(f"warning: {len(failed)} unreadable image(s) left out, e.g. {failed[0][0]}: {failed[0][1]}",
              file=sys.stderr)
    used = images.iloc[index].reset_index(drop=True)
    y_frac, y_acute = label_arrays(used)
    groups = used["patient_id"].astype(str).to_numpy() if "patient_id" in used else used["image"].astype(str).to_numpy()
    info = {"fitted_on": str(Path(manifest).resolve()), "split": split, "n_unreadable": len(failed),
            "source_model": {"name": bundle.name, "version": bundle.version, "id": bundle.id},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        cal = fit_calibration(results, y_frac, y_acute, groups, method=method, default_point=default_point,
                              select_by=select_by, paths=list(used["image"]), truth_vertebrae=truth, info=info)
    except CalibrationError as exc:
        raise CalibrationError(f"{manifest}: {exc}") from None
    calibrated = bundle.derive("calibrate", note=f"{cal.method} on {cal.info['n_images']} image(s) of {manifest}",
                               calibration=cal.to_dict())
    path = save_with_card(calibrated, Path(out) if out else default_output(model))
    return path, cal


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m calibration",
        description="Fit a probability calibration and operating points of a model on labelled "
                    "validation images; write a new version of its bundle that inference uses as it is.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a bundle folder or a registry name")
    source.add_argument("--checkpoint", help="a training checkpoint (.ckpt), converted to a bundle")
    parser.add_argument("--manifest", required=True, help="manifest CSV of labelled validation images")
    parser.add_argument("--method", choices=(*METHODS, "auto"), default="temperature",
                        help="default temperature; auto: the lowest cross-validated score (--select-by)")
    parser.add_argument("--select-by", choices=tuple(SELECTION_SCORES), default="brier",
                        help="the out-of-fold score --method auto minimises (default brier, a proper score; "
                             "ece where the 10-bin ECE is the figure that matters)")
    parser.add_argument("--operating-point", choices=OPERATING_POINTS, default="balanced",
                        help="the operating point inference uses by default (default balanced)")
    parser.add_argument("--split", choices=("all", "val"), default="all",
                        help="all: every labelled row (a site's validation set; default); val: only the "
                             "manifest's patient-grouped validation split")
    parser.add_argument("--out", default=None, help="the new bundle folder (default <name>_calibrated beside the input)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    parser.add_argument("--batch-size", type=count_at_least(1), default=8)
    parser.add_argument("--num-workers", type=count_at_least(0), default=0)
    parser.add_argument("--sha256", default=None,
                        help="refuse the model unless its sha256 matches (checkpoint file, or a bundle's metadata.json)")
    args = parser.parse_args(argv)
    problem = device_problem(args.device)
    if problem:
        parser.error(problem)
    try:
        path, cal = calibrate_model(args.model or args.checkpoint, args.manifest, out=args.out, method=args.method,
                                         default_point=args.operating_point, split=args.split, device=args.device,
                                         batch_size=args.batch_size, num_workers=args.num_workers, sha256=args.sha256,
                                         select_by=args.select_by)
    except (ModelError, ManifestError, ValueError) as exc:  # ValueError: e.g. a bad vertebrae.csv, named
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
