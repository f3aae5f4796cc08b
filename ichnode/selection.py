"""Which series the model may score: axial head CT, enough slices, not derived.

A whole exam is routed to the node (scouts, dose reports, secondary
captures, other body parts); every series that is not scored gets a skip
reason a PACS administrator can read in ``ichnode results``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage  # type: ignore[attr-defined]

from .config import SeriesConfig
from .imaging import image_position, slice_normal, slice_positions, sop_class_uid, tilt_degrees

# Words in a series description that name a part of the body other than the
# head: such a series is not scored even in a study described as a head study.
_OTHER_BODY_PARTS = (
    "CHEST", "THORA", "LUNG", "ABDOM", "PELVI", "SPINE", "NECK", "CARDI", "HEART", "CORONAR",
    "LIVER", "KIDNEY", "RENAL", "KNEE", "SHOULDER", "EXTREMIT",
)  # fmt: skip
# A head CT covers about 150-250 mm (with the neck, up to ~350); a series
# longer is of more (a whole-body or chest-to-pelvis scan described as "head").
_LONGEST_HEAD_MM = 400.0
# ImageType values (value 3 onwards) that mark images the model must not see.
_EXCLUDED_IMAGE_TYPES = {"LOCALIZER": "a localizer (scout)", "SCOUT": "a localizer (scout)", "REF_SURVIEW": "a survey image"}
# Slices of one acquisition share their orientation (a gantry tilt included);
# one further off than this is another kind of image (a reformat, say).
_SAME_ORIENTATION_DEGREES = 1.0
# Slices closer than this along the normal are at one position.
_SAME_POSITION_MM = 0.01
# Slices of one head lie a few mm apart: an image this far from all the
# others (a position typed wrong, 1e300) is no slice of the volume.
_APART_MM = 100.0
_SAME_POSITION = "at the slice position of"
# Images at one position that differ in one of these are passes of a dynamic
# series or reconstructions, not copies of one image sent again.
_ACQUISITION_KEYWORDS = (
    "AcquisitionNumber",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ContentDate",
    "ContentTime",
    "TemporalPositionIdentifier",
    "TriggerTime",
    "ConvolutionKernel",
    "SliceThickness",
)


# ContrastBolusAgent is free text, typed by technologists: a series counts
# as contrast-enhanced only on evidence (an agent named, a volume or dose
# given), never for text that is not understood, and not where the text
# says no ("NONE", "No IV contrast", "NATIVE", "OHNE KM", "0 ml").
_NO_CONTRAST_WORDS = {"NO", "NON", "NONE", "NIL", "N", "NA", "WITHOUT", "WO", "NATIVE", "NATIV", "OHNE", "SANS", "SIN", "0"}
_CONTRAST_WORDS = {"YES", "APPLIED", "IV", "IA", "KM", "CM", "CONTRAST", "KONTRAST", "CONTRASTE", "C+"}
# Iodinated agents (generic and brand name stems) and gadolinium.
_CONTRAST_AGENTS = (
    "IOD", "IOHEX", "OMNIPAQUE", "IOPAMID", "ISOVUE", "IOPAMIRO", "SOLUTRAST", "IODIXAN", "VISIPAQUE", "IOVERSOL",
    "OPTIRAY", "IOPROMID", "ULTRAVIST", "IOMEPROL", "IOMERON", "IMERON", "IOBITRIDOL", "XENETIX", "IOPENTOL",
    "IMAGOPAQUE", "GADO", "ACCUPAQUE",
)


# A Series Description names contrast for angiography and venography
# ("CTA HEAD", "Angio Willis", "CTV") or says "post contrast", "C+", "KM+".
# Only the series' own description is read: a protocol or study name
# ("STROKE: NCCT + CTA") covers the plain series of the exam too.
_DESCRIBED_CONTRAST = {"CTA", "CTV", "C+", "+C", "KM+", "POSTCONTRAST", "VENOGRAM", "VENOGRAPHY"}
_DESCRIBED_CONTRAST_PHRASES = ("POST CONTRAST", "WITH CONTRAST", "W CONTRAST", "MIT KM")
# Less the bare "0", "N", "NA" of an agent field: a description's "0.6 mm" says nothing of contrast.
_DESCRIBED_NO_CONTRAST = (_NO_CONTRAST_WORDS - {"0", "N", "NA"}) | {
    "NONCONTRAST", "PRECONTRAST", "NCCT", "NC", "PRE", "PLAIN"
}


def _words(text: str) -> list[str]:
    upper = text.upper().replace("NON-", "NON ").replace("W/O", "WO").replace("W/", "W ")
    return [word for word in re.split(r"[^A-Z0-9+]+", upper) if word]


def _contrast_given(ds: Dataset) -> str | None:
    """What says the series was imaged with contrast, if anything does."""
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
    words = set(_words(agent))
    if agent and not words & _NO_CONTRAST_WORDS:
        if words & _CONTRAST_WORDS or any(name in agent.upper() for name in _CONTRAST_AGENTS):
            return f"ContrastBolusAgent {agent}"
    for keyword in ("ContrastBolusVolume", "ContrastBolusTotalDose"):
        try:
            if float(ds.get(keyword) or 0) > 0:
                return f"{keyword} {ds.get(keyword)}"
        except (TypeError, ValueError):
            continue
    description = str(ds.get("SeriesDescription", "") or "").strip()
    if not agent and _describes_contrast(description):  # an agent field that says no (or else) prevails
        return f"SeriesDescription {description}"
    return None


def _describes_contrast(description: str) -> bool:
    words = _words(description)
    if set(words) & _DESCRIBED_NO_CONTRAST:
        return False
    text = f" {' '.join(words)} "
    return bool(
        set(words) & _DESCRIBED_CONTRAST
        or any(word.startswith("ANGIO") for word in words)
        or any(f" {phrase} " in text for phrase in _DESCRIBED_CONTRAST_PHRASES)
    )


def replaced_by_a_later_copy(reason: str) -> bool:
    """Whether an image was left out only because a later one took its slice
    position (a slice sent again under a new UID): nothing of the volume is missing."""
    return _SAME_POSITION in reason


def skip_reason(headers: Sequence[Dataset], sop_classes: Sequence[str], rules: SeriesConfig) -> str | None:
    """None when the series is eligible, else a one-line reason.

    ``headers`` are the series' instances (read without pixels);
    ``sop_classes`` their SOP Class UIDs as received (some files keep it only
    in the file meta).
    """
    if not headers:
        return "no readable instances"
    sop_class = Counter(sop_classes).most_common(1)[0][0]
    if sop_class == EnhancedCTImageStorage:
        return "Enhanced CT (multi-frame) is not scored by this version"
    if sop_class != CTImageStorage:
        return f"SOP class {UID(sop_class).name} is not CT Image Storage"
    first = headers[0]
    modality = str(first.get("Modality", "")).upper()
    if modality != "CT":
        return f"modality {modality or 'missing'} is not CT"
    excluded = _excluded_image_type(first)
    if excluded:
        return excluded
    if len(headers) < rules.min_slices:
        return f"{len(headers)} slices, fewer than series.min_slices ({rules.min_slices})"
    if "ImageOrientationPatient" not in first:
        return "no ImageOrientationPatient: cannot tell the slice orientation"
    try:
        tilt = tilt_degrees(first)
    except ValueError as exc:
        return f"ImageOrientationPatient unusable: {exc}"
    if tilt > rules.axial_tolerance_degrees:
        return (
            f"not axial: slice normal {tilt:.1f} degrees from the patient axis "
            f"(series.axial_tolerance_degrees is {rules.axial_tolerance_degrees:g})"
        )
    not_head = _not_head(first, rules.head_keywords)
    if not_head:
        return not_head
    contrast = _contrast_given(first)
    if rules.skip_contrast and contrast:
        return f"contrast-enhanced ({contrast}): hemorrhage is read on non-contrast CT (series.skip_contrast)"
    mixed = mixed_series(headers)
    if mixed:
        return mixed
    extent = float(np.ptp(slice_positions(headers)))
    if extent > _LONGEST_HEAD_MM:
        return f"not a head series: its slices span {extent:.6g} mm, more than a head ({_LONGEST_HEAD_MM:.0f} mm)"
    return None


def _not_head(ds: Dataset, head_keywords: Sequence[str]) -> str | None:
    """Why the series is not of the head, if its descriptions say so.

    BodyPartExamined names what this series imaged and decides when it is
    set. Else the series description, the protocol name and the study
    description are read in that order, and the first that names the head,
    or another part of the body, decides: the spine series of a "HEAD
    CSPINE" protocol is described "C-SPINE 2.5 BONE". A series described,
    but nowhere as of the head, is not scored. Keywords match anywhere in a
    text ("HEAD" in "CTHEAD", "CRANI" in "INTRACRANIAL").
    """
    keywords = [word.upper() for word in head_keywords]

    def text(attribute: str) -> str:
        return str(ds.get(attribute, "") or "").strip().upper()

    def names(text: str, words: Sequence[str]) -> bool:
        return any(word in text for word in words)

    body_part = text("BodyPartExamined")
    if body_part:
        if names(body_part, keywords):
            return None
        return f"not a head series: BodyPartExamined {body_part} names none of series.head_keywords"
    described = []
    for attribute in ("SeriesDescription", "ProtocolName", "StudyDescription"):
        said = text(attribute)
        if not said:
            continue
        if names(said, keywords):
            return None
        if names(said, _OTHER_BODY_PARTS):
            return f"not a head series: {attribute} {said} names another part of the body"
        described.append(said)
    if described:
        return f"not a head series: {' / '.join(described)} names none of series.head_keywords"
    return None


def mixed_series(headers: Sequence[Dataset]) -> str | None:
    """Why the images cannot make one volume, if they cannot.

    Images of several kinds or orientations with none a majority (so that
    :func:`stray_slices` leaves none out), or images that repeat most slice
    positions: a dynamic (perfusion) series or several reconstructions filed
    as one series, which would be scored as if their images were slices.
    """
    strays, _ = _strays(headers)
    if not strays:
        return None
    repeats = [index for index, why in strays.items() if why.startswith(_SAME_POSITION)]
    if 2 * len(repeats) > len(strays):
        placed = len(headers) - len(strays) + len(repeats)
        return (
            f"{placed} images at {placed - len(repeats)} slice positions: several images per position "
            "(a dynamic or perfusion series, or several reconstructions in one series)"
        )
    index, why = next(iter(strays.items()))
    return f"{len(strays)} of {len(headers)} images are not slices of one volume ({_named(headers[index])}: {why})"


def stray_slices(headers: Sequence[Dataset]) -> dict[int, str]:
    """The images of a series that are not slices of its volume, and why, by index.

    A localizer or derived image filed in the series, an image of another
    study or patient than most, one oriented otherwise than most (its
    reformat, say), one without a usable position, or one at the position
    of an image received after it (a slice sent again under a new UID) is
    left out of the volume. Only a minority can be stray, copies aside (a
    series sent again whole under new UIDs is scored from its last copy): a
    series made mostly of such images is judged whole by :func:`skip_reason`
    (see :func:`mixed_series`).
    """
    strays, copies = _strays(headers)
    return strays if 2 * (len(strays) - len(copies)) < len(headers) - len(copies) else {}


def _named(ds: Dataset) -> str:
    """An image as an administrator finds it: its Instance Number and SOP Instance UID."""
    number = str(ds.get("InstanceNumber", "") or "").strip()
    return f"image {number} ({ds.get('SOPInstanceUID', '?')})" if number else f"image {ds.get('SOPInstanceUID', '?')}"


def _acquisition(ds: Dataset) -> tuple[str, ...] | None:
    """What tells two passes or reconstructions at one position apart; None where nothing does."""
    values = tuple(str(ds.get(keyword, "") or "").strip() for keyword in _ACQUISITION_KEYWORDS)
    return values if any(values) else None


def _strays(headers: Sequence[Dataset]) -> tuple[dict[int, str], set[int]]:
    """Every image that is not a slice of the volume most images share, and
    why; and which of them are copies of a later image (the same acquisition
    at the same position)."""
    strays: dict[int, str] = {}
    copies: set[int] = set()
    origins: dict[int, np.ndarray] = {}
    normals: dict[int, np.ndarray] = {}
    # One Series Instance UID for images of two patients or studies: a series
    # re-filed by the PACS, or a mistake. Most of it decides which it is; an
    # image without a PatientID is taken to be the series' patient.
    studies = [str(ds.get("StudyInstanceUID", "")) for ds in headers]
    patients = [str(ds.get("PatientID", "") or "") for ds in headers]
    study = Counter(studies).most_common(1)[0][0] if studies else ""
    named = Counter(p for p in patients if p)
    patient = named.most_common(1)[0][0] if named else ""
    # A secondary capture or another modality's image filed under the
    # series' UID is no CT slice, whatever its geometry.
    kinds = [(sop_class_uid(ds), str(ds.get("Modality", "") or "")) for ds in headers]
    kind = Counter(kinds).most_common(1)[0][0] if kinds else ("", "")
    for index, ds in enumerate(headers):
        reason = _excluded_image_type(ds)
        if reason is None and kinds[index] != kind:
            reason = f"{_kind_text(kinds[index])}, unlike most images of the series ({_kind_text(kind)})"
        if reason is None and (studies[index] != study or patients[index] not in ("", patient)):
            reason = f"of study {studies[index]}, patient {patients[index]}, unlike most images of the series"
        if reason is None and not ds.get("ImagePositionPatient"):
            reason = "no ImagePositionPatient: its place in the volume is unknown"
        if reason is None:
            try:
                origins[index] = image_position(ds)
                normals[index] = slice_normal(ds)
            except ValueError as exc:
                reason = str(exc)
        if reason is not None:
            strays[index] = reason
    if normals:
        # The orientation most slices share (normals rounded to ~0.5 degree).
        common, _ = Counter(tuple(np.round(n, 2)) for n in normals.values()).most_common(1)[0]
        reference = np.asarray(common) / np.linalg.norm(common)
        for index, normal in normals.items():
            angle = math.degrees(math.acos(min(1.0, abs(float(normal @ reference)))))
            if angle > _SAME_ORIENTATION_DEGREES:
                strays[index] = f"oriented {angle:.0f} degrees from the series' other slices"
        placed = sorted((float(origins[i] @ reference), i) for i in normals if i not in strays)
        # The images apart from the largest run of slices are strays.
        runs = [[placed[0]]] if placed else []
        for previous, current in zip(placed, placed[1:]):
            if current[0] - previous[0] > _APART_MM:
                runs.append([])
            runs[-1].append(current)
        volume = max(runs, key=len) if runs else []
        for run in runs:
            if run is not volume:
                for position, index in run:
                    distance = min(abs(position - volume[0][0]), abs(position - volume[-1][0]))
                    strays[index] = f"at {position:.6g} mm along the slice normal, {distance:.6g} mm from the other slices"
        placed = [(position, index) for position, index in placed if index not in strays]
        # Of images at one position (a slice sent again under a new UID), the
        # one that came last is the slice.
        groups: list[list[int]] = []
        previous = -math.inf
        for position, index in placed:
            if position - previous > _SAME_POSITION_MM:
                groups.append([])
            groups[-1].append(index)
            previous = position
        for group in groups:
            latest = max(group)
            for index in group:
                if index != latest:
                    strays[index] = f"{_SAME_POSITION} {_named(headers[latest])}, which came later and is used instead"
                    same = _acquisition(headers[index])
                    if same is not None and same == _acquisition(headers[latest]):
                        copies.add(index)
    return dict(sorted(strays.items())), copies


def _kind_text(kind: tuple[str, str]) -> str:
    sop_class, modality = kind
    return f"{UID(sop_class).name or 'no SOP class'}, modality {modality or 'none'}"


def _excluded_image_type(ds: Dataset) -> str | None:
    """Why an image's ImageType keeps it from the model (a localizer, a derived image), if it does."""
    value = ds.get("ImageType", [])
    if isinstance(value, str):  # a single value is not a list
        value = [value]
    image_type = [str(item).upper() for item in value]
    shown = "\\".join(image_type)
    for item in image_type:
        if item in _EXCLUDED_IMAGE_TYPES:
            return f"ImageType {shown} is {_EXCLUDED_IMAGE_TYPES[item]}"
    if image_type[:2] == ["DERIVED", "SECONDARY"]:
        return f"ImageType {shown} is a derived secondary image"
    return None
