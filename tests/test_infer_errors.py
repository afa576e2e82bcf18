"""infer.py refuses unusable options in one line with exit 2 before reading any film, and a
model whose outputs are not finite gives error rows, never "ok" rows or invalid JSON."""
import pytest
import torch

from tests.parity.parity_model import FILMS_DIR, parity_checkpoint
from training.export import export_checkpoint


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer_errors")
    return {"bundle": export_checkpoint(parity_checkpoint(tmp / "parity.ckpt"), tmp / "bundle")}


@pytest.mark.parametrize("options, message", [
    (["--batch-size", "0"], "--batch-size: 0 is below 1"),
    (["--num-workers", "-1"], "--num-workers: -1 is below 0"),
    (["--device", "cuda"], "no CUDA GPU is available here"),
    (["--device", "tpu"], "--device tpu: not a device (auto, cpu, cuda or cuda:N)"),
    (["--device", "cpu:banana"], "--device cpu:banana: not a device"),
    (["--backend", "onnx", "--device", "cuda"], "this onnxruntime has no CUDAExecutionProvider"),
    (["--max-pixels", "0"], "--max-pixels: 0 is below 1"),
    (["--min-spine-score", "nan"], "--min-spine-score: nan is not a number from 0 to 1"),
    (["--min-spine-score", "1.5"], "--min-spine-score: 1.5 is not a number from 0 to 1"),
])
def test_infer_usage_errors_are_one_line_and_exit_2(parity, tmp_path, capsys, options, message):
    import infer

    if "cuda" in options and "onnx" not in options and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if "onnx" in options:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("onnxruntime runs on a GPU here")
    with pytest.raises(SystemExit) as exc:
        infer.main(["--model", str(parity["bundle"]), "--out", str(tmp_path / "out"), *options, str(FILMS_DIR)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "predictions.csv").exists()  # refused before any film is read


def test_sharded_inference_refuses_the_same_options_in_one_line(tmp_path, capsys):
    from inference import sharded

    for options, message in ((["--max-pixels", "-5"], "--max-pixels: -5 is below 1"),
                             (["--min-spine-score", "inf"], "--min-spine-score: inf is not a number from 0 to 1")):
        with pytest.raises(SystemExit) as exc:
            sharded.main(["--out", str(tmp_path / "out"), *options, str(FILMS_DIR)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_infer_refuses_an_out_that_is_a_file_or_unwritable_before_reading_films(parity, tmp_path, capsys, monkeypatch):
    import infer

    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit) as exc:
        infer.main(["--model", str(parity["bundle"]), "--out", str(tmp_path / "taken"), str(FILMS_DIR)])
    assert exc.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err
    read = []
    monkeypatch.setattr("inference.pipeline.run_inference", lambda *a, **k: read.append(1))
    monkeypatch.setattr("tempfile.NamedTemporaryFile", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(SystemExit) as exc:
        infer.main(["--model", str(parity["bundle"]), "--out", str(tmp_path / "ro"), str(FILMS_DIR)])
    assert exc.value.code == 2 and "cannot write there (Permission denied)" in capsys.readouterr().err and not read


def test_a_model_with_a_nan_weight_gives_error_rows_and_valid_json(parity, tmp_path):
    from inference.pipeline import run_inference
    from inference.predictor import Predictor

    predictor = Predictor(parity["bundle"], device="cpu")
    with torch.no_grad():
        predictor.net.image_head[-1].bias.fill_(float("nan"))
    summary = run_inference(predictor, [str(FILMS_DIR)], tmp_path / "out", num_workers=0, progress=False)
    assert summary.n_ok == 0 and summary.n_failed == 4
    errors = (tmp_path / "out" / "errors.csv").read_text()
    assert errors.count("the model gave non-finite outputs (p_fracture=nan") == 4
    assert not list((tmp_path / "out").glob("*.json"))


def test_a_non_finite_vertebra_point_or_height_is_an_error_row_and_leaves_no_files(parity, tmp_path, monkeypatch):
    """Finite probabilities but a NaN in a vertebra's points, or an infinite height loss: an error
    row naming them, never a drawing crash, bare NaN in a JSON, or heatmaps without a JSON."""
    import json

    import pandas as pd

    import inference.pipeline as pipeline
    from inference.predictor import Predictor
    from tests.parity.parity_model import with_content_readers

    predictor = with_content_readers(Predictor(parity["bundle"], device="cpu"))
    real = predictor.predict

    def damaged(items):
        films = real(items)
        for k, film in enumerate(films):
            assert film.vertebrae
            if k % 2:
                film.vertebrae[0].points[0][0] = float("nan")
            else:
                film.vertebrae[-1].height_loss = float("inf")
        return films

    predictor.predict = damaged
    out = tmp_path / "out"
    summary = pipeline.run_inference(predictor, [str(FILMS_DIR)], out, batch_size=2, num_workers=0, progress=False)
    assert summary.n_ok == 0 and summary.failed_by_status == {"error": 4}
    reasons = pd.read_csv(out / "errors.csv").error
    assert reasons.str.match(r"the model gave non-finite outputs \(vertebra \S+ (points|height_loss)\)").all()
    assert sorted(p.name for p in out.iterdir()) == ["errors.csv", "predictions.csv", "vertebrae.csv"]

    # a film whose JSON cannot be written after its heatmaps were: those are removed with it
    predictor.predict = real
    monkeypatch.setattr(pipeline, "atomic_write_json", lambda *a, **k: json.dumps(float("nan"), allow_nan=False))
    summary = pipeline.run_inference(predictor, [str(FILMS_DIR)], out, num_workers=0, progress=False)
    assert summary.n_ok == 0 and (pd.read_csv(out / "errors.csv").error.str.contains("not JSON compliant")).all()
    assert sorted(p.name for p in out.iterdir()) == ["errors.csv", "predictions.csv", "vertebrae.csv"]


def test_output_names_are_unique_by_construction_and_short():
    from inference.pipeline import MAX_NAME_BYTES, _path_hash, output_names

    generated = f"a_{_path_hash('/x/a.png', 8)}"  # the name a second a.png would get
    paths = ["/x/a.png", "/y/a.png", f"/z/{generated}.png", "/w/" + "é" * 200 + ".png"]
    names = output_names(paths)
    assert len(set(names)) == len(names) == 4
    assert all(len(n.encode()) <= MAX_NAME_BYTES for n in names)
    assert output_names(["/x/b.png", "/y/c.png"]) == ["b", "c"]  # plain stems where nothing clashes
    # stems that differ only in case would share files on a case-insensitive --out
    upper, lower = output_names(["/x/Film.png", "/x/film.png"])
    assert upper.casefold() != lower.casefold() and upper.startswith("Film_") and lower.startswith("film_")


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(parity, tmp_path, capsys):
    import json
    import os
    import subprocess
    import sys

    import infer
    from inference.pipeline import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                 "started": "2026-12-06 07:00:00"}))
        film = str(sorted(FILMS_DIR.glob("*.png"))[0])
        assert infer.main(["--model", str(parity["bundle"]), "--out", str(out), "--quiet", film]) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {sleeper.pid}" in err and not (out / "predictions.csv").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same lock, its run gone: taken over, and released at the end
    assert infer.main(["--model", str(parity["bundle"]), "--out", str(out), "--quiet", "--num-workers", "0",
                       film]) == 0
    assert (out / "predictions.csv").is_file() and not (out / LOCK_FILE).exists()


