r"""Does fracture synthesis on the fly teach a model fractures from unfractured landmark films?

    python -m benchmarks.synthesis_study --aasce ../shared/data/aasce --init runs/phantom_gpu/last.ckpt \
        [--epochs 6] [--p 0.5] [--out runs/synth] [--json OUT.json]

The case it stands for: a site with vertebra landmarks on its films but few or no fractured
ones. Two fine-tunes of the same phantom-trained model (``--init``) on the same real AASCE AP
films of the *training* patients of ``runs/mix`` (all unfractured), with
``configs/aasce_normals_synthesis.yaml``:

* ``synthesis``: ``data.fracture_synthesis = p``: each training film gets a fracture simulated on
  it with probability ``p``, anew every epoch (data/simulate.py, ``FractureSynthesis``);
* ``control``: ``data.fracture_synthesis = 0``: the same films as they are.

Both validate on fractures simulated once on the *validation* patients' films (``sim_val``), keep
their last epoch (no selection), and are scored on the held-out simulated-real films of
``runs/mix`` (``split = test``: fractures simulated offline on the held-out patients' films, never
seen by either run): image-level fracture AUROC with a patient-bootstrap CI, grade 2-3 vs normal
AUROC, acute vs chronic AUROC and per-vertebra fracture AUROC. Everything is simulated or
unfractured: nothing here is clinical performance.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.mixed_benchmark import grade_group_auroc, load_dataset, write_subset
from data.io_utils import atomic_write_json, atomic_write_text
from data.landmarks import read_aasce, write_vertebrae_dataset
from data.manifest import assign_splits
from data.tables import read_text_table
from data.simulate import simulate_dataset
from evaluation.compare import compare_aurocs, paired_frame

CONFIG = ROOT / "configs" / "aasce_normals_synthesis.yaml"
VAL_FRACTION, SPLIT_SEED = 0.15, 0  # the split of runs/mix's training (configs/phantom_plus_simulated*.yaml)


def split_patients(mix_manifest: Path) -> tuple[set[str], set[str]]:
    """``(test, val)`` patient ids of the combined training manifest: its ``split = test`` rows, and
    the patients its training put in validation (same hash, fraction and seed)."""
    mix = read_text_table(mix_manifest)
    splits = assign_splits(mix.assign(split=mix.get("split", "")), val_fraction=VAL_FRACTION, seed=SPLIT_SEED)
    test = set(mix.loc[splits == "test", "patient_id"])
    val = set(mix.loc[splits == "val", "patient_id"])
    return test, val


def build_data(aasce: Path, mix_manifest: Path, out: Path, val_draws: int = 2, seed: int = 7) -> dict:
    """``out/aasce_train`` (training patients' films, unfractured), ``out/sim_val`` (fractures
    simulated on the validation patients' films) and ``out/sim_test`` (the held-out simulated-real
    films of ``mix_manifest``). Returns their manifests and counts."""
    test, val = split_patients(mix_manifest)
    records = [r for r in read_aasce(aasce) if not r["problems"]]
    train_records = [r for r in records if r["patient_id"] not in test | val]
    val_records = [r for r in records if r["patient_id"] in val]
    if not train_records or not val_records:
        raise SystemExit(f"{aasce}: no training or validation films left after the split of {mix_manifest}")
    info = {"n_train_films": len(train_records), "n_train_patients": len({r["patient_id"] for r in train_records}),
            "n_val_source_films": len(val_records), "n_test_patients": len(test)}
    info["train_manifest"] = str(write_vertebrae_dataset(train_records, out / "aasce_train"))
    info["val_manifest"] = str(simulate_dataset(val_records, out / "sim_val", n_per_image=val_draws, seed=seed,
                                                size=1024, progress=True))
    manifest, vertebrae = load_dataset(mix_manifest)
    held = manifest[manifest["split"] == "test"]
    info["test"] = write_subset(held, vertebrae, out / "sim_test")
    return info


def run_config(template: dict, run_dir: Path, data: dict, init: Path, p: float, epochs: int) -> dict:
    cfg = json.loads(json.dumps(template))  # a deep copy
    cfg["trainer"].update(max_epochs=epochs, default_root_dir=str(run_dir))
    for logger in cfg["trainer"].get("logger") or []:
        logger["init_args"]["save_dir"] = str(run_dir)
    for cb in cfg["trainer"].get("callbacks") or []:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(run_dir)
    cfg["model"]["init_from"] = str(init)
    cfg["data"].update(manifest=data["train_manifest"], val_manifest=data["val_manifest"], fracture_synthesis=p)
    return cfg


def train(cfg: dict, run_dir: Path) -> tuple[Path, float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = atomic_write_text(run_dir / "study_config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "train.py", "fit", "--config", str(config_path)], cwd=ROOT, check=True)
    ckpt = run_dir / "last.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"{run_dir}: training wrote no last.ckpt")
    return ckpt, time.perf_counter() - t0


def score(ckpt: Path, test: dict, out: Path) -> dict:
    """``infer.py`` and ``evaluate.py`` on the held-out simulated-real films; the numbers kept."""
    infer_dir, report_dir = out / "infer_test", out / "report_test"
    subprocess.run([sys.executable, "infer.py", "--checkpoint", str(ckpt), "--out", str(infer_dir), "--num-workers",
                    "1", "--quiet", test["manifest"]], cwd=ROOT, check=False)
    subprocess.run([sys.executable, "evaluate.py", "--predictions", str(infer_dir / "predictions.csv"), "--manifest",
                    test["manifest"], "--vertebrae", test["vertebrae"], "--out", str(report_dir)], cwd=ROOT, check=True)
    m = json.loads((report_dir / "metrics.json").read_text())
    verts = (m.get("vertebrae") or {}).get("auroc_fracture") or {}
    return {"image_auroc": m["roc"]["fracture"], "acute_auroc": (m["roc"].get("acute") or {}),
            "grade23_auroc": grade_group_auroc(infer_dir / "predictions.csv", Path(test["manifest"]),
                                               Path(test["vertebrae"])),
            "vertebra_auroc": verts.get("auroc"), "report": str(report_dir)}


def _f(d: dict | None, key: str = "auroc") -> str:
    if not d or d.get(key) is None:
        return "n/a"
    ci = f" [{d['ci_low']:.3f}, {d['ci_high']:.3f}]" if d.get("ci_low") is not None else ""
    return f"{d[key]:.3f}{ci}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aasce", type=Path, required=True, help="the AASCE folder (not part of the repository)")
    p.add_argument("--init", type=Path, required=True, help="a phantom-trained checkpoint to fine-tune")
    p.add_argument("--mix-manifest", type=Path, default=ROOT / "runs/mix/manifest.csv",
                   help="the combined training manifest whose split = test rows are held out (make mixed-data)")
    p.add_argument("--out", type=Path, default=ROOT / "runs/synth")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--p", type=float, default=0.5, help="fracture synthesis probability of the synthesis run")
    p.add_argument("--json", type=Path, default=None, help="default OUT/synthesis_study.json")
    args = p.parse_args(argv)
    for path in (args.aasce, args.init, args.mix_manifest):
        if not path.exists():
            p.error(f"{path}: not found")
    template = yaml.safe_load(CONFIG.read_text())
    data = build_data(args.aasce, args.mix_manifest, args.out)
    result = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "data": data, "epochs": args.epochs, "runs": {}}
    for name, prob in (("synthesis", args.p), ("control", 0.0)):
        run_dir = args.out / name
        ckpt, seconds = train(run_config(template, run_dir, data, args.init, prob, args.epochs), run_dir)
        result["runs"][name] = {"fracture_synthesis": prob, "checkpoint": str(ckpt), "train_seconds": seconds,
                                **score(ckpt, data["test"], run_dir)}
    # the same films read by both: a paired test of the image-level AUROC difference
    result["paired"] = compare_aurocs(paired_frame(
        Path(result["runs"]["synthesis"]["report"]).parent / "infer_test" / "predictions.csv",
        Path(result["runs"]["control"]["report"]).parent / "infer_test" / "predictions.csv", data["test"]["manifest"]))
    atomic_write_json(args.json or args.out / "synthesis_study.json", result)
    print(f"held-out simulated-real films: {data['test']['n_images']} of {data['test']['n_patients']} patients")
    print("| run | fracture synthesis | image AUROC [95% CI] | grade 2-3 vs normal | acute vs chronic | per-vertebra AUROC |")
    print("|---|---|---|---|---|---|")
    for name, r in result["runs"].items():
        va = r["vertebra_auroc"]
        print(f"| {name} | {r['fracture_synthesis']:g} | {_f(r['image_auroc'])} | {_f(r['grade23_auroc'])} | "
              f"{_f(r['acute_auroc'])} | {'n/a' if va is None else f'{va:.3f}'} |")
    d = result["paired"].get("delong") or {}
    print(f"paired (synthesis - control): DeLong p = {d.get('p_value')}, paired patient bootstrap "
          f"p = {(result['paired'].get('paired_bootstrap') or {}).get('p_value')}")
    return result


if __name__ == "__main__":
    main()
