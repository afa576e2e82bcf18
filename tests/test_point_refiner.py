"""models/point_refiner.py and training/point_refiner.py: the body-frame window, reading through it, training (a Lightning run) and storage in a new bundle version."""
import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from data.phantom2d import generate_dataset
from data.geometry import AP_MIRROR
from data.vertebra_targets import apply_affine, invert_affine
from models.bundle import Bundle, load_bundle
from models.point_refiner import (HEIGHT_CONTEXT, REFINE_SIZE, REFINER_KEY, WIDTH_CONTEXT, body_frames, build_refiner,
                                  frame_matrices, frame_matrix, load_refiner, refine_points)
from training.point_refiner import RefinerCrops, fit_refiner, main, refiner_loss, window_error_pct, write_refined
from models.vertebra_net import VertebraNet
from training.export import bundle_from_checkpoint, export_checkpoint
from training.system import FractureSystem

HALF = (REFINE_SIZE - 1) / 2.0


def _body(cx, cy, width, height, angle_deg=0.0):
    """Six points of a rectangular body (p1..p3 superior, left to right), turned by ``angle_deg``."""
    local = np.array([[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]], float) * [width / 2, height / 2]
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return local @ rot.T + [cx, cy]


def test_body_frame_reads_tilt_size_and_never_turns_a_body_upside_down():
    f = body_frames(_body(100, 80, 60, 30, angle_deg=20)[None])
    assert math.degrees(f["angle"][0]) == pytest.approx(20)
    assert f["width"][0] == pytest.approx(60) and f["height"][0] == pytest.approx(30)
    assert f["centre"][0] == pytest.approx([100, 80])
    # the same body labelled right to left (a lateral film facing the other way): same tilt, not 200 degrees
    mirrored = _body(100, 80, 60, 30, angle_deg=20)[[2, 1, 0, 5, 4, 3]]
    assert math.degrees(body_frames(mirrored[None])["angle"][0]) == pytest.approx(20)
    # endplates running straight down the image fold to +90, inside (-90, 90]
    assert math.degrees(body_frames(_body(0, 0, 60, 30, angle_deg=-90)[None])["angle"][0]) == pytest.approx(90)
    assert math.degrees(body_frames(_body(0, 0, 60, 30, angle_deg=90)[None])["angle"][0]) == pytest.approx(90)


@pytest.mark.parametrize("angle", [0.0, 25.0, -40.0])
def test_window_puts_the_body_upright_at_a_fixed_place_whatever_its_tilt(angle):
    pts = _body(300, 200, 80, 40, angle)
    m = frame_matrix(*[body_frames(pts[None])[k][0] for k in ("centre", "angle", "width", "height")])
    inside = apply_affine(m, pts)
    half_w, half_h = REFINE_SIZE / (2 * WIDTH_CONTEXT), REFINE_SIZE / (2 * HEIGHT_CONTEXT)
    expected = np.array([[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]], float) * [half_w, half_h] + HALF
    np.testing.assert_allclose(inside, expected, atol=1e-9)
    np.testing.assert_allclose(apply_affine(invert_affine(m), inside), pts, atol=1e-9)


def test_window_of_a_collapsed_guess_keeps_a_readable_shape():
    m = frame_matrix((50, 50), 0.0, width=60, height=0.5)
    sy = np.linalg.norm(m[1, :2])
    assert REFINE_SIZE / sy == pytest.approx(WIDTH_CONTEXT * 60 / 3)  # height side at least a third of the width


class _FindBrightBox(nn.Module):
    """Reads the corners and endplate midpoints of the bright pixels' bounding box: a stand-in
    for a perfect refiner, so the test checks only the geometry around it."""

    def forward(self, crops):
        out = []
        for c in crops[:, 0].numpy():
            ys, xs = np.nonzero(c > 0.5)
            x0, x1, y0, y1 = xs.min() - 0.5, xs.max() + 0.5, ys.min() - 0.5, ys.max() + 0.5
            xm = (x0 + x1) / 2
            out.append([[x0, y0], [xm, y0], [x1, y0], [x0, y1], [xm, y1], [x1, y1]])
        return {"points": torch.tensor(np.array(out), dtype=torch.float32), "logits": torch.zeros(len(out), 2)}


