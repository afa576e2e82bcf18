"""DICOM results out: a Secondary Capture of the heatmap overlay and a TID 1500 Comprehensive SR.

Research output only (not for clinical use). Both objects join the *source* study (same
StudyInstanceUID, patient/study module copied from the source) in new series, and reference
the source image. By default the patient's name, ID and birth date are blanked
(``keep_identifiers=False``); other study attributes (accession number, study date, ...) are
copied as they are.

Codes used in the SR (``CODES`` below):

    key                   scheme  value          meaning
    title                 DCM     126000         Imaging Measurement Report (CID 7021)
    procedure             SCT     168537006      Plain radiography
    observer_type         DCM     121007         Device
    finding_vcf           99VCF   VCF001         Vertebral compression fracture (finding type)
    p_fracture            99VCF   VCF002         Probability of vertebral compression fracture
    p_acute               99VCF   VCF003         Probability of acute vertebral compression fracture
    genant_grade          99VCF   VCF004         Genant semiquantitative grade (qualitative name)
    genant_0 .. genant_3  99VCF   VCF010-VCF013  Genant grade 0 (normal) / 1 (mild) / 2 (moderate) / 3 (severe)
    height_anterior       99VCF   VCF020         Anterior vertebral body height
    height_middle         99VCF   VCF021         Middle vertebral body height
    height_posterior      99VCF   VCF022         Posterior vertebral body height
    unit_probability      UCUM    {probability}  probability (dimensionless, 0-1)
    unit_px / unit_mm     UCUM    {pixels} / mm  vertebral heights in pixels or millimetres
    (finding site)        SCT     e.g. 66794005  L1 vertebra: C1-C7, T1-T12, L1-L5 from data.io_utils import atomic_write_with
from pydicom's DICOM
                                                 code dictionary (codes.SCT.<level>Vertebra); none for T13/L6

"99VCF" is a private coding scheme defined here (DICOM reserves designators starting with "99"
for local schemes); it is declared in the SR's CodingSchemeIdentificationSequence.
Each vertebra is a measurement group whose Tracking Identifier is the level name ("L1").
"""
from __future__ import annotations

import copy
import math
import os
import warnings

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from data.io_utils import atomic_write_with

PRIVATE_SCHEME = "99VCF"
PRIVATE_SCHEME_NAME = "spine-vcf research codes (private, not for clinical use)"
MANUFACTURER = "spine-vcf (research code)"
ALGORITHM_NAME = "spine-vcf"
ALGORITHM_VERSION = "0.1.0"
SC_SERIES_DESCRIPTION = "VCF heatmap (research use only)"
SR_SERIES_DESCRIPTION = "VCF findings (research use only)"


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


CODES: dict[str, hd.sr.CodedConcept] = {
    "title": hd.sr.CodedConcept("126000", "DCM", "Imaging Measurement Report"),
    "procedure": hd.sr.CodedConcept("168537006", "SCT", "Plain radiography"),
    "observer_type": hd.sr.CodedConcept("121007", "DCM", "Device"),
    "finding_vcf": _private("VCF001", "Vertebral compression fracture"),
    "p_fracture": _private("VCF002", "Probability of vertebral compression fracture"),
    "p_acute": _private("VCF003", "Probability of acute vertebral compression fracture"),
    "genant_grade": _private("VCF004", "Genant semiquantitative grade"),
    "genant_0": _private("VCF010", "Genant grade 0 (normal)"),
    "genant_1": _private("VCF011", "Genant grade 1 (mild)"),
    "genant_2": _private("VCF012", "Genant grade 2 (moderate)"),
    "genant_3": _private("VCF013", "Genant grade 3 (severe)"),
    "height_anterior": _private("VCF020", "Anterior vertebral body height"),
    "height_middle": _private("VCF021", "Middle vertebral body height"),
    "height_posterior": _private("VCF022", "Posterior vertebral body height"),
    "unit_probability": hd.sr.CodedConcept("{probability}", "UCUM", "probability"),
    "unit_px": hd.sr.CodedConcept("{pixels}", "UCUM", "pixels"),
    "unit_mm": hd.sr.CodedConcept("mm", "UCUM", "millimeter"),
}

