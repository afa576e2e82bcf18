"""Calibration (temperature / isotonic), operating points, calibrated checkpoints and inference."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from calibration import CALIBRATION_KEY, METHODS, CalibrationError, Calibrator
from calibration.fit import calibrate_model, choose_method, cross_validate_methods, main
from models.bundle import load_bundle
from evaluation.metrics import expected_calibration_error, operating_points


# the fitted parameters of one head, in their stored form
def fit_temperature(logits, labels):
    return METHODS["temperature"].fit(logits, None, labels).to_json()


def fit_platt(logits, labels):
    return METHODS["platt"].fit(logits, None, labels).to_json()


def fit_beta(logits, labels):
    return METHODS["beta"].fit(logits, None, labels).to_json()


def fit_isotonic(probs, labels):
    return METHODS["isotonic"].fit(None, probs, labels).to_json()


def _synthetic(n=20000, t_true=2.5, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z / t_true))).astype(float)
    return z, y


def test_temperature_recovers_known_temperature_and_lowers_ece():
    z, y = _synthetic()
    y_with_unknown = y.copy()
    y_with_unknown[::50] = np.nan  # unknown labels are skipped, not taken as negative
    t = fit_temperature(z, y_with_unknown)
    assert abs(t - 2.5) / 2.5 < 0.08, t
    cal = Calibrator("temperature", temperature={"p_fracture": t})
    p_raw = 1.0 / (1.0 + np.exp(-z))
    before = expected_calibration_error(y, p_raw)
    after = expected_calibration_error(y, cal.apply(z, logits=True))
    assert after < before / 3, (before, after)
    # from probabilities or from logits: the same map
    assert np.allclose(cal.apply(p_raw[:100]), cal.apply(z[:100], logits=True), atol=1e-6)
    with pytest.raises(CalibrationError, match="both classes"):
        fit_temperature(z[:10], np.ones(10))


def test_platt_recovers_slope_and_intercept_where_temperature_cannot(tmp_path):
    rng = np.random.default_rng(11)
    z = rng.normal(0.0, 4.0, 20000)
    y = (rng.random(len(z)) < 1.0 / (1.0 + np.exp(-(0.5 * z - 1.5)))).astype(float)
    y_with_unknown = y.copy()
    y_with_unknown[::40] = np.nan  # skipped, not taken as negative
    ab = fit_platt(z, y_with_unknown)
    assert abs(ab["a"] - 0.5) < 0.04 and abs(ab["b"] + 1.5) < 0.1, ab
    platt = Calibrator("platt", platt={"p_fracture": ab})
    temperature = Calibrator("temperature", temperature={"p_fracture": fit_temperature(z, y)})
    p_raw = 1.0 / (1.0 + np.exp(-z))
    ece_raw = expected_calibration_error(y, p_raw)
    ece_platt = expected_calibration_error(y, platt.apply(z, logits=True))
    ece_temperature = expected_calibration_error(y, temperature.apply(z, logits=True))
    # a temperature cannot move the 0.5 point; the intercept can
    assert ece_platt < ece_temperature / 3 and ece_platt < ece_raw / 3, (ece_raw, ece_temperature, ece_platt)
    assert np.allclose(platt.apply(p_raw[:100]), platt.apply(z[:100], logits=True), atol=1e-6)
    q = np.linspace(0.01, 0.99, 50)
    assert np.all(np.diff(platt.apply(q)) > 0)  # increasing: the ranking is kept
    assert np.allclose(platt.apply(q, "p_acute_given_fracture"), q, rtol=0, atol=1e-12)  # identity where not fitted

    torch.save({"vcf_calibration": Calibrator("platt", platt={"p_fracture": ab}, points=operating_points(
        y, platt.apply(z, logits=True))).to_dict()}, tmp_path / "c.pt")
    stored = torch.load(tmp_path / "c.pt", weights_only=True)["vcf_calibration"]
    assert stored["method"] == "platt" and stored["platt"]["p_fracture"] == ab
    back = Calibrator.from_dict(stored)
    assert np.array_equal(back.apply(q), platt.apply(q))
    assert f"p_fracture sigmoid({ab['a']:.4g} * logit - {-ab['b']:.4g})" in back.describe()
    from evaluation.model_card import _calibration_details

    card = _calibration_details(stored)  # the model card shows the map, not a raw dict
    assert f"| platt | p_fracture: sigmoid({ab['a']:.4g} * logit - {-ab['b']:.4g})" in card, card
    assert "p_acute_given_fracture: sigmoid(1 * logit + 0)" in card, card

    with pytest.raises(CalibrationError, match="both classes"):
        fit_platt(z[:10], np.zeros(10))
    with pytest.raises(CalibrationError, match="slope"):
        Calibrator("platt", platt={"p_fracture": {"a": -1.0, "b": 0.0}})
    with pytest.raises(CalibrationError, match="malformed"):
        Calibrator("platt", platt={"p_fracture": {"a": 1.0}})


def test_isotonic_lowers_ece_and_round_trips_weights_only(tmp_path):
    z, y = _synthetic(n=5000, seed=1)
    p = 1.0 / (1.0 + np.exp(-z))
    table = fit_isotonic(p, y)
    assert all(type(v) is float for v in table["x"] + table["y"])
    assert np.all(np.diff(table["y"]) >= 0)
    cal = Calibrator("isotonic", isotonic={"p_fracture": table, "p_acute_given_fracture": None},
                     points=operating_points(y, p), default="high_sensitivity")
    assert expected_calibration_error(y, cal.apply(p)) < expected_calibration_error(y, p)
    torch.save({"vcf_calibration": cal.to_dict()}, tmp_path / "c.pt")
    back = Calibrator.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["vcf_calibration"])
    assert back.method == "isotonic" and back.default == "high_sensitivity"
    q = np.linspace(0, 1, 101)
    assert np.array_equal(back.apply(q), cal.apply(q))
    assert np.array_equal(back.apply(q, "p_acute_given_fracture"), q)  # identity where not fitted
    probs = {"p_fracture": q.astype(np.float32), "p_acute_given_fracture": np.full(101, 0.5, np.float32),
             "heatmap": np.zeros((101, 2, 2), np.float32)}
    out = back.apply_probabilities(probs)
    assert out["p_fracture"].dtype == np.float32
    assert np.allclose(out["p_acute"], out["p_fracture"] * 0.5)
    assert np.array_equal(out["p_fracture_uncalibrated"], probs["p_fracture"])


def test_operating_points_satisfy_their_constraints():
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.3).astype(float)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    pts = operating_points(y, p)
    cands = np.unique(np.append(p, np.nextafter(p.max(), np.inf)))

    def rates(t):
        pred = p >= t
        return pred[y == 1].mean(), (~pred[y == 0]).mean()

    hs, bal, sp = pts["high_sensitivity"], pts["balanced"], pts["high_specificity"]
    for pt in pts.values():
        assert np.allclose(rates(pt["threshold"]), (pt["sensitivity"], pt["specificity"]))
    assert hs["sensitivity"] >= 0.90
    assert all(rates(t)[0] < 0.90 for t in cands[cands > hs["threshold"]])  # the highest such
    assert sp["specificity"] >= 0.95
    assert all(rates(t)[1] < 0.95 for t in cands[cands < sp["threshold"]])  # the lowest such
    best_j = max(sum(rates(t)) - 1 for t in cands)
    assert np.isclose(bal["youden_j"], best_j) and np.isclose(bal["sensitivity"] + bal["specificity"] - 1, best_j)
    assert hs["threshold"] <= bal["threshold"] <= sp["threshold"]


def _patients(n, per_patient=2):
    return np.arange(n) // per_patient


def test_cross_validation_prefers_the_method_that_fits_the_miscalibration():
    rng = np.random.default_rng(5)
    n = 4000
    p_true = rng.uniform(0.01, 0.99, n)
    y = (rng.random(n) < p_true).astype(float)
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    groups = _patients(n)

    # already calibrated: no method beats leaving it alone by more than the tie margin (the
    # Brier score decides: the 10-bin ECE alone moves by about 0.005 between such fits)
    sel = cross_validate_methods(logit(p_true), p_true, y, groups)
    assert sel["folds"] == 5 and sel["n_images"] == n
    assert choose_method(sel) == "none", sel

    # too confident by a temperature: temperature scaling (or isotonic) fixes it, 'none' does not
    z_hot = 3.0 * logit(p_true)
    sel = cross_validate_methods(z_hot, 1 / (1 + np.exp(-z_hot)), y, groups)
    s = sel["scores"]
    assert s["temperature"]["ece"] < s["none"]["ece"] / 3 and s["temperature"]["brier"] < s["none"]["brier"]
    assert choose_method(sel) in ("temperature", "isotonic")

    # a shape no affine map of the logit fixes (calibrated below 0.5, far too confident above):
    # a map that bends the two ends apart (beta) or any monotone map (isotonic) wins out of fold
    z_true = logit(p_true)
    z_kinked = np.where(z_true > 0, 4.0 * z_true, z_true)
    sel = cross_validate_methods(z_kinked, 1 / (1 + np.exp(-z_kinked)), y, groups)
    s = sel["scores"]
    for affine in ("temperature", "platt"):
        assert s["isotonic"]["ece"] < s[affine]["ece"] and s["isotonic"]["brier"] < s[affine]["brier"], s
        assert s["beta"]["ece"] < s[affine]["ece"] and s["beta"]["brier"] < s[affine]["brier"], s
    assert choose_method(sel) in ("beta", "isotonic") and choose_method(sel, by="ece") in ("beta", "isotonic")
    with pytest.raises(ValueError, match="selection score"):
        choose_method(sel, by="auroc")

    # every logit shifted (a site that over-calls as a whole): only an intercept (Platt or
    # isotonic) fixes it; Platt, with two parameters, is the better fit out of fold
    z_shift = logit(p_true) + 1.5
    sel = cross_validate_methods(z_shift, 1 / (1 + np.exp(-z_shift)), y, groups)
    s = sel["scores"]
    assert s["platt"]["brier"] < s["temperature"]["brier"] and s["platt"]["ece"] < s["temperature"]["ece"] / 3
    assert choose_method(sel) == "platt"


def _beta_truth(z, a, b, c):
    """sigmoid(a ln p - b ln(1 - p) + c) of p = sigmoid(z)."""
    s = -a * np.logaddexp(0.0, -z) + b * np.logaddexp(0.0, z) + c
    return 1.0 / (1.0 + np.exp(-s))


def test_beta_calibration_bends_the_two_ends_apart_where_platt_cannot(tmp_path):
    rng = np.random.default_rng(12)
    z = rng.normal(0.0, 2.0, 20000)
    # too high at the bottom, about right at the top: the miscalibration seen on simulated-real films
    y = (rng.random(len(z)) < _beta_truth(z, a=1.6, b=0.7, c=-0.3)).astype(float)
    y_with_unknown = y.copy()
    y_with_unknown[::40] = np.nan  # skipped, not taken as negative
    abc = fit_beta(z, y_with_unknown)
    # a and c trade off against each other on a finite sample: checked loosely
    assert abs(abc["a"] - 1.6) < 0.25 and abs(abc["b"] - 0.7) < 0.1 and abs(abc["c"] + 0.3) < 0.25, abc
    beta = Calibrator("beta", beta={"p_fracture": abc})
    platt = Calibrator("platt", platt={"p_fracture": fit_platt(z, y)})
    ece_beta = expected_calibration_error(y, beta.apply(z, logits=True))
    ece_platt = expected_calibration_error(y, platt.apply(z, logits=True))
    assert ece_beta < 0.7 * ece_platt, (ece_beta, ece_platt)
    p_raw = 1.0 / (1.0 + np.exp(-z))
    assert np.allclose(beta.apply(p_raw[:100]), beta.apply(z[:100], logits=True), atol=1e-6)
    q = np.linspace(0.01, 0.99, 50)
    assert np.all(np.diff(beta.apply(q)) > 0)  # increasing: the ranking is kept
    assert np.allclose(beta.apply(q, "p_acute_given_fracture"), q, rtol=0, atol=1e-9)  # identity where not fitted
    # with a = b it is Platt scaling
    same = Calibrator("beta", beta={"p_fracture": {"a": 0.5, "b": 0.5, "c": -1.5}})
    assert np.allclose(same.apply(z[:200], logits=True),
                       Calibrator("platt", platt={"p_fracture": {"a": 0.5, "b": -1.5}}).apply(z[:200], logits=True))
    # extreme logits stay finite
    assert np.isfinite(beta.apply(np.array([-800.0, 800.0]), logits=True)).all()

    sel = cross_validate_methods(z, p_raw, y, _patients(len(z)))
    assert sel["scores"]["beta"]["brier"] < sel["scores"]["platt"]["brier"]
    assert choose_method(sel) in ("beta", "isotonic")

    torch.save({"vcf_calibration": Calibrator("beta", beta={"p_fracture": abc}).to_dict()}, tmp_path / "c.pt")
    stored = torch.load(tmp_path / "c.pt", weights_only=True)["vcf_calibration"]
    assert stored["method"] == "beta" and stored["beta"]["p_fracture"] == abc
    back = Calibrator.from_dict(stored)
    assert np.array_equal(back.apply(q), beta.apply(q)) and "ln(1 - p)" in back.describe()
    from evaluation.model_card import _calibration_details

    assert f"| beta | p_fracture: sigmoid({abc['a']:.4g} * ln p - {abc['b']:.4g} * ln(1 - p)" in _calibration_details(stored)
    with pytest.raises(CalibrationError, match="both classes"):
        fit_beta(z[:10], np.zeros(10))
    with pytest.raises(CalibrationError, match="positive"):
        Calibrator("beta", beta={"p_fracture": {"a": 1.0, "b": -1.0, "c": 0.0}})
    with pytest.raises(CalibrationError, match="malformed"):
        Calibrator("beta", beta={"p_fracture": {"a": 1.0, "b": 1.0}})


def test_choose_method_reads_a_selection_stored_before_platt_existed():
    old = {"scores": {m: {"brier": b, "ece": 0.05, "nll": 0.4}
                      for m, b in (("none", 0.12), ("temperature", 0.11), ("isotonic", 0.10))}}
    assert choose_method(old) == "isotonic"


def test_cross_validation_skips_unknown_labels_and_needs_two_patients():
    rng = np.random.default_rng(6)
    p = rng.uniform(0.05, 0.95, 400)
    y = (rng.random(400) < p).astype(float)
    y[::10] = np.nan
    z = np.log(p) - np.log1p(-p)
    sel = cross_validate_methods(z, p, y, _patients(400))
    assert sel["n_images"] == 360
    one_patient = cross_validate_methods(z, p, y, np.zeros(400))
    assert one_patient["folds"] == 1 and np.isnan(one_patient["scores"]["isotonic"]["ece"])
    assert choose_method(one_patient) == "temperature"


def test_cross_validation_refits_per_fold_what_the_outputs_depend_on():
    """refit(train, test) is called per fold with disjoint rows (positions in the inputs, unknown
    labels skipped), and the fold is scored on what it returns, not on the inputs."""
    rng = np.random.default_rng(8)
    p = rng.uniform(0.05, 0.95, 200)
    y = (rng.random(200) < p).astype(float)
    y[::7] = np.nan
    z = np.log(p) - np.log1p(-p)
    calls = []

    def refit(train, test):
        calls.append((set(train.tolist()), set(test.tolist())))
        # a fold-wise "combiner" that knows nothing: every test film at 0.5
        return z[train], p[train], np.zeros(len(test)), np.full(len(test), 0.5)

    sel = cross_validate_methods(z, p, y, _patients(200), refit=refit)
    assert sel["refitted_per_fold"] and len(calls) == sel["folds"] == 5
    for train, test in calls:
        assert not train & test and not {i for i in range(0, 200, 7)} & (train | test)
    assert set().union(*(t for _, t in calls)) == set(range(200)) - set(range(0, 200, 7))
    known = ~np.isnan(y)
    assert sel["scores"]["none"]["brier"] == pytest.approx(float(np.mean((0.5 - y[known]) ** 2)))
    plain = cross_validate_methods(z, p, y, _patients(200))
    assert not plain["refitted_per_fold"] and plain["scores"]["none"]["brier"] < sel["scores"]["none"]["brier"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from data.phantom2d import generate_dataset
    from training.system import FractureSystem

    tmp = tmp_path_factory.mktemp("cal")
    generate_dataset(tmp / "data", n=16, seed=3, size=128, workers=1, progress=False)
    torch.manual_seed(0)
    system = FractureSystem(fpn_dim=16, image_size=(64, 48))
    ckpt = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(ckpt)
    path = tmp / "model.ckpt"
    torch.save(ckpt, path)
    return tmp, path, tmp / "data" / "manifest.csv"


def test_calibrated_checkpoint_drives_inference(tiny, tmp_path, capsys):
    from inference.pipeline import run_inference
    from inference.predictor import Predictor
    from data.records import PREDICTION_COLUMNS

    tmp, ckpt_path, manifest = tiny
    labels = pd.read_csv(manifest)
    assert 0 < labels.fracture.sum() < len(labels), "phantom set needs both classes"
    assert main(["--checkpoint", str(ckpt_path), "--manifest", str(manifest), "--method", "temperature",
                 "--operating-point", "high_sensitivity"]) == 0
    printed = capsys.readouterr().out
    out_path = tmp / "model_calibrated"
    assert f"wrote {out_path}" in printed and "high_specificity" in printed and "T=" in printed
    calibrated = load_bundle(out_path)
    cal = json.loads((out_path / "calibration.json").read_text())
    assert cal == calibrated.calibration and calibrated.metadata["history"][-1]["step"] == "calibrate"
    assert cal["method"] == "temperature" and cal["default"] == "high_sensitivity"
    assert cal["n_images"] == 16 and cal["n_pos"] + cal["n_neg"] == 16 and cal["split"] == "all"
    assert cal["temperature"]["p_fracture"] > 0 and cal["fitted_heads"]["p_fracture"]
    assert set(cal["operating_points"]) == {"high_sensitivity", "balanced", "high_specificity"}
    assert cal["operating_points"]["high_sensitivity"]["sensitivity"] >= 0.9
    original = torch.load(ckpt_path, weights_only=True)
    film = calibrated.film_net.state_dict()
    assert all(torch.equal(v, film[k[len("net."):]]) for k, v in original["state_dict"].items() if k.startswith("net."))
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []  # no temp file left

    predictor = Predictor(out_path, device="cpu")
    assert predictor.operating_point == "high_sensitivity"
    out = tmp_path / "infer"
    # an untrained film network finds no spine: the no-spine rule is off for this model
    run_inference(predictor, [str(manifest)], out, num_workers=0, progress=False, min_spine_score=0)
    table = pd.read_csv(out / "predictions.csv", dtype={"decision": str})
    assert list(table.columns) == PREDICTION_COLUMNS and PREDICTION_COLUMNS[-2:] == ["decision", "operating_point"]
    assert (table.status == "ok").all() and set(table.decision) <= {"0", "1"}
    assert (table.operating_point == "high_sensitivity").all()
    threshold = cal["operating_points"]["high_sensitivity"]["threshold"]
    assert ((table.p_fracture >= threshold) == (table.decision == "1")).all()
    # the validation sensitivity holds on the images it was fitted on
    fractured = {s.split("/")[-1].rsplit(".", 1)[0] for s in labels.image[labels.fracture == 1]}
    pos = table[table.name.isin(fractured)]
    assert len(pos) == labels.fracture.sum() and (pos.decision == "1").mean() >= 0.9
    record = json.loads((out / f"{table.name.iloc[0]}.json").read_text())
    assert record["decision"]["operating_point"] == "high_sensitivity"
    assert record["decision"]["threshold"] == threshold
    assert record["decision"]["fracture"] == (record["p_fracture"] >= threshold)
    assert record["calibration"]["method"] == "temperature"
    assert 0 <= record["p_fracture_uncalibrated"] <= 1
    assert np.isclose(record["p_acute"], record["p_fracture"] * record["p_acute_given_fracture"], atol=1e-6)

    # --operating-point overrides the stored default; --resume redoes outputs decided otherwise
    import infer

    args = ["--model", str(out_path), "--out", str(out), "--num-workers", "0", "--quiet", "--min-spine-score", "0",
            str(manifest)]
    assert infer.main(args + ["--resume", "--operating-point", "high_specificity"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert (table.operating_point == "high_specificity").all()
    record = json.loads((out / f"{table.name.iloc[0]}.json").read_text())
    assert record["decision"]["threshold"] == cal["operating_points"]["high_specificity"]["threshold"]

    # ONNX: the calibration travels in the metadata and OnnxPredictor applies it as Predictor does
    pytest.importorskip("onnxruntime")
    from inference.onnx import OnnxPredictor, export_onnx, read_onnx_metadata

    onnx_path = export_onnx(out_path, tmp_path / "model.onnx")
    assert json.loads(read_onnx_metadata(onnx_path)[CALIBRATION_KEY]) == cal
    onnx_pred = OnnxPredictor(onnx_path, device="cpu", operating_point="balanced")
    assert onnx_pred.operating_point == "balanced" and onnx_pred.calibrator.method == "temperature"
    x = torch.rand(2, 1, 64, 48, generator=torch.Generator().manual_seed(0))
    ref, got = predictor(x), onnx_pred(x)
    assert set(got) == set(ref) and "p_fracture_uncalibrated" in got
    for key in ("p_fracture", "p_acute", "p_acute_given_fracture", "p_fracture_uncalibrated"):
        assert np.abs(got[key] - ref[key]).max() <= 1e-4, key

    # an uncalibrated checkpoint: empty decision columns, no decision in the JSON, no override
    plain = tmp_path / "plain"
    run_inference(Predictor(ckpt_path, device="cpu"), [str(manifest)], plain, num_workers=0, progress=False,
                  min_spine_score=0)
    table = pd.read_csv(plain / "predictions.csv")
    assert table.decision.isna().all() and table.operating_point.isna().all()
    assert "decision" not in json.loads((plain / f"{table.name.iloc[0]}.json").read_text())
    assert infer.main(["--checkpoint", str(ckpt_path), "--out", str(tmp_path / "x"), "--operating-point",
                       "balanced", "--quiet", str(manifest)]) == 2


def test_val_split_and_isotonic(tiny, tmp_path):
    """split='val' takes the manifest's validation rows only; isotonic tables load weights_only."""
    _, ckpt_path, manifest = tiny
    df = pd.read_csv(manifest)
    val = (df.index % 2 == 0)
    assert 0 < df.fracture[val].sum() < val.sum()
    df["split"] = np.where(val, "val", "train")
    split_manifest = manifest.parent / "split_manifest.csv"
    df.to_csv(split_manifest, index=False)
    out = tmp_path / "iso"
    path, cal = calibrate_model(ckpt_path, split_manifest, out=out, method="isotonic", split="val")
    assert path == out
    stored = json.loads((out / "calibration.json").read_text())
    assert stored["n_images"] == int(val.sum()) and stored["split"] == "val"
    assert stored["isotonic"]["p_fracture"]["x"] and stored["default"] == "balanced"
    assert Calibrator.from_dict(stored).threshold() == cal.operating_points["balanced"]["threshold"]
    with pytest.raises(ValueError, match="operating point"):
        calibrate_model(ckpt_path, split_manifest, out=out, default_point="nope")


