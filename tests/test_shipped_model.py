"""The shipped model (models/registry.json's default): it loads as a verified bundle within the
size limit, says what it was trained on, is what infer.py reads when no model is named, and
turns away a film with no spine while it reads a phantom film."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest

import infer
from data.phantom import generate_dataset
from models.bundle import load_bundle
from models.registry import REGISTRY_PATH, default_model, read_registry, resolve

MAX_BUNDLE_BYTES = 20_000_000


@pytest.fixture(scope="module")
def shipped():
    name = default_model()
    assert name is not None, "no default model in models/registry.json"
    return name, resolve(name)


def test_the_shipped_bundle_is_verified_small_and_honest(shipped):
    name, folder = shipped
    bundle = load_bundle(folder)  # checks every file against metadata.json's sha256
    assert bundle.name == name and bundle.crop_net is not None and bundle.calibration is not None
    assert sum(f.stat().st_size for f in folder.iterdir()) <= MAX_BUNDLE_BYTES
    assert bundle.storage in ("fp16", "int8")
    card = (folder / "README.md").read_text()
    for words in ("not for clinical use", "synthetic", "simulated"):
        assert words in card.lower(), words
    entry = read_registry(REGISTRY_PATH)[name]
    assert "phantom" in entry["training_data"] and "AASCE" in entry["training_data"]


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    phantom = generate_dataset(root / "phantom", n=2, seed=4242, size=384, workers=1, progress=False)
    rng = np.random.default_rng(0)
    noise = (rng.normal(0.5, 0.05, (384, 320)).clip(0, 1) * 65535).astype(np.uint16)  # readable, no anatomy
    cv2.imwrite(str(root / "no_spine.png"), cv2.GaussianBlur(noise, (0, 0), 8))
    return root, phantom / "manifest.csv", root / "no_spine.png"


def test_infer_reads_the_shipped_model_when_none_is_named(films, capsys):
    root, manifest, blank = films
    out = root / "out"
    status = infer.main([str(manifest), str(blank), "--out", str(out), "--num-workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert "the shipped model" in err
    rows = pd.read_csv(out / "predictions.csv").set_index("name")
    phantom_rows = rows.drop(index="no_spine")
    assert (phantom_rows["status"] == "ok").all() and phantom_rows["p_fracture"].between(0, 1).all()
    record = json.loads((out / f"{phantom_rows.index[0]}.json").read_text())
    assert record["checkpoint_id"] == load_bundle(resolve(default_model())).id and record["vertebrae"]
    # the no-spine rule with the shipped model: no probability for a film without anatomy
    assert rows.loc["no_spine", "status"] == "no_spine" and pd.isna(rows.loc["no_spine", "p_fracture"])
    assert status == 1  # a film was turned away