@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_refine_points_maps_a_reading_back_to_the_film(angle):
    truth = np.stack([_body(200, 150, 120, 60, angle), _body(200, 330, 110, 70, angle)])
    image = np.zeros((480, 400), np.float32)
    for body in truth:
        corners = body[[0, 2, 5, 3]] - 0.5  # pixel centres: the filled polygon's edge is half a pixel out
        cv2.fillPoly(image, [np.round(corners * 16).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=4)
    rng = np.random.default_rng(0)
    # start off by 8 % of the height and 10 % in size, at the right tilt (a box reader cannot see tilt)
    start = truth.mean(axis=1, keepdims=True) + 1.1 * (truth - truth.mean(axis=1, keepdims=True)) + rng.normal(0, 5, (2, 1, 2))
    refined = refine_points(_FindBrightBox(), image, start, torch.device("cpu"), passes=2)
    before = np.abs(start - truth).max()
    assert before > 8
    # within the box reader's own half-pixel steps (about 2 film pixels here); a window turned
    # the wrong way or scaled on the wrong axis would miss by tens of pixels
    assert np.abs(refined - truth).max() < 3.0
    with pytest.raises(ValueError, match="passes"):
        refine_points(_FindBrightBox(), image, start, torch.device("cpu"), passes=0)
    assert refine_points(_FindBrightBox(), image, np.zeros((0, 6, 2)), torch.device("cpu")).shape == (0, 6, 2)


def test_training_windows_hold_the_truth_and_mirror_ap_labels(tmp_path):
    image = np.zeros((300, 200), np.uint8)
    image[100:160, 60:140] = 200
    path = tmp_path / "film.png"
    cv2.imwrite(str(path), image)
    pts = _body(100, 130, 80, 60)[None]
    film = {"image": str(path), "points": pts, "ap": True}
    item = RefinerCrops([film], augment=False)[0]
    back = np.stack([apply_affine(np.concatenate([L, np.zeros((2, 1))], 1), t) for L, t in
                     zip(item["to_original"].numpy().astype(float), item["points"].numpy().astype(float))])
    # the window's linear part maps window steps back to film steps: the body's own sides come back
    assert np.linalg.norm(back[0, 2] - back[0, 0]) == pytest.approx(80, rel=1e-4)
    assert np.linalg.norm(back[0, 3] - back[0, 0]) == pytest.approx(60, rel=1e-4)
    err = window_error_pct(item["points"] + torch.tensor([1.0, 0.0]), item["points"], item["to_original"], item["height"])
    step = float(np.linalg.norm(item["to_original"][0, :, 0]))
    assert err.numpy() == pytest.approx(np.full((1, 6), 100 * step / 60), rel=1e-5)
    assert AP_MIRROR == [2, 1, 0, 5, 4, 3]


@pytest.mark.parametrize("view", ["ap", "lateral"])
def test_mirrored_training_windows_move_pixels_and_labels_together(tmp_path, view):
    image = np.full((300, 200), 60, np.uint8)
    image[100:160, 60:140] = 140
    image[100:118, 60:82] = 255  # a bright marker in p1's corner (superior, image-left), above the 99.5th percentile
    path = tmp_path / "film.png"
    cv2.imwrite(str(path), image)
    film = {"image": str(path), "points": _body(100, 130, 80, 60)[None], "ap": view == "ap"}
    torch.manual_seed(0)
    flipped_seen = set()
    for _ in range(12):
        aug = RefinerCrops([film], augment=True)[0]
        crop, p = aug["crops"][0, 0].numpy(), aug["points"][0].numpy()
        blurred = cv2.GaussianBlur(np.ascontiguousarray(crop), (0, 0), 3)
        y, x = np.unravel_index(np.argmax(blurred), blurred.shape)
        nearest = int(np.argmin(np.linalg.norm(p - [x, y], axis=1)))  # the labelled point the marker sits at
        flipped = x > (REFINE_SIZE - 1) / 2  # the marker crossed to the right: this window was mirrored
        flipped_seen.add(bool(flipped))
        if view == "lateral":  # anterior stays anterior: p1 goes with the marker
            assert nearest == 0
        else:  # AP: relabelled, so p1 is the image-left corner and the marker sits at p3 when mirrored
            assert p[0, 0] < p[2, 0] and p[3, 0] < p[5, 0]
            assert nearest == (2 if flipped else 0)
    assert flipped_seen == {True, False}


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("refiner_data")
    generate_dataset(root, n=12, seed=3, size=160, workers=1, progress=False)
    return root / "manifest.csv"


def _checkpoint(folder: Path, net: VertebraNet, calibration: dict | None = None, **data) -> Path:
    """A small training checkpoint of this project whose crop network is ``net``, trained (as it
    records) with the split settings ``val_fraction`` 0.3, ``split_seed`` 0 and ``data``."""
    folder.mkdir(parents=True, exist_ok=True)
    system = FractureSystem(fpn_dim=16, image_size=(64, 48))
    system.vertebra_net.load_state_dict(net.state_dict())
    ckpt = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams),
            "datamodule_hyper_parameters": {"val_fraction": 0.3, "split_seed": 0, **data}}
    if calibration is not None:
        ckpt["vcf_calibration"] = calibration
    system.on_save_checkpoint(ckpt)
    path = folder / f"model{len(list(folder.glob('model*.ckpt')))}.ckpt"
    torch.save(ckpt, path)
    return path


