"""Soak check of infer.py: kill it at random (SIGKILL and SIGTERM), resume until complete, and
compare every good film's outputs with those of an uninterrupted run.

    python -m benchmarks.soak [--good 80] [--size 384] [--kills 8] [--model BUNDLE] [--work DIR]

The input folder mixes good films (phantom films of data/phantom.py, some as DICOM, some under
odd unicode or very long names) with hostile files (truncated PNG, zero-byte files, text named
.dcm, CT and MR DICOM, a knee radiograph, constant, NaN and 1 x 1 images, a colour image). The
check passes when:

* every good film has complete outputs (JSON, heatmap .npy and .png, and for DICOM films the SR
  and SC) with the same predictions as the uninterrupted run, to 1e-6 (JSON numbers, heatmaps,
  predictions.csv, vertebrae.csv; the UIDs and times inside the DICOM outputs may differ);
* every hostile file has the same status and reason as in the uninterrupted run, none ``ok``;
* each SIGTERM exits with 143, no DataLoader worker outlives a killed run, and no temporary
  file or lock is left at the end.

Without ``--model`` the model is the shipped one (the registry's default); ``--model untrained``
makes a seeded, untrained FractureSystem exported as a bundle, its body-centre bias raised so
that it finds bodies (as the parity model of tests/parity does). The summary is printed and written to benchmarks/RESULTS.md (with
``--no-results``, only printed). Linux only (it reads /proc to find the workers). Not part of
the test suite: it takes minutes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from benchmarks.phantom_benchmark import machine
from benchmarks.results_file import replace_section
from data.phantom import generate_dataset
from inference.dicom_out import DEID_KEY_FILE
from inference.pipeline import LOCK_FILE
from models.registry import default_model
from training.export import export_checkpoint
from training.system import FractureSystem

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Soak check: infer.py killed at random and resumed"
TOLERANCE = 1e-6
SOP_CLASSES = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CT": "1.2.840.10008.5.1.4.1.1.2",
               "MR": "1.2.840.10008.5.1.4.1.1.4"}


# --------------------------------------------------------------------------- inputs
def write_dicom(path: Path, pixels: np.ndarray, modality: str = "DX", body_part: str | None = None,
                spacing=(0.15, 0.15)) -> Path:
    """A greyscale DICOM of ``pixels`` (uint16, or float32 as float pixel data)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Soak^Test", "SOAK-1"
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if pixels.dtype.kind == "f":
        ds.BitsAllocated = 32
        ds.FloatPixelData = pixels.astype("<f4").tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


GOOD_NAMES = {  # film index -> a hostile name for a good film
    0: "脊椎 X線 ñ 😀 film.png",
    1: "a" * 240 + ".png",  # near the 255-byte limit of a file name
    2: "ü" * 120 + ".png",  # 240 bytes of two-byte characters
    3: "film, with 'quotes' \"and\" ; commas.png",
}


