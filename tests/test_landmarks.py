"""Landmark adapters: AASCE-format reading, project-format round trip, the CLI."""
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from data.landmarks import (LandmarkError, landmark_problems, main, patient_from_name, points_array,
                            read_aasce, read_vertebrae_csv, write_vertebrae_dataset)
from data.manifest import load_manifest
from data.morphometry import LEVELS

REPO = Path(__file__).resolve().parents[1]


def aasce_dir() -> Path:
    """The real AASCE folder: $VCF_AASCE_DIR, else ../shared/data/aasce beside the repo."""
    return (REPO / os.environ.get("VCF_AASCE_DIR", "../shared/data/aasce")).resolve()


def _corners(h: int, w: int, k: int) -> np.ndarray:
    """17 vertebrae of a tiny film, (17, 4, 2) corners tl, tr, bl, br; a little tilt."""
    out = []
    step = h / 17.0
    for i in range(17):
        y = i * step + 0.15 * step
        x_l, x_r = 0.25 * w + k, 0.75 * w + k
        tilt = 0.05 * step * (1 if i % 2 else -1)
        out.append([[x_l, y - tilt], [x_r, y + tilt], [x_l + 1, y + 0.7 * step - tilt],
                    [x_r - 1, y + 0.7 * step + tilt]])
    return np.array(out, dtype=np.float64)


@pytest.fixture
def tiny_aasce(tmp_path):
    """An AASCE-format folder with three tiny films (two views of one patient, one other)."""
    root = tmp_path / "aasce"
    (root / "images").mkdir(parents=True)
    specs = [("pat-7 A AP.jpg", 170, 60, 0), ("pat-7 B AP.jpg", 204, 80, 3), ("pat-9 A AP.jpg", 170, 60, -2)]
    names, rows, truth = [], [], {}
    rng = np.random.default_rng(0)
    for name, h, w, k in specs:
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 255, (h, w), dtype=np.uint8))
        c = _corners(h, w, k)
        flat = c.reshape(-1, 2)
        rows.append(np.concatenate([flat[:, 0] / w, flat[:, 1] / h]))
        names.append(name)
        truth[name] = (c, (h, w))
    pd.DataFrame(names).to_csv(root / "filenames.csv", header=False, index=False)
    pd.DataFrame(np.array(rows)).to_csv(root / "landmarks.csv", header=False, index=False)
    return root, truth


def test_read_aasce_points_in_project_order(tiny_aasce):
    root, truth = tiny_aasce
    records = read_aasce(root)
    assert len(records) == 3
    for rec in records:
        name = Path(rec["image"]).name
        corners, size = truth[name]
        assert Path(rec["image"]).is_absolute() and Path(rec["image"]).is_file()
        assert rec["size"] == size and rec["view"] == "ap"
        assert rec["fracture"] == 0 and math.isnan(rec["acute"])
        assert [v["level"] for v in rec["vertebrae"]] == list(LEVELS)
        pts = points_array(rec)
        assert pts.shape == (17, 6, 2)
        tl, tr, bl, br = (corners[:, j] for j in range(4))
        np.testing.assert_allclose(pts[:, 0], tl, atol=1e-3)   # p1: top-left ("anterior")
        np.testing.assert_allclose(pts[:, 1], (tl + tr) / 2, atol=1e-3)
        np.testing.assert_allclose(pts[:, 2], tr, atol=1e-3)   # p3: top-right ("posterior")
        np.testing.assert_allclose(pts[:, 3], bl, atol=1e-3)
        np.testing.assert_allclose(pts[:, 4], (bl + br) / 2, atol=1e-3)
        np.testing.assert_allclose(pts[:, 5], br, atol=1e-3)
        for v in rec["vertebrae"]:
            p = v["points"]
            assert v["genant_grade"] == 0 and v["morphology"] == "normal"
            np.testing.assert_allclose(v["box"], [p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()])


def test_patient_ids_group_the_views_of_one_patient(tiny_aasce):
    records = read_aasce(tiny_aasce[0])
    ids = {Path(r["image"]).name: r["patient_id"] for r in records}
    assert ids["pat-7 A AP.jpg"] == ids["pat-7 B AP.jpg"] == "pat-7"
    assert ids["pat-9 A AP.jpg"] == "pat-9"
    assert patient_from_name("x-12 C AP.jpg") == "x-12"
    assert patient_from_name("x-12 D AP2.jpg") == "x-12"
    assert patient_from_name("case-coronal3.jpg") == "case-coronal3"


