"""training/crop_finetune.py: only the crop network changes, and the result loads for inference."""
import sys
from pathlib import Path

import torch

from data.phantom import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_crop_finetune_changes_only_the_crop_network(tmp_path):
    from training import crop_finetune
    from inference.predictor import Predictor
    from training.system import FractureSystem

    generate_dataset(tmp_path / "data", n=10, seed=5, size=128, workers=1, progress=False)
    torch.manual_seed(0)
    system = FractureSystem(fpn_dim=16, image_size=(64, 48))
    ckpt = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams),
            "datamodule_hyper_parameters": {"val_fraction": 0.2, "split_seed": 0}}
    system.on_save_checkpoint(ckpt)
    source = tmp_path / "model.ckpt"
    torch.save(ckpt, source)

    out = tmp_path / "tuned" / "best.ckpt"
    record = crop_finetune.finetune(source, tmp_path / "data" / "manifest.csv", out, epochs=1, lr=1e-3,
                                    map_weight=0.5, batch_size=4, num_workers=0, limit_batches=2)
    assert record["steps"] == 2 and record["history"][0]["crop_map"] > 0
    tuned = torch.load(out, weights_only=True)
    before, after = ckpt["state_dict"], tuned["state_dict"]
    assert before.keys() == after.keys()
    film = [k for k in before if k.startswith("net.")]
    crop = [k for k in before if k.startswith("vertebra_net.") and before[k].is_floating_point()]
    assert all(torch.equal(before[k], after[k]) for k in film)
    assert any(not torch.equal(before[k], after[k]) for k in crop)
    assert tuned["hyper_parameters"]["crop_map_weight"] == 0.5 and tuned["crop_finetune"]["epochs"] == 1
    assert "optimizer_states" not in tuned
    Predictor(out, device="cpu")  # still a checkpoint of this project
