"""evaluate.py / evaluation.report / evaluation.bootstrap / evaluation.compare on the tiny
synthetic set of ``tiny_eval_set`` (conftest.py) and on small synthetic arrays."""
import json
import os
import time

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluation import bootstrap as B
from evaluation import compare as C
from evaluation import metrics as M
from evaluation.report import compute as R
from evaluation.report import page

N_BOOT = 200


def _evaluate(s, **kw):
    kw.setdefault("n_boot", N_BOOT)
    return R.evaluate(s["predictions"], s["manifest"], s["vertebrae"], s["infer_dir"], **kw)


def _rewrite_jsons(infer_dir, fn):
    for name in sorted(os.listdir(infer_dir)):
        if name.endswith(".json"):
            path = os.path.join(infer_dir, name)
            rec = json.loads(open(path).read())
            fn(rec)
            open(path, "w").write(json.dumps(rec))


# --------------------------------------------------------------------------- evaluate.py end to end
def test_evaluate_cli_writes_metrics_plots_and_html(tiny_eval_set, tmp_path):
    import evaluate

    s = tiny_eval_set
    out = tmp_path / "report"
    result = evaluate.main(["--predictions", s["predictions"], "--manifest", s["manifest"],
                            "--vertebrae", s["vertebrae"], "--infer-dir", s["infer_dir"], "--out", str(out),
                            "--n-boot", str(N_BOOT), "--seed", "3"])
    data = json.loads((out / "metrics.json").read_text())
    json.dumps(data, allow_nan=False)  # NaN were written as null
    assert data == json.loads(json.dumps(result))
    for key in ("schema_version", "inputs", "counts", "bootstrap", "auroc_fracture", "auroc_acute", "roc", "pr",
                "by_grade", "by_level", "operating_points", "stored_operating_point", "grade_confusion",
                "calibration", "pointing_game", "gallery", "notes"):
        assert key in data, key
    assert data["bootstrap"]["unit"] == "patient" and data["bootstrap"]["n_boot"] == N_BOOT
    assert data["bootstrap"]["seed"] == 3
    assert set(data["operating_points"]) == {"high_sensitivity", "balanced", "high_specificity"}
    assert data["roc"]["fracture"]["n_unknown_left_out"] == 2
    assert data["calibration"]["p_fracture"]["n_unknown_left_out"] == 2
    assert data["roc"]["acute"]["n_unknown_left_out"] == 1
    assert data["pointing_game"] == {"hits": 3, "n": 5, "score": pytest.approx(0.6)}
    assert data["grade_confusion"] == {"available": False, "note": "not available (no per-vertebra predictions)"}
    # the legacy point values are unchanged
    assert data["auroc_fracture"] == pytest.approx(M.summarise(s["predictions"], s["manifest"])["auroc_fracture"])
    for png in ("roc.png", "roc_pr.png", "confusion.png", "reliability.png", "by_level.png", "gallery.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png  # a whole PNG, written atomically
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))

    html = (out / "report.html").read_text()
    assert "2 image(s) with an unknown fracture label" in html
    assert "1 fractured image(s) with an unknown acute label" in html
    assert "not clinical performance" in html
    assert "not available (no per-vertebra predictions)" in html
    # self-contained: every image is embedded
    assert html.count("data:image/png;base64,") >= 4 + 8  # 4 plots + the 4 + 4 gallery overlays
    assert 'src="/' not in html and "src='/" not in html
    # the worst false negative / positive and their overlays
    gal = data["gallery"]
    assert gal["false_negatives"][0]["name"] == "img_03" and gal["false_positives"][0]["name"] == "img_07"
    assert gal["false_positives"][0]["overlay"].endswith("img_07_heatmap.png")


def test_cis_contain_the_point_estimates(tiny_eval_set):
    r = _evaluate(tiny_eval_set)
    checked = 0

    def check(d, key):
        nonlocal checked
        if d.get(key) is None or d.get("ci_low") is None:
            return
        assert d["ci_low"] - 1e-12 <= d[key] <= d["ci_high"] + 1e-12, (key, d)
        checked += 1

    for task in r["roc"]:
        check(r["roc"][task], "auroc")
        check(r["pr"][task], "average_precision")
    for g in r["by_grade"].values():
        check(g, "auroc")
    for op in r["operating_points"].values():
        for k in ("sensitivity", "specificity", "ppv", "npv"):
            check(op[k], "value")
    for c in r["calibration"].values():
        check(c["ece"], "ece")
    assert checked >= 20
    # roc.fracture agrees with scikit-learn
    t = pd.DataFrame(tiny_eval_set["truth"])
    t = t[(t["status"] == "ok") & t["fracture"].notna()]
    assert r["roc"]["fracture"]["auroc"] == pytest.approx(roc_auc_score(t["fracture"], t["p_fracture"]))
    assert r["pr"]["fracture"]["average_precision"] == pytest.approx(average_precision_score(t["fracture"], t["p_fracture"]))