def test_write_then_read_back(tiny_aasce, tmp_path):
    records = read_aasce(tiny_aasce[0])
    out = tmp_path / "pf"
    manifest = write_vertebrae_dataset(records, out)
    m = load_manifest(manifest)  # validates images, labels and vertebrae
    assert len(m) == 3 and len(m.vertebrae) == 3 * 17
    raw = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert all(Path(p).is_absolute() for p in raw["image"])
    assert set(raw["fracture"]) == {"0"} and set(raw["acute"]) == {""} and set(raw["view"]) == {"ap"}
    assert set(m.vertebrae["genant_grade"]) == {0} and set(m.vertebrae["morphology"]) == {"normal"}
    back = read_vertebrae_csv(out / "vertebrae.csv")
    assert [r["image"] for r in back] == [r["image"] for r in records]
    for a, b in zip(records, back):
        assert a["patient_id"] == b["patient_id"] and a["size"] == b["size"] and b["view"] == "ap"
        assert b["fracture"] == 0
        np.testing.assert_allclose(points_array(a), points_array(b), atol=1e-3)
        assert [v["level"] for v in b["vertebrae"]] == list(LEVELS)


def test_read_vertebrae_csv_sorts_levels_and_keeps_labels(tmp_path):
    """A project-format set written by hand: rows out of order, a fractured vertebra."""
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((50, 40), np.uint8))
    rows = []
    for level, y, grade, morph, acute in (("L2", 30, 2, "wedge", 1), ("L1", 5, 0, "normal", "")):
        r = {"image": "a.png", "level": level, "genant_grade": grade, "morphology": morph, "acute": acute,
             "x_min": 5, "y_min": y, "x_max": 35, "y_max": y + 15}
        for j, (x, yy) in enumerate([(5, y), (20, y), (35, y), (5, y + 15), (20, y + 15), (35, y + 15)], 1):
            r[f"p{j}x"], r[f"p{j}y"] = x, yy
        rows.append(r)
    pd.DataFrame(rows).to_csv(tmp_path / "vertebrae.csv", index=False)
    pd.DataFrame([{"image": "a.png", "patient_id": "P1", "fracture": 1, "acute": 1, "view": "lateral"}]).to_csv(
        tmp_path / "manifest.csv", index=False)
    (rec,) = read_vertebrae_csv(tmp_path / "vertebrae.csv")
    assert rec["image"] == str(img.resolve()) and rec["patient_id"] == "P1" and rec["view"] == "lateral"
    assert rec["size"] == (50, 40) and rec["fracture"] == 1 and rec["acute"] == 1
    assert [v["level"] for v in rec["vertebrae"]] == ["L1", "L2"]
    l2 = rec["vertebrae"][1]
    assert l2["genant_grade"] == 2 and l2["morphology"] == "wedge" and l2["acute"] == 1
    assert math.isnan(rec["vertebrae"][0]["acute"])
    # without a manifest: patient from the file stem, fracture from the grades
    (rec2,) = read_vertebrae_csv(tmp_path / "vertebrae.csv", manifest=None)
    assert rec2["patient_id"] == "a" and rec2["fracture"] == 1
    # a vertebrae.csv kept elsewhere: its image paths are the manifest's, resolved as the manifest's
    away = tmp_path / "tables"
    away.mkdir()
    pd.DataFrame(rows).to_csv(away / "vertebrae.csv", index=False)
    (rec3,) = read_vertebrae_csv(away / "vertebrae.csv", manifest=tmp_path / "manifest.csv")
    assert rec3["image"] == str(img.resolve()) and rec3["patient_id"] == "P1" and len(rec3["vertebrae"]) == 2
    # an unknown level names the file and the row
    bad = pd.DataFrame(rows)
    bad.loc[1, "level"] = "X9"
    bad.to_csv(tmp_path / "vertebrae.csv", index=False)
    with pytest.raises(LandmarkError, match=r"vertebrae\.csv: row 3: unknown vertebral level 'X9'"):
        read_vertebrae_csv(tmp_path / "vertebrae.csv")


def test_bad_landmark_file_is_refused(tiny_aasce):
    root, _ = tiny_aasce
    lm = pd.read_csv(root / "landmarks.csv", header=None)
    lm.iloc[:, :100].to_csv(root / "landmarks.csv", header=False, index=False)
    with pytest.raises(LandmarkError, match="136 numbers"):
        read_aasce(root)
    with pytest.raises(LandmarkError, match="not found"):
        read_aasce(root / "nowhere")
    # the command line says so in one line, no traceback
    with pytest.raises(SystemExit) as exit_info:
        main(["--aasce", str(root), "--out", str(root / "out")])
    assert exit_info.value.code == 2


