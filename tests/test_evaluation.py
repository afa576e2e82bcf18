"""evaluation.metrics on the tiny synthetic set of the ``tiny_eval_set`` fixture (conftest.py)."""
import json
import math
import os

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from evaluation import metrics as M


def _truth(s):
    return pd.DataFrame(s["truth"])


def _ok(t):
    return t[t["status"] == "ok"]


def test_manifest_paths_absolute_and_labels_float(tiny_eval_set):
    s = tiny_eval_set
    man = M.load_manifest_table(s["manifest"])
    assert len(man) == 12
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in man["image"])
    assert man["image"].tolist() == _truth(s)["image"].tolist()
    assert man["fracture"].dtype == float and man["acute"].dtype == float
    assert int(man["fracture"].isna().sum()) == 2
    np.testing.assert_array_equal(man["fracture"].to_numpy(), _truth(s)["fracture"].to_numpy())
    assert man.loc[5, "patient_id"] == "NA"  # text, not turned into NaN

    vert = M.load_vertebrae_table(s["vertebrae"], s["manifest"])
    assert set(vert["image"]) <= set(man["image"])
    assert vert["genant_grade"].dtype == float


def test_manifest_rejects_bad_labels(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("image,patient_id,fracture,acute\na.png,p1,yes,\n")
    with pytest.raises(ValueError, match="fracture"):
        M.load_manifest_table(csv)


def test_join_drops_errors_and_unmatched(tiny_eval_set):
    s = tiny_eval_set
    df = M.join_predictions(s["predictions"], s["manifest"])
    assert len(df) == 11  # 12 manifest images, one failed
    assert "img_11" not in set(df["name"]) and "stray" not in set(df["name"])
    assert df.attrs["n_predictions"] == 13
    assert df.attrs["n_error"] == 1
    assert df.attrs["n_unmatched"] == 1
    assert df.attrs["n_missing_prediction"] == 1
    assert df.attrs["n_joined"] == 11
    # the manifest's labels travel with the predictions
    t = _ok(_truth(s)).set_index("name")
    np.testing.assert_allclose(df.set_index("name").loc[t.index, "p_fracture"], t["p_fracture"])


def test_join_matches_unnormalised_paths(tiny_eval_set, tmp_path):
    s = tiny_eval_set
    pred = pd.read_csv(s["predictions"])
    pred["image"] = [os.path.join(os.path.dirname(p), ".", "..", "images", os.path.basename(p)) for p in pred["image"]]
    alt = tmp_path / "alt_predictions.csv"
    pred.to_csv(alt, index=False)
    assert len(M.join_predictions(alt, s["manifest"])) == 11


def test_auroc_fracture_matches_sklearn_and_leaves_unknown_out(tiny_eval_set):
    s = tiny_eval_set
    df = M.join_predictions(s["predictions"], s["manifest"])
    t = _ok(_truth(s))
    known = t[t["fracture"].notna()]
    assert len(known) == 9  # img_09 and img_10 are unknown
    expected = roc_auc_score(known["fracture"].astype(int), known["p_fracture"])
    assert M.auroc_fracture(df) == pytest.approx(expected)
    # an unknown label is left out, never taken as negative
    as_negative = roc_auc_score(t["fracture"].fillna(0).astype(int), t["p_fracture"])
    assert not math.isclose(expected, as_negative)


def test_auroc_acute_matches_sklearn(tiny_eval_set):
    s = tiny_eval_set
    df = M.join_predictions(s["predictions"], s["manifest"])
    t = _ok(_truth(s))
    sel = t[(t["fracture"] == 1) & t["acute"].notna()]
    assert len(sel) == 4
    expected = roc_auc_score(sel["acute"].astype(int), sel["p_acute"])
    assert expected == pytest.approx(0.75)
    assert M.auroc_acute(df) == pytest.approx(expected)


def test_binary_auroc_and_roc_points():
    y = np.array([0, 1, 1, 0, 1, 0, 0])
    sc = np.array([0.1, 0.8, 0.4, 0.4, 0.9, 0.3, 0.7])
    assert M.binary_auroc(y, sc) == pytest.approx(roc_auc_score(y, sc))
    fpr, tpr, thr = M.roc_points(y, sc)
    efpr, etpr, ethr = roc_curve(y, sc, drop_intermediate=False)
    np.testing.assert_allclose(fpr, efpr)
    np.testing.assert_allclose(tpr, etpr)
    assert math.isnan(M.binary_auroc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert all(len(a) == 0 for a in M.roc_points([0, 0], [0.2, 0.5]))
    with pytest.raises(ValueError):
        M.binary_auroc([1, np.nan], [0.2, 0.5])


def test_by_grade_counts_and_values(tiny_eval_set):
    s = tiny_eval_set
    df = M.join_predictions(s["predictions"], s["manifest"])
    vert = M.load_vertebrae_table(s["vertebrae"], s["manifest"])
    mg = M.image_max_grade(vert)
    t = _truth(s).set_index("image")
    # max grade per image; all-empty grades -> NaN; image without rows -> absent
    assert mg.loc[t.index[0]] == 3 and mg.loc[t.index[5]] == 0
    assert math.isnan(mg.loc[t.index[9]]) and t.index[10] not in mg.index

    by = M.auroc_by_grade(df, mg)
    assert set(by) == {1, 2, 3}
    assert (by[1]["n_pos"], by[2]["n_pos"], by[3]["n_pos"]) == (2, 2, 1)  # img_11 (grade 3) failed
    assert all(by[g]["n_neg"] == 4 for g in (1, 2, 3))
    ok = _ok(_truth(s))
    neg = ok[ok["fracture"] == 0]["p_fracture"].to_numpy()
    for g in (1, 2, 3):
        pos = ok[ok["max_grade"] == g]["p_fracture"].to_numpy()
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        assert by[g]["auroc"] == pytest.approx(roc_auc_score(y, np.r_[pos, neg]))


def test_pointing_game_hits_and_misses(tiny_eval_set):
    s = tiny_eval_set
    vert = M.load_vertebrae_table(s["vertebrae"], s["manifest"])
    table = M.pointing_game_table(s["infer_dir"], vert).set_index("name")
    t = _truth(s)
    expected = t[(t["max_grade"] > 0) & (t["status"] == "ok")].set_index("name")["hit"]
    assert sorted(table.index) == sorted(expected.index) == ["img_00", "img_01", "img_02", "img_03", "img_04"]
    assert table.loc["img_00", "hit"] and table.loc["img_04", "hit"]  # inside; on the box corner
    assert not table.loc["img_02", "hit"]  # inside a healthy vertebra's box only
    assert not table.loc["img_03", "hit"]  # outside every box
    assert table["hit"].to_dict() == expected.astype(bool).to_dict()
    assert M.pointing_game(s["infer_dir"], vert) == {"hits": 3, "n": 5, "score": pytest.approx(0.6)}


def test_pointing_game_moving_a_peak_flips_the_hit(tiny_eval_set):
    s = tiny_eval_set
    vert = M.load_vertebrae_table(s["vertebrae"], s["manifest"])
    path = os.path.join(s["infer_dir"], "img_00.json")
    rec = json.loads(open(path).read())
    rec["heatmap_peak"] = [38.5, 28.0]  # just right of the fractured L2 box (x_max 38)
    open(path, "w").write(json.dumps(rec))
    assert M.pointing_game(s["infer_dir"], vert)["hits"] == 2
    rec["heatmap_peak"] = [10.0, 22.0]  # its top-left corner
    open(path, "w").write(json.dumps(rec))
    assert M.pointing_game(s["infer_dir"], vert)["hits"] == 3


def test_pointing_game_of_the_dense_head_reads_its_own_peak(tiny_eval_set):
    s = tiny_eval_set
    vert = M.load_vertebrae_table(s["vertebrae"], s["manifest"])
    assert "pointing_game_head" not in M.summarise(s["predictions"], s["manifest"], s["vertebrae"], s["infer_dir"])
    for name in ("img_00", "img_01", "img_02", "img_03", "img_04"):
        path = os.path.join(s["infer_dir"], f"{name}.json")
        rec = json.loads(open(path).read())
        rec["heatmap_peak_head"] = [0.0, 0.0] if name == "img_00" else rec["heatmap_peak"]  # img_00: outside
        open(path, "w").write(json.dumps(rec))
    assert M.pointing_game(s["infer_dir"], vert, peak_key="heatmap_peak_head")["hits"] == 2
    out = M.summarise(s["predictions"], s["manifest"], s["vertebrae"], s["infer_dir"])
    assert out["pointing_game"]["hits"] == 3 and out["pointing_game_head"] == {"hits": 2, "n": 5,
                                                                               "score": pytest.approx(0.4)}
    from evaluation import report as R

    full = R.evaluate(s["predictions"], s["manifest"], s["vertebrae"], s["infer_dir"], n_boot=20)
    assert full["pointing_game_head"]["hits"] == 2 and full["pointing_game"]["hits"] == 3


def test_summarise_is_json_serialisable_and_counts_unknowns(tiny_eval_set):
    s = tiny_eval_set
    out = M.summarise(s["predictions"], s["manifest"], s["vertebrae"], s["infer_dir"])
    again = json.loads(json.dumps(out, allow_nan=False))
    assert again == out
    c = out["counts"]
    assert c["n_fracture_unknown"] == 2 and c["n_acute_unknown"] == 1
    assert (c["n_fracture_pos"], c["n_fracture_neg"], c["n_acute"], c["n_chronic"]) == (5, 4, 2, 2)
    assert (c["n_error"], c["n_unmatched"]) == (1, 1)
    df = M.join_predictions(s["predictions"], s["manifest"])
    assert out["auroc_fracture"] == pytest.approx(M.auroc_fracture(df))
    assert out["by_grade"]["3"]["n_pos"] == 1
    assert out["pointing_game"] == {"hits": 3, "n": 5, "score": pytest.approx(0.6)}
    # without vertebrae / heatmaps, and with NaN metrics -> None
    bare = M.summarise(s["predictions"], s["manifest"])
    assert bare["by_grade"] is None and bare["pointing_game"] is None
    json.dumps(bare, allow_nan=False)


def test_summarise_nan_becomes_none(tiny_eval_set, tmp_path):
    s = tiny_eval_set
    man = pd.read_csv(s["manifest"], dtype=str, keep_default_na=False)
    man["acute"] = ""  # no acuity known anywhere -> acute AUROC is NaN
    alt = os.path.join(s["data_dir"], "manifest_noacute.csv")
    man.to_csv(alt, index=False)
    out = M.summarise(s["predictions"], alt)
    assert out["auroc_acute"] is None
    json.dumps(out, allow_nan=False)


def test_plots_and_gallery(tiny_eval_set):
    import matplotlib.pyplot as plt

    s = tiny_eval_set
    df = M.join_predictions(s["predictions"], s["manifest"])
    vert = M.load_vertebrae_table(s["vertebrae"], s["manifest"])
    fig, axes = plt.subplots(1, 2)
    try:
        M.plot_roc(axes[0], df)
        assert len(axes[0].get_legend().get_texts()) == 2
        M.plot_by_grade(axes[1], M.auroc_by_grade(df, M.image_max_grade(vert)))
        M.plot_by_grade(axes[1], M.summarise(s["predictions"], s["manifest"], s["vertebrae"])["by_grade"])
    finally:
        plt.close(fig)
    g = M.heatmap_gallery(s["infer_dir"], df, n=4)
    assert isinstance(g, Figure)
    titles = [ax.get_title() for ax in g.axes if ax.get_title()]
    assert len(titles) == 4
    assert titles[0].startswith("img_00") and "0.950" in titles[0] and "fracture (acute)" in titles[0]
    assert any(t.startswith("img_07") and "normal" in t for t in titles)  # highest-scoring normal
    assert sum(len(ax.images) for ax in g.axes) == 4
