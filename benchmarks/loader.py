"""The training loader alone: images per second per CPU worker, decoding the films or reading
them from the training cache (data/cache.py).

    python -m benchmarks.loader [--n 48] [--sizes 512 1024] [--samples 192] [--workers 1 2] [--write]

Phantom films (data/phantom.py, seed 5; generated under ``--out`` once) go through the training
dataset as the default config trains on them: 384 x 320 film input and up to six 96 px crops,
augmented. Two measures per mode:

* **per worker**: samples drawn in this process, one thread (torch and OpenCV), timed by the
  process's CPU time (and by the wall clock beside it): what one DataLoader worker delivers on a
  core of its own, whatever else the machine runs;
* **DataLoader**: batches of ``--batch-size`` through a DataLoader with ``--workers`` worker
  processes (collation and the transfer between processes included), timed by the wall clock
  after the first batch; on a shared machine this is bounded by the cores it gets.

``--write`` replaces the section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.phantom_benchmark import ensure_data, machine
from benchmarks.results_file import replace_section
from data.cache import cache_folder, open_cache
from data.dataset import RadiographDataset, collate_skipping_failures
from data.manifest import load_manifest
from data.readers import read_image
from data.transforms import normalize_intensity

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Training loader, CPU"
IMAGE_SIZE = (384, 320)
TARGET = 250  # images per second per worker: enough that 16 workers feed a GPU training this model


def per_worker(dataset, samples: int, seed: int = 0, repeats: int = 1) -> dict:
    """Samples per second drawn in this process (one thread), by CPU time and by wall time: the
    median of ``repeats`` passes over ``samples`` random samples."""
    order = np.random.default_rng(seed).integers(0, len(dataset), samples + 8)
    for i in order[:8]:  # warm-up: first reads, lazy imports, the cache's memory maps
        dataset[int(i)]
    passes = []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        for i in order[8:]:
            dataset[int(i)]
        passes.append((time.process_time() - cpu, time.perf_counter() - wall))
    cpu, wall = (float(np.median([p[k] for p in passes])) for k in (0, 1))
    return {"img_s_cpu": samples / cpu, "img_s_wall": samples / wall, "ms_per_img_cpu": 1000 * cpu / samples,
            "repeats": repeats}


def through_loader(dataset, workers: int, batch_size: int, batches: int, pin_memory: bool) -> dict:
    """Images per second through a DataLoader with ``workers`` processes, after its first batch."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_skipping_failures, pin_memory=pin_memory,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["image"])
    wall = time.perf_counter() - start
    return {"workers": workers, "img_s": n / wall, "img_s_per_worker": n / wall / max(workers, 1)}


# the per-worker measure for an earlier checkout of the project (``--baseline``), by its own code
BASELINE_CODE = """
import json, sys, time
import cv2, numpy as np, torch
from data.dataset import RadiographDataset
from data.manifest import load_manifest
torch.set_num_threads(1)
cv2.setNumThreads(1)
manifest, samples, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ds = RadiographDataset(load_manifest(manifest), None, (384, 320), augment=True)
order = np.random.default_rng(0).integers(0, len(ds), samples + 8)
for i in order[:8]:
    ds[int(i)]
passes = []
for _ in range(repeats):
    cpu = time.process_time()
    for i in order[8:]:
        ds[int(i)]
    passes.append(time.process_time() - cpu)
print(json.dumps({"img_s_cpu": samples / float(np.median(passes))}))
"""


