"""CPU inference speed, measured as a user would, against torchxrayvision.

    python -m benchmarks.speed [--model BUNDLE] [--repeats 5] [--films 40] [--size 1024]
                               [--sizes 512 1024 2048 3000] [--size-batches 8 1] [--compare-full-resolution]
                               [--work runs/speed] [--no-write]

Writes ``--films`` phantom films (data/phantom.py, seed 3, ``--size`` px high) as 16-bit
MONOCHROME2 DX DICOM, then measures, each as whole processes run one after another (median of
``--repeats``):

* **whole runs**: torchxrayvision's pipeline (benchmarks/xrv_peer.py) at 224 and 512 px, this
  project's torch backend (``infer.py`` with its defaults, ``--batch-size 8 --num-workers 2``)
  and its ONNX backend (the bundle's networks exported once by ``python -m inference.onnx``);
  with the peak memory of the largest process and of the process tree (summed PSS) of each;
* **start-up**: ``import infer`` alone, and with the model loaded;
* **steady state**: seconds per film once the model is loaded and one batch has run;
* **stages** of the torch backend (one process, ``--num-workers 0``): reading, pre-processing,
  film network, per-vertebra analysis, writing;
* **film size**: seconds and peak memory per film at each of ``--sizes`` (square films, the
  phantom films resized), at batch 8, and at batch 1 for the largest (``--size-batches``: each
  of these batch sizes at every size); a large film is decoded reduced as infer.py does by
  default, and with ``--compare-full-resolution`` each is measured with ``--full-resolution`` too.

``--model``: a bundle folder or registry name; the default is the registry's shipped model, when
one exists. torchxrayvision is used when installed (the ``bench`` extra: ``pip install -e
.[bench]``); nothing is installed at run time, and its DenseNet has random weights (no
download). Results replace this benchmark's section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

import inference.predictor as predictor_module
from benchmarks.phantom_benchmark import cpu_name
from benchmarks.results_file import replace_section
from data.io_utils import atomic_write_with
from data.phantom import generate_image
from data.readers import reduction_factor
from inference.loading import open_model
from inference.onnx import OnnxPredictor
from inference.pipeline import run_inference
from inference.predictor import Predictor, min_decoded_size
from models.registry import default_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## CPU inference speed against torchxrayvision"
SEED = 3
SAMPLE_SECONDS = 0.1  # memory sampling period of a measured process tree
SCALING_FILMS = 8  # films per size in the film-size series
# what infer.py sets before torch starts, for the in-process probes (which import torch first);
# the peer runs in the environment as it is, and once more with the same setting
PASSIVE_ENV = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


# --------------------------------------------------------------------------- films
def write_dx(path: Path, image, bits_stored: int, index: int, spacing_mm: float) -> None:
    """A 16-bit MONOCHROME2 DX DICOM file of ``image`` (uint16), as a modality writes it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # DX for presentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "LL", "SPINE"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"Phantom^{index}", f"phantom-{index}", "19500101"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261206", "120000", ""
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{spacing_mm:.4f}", f"{spacing_mm:.4f}"]
    ds.PixelData = np.ascontiguousarray(image, dtype="<u2").tobytes()
    atomic_write_with(path, lambda fh: ds.save_as(fh, enforce_file_format=True))


def make_films(folder: Path, n: int, size: int, square: int | None = None, source: Path | None = None) -> Path:
    """``n`` phantom DICOM films (seed 3) of ``size`` px high in ``folder`` (kept between runs).
    ``square``: instead, the films of ``source`` (a folder made here) padded to a square and
    resized to ``square`` x ``square`` px (drawing a phantom of 3000 px takes minutes)."""
    want = {"n": n, "seed": SEED, "size": size, "square": square, "format": 1}
    info = folder / "films.json"
    if info.is_file() and json.loads(info.read_text()) == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        if square is None:
            film = generate_image(SEED, i, size)
            image, bits, spacing = film["image"], int(film["meta"]["bits_stored"]), 300.0 / size
        else:
            ds = pydicom.dcmread(source / f"film_{i:03d}.dcm")
            image, bits = ds.pixel_array, int(ds.BitsStored)
            h, w = image.shape
            side = max(h, w)
            image = cv2.copyMakeBorder(image, 0, side - h, 0, side - w, cv2.BORDER_REPLICATE)
            image = cv2.resize(image, (square, square), interpolation=cv2.INTER_LINEAR)
            spacing = float(ds.PixelSpacing[0]) * side / square
        write_dx(folder / f"film_{i:03d}.dcm", image.astype(np.uint16), bits, i, spacing)
    info.write_text(json.dumps(want))
    return folder


