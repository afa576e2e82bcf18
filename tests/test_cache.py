"""The training cache (data/cache.py): what training reads from it is what it would decode, it is
rebuilt when the manifest or an image changes, and the data module uses it and the loader options."""
import json
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from data.cache import REGION_CONTEXT, REGION_SIZE, cache_folder, main, open_cache, region_crop, region_matrix
from data.dataset import RadiographDataset, SpineDataModule, collate_skipping_failures
from data.manifest import load_manifest
from data.phantom2d import generate_dataset
from data.vertebra_targets import CROP_CONTEXT, crop_matrix, extract_crop

SIZE = (96, 80)


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """Four phantom films (seed 41, 192 px), in a folder a test may copy and change."""
    out = tmp_path_factory.mktemp("cache_films")
    generate_dataset(out, n=4, seed=41, size=192, workers=1, progress=False)
    return out


@pytest.fixture
def copied(films, tmp_path):
    folder = tmp_path / "films"
    shutil.copytree(films, folder)
    manifest = folder / "manifest.csv"
    # the copy's manifest names the copy's images
    manifest.write_text(manifest.read_text().replace(str(films), str(folder)))
    vertebrae = folder / "vertebrae.csv"
    vertebrae.write_text(vertebrae.read_text().replace(str(films), str(folder)))
    return manifest


def test_the_cli_builds_a_cache_that_gives_the_decoded_samples(films, tmp_path, capsys):
    assert main(["--manifest", str(films / "manifest.csv"), "--out", str(tmp_path / "c"),
                 "--image-size", *map(str, SIZE)]) == 0
    assert "4 films" in capsys.readouterr().out
    manifest = load_manifest(films / "manifest.csv")
    cache = open_cache(tmp_path / "c", manifest, SIZE, build_missing=False)
    assert cache.folder == cache_folder(tmp_path / "c", films / "manifest.csv")
    plain = RadiographDataset(manifest, image_size=SIZE, max_crops=20)
    cached = RadiographDataset(manifest, image_size=SIZE, max_crops=20, cache=cache)
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        assert set(a) == set(b)
        for key in a:
            if key in ("image", "crops"):  # stored as uint16: within half a step
                assert float((a[key] - b[key]).abs().max()) <= 1e-4, key
            else:
                assert torch.equal(*(torch.nan_to_num(torch.as_tensor(x), nan=-7.0) for x in (a[key], b[key]))), key
        assert int(b["crop_valid"].sum()) >= 5


def test_a_large_body_is_read_from_a_resampled_region_close_to_the_film():
    """A body too large for REGION_SIZE pixels: its region is resampled, and crops read from it
    (nominal and jittered windows) stay within the resampling's blur of crops read from the film."""
    rng = np.random.default_rng(0)
    film = cv2.GaussianBlur(rng.random((1400, 1200)).astype(np.float32), (0, 0), 6)
    film = 0.1 + 0.8 * (film - film.min()) / (film.max() - film.min())
    centre, extent = np.array([600.3, 700.8]), 180.0
    affine = region_matrix(centre, extent)
    assert abs(np.hypot(*affine[0, :2]) - REGION_SIZE / (REGION_CONTEXT * extent)) < 1e-9
    region = np.round(extract_crop(film, affine, out=REGION_SIZE) * 65535).astype(np.uint16)
    for shift, scale, angle in ((0.0, 1.0, 0.0), (0.15, 1.35, 8.0), (-0.15, 0.85, -8.0)):
        matrix = crop_matrix(centre + shift * extent, CROP_CONTEXT * extent * scale, angle)
        direct, cached = extract_crop(film, matrix), region_crop(region, affine, matrix)
        assert np.abs(direct - cached).mean() < 0.01 and np.abs(direct - cached).max() < 0.05
        # the whole window lies inside the region: no zero border came in
        assert cached.min() > 0.05


