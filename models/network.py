"""The fracture network: a timm backbone, a small FPN, a dense heatmap head and image heads.

Outputs (see :meth:`FractureNet.forward`):

* ``logits`` ``(B, 2)``: image-level logits for *fracture present* and *acute, given a
  fracture*. The reported ``p_acute`` (an acute fracture is present) is
  ``sigmoid(fracture) * sigmoid(acute | fracture)``.
* ``vertebra_logits`` ``(B, 30, H/8, W/8)``: per-vertebra detection on the same grid:
  channel 0 the body-centre heatmap, 1-12 the six points as offsets from the cell, 13-29 the
  level logits T1-L5 (layout and scale in data/vertebra_targets.py).
* ``heatmap_logits`` ``(B, 3, H/8, W/8)``: dense logits for "this pixel lies in a fractured
  vertebra", "... in an acutely fractured vertebra" and "... in a vertebra" (auxiliary). Trained from vertebra masks where the
  data give them; elsewhere they learn only through their pooled contribution to the image
  logits, which makes them a class activation map (weak supervision).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data.vertebra_targets import VERTEBRA_CHANNELS
from models.resnet import DEPTHS as PLAIN_RESNETS, ResNetFeatures

TARGETS = ("fracture", "acute")
# Dense channels: fractured vertebra, acutely fractured vertebra, and any vertebra. The last
# is an auxiliary task: it is known on every film with vertebra truth, so it teaches the
# features where vertebrae are long before the rare fracture pixels can.
HEATMAP_CHANNELS = ("fracture", "acute", "vertebra")
HEATMAP_STRIDE = 8


def logsumexp_pool(x: torch.Tensor, r: float = 4.0) -> torch.Tensor:
    """Smooth maximum over space: between mean (r -> 0) and max (r -> inf) pooling."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    n = torch.tensor(float(flat.shape[-1]), device=x.device, dtype=x.dtype)
    return (torch.logsumexp(r * flat, dim=-1) - torch.log(n)) / r


def top_down(laterals: nn.ModuleList, feats: list[torch.Tensor]) -> torch.Tensor:
    """A feature pyramid's top-down pass: each level's 1 x 1 lateral plus the upsampled level
    above; returns the finest level."""
    top = laterals[-1](feats[-1])
    for lateral, f in zip(reversed(laterals[:-1]), reversed(feats[:-1])):
        top = lateral(f) + F.interpolate(top, size=f.shape[-2:], mode="nearest")
    return top


# ``pretrained`` for a network whose weights are loaded next (from a bundle): no initialisation
# is needed, and a ResNet is built in plain torch, without importing timm (models/resnet.py)
WEIGHTS_LOADED = "loaded"


def create_encoder(backbone: str, pretrained: str | None, in_chans: int = 1,
                   out_indices: tuple[int, ...] = (-3, -2, -1)) -> nn.Module:
    """A timm feature extractor at ``out_indices`` (strides 8, 16 and 32 by default).

    ``pretrained``: None (random init), ``"hub"`` (timm's download; needs a network), a path to
    a local weights file, loaded by timm with ``weights_only=True``, or ``WEIGHTS_LOADED``
    (weights are loaded next: a ResNet is then built without timm). timm adapts an RGB stem to
    one channel by summing its weights.
    """
    if pretrained == WEIGHTS_LOADED and backbone in PLAIN_RESNETS:
        return ResNetFeatures(backbone, in_chans, out_indices)
    import timm  # here: 1.5-2 s of imports that inference from a bundle of ResNets does without

    kwargs = dict(features_only=True, out_indices=out_indices, in_chans=in_chans)
    if pretrained in (None, "", "none", WEIGHTS_LOADED):
        return timm.create_model(backbone, pretrained=False, **kwargs)
    if pretrained == "hub":
        return timm.create_model(backbone, pretrained=True, **kwargs)
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)


class FractureNet(nn.Module):
    targets = TARGETS

    def __init__(self, backbone: str = "resnet18", pretrained: str | None = None, fpn_dim: int = 96,
                 dropout: float = 0.2, in_chans: int = 1):
        super().__init__()
        self.backbone_name, self.fpn_dim = backbone, fpn_dim
        self.encoder = create_encoder(backbone, pretrained, in_chans)
        chans = self.encoder.feature_info.channels()
        reductions = self.encoder.feature_info.reduction()
        if reductions[0] != HEATMAP_STRIDE:
            raise ValueError(f"backbone {backbone} gives strides {reductions}; expected {HEATMAP_STRIDE}, 16, 32")
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_dim, 1) for c in chans)
        self.smooth = nn.Sequential(nn.Conv2d(fpn_dim, fpn_dim, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(fpn_dim), nn.ReLU(inplace=True))
        self.heatmap_head = nn.Conv2d(fpn_dim, len(HEATMAP_CHANNELS), 1)
        self.vertebra_head = nn.Sequential(
            nn.Conv2d(fpn_dim, fpn_dim, 3, padding=1, bias=False), nn.BatchNorm2d(fpn_dim), nn.ReLU(inplace=True),
            nn.Conv2d(fpn_dim, VERTEBRA_CHANNELS, 1))
        with torch.no_grad():  # centre prior of 0.1, as in CenterNet: the focal loss starts stable
            self.vertebra_head[-1].bias[0] = -2.19
        self.image_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * chans[-1], len(TARGETS)))
        # how much the pooled heatmap evidence adds to the image logits
        self.pool_weight = nn.Parameter(torch.ones(len(TARGETS)))
        # inputs arrive in [0, 1]; the network standardises them itself
        self.register_buffer("input_mean", torch.tensor(0.5))
        self.register_buffer("input_std", torch.tensor(0.25))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encoder((x - self.input_mean) / self.input_std)
        fused = self.smooth(top_down(self.lateral, feats))
        heatmap_logits = self.heatmap_head(fused)
        c5 = feats[-1]
        pooled = torch.cat([c5.mean(dim=(2, 3)), c5.amax(dim=(2, 3))], dim=1)
        logits = self.image_head(pooled) + self.pool_weight * logsumexp_pool(heatmap_logits[:, : len(TARGETS)])
        return {"logits": logits, "heatmap_logits": heatmap_logits, "vertebra_logits": self.vertebra_head(fused)}

    @staticmethod
    def probabilities(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = torch.sigmoid(out["logits"])
        return {
            "p_fracture": p[:, 0],
            "p_acute_given_fracture": p[:, 1],
            "p_acute": p[:, 0] * p[:, 1],
            "heatmap": torch.sigmoid(out["heatmap_logits"][:, 0]),
        }
