"""Per-vertebra evaluation (evaluation/vertebrae.py) on small synthetic tables, and
evaluate.py end to end with an inference folder that has a ``vertebrae.csv``."""
import csv
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from evaluation import metrics as M
from evaluation import vertebrae as V

POINTS = [f"p{k}{a}" for k in range(1, 7) for a in "xy"]
TRUTH_FIELDS = ["image", "level", "genant_grade", "morphology", "acute", "x_min", "y_min", "x_max", "y_max"] + POINTS
PRED_FIELDS = (["image", "name", "level", "level_confidence", "detection_score", "p_fracture", "p_acute",
                "genant_grade", "morphology", "height_anterior", "height_middle", "height_posterior"] + POINTS)
WIDTH, HEIGHT = 30.0, 20.0  # every vertebra's body: mean height 20 px, so the gate is 10 px
# level, top y, truth grade, truth acute, p_fracture, p_acute: two images, six vertebrae, grades 0-3;
# p_fracture ranks every fractured vertebra above every normal one
LAYOUT = [("L1", 10.0, 0, "", 0.10, 0.01), ("L2", 40.0, 2, 1, 0.80, 0.70), ("L3", 70.0, 0, "", 0.20, 0.02)]
LAYOUT_B = [("L1", 10.0, 1, 0, 0.60, 0.10), ("L2", 40.0, 0, "", 0.30, 0.03), ("L3", 70.0, 3, 1, 0.90, 0.85)]


def _points(x0, y0, heights=(HEIGHT, HEIGHT, HEIGHT)):
    """Six points of a body with top-left corner (x0, y0) and anterior / middle / posterior heights."""
    xs = (x0, x0 + WIDTH / 2, x0 + WIDTH)
    top = [(x, y0) for x in xs]
    bottom = [(x, y0 + h) for x, h in zip(xs, heights)]
    return {f"p{k + 1}{a}": v for k, pt in enumerate(top + bottom) for a, v in zip("xy", pt)}


def _truth_row(image, level, y0, grade, acute="", x0=20.0, heights=(HEIGHT, HEIGHT, HEIGHT)):
    pts = _points(x0, y0, heights)
    return {"image": image, "level": level, "genant_grade": grade, "acute": acute,
            "morphology": "" if grade == "" else ("normal" if grade == 0 else "wedge"),
            "x_min": x0, "y_min": y0, "x_max": x0 + WIDTH, "y_max": y0 + max(heights), **pts}


def _pred_row(image, level, y0, grade, p_fracture, p_acute, x0=20.0):
    return {"image": image, "name": image.rsplit("/", 1)[-1].split(".")[0], "level": level,
            "level_confidence": 0.9, "detection_score": 0.95, "p_fracture": p_fracture, "p_acute": p_acute,
            "genant_grade": grade, "morphology": "normal" if grade == 0 else "wedge",
            "height_anterior": HEIGHT, "height_middle": HEIGHT, "height_posterior": HEIGHT, **_points(x0, y0)}


def _write_csv(path, rows, fields):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _perfect(tmp_path):
    """Truth and perfect predictions for images a.png and b.png (rows as dicts)."""
    truth, pred = [], []
    for name, layout in (("a", LAYOUT), ("b", LAYOUT_B)):
        image = str(tmp_path / f"{name}.png")
        for level, y0, grade, acute, p_f, p_a in layout:
            truth.append(_truth_row(image, level, y0, grade, acute))
            pred.append(_pred_row(image, level, y0, grade, p_f, p_a))
    return truth, pred


def _load(tmp_path, truth_rows, pred_rows):
    """Both tables through the real readers (truth resolved against a manifest in tmp_path)."""
    truth_csv = _write_csv(tmp_path / "truth_vertebrae.csv", truth_rows, TRUTH_FIELDS)
    pred_csv = _write_csv(tmp_path / "pred_vertebrae.csv", pred_rows, PRED_FIELDS)
    truth = M.load_vertebrae_table(truth_csv, tmp_path / "manifest.csv")
    return V.load_predicted_vertebrae(pred_csv), truth