def _bundle(folder: Path, net: VertebraNet, calibration: dict | None = None, **data) -> Bundle:
    """The model of :func:`_checkpoint`, as a bundle in memory."""
    return bundle_from_checkpoint(_checkpoint(folder, net, calibration, **data))


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_fit_refiner_learns_and_stores_a_loadable_entry(phantom_manifest, tmp_path):
    torch.manual_seed(0)
    model = _bundle(tmp_path / "source", VertebraNet())
    entry = fit_refiner(model, [phantom_manifest], epochs=6, lr=3e-3, batch_films=2, num_workers=0)
    history = entry["training"]["history"]
    assert [h["epoch"] for h in history] == list(range(7))
    assert entry["training"]["n_train_films"] > 0 and entry["training"]["n_val_films"] > 0
    before = history[0]["val_median_error_pct"]["lateral"]
    best = min(h["val_median_error_pct"]["lateral"] for h in history[1:])
    assert best < 0.8 * before  # it learns, from an untrained start
    weights = entry["state_dict"]
    stored = load_bundle(write_refined(model, entry, tmp_path / "refined"))
    assert all(torch.equal(stored.point_refiner.state_dict()[k], v) for k, v in weights.items())
    assert stored.metadata["point_refiner_training"]["history"] == history
    assert model.point_refiner is None  # the input model is not changed
    # a training checkpoint's entry (as checkpoints stored it before bundles) loads the same
    path = tmp_path / "refined.ckpt"
    loaded = load_refiner({REFINER_KEY: entry}, path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
    assert load_refiner({"state_dict": {}}, path) is None


def test_load_refiner_names_the_file_for_a_broken_entry(tmp_path):
    with pytest.raises(ValueError, match="broken.ckpt.*malformed"):
        load_refiner({REFINER_KEY: {"weights": 1}}, tmp_path / "broken.ckpt")
    small = VertebraNet(backbone="resnet18", width=32).state_dict()
    good = VertebraNet().state_dict()
    for entry in ({"state_dict": small, "config": {}}, {"state_dict": good, "config": "resnet18"},
                  {"state_dict": good, "config": {"passes": 0}}, {"state_dict": good, "config": {"passes": "x"}},
                  {"state_dict": good, "config": {"backbone": "no_such_net"}},
                  {"state_dict": good, "config": {"width_context": -1}}):
        with pytest.raises(ValueError, match="broken.ckpt.*do not fit"):
            load_refiner({REFINER_KEY: entry}, tmp_path / "broken.ckpt")
    assert load_refiner({REFINER_KEY: {"state_dict": good}}, tmp_path / "fine.ckpt").passes == 2


def test_cli_refuses_to_overwrite_its_source(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "a.ckpt"), "--manifest", "m.csv", "--out", str(tmp_path / "a.ckpt")])
    assert "must differ" in capsys.readouterr().err
    (tmp_path / "bundle").mkdir()
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "bundle"), "--manifest", "m.csv", "--out", str(tmp_path / "bundle" / ".")])
    assert "must differ" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a new version goes to a new folder
        main(["--model", str(tmp_path / "a"), "--manifest", "m.csv", "--out", str(tmp_path / "bundle")])
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one model, given one way
        main(["--model", "a", "--checkpoint", "a.ckpt", "--out", str(tmp_path / "new")])
    assert "not allowed with" in capsys.readouterr().err


