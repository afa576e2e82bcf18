"""Batch inference: run a :class:`~inference.predictor.Predictor` over files, folders or
manifests and write the outputs of ``docs/formats.md`` through the records of data/records.py.

Every file is written atomically; an input that cannot be read gets an ``error`` row and the
run goes on. A calibrated model (``python -m calibration``) gives calibrated probabilities and
a yes/no ``decision`` at an operating point (the stored default, or the one asked for); see
``docs/formats.md``, "Calibration and operating points".
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import socket
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.io_utils import (atomic_save_npy, atomic_write_image, atomic_write_json, atomic_write_text,
                           file_fingerprint)
from data.discovery import find_inputs
from data.readers import reduction_factor
from inference.acceptance import NO_SPINE_SCORE, no_spine_reason
from inference.predictor import (FilmPrediction, InferenceDataset, Predictor, collate_items, min_decoded_size,
                                  worker_init)
from models.network import HEATMAP_STRIDE
from inference.vertebrae import fracture_map, fracture_peak
from inference.drawing import draw_vertebrae, overlay_heatmap
from inference.memory import release_freed_memory
from inference.writer import InlineWriter, OrderedWriter
from data.records import (PREDICTION_COLUMNS, VERTEBRA_COLUMNS, FilmRecord,
                               error_row)



def collect_inputs(inputs: list[str | os.PathLike], skip_folder: str | os.PathLike | None = None
                   ) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files, folders (recursively), manifest CSVs and DICOMDIRs into image paths.

    Returns ``(paths, problems)``: problems are inputs that could not be listed, with a reason.
    See :func:`data.discovery.find_inputs` for the rules (and ``skip_folder``)."""
    return find_inputs([os.fspath(i) for i in inputs], skip_folder=skip_folder)