def _summary(tmp_path, truth_rows, pred_rows, **kw):
    pred, truth = _load(tmp_path, truth_rows, pred_rows)
    out = V.summarise_vertebrae(pred, truth, **kw)
    json.dumps(out, allow_nan=False)  # JSON-serialisable, NaN written as None
    return out


# --------------------------------------------------------------------------- perfect predictions
def test_perfect_predictions(tmp_path):
    truth, pred = _perfect(tmp_path)
    s = _summary(tmp_path, truth, pred)
    d = s["detection"]
    assert (d["recall"], d["precision"]) == (1.0, 1.0)
    assert (d["n_truth"], d["n_predicted"], d["n_matched"], d["n_missed"], d["n_false_positive"]) == (6, 6, 6, 0, 0)
    pe = s["point_error"]
    assert pe["n_vertebrae"] == 6 and pe["n_points"] == 36
    assert pe["pixels"] == {"median": 0.0, "p90": 0.0, "mean": 0.0}
    assert pe["percent_height"]["p90"] == 0.0
    assert s["level_accuracy"]["accuracy"] == 1.0 and s["level_accuracy"]["n"] == 6
    ga = s["grade_agreement"]
    assert ga["kappa_quadratic"] == pytest.approx(1.0) and ga["exact_agreement"] == 1.0
    assert np.array(ga["matrix"]).tolist() == np.diag([3, 1, 1, 1]).tolist()
    assert s["auroc_fracture"]["auroc"] == 1.0
    assert (s["auroc_fracture"]["n_pos"], s["auroc_fracture"]["n_neg"]) == (3, 3)
    assert s["auroc_fracture"]["n_unmatched_scored_zero"] == 0
    # acute: L2 of a (acute, 0.70), L3 of b (acute, 0.85) vs L1 of b (chronic, 0.10)
    assert s["auroc_acute"]["auroc"] == 1.0 and (s["auroc_acute"]["n_pos"], s["auroc_acute"]["n_neg"]) == (2, 1)
    assert {g: r["n_pos"] for g, r in s["auroc_by_grade"].items()} == {"1": 1, "2": 1, "3": 1}
    assert all(r["auroc"] == 1.0 and r["n_neg"] == 3 for r in s["auroc_by_grade"].values())
    # fewer than 5 fractured vertebrae at every level: n/a
    assert list(s["auroc_by_level"]) == ["L1", "L2", "L3"]
    assert all(r["auroc"] is None and "n/a" in r["note"] for r in s["auroc_by_level"].values())
    assert s["counts"]["n_evaluated_images"] == 2 and s["counts"]["n_truth_images_without_prediction"] == 0


def test_auroc_by_level_when_enough_fractured(tmp_path):
    truth, pred = [], []
    for i in range(7):  # L1 fractured on five images, normal on two; p_fracture separates all but one pair
        image = str(tmp_path / f"i{i}.png")
        grade = 1 if i < 5 else 0
        p_f = [0.9, 0.8, 0.7, 0.6, 0.3, 0.4, 0.2][i]
        truth.append(_truth_row(image, "L1", 10.0, grade, 0 if grade else ""))
        pred.append(_pred_row(image, "L1", 10.0, grade, p_f, 0.1))
    s = _summary(tmp_path, truth, pred, min_level_fractured=5)
    lv = s["auroc_by_level"]["L1"]
    assert (lv["n_pos"], lv["n_neg"]) == (5, 2)
    assert lv["auroc"] == pytest.approx(roc_auc_score([1] * 5 + [0] * 2, [0.9, 0.8, 0.7, 0.6, 0.3, 0.4, 0.2]))
    assert lv["auroc"] == pytest.approx(0.9)  # one of ten pairs mis-ordered
    assert _summary(tmp_path, truth, pred, min_level_fractured=6)["auroc_by_level"]["L1"]["auroc"] is None


