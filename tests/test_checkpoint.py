"""Checkpoints load with weights_only=True: code-running pickles are refused."""
import pickle

import pytest
import torch

from training.checkpoint import CheckpointError, build_network, load_checkpoint
from models.network import FractureNet
from training.system import FractureSystem


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "payload": _RunsCode()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def _saved_system(tmp_path, **kw):
    system = FractureSystem(fpn_dim=16, image_size=(64, 48), **kw)
    ckpt = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(ckpt)
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path)
    return system, path


def test_roundtrip_and_sha256(tmp_path):
    system, path = _saved_system(tmp_path)
    from training.checkpoint import file_sha256

    ckpt = load_checkpoint(path, sha256=file_sha256(path))
    net, meta = build_network(ckpt, path)
    x = torch.rand(1, 1, 64, 48)
    system.net.eval()
    assert torch.allclose(net(x)["logits"], system.net(x)["logits"])
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path, sha256="0" * 64)


def test_architecture_mismatch_is_named(tmp_path):
    _, path = _saved_system(tmp_path)
    ckpt = load_checkpoint(path)
    ckpt["vcf_model"]["fpn_dim"] = 32  # weights were saved with 16
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_network(ckpt, path)
    ckpt["vcf_model"]["format"] = 99
    with pytest.raises(CheckpointError, match="format 99"):
        build_network(ckpt, path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_network_outputs_and_probability_rule():
    net = FractureNet(fpn_dim=16).eval()
    out = net(torch.rand(2, 1, 96, 64))
    assert out["logits"].shape == (2, 2) and out["heatmap_logits"].shape == (2, 3, 12, 8)
    p = FractureNet.probabilities(out)
    assert torch.allclose(p["p_acute"], p["p_fracture"] * p["p_acute_given_fracture"])


def test_backbone_loads_local_pretrained_file(tmp_path):
    """pretrained=<path>: timm reads the file (weights_only) and folds the RGB stem to 1 channel."""
    import timm

    from models.network import create_encoder

    rgb = timm.create_model("resnet18", pretrained=False, in_chans=3)
    path = tmp_path / "resnet18_weights.pth"
    torch.save(rgb.state_dict(), path)
    enc = create_encoder("resnet18", str(path), in_chans=1)
    assert torch.allclose(enc.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True), atol=1e-5)
    assert torch.equal(enc.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)
    with pytest.raises(FileNotFoundError):
        create_encoder("resnet18", str(tmp_path / "missing.pth"))
