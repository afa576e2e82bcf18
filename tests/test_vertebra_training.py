"""Per-vertebra training: the crop geometry and stage-1 targets (data/vertebra_targets.py), the
per-vertebra sample keys of RadiographDataset, the crop network (models/vertebra_net.py), the
vertebra losses of FractureSystem and checkpoint format 2 (training/checkpoint.py).

Everything runs on tiny phantom films (128 x 104 px) and random-initialised resnet18s on CPU.
"""
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from data.dataset import GRID_STRIDE, RadiographDataset, collate_skipping_failures
from data.manifest import load_manifest
from data.phantom2d import generate_dataset
from data.readers import read_image
from data.transforms import letterbox, normalize_intensity
from data.geometry import AP_MIRROR, POINT_COLUMNS, body_centre, body_extent
from data.vertebra_targets import (CROP_CONTEXT, CROP_SIZE, OFFSET_SCALE, VERTEBRA_CHANNELS, apply_affine,
                                   crop_matrix, extract_crop, invert_affine, level_code, stage1_targets)
from training.checkpoint import (CheckpointError, build_network, build_vertebra_network, load_checkpoint,
                               load_network_weights)
from models.network import FractureNet
from training.system import CHECKPOINT_FORMAT, FractureSystem, centre_focal_loss
from models.vertebra_net import VertebraNet