# --------------------------------------------------------------------------- detection
def test_missing_vertebra_lowers_recall_and_scores_zero(tmp_path):
    truth, pred = _perfect(tmp_path)
    dropped = [p for p in pred if not (p["image"].endswith("a.png") and p["level"] == "L2")]  # grade 2, p 0.80
    s = _summary(tmp_path, truth, dropped)
    d = s["detection"]
    assert d["recall"] == pytest.approx(5 / 6) and d["n_missed"] == 1 and d["precision"] == 1.0
    af = s["auroc_fracture"]
    assert af["n_unmatched_scored_zero"] == 1 and (af["n_pos"], af["n_neg"]) == (3, 3)
    # the missed grade-2 vertebra scores 0.0, below all three normal vertebrae (0.10, 0.20, 0.30)
    y = [1, 1, 1, 0, 0, 0]
    scores = [0.0, 0.60, 0.90, 0.10, 0.20, 0.30]
    assert af["auroc"] == pytest.approx(roc_auc_score(y, scores)) == pytest.approx(6 / 9)
    assert s["auroc_by_grade"]["2"]["auroc"] == 0.0
    # acute: the missed acute vertebra scores 0 < the chronic one's 0.10
    assert s["auroc_acute"]["auroc"] == pytest.approx(0.5) and s["auroc_acute"]["n_unmatched_scored_zero"] == 1
    # its row is in the match table as missed
    pred_df, truth_df = _load(tmp_path, truth, dropped)
    table = V.match_vertebrae(pred_df, truth_df)
    missed = table[table["status"] == "missed"]
    assert len(missed) == 1 and missed.iloc[0]["truth_level"] == "L2" and missed.iloc[0]["truth_grade"] == 2
    assert np.isnan(missed.iloc[0]["pred_p_fracture"]) and missed.iloc[0]["pred_index"] == -1


def test_extra_far_prediction_lowers_precision(tmp_path):
    truth, pred = _perfect(tmp_path)
    extra = _pred_row(str(tmp_path / "a.png"), "T12", 500.0, 0, 0.99, 0.5, x0=500.0)
    s = _summary(tmp_path, truth, pred + [extra])
    d = s["detection"]
    assert d["precision"] == pytest.approx(6 / 7) and d["recall"] == 1.0 and d["n_false_positive"] == 1
    # a false positive is not a truth vertebra: the AUROC is unchanged
    assert s["auroc_fracture"]["auroc"] == 1.0 and s["auroc_fracture"]["n_neg"] == 3
    table = V.match_vertebrae(*_load(tmp_path, truth, pred + [extra]))
    fp = table[table["false_positive"]]
    assert len(fp) == 1 and fp.iloc[0]["pred_level"] == "T12" and fp.iloc[0]["truth_index"] == -1


def test_two_predictions_on_one_vertebra_match_once(tmp_path):
    image = str(tmp_path / "a.png")
    truth = [_truth_row(image, "L1", 10.0, 0)]
    pred = [_pred_row(image, "L1", 11.0, 0, 0.1, 0.0), _pred_row(image, "L1", 10.0, 0, 0.2, 0.0)]
    pred_df, truth_df = _load(tmp_path, truth, pred)
    table = V.match_vertebrae(pred_df, truth_df)
    assert table["matched"].sum() == 1 and table["false_positive"].sum() == 1
    assert table.loc[table["matched"], "pred_index"].item() == 1  # the closer one


