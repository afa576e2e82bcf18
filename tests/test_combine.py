"""Combining manifests keeps paths valid and holds out whole patients."""
import pandas as pd

from data.combine import combine
from data.manifest import load_manifest
from data.phantom import generate_dataset


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