# --------------------------------------------------------------------------- processes
def _status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_process(cmd: list[str], cwd: Path = ROOT, env: dict | None = None) -> dict:
    """Run ``cmd`` to its end: wall seconds, CPU seconds of the whole process tree (user and
    system, its workers included), the peak RSS of its largest process (the kernel's high-water
    mark) and the peak of the tree's summed PSS (shared pages counted once), both in MB, and
    its stdout."""
    import psutil  # the bench extra: only the benchmark needs it

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, text=True, env=env)
        parent = psutil.Process(proc.pid)
        largest = tree = 0
        while True:
            try:
                pids = [proc.pid] + [c.pid for c in parent.children(recursive=True)]
            except psutil.Error:
                pids = [proc.pid]
            largest = max([largest] + [_status_kb(pid, "VmHWM") for pid in pids])
            tree = max(tree, sum(_pss_kb(pid) for pid in pids))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(SAMPLE_SECONDS)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        largest = max(largest, usage.ru_maxrss)  # kB on Linux
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {stderr.strip()[-2000:]}")
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "largest_mb": largest / 1024,
            "tree_mb": tree / 1024, "stdout": stdout}


def median_run(cmd: list[str], repeats: int, out: Path | None = None, env: dict | None = None) -> dict:
    """:func:`run_process` ``repeats`` times (``out`` emptied before each): the median wall
    time, every wall time, and the largest memory peaks seen."""
    runs = []
    for _ in range(repeats):
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        runs.append(run_process(cmd, env=env))
    return {"seconds": statistics.median(r["seconds"] for r in runs), "all": [r["seconds"] for r in runs],
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "largest_mb": max(r["largest_mb"] for r in runs), "tree_mb": max(r["tree_mb"] for r in runs),
            "stdout": runs[-1]["stdout"]}


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- in-process probes
def probe_steady(model: str, films: str, batch_size: int, num_workers: int, backend: str,
                 full_resolution: bool = False) -> dict:
    """Seconds per film once the model is loaded and one batch has run (a fresh output folder)."""
    predictor = _predictor(model, backend)
    paths = sorted(str(p) for p in Path(films).glob("*.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        run_inference(predictor, paths[:batch_size], Path(tmp) / "warm", batch_size=batch_size,
                      num_workers=num_workers, progress=False, full_resolution=full_resolution)
        start = time.perf_counter()
        summary = run_inference(predictor, paths, Path(tmp) / "out", batch_size=batch_size,
                                num_workers=num_workers, progress=False, full_resolution=full_resolution)
        seconds = time.perf_counter() - start
    if summary.n_failed:
        raise RuntimeError(f"{summary.n_failed} film(s) failed")
    return {"seconds_per_film": seconds / len(paths), "films": len(paths)}


def probe_stages(model: str, films: str, batch_size: int) -> dict:
    """Per-film seconds of each stage in one process (``num_workers=0``), after one warm-up batch:
    wall time, and the CPU time of the main thread (``cpu_*``; with one torch thread, all the
    compute but the output writers').

    Reading is ``read_image``; pre-processing the rest of the dataset's item (normalisation,
    letterbox, overlay base); the film network its forward pass; per-vertebra analysis the rest
    of ``Predictor.predict``; writing what the main thread spends on the rest of the run
    (queueing outputs, waiting for the writers, tables); ``cpu_process`` the whole process's CPU."""
    predictor = _predictor(model, "torch")
    spent = {"read": 0.0, "item": 0.0, "film_net": 0.0, "predict": 0.0}
    cpu = dict(spent)

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t
                cpu[key] += time.thread_time() - c
        return wrapper

    predictor_module.read_image = timed("read", predictor_module.read_image)
    dataset_cls = predictor_module.InferenceDataset
    dataset_cls.__getitem__ = timed("item", dataset_cls.__getitem__)
    predictor.net.forward = timed("film_net", predictor.net.forward)
    predictor.predict = timed("predict", predictor.predict)
    paths = sorted(str(p) for p in Path(films).glob("*.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        run_inference(predictor, paths[:batch_size], Path(tmp) / "warm", batch_size=batch_size, num_workers=0,
                      progress=False)
        spent.update(dict.fromkeys(spent, 0.0))
        cpu.update(dict.fromkeys(cpu, 0.0))
        t, c, p = time.perf_counter(), time.thread_time(), time.process_time()
        run_inference(predictor, paths, Path(tmp) / "out", batch_size=batch_size, num_workers=0, progress=False)
        total, total_cpu, process_cpu = time.perf_counter() - t, time.thread_time() - c, time.process_time() - p
    n = len(paths)
    out = {}
    for prefix, s, whole in (("", spent, total), ("cpu_", cpu, total_cpu)):
        out.update({f"{prefix}read": s["read"] / n, f"{prefix}preprocess": (s["item"] - s["read"]) / n,
                    f"{prefix}film_net": s["film_net"] / n, f"{prefix}vertebrae": (s["predict"] - s["film_net"]) / n,
                    f"{prefix}write": (whole - s["item"] - s["predict"]) / n, f"{prefix}total": whole / n})
    out["cpu_process"] = process_cpu / n
    return out


def _predictor(model: str, backend: str):
    if backend == "onnx":
        return OnnxPredictor(model, device="cpu")
    return Predictor(model, device="cpu")


def probe_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed probe")
    p.add_argument("what", choices=("steady", "stages"))
    p.add_argument("--model", required=True)
    p.add_argument("--films", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--backend", default="torch")
    p.add_argument("--full-resolution", action="store_true")
    a = p.parse_args(argv)
    if a.what == "steady":
        result = probe_steady(a.model, a.films, a.batch_size, a.num_workers, a.backend, a.full_resolution)
    else:
        result = probe_stages(a.model, a.films, a.batch_size)
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- the benchmark
def have_peer() -> bool:
    return importlib.util.find_spec("torchxrayvision") is not None


def onnx_bundle(model: str, work: Path) -> Path:
    """The model with its networks in ONNX (``python -m inference.onnx --bundle-out``), made
    once per model version."""
    bundle_id = open_model(model).id
    out = work / f"onnx-{bundle_id}"
    if not (out / "metadata.json").is_file():
        run_process([sys.executable, "-m", "inference.onnx", "--model", str(model), "--bundle-out", str(out)])
    return out


def _load_average() -> str:
    """The machine's 1-minute load average (other users' work on a shared machine)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


def machine() -> str:
    return (f"{os.cpu_count()} CPU cores ({cpu_name()}), no GPU used, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        return probe_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="bundle folder or registry name (default: the shipped model)")
    p.add_argument("--repeats", type=int, default=5, help="whole-process runs per pipeline (median)")
    p.add_argument("--films", type=int, default=40)
    p.add_argument("--size", type=int, default=1024, help="phantom film height in pixels")
    p.add_argument("--sizes", type=int, nargs="*", default=[512, 1024, 2048, 3000],
                   help="square film sides of the film-size series (none: skip it)")
    p.add_argument("--size-batches", type=int, nargs="*", default=None,
                   help="batch sizes of the film-size series at every size (default: 8, and 1 for the largest)")
    p.add_argument("--compare-full-resolution", action="store_true",
                   help="measure the film-size series with --full-resolution too (no reduced decoding)")
    p.add_argument("--work", default=str(ROOT / "runs" / "speed"), help="films and outputs (kept between runs)")
    p.add_argument("--skip", nargs="*", default=[], choices=("peer", "torch", "onnx", "steady", "stages", "sizes"),
                   help="parts to leave out")
    p.add_argument("--no-write", action="store_true", help="print the results only")
    a = p.parse_args(argv)
    model = a.model or default_model()
    if model is None:
        p.error("no shipped model in models/registry.json yet: give --model BUNDLE")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    work = Path(a.work)
    py = sys.executable
    films = make_films(work / f"films-{a.size}-{a.films}", a.films, a.size)
    r: dict = {"command": "python -m benchmarks.speed " + shlex.join(argv), "model": str(model),
               "shipped": a.model is None, "load": [_load_average()],
               "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(), "films": a.films,
               "size": a.size, "repeats": a.repeats, "whole": {}, "steady": {}}
    out = work / "out"

    def whole(key: str, cmd: list[str], env: dict | None = None) -> None:
        r["whole"][key] = median_run(cmd, a.repeats, out, env=env)
        print(f"{key}: {r['whole'][key]['seconds']:.2f} s (runs {', '.join(f'{s:.2f}' for s in r['whole'][key]['all'])}), "
              f"CPU {r['whole'][key]['cpu_seconds']:.1f} s, "
              f"largest {r['whole'][key]['largest_mb']:.0f} MB, tree {r['whole'][key]['tree_mb']:.0f} MB", flush=True)

    peer = have_peer() and "peer" not in a.skip
    if peer:
        for size in (224, 512):
            whole(f"xrv{size}", [py, "-m", "benchmarks.xrv_peer", str(films), "--size", str(size),
                                 "--out", str(out / "xrv.csv")])
        whole("xrv224_passive", [py, "-m", "benchmarks.xrv_peer", str(films), "--size", "224",
                                 "--out", str(out / "xrv.csv")], env=PASSIVE_ENV)
    if "torch" not in a.skip:
        whole("torch", [py, "infer.py", "--model", str(model), "--out", str(out), "--quiet", str(films)])
    onnx_model = None
    if "onnx" not in a.skip:
        onnx_model = onnx_bundle(model, work)
        whole("onnx", [py, "infer.py", "--backend", "onnx", "--model", str(onnx_model), "--out", str(out), "--quiet",
                       str(films)])
    imports = median_run([py, "-c", "import infer"], a.repeats)
    loaded = median_run([py, "-c", f"import infer; from inference.predictor import Predictor; "
                                   f"Predictor({str(model)!r}, device='cpu')"], a.repeats)
    r["startup"] = {"imports": imports["seconds"], "with_model": loaded["seconds"]}
    print(f"start-up: imports {imports['seconds']:.2f} s, with the model {loaded['seconds']:.2f} s", flush=True)
    if "steady" not in a.skip:
        if peer:
            for size in (224, 512):
                run = median_run([py, "-m", "benchmarks.xrv_peer", str(films), "--size", str(size), "--steady"],
                                 a.repeats, env=PASSIVE_ENV)
                r["steady"][f"xrv{size}"] = last_json(run["stdout"])["seconds_per_film"]
        backends = [("torch", "torch")] + ([("onnx", "onnx")] if onnx_model else [])
        for key, backend in backends:
            m = onnx_model if backend == "onnx" else model
            run = median_run([py, "-m", "benchmarks.speed", "probe", "steady", "--model", str(m), "--films", str(films),
                              "--backend", backend], a.repeats, env=PASSIVE_ENV)
            r["steady"][key] = last_json(run["stdout"])["seconds_per_film"]
        print("steady state, s/film: " + ", ".join(f"{k} {v:.3f}" for k, v in r["steady"].items()), flush=True)
    if "stages" not in a.skip:
        runs = [last_json(run_process([py, "-m", "benchmarks.speed", "probe", "stages", "--model", str(model),
                                       "--films", str(films)], env=PASSIVE_ENV)["stdout"]) for _ in range(a.repeats)]
        r["stages"] = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print("stages, s/film: " + ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items()), flush=True)
    if a.sizes and "sizes" not in a.skip:
        r["sizes"] = []
        bundle = open_model(model)
        floor = min_decoded_size(tuple(bundle.model["image_size"]), bundle.point_refiner is not None)
        modes = (False, True) if a.compare_full_resolution else (False,)
        for side in a.sizes:
            folder = make_films(work / f"films-square-{side}", SCALING_FILMS, a.size, square=side, source=films)
            batches = a.size_batches or ((8, 1) if side == max(a.sizes) else (8,))
            for batch in batches:
                for full in modes:
                    run = median_run([py, "-m", "benchmarks.speed", "probe", "steady", "--model", str(model),
                                      "--films", str(folder), "--batch-size", str(batch)]
                                     + (["--full-resolution"] if full else []), a.repeats, env=PASSIVE_ENV)
                    factor = 1 if full else reduction_factor(side, side, floor)
                    r["sizes"].append({"side": side, "batch": batch, "reduction": factor, "full_resolution": full,
                                       "seconds_per_film": last_json(run["stdout"])["seconds_per_film"],
                                       "all": run["all"], "largest_mb": run["largest_mb"], "tree_mb": run["tree_mb"]})
                    print(f"{side} px, batch {batch}, decoded 1/{factor}: {r['sizes'][-1]['seconds_per_film']:.3f} "
                          f"s/film, largest {run['largest_mb']:.0f} MB", flush=True)
    r["load"].append(_load_average())
    for v in r["whole"].values():
        v.pop("stdout", None)
    print(json.dumps(r, indent=1))
    if not a.no_write:
        write_results(r)
    return 0


# --------------------------------------------------------------------------- RESULTS.md
def _ratio(r: dict, key: str) -> str:
    base = r["whole"].get("xrv224")
    return f"{r['whole'][key]['seconds'] / base['seconds']:.2f}" if base else "n/a"


def _targets(r: dict) -> list[str]:
    """The issue's targets, each with the measured number."""
    out, whole = [], r["whole"]
    if "torch" in whole and "xrv224_passive" in whole:
        out.append(f"whole torch run {whole['torch']['seconds'] / whole['xrv224_passive']['seconds']:.2f}x "
                   f"torchxrayvision 224 px with the same OpenMP setting "
                   f"({whole['torch']['seconds'] / whole['xrv224']['seconds']:.2f}x as it runs by default; target 1.3x)")
    if "torch" in r["steady"]:
        implied = ""
        if "torch" in whole and r.get("startup"):
            per_film = (whole["torch"]["seconds"] - r["startup"]["with_model"]) / r["films"]
            implied = f"; the whole run less its start-up gives {per_film:.3f} s per film"
        out.append(f"steady state {r['steady']['torch']:.3f} s per film in the in-process probe{implied} "
                   f"(target 0.12)")
    if "torch" in whole:
        out.append(f"largest process {whole['torch']['largest_mb']:.0f} MB at batch 8 (target under 1000 MB)")
    if r.get("startup"):
        out.append(f"start-up {r['startup']['with_model']:.2f} s (target 4 s)")
    sizes = [row for row in r.get("sizes") or [] if not row.get("full_resolution")]
    big = [row for row in sizes if row["batch"] == 1 and row["side"] == max(x["side"] for x in sizes)]
    if big:
        out.append(f"a {big[0]['side']} px film at batch 1 {big[0]['seconds_per_film']:.2f} s (target 0.3 s)")
    return out


def write_results(r: dict) -> None:
    names = {"xrv224": "torchxrayvision, DenseNet-121 at 224 px",
             "xrv512": "torchxrayvision, DenseNet-121 at 512 px",
             "xrv224_passive": "torchxrayvision, DenseNet-121 at 224 px, with OMP_WAIT_POLICY=PASSIVE as infer.py sets it",
             "torch": "this project, torch backend (film and crop networks, overlays, JSON, npy)",
             "onnx": "this project, ONNX backend"}
    lines = [SECTION, "",
             f"{r['films']} phantom films (data/phantom.py, seed {SEED}, {r['size']} px high), written as 16-bit "
             "MONOCHROME2 DX DICOM; each pipeline run as whole processes one after another. torchxrayvision's "
             "DenseNet-121 has random weights (same cost as trained ones); this project's options are its defaults "
             "(`--batch-size 8 --num-workers 2`). The machine is shared with other work: wall times vary from run to "
             "run, and a torch process whose OpenMP threads spin while they wait (torch's default) loses most of "
             "its time to the other processes, hence the peer measured both ways. CPU times vary less.", "",
             f"- command: `{r['command']}`",
             f"- model: `{r['model']}`" + (" (the shipped model, the registry's default)" if r.get("shipped") else ""),
             f"- date: {r['date']}",
             f"- machine: {r['machine']}; shared with other work"
             + (f" (load average {r['load'][0]} at the start, {r['load'][1]} at the end)" if r.get("load") else ""),
             ""]
    if r["whole"]:
        lines += [f"| pipeline (whole process, {r['films']} films) | wall, median of {r['repeats']} | ratio to "
                  "torchxrayvision 224 px | CPU time (all processes) | peak memory, largest process | peak memory, process "
                  "tree (PSS) |", "|---|---|---|---|---|---|"]
        for key, v in r["whole"].items():
            lines.append(f"| {names[key]} | {v['seconds']:.1f} s | {_ratio(r, key)} | {v['cpu_seconds']:.1f} s "
                         f"| {v['largest_mb']:.0f} MB "
                         f"| {v['tree_mb']:.0f} MB |")
        lines.append("")
    targets = _targets(r)
    if targets:
        lines += ["Against the targets: " + "; ".join(targets) + ".", ""]
    if r["steady"]:
        lines += ["Steady state (model loaded, one batch run first; every process with OMP_WAIT_POLICY=PASSIVE), "
                  "seconds per film: " + "; ".join(
            f"{names[k].split(' (')[0]} {v:.3f}" for k, v in r["steady"].items()) + ".", ""]
    s = r["startup"]
    lines += [f"Start-up (whole process, median): `import infer` {s['imports']:.2f} s; with the model loaded "
              f"{s['with_model']:.2f} s.", ""]
    if r.get("stages"):
        st = r["stages"]
        def stage(name: str, key: str) -> str:
            return f"| {name} | {1000 * st[key]:.0f} ms | {1000 * st['cpu_' + key]:.0f} ms |"

        lines += ["Where the torch backend's time goes, per film (one process, `--num-workers 0`, batch 8, median "
                  f"of {r['repeats']}): wall time, and the CPU time of the main thread (torch's second thread and "
                  "the output writer's are in the process's CPU time only):", "",
                  "| stage | wall | main-thread CPU |", "|---|---|---|",
                  f"| start-up (imports and model loading, whole process), once | {s['with_model']:.2f} s | |",
                  stage("reading (DICOM decode, rescale)", "read"),
                  stage("pre-processing (normalisation, letterbox, overlay base)", "preprocess"),
                  stage("film network", "film_net"),
                  stage("per-vertebra analysis (crop network, levels, morphometry)", "vertebrae"),
                  stage("writing (what the main thread spends on it: queueing, tables)", "write"),
                  stage("all, in steady state", "total"),
                  f"| CPU of the whole process (every thread) | | {1000 * st['cpu_process']:.0f} ms |", ""]
    if r.get("sizes"):
        lines += ["Cost per film by film size (square films: the phantom films resized; steady state, default "
                  "workers; decoded as infer.py decodes it by default, or with `--full-resolution`):", "",
                  "| film | batch | decoded at | time per film | peak memory, largest process | process tree |",
                  "|---|---|---|---|---|---|"]
        for row in r["sizes"]:
            factor = row.get("reduction", 1)
            reduced = -(-row["side"] // factor)
            decoded = ("full size (`--full-resolution`)" if row.get("full_resolution") else "full size" if factor == 1
                       else f"1/{factor}: {reduced} x {reduced}")
            lines.append(f"| {row['side']} x {row['side']} | {row['batch']} | {decoded} | {row['seconds_per_film']:.3f} s "
                         f"| {row['largest_mb']:.0f} MB | {row['tree_mb']:.0f} MB |")
        lines.append("")
    replace_section("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
