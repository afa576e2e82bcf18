"""Large films decoded reduced (data/readers.py, ``min_decoded_size``; the floor from
inference/predictor.py's ``min_decoded_size``): JPEG in the DCT domain, JPEG 2000 DICOM at a lower
resolution level, anything else by block means; every output still in the original film's pixels,
and ``--full-resolution`` turns it off."""
import json
import math

import cv2
import numpy as np
import pydicom
import pytest
import torch
from PIL import features
from torch import nn

from data.morphometry import LEVELS
from data.readers import read_image, reduction_factor
from data.transforms import PixelGrid, area_reduce, letterbox
from data.vertebra_targets import CROP_CONTEXT, CROP_SIZE, OFFSET_SCALE, VERTEBRA_CHANNELS, crop_matrix, extract_crop
from inference.pipeline import OutputOptions, write_film
from inference.predictor import (CROP_MARGIN, SMALLEST_BODY_INPUT, InferenceDataset, Predictor, min_decoded_size)
from models.network import HEATMAP_STRIDE
from tests.test_readers import write_dicom
from training_config import save_untrained_checkpoint

SHIPPED_INPUT = (384, 320)  # the film network's input size of the shipped model


def smooth_film(h, w, seed=0):
    """A smooth 12-bit film (no detail finer than a few pixels) with a little texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = 1800 + 1200 * np.sin(x / 37.0 + 0.4) * np.cos(y / 53.0) + 300 * np.sin((x + y) / 23.0)
    texture = cv2.GaussianBlur(rng.normal(0, 60, (h, w)), (0, 0), 3.0)
    return np.clip(base + texture, 0, 4095).astype(np.uint16)


def at_grid_centres(full: np.ndarray, grid: PixelGrid, shape) -> np.ndarray:
    """``full`` sampled (bilinearly) where ``grid`` says the reduced pixels' centres lie."""
    cols = (grid.origin[1] + np.arange(shape[1]) / grid.scale[1]).astype(np.float32)
    rows = (grid.origin[0] + np.arange(shape[0]) / grid.scale[0]).astype(np.float32)
    return cv2.remap(full, *np.meshgrid(cols, rows), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# --------------------------------------------------------------------------- the rule
def test_reduction_factor_is_the_largest_that_keeps_the_minimum_size():
    floor = min_decoded_size(SHIPPED_INPUT)
    assert reduction_factor(3000, 3000, None) == 1
    assert reduction_factor(3000, 3000, floor) == 2  # 1500 columns >= 1423
    assert reduction_factor(3000, 2400, floor) == 1  # 1500 rows < 1707 and 1200 columns < 1423
    assert reduction_factor(2 * floor[0], 10, floor) == 2 and reduction_factor(2 * floor[0] - 2, 10, floor) == 1
    assert reduction_factor(9000, 100, (1000, 10_000)) == 8  # 1125 rows
    assert reduction_factor(4001, 100, (1000, 10_000)) == 4  # ceil(4001 / 4) = 1001 rows


def test_the_floor_keeps_the_smallest_body_at_a_crop_pixel_per_decoded_pixel_and_a_refiner_keeps_full_size():
    floor = min_decoded_size(SHIPPED_INPUT)
    for side, input_side in zip(floor, SHIPPED_INPUT):
        # the smallest body's crop window at the floor spans CROP_MARGIN decoded pixels per crop pixel
        window = CROP_CONTEXT * SMALLEST_BODY_INPUT * side / input_side
        assert CROP_MARGIN * CROP_SIZE <= window < CROP_MARGIN * CROP_SIZE * 1.01
    assert min_decoded_size(SHIPPED_INPUT, point_refiner=True) is None
    # a film no larger than the floor (the phantom films, an ordinary 1024 px film) is read whole
    for h, w in ((192, 152), (1024, 1024), (floor[0] * 2 - 3, floor[1] * 2 - 3)):
        assert reduction_factor(h, w, floor) == 1


def test_a_small_film_is_never_reduced(tmp_path):
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), smooth_film(1024, 900))
    item = InferenceDataset([str(path)], SHIPPED_INPUT, min_decoded_size=min_decoded_size(SHIPPED_INPUT))[0]
    assert not item["pixel_grid"].reduced and item["pixels"].shape == (1024, 900) == item["image_size"]
    assert "reduction" not in item["source"]


