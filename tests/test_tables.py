"""data/tables.py: one set of rules for every reader of manifests, vertebrae.csv and predictions.csv."""
from __future__ import annotations

import os

import numpy as np
import pytest

from data.discovery import find_inputs
from data.manifest import load_manifest
from data.tables import (ManifestError, TableError, absolute_path, label_value, load_manifest_table,
                         load_predictions_table, path_key)
from evaluation import metrics as M


def _films(folder, names="abc"):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / f"{n}.png").write_bytes(b"x")


def test_labels_follow_one_rule_for_every_reader(tmp_path):
    _films(tmp_path / "img")
    m = tmp_path / "manifest.csv"
    m.write_text("image,patient_id,fracture,acute\nimg/a.png,p1,TRUE,false\nimg/b.png,p2,0.0,\nimg/c.png,p3,,\n")
    training = load_manifest(m).images
    evaluation = load_manifest_table(m)
    assert evaluation is not None and M.load_manifest_table is load_manifest_table
    for table in (training, evaluation):
        np.testing.assert_array_equal(table["fracture"].to_numpy(), [1.0, 0.0, np.nan])
        np.testing.assert_array_equal(table["acute"].to_numpy(), [0.0, np.nan, np.nan])
    assert [label_value(v) for v in ("1", "true", "0", "False", "")][:4] == [1.0, 1.0, 0.0, 0.0]
    assert label_value("yes") is None

    m.write_text("image,patient_id,fracture,acute\nimg/a.png,p1,yes,\nimg/b.png,p2,0,\n")
    for read in (load_manifest, load_manifest_table):
        with pytest.raises(ManifestError) as err:
            read(m)
        text = str(err.value)
        assert "\n" not in text and str(m) in text and "row 2" in text and "'yes'" in text, read.__module__
        assert isinstance(err.value, TableError) and isinstance(err.value, ValueError)


def test_every_reader_resolves_paths_alike(tmp_path):
    from benchmarks.mixed_benchmark import load_dataset

    _films(tmp_path / "data" / "img")
    m = tmp_path / "data" / "manifest.csv"
    m.write_text("image,patient_id,fracture,acute\nimg/a.png,p1,1,\n./img/../img/b.png,p2,0,\n")
    (tmp_path / "data" / "vertebrae.csv").write_text(
        "image,level,genant_grade,morphology,acute,x_min,y_min,x_max,y_max,"
        + ",".join(f"p{i}{c}" for i in range(1, 7) for c in "xy") + "\n"
        + "img/a.png,L1,2,wedge,1,0,0,1,1," + ",".join(["1"] * 12) + "\n")
    want = [str(tmp_path / "data" / "img" / "a.png"), str(tmp_path / "data" / "img" / "b.png")]
    assert load_manifest(m).images["image"].tolist() == want
    assert load_manifest_table(m)["image"].tolist() == want
    assert find_inputs([str(m)])[0] == want
    man, vert = load_dataset(m)
    assert man["image"].tolist() == want and vert["image"].tolist() == want[:1]
    assert M.load_vertebrae_table(tmp_path / "data" / "vertebrae.csv", m)["image"].tolist() == want[:1]
    assert load_manifest(m).vertebrae["image"].tolist() == want[:1]


def test_path_rule(tmp_path):
    _films(tmp_path / "img", "a")
    assert absolute_path("img/../img/a.png", tmp_path) == str(tmp_path / "img" / "a.png")
    assert absolute_path(str(tmp_path / "img" / "a.png"), "/elsewhere") == str(tmp_path / "img" / "a.png")
    os.symlink(tmp_path / "img", tmp_path / "link")
    # a path through a link keeps its spelling, but joins with the file it points to
    assert absolute_path("link/a.png", tmp_path) == str(tmp_path / "link" / "a.png")
    assert path_key(str(tmp_path / "link" / "a.png")) == path_key(str(tmp_path / "img" / "a.png"))


def test_predictions_numeric_columns_come_from_the_record(tmp_path):
    p = tmp_path / "predictions.csv"
    p.write_text("image,name,p_fracture,p_acute,p_acute_given_fracture,heatmap_peak_x,heatmap_peak_y,status,error,"
                 "decision,operating_point\na.png,a,0.5,0.1,0.2,3,4,ok,,1,balanced\nb.png,b,,,,,,error,unreadable,,\n")
    table = load_predictions_table(p)
    assert table["heatmap_peak_y"].tolist()[0] == 4.0 and np.isnan(table["p_fracture"].iloc[1])
    assert table["decision"].tolist() == ["1", ""]  # a flag, kept as written
    assert table["image"].iloc[0] == str(tmp_path / "a.png")


def test_points_in_polygon_falls_as_matplotlib_does_on_and_off_the_edges():
    from matplotlib.path import Path as MplPath

    from data.geometry import points_in_polygon

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(-2, 14), np.arange(-2, 14)), axis=-1).reshape(-1, 2).astype(float)
    for trial in range(200):
        if trial % 2:  # integer corners: many cell centres on edges and vertices
            poly = rng.integers(0, 12, size=(6, 2)).astype(float)
        else:
            poly = rng.uniform(0, 12, size=(6, 2))
        expected = MplPath(poly).contains_points(grid)
        assert np.array_equal(points_in_polygon(grid, poly), expected), poly
