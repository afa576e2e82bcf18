"""What a JPEG quality costs and saves when the AASCE films are packed for a GPU run
(data/pack_aasce.py): for each quality, the size of all the packed films and how far the
decoded JPEG lies from the film it encodes (the film already scaled to ``--max-side``); then
the pack itself at the default quality, timed.

    python -m benchmarks.pack_aasce [--aasce ../shared/data/aasce] [--qualities 60,70,75,80,85,90]
        [--max-side 1024] [--out runs/carry/aasce] [--write]

``--write`` replaces the section "## AASCE films packed for a GPU run" of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

import cv2
import numpy as np

from benchmarks.phantom_benchmark import machine
from benchmarks.results_file import replace_section
from data.landmarks import points_array, read_aasce
from data.pack_aasce import DEFAULT_MAX_SIDE, DEFAULT_QUALITY, film_names, jpeg_bytes, pack_aasce, packed_grey
from data.readers import read_image

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## AASCE films packed for a GPU run"


def sweep(aasce: Path, qualities: list[int], max_side: int) -> dict[int, dict]:
    """Per quality: bytes of all films, mean PSNR (dB) and mean absolute error (grey levels of 255)."""
    from tqdm import tqdm

    sizes = {q: 0 for q in qualities}
    psnr = {q: [] for q in qualities}
    mae = {q: [] for q in qualities}
    for name in tqdm(film_names(aasce), desc="sweep", unit="film"):
        grey = packed_grey(read_image(aasce / "images" / name).pixels, max_side)
        for q in qualities:
            buf = jpeg_bytes(grey, q)
            sizes[q] += len(buf)
            diff = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_GRAYSCALE).astype(np.float64) - grey
            mse = float(np.mean(diff ** 2))
            psnr[q].append(10 * np.log10(255 ** 2 / max(mse, 1e-12)))
            mae[q].append(float(np.mean(np.abs(diff))))
    return {q: {"bytes": sizes[q], "psnr_db": float(np.mean(psnr[q])), "mae": float(np.mean(mae[q]))}
            for q in qualities}


def read_alike(aasce: Path, packed: Path) -> dict:
    """data.landmarks on both folders: records, names and vertebra counts that differ, the largest
    distance between a packed point and the original's scaled by the size ratio, flagged films."""
    before, after = read_aasce(aasce), read_aasce(packed)
    differing, worst = 0, 0.0
    for a, b in zip(before, after):
        (h, w), (ph, pw) = a["size"], b["size"]
        differing += (Path(a["image"]).name != Path(b["image"]).name or a["patient_id"] != b["patient_id"]
                      or len(a["vertebrae"]) != len(b["vertebrae"]))
        worst = max(worst, float(np.abs(points_array(a) * np.array([pw / w, ph / h]) - points_array(b)).max()))
    return {"records": [len(before), len(after)], "differing": int(differing), "max_point_difference_px": worst,
            "flagged": [sum(bool(r["problems"]) for r in before), sum(bool(r["problems"]) for r in after)],
            "flagged_differently": sum(bool(a["problems"]) != bool(b["problems"]) for a, b in zip(before, after))}


def results_section(rows: dict[int, dict], pack: dict, n_films: int, command: str, read: dict) -> str:
    lines = [SECTION, "",
             f"Command: `{command}`  ",
             f"Machine: {machine()}; shared with other jobs, run single-threaded and niced  ",
             f"Date: {dt.date.today().isoformat()}", "",
             f"The {n_films} AASCE films ({pack['source_image_bytes'] / 1e6:.1f} MB of JPEG, about 500-1100 x "
             f"1500-2400 px) scaled to at most {pack['max_side']} px on the longer side (area averaging) and written "
             "as greyscale JPEG. The error is that of the JPEG alone, against the scaled film it encodes "
             "(8-bit grey levels).", "",
             "| JPEG quality | all films | per film | PSNR (dB) | mean absolute error (grey levels) |",
             "|---|---|---|---|---|"]
    for q, r in rows.items():
        mark = " (default)" if q == pack["quality"] else ""
        lines.append(f"| {q}{mark} | {r['bytes'] / 1e6:.1f} MB | {r['bytes'] / n_films / 1e3:.0f} kB | "
                     f"{r['psnr_db']:.1f} | {r['mae']:.2f} |")
    lines += ["", f"The pack at the default quality ({pack['quality']}): {pack['n_packed']} films, "
              f"{pack['total_bytes'] / 1e6:.1f} MB with the tables, in {pack['seconds']:.0f} s on one core. "
              f"data.landmarks reads {read['records'][1]} records from it ({read['records'][0]} from the original; "
              f"{read['differing']} differ in name, patient or vertebra count); its points lie at most "
              f"{read['max_point_difference_px']:.1g} px from the original's scaled by the size ratio; "
              f"{read['flagged'][1]} films are flagged for annotation problems ({read['flagged'][0]} in the original, "
              f"{read['flagged_differently']} flagged differently)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pack_aasce", description=__doc__.split("\n\n")[0])
    p.add_argument("--aasce", type=Path, default=ROOT.parent / "shared" / "data" / "aasce")
    p.add_argument("--qualities", default="60,70,75,80,85,90")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "carry" / "aasce")
    p.add_argument("--write", action="store_true", help="replace the section of benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if not (args.aasce / "filenames.csv").is_file():
        p.exit(2, f"error: {args.aasce / 'filenames.csv'}: not found (expected an AASCE folder)\n")
    qualities = sorted({int(q) for q in args.qualities.split(",")} | {DEFAULT_QUALITY})
    rows = sweep(args.aasce, qualities, args.max_side)
    pack = pack_aasce(args.aasce, args.out, args.max_side, DEFAULT_QUALITY, progress=True)
    n_films = len(film_names(args.aasce))
    command = "python -m benchmarks.pack_aasce " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    read = read_alike(args.aasce, args.out)
    section = results_section(rows, pack, n_films, command.strip(), read)
    print(section)
    if args.write:
        replace_section(section)
    return {"sweep": rows, "pack": pack, "read": read}


if __name__ == "__main__":
    main()
