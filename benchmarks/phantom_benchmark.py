"""Phantom benchmark: train the default config, test on a phantom set of an unseen seed.

    python -m benchmarks.phantom_benchmark [--n-train 2500] [--n-test 400] [--epochs 16] [--extra "--trainer.precision bf16-mixed"]

The trained checkpoint is exported as a model bundle (``OUT/RUN/bundle``), and the test films
are read through that bundle, as a user would. Reports image-level AUROC for fracture and for
acute vs chronic (fractured images), AUROC by Genant grade, the heatmap pointing game, the
per-vertebra results, training images per second and inference seconds per image, and writes
them to benchmarks/RESULTS.md with the command, machine, date and bundle id.
Synthetic data: these numbers measure the code on the phantom, not clinical performance.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.results_file import replace_section
from data.io_utils import atomic_write_text
from data.phantom import generate_dataset
from evaluation import metrics

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Phantom benchmark, default config with the vertebra stage"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu_name()}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def ensure_data(path: Path, n: int, seed: int, size: int) -> Path:
    info = path / "phantom.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        if (meta["n"], meta["seed"], meta["size"]) == (n, seed, size):
            return path / "manifest.csv"
    generate_dataset(path, n=n, seed=seed, size=size)
    return path / "manifest.csv"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=2500)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="phantom image height")
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--test-seed", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/out/phantom")
    p.add_argument("--config", default="configs/phantom.yaml")
    p.add_argument("--extra", default="", help="extra train.py arguments, e.g. '--trainer.precision bf16-mixed'")
    p.add_argument("--run-name", default="run", help="sub-folder of --out for this run (runs share the data)")
    p.add_argument("--section", default=SECTION, help="RESULTS.md heading to write or replace")
    p.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    p.add_argument("--skip-train", action="store_true",
                   help="re-test the run's best.ckpt; the training time comes from its earlier result JSON")
    args = p.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.phantom_benchmark " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    test_manifest = ensure_data(out / "data" / "test", args.n_test, args.test_seed, args.size)
    run = out / args.run_name
    py = sys.executable
    earlier = out / f"result_{args.run_name}.json"
    if args.skip_train:
        # the training record (data, epochs, time) is the earlier run's; nothing is regenerated
        if not (run / "best.ckpt").is_file() or not earlier.is_file():
            raise SystemExit(f"--skip-train needs {run / 'best.ckpt'} and {earlier} from an earlier run")
        previous = json.loads(earlier.read_text())
        train_record = previous["train"]
        command = previous["command"] + "  (re-tested: " + command + ")"
    else:
        train_manifest = ensure_data(out / "data" / "train", args.n_train, args.train_seed, args.size)
        cfg = yaml.safe_load((ROOT / args.config).read_text())
        cfg["trainer"]["max_epochs"] = args.epochs
        cfg["trainer"]["default_root_dir"] = str(run)
        cfg["trainer"]["enable_progress_bar"] = False
        cfg["trainer"]["logger"][0]["init_args"]["save_dir"] = str(run)
        for cb in cfg["trainer"]["callbacks"]:
            if cb["class_path"].endswith("ModelCheckpoint"):
                cb["init_args"]["dirpath"] = str(run)
        cfg["data"]["manifest"] = str(train_manifest)
        cfg_path = out / f"config_{args.run_name}.yaml"
        atomic_write_text(cfg_path, yaml.safe_dump(cfg))
        t0 = time.time()
        subprocess.run([py, "train.py", "fit", "--config", str(cfg_path), *shlex.split(args.extra)], cwd=ROOT,
                       check=True)
        fit_seconds = time.time() - t0
        n_train_seen = len(open(train_manifest).readlines()) - 1
        n_train_split = round(n_train_seen * (1 - cfg["data"].get("val_fraction", 0.15)))
        train_ips = n_train_split * args.epochs / fit_seconds  # includes validation and loading
        train_record = {"n_images": args.n_train, "seed": args.train_seed, "epochs": args.epochs,
                        "fit_seconds": round(fit_seconds, 1), "train_images_per_second": round(train_ips, 2)}

    bundle = run / "bundle"
    subprocess.run([py, "-m", "training.export", "--checkpoint", str(run / "best.ckpt"), "--out", str(bundle),
                    "--name", f"phantom-benchmark-{args.run_name}", "--overwrite"], cwd=ROOT, check=True)
    bundle_id = json.loads((bundle / "metadata.json").read_text())["id"]
    infer_dir = out / f"infer_{args.run_name}"
    t0 = time.time()
    subprocess.run([py, "infer.py", "--model", str(bundle), "--out", str(infer_dir),
                    "--quiet", str(test_manifest)], cwd=ROOT, check=True)
    infer_seconds = time.time() - t0
    n_test = args.n_test
    summary = metrics.summarise(infer_dir / "predictions.csv", test_manifest, test_manifest.parent / "vertebrae.csv",
                                infer_dir)
    result = {
        "command": command,
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "train": train_record,
        "test": {"n_images": n_test, "seed": args.test_seed},
        "bundle": {"path": str(bundle.relative_to(ROOT)) if bundle.is_relative_to(ROOT) else str(bundle),
                   "id": bundle_id},
        "inference_seconds_per_image": round(infer_seconds / n_test, 4),
        "metrics": summary,
    }
    atomic_write_text(out / f"result_{args.run_name}.json", json.dumps(result, indent=2))
    if not args.no_write:
        write_results(result, args.section)
    print(json.dumps({k: result[k] for k in ("train", "inference_seconds_per_image")}, indent=2))
    print(json.dumps({k: summary[k] for k in ("auroc_fracture", "auroc_acute", "by_grade", "pointing_game")}, indent=2))
    return result


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def write_results(r: dict, section: str = SECTION) -> None:
    m = r["metrics"]
    grades = m.get("by_grade") or {}
    pg = m.get("pointing_game") or {}
    lines = [
        section, "",
        "Synthetic phantom films only (data/phantom.py): these numbers measure the code on its own",
        "phantom, not performance on patients.", "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}",
        f"- machine: {r['machine']}",
        f"- training: {r['train']['n_images']} phantom films (seed {r['train']['seed']}; 85 % train, 15 % val), "
        f"{r['train']['epochs']} epochs, {r['train']['fit_seconds']:.0f} s",
        f"- test: {r['test']['n_images']} phantom films of seed {r['test']['seed']} (never used in training)",
        *([f"- model: bundle `{r['bundle']['path']}`, id `{r['bundle']['id']}` (not shipped: benchmark output)"]
          if r.get("bundle") else []),
        "",
        "| metric | value | target |", "|---|---|---|",
        f"| fracture AUROC (image) | {_f(m['auroc_fracture'])} | >= 0.95 |",
        f"| acute vs chronic AUROC (fractured images, p_acute) | {_f(m['auroc_acute'])} | >= 0.90 |",
    ]
    if m.get("auroc_acute_given_fracture") is not None:
        lines.append(f"| acute vs chronic AUROC (p_acute_given_fracture) | {_f(m['auroc_acute_given_fracture'])} | |")
    for g in ("1", "2", "3"):
        if g in grades:
            d = grades[g]
            lines.append(f"| fracture AUROC, max grade {g} vs normal (n = {d.get('n_pos')} / {d.get('n_neg')}) "
                         f"| {_f(d.get('auroc'))} | |")
    lines += [
        f"| heatmap pointing game ({pg.get('hits')}/{pg.get('n')}) | {_f(pg.get('score'))} | >= 0.80 |",
    ]
    head = m.get("pointing_game_head")
    if head:
        lines.append(f"| pointing game of the dense head alone ({head.get('hits')}/{head.get('n')}) "
                     f"| {_f(head.get('score'))} | |")
    lines += [
        f"| training images / s (incl. validation and loading) | {r['train']['train_images_per_second']:.2f} | |",
        f"| inference s / image (incl. reading and writing outputs) | {r['inference_seconds_per_image']:.3f} | |",
        "",
    ]
    replace_section("\n".join(lines))


if __name__ == "__main__":
    main()