def test_jittered_windows_stay_near_the_body():
    pts = _body(100, 100, 60, 40)[None].repeat(2000, axis=0)
    mats = frame_matrices(pts, rng=np.random.default_rng(1))
    inside = np.stack([apply_affine(m, p) for m, p in zip(mats, pts)])
    # the windows miss as far as the crop network's readings do, yet nearly every point stays in view
    in_view = ((inside > 0) & (inside < REFINE_SIZE - 1)).all(axis=-1)
    assert in_view.mean() > 0.99 and in_view.all(axis=1).mean() > 0.97
    assert np.std([m[0, 2] for m in mats]) > 1  # and the windows do move


def test_predictor_runs_the_stored_refiner_and_refuses_a_broken_one(tmp_path, phantom_manifest, monkeypatch):
    from training.checkpoint import CheckpointError
    from inference.predictor import InferenceDataset, Predictor
    from training.system import FractureSystem

    torch.manual_seed(0)
    system = FractureSystem(fpn_dim=16, image_size=(64, 48))
    ckpt = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}
    system.on_save_checkpoint(ckpt)
    plain = tmp_path / "plain.ckpt"
    torch.save(ckpt, plain)
    assert Predictor(plain, device="cpu").point_refiner is None
    refiner = VertebraNet()
    ckpt[REFINER_KEY] = {"state_dict": refiner.state_dict(), "config": {"backbone": "resnet18", "size": REFINE_SIZE},
                         "training": {}}
    refined = tmp_path / "refined.ckpt"
    torch.save(ckpt, refined)
    predictor = Predictor(refined, device="cpu")
    assert isinstance(predictor.point_refiner, VertebraNet) and not predictor.point_refiner.training
    image = str(next((phantom_manifest.parent / "images").glob("*.png")))
    item = InferenceDataset([image], predictor.image_size)[0]
    import inference.predictor as inference_module

    seen = {}
    real = inference_module.analyse_films

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference_module, "analyse_films", spy)
    result = predictor.predict([item])[0]
    assert seen["point_refiner"] is predictor.point_refiner  # what analyse_film does with it: test_vertebra_inference
    assert result.vertebra_error is None
    ckpt[REFINER_KEY] = {"state_dict": {"bad": torch.zeros(1)}, "config": {}}
    broken = tmp_path / "broken.ckpt"
    torch.save(ckpt, broken)
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        Predictor(broken, device="cpu")


class _CanonicalReader(nn.Module):
    """Reads every body exactly where a window of ``context`` would have put it."""

    def __init__(self, context):
        super().__init__()
        unit = np.array([[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]], float)
        self.template = unit * [REFINE_SIZE / (2 * context[0]), REFINE_SIZE / (2 * context[1])] + HALF

    def forward(self, crops):
        n = crops.shape[0]
        return {"points": torch.tensor(np.repeat(self.template[None], n, 0), dtype=torch.float32),
                "logits": torch.zeros(n, 2)}


def test_refine_points_uses_the_window_the_refiner_was_trained_with():
    net = build_refiner({"width_context": 1.5, "height_context": 2.0, "passes": 3})
    assert net.context == (1.5, 2.0) and net.passes == 3
    pts = _body(100, 100, 60, 40, angle_deg=10)[None]
    image = np.zeros((200, 200), np.float32)
    reader = _CanonicalReader((1.5, 2.0))
    reader.context = net.context
    np.testing.assert_allclose(refine_points(reader, image, pts, torch.device("cpu")), pts, atol=1e-4)
    # read through today's default window instead, each pass stretches the body by the ratio
    reader.context = (WIDTH_CONTEXT, HEIGHT_CONTEXT)
    out = refine_points(reader, image, pts, torch.device("cpu"), passes=1)
    f = body_frames(out)
    assert f["width"][0] == pytest.approx(60 * WIDTH_CONTEXT / 1.5, rel=1e-4)
    assert f["height"][0] == pytest.approx(40 * HEIGHT_CONTEXT / 2.0, rel=1e-4)


