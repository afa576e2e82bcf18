"""Write the inference parity fixture (tests/parity/fixture/).

The parity model (tests/parity/parity_model.py) is run over four phantom films and its
outputs are stored with the input folder written as ``FILMS/``. ``tests/test_parity.py``
checks that the code reproduces them: floats to 1e-5; levels, grades, names and statuses
exactly. Re-run only when a change of numbers is intended, and commit the new fixture on its
own commit, saying why:

    python tests/parity/make_fixture.py [--films]   # --films: also rewrite the four films
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.parity.parity_model import FILMS_DIR, FIXTURE, make_films  # noqa: E402
from tests.parity.run import run_parity_model  # noqa: E402


def main(argv: list[str]) -> int:
    if "--films" in argv or not FILMS_DIR.is_dir():
        make_films(FILMS_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_parity_model(Path(tmp))
        if FIXTURE.exists():
            shutil.rmtree(FIXTURE)
        FIXTURE.mkdir(parents=True)
        for name in ("predictions.csv", "vertebrae.csv"):
            (FIXTURE / name).write_text((out / name).read_text().replace(str(FILMS_DIR) + "/", "FILMS/"))
        for record in sorted(out.glob("*.json")):
            data = json.loads(record.read_text())
            data["image"] = data["image"].replace(str(FILMS_DIR) + "/", "FILMS/")
            (FIXTURE / record.name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    n_vert = len((FIXTURE / "vertebrae.csv").read_text().splitlines()) - 1
    print(f"fixture: {len(list(FIXTURE.glob('*.json')))} films, {n_vert} vertebrae in {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
