"""The SR's content tree (inference/sr_items.py, built as plain datasets) equals the one
highdicom's TID 1500 templates build from the same findings, item for item."""
import math
import warnings

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as codes_dictionary
from pydicom.uid import generate_uid

from inference import dicom_out

# UIDs (generated per document) and dates and times are left out of the comparison
GENERATED_VRS = ("UI", "DA", "TM", "DT")

FINDINGS = {
    "p_fracture": 0.3123456789123,  # more digits than a decimal string holds: NumericValue and FloatingPointValue
    "p_acute": math.nan,  # no NUM item
    "height_unit": "mm",
    "vertebrae": [
        {"level": "L1", "p_fracture": 0.2, "p_acute": 0.05, "genant_grade": 1, "heights": [20.0, 18.0, 21.0]},
        {"level": "vertebra 2 (T13?)", "p_fracture": math.nan, "p_acute": 0.05, "genant_grade": None,
         "heights": [20.0, math.nan, 21.0]},  # no finding site, no grade, two heights
        {"level": "T4", "p_fracture": 0.9, "p_acute": 0.5, "genant_grade": 3, "heights": []},
        {"level": "L2", "p_fracture": 1, "p_acute": 0, "genant_grade": 0, "heights": [20, 18, 21]},  # integers
    ],
}


def _source() -> Dataset:
    """A DX header with every attribute the SR copies (so the SR's reference header is the source itself)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "12345", "19400101", "F"
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "A1", "1", "20260101", "120000", ""
    ds.Modality, ds.PatientOrientation, ds.ImagerPixelSpacing = "DX", ["P", "F"], [0.15, 0.15]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 128, 96, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _highdicom_content(ref: Dataset, findings: dict) -> Dataset:
    """The root content item as highdicom's templates build it."""
    codes = dicom_out.CODES
    algorithm = hd.sr.AlgorithmIdentification(name=dicom_out.ALGORITHM_NAME, version=dicom_out.ALGORITHM_VERSION)
    source_images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)]

    def probabilities(values):
        return [hd.sr.Measurement(name=codes[k], value=float(v), unit=codes["unit_probability"])
                for k, v in values if v is not None and math.isfinite(v)]

    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="image"),
        finding_type=codes["finding_vcf"], algorithm_id=algorithm,
        measurements=probabilities([("p_fracture", findings["p_fracture"]), ("p_acute", findings["p_acute"])]) or None,
        source_images=source_images)]
    for v in findings["vertebrae"]:
        measurements = probabilities([("p_fracture", v["p_fracture"]), ("p_acute", v["p_acute"])])
        measurements += [hd.sr.Measurement(name=codes[k], value=float(h), unit=codes["unit_mm"])
                         for k, h in zip(("height_anterior", "height_middle", "height_posterior"), v["heights"])
                         if math.isfinite(h)]
        grade = v["genant_grade"]
        site = getattr(codes_dictionary.SCT, f"{v['level']}Vertebra", None)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=v["level"]),
            finding_type=codes["finding_vcf"], algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(hd.sr.CodedConcept(site.value, site.scheme_designator, site.meaning))]
            if site is not None else None,
            measurements=measurements or None,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes["genant_grade"],
                                                                 value=codes[f"genant_{grade}"])]
            if grade is not None else None,
            source_images=source_images))
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes["observer_type"],
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=dicom_out.ALGORITHM_NAME, manufacturer_name=dicom_out.MANUFACTURER,
            model_name=dicom_out.ALGORITHM_VERSION)))
    return hd.sr.MeasurementReport(observation_context=observer, procedure_reported=codes["procedure"],
                                   imaging_measurements=groups, title=codes["title"], referenced_images=[ref])[0]


def _tree(ds: Dataset) -> list:
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            out.append((str(elem.tag), [_tree(item) for item in elem.value]))
        elif elem.VR not in GENERATED_VRS:
            out.append((str(elem.tag), elem.VR, str(elem.value)))
    return out


def test_the_sr_content_equals_what_highdicoms_templates_build():
    source = _source()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the source has what the image library needs
        sr = dicom_out.structured_report(source, FINDINGS, keep_identifiers=True)
    expected = _highdicom_content(source, FINDINGS)
    content = [e for e in sr if e.tag in expected]
    assert _tree(Dataset(dict((e.tag, e) for e in content))) == _tree(expected)
    # the evidence is the source image, which every measurement group references
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [e.ReferencedSOPInstanceUID for e in evidence] == [source.SOPInstanceUID]


def test_a_changed_item_is_seen_by_the_comparison():
    source = _source()
    sr = dicom_out.structured_report(source, FINDINGS, keep_identifiers=True)
    changed = dict(FINDINGS, vertebrae=[dict(FINDINGS["vertebrae"][0], genant_grade=2)] + FINDINGS["vertebrae"][1:])
    expected = _highdicom_content(source, changed)
    assert _tree(Dataset(dict((e.tag, e) for e in sr if e.tag in expected))) != _tree(expected)


@pytest.mark.parametrize("grade", [None, 0])
def test_a_vertebra_without_measurements_still_references_its_source(grade):
    findings = {"p_fracture": 0.5, "p_acute": 0.1,
                "vertebrae": [{"level": "L3", "p_fracture": None, "p_acute": None, "genant_grade": grade, "heights": []}]}
    source = _source()
    sr = dicom_out.structured_report(source, findings, keep_identifiers=True)  # the source's own UIDs
    group = sr.ContentSequence[-1].ContentSequence[-1]
    assert group.ContentSequence[-1].ValueType == "IMAGE"
    assert group.ContentSequence[-1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
