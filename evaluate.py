"""Evaluate predictions against a manifest: metrics.json and ROC / by-grade plots.

    python evaluate.py --predictions OUT/predictions.csv --manifest M.csv [--vertebrae V.csv] --out REPORT

Images with unknown labels are left out of each metric and counted in metrics.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data.io_utils import atomic_write_json  # noqa: E402
from evaluation import metrics  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--vertebrae", default="auto", help="vertebrae.csv (default: beside the manifest)")
    parser.add_argument("--infer-dir", default=None, help="folder of the per-image JSONs (default: beside predictions)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vertebrae = args.vertebrae
    if vertebrae == "auto":
        candidate = Path(args.manifest).parent / "vertebrae.csv"
        vertebrae = str(candidate) if candidate.is_file() else None
    infer_dir = args.infer_dir or str(Path(args.predictions).parent)
    summary = metrics.summarise(args.predictions, args.manifest, vertebrae, infer_dir)
    atomic_write_json(out / "metrics.json", summary)

    df = metrics.join_predictions(args.predictions, args.manifest)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    metrics.plot_roc(axes[0], df)
    if summary.get("by_grade"):
        metrics.plot_by_grade(axes[1], {int(k): v for k, v in summary["by_grade"].items()})
    else:
        axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    print(f"fracture AUROC {fmt(summary['auroc_fracture'])}, acute-vs-chronic AUROC {fmt(summary['auroc_acute'])}"
          + (f", pointing game {fmt(summary['pointing_game']['score'])}" if summary.get("pointing_game") else ""))
    print(f"wrote {out / 'metrics.json'} and {out / 'roc.png'}")
    return summary


if __name__ == "__main__":
    main()