def test_cli_writes_manifest_and_vertebrae(tiny_aasce, tmp_path, capsys):
    out = tmp_path / "cli"
    main(["--aasce", str(tiny_aasce[0]), "--out", str(out)])
    assert "3 images of 2 patients" in capsys.readouterr().out
    m = load_manifest(out / "manifest.csv")
    assert len(m) == 3 and m.images["patient_id"].nunique() == 2
    assert not any(p.suffix == ".jpg" for p in out.iterdir())  # no image copies
    assert pd.read_csv(out / "excluded.csv").empty


def test_cli_marks_held_out_patients_as_test(tiny_aasce, tmp_path, capsys):
    from data.manifest import assign_splits

    held = tmp_path / "held.csv"
    pd.DataFrame({"image": ["x.png", "y.png"], "patient_id": ["pat-7", "pat-9"], "split": ["test", ""]}).to_csv(held, index=False)
    out = tmp_path / "cli"
    main(["--aasce", str(tiny_aasce[0]), "--out", str(out), "--test-patients-from", str(held)])
    m = load_manifest(out / "manifest.csv").images
    assert set(m.loc[m["split"] == "test", "patient_id"]) == {"pat-7"} and (m["split"] != "test").sum() == 1
    # a training split of this manifest keeps them out, whatever the fractions
    assert set(assign_splits(m, val_fraction=0.5)[m["patient_id"] == "pat-7"]) == {"test"}
    assert "marked split = test" in capsys.readouterr().out


def test_landmark_problems_flag_annotation_errors(tiny_aasce):
    (rec,) = [r for r in read_aasce(tiny_aasce[0]) if r["patient_id"] == "pat-9"]
    pts = points_array(rec)
    assert rec["problems"] == [] and landmark_problems(pts, rec["size"]) == []
    wrapped = pts.copy()
    wrapped[16] = pts[0] - [0, 5]  # last vertebra drawn at the top of the film (seen in AASCE)
    assert any("vertebra 16: not below" in p for p in landmark_problems(wrapped))
    dup = pts.copy()
    dup[16] = pts[15] + [0, 1]  # two vertebrae on one body
    assert any("vertebra 16: overlaps" in p for p in landmark_problems(dup))
    crossed = pts.copy()
    crossed[5, 3:, 1] = crossed[5, :3, 1] - 1  # inferior corners above the superior ones
    assert any("vertebra 5: inferior points" in p for p in landmark_problems(crossed))
    assert any("outside" in p for p in landmark_problems(pts + [0, 60], rec["size"]))


@pytest.mark.aasce
@pytest.mark.skipif(not aasce_dir().is_dir(), reason="real AASCE films not available")
def test_real_aasce_folder():
    records = read_aasce(aasce_dir())
    assert len(records) == 481
    n_outside = 0
    for rec in records:
        assert len(rec["vertebrae"]) == 17
        assert [v["level"] for v in rec["vertebrae"]] == list(LEVELS)
        h, w = rec["size"]
        pts = points_array(rec).reshape(-1, 2)
        inside = (pts >= 0).all() and (pts[:, 0] <= w - 1).all() and (pts[:, 1] <= h - 1).all()
        n_outside += not inside
        # the one film whose last vertebra runs off the bottom does so by under 3 % of its height
        assert (pts > -0.03 * np.array([w, h])).all() and (pts < 1.03 * np.array([w, h])).all()
        if not rec["problems"]:
            # cranio-caudal: each vertebra's centre below the previous one's
            assert (np.diff(points_array(rec).mean(1)[:, 1]) > 0).all(), rec["image"]
    assert n_outside <= 1
    # a few dozen films carry annotation errors (e.g. L5 drawn at the top of the film)
    flagged = [r for r in records if r["problems"]]
    assert 10 <= len(flagged) <= 60
    patients = {r["patient_id"] for r in records}
    assert 200 < len(patients) < 481
    by_name = {Path(r["image"]).name: r["patient_id"] for r in records}
    assert by_name["sunhl-1th-02-Jan-2017-162 A AP.jpg"] == by_name["sunhl-1th-02-Jan-2017-162 B AP.jpg"]