_HEIGHT_KEYS = ("height_anterior", "height_middle", "height_posterior")

# Patient attributes dropped or blanked unless keep_identifiers=True. Name, ID and birth
# date are type 2 in the Patient module: blanked (empty) rather than removed.
_BLANKED = ("PatientName", "PatientID", "PatientBirthDate")
_REMOVED = ("PatientBirthTime", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
            "IssuerOfPatientID", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName")
# Type 2 attributes highdicom's SR constructor reads unconditionally from the evidence.
_TYPE2_DEFAULTS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def _vertebra_code(level: str) -> hd.sr.CodedConcept | None:
    """SNOMED CT code of a vertebra level ("L1" -> 66794005), or None when unknown (T13, L6)."""
    try:
        code = getattr(codes.SCT, f"{level.strip().upper()}Vertebra")
    except AttributeError:
        return None
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _reference_header(source: Dataset, keep_identifiers: bool) -> Dataset:
    """Header-only copy of ``source`` (no pixel data) to build outputs from.

    Missing type 2 attributes are added empty; identifiers are blanked unless kept."""
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(kw):
            raise ValueError(f"source dataset lacks {kw}; cannot reference it")
    ref = Dataset()
    for elem in source:
        if elem.tag.group >= 0x7FE0 or elem.tag.group == 0x0002:
            continue
        ref.add(copy.deepcopy(elem))  # header only (pixel data skipped), so copying is cheap
    for kw in _TYPE2_DEFAULTS:
        if kw not in ref or ref[kw].value is None:
            setattr(ref, kw, "")
    if not keep_identifiers:
        for kw in _BLANKED:
            setattr(ref, kw, "")
        for kw in _REMOVED:
            if kw in ref:
                delattr(ref, kw)
    return ref


def _apply_identifiers(ds: Dataset, ref: Dataset, keep_identifiers: bool) -> None:
    """Make the result's identifiers match the policy, whatever highdicom copied."""
    for kw in _BLANKED:
        setattr(ds, kw, ref.get(kw, "") if keep_identifiers else "")
    if not keep_identifiers:
        for kw in _REMOVED:
            if kw in ds:
                delattr(ds, kw)


def _source_image_item(ref: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    return item


def _patient_orientation(ref: Dataset) -> tuple[str, str] | None:
    value = ref.get("PatientOrientation")
    if value is None:
        return None
    parts = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else str(value).split("\\")
    if len(parts) != 2:
        return None
    try:
        for p in parts:
            hd.PatientOrientationValuesBiped(p)
    except ValueError:
        return None
    return parts[0], parts[1]


def secondary_capture(source: Dataset, overlay_bgr: np.ndarray, series_number: int = 900,
                      instance_number: int = 1, keep_identifiers: bool = False) -> Dataset:
    """Secondary Capture (RGB) of a BGR heatmap overlay, in the source's study.

    References the source image through SourceImageSequence / ReferencedImageSequence and
    ReferencedSeriesSequence (series of the source). ``keep_identifiers=False`` blanks
    PatientName, PatientID and PatientBirthDate."""
    overlay_bgr = np.asarray(overlay_bgr)
    if overlay_bgr.ndim != 3 or overlay_bgr.shape[2] != 3 or overlay_bgr.dtype != np.uint8:
        raise ValueError(f"overlay must be (H, W, 3) uint8, got {overlay_bgr.shape} {overlay_bgr.dtype}")
    rgb = np.ascontiguousarray(overlay_bgr[..., ::-1])
    ref = _reference_header(source, keep_identifiers)
    orientation = _patient_orientation(ref)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom requires an orientation for PATIENT; an unknown one is left empty below
        # (Patient Orientation is type 2C, so empty is valid) rather than guessed.
        patient_orientation=orientation or ("A", "F"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        software_versions=ALGORITHM_VERSION,
    )
    if orientation is None:
        sc.PatientOrientation = None
    _apply_identifiers(sc, ref, keep_identifiers)
    sc.SourceImageSequence = [_source_image_item(ref)]
    sc.ReferencedImageSequence = [_source_image_item(ref)]
    series = Dataset()
    series.SeriesInstanceUID = ref.SeriesInstanceUID
    series.ReferencedInstanceSequence = [_source_image_item(ref)]
    sc.ReferencedSeriesSequence = [series]
    sc.DerivationDescription = "Model heatmap overlaid on the source radiograph (research use only)"
    sc.ImageComments = "Research output, not for clinical use"
    return sc


def _finite(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _probability(key: str, value) -> list[hd.sr.Measurement]:
    v = _finite(value)
    if v is None:  # NaN / missing: no NUM item rather than a made-up value
        return []
    return [hd.sr.Measurement(name=CODES[key], value=v, unit=CODES["unit_probability"])]


def _vertebra_group(vert: dict, algorithm: hd.sr.AlgorithmIdentification, source_images, height_unit: str):
    level = str(vert["level"])
    measurements = _probability("p_fracture", vert.get("p_fracture")) + _probability("p_acute", vert.get("p_acute"))
    heights = vert.get("heights") or []
    if heights and len(heights) != 3:
        raise ValueError(f"vertebra {level}: heights must hold 3 values (anterior, middle, posterior)")
    for key, h in zip(_HEIGHT_KEYS, heights):
        v = _finite(h)
        if v is not None:
            measurements.append(hd.sr.Measurement(name=CODES[key], value=v, unit=CODES[f"unit_{height_unit}"]))
    evaluations = []
    grade = vert.get("genant_grade")
    if grade is not None and _finite(grade) is not None:
        g = int(grade)
        if g not in (0, 1, 2, 3):
            raise ValueError(f"vertebra {level}: genant_grade must be 0-3, got {grade!r}")
        evaluations.append(hd.sr.QualitativeEvaluation(name=CODES["genant_grade"], value=CODES[f"genant_{g}"]))
    site = _vertebra_code(level)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=level),
        finding_type=CODES["finding_vcf"],
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=source_images,
    )


def structured_report(source: Dataset, findings: dict, series_number: int = 901,
                      keep_identifiers: bool = False, instance_number: int = 1) -> Dataset:
    """TID 1500 Comprehensive SR of the findings, referencing the source image.

    ``findings``: ``p_fracture``, ``p_acute`` (0-1; NaN/None are left out), optional
    ``vertebrae`` (list of dicts: level, p_fracture, p_acute, genant_grade 0-3, heights
    [anterior, middle, posterior]) and ``height_unit`` ("px", default, or "mm")."""
    ref = _reference_header(source, keep_identifiers)
    height_unit = findings.get("height_unit", "px")
    if height_unit not in ("px", "mm"):
        raise ValueError(f"height_unit must be 'px' or 'mm', got {height_unit!r}")
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=ALGORITHM_VERSION)
    source_images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)]

    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="image"),
        finding_type=CODES["finding_vcf"],
        algorithm_id=algorithm,
        measurements=(_probability("p_fracture", findings.get("p_fracture"))
                      + _probability("p_acute", findings.get("p_acute"))) or None,
        source_images=source_images,
    )]
    for vert in findings.get("vertebrae") or []:
        groups.append(_vertebra_group(vert, algorithm, source_images, height_unit))

    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=CODES["observer_type"],
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER, model_name=ALGORITHM_VERSION),
    ))
    try:
        hd.sr.ImageLibraryEntryDescriptors(ref)
        library = [ref]
    except (ValueError, KeyError, AttributeError) as exc:  # e.g. an SOP class highdicom cannot map
        warnings.warn(f"source image left out of the SR image library: {exc}")
        library = None
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=CODES["procedure"],
        imaging_measurements=groups,
        title=CODES["title"],
        referenced_images=library,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[ref],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        series_description=SR_SERIES_DESCRIPTION,
        software_versions=ALGORITHM_VERSION,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME,
            responsible_organization="spine-vcf project (research code)")],
    )
    _apply_identifiers(sr, ref, keep_identifiers)
    return sr


def write_dicom(ds: Dataset, path: str | os.PathLike) -> None:
    """Write ``ds`` as a DICOM file atomically (data.io_utils.atomic_write_with)."""
    atomic_write_with(path, lambda fh: ds.save_as(fh, enforce_file_format=True))
