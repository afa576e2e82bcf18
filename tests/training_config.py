"""The real debug config (configs/debug.yaml), pointed at a test's tmp folder."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose_config(tmp: Path, manifest: Path, trainer: dict | None = None, model: dict | None = None,
                   data: dict | None = None) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "debug.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp)
    cfg["trainer"]["logger"][0]["init_args"]["save_dir"] = str(tmp)
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp)
    cfg["trainer"].update(trainer or {})
    cfg["model"].update(model or {})
    cfg["data"]["manifest"] = str(manifest)
    cfg["data"].update(data or {})
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