def _split_manifest(phantom_manifest, tmp_path):
    """The phantom manifest with its first two films marked ``split = test``."""
    import pandas as pd

    m = pd.read_csv(phantom_manifest)
    m["split"] = ""
    m.loc[:1, "split"] = "test"
    out = phantom_manifest.parent / "manifest_with_test.csv"  # beside the images its paths name
    m.to_csv(out, index=False)
    return out, m


def test_refiner_data_keep_test_and_validation_patients_out_of_training(phantom_manifest, tmp_path):
    from data.manifest import assign_splits, load_manifest
    from training.point_refiner import labelled_films

    path, _ = _split_manifest(phantom_manifest, tmp_path)
    images = load_manifest(path).images
    train = {f["image"] for f in labelled_films(path, "train", 0.3, 0)}
    val = {f["image"] for f in labelled_films(path, "val", 0.3, 0)}
    splits = assign_splits(images, val_fraction=0.3, seed=0).to_numpy()
    assert train and val and not train & val
    assert train == set(images["image"][splits == "train"]) and val == set(images["image"][splits == "val"])
    test = set(images["image"][:2])
    assert set(images["split"][:2]) == {"test"} and not (train | val) & test  # split = test: never read


def test_fit_refiner_scores_on_a_separate_validation_manifest(phantom_manifest, tmp_path):
    path, m = _split_manifest(phantom_manifest, tmp_path)
    model = _bundle(tmp_path / "source", VertebraNet(), val_manifest=str(path))
    entry = fit_refiner(model, [phantom_manifest], epochs=1, lr=1e-3, batch_films=4, num_workers=0,
                        films_per_epoch=2)
    # all 12 films of the training manifest train (no fraction split off); the validation
    # manifest's 10 films outside split = test score
    assert entry["training"]["n_train_films"] == 12 and entry["training"]["n_val_films"] == 10
    with pytest.raises(ValueError, match="epochs"):
        fit_refiner(model, [phantom_manifest], epochs=0)


def test_cli_trains_from_the_recorded_manifest_and_drops_a_stale_calibration(phantom_manifest, tmp_path, capsys):
    torch.manual_seed(0)
    net = VertebraNet()
    checkpoint = _checkpoint(tmp_path / "run", net, calibration={"method": "none"}, manifest=str(phantom_manifest))
    source, out = export_checkpoint(checkpoint, tmp_path / "bundle"), tmp_path / "refined"
    files_before = _hashes(source)
    assert "calibration.json" in files_before
    assert main(["--model", str(source), "--out", str(out), "--epochs", "1", "--films-per-epoch", "2",
                 "--num-workers", "0", "--limit-val", "2"]) == 0
    assert _hashes(source) == files_before  # the input bundle is never edited
    written, original = load_bundle(out), load_bundle(source)
    assert written.calibration is None and "calibration.json" not in _hashes(out)
    assert written.metadata["point_refiner_training"]["manifests"] == [str(phantom_manifest)]
    assert written.metadata["point_refiner_training"]["best_epoch"] == 1
    assert written.metadata["point_refiner_training"]["base_model"] == str(source)
    assert isinstance(written.point_refiner, VertebraNet) and original.point_refiner is None
    step = written.metadata["history"][-1]
    assert step["step"] == "point refiner" and step["record"]["calibration_dropped"]
    assert step["from"] == {"name": original.name, "version": original.version, "id": original.id}
    assert written.version != original.version
    assert "dropped the model's calibration" in capsys.readouterr().out
    # a training checkpoint is read as well, converted in memory
    from_checkpoint = tmp_path / "refined_from_checkpoint"
    assert main(["--checkpoint", str(checkpoint), "--out", str(from_checkpoint), "--epochs", "1",
                 "--films-per-epoch", "2", "--num-workers", "0", "--limit-val", "2"]) == 0
    assert load_bundle(from_checkpoint).point_refiner is not None
    held_out = _checkpoint(tmp_path / "run", net, manifest=str(phantom_manifest), test_manifest=str(phantom_manifest))
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(held_out), "--out", str(tmp_path / "refused"), "--manifest", str(phantom_manifest)])
    assert "must not train on it" in capsys.readouterr().err