def test_auto_method_stores_its_cross_validation(tiny, tmp_path, capsys):
    _, ckpt_path, manifest = tiny
    out = tmp_path / "auto"
    assert main(["--checkpoint", str(ckpt_path), "--manifest", str(manifest), "--method", "auto", "--select-by", "ece",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "out-of-fold p_fracture" in printed and "(chosen)" in printed
    stored = json.loads((out / "calibration.json").read_text())
    sel = stored["method_selection"]
    assert sel["requested"] == "auto" and sel["chosen"] == stored["method"] and stored["method"] in ("none", "temperature", "platt", "beta", "isotonic")
    assert set(sel["scores"]) == {"none", "temperature", "platt", "beta", "isotonic"} and sel["folds"] == 5
    assert choose_method(sel, by="ece") == sel["chosen"] and "ece" in sel["criterion"]


def test_a_method_registered_by_one_class_is_usable_and_round_trips(monkeypatch):
    """A new calibration method is one class: the Calibrator applies it, stores it and reads it back,
    and the method-selection cross-validation scores it."""
    from calibration import CalibrationMethod, register
    from calibration import methods as registry
    from calibration.methods import sigmoid

    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))  # the registration ends with the test
    import calibration.calibrator
    import calibration.fit

    monkeypatch.setattr(calibration.calibrator, "METHODS", registry.METHODS)
    monkeypatch.setattr(calibration.fit, "METHODS", registry.METHODS)

    @register
    class Shift(CalibrationMethod):
        name = "shift"

        def __init__(self, b: float = 0.0):
            self.b = float(b)

        @classmethod
        def fit(cls, logits, probs, labels):
            z, y = np.asarray(logits, float), np.asarray(labels, float)
            known = ~np.isnan(y)
            return cls(float(np.log(y[known].mean() / (1 - y[known].mean())) - np.median(z[known])))

        def apply_logits(self, logits):
            return sigmoid(np.asarray(logits, float) + self.b)

        def to_json(self):
            return {"b": self.b}

        @classmethod
        def from_json(cls, value):
            return cls() if value is None else cls(value["b"])

    assert registry.METHODS["shift"] is Shift
    z, y = _synthetic(n=2000)
    fitted = Shift.fit(z, None, y)
    cal = Calibrator("shift", maps={"p_fracture": fitted}, points=operating_points(y, fitted.apply(z, logits=True)))
    stored = json.loads(json.dumps(cal.to_dict()))
    assert stored["method"] == "shift" and stored["shift"] == {"p_fracture": {"b": fitted.b},
                                                              "p_acute_given_fracture": {"b": 0.0}}
    back = Calibrator.from_dict(stored)
    assert back.to_dict() == stored and "shift" not in back.info
    q = np.linspace(0.05, 0.95, 7)
    assert np.allclose(back.apply(q), sigmoid(np.log(q / (1 - q)) + fitted.b))
    assert np.allclose(back.apply(q, "p_acute_given_fracture"), q)
    assert np.allclose(Calibrator("shift", shift={"p_fracture": {"b": 1.0}}).apply(0.5), sigmoid(1.0))
    selection = cross_validate_methods(z, sigmoid(z), y, _patients(len(y)))
    assert "shift" in selection["scores"] and np.isfinite(selection["scores"]["shift"]["brier"])
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (Shift,), {}))
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        Calibrator.from_dict({"method": "nonesuch"})


