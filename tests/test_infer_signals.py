"""infer.py and its DataLoader workers when the run is killed: SIGKILL takes the workers with it,
SIGTERM stops like Ctrl-C (tables written, exit 143) and --resume completes the run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.parity.parity_model import FILMS_DIR
from tests.training_config import save_untrained_checkpoint
from training.export import export_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl is Linux only")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An untrained model: it finds no vertebral body, so each film is the film network alone
    (fast) once the no-spine rule is off (MODEL_OPTIONS)."""
    tmp = tmp_path_factory.mktemp("signals")
    _, checkpoint = save_untrained_checkpoint(tmp / "untrained.ckpt", image_size=(128, 104))
    return export_checkpoint(checkpoint, tmp / "bundle")


MODEL_OPTIONS = ["--min-spine-score", "0"]


def copies(folder: Path, n: int) -> Path:
    """``n`` films (the parity films, copied round) under ``folder``."""
    folder.mkdir()
    films = sorted(FILMS_DIR.glob("*.png"))
    for k in range(n):
        shutil.copy(films[k % len(films)], folder / f"film_{k:02d}.png")
    return folder


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited process nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_infer(bundle, films, out, workers: int = 2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "infer.py", "--model", str(bundle), "--out", str(out), "--num-workers",
                             str(workers), "--batch-size", "1", "--quiet", *MODEL_OPTIONS, str(films)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_sigkill_of_infer_takes_its_dataloader_workers_with_it(bundle, tmp_path):
    films = copies(tmp_path / "films", 60)
    proc = start_infer(bundle, films, tmp_path / "out")
    workers = []
    try:
        workers = wait_for(lambda: len(children(proc.pid)) >= 2 and children(proc.pid), 120, "two workers")
        # a worker blocked on a full pipe to a dead run once waited forever (the DataLoader's own
        # check of its parent runs only while the worker is idle, every 5 s)
        wait_for(lambda: any((tmp_path / "out").glob("*.json")), 120, "a finished film")
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: not any(running(w) for w in workers), 3, f"workers {workers} to die with their run")
    finally:
        for pid in [proc.pid, *workers]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()


def test_sigterm_writes_the_tables_and_resume_completes_the_run(bundle, tmp_path):
    import infer

    films = copies(tmp_path / "films", 20)
    out = tmp_path / "out"
    proc = start_infer(bundle, films, out)
    workers = []
    try:
        workers = wait_for(lambda: len(children(proc.pid)) >= 2 and children(proc.pid), 120, "two workers")
        wait_for(lambda: any(out.glob("*.json")), 120, "a finished film")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    wait_for(lambda: not any(running(w) for w in workers), 3, "the workers to end")
    finished = sorted(p.stem for p in out.glob("*.json"))
    table = pd.read_csv(out / "predictions.csv")
    assert 0 < len(finished) < 20 and sorted(table.name) == finished and (table.status == "ok").all()
    assert not (out / ".infer.lock").exists() and not list(out.glob(".*.tmp"))

    assert infer.main(["--model", str(bundle), "--out", str(out), "--num-workers", "0", "--quiet", "--resume",
                       *MODEL_OPTIONS, str(films)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 20 and (table.status == "ok").all() and len(list(out.glob("*.json"))) == 20
