"""Fractures simulated on films: exact truth, confined pixels, determinism, written data sets."""
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from data.landmarks import corners_to_points, points_array, points_box, read_aasce, write_vertebrae_dataset
from data.manifest import load_manifest
from data.morphometry import LEVELS, grade_vertebrae
from data.phantom2d import LOSS_RANGE, generate_image
from data.readers import read_image
from data.simulate import (SHAPES, FractureSynthesis, InfeasibleFracture, fracture_feasible, main,
                           simulate_dataset, simulate_fracture)

REPO = Path(__file__).resolve().parents[1]
POINTS = [f"p{i}{c}" for i in range(1, 7) for c in "xy"]
GRADE_SHAPES = [(g, s) for g in (1, 2, 3) for s in SHAPES]


def aasce_dir() -> Path:
    """The real AASCE folder: $VCF_AASCE_DIR, else ../shared/data/aasce beside the repo."""
    return (REPO / os.environ.get("VCF_AASCE_DIR", "../shared/data/aasce")).resolve()


def synthetic_film(seed: int = 0, clean: bool = False, n: int = 9):
    """An AP-like film drawn with numpy: textured, slightly tilted bodies with brighter rims,
    dark discs, soft tissue and grain. Returns (image float32 (H, W), points (n, 6, 2))."""
    rng = np.random.default_rng(seed)
    h, w = 400, 200
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.22 + 0.08 * yy / h + 0.06 * np.exp(-((xx - w / 2) / (0.35 * w)) ** 2)
    if not clean:
        img += 0.03 * cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 8) * 4
    corners = []
    y = 18.0
    for i in range(n):
        vh, vw = 28.0 + 1.2 * i, 64.0 + 2.5 * i
        cx, cy = w / 2 + 6 * math.sin(i / 2.0), y + vh / 2
        a = rng.uniform(-0.07, 0.07)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        local = np.array([[-vw / 2, -vh / 2], [vw / 2, -vh / 2], [-vw / 2, vh / 2], [vw / 2, vh / 2]])
        c = local @ rot.T + [cx, cy]
        corners.append(c)
        body = np.zeros((h, w), np.float32)
        cv2.fillPoly(body, [np.round(c[[0, 1, 3, 2]] * 16).astype(np.int32)], 1.0, cv2.LINE_AA, shift=4)
        value = 0.30 if clean else 0.30 + 0.05 * cv2.GaussianBlur(
            rng.standard_normal((h, w)).astype(np.float32), (0, 0), 1.5) * 3
        img += body * value
        if not clean:
            rim = np.zeros((h, w), np.float32)
            cv2.polylines(rim, [np.round(c[[0, 1, 3, 2]] * 16).astype(np.int32)], True, 0.12, 2,
                          cv2.LINE_AA, shift=4)
            img += rim
        y += vh + 10.0
    if not clean:
        img += 0.012 * rng.standard_normal((h, w)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32), corners_to_points(np.array(corners))


