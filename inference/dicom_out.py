"""DICOM results out: a Secondary Capture of the heatmap overlay and a TID 1500 Comprehensive SR.

Research output only (not for clinical use). Identifiers follow one policy (docs/formats.md,
"DICOM outputs and identifiers"):

- default (``keep_identifiers=False``): a de-identified copy following the DICOM Basic
  Application Level Confidentiality Profile (PS3.15 Annex E, Table E.1-1). The result is built
  from an allowlist of source attributes (``DEIDENTIFIED_KEPT``), none of which is in Table E.1-1
  except the UIDs, which are replaced (action U) by a keyed hash of the original
  (``DEIDENTIFIED_UIDS``): the SR and SC of a film, and the films of one study, share one new
  study and reference the source image by its new UIDs. The patient becomes a pseudonym (a
  keyed hash of the source's patient ID, as ID and as family name); birth date, sex, accession
  number, study ID, study date/time and referring physician are empty; nothing else of the
  source (institution, device, other patient IDs, request sequences, ...) is read.
- ``keep_identifiers=True``: results that belong in the source study (same StudyInstanceUID,
  the patient and study modules copied) in new series, referencing the source image as it is.

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
import functools
import hashlib
import hmac
import math
import os
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from data.io_utils import atomic_write_with
from inference import sr_items

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

ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")  # the language highdicom defaults to
_HEIGHT_KEYS = ("height_anterior", "height_middle", "height_posterior")

# Type 2 attributes highdicom's SR constructor reads unconditionally from the evidence.
_TYPE2_DEFAULTS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

# The de-identified result (PS3.15 Annex E, Basic Application Level Confidentiality Profile) is
# made from these source attributes only; none of them is listed in Table E.1-1.
DEIDENTIFIED_KEPT = ("SOPClassUID", "Modality", "Rows", "Columns", "PatientOrientation", "PixelSpacing",
                     "ImagerPixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness",
                     "Laterality", "BodyPartExamined", "BurnedInAnnotation")
# Table E.1-1 action U: replaced by a UID derived from the original with the de-identification key.
DEIDENTIFIED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
# Table E.1-1 actions Z (type 2 in the result's Patient and General Study modules): present, empty.
DEIDENTIFIED_EMPTY = ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                      "ReferringPhysicianName")
# Body Part Examined values of unpaired parts: an SC of these has no Laterality (General Series, type 2C)
UNPAIRED_BODY_PARTS = frozenset({"SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "COCCYX", "CTSPINE", "TLSPINE",
                                 "LSSPINE", "CHEST", "ABDOMEN", "PELVIS", "WHOLEBODY"})
DEIDENTIFICATION_METHOD = "PS3.15 E.1 Basic Profile; allowlisted attributes; keyed UIDs"
DEID_KEY_FILE = ".dicom-deid-key"
_DEID_KEY_BYTES = 32
# without a key given, one per process: the outputs of one run share their new studies
_PROCESS_DEID_KEY = os.urandom(_DEID_KEY_BYTES)


def folder_deid_key(folder: str | os.PathLike) -> bytes:
    """The de-identification key of an output folder (``FOLDER/.dicom-deid-key``, 32 random
    bytes, made on first use, readable by the owner only), so that a resumed run gives a study
    the same new UIDs and pseudonym as the run before it."""
    path = Path(folder) / DEID_KEY_FILE
    if not path.exists():
        tmp = path.with_name(f"{DEID_KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(_DEID_KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic and never replaces a key another process made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != _DEID_KEY_BYTES:
        raise ValueError(f"{path}: not a de-identification key ({len(key)} bytes, expected "
                         f"{_DEID_KEY_BYTES}); remove it to make a new one")
    return key


def _keyed_hex(key: bytes, kind: str, value: str) -> str:
    return hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()


def _keyed_uid(key: bytes, original: str) -> str:
    """A "2.25." UID (a 128-bit number) derived from ``original``: the same for one key, unlinkable
    to it without the key."""
    return f"2.25.{int(_keyed_hex(key, 'uid', original)[:32], 16)}"


def _pseudonym(key: bytes, source: Dataset) -> str:
    """The patient's pseudonym: a keyed hash of the patient ID (of the study UID when it is empty)."""
    patient = str(source.get("PatientID", "") or "")
    basis = ("patient", patient) if patient.strip() else ("study", str(source.StudyInstanceUID))
    return f"ANON-{_keyed_hex(key, *basis)[:16].upper()}"


