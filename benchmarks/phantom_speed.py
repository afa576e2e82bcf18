"""How fast the 3D phantom makes films, per CPU core.

    python -m benchmarks.phantom_speed [--size 1024] [--n 20] [--seed 0] [--no-write]

Draws ``n`` films of ``seed`` one after another on one thread (torch and OpenCV limited to one),
each written as a 16-bit PNG with its mask (as ``python -m data.phantom`` writes them), and
reports films per second per core, by view: from the process's CPU time (what one core
spends on a film, which the other jobs of a shared machine do not inflate much) and from the
wall-clock time (which they do). Writes the section "## Phantom speed" of benchmarks/RESULTS.md
unless ``--no-write``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.phantom_benchmark import machine
from benchmarks.results_file import replace_section
from data.io_utils import atomic_write_image
from data.phantom import generate_image

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Phantom speed"


def measure(size: int, n: int, seed: int) -> dict:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    generate_image(seed, n, size)  # warm-up: imports and first allocations
    times: dict[str, list[float]] = {"lateral": [], "ap": []}
    wall = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            t0, w0 = time.process_time(), time.perf_counter()
            sample = generate_image(seed, i, size)
            atomic_write_image(Path(tmp) / f"{i}.png", sample["image"])
            atomic_write_image(Path(tmp) / f"{i}_mask.png", sample["mask"])
            times[sample["meta"]["view"]].append(time.process_time() - t0)
            wall.append(time.perf_counter() - w0)
    every = [t for ts in times.values() for t in ts]
    return {"size": size, "n": n, "seed": seed, "seconds_per_film": float(np.mean(every)),
            "films_per_second_per_core": float(1.0 / np.mean(every)),
            "wall_seconds_per_film": float(np.mean(wall)), "load_average": list(os.getloadavg()),
            "by_view": {k: {"n": len(v), "seconds_per_film": float(np.mean(v)) if v else None} for k, v in times.items()}}


def write_results(r: dict, command: str) -> None:
    views = ", ".join(f"{k} {v['seconds_per_film']:.2f} s ({v['n']} films)" for k, v in r["by_view"].items() if v["n"])
    lines = [SECTION, "",
             f"- command: `{command}`",
             f"- date: {datetime.date.today().isoformat()}",
             f"- machine: {machine()}; shared with other jobs (load average {r['load_average'][0]:.1f} when measured)",
             f"- one thread (torch and OpenCV), films of {r['size']} px height drawn and written as 16-bit PNG with their masks",
             "",
             f"**{r['films_per_second_per_core']:.2f} films per second per core** "
             f"(CPU time: {r['seconds_per_film']:.2f} s per film over {r['n']} films of seed {r['seed']}; by view: {views}; "
             f"wall-clock on the loaded machine: {r['wall_seconds_per_film']:.2f} s per film). "
             "Target: 2 films per second per core at 1024 px.", ""]
    replace_section("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.phantom_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    a = p.parse_args(argv)
    r = measure(a.size, a.n, a.seed)
    print(f"{r['films_per_second_per_core']:.2f} films/s/core at {a.size} px ({r['seconds_per_film']:.3f} s CPU, "
          f"{r['wall_seconds_per_film']:.3f} s wall per film)")
    if not a.no_write:
        write_results(r, f"python -m benchmarks.phantom_speed --size {a.size} --n {a.n} --seed {a.seed}")


if __name__ == "__main__":
    main()
