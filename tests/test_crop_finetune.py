"""training/crop_finetune.py: only the crop network changes, the result is a new bundle version
that loads for inference, and the input bundle is left as it was."""
import hashlib
from pathlib import Path

import pytest
import torch

from data.phantom2d import generate_dataset
from models.bundle import BundleError, load_bundle
from training.export import export_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_crop_finetune_changes_only_the_crop_network(tmp_path, capsys):
    from training import crop_finetune
    from inference.predictor import Predictor
    from training.system import FractureSystem

    generate_dataset(tmp_path / "data", n=10, seed=5, size=128, workers=1, progress=False)
    torch.manual_seed(0)
    system = FractureSystem(fpn_dim=16, image_size=(64, 48))
    ckpt = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams),
            "datamodule_hyper_parameters": {"val_fraction": 0.2, "split_seed": 0},
            "vcf_calibration": {"method": "none"}}
    system.on_save_checkpoint(ckpt)
    source = tmp_path / "model.ckpt"
    torch.save(ckpt, source)
    bundle = export_checkpoint(source, tmp_path / "bundle")
    before_files = _hashes(bundle)
    assert "calibration.json" in before_files

    out = tmp_path / "tuned"
    record = crop_finetune.finetune(bundle, tmp_path / "data" / "manifest.csv", out, epochs=1, lr=1e-3,
                                    map_weight=0.5, batch_size=4, num_workers=0, limit_batches=2)
    assert record["steps"] == 2 and record["history"][0]["crop_map"] > 0
    assert _hashes(bundle) == before_files  # the input bundle is never edited
    source_bundle, tuned = load_bundle(bundle), load_bundle(out)
    for name in ("film_net", "crop_net"):
        assert source_bundle.networks[name].state_dict().keys() == tuned.networks[name].state_dict().keys()
    film_before, film_after = source_bundle.film_net.state_dict(), tuned.film_net.state_dict()
    assert all(torch.equal(film_before[k], film_after[k]) for k in film_before)
    crop_before, crop_after = source_bundle.crop_net.state_dict(), tuned.crop_net.state_dict()
    assert any(not torch.equal(crop_before[k], crop_after[k]) for k in crop_before if crop_before[k].is_floating_point())
    assert tuned.metadata["training"]["hyper_parameters"]["crop_map_weight"] == 0.5
    step = tuned.metadata["history"][-1]
    assert step["step"] == "crop fine-tune" and step["record"]["epochs"] == 1 and step["record"]["map_weight"] == 0.5
    assert step["from"]["version"] == source_bundle.version and step["from"]["id"] == source_bundle.id
    assert tuned.version != source_bundle.version
    assert tuned.calibration is None and "calibration.json" not in _hashes(out)  # fitted on the old crop network
    assert not any("optim" in name for name in _hashes(out))  # weights only, no optimizer state
    Predictor(out, device="cpu")  # a bundle inference loads

    # the command line: a checkpoint converted in memory; a new folder only, never the input
    tuned_cli = tmp_path / "tuned_cli"
    assert crop_finetune.main(["--checkpoint", str(source), "--manifest", str(tmp_path / "data" / "manifest.csv"),
                               "--out", str(tuned_cli), "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
                               "--limit-batches", "1"]) == 0
    assert load_bundle(tuned_cli).metadata["history"][-1]["step"] == "crop fine-tune"
    assert crop_finetune.main(["--model", str(bundle), "--manifest", "m.csv", "--out", str(tuned_cli)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(BundleError, match="must differ"):
        crop_finetune.finetune(bundle, "m.csv", bundle, epochs=1, lr=1e-3, map_weight=0.5, batch_size=4,
                               num_workers=0)