class _BiasedBoxReader(_FindBrightBox):
    """The bright-box reader, every reading pushed ``bias`` window pixels to the right: a
    reader with a left-right lean, which a mirrored second reading cancels."""

    def __init__(self, bias):
        super().__init__()
        self.bias = bias

    def forward(self, crops):
        out = super().forward(crops)
        out["points"][..., 0] += self.bias
        return out


@pytest.mark.parametrize("size", [REFINE_SIZE, 128])
def test_mirrored_last_pass_cancels_a_left_right_lean(size):
    truth = _body(200, 150, 120, 60, 10.0)[None]
    image = np.zeros((320, 400), np.float32)
    cv2.fillPoly(image, [np.round((truth[0][[0, 2, 5, 3]] - 0.5) * 16).astype(np.int32)], 1.0,
                 lineType=cv2.LINE_AA, shift=4)
    reader = _BiasedBoxReader(bias=4.0)
    reader.crop_size = size
    leaning = refine_points(reader, image, truth, torch.device("cpu"), passes=1)
    mirrored = refine_points(reader, image, truth, torch.device("cpu"), passes=1, flip=True)
    # 4 window pixels are several film pixels along the endplates; the mirrored reading leans the other way
    assert np.abs(leaning - truth).max() > 3 * (WIDTH_CONTEXT * 120 / size)
    unbiased = _BiasedBoxReader(bias=0.0)
    unbiased.crop_size = size
    straight = refine_points(unbiased, image, truth, torch.device("cpu"), passes=1)
    np.testing.assert_allclose(mirrored, straight, atol=1e-4)  # the lean cancels exactly
    assert np.abs(mirrored - truth).max() < 3.0  # within the box reader's own half-pixel steps
    # AP-labelled (p1 on the left): the mirrored reading comes back relabelled, not crossed over
    assert (mirrored[0, [0, 3], 0] < mirrored[0, [2, 5], 0]).all()
    # the stored setting is the default
    reader.flip = True
    np.testing.assert_allclose(refine_points(reader, image, truth, torch.device("cpu"), passes=1), mirrored)
    assert build_refiner({"flip": True}).flip and not build_refiner({}).flip


def test_unmirror_points_keeps_lateral_labels_and_swaps_ap_ones():
    from data.geometry import unmirror_points

    size = 128
    body = _body(50, 64, 40, 30)[None]  # p1 at the left
    mirrored_view = body.copy()
    mirrored_view[..., 0] = size - 1 - mirrored_view[..., 0]
    # a lateral reader keeps the labels on mirrored windows (p1 now on the right)
    np.testing.assert_allclose(unmirror_points(mirrored_view, body, size), body)
    # an AP reader relabels sides (p1 on the left again, where p3 was)
    np.testing.assert_allclose(unmirror_points(mirrored_view[:, AP_MIRROR], body, size), body)


def test_fit_refiner_warm_starts_at_a_chosen_window_size(phantom_manifest, tmp_path):
    torch.manual_seed(0)
    model = _bundle(tmp_path / "source", VertebraNet())
    first = fit_refiner(model, [phantom_manifest], epochs=2, lr=3e-3, batch_films=2, num_workers=0, size=64)
    assert first["config"]["size"] == 64 and build_refiner(first["config"]).crop_size == 64
    assert not first["training"]["warm_start"]
    item = RefinerCrops(labelled_films_for_test(phantom_manifest), augment=False, size=64)[0]
    assert item["crops"].shape[-2:] == (64, 64)
    second = fit_refiner(model, [phantom_manifest], epochs=1, lr=1e-4, batch_films=2, num_workers=0, size=64,
                         start_state=first["state_dict"])
    # the same validation windows (fixed per film), read by the starting weights: the first run's best score
    start = second["training"]["history"][0]["val_median_error_pct"]
    best_first = first["training"]["history"][first["training"]["best_epoch"]]["val_median_error_pct"]
    assert second["training"]["warm_start"]
    assert start["lateral"] == pytest.approx(best_first["lateral"], rel=1e-5)
    with pytest.raises(ValueError, match="size"):
        fit_refiner(model, [phantom_manifest], epochs=1, size=16)


