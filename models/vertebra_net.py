"""The crop network: six morphometry points and fracture / acuity logits for one vertebra.

Input: a ``CROP_SIZE`` square crop of the original film centred on a vertebral body
(data/vertebra_targets.py defines the window). Outputs:

* ``points`` ``(N, 6, 2)``: p1..p6 in crop pixels, from one heatmap per point read out by a
  soft-argmax (integral regression), which keeps sub-pixel precision on a coarse grid;
* ``logits`` ``(N, 2)``: this vertebra is fractured; it is acutely fractured, given a fracture;
* ``log_prob`` ``(N, 6, h, w)``: the log-softmax point maps the soft-argmax reads, for
  :func:`point_map_loss`.

:func:`read_in_batches` runs the crop readings of many vertebrae, of many films, through each
network together: one call reads every crop that waits on it.
"""
from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch
from torch import nn

from data.vertebra_targets import CROP_SIZE
from models.network import create_encoder, top_down

MAX_CROPS_PER_CALL = 32  # crops per forward pass: past this a CPU gains nothing, and memory grows (1.5 MB a crop)
# oneDNN picks its convolution kernels by batch size, and below 16 crops they round differently
# (up to 3e-5 crop pixels): a network that asks for it (``min_crops_per_call``) gets smaller
# calls padded, so that a crop reads the same whichever films share its call (a resumed run
# repeats an uninterrupted one)
MIN_CROPS_PER_CALL = 16

# A reading in steps: a generator that yields (network name, crops (n, 1, s, s) float32), is sent
# back (points (n, 6, 2), logits (n, 2) or None) as float32 arrays, and returns its result.
ReadingSteps = Generator[tuple[str, np.ndarray], tuple[np.ndarray, np.ndarray | None], object]