def test_a_reduced_film_is_judged_by_its_original_size(tmp_path):
    path = tmp_path / "narrow.png"
    cv2.imwrite(str(path), smooth_film(7200, 80))  # 80 px wide: a radiograph's side, 20 px once reduced 4 times
    item = InferenceDataset([str(path)], SHIPPED_INPUT, min_decoded_size=min_decoded_size(SHIPPED_INPUT))[0]
    assert "refused" not in item and item["pixels"].shape == (1800, 20) and item["image_size"] == (7200, 80)


# --------------------------------------------------------------------------- the decoders
def test_a_jpeg_is_decoded_in_the_dct_domain_at_the_smaller_size(tmp_path, monkeypatch):
    film = (smooth_film(1203, 801) >> 4).astype(np.uint8)
    path = tmp_path / "film.jpg"
    cv2.imwrite(str(path), film, [cv2.IMWRITE_JPEG_QUALITY, 95])
    full = read_image(path)

    def no_full_decode(*args, **kwargs):
        raise AssertionError("the JPEG was decoded whole")

    monkeypatch.setattr(cv2, "imdecode", no_full_decode)  # only Pillow's draft can read it now
    reduced = read_image(path, min_decoded_size=(300, 10_000))
    assert reduced.pixels.shape == (301, 201)  # ceil(1203 / 4), ceil(801 / 4)
    assert reduced.grid == PixelGrid((1203, 801), (0.25, 0.25), (1.5, 1.5))
    assert reduced.original_size == (1203, 801) and reduced.info["Rows"] == 1203
    # each pixel the mean of its 4 x 4 block, to JPEG's rounding
    block_means = area_reduce(full.pixels, 4)
    assert np.abs(reduced.pixels - block_means)[1:-1, 1:-1].max() < 3 / 255
    assert np.abs(reduced.pixels - block_means).mean() < 0.5 / 255
    with pytest.raises(Exception, match="decoded whole"):
        read_image(path, min_decoded_size=(1000, 1000))  # no reduction allowed: the full decode


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_uncompressed_films_are_reduced_by_block_means_right_after_decoding(tmp_path, kind):
    film = smooth_film(1001, 803)
    if kind == "png":
        path = tmp_path / "film.png"
        cv2.imwrite(str(path), film)
    else:
        path = write_dicom(tmp_path / "film.dcm", film, PixelSpacing=[0.14, 0.16])
    full = read_image(path)
    reduced = read_image(path, min_decoded_size=(500, 10_000))
    assert reduced.pixels.shape == (501, 402) and reduced.grid == PixelGrid.reduced_by((1001, 803), 2)
    np.testing.assert_allclose(reduced.pixels, area_reduce(full.pixels, 2), atol=1e-6)
    assert reduced.pixel_spacing_mm == full.pixel_spacing_mm  # the original film's spacing
    assert reduced.original_size == full.pixels.shape


@pytest.mark.skipif(not features.check("jpg_2000"), reason="Pillow without OpenJPEG")
def test_a_jpeg_2000_dicom_is_decoded_at_a_lower_resolution_level(tmp_path, monkeypatch):
    from pydicom.uid import JPEG2000Lossless

    pytest.importorskip("openjpeg")
    film = smooth_film(1001, 803)
    ds = pydicom.dcmread(write_dicom(tmp_path / "raw.dcm", film, PixelSpacing=[0.14, 0.14]))
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm")
    full = read_image(tmp_path / "j2k.dcm")

    def no_full_decode(self):
        raise AssertionError("the JPEG 2000 frame was decoded whole")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_full_decode))
    reduced = read_image(tmp_path / "j2k.dcm", min_decoded_size=(500, 10_000))
    assert reduced.pixels.shape == (501, 402)
    # a resolution level's pixel k lies on original pixel 2k (not on its block's centre)
    assert reduced.grid == PixelGrid.reduced_by((1001, 803), 2, block_centred=False) == \
        PixelGrid((1001, 803), (0.5, 0.5), (0.0, 0.0))
    sampled = at_grid_centres(full.pixels, reduced.grid, reduced.pixels.shape)
    assert np.abs(reduced.pixels - sampled)[2:-2, 2:-2].mean() < 2 / 4095
    shifted = at_grid_centres(full.pixels, PixelGrid.reduced_by((1001, 803), 2), reduced.pixels.shape)
    assert np.abs(reduced.pixels - shifted)[2:-2, 2:-2].mean() > 4 * np.abs(reduced.pixels - sampled)[2:-2, 2:-2].mean()
    assert reduced.pixel_spacing_mm == (0.14, 0.14)