def baseline_rate(checkout: Path, manifest: Path, samples: int, repeats: int) -> float:
    """Images per second per worker (CPU time) of the loader of another checkout, decoding."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", BASELINE_CODE, str(manifest), str(samples), str(repeats)],
                         cwd=checkout, env=env, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["img_s_cpu"])


def decode_cost(manifest, films: int = 16) -> dict:
    """CPU milliseconds per film of reading (decoding) and of normalising the full film."""
    paths = list(manifest.images["image"])[:films]
    t = time.process_time()
    pixels = [read_image(p).pixels for p in paths]
    read = time.process_time() - t
    t = time.process_time()
    for p in pixels:
        normalize_intensity(p)
    norm = time.process_time() - t
    return {"read_ms": 1000 * read / len(paths), "normalise_ms": 1000 * norm / len(paths),
            "film_hw": list(pixels[0].shape)}


def run_size(args, out: Path, size: int) -> dict:
    manifest_path = ensure_data(out / f"phantom-{size}", n=args.n, seed=5, size=size)
    manifest = load_manifest(manifest_path)
    result = {"n_films": len(manifest), "size": size, "modes": {}, "decode": decode_cost(manifest)}
    cache = None
    if "cache" in args.modes:
        shutil.rmtree(cache_folder(out / "cache", manifest_path), ignore_errors=True)  # time a fresh build
        began = time.perf_counter()
        cache = open_cache(out / "cache", manifest, IMAGE_SIZE)
        result["cache_build_s_per_film"] = (time.perf_counter() - began) / len(manifest)
        result["cache_mb_per_film"] = sum(f.stat().st_size for f in cache.folder.iterdir()) / 2 ** 20 / len(manifest)
    if args.baseline:
        rate = baseline_rate(Path(args.baseline).resolve(), manifest_path, args.samples, args.repeats)
        result["baseline_img_s_cpu"] = rate
        print(f"{size} px, baseline {args.baseline}: {rate:.0f} img/s per worker by CPU time")
    for mode in args.modes:
        dataset = RadiographDataset(manifest, None, IMAGE_SIZE, augment=True, cache=cache if mode == "cache" else None)
        r = per_worker(dataset, args.samples, repeats=args.repeats)
        r["loader"] = [through_loader(dataset, w, args.batch_size, args.batches, args.pin_memory) for w in args.workers]
        result["modes"][mode] = r
        print(f"{size} px, {mode}: {r['img_s_cpu']:.0f} img/s per worker by CPU time ({r['ms_per_img_cpu']:.2f} ms), "
              f"{r['img_s_wall']:.0f} by wall time; "
              + ", ".join(f"{x['workers']} worker(s): {x['img_s']:.0f} img/s" for x in r["loader"]))
    return result


def run(args) -> dict:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    out = (ROOT / args.out).resolve()
    before = os.getloadavg()[0]
    sizes = [run_size(args, out, size) for size in args.sizes]
    return {"samples": args.samples, "repeats": args.repeats, "workers": args.workers, "sizes": sizes,
            "load": [before, os.getloadavg()[0]], "baseline": args.baseline_name or args.baseline}


def results_section(r: dict, command: str) -> str:
    lines = [
        SECTION, "",
        "The training loader alone (`data/dataset.py`) at the default training input (384 x 320 film and up "
        "to six 96 px crops, augmented), on phantom films (16-bit PNG, seed 5) of the sizes below.",
        "",
        f"- command: `{command}`",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine()}; shared with other jobs while measured (1-minute load average "
        f"{r['load'][0]:.1f} before, {r['load'][1]:.1f} after), so "
        f"per-worker figures are by the process's CPU time, the median of {r['repeats']} passes of "
        f"{r['samples']} samples (wall time beside them); the DataLoader figures are wall time, bounded by "
        f"the share of the 2 cores the run got",
        "",
        "| films | mode | img/s per worker (CPU time) | ms per image | img/s per worker (wall) | "
        + " | ".join(f"DataLoader, {w} worker(s), img/s" for w in r["workers"]) + " |",
        "|---|---|---|---|---|" + "---|" * len(r["workers"]),
    ]
    names = {"decode": "decode each film (PNG, normalise, letterbox)", "cache": "training cache (`data.cache_dir`)"}
    notes = []
    for size in r["sizes"]:
        d = size["decode"]
        films = f"{size['n_films']} x {d['film_hw'][0]} x {d['film_hw'][1]} px"
        if "baseline_img_s_cpu" in size:
            lines.append(f"| {films} | before: decode each film, the loader of {r['baseline']} | "
                         f"{size['baseline_img_s_cpu']:.0f} | {1000 / size['baseline_img_s_cpu']:.2f} | | "
                         + " | ".join("" for _ in r["workers"]) + " |")
        for mode, m in size["modes"].items():
            lines.append(f"| {films} | {names.get(mode, mode)} | {m['img_s_cpu']:.0f} | {m['ms_per_img_cpu']:.2f} | "
                         f"{m['img_s_wall']:.0f} | " + " | ".join(f"{x['img_s']:.0f}" for x in m["loader"]) + " |")
        note = (f"{d['film_hw'][0]} x {d['film_hw'][1]} px: decoding a film costs {d['read_ms']:.1f} ms and "
                f"normalising it {d['normalise_ms']:.1f} ms of CPU time")
        if "cache_build_s_per_film" in size:
            note += (f"; the cache is built once, in {size['cache_build_s_per_film'] * 1000:.0f} ms per film "
                     f"({size['cache_mb_per_film']:.2f} MB per film on disk)")
        if "baseline_img_s_cpu" in size and "cache" in size["modes"]:
            note += (f"; with the cache a worker delivers "
                     f"{size['modes']['cache']['img_s_cpu'] / size['baseline_img_s_cpu']:.1f}x the images per second "
                     f"of the loader before")
        notes.append(f"- {note}.")
    met = all(s["modes"]["cache"]["img_s_cpu"] >= TARGET for s in r["sizes"] if "cache" in s["modes"])
    closing = [
        "", f"Target: {TARGET} images per second per worker; {'met' if met else 'not met'} on this machine's CPU "
        "time. The DataLoader columns are not per-worker capacity: on 2 cores shared with other jobs a second "
        "worker competes with the first and with the process that receives the batches. What a worker delivers "
        "with a core of its own, and whether 16 of them keep a GPU fed, is measured on the device (next section)."]
    return "\n".join(lines + [""] + notes + closing) + "\n"

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48, help="phantom films")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="phantom film heights in pixels")
    p.add_argument("--samples", type=int, default=192, help="samples timed per mode in this process")
    p.add_argument("--repeats", type=int, default=3, help="passes per mode; the median is reported")
    p.add_argument("--batches", type=int, default=12, help="batches timed per DataLoader")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to time")
    p.add_argument("--pin-memory", action="store_true")
    p.add_argument("--modes", nargs="+", choices=("decode", "cache"), default=["decode", "cache"])
    p.add_argument("--out", default="benchmarks/out/loader", help="phantom films and the cache")
    p.add_argument("--baseline", default=None,
                   help="a checkout of an earlier version (e.g. `git worktree add /tmp/before COMMIT`): its loader, "
                        "decoding, is measured on the same films for comparison")
    p.add_argument("--baseline-name", default=None, help="how RESULTS.md names the baseline (default its path)")
    p.add_argument("--write", action="store_true", help="replace the section of benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    r = run(args)
    if args.write:
        command = "python -m benchmarks.loader " + shlex.join(argv if argv is not None else sys.argv[1:])
        replace_section(results_section(r, command.strip()))
    return r


if __name__ == "__main__":
    main()
