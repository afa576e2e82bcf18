"""The GPU figures in one prepared run (about 8 minutes on one H100), in order of priority:

1. training with the GPU recipe (configs/gpu.yaml: the training cache, 16 workers, bf16,
   channels-last, compile): images per second, GPU utilisation and the time of an epoch, and
   the loader alone on the device's CPU cores;
2. the model's appetite with each of bf16, channels-last and compile on and off: images per
   second of training steps on one real batch kept on the GPU (no loader);
3. inference: films per second at batch 32, whole runs of ``infer.py``'s pipeline, with the
   time of reading and of the networks named.

    python -m benchmarks.gpu_check [--out DIR] [--budget 540]       # on the device
    python -m benchmarks.gpu_check --quick                           # a few minutes on the CPU: the script runs
    python -m benchmarks.gpu_check --results-from DIR/gpu_check.json # RESULTS.md's section from a device run

Results go to ``OUT/gpu_check.json`` after every stage (``$OUT`` on the device, else
``--out``), so that a run cut short keeps what it measured; a stage that would overrun
``--budget`` seconds is skipped and says so. On the device, packages its image lacks travel
as wheels: see ``benchmarks/gpu_check.sh``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

import train
from benchmarks.loader import per_worker, through_loader
from benchmarks.results_file import replace_section
from data.cache import open_cache
from data.dataset import RadiographDataset, collate_skipping_failures
from data.io_utils import atomic_write_json, atomic_write_text
from data.manifest import load_manifest
from data.phantom import generate_dataset
from inference.pipeline import run_inference
from inference.predictor import InferenceDataset, Predictor, collate_items
from training.export import export_checkpoint
from training.system import FractureSystem

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## GPU: training throughput, utilisation and inference"
COMMAND = "bash benchmarks/gpu_check.sh"
FULL = {"n_train": 2048, "n_test": 256, "size": 512, "image_size": [384, 320], "fpn_dim": 96, "batch_size": 64,
        "workers": 16, "epochs": 3, "steps": 20, "infer_batch": 32, "infer_workers": 8, "compile": True,
        "accelerator": "gpu", "device": "cuda"}
QUICK = {"n_train": 16, "n_test": 4, "size": 128, "image_size": [64, 48], "fpn_dim": 16, "batch_size": 4,
         "workers": 2, "epochs": 1, "steps": 2, "infer_batch": 2, "infer_workers": 0, "compile": "eager",
         "accelerator": "cpu", "device": "cpu"}
# the five settings of the option study: each option's effect is one step between two of them
OPTION_SETTINGS = [
    {"bf16": False, "channels_last": False, "compile": False},
    {"bf16": True, "channels_last": False, "compile": False},
    {"bf16": True, "channels_last": True, "compile": False},
    {"bf16": True, "channels_last": True, "compile": True},
    {"bf16": True, "channels_last": False, "compile": True},
]


class EpochClock(L.Callback):
    """Records each training epoch's wall-clock span and images in ``epochs``."""

    def __init__(self):
        self.epochs: list[dict] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._images = time.time(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch.get("image", ()))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.epochs.append({"start": self._start, "end": time.time(), "images": self._images})


class GpuSampler:
    """Samples the GPU's utilisation (%) and memory (MiB) every ``period`` seconds with nvidia-smi."""

    def __init__(self, period: float = 0.25):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                util, mem = (float(v) for v in out.stdout.splitlines()[0].split(","))
                self.samples.append((time.time(), util, mem))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return  # no nvidia-smi (the CPU check): no samples
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def between(self, start: float, end: float) -> dict | None:
        picked = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not picked:
            return None
        util = np.array([u for u, _ in picked])
        return {"utilisation_mean": float(util.mean()), "utilisation_median": float(np.median(util)),
                "memory_mib_max": float(max(m for _, m in picked)), "samples": len(picked)}


