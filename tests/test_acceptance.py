"""What inference refuses before any model runs (inference/acceptance.py): other modalities and
body parts, tiny, constant and NaN images; an implausible pixel spacing is ignored with a warning."""
from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data.phantom import generate_image
from data.transforms import normalize_intensity
from inference.acceptance import MIN_SIDE_PX, checked_spacing, neighbour_correlation, no_spine_reason
from inference.predictor import InferenceDataset

NETWORK_INPUT = (128, 104)
SOP_CLASSES = {  # modality -> a storage SOP class of it
    "DX": "1.2.840.10008.5.1.4.1.1.1.1", "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
    "RTDOSE": "1.2.840.10008.5.1.4.1.1.481.2", "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
}


def film_pixels(h=96, w=80, top=4095):
    """A grey ramp with a bright band: contrast everywhere, like a film."""
    ramp = np.linspace(0, top // 2, h * w).reshape(h, w)
    ramp[h // 3: h // 2] = top
    return ramp.astype(np.uint16)


def write_dicom(path, modality: str | None = "DX", pixels=None, body_part=None, spacing=None, float_pixels=None):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES.get(modality, SOP_CLASSES["DX"])
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    if modality:
        ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    if spacing:
        ds.PixelSpacing = list(spacing)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if float_pixels is not None:
        ds.Rows, ds.Columns = float_pixels.shape
        ds.BitsAllocated = 32
        ds.FloatPixelData = float_pixels.astype("<f4").tobytes()
    elif modality == "SEG":  # a one-bit segment bitmap
        bits = np.zeros((80, 80), np.uint8)
        bits[20:60, 20:60] = 1
        ds.Rows, ds.Columns = bits.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
        ds.PixelData = np.packbits(bits.ravel(), bitorder="little").tobytes()
    else:
        pixels = film_pixels() if pixels is None else pixels
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def prepared(path) -> dict:
    return InferenceDataset([str(path)], NETWORK_INPUT)[0]


def refused(path, *needles) -> str:
    item = prepared(path)
    assert "refused" in item, item.keys()
    reason = item["refused"]
    assert "\n" not in reason and all(n in reason for n in needles), reason
    return reason


@pytest.mark.parametrize("modality", ["CT", "MR", "SEG"])
def test_other_modalities_are_refused_naming_the_modality(tmp_path, modality):
    refused(write_dicom(tmp_path / f"{modality}.dcm", modality), f"modality {modality}", "CR, DX, RF, XA, OT")


def test_a_tiny_rtdose_is_refused_for_its_modality(tmp_path):
    dose = write_dicom(tmp_path / "dose.dcm", "RTDOSE", pixels=film_pixels(10, 10))
    refused(dose, "modality RTDOSE")


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("modality", ["DX", "CR", "RF", "XA", "OT", "dx ", None])
def test_radiograph_modalities_and_a_missing_modality_are_accepted(tmp_path, modality):
    item = prepared(write_dicom(tmp_path / "film.dcm", modality))
    assert "image" in item and item["image"].shape == (1, *NETWORK_INPUT)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("body_part, accepted", [
    ("LSPINE", True), ("L-SPINE", True), ("Lumbar spine", True), ("CHEST", True), ("ABDOMEN", True),
    ("WHOLEBODY", True), ("LWS", True),  # free text that names nothing else is accepted
    ("KNEE", False), ("SKULL", False), ("hand", False), ("BREAST", False),
])
def test_body_part_examined_refuses_only_what_is_clearly_not_the_spine(tmp_path, body_part, accepted):
    item = prepared(write_dicom(tmp_path / "film.dcm", "DX", body_part=body_part))
    if accepted:
        assert "image" in item
    else:
        assert f"body part examined {body_part} is not the spine" in item["refused"]


@pytest.mark.parametrize("h, w, accepted", [(1, 1, False), (10, 10, False), (MIN_SIDE_PX - 1, 400, False),
                                            (400, MIN_SIDE_PX - 1, False), (MIN_SIDE_PX, MIN_SIDE_PX, True)])
def test_images_with_a_side_under_the_minimum_are_refused(tmp_path, h, w, accepted):
    png = tmp_path / "small.png"
    noise = np.random.default_rng(0).random((h, w)).astype(np.float32)
    cv2.imwrite(str(png), (cv2.GaussianBlur(noise, (0, 0), 2) * 255).astype(np.uint8))  # structure, as a film has
    item = prepared(png)
    if accepted:
        assert "image" in item
    else:
        assert item["refused"] == f"image of {w} x {h} px is too small (a side under {MIN_SIDE_PX} px)"


@pytest.mark.parametrize("value", [0, 128, 255])
def test_constant_images_are_refused(tmp_path, value):
    png = tmp_path / "blank.png"
    cv2.imwrite(str(png), np.full((200, 150), value, np.uint8))
    refused(png, "constant image: every pixel has the value")


def test_a_constant_dicom_and_a_nearly_constant_film_are_refused(tmp_path):
    refused(write_dicom(tmp_path / "flat.dcm", pixels=np.full((96, 80), 1000, np.uint16)), "constant image")
    almost = np.zeros((200, 150), np.uint8)
    almost[0, :100] = 255  # 0.3 % of the pixels: the contrast normalisation would see nothing
    cv2.imwrite(str(tmp_path / "almost.png"), almost)
    refused(tmp_path / "almost.png", "no contrast")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_noise_without_structure_is_refused(tmp_path, dtype):
    """Uniform noise has no spatial structure (neighbouring pixels uncorrelated), which no
    radiograph lacks: refused, though its contrast is full."""
    top = np.iinfo(dtype).max
    png = tmp_path / "noise.png"
    cv2.imwrite(str(png), (np.random.default_rng(1).random((512, 400)) * top).astype(dtype))
    reason = refused(png, "no structure", "uncorrelated")
    assert "r = 0.0" in reason or "r = -0.0" in reason


def test_a_film_with_structure_and_noise_is_read(tmp_path):
    """Blurred noise (structure at 2 px) and a phantom film with its quantum noise are read."""
    noise = np.random.default_rng(1).random((512, 400)).astype(np.float32)
    cv2.imwrite(str(tmp_path / "blurred.png"), (cv2.GaussianBlur(noise, (0, 0), 2) * 255).astype(np.uint8))
    assert "image" in prepared(tmp_path / "blurred.png")
    film = np.asarray(generate_image(5, 0, size=128)["image"], np.float32)  # the smallest films are the roughest
    assert neighbour_correlation(normalize_intensity(film)) >= 0.75
    assert neighbour_correlation(noise) < 0.05
    assert neighbour_correlation(np.tile(np.arange(9.0), (4, 1)).T) == 1.0  # no variation along the rows


def test_nan_pixels_are_an_error_of_the_reader(tmp_path):
    nan_film = np.linspace(0, 1, 96 * 80, dtype=np.float32).reshape(96, 80)
    nan_film[5, 5] = np.nan
    tif = tmp_path / "nan.tif"
    assert cv2.imwrite(str(tif), nan_film)
    dcm = write_dicom(tmp_path / "nan.dcm", float_pixels=nan_film)
    all_nan = write_dicom(tmp_path / "all_nan.dcm", float_pixels=np.full((96, 80), np.nan, np.float32))
    inf = write_dicom(tmp_path / "inf.dcm", float_pixels=np.where(np.isnan(nan_film), np.inf, nan_film))
    for path in (tif, dcm, all_nan, inf):
        item = prepared(path)
        assert "NaN or infinite" in item["error"], (path, item)


def test_an_implausible_pixel_spacing_is_ignored_with_a_warning(tmp_path):
    item = prepared(write_dicom(tmp_path / "huge.dcm", spacing=(1e6, 1e6)))
    assert item["pixel_spacing_mm"] is None
    assert item["warnings"] == ["pixel spacing 1e+06 x 1e+06 mm is outside 0.02-2 mm: ignored, no heights in mm"]
    item = prepared(write_dicom(tmp_path / "fine.dcm", spacing=(0.15, 0.15)))
    assert item["pixel_spacing_mm"] == (0.15, 0.15) and item["warnings"] == []
    assert checked_spacing((0.01, 0.15))[0] is None and checked_spacing((2.0, 0.02)) == ((2.0, 0.02), None)


def test_no_spine_reason_names_the_score_and_the_threshold():
    assert no_spine_reason(0.1) == "no spine found: the strongest vertebral-body score is 0.100, below 0.3"
    assert no_spine_reason(0.3) is None and no_spine_reason(None) is None and no_spine_reason(0.01, 0) is None


def test_the_pipeline_writes_a_refused_row_per_hostile_input_without_running_a_model(tmp_path):
    """Every input here is refused or unreadable, so the model is never called."""
    from inference.pipeline import run_inference

    folder = tmp_path / "in"
    folder.mkdir()
    write_dicom(folder / "ct.dcm", "CT")
    write_dicom(folder / "knee.dcm", "DX", body_part="KNEE")
    cv2.imwrite(str(folder / "one_pixel.png"), np.full((1, 1), 7, np.uint8))
    cv2.imwrite(str(folder / "blank.png"), np.zeros((300, 200), np.uint8))
    write_dicom(folder / "all_nan.dcm", float_pixels=np.full((96, 80), np.nan, np.float32))

    never_called = SimpleNamespace(image_size=NETWORK_INPUT, checkpoint_id="none")
    summary = run_inference(never_called, [str(folder)], tmp_path / "out", num_workers=0, progress=False)
    assert summary.n_ok == 0 and summary.failed_by_status == {"refused": 4, "error": 1}
    table = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("name")
    assert dict(table.status) == {"ct": "refused", "knee": "refused", "one_pixel": "refused", "blank": "refused",
                                  "all_nan": "error"}
    assert table.p_fracture.isna().all() and not table.error.str.contains("\n").any()
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert len(errors) == 5
    assert not list((tmp_path / "out").glob("*.json"))


def test_the_ignored_spacing_reaches_the_record_and_no_heights_are_in_mm(tmp_path):
    """A film whose header says 1e6 mm per pixel once gave heights of 2e7 mm."""
    from inference.pipeline import run_inference
    from inference.predictor import Predictor
    from tests.parity.parity_model import FILMS_DIR, parity_checkpoint, with_content_readers
    from tests.training_config import phantom_as_dicom

    predictor = with_content_readers(Predictor(parity_checkpoint(tmp_path / "parity.ckpt"), device="cpu"))
    film = sorted(FILMS_DIR.glob("*.png"))[0]
    dcm = phantom_as_dicom(film, tmp_path / "huge.dcm", spacing=(1e6, 1e6))
    summary = run_inference(predictor, [str(dcm)], tmp_path / "out", num_workers=0, progress=False)
    assert summary.n_ok == 1
    record = json.loads((tmp_path / "out" / "huge.json").read_text())
    assert record["pixel_spacing_mm"] is None and "outside 0.02-2 mm" in record["warnings"][0]
    assert record["vertebrae"] and all(v["heights_mm"] is None for v in record["vertebrae"])
