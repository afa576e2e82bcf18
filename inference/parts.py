"""The parts of a sharded inference run (inference/sharded.py) and their merge.

A run over W ranks into ``OUT`` writes the per-film outputs of docs/formats.md into ``OUT`` as a
single-process run does, and its tables in parts:

    OUT/parts/run.json                  ranks, number of inputs, model, start time; at the end
                                        each rank's films, seconds and CPU seconds
    OUT/parts/inputs.csv                image, name: the run's inputs in their order, as rank 0
                                        listed and named them
    OUT/parts/rank-00000/predictions.csv, vertebrae.csv, errors.csv
    OUT/parts/rank-00001/...

Input k of ``inputs.csv`` belongs to rank ``k mod W`` (:func:`rank_share`); the inputs that could
not be listed are rank 0's. :func:`merge_parts` joins the parts into ``OUT/predictions.csv``,
``vertebrae.csv`` and ``errors.csv``, in the format and order of a single-process run. It reads
and writes every cell as text, so the merged tables hold exactly what the parts hold.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data.io_utils import atomic_write_json, atomic_write_text
from data.records import PREDICTION_COLUMNS, VERTEBRA_COLUMNS
from data.tables import TableError, read_text_table

PARTS_DIR = "parts"
RUN_FILE = "run.json"
INPUTS_FILE = "inputs.csv"
TABLES = ("predictions.csv", "vertebrae.csv", "errors.csv")


class MergeError(RuntimeError):
    """The parts of a run cannot be merged; the message names the file and the problem."""


def rank_share(n_inputs: int, rank: int, world_size: int) -> range:
    """The indices of the inputs that ``rank`` of ``world_size`` runs: every ``world_size``-th
    one from ``rank``, so each input is in exactly one share and large films that sit together
    in a folder are spread over the ranks."""
    return range(rank, n_inputs, world_size)


def part_dir(out: str | os.PathLike, rank: int) -> Path:
    return Path(out) / PARTS_DIR / f"rank-{rank:05d}"


def write_run_listing(out: Path, paths: list[str], names: list[str], world_size: int, info: dict) -> None:
    """``parts/inputs.csv`` and ``parts/run.json`` of a run starting now (atomically); the merged
    tables of an earlier run into ``out`` (they would be taken for this run's until its merge)
    and the part folders of an earlier run with more ranks removed."""
    parts = out / PARTS_DIR
    for table in TABLES:
        (out / table).unlink(missing_ok=True)
    atomic_write_text(parts / INPUTS_FILE, pd.DataFrame({"image": paths, "name": names}).to_csv(index=False))
    atomic_write_json(parts / RUN_FILE, {"ranks": world_size, "inputs": len(paths), **info})
    for folder in parts.glob("rank-*"):
        suffix = folder.name.removeprefix("rank-")
        if folder.is_dir() and suffix.isdigit() and int(suffix) >= world_size:
            for table in TABLES:
                (folder / table).unlink(missing_ok=True)
            folder.rmdir()


def record_rank_times(out: Path, times: list[list[float]]) -> None:
    """Add each rank's ``[films predicted, seconds, CPU seconds, films kept]`` to ``run.json``
    (``finished``), so a run shows how evenly its ranks worked."""
    path = out / PARTS_DIR / RUN_FILE
    run = json.loads(path.read_text())
    run["finished"] = [{"rank": rank, "films": int(films), "seconds": round(seconds, 3),
                        "cpu_seconds": round(cpu, 3), "kept": int(kept)}
                       for rank, (films, seconds, cpu, kept) in enumerate(times)]
    atomic_write_json(path, run)


@dataclass
class MergeSummary:
    n_ok: int
    n_failed: int  # rows without a prediction (status error, refused or no_spine)
    missing: list[str]  # inputs with no row in any part: the run has not finished them
    predictions_csv: Path
    failed_by_status: dict[str, int] = field(default_factory=dict)


def merge_parts(out: str | os.PathLike) -> MergeSummary:
    """Join the parts of the run in ``out`` into ``OUT/predictions.csv``, ``vertebrae.csv`` and
    ``errors.csv`` (atomically), rows in input order with the inputs that could not be listed
    first. An input found in two parts is a :class:`MergeError`; inputs found in none are
    reported as ``missing`` (a run still going, or killed: run it again with --resume)."""
    out = Path(out)
    parts = out / PARTS_DIR
    try:
        run = json.loads((parts / RUN_FILE).read_text())
        ranks = int(run["ranks"])
        inputs = read_text_table(parts / INPUTS_FILE)
    except FileNotFoundError as exc:
        raise MergeError(f"{out}: no parts of a sharded run ({exc.filename} is missing)") from None
    except (ValueError, KeyError, TypeError, TableError) as exc:
        raise MergeError(f"{parts / RUN_FILE}: unreadable ({type(exc).__name__}: {exc})") from None
    position = {image: k for k, image in enumerate(inputs["image"])}
    predictions = _read_parts(out, ranks, "predictions.csv", PREDICTION_COLUMNS)
    vertebrae = _read_parts(out, ranks, "vertebrae.csv", VERTEBRA_COLUMNS)
    listed = predictions[predictions["image"].isin(position.keys())]
    twice = listed[listed.duplicated("image", keep=False)]
    if len(twice):
        image = twice["image"].iloc[0]
        raise MergeError(f"{parts}: {image} has a row in {twice['rank'].nunique()} parts "
                         f"(ranks {', '.join(map(str, sorted(set(twice['rank']))))}); remove the stale part and "
                         f"run again with --resume")
    predictions = _in_input_order(predictions, position)
    vertebrae = _in_input_order(vertebrae, position)
    atomic_write_text(out / "predictions.csv", predictions[PREDICTION_COLUMNS].to_csv(index=False))
    atomic_write_text(out / "vertebrae.csv", vertebrae.drop(columns="rank").to_csv(index=False))
    errors = predictions[predictions["status"] != "ok"][["image", "name", "error"]]
    atomic_write_text(out / "errors.csv", errors.to_csv(index=False))
    done = set(listed["image"])
    return MergeSummary(n_ok=int((predictions["status"] == "ok").sum()), n_failed=len(errors),
                        missing=[p for p in inputs["image"] if p not in done], predictions_csv=out / "predictions.csv",
                        failed_by_status={k: int(v) for k, v in
                                          predictions.loc[predictions["status"] != "ok", "status"].value_counts().items()})


def _read_parts(out: Path, ranks: int, table: str, columns: list[str]) -> pd.DataFrame:
    """The ``table`` of every rank's part as text, with its ``rank``; a part not written yet
    counts as empty. Columns: ``columns``, then any others in the order the parts have them."""
    frames = []
    for rank in range(ranks):
        path = part_dir(out, rank) / table
        if not path.is_file():
            continue
        try:
            frame = read_text_table(path)
        except TableError as exc:
            raise MergeError(str(exc)) from None
        if "image" not in frame.columns:
            raise MergeError(f"{path}: no image column")
        frames.append(frame.assign(rank=rank))
    extra = [c for f in frames for c in f.columns if c not in columns and c != "rank"]
    order = columns + list(dict.fromkeys(extra)) + ["rank"]
    if not frames:
        return pd.DataFrame(columns=order)
    return pd.concat(frames, ignore_index=True).reindex(columns=order).fillna("")


def _in_input_order(table: pd.DataFrame, position: dict[str, int]) -> pd.DataFrame:
    key = table["image"].map(position).fillna(-1)  # inputs that could not be listed come first
    return table.assign(_position=key).sort_values("_position", kind="stable").drop(columns="_position")
