"""End to end on CPU: phantom -> tiny fit -> checkpoint -> infer.py -> evaluate.py -> notebook."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from data.phantom2d import generate_dataset
from training_config import compose_config, phantom_as_dicom

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import train

    tmp = tmp_path_factory.mktemp("run")
    generate_dataset(tmp / "data", n=24, seed=21, size=160, workers=1, progress=False)
    generate_dataset(tmp / "test", n=6, seed=22, size=160, workers=1, progress=False)
    train.main(["fit", "--config", str(compose_config(tmp, tmp / "data" / "manifest.csv"))])
    return tmp


def test_fit_writes_checkpoints_and_resolved_config(trained):
    assert (trained / "best.ckpt").is_file() and (trained / "last.ckpt").is_file()
    configs = list(trained.glob("logs/version_*/config.yaml"))
    assert configs, "the resolved config is saved with the run"
    resolved = yaml.safe_load(configs[0].read_text())
    assert resolved["data"]["image_size"] == [128, 96]
    metrics = pd.read_csv(next(trained.glob("logs/version_*/metrics.csv")))
    assert "val/auroc_fracture" in metrics.columns and "train/loss" in metrics.columns
    ckpt = torch.load(trained / "best.ckpt", weights_only=True)  # loads without unrestricted pickle
    assert ckpt["vcf_model"]["backbone"] == "resnet18"
    assert ckpt["vcf_model"]["image_size"] == [128, 96]  # linked from data.image_size


def test_resume_from_last_checkpoint(trained, tmp_path):
    """--ckpt_path last.ckpt continues the run: one more epoch adds exactly one epoch of steps."""
    import shutil

    import train

    before = torch.load(trained / "last.ckpt", weights_only=True)
    work = tmp_path / "resume"
    work.mkdir()
    shutil.copy(trained / "last.ckpt", work / "start.ckpt")
    cfg = compose_config(work, trained / "data" / "manifest.csv")
    cli = train.main(["fit", "--config", str(cfg), "--trainer.max_epochs", "2", "--ckpt_path", str(work / "start.ckpt")])
    assert cli.trainer.current_epoch == 2
    assert cli.trainer.global_step == 2 * before["global_step"]


def test_last_checkpoint_follows_every_epoch_when_best_stops_improving(tmp_path):
    """last.ckpt is the latest epoch even when the monitored metric never improves after the
    first epoch (here: a validation split with no fracture, so its AUROC cannot rise). Under
    Lightning 2.6, `save_last: true` alone would leave last.ckpt at epoch 0."""
    import train

    data = tmp_path / "data"
    generate_dataset(data, n=20, seed=23, size=128, workers=1, progress=False)
    manifest = pd.read_csv(data / "manifest.csv")
    manifest = manifest[manifest["fracture"] == 0]
    manifest.to_csv(data / "manifest.csv", index=False)
    vertebrae = pd.read_csv(data / "vertebrae.csv")
    kept = {Path(i).name for i in manifest["image"]}
    vertebrae[[Path(i).name in kept for i in vertebrae["image"]]].to_csv(data / "vertebrae.csv", index=False)
    cfg = compose_config(tmp_path / "run", data / "manifest.csv",
                         trainer={"max_epochs": 3, "limit_train_batches": 1, "limit_val_batches": 1},
                         model={"fpn_dim": 16}, data={"image_size": [96, 64]})
    train.main(["fit", "--config", str(cfg)])
    best = torch.load(tmp_path / "run" / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert best["epoch"] == 0
    assert last["epoch"] == 2 and last["global_step"] == 3 * best["global_step"]


def test_infer_end_to_end(trained, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "infer"
    proc = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(trained / "best.ckpt"), "--out", str(out),
                           "--num-workers", "0", "--quiet", "--min-spine-score", "0",  # a minute's training finds no spine
                           str(trained / "test" / "manifest.csv"), str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # one input failed
    assert "6 ok, 1 failed" in proc.stdout
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 7
    err = table[table.status == "error"]
    assert len(err) == 1 and "broken.png" in err.image.iloc[0] and isinstance(err.error.iloc[0], str)
    ok = table[table.status == "ok"]
    assert ok.p_fracture.between(0, 1).all() and ok.p_acute.between(0, 1).all()
    assert (ok.p_acute <= ok.p_fracture + 1e-6).all()  # p(acute fracture) <= p(fracture)
    for name in ok.name:
        record = json.loads((out / f"{name}.json").read_text())
        hm = np.load(out / f"{name}_heatmap.npy")
        assert list(hm.shape) == record["heatmap"]["shape"]
        # the peak maps into the original image
        h, w = record["image_size"]
        x, y = record["heatmap_peak"]
        assert -1 <= x <= w and -1 <= y <= h
        # the peak is the map's maximum: the dense head's peak cell, or a vertebra's centre
        assert hm.max() == pytest.approx(record["heatmap_peak_value"], abs=1e-6)
        i, j = np.unravel_index(hm.argmax(), hm.shape)
        t = record["heatmap"]["to_image"]
        head_x, head_y = record["heatmap_peak_head"]
        assert np.allclose([t["scale"] * j + t["offset"][0], t["scale"] * i + t["offset"][1]], [head_x, head_y]) \
            or record["heatmap_peak_value"] > record["heatmap_peak_head_value"]
        if record["heatmap_peak_value"] == record["heatmap_peak_head_value"]:
            assert [x, y] == [head_x, head_y]
        else:
            assert any(np.allclose(np.mean(v["points"], axis=0), [x, y]) for v in record["vertebrae"])
        assert (out / f"{name}_heatmap.png").stat().st_size > 0
        assert len(record["checkpoint_id"]) == 16

    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, "evaluate.py", "--predictions", str(out / "predictions.csv"),
                           "--manifest", str(trained / "test" / "manifest.csv"), "--out", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((report / "metrics.json").read_text())
    assert summary["counts"]["n_fracture_pos"] + summary["counts"]["n_fracture_neg"] == 6

    nbclient = pytest.importorskip("nbclient")
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "evaluate.ipynb", as_version=4)
    env = {"VCF_PREDICTIONS": str(out / "predictions.csv"), "VCF_MANIFEST": str(trained / "test" / "manifest.csv")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_finetune_from_checkpoint_with_frozen_backbone(trained, tmp_path):
    """init_from loads the earlier weights; BackboneFinetuning keeps the encoder frozen."""
    import train

    cfg = yaml.safe_load(compose_config(tmp_path, trained / "data" / "manifest.csv",
                                        model={"init_from": str(trained / "best.ckpt")}).read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.BackboneFinetuning",
                                        "init_args": {"unfreeze_backbone_at_epoch": 5}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    cli = train.main(["fit", "--config", str(tmp_path / "config.yaml")])
    before = torch.load(trained / "best.ckpt", weights_only=True)["state_dict"]
    after = cli.model.state_dict()
    # convolution kernels (BatchNorm stays trainable under BackboneFinetuning's default)
    enc = [k for k in before if k.startswith("net.encoder.") and before[k].ndim == 4]
    assert enc
    heads = [k for k in before if k.startswith("net.heatmap_head.")]
    assert all(torch.equal(before[k], after[k]) for k in enc), "encoder should stay frozen"
    assert any(not torch.equal(before[k], after[k]) for k in heads), "heads should train"


def test_resume_errors_and_identifiers(trained, tmp_path):
    import infer

    images = sorted((trained / "test" / "images").glob("*.png"))
    folder = tmp_path / "scans"
    folder.mkdir()
    dcm = phantom_as_dicom(images[0], folder / "study1")  # no suffix: found by content
    (folder / "empty.dcm").write_bytes(b"")
    out = tmp_path / "out"
    args = ["--checkpoint", str(trained / "best.ckpt"), "--out", str(out), "--num-workers", "0", "--quiet",
            "--min-spine-score", "0"]  # a minute's training finds no spine
    assert infer.main(args + [str(folder)]) == 1
    errors = pd.read_csv(out / "errors.csv")
    assert len(errors) == 1 and errors.image.iloc[0].endswith("empty.dcm") and "empty" in errors.error.iloc[0]
    record = json.loads((out / "study1.json").read_text())
    assert record["pixel_spacing_mm"] == [0.5, 0.5]
    assert record["dicom"]["Modality"] == "DX" and "patient" not in record
    everything = "".join(p.read_text(errors="ignore") for p in out.glob("*") if p.suffix in (".json", ".csv"))
    assert "Doe" not in everything and "MRN-991122" not in everything and "19400101" not in everything

    # --resume: complete outputs are kept as they are, the failure is tried again
    stamp = (out / "study1_heatmap.npy").stat().st_mtime_ns
    assert infer.main(args + ["--resume", str(folder)]) == 1
    assert (out / "study1_heatmap.npy").stat().st_mtime_ns == stamp
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(table.status) == ["error", "ok"]

    # a half-written output (no JSON) is redone
    (out / "study1.json").unlink()
    assert infer.main(args + ["--resume", "--keep-identifiers", str(dcm)]) == 0
    record = json.loads((out / "study1.json").read_text())
    assert record["patient"] == {"PatientName": "Doe^Jane", "PatientID": "MRN-991122", "PatientBirthDate": "19400101"}


def test_dicom_outputs_and_onnx_backend(trained, tmp_path):
    """--dicom-sc/--dicom-sr write readable DICOM; --backend onnx gives the same probabilities and vertebrae."""
    import pydicom

    import infer
    from inference.onnx import main as export_main

    images = sorted((trained / "test" / "images").glob("*.png"))
    dcm = phantom_as_dicom(images[1], tmp_path / "film.dcm")
    out = tmp_path / "out"
    args = ["--out", str(out), "--num-workers", "0", "--quiet", "--min-spine-score", "0", str(dcm)]
    assert infer.main(["--checkpoint", str(trained / "best.ckpt"), "--dicom-sc", "--dicom-sr"] + args) == 0
    source = pydicom.dcmread(dcm)
    sc = pydicom.dcmread(out / "film_sc.dcm")
    sr = pydicom.dcmread(out / "film_sr.dcm")
    # by default a de-identified copy: a new study, a pseudonymous patient, the source's UIDs gone
    assert sc.StudyInstanceUID == sr.StudyInstanceUID != source.StudyInstanceUID
    assert sc.SamplesPerPixel == 3 and sc.PatientID == sr.PatientID != source.PatientID
    assert "Doe" not in str(sc) + str(sr) and source.SOPInstanceUID not in str(sr)
    torch_row = pd.read_csv(out / "predictions.csv").iloc[0]

    onnx_path = tmp_path / "model.onnx"
    export_main(["--checkpoint", str(trained / "best.ckpt"), "--onnx", str(onnx_path)])
    out2 = tmp_path / "out_onnx"
    assert infer.main(["--checkpoint", str(onnx_path), "--backend", "onnx", "--out", str(out2), "--num-workers", "0",
                       "--quiet", "--min-spine-score", "0", str(dcm)]) == 0
    onnx_row = pd.read_csv(out2 / "predictions.csv").iloc[0]
    assert abs(onnx_row.p_fracture - torch_row.p_fracture) <= 1e-4
    assert abs(onnx_row.p_acute - torch_row.p_acute) <= 1e-4
    # the per-vertebra stage runs on the ONNX graphs too
    torch_json, onnx_json = (json.loads((o / "film.json").read_text()) for o in (out, out2))
    assert len(onnx_json["vertebrae"]) == len(torch_json["vertebrae"])
    assert (out2 / "film.json").stat().st_mode & 0o044  # outputs are readable by the group / others