# --------------------------------------------------------------------------- coordinates
@pytest.mark.parametrize("grid", [PixelGrid.reduced_by((2999, 1801), 4),
                                  PixelGrid.reduced_by((2999, 1801), 2, block_centred=False)])
def test_the_letterbox_of_a_reduced_film_maps_original_pixels(grid):
    reduced = np.zeros((math.ceil(2999 * grid.scale[0]), math.ceil(1801 * grid.scale[1])), np.float32)
    _, box = letterbox(reduced, (128, 96))
    on_original = box.on_original(grid)
    rng = np.random.default_rng(0)
    original = rng.uniform(0, 1800, (50, 2))
    in_reduced = (original - [grid.origin[1], grid.origin[0]]) * [grid.scale[1], grid.scale[0]]
    np.testing.assert_allclose(on_original.to_input(original), box.to_input(in_reduced), atol=1e-9)
    np.testing.assert_allclose(on_original.to_image(on_original.to_input(original)), original, atol=1e-9)
    np.testing.assert_allclose(grid.to_original(in_reduced), original, atol=1e-9)
    # the heatmap's affine agrees with the letterbox: cell (i, j) lies at input ((j + 0.5) * stride - 0.5, ...)
    affine = on_original.heatmap_to_image(HEATMAP_STRIDE)
    cells = np.array([[0.0, 0.0], [5.0, 3.0], [11.0, 15.0]])
    expected = on_original.to_image((cells + 0.5) * HEATMAP_STRIDE - 0.5)
    np.testing.assert_allclose(affine["scale"] * cells + affine["offset"], expected, atol=1e-9)
    assert on_original.in_hw == (2999, 1801)
    assert box.on_original(PixelGrid((100, 80))) is box  # a film read whole: unchanged


def test_a_crop_from_a_reduced_film_through_its_grid_equals_the_crop_from_the_film():
    film = smooth_film(1200, 1000).astype(np.float32) / 4095
    grid = PixelGrid.reduced_by(film.shape, 2)
    reduced = area_reduce(film, 2)
    matrix = crop_matrix((512.3, 611.7), 400.0)  # a 400 px window: 2 decoded pixels per crop pixel
    want = extract_crop(film, matrix)
    got = extract_crop(reduced, matrix, grid=grid)
    assert np.abs(got - want).mean() < 2e-3
    assert np.abs(extract_crop(reduced, matrix) - want).mean() > 20 * np.abs(got - want).mean()


# --------------------------------------------------------------------------- a large film end to end
IMAGE_SIZE = (128, 96)
# bodies of the synthetic film: centre (x, y), width, height, level, in original pixels
BODIES = [((900.0, 520.0 + 330.0 * k), 260.0, 190.0, level) for k, level in enumerate(("T12", "L1", "L2", "L3", "L4"))]
ROUGH_SHIFT = np.array([14.0, -10.0])  # the film network's guess is this far off; the crop reading finds the body


def body_points(cx, cy, w, h):
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    return np.array([[x0, y0], [cx, y0], [x1, y0], [x0, y1], [cx, y1], [x1, y1]], dtype=np.float64)


def large_film(path):
    """A 2400 x 1800 12-bit DICOM film (spacing 0.15 mm) with five bright bodies on a dark, smooth
    background."""
    film = np.full((2400, 1800), 400.0)
    for (cx, cy), w, h, _ in BODIES:
        cv2.rectangle(film, (int(cx - w / 2), int(cy - h / 2)), (int(cx + w / 2), int(cy + h / 2)), 3000.0, -1)
    film = cv2.GaussianBlur(film, (0, 0), 6.0) + cv2.GaussianBlur(smooth_film(2400, 1800).astype(float), (0, 0), 9) * 0.05
    return write_dicom(path, np.clip(film, 0, 4095).astype(np.uint16), PixelSpacing=[0.15, 0.15])