# Phantom films are 128 x 104; letterboxed at scale 2, neighbouring body centres lie > 8 px
# (one stride-8 cell) apart, so every vertebra owns its own stage-1 cell.
IMAGE_SIZE = (256, 208)
GRID = (IMAGE_SIZE[0] // GRID_STRIDE, IMAGE_SIZE[1] // GRID_STRIDE)
VERTEBRA_KEYS = ("centre", "points", "level", "crop_points", "crop_fracture", "crop_acute")


# --------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster than two fighting over a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Five phantom films (seed 3): 1, 2 and 4 fractured (film 2: T8, T11 acute, L1 chronic),
    0 and 3 normal; films face either way. Written three ways: as generated (``lateral``), with
    film 3's vertebra rows removed and film 0's grades left empty (``partial``), and as AP films
    whose points are relabelled so that p1 / p4 are the image-left corners (``ap``)."""
    root = tmp_path_factory.mktemp("vt_phantom")
    generate_dataset(root / "lateral", n=5, seed=3, size=128, workers=1, progress=False)
    man = pd.read_csv(root / "lateral" / "manifest.csv")
    vert = pd.read_csv(root / "lateral" / "vertebrae.csv")
    for df in (man, vert):
        df["image"] = [str((root / "lateral" / p).resolve()) for p in df["image"]]
    man["mask"] = [str((root / "lateral" / p).resolve()) for p in man["mask"]]

    (root / "partial").mkdir()
    man.to_csv(root / "partial" / "manifest.csv", index=False)
    partial = vert[vert.image != man.image[3]].copy()
    ungraded = partial.image == man.image[0]
    partial["genant_grade"] = partial["genant_grade"].astype(object)
    partial.loc[ungraded, ["genant_grade", "morphology"]] = ""
    partial.to_csv(root / "partial" / "vertebrae.csv", index=False)

    (root / "ap").mkdir()
    man_ap = man.copy()
    man_ap["view"] = "ap"
    man_ap.to_csv(root / "ap" / "manifest.csv", index=False)
    vert_ap = vert.copy()
    pts = vert[POINT_COLUMNS].to_numpy(float).reshape(-1, 6, 2)
    facing_right = pts[:, 0, 0] > pts[:, 2, 0]  # phantom films face either way
    assert facing_right.any() and (~facing_right).any()
    pts[facing_right] = pts[facing_right][:, AP_MIRROR]
    vert_ap[POINT_COLUMNS] = pts.reshape(-1, 12)
    assert (vert_ap.p1x < vert_ap.p3x).all() and (vert_ap.p4x < vert_ap.p6x).all()
    vert_ap.to_csv(root / "ap" / "vertebrae.csv", index=False)
    return {name: load_manifest(root / name / "manifest.csv") for name in ("lateral", "partial", "ap")}


def _truth(manifest, i):
    """Points (K, 6, 2) in original pixels and the vertebra rows of film ``i``."""
    image = manifest.images.image[i]
    rows = manifest.vertebrae[manifest.vertebrae.image == image]
    return rows[POINT_COLUMNS].to_numpy(float).reshape(-1, 6, 2), rows


def _film(manifest, i):
    full = normalize_intensity(read_image(manifest.images.image[i]).pixels)
    pixels, box = letterbox(full, IMAGE_SIZE)
    return full, pixels, box


def _decode(sample):
    """Stage-1 points at the cells marked in ``vert_offset_mask``: {(i, j): (6, 2) array}."""
    mask = sample["vert_offset_mask"].numpy()
    off = sample["vert_offsets"].numpy().astype(np.float64)
    out = {}
    for i, j in zip(*np.nonzero(mask)):
        cell = (np.array([j, i], np.float64) + 0.5) * GRID_STRIDE - 0.5
        out[(int(i), int(j))] = cell + off[:, i, j].reshape(6, 2) * GRID_STRIDE * OFFSET_SCALE
    return out


def _cell(points):
    c = np.asarray(points, np.float64).reshape(6, 2).mean(0)
    gx, gy = (c + 0.5) / GRID_STRIDE - 0.5
    return int(round(gy)), int(round(gx))


def _body(x0, y0, width, height):
    """Six points of an axis-aligned body with top-left corner (x0, y0)."""
    xs = (x0, x0 + width / 2, x0 + width)
    return np.array([(x, y0) for x in xs] + [(x, y0 + height) for x in xs], np.float64)


class _ForcedRng:
    """Stands in for the dataset's numpy Generator: no jitter, identity order, and every
    coin flip (``random()``) returns ``coin``: 0.0 mirrors, 0.99 does not."""

    def __init__(self, coin):
        self.coin = coin

    def random(self):
        return self.coin

    def normal(self, loc=0.0, scale=1.0, size=None):
        return loc if size is None else np.full(size, loc, np.float64)

    def uniform(self, low=0.0, high=1.0, size=None):
        mid = 0.5 * (low + high)
        return mid if size is None else np.full(size, mid, np.float64)

    def permutation(self, n):
        return np.arange(n)


def _forced_dataset(manifest, coin, **kw):
    class Forced(RadiographDataset):
        rng = property(lambda self: _ForcedRng(coin), lambda self, value: None)  # __getitem__'s draw is ignored

    ds = Forced(manifest, image_size=IMAGE_SIZE, augment=True, **kw)
    ds.augment = lambda image, mask, keypoints: {"image": image, "mask": mask, "keypoints": keypoints}
    return ds


def _system():
    torch.manual_seed(0)
    return FractureSystem(fpn_dim=16, image_size=IMAGE_SIZE)


# --------------------------------------------------------------------------- vertebra_targets
def test_level_code():
    assert level_code("T1") == 0 and level_code("T12") == 11 and level_code("L1") == 12
    assert level_code("L5") == 16 and level_code(" L3 ") == 14
    for other in ("T13", "L6", "", None, float("nan"), "C7"):
        assert level_code(other) == -1


def test_body_centre_and_extent():
    wide, tall = _body(10, 20, 20, 10), _body(0, 0, 8, 14)
    assert np.allclose(body_centre(wide), [[20, 25]])
    assert np.allclose(body_centre(np.stack([wide, tall])), [[20, 25], [4, 7]])
    assert np.allclose(body_extent(np.stack([wide, tall])), [20, 14])


def test_crop_matrix_maps_window_onto_crop():
    centre, side, out = np.array([40.3, 71.8]), 30.0, 96
    m = crop_matrix(centre, side, 0.0, out)
    half = (out - 1) / 2
    assert np.allclose(apply_affine(m, centre), [half, half])
    # the window's edges land on the crop's pixel edges (-0.5 and out - 0.5)
    edges = centre + np.array([[side / 2, 0], [-side / 2, 0], [0, side / 2], [0, -side / 2]])
    assert np.allclose(apply_affine(m, edges), [[out - 0.5, half], [-0.5, half], [half, out - 0.5], [half, -0.5]])

    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 100, (20, 2))
    rot = crop_matrix(centre, side, 23.0, out)
    assert np.allclose(apply_affine(rot, centre), [half, half])
    back = apply_affine(invert_affine(rot), apply_affine(rot, pts))
    assert np.allclose(back, pts, atol=1e-9)
    # a rotation and a zoom of out / side: every distance scales by that factor
    d_in = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    mapped = apply_affine(rot, pts)
    d_out = np.linalg.norm(mapped[:, None] - mapped[None], axis=-1)
    assert np.allclose(d_out, d_in * out / side)
    # ... and it is a proper rotation (no mirror): the orientation of a triangle is kept
    tri = apply_affine(rot, pts[:3])
    def cross(t):
        (ax, ay), (bx, by) = t[1] - t[0], t[2] - t[0]
        return ax * by - ay * bx

    assert np.sign(cross(tri)) == np.sign(cross(pts[:3]))


def _blob(shape, xy, sigma):
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    return np.exp(-((xs - xy[0]) ** 2 + (ys - xy[1]) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def _centroid(img):
    w = np.clip(img - 0.2 * img.max(), 0, None)
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()


@pytest.mark.parametrize("centre, side, angle, sigma, tol", [
    ((45.0, 66.0), 30.0, 17.0, 1.5, 0.3),     # zoom 3.2: upsampled
    ((48.0, 60.0), 220.0, -30.0, 3.0, 0.3),   # zoom 0.44: blurred before the resample
])
def test_extract_crop_puts_a_dot_where_apply_affine_says(centre, side, angle, sigma, tol):
    dot = np.array([40.3, 70.6])
    image = _blob((128, 96), dot, sigma)
    m = crop_matrix(centre, side, angle)
    crop = extract_crop(image, m)
    assert crop.shape == (CROP_SIZE, CROP_SIZE) and crop.dtype == np.float32
    expected = apply_affine(m, dot)
    assert np.abs(_centroid(crop) - expected).max() < tol
    peak = np.unravel_index(np.argmax(crop), crop.shape)
    assert np.abs(np.array(peak[::-1]) - expected).max() <= 1.5


def test_stage1_targets_one_cell_per_vertebra_and_exact_offsets():
    h, w, stride = 8, 6, 8   # a 64 x 48 network input
    bodies = [_body(5.3, 3.7, 14.0, 9.0),      # centre (12.3, 8.2)
              _body(20.9, 30.2, 16.0, 11.0),   # centre (28.9, 35.7)
              _body(3.0, 50.1, 12.0, 8.0),     # centre (9.0, 54.1)
              _body(-30.0, 20.0, 12.0, 8.0),   # centre x = -24: off the grid
              _body(10.0, 70.0, 12.0, 8.0)]    # centre y = 74: below the grid
    levels = [3, 4, -1, 5, 6]
    t = stage1_targets(np.stack(bodies), levels, (h, w), stride)
    assert t["centre"].shape == (1, h, w) and t["offsets"].shape == (12, h, w)
    assert t["offset_mask"].shape == (h, w) and t["level"].shape == (h, w) and t["level"].dtype == np.int64
    centre = t["centre"][0]
    assert centre.max() <= 1.0 and centre.min() >= 0.0
    ones = set(zip(*np.nonzero(centre == 1.0)))
    cells = [_cell(b) for b in bodies[:3]]
    assert ones == set(cells) and len(set(cells)) == 3
    assert set(zip(*np.nonzero(t["offset_mask"]))) == set(cells)
    assert t["offset_mask"].sum() == 3
    for (i, j), body, lvl in zip(cells, bodies, levels):
        cell = (np.array([j, i], np.float64) + 0.5) * stride - 0.5
        decoded = cell + t["offsets"][:, i, j].astype(np.float64).reshape(6, 2) * stride * OFFSET_SCALE
        assert np.abs(decoded - body).max() < 1e-5
        assert t["level"][i, j] == lvl
    off_cells = t["offset_mask"] == 0
    assert (t["level"][off_cells] == -1).all() and (t["offsets"][:, off_cells] == 0).all()
    # the Gaussian spreads around each centre, but stays below 1 off it
    i, j = cells[1]
    assert 0.05 < centre[i, j + 1] < 1.0 and 0.05 < centre[i + 1, j] < 1.0

    empty = stage1_targets(np.zeros((0, 6, 2)), [], (h, w), stride)
    assert not empty["centre"].any() and not empty["offset_mask"].any() and (empty["level"] == -1).all()


# --------------------------------------------------------------------------- dataset
def test_dataset_stage1_targets_match_letterboxed_truth(phantom):
    man = phantom["lateral"]
    ds = RadiographDataset(man, image_size=IMAGE_SIZE)
    for i in (0, 2):
        s = ds[i]
        pts, rows = _truth(man, i)
        _, _, box = _film(man, i)
        assert s["vert_centre"].shape == (1,) + GRID and s["vert_offsets"].shape == (12,) + GRID
        assert s["vert_level"].dtype == torch.int64 and float(s["vert_known"]) == 1.0
        decoded = _decode(s)
        expected = {_cell(box.to_input(p)): (box.to_input(p), level_code(lvl)) for p, lvl in zip(pts, rows.level)}
        assert len(expected) == len(pts)  # the fixture's premise: one cell per vertebra
        assert set(decoded) == set(expected)
        for cell, (p, code) in expected.items():
            assert np.abs(decoded[cell] - p).max() < 1e-4
            assert int(s["vert_level"][cell]) == code
            assert float(s["vert_centre"][0][cell]) == 1.0
        assert int((s["vert_level"] >= 0).sum()) == len(pts)


@pytest.mark.parametrize("max_crops", [4, 20])
def test_dataset_crops_match_crop_geometry_and_labels(phantom, max_crops):
    man = phantom["lateral"]
    ds = RadiographDataset(man, image_size=IMAGE_SIZE, max_crops=max_crops)
    i = 2  # eight vertebrae: T8 (grade 1, acute), T11 (grade 2, acute), L1 (grade 2, chronic)
    s = ds[i]
    pts, rows = _truth(man, i)
    full, _, _ = _film(man, i)
    n = min(len(pts), max_crops)
    assert s["crops"].shape == (max_crops, 1, CROP_SIZE, CROP_SIZE)
    assert s["crop_points"].shape == (max_crops, 6, 2)
    assert s["crop_valid"].tolist() == [1.0] * n + [0.0] * (max_crops - n)
    grade = rows.genant_grade.to_numpy(float)[:n]
    acute = rows.acute.to_numpy(float)[:n]
    assert s["crop_fracture"][:n].tolist() == (grade > 0).astype(float).tolist()
    crop_acute = s["crop_acute"][:n].numpy()
    assert np.isnan(crop_acute[grade == 0]).all()
    assert np.array_equal(crop_acute[grade > 0], acute[grade > 0])
    if max_crops > len(pts):
        assert sorted(acute[grade > 0].tolist()) == [0.0, 1.0, 1.0]  # both acuity labels were checked
    assert torch.isnan(s["crop_fracture"][n:]).all() and torch.isnan(s["crop_acute"][n:]).all()
    assert not s["crops"][n:].any() and not s["crop_points"][n:].any()
    extents, centres = body_extent(pts), body_centre(pts)
    for k in range(n):
        m = crop_matrix(centres[k], CROP_CONTEXT * extents[k], 0.0)
        assert np.abs(s["crop_points"][k].numpy() - apply_affine(m, pts[k])).max() < 1e-4
        assert np.abs(s["crops"][k, 0].numpy() - extract_crop(full, m)).max() < 1e-6
        # the whole body lies well inside its crop
        assert (s["crop_points"][k] > 10).all() and (s["crop_points"][k] < CROP_SIZE - 10).all()


@pytest.mark.parametrize("augment", [False, True])
def test_film_without_vertebra_rows_has_no_vertebra_truth(phantom, augment):
    man = phantom["partial"]
    ds = RadiographDataset(man, image_size=IMAGE_SIZE, augment=augment)
    torch.manual_seed(0)
    s = ds[3]
    assert float(s["vert_known"]) == 0.0
    assert not s["vert_centre"].any() and not s["vert_offset_mask"].any() and not s["vert_offsets"].any()
    assert (s["vert_level"] == -1).all()
    assert not s["crop_valid"].any() and torch.isnan(s["crop_fracture"]).all()
    other = ds[2]
    assert float(other["vert_known"]) == 1.0 and other["crop_valid"].sum() == min(8, ds.max_crops)


def test_vertebrae_with_unknown_grades_give_points_but_no_crop_labels(phantom):
    man = phantom["partial"]
    ds = RadiographDataset(man, image_size=IMAGE_SIZE)
    s = ds[0]
    n = len(_truth(man, 0)[0])
    assert n == 9 and float(s["vert_known"]) == 1.0 and int(s["vert_offset_mask"].sum()) == n
    assert s["crop_valid"].sum() == n
    assert torch.isnan(s["crop_fracture"]).all() and torch.isnan(s["crop_acute"]).all()

    system = _system()
    batch = collate_skipping_failures([s])
    losses = system._losses(batch, system(batch["image"]))
    assert losses["crop_points"].item() > 0 and losses["centre"].item() > 0
    for key in ("crop_fracture", "crop_acute"):
        assert losses[key].item() == 0.0 and losses[key].requires_grad
    assert torch.isfinite(losses["loss"])


def test_train_augmentation_keypoints_follow_the_image():
    """The geometric augmentation moves keypoints exactly as it moves the pixels (to < 0.3 px),
    and with flip=False it never mirrors (the dataset mirrors, and relabels AP points, itself)."""
    from data.augmentation import train_augmentation

    aug = train_augmentation(flip=False)
    assert not any(type(t).__name__ == "HorizontalFlip" for t in aug.transforms)
    assert any(type(t).__name__ == "HorizontalFlip" for t in train_augmentation().transforms)
    dots = np.array([[30.3, 40.6], [62.0, 90.2]])
    image = _blob((128, 96), dots[0], 2.0) + _blob((128, 96), dots[1], 2.0)
    for seed in range(8):
        aug.set_random_seed(seed)
        out = aug(image=image, masks=[np.zeros((128, 96), np.uint8)], keypoints=dots)
        moved = np.asarray(out["keypoints"], np.float64).reshape(-1, 2)
        assert moved.shape == (2, 2)
        for x, y in moved:
            ys, xs = np.mgrid[0:128, 0:96]
            near = out["image"] * ((xs - x) ** 2 + (ys - y) ** 2 < 8 ** 2)
            assert np.abs(_centroid(near) - [x, y]).max() < 0.3, (seed, x, y)


@pytest.mark.parametrize("view, coin", [("ap", 0.0), ("lateral", 0.0), ("ap", 0.99)])
def test_mirror_keeps_ap_p1_on_the_image_left(phantom, monkeypatch, view, coin):
    """coin 0.0 forces the mirror (film and crops); the geometric augmentation is switched off,
    so the expected targets are exact."""
    import data.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "photometric", lambda crop, rng: np.ascontiguousarray(crop, np.float32))
    man = phantom[view]
    ds = _forced_dataset(man, coin, max_crops=20)
    flip = coin < 0.5
    for i in (0, 4):
        s = ds[i]
        pts, _ = _truth(man, i)
        full, pixels, box = _film(man, i)
        keypoints = box.to_input(pts)
        crops_expected, crop_pts_expected = [], []
        for p in pts:
            m = crop_matrix(body_centre(p)[0], CROP_CONTEXT * body_extent(p)[0], 0.0)
            crops_expected.append(extract_crop(full, m))
            crop_pts_expected.append(apply_affine(m, p))
        crops_expected, crop_pts_expected = np.stack(crops_expected), np.stack(crop_pts_expected)
        if flip:
            pixels = pixels[:, ::-1]
            keypoints[..., 0] = IMAGE_SIZE[1] - 1 - keypoints[..., 0]
            crops_expected = crops_expected[:, :, ::-1]
            crop_pts_expected[..., 0] = CROP_SIZE - 1 - crop_pts_expected[..., 0]
            if view == "ap":
                keypoints, crop_pts_expected = keypoints[:, AP_MIRROR], crop_pts_expected[:, AP_MIRROR]
        assert np.array_equal(s["image"][0].numpy(), pixels)

        decoded = _decode(s)
        assert len(decoded) == len(pts)
        for p in keypoints:
            assert np.abs(decoded[_cell(p)] - p).max() < 1e-4
        n = len(pts)
        got = s["crop_points"][:n].numpy()
        assert np.abs(got - crop_pts_expected).max() < 1e-4
        assert np.abs(s["crops"][:n, 0].numpy() - crops_expected).max() < 1e-6

        stage1 = np.stack(list(decoded.values()))
        if view == "ap":  # the project's AP convention: p1 / p4 are the image-left corners
            for q in (stage1, got):
                assert (q[:, 0, 0] < q[:, 2, 0]).all() and (q[:, 3, 0] < q[:, 5, 0]).all()
        else:  # lateral: anterior stays anterior, so p1 follows the mirror to the other side
            facing = np.sign(pts[:, 0, 0] - pts[:, 2, 0]) * (-1 if flip else 1)
            stage1 = np.stack([decoded[_cell(p)] for p in keypoints])
            for q in (stage1, got):
                assert (facing * (q[:, 0, 0] - q[:, 2, 0]) > 0).all()


def test_augmented_ap_samples_keep_convention_and_points_follow_the_image(phantom):
    """Real augmentation (random mirror, albumentations affine, crop jitter): AP points stay
    labelled image-left first, and the stage-1 body centres stay inside the warped vertebra mask."""
    man = phantom["ap"]
    ds = RadiographDataset(man, image_size=IMAGE_SIZE, augment=True, max_crops=4)
    checked = 0
    for seed in range(6):
        torch.manual_seed(seed)
        s = ds[seed % len(ds)]
        decoded = _decode(s)
        assert len(decoded) >= 5
        for p in decoded.values():
            assert p[0, 0] < p[2, 0] and p[3, 0] < p[5, 0]
            cx, cy = np.round(p.mean(0)).astype(int)
            if 0 <= cy < IMAGE_SIZE[0] and 0 <= cx < IMAGE_SIZE[1]:
                assert s["heatmap_target"][2, cy, cx] == 1.0
                checked += 1
        cp = s["crop_points"][s["crop_valid"] > 0].numpy()
        assert len(cp) == 4
        assert (cp[:, 0, 0] < cp[:, 2, 0]).all() and (cp[:, 3, 0] < cp[:, 5, 0]).all()
        assert (cp > 0).all() and (cp < CROP_SIZE - 1).all()
    assert checked >= 30


# --------------------------------------------------------------------------- VertebraNet
def test_vertebra_net_shapes_and_points_inside_the_crop():
    torch.manual_seed(0)
    net = VertebraNet().eval()
    assert net.stride == 4
    with torch.no_grad():
        out = net(torch.rand(3, 1, CROP_SIZE, CROP_SIZE))
    assert out["points"].shape == (3, 6, 2) and out["logits"].shape == (3, 2)
    assert (out["points"] >= 0).all() and (out["points"] <= CROP_SIZE - 1).all()
    p = VertebraNet.probabilities(out)
    assert torch.allclose(p["p_acute"], p["p_fracture"] * p["p_acute_given_fracture"])


def test_soft_argmax_reads_out_crop_pixel_centres():
    """A one-hot point map at stride-4 cell (row i, column j) reads as that cell's centre in crop
    pixels: x = 4 j + 1.5, y = 4 i + 1.5 (x from the column, y from the row)."""
    cells = [(0, 0), (23, 23), (3, 17), (20, 5), (11, 12), (6, 6)]

    class Spike(torch.nn.Module):
        def forward(self, x):
            maps = torch.full((x.shape[0], 6, x.shape[2], x.shape[3]), -1e4)
            for k, (i, j) in enumerate(cells):
                maps[:, k, i, j] = 1e4
            return maps

    net = VertebraNet().eval()
    net.point_head = Spike()
    with torch.no_grad():
        points = net(torch.rand(2, 1, CROP_SIZE, CROP_SIZE))["points"]
    expected = torch.tensor([[4 * j + 1.5, 4 * i + 1.5] for i, j in cells])
    assert torch.allclose(points, expected.expand(2, 6, 2), atol=1e-3)


def test_vertebra_net_fits_two_fixed_crops():
    torch.manual_seed(0)
    net = VertebraNet(dropout=0.0)
    crops = torch.rand(2, 1, CROP_SIZE, CROP_SIZE)
    target = torch.from_numpy(np.stack([_body(20, 25, 50, 40), _body(35, 30, 30, 45)])).float()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = (net(crops)["points"] - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------- losses
def test_centre_focal_loss_prefers_matching_logits_and_ignores_unweighted_films():
    t = stage1_targets(np.stack([_body(10, 10, 14, 10), _body(12, 36, 14, 10)]), [0, 1], (8, 6), 8)
    target = torch.from_numpy(t["centre"])[None]   # (1, 1, 8, 6)
    good = torch.where(target >= 1, 6.0, -6.0)
    one = torch.ones(1)
    assert centre_focal_loss(good, target, one) < 0.05
    assert centre_focal_loss(-good, target, one) > 20 * centre_focal_loss(good, target, one)
    assert centre_focal_loss(torch.zeros_like(target), target, one) > centre_focal_loss(good, target, one)

    junk_logits, junk_target = torch.randn(1, 1, 8, 6) * 5, torch.rand(1, 1, 8, 6)
    junk_target[0, 0, 2, 2] = 1.0
    both = centre_focal_loss(torch.cat([-good, junk_logits]), torch.cat([target, junk_target]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(both, centre_focal_loss(-good, target, one))
    logits = junk_logits.clone().requires_grad_()
    none = centre_focal_loss(logits, junk_target, torch.zeros(1))
    assert none.item() == 0.0
    none.backward()
    assert logits.grad is not None and not logits.grad.any()


@pytest.fixture(scope="module")
def batches(phantom):
    man = phantom["partial"]
    ds = RadiographDataset(man, image_size=IMAGE_SIZE, max_crops=8)
    return {"truth": collate_skipping_failures([ds[2], ds[4]]),   # both fractured, acuity known
            "mixed": collate_skipping_failures([ds[2], ds[3]]),   # film 3 has no vertebra rows
            "film2": collate_skipping_failures([ds[2]]),
            "none": collate_skipping_failures([ds[3], ds[3]])}


def test_losses_on_a_collated_batch_are_finite_and_train_both_networks(batches):
    system = _system()
    batch = batches["truth"]
    assert batch["crops"].shape == (2, 8, 1, CROP_SIZE, CROP_SIZE) and batch["crop_valid"].sum() == 16
    out = system(batch["image"])
    assert out["vertebra_logits"].shape == (2, VERTEBRA_CHANNELS) + GRID
    losses = system._losses(batch, out)
    for key in ("loss", "fracture", "acute", "heatmap") + VERTEBRA_KEYS:
        assert key in losses and torch.isfinite(losses[key]), (key, losses.get(key))
    for key in VERTEBRA_KEYS:
        assert losses[key].item() > 0, key
    assert out["crop_out"]["points"].shape == (16, 6, 2) and out["crop_sel"].shape == (2, 8)
    losses["loss"].backward()
    assert system.net.vertebra_head[-1].weight.grad.abs().sum() > 0
    assert system.vertebra_net.point_head[-1].weight.grad.abs().sum() > 0
    assert system.vertebra_net.class_head[-1].weight.grad.abs().sum() > 0


def test_vertebra_losses_vanish_without_vertebra_truth(batches):
    system = _system()
    batch = batches["none"]
    assert not batch["vert_known"].any() and not batch["crop_valid"].any()
    out = system(batch["image"])
    losses = system._losses(batch, out)
    assert "crop_out" not in out
    for key in VERTEBRA_KEYS:
        assert losses[key].item() == 0.0, key
        assert losses[key].requires_grad, key
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()  # the graph is intact
    assert system.net.vertebra_head[-1].weight.grad is None or not system.net.vertebra_head[-1].weight.grad.any()


def test_film_without_truth_does_not_change_the_vertebra_losses(batches):
    system = _system().eval()  # BatchNorm in eval: each film's outputs do not depend on its batch
    with torch.no_grad():
        alone = system._vertebra_losses(batches["film2"], system(batches["film2"]["image"]))
        mixed = system._vertebra_losses(batches["mixed"], system(batches["mixed"]["image"]))
    for key in VERTEBRA_KEYS:
        assert torch.allclose(alone[key], mixed[key], rtol=1e-4, atol=1e-6), (key, alone[key], mixed[key])


# --------------------------------------------------------------------------- checkpoints
def _save(tmp_path, system, name="model.ckpt", drop=(), meta=None, edit=None):
    ckpt = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(ckpt)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(drop)} if drop \
        else ckpt["state_dict"]
    ckpt["vcf_model"].update(meta or {})
    if edit:
        edit(ckpt["state_dict"])
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def trained_system():
    """A system whose every weight differs from a fresh one's (so that a load is visible)."""
    system = _system()
    with torch.no_grad():
        for p in system.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return system.eval()


def test_checkpoint_rebuilds_film_and_crop_networks(tmp_path, trained_system):
    path = _save(tmp_path, trained_system)
    ckpt = load_checkpoint(path)
    meta = ckpt["vcf_model"]
    assert meta["format"] == CHECKPOINT_FORMAT == 2
    assert meta["crop_backbone"] == "resnet18" and meta["crop_size"] == CROP_SIZE
    assert meta["vertebra_channels"] == VERTEBRA_CHANNELS
    net, _ = build_network(ckpt, path)
    vnet = build_vertebra_network(ckpt, path)
    assert not net.training and not vnet.training
    x, crops = torch.rand(2, 1, *IMAGE_SIZE), torch.rand(3, 1, CROP_SIZE, CROP_SIZE)
    with torch.no_grad():
        a, b = net(x), trained_system.net(x)
        for key in ("logits", "heatmap_logits", "vertebra_logits"):
            assert torch.equal(a[key], b[key]), key
        c, d = vnet(crops), trained_system.vertebra_net(crops)
        assert torch.equal(c["points"], d["points"]) and torch.equal(c["logits"], d["logits"])


def test_format1_checkpoint_initialises_shared_layers_and_warns(tmp_path, trained_system, caplog):
    path = _save(tmp_path, trained_system, "old.ckpt", drop=("net.vertebra_head.", "vertebra_net."),
                 meta={"format": 1})
    saved = load_checkpoint(path)["state_dict"]
    assert not any(k.startswith(("net.vertebra_head.", "vertebra_net.")) for k in saved)
    torch.manual_seed(1)
    net, vnet = FractureNet(fpn_dim=16), VertebraNet()
    head_before = {k: v.clone() for k, v in net.vertebra_head.state_dict().items()}
    crop_before = {k: v.clone() for k, v in vnet.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        load_network_weights(net, path, vnet)
    own = net.state_dict()
    shared = [k for k in own if not k.startswith("vertebra_head.")]
    assert len(shared) > 50
    for k in shared:
        assert torch.equal(own[k], saved["net." + k]), k
    for k, v in net.vertebra_head.state_dict().items():
        assert torch.equal(v, head_before[k]), k
    for k, v in vnet.state_dict().items():
        assert torch.equal(v, crop_before[k]), k
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert str(path) in msg and "vertebra_head" in msg and "vertebra_net" in msg

    # the same file through FractureSystem(init_from=...), as a fine-tuning run would use it
    system = FractureSystem(fpn_dim=16, init_from=str(path))
    assert torch.equal(system.net.lateral[0].weight, saved["net.lateral.0.weight"])


def test_crop_network_loads_when_only_the_vertebra_head_is_missing(tmp_path, trained_system, caplog):
    path = _save(tmp_path, trained_system, "nohead.ckpt", drop=("net.vertebra_head.",))
    saved = load_checkpoint(path)["state_dict"]
    net, vnet = FractureNet(fpn_dim=16), VertebraNet()
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        load_network_weights(net, path, vnet)
    for k, v in vnet.state_dict().items():
        assert torch.equal(v, saved["vertebra_net." + k]), k
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "vertebra_head" in msg and "vertebra_net" not in msg

    caplog.clear()
    full = _save(tmp_path, trained_system, "full.ckpt")
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        load_network_weights(FractureNet(fpn_dim=16), full, VertebraNet())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("key, shape", [
    ("net.lateral.0.weight", (8, 128, 1, 1)),                 # a shared layer
    ("net.vertebra_head.3.weight", (VERTEBRA_CHANNELS, 8, 1, 1)),  # a head that may be absent, not misfit
    ("vertebra_net.point_head.3.weight", (5, 64, 1, 1)),      # the crop network
])
def test_wrong_shape_raises_checkpoint_error_naming_the_file(tmp_path, trained_system, key, shape):
    def edit(state):
        assert key in state
        state[key] = torch.zeros(shape)

    path = _save(tmp_path, trained_system, "bad.ckpt", edit=edit)
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        load_network_weights(FractureNet(fpn_dim=16), path, VertebraNet())
    assert str(path) in str(err.value)
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        if key.startswith("net."):
            build_network(ckpt, path)
        else:
            build_vertebra_network(ckpt, path)


def test_unexpected_or_missing_shared_keys_still_raise(tmp_path, trained_system):
    extra = _save(tmp_path, trained_system, "extra.ckpt", edit=lambda s: s.__setitem__("net.surprise", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_network_weights(FractureNet(fpn_dim=16), extra, VertebraNet())
    lacking = _save(tmp_path, trained_system, "lacking.ckpt", drop=("net.image_head.",))
    with pytest.raises(CheckpointError, match="missing key"):
        load_network_weights(FractureNet(fpn_dim=16), lacking, VertebraNet())
    partial_crop = _save(tmp_path, trained_system, "partial_crop.ckpt", drop=("vertebra_net.class_head.",))
    with pytest.raises(CheckpointError, match="missing key"):
        load_network_weights(FractureNet(fpn_dim=16), partial_crop, VertebraNet())


# --------------------------------------------------------------------------- point-map term
def test_point_map_loss_is_zero_on_its_target_and_prefers_a_compact_map_at_the_point():
    from models.vertebra_net import point_map_loss

    stride, h, w = 4, 24, 24
    points = torch.tensor([[[10.0, 20.0], [40.0, 22.0], [70.0, 18.0], [12.0, 60.0], [45.0, 62.0], [80.0, 64.0]]])
    xs = (torch.arange(w) + 0.5) * stride - 0.5
    ys = (torch.arange(h) + 0.5) * stride - 0.5

    def gaussian(centres, sigma_cells):
        s = sigma_cells * stride
        logits = -((xs.view(1, 1, 1, w) - centres[..., 0, None, None]) ** 2
                   + (ys.view(1, 1, h, 1) - centres[..., 1, None, None]) ** 2) / (2 * s * s)
        return torch.log_softmax(logits.reshape(1, 6, -1), -1).reshape(1, 6, h, w)

    on_target = point_map_loss(gaussian(points, 1.0), points, stride)
    assert abs(on_target.item()) < 1e-5
    wide = point_map_loss(gaussian(points, 4.0), points, stride)
    shifted = point_map_loss(gaussian(points + torch.tensor([8.0, 0.0]), 1.0), points, stride)
    uniform = point_map_loss(torch.full((1, 6, h, w), -math.log(h * w)), points, stride)
    assert 0.3 < wide.item() < uniform.item() and shifted.item() > 0.3
    # its gradient moves a map's mass towards the point
    logits = torch.zeros(1, 6, h, w, requires_grad=True)
    point_map_loss(torch.log_softmax(logits.reshape(1, 6, -1), -1).reshape(1, 6, h, w), points, stride).backward()
    g = logits.grad[0, 0]
    at = (int((20.0 + 0.5) // stride), int((10.0 + 0.5) // stride))
    assert g[at] < 0 and g[at] == g.min() and g[20, 20] > 0


def test_crop_map_weight_adds_the_term_to_the_loss(batches):
    batch = batches["truth"]
    torch.manual_seed(0)
    plain = FractureSystem(fpn_dim=16, image_size=IMAGE_SIZE)
    with_map = FractureSystem(fpn_dim=16, image_size=IMAGE_SIZE, crop_map_weight=0.5)
    with_map.load_state_dict(plain.state_dict())
    plain.eval(), with_map.eval()
    with torch.no_grad():
        a = plain._losses(batch, plain(batch["image"]))
        b = with_map._losses(batch, with_map(batch["image"]))
    assert "crop_map" not in a and b["crop_map"] > 0
    assert torch.allclose(b["loss"] - a["loss"], with_map.hparams.vertebra_weight * b["crop_map"], atol=1e-5)
    assert with_map.crop_losses(batches["none"]).keys() == {"crop_points", "crop_fracture", "crop_acute"}
