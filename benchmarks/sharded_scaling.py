"""Throughput of sharded inference (inference/sharded.py) on the CPU with 1 and with 2 processes.

    python -m benchmarks.sharded_scaling --model runs/demo/bundle --work /tmp/sharded_bench

Phantom films (``--films`` of seed 3 at ``--size`` px) are run through ``python -m
inference.sharded --accelerator cpu --devices W`` for each configuration ``WxT`` of
``--configs``: W processes of T torch threads each (OMP_NUM_THREADS), with no loader workers, so
reading and writing run in the ranks too. The default compares 1 process with 2 threads and 2
processes with 1 thread (each configuration gets the 2 cores) and adds 1 process with 1 thread,
the per-process baseline.

Per configuration, the median of ``--repeats`` runs (configurations in turn, so that changes in
the machine's load hit all):
* the wall time of the whole process (start-up included: imports, model, process group);
* the prediction phase, from each rank's ``parts/run.json`` entry (``finished``): films over
  the slowest rank's seconds, from the moment the ranks have their shares to the last film
  written, which is the throughput a long archive run reaches;
* CPU seconds per film in that phase, summed over the ranks (the work each film costs).
The section "## Sharded inference on the CPU: 1 against 2 processes" of benchmarks/RESULTS.md
is replaced (``--no-write`` leaves it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.phantom_benchmark import machine
from benchmarks.results_file import replace_section
from data.io_utils import atomic_write_text
from data.phantom import generate_dataset
from inference.parts import PARTS_DIR, RUN_FILE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Sharded inference on the CPU: 1 against 2 processes"


def timed_run(model: str, films: Path, out: Path, processes: int, threads: int, batch_size: int) -> dict:
    """One whole ``python -m inference.sharded`` run into a fresh ``out``: its wall seconds and
    its prediction phase (films, seconds of the slowest rank, CPU seconds of all ranks)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "inference.sharded", "--model", model, "--out", str(out),
               "--accelerator", "cpu", "--devices", str(processes), "--num-workers", "0",
               "--batch-size", str(batch_size), "--min-spine-score", "0", "--quiet", str(films)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sharded run failed ({processes} process(es)):\n{proc.stderr[-3000:]}")
    ranks = json.loads((out / PARTS_DIR / RUN_FILE).read_text())["finished"]
    return {"wall": wall, "films": sum(r["films"] for r in ranks), "seconds": max(r["seconds"] for r in ranks),
            "cpu": sum(r["cpu_seconds"] for r in ranks)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a bundle folder (e.g. runs/demo/bundle of `make demo`)")
    p.add_argument("--work", required=True, help="folder for the films and the outputs")
    p.add_argument("--films", type=int, default=40)
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
    configs = [tuple(int(n) for n in c.lower().split("x")) for c in args.configs]
    load_before = os.getloadavg()[0]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for processes, threads in configs:
            runs[processes, threads].append(
                timed_run(args.model, data / "images", work / "out", processes, threads, args.batch_size))
    rows = []
    for processes, threads in configs:
        done = runs[processes, threads]
        row = {"processes": processes, "threads": threads, "films": done[0]["films"],
               "wall": statistics.median(r["wall"] for r in done),
               "phase": statistics.median(r["seconds"] for r in done),
               "cpu_per_film": statistics.median(r["cpu"] / r["films"] for r in done),
               "phases": [round(r["seconds"], 1) for r in done]}
        row["films_per_second"] = row["films"] / row["phase"]
        row["cores_used"] = row["films_per_second"] * row["cpu_per_film"]
        rows.append(row)
        print(f"{processes} process(es) x {threads} thread(s): whole run {row['wall']:.1f} s, prediction phase "
              f"{row['phase']:.1f} s ({row['phases']}), {row['films_per_second']:.2f} films/s, "
              f"{row['cpu_per_film']:.3f} CPU s per film")
    result = {"rows": rows, "size": args.size, "batch_size": args.batch_size, "repeats": args.repeats,
              "model": args.model, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "load": (load_before, os.getloadavg()[0]),
              "command": "python -m benchmarks.sharded_scaling " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_text(work / "sharded_scaling.json", json.dumps(result, indent=2))
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
        f"{r['load'][1]:.1f} at the end)",
        f"- films: {base['films']} phantom films of seed 3 at {r['size']} px; model `{r['model']}`; batch size "
        f"{r['batch_size']}, no loader workers, `--min-spine-score 0`; each number the median of {r['repeats']} runs",
        "- prediction phase: from the moment every rank has its share to its last film written, the slowest "
        "rank's (`parts/run.json`, `finished`); CPU s: user + system time of the ranks in that phase",
        "",
        "| processes x torch threads | whole run | prediction phase (each run) | films / s | speed-up "
        "| CPU s per film | cores used |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['processes']} x {row['threads']} | {row['wall']:.1f} s | {row['phase']:.1f} s "
                     f"({', '.join(map(str, row['phases']))}) | {row['films_per_second']:.2f} "
                     f"| {row['films_per_second'] / base['films_per_second']:.2f} | {row['cpu_per_film']:.3f} "
                     f"| {row['cores_used']:.2f} |")
    lines += [
        "",
        "Cores used: CPU seconds per second of the prediction phase. Where W processes use no more cores than",
        "one, the machine had no free core for them (a shared machine) and the speed-up measures the machine,",
        "not the sharding; the CPU seconds per film then say what sharding costs per film. More torch threads",
        "than free cores can cost several times the CPU per film, spent waiting in torch's thread pool.",
        "",
    ]
    replace_section("\n".join(lines))


if __name__ == "__main__":
    main()
