"""Evaluate predictions against a manifest: metrics.json, PNG plots and a self-contained report.html.

    python evaluate.py --predictions OUT/predictions.csv --manifest M.csv [--vertebrae V.csv]
                       [--infer-dir OUT] --out REPORT [--n-boot 1000] [--seed 0]

Confidence intervals come from a bootstrap over patients (``patient_id`` of the manifest).
When the inference folder holds a ``vertebrae.csv`` (per-vertebra predictions) and truth
vertebrae are given, metrics.json, the plots and report.html gain a per-vertebra section
(evaluation/vertebrae.py).
Images with unknown labels are left out of each metric and counted; what the fracture metrics
leave out is counted by reason (metrics.json ``left_out``, printed and in the report). See evaluation/report/
for the methods. Research metrics: on synthetic phantom films they are not clinical performance.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from data.io_utils import missing_file  # noqa: E402
from evaluation.metrics import left_out_line  # noqa: E402
from evaluation.report import compute, page  # noqa: E402
from evaluation.report.formatting import format_ci, format_value  # noqa: E402


def vertebrae_summary_line(section: dict) -> str:
    """One line on the per-vertebra section of metrics.json (``result["vertebrae"]``)."""
    if not section.get("available"):
        return f"per-vertebra: {section.get('note', 'not available')}"
    f = format_value
    d, pe, la = section["detection"], section["point_error"], section["level_accuracy"]
    c = section["counts"]
    return (f"per-vertebra: recall {f(d['recall'])} ({d['n_matched']}/{d['n_truth']}), precision {f(d['precision'])} "
            f"({d['n_false_positive']} false positives), point error median {f(pe['pixels']['median'], 1)} px "
            f"({f(pe['percent_height']['median'], 1)} % of height), level accuracy {f(la['accuracy'])}, "
            f"fracture AUROC {f(section['auroc_fracture']['auroc'])}, grade kappa "
            f"{f(section['grade_agreement']['kappa_quadratic'])}; {c['n_truth_images_without_prediction']} truth "
            f"image(s) without prediction left out")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--vertebrae", default="auto", help="vertebrae.csv (default: beside the manifest, if there)")
    parser.add_argument("--infer-dir", default=None, help="folder of the per-image JSONs and overlays "
                                                          "(default: the folder of --predictions)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--min-level-positives", type=int, default=5,
                        help="levels with fewer fractured images get AUROC n/a (default 5)")
    parser.add_argument("--gallery", type=int, default=4, help="worst false negatives / positives shown (default 4)")
    args = parser.parse_args(argv)
    if args.n_boot < 0:
        parser.error("--n-boot must be >= 0")
    out = Path(args.out)
    vertebrae = args.vertebrae
    if vertebrae in ("auto", ""):
        candidate = Path(args.manifest).parent / "vertebrae.csv"
        vertebrae = str(candidate) if candidate.is_file() else None
    infer_dir = args.infer_dir or str(Path(args.predictions).parent)

    for flag, path in (("--predictions", args.predictions), ("--manifest", args.manifest)):
        if not Path(path).is_file():
            parser.exit(2, f"error: {flag} {path}: {missing_file(path)}\n")
    t0 = time.perf_counter()
    try:
        inputs = compute.load_inputs(args.predictions, args.manifest, vertebrae, infer_dir)
        result = compute.evaluate_inputs(inputs, n_boot=args.n_boot, seed=args.seed,
                                         min_level_positives=args.min_level_positives, gallery_n=args.gallery)
    except (ValueError, KeyError, OSError) as exc:  # the readers name the file and the problem
        parser.exit(2, f"error: {exc}\n")
    paths = page.write_report(result, inputs.joined, out)
    ci = format_ci
    fr = result["roc"]["fracture"]
    msg = f"fracture AUROC {ci(fr, 'auroc')} (pos {fr['n_pos']}, neg {fr['n_neg']}, unknown left out {fr['n_unknown_left_out']})"
    if "acute" in result["roc"]:
        msg += f"; acute-vs-chronic AUROC {ci(result['roc']['acute'], 'auroc')}"
    if result.get("pointing_game"):
        msg += f"; pointing game {format_value(result['pointing_game']['score'])}"
    print(msg)
    print(left_out_line(result["left_out"]))
    per_vertebra = result.get("vertebrae")
    if per_vertebra:
        print(vertebrae_summary_line(per_vertebra))
    print(f"wrote {paths['metrics']}, {paths['html']} and {len(paths) - 2} plot(s) to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    print("Research metrics: on synthetic phantom films these are not clinical performance.")
    return result



def cli() -> int:
    """Console-script entry point (its return value is the exit status)."""
    main()
    return 0

if __name__ == "__main__":
    main()
