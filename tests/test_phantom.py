"""The 3D phantom: exact projection, truth that agrees with its own geometry, both views."""
import cv2
import numpy as np
import pandas as pd
import pytest

from data.geometry import heights as point_heights
from data.manifest import load_manifest
from data.morphometry import grade_vertebrae
from data.phantom import PHANTOM_LEVELS, generate_dataset, generate_image, main
from data.projector import Geometry, project_points
from data.spine3d.raycast import Solid, box_bounds, plane, quadric, ray_length, render

POINTS = [f"p{i}{c}" for i in range(1, 7) for c in "xy"]


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom3d")
    generate_dataset(out, n=30, seed=5, size=192, workers=1, progress=False)
    return out


def test_chords_are_exact():
    """A sphere's and a capped cylinder's chords through their centre, seen obliquely, and the
    sphere's projected area (the cone beam magnifies it by sdd / sod)."""
    g = Geometry("lateral_left", rows=121, cols=121, pixel_mm=0.5)
    sphere = Solid(quadric((0, 0, 0), np.eye(3), (10, 10, 10))[None], np.zeros((0, 4)), 1.0,
                   box_bounds((0, 0, 0), np.eye(3), (10, 10, 10)))
    L = render([sphere], g)[0] * ray_length(g)
    assert abs(L[60, 60] - 20.0) < 1e-3
    area_mm2 = (L > 0).sum() * (g.pixel_mm / g.magnification) ** 2
    assert abs(area_mm2 - np.pi * 100) / (np.pi * 100) < 0.03
    cyl = Solid(quadric((0, 0, 0), np.eye(3), (10, 10, 1), "cylinder")[None],
                np.stack([plane((0, 0, 5), (0, 0, 1)), plane((0, 0, -5), (0, 0, -1))]), 2.0,
                box_bounds((0, 0, 0), np.eye(3), (10, 10, 5)))
    L = render([cyl], g)[0] * ray_length(g)
    assert abs(L[60, 60] - 40.0) < 1e-3  # weight 2 x 20 mm
    top, bottom = project_points(np.array([[0, 0, 5.0], [0, 0, -5.0]]), g)[:, 1]
    rows = np.nonzero(L[:, 60] > 0)[0]
    assert abs(rows.min() - top) <= 1 and abs(rows.max() - bottom) <= 1


@pytest.mark.parametrize("view", ["lateral", "ap"])
def test_grade_agrees_with_heights_measured_from_points(phantom_set, view):
    man = pd.read_csv(phantom_set / "manifest.csv")
    vert = pd.read_csv(phantom_set / "vertebrae.csv")
    vert = vert[vert.image.isin(man.image[man.view == view])]
    n_fractured = 0
    for _, group in vert.groupby("image", sort=False):
        pts = group[POINTS].to_numpy(float).reshape(-1, 6, 2)
        measured = grade_vertebrae(pts, symmetric=view == "ap")
        for (_, row), m in zip(group.iterrows(), measured):
            assert m["genant_grade"] == row["genant_grade"], (row["image"], row["level"], m)
            if row["genant_grade"] > 0:
                n_fractured += 1
                assert m["morphology"] == row["morphology"], (row["image"], row["level"], m)
    assert n_fractured >= 3


def test_views_mix_and_labels_validate(phantom_set):
    m = load_manifest(phantom_set / "manifest.csv")
    assert set(m.images.view) == {"lateral", "ap"}
    assert 0.35 < (m.images.view == "lateral").mean() < 0.85
    vert = m.vertebrae
    for _, row in m.images.iterrows():
        v = vert[vert.image == row.image]
        assert len(v) >= 4
        fractured = v[v.genant_grade > 0]
        assert row.fracture == float(len(fractured) > 0)
        if len(fractured):
            assert row.acute == float((fractured.acute == 1).any())
    assert 0.2 < m.images.fracture.mean() < 0.8
    assert set(vert.loc[vert.genant_grade > 0, "genant_grade"]) == {1, 2, 3}


def test_levels_contiguous_ordered_and_points_on_their_body(phantom_set):
    vert = pd.read_csv(phantom_set / "vertebrae.csv")
    man = pd.read_csv(phantom_set / "manifest.csv")
    for _, group in vert.groupby("image", sort=False):
        idx = [PHANTOM_LEVELS.index(lvl) for lvl in group.level]
        assert idx == list(range(idx[0], idx[0] + len(idx)))
        pts = group[POINTS].to_numpy(float).reshape(-1, 6, 2)
        centres = pts.mean(1)
        assert (np.diff(centres[:, 1]) > 0).all()  # cranio-caudal, head up
        assert (point_heights(pts) > 2).all()
    # each body's centre carries its own label in the mask
    for _, row in man.head(6).iterrows():
        mask = cv2.imread(str(phantom_set / row["mask"]), cv2.IMREAD_UNCHANGED)
        for _, v in vert[vert.image == row.image].iterrows():
            c = v[POINTS].to_numpy(float).reshape(6, 2).mean(0)
            assert mask[int(round(c[1])), int(round(c[0]))] == v.mask_value


def test_ap_points_run_left_to_right_and_lateral_anterior_follows_facing(phantom_set):
    import json

    info = json.loads((phantom_set / "phantom.json").read_text())
    vert = pd.read_csv(phantom_set / "vertebrae.csv")
    for image, film in info["films"].items():
        pts = vert[vert.image == image][POINTS].to_numpy(float).reshape(-1, 6, 2)
        if film["view"] == "ap":
            assert (pts[:, 0, 0] < pts[:, 2, 0]).all()
        else:  # anterior (p1) on the image right when the source is on the patient's right
            right = film["projector_view"] == "lateral_right"
            assert ((pts[:, 0, 0] > pts[:, 2, 0]) == right).all()
        assert film["pixel_spacing_isocentre_mm"] < film["pixel_spacing_mm"]


def test_bone_is_brighter_than_disc_on_the_film():
    """Along the line through the body centres, the bodies read brighter than the discs."""
    sample = generate_image(2, 3, size=384, view="lateral")
    img = sample["image"].astype(float)
    recs = sample["vertebrae"]
    pts = np.stack([r["points"] for r in recs])
    body = [img[int(c[1]), int(c[0])] for c in pts.mean(1)]
    disc = [img[int(c[1]), int(c[0])] for c in (pts[:-1, 3:].mean(1) + pts[1:, :3].mean(1)) / 2]
    assert np.median(body) > np.median(disc)


def test_film_is_reproducible_and_independent_of_the_rest():
    a = generate_image(3, 7, size=160)
    b = generate_image(3, 7, size=160)
    c = generate_image(4, 7, size=160)
    assert np.array_equal(a["image"], b["image"]) and not np.array_equal(a["image"], c["image"])
    assert a["image"].dtype == np.uint16 and a["image"].max() <= 2 ** a["meta"]["bits_stored"] - 1
    # a fixed view draws the film "both" draws when that film has that view
    fixed = generate_image(3, 7, size=160, view=a["meta"]["view"])
    assert np.array_equal(a["image"], fixed["image"])


def test_cli_usage_error_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--n", "0"])
    assert exc.value.code == 2
