"""The annotation-convention audit (evaluation/conventions.py) on synthetic landmark films."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from data.geometry import body_axes, body_height
from evaluation import conventions as C

SPACING = 100.0


def film(width: float, height: float, n: int = 12, tilt_deg: float = 0.0, seed: int = 0,
         jitter: float = 0.01) -> np.ndarray:
    """(n, 6, 2) points of a straight spine of ``n`` bodies, ``width`` x ``height`` times the centre
    spacing, tilted by ``tilt_deg``, each body's size jittered by ``jitter`` (relative sd)."""
    rng = np.random.default_rng(seed)
    t = math.radians(tilt_deg)
    u, v = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    bodies = []
    for k in range(n):
        c = np.array([500.0, 200.0]) + k * SPACING * v
        w = width * SPACING * (1 + jitter * rng.standard_normal())
        h = height * SPACING * (1 + jitter * rng.standard_normal())
        top = [c - h / 2 * v + a * w / 2 * u for a in (-1, 0, 1)]
        bottom = [c + h / 2 * v + a * w / 2 * u for a in (-1, 0, 1)]
        bodies.append(np.array(top + bottom))
    return np.stack(bodies)


def two_group_films(shape_a=(1.1, 0.65), shape_b=(1.4, 0.8), n_each=12, start=0):
    films = {}
    for i in range(n_each):
        films[f"/data/scan-A-{start + i:02d}.png"] = film(*shape_a, tilt_deg=3 * i, seed=start + i)
        films[f"/data/scan-B-{start + i:02d}.png"] = film(*shape_b, tilt_deg=-2 * i, seed=100 + start + i)
    return films


def write_csv(films: dict, path):
    rows = []
    for image, pts in films.items():
        for k, body in enumerate(pts):
            row = {"image": image, "level": f"V{k}", "genant_grade": 0, "x_min": body[:, 0].min(),
                   "y_min": body[:, 1].min(), "x_max": body[:, 0].max(), "y_max": body[:, 1].max()}
            for j, (x, y) in enumerate(body, start=1):
                row[f"p{j}x"], row[f"p{j}y"] = x, y
            rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_film_shape_is_relative_to_the_spine_and_ignores_tilt_and_scale():
    w, h = C.film_shape(film(1.3, 0.75, tilt_deg=20))
    assert w == pytest.approx(1.3, rel=0.02) and h == pytest.approx(0.75, rel=0.02)
    magnified = film(1.3, 0.75) * 2.5
    assert C.film_shape(magnified) == pytest.approx(C.film_shape(film(1.3, 0.75)), rel=1e-9)


def test_offsets_move_the_points_to_the_pooled_convention():
    pts = film(1.1, 0.65, tilt_deg=10)
    ws, hs = 1.3 / 1.1, 0.75 / 0.65
    off = C.convention_offsets(pts, ws, hs)
    u, v = body_axes(pts)
    h = body_height(pts)[:, None, None] / 100.0
    moved = pts + off[..., :1] * h * u[:, None] + off[..., 1:] * h * v[:, None]
    w2, h2 = C.film_shape(moved)
    assert w2 == pytest.approx(1.3, rel=0.02) and h2 == pytest.approx(0.75, rel=0.02)
    # the middle points move only across the endplates
    assert np.abs(off[:, [1, 4], 0]).max() < 1e-6


def test_audit_finds_two_conventions_and_their_floor():
    out = C.audit(two_group_films(), r"scan-([AB])-", fit_films=two_group_films(start=50), target=30.0)
    a, b = out["groups"]["A"], out["groups"]["B"]
    assert a["width_over_spacing"] == pytest.approx(1.1, rel=0.02) and b["height_over_spacing"] == pytest.approx(0.8, rel=0.02)
    assert a["wider_than_pooled_pct"] < -5 and b["wider_than_pooled_pct"] > 5
    assert a["taller_than_pooled_pct"] < 0 < b["taller_than_pooled_pct"]
    assert out["fitted_on"] == "separate fit films"
    # a perfect pooled reader is off at the corners by about half the width difference
    assert 5 < out["floor_median_pct"] < 25
    assert out["floor_corners_median_pct"] > out["floor_middles_median_pct"]
    # with the floor a target needs less reading noise than without it
    assert out["reading_sd_for_target"] < out["reading_sd_for_target_without_floor"]
    sds = list(out["median_by_reading_sd"].values())
    assert sds == sorted(sds)
    # a target under the floor cannot be reached by any reader of the pooled convention
    below = C.audit(two_group_films(), r"scan-([AB])-", fit_films=two_group_films(start=50),
                    target=out["floor_median_pct"] - 0.5)
    assert below["reading_sd_for_target"] is None


