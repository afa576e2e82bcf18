"""Compare an inference output folder with the parity fixture."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from tests.parity.parity_model import FILMS_DIR, FIXTURE

TOLERANCE = 1e-5
# identify the model file or the code, not what it predicts; the fingerprint names the input file
# (its modification time differs in every checkout) and the run's options
IGNORED_KEYS = {"checkpoint_id", "model", "note", "fingerprint"}


def _same(a, b, where: str, problems: list[str], tolerance: float = TOLERANCE) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - IGNORED_KEYS
        for k in sorted(keys):
            if k not in a or k not in b:
                problems.append(f"{where}.{k}: only in {'fixture' if k in a else 'output'}")
            else:
                _same(a[k], b[k], f"{where}.{k}", problems, tolerance)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            problems.append(f"{where}: {len(a)} items in the fixture, {len(b)} in the output")
        for k, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{k}]", problems, tolerance)
    elif isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or isinstance(a, bool) or isinstance(b, bool):
            problems.append(f"{where}: {a!r} vs {b!r}")
        elif not (math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance) or (math.isnan(a) and math.isnan(b))):
            problems.append(f"{where}: {a!r} vs {b!r}")
    elif a != b:
        problems.append(f"{where}: {a!r} vs {b!r}")


def _table(path: Path, films_dir: Path) -> pd.DataFrame:
    t = pd.read_csv(path, keep_default_na=False, dtype=str)
    if "image" in t:
        t["image"] = t["image"].str.replace(str(films_dir) + "/", "FILMS/", regex=False)
    return t


def compare_with_fixture(out: Path, films_dir: Path = FILMS_DIR, tolerance: float = TOLERANCE) -> list[str]:
    """Every difference between ``out`` and the fixture, as one line each (empty: the same);
    numbers agree to ``tolerance`` (relative or absolute)."""
    problems: list[str] = []
    for name in ("predictions.csv", "vertebrae.csv"):
        want, got = _table(FIXTURE / name, films_dir), _table(out / name, films_dir)
        if list(want.columns) != list(got.columns[:len(want.columns)]):
            problems.append(f"{name}: columns {list(got.columns)}, fixture {list(want.columns)}")
            continue
        if len(want) != len(got):
            problems.append(f"{name}: {len(got)} rows, fixture {len(want)}")
            continue
        order = ["image", "level"] if "level" in want else ["image"]
        want = want.sort_values(order, kind="stable").reset_index(drop=True)
        got = got.sort_values(order, kind="stable").reset_index(drop=True)
        for col in want.columns:
            for k, (a, b) in enumerate(zip(want[col], got[col])):
                try:
                    fa, fb = float(a), float(b)
                except ValueError:
                    if a != b:
                        problems.append(f"{name} row {k} {col}: fixture {a!r}, output {b!r}")
                    continue
                if not math.isclose(fa, fb, rel_tol=tolerance, abs_tol=tolerance) and not (math.isnan(fa) and math.isnan(fb)):
                    problems.append(f"{name} row {k} {col}: fixture {a}, output {b}")
    for record in sorted(FIXTURE.glob("*.json")):
        mine = out / record.name
        if not mine.is_file():
            problems.append(f"{record.name}: missing")
            continue
        got = json.loads(mine.read_text())
        got["image"] = got["image"].replace(str(films_dir) + "/", "FILMS/")
        _same(json.loads(record.read_text()), got, record.stem, problems, tolerance)
    return problems