def build_inputs(folder: Path, work: Path, n_good: int, size: int, seed: int) -> tuple[list[Path], dict[Path, str]]:
    """The mixed input folder: ``(good films, {hostile file: what it is})``."""
    phantom = work / "phantom"
    if not (phantom / "manifest.csv").is_file():
        generate_dataset(phantom, n=n_good, seed=seed, size=size, workers=1, progress=False)
    folder.mkdir(parents=True)
    good = []
    for k, src in enumerate(sorted((phantom / "images").glob("*.png"))[:n_good]):
        if k % 5 == 4:  # every fifth film as a DICOM radiograph
            good.append(write_dicom(folder / f"film_{k:02d}.dcm", cv2.imread(str(src), cv2.IMREAD_UNCHANGED),
                                    body_part="LSPINE"))
        else:
            good.append(Path(shutil.copy(src, folder / GOOD_NAMES.get(k, f"film_{k:02d}.png"))))
    png = sorted((phantom / "images").glob("*.png"))[0].read_bytes()
    rng = np.random.default_rng(seed)
    noise = (rng.random((256, 256)) * 4000).astype(np.uint16)
    hostile = {
        folder / "truncated.png": png[: len(png) // 2],
        folder / "zero_bytes.png": b"",
        folder / "zero_bytes.dcm": b"",
        folder / "notes.dcm": b"not a DICOM file: a text file renamed\n" * 20,
    }
    for path, data in hostile.items():
        path.write_bytes(data)
    write_dicom(folder / "ct_slice.dcm", noise, modality="CT")
    write_dicom(folder / "mr_slice.dcm", noise, modality="MR")
    write_dicom(folder / "knee.dcm", noise, body_part="KNEE")
    write_dicom(folder / "nan_pixels.dcm", np.full((256, 256), np.nan, np.float32))
    nan_tiff = rng.random((256, 256)).astype(np.float32)
    nan_tiff[10:20, 10:20] = np.nan
    cv2.imwrite(str(folder / "nan_pixels.tif"), nan_tiff)
    cv2.imwrite(str(folder / "constant.png"), np.full((size, size), 1200, np.uint16))
    cv2.imwrite(str(folder / "one_pixel.png"), np.full((1, 1), 200, np.uint8))
    colour = np.zeros((size, size, 3), np.uint8)
    colour[..., 2] = 255
    cv2.imwrite(str(folder / "colour.png"), colour)
    what = {"truncated.png": "truncated PNG", "zero_bytes.png": "zero-byte .png", "zero_bytes.dcm": "zero-byte .dcm",
            "notes.dcm": "text named .dcm", "ct_slice.dcm": "CT DICOM", "mr_slice.dcm": "MR DICOM",
            "knee.dcm": "knee DX DICOM", "nan_pixels.dcm": "all-NaN float DICOM", "nan_pixels.tif": "NaN float TIFF",
            "constant.png": "constant image", "one_pixel.png": "1 x 1 image", "colour.png": "colour image"}
    return good, {folder / name: text for name, text in what.items()}


def seeded_bundle(out: Path, seed: int, image_size=(256, 192)) -> Path:
    """A seeded, untrained model as a bundle; its body-centre bias is raised so that it finds bodies."""
    torch.manual_seed(seed)
    system = FractureSystem(fpn_dim=16, image_size=image_size)
    with torch.no_grad():
        system.net.vertebra_head[-1].bias[0] += 1.5
    checkpoint = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, out.with_suffix(".ckpt"))
    return export_checkpoint(out.with_suffix(".ckpt"), out, overwrite=True)