def test_of_two_runs_taking_over_a_dead_runs_lock_at_once_one_is_refused(tmp_path, monkeypatch):
    """Run B finds the lock of a dead run; before B removes it, run A has taken it over. B must
    not remove A's lock: it is refused, naming A."""
    import contextlib
    import json
    import os
    import socket

    import inference.pipeline as pipeline

    out = tmp_path / "out"
    out.mkdir()
    (out / pipeline.LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(),
                                                      "started": "2026-12-06 07:00:00"}))
    real_alive = pipeline._alive
    run_a = contextlib.ExitStack()
    judged = []

    def alive_while_a_takes_over(pid):
        judged.append(pid)
        if len(judged) == 1:  # B has read the dead run's lock and asks whether that run lives
            run_a.enter_context(pipeline.output_lock(out))  # meanwhile A takes the lock over
        return real_alive(pid)

    monkeypatch.setattr(pipeline, "_alive", alive_while_a_takes_over)
    with run_a:
        with pytest.raises(pipeline.OutputFolderInUse, match=f"pid {os.getpid()} "):
            with pipeline.output_lock(out):  # B
                pass
        assert json.loads((out / pipeline.LOCK_FILE).read_text())["pid"] == os.getpid()  # A's lock stands
    assert sorted(p.name for p in out.iterdir()) == []  # released, nothing left beside it


