"""Sharded inference (inference/sharded.py) with 2 CPU processes (gloo): the outputs equal a
single-process run's, every input is in exactly one rank's part, --resume works across ranks,
and a second run into a folder in use is refused."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from data.phantom import generate_dataset
from inference.parts import PARTS_DIR, MergeError, merge_parts, part_dir, rank_share
from inference.pipeline import LOCK_FILE, run_inference
from inference.predictor import Predictor
from tests.parity.parity_model import parity_checkpoint, with_content_readers
from training.export import export_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("predictions.csv", "vertebrae.csv", "errors.csv")
# the parity model's deterministic crop readers in every rank, so that vertebrae are found
LAUNCHER = f"""import sys
sys.path[:0] = [{str(ROOT)!r}]
from inference.predictor import Predictor
from tests.parity.parity_model import with_content_readers
load = Predictor.__init__
def load_with_readers(self, *args, **kwargs):
    load(self, *args, **kwargs)
    with_content_readers(self)
Predictor.__init__ = load_with_readers
from inference.sharded import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A bundle, and inputs with an unreadable film, two films of the same stem and an input
    that does not exist."""
    tmp = tmp_path_factory.mktemp("sharded")
    bundle = export_checkpoint(parity_checkpoint(tmp / "parity.ckpt"), tmp / "bundle")
    generate_dataset(tmp / "phantom", n=7, seed=3, size=128, workers=1, progress=False)
    films = tmp / "films"
    shutil.copytree(tmp / "phantom" / "images", films / "a")
    (films / "b").mkdir()
    shutil.copy(films / "a" / "phantom_s3_00002.png", films / "b" / "phantom_s3_00002.png")
    (films / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a film")
    launcher = tmp / "launch_sharded.py"
    launcher.write_text(LAUNCHER)
    inputs = [str(films), str(tmp / "absent")]
    predictor = with_content_readers(Predictor(bundle, device="cpu"))
    single = tmp / "single"
    run_inference(predictor, inputs, single, batch_size=2, num_workers=0, progress=False)
    return {"tmp": tmp, "bundle": bundle, "inputs": inputs, "launcher": launcher, "single": single,
            "n_films": 9}


def sharded(archive, out, *options, processes=2):
    return subprocess.run([sys.executable, str(archive["launcher"]), "--model", str(archive["bundle"]), "--out",
                           str(out), "--accelerator", "cpu", "--devices", str(processes), "--batch-size", "2",
                           "--num-workers", "0", "--quiet", *options, *archive["inputs"]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def read_table(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def assert_same_table(path, expected_path):
    """Same columns, rows and text; numbers to 1e-5 (the ranks run with other thread counts)."""
    got, expected = read_table(path), read_table(expected_path)
    assert list(got.columns) == list(expected.columns), path.name
    assert len(got) == len(expected), path.name
    for column in expected.columns:
        numbers = pd.to_numeric(expected[column].replace("", np.nan), errors="coerce")
        if numbers.notna().any() and numbers.notna().sum() == (expected[column] != "").sum():
            assert (got[column] == "").equals(expected[column] == ""), (path.name, column)
            np.testing.assert_allclose(pd.to_numeric(got[column].replace("", np.nan)), numbers, rtol=0, atol=1e-5,
                                       err_msg=f"{path.name}: {column}")
        else:
            assert got[column].tolist() == expected[column].tolist(), (path.name, column)


def assert_same_json(got, expected, where=""):
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same_json(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for k, (g, e) in enumerate(zip(got, expected)):
            assert_same_json(g, e, f"{where}[{k}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert got == pytest.approx(expected, abs=1e-5), where
    else:
        assert got == expected, where


def assert_same_outputs(out, expected):
    """The tables and every per-film file of ``out`` (its parts aside) equal ``expected``'s."""
    files = {p.relative_to(out) for p in out.rglob("*") if p.is_file() and PARTS_DIR not in p.relative_to(out).parts}
    assert files == {p.relative_to(expected) for p in expected.rglob("*") if p.is_file()}
    for name in TABLES:
        assert_same_table(out / name, expected / name)
    for path in sorted(files):
        if path.suffix == ".json":
            assert_same_json(json.loads((out / path).read_text()), json.loads((expected / path).read_text()), str(path))
        elif path.suffix == ".npy":
            np.testing.assert_allclose(np.load(out / path), np.load(expected / path), atol=1e-5)
        elif path.suffix == ".png":  # the overlay: 8 bits of the same map
            got, want = (cv2.imread(str(p)).astype(int) for p in (out / path, expected / path))
            assert got.shape == want.shape and np.abs(got - want).max() <= 1


@pytest.fixture(scope="module")
def two_processes(archive):
    out = archive["tmp"] / "sharded"
    proc = sharded(archive, out)
    return out, proc


