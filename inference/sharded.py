"""Sharded inference: one run over many processes, GPUs and machines, on Lightning's machinery.

    python -m inference.sharded --model BUNDLE --out OUT --accelerator gpu --devices 4 INPUT ...
    torchrun --nnodes 2 --nproc-per-node 4 ... -m inference.sharded --num-nodes 2 --devices 4 ...
    python -m inference.sharded merge --out OUT

``Trainer.predict`` with the DDP strategy runs one rank per device. Rank 0 takes the run's lock
on OUT (a second run into OUT, sharded or not, is refused), lists and names the inputs as
``infer.py`` does and sends the list to every rank; input k goes to rank ``k mod W``. Each rank
predicts its films, writes their outputs into OUT through the writers of single-process
inference, and keeps its own tables under ``OUT/parts/rank-NNNNN/`` current. At the end rank 0
merges the parts into one ``predictions.csv``, ``vertebrae.csv`` and ``errors.csv``, in the
format and order of a single-process run (inference/parts.py, docs/formats.md). ``--resume``
keeps every film whose outputs are complete, on every rank, by the rules of ``infer.py``.

Rank 0 prints the summary and carries the exit status: 0 if every input has a prediction, 1 if
any has none (status error, refused or no_spine) or has no row yet, 2 on a usage error or a
refused run, 130 on Ctrl-C and 143 on SIGTERM (each rank writes its part first: --resume
completes the run); the other ranks exit 0 unless they crash.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from data.records import FilmRecord, error_row
from inference.cli_args import add_full_resolution, count_at_least, number_between, output_folder_problem
from inference.acceptance import NO_SPINE_SCORE
from inference.parts import (MergeError, MergeSummary, merge_parts, part_dir, rank_share, record_rank_times,
                             write_run_listing)
from inference.pipeline import (FLUSH_SECONDS, OutputFolderInUse, OutputOptions, decoded_size, in_input_order,
                                kept_record, output_lock, predict_films, readable, run_inputs, write_batch,
                                write_tables)
from inference.predictor import InferenceDataset, Predictor, collate_items, worker_init
from models.bundle import ModelError
from models.registry import default_model

# the ranks wait for each other while rank 0 lists an archive and while the slowest rank
# finishes its share: far longer than torch.distributed's default of 30 minutes
RANK_WAIT = timedelta(hours=24)


class RunNotStarted(RuntimeError):
    """Rank 0 could not list the inputs or write the run's listing; the message says why."""


