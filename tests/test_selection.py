"""Which series and images the model scores (``ichnode.selection``): the skip
reasons and left-out images a PACS administrator reads in ``ichnode results``."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from ichnode.config import SeriesConfig
from ichnode.imaging import slice_normal
from ichnode.selection import skip_reason, stray_slices
from tests.pipeline_support import phantom

RULES = SeriesConfig()


def _series(seed: int = 70, n_slices: int = 12) -> list[Any]:
    return [copy.deepcopy(ds) for ds in phantom(seed, n_slices=n_slices).datasets]


def _reason(headers: list[Any]) -> str | None:
    """What the worker records: images left out first, then the rest judged."""
    strays = stray_slices(headers)
    kept = [ds for index, ds in enumerate(headers) if index not in strays]
    return skip_reason(kept, [CTImageStorage] * len(kept), RULES)


def test_the_phantom_series_is_eligible() -> None:
    assert _reason(_series()) is None


def test_a_perfusion_series_is_skipped_not_scored_as_one_volume() -> None:
    # The same 12 positions imaged 3 times (a dynamic series): each image is a
    # valid axial head slice, but their volume is not a head.
    series = _series()
    timed = []
    for seconds in range(3):
        for ds in series:
            again = copy.deepcopy(ds)
            again.SOPInstanceUID = generate_uid()
            again.AcquisitionTime = again.ContentTime = f"2107{seconds:02d}"
            timed.append(again)
    assert stray_slices(timed) == {}
    assert _reason(timed) == (
        "36 images at 12 slice positions: several images per position "
        "(a dynamic or perfusion series, or several reconstructions in one series)"
    )


def test_half_axial_half_reformatted_is_skipped_not_scored_mixed() -> None:
    axial, coronal = _series(71), _series(72)
    for ds in coronal:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = axial[0].StudyInstanceUID, axial[0].SeriesInstanceUID
        ds.PatientID = axial[0].PatientID
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    headers = [ds for pair in zip(axial, coronal) for ds in pair]
    assert stray_slices(headers) == {}  # neither kind is a minority
    reason = _reason(headers)
    assert reason is not None and reason.startswith("12 of 24 images are not slices of one volume")
    assert "oriented 90 degrees" in reason


@pytest.mark.parametrize("orientation", ["", [1, 0, 0, 0, 1], [1, 0, 0, 1, 0, 0]])
def test_an_unusable_orientation_on_every_image_is_a_skip_reason(orientation: Any) -> None:
    series = _series()
    for ds in series:
        ds.ImageOrientationPatient = orientation
    reason = _reason(series)
    assert reason is not None and reason.startswith("ImageOrientationPatient unusable"), reason


def test_an_image_with_a_malformed_position_is_left_out_and_the_rest_scored() -> None:
    series = _series()
    series[3].ImagePositionPatient = [-112.0, -9.8]
    strays = stray_slices(series)
    assert list(strays) == [3] and "ImagePositionPatient must hold 3 finite numbers" in strays[3]
    assert _reason(series) is None


@pytest.mark.parametrize(("z", "shown"), [(100000.0, "100000"), (1e300, "1e+300")])
def test_an_image_far_from_the_other_slices_is_left_out_and_the_rest_scored(z: float, shown: str) -> None:
    # A position typed wrong: the series is still a head, scored without it.
    series = _series()
    x, y, _ = series[3].ImagePositionPatient
    series[3].ImagePositionPatient = [x, y, z]
    strays = stray_slices(series)
    assert list(strays) == [3] and strays[3].startswith(f"at {shown} mm along the slice normal, ")
    assert strays[3].endswith(" mm from the other slices")
    assert _reason(series) is None


def test_an_image_of_another_patient_filed_in_the_series_is_left_out() -> None:
    series = _series()
    series[5].PatientID = "SOMEONE-ELSE"
    series[7].PatientID = ""  # no PatientID: taken to be the series' patient
    strays = stray_slices(series)
    assert list(strays) == [5] and "patient SOMEONE-ELSE" in strays[5]


def test_a_secondary_capture_filed_in_the_series_is_left_out() -> None:
    # A device's screenshot under the CT series' UID, with the geometry of
    # the slice it shows: not a slice of the volume.
    series = _series()
    capture = copy.deepcopy(series[3])
    capture.SOPClassUID, capture.Modality = SecondaryCaptureImageStorage, "OT"
    capture.SOPInstanceUID = generate_uid()
    series.insert(8, capture)
    assert stray_slices(series) == {
        8: "Secondary Capture Image Storage, modality OT, unlike most images of the series "
        "(CT Image Storage, modality CT)"
    }


def test_a_slice_sent_again_under_a_new_uid_is_scored_once() -> None:
    series = _series()
    again = copy.deepcopy(series[4])
    again.SOPInstanceUID = generate_uid()
    series.append(again)  # came after the first copy
    assert stray_slices(series) == {
        4: f"at the slice position of image {again.InstanceNumber} ({again.SOPInstanceUID}), "
        "which came later and is used instead"
    }
    assert _reason(series) is None


def test_a_series_sent_again_whole_under_new_uids_is_scored_from_the_last_copy() -> None:
    # A gateway that gives every instance a new UID each time it forwards:
    # the same acquisition at every position, twice, is no dynamic series.
    series = _series()
    again = []
    for ds in series:
        copied = copy.deepcopy(ds)
        copied.SOPInstanceUID = generate_uid()
        again.append(copied)
    strays = stray_slices(series + again)
    assert sorted(strays) == list(range(12))
    assert all("which came later and is used instead" in why for why in strays.values())
    assert _reason(series + again) is None
    # Another reconstruction at the same positions is no copy.
    for ds in again:
        ds.ConvolutionKernel = "BONE"
    assert _reason(series + again).startswith("24 images at 12 slice positions: several images per position")


@pytest.mark.parametrize(
    ("study", "series_description", "eligible", "why"),
    [
        # The common case once BodyPartExamined is removed: only the study says head.
        ("CT HEAD WO CONTRAST", "AXIAL 5mm", True, None),
        ("", "BRAIN STND 5mm", True, None),
        ("CT CRANIAL", "", True, None),
        ("", "", True, None),
        # The spine series of a head and spine study.
        ("CTHEAD", "", True, None),
        ("CT INTRACRANIAL", "", True, None),
        ("CT HEAD C-SPINE", "C-SPINE 2.5 BONE", False, "names another part of the body"),
        ("CT CHEST ABD PELVIS", "CHEST 5mm", False, "names another part of the body"),
        ("", "AXIAL 5mm", False, "names none of series.head_keywords"),
    ],
)
def test_head_series_by_description_when_body_part_is_empty(
    study: str, series_description: str, eligible: bool, why: str | None
) -> None:
    series = _series()
    for ds in series:
        ds.BodyPartExamined = ""
        ds.StudyDescription = study
        ds.SeriesDescription = series_description
    reason = _reason(series)
    if eligible:
        assert reason is None
    else:
        assert reason is not None and reason.startswith("not a head series") and why in reason, reason


def test_the_spine_series_of_a_head_and_spine_protocol_is_not_scored() -> None:
    series = _series()
    for ds in series:
        ds.BodyPartExamined, ds.SeriesDescription, ds.ProtocolName = "", "C-SPINE 2.5 BONE", "TRAUMA HEAD CSPINE"
    assert _reason(series) == "not a head series: SeriesDescription C-SPINE 2.5 BONE names another part of the body"


def test_a_series_longer_than_a_head_is_skipped() -> None:
    # Described as a head study, but 12 slices 40 mm apart: 440 mm of body.
    series = _series()
    normal = slice_normal(series[0])  # the phantom's gantry is tilted
    first = [float(v) for v in series[0].ImagePositionPatient]
    for index, ds in enumerate(series):
        ds.ImagePositionPatient = [first[axis] + 40 * index * normal[axis] for axis in range(3)]
    reason = _reason(series)
    assert reason == "not a head series: its slices span 440 mm, more than a head (400 mm)"


def test_a_tilt_past_series_axial_tolerance_degrees_is_skipped() -> None:
    # The gantry tilted 20 degrees about the patient's left-right axis.
    series = _series()
    angle = math.radians(20)
    for ds in series:
        ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(angle), -math.sin(angle)]
    kinds = [CTImageStorage] * len(series)
    assert skip_reason(series, kinds, SeriesConfig(axial_tolerance_degrees=25)) is None
    assert skip_reason(series, kinds, SeriesConfig(axial_tolerance_degrees=15)) == (
        "not axial: slice normal 20.0 degrees from the patient axis (series.axial_tolerance_degrees is 15)"
    )


@pytest.mark.parametrize(
    ("given", "scored"),
    [
        ({"ContrastBolusAgent": "OMNIPAQUE 350"}, False),
        ({"ContrastBolusAgent": "Iohexol"}, False),
        ({"ContrastBolusAgent": "IV contrast"}, False),
        ({"ContrastBolusVolume": "80"}, False),
        # Free text that says no, or says nothing understood: scored (a triage must not miss a head).
        ({"ContrastBolusAgent": "NONE"}, True),
        ({"ContrastBolusAgent": "No IV contrast"}, True),
        ({"ContrastBolusAgent": "NON CONTRAST"}, True),
        ({"ContrastBolusAgent": "non-contrast"}, True),
        ({"ContrastBolusAgent": "OHNE KM"}, True),
        ({"ContrastBolusAgent": "NATIVE"}, True),
        ({"ContrastBolusAgent": "0 ml"}, True),
        ({"ContrastBolusAgent": "per protocol"}, True),
        ({"ContrastBolusAgent": ""}, True),
        ({}, True),
        # With the agent field empty, the series' own description.
        ({"SeriesDescription": "CTA HEAD"}, False),
        ({"SeriesDescription": "Angio_Willis 0.6"}, False),
        ({"SeriesDescription": "HEAD W/ CONTRAST"}, False),
        ({"SeriesDescription": "Kopf KM+"}, False),
        ({"SeriesDescription": "CTV sinus"}, False),
        ({"SeriesDescription": "HEAD W/O CONTRAST"}, True),
        ({"SeriesDescription": "PRE CONTRAST HEAD"}, True),
        ({"SeriesDescription": "NCCT HEAD"}, True),
        ({"SeriesDescription": "Head 5mm std"}, True),
        ({"SeriesDescription": "CTA HEAD", "ContrastBolusAgent": "NONE"}, True),
    ],
)
def test_a_contrast_enhanced_series_is_skipped_unless_told_otherwise(given: dict, scored: bool) -> None:
    series = _series()
    for ds in series:
        for keyword, value in given.items():
            setattr(ds, keyword, value)
    reason = _reason(series)
    if scored:
        assert reason is None
    else:
        ((keyword, value),) = given.items()
        assert reason == (
            f"contrast-enhanced ({keyword} {value}): hemorrhage is read on non-contrast CT (series.skip_contrast)"
        )
        kept = [ds for index, ds in enumerate(series) if index not in stray_slices(series)]
        assert skip_reason(kept, [CTImageStorage] * len(kept), SeriesConfig(skip_contrast=False)) is None
