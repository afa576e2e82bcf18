"""Training faults: unreadable images are skipped and counted; a NaN loss names its batch."""
import math

import pytest
import torch

from data.dataset import RadiographDataset, collate_skipping_failures
from data.manifest import load_manifest
from data.phantom2d import generate_dataset
from training.system import FractureSystem


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    generate_dataset(out, n=4, seed=31, size=128, workers=1, progress=False)
    return out


def test_corrupt_image_is_skipped_and_counted(small_set):
    manifest = load_manifest(small_set / "manifest.csv")
    first = manifest.images.image.iloc[0]
    with open(first, "r+b") as fh:  # corrupt one film after validation
        fh.truncate(40)
    ds = RadiographDataset(manifest, image_size=(64, 48))
    batch = collate_skipping_failures([ds[i] for i in range(len(ds))])
    assert batch["n_failed"] == 1
    assert batch["image"].shape == (3, 1, 64, 48)
    assert batch["heatmap_target"].shape == (3, 3, 64, 48)


def test_heatmap_targets_follow_vertebra_truth(small_set):
    ds = RadiographDataset(load_manifest(small_set / "manifest.csv"), image_size=(64, 48))
    for i in range(1, len(ds)):
        item = ds[i]
        assert item["heatmap_known"][2] == 1 and item["heatmap_target"][2].sum() > 0  # vertebrae
        if item["fracture"] == 1:
            assert item["heatmap_target"][0].sum() > 0
        else:
            assert item["heatmap_target"][0].sum() == 0 and item["heatmap_known"][0] == 1
        assert (item["heatmap_target"][1] <= item["heatmap_target"][0]).all()  # acute within fractured


def test_non_finite_loss_stops_with_batch_named():
    system = FractureSystem(fpn_dim=16, image_size=(64, 48))
    batch = {
        "image": torch.full((2, 1, 64, 48), float("nan")),
        "fracture": torch.tensor([1.0, 0.0]),
        "acute": torch.tensor([1.0, math.nan]),
        "heatmap_target": torch.zeros(2, 3, 64, 48),
        "heatmap_known": torch.ones(2, 3),
        "index": torch.tensor([5, 9]),
    }
    with pytest.raises(FloatingPointError, match=r"batch 7 \(sample indices \[5, 9\]\)"):
        system.training_step(batch, 7)
