"""SR content items of a TID 1500 Measurement Report, built as plain pydicom datasets.

highdicom's templates (``hd.sr.MeasurementReport``, ``MeasurementsAndQualitativeEvaluations``)
build the same tree, but every item through validating classes, and its SR document class then
deep-copies the whole tree, converts it back into those classes and searches it for image
references: about 10 ms per vertebra, 135 ms for a film. inference/dicom_out.py builds the
measurement groups here instead (tests/test_dicom_out.py checks the tree equals highdicom's),
and gives highdicom's document class only the root container, so its search has nothing to walk.

Each method of :class:`ContentItems` returns one content item (a :class:`pydicom.dataset.Dataset`);
a code is a ``(value, scheme, meaning)`` tuple or anything with ``value``, ``scheme_designator``,
``meaning`` and ``scheme_version`` (a ``highdicom.sr.CodedConcept`` or a ``pydicom.sr.coding.Code``).
"""
from __future__ import annotations

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import DS

CONTAINS = "CONTAINS"
HAS_OBS_CONTEXT = "HAS OBS CONTEXT"
HAS_CONCEPT_MOD = "HAS CONCEPT MOD"

# DCM and SCT codes of TID 1500 / 1501 (the ones highdicom's templates write)
IMAGING_MEASUREMENTS = ("126010", "DCM", "Imaging Measurements")
MEASUREMENT_GROUP = ("125007", "DCM", "Measurement Group")
TRACKING_IDENTIFIER = ("112039", "DCM", "Tracking Identifier")
TRACKING_UID = ("112040", "DCM", "Tracking Unique Identifier")
FINDING = ("121071", "DCM", "Finding")
FINDING_SITE = ("363698007", "SCT", "Finding Site")
ALGORITHM_NAME = ("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = ("111003", "DCM", "Algorithm Version")
SOURCE_OF_MEASUREMENT = ("121112", "DCM", "Source of Measurement")


class ContentItems:
    """Builds the content items of one document. A code, and an item that does not change
    between measurement groups (the finding, the algorithm, the source image, a grade), used
    twice is the same dataset: each use is written out in full, sharing only saves building it
    again. The items are not to be changed once built."""

    def __init__(self):
        self._codes: dict[tuple, Dataset] = {}
        self._items: dict[tuple, Dataset] = {}
        self._keys: dict[int, tuple] = {}

    def _once(self, key: tuple, build) -> Dataset:
        item = self._items.get(key)
        if item is None:
            item = self._items[key] = build()
        return item

    def _key(self, code) -> tuple:
        if isinstance(code, tuple):
            return (*code, None)[:4]
        # reading a highdicom code's fields goes through pydicom's attribute lookup: once per object
        # (the object is kept with its key, so its id cannot be reused while this document is built)
        known = self._keys.get(id(code))
        if known is None:
            known = self._keys[id(code)] = (code, (str(code.value), str(code.scheme_designator), str(code.meaning),
                                                   getattr(code, "scheme_version", None)))
        return known[1]

    def code(self, code) -> Dataset:
        """A code sequence item (Code Value, or Long / URN Code Value for a value over 16 characters)."""
        key = self._key(code)
        item = self._codes.get(key)
        if item is None:
            item = self._codes[key] = _code_item(*key)
        return item

    def _item(self, value_type: str, name, relationship: str) -> Dataset:
        ds = Dataset()
        _put(ds, 0x0040A010, "CS", relationship)  # RelationshipType
        _put(ds, 0x0040A040, "CS", value_type)  # ValueType
        _put(ds, 0x0040A043, "SQ", [self.code(name)])  # ConceptNameCodeSequence
        return ds

    def text(self, name, value: str, relationship: str) -> Dataset:
        ds = self._item("TEXT", name, relationship)
        _put(ds, 0x0040A160, "UT", str(value))  # TextValue
        return ds

    def uidref(self, name, uid: str, relationship: str) -> Dataset:
        ds = self._item("UIDREF", name, relationship)
        _put(ds, 0x0040A124, "UI", str(uid))  # UID
        return ds

    def code_value(self, name, value, relationship: str) -> Dataset:
        return self._once(("CODE", self._key(name), self._key(value), relationship),
                          lambda: self._code_value(name, value, relationship))

    def _code_value(self, name, value, relationship: str) -> Dataset:
        ds = self._item("CODE", name, relationship)
        _put(ds, 0x0040A168, "SQ", [self.code(value)])  # ConceptCodeSequence
        return ds

    def num(self, name, value: float, unit, relationship: str = CONTAINS) -> Dataset:
        """A NUM item: the value as a decimal string, and as a float (as highdicom writes a float)."""
        ds = self._item("NUM", name, relationship)
        measured = Dataset()
        _put(measured, 0x0040A30A, "DS", DS(value, auto_format=True))  # NumericValue
        if isinstance(value, float):
            _put(measured, 0x0040A161, "FD", value)  # FloatingPointValue
        _put(measured, 0x004008EA, "SQ", [self.code(unit)])  # MeasurementUnitsCodeSequence
        _put(ds, 0x0040A300, "SQ", [measured])  # MeasuredValueSequence
        return ds

    def image(self, name, sop_class_uid: str, sop_instance_uid: str, relationship: str = CONTAINS) -> Dataset:
        ds = self._item("IMAGE", name, relationship)
        ref = Dataset()
        _put(ref, 0x00081150, "UI", sop_class_uid)  # ReferencedSOPClassUID
        _put(ref, 0x00081155, "UI", sop_instance_uid)  # ReferencedSOPInstanceUID
        _put(ds, 0x00081199, "SQ", [ref])  # ReferencedSOPSequence
        return ds

    def container(self, name, items: list[Dataset], template_id: str | None = None, continuous: bool = True,
                  relationship: str | None = CONTAINS) -> Dataset:
        ds = Dataset()
        if relationship is not None:
            ds.RelationshipType = relationship
        ds.ValueType = "CONTAINER"
        ds.ConceptNameCodeSequence = [self.code(name)]
        ds.ContinuityOfContent = "CONTINUOUS" if continuous else "SEPARATE"
        if template_id is not None:
            ds.ContentTemplateSequence = [self._once(("template", template_id), lambda: _template_item(template_id))]
        ds.ContentSequence = items
        return ds

    def measurement_group(self, tracking_identifier: str, tracking_uid: str, finding_type,
                          algorithm: tuple[str, str], source_image: tuple[str, str], finding_site=None,
                          measurements: list[Dataset] = (), evaluations: list[Dataset] = ()) -> Dataset:
        """A TID 1501 Measurement Group, in the order highdicom's ``MeasurementsAndQualitativeEvaluations``
        writes it. ``algorithm``: (name, version); ``source_image``: (SOP class UID, SOP instance UID);
        ``measurements``: NUM items; ``evaluations``: CODE items."""
        items = [self.text(TRACKING_IDENTIFIER, tracking_identifier, HAS_OBS_CONTEXT),
                 self.uidref(TRACKING_UID, tracking_uid, HAS_OBS_CONTEXT),
                 self.code_value(FINDING, finding_type, CONTAINS)]
        if finding_site is not None:
            items.append(self.code_value(FINDING_SITE, finding_site, HAS_CONCEPT_MOD))
        items += [self._once(("TEXT", ALGORITHM_NAME, algorithm[0]),
                             lambda: self.text(ALGORITHM_NAME, algorithm[0], HAS_CONCEPT_MOD)),
                  self._once(("TEXT", ALGORITHM_VERSION, algorithm[1]),
                             lambda: self.text(ALGORITHM_VERSION, algorithm[1], HAS_CONCEPT_MOD))]
        items += list(measurements) + list(evaluations)
        items.append(self._once(("IMAGE", *source_image), lambda: self.image(SOURCE_OF_MEASUREMENT, *source_image)))
        return self.container(MEASUREMENT_GROUP, items, template_id="1501")


def _template_item(template_id: str) -> Dataset:
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = str(template_id)
    return template


def _put(ds: Dataset, tag: int, vr: str, value) -> None:
    """Add an element without pydicom's value validation: the values here are made to fit their VR
    (a quarter of the time of a setattr)."""
    ds.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))


def _code_item(value: str, scheme: str, meaning: str, version: str | None) -> Dataset:
    ds = Dataset()
    if len(value) > 16:
        if value.startswith("urn") or "://" in value:
            ds.URNCodeValue = value
        else:
            ds.LongCodeValue = value
    else:
        _put(ds, 0x00080100, "SH", value)  # CodeValue
    _put(ds, 0x00080104, "LO", meaning)  # CodeMeaning
    _put(ds, 0x00080102, "SH", scheme)  # CodingSchemeDesignator
    if version is not None:
        _put(ds, 0x00080103, "SH", version)  # CodingSchemeVersion
    return ds
