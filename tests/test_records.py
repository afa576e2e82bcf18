"""The output schema (data/records.py): JSON and CSV forms of the film and vertebra records,
vertebrae.csv written from memory, --resume reading records back, the DICOM header read once."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd
import pytest

from data.records import (PREDICTION_COLUMNS, VERTEBRA_COLUMNS, FilmRecord, RecordError, VertebraRecord,
                               error_row)
from tests.parity.parity_model import FILMS_DIR, FIXTURE


def _vertebra(level="L1", **changes) -> VertebraRecord:
    v = dict(level=level, level_confidence=0.9, detection_score=0.8, p_fracture=0.3, p_acute=0.1,
             genant_grade=1, morphology="wedge", heights={"anterior": 8.0, "middle": 9.0, "posterior": 10.0},
             heights_mm=None, height_ratios={"anterior_posterior": 0.8, "middle_posterior": 0.9},
             points=[[float(k), float(k + 1)] for k in range(6)], height_loss=0.2, p_acute_given_fracture=0.33)
    v.update(changes)
    return VertebraRecord(**v)


def _film(vertebrae=(), **changes) -> FilmRecord:
    f = dict(image="/films/a.png", name="a", p_fracture=0.4, p_acute=0.2, p_acute_given_fracture=0.5,
             heatmap_peak=[10.0, 20.0], p_fracture_image_head=0.35, heatmap_peak_value=0.4,
             heatmap_peak_head=[11.0, 21.0], heatmap_peak_head_value=0.35, image_size=[64, 48],
             pixel_spacing_mm=None, heatmap={"npy": "a_heatmap.npy", "png": "a_heatmap.png", "shape": [8, 6],
                                             "to_image": {"scale": 8.0, "offset": [3.5, 3.5]}},
             vertebrae=list(vertebrae), level_confidence=0.9, levels_trusted=True, checkpoint_id="abc",
             model={"architecture": "x"})
    f.update(changes)
    return FilmRecord(**f)


def test_json_round_trip():
    film = _film([_vertebra(), _vertebra("L2", p_fracture_crop=0.2, heights_mm={"anterior": 1.0, "middle": 1.0,
                                                                                "posterior": 1.0})],
                 decision={"operating_point": "balanced", "threshold": 0.5, "fracture": False},
                 p_fracture_uncalibrated=0.45)
    back = FilmRecord.from_json_dict(json.loads(json.dumps(film.to_json_dict())))
    assert back == film
    assert back.vertebrae[0].levels_trusted is True  # the film's, carried onto its vertebrae
    # optional keys are left out when empty, null-able ones are written as null
    d = _film([_vertebra()]).to_json_dict()
    assert "decision" not in d and "p_fracture_uncalibrated" not in d and "vertebra_error" not in d
    assert d["pixel_spacing_mm"] is None and d["vertebrae"][0]["heights_mm"] is None
    assert "p_fracture_crop" not in d["vertebrae"][0] and "levels_trusted" not in d["vertebrae"][0]
    assert "status" not in d and "error" not in d  # CSV-only


def test_every_key_of_a_written_film_is_a_record_field():
    for path in sorted(FIXTURE.glob("*.json")):
        d = json.loads(path.read_text())
        film = FilmRecord.from_json_dict(d)
        assert set(film.to_json_dict()) == set(d), path.name
        for written, v in zip(d["vertebrae"], film.vertebrae):
            assert set(v.to_json_dict()) == set(written)
    with pytest.raises(RecordError, match="unknown key"):
        FilmRecord.from_json_dict({**d, "surprise": 1})
    with pytest.raises(RecordError, match="missing key"):
        FilmRecord.from_json_dict({k: v for k, v in d.items() if k != "p_fracture"})


def test_columns_come_from_the_classes():
    assert PREDICTION_COLUMNS == ["image", "name", "p_fracture", "p_acute", "p_acute_given_fracture",
                                  "heatmap_peak_x", "heatmap_peak_y", "status", "error", "decision",
                                  "operating_point"]
    assert VERTEBRA_COLUMNS[:6] == ["image", "name", "level", "level_confidence", "levels_trusted", "detection_score"]
    assert VERTEBRA_COLUMNS[-12:] == [f"p{i}{c}" for i in range(1, 7) for c in "xy"]
    film = _film([_vertebra()], decision={"operating_point": "balanced", "threshold": 0.5, "fracture": True})
    row = film.prediction_row()
    assert list(row) == PREDICTION_COLUMNS
    assert (row["heatmap_peak_x"], row["decision"], row["operating_point"]) == (10.0, "1", "balanced")
    (vrow,) = film.vertebra_rows()
    assert list(vrow) == VERTEBRA_COLUMNS
    assert vrow["height_posterior"] == 10.0 and vrow["p6y"] == 6.0 and vrow["levels_trusted"] is True
    assert vrow["height_anterior_mm"] is None
    assert set(error_row("x", "", "bad")) <= set(PREDICTION_COLUMNS)


def test_a_new_field_reaches_the_json_and_the_csv_without_other_edits(tmp_path):
    from inference.pipeline import write_vertebrae_table

    @dataclass(kw_only=True)
    class ScoredVertebra(VertebraRecord):
        endplate_sharpness: float | None = None

    @dataclass(kw_only=True)
    class ScoredFilm(FilmRecord):
        vertebra_type = ScoredVertebra
        film_quality: float = field(default=0.7)

    v = ScoredVertebra(**{**_vertebra().__dict__, "endplate_sharpness": 0.25})
    film = ScoredFilm(**{**_film().__dict__, "vertebrae": [v]})
    assert film.to_json_dict()["film_quality"] == 0.7
    assert film.to_json_dict()["vertebrae"][0]["endplate_sharpness"] == 0.25
    assert film.prediction_row()["film_quality"] == 0.7 and ScoredFilm.csv_columns()[-1] == "film_quality"
    assert "film_quality" in ScoredFilm.numeric_columns()
    assert film.vertebra_rows()[0]["endplate_sharpness"] == 0.25
    assert ScoredFilm.vertebra_columns()[-1] == "endplate_sharpness"
    assert ScoredFilm.from_json_dict(json.loads(json.dumps(film.to_json_dict()))) == film
    write_vertebrae_table(tmp_path / "vertebrae.csv", [film])
    assert pd.read_csv(tmp_path / "vertebrae.csv")["endplate_sharpness"].tolist() == [0.25]


def test_vertebrae_csv_from_memory_equals_the_one_from_the_jsons(tmp_path):
    """The fixture's vertebrae.csv was gathered by re-reading every JSON; the records in memory
    give the same table."""
    from inference.pipeline import write_vertebrae_table

    records = [FilmRecord.from_json_dict(json.loads(p.read_text())) for p in sorted(FIXTURE.glob("*.json"))]
    write_vertebrae_table(tmp_path / "vertebrae.csv", records)
    ours = pd.read_csv(tmp_path / "vertebrae.csv", dtype=str, keep_default_na=False)
    want = pd.read_csv(FIXTURE / "vertebrae.csv", dtype=str, keep_default_na=False)
    order = ["image", "level"]
    ours, want = (t.sort_values(order, kind="stable").reset_index(drop=True) for t in (ours, want))
    pd.testing.assert_frame_equal(ours, want)


def test_run_resume_and_one_header_read_per_dicom(tmp_path, dicom_reads):
    """A run's vertebrae.csv equals the rows of its JSONs read back; --resume keeps every output
    and rewrites the same tables; a DICOM film's header is parsed once per run, DICOM outputs and
    identifiers included."""

    from inference.pipeline import run_inference
    from inference.predictor import Predictor
    from tests.parity.parity_model import parity_checkpoint, with_content_readers
    from training_config import phantom_as_dicom

    films = tmp_path / "films"
    films.mkdir()
    pngs = sorted(FILMS_DIR.glob("*.png"))[:2]
    for p in pngs:
        (films / p.name).write_bytes(p.read_bytes())
    phantom_as_dicom(pngs[0], films / "study1.dcm")
    predictor = with_content_readers(Predictor(parity_checkpoint(tmp_path / "parity.ckpt"), device="cpu"))
    reads = dicom_reads
    out = tmp_path / "out"
    summary = run_inference(predictor, [str(films)], out, batch_size=2, progress=False, keep_identifiers=True,
                            dicom_sc=True, dicom_sr=True)
    assert summary.n_ok == 3 and summary.n_failed == 0
    assert reads.count(str(films / "study1.dcm")) == 1, reads
    record = json.loads((out / "study1.json").read_text())
    assert set(record["dicom_outputs"]) == {"secondary_capture", "structured_report"} and "patient" in record
    first = {n: (out / n).read_text() for n in ("predictions.csv", "vertebrae.csv")}
    rows = [r for p in sorted(out.glob("*.json")) for r in FilmRecord.from_json_dict(json.loads(p.read_text())).vertebra_rows()]
    from_jsons = pd.DataFrame(rows, columns=VERTEBRA_COLUMNS).astype({"genant_grade": "Int64"})
    written = pd.read_csv(out / "vertebrae.csv").astype({"genant_grade": "Int64"})
    key = ["image", "level"]
    pd.testing.assert_frame_equal(written.sort_values(key).reset_index(drop=True),
                                  from_jsons.sort_values(key).reset_index(drop=True), check_dtype=False)

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    summary = run_inference(predictor, [str(films)], out, batch_size=2, progress=False, resume=True,
                            keep_identifiers=True, dicom_sc=True, dicom_sr=True)
    assert summary.n_skipped == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == stamps
    assert {n: (out / n).read_text() for n in first} == first
