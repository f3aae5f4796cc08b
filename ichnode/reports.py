"""Report objects sent back to the PACS: a TID 1500 SR and a summary image.

Both are built with highdicom from the headers of the scored series and go
into the same study as new series:

- :func:`build_sr` makes a Comprehensive 3D SR following TID 1500
  (Measurement Report), as the IHE AI Results profile recommends: one
  measurement group (TID 1501) per label with the finding, a qualitative
  evaluation (present / absent at the operating threshold), the series
  probability as a numeric measurement, the algorithm identification
  (TID 4019: name, version, operating threshold, the model card's
  disclaimer) and the key slice as the group's source image.  Every scored
  slice is listed as evidence (Current Requested Procedure Evidence
  Sequence).  Slices that could not be used (unreadable, undecodable, or
  not a slice of the volume) make the document PARTIAL, with the count in
  its Completion Flag Description.
- :func:`build_summary_image` makes a Secondary Capture of the key slice in
  the brain window with the findings written beside it, for viewers that do
  not render SR.

UIDs come from :func:`report_uids`, derived from the scored series, the
result version and the node's database, so that a resend reuses the same
UIDs, another node makes its own, and a rescoring
(version 2, 3, ...) makes new ones; a later version names the SR it
supersedes in its Predecessor Documents Sequence.

Source headers may be read with ``stop_before_pixels=True`` and may carry the
quirks of real files (RSNA): UIDs that are not valid DICOM UIDs (passed
through unchanged, since the report must join the source's study; a key
slice with such a UID is then referenced from the evidence only, because
DCMTK rejects an SR content tree holding it), a SOP Class UID only in the
file meta, missing Patient/Study Type 2 attributes (added empty).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import unicodedata
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    UID,
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import DA, DT, TM

from ichnode import __version__
from ichnode.config import LABELS
from ichnode.imaging import apply_windows, sop_class_uid
from ichnode.results import shown_scores

logger = logging.getLogger(__name__)

__all__ = [
    "FINDING_CODES",
    "Finding",
    "ReportContent",
    "ReportUids",
    "build_sr",
    "build_summary_image",
    "evidence_headers",
    "prime",
    "report_uids",
]

#: Coding scheme for the findings that have no verified standard code here.
PRIVATE_SCHEME = "99ICHNODE"

#: Finding concept of each label: SNOMED CT where the code could be checked,
#: the private scheme ``99ICHNODE`` (declared in the SR's Coding Scheme
#: Identification Sequence) where it could not.  Swap in the SNOMED CT codes of
#: epidural and intraventricular hemorrhage once checked against a release.
FINDING_CODES: dict[str, hd.sr.CodedConcept] = {
    # In DICOM PS3.16's SNOMED mapping (pydicom codes.SCT.IntracranialHemorrhage).
    "any": hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
    "epidural": hd.sr.CodedConcept("EDH", PRIVATE_SCHEME, "Epidural hemorrhage"),
    # 274100004 and 21454007: SNOMED CT International 2025-02 as expanded by
    # tx.fhir.org in published FHIR value sets.  "Cerebral hemorrhage" is
    # bleeding into the brain parenchyma: the RSNA "intraparenchymal" label.
    "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": hd.sr.CodedConcept("IVH", PRIVATE_SCHEME, "Intraventricular hemorrhage"),
    "subarachnoid": hd.sr.CodedConcept(
        "21454007", "SCT", "Subarachnoid intracranial hemorrhage"
    ),
    # Two independent public code lists agree; not checked against a release.
    "subdural": hd.sr.CodedConcept("35486000", "SCT", "Subdural intracranial hemorrhage"),
}

# CID 241 "Present-Absent Only".
_PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
_ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
# DCM "Probability", unit UCUM "1" (CID 7181 "no units").
_PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_PROCEDURE = hd.sr.CodedConcept("303653007", "SCT", "Computed tomography of head")
_FINDING_CATEGORY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")

_BRAIN_WINDOW = (40.0, 80.0)  # center, width (HU)
_LO_MAX = 64
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")
_IS_MAX = 2**31 - 1
_SUMMARY_MIN_WIDTH = 512
# For text of our own (model card, configuration) that is not ASCII; patient
# attributes are then re-encoded in UTF-8.
_UTF8 = "ISO_IR 192"

# Type 2 Patient / General Study attributes that highdicom reads from the
# first evidence item; real files (RSNA) often lack them.
_TYPE2_DEFAULTS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PIXEL_DATA_TAGS = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}


# --------------------------------------------------------------------------
# Content


@dataclass(frozen=True)
class Finding:
    """Series-level result for one label.

    Parameters
    ----------
    label: str
        One of :data:`ichnode.config.LABELS`.
    probability: float
        Series-level probability in [0, 1].
    present: bool
        Whether the finding is flagged at the operating threshold.
    threshold: float
        The operating threshold in [0, 1].
    source_sop_instance_uid: str | None
        The slice with this label's highest slice score, where the finding
        is seen: the SR's "Source of Measurement" of the label (a viewer opens
        it). None: the key slice.
    """

    label: str
    probability: float
    present: bool
    threshold: float
    source_sop_instance_uid: str | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"Finding.label must be one of {list(LABELS)}, got {self.label!r}")
        for name in ("probability", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise TypeError(f"Finding.{name} must be a float, got {type(value).__name__}")
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"Finding.{name} must be in [0, 1], got {value!r}")
        if not isinstance(self.present, (bool, np.bool_)):
            raise TypeError(f"Finding.present must be a bool, got {type(self.present).__name__}")
        source = self.source_sop_instance_uid
        if source is not None and (not isinstance(source, str) or not source.strip()):
            raise ValueError(f"Finding.source_sop_instance_uid must be a non-empty string or None, got {source!r}")


@dataclass(frozen=True)
class ReportContent:
    """What a report says about one scored series.

    Parameters
    ----------
    findings: tuple[Finding, ...]
        Six findings, in :data:`ichnode.config.LABELS` order.
    key_sop_instance_uid: str
        SOP Instance UID of the key slice (highest "any" score).
    algorithm_name: str
        Name of the model, e.g. ``"ichnode-default"``.
    algorithm_version: str
        Version of the model.
    version: int
        Result version of the series (1, 2, ...); a later one supersedes.
    quarantined_count: int
        Slices that could not be used (unreadable, undecodable, or not a
        slice of the volume) and were not scored; an older copy of a slice
        sent again is not one.
    disclaimer: str | None
        Text from the model card, e.g. ``"Not for clinical use"``.
    """

    findings: tuple[Finding, ...]
    key_sop_instance_uid: str
    algorithm_name: str
    algorithm_version: str
    version: int
    quarantined_count: int = 0
    disclaimer: str | None = None

    def __post_init__(self) -> None:
        findings = tuple(self.findings)
        object.__setattr__(self, "findings", findings)
        if not all(isinstance(f, Finding) for f in findings):
            raise TypeError("ReportContent.findings must hold Finding objects")
        labels = tuple(f.label for f in findings)
        if labels != LABELS:
            raise ValueError(
                f"ReportContent.findings must be one per label in the order {list(LABELS)}, "
                f"got {list(labels)}"
            )
        for name in ("key_sop_instance_uid", "algorithm_name", "algorithm_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ReportContent.{name} must be a non-empty string, got {value!r}")
        _check_positive_int("ReportContent.version", self.version)
        if isinstance(self.quarantined_count, bool) or not isinstance(self.quarantined_count, int):
            raise TypeError(
                "ReportContent.quarantined_count must be an int, "
                f"got {type(self.quarantined_count).__name__}"
            )
        if self.quarantined_count < 0:
            raise ValueError(
                f"ReportContent.quarantined_count must be >= 0, got {self.quarantined_count}"
            )
        if self.disclaimer is not None and not isinstance(self.disclaimer, str):
            raise TypeError(
                "ReportContent.disclaimer must be a str or None, "
                f"got {type(self.disclaimer).__name__}"
            )

    def finding(self, label: str) -> Finding:
        """The finding of ``label``."""
        return self.findings[LABELS.index(label)]


# --------------------------------------------------------------------------
# UIDs


@dataclass(frozen=True)
class ReportUids:
    """UIDs of the report objects of one result version of one series.

    Made by :func:`report_uids`; the same (series, version) always gives the
    same UIDs.  ``tracking_uids`` (one per label, in label order) stay the same
    across versions, so a finding can be followed from one version to the
    next; ``previous_srs`` are the (Series, SOP Instance) UIDs of the SRs
    of earlier versions the PACS holds or may get, the new SR's predecessors.
    """

    series_uid: str
    version: int
    prefix: str
    installation: str
    sr_series_uid: str
    sr_sop_instance_uid: str
    sc_series_uid: str
    sc_sop_instance_uid: str
    tracking_uids: tuple[str, ...]
    previous_srs: tuple[tuple[str, str], ...] = ()


def _derived_uid(prefix: str, *parts: str) -> str:
    return str(generate_uid(prefix=prefix, entropy_srcs=["ichnode", *parts]))


def report_uids(
    series_uid: str,
    version: int,
    *,
    previous_versions: Sequence[int] = (),
    prefix: str | None = None,
    installation: str = "",
) -> ReportUids:
    """Derive the report UIDs of result ``version`` of the series ``series_uid``.

    Parameters
    ----------
    series_uid: str
        Series Instance UID of the scored series (taken as it is, even when it
        is not a valid UID).
    version: int
        Result version, 1 or more.
    previous_versions: Sequence[int]
        The earlier versions whose SRs this one replaces: the newest whose
        SR was sent, and any after it whose SR is on its way (an SR that
        never existed, of a version that was skipped or failed, cannot be
        named).
    prefix: str | None
        UID root ending in ``"."``; pydicom's root by default.
    installation: str
        Mixed into every UID (:func:`ichnode.db.installation`), the SR's
        Device Observer UID included: another node scoring the same series
        makes other UIDs, and names itself another device.

    Returns
    -------
    ReportUids
        Deterministic UIDs (SHA-512 of the inputs under ``prefix``).
    """
    if not isinstance(series_uid, str) or not series_uid.strip():
        raise ValueError(f"series_uid must be a non-empty string, got {series_uid!r}")
    _check_positive_int("version", version)
    for previous in previous_versions:
        _check_positive_int("previous_versions", previous)
        if previous >= version:
            raise ValueError(f"previous version {previous} is not before version {version}")
    root = PYDICOM_ROOT_UID if prefix is None else prefix
    # Without an installation the UIDs stay those of databases made before there was one.
    source = [installation, series_uid] if installation else [series_uid]

    def derived(*parts: str) -> str:
        return _derived_uid(root, *source, *parts)

    v = str(version)
    return ReportUids(
        series_uid=series_uid,
        version=version,
        prefix=root,
        installation=installation,
        sr_series_uid=derived(v, "sr-series"),
        sr_sop_instance_uid=derived(v, "sr-instance"),
        sc_series_uid=derived(v, "sc-series"),
        sc_sop_instance_uid=derived(v, "sc-instance"),
        tracking_uids=tuple(derived("tracking", label) for label in LABELS),
        previous_srs=tuple(
            (derived(str(before), "sr-series"), derived(str(before), "sr-instance"))
            for before in sorted(set(previous_versions))
        ),
    )


# --------------------------------------------------------------------------
# Source headers


# Levels of sequence nesting kept from a source header (the Patient and Study
# modules nest two or three).
_DEEPEST_SEQUENCE = 16


def _nesting(element: DataElement) -> int:
    """How many levels of sequences ``element`` holds (0: not a sequence), counted without recursion."""
    depth, level = 0, [element]
    while level:
        items = [item for e in level if e.VR == "SQ" for item in (e.value or [])]
        if not items:
            break
        depth += 1
        level = [e for item in items for e in item]
    return depth


def _header(ds: Dataset, *, full: bool) -> Dataset:
    """A pixel-free copy of a source header that highdicom can use as evidence.

    The SOP Class UID is taken from the file meta when the dataset lacks it;
    missing Type 2 Patient/Study attributes are added empty (``full`` only:
    highdicom reads them from the first evidence item).
    """
    if full:
        header = Dataset()
        for element in ds:
            # A sequence nested deeper than any report needs would exhaust
            # the copy's recursion: left out, not a reason to lose the reports.
            if element.tag not in _PIXEL_DATA_TAGS and _nesting(element) <= _DEEPEST_SEQUENCE:
                header.add(deepcopy(element))
    else:
        header = Dataset()
        for keyword in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "Modality",
            "Rows",
            "Columns",
            "SamplesPerPixel",
            "PixelRepresentation",
        ):
            if keyword in ds:
                header.add(deepcopy(ds[keyword]))
    sop_class = sop_class_uid(ds)
    if not sop_class:
        raise ValueError(
            "source image "
            f"{ds.get('SOPInstanceUID')!r} has no SOPClassUID (0008,0016) "
            "and no MediaStorageSOPClassUID (0002,0002)"
        )
    header.SOPClassUID = sop_class
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not str(header.get(keyword) or "").strip():
            raise ValueError(f"source image has no {keyword}: {ds.get('SOPInstanceUID')!r}")
    if full:
        for keyword in _TYPE2_DEFAULTS:
            if keyword not in header:
                setattr(header, keyword, None)
        _tidy_checked_values(header)
    return header


def _tidy_checked_values(header: Dataset) -> None:
    """Put Patient/Study values that highdicom checks, and real files often
    get wrong ("m", "1970", "2015-02-06", "09:34:25"), in their standard form,
    or leave them empty: a stray value must not cost a series its reports."""
    sex = str(header.get("PatientSex") or "").strip().upper()
    header.PatientSex = sex if sex in ("M", "F", "O") else None
    for keyword, value_class, separators in (
        ("PatientBirthDate", DA, "-./"),
        ("StudyDate", DA, "-./"),
        ("StudyTime", TM, ":"),
    ):
        text = str(header.get(keyword) or "").strip()
        setattr(header, keyword, None)
        for candidate in (text, text.translate(str.maketrans("", "", separators))):
            try:
                if candidate and value_class(candidate) is not None:
                    setattr(header, keyword, candidate)
                    break
            except ValueError:
                continue


def evidence_headers(key: Dataset, slices: Sequence[tuple[str, str]]) -> list[Dataset]:
    """Source headers for :func:`build_sr` without reading every slice again:
    the key slice's full header ``key``, and for the other ``slices`` (SOP
    Class UID, SOP Instance UID) of its series only what the SR records of
    them, their UIDs."""
    key_uid = str(key.SOPInstanceUID)
    headers = []
    for sop_class, sop_instance_uid in slices:
        if sop_instance_uid == key_uid:
            headers.append(key)
            continue
        header = Dataset()
        header.StudyInstanceUID = key.StudyInstanceUID
        header.SeriesInstanceUID = key.SeriesInstanceUID
        header.SOPClassUID = sop_class
        header.SOPInstanceUID = sop_instance_uid
        headers.append(header)
    return headers


def _source_headers(
    source_images: Sequence[Dataset], key_sop_instance_uid: str
) -> tuple[list[Dataset], Dataset]:
    """Evidence headers, the key slice's (full) header first."""
    if isinstance(source_images, Dataset) or len(source_images) == 0:
        raise ValueError("source_images must be a non-empty sequence of datasets")
    key_index = None
    for index, ds in enumerate(source_images):
        if not isinstance(ds, Dataset):
            raise TypeError(
                f"source_images[{index}] must be a pydicom Dataset, got {type(ds).__name__}"
            )
        if str(ds.get("SOPInstanceUID", "")) == key_sop_instance_uid:
            key_index = index
    if key_index is None:
        raise ValueError(
            f"key_sop_instance_uid {key_sop_instance_uid!r} is not among the "
            f"{len(source_images)} source images"
        )
    key = _header(source_images[key_index], full=True)
    headers = [key] + [
        _header(ds, full=False) for i, ds in enumerate(source_images) if i != key_index
    ]
    studies = {str(h.StudyInstanceUID) for h in headers}
    series = {str(h.SeriesInstanceUID) for h in headers}
    if len(studies) != 1 or len(series) != 1:
        raise ValueError(
            "source_images must be one series of one study, got "
            f"{len(studies)} studies and {len(series)} series"
        )
    return headers, key


