"""The seeded model and films behind the inference parity fixture.

The film network is a real, seeded, randomly initialised FractureNet (its body-centre bias
raised so that it finds bodies). A random crop network or point refiner reads every body as a
collapsed point, so the per-vertebra stage would find nothing: both are replaced by
:class:`ContentReader`, a deterministic reader whose points and logits follow each crop's
content. Whatever changes around them (bundles, records, writers) must then reproduce the
fixture exactly; the networks' own weights travel through bundles bit for bit, which the
bundle tests check separately.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixture"
FILMS_DIR = HERE / "films"
IMAGE_SIZE = (128, 104)
SEED = 1234
CROP_CONTEXT = 1.8                # data.vertebra_targets.CROP_CONTEXT when the fixture was made
REFINER_CONTEXT = (1.7, 2.2)      # the refiner's default window (width, height context)


class ContentReader(nn.Module):
    """Reads a body filling ``1 / context`` of the window, its anterior height lowered by an
    amount that grows with the crop's mean intensity; logits from the mean and spread."""

    def __init__(self, crop_size: int = 96, context=(CROP_CONTEXT, CROP_CONTEXT), passes: int = 2, flip: bool = False):
        super().__init__()
        self.crop_size, self.context, self.passes, self.flip = crop_size, tuple(context), passes, flip

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        c = crops.double()
        mean = c.mean(dim=(1, 2, 3))
        std = c.std(dim=(1, 2, 3))
        s, half = self.crop_size, (self.crop_size - 1) / 2.0
        hx, hy = s / (2 * self.context[0]), s / (2 * self.context[1])
        base = torch.tensor([[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]], dtype=torch.float64)
        pts = (base * torch.tensor([hx, hy], dtype=torch.float64) + half).expand(c.shape[0], 6, 2).clone()
        loss = (4.0 * (mean - 0.40)).clamp(0.0, 0.6) * hy  # 0 .. 60 % of the half height
        pts[:, 0, 1] += loss
        pts[:, 3, 1] -= loss
        logits = torch.stack([8.0 * (mean - 0.40), 6.0 * (std - 0.2)], dim=1)
        return {"points": pts.float(), "logits": logits.float()}


def make_films(out: Path) -> list[Path]:
    """Four phantom films (seed 7, 192 px), committed beside the fixture so that the fixture
    does not depend on the phantom generator staying the same."""
    import shutil
    import tempfile

    from data.phantom2d import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp), n=4, seed=7, size=192, workers=1, progress=False)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(tmp, "images").glob("*.png")):
            shutil.copy(f, out / f.name)
    return sorted(out.glob("*.png"))


def films() -> list[str]:
    return sorted(str(p) for p in FILMS_DIR.glob("*.png"))


def calibration_dict() -> dict:
    """The stored calibration: beta maps, two operating points and a vertebra combiner."""
    return {
        "method": "beta",
        "beta": {"p_fracture": {"a": 1.3, "b": 0.8, "c": -0.2},
                 "p_acute_given_fracture": {"a": 0.9, "b": 1.1, "c": 0.1}},
        "points": {"balanced": {"threshold": 0.55, "sensitivity": 0.9, "specificity": 0.8},
                   "high_sensitivity": {"threshold": 0.3, "sensitivity": 0.95, "specificity": 0.6}},
        "default": "balanced",
        "info": {"vertebra_combiner": {"coef": [0.8, 6.0], "intercept": -1.0,
                                       "features": ["logit(p_fracture of the crop network)", "height_loss"]},
                 "n_images": 100, "split": "val", "date": "2026-12-06"},
    }


def seeded_system(seed: int = SEED):
    """The seeded, randomly initialised FractureSystem (film and crop networks)."""
    from training.system import FractureSystem

    torch.manual_seed(seed)
    system = FractureSystem(fpn_dim=16, image_size=IMAGE_SIZE)
    with torch.no_grad():  # raise the random body-centre head so that it finds bodies
        system.net.vertebra_head[-1].bias[0] += 1.5
    return system


def parity_checkpoint(path: Path, seed: int = SEED) -> Path:
    """The parity model as a training checkpoint of the layout before bundles."""
    from calibration import CALIBRATION_KEY, Calibrator
    from models.point_refiner import REFINER_KEY, REFINE_SIZE
    from models.vertebra_net import VertebraNet

    system = seeded_system(seed)
    ckpt = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(ckpt)
    torch.manual_seed(seed + 1)
    ckpt[REFINER_KEY] = {"state_dict": VertebraNet().state_dict(),
                         "config": {"backbone": "resnet18", "size": REFINE_SIZE, "flip": True}, "training": {}}
    d = calibration_dict()
    ckpt[CALIBRATION_KEY] = Calibrator(d["method"], beta=d["beta"], points=d["points"], default=d["default"],
                                       info=d["info"]).to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def with_content_readers(predictor):
    """Swap the predictor's crop network and point refiner for :class:`ContentReader` s."""
    predictor.vertebra_net = ContentReader(96, (CROP_CONTEXT, CROP_CONTEXT))
    predictor.point_refiner = ContentReader(96, REFINER_CONTEXT, passes=2, flip=True)
    return predictor
