"""Combine manifests (and their vertebrae.csv) into one, with absolute paths.

    python -m data.combine --out runs/mix runs/phantom/data/train/manifest.csv runs/sim/manifest.csv \
        [--test-fraction-of runs/sim/manifest.csv=0.2] [--seed 0]

``--test-fraction-of M=F`` marks about a fraction F of the *patients* of manifest M as
``split = test`` (by a hash of the patient id, as data.manifest.assign_splits does), so a
patient-held-out test set never reaches training. Rows already carrying a split keep it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from data.io_utils import atomic_write_text
from data.manifest import is_held_out
from data.tables import absolute_path, read_text_table


def _absolute(table: pd.DataFrame, column: str, root: Path) -> pd.Series:
    return table[column].map(lambda p: absolute_path(p, root) if str(p).strip() else p)


def combine(manifests: list[Path], out: Path, test_fractions: dict[Path, float] | None = None,
            seed: int = 0) -> Path:
    test_fractions = {Path(k).resolve(): v for k, v in (test_fractions or {}).items()}
    images, vertebrae = [], []
    for m in manifests:
        m = Path(m).resolve()
        table = read_text_table(m)
        table["image"] = _absolute(table, "image", m.parent)
        if "mask" in table.columns:
            table["mask"] = _absolute(table, "mask", m.parent)
        if "split" not in table.columns:
            table["split"] = ""
        fraction = test_fractions.get(m, 0.0)
        if fraction:
            held = table["patient_id"].map(lambda p: is_held_out(p, fraction, seed))
            table.loc[held & (table["split"] == ""), "split"] = "test"
        images.append(table)
        vpath = m.parent / "vertebrae.csv"
        if vpath.is_file():
            vt = read_text_table(vpath)
            vt["image"] = _absolute(vt, "image", m.parent)
            vertebrae.append(vt)
    out.mkdir(parents=True, exist_ok=True)
    merged = pd.concat(images, ignore_index=True).fillna("")
    atomic_write_text(out / "manifest.csv", merged.to_csv(index=False))
    if vertebrae:
        atomic_write_text(out / "vertebrae.csv", pd.concat(vertebrae, ignore_index=True).fillna("").to_csv(index=False))
    return out / "manifest.csv"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifests", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--test-fraction-of", action="append", default=[], metavar="MANIFEST=FRACTION")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    fractions = {Path(item.rsplit("=", 1)[0]): float(item.rsplit("=", 1)[1]) for item in a.test_fraction_of}
    path = combine(a.manifests, a.out, fractions, a.seed)
    table = read_text_table(path)
    print(f"wrote {path}: {len(table)} images, split counts {table['split'].replace('', 'auto').value_counts().to_dict()}")


if __name__ == "__main__":
    main()
