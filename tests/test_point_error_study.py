"""benchmarks/point_error_study.py: the crop study's geometry, and the whole script on tiny data."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.vertebra_targets import CROP_CONTEXT, CROP_SIZE

ROOT = Path(__file__).resolve().parents[1]

HALF = (CROP_SIZE - 1) / 2.0
# a square body whose side is 1 / CROP_CONTEXT of its crop window, read in crop pixels
SQUARE = np.array([[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]], float) * CROP_SIZE / (2 * CROP_CONTEXT) + HALF


class _ConstantCropNet(nn.Module):
    """Reads the same crop points whatever the crop shows."""

    def forward(self, crops):
        n = crops.shape[0]
        return {"points": torch.tensor(np.repeat(SQUARE[None], n, axis=0), dtype=torch.float32),
                "logits": torch.zeros(n, 2)}


def _square(cx, cy, s):
    return np.array([[cx - s / 2, cy - s / 2], [cx, cy - s / 2], [cx + s / 2, cy - s / 2],
                     [cx - s / 2, cy + s / 2], [cx, cy + s / 2], [cx + s / 2, cy + s / 2]], float)


def test_crop_study_measures_exactly_what_each_window_costs():
    from benchmarks import point_error_study

    films = [(np.zeros((200, 120), np.float32), np.stack([_square(60, 50 + 30 * k, 20) for k in range(4)])),
             (np.zeros((150, 100), np.float32), np.stack([_square(50, 40 + 30 * k, 24) for k in range(3)]))]
    out = point_error_study.crop_study(_ConstantCropNet(), films)
    v = out["variants"]
    assert out["n_vertebrae"] == 7
    # square bodies read in windows placed from their own points come back exactly
    assert v["truth"]["median"] == pytest.approx(0, abs=1e-3) and v["multi-scale"]["median"] == pytest.approx(0, abs=2e-3)
    # a 10 % larger or smaller window scales the reading about the centre: corners move by
    # 0.1 x half the diagonal (7.07 % of the height), endplate midpoints by 5 %
    for name in ("scale 0.9", "scale 1.1"):
        assert v[name]["median"] == pytest.approx(100 * 0.1 / np.sqrt(2), rel=1e-3)
        assert v[name]["p90"] == pytest.approx(100 * 0.1 / np.sqrt(2), rel=1e-3)
    # a shifted window moves all six points together, by the shift
    assert 0.5 < v["jitter"]["median"] < 20
    assert out["without_each_films_mean_error"]["median"] == pytest.approx(0, abs=1e-3)
    assert np.allclose(out["mean_signed_error_pct"]["x"], 0, atol=1e-2)


class _CanonicalRefiner(nn.Module):
    """A point refiner that reads every body exactly where its window was placed for it."""

    context = (1.7, 2.2)
    passes = 2

    def forward(self, crops):
        from models.point_refiner import REFINE_SIZE

        unit = np.array([[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]], float)
        template = unit * [REFINE_SIZE / (2 * self.context[0]), REFINE_SIZE / (2 * self.context[1])] + (REFINE_SIZE - 1) / 2
        n = crops.shape[0]
        return {"points": torch.tensor(np.repeat(template[None], n, 0), dtype=torch.float32), "logits": torch.zeros(n, 2)}


def test_crop_study_reads_the_refiner_from_the_truth_and_from_the_crop_reading():
    from benchmarks import point_error_study

    films = [(np.zeros((200, 120), np.float32), np.stack([_square(60, 50 + 30 * k, 20) for k in range(4)]))]
    v = point_error_study.crop_study(_ConstantCropNet(), films, refiner=_CanonicalRefiner())["variants"]
    # a window placed on the truth puts the body where the canonical reader reads it: no error;
    # from the crop reading (exact here too) the same
    assert v["refiner on truth"]["median"] == pytest.approx(0, abs=1e-3)
    assert v["crop + refiner"]["median"] == pytest.approx(0, abs=1e-3)
    assert "refiner on truth" not in point_error_study.crop_study(_ConstantCropNet(), films)["variants"]


def test_point_error_study_runs_on_phantom_films(tmp_path, capsys):
    from benchmarks import point_error_study
    from data.phantom2d import generate_dataset
    from training_config import save_untrained_checkpoint

    generate_dataset(tmp_path / "data", n=2, seed=3, size=128, workers=1, progress=False)
    _, ckpt = save_untrained_checkpoint(tmp_path / "model.ckpt", image_size=(64, 48))
    out = tmp_path / "study.json"
    assert point_error_study.main(["--checkpoint", str(ckpt), "--vertebrae", str(tmp_path / "data" / "vertebrae.csv"),
                                   "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_films"] == 2 and result["crop"]["n_vertebrae"] > 10
    assert set(result["pipeline"]) == {"2 passes", "3 passes", "2 passes, neighbour-median extent"}
    assert "crop network on crops placed from the truth" in capsys.readouterr().out
    # annotation groups from the file names (an untrained reader may match nothing: counts only)
    assert point_error_study.main(["--checkpoint", str(ckpt), "--vertebrae", str(tmp_path / "data" / "vertebrae.csv"),
                                   "--json", str(out), "--only", "2 passes", "--group-regex=(.)"]) == 0
    conv = json.loads(out.read_text())["conventions"]
    assert conv["variant"] == "2 passes" and conv["group_regex"] == "(.)"
    assert sum(g["n_vertebrae"] for g in conv["groups"].values()) == conv["n_vertebrae"]
    assert "annotation groups" in capsys.readouterr().out
    for bad, message in ((["--group-regex=a"], "capture group"), (["--group-regex=(", "--skip-pipeline"], "drop --skip-pipeline"),
                         (["--group-regex=("], "--group-regex")):
        with pytest.raises(SystemExit):
            point_error_study.main(["--checkpoint", str(ckpt), "--vertebrae", str(tmp_path / "data" / "vertebrae.csv")] + bad)
        assert message in capsys.readouterr().err


def test_point_error_study_reads_a_refined_checkpoint_both_ways_and_filters_variants(tmp_path):
    from benchmarks import point_error_study
    import torch
    from data.phantom2d import generate_dataset
    from models.point_refiner import REFINER_KEY, build_refiner
    from training_config import save_untrained_checkpoint

    generate_dataset(tmp_path / "data", n=1, seed=4, size=128, workers=1, progress=False)
    _, ckpt_path = save_untrained_checkpoint(tmp_path / "model.ckpt", image_size=(64, 48))
    ckpt = torch.load(ckpt_path, weights_only=True)
    config = {"flip": True}
    ckpt[REFINER_KEY] = {"state_dict": build_refiner(config).state_dict(), "config": config}
    torch.save(ckpt, ckpt_path)
    out = tmp_path / "study.json"
    assert point_error_study.main(["--checkpoint", str(ckpt_path), "--vertebrae", str(tmp_path / "data" / "vertebrae.csv"),
                                   "--json", str(out), "--only", "2 passes|.*(mirrored|without).*"]) == 0
    result = json.loads(out.read_text())
    # the stored setting (mirrored), the other one, and no refiner; "3 passes" and the neighbour rows filtered out
    assert set(result["pipeline"]) == {"2 passes", "2 passes, refiner's last pass not mirrored",
                                       "2 passes, without the point refiner"}
    assert {"refiner on truth", "crop + refiner"} <= set(result["crop"]["variants"])


def _convention_tables(noise=0.3, seed=0):
    """Two groups of films whose annotators disagree: group A marks each corner 5 px outside the
    body along its endplates, group B 5 px inside it. The reader reads the body itself."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    cols = [f"p{k}{c}" for k in range(1, 7) for c in "xy"]
    truth, pred = [], []
    for group, outward in (("A", 5.0), ("B", -5.0)):
        for film in range(6):
            image = f"/films/scan-{group}-{film}.png"
            for k in range(5):
                cx, cy, w, h = 200.0 + 3 * film, 100.0 + 80 * k, 80.0, 50.0
                body = np.array([[cx - w / 2, cy - h / 2], [cx, cy - h / 2], [cx + w / 2, cy - h / 2],
                                 [cx - w / 2, cy + h / 2], [cx, cy + h / 2], [cx + w / 2, cy + h / 2]])
                marked = body.copy()
                marked[[0, 3], 0] -= outward
                marked[[2, 5], 0] += outward
                truth.append({"image": image, **dict(zip(cols, marked.ravel()))})
                pred.append({"image": image, **dict(zip(cols, (body + rng.normal(0, noise, body.shape)).ravel()))})
    return pd.DataFrame(pred), pd.DataFrame(truth)