def test_rank_shares_cover_every_input_once():
    for n, world in [(0, 2), (1, 2), (7, 2), (9, 4), (5, 8)]:
        shares = [list(rank_share(n, rank, world)) for rank in range(world)]
        assert sorted(i for share in shares for i in share) == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_starting_run_removes_an_earlier_runs_merged_tables_and_extra_parts(tmp_path):
    from inference.parts import write_run_listing

    for name in TABLES:
        (tmp_path / name).write_text("image,name\n/old/film.png,film\n")
    for rank in range(3):
        part_dir(tmp_path, rank).mkdir(parents=True)
        (part_dir(tmp_path, rank) / "predictions.csv").write_text("image\n")
    write_run_listing(tmp_path, ["/new/a.png"], ["a"], 2, {})
    assert not any((tmp_path / name).exists() for name in TABLES)  # a kill now leaves no stale merged tables
    assert sorted(p.name for p in (tmp_path / PARTS_DIR).iterdir()) == ["inputs.csv", "rank-00000", "rank-00001",
                                                                       "run.json"]


def test_two_processes_write_what_one_process_writes(archive, two_processes):
    out, proc = two_processes
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]  # the unreadable film and the absent input failed
    assert "distributed_backend=gloo" in log and "MEMBER: 2/2" in log
    assert "8 ok, 2 failed" in proc.stdout and "on 2 process(es)" in proc.stdout
    assert_same_outputs(out, archive["single"])
    table = read_table(out / "predictions.csv")
    assert len(table) == archive["n_films"] + 1 and table["image"].is_unique
    assert table["image"].iloc[0].endswith("absent")  # inputs that could not be listed come first
    # every input in exactly one rank's part, and each rank did some
    parts = [read_table(part_dir(out, rank) / "predictions.csv") for rank in (0, 1)]
    assert all(len(p) >= 4 for p in parts)
    assert sorted(pd.concat(parts)["image"]) == sorted(table["image"])
    finished = json.loads((out / PARTS_DIR / "run.json").read_text())["finished"]
    assert [(r["rank"], r["films"], r["kept"]) for r in finished] == [(0, 5, 0), (1, 4, 0)]
    vertebrae = read_table(out / "vertebrae.csv")
    assert len(vertebrae) > 0
    assert len(vertebrae) == sum(len(read_table(part_dir(out, r) / "vertebrae.csv")) for r in (0, 1))
    assert not (out / LOCK_FILE).exists()


def test_merge_command_rebuilds_the_tables_and_refuses_duplicates(archive, two_processes, tmp_path):
    from inference.sharded import main

    out = tmp_path / "out"
    shutil.copytree(two_processes[0], out)
    for name in TABLES:
        (out / name).unlink()
    assert main(["merge", "--out", str(out)]) == 1  # two inputs failed
    for name in TABLES:
        assert (out / name).read_text() == (two_processes[0] / name).read_text()
    # a part that also holds another rank's film: refused, naming it
    zero, one = (part_dir(out, r) / "predictions.csv" for r in (0, 1))
    stolen = read_table(one).iloc[:1]
    pd.concat([read_table(zero), stolen]).to_csv(zero, index=False)
    with pytest.raises(MergeError, match=f"{stolen['image'].iloc[0]} has a row in 2 parts"):
        merge_parts(out)


def test_a_second_run_into_a_folder_in_use_is_refused_on_every_rank(archive, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                 "started": "2026-12-06 07:00:00"}))
        proc = sharded(archive, out)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert f"in use by another run (pid {sleeper.pid}" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written


@pytest.mark.slow
def test_resume_after_a_partial_run_redoes_only_what_is_missing(archive, two_processes, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(two_processes[0], out)
    # as a killed run leaves it: two films without outputs, rank 1's part and the merged tables never written
    lost = ["phantom_s3_00000", "phantom_s3_00003"]
    for name in lost:
        (out / f"{name}.json").unlink()
    shutil.rmtree(part_dir(out, 1))
    for name in TABLES:
        (out / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    # resumed with 3 processes: both lost films are rank 0's (inputs 0 and 3), rank 2 has nothing left to do
    proc = sharded(archive, out, "--resume", processes=3)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "8 ok (6 already complete), 2 failed" in proc.stdout and "on 3 process(es)" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name in kept} == kept
    assert all((out / f"{name}.json").is_file() for name in lost)
    assert_same_outputs(out, archive["single"])
    assert [len(read_table(part_dir(out, rank) / "predictions.csv")) for rank in range(3)] == [4, 3, 3]
    finished = json.loads((out / PARTS_DIR / "run.json").read_text())["finished"]
    assert [(r["films"], r["kept"]) for r in finished] == [(2, 1), (1, 2), (0, 3)]