def designed_logits(box, grid_hw):
    """The film network's vertebra maps for the bodies, placed through ``box`` (original pixels)."""
    out = torch.full((VERTEBRA_CHANNELS, *grid_hw), -10.0)
    for (cx, cy), w, h, level in BODIES:
        pts = box.to_input(body_points(cx, cy, w, h) + ROUGH_SHIFT)
        gx, gy = (pts.mean(axis=0) + 0.5) / HEATMAP_STRIDE - 0.5
        i, j = int(round(gy)), int(round(gx))
        cell = (np.array([j, i], dtype=np.float64) + 0.5) * HEATMAP_STRIDE - 0.5
        out[0, i, j] = 4.0
        out[1:13, i, j] = torch.tensor(((pts - cell) / (HEATMAP_STRIDE * OFFSET_SCALE)).reshape(-1), dtype=torch.float32)
        out[13 + LEVELS.index(level), i, j] = 6.0
    return out


class InjectedFilmNet(nn.Module):
    """The real film network, its vertebra maps replaced by designed ones for the inputs it knows."""

    def __init__(self, net, known):
        super().__init__()
        self.net, self.known = net, known

    def forward(self, x):
        out = self.net(x)
        maps = [next(v for k, v in self.known if torch.equal(k, x[b])) for b in range(x.shape[0])]
        return {**out, "vertebra_logits": torch.stack(maps).to(out["vertebra_logits"])}


class CentroidReader(nn.Module):
    """Reads a body from the crop's pixels: six points of a box around the centroid of the bright
    part, its width and height from the bright part's second moments; the logits from the mean."""

    def forward(self, crops):
        c = crops[:, 0].double()
        w = torch.clamp(c - 0.5 * c.amax(dim=(1, 2), keepdim=True), min=0)
        w = w / w.sum(dim=(1, 2), keepdim=True)
        ys, xs = torch.meshgrid(torch.arange(c.shape[1], dtype=torch.float64),
                                torch.arange(c.shape[2], dtype=torch.float64), indexing="ij")
        cx, cy = (w * xs).sum(dim=(1, 2)), (w * ys).sum(dim=(1, 2))
        half_w = torch.sqrt(3 * (w * (xs - cx[:, None, None]) ** 2).sum(dim=(1, 2)))
        half_h = torch.sqrt(3 * (w * (ys - cy[:, None, None]) ** 2).sum(dim=(1, 2)))
        unit = torch.tensor([[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]], dtype=torch.float64)
        points = torch.stack([cx, cy], -1)[:, None] + unit[None] * torch.stack([half_w, half_h], -1)[:, None]
        logits = torch.stack([4 * c.mean(dim=(1, 2)) - 2, torch.zeros(len(c), dtype=torch.float64)], -1)
        return {"points": points.float(), "logits": logits.float()}