class ShardedRun:
    """One rank's view of a sharded run: its share of the inputs, and the rows and records of
    its part (the films it wrote and, with --resume, those it kept)."""

    def __init__(self, predictor: Predictor, inputs: list[str], out: Path, options: OutputOptions, resume: bool,
                 batch_size: int, num_workers: int, voi_lut: bool, max_pixels: int):
        self.predictor, self.inputs, self.out, self.options, self.resume = predictor, inputs, out, options, resume
        self.batch_size, self.num_workers, self.voi_lut, self.max_pixels = batch_size, num_workers, voi_lut, max_pixels
        self.lock = contextlib.ExitStack()  # rank 0 holds OUT's lock in it for the whole run
        self.started = time.time()
        self.rank = 0
        self.paths: list[str] = []
        self.names: list[str] = []
        self.todo: list[int] = []  # indices into paths of the films this rank predicts
        self.todo_paths: list[str] = []
        self.todo_names: list[str] = []
        self.n_kept = 0
        self.rows: list[dict] = []
        self.records: list[FilmRecord] = []
        self.flushed = 0.0
        self.part: Path | None = None  # set once the rank knows its share
        self.predict_started = self.cpu_started = 0.0
        self.stopped_by: int | None = None  # the signal that stopped the run

    def start(self, trainer: L.Trainer) -> None:
        """Rank 0 takes the lock and lists the inputs; every rank then takes its share."""
        self.rank, world = trainer.global_rank, trainer.world_size
        listing = None
        if self.rank == 0:
            try:
                self.lock.enter_context(output_lock(self.out))
                paths, names, problems = run_inputs(self.inputs, self.out)
                write_run_listing(self.out, paths, names, world, {
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint_id": self.predictor.checkpoint_id})
                listing = ("ok", paths, names, problems)
            except OutputFolderInUse as exc:  # every rank must hear of it, or the others wait forever
                listing = ("refused", str(exc))
            except Exception as exc:
                listing = ("failed", f"{self.out}: the run could not start: {type(exc).__name__}: {exc}")
        listing = trainer.strategy.broadcast(listing, src=0)
        if listing[0] == "refused":
            raise OutputFolderInUse(listing[1])
        if listing[0] == "failed":
            raise RunNotStarted(listing[1])
        _, self.paths, self.names, problems = listing
        share = rank_share(len(self.paths), self.rank, world)
        kept = {i: kept_record(self.predictor, self.out, self.paths[i], self.names[i], self.options)
                for i in share} if self.resume else {}
        self.records = [r for r in kept.values() if r is not None]
        self.n_kept = len(self.records)
        self.rows = [error_row(p, "", why) for p, why in problems] if self.rank == 0 else []
        self.rows += [r.prediction_row() for r in self.records]
        self.todo = [i for i in share if kept.get(i) is None]
        self.todo_paths = [self.paths[i] for i in self.todo]  # by the index of the dataset's items
        self.todo_names = [self.names[i] for i in self.todo]
        self.part = part_dir(self.out, self.rank)
        self.write_part()  # at once: the part of an earlier run is not mistaken for this one's
        self.predict_started, self.cpu_started = time.perf_counter(), time.process_time()

    def dataset(self) -> InferenceDataset:
        return InferenceDataset(self.todo_paths, self.predictor.image_size, voi_lut=self.voi_lut,
                                max_pixels=self.max_pixels, min_decoded_size=decoded_size(self.predictor, self.options))

    def add_batch(self, batch: list[dict], predictions: list) -> None:
        """Write the outputs of one predicted batch (``predictions``: one per readable item)."""
        for row, record in write_batch(self.predictor, self.out, batch, predictions, self.todo_paths,
                                       self.todo_names, self.options):
            self.rows.append(row)
            if record is not None:
                self.records.append(record)
        if time.time() - self.flushed >= FLUSH_SECONDS:  # a killed run keeps what it finished
            self.write_part()

    def write_part(self) -> None:
        if self.part is not None:
            write_tables(self.part, *in_input_order(self.rows, self.records, self.paths))
            self.flushed = time.time()

    def times(self) -> list[float]:
        """This rank's films predicted, seconds and CPU seconds since it took its share, films kept."""
        return [len(self.todo), time.perf_counter() - self.predict_started, time.process_time() - self.cpu_started,
                self.n_kept]


class FilmPredictionModule(L.LightningModule):
    """The :class:`~inference.predictor.Predictor` as a LightningModule: ``predict_step`` gives a
    :class:`~inference.predictor.FilmPrediction` per readable film of a batch."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        self.predictor = predictor
        # registered so that Lightning moves them to the rank's device
        self.networks = nn.ModuleList([m for m in (predictor.net, predictor.vertebra_net, predictor.point_refiner)
                                       if m is not None])

    def on_predict_start(self) -> None:
        self.predictor.device = self.device

    def predict_step(self, batch: list[dict]) -> list:
        good = readable(batch)
        return predict_films(self.predictor, good) if good else []


class ShardInputs(L.LightningDataModule):
    """The rank's share of the run's inputs (a rank may have none)."""

    def __init__(self, run: ShardedRun):
        super().__init__()
        self.run = run
        self.allow_zero_length_dataloader_with_multiple_devices = True  # fewer films than ranks, or all kept

    def setup(self, stage: str) -> None:
        self.run.start(self.trainer)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.run.dataset(), batch_size=self.run.batch_size, num_workers=self.run.num_workers,
                          collate_fn=collate_items,
                          worker_init_fn=functools.partial(worker_init, os.getpid()))  # workers die with the rank

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # the predictor moves the images; the rest of an item (pixels, header) stays on the host


class PartWriter(BasePredictionWriter):
    """Writes each predicted batch's outputs and keeps the rank's part current."""

    def __init__(self, run: ShardedRun):
        super().__init__(write_interval="batch")
        self.run = run

    def on_predict_start(self, trainer, pl_module) -> None:
        # in place of Lightning's handler, which lets a prediction run on: SIGTERM stops the rank as Ctrl-C does
        signal.signal(signal.SIGTERM, functools.partial(_stop, self.run))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.run.add_batch(batch, prediction)


def _stop(run: ShardedRun, signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one while the part is written
    run.stopped_by = signum
    raise KeyboardInterrupt


def run_sharded(run: ShardedRun, trainer: L.Trainer) -> tuple[int, MergeSummary | None]:
    """Run ``trainer.predict`` over the inputs, then merge the parts on rank 0. Returns the number
    of films kept by --resume over all ranks and, on rank 0, the merge's summary."""
    with run.lock:
        try:
            trainer.predict(FilmPredictionModule(run.predictor), datamodule=ShardInputs(run), return_predictions=False)
        finally:  # also on Ctrl-C or a crash: the part holds every film this rank finished
            run.write_part()
        # a rank with nothing to predict skips predict's hooks, so the ranks meet here
        times = trainer.strategy.all_gather(torch.tensor(run.times(), dtype=torch.float64,
                                                         device=trainer.strategy.root_device))
        times = times.reshape(-1, 4).cpu().tolist()  # one row per rank
        trainer.strategy.barrier("parts written")
        summary = None
        if run.rank == 0:
            record_rank_times(run.out, times)
            summary = merge_parts(run.out)
    return int(sum(row[3] for row in times)), summary


@contextlib.contextmanager
def _sigterm_stops(run: ShardedRun):
    """Outside ``Trainer.predict`` too, SIGTERM stops the rank as Ctrl-C does."""
    previous = signal.signal(signal.SIGTERM, functools.partial(_stop, run))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _devices(text: str):
    return text if text == "auto" else count_at_least(1)(text)


def run_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.sharded", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or manifest CSVs")
    parser.add_argument("--model", help="a bundle folder, a registry name (models/registry.json) or a training "
                                        "checkpoint; default: the shipped model")
    parser.add_argument("--download", action="store_true", help="allow fetching a registry model from its URL")
    parser.add_argument("--sha256", default=None, help="refuse the model unless its sha256 matches")
    parser.add_argument("--out", required=True, help="output folder (shared by every machine of the run)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu", "auto"), default="auto")
    parser.add_argument("--devices", type=_devices, default="auto", help="processes per machine (auto: every GPU)")
    parser.add_argument("--num-nodes", type=count_at_least(1), default=1, help="machines")
    parser.add_argument("--strategy", choices=("ddp", "auto"), default="ddp",
                        help="ddp: one process per device, as launched by Lightning, torchrun or SLURM")
    parser.add_argument("--batch-size", type=count_at_least(1), default=8)
    parser.add_argument("--num-workers", type=count_at_least(0), default=2, help="data loader workers per process")
    parser.add_argument("--voi-lut", action="store_true", help="apply the DICOM VOI LUT / window")
    parser.add_argument("--max-pixels", type=count_at_least(1), default=50_000_000)
    add_full_resolution(parser)
    parser.add_argument("--resume", action="store_true", help="skip inputs whose outputs are complete")
    parser.add_argument("--keep-identifiers", action="store_true",
                        help="copy patient name, ID and birth date into the outputs (left out by default)")
    parser.add_argument("--dicom-sc", action="store_true", help="also write the overlay as a DICOM Secondary Capture")
    parser.add_argument("--dicom-sr", action="store_true", help="also write a DICOM Comprehensive SR (TID 1500)")
    parser.add_argument("--operating-point", choices=("high_sensitivity", "balanced", "high_specificity"),
                        default=None, help="threshold of the per-image decision (a calibrated model only)")
    parser.add_argument("--min-spine-score", type=number_between(0, 1), default=NO_SPINE_SCORE,
                        help=f"a film whose strongest vertebral-body score is below this gets status no_spine "
                             f"(default {NO_SPINE_SCORE:g}; 0 turns the rule off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    out = Path(args.out)
    problem = output_folder_problem(out, args.inputs)
    if problem:
        parser.error(problem)
    try:
        model = args.model or default_model()
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if model is None:
        parser.error("no model named and none ships in models/registry.json: give --model BUNDLE")
    try:
        predictor = Predictor(model, device="cpu", sha256=args.sha256, operating_point=args.operating_point,
                              allow_download=args.download)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    strategy = DDPStrategy(timeout=RANK_WAIT) if args.strategy == "ddp" else "auto"
    try:
        trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                            strategy=strategy, logger=False, enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=not args.quiet, use_distributed_sampler=False)
    except (MisconfigurationException, ValueError, RuntimeError) as exc:
        parser.error(" ".join(str(exc).split()))
    options = OutputOptions(keep_identifiers=args.keep_identifiers, dicom_sc=args.dicom_sc, dicom_sr=args.dicom_sr,
                            voi_lut=args.voi_lut, max_pixels=args.max_pixels, backend="torch",
                            min_spine_score=args.min_spine_score, full_resolution=args.full_resolution)
    run = ShardedRun(predictor, args.inputs, out, options, args.resume, args.batch_size, args.num_workers,
                     args.voi_lut, args.max_pixels)
    trainer.callbacks.append(PartWriter(run))
    try:
        with _sigterm_stops(run):
            kept, summary = run_sharded(run, trainer)
    except (OutputFolderInUse, RunNotStarted) as exc:
        if trainer.global_rank == 0:
            print(f"error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, OutputFolderInUse) else 1
        return 0
    except (KeyboardInterrupt, SystemExit, Exception) as exc:
        # Lightning turns an interruption into SystemExit(1); a loader worker killed by the same
        # SIGTERM surfaces as a RuntimeError
        if isinstance(exc, Exception) and run.stopped_by is None:
            raise
        signum = run.stopped_by or signal.SIGINT
        print(f"rank {run.rank} interrupted by {signal.Signals(signum).name}: {run.part or out} holds the films it "
              f"finished; run again with --resume to complete", file=sys.stderr)
        return 128 + int(signum)
    if summary is None:  # not rank 0
        return 0
    skipped = f" ({kept} already complete)" if kept else ""
    by_status = ", ".join(f"{n} {status}" for status, n in sorted(summary.failed_by_status.items()))
    print(f"{summary.n_ok} ok{skipped}, {summary.n_failed} failed"  # failed: without a prediction
          + (f" ({by_status})" if set(summary.failed_by_status) - {"error"} else "")
          + f" in {time.time() - run.started:.1f} s on "          f"{trainer.world_size} process(es); predictions: {summary.predictions_csv}"
          + (f"; errors: {out / 'errors.csv'}" if summary.n_failed else ""))
    if summary.missing:
        print(f"error: {len(summary.missing)} input(s) have no row, e.g. {summary.missing[0]}; run again with --resume",
              file=sys.stderr)
    return 1 if summary.n_failed or summary.missing else 0


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.sharded merge",
                                     description="Merge the parts of a sharded run into OUT's tables.")
    parser.add_argument("--out", required=True, help="the output folder of the sharded run")
    args = parser.parse_args(argv)
    if not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: not a folder")
    try:
        with output_lock(Path(args.out)):  # not while a run writes its parts
            summary = merge_parts(args.out)
    except (MergeError, OutputFolderInUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary.n_ok} ok, {summary.n_failed} failed, {len(summary.missing)} without a row; "
          f"predictions: {summary.predictions_csv}")
    return 1 if summary.n_failed or summary.missing else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
