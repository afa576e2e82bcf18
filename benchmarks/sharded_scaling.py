"""Throughput of sharded inference (inference/sharded.py) on the CPU with 1 and with 2 processes.

    python -m benchmarks.sharded_scaling --model runs/demo/bundle --work /tmp/sharded_bench

Phantom films (``--films`` of seed 3 at ``--size`` px) are run through ``python -m
inference.sharded --accelerator cpu --devices W`` for each configuration ``WxT`` of
``--configs``: W processes of T torch threads each (OMP_NUM_THREADS), with no loader workers, so
reading and writing run in the processes too. The default compares 1 process with 2 threads
and 2 processes with 1 thread (each gets the 2 cores) and adds 1 process with 1 thread, the
per-process baseline.

Two times per configuration, each the median of ``--repeats`` whole-process runs:
* the wall time of the whole run over all films (what a user waits, start-up included);
* the marginal time per film: (T(all films) - T(``--small`` films)) / (films - small), which
  leaves out start-up (imports, model loading, process group) and gives the throughput a long
  archive run reaches.
The section "## Sharded inference on the CPU: 1 against 2 processes" of benchmarks/RESULTS.md
is replaced (``--no-write`` leaves it).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.phantom_benchmark import machine
from data.io_utils import atomic_write_text
from data.phantom import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Sharded inference on the CPU: 1 against 2 processes"


def timed_run(model: str, films: list[Path], out: Path, processes: int, threads: int,
              batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds (all its processes) of one whole ``python -m inference.sharded`` run
    into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "inference.sharded", "--model", model, "--out", str(out),
               "--accelerator", "cpu", "--devices", str(processes), "--num-workers", "0",
               "--batch-size", str(batch_size), "--quiet", *map(str, films)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"sharded run failed ({processes} process(es)):\n{proc.stderr[-3000:]}")
    return seconds, cpu


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a bundle folder (e.g. runs/demo/bundle of `make demo`)")
    p.add_argument("--work", required=True, help="folder for the films and the outputs")
    p.add_argument("--films", type=int, default=40)
    p.add_argument("--small", type=int, default=4, help="films of the short run that measures start-up")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--configs", nargs="+", default=["1x2", "2x1", "1x1"],
                   help="PROCESSESxTHREADS each; the first is the baseline of the speed-up")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="leave benchmarks/RESULTS.md as it is")
    args = p.parse_args(argv)
    work = Path(args.work)
    data = work / f"films_{args.size}px_{args.films}"
    if not (data / "manifest.csv").is_file():
        generate_dataset(data, n=args.films, seed=3, size=args.size, workers=1, progress=False)
    films = sorted((data / "images").glob("*.png"))
    load_before = os.getloadavg()[0]
    configs = [tuple(int(n) for n in c.lower().split("x")) for c in args.configs]
    times = {c: {"whole": [], "small": []} for c in configs}
    for _ in range(args.repeats):  # configurations and long and short runs in turn, so that load changes hit all
        for processes, threads in configs:
            for kind, chosen in (("whole", films), ("small", films[:args.small])):
                times[processes, threads][kind].append(
                    timed_run(args.model, chosen, work / "out", processes, threads, args.batch_size))
    rows = []
    for processes, threads in configs:
        runs = times[processes, threads]
        t_all, t_small = (statistics.median(t for t, _ in runs[kind]) for kind in ("whole", "small"))
        cpu_all, cpu_small = (statistics.median(c for _, c in runs[kind]) for kind in ("whole", "small"))
        per_film = (t_all - t_small) / (len(films) - args.small)
        rows.append({"processes": processes, "threads": threads, "whole": t_all, "small": t_small,
                     "per_film": per_film, "films_per_second": 1.0 / per_film,
                     "cpu_per_film": (cpu_all - cpu_small) / (len(films) - args.small),
                     "all_runs": {kind: [round(t, 1) for t, _ in runs[kind]] for kind in runs}})
        print(f"{processes} process(es) x {threads} thread(s): {t_all:.1f} s for {len(films)} films, "
              f"{t_small:.1f} s for {args.small}; {per_film:.3f} s per film, {1 / per_film:.2f} films/s; "
              f"runs {rows[-1]['all_runs']}")
    result = {"rows": rows, "films": len(films), "small": args.small, "size": args.size,
              "batch_size": args.batch_size, "repeats": args.repeats, "model": args.model, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "load": (load_before, os.getloadavg()[0]),
              "command": "python -m benchmarks.sharded_scaling " + " ".join(argv if argv is not None else sys.argv[1:])}
    if not args.no_write:
        write_results(result)
    return result


def write_results(r: dict) -> None:
    base = r["rows"][0]
    lines = [
        SECTION, "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}",
        f"- machine: {r['machine']}; shared with other work (load average {r['load'][0]:.1f} at the start, "
        f"{r['load'][1]:.1f} at the end), so the times are noisy",
        f"- films: {r['films']} phantom films of seed 3 at {r['size']} px; model `{r['model']}`; batch size "
        f"{r['batch_size']}, no loader workers; each time the median of {r['repeats']} whole-process runs",
        f"- per film: (T({r['films']} films) - T({r['small']} films)) / {r['films'] - r['small']}, start-up left out; "
        "CPU s: user + system time of all the run's processes, the same difference",
        "",
        "| processes x torch threads | whole run, all films | whole run, start-up films | s per film | films / s "
        "| speed-up | CPU s per film |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['processes']} x {row['threads']} | {row['whole']:.1f} s | {row['small']:.1f} s "
                     f"| {row['per_film']:.3f} | {row['films_per_second']:.2f} "
                     f"| {base['per_film'] / row['per_film']:.2f} | {row['cpu_per_film']:.3f} |")
    lines.append("")
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n\n"
    block = "\n".join(lines)
    if SECTION in text:
        text = re.sub(re.escape(SECTION) + r".*?(?=\n## |\Z)", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(RESULTS, text.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
