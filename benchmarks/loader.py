"""The training loader alone: images per second per CPU worker, decoding the films or reading
them from the training cache (data/cache.py).

    python -m benchmarks.loader [--n 48] [--size 512] [--samples 192] [--workers 1 2] [--write]

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
import re
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.phantom_benchmark import ensure_data, machine
from data.cache import open_cache
from data.dataset import RadiographDataset, collate_skipping_failures
from data.io_utils import atomic_write_text
from data.manifest import load_manifest
from data.readers import read_image
from data.transforms import normalize_intensity

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Training loader, CPU"
IMAGE_SIZE = (384, 320)


def per_worker(dataset, samples: int, seed: int = 0) -> dict:
    """Samples per second drawn in this process (one thread), by CPU time and by wall time."""
    order = np.random.default_rng(seed).integers(0, len(dataset), samples + 8)
    for i in order[:8]:  # warm-up: first reads, lazy imports, the cache's memory maps
        dataset[int(i)]
    cpu, wall = time.process_time(), time.perf_counter()
    for i in order[8:]:
        dataset[int(i)]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"img_s_cpu": samples / cpu, "img_s_wall": samples / wall, "ms_per_img_cpu": 1000 * cpu / samples}


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


def run(args) -> dict:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    out = (ROOT / args.out).resolve()
    manifest_path = ensure_data(out / f"phantom-{args.size}", n=args.n, seed=5, size=args.size)
    manifest = load_manifest(manifest_path)
    result = {"n_films": len(manifest), "size": args.size, "samples": args.samples, "modes": {},
              "decode": decode_cost(manifest)}
    began = time.perf_counter()
    cache = open_cache(out / "cache", manifest, IMAGE_SIZE)
    result["cache_build_s_per_film"] = (time.perf_counter() - began) / len(manifest)
    result["cache_mb_per_film"] = sum(f.stat().st_size for f in cache.folder.iterdir()) / 2 ** 20 / len(manifest)
    for mode in args.modes:
        dataset = RadiographDataset(manifest, None, IMAGE_SIZE, augment=True, cache=cache if mode == "cache" else None)
        r = per_worker(dataset, args.samples)
        r["loader"] = [through_loader(dataset, w, args.batch_size, args.batches, args.pin_memory) for w in args.workers]
        result["modes"][mode] = r
        print(f"{mode}: {r['img_s_cpu']:.0f} img/s per worker by CPU time ({r['ms_per_img_cpu']:.2f} ms), "
              f"{r['img_s_wall']:.0f} by wall time; "
              + ", ".join(f"{x['workers']} worker(s): {x['img_s']:.0f} img/s" for x in r["loader"]))
    return result


def results_section(r: dict, command: str) -> str:
    d = r["decode"]
    lines = [
        SECTION, "",
        f"The training loader alone (`data/dataset.py`), on {r['n_films']} phantom films "
        f"({d['film_hw'][0]} x {d['film_hw'][1]} px, 16-bit PNG) at the default training input: "
        f"384 x 320 film and up to six 96 px crops, augmented.",
        "",
        f"- command: `{command}`",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine()}; shared with other jobs while measured, so per-worker figures are "
        f"by the process's CPU time (wall time beside them)",
        "",
        "| mode | img/s per worker (CPU time) | ms per image | img/s per worker (wall) | "
        + " | ".join(f"DataLoader, {x['workers']} worker(s), img/s" for x in next(iter(r["modes"].values()))["loader"])
        + " |",
        "|---|---|---|---|" + "---|" * len(next(iter(r["modes"].values()))["loader"]),
    ]
    names = {"decode": "decode each film (PNG, normalise, letterbox)", "cache": "training cache (`data.cache_dir`)"}
    for mode, m in r["modes"].items():
        lines.append(f"| {names.get(mode, mode)} | {m['img_s_cpu']:.0f} | {m['ms_per_img_cpu']:.2f} | "
                     f"{m['img_s_wall']:.0f} | " + " | ".join(f"{x['img_s']:.0f}" for x in m["loader"]) + " |")
    lines += [
        "",
        f"Decoding a film costs {d['read_ms']:.1f} ms and normalising it {d['normalise_ms']:.1f} ms of CPU time; "
        f"the cache is built once, in {r['cache_build_s_per_film'] * 1000:.0f} ms per film "
        f"({r['cache_mb_per_film']:.2f} MB per film on disk).",
    ]
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n\n"
    if SECTION in text:
        text = re.sub(re.escape(SECTION) + r".*?(?=\n## |\Z)", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(RESULTS, text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48, help="phantom films")
    p.add_argument("--size", type=int, default=512, help="phantom film height in pixels")
    p.add_argument("--samples", type=int, default=192, help="samples timed per mode in this process")
    p.add_argument("--batches", type=int, default=12, help="batches timed per DataLoader")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to time")
    p.add_argument("--pin-memory", action="store_true")
    p.add_argument("--modes", nargs="+", choices=("decode", "cache"), default=["decode", "cache"])
    p.add_argument("--out", default="benchmarks/out/loader", help="phantom films and the cache")
    p.add_argument("--write", action="store_true", help="replace the section of benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    r = run(args)
    if args.write:
        command = "python -m benchmarks.loader " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        write_results(results_section(r, command.strip()))
    return r


if __name__ == "__main__":
    main()