def test_gate_is_half_the_truth_mean_height(tmp_path):
    image = str(tmp_path / "a.png")
    truth = [_truth_row(image, "L1", 10.0, 0), _truth_row(image, "L2", 100.0, 0)]
    # L1 prediction 9.9 px below (inside the 10 px gate), L2 prediction 10.5 px below (outside)
    pred = [_pred_row(image, "L1", 19.9, 0, 0.1, 0.0), _pred_row(image, "L2", 110.5, 0, 0.1, 0.0)]
    pred_df, truth_df = _load(tmp_path, truth, pred)
    table = V.match_vertebrae(pred_df, truth_df)
    by_level = table[table["status"] != "false_positive"].set_index("truth_level")["status"].to_dict()
    assert by_level == {"L1": "matched", "L2": "missed"}
    assert table.loc[table["matched"], "centre_distance"].item() == pytest.approx(9.9)
    s = V.summarise_vertebrae(pred_df, truth_df)
    assert s["detection"]["recall"] == 0.5 and s["detection"]["precision"] == 0.5
    # a taller truth vertebra (mean height 22 -> gate 11) takes the same 10.5 px prediction
    truth[1] = _truth_row(image, "L2", 100.0, 0, heights=(22.0, 22.0, 22.0))
    s = V.summarise_vertebrae(*_load(tmp_path, truth, pred))
    assert s["detection"]["recall"] == 1.0


# --------------------------------------------------------------------------- point error
def test_shifted_point_gives_expected_percent_error(tmp_path):
    truth, pred = _perfect(tmp_path)
    # a wedged truth vertebra: anterior 10, middle 20, posterior 30 -> mean height 20
    truth[0] = _truth_row(truth[0]["image"], "L1", 10.0, 0, heights=(10.0, 20.0, 30.0))
    pred[0].update(_points(20.0, 10.0, (10.0, 20.0, 30.0)))
    for p in pred:  # move p1 of every prediction by (3, 4): 5 px, 25 % of 20 px
        p["p1x"] += 3.0
        p["p1y"] += 4.0
    s = _summary(tmp_path, truth, pred)
    pe = s["point_error"]
    assert pe["per_point"]["p1"]["median_px"] == pytest.approx(5.0)
    assert pe["per_point"]["p1"]["median_pct"] == pytest.approx(25.0)
    assert pe["per_point"]["p4"]["p90_px"] == pytest.approx(0.0)
    # all 36 points pooled: 6 of them are 5 px off
    assert pe["pixels"]["median"] == 0.0 and pe["pixels"]["p90"] == pytest.approx(5.0)
    assert pe["pixels"]["mean"] == pytest.approx(5.0 / 6)
    assert pe["percent_height"]["p90"] == pytest.approx(25.0)
    assert sum(pe["histogram_percent_height"]["counts"]) == 36
    table = V.match_vertebrae(*_load(tmp_path, truth, pred))
    assert table["truth_mean_height"].tolist() == pytest.approx([20.0] * 6)
    assert table["error_pct_p1"].tolist() == pytest.approx([25.0] * 6)


def test_percent_error_uses_the_truth_height(tmp_path):
    image = str(tmp_path / "a.png")
    truth = [_truth_row(image, "L1", 10.0, 0, heights=(40.0, 40.0, 40.0))]
    pred = [_pred_row(image, "L1", 10.0, 0, 0.1, 0.0)]
    pred[0].update(_points(20.0, 10.0, (40.0, 40.0, 40.0)))
    pred[0]["p5y"] += 2.0
    table = V.match_vertebrae(*_load(tmp_path, truth, pred))
    assert table["error_p5"].item() == pytest.approx(2.0) and table["error_pct_p5"].item() == pytest.approx(5.0)
    assert V.point_errors(table, percent=True).shape == (1, 6)


# --------------------------------------------------------------------------- levels and grades
def test_wrong_level_lowers_level_accuracy(tmp_path):
    truth, pred = _perfect(tmp_path)
    pred[1]["level"] = "L3"  # a.png L2 named L3
    truth[5]["level"] = ""   # b.png L3: no truth level
    s = _summary(tmp_path, truth, pred)
    la = s["level_accuracy"]
    assert la["accuracy"] == pytest.approx(4 / 5) and (la["n_correct"], la["n"]) == (4, 5)
    assert la["n_truth_level_unknown"] == 1
    # detection does not depend on the level
    assert s["detection"]["recall"] == 1.0
    # split by the JSONs' levels_trusted
    keys = {M.path_key(str(tmp_path / "a.png")): False, M.path_key(str(tmp_path / "b.png")): True}
    by = _summary(tmp_path, truth, pred, levels_trusted=keys)["level_accuracy"]["by_levels_trusted"]
    assert by["false"] == {"accuracy": pytest.approx(2 / 3), "n_correct": 2, "n": 3}
    assert by["true"] == {"accuracy": 1.0, "n_correct": 2, "n": 2}


