"""Multi-hour runs: a crash mid-epoch resumes to the same step count; DDP with 2 CPU processes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from data.phantom2d import generate_dataset
from training_config import compose_config

ROOT = Path(__file__).resolve().parents[1]


class CrashMidEpoch(Callback):
    """Simulates a killed run: raises in the middle of epoch 1."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("simulated crash")


def _config(tmp: Path, manifest: Path, epochs: int) -> Path:
    return compose_config(tmp, manifest, trainer={"max_epochs": epochs, "limit_train_batches": 3, "limit_val_batches": 1},
                          model={"fpn_dim": 16}, data={"image_size": [96, 64]})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_data")
    generate_dataset(out, n=20, seed=41, size=128, workers=1, progress=False)
    return out / "manifest.csv"


def test_crash_then_resume_matches_unbroken_step_count(data, tmp_path):
    import lightning as L

    import train

    unbroken = train.main(["fit", "--config", str(_config(tmp_path / "a", data, 3))])
    expected = unbroken.trainer.global_step
    assert expected == 9

    _config(tmp_path / "b", data, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli = train.FractureCLI(train.FractureSystem, train.SpineDataModule, seed_everything_default=0,
                                save_config_kwargs={"overwrite": True}, run=False,
                                args=["--config", str(tmp_path / "b" / "config.yaml")])
        cli.trainer.callbacks.append(CrashMidEpoch())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    last = tmp_path / "b" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # saved at the end of epoch 0
    resumed = train.main(["fit", "--config", str(tmp_path / "b" / "config.yaml"), "--ckpt_path", str(last)])
    assert resumed.trainer.global_step == expected
    assert isinstance(resumed.trainer, L.Trainer)


def test_ddp_two_cpu_processes(data, tmp_path):
    cfg = _config(tmp_path, data, 1)
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", str(cfg), "--trainer.accelerator", "cpu",
                           "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert "GLOBAL_RANK: 1" in proc.stderr + proc.stdout or "MEMBER: 2/2" in proc.stderr + proc.stdout
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] > 0
