"""The per-vertebra morphometry combiner fitted by calibration.fit, and the film rule."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from calibration.fit import film_probabilities, fit_vertebra_combiner
from evaluation.metrics import load_vertebrae_table
from data.records import VertebraRecord
from inference.predictor import FilmPrediction
from inference.vertebrae import combine_with_morphometry, image_probabilities


def _box_points(cx: float, top: float, height: float, width: float = 40.0, loss_anterior: float = 0.0):
    """Six points of an upright body; the anterior height shortened by ``loss_anterior``."""
    x0, x1 = cx - width / 2, cx + width / 2
    bottom = top + height
    top_a = top + loss_anterior * height
    return [[x0, top_a], [cx, top], [x1, top], [x0, bottom], [cx, bottom], [x1, bottom]]


def _predictions(results: list[dict]) -> list[FilmPrediction]:
    """The films as Predictor.predict gives them (typed), from the plain dicts the tests edit."""
    return [FilmPrediction(probs={}, heatmap=None, head=r["head"],
                           vertebrae=[VertebraRecord.from_json_dict(v) for v in r["vertebrae"]]) for r in results]


def _films(tmp_path, n_films: int = 12, per_film: int = 6, seed: int = 0):
    """Films whose fractured vertebrae (every third) show a height loss the crop network barely
    sees: its p_fracture is only weakly informative, the morphometry separates them."""
    rng = np.random.default_rng(seed)
    truth_rows, results, paths = [], [], []
    for f in range(n_films):
        path = str(tmp_path / f"film{f}.png")
        paths.append(path)
        vertebrae = []
        for k in range(per_film):
            fractured = (f + k) % 3 == 0
            loss = 0.35 if fractured else 0.02
            pts = _box_points(100.0, 50.0 + 60.0 * k, 45.0, loss_anterior=loss)
            truth = {"image": path, "level": f"L{k % 5 + 1}", "genant_grade": 2 if fractured else 0,
                     "morphology": "wedge" if fractured else "normal", "acute": "",
                     "x_min": 80, "y_min": 50 + 60 * k, "x_max": 120, "y_max": 95 + 60 * k}
            for j, (x, y) in enumerate(pts, start=1):
                truth[f"p{j}x"], truth[f"p{j}y"] = x, y
            truth_rows.append(truth)
            p_crop = float(rng.uniform(0.3, 0.7) if fractured else rng.uniform(0.2, 0.6))
            vertebrae.append({"level": truth["level"], "points": pts, "p_fracture": p_crop,
                              "p_acute_given_fracture": 0.5, "p_acute": 0.5 * p_crop,
                              "genant_grade": truth["genant_grade"], "height_loss": loss + rng.normal(0, 0.02),
                              # the rest of a vertebra record, as Predictor.predict gives it
                              "level_confidence": 0.9, "detection_score": 0.9, "morphology": truth["morphology"],
                              "heights": {"anterior": 45.0 * (1 - loss), "middle": 45.0, "posterior": 45.0},
                              "heights_mm": None,
                              "height_ratios": {"anterior_posterior": 1 - loss, "middle_posterior": 1.0}})
        results.append({"head": {"p_fracture": 0.3, "p_acute": 0.1, "p_acute_given_fracture": 1 / 3},
                        "vertebrae": vertebrae})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"image": [p for p in paths], "patient_id": range(n_films), "fracture": 1, "acute": ""}).to_csv(
        manifest, index=False)
    vertebrae_csv = tmp_path / "vertebrae.csv"
    pd.DataFrame(truth_rows).to_csv(vertebrae_csv, index=False)
    return results, paths, vertebrae_csv, manifest


def test_combiner_learns_the_morphometry_the_crop_network_missed(tmp_path):
    results, paths, vertebrae_csv, manifest = _films(tmp_path)
    combiner = fit_vertebra_combiner(_predictions(results), paths, load_vertebrae_table(vertebrae_csv, manifest))
    assert combiner is not None
    assert combiner["n_vertebrae"] == 72 and combiner["n_fractured"] == 24
    assert combiner["coef"][1] > 1.0  # height loss raises the probability
    assert combiner["coef"][0] > 0
    assert combiner["auroc_crop_only"] < 0.85 < 0.99 <= combiner["auroc_combined"]
    collapsed = combine_with_morphometry(0.4, 0.35, combiner)
    intact = combine_with_morphometry(0.4, 0.02, combiner)
    assert collapsed - intact > 0.3


def test_combiner_needs_both_classes(tmp_path):
    results, paths, vertebrae_csv, manifest = _films(tmp_path)
    truth = pd.read_csv(vertebrae_csv)
    truth["genant_grade"] = 0
    truth.to_csv(vertebrae_csv, index=False)
    assert fit_vertebra_combiner(_predictions(results), paths, load_vertebrae_table(vertebrae_csv, manifest)) is None


def test_unmatched_detection_counts_as_unfractured(tmp_path):
    results, paths, vertebrae_csv, manifest = _films(tmp_path)
    # a detection far from every truth body: matched to nothing, so a negative
    stray = dict(results[0]["vertebrae"][0], points=_box_points(900.0, 900.0, 45.0), height_loss=0.02)
    results[0]["vertebrae"].append(stray)
    combiner = fit_vertebra_combiner(_predictions(results), paths, load_vertebrae_table(vertebrae_csv, manifest))
    assert combiner["n_vertebrae"] == 73 and combiner["n_fractured"] == 24


def test_ungraded_bodies_are_left_out_of_the_combiner(tmp_path):
    results, paths, vertebrae_csv, manifest = _films(tmp_path)
    # a sacrum below each film's last body: ungraded (height_loss None), so neither combined
    # at inference nor fitted here, where it would count as an unfractured body with a large loss
    for r in results:
        r["vertebrae"].append(dict(r["vertebrae"][-1], level="S1", points=_box_points(100.0, 420.0, 30.0),
                                   genant_grade=None, height_loss=None))
    combiner = fit_vertebra_combiner(_predictions(results), paths, load_vertebrae_table(vertebrae_csv, manifest))
    assert combiner["n_vertebrae"] == 72 and combiner["n_fractured"] == 24


def test_film_probabilities_follow_the_combined_vertebrae(tmp_path):
    results, paths, vertebrae_csv, manifest = _films(tmp_path)
    combiner = fit_vertebra_combiner(_predictions(results), paths, load_vertebrae_table(vertebrae_csv, manifest))
    _, raw = film_probabilities(_predictions(results))
    logits, combined = film_probabilities(_predictions(results), combiner)
    for r, p_raw, p_comb in zip(results, raw["p_fracture"], combined["p_fracture"]):
        crop_max = max(v["p_fracture"] for v in r["vertebrae"])
        assert p_raw == pytest.approx(max(0.3, crop_max))
        expected = max([0.3] + [combine_with_morphometry(v["p_fracture"], v["height_loss"], combiner)
                                for v in r["vertebrae"]])
        assert p_comb == pytest.approx(expected)
    assert combined["p_fracture"].dtype == np.float64
    np.testing.assert_allclose(1 / (1 + np.exp(-logits[:, 0])), combined["p_fracture"], rtol=1e-9)
    # the film's acute probability never exceeds its fracture probability
    assert (combined["p_acute_given_fracture"] <= 1.0 + 1e-12).all()


def test_image_rule_keeps_the_head_without_vertebrae():
    head = {"p_fracture": 0.2, "p_acute": 0.05, "p_acute_given_fracture": 0.25}
    assert image_probabilities(head, []) == head
    film = image_probabilities(head, [{"p_fracture": 0.7, "p_acute": 0.6}])
    assert film["p_fracture"] == 0.7 and film["p_acute"] == 0.6
    assert film["p_acute_given_fracture"] == pytest.approx(0.6 / 0.7)


def test_calibration_refits_the_combiner_inside_each_fold(tmp_path, monkeypatch):
    """calibrate_model scores its methods with a combiner fitted without each fold's films
    (the network is replaced by fixed per-film results)."""
    import cv2
    from training_config import save_untrained_checkpoint

    import calibration.fit as C

    results, paths, vertebrae_csv, _ = _films(tmp_path, n_films=45, per_film=2, seed=3)
    for path in paths:
        cv2.imwrite(path, np.zeros((8, 8), np.uint8))
    truth = pd.read_csv(vertebrae_csv)
    fractured = truth.groupby("image")["genant_grade"].max().gt(0)
    # a film head that says little: the film probability rests on the vertebrae
    rng = np.random.default_rng(4)
    for r in results:
        r["head"] = {"p_fracture": 0.2, "p_acute": 0.1, "p_acute_given_fracture": 0.5}
        for v in r["vertebrae"]:
            v["p_fracture"] = float(np.clip(v["p_fracture"] + rng.normal(0, 0.1), 0.05, 0.95))
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"image": paths, "patient_id": [f"p{i // 3}" for i in range(len(paths))],
                  "fracture": [int(fractured[p]) for p in paths], "acute": ""}).to_csv(manifest, index=False)
    ckpt = tmp_path / "model.ckpt"
    save_untrained_checkpoint(ckpt, image_size=(64, 48))  # the network is replaced below

    class FixedPredictor:
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(C, "Predictor", FixedPredictor)
    monkeypatch.setattr(C, "run_network", lambda predictor, p, bs, nw: (np.arange(len(p)), _predictions(results), []))
    out, cal = C.calibrate_model(ckpt, manifest, out=tmp_path / "cal", method="platt")
    assert (out / "calibration.json").is_file() and json.loads((out / "calibration.json").read_text())["method"] == "platt"
    selection = cal.info["method_selection"]
    assert cal.info["vertebra_combiner"] is not None and selection["refitted_per_fold"]
    # the same folds scored with the combiner fitted on all the films read better: in-sample
    logits, probs = C.film_probabilities(_predictions(results), cal.info["vertebra_combiner"])
    y = np.array([float(fractured[p]) for p in paths])
    groups = np.array([f"p{i // 3}" for i in range(len(paths))])
    in_sample = C.cross_validate_methods(logits[:, 0], probs["p_fracture"], y, groups)
    assert not in_sample["refitted_per_fold"]
    assert selection["scores"]["none"]["brier"] != pytest.approx(in_sample["scores"]["none"]["brier"])