def run_inputs(inputs: list[str | os.PathLike], out: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """The inputs of a run into ``out``: their image paths, their output names
    (:func:`output_names`) and the inputs that could not be listed, with a reason. An output
    folder inside an input folder is not walked: its overlays are not inputs of the next run;
    films in folders inside ``out``, or named inside it, are inputs as any other."""
    paths, problems = collect_inputs(inputs, skip_folder=out)
    return paths, output_names(paths), problems


MAX_NAME_BYTES = 150  # a name gets suffixes such as "_heatmap.npy"; file systems allow 255 bytes
LOCK_FILE = ".infer.lock"
FLUSH_SECONDS = 30.0  # the tables are rewritten at least this often while films are written


def _path_hash(path: str, digits: int) -> str:
    return hashlib.sha1(path.encode()).hexdigest()[:digits]


def _short_stem(stem: str, path: str) -> str:
    """``stem``, cut to fit :data:`MAX_NAME_BYTES` with a hash of the path when it is too long."""
    if len(stem.encode()) <= MAX_NAME_BYTES:
        return stem
    head = stem.encode()[:MAX_NAME_BYTES - 9].decode(errors="ignore")
    return f"{head}_{_path_hash(path, 8)}"


def output_names(paths: list[str]) -> list[str]:
    """A file stem per input, unique by construction: stems shared by several inputs get a
    hash of the path, and a hashed name that meets another input's own stem gets a longer
    hash; over-long stems are cut and hashed. Names are compared regardless of case, as a
    case-insensitive file system (macOS, Windows, many shares) holding ``--out`` sees them."""
    stems = [_short_stem(Path(p).stem or Path(p).name, p) for p in paths]
    names = list(stems)
    for digits in (8, 16, 40):
        seen = Counter(n.casefold() for n in names)
        clash = {n for n, c in seen.items() if c > 1}
        if not clash:
            break
        names = [f"{s}_{_path_hash(p, digits)}" if n.casefold() in clash else n
                 for n, s, p in zip(names, stems, paths)]
    if len({n.casefold() for n in names}) != len(names):  # inputs listed twice: the same path
        raise ValueError("output names: an input is listed twice")
    return names


class OutputFolderInUse(RuntimeError):
    """Another run writes into the same output folder; the message names it."""


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold ``OUT/.infer.lock`` for a run: a second run into the same folder is refused with the
    first one's pid, host and start time; a lock left by a run that no longer exists (same host,
    dead pid) is taken over."""
    lock = out / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for attempt in range(LOCK_ATTEMPTS):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = lock.read_text()
                other = json.loads(text)
            except (OSError, ValueError):
                text, other = None, {}
            if text is not None and other.get("host") == me["host"] and not _alive(other.get("pid")):
                _remove_dead_lock(lock, text)  # its run is gone
                continue
            raise OutputFolderInUse(
                f"{out}: in use by another run (pid {other.get('pid', '?')} on {other.get('host', '?')}, started "
                f"{other.get('started', '?')}); wait for it, use another --out, or remove {lock} if that run is "
                f"gone") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise OutputFolderInUse(f"{out}: other runs are taking over the lock of a run that is gone; try again")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


LOCK_ATTEMPTS = 20
TAKEOVER_GRACE_SECONDS = 10.0  # a takeover guard older than this was left by a run killed while taking over


def _remove_dead_lock(lock: Path, dead: str) -> None:
    """Remove ``lock`` if it still holds ``dead`` (the text of a run that is gone). Runs that take
    a dead run's lock over do it one at a time, under ``LOCK.takeover``, so that none removes the
    lock another has just taken; a run that finds another taking over waits a moment."""
    guard = lock.with_name(lock.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - guard.stat().st_mtime > TAKEOVER_GRACE_SECONDS:
                guard.unlink()
        time.sleep(0.05)
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text() == dead:
                lock.unlink()
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _identifiers(header) -> dict:
    return {kw: str(header.get(kw, "")) for kw in IDENTIFIER_KEYWORDS}


def sr_findings(record: FilmRecord) -> dict:
    """The findings of a film's DICOM SR (inference.dicom_out.structured_report) from its record."""
    findings = {"p_fracture": record.p_fracture, "p_acute": record.p_acute}
    vertebrae = record.vertebrae
    in_mm = bool(vertebrae) and all(v.heights_mm for v in vertebrae)
    findings["height_unit"] = "mm" if in_mm else "px"
    # an untrusted level is not coded as anatomy: "vertebra 3 (L2?)" has no finding site
    findings["vertebrae"] = [
        {**v.to_json_dict(), "level": v.level if record.levels_trusted else f"vertebra {k + 1} ({v.level}?)",
         "heights": [(v.heights_mm if in_mm else v.heights)[h] for h in ("anterior", "middle", "posterior")]}
        for k, v in enumerate(vertebrae)]
    return findings


def _write_dicom_outputs(out: Path, source, name: str, overlay_bgr: np.ndarray, record: FilmRecord,
                         options: OutputOptions) -> dict:
    """DICOM Secondary Capture of the overlay and a Comprehensive SR, referencing the source
    (``source``: its parsed header). One that cannot be made (e.g. a source without
    StudyInstanceUID) is left out and its reason kept under ``errors``; the film's other
    outputs stand."""
    from inference import dicom_out

    def key():  # the output folder's, so that a resumed run maps a study as the run before it did
        return None if options.keep_identifiers else dicom_out.folder_deid_key(out)

    makers = {}
    if options.dicom_sc:
        makers["secondary_capture"] = ("sc", lambda: dicom_out.secondary_capture(
            source, overlay_bgr, keep_identifiers=options.keep_identifiers, deid_key=key()))
    if options.dicom_sr:
        makers["structured_report"] = ("sr", lambda: dicom_out.structured_report(
            source, sr_findings(record), keep_identifiers=options.keep_identifiers, deid_key=key()))
    written, failed = {}, {}
    for kind, (suffix, make) in makers.items():
        try:
            dicom_out.write_dicom(make(), out / f"{name}_{suffix}.dcm")
        except Exception as exc:  # only this output is lost
            failed[kind] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"{record.image}: no DICOM {kind.replace('_', ' ')}: {failed[kind]}", stacklevel=2)
        else:
            written[kind] = f"{name}_{suffix}.dcm"
    if failed:
        written["errors"] = failed
    return written