def test_wrong_grade_lowers_kappa(tmp_path):
    truth, pred = _perfect(tmp_path)
    pred[1]["genant_grade"] = 1  # truth 2
    pred[2]["genant_grade"] = 1  # truth 0
    s = _summary(tmp_path, truth, pred)
    ga = s["grade_agreement"]
    t = [0, 2, 0, 1, 0, 3]
    p = [0, 1, 1, 1, 0, 3]
    assert ga["kappa_quadratic"] == pytest.approx(cohen_kappa_score(t, p, weights="quadratic"))
    assert ga["kappa_quadratic"] < 1.0
    assert ga["exact_agreement"] == pytest.approx(4 / 6)
    mat = np.array(ga["matrix"])
    assert mat[2, 1] == 1 and mat[0, 1] == 1 and mat.trace() == 4


def test_unknown_truth_grade_left_out(tmp_path):
    truth, pred = _perfect(tmp_path)
    truth[3]["genant_grade"] = ""  # b.png L1
    truth[3]["acute"] = ""
    s = _summary(tmp_path, truth, pred)
    assert s["auroc_fracture"]["n_unknown_left_out"] == 1
    assert (s["auroc_fracture"]["n_pos"], s["auroc_fracture"]["n_neg"]) == (2, 3)
    assert s["grade_agreement"]["n"] == 5 and s["grade_agreement"]["n_truth_grade_unknown"] == 1
    assert s["detection"]["n_truth"] == 6  # it still counts for detection


# --------------------------------------------------------------------------- images
def test_images_without_predictions_are_counted_and_left_out(tmp_path):
    truth, pred = _perfect(tmp_path)
    image_c = str(tmp_path / "c.png")
    truth += [_truth_row(image_c, "L1", 10.0, 3, 1)]
    s = _summary(tmp_path, truth, pred)
    assert s["counts"]["n_truth_images"] == 3 and s["counts"]["n_truth_images_without_prediction"] == 1
    assert s["detection"]["recall"] == 1.0 and s["detection"]["n_truth"] == 6
    assert s["auroc_fracture"]["n_pos"] == 3
    # but an image with an ok prediction and no predicted vertebra counts: its vertebra is missed
    s = _summary(tmp_path, truth, pred, evaluated_images=[str(tmp_path / n) for n in ("a.png", "b.png", "c.png")])
    assert s["counts"]["n_truth_images_without_prediction"] == 0
    assert s["detection"]["recall"] == pytest.approx(6 / 7)
    assert s["auroc_fracture"]["n_pos"] == 4 and s["auroc_fracture"]["n_unmatched_scored_zero"] == 1
    # and predicted images with no truth vertebrae are left out, not false positives
    stray = _pred_row(str(tmp_path / "stray.png"), "L1", 10.0, 0, 0.5, 0.1)
    s = _summary(tmp_path, truth, pred + [stray])
    assert s["counts"]["n_predicted_images_without_truth"] == 1
    assert s["counts"]["n_predicted_vertebrae_without_truth"] == 1
    assert s["detection"]["precision"] == 1.0