def test_convention_study_finds_groups_annotated_differently():
    from benchmarks import point_error_study

    pred, truth = _convention_tables()
    out = point_error_study.convention_study(pred, truth, r"scan-([AB])-")
    assert out["n_vertebrae"] == 60 and set(out["groups"]) == {"A", "B"}
    a, b = out["groups"]["A"], out["groups"]["B"]
    assert a["n_films"] == 6 and a["n_vertebrae"] == 30
    # 10 px of width on a 50 px tall body: read 20 % of the height narrower (A) or wider (B) than annotated
    assert a["read_wider_than_annotated_pct"] == pytest.approx(-20, abs=1.5)
    assert b["read_wider_than_annotated_pct"] == pytest.approx(20, abs=1.5)
    assert abs(a["read_taller_than_annotated_pct"]) < 1.5
    # the corners are 10 % off, the middle points exact: median 10 %; each group's offsets, fitted on
    # its other films, remove the disagreement down to the reader's noise
    assert out["median_error_pct"] == pytest.approx(10, abs=1.0)
    assert out["median_error_group_offsets_removed_pct"] < 2.0
    assert a["median_error_group_offsets_removed_pct"] < 2.0
    # one group for all: the opposite conventions cancel in the pooled offsets, nothing is removed
    pooled = point_error_study.convention_study(pred, truth, r"(scan)-")
    assert set(pooled["groups"]) == {"scan"}
    assert pooled["median_error_group_offsets_removed_pct"] > 8.0
    with pytest.raises(ValueError, match="capture group"):
        point_error_study.convention_study(pred, truth, r"scan-[AB]-")


def test_body_frame_errors_are_along_and_across_the_truth_body():
    from benchmarks import point_error_study

    truth = np.array([[[0, 0], [5, 0], [10, 0], [0, 4], [5, 4], [10, 4]]], float)  # 4 px tall, upright
    turned = truth[:, :, ::-1] * [1, 1]  # the same body turned 90 degrees: endplates run down the film
    shift = np.zeros_like(truth)
    shift[0, 2] = [1.0, 0.0]  # p3 one pixel further along the endplate, outwards
    along, across = point_error_study.body_frame_errors(truth + shift, truth)
    assert along[0, 2] == pytest.approx(25.0) and abs(across).max() < 1e-9
    along_t, across_t = point_error_study.body_frame_errors(turned + shift[:, :, ::-1], turned)
    assert along_t[0, 2] == pytest.approx(25.0) and abs(across_t).max() < 1e-9