@dataclass
class InferenceSummary:
    n_ok: int
    n_failed: int
    seconds: float
    predictions_csv: Path
    n_skipped: int = 0  # complete outputs found by --resume
    # the rows without outputs, by status: error, refused, no_spine (n_failed is their sum)
    failed_by_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputOptions:
    """The options that shape a film's outputs (its JSON's ``fingerprint`` names them)."""

    keep_identifiers: bool = False
    dicom_sc: bool = False
    dicom_sr: bool = False
    voi_lut: bool = False
    max_pixels: int = 50_000_000
    backend: str = "torch"  # or "onnx" (inference/onnx.py): the same outputs to 1e-4, not to the bit
    min_spine_score: float = NO_SPINE_SCORE  # below it a film is no_spine (inference/acceptance.py); 0: off
    full_resolution: bool = False  # decode every film whole (default: large films reduced, see decoded_size)


# options that change nothing written for an input other than DICOM
DICOM_ONLY_OPTIONS = ("keep_identifiers", "dicom_sc", "dicom_sr", "voi_lut")
# options a fingerprint records by their effect on the film instead: its ``reduction`` (absent: none)
PER_FILM_OPTIONS = ("full_resolution",)


def fingerprint_options(options: OutputOptions, source_format: str | None) -> dict:
    """The options of a fingerprint: those that shape the outputs of an input of this format."""
    chosen = {k: v for k, v in dataclasses.asdict(options).items() if k not in PER_FILM_OPTIONS}
    if source_format != "dicom":
        chosen = {k: v for k, v in chosen.items() if k not in DICOM_ONLY_OPTIONS}
    return chosen


def decoded_size(predictor, options: OutputOptions) -> tuple[int, int] | None:
    """The smallest size a film may be decoded at for ``predictor`` (inference.predictor.min_decoded_size),
    or None with ``full_resolution``."""
    if options.full_resolution:
        return None
    return min_decoded_size(predictor.image_size, getattr(predictor, "point_refiner", None) is not None)


def dicom_output_files(record: FilmRecord) -> list[str]:
    """The DICOM files a film's record names (its ``dicom_outputs`` less the reasons of those
    that could not be made)."""
    return [v for v in (record.dicom_outputs or {}).values() if isinstance(v, str)]


def same_source(path: str, fingerprint: dict) -> bool:
    """Whether the file at ``path`` is still the one of ``fingerprint`` (size, mtime_ns, then sha256)."""
    try:
        stat = os.stat(path)
        if (stat.st_size, stat.st_mtime_ns) != (fingerprint.get("size"), fingerprint.get("mtime_ns")):
            return False
        return file_fingerprint(path, stat)["sha256"] == fingerprint.get("sha256")
    except OSError:
        return False


IDENTIFIER_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate")


def _heatmap_peak(heatmap: np.ndarray, to_image: dict) -> tuple[list[float], float]:
    i, j = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    s, (ox, oy) = to_image["scale"], to_image["offset"]
    return [float(s * j + ox), float(s * i + oy)], float(heatmap[i, j])


