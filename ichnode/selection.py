"""Which series the model may score: axial head CT, enough slices, not derived.

A whole exam is routed to the node (scouts, dose reports, secondary
captures, other body parts); every series that is not scored gets a skip
reason a PACS administrator can read in ``ichnode results``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage  # type: ignore[attr-defined]

from .config import SeriesConfig
from .imaging import tilt_degrees

_DESCRIPTIONS = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")
# ImageType values (value 3 onwards) that mark images the model must not see.
_EXCLUDED_IMAGE_TYPES = {"LOCALIZER": "a localizer (scout)", "SCOUT": "a localizer (scout)", "REF_SURVIEW": "a survey image"}


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
    image_type_value = first.get("ImageType", [])
    if isinstance(image_type_value, str):  # a single value is not a list
        image_type_value = [image_type_value]
    image_type = [str(value).upper() for value in image_type_value]
    shown = "\\".join(image_type)
    for value in image_type:
        if value in _EXCLUDED_IMAGE_TYPES:
            return f"ImageType {shown} is {_EXCLUDED_IMAGE_TYPES[value]}"
    if image_type[:2] == ["DERIVED", "SECONDARY"]:
        return f"ImageType {shown} is a derived secondary image"
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