# --------------------------------------------------------------------------
# SR


def _check_content_and_uids(content: ReportContent, uids: ReportUids) -> None:
    if not isinstance(content, ReportContent):
        raise TypeError(f"content must be a ReportContent, got {type(content).__name__}")
    if not isinstance(uids, ReportUids):
        raise TypeError(f"uids must be a ReportUids, got {type(uids).__name__}")
    if uids.version != content.version:
        raise ValueError(
            f"uids are for version {uids.version} but content is version {content.version}"
        )


def build_sr(
    source_images: Sequence[Dataset],
    content: ReportContent,
    *,
    uids: ReportUids,
    manufacturer: str = "ichnode",
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    series_number: int | None = None,
    content_datetime: dt.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR of one scored series.

    Parameters
    ----------
    source_images: Sequence[pydicom.Dataset]
        Headers of the scored slices (pixel data not needed).
    content: ReportContent
        The findings.
    uids: ReportUids
        From :func:`report_uids` for this series and ``content.version``.
    manufacturer: str
        Manufacturer of the device that creates the report.
    institution_name, institutional_department_name: str | None
        Where the node runs, if configured.
    series_number: int | None
        Series Number of the SR series; by default the source's + 1000.
    content_datetime: datetime.datetime | None
        When the result was made (Content, Series and Instance Creation
        Date/Time); now by default.  Pass the stored time to make a resend
        identical.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR document, in a new series of the source's study.
    """
    _check_content_and_uids(content, uids)
    headers, key = _source_headers(source_images, content.key_sop_instance_uid)
    if str(key.SeriesInstanceUID) != uids.series_uid:
        raise ValueError(
            f"uids are for series {uids.series_uid!r} but source_images are series "
            f"{str(key.SeriesInstanceUID)!r}"
        )
    _check_lo("manufacturer", manufacturer)
    number = _series_number(key, series_number, offset=1000)
    when = content_datetime or dt.datetime.now()

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_derived_uid(uids.prefix, "device", uids.installation, manufacturer, content.algorithm_name),
            name=content.algorithm_name,
            manufacturer_name=manufacturer,
            model_name=content.algorithm_name,
        ),
    )
    # Each group's source image is the slice its label scored highest on. A
    # slice whose UIDs are not valid DICOM UIDs (RSNA: "ID_953bfd576") cannot
    # be an IMAGE content item: DCMTK refuses the whole content tree. Such a
    # slice is then only listed in the evidence, which DCMTK reads with a warning.
    by_uid = {str(header.SOPInstanceUID): header for header in headers}
    unnamed = set()

    def source_images(finding: Finding) -> list[hd.sr.SourceImageForMeasurementGroup] | None:
        uid = finding.source_sop_instance_uid or content.key_sop_instance_uid
        if uid not in by_uid:
            raise ValueError(f"the source slice {uid!r} of {finding.label} is not among the source images")
        sop_class = str(by_uid[uid].SOPClassUID)
        if UID(uid).is_valid and UID(sop_class).is_valid:
            # By its UIDs: the headers of slices other than the key hold little more.
            return [hd.sr.SourceImageForMeasurementGroup(sop_class, uid)]
        unnamed.add(uid)
        return None

    groups = []
    for finding, tracking_uid in zip(content.findings, uids.tracking_uids, strict=True):
        concept = FINDING_CODES[finding.label]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid, identifier=f"ICH {finding.label}"
                ),
                finding_category=_FINDING_CATEGORY,
                finding_type=concept,
                algorithm_id=hd.sr.AlgorithmIdentification(
                    name=content.algorithm_name,
                    version=content.algorithm_version,
                    parameters=_algorithm_parameters(content, finding),
                ),
                measurements=[
                    hd.sr.Measurement(
                        name=_PROBABILITY,
                        value=round(float(finding.probability), 6),
                        unit=_NO_UNITS,
                    )
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=concept, value=_PRESENT if finding.present else _ABSENT
                    )
                ],
                source_images=source_images(finding),
            )
        )
    if unnamed:
        logger.warning(
            "%d source slices of series %s have no valid DICOM UID; the SR lists them as "
            "evidence only, not as the measurements' source images",
            len(unnamed),
            key.SeriesInstanceUID,
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
    )

    previous = []
    for series_uid, sop_instance_uid in uids.previous_srs:
        prior = Dataset()
        prior.SOPClassUID = Comprehensive3DSRStorage
        prior.SOPInstanceUID = sop_instance_uid
        prior.StudyInstanceUID = key.StudyInstanceUID
        prior.SeriesInstanceUID = series_uid
        previous.append(prior)

    complete = content.quarantined_count == 0
    sr = hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report,
        series_instance_uid=uids.sr_series_uid,
        series_number=number,
        sop_instance_uid=uids.sr_sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=complete,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        previous_versions=previous or None,
        series_description=f"ICH AI results v{content.version}",
        manufacturer_model_name="ichnode",
        software_versions=__version__,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        coding_schemes=[_private_scheme()] if _uses_private_scheme() else None,
        specific_character_set=_charset(
            key, content, manufacturer, institution_name, institutional_department_name
        ),
    )
    if not complete:
        sr.CompletionFlagDescription = _quarantine_text(content.quarantined_count)[:_LO_MAX]
    _stamp(sr, when)
    return sr


def prime() -> None:
    """Build one throwaway SR and summary image of a made-up slice.

    highdicom reads its tables of the standard the first time a process
    builds a report (~0.3 s): a process that builds reports pays that at
    its start, not on a patient's series.
    """
    key = Dataset()
    key.SOPClassUID = CTImageStorage
    key.StudyInstanceUID, key.SeriesInstanceUID, key.SOPInstanceUID = (generate_uid() for _ in range(3))
    key.Modality = "CT"
    key.Rows, key.Columns, key.SamplesPerPixel, key.PixelRepresentation = 16, 16, 1, 1
    key.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    content = ReportContent(
        findings=tuple(Finding(label, 0.0, False, 0.5) for label in LABELS),
        key_sop_instance_uid=key.SOPInstanceUID,
        algorithm_name="prime",
        algorithm_version="0",
        version=1,
    )
    uids = report_uids(key.SeriesInstanceUID, 1)
    build_sr([key], content, uids=uids)
    build_summary_image(key, np.zeros((16, 16)), content, uids=uids)


def _algorithm_parameters(content: ReportContent, finding: Finding) -> list[str]:
    # The slices left out are the Completion Flag Description's, not a parameter.
    # As many decimals as the probability measurement: 0.555 would read below a Probability 0.5552 that is Absent.
    parameters = [f"operating threshold {finding.threshold:.6f}"]
    if content.disclaimer:
        parameters.append(content.disclaimer)
    return parameters


def _quarantine_text(count: int) -> str:
    # Unreadable, undecodable, or not a slice of the volume (a localizer filed in the series).
    if count == 1:
        return "1 slice could not be used and was not scored"
    return f"{count} slices could not be used and were not scored"


def _uses_private_scheme() -> bool:
    return any(c.scheme_designator == PRIVATE_SCHEME for c in FINDING_CODES.values())


def _private_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="ichnode local codes",
        responsible_organization="ichnode",
    )


# --------------------------------------------------------------------------
# Summary image


def build_summary_image(
    key_image: Dataset,
    key_hu: np.ndarray,
    content: ReportContent,
    *,
    uids: ReportUids,
    manufacturer: str = "ichnode",
    institution_name: str | None = None,
    series_number: int | None = None,
    content_datetime: dt.datetime | None = None,
) -> hd.sc.SCImage:
    """Build the Secondary Capture "summary" of the key slice.

    The slice is shown in the brain window (center 40, width 80 HU) with a
    panel below it listing each label's probability and flag, the algorithm,
    the quarantined slices and the model card's disclaimer.  The text carries
    no patient identifiers (Burned In Annotation NO).

    Parameters
    ----------
    key_image: pydicom.Dataset
        Header of the key slice (its SOP Instance UID must be
        ``content.key_sop_instance_uid``).
    key_hu: numpy.ndarray
        The key slice in Hounsfield units, shape (Rows, Columns).
    content: ReportContent
        The findings.
    uids: ReportUids
        From :func:`report_uids` for this series and ``content.version``.
    manufacturer, institution_name: str
        As for :func:`build_sr`.
    series_number: int | None
        Series Number of the summary series; by default the source's + 2000.
    content_datetime: datetime.datetime | None
        As for :func:`build_sr`.

    Returns
    -------
    highdicom.sc.SCImage
        An 8-bit RGB Secondary Capture in a new series of the source's study.
    """
    _check_content_and_uids(content, uids)
    if not isinstance(key_image, Dataset):
        raise TypeError(f"key_image must be a pydicom Dataset, got {type(key_image).__name__}")
    if str(key_image.get("SOPInstanceUID", "")) != content.key_sop_instance_uid:
        raise ValueError(
            f"key_image is {str(key_image.get('SOPInstanceUID', ''))!r}, not the key slice "
            f"{content.key_sop_instance_uid!r}"
        )
    hu = np.asarray(key_hu)
    if hu.ndim != 2 or hu.size == 0:
        raise ValueError(f"key_hu must be a 2-D array, got shape {hu.shape}")
    header = _header(key_image, full=True)
    if str(header.SeriesInstanceUID) != uids.series_uid:
        raise ValueError(
            f"uids are for series {uids.series_uid!r} but key_image is series "
            f"{str(header.SeriesInstanceUID)!r}"
        )
    _check_lo("manufacturer", manufacturer)
    when = content_datetime or dt.datetime.now()
    pixels = _render_summary(hu, content, header.get("InstanceNumber"))
    orientation = _patient_orientation(header)

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids.sc_series_uid,
        series_number=_series_number(header, series_number, offset=2000),
        sop_instance_uid=uids.sc_sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        patient_orientation=tuple(letters[0] for letters in orientation),  # highdicom takes one letter each
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"ICH AI summary v{content.version}",
        manufacturer_model_name="ichnode",
        software_versions=__version__,
        institution_name=institution_name,
        series_date=when.date(),
        series_time=when.time(),
        content_date=when.date(),
        content_time=when.time(),
        specific_character_set=_charset(header, content, manufacturer, institution_name),
    )
    sc.PatientOrientation = list(orientation)
    # The whole Patient and Study modules, as the SR has them.
    sc.copy_patient_and_study_information(header)
    # Made by software from another DICOM image, not captured from video.
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "NO"
    # An unpaired body part, so Laterality stays absent. A source's free text
    # ("Kopf/Schaedel") is no Code String: the series was selected as a head.
    body_part = str(header.get("BodyPartExamined") or "").strip().upper()
    sc.BodyPartExamined = body_part if _CODE_STRING.fullmatch(body_part) else "HEAD"
    # Once lossy compressed, an image and what is derived from it say so (PS3.3 C.7.6.1.1.5).
    if str(header.get("LossyImageCompression") or "").strip() == "01":
        for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in header:
                sc[keyword] = deepcopy(header[keyword])
    sc.DerivationDescription = (
        "Key slice in brain window (center 40, width 80 HU) with AI findings"
    )
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [source]
    if content.disclaimer:
        sc.ImageComments = content.disclaimer
    _stamp(sc, when)
    sc.DateOfSecondaryCapture = DA(when.date())
    sc.TimeOfSecondaryCapture = TM(when.time())
    return sc


def _window(hu: np.ndarray) -> np.ndarray:
    """8-bit brain window, through the same mapping the model's input uses."""
    center, width = _BRAIN_WINDOW
    finite = np.nan_to_num(np.asarray(hu, dtype=np.float32), nan=center - width / 2.0)
    scaled = apply_windows(finite, [_BRAIN_WINDOW])[..., 0]
    return (scaled * 255.0 + 0.5).astype(np.uint8)


_WHITE, _GREY, _RED, _YELLOW = (255, 255, 255), (190, 190, 190), (255, 80, 80), (255, 210, 0)


def _summary_rows(
    content: ReportContent, key_number: object = None
) -> list[tuple[tuple[str, ...], tuple[int, int, int]]]:
    """Text rows of the panel: one cell (free text) or four (a finding)."""
    # The Instance Number finds the slice in a viewer; a subtype may be seen best on another one (the SR names it).
    image = f"image {key_number}, " if str(key_number or "").strip() else ""
    rows: list[tuple[tuple[str, ...], tuple[int, int, int]]] = [
        ((f"ICH AI results v{content.version} - key slice ({image}highest 'any' score)",), _WHITE)
    ]
    for finding in content.findings:
        probability, threshold = shown_scores(finding.probability, finding.threshold, finding.present)
        rows.append(
            (
                (
                    finding.label,
                    probability,
                    "PRESENT" if finding.present else "absent",
                    f"threshold {threshold}",
                ),
                _RED if finding.present else _GREY,
            )
        )
    rows.append(((f"{content.algorithm_name} {content.algorithm_version}",), _GREY))
    if content.quarantined_count:
        rows.append(((_quarantine_text(content.quarantined_count),), _YELLOW))
    if content.disclaimer:
        rows.append(((content.disclaimer,), _YELLOW))
    return rows


def _render_summary(hu: np.ndarray, content: ReportContent, key_number: object = None) -> np.ndarray:
    image = Image.fromarray(_window(hu), mode="L").convert("RGB")
    if image.width < _SUMMARY_MIN_WIDTH:
        height = max(1, round(image.height * _SUMMARY_MIN_WIDTH / image.width))
        image = image.resize((_SUMMARY_MIN_WIDTH, height), Image.Resampling.BILINEAR)
    width = image.width
    font_size = max(12, width // 34)
    font = ImageFont.load_default(size=font_size)
    margin = font_size // 2
    # Column starts of a finding row: label, probability, flag, threshold.
    columns = [margin]
    for cells in (LABELS, ("0.000",), ("PRESENT",)):
        columns.append(columns[-1] + round(max(font.getlength(c) for c in cells)) + font_size)
    lines: list[tuple[tuple[str, ...], tuple[int, int, int]]] = []
    for cells, colour in _summary_rows(content, key_number):
        if len(cells) == 1:  # free text, wrapped to the panel width
            lines.extend(((part,), colour) for part in _wrap(_drawable(cells[0]), font, width - 2 * margin))
        else:
            lines.append((cells, colour))
    line_height = round(font_size * 1.3)
    panel = Image.new("RGB", (width, margin * 2 + line_height * len(lines)), (0, 0, 0))
    draw = ImageDraw.Draw(panel)
    for row, (cells, colour) in enumerate(lines):
        for x, text in zip(columns, cells):
            draw.text((x, margin + row * line_height), text, fill=colour, font=font)
    canvas = Image.new("RGB", (width, image.height + panel.height), (0, 0, 0))
    canvas.paste(image, (0, 0))
    canvas.paste(panel, (0, image.height))
    return np.asarray(canvas, dtype=np.uint8).copy()


def _drawable(text: str) -> str:
    """``text`` in the characters the bundled font draws (ASCII): accents
    dropped ("für" -> "fur"), anything else a "?". The SC's ImageComments and
    the SR keep the text as it is."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(
        c if c.isascii() else "?" for c in decomposed if c.isascii() or not unicodedata.combining(c)
    )


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Lines of ``text`` no wider than ``width``: broken at spaces, and a word
    wider than a line (a web address) broken where it must."""
    words = []
    for word in text.split(" "):
        while len(word) > 1 and font.getlength(word) > width:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            words.append(word[:cut])
            word = word[cut:]
        words.append(word)
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = word if not current else f"{current} {word}"
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines


def _patient_orientation(header: Dataset) -> tuple[str, str]:
    """Patient Orientation of the rows and columns (:func:`_axis_letter`)."""
    iop = header.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        raise ValueError(
            "key_image needs ImageOrientationPatient (0020,0037) with 6 values, "
            f"got {iop!r}"
        )
    values = [float(v) for v in iop]
    return _axis_letter(values[:3]), _axis_letter(values[3:])


def _axis_letter(direction: Sequence[float]) -> str:
    """The letters of a direction (PS3.3 C.7.6.1.1.1): the main axis first,
    then an axis nearly as strong (an image rotated in plane, 45 degrees:
    "LP", not "L" for the rows and "R" for the columns)."""
    # DICOM patient axes: +x left, +y posterior, +z head.
    magnitudes = np.abs(np.asarray(direction, dtype=float))
    letters = ""
    for axis in np.argsort(-magnitudes, kind="stable"):
        if magnitudes[axis] > 0.5 * magnitudes.max():
            positive, negative = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
            letters += positive if direction[axis] > 0 else negative
    return letters


# --------------------------------------------------------------------------
# Helpers


def _charset(header: Dataset, content: ReportContent, *texts: str | None) -> object:
    """The source's character set, or UTF-8 when our own text is not ASCII or
    highdicom does not take the source's (``\\ISO 2022 IR 87``, typos)."""
    own = [content.algorithm_name, content.algorithm_version, content.disclaimer, *texts]
    source = _source_charset(header)
    if source is not _UNUSABLE and all(text is None or text.isascii() for text in own):
        return source
    return _UTF8


_UNUSABLE = object()
_CHARSETS = {value.value for value in hd.enum.SpecificCharacterSetValues}


def _source_charset(header: Dataset) -> object:
    """The source's Specific Character Set as highdicom accepts it: None for
    the default repertoire, one stand-alone value, or code extensions
    (an empty first value, as PS3.5 writes it, made explicit); else
    ``_UNUSABLE``.  pydicom has already decoded the values, so any character
    set that can hold them will do."""
    raw = header.get("SpecificCharacterSet")
    values = [str(v).strip() for v in (raw if isinstance(raw, list | tuple | MultiValue) else [raw or ""])]
    if not any(values):
        return None
    if len(values) == 1:
        value = values[0]
        return value if value in _CHARSETS and not value.startswith("ISO 2022") else _UNUSABLE
    values[0] = values[0] or "ISO 2022 IR 6"
    return values if all(v in _CHARSETS and v.startswith("ISO 2022") for v in values) else _UNUSABLE


def _stamp(ds: Dataset, when: dt.datetime) -> None:
    """Date the instance and highdicom's contribution at ``when``.

    With the stored result time, a resend is then the same object, byte for
    byte, under the same UIDs.
    """
    ds.InstanceCreationDate = DA(when.date())
    ds.InstanceCreationTime = TM(when.time())
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)


def _series_number(header: Dataset, explicit: int | None, *, offset: int) -> int:
    if explicit is not None:
        _check_positive_int("series_number", explicit)
        return explicit
    try:
        source = int(header.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        source = 0
    # Integer String holds 32 bits: past them, the offset alone.
    number = max(source, 0) + offset
    return number if number <= _IS_MAX else offset


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_lo(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > _LO_MAX:
        raise ValueError(f"{name} must be 1 to {_LO_MAX} characters, got {value!r}")