def _deidentified_header(source: Dataset, key: bytes) -> Dataset:
    """The header a de-identified result is built from: the allowlisted attributes, new UIDs,
    a pseudonymous patient and empty study identifiers."""
    ref = Dataset()
    for kw in DEIDENTIFIED_KEPT:
        if kw in source:
            ref.add(copy.deepcopy(source[kw]))
    for kw in DEIDENTIFIED_UIDS:
        if source.get(kw):
            setattr(ref, kw, _keyed_uid(key, str(source[kw].value)))
    ref.PatientID = _pseudonym(key, source)
    ref.PatientName = f"{ref.PatientID}^"  # a family name only
    for kw in DEIDENTIFIED_EMPTY:
        setattr(ref, kw, "")
    return ref


def _mark_deidentified(ds: Dataset) -> None:
    """Patient module's de-identification attributes (PS3.15 E.1.1) and the dates' removal."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    profile = Dataset()
    code = codes.DCM.BasicApplicationConfidentialityProfile
    profile.CodeValue, profile.CodingSchemeDesignator, profile.CodeMeaning = (
        code.value, code.scheme_designator, code.meaning)
    ds.DeidentificationMethodCodeSequence = [profile]
    ds.LongitudinalTemporalInformationModified = "REMOVED"


@functools.lru_cache(maxsize=64)
def _vertebra_code(level: str) -> hd.sr.CodedConcept | None:
    """SNOMED CT code of a vertebra level ("L1" -> 66794005), or None when unknown (T13, L6).
    Cached: pydicom's code dictionary lookup costs about 0.2 ms; the codes are only read."""
    try:
        code = getattr(codes.SCT, f"{level.strip().upper()}Vertebra")
    except AttributeError:
        return None
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _reference_header(source: Dataset, keep_identifiers: bool, deid_key: bytes | None) -> Dataset:
    """Header-only copy of ``source`` (no pixel data) to build outputs from: all of it with
    ``keep_identifiers`` (missing type 2 attributes added empty), else the de-identified one."""
    for kw in _REQUIRED_UIDS:
        if not source.get(kw):
            raise ValueError(f"source dataset lacks {kw}; cannot reference it")
    if not keep_identifiers:
        return _deidentified_header(source, deid_key or _PROCESS_DEID_KEY)
    ref = Dataset()
    for elem in source:
        if elem.tag.group >= 0x7FE0 or elem.tag.group == 0x0002:
            continue
        ref.add(copy.deepcopy(elem))  # header only (pixel data skipped), so copying is cheap
    for kw in _TYPE2_DEFAULTS:
        if kw not in ref or ref[kw].value is None:
            setattr(ref, kw, "")
    return ref