class VertebraNet(nn.Module):
    min_crops_per_call = MIN_CROPS_PER_CALL  # read_in_batches pads smaller calls (see above)

    def __init__(self, backbone: str = "resnet18", width: int = 64, dropout: float = 0.2,
                 crop_size: int = CROP_SIZE, in_chans: int = 1, pretrained: str | None = None):
        super().__init__()
        self.backbone_name = backbone
        self.crop_size = crop_size
        # strides 4, 8, 16, 32: the points are read at stride 4 (24 x 24 cells on a 96 px crop);
        # ``pretrained``: None (random init) or models.network.WEIGHTS_LOADED (a bundle's weights follow)
        self.encoder = create_encoder(backbone, pretrained, in_chans, out_indices=(1, 2, 3, 4))
        chans = self.encoder.feature_info.channels()
        self.stride = self.encoder.feature_info.reduction()[0]
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in chans)
        self.point_head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                        nn.ReLU(inplace=True), nn.Conv2d(width, 6, 1))
        self.class_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * chans[-1], 2))
        self.register_buffer("input_mean", torch.tensor(0.5))
        self.register_buffer("input_std", torch.tensor(0.25))

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encoder((crops - self.input_mean) / self.input_std)
        maps = self.point_head(top_down(self.lateral, feats))  # (N, 6, h, w)
        n, k, h, w = maps.shape
        log_prob = torch.log_softmax(maps.float().reshape(n, k, h * w), dim=-1).reshape(n, k, h, w)
        prob = log_prob.exp()
        xs = (torch.arange(w, device=maps.device, dtype=prob.dtype) + 0.5) * self.stride - 0.5
        ys = (torch.arange(h, device=maps.device, dtype=prob.dtype) + 0.5) * self.stride - 0.5
        points = torch.stack([(prob.sum(dim=2) * xs).sum(-1), (prob.sum(dim=3) * ys).sum(-1)], dim=-1)
        c5 = feats[-1]
        pooled = torch.cat([c5.mean(dim=(2, 3)), c5.amax(dim=(2, 3))], dim=1)
        return {"points": points, "logits": self.class_head(pooled), "log_prob": log_prob}

    @staticmethod
    def probabilities(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = torch.sigmoid(out["logits"].float())
        return {"p_fracture": p[:, 0], "p_acute_given_fracture": p[:, 1], "p_acute": p[:, 0] * p[:, 1]}


def point_map_loss(log_prob: torch.Tensor, points: torch.Tensor, stride: int, sigma: float = 1.0) -> torch.Tensor:
    """KL divergence from a Gaussian around each true point to the predicted point map.

    A soft-argmax trained only on its coordinates may keep a wide map whose mean is pulled
    towards the crop centre when the evidence is weak (on AP films the points come out 3-4 %
    too close together); this term asks for a compact map around the point. Measured, it did
    not help: a crop-only fine-tune with weight 0.5 raised the median point error on real
    AASCE validation films from 14.1 to 14.7 % of the body height (benchmarks/RESULTS.md), so
    ``crop_map_weight`` stays 0 in every config. ``log_prob``: ``(N, 6, h, w)`` from :class:`VertebraNet`; ``points``: ``(N, 6, 2)``
    in crop pixels; ``sigma`` in grid cells. Zero for a map equal to the target."""
    n, k, h, w = log_prob.shape
    xs = (torch.arange(w, device=log_prob.device, dtype=torch.float32) + 0.5) * stride - 0.5
    ys = (torch.arange(h, device=log_prob.device, dtype=torch.float32) + 0.5) * stride - 0.5
    s = sigma * stride
    gx = -((xs.view(1, 1, 1, w) - points[..., 0, None, None].float()) ** 2) / (2 * s * s)
    gy = -((ys.view(1, 1, h, 1) - points[..., 1, None, None].float()) ** 2) / (2 * s * s)
    log_target = torch.log_softmax((gx + gy).reshape(n, k, h * w), dim=-1)
    kl = (log_target.exp() * (log_target - log_prob.float().reshape(n, k, h * w))).sum(-1)
    return kl.mean()


@torch.inference_mode()
def read_in_batches(readings: list[ReadingSteps], networks: dict[str, nn.Module], device: torch.device) -> list:
    """Run ``readings`` (see :data:`ReadingSteps`) side by side: in each round, the crops of all
    readings that wait on the same network go through it in one call (``MAX_CROPS_PER_CALL`` at
    most), so many films' vertebrae share a forward pass instead of one small one each.

    Returns each reading's result, or the exception it (or its network call) raised: one
    reading's failure does not end the others."""
    results: list = [None] * len(readings)
    waiting: dict[int, tuple[str, np.ndarray]] = {}

    def advance(k: int, value) -> None:
        try:
            waiting[k] = readings[k].send(value)
        except StopIteration as stop:
            results[k] = stop.value
        except Exception as exc:  # this reading fails alone
            results[k] = exc

    for k in range(len(readings)):
        advance(k, None)
    while waiting:
        name = next(iter(waiting.values()))[0]
        group = [k for k, (net_name, _) in waiting.items() if net_name == name]
        crops = [waiting.pop(k)[1] for k in group]
        try:
            points, logits = _forward(networks[name], np.concatenate(crops), device)
        except Exception as exc:
            for k in group:
                readings[k].close()
                results[k] = exc
            continue
        start = 0
        for k, c in zip(group, crops):
            end = start + len(c)
            advance(k, (points[start:end], None if logits is None else logits[start:end]))
            start = end
    return results


def read_one(reading: ReadingSteps, networks: dict[str, nn.Module], device: torch.device):
    """The result of one reading (:func:`read_in_batches`), raising what it raised."""
    result = read_in_batches([reading], networks, device)[0]
    if isinstance(result, Exception):
        raise result
    return result


def _forward(net: nn.Module, crops: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    if not len(crops):
        return np.zeros((0, 6, 2), np.float32), np.zeros((0, 2), np.float32)
    points, logits = [], []
    # oneDNN's kernel choice is what padding evens out; cuDNN chooses by batch size anyway
    least = getattr(net, "min_crops_per_call", 1) if torch.device(device).type == "cpu" else 1
    for chunk in call_sizes(len(crops)):
        part = np.ascontiguousarray(crops[:chunk])
        crops = crops[chunk:]
        padded = np.concatenate([part, np.zeros((least - chunk, *part.shape[1:]), part.dtype)]) if chunk < least else part
        out = net(torch.from_numpy(padded).to(device))
        points.append(out["points"][:chunk].float().cpu().numpy())
        if out.get("logits") is not None:
            logits.append(out["logits"][:chunk].float().cpu().numpy())
    return np.concatenate(points), (np.concatenate(logits) if len(logits) == len(points) else None)


def call_sizes(n: int) -> list[int]:
    """How ``n`` crops are split into forward passes: as few as ``MAX_CROPS_PER_CALL`` allows,
    of near-equal size, so that only a call of fewer than ``MIN_CROPS_PER_CALL`` crops in all
    needs padding (``n`` over the maximum gives parts of more than half of it, none smaller)."""
    calls = -(-n // MAX_CROPS_PER_CALL)
    return [n // calls + (k < n % calls) for k in range(calls)]