def check_simulation(img, pts, index, grade, shape, acute, seed=0):
    new, new_pts, info = simulate_fracture(img, pts, index, grade, shape, acute, rng=seed)
    measured = grade_vertebrae(new_pts)[index]
    assert measured["genant_grade"] == grade, measured
    assert measured["morphology"] == shape, measured
    loss = measured["height_loss"]
    lo, hi = (0.22, 0.24) if (shape == "crush" and grade == 1) else LOSS_RANGE[grade]
    assert lo - 1e-9 <= loss <= hi + 1e-9
    others = np.arange(len(pts)) != index
    assert np.array_equal(new_pts[others], pts[others])  # other vertebrae's points untouched
    region = info["region"]
    assert region.shape == img.shape and region.dtype == bool and region.any()
    assert np.array_equal(new[~region], img[~region])  # bit for bit outside the region
    # and that region is bounded without trusting it: in the body's own frame (along its
    # endplates and across them), nothing changes beyond the neighbours' facing endplates, nor
    # further out along the endplates than a quarter of the body's extent (the documented reach)
    body = pts[index]
    u = (body[2] - body[0]) + (body[5] - body[3])
    u /= np.linalg.norm(u)
    v = np.array([-u[1], u[0]]) * np.sign((body[3:] - body[:3]).mean(0) @ np.array([-u[1], u[0]]))
    centre = body.mean(0)
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    along = (xx - centre[0]) * u[0] + (yy - centre[1]) * u[1]
    across = (xx - centre[0]) * v[0] + (yy - centre[1]) * v[1]
    extent = (body - centre) @ u
    reach = 0.25 * float(extent.max() - extent.min()) + 2
    top = float(((pts[index - 1][3:] - centre) @ v).min()) - 2 if index > 0 else -np.inf
    bottom = float(((pts[index + 1][:3] - centre) @ v).max()) + 2 if index + 1 < len(pts) else np.inf
    allowed = ((across > top) & (across < bottom) & (along >= extent.min() - reach) & (along <= extent.max() + reach))
    assert np.array_equal(new[~allowed], img[~allowed])
    assert new.dtype == np.float32 and new.shape == img.shape
    assert float(new.min()) >= 0.0 and float(new.max()) <= 1.0
    assert (new[region] != img[region]).any()
    # the region covers the collapsed body and leaves the neighbours' centres alone
    cx, cy = np.round(new_pts[index].mean(0)).astype(int)
    assert region[cy, cx]
    for j in (index - 1, index + 1):
        if 0 <= j < len(pts):
            nx, ny = np.round(pts[j].mean(0)).astype(int)
            assert not region[ny, nx]
    return new, new_pts, info


# ----------------------------------------------------------------------------- synthetic film


@pytest.mark.parametrize("grade,shape", GRADE_SHAPES)
@pytest.mark.parametrize("acute", [False, True])
def test_synthetic_film_every_grade_and_shape(grade, shape, acute):
    img, pts = synthetic_film(seed=1)
    check_simulation(img, pts, 4, grade, shape, acute, seed=grade * 10 + acute)


def test_image_agrees_with_the_new_points():
    """On a clean drawing the body's edges move exactly where the new points say."""
    img, pts = synthetic_film(seed=2, clean=True)
    for shape in SHAPES:
        new, new_pts, _ = simulate_fracture(img, pts, 4, 3, shape, acute=False, rng=5)
        p = new_pts[4]
        for a in (0.2, 0.5, 0.8):  # columns between the side corners
            # the endplates bow as quadratics through their three points (straight before)
            lagrange = np.array([2 * (a - 0.5) * (a - 1), -4 * a * (a - 1), 2 * a * (a - 0.5)])
            top, bottom = lagrange @ p[:3], lagrange @ p[3:]
            axis = (bottom - top) / np.linalg.norm(bottom - top)
            for edge, outward in ((top, -axis), (bottom, axis)):
                inside = edge - outward * 2.5
                outside = edge + outward * 2.5
                vin = cv2.getRectSubPix(new, (1, 1), tuple(map(float, inside)))[0, 0]
                vout = cv2.getRectSubPix(new, (1, 1), tuple(map(float, outside)))[0, 0]
                assert vin - vout > 0.15, (shape, a, vin, vout)