def _apply_identifiers(ds: Dataset, ref: Dataset, keep_identifiers: bool) -> None:
    """The result's patient is the reference header's (the source's, or its pseudonym), whatever
    highdicom copied; a de-identified result says so."""
    for kw in ("PatientName", "PatientID", "PatientBirthDate"):
        setattr(ds, kw, ref.get(kw, ""))
    if not keep_identifiers:
        _mark_deidentified(ds)


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
                      instance_number: int = 1, keep_identifiers: bool = False,
                      deid_key: bytes | None = None) -> Dataset:
    """Secondary Capture (RGB) of a BGR heatmap overlay: in the source's study with
    ``keep_identifiers``, else in its de-identified copy (``deid_key``: the key of the new UIDs and
    pseudonym, see :func:`folder_deid_key`; default one key per process).

    References the source image through SourceImageSequence / ReferencedImageSequence and
    ReferencedSeriesSequence (series of the source). The overlay's pixels are the source's
    pixels: a source that says BurnedInAnnotation YES gives an SC that says so too."""
    overlay_bgr = np.asarray(overlay_bgr)
    if overlay_bgr.ndim != 3 or overlay_bgr.shape[2] != 3 or overlay_bgr.dtype != np.uint8:
        raise ValueError(f"overlay must be (H, W, 3) uint8, got {overlay_bgr.shape} {overlay_bgr.dtype}")
    rgb = np.ascontiguousarray(overlay_bgr[..., ::-1])
    ref = _reference_header(source, keep_identifiers, deid_key)
    orientation = _patient_orientation(ref)
    laterality = str(ref.get("Laterality", "") or "").strip().upper()
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
        laterality=laterality if laterality in ("R", "L") else None,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        software_versions=ALGORITHM_VERSION,
    )
    if orientation is None:
        sc.PatientOrientation = None
    body_part = str(ref.get("BodyPartExamined", "") or "").strip().upper()
    if body_part:
        sc.BodyPartExamined = body_part
    if "Laterality" not in sc and body_part not in UNPAIRED_BODY_PARTS:
        sc.Laterality = None  # type 2C in General Series: present and empty when not known
    if str(ref.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        sc.BurnedInAnnotation = "YES"
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


def _probability(items: sr_items.ContentItems, key: str, value) -> list[Dataset]:
    v = _finite(value)
    if v is None:  # NaN / missing: no NUM item rather than a made-up value
        return []
    return [items.num(CODES[key], v, CODES["unit_probability"])]


def _vertebra_group(items: sr_items.ContentItems, vert: dict, algorithm: tuple[str, str],
                    source_image: tuple[str, str], height_unit: str):
    level = str(vert["level"])
    measurements = (_probability(items, "p_fracture", vert.get("p_fracture"))
                    + _probability(items, "p_acute", vert.get("p_acute")))
    heights = vert.get("heights") or []
    if heights and len(heights) != 3:
        raise ValueError(f"vertebra {level}: heights must hold 3 values (anterior, middle, posterior)")
    for key, h in zip(_HEIGHT_KEYS, heights):
        v = _finite(h)
        if v is not None:
            measurements.append(items.num(CODES[key], v, CODES[f"unit_{height_unit}"]))
    evaluations = []
    grade = vert.get("genant_grade")
    if grade is not None and _finite(grade) is not None:
        g = int(grade)
        if g not in (0, 1, 2, 3):
            raise ValueError(f"vertebra {level}: genant_grade must be 0-3, got {grade!r}")
        evaluations.append(items.code_value(CODES["genant_grade"], CODES[f"genant_{g}"], sr_items.CONTAINS))
    return items.measurement_group(level, hd.UID(), CODES["finding_vcf"], algorithm, source_image,
                                   finding_site=_vertebra_code(level), measurements=measurements,
                                   evaluations=evaluations)


def structured_report(source: Dataset, findings: dict, series_number: int = 901,
                      keep_identifiers: bool = False, instance_number: int = 1,
                      deid_key: bytes | None = None) -> Dataset:
    """TID 1500 Comprehensive SR of the findings, referencing the source image: in the source's
    study with ``keep_identifiers``, else in its de-identified copy (``deid_key`` as for
    :func:`secondary_capture`).

    ``findings``: ``p_fracture``, ``p_acute`` (0-1; NaN/None are left out), optional
    ``vertebrae`` (list of dicts: level, p_fracture, p_acute, genant_grade 0-3, heights
    [anterior, middle, posterior]) and ``height_unit`` ("px", default, or "mm").

    The document's head (language, observer, procedure, image library) comes from highdicom's
    content items; the measurement groups are built as plain datasets (inference/sr_items.py),
    and highdicom's document class is given the root container without them, so that it does not
    copy and search a tree that grows with every vertebra (what made an SR cost 135 ms)."""
    ref = _reference_header(source, keep_identifiers, deid_key)
    height_unit = findings.get("height_unit", "px")
    if height_unit not in ("px", "mm"):
        raise ValueError(f"height_unit must be 'px' or 'mm', got {height_unit!r}")
    algorithm = (ALGORITHM_NAME, ALGORITHM_VERSION)
    source_image = (str(ref.SOPClassUID), str(ref.SOPInstanceUID))
    items = sr_items.ContentItems()
    groups = [items.measurement_group(
        "image", hd.UID(), CODES["finding_vcf"], algorithm, source_image,
        measurements=_probability(items, "p_fracture", findings.get("p_fracture"))
        + _probability(items, "p_acute", findings.get("p_acute")))]
    for vert in findings.get("vertebrae") or []:
        groups.append(_vertebra_group(items, vert, algorithm, source_image, height_unit))

    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=CODES["observer_type"],
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER, model_name=ALGORITHM_VERSION),
    ))
    head = list(hd.sr.LanguageOfContentItemAndDescendants(ENGLISH)) + list(observer)
    head.append(hd.sr.CodeContentItem(name=codes.DCM.ProcedureReported, value=CODES["procedure"],
                                      relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD))
    try:
        head += list(hd.sr.ImageLibrary([ref]))
    except (ValueError, KeyError, AttributeError) as exc:  # e.g. an SOP class highdicom cannot map
        warnings.warn(f"source image left out of the SR image library: {exc}")
    measurements = items.container(sr_items.IMAGING_MEASUREMENTS, groups)
    # the root container with its first item only: highdicom copies, converts and searches what it is given
    root = items.container(CODES["title"], head[:1], template_id="1500", relationship=None)
    sr = hd.sr.ComprehensiveSR(
        evidence=[ref],
        content=root,
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
    sr.ContentSequence = head + [measurements]  # every group references the source, which is the evidence
    _apply_identifiers(sr, ref, keep_identifiers)
    return sr


def write_dicom(ds: Dataset, path: str | os.PathLike) -> None:
    """Write ``ds`` as a DICOM file atomically (data.io_utils.atomic_write_with)."""
    atomic_write_with(path, lambda fh: ds.save_as(fh, enforce_file_format=True))