def test_stored_form_is_read_and_written_unchanged():
    """Stored calibrations of each method (the form written before the registry) read back to the same dict."""
    points = {"balanced": {"threshold": 0.4, "sensitivity": 0.8, "specificity": 0.7, "criterion": "c",
                           "youden_j": 0.5}}
    stored = [
        {"format": 1, "method": "temperature", "temperature": {"p_fracture": 2.0, "p_acute_given_fracture": 1.0}},
        {"format": 1, "method": "platt", "platt": {"p_fracture": {"a": 0.5, "b": -0.2},
                                                   "p_acute_given_fracture": {"a": 1.0, "b": 0.0}}},
        {"format": 1, "method": "beta", "beta": {"p_fracture": {"a": 0.6, "b": 0.4, "c": 0.1},
                                                 "p_acute_given_fracture": {"a": 1.0, "b": 1.0, "c": 0.0}}},
        {"format": 1, "method": "isotonic", "isotonic": {"p_fracture": {"x": [0.1, 0.9], "y": [0.0, 1.0]},
                                                         "p_acute_given_fracture": None}},
        {"format": 1, "method": "none"},
    ]
    for d in stored:
        d = {**d, "operating_points": points, "default": "balanced", "n_images": 12,
             "vertebra_combiner": None, "fitted_on": "/x/m.csv"}
        assert Calibrator.from_dict(d).to_dict() == d


@pytest.mark.parametrize("options, message", [
    (["--device", "tpu"], "--device tpu: not a device"),
    (["--batch-size", "0"], "--batch-size: 0 is below 1"),
    (["--num-workers", "-1"], "--num-workers: -1 is below 0"),
])
def test_calibration_refuses_unusable_options_in_one_line_before_reading_the_model(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(tmp_path / "absent.ckpt"), "--manifest", str(tmp_path / "absent.csv"), *options])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
