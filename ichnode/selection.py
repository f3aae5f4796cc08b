"""Which series the model may score: axial head CT, enough slices, not derived.

A whole exam is routed to the node (scouts, dose reports, secondary
captures, other body parts); every series that is not scored gets a skip
reason a PACS administrator can read in ``ichnode results``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage  # type: ignore[attr-defined]

from .config import SeriesConfig
from .imaging import slice_normal, tilt_degrees

_DESCRIPTIONS = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")
# ImageType values (value 3 onwards) that mark images the model must not see.
_EXCLUDED_IMAGE_TYPES = {"LOCALIZER": "a localizer (scout)", "SCOUT": "a localizer (scout)", "REF_SURVIEW": "a survey image"}
# Slices of one acquisition share their orientation (a gantry tilt included);
# one further off than this is another kind of image (a reformat, say).
_SAME_ORIENTATION_DEGREES = 1.0


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
        from pydicom.uid import UID

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
    tilt = tilt_degrees(first)
    if tilt > rules.axial_tolerance_degrees:
        return (
            f"not axial: slice normal {tilt:.1f} degrees from the patient axis "
            f"(series.axial_tolerance_degrees is {rules.axial_tolerance_degrees:g})"
        )
    keywords = [word.upper() for word in rules.head_keywords]
    # BodyPartExamined names what this series imaged and decides when it is
    # set: a study described "CT HEAD CHEST" also holds a chest series.
    body_part = str(first.get("BodyPartExamined", "") or "").strip().upper()
    if body_part:
        if not any(word in body_part for word in keywords):
            return f"not a head series: BodyPartExamined {body_part} names none of series.head_keywords"
        return None
    described = [str(first.get(keyword, "")).upper() for keyword in _DESCRIPTIONS]
    described = [text for text in described if text.strip()]
    if described and not any(word in text for text in described for word in keywords):
        return f"not a head series: {' / '.join(described)} names none of series.head_keywords"
    return None


def stray_slices(headers: Sequence[Dataset]) -> dict[int, str]:
    """The images of a series that are not slices of its volume, and why, by index.

    A localizer or derived image filed in the series, an image oriented
    otherwise than most (its reformat, say) or one without a position is
    left out of the volume. Only a minority can be stray: a series made
    mostly of such images is judged whole by :func:`skip_reason`.
    """
    strays: dict[int, str] = {}
    normals: dict[int, np.ndarray] = {}
    for index, ds in enumerate(headers):
        reason = _excluded_image_type(ds)
        if reason is None and not ds.get("ImagePositionPatient"):
            reason = "no ImagePositionPatient: its place in the volume is unknown"
        if reason is None:
            try:
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
    return strays if 2 * len(strays) < len(headers) else {}


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