def test_seed_makes_the_bootstrap_reproducible(tiny_eval_set):
    a, b, c = _evaluate(tiny_eval_set, seed=1), _evaluate(tiny_eval_set, seed=1), _evaluate(tiny_eval_set, seed=2)
    assert a["roc"]["fracture"] == b["roc"]["fracture"]
    assert a["roc"]["fracture"]["ci_low"] != c["roc"]["fracture"]["ci_low"] or \
        a["calibration"]["p_fracture"]["ece"] != c["calibration"]["p_fracture"]["ece"]


# --------------------------------------------------------------------------- patient resampling
def test_bootstrap_resamples_patients_not_images():
    patients = ["a", "a", "b", "c", "c", "c", "d"]
    idx = B.patient_bootstrap_indices(patients, n_boot=300, seed=5)
    W = B.patient_bootstrap_weights(patients, n_boot=300, seed=5)
    assert W.shape == (300, 7)
    lengths = set()
    for b, ix in enumerate(idx):
        counts = np.bincount(ix, minlength=7)
        np.testing.assert_array_equal(counts, W[b])  # indices and weights are the same resamples
        assert counts[0] == counts[1]  # images of patient a always travel together
        assert counts[3] == counts[4] == counts[5]
        # exactly as many patients drawn as there are patients
        assert counts[0] + counts[2] + counts[3] + counts[6] == 4
        lengths.add(len(ix))
    assert len(lengths) > 1  # image counts vary: whole patients were drawn
    # every patient is drawn sometimes and left out sometimes
    assert (W[:, [0, 2, 3, 6]] == 0).any(axis=0).all() and (W[:, [0, 2, 3, 6]] > 0).any(axis=0).all()


def test_evaluate_bootstraps_the_manifest_patients(tiny_eval_set, tmp_path):
    s = tiny_eval_set
    man = pd.read_csv(s["manifest"], dtype=str, keep_default_na=False)
    man.loc[man["image"].str.contains("img_07"), "patient_id"] = "p06"  # img_06 and img_07: one patient
    alt = os.path.join(s["data_dir"], "manifest_shared.csv")
    man.to_csv(alt, index=False)
    r = R.evaluate(s["predictions"], alt, n_boot=N_BOOT)
    assert r["bootstrap"]["n_patients"] == 10 and r["bootstrap"]["n_images"] == 11
    df = M.join_predictions(s["predictions"], alt)
    W = B.patient_bootstrap_weights(df["patient_id"], N_BOOT, 0)
    i6, i7 = df.index[df["name"] == "img_06"][0], df.index[df["name"] == "img_07"][0]
    np.testing.assert_array_equal(W[:, i6], W[:, i7])


def test_weighted_metrics_match_sklearn_and_torchmetrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80).astype(float)
    s = np.round(rng.random(80), 2)  # with ties
    ones = np.ones((1, 80))
    assert B.weighted_auroc(y, s, ones)[0] == pytest.approx(roc_auc_score(y, s))
    assert B.weighted_average_precision(y, s, ones)[0] == pytest.approx(average_precision_score(y, s))
    w = rng.integers(0, 4, 80).astype(float)
    assert B.weighted_auroc(y, s, w[None])[0] == pytest.approx(roc_auc_score(y, s, sample_weight=w))
    assert B.weighted_average_precision(y, s, w[None])[0] == pytest.approx(average_precision_score(y, s, sample_weight=w))
    assert B.weighted_ece(y, s, ones)[0] == pytest.approx(M.expected_calibration_error(y, s), abs=1e-9)
    assert np.isnan(B.weighted_auroc(np.ones(3), np.array([0.1, 0.2, 0.3]), np.ones((1, 3)))[0])


