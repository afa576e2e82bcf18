"""--resume keeps a film only when its JSON's fingerprint names the same input file (size,
mtime_ns, sha256) and the same output options; anything else is made again. A multi-frame
input records its frame count."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pydicom
import pytest

from inference.pipeline import run_inference
from inference.predictor import Predictor
from tests.parity.parity_model import FILMS_DIR, parity_checkpoint, with_content_readers
from tests.training_config import phantom_as_dicom

FILMS = sorted(FILMS_DIR.glob("*.png"))


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    # the parity model, its crop network and refiner read by content: quick, and it finds bodies
    checkpoint = parity_checkpoint(tmp_path_factory.mktemp("resume") / "parity.ckpt")
    return with_content_readers(Predictor(checkpoint, device="cpu"))


def _run(predictor, folder, out, **options):
    return run_inference(predictor, [str(folder)], out, batch_size=2, progress=False, **options)


def _json(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_a_replaced_input_is_made_again_and_an_unchanged_one_kept(predictor, tmp_path):
    films, out = tmp_path / "films", tmp_path / "out"
    films.mkdir()
    shutil.copy(FILMS[0], films / "a.png")
    shutil.copy(FILMS[2], films / "b.png")
    _run(predictor, films, out)
    first = _json(out, "a")
    made_from = first["fingerprint"]
    assert made_from["sha256"] == hashlib.sha256((films / "a.png").read_bytes()).hexdigest()
    assert made_from["size"] == (films / "a.png").stat().st_size and made_from["format"] == "png"
    assert made_from["options"] == {"max_pixels": 50_000_000, "backend": "torch", "min_spine_score": 0.3}

    shutil.copy(FILMS[1], films / "a.png")  # another film under the same name
    summary = _run(predictor, films, out, resume=True)
    assert summary.n_skipped == 1  # b.png only
    again = _json(out, "a")
    assert again["fingerprint"]["sha256"] != made_from["sha256"]
    assert again["p_fracture"] != pytest.approx(first["p_fracture"], abs=1e-9)

    # the same bytes under a new modification time, and a changed option, are made again too
    os.utime(films / "b.png", ns=(0, 0))
    assert _run(predictor, films, out, resume=True).n_skipped == 1
    assert _run(predictor, films, out, resume=True, max_pixels=40_000_000).n_skipped == 0
    assert _run(predictor, films, out, resume=True, max_pixels=40_000_000).n_skipped == 2


def test_dicom_options_added_or_dropped_on_resume_change_the_outputs(predictor, tmp_path):
    films, out = tmp_path / "films", tmp_path / "out"
    films.mkdir()
    shutil.copy(FILMS[0], films / "plain.png")
    phantom_as_dicom(FILMS[1], films / "study.dcm")
    _run(predictor, films, out)
    assert not list(out.glob("*.dcm"))

    # --dicom-sr --dicom-sc added: the DICOM film is made again with them; the PNG has nothing to add
    summary = _run(predictor, films, out, resume=True, dicom_sc=True, dicom_sr=True, keep_identifiers=True)
    assert summary.n_skipped == 1
    record = _json(out, "study")
    assert record["dicom_outputs"] == {"secondary_capture": "study_sc.dcm", "structured_report": "study_sr.dcm"}
    assert record["patient"]["PatientName"] == "Doe^Jane"
    assert str(pydicom.dcmread(out / "study_sr.dcm").PatientName) == "Doe^Jane"
    assert _run(predictor, films, out, resume=True, dicom_sc=True, dicom_sr=True,
                keep_identifiers=True).n_skipped == 2

    # resumed without --keep-identifiers: the names leave the JSON and the SR
    assert _run(predictor, films, out, resume=True, dicom_sc=True, dicom_sr=True).n_skipped == 1
    record = _json(out, "study")
    assert "patient" not in record and not record["fingerprint"]["options"]["keep_identifiers"]
    assert "Doe" not in str(pydicom.dcmread(out / "study_sr.dcm").PatientName)
    assert b"Doe^Jane" not in (out / "study_sc.dcm").read_bytes()

    # resumed without the DICOM outputs: the earlier ones are removed, not left beside a JSON without them
    assert _run(predictor, films, out, resume=True).n_skipped == 1
    assert "dicom_outputs" not in _json(out, "study") and not list(out.glob("*.dcm"))

    # a DICOM output deleted by hand is made again
    _run(predictor, films, out, resume=True, dicom_sr=True)
    (out / "study_sr.dcm").unlink()
    assert _run(predictor, films, out, resume=True, dicom_sr=True).n_skipped == 1
    assert (out / "study_sr.dcm").is_file()


def test_a_multi_frame_dicom_records_its_frame_count(predictor, tmp_path):
    films, out = tmp_path / "films", tmp_path / "out"
    films.mkdir()
    single = phantom_as_dicom(FILMS[0], films / "single.dcm")
    ds = pydicom.dcmread(single)
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.save_as(films / "cine.dcm")
    summary = _run(predictor, films, out)
    assert summary.n_ok == 2
    assert _json(out, "cine")["frames"] == 3
    assert "frames" not in _json(out, "single")  # one frame: nothing to say
    # the first frame is the one read: the same film as the single-frame file
    assert _json(out, "cine")["p_fracture"] == pytest.approx(_json(out, "single")["p_fracture"], abs=1e-6)
