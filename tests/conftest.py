"""Shared pytest fixtures."""

# --------------------------------------------------------------------------- tiny_eval_set
# Self-contained (imports inside the fixture) so that other fixtures can sit beside it.
import pytest


@pytest.fixture
def dicom_reads(monkeypatch):
    """The paths pydicom.dcmread is called with during the test, in order."""
    import pydicom

    reads = []
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return reads


@pytest.fixture
def tiny_eval_set(tmp_path):
    """A tiny labelled set with the outputs of an imaginary ``infer.py`` run (docs/formats.md).

    12 manifest images (64 x 48 px, three vertebrae L1-L3 each) under ``tmp_path/data``:
    fractured ones with Genant grades 1-3, acute / chronic / unknown acuity, normal ones,
    two with an unknown ``fracture`` label; ``tmp_path/infer`` holds predictions.csv (one
    error row, one ok row of an image missing from the manifest), per-image JSONs, heatmap
    .npy files and small PNG overlays. Of the fractured images with an ok JSON, three have
    the heatmap peak inside a fractured vertebra's box (one exactly on its edge) and two
    outside (one inside a *non*-fractured vertebra's box).

    Returns a dict: ``root``, ``data_dir``, ``manifest``, ``vertebrae``, ``predictions``,
    ``infer_dir`` (str paths) and ``truth`` (one dict per manifest image: name, image,
    fracture, acute, max_grade, p_fracture, p_acute, status, peak, hit).
    """
    import csv
    import json

    import numpy as np
    from PIL import Image

    nan = float("nan")
    h, w = 64, 48
    boxes = {"L1": (10.0, 4.0, 38.0, 16.0), "L2": (10.0, 22.0, 38.0, 34.0), "L3": (10.0, 40.0, 38.0, 52.0)}
    # name, fracture, acute, {level: grade} of fractured vertebrae (None: grades unknown),
    # p_fracture, p_acute, status, peak [x, y], hit
    spec = [
        ("img_00", 1, 1, {"L2": 3}, 0.95, 0.90, "ok", (24.0, 28.0), True),
        ("img_01", 1, 0, {"L1": 2}, 0.80, 0.30, "ok", (20.0, 10.0), True),
        ("img_02", 1, 1, {"L3": 1}, 0.55, 0.70, "ok", (24.0, 28.0), False),   # peak in healthy L2
        ("img_03", 1, 0, {"L2": 1}, 0.40, 0.80, "ok", (45.0, 60.0), False),   # peak outside all
        ("img_04", 1, "", {"L3": 2}, 0.70, 0.50, "ok", (38.0, 52.0), True),   # on the box corner
        ("img_05", 0, "", {}, 0.10, 0.05, "ok", (24.0, 10.0), None),
        ("img_06", 0, "", {}, 0.30, 0.10, "ok", (24.0, 28.0), None),
        ("img_07", 0, "", {}, 0.60, 0.20, "ok", (24.0, 46.0), None),
        ("img_08", 0, "", {}, 0.20, 0.15, "ok", (30.0, 30.0), None),
        ("img_09", "", "", None, 0.50, 0.40, "ok", (24.0, 28.0), None),       # grades empty
        ("img_10", "", "", "no-rows", 0.90, 0.60, "ok", (24.0, 28.0), None),  # no vertebra rows
        ("img_11", 1, 1, {"L2": 3}, nan, nan, "error", None, None),           # inference failed
    ]
    data_dir = tmp_path / "data"
    infer_dir = tmp_path / "infer"
    (data_dir / "images").mkdir(parents=True)
    infer_dir.mkdir()

    def write_png(path, rgb):
        arr = np.zeros((h, w, 3) if rgb else (h, w), np.uint8)
        arr[..., 0 if rgb else slice(None)] = 40
        for x0, y0, x1, y1 in boxes.values():
            arr[int(y0):int(y1) + 1, int(x0):int(x1) + 1] = 200
        Image.fromarray(arr).save(path)

    manifest_rows, vert_rows, pred_rows, truth = [], [], [], []
    for i, (name, frac, acute, grades, p_f, p_a, status, peak, hit) in enumerate(spec):
        rel = f"images/{name}.png"
        image_abs = str((data_dir / rel).resolve())
        write_png(data_dir / rel, rgb=False)
        manifest_rows.append({"image": rel, "patient_id": "NA" if i == 5 else f"p{i:02d}",
                              "fracture": frac, "acute": acute, "view": "lateral"})
        if grades != "no-rows":
            for level, (x0, y0, x1, y1) in boxes.items():
                g = "" if grades is None else (grades or {}).get(level, 0)
                vert_rows.append({"image": rel, "level": level, "genant_grade": g,
                                  "morphology": "" if g == "" else ("wedge" if g else "normal"),
                                  "acute": acute if g not in ("", 0) else "",
                                  "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1,
                                  **{f"p{k + 1}{a}": v for k, pt in enumerate(
                                      [(x0, y0), ((x0 + x1) / 2, y0), (x1, y0),
                                       (x0, y1), ((x0 + x1) / 2, y1), (x1, y1)]) for a, v in zip("xy", pt)}})
        max_grade = nan if grades in (None, "no-rows") else float(max(grades.values(), default=0))
        truth.append({"name": name, "image": image_abs, "fracture": nan if frac == "" else float(frac),
                      "acute": nan if acute == "" else float(acute), "max_grade": max_grade,
                      "p_fracture": p_f, "p_acute": p_a, "status": status, "peak": peak, "hit": hit})
        if status != "ok":
            pred_rows.append({"image": image_abs, "name": name, "status": "error",
                              "error": "RuntimeError: could not read image"})
            continue
        p_agf = min(1.0, p_a / p_f)
        pred_rows.append({"image": image_abs, "name": name, "p_fracture": p_f, "p_acute": p_a,
                          "p_acute_given_fracture": round(p_agf, 6), "heatmap_peak_x": peak[0],
                          "heatmap_peak_y": peak[1], "status": "ok", "error": ""})

    # an ok prediction for an image that is not in the manifest
    stray = data_dir / "images" / "stray.png"
    write_png(stray, rgb=False)
    pred_rows.append({"image": str(stray.resolve()), "name": "stray", "p_fracture": 0.5, "p_acute": 0.5,
                      "p_acute_given_fracture": 1.0, "heatmap_peak_x": 24.0, "heatmap_peak_y": 28.0,
                      "status": "ok", "error": ""})

    scale, ox, oy = 4.0, 1.5, 1.5
    for row in pred_rows:
        if row["status"] != "ok":
            continue
        name = row["name"]
        hm = np.zeros((h // 4, w // 4), np.float32)
        j = int(np.clip(round((row["heatmap_peak_x"] - ox) / scale), 0, hm.shape[1] - 1))
        i_ = int(np.clip(round((row["heatmap_peak_y"] - oy) / scale), 0, hm.shape[0] - 1))
        hm[i_, j] = row["p_fracture"]
        np.save(infer_dir / f"{name}_heatmap.npy", hm)
        write_png(infer_dir / f"{name}_heatmap.png", rgb=True)
        rec = {"image": row["image"], "name": name, "p_fracture": row["p_fracture"], "p_acute": row["p_acute"],
               "p_acute_given_fracture": row["p_acute_given_fracture"],
               "heatmap_peak": [row["heatmap_peak_x"], row["heatmap_peak_y"]],
               "heatmap_peak_value": row["p_fracture"], "image_size": [h, w],
               "heatmap": {"npy": f"{name}_heatmap.npy", "png": f"{name}_heatmap.png", "shape": list(hm.shape),
                           "to_image": {"scale": scale, "offset": [ox, oy]}},
               "checkpoint_id": "test-checkpoint", "model": "test-model"}
        (infer_dir / f"{name}.json").write_text(json.dumps(rec, indent=2))

    def write_csv(path, rows, fields):
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)

    manifest = data_dir / "manifest.csv"
    vertebrae = data_dir / "vertebrae.csv"
    predictions = infer_dir / "predictions.csv"
    write_csv(manifest, manifest_rows, ["image", "patient_id", "fracture", "acute", "view"])
    write_csv(vertebrae, vert_rows, ["image", "level", "genant_grade", "morphology", "acute",
                                     "x_min", "y_min", "x_max", "y_max"]
              + [f"p{k}{a}" for k in range(1, 7) for a in "xy"])
    write_csv(predictions, pred_rows, ["image", "name", "p_fracture", "p_acute", "p_acute_given_fracture",
                                       "heatmap_peak_x", "heatmap_peak_y", "status", "error"])
    return {"root": str(tmp_path), "data_dir": str(data_dir), "manifest": str(manifest),
            "vertebrae": str(vertebrae), "predictions": str(predictions), "infer_dir": str(infer_dir),
            "truth": truth}


# --------------------------------------------------------------------------- markers
def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
