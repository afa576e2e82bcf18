"""data.discovery.find_inputs: files, folders, manifests and DICOMDIRs into image paths."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import cv2
import pytest
from pydicom.data import get_testdata_file

from data.discovery import find_inputs
from .helpers import deny_open, dicom_bytes, ramp


def png(path: Path) -> Path:
    """A small PNG, whatever the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", ramp())[1].tobytes())
    return path


def run_with_timeout(inputs, seconds=20.0):
    """find_inputs in a thread: a hang fails the test instead of blocking the suite."""
    result = {}

    def target():
        result["value"] = find_inputs([str(i) for i in inputs])

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"find_inputs did not return within {seconds} s"
    return result["value"]


def reasons_for(problems, path) -> list[str]:
    return [why for p, why in problems if os.path.abspath(p) == os.path.abspath(path)]


# ----------------------------------------------------------------------------- folders
def test_folder_walk_sorted_recursive_hidden_skipped(tmp_path):
    root = tmp_path / "in"
    for rel in ["b.png", "a.jpg", "sub/z.tif", "sub/deeper/y.png", "aa/x.dcm", "C.PNG"]:
        png(root / rel)
    png(root / ".hidden.png")
    png(root / ".git" / "inside.png")
    (root / "notes.txt").write_text("not an image")
    (root / "README").write_text("no suffix, not an image")
    (root / "scan").write_bytes(dicom_bytes(tmp_path))  # DICOM without a suffix
    (root / "1.2.840.113619.2.55").write_bytes(dicom_bytes(tmp_path))  # UID-style name
    (root / "raw_png").write_bytes(cv2.imencode(".png", ramp())[1].tobytes())
    paths, problems = find_inputs([str(root)])
    assert problems == []
    expected = ["1.2.840.113619.2.55", "C.PNG", "a.jpg", "b.png", "raw_png", "scan",
                "aa/x.dcm", "sub/z.tif", "sub/deeper/y.png"]
    assert paths == [str(root / e) for e in expected]
    assert all(os.path.isabs(p) for p in paths)


def test_the_skipped_output_folder_is_not_walked_but_its_named_files_and_its_parent_are(tmp_path):
    root = tmp_path / "in"
    for rel in ["a.png", "out/a_heatmap.png", "out/deeper/b_heatmap.png", "other/c.png"]:
        png(root / rel)
    (tmp_path / "link").symlink_to(root / "out")
    for skip in (root / "out", tmp_path / "link"):  # however the output folder is named
        paths, problems = find_inputs([str(root)], skip_folder=skip)
        assert paths == [str(root / "a.png"), str(root / "other" / "c.png")] and problems == []
    named = root / "out" / "a_heatmap.png"
    paths, problems = find_inputs([str(root / "other"), str(named), str(root / "out")], skip_folder=root / "out")
    assert paths == [str(root / "other" / "c.png"), str(named)]  # named files are listed
    assert reasons_for(problems, root / "out") == ["the output folder: its files are outputs, not inputs"]
    paths, _ = find_inputs([str(root / "other")], skip_folder=root)  # an input folder inside the output folder
    assert paths == [str(root / "other" / "c.png")]


def test_inputs_deduplicated_and_absolute(tmp_path, monkeypatch):
    a = png(tmp_path / "d" / "a.png")
    monkeypatch.chdir(tmp_path)
    paths, problems = find_inputs(["d", "d/a.png", str(a), "d/../d/a.png", "d/"])
    assert paths == [str(a)] and problems == []


def test_missing_input_is_a_problem(tmp_path):
    paths, problems = find_inputs([str(tmp_path / "nope"), str(tmp_path / "nope.png")])
    assert paths == []
    assert [why for _, why in problems] == ["no such file or folder"] * 2


def test_symlink_loops_do_not_hang(tmp_path):
    root = tmp_path / "in"
    real = png(root / "a.png")
    os.symlink(root, root / "loop")                 # folder -> itself: not followed
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")           # folder -> its parent: not followed
    os.symlink("self.png", root / "self.png")       # a link to itself (ELOOP)
    os.symlink("ping.dcm", root / "pong.dcm")       # two links to each other
    os.symlink("pong.dcm", root / "ping.dcm")
    os.symlink("missing.png", root / "dangling.png")
    os.symlink(real, root / "alias.png")            # a symlinked file is listed
    paths, problems = run_with_timeout([root])
    assert paths == [str(root / "a.png"), str(root / "alias.png")]
    assert reasons_for(problems, root / "self.png") == ["symlink loop"]
    assert reasons_for(problems, root / "ping.dcm") == ["symlink loop"]
    assert reasons_for(problems, root / "pong.dcm") == ["symlink loop"]
    assert "broken symlink" in reasons_for(problems, root / "dangling.png")[0]
    # given directly: a looping link is a problem, a symlinked folder is walked (once)
    paths, problems = run_with_timeout([root / "self.png", root / "loop", root])
    assert paths == [str(root / "loop" / "a.png"), str(root / "loop" / "alias.png")]
    assert problems[0] == (str(root / "self.png"), "symlink loop")