def test_a_large_film_read_reduced_gives_the_same_vertebrae_in_original_pixels(tmp_path):
    path = large_film(tmp_path / "large.dcm")
    _, checkpoint = save_untrained_checkpoint(tmp_path / "model.ckpt", image_size=IMAGE_SIZE)
    predictor = Predictor(checkpoint, device="cpu")
    floor = min_decoded_size(predictor.image_size)
    assert reduction_factor(2400, 1800, floor) == 4
    full = InferenceDataset([str(path)], predictor.image_size)[0]
    reduced = InferenceDataset([str(path)], predictor.image_size, min_decoded_size=floor)[0]
    assert reduced["pixels"].shape == (600, 450) and full["pixels"].shape == (2400, 1800)
    assert reduced["image_size"] == full["image_size"] == (2400, 1800)
    assert reduced["pixel_spacing_mm"] == full["pixel_spacing_mm"] == (0.15, 0.15)
    assert reduced["source"]["reduction"] == 4 and "reduction" not in full["source"]
    grid_hw = (IMAGE_SIZE[0] // HEATMAP_STRIDE, IMAGE_SIZE[1] // HEATMAP_STRIDE)
    predictor.net = InjectedFilmNet(predictor.net, [(item["image"], designed_logits(item["box"], grid_hw))
                                                    for item in (full, reduced)])
    predictor.vertebra_net = CentroidReader()
    a, b = predictor.predict([full, reduced])
    assert len(a.vertebrae) == len(b.vertebrae) == len(BODIES)
    for va, vb, ((cx, cy), w, h, level) in zip(a.vertebrae, b.vertebrae, BODIES):
        assert va.level == vb.level == level
        # the crop reading found the body (not the film network's guess) on both
        assert np.abs(np.mean(va.points, axis=0) - [cx, cy]).max() < 3.0
        # the same points in original pixels, to well under a reduced pixel (4 original pixels)
        assert np.abs(np.asarray(va.points) - np.asarray(vb.points)).max() < 1.5
        assert vb.heights_mm["middle"] == pytest.approx(va.heights_mm["middle"], abs=0.2)
        assert vb.p_fracture == pytest.approx(va.p_fracture, abs=0.01)
    for key in ("p_fracture", "p_acute", "p_fracture_image_head"):
        assert b.probs[key] == pytest.approx(a.probs[key], abs=0.01)

    # the written outputs: original pixels and spacing, the heatmap's affine onto the original film
    records = {}
    (tmp_path / "out").mkdir()
    for name, item, film in (("full", full, a), ("reduced", reduced, b)):
        kept = {key: v for key, v in item.items() if key not in ("pixels", "image")}
        row, record = write_film(predictor, tmp_path / "out", str(path), name, kept, film,
                                 OutputOptions(min_spine_score=0.0))
        assert row["status"] == "ok", row
        records[name] = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    full_json, reduced_json = records["full"], records["reduced"]
    assert reduced_json["image_size"] == full_json["image_size"] == [2400, 1800]
    assert reduced_json["pixel_spacing_mm"] == full_json["pixel_spacing_mm"] == [0.15, 0.15]
    assert reduced_json["fingerprint"]["reduction"] == 4 and "reduction" not in full_json["fingerprint"]
    np.testing.assert_allclose(reduced_json["heatmap"]["to_image"]["scale"], full_json["heatmap"]["to_image"]["scale"],
                               rtol=2e-3)
    np.testing.assert_allclose(reduced_json["heatmap"]["to_image"]["offset"],
                               full_json["heatmap"]["to_image"]["offset"], atol=3.0)
    np.testing.assert_allclose(reduced_json["heatmap_peak"], full_json["heatmap_peak"], atol=3.0)
    for va, vb in zip(full_json["vertebrae"], reduced_json["vertebrae"]):
        np.testing.assert_allclose(vb["points"], va["points"], atol=1.5)
    overlay = cv2.imread(str(tmp_path / "out" / "reduced_heatmap.png"))
    assert overlay.shape[:2] == cv2.imread(str(tmp_path / "out" / "full_heatmap.png")).shape[:2] == (1024, 768)


# --------------------------------------------------------------------------- the option
def test_full_resolution_turns_reduced_decoding_off_and_resume_redoes_a_film_decoded_otherwise(tmp_path):
    import infer

    _, checkpoint = save_untrained_checkpoint(tmp_path / "model.ckpt", image_size=(64, 48))
    assert reduction_factor(640, 480, min_decoded_size((64, 48))) == 2
    film = tmp_path / "films" / "film.png"
    film.parent.mkdir()
    cv2.imwrite(str(film), smooth_film(640, 480))
    out = tmp_path / "out"
    common = ["--checkpoint", str(checkpoint), "--num-workers", "0", "--quiet", "--min-spine-score", "0", str(film)]

    def fingerprint():
        return json.loads((out / "film.json").read_text())["fingerprint"]

    assert infer.main(["--out", str(out), *common]) == 0
    first = fingerprint()
    assert first["reduction"] == 2 and json.loads((out / "film.json").read_text())["image_size"] == [640, 480]
    assert infer.main(["--out", str(out), "--resume", *common]) == 0
    assert fingerprint() == first  # kept: decoded as this run would
    assert infer.main(["--out", str(out), "--resume", "--full-resolution", *common]) == 0
    assert "reduction" not in fingerprint()  # redone at full size
    assert fingerprint()["options"] == first["options"]  # the option is recorded by its effect only


def test_the_sharded_entry_takes_full_resolution_too(tmp_path, capsys):
    from inference.sharded import ShardedRun, run_main

    with pytest.raises(SystemExit) as exc:
        run_main(["--help"])
    assert exc.value.code == 0 and "--full-resolution" in capsys.readouterr().out

    _, checkpoint = save_untrained_checkpoint(tmp_path / "model.ckpt", image_size=(64, 48))
    predictor = Predictor(checkpoint, device="cpu")
    for full_resolution, expected in ((False, min_decoded_size((64, 48))), (True, None)):
        run = ShardedRun(predictor, [], tmp_path, OutputOptions(full_resolution=full_resolution), False, 1, 0,
                         False, 50_000_000)
        assert run.dataset().min_decoded_size == expected