def labelled_films_for_test(manifest):
    from training.point_refiner import labelled_films

    return labelled_films(manifest, "train", 0.3, 0)


def test_cli_warm_start_refuses_a_refiner_of_another_split(phantom_manifest, tmp_path, capsys):
    from evaluation.model_card import save_with_card

    torch.manual_seed(0)
    checkpoint = _checkpoint(tmp_path / "run", VertebraNet(), manifest=str(phantom_manifest))
    source = export_checkpoint(checkpoint, tmp_path / "bundle")
    files_before = _hashes(source)
    first, second = tmp_path / "refined", tmp_path / "refined2"
    args = ["--model", str(source), "--epochs", "1", "--films-per-epoch", "2", "--num-workers", "0",
            "--limit-val", "2", "--size", "64"]
    assert main(args + ["--out", str(first), "--no-flip"]) == 0
    assert main(args + ["--out", str(second), "--start-from", str(first)]) == 0
    written = load_bundle(second)
    assert written.metadata["networks"]["point_refiner"]["config"]["flip"] and written.point_refiner.flip  # the default
    assert written.metadata["point_refiner_training"]["started_from"] == str(first)
    assert written.metadata["networks"]["point_refiner"]["config"]["size"] == 64
    assert written.metadata["history"][-1]["step"] == "point refiner"
    assert written.metadata["history"][-1]["from"]["id"] == load_bundle(source).id  # a version of the model, not of first
    # no training: the same weights and record, stored with the mirrored last pass switched on
    third = tmp_path / "refined3"
    assert main(args + ["--out", str(third), "--start-from", str(first), "--epochs", "0", "--flip"]) == 0
    copied, original = load_bundle(third), load_bundle(first)
    copied_config = copied.metadata["networks"]["point_refiner"]["config"]
    original_config = original.metadata["networks"]["point_refiner"]["config"]
    assert copied_config["flip"] and not original_config["flip"] and copied.point_refiner.flip
    original_weights = original.point_refiner.state_dict()
    assert all(torch.equal(copied.point_refiner.state_dict()[k], v) for k, v in original_weights.items())
    copied_training, original_training = (b.metadata["point_refiner_training"] for b in (copied, original))
    assert copied_training["history"] == original_training["history"]
    assert copied_training["copied_from"] == str(first)
    assert original_config["passes"] == 2 and original_training["loss_units"] == "height"
    fourth = tmp_path / "refined4"  # the number of reads, changed without training
    assert main(args + ["--out", str(fourth), "--start-from", str(first), "--epochs", "0", "--passes", "3"]) == 0
    assert load_bundle(fourth).point_refiner.passes == 3
    assert _hashes(source) == files_before  # no run edited its input
    with pytest.raises(SystemExit):
        main(args + ["--out", str(tmp_path / "refined5"), "--start-from", str(first), "--epochs", "0", "--passes", "0"])
    assert "--passes must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a new window needs training
        main(args + ["--out", str(tmp_path / "refined5"), "--start-from", str(first), "--epochs", "0", "--size", "96"])
    assert "stays the starting refiner's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--out", str(tmp_path / "refined5"), "--epochs", "0"])
    assert "0 only with --start-from" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the source holds no refiner
        main(args + ["--out", str(tmp_path / "refined5"), "--start-from", str(source)])
    assert "holds no point refiner" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an existing folder is never written over
        main(args + ["--out", str(first), "--start-from", str(first), "--epochs", "0"])
    assert "already exists" in capsys.readouterr().err
    other = load_bundle(first)
    other.metadata["training"]["data"]["split_seed"] = 5
    save_with_card(other, tmp_path / "other")
    with pytest.raises(SystemExit):
        main(args + ["--out", str(tmp_path / "refined5"), "--start-from", str(tmp_path / "other")])
    assert "split_seed" in capsys.readouterr().err
    # a training checkpoint of the same run holding a refiner is a starting point too
    refined_checkpoint = torch.load(checkpoint, weights_only=True)
    refined_checkpoint[REFINER_KEY] = {"state_dict": original_weights, "config": original_config,
                                       "training": original_training}
    torch.save(refined_checkpoint, tmp_path / "run" / "refined.ckpt")
    assert main(args + ["--out", str(tmp_path / "refined6"), "--start-from", str(tmp_path / "run" / "refined.ckpt"),
                        "--epochs", "0"]) == 0
    assert load_bundle(tmp_path / "refined6").point_refiner.flip