def test_bootstrap_is_fast():
    rng = np.random.default_rng(1)
    n = 500
    y = rng.integers(0, 2, n).astype(float)
    s = rng.random(n)
    patients = [f"p{i // 2}" for i in range(n)]
    t0 = time.perf_counter()
    W = B.patient_bootstrap_weights(patients, 1000, 0)
    B.weighted_auroc(y, s, W)
    B.weighted_average_precision(y, s, W)
    B.weighted_ece(y, s, W)
    B.rates_from_confusion(B.weighted_confusion(y, s, W, 0.5))
    B.roc_band(y, s, W)
    B.pr_band(y, s, W)
    assert time.perf_counter() - t0 < 10.0


# --------------------------------------------------------------------------- operating points
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_operating_points_satisfy_their_constraints(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150).astype(float)
    s = np.round(np.clip(y * 0.3 + rng.normal(0.35, 0.2, 150), 0, 1), 3)
    ops = M.operating_points(y, s)
    cand = np.unique(np.r_[s, np.nextafter(s.max(), np.inf)])

    def sens_spec(t):
        pred = s >= t
        return pred[y == 1].mean(), (~pred[y == 0]).mean()

    t = ops["high_sensitivity"]["threshold"]
    assert sens_spec(t)[0] >= 0.90
    assert all(sens_spec(c)[0] < 0.90 for c in cand[cand > t])  # the highest such threshold
    t = ops["high_specificity"]["threshold"]
    assert sens_spec(t)[1] >= 0.95
    assert all(sens_spec(c)[1] < 0.95 for c in cand[cand < t])  # the lowest such threshold
    j = max(sum(sens_spec(c)) - 1 for c in cand)
    assert sum(sens_spec(ops["balanced"]["threshold"])) - 1 == pytest.approx(j)
    # the reported rates are those of the threshold
    m = R.operating_point_metrics(y, s, np.ones((1, y.size)), t)
    assert m["specificity"]["value"] == pytest.approx(sens_spec(t)[1])
    assert sum(m["confusion"].values()) == y.size


def test_operating_points_on_tiny_set(tiny_eval_set):
    r = _evaluate(tiny_eval_set)
    ops = r["operating_points"]
    assert ops["high_sensitivity"]["sensitivity"]["value"] >= 0.90
    assert ops["high_specificity"]["specificity"]["value"] >= 0.95
    assert ops["high_specificity"]["threshold"] == pytest.approx(0.7)  # just above the top normal (0.6)
    assert ops["high_specificity"]["confusion"] == {"tp": 3, "fn": 2, "fp": 0, "tn": 4}
    assert r["stored_operating_point"]["available"] is False


def test_stored_operating_point_from_decision_column_and_jsons(tiny_eval_set):
    """The outputs of infer.py with a calibrated checkpoint (docs/formats.md): predictions.csv
    `decision` / `operating_point` columns and a JSON `decision` dict."""
    s = tiny_eval_set
    pred = pd.read_csv(s["predictions"], dtype=str, keep_default_na=False)
    p = pd.to_numeric(pred["p_fracture"], errors="coerce")
    pred["decision"] = np.where(p.isna(), "", np.where(p >= 0.5, "1", "0"))
    pred["operating_point"] = np.where(p.isna(), "", "balanced")
    pred.to_csv(s["predictions"], index=False)

    def add(rec):
        rec["decision"] = {"operating_point": "balanced", "threshold": 0.5, "fracture": rec["p_fracture"] >= 0.5,
                           "validation_sensitivity": 0.9, "validation_specificity": 0.8}
        rec["p_fracture_uncalibrated"] = min(1.0, rec["p_fracture"] * 1.2)
        rec["calibration"] = {"method": "temperature", "fitted_on_images": 30, "split": "all", "date": "x"}

    _rewrite_jsons(s["infer_dir"], add)
    r = _evaluate(s)
    st = r["stored_operating_point"]
    assert st["available"] and "decision" in st["source"]
    assert st["name"] == "balanced" and st["threshold"] == 0.5 and st["validation_sensitivity"] == 0.9
    # normals 0.10 0.30 0.60 0.20; fractured 0.95 0.80 0.55 0.40 0.70
    assert st["confusion"] == {"tp": 4, "fn": 1, "fp": 1, "tn": 3}
    assert st["sensitivity"]["value"] == pytest.approx(0.8)
    assert r["inference_calibration"]["method"] == "temperature"
    assert r["calibration"]["p_fracture_uncalibrated"]["n"] == 9
    html = page.render_html(r)
    assert "Stored operating point (predictions.csv" in html and "sensitivity 0.900 and specificity 0.800" in html
    assert "applied the checkpoint's calibration" in html and "temperature" in html

    # the JSONs alone (no decision column): yes/no from decision.fracture
    pred.drop(columns=["decision", "operating_point"]).to_csv(s["predictions"], index=False)
    st = _evaluate(s)["stored_operating_point"]
    assert st["available"] and "JSON" in st["source"] and st["name"] == "balanced"
    assert st["confusion"] == {"tp": 4, "fn": 1, "fp": 1, "tn": 3}

    # an operating point with a threshold only: decision = p_fracture >= threshold
    def threshold_only(rec):
        rec.pop("decision")
        rec["operating_point"] = {"name": "custom", "threshold": 0.58}
    _rewrite_jsons(s["infer_dir"], threshold_only)
    st = _evaluate(s)["stored_operating_point"]
    assert st["name"] == "custom" and st["threshold"] == 0.58
    assert st["confusion"] == {"tp": 3, "fn": 2, "fp": 1, "tn": 3}


