"""Readings in steps share forward passes (models.vertebra_net.read_in_batches): many films'
vertebrae go through the crop network together, with the results of one film at a time."""
import numpy as np
import pytest
import torch
from torch import nn

from data.transforms import Letterbox
from data.vertebra_targets import OFFSET_SCALE, VERTEBRA_CHANNELS
from inference.vertebrae import analyse_film, analyse_films
from models.point_refiner import build_refiner
from models.vertebra_net import (MAX_CROPS_PER_CALL, MIN_CROPS_PER_CALL, VertebraNet, call_sizes, read_in_batches,
                                 read_one)

STRIDE = 8
CPU = torch.device("cpu")


class _CountingNet(nn.Module):
    """Reads every crop as its mean brightness (points) and counts its calls and crops."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, crops):
        self.calls.append(real_crops(crops))
        mean = crops.mean(dim=(1, 2, 3))
        return {"points": mean[:, None, None].expand(-1, 6, 2) + torch.arange(6.0)[None, :, None],
                "logits": torch.stack([mean, -mean], dim=1)}


def real_crops(crops) -> int:
    """Crops in a call that are not padding (all zero)."""
    return int((crops.flatten(1).abs().sum(1) > 0).sum())


def _steps(value, rounds):
    """A reading that sends ``rounds`` crops of brightness ``value`` and returns what it read."""
    read = []
    for _ in range(rounds):
        points, logits = yield "net", np.full((2, 1, 8, 8), value, np.float32)
        read.append(float(points[0, 0, 0]))
    return read


def test_readings_waiting_on_one_network_share_its_calls():
    net = _CountingNet()
    results = read_in_batches([_steps(1.0, 2), _steps(2.0, 2), _steps(3.0, 1)], {"net": net}, CPU)
    assert results == [[1.0, 1.0], [2.0, 2.0], [3.0]]
    assert net.calls == [6, 4]  # round 1: all three readings; round 2: the two that go on


def test_a_failing_reading_fails_alone():
    def broken():
        yield "net", np.zeros((1, 1, 8, 8), np.float32)
        raise RuntimeError("bad film")

    results = read_in_batches([_steps(1.0, 2), broken()], {"net": _CountingNet()}, CPU)
    assert results[0] == [1.0, 1.0]
    assert isinstance(results[1], RuntimeError) and "bad film" in str(results[1])
    with pytest.raises(RuntimeError, match="bad film"):
        read_one(broken(), {"net": _CountingNet()}, CPU)


def _film(seed, n_bodies):
    """Stage-1 logits with ``n_bodies`` bodies down a 256 x 192 film (identity letterbox) and
    a noisy film image with bright bodies."""
    rng = np.random.default_rng(seed)
    h, w = 256, 192
    logits = torch.full((VERTEBRA_CHANNELS, h // STRIDE, w // STRIDE), -10.0)
    image = rng.uniform(0.0, 0.3, (h, w)).astype(np.float32)
    for k in range(n_bodies):
        cx, cy = 96.0 + rng.uniform(-4, 4), 30.0 + 38.0 * k
        half = 12.0 + rng.uniform(-2, 2)
        pts = np.array([[cx - half, cy - half], [cx, cy - half], [cx + half, cy - half],
                        [cx - half, cy + half], [cx, cy + half], [cx + half, cy + half]])
        image[int(cy - half):int(cy + half), int(cx - half):int(cx + half)] += 0.5
        i, j = int(cy // STRIDE), int(cx // STRIDE)
        cell = (np.array([j, i]) + 0.5) * STRIDE - 0.5
        logits[0, i, j] = 4.0
        logits[1:13, i, j] = torch.tensor(((pts - cell) / (STRIDE * OFFSET_SCALE)).reshape(-1), dtype=torch.float32)
        logits[13 + 5 + k, i, j] = 6.0
    box = Letterbox(scale=1.0, pad_left=0, pad_top=0, out_hw=(h, w), in_hw=(h, w))
    return {"vertebra_logits": logits, "box": box, "image": image, "pixel_spacing_mm": (0.2, 0.2)}


def test_films_analysed_together_equal_films_analysed_one_at_a_time():
    torch.manual_seed(0)
    crop_net, refiner = VertebraNet().eval(), build_refiner({"passes": 2, "flip": True}).eval()
    films = [_film(0, 5), _film(1, 0), _film(2, 6)]
    calls = []
    crop_net.register_forward_hook(lambda module, args, out: calls.append(real_crops(args[0])))
    together = analyse_films(films, STRIDE, crop_net, CPU, point_refiner=refiner)
    shared_calls = len(calls)
    alone = [analyse_film(f["vertebra_logits"], f["box"], STRIDE, crop_net, f["image"], CPU, f["pixel_spacing_mm"],
                          point_refiner=refiner) for f in films]
    assert shared_calls < len(calls) - shared_calls  # fewer, larger forward passes
    assert max(calls[:shared_calls]) == 11  # both films' bodies in one call
    for a, b in zip(together, alone):
        assert len(a["vertebrae"]) == len(b["vertebrae"])
        assert a["levels_trusted"] == b["levels_trusted"]
        for va, vb in zip(a["vertebrae"], b["vertebrae"]):
            assert va["level"] == vb["level"]
            # every call holds at least MIN_CROPS_PER_CALL crops: a body reads the same in any company
            np.testing.assert_allclose(va["points"], vb["points"], rtol=0, atol=1e-9)
            assert va["p_fracture"] == pytest.approx(vb["p_fracture"], abs=1e-12)


@pytest.mark.parametrize("n", [1, 5, 15, 16, 17, 33, 70])
def test_calls_of_any_size_read_a_crop_the_same(n):
    """A crop's reading does not depend on how many crops share its forward pass: oneDNN picks its
    kernels by batch size, so calls are split evenly and small ones padded to MIN_CROPS_PER_CALL."""
    torch.manual_seed(0)
    net = VertebraNet(backbone="resnet10t").eval().to(memory_format=torch.channels_last)
    crops = np.random.default_rng(0).random((70, 1, 96, 96), dtype=np.float32)

    def reading(batch):
        points, logits = yield "net", batch
        return points, logits

    # every crop of the call reads as it does alone (crop 0) and as in a call of all 70
    (alone,) = read_in_batches([reading(crops[:1])], {"net": net}, CPU)
    (every,) = read_in_batches([reading(crops)], {"net": net}, CPU)
    (together,) = read_in_batches([reading(crops[:n])], {"net": net}, CPU)
    np.testing.assert_array_equal(together[0][:1], alone[0])
    np.testing.assert_array_equal(together[1][:1], alone[1])
    np.testing.assert_array_equal(together[0], every[0][:n])
    np.testing.assert_array_equal(together[1], every[1][:n])
    sizes = call_sizes(n)
    assert sum(sizes) == n and max(sizes) <= MAX_CROPS_PER_CALL and (len(sizes) == 1 or min(sizes) >= MIN_CROPS_PER_CALL)
