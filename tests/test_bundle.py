"""models/bundle.py, training/export.py, models/registry.py and inference/loading.py: a model
is a bundle folder that loads with no pickle, reproduces the checkpoint it came from, is never
edited in place, and resolves by name through the registry."""

import json
import pickle
import tarfile

import pytest
import torch

from inference.loading import open_model
from models.bundle import (CALIBRATION_FILE, CARD_FILE, METADATA_FILE, NETWORK_FILES, Bundle, BundleError, ModelError,
                           decode_state, encode_state, file_sha256, load_bundle)
from models.registry import default_model, resolve
from tests.parity.compare import compare_with_fixture
from tests.parity.parity_model import FILMS_DIR, parity_checkpoint, with_content_readers
from training.export import bundle_from_checkpoint, export_checkpoint, main as export_main


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """The parity model as a checkpoint and as an fp32 bundle exported from it."""
    tmp = tmp_path_factory.mktemp("bundle")
    ckpt = parity_checkpoint(tmp / "parity.ckpt")
    bundle = export_checkpoint(ckpt, tmp / "bundle", name="parity", version="1.0.0")
    return {"tmp": tmp, "checkpoint": ckpt, "bundle": bundle}


def test_export_writes_metadata_weights_calibration_and_card(parity):
    folder = parity["bundle"]
    names = {p.name for p in folder.iterdir()}
    assert names == {METADATA_FILE, CALIBRATION_FILE, CARD_FILE, *NETWORK_FILES.values()}
    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["name"] == "parity" and meta["version"] == "1.0.0" and meta["format"] == 1
    assert meta["intended_use"] == "research; not for diagnostic use"
    assert meta["input"]["input_size"] == [128, 104] and meta["input"]["channels"] == 1
    assert meta["input"]["value_range"] == [0.0, 1.0]
    assert set(meta["networks"]) == {"film_net", "crop_net", "point_refiner"}
    assert meta["networks"]["point_refiner"]["config"]["flip"] is True
    assert {"torch", "timm", "python"} <= set(meta["framework"])
    assert meta["history"][0]["step"] == "export" and meta["history"][0]["from"]["sha256"] == file_sha256(parity["checkpoint"])
    for name, digest in meta["files"].items():  # every other file is listed with its digest
        assert file_sha256(folder / name) == digest
    assert set(meta["files"]) == names - {METADATA_FILE}
    calibration = json.loads((folder / CALIBRATION_FILE).read_text())
    assert calibration["method"] == "beta" and calibration["default"] == "balanced"
    assert "vertebra_combiner" in calibration and "balanced" in calibration["operating_points"]
    card = (folder / CARD_FILE).read_text()
    assert "Not for clinical use" in card and "parity 1.0.0" in card
    assert f"`{meta['id']}`" in card  # the card names the saved bundle's id
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert all((p.stat().st_mode & 0o777) == (0o666 & ~umask) for p in folder.iterdir())  # not private