def _heatmap_on_display(heatmap: np.ndarray, box, display_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """Resample the letterboxed heatmap onto the (downsized) original image."""
    H, W = box.out_hw
    up = cv2.resize(heatmap, (W, H), interpolation=cv2.INTER_LINEAR)
    # at least one row and column: a film of extreme aspect ratio scales its short side below a pixel
    nh, nw = max(1, round(image_hw[0] * box.scale)), max(1, round(image_hw[1] * box.scale))
    crop = up[box.pad_top:box.pad_top + nh, box.pad_left:box.pad_left + nw]
    return cv2.resize(crop, (display_hw[1], display_hw[0]), interpolation=cv2.INTER_LINEAR)


def _decision_of(predictor) -> tuple:
    """(calibrator, operating point name, threshold) of a predictor, or Nones without calibration."""
    cal = getattr(predictor, "calibrator", None)
    if cal is None:
        return None, None, None
    point = getattr(predictor, "operating_point", None) or cal.default
    return cal, point, cal.threshold(point)


def completed_record(out: Path, path: str, name: str, decision: tuple | None = None,
                     checkpoint_id: str | None = None, options: OutputOptions = OutputOptions(),
                     min_size: tuple[int, int] | None = None) -> FilmRecord | None:
    """The record of an input whose outputs are all present (for --resume), read back through
    the schema; None when it must be redone.

    The JSON is written last, so its presence means the heatmaps before it are complete.
    ``decision``: the (operating point, threshold) this run decides at, or None; an output
    decided otherwise is not complete. So is one whose ``fingerprint`` names another input file
    (size, mtime_ns, sha256) or other ``options``, or none, or a film decoded at another
    reduction than ``min_size`` (:func:`decoded_size`) gives it. A JSON that does not fit the
    schema (another version's) is redone."""
    record_path = out / f"{name}.json"
    if not record_path.is_file():
        return None
    try:
        record = FilmRecord.from_json_dict(json.loads(record_path.read_text()))
    except (OSError, ValueError, TypeError):  # RecordError is a ValueError
        return None
    if record.image != path:
        return None
    if checkpoint_id is not None and record.checkpoint_id != checkpoint_id:
        return None  # made by another model: redo it
    if not all((out / f).is_file() for f in (record.heatmap["npy"], record.heatmap["png"],
                                             *dicom_output_files(record))):
        return None
    made_from = record.fingerprint or {}
    if made_from.get("options") != fingerprint_options(options, made_from.get("format")):
        return None  # e.g. --dicom-sr added, or --keep-identifiers left out
    if made_from.get("reduction", 1) != reduction_factor(*record.image_size, min_size):
        return None  # decoded reduced where this run would not, or the other way round (--full-resolution)
    if not same_source(path, made_from):
        return None  # the input was replaced or edited
    had = record.decision
    if decision is not None and (not had or (had.get("operating_point"), had.get("threshold")) != decision):
        return None
    if decision is None and had:
        return None
    return record


def kept_record(predictor, out: Path, path: str, name: str, options: OutputOptions) -> FilmRecord | None:
    """The record ``--resume`` keeps for an input: :func:`completed_record` for what this
    predictor writes with these options (its model, decision and fingerprint); None when the
    input must be redone."""
    _, point, threshold = _decision_of(predictor)
    decision = (point, threshold) if point is not None else None
    return completed_record(out, path, name, decision, getattr(predictor, "checkpoint_id", None), options,
                            decoded_size(predictor, options))


def run_inference(predictor: Predictor, inputs: list[str], out: str | os.PathLike, batch_size: int = 8,
                  num_workers: int = 0, voi_lut: bool = False, max_pixels: int = 50_000_000,
                  progress: bool = True, resume: bool = False, keep_identifiers: bool = False,
                  dicom_sc: bool = False, dicom_sr: bool = False,
                  min_spine_score: float = NO_SPINE_SCORE, full_resolution: bool = False) -> InferenceSummary:
    """Run ``predictor`` over every input and write the outputs of docs/formats.md.

    ``resume`` skips inputs whose outputs are complete. ``dicom_sc`` / ``dicom_sr`` add a
    DICOM Secondary Capture of the overlay / a Comprehensive SR for DICOM inputs. Patient
    name, ID and birth date are left out of the JSON, and the SC/SR are a de-identified copy
    (new UIDs, a pseudonymous patient), unless ``keep_identifiers``: docs/formats.md, "DICOM
    outputs and identifiers". A film whose strongest vertebral-body score is below
    ``min_spine_score`` gets a ``no_spine`` row instead of a probability (0: every film gets one).
    A large film is decoded reduced where that loses nothing the networks use (:func:`decoded_size`),
    its outputs still in the original film's pixels; ``full_resolution`` decodes every film whole."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        return _run(predictor, inputs, out, batch_size, num_workers, voi_lut, max_pixels, progress, resume,
                    OutputOptions(keep_identifiers=keep_identifiers, dicom_sc=dicom_sc, dicom_sr=dicom_sr,
                                  voi_lut=voi_lut, max_pixels=max_pixels,
                                  backend=getattr(predictor, "backend", "torch"),
                                  min_spine_score=min_spine_score, full_resolution=full_resolution))


def _run(predictor, inputs, out: Path, batch_size: int, num_workers: int, voi_lut: bool, max_pixels: int,
         progress: bool, resume: bool, options: OutputOptions) -> InferenceSummary:
    start = time.time()
    paths, names, problems = run_inputs(inputs, out)
    rows: list[dict] = [error_row(p, "", why) for p, why in problems]
    records: list[FilmRecord] = []  # the films written or kept, in the order of their rows
    todo = list(range(len(paths)))
    if resume:
        done = {i: kept_record(predictor, out, paths[i], names[i], options) for i in todo}
        records += [r for r in done.values() if r is not None]
        rows += [r.prediction_row() for r in done.values() if r is not None]
        todo = [i for i in todo if done[i] is None]
    # at once: a run killed before its first flush leaves its own tables, not an earlier run's
    write_tables(out, *in_input_order(rows, records, paths))
    dataset = InferenceDataset([paths[i] for i in todo], predictor.image_size, voi_lut=voi_lut, max_pixels=max_pixels,
                               min_decoded_size=decoded_size(predictor, options))
    # one batch ahead per worker: each waiting batch holds its films' full-size pixels in memory
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_items,
                        prefetch_factor=1 if num_workers else None,
                        worker_init_fn=functools.partial(worker_init, os.getpid()))  # workers die with the run
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc="inference", unit="img", disable=not progress)
    flushed = time.time()
    try:
        _process(predictor, loader, todo, paths, names, out, options, rows, records, bar, flushed)
    finally:  # also on Ctrl-C: the tables hold every film finished so far
        bar.close()
        table = write_tables(out, *in_input_order(rows, records, paths))
    errors = table[table["status"] != "ok"]
    n_failed = len(errors)
    return InferenceSummary(n_ok=len(table) - n_failed, n_failed=n_failed, seconds=time.time() - start,
                            predictions_csv=out / "predictions.csv", n_skipped=len(paths) - len(todo),
                            failed_by_status={k: int(v) for k, v in errors["status"].value_counts().items()})


def _process(predictor, loader, todo, paths, names, out, options, rows, records, bar, flushed) -> None:
    """Run the loader's batches, appending each film's row (and record) as it is written.

    The films' outputs are written by a background thread (inference/writer.py) while the next
    batch runs; a failure there is the film's error row, as in :func:`write_film`."""
    todo_paths, todo_names = [paths[i] for i in todo], [names[i] for i in todo]
    writer = OrderedWriter()

    def take(finished) -> None:
        for index, outcome, exc in finished:
            if exc is not None:
                outcome = (error_row(todo_paths[index], todo_names[index],
                                     f"writing outputs failed: {type(exc).__name__}: {exc}"), None)
            rows.append(outcome[0])
            if outcome[1] is not None:
                records.append(outcome[1])

    try:
        for batch in loader:
            good = readable(batch)
            results = predict_films(predictor, good) if good else []
            take(queue_batch(writer, predictor, out, batch, results, todo_paths, todo_names, options))
            take(writer.done())
            release_freed_memory()  # what this batch freed, before the next one allocates
            bar.update(len(batch))
            if time.time() - flushed >= FLUSH_SECONDS:  # a killed run keeps what it finished
                write_tables(out, rows, records)
                flushed = time.time()
    finally:  # also on Ctrl-C: what was queued is written, and its rows are kept
        take(writer.close())


def readable(batch: list[dict]) -> list[dict]:
    """The items of a loaded batch that were read and are radiographs: those to predict."""
    return [b for b in batch if "error" not in b and "refused" not in b]


def predict_films(predictor, items: list[dict]) -> list[FilmPrediction]:
    """A :class:`FilmPrediction` per readable item, from either backend (inference/predictor.py's
    ``Predictor``, inference/onnx.py's ``OnnxPredictor``)."""
    return predictor.predict(items)


def write_batch(predictor, out: Path, batch: list[dict], results: list[FilmPrediction], paths: list[str],
                names: list[str], options: OutputOptions) -> list[tuple[dict, FilmRecord | None]]:
    """Each item's ``predictions.csv`` row and record (None where it has no outputs), its
    outputs written: ``results`` are the predictions of :func:`readable` items, in order;
    ``paths`` and ``names`` are indexed by an item's ``index``."""
    writer = InlineWriter()
    queue_batch(writer, predictor, out, batch, results, paths, names, options)
    return [outcome for _, outcome, _ in writer.close()]


def queue_batch(writer, predictor, out: Path, batch: list[dict], results: list[FilmPrediction], paths: list[str],
                names: list[str], options: OutputOptions) -> list[tuple]:
    """:func:`write_batch` through ``writer`` (inference/writer.py): each item's outcome, or the
    job that writes it, is queued under the item's ``index``; returns what finished meanwhile."""
    films = iter(results)
    finished = []
    for b in batch:
        path, name = paths[b["index"]], names[b["index"]]
        if "error" in b:
            writer.put(b["index"], (error_row(path, name, b["error"]), None))
        elif "refused" in b:
            writer.put(b["index"], (error_row(path, name, b["refused"], status="refused"), None))
        else:  # the job keeps what writing reads, not the full-size pixels or the network input
            item = {key: v for key, v in b.items() if key not in ("pixels", "image")}
            finished += writer.submit(b["index"], write_film, predictor, out, path, name, item, next(films), options)
    return finished


def write_film(predictor, out: Path, path: str, name: str, item: dict, film: FilmPrediction,
               options: OutputOptions = OutputOptions()) -> tuple[dict, FilmRecord | None]:
    """Write one predicted film's outputs: its ``predictions.csv`` row and its record, or an
    error row (and no record) when its outputs are not finite, it shows no spine, or its outputs
    cannot be written."""
    bad = non_finite_outputs(film)
    if bad:
        return error_row(path, name, f"the model gave non-finite outputs ({bad}); its weights may be damaged"), None
    no_spine = no_spine_reason(film.spine_score, options.min_spine_score)
    if no_spine:  # no probability for a film without a spine
        return error_row(path, name, no_spine, status="no_spine"), None
    try:
        record = _write_outputs(predictor, out, path, name, item, film, options)
    except Exception as exc:  # e.g. a full disk: record it, keep going
        remove_film_outputs(out, name)  # none left half-made beside an error row
        return error_row(path, name, f"writing outputs failed: {type(exc).__name__}: {exc}"), None
    return record.prediction_row(), record


def remove_film_outputs(out: Path, name: str) -> None:
    """Remove the files of film ``name`` (its JSON first: without it the rest is incomplete)."""
    for suffix in (".json", "_heatmap.npy", "_heatmap.png", "_sc.dcm", "_sr.dcm"):
        (out / f"{name}{suffix}").unlink(missing_ok=True)


def in_input_order(rows: list[dict], records: list[FilmRecord], paths: list[str]) -> tuple[list[dict], list[FilmRecord]]:
    """``rows`` and ``records`` in the order of their inputs in ``paths`` (rows of inputs that
    could not be listed first, as they came), so a resumed or sharded run's tables read as an
    uninterrupted run's."""
    position = {p: k for k, p in enumerate(paths)}
    return (sorted(rows, key=lambda row: position.get(row["image"], -1)),
            sorted(records, key=lambda record: position[record.image]))


def write_tables(out: Path, rows: list[dict], records: list[FilmRecord]) -> pd.DataFrame:
    """``predictions.csv``, ``vertebrae.csv`` and ``errors.csv`` of the films so far, atomically."""
    table = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    atomic_write_text(out / "predictions.csv", table.to_csv(index=False))
    write_vertebrae_table(out / "vertebrae.csv", records)
    errors = table[table["status"] != "ok"][["image", "name", "error"]]
    atomic_write_text(out / "errors.csv", errors.to_csv(index=False))
    return table


def _inside(point: list[float], image_hw) -> list[float]:
    """``point`` moved onto the image's area (pixel centres at integers: -0.5 .. size - 0.5)."""
    h, w = image_hw
    return [float(min(max(point[0], -0.5), w - 0.5)), float(min(max(point[1], -0.5), h - 0.5))]


def non_finite_outputs(film: FilmPrediction) -> str:
    """The film's outputs that are NaN or infinite, named ("" when all are finite): its
    probabilities, heatmap and level confidence, and every number of its vertebrae (points,
    heights, ratios, probabilities), which its JSON, table rows and drawing carry."""
    bad = [f"{k}={v}" for k, v in film.probs.items() if not np.isfinite(v)]
    if film.heatmap is not None and not np.isfinite(film.heatmap).all():
        bad.append("heatmap")
    if film.level_confidence is not None and not np.isfinite(film.level_confidence):
        bad.append(f"level_confidence={film.level_confidence}")
    for v in film.vertebrae:
        fields = [key for key, value in v.to_json_dict().items() if not _all_finite(value)]
        bad += [f"vertebra {v.level} {key}" + (f"={getattr(v, key)}" if key.startswith("p_") else "")
                for key in fields]
    return ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")


def _all_finite(value) -> bool:
    """Whether every number in ``value`` (a number, or lists and dicts of them) is finite."""
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, (float, np.floating)):
        return bool(np.isfinite(value))
    return True


