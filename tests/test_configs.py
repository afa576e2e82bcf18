"""Every shipped training config parses with the CLI and keeps a resumable last.ckpt."""
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"phantom.yaml", "demo.yaml", "debug.yaml", "phantom_plus_simulated_tall.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path, capsys):
    import train

    with pytest.raises(SystemExit) as stop:
        train.main(["fit", "--config", str(path), "--print_config"])
    assert stop.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert len(resolved["data"]["image_size"]) == 2 and resolved["trainer"]["max_epochs"] >= 1
    assert resolved["data"]["manifest"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_writes_last_checkpoint_every_epoch(path):
    callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
    checkpoints = [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    best = [c for c in checkpoints if c.get("monitor")]
    last = [c for c in checkpoints if not c.get("monitor")]
    assert len(best) == 1 and best[0]["filename"] == "best"
    assert len(last) == 1 and last[0]["filename"] == "last" and last[0]["enable_version_counter"] is False
    assert last[0]["dirpath"] == best[0]["dirpath"]