# --------------------------------------------------------------------------- grade confusion, by level
def test_grade_confusion_from_per_vertebra_predictions(tiny_eval_set):
    s = tiny_eval_set
    vert = M.load_vertebrae_table(s["vertebrae"], s["manifest"])
    truth = {(os.path.basename(i), l): g for i, l, g in zip(vert["image"], vert["level"], vert["genant_grade"])}

    def add(rec):
        base = os.path.basename(rec["image"])
        verts = []
        for level in ("L1", "L2", "L3"):
            g = truth.get((base, level))
            if g is None or np.isnan(g):
                continue
            g = int(g)
            if base == "img_00.png" and level == "L2":
                g = 2  # truth 3
            if base == "img_05.png" and level == "L1":
                g = 1  # truth 0
            verts.append({"level": level, "genant_grade": g})
        rec["vertebrae"] = verts

    _rewrite_jsons(s["infer_dir"], add)
    gc = _evaluate(s)["grade_confusion"]
    assert gc["available"]
    mat = np.array(gc["matrix"])
    assert mat.shape == (4, 4)
    assert mat[3, 2] == 1 and mat[0, 1] == 1
    assert mat.sum() == gc["n_matched"] == 9 * 3  # nine ok images with known grades, three levels each
    assert mat.trace() == mat.sum() - 2


def test_auroc_by_level(tiny_eval_set):
    s = tiny_eval_set
    r = _evaluate(s)
    assert list(r["by_level"]) == ["L1", "L2", "L3"]
    assert all(v["auroc"] is None and "n/a" in v["note"] for v in r["by_level"].values())  # < 5 positives
    r = _evaluate(s, min_level_positives=2)
    assert r["by_level"]["L1"]["auroc"] is None and r["by_level"]["L1"]["n_pos"] == 1
    t = pd.DataFrame(s["truth"]).set_index("name")
    neg = t.loc[["img_05", "img_06", "img_07", "img_08"], "p_fracture"]
    pos = t.loc[["img_00", "img_03"], "p_fracture"]  # fractured L2 (img_11 failed)
    expected = roc_auc_score(np.r_[np.ones(2), np.zeros(4)], np.r_[pos, neg])
    assert r["by_level"]["L2"]["auroc"] == pytest.approx(expected)
    assert r["by_level"]["L2"]["n_neg"] == 4


# --------------------------------------------------------------------------- calibration
def test_ece_small_when_calibrated_large_when_not():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(float)
    good = R.calibration_summary(y, p, patients=np.arange(y.size), n_boot=50)
    bad = R.calibration_summary(y, p ** 3, patients=np.arange(y.size), n_boot=50)
    assert good["ece"]["ece"] < 0.03
    assert bad["ece"]["ece"] > 0.15
    assert good["ece"]["ci_high"] < bad["ece"]["ci_low"]
    assert sum(b["n"] for b in good["reliability"]) == y.size
    # perfectly calibrated bins
    assert all(abs(b["observed"] - b["mean_predicted"]) < 0.05 for b in good["reliability"])


