"""Combining manifests keeps paths valid and holds out whole patients."""
import pandas as pd

from data.combine import combine
from data.manifest import load_manifest
from data.phantom2d import generate_dataset


def test_combine_holds_out_patients(tmp_path):
    a = generate_dataset(tmp_path / "a", n=6, seed=1, size=96, workers=1, progress=False)
    b = generate_dataset(tmp_path / "b", n=40, seed=2, size=96, workers=1, progress=False)
    table = pd.read_csv(b / "manifest.csv")
    table["patient_id"] = [f"p{i // 2}" for i in range(len(table))]  # two films per patient
    table.to_csv(b / "manifest.csv", index=False)
    out = combine([a / "manifest.csv", b / "manifest.csv"], tmp_path / "mix", {b / "manifest.csv": 0.3}, seed=0)
    m = load_manifest(out)  # validates: files exist, no patient in two splits
    assert len(m.images) == 46 and len(m.vertebrae) > 46
    test = m.images[m.images.split == "test"]
    assert 0 < len(test) < 40 and test.image.str.contains("/b/").all()
    assert (test.groupby("patient_id").size() == 2).all()  # whole patients


def test_simulate_held_out_takes_the_patients_combine_holds_out(tmp_path):
    """make demo simulates fractures on the shipped model's test patients only: data.simulate
    --held-out F picks exactly the patients data.combine --test-fraction-of M=F marks test."""
    from data.simulate import main as simulate_main

    src = generate_dataset(tmp_path / "src", n=30, seed=3, size=96, workers=1, progress=False)
    table = pd.read_csv(src / "manifest.csv")
    table["patient_id"] = [f"patient-{i}" for i in range(len(table))]
    table.to_csv(src / "manifest.csv", index=False)
    out = combine([src / "manifest.csv"], tmp_path / "mix", {src / "manifest.csv": 0.3}, seed=0)
    mixed = pd.read_csv(out)
    held = set(mixed.loc[mixed["split"] == "test", "patient_id"])
    assert 0 < len(held) < 30
    simulate_main(["--vertebrae-csv", str(src / "vertebrae.csv"), "--out", str(tmp_path / "sim"),
                   "--held-out", "0.3", "--p-fracture", "0"])
    assert set(pd.read_csv(tmp_path / "sim" / "manifest.csv")["patient_id"]) == held
