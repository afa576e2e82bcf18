"""Offline inference: fracture and acute-fracture probabilities and heatmaps.

    python infer.py --model runs/demo/bundle --out runs/demo/infer  scans/  more.dcm  manifest.csv

--model takes a bundle folder (models/bundle.py) or a name from models/registry.json; a name
whose bundle is only at a URL is fetched once with --download, checked by its sha256 and cached.
With neither --model nor --checkpoint, the shipped model is read (the registry's default).
--checkpoint takes a training checkpoint instead and converts it in memory (export it once with
`python -m training.export`).

INPUT may be image files (PNG, JPEG, TIFF, DICOM), folders (walked recursively) or manifest
CSVs. Outputs are described in docs/formats.md. A checkpoint calibrated by
`python -m calibration.fit` adds a yes/no decision per image at an operating point
(--operating-point overrides the stored default). Inputs that cannot be spine radiographs are
refused, and films where the model finds no spine get no probability (docs/formats.md, "Inputs
inference refuses").

Exit status: 0 if every input has a prediction; 1 if any has none (each has a row in
predictions.csv with status error, refused or no_spine, and its reason); 2 on a usage error;
130 when interrupted by Ctrl-C (SIGINT) and 143 by SIGTERM: the run stops at once, abandoning
the film in progress, the tables are written with every film finished, and --resume completes it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

# Set before torch starts its OpenMP threads: a thread that waits spins for a while by default,
# which on a busy machine, or beside the loader's workers and the output writers on a few cores,
# more than doubled the CPU time of a run (benchmarks/RESULTS.md, CPU inference speed).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting)

from inference.acceptance import NO_SPINE_SCORE
from inference.cli_args import (add_full_resolution, count_at_least, device_problem, number_between,
                                output_folder_problem)
from models.bundle import ModelError
from models.registry import default_model
from inference.pipeline import OutputFolderInUse, run_inference
from inference.predictor import Predictor


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it stops as on Ctrl-C (its tables written)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` once (a second one is ignored
    while the tables are written)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def usage_problem(args) -> str | None:
    """What makes these options unusable before any film is read (None: nothing)."""
    problem = output_folder_problem(Path(args.out), args.inputs)
    if problem:
        return problem
    return device_problem(args.device, args.backend)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or manifest CSVs")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a bundle folder or a registry name (models/registry.json); "
                                        "default: the shipped model")
    source.add_argument("--checkpoint", help="a training checkpoint, converted to a bundle in memory")
    parser.add_argument("--download", action="store_true",
                        help="allow fetching a registry model from its URL (checked by sha256, then cached)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=count_at_least(1), default=8)
    parser.add_argument("--num-workers", type=count_at_least(0), default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--sha256", default=None,
                        help="refuse the model unless its sha256 matches (of the checkpoint file, of a bundle's "
                             "metadata.json, or of the .onnx file)")
    parser.add_argument("--voi-lut", action="store_true", help="apply the DICOM VOI LUT / window")
    parser.add_argument("--max-pixels", type=count_at_least(1), default=50_000_000,
                        help="refuse images larger than this before decoding them")
    add_full_resolution(parser)
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                        help="torch: the networks of the model; onnx: their ONNX graphs run by onnxruntime, the "
                             "same outputs (a bundle with the .onnx graphs, or a .onnx file of "
                             "`python -m inference.onnx`)")
    parser.add_argument("--resume", action="store_true", help="skip inputs whose outputs are complete")
    parser.add_argument("--keep-identifiers", action="store_true",
                        help="copy patient name, ID and birth date into the JSON, and write the DICOM SC/SR into "
                             "the source's study with its patient and study identifiers (default: left out of "
                             "the JSON; the SC/SR are a de-identified copy with new UIDs, see docs/formats.md)")
    parser.add_argument("--dicom-sc", action="store_true", help="also write the overlay as a DICOM Secondary Capture")
    parser.add_argument("--dicom-sr", action="store_true", help="also write a DICOM Comprehensive SR (TID 1500)")
    parser.add_argument("--operating-point", choices=("high_sensitivity", "balanced", "high_specificity"),
                        default=None, help="threshold of the per-image decision (a calibrated checkpoint only; "
                                           "default: the one stored by `python -m calibration.fit`)")
    parser.add_argument("--min-spine-score", type=number_between(0, 1), default=NO_SPINE_SCORE,
                        help="a film whose strongest vertebral-body score is below this gets status no_spine and no "
                             f"probability (default {NO_SPINE_SCORE:g}; 0 turns the rule off, e.g. for an untrained "
                             "model)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    problem = usage_problem(args)
    if problem:
        parser.error(problem)
    model = args.model or args.checkpoint
    if model is None:
        try:
            model = default_model()
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if model is None:
            parser.error("no model named and none ships in models/registry.json: give --model BUNDLE")
        print(f"model: {model} (the shipped model; name another with --model)", file=sys.stderr)
    try:
        if args.backend == "onnx":
            from inference.onnx import OnnxPredictor

            predictor = OnnxPredictor(model, device=args.device, sha256=args.sha256,
                                      operating_point=args.operating_point)
        else:
            predictor = Predictor(model, device=args.device, sha256=args.sha256,
                                  operating_point=args.operating_point, allow_download=args.download)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.checkpoint and args.backend == "torch":  # said once it loaded: a file that is none is refused alone
        print(f"note: {args.checkpoint} is a training checkpoint, converted to a bundle in memory; export it once "
              f"with `python -m training.export --checkpoint {args.checkpoint} --out BUNDLE` and use --model BUNDLE",
              file=sys.stderr)
    if predictor.calibrator is not None:
        cal, point = predictor.calibrator, predictor.operating_point
        print(f"calibrated ({cal.method}); decisions at operating point {point} "
              f"(p_fracture >= {cal.threshold(point):.4f})")
    try:
        with sigterm_as_interrupt():
            summary = run_inference(predictor, args.inputs, args.out, batch_size=args.batch_size,
                                    num_workers=args.num_workers, voi_lut=args.voi_lut, max_pixels=args.max_pixels,
                                    progress=not args.quiet, resume=args.resume,
                                    keep_identifiers=args.keep_identifiers, dicom_sc=args.dicom_sc,
                                    dicom_sr=args.dicom_sr, min_spine_score=args.min_spine_score,
                                    full_resolution=args.full_resolution)
    except OutputFolderInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"interrupted by {signal.Signals(signum).name}: {Path(args.out) / 'predictions.csv'} holds the films "
              f"finished; run again with --resume to complete", file=sys.stderr)
        return 128 + int(signum)
    skipped = f" ({summary.n_skipped} already complete)" if summary.n_skipped else ""
    by_status = ", ".join(f"{n} {status}" for status, n in sorted(summary.failed_by_status.items()))
    print(f"{summary.n_ok} ok{skipped}, {summary.n_failed} failed"  # failed: without a prediction
          + (f" ({by_status})" if set(summary.failed_by_status) - {"error"} else "") + f" in {summary.seconds:.1f} s; "
          f"predictions: {summary.predictions_csv}" + (f"; errors: {summary.predictions_csv.parent / 'errors.csv'}"
                                                       if summary.n_failed else ""))
    return 1 if summary.n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