def test_an_interrupted_run_keeps_the_tables_of_the_films_it_finished(parity, tmp_path, monkeypatch):
    import pandas as pd

    import inference.pipeline as pipeline
    from inference.predictor import Predictor

    predictor = Predictor(parity["bundle"], device="cpu")
    real = pipeline._write_outputs
    calls = []

    def write_then_stop(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_write_outputs", write_then_stop)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_inference(predictor, [str(FILMS_DIR)], out, batch_size=1, num_workers=0, progress=False)
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 2 and (table.status == "ok").all()
    assert set(pd.read_csv(out / "vertebrae.csv")["name"]) <= set(table.name)
    assert not (out / pipeline.LOCK_FILE).exists()


def test_a_run_killed_before_its_first_flush_leaves_its_own_tables_not_an_earlier_runs(parity, tmp_path,
                                                                                       monkeypatch):
    """The tables a SIGKILL would leave, read while the first film is written: they are this
    run's (its kept films and unlisted inputs), never an earlier run's into the same folder."""
    import shutil
    from pathlib import Path

    import pandas as pd

    import inference.pipeline as pipeline
    from inference.predictor import Predictor

    predictor = Predictor(parity["bundle"], device="cpu")
    films = sorted(FILMS_DIR.glob("*.png"))
    earlier, later = tmp_path / "earlier", tmp_path / "later"
    earlier.mkdir(), later.mkdir()
    shutil.copy(films[0], earlier / "old.png")
    shutil.copy(films[1], later / "kept.png")
    shutil.copy(films[2], later / "new.png")
    out = tmp_path / "out"
    pipeline.run_inference(predictor, [str(earlier), str(later / "kept.png")], out, num_workers=0, progress=False)

    seen = []
    real = pipeline._write_outputs

    def look_then_write(*args, **kwargs):
        seen.append(pd.read_csv(out / "predictions.csv"))  # what a kill at this moment leaves
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_write_outputs", look_then_write)
    pipeline.run_inference(predictor, [str(later), str(tmp_path / "absent.png")], out, num_workers=0,
                           progress=False, resume=True)
    files = [Path(p).name for p in seen[0].image]
    assert "old.png" not in files  # the earlier run's film
    assert dict(zip(files, seen[0].status)) == {"absent.png": "error", "kept.png": "ok"}
    assert [Path(p).name for p in pd.read_csv(out / "predictions.csv").image] == ["absent.png", "kept.png", "new.png"]


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(parity, tmp_path):
    import shutil

    import pandas as pd

    import infer

    films = tmp_path / "films"
    shutil.copytree(FILMS_DIR, films)
    args = ["--model", str(parity["bundle"]), "--out", str(films / "out"), "--quiet", "--num-workers", "0", str(films)]
    assert infer.main(args) == 0
    assert infer.main(args) == 0  # the overlays written by the first run are not films of the second
    table = pd.read_csv(films / "out" / "predictions.csv")
    assert len(table) == 4 and (table.status == "ok").all()


def test_films_under_the_output_folder_are_read_and_an_input_folder_is_no_output_folder(parity, tmp_path, capsys):
    """Only the output folder's own subtree is skipped while walking: films in a folder inside
    --out, or named inside it, are inputs; --out naming an input folder is a usage error."""
    import shutil

    import pandas as pd

    import infer

    root = tmp_path / "study"
    shutil.copytree(FILMS_DIR, root / "films")
    options = ["--model", str(parity["bundle"]), "--quiet", "--num-workers", "0"]
    assert infer.main(options + ["--out", str(root), str(root / "films")]) == 0  # once: 0 inputs, "0 ok"
    assert len(pd.read_csv(root / "predictions.csv")) == 4
    film = root / "named.png"  # an input named explicitly inside --out
    shutil.copy(FILMS_DIR / "phantom_s7_00000.png", film)
    assert infer.main(options + ["--out", str(root), "--resume", str(root / "films"), str(film)]) == 0
    assert (pd.read_csv(root / "predictions.csv").status == "ok").sum() == 5
    with pytest.raises(SystemExit) as exc:
        infer.main(options + ["--out", str(root / "films"), str(root / "films")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is an input folder" in err and "Traceback" not in err


def test_the_heatmap_peak_of_a_blank_film_lies_inside_the_image(parity, tmp_path):
    import json

    import cv2
    import numpy as np

    import infer

    # a faint ramp with faint noise (a constant film, or noise alone, is refused); mostly padding at the network input
    blank = tmp_path / "wide.png"
    ramp = np.linspace(120, 136, 640)[None, :] + np.random.default_rng(0).integers(0, 3, (64, 640))
    cv2.imwrite(str(blank), ramp.astype(np.uint8))
    assert infer.main(["--model", str(parity["bundle"]), "--out", str(tmp_path / "out"), "--quiet",
                       "--num-workers", "0", str(blank)]) == 0
    record = json.loads((tmp_path / "out" / "wide.json").read_text())
    for key in ("heatmap_peak", "heatmap_peak_head"):
        x, y = record[key]
        assert -0.5 <= x <= 639.5 and -0.5 <= y <= 63.5, (key, x, y)


def test_a_film_of_extreme_aspect_ratio_is_read_and_a_failing_film_leaves_no_files(parity, tmp_path, monkeypatch):
    import cv2
    import numpy as np
    import pandas as pd

    import inference.pipeline as pipeline
    import infer
    from data.records import error_row

    wide = tmp_path / "films" / "wide.png"
    wide.parent.mkdir()
    ramp = np.linspace(0, 200, 51200)[None, :] + 50 * np.random.default_rng(0).random((64, 51200))
    cv2.imwrite(str(wide), ramp.astype(np.uint8))
    args = ["--model", str(parity["bundle"]), "--quiet", "--num-workers", "0", str(wide)]
    assert infer.main(args + ["--out", str(tmp_path / "a")]) == 0  # 800:1 once failed in OpenCV's resize
    assert (tmp_path / "a" / "wide.json").is_file()

    def broken_drawing(*a, **k):
        raise RuntimeError("drawing failed\nsecond line")

    monkeypatch.setattr(pipeline, "overlay_heatmap", broken_drawing)
    assert infer.main(args + ["--out", str(tmp_path / "b")]) == 1
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["errors.csv", "predictions.csv", "vertebrae.csv"]
    error = pd.read_csv(tmp_path / "b" / "errors.csv").error.iloc[0]
    assert "drawing failed second line" in error and "\n" not in error
    assert error_row("x", "x", "a\nb  c")["error"] == "a b c"