def test_a_changed_image_or_manifest_rebuilds_the_cache(copied, tmp_path):
    root = tmp_path / "cache"
    manifest = load_manifest(copied)
    first = open_cache(root, manifest, SIZE)
    built = json.loads((first.folder / "index.json").read_text())
    again = open_cache(root, load_manifest(copied), SIZE)
    assert json.loads((again.folder / "index.json").read_text()) == built  # unchanged: not rebuilt
    # an image rewritten: its film is read again
    image = manifest.images["image"].iloc[1]
    before = first.film(image)[0]
    pixels = cv2.imread(image, cv2.IMREAD_UNCHANGED)
    cv2.imwrite(image, np.ascontiguousarray(pixels[::-1]))
    os.utime(image, ns=(1, 1))
    flipped = open_cache(root, load_manifest(copied), SIZE)
    assert json.loads((flipped.folder / "index.json").read_text())["fingerprint"] != built["fingerprint"]
    assert not np.array_equal(flipped.film(image)[0], before)
    # a vertebra moved in vertebrae.csv: its crop region follows
    table = pd.read_csv(copied.parent / "vertebrae.csv")
    image = manifest.images["image"].iloc[0]
    old_affine = flipped.regions(image)[1][0].copy()
    table.loc[0, ["p1x", "p2x", "p3x", "p4x", "p5x", "p6x"]] += 9.0
    table.to_csv(copied.parent / "vertebrae.csv", index=False)
    moved = open_cache(root, load_manifest(copied), SIZE)
    assert moved.regions(image)[1][0][0, 2] != old_affine[0, 2]
    with pytest.raises(ValueError, match="image size"):
        RadiographDataset(load_manifest(copied), image_size=(64, 48), cache=moved)


def test_an_unreadable_film_is_recorded_and_skipped(copied, tmp_path):
    manifest = load_manifest(copied)
    broken = manifest.images["image"].iloc[0]
    with open(broken, "r+b") as fh:
        fh.truncate(40)
    cache = open_cache(tmp_path / "cache", manifest, SIZE)
    assert list(cache.failed) == [broken]
    ds = RadiographDataset(manifest, image_size=SIZE, augment=True, cache=cache)
    batch = collate_skipping_failures([ds[i] for i in range(len(ds))])
    assert batch["n_failed"] == 1 and batch["image"].shape == (3, 1, *SIZE)


def test_the_data_module_builds_the_cache_and_passes_the_loader_options(copied, tmp_path):
    dm = SpineDataModule(str(copied), image_size=SIZE, batch_size=2, num_workers=1, val_fraction=0.25,
                         cache_dir=str(tmp_path / "cache"), pin_memory=True, persistent_workers=False,
                         prefetch_factor=3)
    dm.setup("fit")
    assert dm.train_set.cache is not None and dm.val_set.cache is dm.train_set.cache
    assert (cache_folder(tmp_path / "cache", copied) / "films.npy").is_file()
    loader = dm.train_dataloader()
    assert loader.pin_memory and not loader.persistent_workers and loader.prefetch_factor == 3
    batch = next(iter(loader))  # the cache's memory maps open in the worker
    assert batch["image"].shape == (2, 1, *SIZE) and batch["heatmap_target"].dtype == torch.uint8


def test_the_float32_brightness_contrast_is_albumentations_own():
    """The loader's RandomBrightnessContrast draws as albumentations' does and gives its result."""
    import albumentations as A

    from data.augmentation import RandomBrightnessContrast

    image = np.random.default_rng(1).random((64, 48)).astype(np.float32)
    for seed in range(5):
        ours, theirs = (A.Compose([cls(brightness_limit=0.3, contrast_limit=0.4, p=1.0)], seed=seed)
                        for cls in (RandomBrightnessContrast, A.RandomBrightnessContrast))
        a, b = ours(image=image)["image"], theirs(image=image)["image"]
        assert a.dtype == b.dtype == np.float32 and np.abs(a - b).max() < 1e-6
        assert np.abs(a - image).max() > 1e-3  # it did change the image
