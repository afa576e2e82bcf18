"""Models side by side: the headline numbers of several evaluate.py reports in one table.

    python -m evaluation.side_by_side shipped=runs/demo/report_shipped fine-tuned=runs/demo/report_tuned \
        [--out runs/demo/comparison.md]

Each ``NAME=FOLDER`` names a folder holding evaluate.py's ``metrics.json``. The table (Markdown)
is printed and, with ``--out``, written atomically. A number a report lacks shows as "n/a".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.io_utils import atomic_write_text

# (row label, path into metrics.json, digits)
ROWS = (
    ("image fracture AUROC", ("auroc_fracture",), 3),
    ("acute vs chronic AUROC (fractured films)", ("auroc_acute_given_fracture",), 3),
    ("vertebra fracture AUROC", ("vertebrae", "auroc_fracture", "auroc"), 3),
    ("Genant grade kappa (quadratic)", ("vertebrae", "grade_agreement", "kappa_quadratic"), 3),
    ("vertebrae found (recall)", ("vertebrae", "detection", "recall"), 3),
    ("level accuracy", ("vertebrae", "level_accuracy", "accuracy"), 3),
    ("median point error (% height)", ("vertebrae", "point_error", "percent_height", "median"), 1),
)


def lookup(metrics: dict, path: tuple[str, ...]):
    node = metrics
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, dict):  # a metric with its interval: {"value"/"auroc": ..., "ci": ...}
        node = node.get("value", node.get("auroc"))
    return node if isinstance(node, (int, float)) else None


def comparison_table(reports: dict[str, dict]) -> str:
    names = list(reports)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, path, digits in ROWS:
        cells = []
        for name in names:
            value = lookup(reports[name], path)
            cells.append("n/a" if value is None else f"{value:.{digits}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.side_by_side", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", metavar="NAME=FOLDER")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    reports = {}
    for item in args.reports:
        name, sep, folder = item.partition("=")
        if not sep or not name:
            parser.error(f"{item}: expected NAME=FOLDER")
        path = Path(folder) / "metrics.json"
        try:
            reports[name] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"error: {path}: cannot read evaluate.py's metrics ({exc})", file=sys.stderr)
            return 2
    table = comparison_table(reports)
    print(table, end="")
    if args.out is not None:
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