class Run:
    """The results so far, saved after every stage, and the time left."""

    def __init__(self, out: Path, budget: float, settings: dict):
        self.out, self.deadline, self.settings = out, time.time() + budget, settings
        self.results = {"settings": settings, "environment": environment(), "skipped": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def stage(self, name: str, need: float, fn) -> None:
        if self.left() < need:
            self.results["skipped"][name] = f"{self.left():.0f} s left, about {need:.0f} s needed"
            print(f"[gpu_check] skipped {name}: {self.results['skipped'][name]}", flush=True)
        else:
            began = time.time()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                self.results[name] = fn()
            except Exception as exc:  # one broken stage must not cost the others
                self.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            self.results.setdefault("stage_seconds", {})[name] = round(time.time() - began, 1)
            print(f"[gpu_check] {name}: {json.dumps(self.results[name])[:600]}", flush=True)
        atomic_write_json(self.out / "gpu_check.json", self.results)


def environment() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "lightning": L.__version__, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def make_data(work: Path, s: dict) -> dict:
    began = time.time()
    workers = os.cpu_count() or 1
    train = generate_dataset(work / "train", n=s["n_train"], seed=1, size=s["size"], workers=workers, progress=False)
    test = generate_dataset(work / "test", n=s["n_test"], seed=1000, size=s["size"], workers=workers, progress=False)
    generated = time.time() - began
    began = time.time()
    open_cache(work / "cache", load_manifest(train / "manifest.csv"), tuple(s["image_size"]), workers=workers)
    return {"train_manifest": str(train / "manifest.csv"), "test_manifest": str(test / "manifest.csv"),
            "phantom_seconds": round(generated, 1), "cache_seconds": round(time.time() - began, 1)}


def loader_alone(work: Path, s: dict, data: dict) -> dict:
    """The training loader on the device's CPU cores, with the cache: per worker and with all workers."""
    manifest = load_manifest(data["train_manifest"])
    size = tuple(s["image_size"])
    ds = RadiographDataset(manifest, None, size, augment=True, cache=open_cache(work / "cache", manifest, size))
    torch.set_num_threads(1)
    one = per_worker(ds, 64 if s is FULL else 8)
    torch.set_num_threads(os.cpu_count() or 1)
    many = through_loader(ds, s["workers"], s["batch_size"], 12 if s is FULL else 2, pin_memory=s is FULL)
    return {"per_worker_img_s_cpu": one["img_s_cpu"], "workers": s["workers"], "img_s_all_workers": many["img_s"]}


def fit(work: Path, s: dict, data: dict) -> dict:
    """Train with configs/gpu.yaml for ``epochs`` epochs; the last epoch's figures."""
    root = work / "fit"
    args = ["fit", "--config", str(ROOT / "configs" / "gpu.yaml"), "--data.manifest", data["train_manifest"],
            "--data.cache_dir", str(work / "cache"), "--data.num_workers", str(s["workers"]),
            "--data.batch_size", str(s["batch_size"]), "--data.image_size", json.dumps(s["image_size"]),
            "--model.fpn_dim", str(s["fpn_dim"]), "--model.compile", str(s["compile"]).lower(),
            "--trainer.accelerator", s["accelerator"], "--trainer.max_epochs", str(s["epochs"]),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=benchmarks.gpu_check.EpochClock"]
    if s is QUICK:
        args += ["--trainer.limit_val_batches", "2", "--data.pin_memory", "false"]
    began = time.time()
    with GpuSampler() as sampler:
        cli = train.main(args)
    # the CLI made its own instance (of this module imported by name, not of __main__)
    epochs = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EpochClock").epochs
    last = epochs[-1]
    seconds = last["end"] - last["start"]
    ckpt = Path(cli.trainer.checkpoint_callback.dirpath) if cli.trainer.checkpoint_callback else None
    return {"epochs": [{"seconds": round(e["end"] - e["start"], 2), "images": e["images"],
                        "img_s": e["images"] / max(e["end"] - e["start"], 1e-9)} for e in epochs],
            "last_epoch_img_s": last["images"] / max(seconds, 1e-9), "last_epoch_seconds": round(seconds, 2),
            "gpu": sampler.between(last["start"], last["end"]), "whole_fit_seconds": round(time.time() - began, 1),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None,
            "checkpoint": str(ckpt / "last.ckpt") if ckpt else None}


def one_batch(data: dict, s: dict) -> dict:
    manifest = load_manifest(data["train_manifest"])
    ds = RadiographDataset(manifest, None, tuple(s["image_size"]), augment=True)
    torch.manual_seed(0)
    return collate_skipping_failures([ds[i % len(ds)] for i in range(s["batch_size"])])


def appetite(data: dict, s: dict) -> list[dict]:
    """Training steps per second on one real batch kept on the device, for each option setting."""
    device = torch.device(s["device"])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in one_batch(data, s).items()}
    rows = []
    for setting in OPTION_SETTINGS:
        torch._dynamo.reset()
        torch.manual_seed(0)
        compile_as = s["compile"] if setting["compile"] else False
        system = FractureSystem(fpn_dim=s["fpn_dim"], image_size=tuple(s["image_size"]),
                                channels_last=setting["channels_last"], compile=compile_as).to(device).train()
        system.configure_model()
        opt = torch.optim.AdamW(system.parameters(), lr=1e-4)
        began = time.time()
        for _ in range(3):  # warm-up, compilation included
            training_step(system, opt, batch, setting["bf16"])
        sync(device)
        warm = time.time() - began
        began = time.time()
        for _ in range(s["steps"]):
            training_step(system, opt, batch, setting["bf16"])
        sync(device)
        seconds = time.time() - began
        rows.append({**setting, "img_s": s["batch_size"] * s["steps"] / seconds, "warmup_seconds": round(warm, 1)})
        print(f"[gpu_check]   {setting}: {rows[-1]['img_s']:.0f} img/s", flush=True)
    return rows


def training_step(system, opt, batch: dict, bf16: bool) -> None:
    """What Lightning's step does for this model: losses under autocast, backward, optimiser step."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(batch["image"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = system.batch_losses(batch)["loss"]
    loss.backward()
    opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def inference(work: Path, s: dict, data: dict, checkpoint: str | None) -> dict:
    """Films per second at batch ``infer_batch``: the film network alone (prepared inputs), the
    predictor (film network and per-vertebra analysis, prepared inputs), and whole pipeline runs."""
    if not checkpoint or not Path(checkpoint).is_file():
        raise RuntimeError(f"no fitted checkpoint to infer with ({checkpoint}): the fit stage did not finish")
    bundle = export_checkpoint(checkpoint, work / "bundle", overwrite=True)
    device = s["device"]
    predictor = Predictor(bundle, device=device)
    films = sorted(str(p) for p in (Path(data["test_manifest"]).parent / "images").glob("*.png"))
    ds = InferenceDataset(films, predictor.image_size)
    began = time.time()
    items = [ds[i] for i in range(len(ds))]
    read_s = time.time() - began
    b = s["infer_batch"]
    batches = [collate_items(items[k:k + b]) for k in range(0, len(items), b)]
    x = torch.stack([it["image"] for it in batches[0]]).to(device)
    with torch.no_grad():
        for _ in range(3):
            predictor.net(x)
        sync(torch.device(device))
        began = time.time()
        for _ in range(10):
            predictor.net(x)
        sync(torch.device(device))
    net_s = (time.time() - began) / (10 * len(x))
    predictor.predict(batches[0])  # warm-up
    began = time.time()
    for batch in batches:
        predictor.predict(batch)
    sync(torch.device(device))
    predict_s = (time.time() - began) / len(items)
    runs = {}
    for workers in sorted({0, s["infer_workers"]}):
        out = work / f"infer_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        # every film through every stage (the no-spine rule off): a throughput, whatever the model finds
        summary = run_inference(predictor, films, out, batch_size=b, num_workers=workers, progress=False,
                                min_spine_score=0.0)
        runs[f"workers_{workers}"] = {"films_s": summary.n_ok / summary.seconds, "seconds": round(summary.seconds, 2),
                                      "n_ok": summary.n_ok}
    return {"films": len(items), "batch": b, "film_network_films_s": 1 / net_s, "predictor_films_s": 1 / predict_s,
            "reading_ms_per_film_one_process": 1000 * read_s / len(items), "pipeline": runs}


def rate(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def results_section(r: dict) -> str:
    env, s = r["environment"], r["settings"]
    lines = [SECTION, "",
             f"- command: `{COMMAND}` (on the device: {env.get('gpu')}, {env.get('cpus')} CPU cores, torch "
             f"{env.get('torch')}, Python {env.get('python')})",
             f"- date: {env.get('date')}",
             f"- data: {s['n_train']} phantom training films and {s['n_test']} test films, {s['size']} px, "
             f"input {s['image_size'][0]} x {s['image_size'][1]}, batch {s['batch_size']}", ""]
    f = r.get("fit") or {}
    if "last_epoch_img_s" in f:
        gpu = f.get("gpu") or {}
        lines += ["| training with configs/gpu.yaml (last epoch) | value |", "|---|---|",
                  f"| images per second | {rate(f['last_epoch_img_s'])} |",
                  f"| epoch time | {f['last_epoch_seconds']:.1f} s |",
                  f"| GPU utilisation, mean (median) | {gpu.get('utilisation_mean', float('nan')):.0f} % "
                  f"({gpu.get('utilisation_median', float('nan')):.0f} %) |",
                  f"| peak GPU memory (PyTorch) | {f.get('peak_memory_gib') or float('nan'):.1f} GiB |"]
    la = r.get("loader") or {}
    if "img_s_all_workers" in la:
        lines.append(f"| the loader alone: per worker (CPU time) / {la['workers']} workers | "
                     f"{la['per_worker_img_s_cpu']:.0f} / {la['img_s_all_workers']:.0f} img/s |")
    rows = r.get("options") or []
    if isinstance(rows, list) and rows:
        lines += ["", "| bf16 | channels_last | compile | training img/s (one batch on the GPU) | warm-up |",
                  "|---|---|---|---|---|"]
        lines += [f"| {'on' if x['bf16'] else 'off'} | {'on' if x['channels_last'] else 'off'} | "
                  f"{'on' if x['compile'] else 'off'} | {rate(x['img_s'])} | {x['warmup_seconds']:.0f} s |" for x in rows]
    inf = r.get("inference") or {}
    if "predictor_films_s" in inf:
        lines += ["", f"| inference, batch {inf['batch']} | films/s |", "|---|---|",
                  f"| film network alone | {inf['film_network_films_s']:.0f} |",
                  f"| predictor (film network + per-vertebra analysis) | {inf['predictor_films_s']:.0f} |"]
        lines += [f"| whole pipeline, {k.replace('_', ' ')} (reading, overlays, JSON, CSV) | {v['films_s']:.1f} |"
                  for k, v in inf["pipeline"].items()]
        lines.append(f"| reading and preparing a film, one process | {inf['reading_ms_per_film_one_process']:.1f} ms |")
    for name, why in (r.get("skipped") or {}).items():
        lines.append(f"\n{name}: skipped ({why}).")
    for name in ("data", "loader", "fit", "options", "inference"):
        if isinstance(r.get(name), dict) and "error" in r[name]:
            lines.append(f"\n{name}: failed ({r[name]['error']}).")
    return "\n".join(lines) + "\n"

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/out/gpu_check",
                   help="where gpu_check.json goes (default $OUT, else benchmarks/out/gpu_check)")
    p.add_argument("--work", default=None, help="data, cache and runs (default: a folder beside --out)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds; later stages are skipped past it")
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU: checks that the script runs")
    p.add_argument("--results-from", default=None, help="write RESULTS.md's section from this gpu_check.json")
    args = p.parse_args(argv)
    if args.results_from:
        replace_section(results_section(json.loads(Path(args.results_from).read_text())))
        print(f"wrote the section '{SECTION}' of {RESULTS}")
        return 0
    settings = QUICK if args.quick else FULL
    if not args.quick and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run on the device, or --quick for a check on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.parent / f"{out.name}_work"
    run = Run(out, args.budget, settings)
    torch.backends.cudnn.benchmark = True
    run.stage("data", 5, lambda: make_data(work, settings))
    data = run.results.get("data") or {}
    if "error" in data or "train_manifest" not in data:
        return 1
    run.stage("loader", 30, lambda: loader_alone(work, settings, data))
    run.stage("fit", 150, lambda: fit(work, settings, data))
    run.stage("options", 150, lambda: appetite(data, settings))
    checkpoint = (run.results.get("fit") or {}).get("checkpoint")
    run.stage("inference", 45, lambda: inference(work, settings, data, checkpoint))
    section = results_section(run.results)
    atomic_write_text(out / "gpu_check.md", section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
