"""benchmarks/synthesis_study.py: the patient split it inherits and the per-run config it writes."""
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import synthesis_study as S

from data.manifest import assign_splits


def test_split_patients_keeps_the_mix_models_test_and_validation_patients(tmp_path):
    patients = [f"sunhl-{i:03d}" for i in range(300)]
    rows = [{"image": f"{p}_{k}.png", "patient_id": p, "fracture": "0", "split": "test" if i % 5 == 0 else ""}
            for i, p in enumerate(patients) for k in range(2)]
    rows += [{"image": f"phantom_{i}.png", "patient_id": f"phantom-{i}", "fracture": "1", "split": ""} for i in range(50)]
    mix = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(mix, index=False)
    test, val = S.split_patients(mix)
    assert test == {p for i, p in enumerate(patients) if i % 5 == 0}
    assert not test & val and 0.08 < len(val) / 350 < 0.22
    # the same patients training put in validation (one hash, one seed)
    frame = pd.read_csv(mix, dtype=str, keep_default_na=False)
    splits = assign_splits(frame, val_fraction=0.15, seed=0)
    assert val == set(frame.loc[splits == "val", "patient_id"])


def test_run_config_points_every_output_at_the_run_folder(tmp_path):
    template = yaml.safe_load(S.CONFIG.read_text())
    data = {"train_manifest": "/d/train/manifest.csv", "val_manifest": "/d/val/manifest.csv"}
    cfg = S.run_config(template, tmp_path / "control", data, Path("/m/init.ckpt"), 0.0, 3)
    assert cfg["data"]["fracture_synthesis"] == 0.0 and cfg["data"]["manifest"] == "/d/train/manifest.csv"
    assert cfg["data"]["val_manifest"] == "/d/val/manifest.csv" and cfg["model"]["init_from"] == "/m/init.ckpt"
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["trainer"]["default_root_dir"] == str(tmp_path / "control")
    assert all(lg["init_args"]["save_dir"] == str(tmp_path / "control") for lg in cfg["trainer"]["logger"])
    checkpoints = [cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    assert checkpoints and all(cb["init_args"]["dirpath"] == str(tmp_path / "control") for cb in checkpoints)
    assert template["data"]["fracture_synthesis"] == 0.5  # the template itself is left alone