# --------------------------------------------------------------------------- runs
def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def holds_lock(out: Path, pid: int) -> bool:
    """True once the run ``pid`` has taken its output folder (inference.pipeline.output_lock)."""
    try:
        return json.loads((out / LOCK_FILE).read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def infer_command(model: Path, folder: Path, out: Path, args) -> list[str]:
    return [sys.executable, "infer.py", "--model", str(model), "--out", str(out), "--num-workers", str(args.workers),
            "--batch-size", str(args.batch_size), "--quiet", "--dicom-sr", "--dicom-sc", "--resume",
            *shlex.split(args.extra), str(folder)]


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def uninterrupted(model: Path, folder: Path, out: Path, args) -> float:
    start = time.monotonic()
    proc = subprocess.run(infer_command(model, folder, out, args), cwd=ROOT, capture_output=True, text=True,
                          env=child_env(args.threads))
    if proc.returncode not in (0, 1):
        raise SystemExit(f"the uninterrupted run failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return time.monotonic() - start


def killed_and_resumed(model: Path, folder: Path, out: Path, logs: Path, args, n_good: int) -> dict:
    """Runs with --resume until one ends by itself; each of the first ``args.kills`` runs is
    killed by SIGKILL or SIGTERM (drawn at random) at a random moment: one in five 0.2-5 s after
    its start (often while it loads the model), the others once it has taken its output folder
    and finished a random number of films (up to half of those left), a random fraction of a
    second later."""
    rng = random.Random(args.seed)
    log = {"runs": 0, "kills": {"SIGKILL": 0, "SIGTERM": 0}, "kills_in_startup": 0, "sigterm_exit_143": 0,
           "sigterm_in_startup": 0, "orphan_workers": 0, "films_per_run": [], "exits": []}
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def finished() -> int:
        return len(list(out.glob("*.json"))) if out.is_dir() else 0

    while True:
        log["runs"] += 1
        before = finished()
        err_file = logs / f"run_{log['runs']:02d}.err"
        with open(err_file, "w") as err_out:
            proc = subprocess.Popen(infer_command(model, folder, out, args), cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=err_out, env=child_env(args.threads), start_new_session=True)
        begun = time.monotonic()
        kill = sum(log["kills"].values()) < args.kills
        in_startup = kill and rng.random() < 0.2
        startup_delay = rng.uniform(0.2, 5.0)
        films_before_kill = rng.randint(0, max(0, (n_good - before) // 2))
        settle = rng.uniform(0.0, 0.5)
        workers: set[int] = set()
        reached = None
        while kill and proc.poll() is None:
            workers.update(children(proc.pid))
            now = time.monotonic()
            if in_startup and now - begun >= startup_delay:
                break
            if not in_startup and holds_lock(out, proc.pid) and finished() - before >= films_before_kill:
                reached = reached or now
                if now - reached >= settle:
                    break
            time.sleep(0.02)
        if kill and proc.poll() is None:
            workers.update(children(proc.pid))
            log["kills_in_startup"] += int(not holds_lock(out, proc.pid))
            name = rng.choice(["SIGKILL", "SIGTERM"])
            proc.send_signal(getattr(signal, name))
            log["kills"][name] += 1
            proc.wait()
            err = err_file.read_text(errors="replace")
            if name == "SIGTERM" and proc.returncode == 143 and "interrupted by SIGTERM" in err:
                log["sigterm_exit_143"] += 1
            elif name == "SIGTERM" and proc.returncode == -signal.SIGTERM:
                log["sigterm_in_startup"] += 1  # still loading the model: nothing to write yet
            grace = time.monotonic() + 5.0
            while any(running(w) for w in workers) and time.monotonic() < grace:
                time.sleep(0.05)
            left = [w for w in workers if running(w)]
            log["orphan_workers"] += len(left)
            for w in left:  # leave the machine clean whatever happened
                os.kill(w, signal.SIGKILL)
            log["exits"].append(proc.returncode)
            log["films_per_run"].append(finished() - before)
            continue
        proc.wait()  # it ended by itself: the run is complete
        log["exits"].append(proc.returncode)
        log["films_per_run"].append(finished() - before)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"run {log['runs']} failed (exit {proc.returncode}); see {err_file}")
        break
    log["seconds"] = time.monotonic() - start
    return log


# --------------------------------------------------------------------------- comparison
def largest_difference(a, b, where: str = "") -> float:
    """The largest absolute difference of the numbers of two JSON values; ``inf`` when their
    structure or any non-number differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return float("inf")
        return max([largest_difference(a[k], b[k], f"{where}.{k}") for k in a], default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return float("inf")
        return max([largest_difference(x, y, where) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


def compare(ref: Path, soak: Path, good: list[Path], hostile: dict[Path, str]) -> dict:
    ref_table = pd.read_csv(ref / "predictions.csv").set_index("image")
    soak_table = pd.read_csv(soak / "predictions.csv").set_index("image")
    problems, worst = [], 0.0
    complete = 0
    for film in good:
        key = os.path.abspath(film)  # as data.discovery lists it
        if key not in soak_table.index or soak_table.loc[key, "status"] != "ok":
            problems.append(f"{film.name}: no ok row")
            continue
        name = soak_table.loc[key, "name"]
        files = [f"{name}.json", f"{name}_heatmap.npy", f"{name}_heatmap.png"]
        if film.suffix == ".dcm":
            files += [f"{name}_sr.dcm", f"{name}_sc.dcm"]
        missing = [f for f in files if not (soak / f).is_file()]
        if missing:
            problems.append(f"{film.name}: missing {missing}")
            continue
        diff = largest_difference(json.loads((ref / f"{name}.json").read_text()),
                                  json.loads((soak / f"{name}.json").read_text()))
        heat = float(np.abs(np.load(ref / f"{name}_heatmap.npy") - np.load(soak / f"{name}_heatmap.npy")).max())
        worst = max(worst, diff, heat)
        if diff > TOLERANCE or heat > TOLERANCE:
            problems.append(f"{film.name}: differs by {max(diff, heat):.3g}")
        else:
            complete += 1
    numeric = ["p_fracture", "p_acute", "p_acute_given_fracture", "heatmap_peak_x", "heatmap_peak_y"]
    for column in numeric:
        d = (ref_table[column] - soak_table.loc[ref_table.index, column]).abs().max()
        worst = max(worst, float(0 if pd.isna(d) else d))
    hostile_same = 0
    for path in hostile:
        key = os.path.abspath(path)
        r, s = ref_table.loc[key], soak_table.loc[key]
        if r["status"] != "ok" and (r["status"], r["error"]) == (s["status"], s["error"]):
            hostile_same += 1
        else:
            problems.append(f"{path.name}: {s['status']} ({s['error']}) vs {r['status']} ({r['error']}) uninterrupted")
    ref_v = pd.read_csv(ref / "vertebrae.csv").sort_values(["name", "level"]).reset_index(drop=True)
    soak_v = pd.read_csv(soak / "vertebrae.csv").sort_values(["name", "level"]).reset_index(drop=True)
    if len(ref_v) != len(soak_v):
        problems.append(f"vertebrae.csv: {len(soak_v)} rows vs {len(ref_v)}")
    elif len(ref_v):
        numbers = ref_v.select_dtypes("number").columns
        worst = max(worst, float((ref_v[numbers] - soak_v[numbers]).abs().max().max()))
    # hidden files other than the folder's de-identification key: temporary files, a lock
    leftovers = sorted(p.name for p in soak.iterdir() if p.name.startswith(".") and p.name != DEID_KEY_FILE)
    if leftovers:
        problems.append(f"left in the output folder: {leftovers}")
    return {"good_complete": complete, "hostile_same": hostile_same, "largest_difference": worst,
            "rows": len(soak_table), "rows_expected": len(good) + len(hostile), "leftovers": leftovers,
            "hostile_statuses": dict(soak_table.loc[[os.path.abspath(p) for p in hostile], "status"].value_counts()),
            "problems": problems}


# --------------------------------------------------------------------------- report
def summary_lines(r: dict) -> list[str]:
    log, c = r["soak"], r["compare"]
    kills = log["kills"]
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(c["hostile_statuses"].items()))
    return [
        SECTION, "",
        "A check that a killed run loses nothing and keeps nothing stale, not a benchmark of the model.",
        "", f"- command: `{r['command']}`", f"- date: {r['date']}", f"- machine: {r['machine']}",
        f"- model: {r['model']}",
        f"- inputs: {r['n_good']} good films (3D phantom, data.phantom, {r['size']} px; {r['n_dicom']} of them DICOM; "
        f"{len(GOOD_NAMES)} under odd unicode or 240-byte names) and {r['n_hostile']} hostile files "
        f"({', '.join(r['hostile'])})",
        f"- infer.py options: `--num-workers {r['workers']} --batch-size {r['batch_size']} --dicom-sr --dicom-sc "
        f"--resume{(' ' + r['extra']) if r['extra'] else ''}`, {r['threads']} thread(s) per process",
        "", "| measure | value |", "|---|---|",
        f"| runs until complete (killed: SIGKILL {kills['SIGKILL']}, SIGTERM {kills['SIGTERM']}; "
        f"{log['kills_in_startup']} of them while starting) | {log['runs']} |",
        f"| films finished per run | {', '.join(map(str, log['films_per_run']))} |",
        f"| SIGTERM runs that exited 143 with their message (and ended by the signal while still loading the "
        f"model, before the run began) | {log['sigterm_exit_143']} / {kills['SIGTERM']} "
        f"({log['sigterm_in_startup']}) |",
        f"| DataLoader workers alive 5 s after their run was killed | {log['orphan_workers']} |",
        f"| good films complete, predictions as uninterrupted (<= {TOLERANCE:g}) | {c['good_complete']} / {r['n_good']} |",
        f"| largest difference (JSON numbers, heatmaps, tables) | {c['largest_difference']:.3g} |",
        f"| hostile files with the uninterrupted run's status and reason ({statuses}) "
        f"| {c['hostile_same']} / {r['n_hostile']} |",
        f"| rows in predictions.csv | {c['rows']} / {c['rows_expected']} |",
        f"| temporary files or lock left | {len(c['leftovers'])} |",
        f"| uninterrupted run | {r['reference_seconds']:.0f} s |",
        f"| killed and resumed runs, in all | {log['seconds']:.0f} s |",
        f"| result | {'PASS' if r['passed'] else 'FAIL: ' + '; '.join(c['problems'][:5])} |", "",
    ]

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--good", type=int, default=80, help="good phantom films (enough that the shipped model is still reading when the kills come)")
    p.add_argument("--size", type=int, default=384, help="phantom film size in pixels")
    p.add_argument("--kills", type=int, default=8, help="at most this many runs are killed; the next one finishes")
    p.add_argument("--model", default=None, help="a bundle or registry name (default: the shipped model); "
                                                  "'untrained': a seeded, untrained model made here")
    p.add_argument("--workers", type=int, default=2, help="infer.py --num-workers")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each infer.py process")
    p.add_argument("--extra", default="", help="more infer.py options, e.g. \"--min-spine-score 0\"")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom films, the model and the kills")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--no-results", action="store_true", help="print the summary only")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        p.error("the soak check reads /proc: Linux only")
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="soak-")) if temporary else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        for stale in ("inputs", "ref", "soak", "logs"):
            shutil.rmtree(work / stale, ignore_errors=True)
        good, hostile = build_inputs(work / "inputs", work, args.good, args.size, args.seed)
        shipped = default_model()
        if args.model == "untrained" or (args.model is None and shipped is None):
            model = seeded_bundle(work / "model", args.seed)
            model_text = (f"seeded, untrained FractureSystem (seed {args.seed}, body-centre bias raised so that it "
                          "finds bodies), exported as a bundle")
        else:
            model = Path(args.model or shipped)
            model_text = f"`{model}`" + (" (the shipped model, the registry's default)" if args.model is None else "")
        print(f"{len(good)} good films, {len(hostile)} hostile files in {work / 'inputs'}")
        reference_seconds = uninterrupted(model, work / "inputs", work / "ref", args)
        print(f"uninterrupted run: {reference_seconds:.0f} s")
        log = killed_and_resumed(model, work / "inputs", work / "soak", work / "logs", args, len(good))
        result = compare(work / "ref", work / "soak", good, hostile)
        if log["orphan_workers"]:
            result["problems"].append(f"{log['orphan_workers']} DataLoader workers outlived their run")
        unclean = log["kills"]["SIGTERM"] - log["sigterm_exit_143"] - log["sigterm_in_startup"]
        if unclean:
            result["problems"].append(f"{unclean} SIGTERM runs did not exit 143 with their message")
        passed = not result["problems"]
        report = {
            "command": "python -m benchmarks.soak" + ("" if argv is None and len(sys.argv) == 1 else
                                                      " " + shlex.join(argv if argv is not None else sys.argv[1:])),
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine() + " (shared)",
            "model": model_text, "n_good": len(good), "n_dicom": sum(f.suffix == ".dcm" for f in good),
            "n_hostile": len(hostile), "hostile": list(hostile.values()), "size": args.size,
            "workers": args.workers, "batch_size": args.batch_size, "threads": args.threads, "extra": args.extra,
            "reference_seconds": reference_seconds, "soak": log, "compare": result, "passed": passed,
        }
        lines = summary_lines(report)
        print("\n".join(lines))
        for problem in result["problems"]:
            print(f"problem: {problem}")
        if not args.no_results:
            replace_section("\n".join(lines))
            print(f"written to {RESULTS}")
        return 0 if passed else 1
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