def test_one_convention_has_no_floor_and_the_gaussian_median():
    same = two_group_films(shape_b=(1.1, 0.65))
    out = C.audit(same, r"scan-([AB])-")
    assert out["floor_median_pct"] < 1.0
    assert out["fitted_on"].endswith("(in-sample)")
    # the median of isotropic Gaussian noise of sd s is s * sqrt(2 ln 2)
    assert out["reading_sd_for_target_without_floor"] == pytest.approx(10 / math.sqrt(2 * math.log(2)), rel=0.05)
    assert out["reading_sd_for_target"] == pytest.approx(out["reading_sd_for_target_without_floor"], rel=0.05)


def test_observed_median_gives_back_the_reading_sd_that_made_it():
    films = two_group_films()
    out = C.audit(films, r"scan-([AB])-", observed_median=None)
    seven = out["median_by_reading_sd"]["7"]
    again = C.audit(films, r"scan-([AB])-", observed_median=seven)
    assert again["reading_sd_implied_by_observed"] == pytest.approx(7.0, abs=1e-3)
    # a median under the floor cannot come from any reading noise
    assert C.audit(films, r"scan-([AB])-", observed_median=0.1)["reading_sd_implied_by_observed"] is None


def test_small_groups_and_unmatched_films_get_no_offset():
    films = two_group_films()
    films["/data/scan-C-00.png"] = film(0.8, 0.5)
    films["/data/unnamed.png"] = film(0.8, 0.5)
    out = C.audit(films, r"scan-([ABC])-")
    assert not out["groups"]["C"]["convention_estimated"] and out["groups"]["C"]["floor_median_pct"] == 0.0
    assert out["groups"]["other"]["n_films_evaluated"] == 1 and out["groups"]["other"]["floor_median_pct"] == 0.0
    assert out["groups"]["A"]["convention_estimated"]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(C.ConventionError, match="capture group"):
        C.audit(two_group_films(), r"scan-[AB]-")
    with pytest.raises(C.ConventionError, match="group-regex"):
        C.compile_group_regex("scan-(")
    bad = tmp_path / "vertebrae.csv"
    pd.DataFrame({"image": ["a.png"], "p1x": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(C.ConventionError, match=r"vertebrae\.csv.*missing p1y"):
        C.read_films(bad)
    with pytest.raises(C.ConventionError, match="not found"):
        C.read_films(tmp_path / "nope.csv")
    few = tmp_path / "few" / "vertebrae.csv"
    few.parent.mkdir()
    write_csv({"/data/scan-A-00.png": film(1.1, 0.65, n=2)}, few)
    with pytest.raises(C.ConventionError, match="3 or more bodies"):
        C.read_films(few)


def test_read_films_sorts_bodies_and_drops_incomplete_ones(tmp_path):
    pts = film(1.2, 0.7, n=6)
    path = write_csv({"/data/scan-A-00.png": pts[::-1]}, tmp_path / "vertebrae.csv")
    df = pd.read_csv(path)
    df.loc[0, "p3x"] = np.nan  # the last body (written first) loses a point
    df.to_csv(path, index=False)
    films = C.read_films(path)
    got = films["/data/scan-A-00.png"]
    assert got.shape == (5, 6, 2)
    assert np.all(np.diff(got.mean(axis=1)[:, 1]) > 0)


def test_cli_writes_json_and_plot(tmp_path, capsys):
    evaluated = write_csv(two_group_films(), tmp_path / "eval.csv")
    fit = write_csv(two_group_films(start=50), tmp_path / "fit.csv")
    out_json, out_png = tmp_path / "out.json", tmp_path / "shapes.png"
    assert C.main(["--vertebrae", str(evaluated), "--fit-vertebrae", str(fit), "--group-regex=scan-([AB])-",
                   "--observed-median", "12", "--json", str(out_json), "--plot", str(out_png)]) == 0
    result = json.loads(out_json.read_text())
    assert result["n_films_fit"] == 24 and result["n_films_evaluated"] == 24
    assert result["observed_median_pct"] == 12.0 and result["reading_sd_implied_by_observed"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "convention floor" in printed and "implies a reading sd" in printed
    with pytest.raises(SystemExit):
        C.main(["--vertebrae", str(evaluated), "--group-regex=scan-[AB]-"])
    assert "capture group" in capsys.readouterr().err


def test_scatter_bound_recovers_the_annotation_noise_of_smooth_spines():
    rng = np.random.default_rng(3)
    sd_px = 3.0  # per corner and axis, bodies 70 px tall: 4.3 % of the height
    films = {f"/data/f{i}.png": film(1.2, 0.7, n=17, tilt_deg=i, jitter=0) + rng.normal(0, sd_px, (17, 6, 2)) for i in range(40)}
    bound = C.scatter_bound(films)
    expected = 100 * sd_px / 70.0
    assert bound["along"] == pytest.approx(expected, rel=0.15)
    assert bound["across"] == pytest.approx(expected, rel=0.15)
    assert bound["n_differences"] == 40 * 15
    clean = C.scatter_bound({"/data/a.png": film(1.2, 0.7, n=17, jitter=0)})
    assert clean["along"] < 0.1 and clean["across"] < 0.1