def test_ece_if_calibrated_is_the_floor_that_chance_alone_gives():
    rng = np.random.default_rng(1)
    p = rng.random(300)
    null = B.ece_if_calibrated(p, n_draws=400, seed=0)
    assert null == B.ece_if_calibrated(p, n_draws=400, seed=0)  # seeded
    # on 300 films even calibrated probabilities score well above 0 (about 0.03-0.06)
    assert 0.02 < null["mean"] < null["p95"] < 0.1
    calibrated = [M.expected_calibration_error((rng.random(300) < p).astype(float), p) for _ in range(200)]
    assert abs(np.mean(calibrated) - null["mean"]) < 0.005  # the same binning as the reported ECE
    y = (rng.random(300) < p).astype(float)
    summary = R.calibration_summary(y, p ** 3, patients=np.arange(300), n_boot=20)
    assert summary["ece"]["ece"] > summary["ece_if_calibrated"]["p95"]  # a real miscalibration stands out
    assert np.isnan(B.ece_if_calibrated([])["mean"])


# --------------------------------------------------------------------------- DeLong and paired tests
def _naive_delong_var(y, a, b):
    """Textbook DeLong (O(m n) placement values) variance of AUROC(a) - AUROC(b)."""
    def comps(s):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)

    (va, wa), (vb, wb) = comps(a), comps(b)
    s10, s01 = np.cov(np.vstack([va, vb])), np.cov(np.vstack([wa, wb]))
    S = s10 / va.size + s01 / wa.size
    return S[0, 0] + S[1, 1] - 2 * S[0, 1]


def test_delong_identical_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    a = y + rng.normal(0, 1, 60)
    r = C.delong_test(y, a, a.copy())
    assert r["difference"] == 0 and r["p_value"] == 1.0
    assert r["auroc_a"] == pytest.approx(roc_auc_score(y, a))


def test_delong_matches_sklearn_and_the_textbook_variance():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 90)
    a = y * 1.2 + rng.normal(0, 1, 90)
    b = np.round(y * 0.4 + rng.normal(0, 1, 90), 1)  # ties
    r = C.delong_test(y, a, b)
    assert r["auroc_a"] == pytest.approx(roc_auc_score(y, a))
    assert r["auroc_b"] == pytest.approx(roc_auc_score(y, b))
    assert r["se"] ** 2 == pytest.approx(_naive_delong_var(y, a, b))
    assert 0 < r["p_value"] < 1
    swapped = C.delong_test(y, b, a)
    assert swapped["difference"] == pytest.approx(-r["difference"]) and swapped["p_value"] == pytest.approx(r["p_value"])
    # a clearly better model
    strong = C.delong_test(np.r_[np.ones(100), np.zeros(100)], np.r_[np.ones(100), np.zeros(100)] + rng.normal(0, 0.3, 200),
                           rng.random(200))
    assert strong["p_value"] < 1e-6