def test_a_bundle_loads_without_pickle(parity, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a bundle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    bundle = load_bundle(parity["bundle"])
    assert bundle.name == "parity" and bundle.point_refiner is not None and bundle.calibration["method"] == "beta"


def test_fp32_bundle_holds_the_checkpoints_weights_exactly(parity):
    from_ckpt = bundle_from_checkpoint(parity["checkpoint"])
    loaded = load_bundle(parity["bundle"])
    for name in ("film_net", "crop_net", "point_refiner"):
        a, b = from_ckpt.networks[name].state_dict(), loaded.networks[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_bundle_predictions_equal_the_checkpoints_and_the_parity_fixture(parity, tmp_path):
    """The old path (a checkpoint) and the new one (a saved bundle) give the same outputs."""
    from inference.pipeline import run_inference
    from inference.predictor import Predictor

    for source, out in ((parity["bundle"], tmp_path / "from_bundle"), (parity["checkpoint"], tmp_path / "from_ckpt")):
        predictor = with_content_readers(Predictor(source, device="cpu"))
        assert run_inference(predictor, [str(FILMS_DIR)], out, batch_size=2, num_workers=0, progress=False).n_failed == 0
        problems = compare_with_fixture(out)
        assert not problems, problems[:5]


@pytest.mark.parametrize("storage, tolerance, ratio", [("fp16", 1e-2, 0.55), ("int8", None, 0.35)])
def test_compact_storage_round_trips_within_its_precision(parity, tmp_path, storage, tolerance, ratio):
    out = export_checkpoint(parity["checkpoint"], tmp_path / storage, storage=storage)
    fp32 = load_bundle(parity["bundle"]).networks["film_net"].state_dict()
    small = load_bundle(out).networks["film_net"].state_dict()
    for k, w in fp32.items():
        if not w.is_floating_point():
            assert torch.equal(w, small[k])
        elif tolerance is not None:
            assert torch.allclose(small[k], w, rtol=tolerance, atol=1e-4), k
        else:  # int8: each weight within half a quantisation step of its channel
            step = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp(min=1e-12) / 127 if w.dim() >= 2 else None
            err = (small[k] - w).abs()
            if step is not None:
                assert (err.reshape(w.shape[0], -1) <= step[:, None] / 2 + 1e-6).all(), k
            else:
                assert torch.equal(small[k], w), k
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # noqa: E731
    assert size(out) < ratio * size(parity["bundle"])


def test_int8_encoding_keeps_small_and_integer_tensors_exact():
    state = {"big": torch.randn(64, 128), "bias": torch.randn(64), "count": torch.tensor(7)}
    stored = encode_state(state, "int8")
    assert stored["big"].dtype == torch.int8 and "big::scale" in stored and stored["bias"].dtype == torch.float32
    back = decode_state(stored)
    assert set(back) == set(state) and torch.equal(back["bias"], state["bias"]) and back["count"].item() == 7
    with pytest.raises(ValueError, match="unknown weight storage"):
        encode_state(state, "fp8")


def test_a_changed_file_is_refused_naming_it(parity, tmp_path):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(parity["bundle"], copy)
    with open(copy / "crop_net.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(BundleError, match="crop_net.safetensors: sha256 does not match"):
        load_bundle(copy)
    (copy / CALIBRATION_FILE).unlink()
    with pytest.raises(BundleError, match="calibration.json is listed in metadata.json but missing"):
        load_bundle(copy)


def test_derive_makes_a_new_version_and_never_edits_its_input(parity, tmp_path):
    bundle = load_bundle(parity["bundle"])
    before = {p.name: file_sha256(p) for p in parity["bundle"].iterdir()}
    new = bundle.derive("calibrate", note="refitted", calibration=None)
    assert new.version == "1.1.0" and bundle.version == "1.0.0"
    assert new.metadata["history"][-1]["step"] == "calibrate"
    assert new.metadata["history"][-1]["from"] == {"name": "parity", "version": "1.0.0", "id": bundle.id}
    with pytest.raises(BundleError, match="never rewritten in place"):
        new.path = parity["bundle"]
        new.save(parity["bundle"], overwrite=True)
    new.path = None
    saved = load_bundle(new.save(tmp_path / "v1.1"))
    assert saved.calibration is None and saved.id != bundle.id
    assert {p.name: file_sha256(p) for p in parity["bundle"].iterdir()} == before
    with pytest.raises(BundleError, match="already exists"):
        new.save(tmp_path / "v1.1")


def test_export_cli_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert export_main(["--checkpoint", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "model.ckpt" in capsys.readouterr().err and not (tmp_path / "b").exists()


def _registry(tmp_path, models):
    path = tmp_path / "repo" / "models" / "registry.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "models": models}))
    return path


def test_registry_names_a_folder_and_checks_its_hash(parity, tmp_path):
    import shutil

    shutil.copytree(parity["bundle"], tmp_path / "repo" / "bundles" / "parity")
    digest = file_sha256(parity["bundle"] / METADATA_FILE)
    reg = _registry(tmp_path, {"parity": {"path": "bundles/parity", "sha256": digest, "training_data": "test"}})
    assert resolve("parity", registry=reg) == (tmp_path / "repo" / "bundles" / "parity").resolve()
    assert open_model("parity", registry=reg).name == "parity"
    with pytest.raises(BundleError, match="names: parity"):
        resolve("other", registry=reg)
    reg.write_text(json.dumps({"format": 1, "models": {"parity": {"path": "bundles/parity", "sha256": "0" * 64}}}))
    with pytest.raises(BundleError, match="the registry says"):
        resolve("parity", registry=reg)


def test_registry_default_names_one_of_its_entries(tmp_path):
    reg = _registry(tmp_path, {"a": {"path": "bundles/a", "sha256": "0" * 64}})
    assert default_model(reg) is None  # no default: infer.py then needs --model
    reg.write_text(json.dumps({"format": 1, "default": "a", "models": {"a": {"path": "bundles/a", "sha256": "0" * 64}}}))
    assert default_model(reg) == "a"
    reg.write_text(json.dumps({"format": 1, "default": "b", "models": {"a": {"path": "bundles/a", "sha256": "0" * 64}}}))
    with pytest.raises(BundleError, match="default model 'b' is not one of its entries"):
        default_model(reg)


def test_registry_url_is_fetched_only_when_allowed_then_cached(parity, tmp_path, monkeypatch):
    monkeypatch.setenv("SPINE_VCF_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "parity.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(parity["bundle"], arcname="parity")
    url = archive.resolve().as_uri()
    reg = _registry(tmp_path, {"parity": {"url": url, "sha256": file_sha256(archive)}})
    with pytest.raises(BundleError, match="not in the cache"):
        resolve("parity", registry=reg)
    folder = resolve("parity", allow_download=True, registry=reg)
    assert (folder / METADATA_FILE).is_file() and str(tmp_path / "cache") in str(folder)
    archive.unlink()  # later runs read the cache, with no network
    assert resolve("parity", registry=reg) == folder
    assert load_bundle(folder).id == load_bundle(parity["bundle"]).id
    bad = _registry(tmp_path / "b", {"x": {"url": (tmp_path / "y.tar.gz").as_uri(), "sha256": "1" * 64}})
    (tmp_path / "y.tar.gz").write_bytes(b"whatever")
    with pytest.raises(BundleError, match="does not match the registry"):
        resolve("x", allow_download=True, registry=bad)


def test_open_model_says_what_is_wrong(tmp_path):
    with pytest.raises(ModelError, match="missing.ckpt: model not found"):
        open_model(tmp_path / "missing.ckpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="a folder, but not a bundle"):
        open_model(tmp_path / "folder")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model"):
        open_model(tmp_path / "notes.txt")


def test_infer_runs_a_bundle_and_says_what_to_give_without_a_model(parity, tmp_path, capsys, monkeypatch):
    import infer

    out = tmp_path / "out"
    film = sorted(FILMS_DIR.glob("*.png"))[0]
    assert infer.main(["--model", str(parity["bundle"]), "--out", str(out), "--num-workers", "0", "--quiet",
                       str(film)]) == 0
    record = json.loads((out / f"{film.stem}.json").read_text())
    assert record["checkpoint_id"] == load_bundle(parity["bundle"]).id
    monkeypatch.setattr(infer, "default_model", lambda: None)  # a registry with no shipped model
    with pytest.raises(SystemExit) as exc:
        infer.main(["--out", str(out), str(film)])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err
    assert infer.main(["--model", "no-such-model", "--out", str(out), str(film)]) == 2
    assert "no-such-model: neither a bundle folder nor a model name" in capsys.readouterr().err


def test_bundle_dataclass_needs_no_file(parity):
    bundle = bundle_from_checkpoint(parity["checkpoint"])
    assert isinstance(bundle, Bundle) and bundle.path is None
    assert bundle.id == file_sha256(parity["checkpoint"])[:16]  # outputs made from the checkpoint keep their id



def test_a_derived_version_keeps_the_storage_of_its_source(parity, tmp_path):
    small = load_bundle(export_checkpoint(parity["checkpoint"], tmp_path / "fp16", storage="fp16"))
    saved = load_bundle(small.derive("calibrate", calibration=None).save(tmp_path / "v2"))
    assert saved.storage == "fp16" and saved.metadata["networks"]["film_net"]["storage"] == "fp16"
    assert bundle_from_checkpoint(parity["checkpoint"]).storage == "fp32"


def test_fine_tuning_starts_from_a_bundle(parity):
    """train.py --model.init_from BUNDLE (make demo fine-tunes the shipped model this way)."""
    from training.system import FractureSystem

    bundle = load_bundle(parity["bundle"])
    system = FractureSystem(backbone=bundle.film_net.backbone_name, fpn_dim=bundle.film_net.fpn_dim,
                            crop_backbone=bundle.crop_net.backbone_name, init_from=str(parity["bundle"]))
    for mine, theirs in ((system.net, bundle.film_net), (system.vertebra_net, bundle.crop_net)):
        want = theirs.state_dict()
        for key, value in mine.state_dict().items():
            assert torch.equal(value, want[key]), key
