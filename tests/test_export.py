"""ONNX export and the onnxruntime predictor agree with the PyTorch Predictor."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from models.bundle import ModelError, file_sha256  # noqa: E402
from inference.onnx import OUTPUT_NAMES, OnnxPredictor, main, read_onnx_metadata  # noqa: E402
from inference.predictor import Predictor  # noqa: E402
from training_config import save_untrained_checkpoint  # noqa: E402

IMAGE_SIZE = (96, 64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint and its ONNX export (exported once for the module: it takes seconds)."""
    tmp = tmp_path_factory.mktemp("export")
    _, ckpt_path = save_untrained_checkpoint(tmp / "model.ckpt", image_size=IMAGE_SIZE)
    onnx_path = tmp / "out" / "model.onnx"
    assert main(["--checkpoint", str(ckpt_path), "--onnx", str(onnx_path)]) == 0
    return ckpt_path, onnx_path


def test_parity_with_pytorch(exported):
    ckpt_path, onnx_path = exported
    torch_pred = Predictor(ckpt_path, device="cpu")
    onnx_pred = OnnxPredictor(onnx_path, device="cpu")
    x = torch.rand(3, 1, *IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    ref, got = torch_pred(x), onnx_pred(x)
    assert set(got) == set(ref) == set(OUTPUT_NAMES)
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        assert got[key].dtype == np.float32, key
        diff = float(np.abs(got[key] - ref[key]).max())
        assert diff <= 1e-4, f"{key}: max abs difference {diff}"
    assert ref["heatmap"].shape == (3, IMAGE_SIZE[0] // 8, IMAGE_SIZE[1] // 8)


def test_dynamic_batch(exported):
    _, onnx_path = exported
    pred = OnnxPredictor(onnx_path, device="cpu")
    for b in (1, 5):
        out = pred(torch.rand(b, 1, *IMAGE_SIZE))
        assert out["p_fracture"].shape == (b,)
        assert out["p_acute"].shape == (b,)
        assert out["p_acute_given_fracture"].shape == (b,)
        assert out["heatmap"].shape == (b, IMAGE_SIZE[0] // 8, IMAGE_SIZE[1] // 8)
        assert np.all((out["p_fracture"] >= 0) & (out["p_fracture"] <= 1))
    with pytest.raises(ValueError, match="takes"):
        pred(torch.rand(1, 1, 32, 32))


def test_metadata_round_trips(exported):
    ckpt_path, onnx_path = exported
    torch_pred = Predictor(ckpt_path, device="cpu")
    onnx_pred = OnnxPredictor(onnx_path, device="auto", sha256=file_sha256(onnx_path))
    assert onnx_pred.meta == torch_pred.meta
    assert onnx_pred.image_size == torch_pred.image_size == IMAGE_SIZE
    assert onnx_pred.checkpoint_id == torch_pred.checkpoint_id == file_sha256(ckpt_path)[:16]
    assert onnx_pred.checkpoint == onnx_path
    props = read_onnx_metadata(onnx_path)
    assert json.loads(props["vcf_model"]) == torch_pred.meta
    # no temporary files left beside the output, and the weights are inside the one file
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["model.onnx"]
    with pytest.raises(ModelError, match="sha256 mismatch"):
        OnnxPredictor(onnx_path, device="cpu", sha256="0" * 64)


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