def write_vertebrae_table(path: Path, records: list[FilmRecord]) -> None:
    """``OUT/vertebrae.csv``: one row per vertebra of ``records`` (the films this run wrote and,
    with --resume, those it kept, read back through the schema)."""
    rows = [row for r in records for row in r.vertebra_rows()]
    columns = VERTEBRA_COLUMNS + [c for r in records[:1] for c in r.vertebra_columns() if c not in VERTEBRA_COLUMNS]
    vertebrae = pd.DataFrame(rows, columns=columns)
    vertebrae["genant_grade"] = vertebrae["genant_grade"].astype("Int64")  # 0-3 or empty, never "2.0"
    atomic_write_text(path, vertebrae.to_csv(index=False))


def _write_outputs(predictor: Predictor, out: Path, path: str, name: str, item: dict, film: FilmPrediction,
                   options: OutputOptions = OutputOptions()) -> FilmRecord:
    """Write one film's heatmap, overlay, DICOM outputs and, last, its JSON; returns its record."""
    p = film.probs
    head_map = np.asarray(film.heatmap, dtype=np.float32)
    to_image = item["box"].heatmap_to_image(HEATMAP_STRIDE)
    vertebrae = film.vertebra_dicts()
    # the written map and its peak follow the film's max rule: dense head or vertebra, whichever is higher
    heatmap = fracture_map(head_map, vertebrae, to_image)
    peak, peak_value = fracture_peak(head_map, vertebrae, to_image)
    head_peak, head_peak_value = _heatmap_peak(head_map, to_image)
    # a peak in the letterbox padding (a blank film) is reported at the nearest image pixel
    peak, head_peak = (_inside(q, item["image_size"]) for q in (peak, head_peak))
    display = item["display"]
    on_display = _heatmap_on_display(heatmap, item["box"], display.shape, item["image_size"])
    f = display.shape[1] / item["image_size"][1]
    overlay = overlay_heatmap(display, on_display, peak=(peak[0] * f, peak[1] * f),
                              label=f"p(fracture) {p['p_fracture']:.2f}  p(acute) {p['p_acute']:.2f}")
    if vertebrae:
        overlay = draw_vertebrae(overlay, vertebrae, scale=f, levels_trusted=film.levels_trusted)
    # written once the overlay is drawn: a film that fails before leaves no file behind
    atomic_save_npy(out / f"{name}_heatmap.npy", heatmap)
    atomic_write_image(out / f"{name}_heatmap.png", overlay)
    cal, point, threshold = _decision_of(predictor)
    decision = calibration = None
    if cal is not None:
        stored = cal.operating_points[point]
        decision = {"operating_point": point, "threshold": threshold,
                    "fracture": bool(float(p["p_fracture"]) >= threshold),
                    "validation_sensitivity": stored.get("sensitivity"),
                    "validation_specificity": stored.get("specificity")}
        calibration = {"method": cal.method, "fitted_on_images": cal.info.get("n_images"),
                       "split": cal.info.get("split"), "date": cal.info.get("date")}
    levels_trusted = film.levels_trusted
    record = FilmRecord(
        image=path,
        name=name,
        p_fracture=float(p["p_fracture"]),
        p_acute=float(p["p_acute"]),
        p_acute_given_fracture=float(p["p_acute_given_fracture"]),
        p_fracture_image_head=float(p.get("p_fracture_image_head", p["p_fracture"])),
        heatmap_peak=peak,
        heatmap_peak_value=peak_value,
        heatmap_peak_head=head_peak,
        heatmap_peak_head_value=head_peak_value,
        image_size=list(item["image_size"]),
        pixel_spacing_mm=list(item["pixel_spacing_mm"]) if item["pixel_spacing_mm"] else None,
        heatmap={"npy": f"{name}_heatmap.npy", "png": f"{name}_heatmap.png", "shape": list(heatmap.shape),
                 "to_image": to_image},
        vertebrae=list(film.vertebrae),
        level_confidence=film.level_confidence,
        levels_trusted=levels_trusted,
        vertebra_error=film.vertebra_error,
        checkpoint_id=predictor.checkpoint_id,
        model={k: predictor.meta.get(k) for k in ("architecture", "backbone", "code_version", "image_size")},
        p_fracture_uncalibrated=(float(p["p_fracture_uncalibrated"])
                                 if cal is not None and "p_fracture_uncalibrated" in p else None),
        decision=decision,
        calibration=calibration,
        frames=item["frames"] if item.get("frames", 1) > 1 else None,
        fingerprint={**item["source"], "options": fingerprint_options(options, item["source"]["format"])},
        warnings=list(item.get("warnings") or []) or None,
    )
    if item.get("dicom"):
        record.dicom = item["dicom"]  # UIDs and modality; identifiers only with keep_identifiers
        header = item.get("dicom_header")
        if options.keep_identifiers:
            record.patient = _identifiers(header)
        if options.dicom_sc or options.dicom_sr:
            record.dicom_outputs = _write_dicom_outputs(out, header, name, overlay, record, options)
    for stale in {f"{name}_sc.dcm", f"{name}_sr.dcm"} - set(dicom_output_files(record)):
        (out / stale).unlink(missing_ok=True)  # an earlier run's, made with other options
    atomic_write_json(out / f"{name}.json", record.to_json_dict(), strict=True)  # last: its presence marks a complete output
    return record