def test_refiner_loss_in_height_units_weighs_the_window_axes_as_the_film_does():
    # one body, 40 px tall; its window is scaled 3 original px per window px along x, 1 along y
    batch = {"points": torch.zeros(1, 6, 2), "height": torch.tensor([40.0]),
             "to_original": torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])}
    along = torch.zeros(1, 6, 2)
    along[..., 0] = 2.0  # 2 window px = 6 original px = 15 % of the height
    across = torch.zeros(1, 6, 2)
    across[..., 1] = 2.0  # 2 original px = 5 %
    assert refiner_loss(along, batch, "height", 96).item() == pytest.approx(0.15 * 10, rel=1e-4)
    assert refiner_loss(across, batch, "height", 96).item() == pytest.approx(0.05 * 10, rel=1e-4)
    # in window pixels the two errors weigh the same
    assert refiner_loss(along, batch, "window", 96).item() == pytest.approx(refiner_loss(across, batch, "window", 96).item())
    assert refiner_loss(along, batch, "window", 96).item() == pytest.approx(1.0 / 96 * 10)
    # the height unit agrees with the validation score's unit
    pct = window_error_pct(along, batch["points"], batch["to_original"], batch["height"])
    assert refiner_loss(along, batch, "height", 96).item() == pytest.approx(pct.mean().item() / 10, rel=1e-4)
    # zero error has a finite gradient
    zero = torch.zeros(1, 6, 2, requires_grad=True)
    refiner_loss(zero, batch, "height", 96).backward()
    assert torch.isfinite(zero.grad).all()


def test_fit_refiner_refuses_unknown_loss_units_and_passes(phantom_manifest, tmp_path):
    model = _bundle(tmp_path, VertebraNet())
    with pytest.raises(ValueError, match="loss_units"):
        fit_refiner(model, [phantom_manifest], epochs=1, loss_units="pixels")
    with pytest.raises(ValueError, match="passes"):
        fit_refiner(model, [phantom_manifest], epochs=1, passes=0)


def test_fit_refiner_returns_the_best_validated_epoch_and_writes_a_copy(phantom_manifest, tmp_path, monkeypatch):
    import lightning as L

    from training.point_refiner import PointRefinerSystem, refiner_films, refiner_loaders, write_refined

    model = _bundle(tmp_path / "source", VertebraNet(), calibration={"method": "none"})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the run leaves nothing behind in the working folder
    entry = fit_refiner(model, [phantom_manifest], epochs=3, lr=3e-3, batch_films=2, num_workers=0, size=64,
                        films_per_epoch=4, seed=1)
    assert list(work.iterdir()) == []
    history = entry["training"]["history"]
    scores = [h["val_median_error_pct"]["score"] for h in history[1:]]
    assert entry["training"]["best_epoch"] == 1 + scores.index(min(scores))
    assert min(scores) < history[0]["val_median_error_pct"]["score"]  # below the starting weights' error
    # the returned weights are that epoch's: validated again on the same windows, the same score
    system = PointRefinerSystem(entry["config"])
    system.refiner.load_state_dict(entry["state_dict"])
    train, val = refiner_films(model, [phantom_manifest], seed=1)
    _, val_loader = refiner_loaders(train, val, 64, 2, 0, None, seed=1)
    L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").validate(system, val_loader, verbose=False)
    assert system.last_validation["score"] == pytest.approx(min(scores), rel=1e-5)
    # written as a new version: the source model keeps its calibration, the new one drops it
    out = write_refined(model, entry, tmp_path / "out" / "refined")
    assert out == tmp_path / "out" / "refined"
    written = load_bundle(out)
    assert model.calibration == {"method": "none"} and model.point_refiner is None
    assert written.calibration is None and written.point_refiner.crop_size == 64
    assert written.metadata["point_refiner_training"] == entry["training"]
    assert written.metadata["history"][-1]["record"]["calibration_dropped"]
    with pytest.raises(Exception, match="already exists"):  # never over an existing folder
        write_refined(model, entry, out)
