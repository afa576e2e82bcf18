"""Batch norms folded into convolutions for inference (models/fusion.py): the same outputs, no
norm left where one can go, nothing folded that must not be, and a caller's bundle untouched."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from inference.predictor import Predictor
from models.bundle import load_bundle
from models.fusion import fold_batch_norms
from models.network import FractureNet
from models.vertebra_net import VertebraNet

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "bundles" / "spine-vcf-default"


def with_trained_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Norms whose running statistics and affine parameters are far from the identity, as after
    training, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return net.eval()


def norms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


@pytest.mark.parametrize("make, shape", [
    (lambda: VertebraNet(backbone="resnet10t"), (3, 1, 96, 96)),
    (lambda: FractureNet(backbone="resnet10t", fpn_dim=32), (2, 1, 128, 96)),
])
def test_folded_networks_give_the_same_outputs_without_norms(make, shape):
    torch.manual_seed(0)
    net = with_trained_statistics(make())
    reference = copy.deepcopy(net)
    before = norms(net)
    folded = fold_batch_norms(net)
    assert folded == before > 10 and norms(net) == 0
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = reference(x), net(x)
    for key, value in want.items():
        if torch.is_tensor(value):
            assert torch.allclose(got[key], value, atol=1e-4, rtol=1e-4), key


class SharedConvOutput(nn.Module):
    """A convolution whose output also feeds a residual branch: folding the norm into it would
    change what the branch adds."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.conv_b, self.norm_b = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y + self.norm_b(self.conv_b(x))


def test_a_convolution_used_elsewhere_keeps_its_norm():
    net = with_trained_statistics(SharedConvOutput())
    reference = copy.deepcopy(net)
    assert fold_batch_norms(net) == 1  # only conv_b / norm_b
    assert isinstance(net.norm, nn.BatchNorm2d) and isinstance(net.norm_b, nn.Identity)
    x = torch.rand(1, 2, 8, 8)
    assert torch.allclose(net(x), reference(x), atol=1e-5)


def test_a_network_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(VertebraNet(backbone="resnet10t").train())


def test_a_bundle_the_caller_holds_keeps_its_norms():
    """calibration.fit runs a Predictor on a bundle and then saves a new version of it: that
    bundle's networks must keep their norms (and their state_dict keys)."""
    bundle = load_bundle(SHIPPED)
    keys = {name: sorted(net.state_dict()) for name, net in bundle.networks.items()}
    predictor = Predictor(bundle, device="cpu")
    assert norms(predictor.net) == norms(predictor.vertebra_net) == 0
    assert all(norms(net) > 0 for net in bundle.networks.values())
    assert {name: sorted(net.state_dict()) for name, net in bundle.networks.items()} == keys


def test_a_model_opened_by_name_runs_folded():
    predictor = Predictor(SHIPPED, device="cpu")
    assert norms(predictor.net) == norms(predictor.vertebra_net) == 0
