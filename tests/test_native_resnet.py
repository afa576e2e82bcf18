"""The plain-torch ResNets (models/resnet.py) are timm's, layer for layer: the same parameter
names and shapes, and the same outputs for the same weights, so bundles load into them."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from models.network import WEIGHTS_LOADED, FractureNet
from models.resnet import ResNetFeatures
from models.vertebra_net import VertebraNet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, out_indices", [("resnet18", (-3, -2, -1)), ("resnet18", (1, 2, 3, 4)),
                                               ("resnet34", (1, 2, 3, 4)), ("resnet50", (-3, -2, -1)),
                                               ("resnet10t", (-3, -2, -1)), ("resnet10t", (1, 2, 3, 4)),
                                               ("resnet14t", (1, 2, 3, 4)), ("resnet18d", (-3, -2, -1))])
def test_a_plain_resnet_is_timms(name, out_indices):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices, in_chans=1)
    for m in reference.modules():  # running statistics that are not the identity, as trained ones
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0), m.bias.data.uniform_(-0.1, 0.1)
    plain = ResNetFeatures(name, in_chans=1, out_indices=out_indices)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    plain.load_state_dict(reference.state_dict())
    assert plain.feature_info.channels() == reference.feature_info.channels()
    assert plain.feature_info.reduction() == reference.feature_info.reduction()
    x = torch.rand(2, 1, 96, 64)
    with torch.no_grad():
        for a, b in zip(plain.eval()(x), reference.eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_networks_built_for_stored_weights_give_the_outputs_of_timms():
    torch.manual_seed(1)
    for cls, x in ((FractureNet, torch.rand(1, 1, 64, 64)), (VertebraNet, torch.rand(3, 1, 96, 96))):
        trained = cls().eval()
        loaded = cls(pretrained=WEIGHTS_LOADED).eval()
        assert type(loaded.encoder).__name__ == "ResNetFeatures"
        loaded.load_state_dict(trained.state_dict())
        with torch.no_grad():
            a, b = trained(x), loaded(x)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_a_bundle_of_resnets_is_built_without_timm():
    code = ("import sys; from models.bundle import build_networks; "
            "build_networks({'film_net': {'class': 'FractureNet', 'config': {'backbone': 'resnet18', 'fpn_dim': 96}}, "
            "'crop_net': {'class': 'VertebraNet', 'config': {'backbone': 'resnet18', 'crop_size': 96}}}); "
            "print(' '.join(m for m in ('timm', 'torchvision') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == ""
