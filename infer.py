"""Offline inference: fracture and acute-fracture probabilities and heatmaps.

    python infer.py --checkpoint runs/demo/best.ckpt --out runs/demo/infer  scans/  more.dcm  manifest.csv

INPUT may be image files (PNG, JPEG, TIFF, DICOM), folders (walked recursively) or manifest
CSVs. Outputs are described in docs/formats.md. Exit status: 0 if every input was processed,
1 if any failed (each failure has an error row in predictions.csv), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import sys

from models.checkpoint import CheckpointError
from models.inference import Predictor, run_inference


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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        predictor = Predictor(args.checkpoint, device=args.device, sha256=args.sha256)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = run_inference(predictor, args.inputs, args.out, batch_size=args.batch_size,
                            num_workers=args.num_workers, voi_lut=args.voi_lut, max_pixels=args.max_pixels,
                            progress=not args.quiet)
    print(f"{summary.n_ok} ok, {summary.n_failed} failed in {summary.seconds:.1f} s; "
          f"predictions: {summary.predictions_csv}")
    return 1 if summary.n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