def test_deterministic_for_a_seed():
    img, pts = synthetic_film(seed=3)
    a = simulate_fracture(img, pts, 5, 2, "wedge", acute=True, rng=7)
    b = simulate_fracture(img, pts, 5, 2, "wedge", acute=True, rng=np.random.default_rng(7))
    c = simulate_fracture(img, pts, 5, 2, "wedge", acute=True, rng=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_refuses_what_cannot_be_drawn():
    img, pts = synthetic_film(seed=4)
    with pytest.raises(ValueError):
        simulate_fracture(img, pts, 4, 0, "wedge")
    with pytest.raises(ValueError):
        simulate_fracture(img, pts, 4, 2, "pancake")
    squat = pts.copy()
    squat[4, 3:] = squat[4, :3] + 0.7 * (squat[4, 3:] - squat[4, :3])  # already collapsed
    assert not fracture_feasible(squat, 4, 1, "wedge")
    with pytest.raises(InfeasibleFracture):
        simulate_fracture(img, squat, 4, 1, "wedge")
    assert fracture_feasible(pts, 4, 1, "wedge")


def test_first_and_last_vertebra():
    img, pts = synthetic_film(seed=5)
    check_simulation(img, pts, 0, 2, "crush", True)
    check_simulation(img, pts, len(pts) - 1, 3, "biconcave", False)


def test_on_a_lateral_phantom_film():
    sample = generate_image(11, 0, 384)
    img = sample["image"].astype(np.float32) / (2 ** sample["meta"]["bits_stored"] - 1)
    pts = np.stack([r["points"] for r in sample["vertebrae"]])
    grades = [r["genant_grade"] for r in sample["vertebrae"]]
    done = 0
    for i in range(1, len(pts) - 1):
        if grades[i - 1] == grades[i] == grades[i + 1] == 0 and fracture_feasible(pts, i, 2, "wedge"):
            check_simulation(img, pts, i, 2, "wedge", acute=True)
            done += 1
            break
    assert done == 1


# ----------------------------------------------------------------------------- augmentation


def test_fracture_synthesis_updates_the_labels():
    img, pts = synthetic_film(seed=6)
    labels = {"fracture": 0.0, "acute": float("nan"), "levels": list(LEVELS[3:12])}
    aug = FractureSynthesis(p=1.0, rng=0)
    new, new_pts, out = aug(img, pts, labels)
    sim = out["simulated"]
    assert sim is not None and out["fracture"] == 1.0
    i = sim["index"]
    assert out["genant_grade"][i] == sim["grade"] and out["morphology"][i] == sim["shape"]
    assert out["acute"] == float(sim["acute"]) and out["acute_vertebrae"][i] == float(sim["acute"])
    assert grade_vertebrae(new_pts)[i]["genant_grade"] == sim["grade"]
    assert (np.delete(out["genant_grade"], i) == 0).all()
    assert labels["fracture"] == 0.0  # the input dict is not modified
    same, same_pts, out0 = FractureSynthesis(p=0.0, rng=0)(img, pts, labels)
    assert same is img and np.array_equal(same_pts, pts) and out0["simulated"] is None
    assert out0["fracture"] == 0.0
    a = FractureSynthesis(p=1.0)(img, pts, labels, rng=42)
    b = FractureSynthesis(p=1.0)(img, pts, labels, rng=42)
    assert np.array_equal(a[0], b[0]) and a[2]["simulated"] == b[2]["simulated"]


def test_simulate_dataset_goes_on_past_an_unreadable_film(tmp_path, capsys):
    records = _synthetic_records(tmp_path, n=2)
    broken = tmp_path / "src" / "broken A AP.png"
    broken.write_bytes(b"not a png")
    records.insert(1, dict(records[0], image=str(broken), patient_id="patient-x"))
    manifest = simulate_dataset(records, tmp_path / "out", n_per_image=2, seed=1)
    written = pd.read_csv(manifest)
    assert len(written) == 4 and set(written["patient_id"]) == {"patient-0", "patient-1"}
    summary = json.loads((tmp_path / "out" / "simulate.json").read_text())
    assert summary["n_skipped_unreadable"] == 1 and summary["unreadable"][0]["image"] == str(broken)
    assert "broken A AP.png" in capsys.readouterr().err


def test_fracture_synthesis_during_training_changes_every_target(tmp_path):
    """RadiographDataset(fracture_synthesis=p) fractures training films on the fly: the film label,
    the fracture heatmap and the crop labels all follow; evaluation sets never synthesise."""
    import torch

    from data.dataset import RadiographDataset, SpineDataModule

    records = _synthetic_records(tmp_path, n=3)
    manifest = write_vertebrae_dataset(records, tmp_path / "set")
    man = load_manifest(manifest)
    size = (256, 128)
    plain = RadiographDataset(man, image_size=size, augment=True, max_crops=20)
    synth = RadiographDataset(man, image_size=size, augment=True, max_crops=20, fracture_synthesis=1.0)
    for i in range(len(man.images)):
        torch.manual_seed(i)
        before = plain[i]
        assert float(before["fracture"]) == 0.0 and not before["heatmap_target"][0].any()
        assert float(before["heatmap_known"][0]) == 1.0 and np.nansum(before["crop_fracture"].numpy()) == 0
        torch.manual_seed(i)
        after = synth[i]
        assert float(after["fracture"]) == 1.0
        assert float(after["acute"]) in (0.0, 1.0)  # known: the simulation says which
        assert float(after["heatmap_known"][0]) == 1.0 and after["heatmap_target"][0].any()
        assert (float(after["acute"]) == 1.0) == bool(after["heatmap_target"][1].any())
        valid = after["crop_valid"].numpy() == 1
        crop_fracture = after["crop_fracture"].numpy()[valid]
        assert crop_fracture.sum() == 1 and set(np.unique(crop_fracture)) == {0.0, 1.0}
        k = int(np.flatnonzero(crop_fracture == 1)[0])
        assert float(after["crop_acute"][k]) == float(after["acute"])
        assert not torch.equal(after["image"], before["image"])
    # evaluation sets keep the films as labelled
    still = RadiographDataset(man, image_size=size, augment=False, fracture_synthesis=1.0)
    assert still.synthesis is None and float(still[0]["fracture"]) == 0.0
    with pytest.raises(ValueError, match="fracture_synthesis"):
        RadiographDataset(man, image_size=size, augment=True, fracture_synthesis=1.5)
    # a separate validation manifest of another patient (splits never share one)
    train_manifest = write_vertebrae_dataset(records[:2], tmp_path / "train_set")
    val_manifest = write_vertebrae_dataset(records[2:], tmp_path / "val_set")
    dm = SpineDataModule(str(train_manifest), val_manifest=str(val_manifest), image_size=size,
                         fracture_synthesis=0.3, num_workers=0)
    dm.setup("fit")
    assert dm.train_set.synthesis is not None and dm.train_set.synthesis.p == 0.3
    assert dm.val_set.synthesis is None


# ----------------------------------------------------------------------------- data sets


def _synthetic_records(tmp_path, n=2):
    records = []
    for k in range(n):
        img, pts = synthetic_film(seed=20 + k)
        path = tmp_path / "src" / f"film {k} A AP.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.round(img * 65535).astype(np.uint16))
        levels = LEVELS[3:3 + len(pts)]
        records.append({"image": str(path), "patient_id": f"patient-{k}", "size": img.shape, "view": "ap",
                        "fracture": 0.0, "acute": float("nan"), "problems": [],
                        "vertebrae": [{"level": lv, "points": p, "box": points_box(p), "genant_grade": 0.0,
                                       "morphology": "normal", "acute": float("nan")}
                                      for lv, p in zip(levels, pts)]})
    return records


def check_written_set(manifest_path, records, size=None):
    m = load_manifest(manifest_path)  # validates files, labels, vertebrae and consistency
    raw = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    source = {r["image"]: r for r in records}
    vert = pd.read_csv(Path(manifest_path).parent / "vertebrae.csv")
    n_fractured = 0
    for _, row in raw.iterrows():
        rec = source[row["source_image"]]
        assert row["patient_id"] == rec["patient_id"]
        rows = vert[vert.image == row["image"]]
        assert len(rows) == len(rec["vertebrae"])
        measured = grade_vertebrae(rows[POINTS].to_numpy(float).reshape(-1, 6, 2))
        fractured = rows[rows.genant_grade > 0]
        assert row["fracture"] == ("1" if len(fractured) else "0")
        if len(fractured):
            n_fractured += 1
            assert row["acute"] == str(int(fractured.acute.max()))
        else:
            assert row["acute"] == "" and row["simulated"] == ""
            # a normal film is written unchanged
            written = read_image(Path(manifest_path).parent / row["image"]).pixels
            original = read_image(rec["image"]).pixels
            if size is None:
                assert np.abs(written - original).max() <= 0.5 / 65535 + 1e-7
        for (_, vr), meas in zip(rows.iterrows(), measured):
            if vr.genant_grade > 0:
                assert meas["genant_grade"] == vr.genant_grade and meas["morphology"] == vr.morphology
                assert vr.acute in (0, 1)
            else:
                assert vr.morphology == "normal" and math.isnan(vr.acute)
    return m, n_fractured


def test_simulate_dataset_writes_valid_truthful_files(tmp_path):
    records = _synthetic_records(tmp_path)
    out1 = tmp_path / "out1"
    manifest = simulate_dataset(records, out1, n_per_image=12, p_fracture=0.5, seed=3)
    m, n_fractured = check_written_set(manifest, records)
    assert len(m) == 24 and set(m.images.patient_id) == {"patient-0", "patient-1"}
    assert 6 <= n_fractured <= 18  # about half
    img = read_image(m.images.image[0])
    assert img.source_format == "png" and img.bits_stored == 16
    # deterministic for a seed: same CSVs, same pixels
    out2 = tmp_path / "out2"
    simulate_dataset(records, out2, n_per_image=12, p_fracture=0.5, seed=3)
    for name in ("manifest.csv", "vertebrae.csv"):
        assert (out1 / name).read_text() == (out2 / name).read_text()
    for p in sorted((out1 / "images").iterdir()):
        assert p.read_bytes() == (out2 / "images" / p.name).read_bytes()
    out3 = tmp_path / "out3"
    simulate_dataset(records, out3, n_per_image=12, p_fracture=0.5, seed=4)
    assert (out1 / "vertebrae.csv").read_text() != (out3 / "vertebrae.csv").read_text()


def test_simulate_cli_on_a_project_format_set(tmp_path, capsys):
    records = _synthetic_records(tmp_path, n=1)
    write_vertebrae_dataset(records, tmp_path / "pf")
    out = tmp_path / "sim"
    main(["--vertebrae-csv", str(tmp_path / "pf" / "vertebrae.csv"), "--out", str(out), "--n", "4",
          "--seed", "1", "--p-fracture", "1"])
    assert "wrote 4 films (4 with fractures)" in capsys.readouterr().out
    m, n_fractured = check_written_set(out / "manifest.csv", records)
    assert n_fractured == 4 and set(m.images.patient_id) == {"patient-0"}


# ----------------------------------------------------------------------------- real films


@pytest.fixture(scope="module")
def real_films():
    if not aasce_dir().is_dir():
        pytest.skip("real AASCE films not available")
    records = [r for r in read_aasce(aasce_dir()) if not r["problems"]][:3]
    films = []
    for rec in records:
        img = read_image(rec["image"]).pixels
        h, w = img.shape
        small = cv2.resize(img, (round(w / 3), round(h / 3)), interpolation=cv2.INTER_AREA)
        scale = np.array([small.shape[1] / w, small.shape[0] / h])
        films.append((rec, small, (points_array(rec) + 0.5) * scale - 0.5))
    return films


@pytest.mark.aasce
def test_real_films_every_grade_and_shape(real_films):
    for f, (rec, img, pts) in enumerate(real_films):
        for k, (grade, shape) in enumerate(GRADE_SHAPES):
            order = sorted(range(1, len(pts) - 1), key=lambda i: (abs(i - 8 - f), i))
            index = next((i for i in order if fracture_feasible(pts, i, grade, shape)), None)
            assert index is not None, (rec["image"], grade, shape)
            check_simulation(img, pts, index, grade, shape, acute=bool(k % 2), seed=k)


@pytest.mark.aasce
def test_real_films_dataset(real_films, tmp_path):
    records = [rec for rec, _, _ in real_films]
    size = real_films[0][1].shape[0]
    manifest = simulate_dataset(records, tmp_path / "sim", n_per_image=2, p_fracture=1.0, seed=0, size=size)
    m, n_fractured = check_written_set(manifest, records, size=size)
    assert len(m) == 6 and n_fractured == 6
    assert read_image(m.images.image[0]).pixels.shape[0] == size
