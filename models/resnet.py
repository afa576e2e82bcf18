"""ResNet feature extractors in plain torch, for networks whose weights are loaded from a bundle.

Importing timm costs about 1.5-2 s (it imports torchvision, which imports torch's compiler
stack), more than the rest of inference's start-up. These modules are timm's ResNets of
:data:`DEPTHS` (``resnet18``, ``resnet10t``, ...) with ``features_only=True`` layer for layer: the same parameter
names, the same operations in the same order, so a state dict moves between the two and the
outputs are equal (tests/test_native_resnet.py). They start with untrained weights that are not
initialised as timm would: they are built only to receive stored weights. Training builds its
networks with timm.
"""
from __future__ import annotations

import torch
from torch import nn

# name: (block, blocks per layer, stem (None: one 7 x 7 convolution; "deep" or "deep_tiered": three
# 3 x 3 convolutions of stem width 32), shortcut downsampling by average pooling ("D" / "T" variants))
DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2), None, False), "resnet34": ("basic", (3, 4, 6, 3), None, False),
          "resnet50": ("bottleneck", (3, 4, 6, 3), None, False),
          "resnet10t": ("basic", (1, 1, 1, 1), "deep_tiered", True),
          "resnet14t": ("bottleneck", (1, 1, 1, 1), "deep_tiered", True),
          "resnet18d": ("basic", (2, 2, 2, 2), "deep", True)}
STEM_CHANNELS = 64
STEM_WIDTH = 32  # of the deep stems


class FeatureInfo:
    """The part of timm's ``feature_info`` the networks read: channels and strides of the outputs."""

    def __init__(self, channels: list[int], reductions: list[int]):
        self._channels, self._reductions = list(channels), list(reductions)

    def channels(self) -> list[int]:
        return list(self._channels)

    def reduction(self) -> list[int]:
        return list(self._reductions)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chans: int, chans: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, chans, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(chans, chans, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(chans)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x += shortcut
        return self.act2(x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chans: int, chans: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out = chans * self.expansion
        self.conv1 = nn.Conv2d(in_chans, chans, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(chans, chans, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(chans)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(chans, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x += shortcut
        return self.act3(x)


class ResNetFeatures(nn.Module):
    """The feature maps of a ResNet at ``out_indices`` of (stem, layer1, ..., layer4), as
    ``timm.create_model(name, features_only=True, out_indices=...)`` returns them."""

    def __init__(self, name: str, in_chans: int = 1, out_indices: tuple[int, ...] = (1, 2, 3, 4)):
        super().__init__()
        if name not in DEPTHS:
            raise ValueError(f"no plain-torch {name}; known: {', '.join(DEPTHS)}")
        kind, depths, stem, avg_down = DEPTHS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        if stem is None:
            self.conv1 = nn.Conv2d(in_chans, STEM_CHANNELS, 7, stride=2, padding=3, bias=False)
        else:
            first = 3 * (STEM_WIDTH // 4) if stem == "deep_tiered" else STEM_WIDTH
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, first, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(first),
                nn.ReLU(inplace=True), nn.Conv2d(first, STEM_WIDTH, 3, padding=1, bias=False),
                nn.BatchNorm2d(STEM_WIDTH), nn.ReLU(inplace=True),
                nn.Conv2d(STEM_WIDTH, STEM_CHANNELS, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels, reductions = [STEM_CHANNELS], [2]
        in_chans_now = STEM_CHANNELS
        for k, n_blocks in enumerate(depths):
            chans, stride = 64 * 2 ** k, 1 if k == 0 else 2
            downsample = None
            if (stride != 1 or in_chans_now != chans * block.expansion) and avg_down:
                pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
                downsample = nn.Sequential(pool, nn.Conv2d(in_chans_now, chans * block.expansion, 1, bias=False),
                                           nn.BatchNorm2d(chans * block.expansion))
            elif stride != 1 or in_chans_now != chans * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(in_chans_now, chans * block.expansion, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(chans * block.expansion))
            blocks = [block(in_chans_now, chans, stride, downsample)]
            in_chans_now = chans * block.expansion
            blocks += [block(in_chans_now, chans) for _ in range(n_blocks - 1)]
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
            channels.append(in_chans_now)
            reductions.append(reductions[-1] * (2 if k == 0 else stride))
        self.out_indices = tuple(i % len(channels) for i in out_indices)
        self.feature_info = FeatureInfo([channels[i] for i in self.out_indices],
                                        [reductions[i] for i in self.out_indices])
        last = max(self.out_indices)
        for k in range(last + 1, len(channels)):  # as timm, no layer past the last output
            delattr(self, f"layer{k}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act1(self.bn1(self.conv1(x)))
        out = [x] if 0 in self.out_indices else []
        x = self.maxpool(x)
        for k in range(1, max(self.out_indices) + 1):
            x = getattr(self, f"layer{k}")(x)
            if k in self.out_indices:
                out.append(x)
        return out
