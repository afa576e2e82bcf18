"""Offline inference: fracture and acute-fracture probabilities and heatmaps.

    python infer.py --checkpoint runs/demo/best.ckpt --out runs/demo/infer  scans/  more.dcm  manifest.csv

INPUT may be image files (PNG, JPEG, TIFF, DICOM), folders (walked recursively) or manifest
CSVs. Outputs are described in docs/formats.md. A checkpoint calibrated by
`python -m calibration.fit` adds a yes/no decision per image at an operating point
(--operating-point overrides the stored default). Exit status: 0 if every input was processed,
1 if any failed (each failure has an error row in predictions.csv), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import sys

from training.checkpoint import CheckpointError
from inference.pipeline import Predictor, run_inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or manifest CSVs")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--sha256", default=None, help="refuse the checkpoint unless its sha256 matches")
    parser.add_argument("--voi-lut", action="store_true", help="apply the DICOM VOI LUT / window")
    parser.add_argument("--max-pixels", type=int, default=50_000_000,
                        help="refuse images larger than this before decoding them")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                        help="torch: a .ckpt; onnx: a model exported by `python -m inference.onnx`")
    parser.add_argument("--resume", action="store_true", help="skip inputs whose outputs are complete")
    parser.add_argument("--keep-identifiers", action="store_true",
                        help="copy patient name, ID and birth date into the outputs (left out by default)")
    parser.add_argument("--dicom-sc", action="store_true", help="also write the overlay as a DICOM Secondary Capture")
    parser.add_argument("--dicom-sr", action="store_true", help="also write a DICOM Comprehensive SR (TID 1500)")
    parser.add_argument("--operating-point", choices=("high_sensitivity", "balanced", "high_specificity"),
                        default=None, help="threshold of the per-image decision (a calibrated checkpoint only; "
                                           "default: the one stored by `python -m calibration.fit`)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.backend == "onnx":
            from inference.onnx import OnnxPredictor

            predictor = OnnxPredictor(args.checkpoint, device=args.device, sha256=args.sha256,
                                      operating_point=args.operating_point)
        else:
            predictor = Predictor(args.checkpoint, device=args.device, sha256=args.sha256,
                                  operating_point=args.operating_point)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if predictor.calibrator is not None:
        cal, point = predictor.calibrator, predictor.operating_point
        print(f"calibrated ({cal.method}); decisions at operating point {point} "
              f"(p_fracture >= {cal.threshold(point):.4f})")
    summary = run_inference(predictor, args.inputs, args.out, batch_size=args.batch_size,
                            num_workers=args.num_workers, voi_lut=args.voi_lut, max_pixels=args.max_pixels,
                            progress=not args.quiet, resume=args.resume, keep_identifiers=args.keep_identifiers,
                            dicom_sc=args.dicom_sc, dicom_sr=args.dicom_sr)
    skipped = f" ({summary.n_skipped} already complete)" if summary.n_skipped else ""
    print(f"{summary.n_ok} ok{skipped}, {summary.n_failed} failed in {summary.seconds:.1f} s; "
          f"predictions: {summary.predictions_csv}" + (f"; errors: {summary.predictions_csv.parent / 'errors.csv'}"
                                                       if summary.n_failed else ""))
    return 1 if summary.n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