def test_images_are_joined_on_the_resolved_path(tmp_path):
    truth, pred = _perfect(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    for p in pred:
        p["image"] = p["image"].replace(str(tmp_path), str(tmp_path / "link"))
    assert _summary(tmp_path, truth, pred)["detection"]["n_matched"] == 6


# --------------------------------------------------------------------------- reading and plots
def test_load_predicted_vertebrae_errors_name_the_file(tmp_path):
    _, pred = _perfect(tmp_path)
    out = tmp_path / "OUT"
    out.mkdir()
    path = _write_csv(out / "vertebrae.csv", pred, [f for f in PRED_FIELDS if f not in ("p_acute", "p3y")])
    with pytest.raises(ValueError, match=r"vertebrae\.csv.*p_acute.*p3y"):
        V.load_predicted_vertebrae(path)
    with pytest.raises(FileNotFoundError, match="nothere"):
        V.load_predicted_vertebrae(tmp_path / "nothere")
    _write_csv(out / "vertebrae.csv", pred, PRED_FIELDS)
    df = V.load_predicted_vertebrae(out)  # a folder: its vertebrae.csv
    assert len(df) == 6 and df["p1x"].dtype == float and df["genant_grade"].tolist() == [0, 2, 0, 1, 0, 3]


def test_plot_helpers_draw(tmp_path):
    from matplotlib.figure import Figure

    truth, pred = _perfect(tmp_path)
    pred[0]["p1x"] += 3.0
    s = _summary(tmp_path, truth, pred)
    fig = Figure()
    ax1, ax2, ax3 = fig.subplots(1, 3)
    V.plot_point_errors(ax1, s["point_error"])
    V.plot_point_errors(ax2, [0.0, 1.0, 80.0])
    V.plot_grade_confusion(ax3, s["grade_agreement"])
    assert sum(p.get_height() for p in ax1.patches) == 36
    assert sum(p.get_height() for p in ax2.patches) == 3
    assert "kappa 1.000" in ax3.get_title()
    fig.savefig(tmp_path / "plots.png")


# --------------------------------------------------------------------------- evaluate.py end to end
def _tiny_infer_folder(tmp_path):
    """Three 120 x 80 PNG films, truth vertebrae, predictions.csv, JSONs; c.png failed inference."""
    import cv2

    data, infer = tmp_path / "data", tmp_path / "infer"
    data.mkdir()
    infer.mkdir()
    truth, pred = [], []
    manifest = []
    for i, (name, layout) in enumerate((("a", LAYOUT), ("b", LAYOUT_B), ("c", LAYOUT))):
        image = data / f"{name}.png"
        img = np.full((120, 80), 30, np.uint8)
        for _, y0, *_ in layout:
            img[int(y0):int(y0 + HEIGHT), 20:50] = 200
        cv2.imwrite(str(image), img)
        fracture = int(any(g > 0 for _, _, g, *_ in layout))
        manifest.append({"image": image.name, "patient_id": f"p{i}", "fracture": fracture, "acute": 1})
        for level, y0, grade, acute, p_f, p_a in layout:
            truth.append(_truth_row(image.name, level, y0, grade, acute))
            if name != "c":
                pred.append(_pred_row(str(image.resolve()), level, y0, grade, p_f, p_a))
    pred = [p for p in pred if not (p["name"] == "b" and p["level"] == "L3")]  # b's grade-3 L3 missed
    _write_csv(data / "manifest.csv", manifest, ["image", "patient_id", "fracture", "acute"])
    _write_csv(data / "vertebrae.csv", truth, TRUTH_FIELDS)
    rows = []
    for name, p_f in (("a", 0.8), ("b", 0.7)):
        image = str((data / f"{name}.png").resolve())
        rows.append({"image": image, "name": name, "p_fracture": p_f, "p_acute": 0.5, "p_acute_given_fracture": 0.6,
                     "heatmap_peak_x": 35, "heatmap_peak_y": 50, "status": "ok", "error": ""})
        verts = [{"level": p["level"], "genant_grade": p["genant_grade"], "p_fracture": p["p_fracture"],
                  "points": [[p[f"p{k}x"], p[f"p{k}y"]] for k in range(1, 7)]} for p in pred if p["name"] == name]
        (infer / f"{name}.json").write_text(json.dumps({
            "image": image, "name": name, "status": "ok", "p_fracture": p_f, "p_acute": 0.5,
            "heatmap_peak": [35, 50], "levels_trusted": name == "a", "vertebrae": verts}))
    rows.append({"image": str((data / "c.png").resolve()), "name": "c", "status": "error", "error": "boom"})
    _write_csv(infer / "predictions.csv", rows, ["image", "name", "p_fracture", "p_acute", "p_acute_given_fracture",
                                                 "heatmap_peak_x", "heatmap_peak_y", "status", "error"])
    return data, infer, pred


def test_evaluate_cli_writes_vertebrae_section(tmp_path, capsys):
    import evaluate

    data, infer, pred = _tiny_infer_folder(tmp_path)
    args = ["--predictions", str(infer / "predictions.csv"), "--manifest", str(data / "manifest.csv"),
            "--n-boot", "20"]
    # without OUT/vertebrae.csv: no per-vertebra section
    r0 = evaluate.main(args + ["--out", str(tmp_path / "r0")])
    assert "vertebrae" not in r0
    assert "Per-vertebra localisation" not in (tmp_path / "r0" / "report.html").read_text()
    assert not (tmp_path / "r0" / "vertebrae.png").exists()
    capsys.readouterr()

    _write_csv(infer / "vertebrae.csv", pred, PRED_FIELDS)
    out = tmp_path / "r1"
    evaluate.main(args + ["--out", str(out)])
    printed = capsys.readouterr().out
    assert "per-vertebra: recall 0.833 (5/6)" in printed
    data_json = json.loads((out / "metrics.json").read_text())
    v = data_json["vertebrae"]
    assert v["available"] is True and v["inputs"]["predicted"] == str(infer / "vertebrae.csv")
    assert v["counts"]["n_truth_images_without_prediction"] == 1  # c.png failed
    assert v["counts"]["n_evaluated_images"] == 2
    assert v["detection"]["recall"] == pytest.approx(5 / 6) and v["detection"]["precision"] == 1.0
    assert v["point_error"]["pixels"]["median"] == 0.0
    assert v["level_accuracy"]["accuracy"] == 1.0
    assert v["level_accuracy"]["by_levels_trusted"]["true"]["n"] == 3  # a.png
    assert v["level_accuracy"]["by_levels_trusted"]["false"]["n"] == 2  # b.png, L3 missed
    # b's missed grade-3 vertebra scores 0: below all three normal vertebrae (0.10, 0.20, 0.30)
    assert v["auroc_fracture"]["auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0, 0],
                                                                       [0.80, 0.60, 0.0, 0.10, 0.20, 0.30]))
    assert v["auroc_fracture"]["n_unmatched_scored_zero"] == 1
    assert v["grade_agreement"]["kappa_quadratic"] == pytest.approx(1.0) and v["grade_agreement"]["n"] == 5
    assert set(v) == {"available", "inputs", "rules", "counts", "detection", "point_error", "level_accuracy",
                      "auroc_fracture", "auroc_acute", "grade_agreement", "auroc_by_grade", "auroc_by_level"}
    assert (out / "vertebrae.png").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "Per-vertebra localisation and grading" in html
    assert "5 / 6 truth vertebrae matched" in html
    assert "1 truth image(s) without an ok prediction were left out" in html
    assert html.count("data:image/png;base64,") > (tmp_path / "r0" / "report.html").read_text().count(
        "data:image/png;base64,")
    # the rest of the report is unchanged by the section
    r0.pop("inputs")
    data_json.pop("inputs")
    data_json.pop("vertebrae")
    assert data_json["roc"] == json.loads(json.dumps(r0["roc"]))


def test_no_predicted_vertebra_at_all(tmp_path):
    truth, _ = _perfect(tmp_path)
    pred_df, truth_df = _load(tmp_path, truth, [])
    assert len(pred_df) == 0
    s = V.summarise_vertebrae(pred_df, truth_df, evaluated_images=[str(tmp_path / "a.png")])
    json.dumps(s, allow_nan=False)
    assert s["detection"]["recall"] == 0.0 and s["detection"]["n_missed"] == 3 and s["detection"]["precision"] is None
    assert s["auroc_fracture"]["n_unmatched_scored_zero"] == 3 and s["point_error"]["n_points"] == 0
    assert s["counts"]["n_truth_images_without_prediction"] == 1  # b.png
