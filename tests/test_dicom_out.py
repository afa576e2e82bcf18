"""DICOM outputs (inference/dicom_out.py): Secondary Capture and TID 1500 SR, read back with pydicom."""
import datetime
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference import dicom_out

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def source(tmp_path):
    """Small synthetic MONOCHROME2 radiograph written with a file meta and read back."""
    ds = Dataset()
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "12345"
    ds.PatientBirthDate = "19400101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.StudyDate = datetime.date.today().strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.Modality = "DX"
    ds.PatientOrientation = ["P", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = 128, 96
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(128 * 96, dtype=np.uint16).reshape(128, 96) % 4096).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = tmp_path / "source.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


FINDINGS = {
    "p_fracture": 0.87,
    "p_acute": 0.42,
    "vertebrae": [
        {"level": "L1", "p_fracture": 0.91, "p_acute": 0.33, "genant_grade": 2, "heights": [18.5, 22.0, 27.25]},
        {"level": "L2", "p_fracture": 0.05, "p_acute": 0.02, "genant_grade": 0, "heights": [27.0, 26.5, 27.5]},
    ],
}


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _all_uids(ds):
    found = set()

    def visit(d):
        for elem in d:
            if elem.VR == "SQ":
                for sub in elem.value:
                    visit(sub)
            elif elem.VR == "UI" and elem.value:
                found.add(str(elem.value))
    visit(ds)
    return found


def _overlay():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(128, 96, 3), dtype=np.uint8)
    img[0, 0] = (255, 0, 0)  # pure blue in BGR
    return img


def test_secondary_capture_round_trip(source, tmp_path):
    overlay = _overlay()
    path = tmp_path / "out_sc.dcm"
    dicom_out.write_dicom(dicom_out.secondary_capture(source, overlay), path)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    sc = pydicom.dcmread(path)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SOPInstanceUID != source.SOPInstanceUID
    assert sc.SeriesNumber == 900
    assert sc.SeriesDescription == "VCF heatmap (research use only)"
    assert sc.PhotometricInterpretation == "RGB"
    pixels = sc.pixel_array
    assert pixels.shape == (128, 96, 3)
    np.testing.assert_array_equal(pixels, overlay[..., ::-1])  # written as RGB
    assert tuple(pixels[0, 0]) == (0, 0, 255)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert list(sc.PatientOrientation) == ["P", "F"]
    # identifiers blank by default
    assert str(sc.PatientName) == "" and sc.PatientID == ""
    assert not sc.get("PatientBirthDate")
    # the source itself is left untouched
    assert str(source.PatientName) == "Doe^Jane" and source.PatientID == "12345"


def test_secondary_capture_keep_identifiers(source, tmp_path):
    path = tmp_path / "sc_ids.dcm"
    dicom_out.write_dicom(dicom_out.secondary_capture(source, _overlay(), keep_identifiers=True), path)
    sc = pydicom.dcmread(path)
    assert str(sc.PatientName) == "Doe^Jane"
    assert sc.PatientID == "12345"
    assert sc.PatientBirthDate == "19400101"


def test_structured_report_round_trip(source, tmp_path):
    path = tmp_path / "out_sr.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the image library must not be left out
        dicom_out.write_dicom(dicom_out.structured_report(source, FINDINGS), path)
    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID in (COMPREHENSIVE_SR, COMPREHENSIVE_3D_SR)
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert source.SOPInstanceUID in _all_uids(sr)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    refs = [i.ReferencedSOPInstanceUID
            for s in evidence.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
    assert refs == [source.SOPInstanceUID]
    assert any(d.CodingSchemeDesignator == "99VCF" for d in sr.CodingSchemeIdentificationSequence)

    items = list(_walk(sr.ContentSequence))
    nums = {}
    for it in items:
        if it.ValueType == "NUM":
            nums.setdefault(it.ConceptNameCodeSequence[0].CodeValue, []).append(
                float(it.MeasuredValueSequence[0].NumericValue))
    assert 0.87 in nums["VCF002"] and 0.42 in nums["VCF003"]
    assert 0.91 in nums["VCF002"] and 0.33 in nums["VCF003"]
    assert sorted(nums["VCF020"]) == [18.5, 27.0]
    library = [it for it in items if it.ValueType == "CONTAINER"
               and it.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
    assert len(library) == 1
    assert source.SOPInstanceUID in _all_uids(library[0])
    texts = [it.TextValue for it in items if it.ValueType == "TEXT"]
    assert "L1" in texts and "L2" in texts
    codes = {(it.ConceptNameCodeSequence[0].CodeValue, it.ConceptCodeSequence[0].CodeValue)
             for it in items if it.ValueType == "CODE"}
    assert ("VCF004", "VCF012") in codes  # L1 Genant grade 2
    assert ("363698007", "66794005") in codes  # finding site: L1 vertebra
    units = {it.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
             for it in items
             if it.ValueType == "NUM" and it.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99VCF"}
    assert units == {"{probability}", "{pixels}"}
    assert str(sr.PatientName) == "" and sr.PatientID == "" and not sr.get("PatientBirthDate")


def test_structured_report_image_level_only_keep_identifiers(source, tmp_path):
    path = tmp_path / "sr_ids.dcm"
    findings = {"p_fracture": 0.87, "p_acute": float("nan"), "vertebrae": []}
    dicom_out.write_dicom(dicom_out.structured_report(source, findings, keep_identifiers=True), path)
    sr = pydicom.dcmread(path)
    assert str(sr.PatientName) == "Doe^Jane" and sr.PatientID == "12345" and sr.PatientBirthDate == "19400101"
    values = [float(it.MeasuredValueSequence[0].NumericValue)
              for it in _walk(sr.ContentSequence)
              if it.ValueType == "NUM" and it.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99VCF"]
    assert values == [0.87]  # NaN left out, no vertebra groups


def test_source_without_pixels_header_only(source, tmp_path):
    """inference.py reads the source with stop_before_pixels=True."""
    path = tmp_path / "hdr.dcm"
    source.save_as(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    sr = dicom_out.structured_report(header, FINDINGS)
    sc = dicom_out.secondary_capture(header, _overlay())
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == source.StudyInstanceUID


def test_source_without_orientation(source):
    """No PatientOrientation / ImagerPixelSpacing (common on CR): SC orientation left empty,
    SR built without an image library but still referencing the source."""
    del source.PatientOrientation
    del source.ImagerPixelSpacing
    sc = dicom_out.secondary_capture(source, _overlay())
    assert not sc.get("PatientOrientation")
    with pytest.warns(UserWarning, match="image library"):
        sr = dicom_out.structured_report(source, FINDINGS)
    assert source.SOPInstanceUID in _all_uids(sr.CurrentRequestedProcedureEvidenceSequence[0])
    assert source.SOPInstanceUID in _all_uids(sr.ContentSequence[-1])  # measurement groups' source image