def test_paired_bootstrap():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 120)
    a = y + rng.normal(0, 1, 120)
    patients = [f"p{i // 3}" for i in range(120)]
    same = C.paired_auroc_test(y, a, a.copy(), patients, n_boot=300, seed=0)
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["ci_low"] == same["ci_high"] == 0
    assert same["n_patients"] == 40
    b = a + rng.normal(0, 2, 120)
    r = C.paired_auroc_test(y, a, b, patients, n_boot=500, seed=0)
    assert r["difference"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert r["ci_low"] <= r["difference"] <= r["ci_high"]
    assert 0 <= r["p_value"] <= 1
    assert r["p_value"] < 0.05  # noise of sd 2 costs a lot of AUROC


def test_compare_two_prediction_files(tiny_eval_set, tmp_path):
    s = tiny_eval_set
    pred = pd.read_csv(s["predictions"])
    pred["p_fracture"] = (pred["p_fracture"] * 0.5 + 0.2).round(4)
    alt = tmp_path / "predictions_b.csv"
    pred.to_csv(alt, index=False)
    pairs = C.paired_frame(s["predictions"], alt, s["manifest"])
    assert pairs.attrs["n_both"] == 11 and pairs.attrs["n_fracture_unknown"] == 2
    res = C.compare_aurocs(pairs, n_boot=N_BOOT)
    json.dumps(res, allow_nan=False)
    assert res["delong"]["difference"] == pytest.approx(0) and res["delong"]["p_value"] == 1.0  # monotone transform
    assert res["paired_bootstrap"]["p_value"] == 1.0
    assert res["n_unknown_left_out"] == 2 and (res["n_pos"], res["n_neg"]) == (5, 4)


def test_evaluate_cli_names_a_missing_or_malformed_input(tiny_eval_set, tmp_path, capsys):
    import evaluate

    s = tiny_eval_set
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--predictions", str(tmp_path / "nope.csv"), "--manifest", s["manifest"],
                       "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "nope.csv: file not found" in capsys.readouterr().err
    broken = tmp_path / "predictions.csv"
    broken.write_text("name,score\na.png,0.3\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--predictions", str(broken), "--manifest", s["manifest"], "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "predictions.csv" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "metrics.json").exists()


# --------------------------------------------------------------------------- one ECE, one set of operating points
def _torchmetrics_ece(y, p, n_bins=10):
    import torch
    from torchmetrics.classification import BinaryCalibrationError

    metric = BinaryCalibrationError(n_bins=n_bins, norm="l1")
    return float(metric(torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(y, dtype=torch.long)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_bins", [10, 15])
def test_ece_equals_torchmetrics(seed, n_bins):
    rng = np.random.default_rng(seed)
    n = 500
    p = rng.random(n) ** (seed + 1)
    y = (rng.random(n) < np.clip(p + rng.normal(0, 0.2, n), 0, 1)).astype(float)
    # probabilities on the bin edges (torch's edges: 0.6 and 0.7 differ from numpy's in the last bit), 0 and 1
    p[:40] = np.round(rng.random(40), 1)
    p[40:45] = 1.0
    p[45:50] = 0.0
    assert M.expected_calibration_error(y, p, n_bins) == pytest.approx(_torchmetrics_ece(y, p, n_bins), abs=1e-12)


def test_ece_leaves_unknown_labels_out_and_weights_count_as_repeats():
    rng = np.random.default_rng(5)
    p = rng.random(200)
    y = (rng.random(200) < p ** 2).astype(float)
    w = rng.integers(0, 4, 200)
    repeated = M.expected_calibration_error(np.repeat(y, w), np.repeat(p, w))
    assert M.expected_calibration_error(y, p, weights=w) == pytest.approx(repeated, abs=1e-12)
    rows = M.expected_calibration_error(y, p, weights=np.vstack([w, np.ones(200)]))
    assert rows.shape == (2,) and rows[0] == pytest.approx(repeated, abs=1e-12)
    assert rows[1] == pytest.approx(M.expected_calibration_error(y, p), abs=1e-15)
    with_unknown = np.r_[y, np.nan, np.nan]
    assert M.expected_calibration_error(with_unknown, np.r_[p, 0.5, 0.9]) == M.expected_calibration_error(y, p)
    assert np.isnan(M.expected_calibration_error([], []))
    assert B.weighted_ece(y, p, w[None])[0] == pytest.approx(repeated, abs=1e-12)


def test_operating_points_are_those_of_the_roc_curve():
    """The one implementation gives the thresholds the report took from scikit-learn's roc_curve."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300).astype(float)
    s = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.2, 300), 0, 1), 2)  # with ties
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    thr[~np.isfinite(thr)] = np.nextafter(s.max(), np.inf)
    j = tpr - fpr
    ops = M.operating_points(y, s)
    assert ops["high_sensitivity"]["threshold"] == thr[np.flatnonzero(tpr >= M.TARGET_SENSITIVITY)[0]]
    assert ops["balanced"]["threshold"] == thr[np.flatnonzero(j >= j.max() - 1e-12)[-1]]
    assert ops["high_specificity"]["threshold"] == thr[np.flatnonzero(1 - fpr >= M.TARGET_SPECIFICITY)[-1]]
    assert set(ops) == set(M.OPERATING_POINTS)
    with pytest.raises(ValueError, match="both classes"):
        M.operating_points(np.ones(5), s[:5])


def test_metrics_json_is_computed_without_matplotlib(tiny_eval_set, tmp_path):
    import subprocess
    import sys

    s = tiny_eval_set
    code = ("import json, sys\n"
            "from evaluation.report import compute\n"
            f"r = compute.evaluate({s['predictions']!r}, {s['manifest']!r}, {s['vertebrae']!r}, {s['infer_dir']!r}, "
            "n_boot=20)\n"
            "json.dumps(r, allow_nan=False)\n"
            "print(sorted(m for m in sys.modules if m == 'matplotlib' or m.startswith('matplotlib.')))\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_inputs_are_read_once(tiny_eval_set, monkeypatch):
    s = tiny_eval_set
    calls = {"predictions": 0, "manifest": 0, "vertebrae": 0, "jsons": 0}
    for name, key in (("load_predictions_table", "predictions"), ("load_manifest_table", "manifest"),
                      ("load_vertebrae_table", "vertebrae"), ("read_inference_jsons", "jsons")):
        original = getattr(M, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(M, name, counted)
    R.evaluate(s["predictions"], s["manifest"], s["vertebrae"], s["infer_dir"], n_boot=20)
    assert calls == {"predictions": 1, "manifest": 1, "vertebrae": 1, "jsons": 1}


def test_side_by_side_table_reads_each_report(tmp_path, capsys):
    """make demo shows the shipped and the fine-tuned model's numbers in one table."""
    from evaluation.side_by_side import main as side_by_side

    for name, auroc, recall in (("a", 0.61, 0.5), ("b", 0.93, 0.975)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"auroc_fracture": auroc, "vertebrae": {"detection": {"recall": recall}}}))
    assert side_by_side([f"shipped={tmp_path / 'a'}", f"tuned={tmp_path / 'b'}", "--out", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| image fracture AUROC | 0.610 | 0.930 |" in table
    assert "| vertebrae found (recall) | 0.500 | 0.975 |" in table and "| level accuracy | n/a | n/a |" in table
    assert side_by_side([f"x={tmp_path / 'missing'}"]) == 2 and "missing" in capsys.readouterr().err


def test_evaluate_counts_what_it_leaves_out_by_reason(tiny_eval_set, tmp_path, capsys):
    """An error row, a refused and a no-spine film, a film without a row, an infinite and an empty
    score, a stray and a repeated row: each is counted under its reason, printed and in metrics.json."""
    import evaluate

    s = tiny_eval_set
    table = pd.read_csv(s["predictions"], dtype=str, keep_default_na=False)
    name = table["name"]
    table.loc[name == "img_05", "p_fracture"] = "inf"
    table.loc[name == "img_06", "p_fracture"] = ""
    for film, status in (("img_09", "refused"), ("img_10", "no_spine")):
        table.loc[name == film, ["status", "p_fracture"]] = [status, ""]
    table = pd.concat([table[name != "img_07"], table[name == "img_08"]])  # one film gone, one twice
    predictions = tmp_path / "predictions.csv"
    table.to_csv(predictions, index=False)
    out = tmp_path / "report"
    result = evaluate.main(["--predictions", str(predictions), "--manifest", s["manifest"], "--out", str(out),
                            "--n-boot", "10", "--gallery", "0"])
    # img_09 and img_10 are the two films of unknown label: turned away, they count under their status
    expected = {"error_row": 1, "refused": 1, "no_spine": 1, "no_prediction": 1, "non_finite_score": 2,
                "missing_label": 0, "not_in_manifest": 1, "duplicate_prediction": 1}
    assert result["left_out"] == expected
    assert json.loads((out / "metrics.json").read_text())["left_out"] == expected
    fracture = result["roc"]["fracture"]
    assert fracture["n_pos"] + fracture["n_neg"] + sum(list(expected.values())[:6]) == 12  # the manifest's images
    assert (fracture["n_pos"], fracture["n_neg"]) == (5, 1)
    printed = capsys.readouterr().out
    assert ("left out: 1 prediction failed (error row); 1 refused: not a readable spine radiograph (status "
            "refused); 1 no spine found (status no_spine); 1 not in predictions.csv; 2 p_fracture empty, NaN or "
            "infinite; 1 prediction row not in the manifest; 1 repeated prediction row of an image") in printed
    assert "Left out, by reason" in (out / "report.html").read_text()


def test_gallery_titles_cut_long_names_in_the_middle():
    from evaluation.report.plots import short_name

    name = "00010_sunhl-1th-09-Jan-2017-197_C_AP_0"
    cut = short_name(name)
    assert len(cut) == 30 and cut.startswith("00010_sunhl-1") and cut.endswith("2017-197_C_AP_0") and "…" in cut
    assert short_name("phantom_s12_00017") == "phantom_s12_00017"
