"""ONNX export and the onnxruntime predictor agree with the PyTorch Predictor: the film network,
the crop network and the point refiner, and the whole per-vertebra analysis on the parity films."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from inference.onnx import (OUTPUT_NAMES, OnnxPredictor, companion_path, main, read_onnx_metadata,  # noqa: E402
                            write_standalone)
from inference.predictor import Predictor  # noqa: E402
from models.bundle import ONNX_FILES, ModelError, file_sha256, load_bundle  # noqa: E402
from models.onnx_export import crop_onnx_bytes  # noqa: E402
from tests.parity.compare import compare_with_fixture  # noqa: E402
from tests.parity.parity_model import (FILMS_DIR, IMAGE_SIZE, REFINER_CONTEXT, parity_checkpoint,  # noqa: E402
                                       with_content_readers)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The parity model (film network, crop network, point refiner; calibrated) as a checkpoint,
    exported once for the module (it takes seconds) as a standalone .onnx and as a bundle."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt_path = parity_checkpoint(tmp / "model.ckpt")
    onnx_path, bundle = tmp / "out" / "model.onnx", tmp / "bundle_onnx"
    assert main(["--checkpoint", str(ckpt_path), "--onnx", str(onnx_path), "--bundle-out", str(bundle)]) == 0
    return ckpt_path, onnx_path, bundle


@pytest.fixture(scope="module")
def predictors(exported):
    """The PyTorch predictor of the checkpoint and the ONNX predictor of its standalone export."""
    ckpt_path, onnx_path, _ = exported
    return Predictor(ckpt_path, device="cpu"), OnnxPredictor(onnx_path, device="cpu")


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_film_graph_matches_pytorch(predictors):
    torch_pred, onnx_pred = predictors
    x = torch.rand(3, 1, *IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    ref, got = torch_pred(x), onnx_pred(x)
    assert set(OUTPUT_NAMES) <= set(got) and set(got) == set(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        assert got[key].dtype == ref[key].dtype, key
        assert _max_diff(got[key], ref[key]) <= TOLERANCE, key
    assert ref["heatmap"].shape == (3, IMAGE_SIZE[0] // 8, IMAGE_SIZE[1] // 8)
    (_, ref_logits), (_, got_logits) = torch_pred.film_outputs(x), onnx_pred.film_outputs(x)
    assert got_logits.shape == ref_logits.shape == (3, 30, IMAGE_SIZE[0] // 8, IMAGE_SIZE[1] // 8)
    assert _max_diff(got_logits, ref_logits) <= TOLERANCE


@pytest.mark.parametrize("network", ["vertebra_net", "point_refiner"])
def test_crop_graphs_match_pytorch_at_any_batch(predictors, network):
    ref_net, got_net = (getattr(pred, network) for pred in predictors)
    for attr in ("crop_size", "context", "passes", "flip") if network == "point_refiner" else ("crop_size",):
        assert getattr(got_net, attr) == getattr(ref_net, attr), attr
    for batch in (1, 5):
        crops = torch.rand(batch, 1, 96, 96, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = ref_net(crops)
        got = got_net(crops)
        assert got["points"].shape == (batch, 6, 2) and got["logits"].shape == (batch, 2)
        assert _max_diff(got["points"], ref["points"]) <= TOLERANCE
        assert _max_diff(got["logits"], ref["logits"]) <= TOLERANCE


def test_dynamic_batch_and_input_size(predictors):
    pred = predictors[1]
    for b in (1, 5):
        out = pred(torch.rand(b, 1, *IMAGE_SIZE))
        assert {k: v.shape for k, v in out.items() if k != "heatmap"} == {
            k: (b,) for k in ("p_fracture", "p_acute", "p_acute_given_fracture", "p_fracture_uncalibrated")}
        assert out["heatmap"].shape == (b, IMAGE_SIZE[0] // 8, IMAGE_SIZE[1] // 8)
        assert np.all((out["p_fracture"] >= 0) & (out["p_fracture"] <= 1))
    with pytest.raises(ValueError, match="takes"):
        pred(torch.rand(1, 1, 32, 32))


def test_metadata_and_companions(exported, predictors):
    ckpt_path, onnx_path, bundle = exported
    torch_pred = predictors[0]
    onnx_pred = OnnxPredictor(onnx_path, device="auto", sha256=file_sha256(onnx_path))
    assert onnx_pred.meta == torch_pred.meta
    assert onnx_pred.image_size == torch_pred.image_size == IMAGE_SIZE
    assert onnx_pred.checkpoint_id == torch_pred.checkpoint_id == file_sha256(ckpt_path)[:16]
    assert onnx_pred.checkpoint == onnx_path
    props = read_onnx_metadata(onnx_path)
    assert json.loads(props["vcf_model"]) == torch_pred.meta
    graphs = json.loads(props["vcf_graphs"])
    assert graphs == {name: {"file": companion_path(onnx_path, name).name,
                             "sha256": file_sha256(companion_path(onnx_path, name))}
                      for name in ("crop_net", "point_refiner")}
    # no temporary files left beside the outputs, and the weights are inside the files
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == [
        "model.crop_net.onnx", "model.onnx", "model.point_refiner.onnx"]
    with pytest.raises(ModelError, match="sha256 mismatch"):
        OnnxPredictor(onnx_path, device="cpu", sha256="0" * 64)
    # the bundle: the three graphs are listed with their digests, and its id is the weights' id
    saved = load_bundle(bundle)
    assert set(saved.extra_files) == set(ONNX_FILES.values())
    assert saved.metadata["history"][-1]["step"] == "onnx export"
    from_bundle = OnnxPredictor(bundle, device="cpu")
    assert from_bundle.point_refiner is not None
    assert from_bundle.checkpoint_id == saved.id != "unsaved"


def test_a_damaged_or_missing_companion_is_refused(exported, tmp_path):
    _, onnx_path, _ = exported
    copy = tmp_path / "model.onnx"
    for name in ("model.onnx", "model.crop_net.onnx"):
        shutil.copy(onnx_path.parent / name, tmp_path / name)
    with pytest.raises(ModelError, match="model.point_refiner.onnx: missing"):
        OnnxPredictor(copy, device="cpu")
    (tmp_path / "model.point_refiner.onnx").write_bytes((onnx_path.parent / "model.crop_net.onnx").read_bytes())
    with pytest.raises(ModelError, match="sha256 does not match"):
        OnnxPredictor(copy, device="cpu")


def test_a_film_only_export_runs_without_the_vertebrae_and_warns(exported, tmp_path):
    """A film graph exported before the crop graphs existed: the film network alone, as before."""
    import onnx

    _, onnx_path, _ = exported
    proto = onnx.load(str(onnx_path))
    kept = [p for p in proto.metadata_props if p.key != "vcf_graphs"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    old = tmp_path / "film_only.onnx"
    onnx.save(proto, str(old))
    with pytest.warns(UserWarning, match="film network only"):
        pred = OnnxPredictor(old, device="cpu")
    assert pred.vertebra_net is None and pred.point_refiner is None


def test_onnx_backend_reproduces_the_parity_fixture(exported, tmp_path):
    """infer.py --backend onnx on the parity films: the same outputs as the PyTorch backend (the
    parity fixture) to 1e-4, vertebrae, levels, grades and calibration included. As in the
    parity test, the crop network and the point refiner are content readers, here exported to
    ONNX in their place (a random crop network finds no vertebra)."""
    import infer

    _, onnx_path, _ = exported
    readers = with_content_readers(SimpleNamespace())  # the parity test's, exactly
    assert readers.point_refiner.context == REFINER_CONTEXT and readers.point_refiner.flip
    model = write_standalone(None, tmp_path / "readers.onnx", film=onnx_path.read_bytes(), crops={
        "crop_net": crop_onnx_bytes(readers.vertebra_net, "crop_net"),
        "point_refiner": crop_onnx_bytes(readers.point_refiner, "point_refiner")})[-1]
    out = tmp_path / "out"
    assert infer.main(["--checkpoint", str(model), "--backend", "onnx", "--out", str(out), "--batch-size", "2",
                       "--num-workers", "0", "--quiet", str(FILMS_DIR)]) == 0
    assert len(json.loads((out / "phantom_s7_00000.json").read_text())["vertebrae"]) > 0
    problems = compare_with_fixture(out, tolerance=TOLERANCE)
    assert not problems, f"{len(problems)} difference(s) from the PyTorch backend:\n" + "\n".join(problems[:20])


def test_bad_checkpoint_exits_2(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--onnx", str(out)]) == 2
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(garbage), "--onnx", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert not out.exists()
    with pytest.raises(ModelError, match="not found"):
        OnnxPredictor(tmp_path / "missing.onnx")


def test_a_bundle_without_graphs_or_a_registry_name_runs_from_a_cached_export(exported, tmp_path, monkeypatch):
    """The shipped model carries no .onnx graphs (its 20 MB go to the weights): the ONNX backend
    exports a bundle without them once into $SPINE_VCF_CACHE, by the digest of its metadata.json,
    and reads registry names as the PyTorch backend does."""
    import infer

    monkeypatch.setenv("SPINE_VCF_CACHE", str(tmp_path / "cache"))
    _, _, with_graphs = exported
    source = load_bundle(with_graphs)
    plain = source.derive("copy without graphs", networks=dict(source.networks)).save(tmp_path / "models" / "plain")
    assert not any(name.endswith(".onnx") for name in json.loads((plain / "metadata.json").read_text())["files"])
    registry = tmp_path / "models" / "registry.json"
    registry.write_text(json.dumps({"format": 1, "models": {"plain-model": {
        "path": "models/plain", "sha256": file_sha256(plain / "metadata.json")}}}))

    first = OnnxPredictor(plain, device="cpu")
    cached = tmp_path / "cache" / "onnx" / file_sha256(plain / "metadata.json") / "model.onnx"
    assert first.checkpoint == cached and cached.is_file()
    stamp = cached.stat().st_mtime_ns
    by_name = OnnxPredictor("plain-model", device="cpu", registry=registry)
    assert by_name.checkpoint == cached and cached.stat().st_mtime_ns == stamp  # exported once
    assert by_name.vertebra_net is not None and by_name.calibrator is not None

    torch_pred = Predictor(plain, device="cpu")
    x = torch.rand(2, 1, *IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    ref, got = torch_pred(x), by_name(x)
    assert set(got) == set(ref)
    for key in ref:
        assert _max_diff(got[key], ref[key]) <= TOLERANCE, key
    with pytest.raises(ModelError, match="does not match"):
        OnnxPredictor(plain, device="cpu", sha256="0" * 64)
    with pytest.raises(ModelError, match="neither a bundle folder nor a model name"):
        OnnxPredictor("no-such-model", device="cpu", registry=registry)
    assert infer.main(["--model", str(plain), "--backend", "onnx", "--out", str(tmp_path / "out"),
                       "--num-workers", "0", "--quiet", str(FILMS_DIR)]) == 0