def test_symlinked_folder_given_directly_is_walked(tmp_path):
    png(tmp_path / "real" / "a.png")
    os.symlink(tmp_path / "real", tmp_path / "link")
    paths, _ = find_inputs([str(tmp_path / "link")])
    assert paths == [str(tmp_path / "link" / "a.png")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_in_folder_skipped_without_blocking(tmp_path):
    png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.dcm")
    os.mkfifo(tmp_path / "pipe")
    paths, problems = run_with_timeout([tmp_path])
    assert paths == [str(tmp_path / "a.png")] and problems == []
    paths, problems = run_with_timeout([tmp_path / "pipe"])
    assert paths == [] and "not a regular file" in problems[0][1]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can read chmod 000 files and folders")
def test_unreadable_file_and_folder_chmod(tmp_path):
    png(tmp_path / "ok.png")
    locked = png(tmp_path / "locked.png")
    closed = tmp_path / "closed"
    png(closed / "inside.png")
    locked.chmod(0)
    closed.chmod(0)
    try:
        paths, problems = find_inputs([str(tmp_path)])
    finally:
        locked.chmod(0o644)
        closed.chmod(0o755)
    assert paths == [str(tmp_path / "ok.png")]
    assert reasons_for(problems, locked) == ["permission denied: cannot read the file"]
    assert reasons_for(problems, closed) == ["permission denied: cannot list the folder"]


def test_unreadable_file_and_folder_monkeypatched(tmp_path, monkeypatch):
    png(tmp_path / "ok.png")
    locked = png(tmp_path / "locked.png")
    locked_csv = tmp_path / "list.csv"
    locked_csv.write_text("image\nok.png\n")
    closed = tmp_path / "closed"
    png(closed / "inside.png")
    deny_open(monkeypatch, locked, locked_csv)
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(closed):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    paths, problems = find_inputs([str(tmp_path), str(locked), str(locked_csv)])
    assert paths == [str(tmp_path / "ok.png")]
    assert reasons_for(problems, locked) == ["permission denied: cannot read the file"]
    assert reasons_for(problems, closed) == ["permission denied: cannot list the folder"]
    assert reasons_for(problems, locked_csv) == ["permission denied: cannot read the manifest"]


# ----------------------------------------------------------------------------- manifests
def test_manifest_relative_to_its_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    png(data / "img" / "a.png")
    (data / "list.csv").write_text(
        "patient_id,image\np1,img/a.png\np2,img/missing.png\np3,/abs/x.png\n\np4,\n")
    monkeypatch.chdir(tmp_path)
    paths, problems = find_inputs(["data/list.csv"])
    assert paths == [str(data / "img" / "a.png"), str(data / "img" / "missing.png"),
                     "/abs/x.png"]
    assert problems == [("data/list.csv", "manifest line 6: empty image path")]


def test_manifest_without_image_column(tmp_path):
    (tmp_path / "m.csv").write_text("path\na.png\n")
    paths, problems = find_inputs([str(tmp_path / "m.csv")])
    assert paths == [] and problems == [(str(tmp_path / "m.csv"),
                                         "manifest has no 'image' column")]


# ----------------------------------------------------------------------------- DICOMDIR
def pydicom_dicomdir() -> Path:
    path = get_testdata_file("DICOMDIR", download=False)
    if path is None:
        pytest.skip("pydicom's DICOMDIR test file is not bundled")
    return Path(path)


def referenced_files(dicomdir: Path) -> list[str]:
    """The DICOMDIR's file references, read independently with pydicom's FileSet."""
    import pydicom
    from pydicom.fileset import FileSet

    fs = FileSet(pydicom.dcmread(dicomdir))
    return sorted(os.path.abspath(instance.path) for instance in fs)


def test_dicomdir_lists_its_files():
    dicomdir = pydicom_dicomdir()
    paths, problems = find_inputs([str(dicomdir)])
    assert problems == []
    assert sorted(paths) == referenced_files(dicomdir)
    assert len(paths) == len(set(paths)) > 0
    assert str(dicomdir) not in paths
    assert all(Path(p).is_file() for p in paths)


def test_folder_with_dicomdir_lists_each_file_once():
    dicomdir = pydicom_dicomdir()
    folder = dicomdir.parent
    paths, problems = find_inputs([str(folder)])
    assert problems == []
    assert len(paths) == len(set(paths))
    assert set(referenced_files(dicomdir)) <= set(paths)
    assert not any(Path(p).name.upper().startswith("DICOMDIR") for p in paths)
    # given both, still once each
    both, _ = find_inputs([str(folder), str(dicomdir)])
    assert both == paths


def test_dicomdir_missing_file_and_case_insensitive_names(tmp_path):
    source = pydicom_dicomdir().parent / "TINY_ALPHA"
    if not (source / "DICOMDIR").is_file():
        pytest.skip("TINY_ALPHA file-set not bundled")
    copy = tmp_path / "cd"
    shutil.copytree(source, copy)
    expected = referenced_files(copy / "DICOMDIR")
    # a CD copied with lower-case names: the DICOMDIR's upper-case IDs still resolve
    series = copy / "PT000000" / "ST000000" / "SE000000"
    first = series / "IM000000"
    first.rename(series / "im000000")
    first.with_name("IM000001").unlink()  # and one file lost
    paths, problems = find_inputs([str(copy / "DICOMDIR")])
    assert len(paths) == len(expected) - 1
    assert str(series / "im000000") in paths
    assert reasons_for(problems, series / "IM000001") == [
        f"listed in DICOMDIR {copy / 'DICOMDIR'} but not found"]


def test_unreadable_dicomdir_is_a_problem(tmp_path):
    (tmp_path / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 64)
    png(tmp_path / "a.png")
    paths, problems = find_inputs([str(tmp_path)])
    assert paths == [str(tmp_path / "a.png")]
    assert len(problems) == 1 and "cannot read DICOMDIR" in problems[0][1]
