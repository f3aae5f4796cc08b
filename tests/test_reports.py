"""Tests for ichnode.reports: the TID 1500 SR and the summary image.

Built from two real series read in place (a GE head CT and an RSNA series
with its quirks), written to files, and checked with dicom3tools' dciodvfy
and DCMTK's dsrdump as well as by reading them back with highdicom.
"""

from __future__ import annotations

import datetime as dt
import io
import multiprocessing
import subprocess
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import UID, Comprehensive3DSRStorage, CTImageStorage, SecondaryCaptureImageStorage

from ichnode import preparation
from ichnode.config import LABELS
from ichnode.reports import (
    FINDING_CODES,
    Finding,
    ReportContent,
    build_sr,
    evidence_headers,
    build_summary_image,
    prime,
    report_uids,
)
from ichnode.reports import _summary_rows  # the panel's text, as drawn

from ichnode.imaging import to_hu
from ichnode.results import shown_scores

from .conftest import require_data, require_tool


SERIES = ("ge-head-ct", "rsna-series")
INVALID_VALUES = "Error - Dicom dataset contains invalid data values for Value Representations"
PROBABILITIES = (0.91, 0.02, 0.70, 0.10, 0.40, 0.05)
WHEN = dt.datetime(2024, 5, 17, 14, 30, 5)
DISCLAIMER = "Trained on synthetic phantoms. Not for clinical use."

# pydicom warns on every RSNA UID such as "ID_1f6d1e8aeb", highdicom on the
# GE PatientName "REMOVED"; both come with the source data. (The node's helper
# processes, which build its reports, ignore the latter.)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent"),
]


def _content(key_uid: str, *, version: int = 1, quarantined: int = 0) -> ReportContent:
    findings = tuple(
        Finding(label=label, probability=p, present=p >= 0.5, threshold=0.5)
        for label, p in zip(LABELS, PROBABILITIES, strict=True)
    )
    return ReportContent(
        findings=findings,
        key_sop_instance_uid=key_uid,
        algorithm_name="ichnode-default",
        algorithm_version="0.3.1",
        version=version,
        quarantined_count=quarantined,
        disclaimer=DISCLAIMER,
    )


@dataclass
class Built:
    name: str
    headers: list[Dataset]  # read with stop_before_pixels=True
    key_path: Path
    key: Dataset  # with pixels
    content: ReportContent
    sr: hd.sr.Comprehensive3DSR
    sc: hd.sc.SCImage
    sr_path: Path
    sc_path: Path


def _read_series(name: str) -> tuple[list[Path], list[Dataset]]:
    paths = sorted(require_data(name).glob("*.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return paths, headers


@pytest.fixture(scope="module", params=SERIES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    name = request.param
    paths, headers = _read_series(name)
    # Any slice can be the key; take one from the middle of the file list.
    index = len(paths) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key = pydicom.dcmread(paths[index])
    content = _content(str(key.SOPInstanceUID), version=2, quarantined=1)
    uids = report_uids(str(key.SeriesInstanceUID), 2, previous_versions=(1,))
    sr = build_sr(headers, content, uids=uids, content_datetime=WHEN)
    sc = build_summary_image(key, to_hu(key), content, uids=uids, content_datetime=WHEN)
    out = tmp_path_factory.mktemp(name)
    sr_path, sc_path = out / "sr.dcm", out / "sc.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    sc.save_as(sc_path, enforce_file_format=True)
    return Built(name, headers, paths[index], key, content, sr, sc, sr_path, sc_path)


# --------------------------------------------------------------------------
# dciodvfy


def _dciodvfy(path: Path) -> list[str]:
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    return (result.stdout + result.stderr).splitlines()


def _non_conformant_uids(headers: list[Dataset]) -> set[str]:
    uids = set()
    for ds in headers:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = str(ds.get(keyword, ""))
            if value and not UID(value).is_valid:
                uids.add(value)
    return uids


def _own_errors(report: Path, built: Built) -> list[str]:
    """dciodvfy errors of ``report`` that the source did not bring with it.

    A report must join the source's study and reference its slices, so it
    carries the source's UIDs as they are (RSNA: "ID_1f6d1e8aeb"), and
    highdicom copies the source's Patient and Study modules as they are (GE:
    an empty De-identification Method).  Errors about those are the source's;
    everything else is ours and must not be there.
    """
    inherited = {line for line in _dciodvfy(built.key_path) if line.startswith("Error")}
    bad_uids = _non_conformant_uids(built.headers)
    own = []
    for line in _dciodvfy(report):
        if not line.startswith("Error") or line in inherited:
            continue
        if any(f'"{uid}"' in line or f"<{uid}>" in line for uid in bad_uids):
            continue
        if bad_uids and line == INVALID_VALUES:
            continue
        own.append(line)
    return own


@pytest.mark.tools("dciodvfy")
def test_sr_passes_dciodvfy(built: Built) -> None:
    assert _own_errors(built.sr_path, built) == []
    lines = _dciodvfy(built.sr_path)
    assert "Comprehensive3DSR" in lines  # the IOD it was checked against


@pytest.mark.tools("dciodvfy")
def test_summary_image_passes_dciodvfy(built: Built) -> None:
    assert _own_errors(built.sc_path, built) == []
    assert "SCImage" in _dciodvfy(built.sc_path)


@pytest.mark.tools("dciodvfy")
def test_ge_reports_have_no_errors_but_the_source_de_identification_method(
    tmp_path: Path,
) -> None:
    # The GE source has PatientIdentityRemoved YES and an empty
    # DeidentificationMethod; highdicom copies the Patient module as it is.
    paths, headers = _read_series("ge-head-ct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key = pydicom.dcmread(paths[0])
    content = _content(str(key.SOPInstanceUID))
    uids = report_uids(str(key.SeriesInstanceUID), 1)
    sr = build_sr(headers, content, uids=uids)
    sc = build_summary_image(key, to_hu(key), content, uids=uids)
    expected = [
        "Error - Empty attribute (no value) Type 1C Conditional Element="
        "<DeidentificationMethod> Module=<Patient>"
    ]
    assert expected[0] in _dciodvfy(paths[0])
    for name, report in (("sr", sr), ("sc", sc)):
        path = tmp_path / f"{name}.dcm"
        report.save_as(path, enforce_file_format=True)
        errors = [line for line in _dciodvfy(path) if line.startswith("Error")]
        assert errors == expected, name


# --------------------------------------------------------------------------
# dsrdump


@pytest.mark.tools("dsrdump")
def test_dsrdump_renders_every_finding(built: Built) -> None:
    result = subprocess.run(
        [require_tool("dsrdump"), str(built.sr_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Comprehensive 3D SR Document" in text
    assert "ICH AI results v2" in text
    for finding in built.content.findings:
        concept = FINDING_CODES[finding.label]
        assert f'"Tracking Identifier")="ICH {finding.label}"' in text
        value = '(52101004,SCT,"Present")' if finding.present else '(272519000,SCT,"Absent")'
        assert f'CODE:(,,"{concept.meaning}")={value}' in text
        assert f'NUM:(,,"Probability")="{finding.probability:g}" (1,UCUM,"no units")' in text
    assert text.count('"Algorithm Name")="ichnode-default"') == len(LABELS)
    assert text.count('"Algorithm Version")="0.3.1"') == len(LABELS)
    assert "Completion Flag     : PARTIAL" in text
    assert "1 slice could not be used and was not scored" in text


# --------------------------------------------------------------------------
# SR content, read back from the file


def _read_sr(built: Built) -> hd.sr.Comprehensive3DSR:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(built.sr_path))


def test_sr_joins_the_study_in_a_new_series(built: Built) -> None:
    sr = _read_sr(built)
    source = built.headers[0]
    uids = report_uids(str(source.SeriesInstanceUID), 2, previous_versions=(1,))
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesInstanceUID == uids.sr_series_uid
    assert sr.SOPInstanceUID == uids.sr_sop_instance_uid
    assert sr.Modality == "SR"
    assert sr.SeriesDescription == "ICH AI results v2"
    assert sr.PatientID == source.PatientID
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.ContentDate == "20240517"
    # Version 2 names the SR of version 1 as its predecessor.
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert ((series.SeriesInstanceUID, series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID),) == uids.previous_srs


def test_sr_lists_every_slice_as_evidence(built: Built) -> None:
    sr = _read_sr(built)
    evidence = sr.get_evidence()
    assert {e[2] for e in evidence} == {str(ds.SOPInstanceUID) for ds in built.headers}
    assert {e[3] for e in evidence} == {CTImageStorage}
    assert {e[0] for e in evidence} == {str(built.headers[0].StudyInstanceUID)}


def test_sr_measurement_groups(built: Built) -> None:
    sr = _read_sr(built)
    groups = sr.content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [f"ICH {label}" for label in LABELS]
    key_uid = built.content.key_sop_instance_uid
    for group, finding in zip(groups, built.content.findings, strict=True):
        concept = FINDING_CODES[finding.label]
        assert group.finding_type == concept
        (evaluation,) = group.get_qualitative_evaluations(name=concept)
        assert evaluation.value.meaning == ("Present" if finding.present else "Absent")
        (measurement,) = group.get_measurements()
        assert measurement.name.value == "122157"
        assert measurement.value == pytest.approx(finding.probability)
        assert measurement.unit.value == "1"
        if UID(key_uid).is_valid:
            (image,) = group.source_images
            assert image.referenced_sop_instance_uid == key_uid
            assert image.referenced_sop_class_uid == CTImageStorage
        else:  # DCMTK refuses IMAGE items with such UIDs: evidence only
            assert group.source_images == []
    assert key_uid in {e[2] for e in sr.get_evidence()}
    names = [item.TextValue for item in _texts(sr, "111001")]
    versions = [item.TextValue for item in _texts(sr, "111003")]
    parameters = {item.TextValue for item in _texts(sr, "111002")}
    assert names == ["ichnode-default"] * len(LABELS)
    assert versions == ["0.3.1"] * len(LABELS)
    assert {"operating threshold 0.500000", DISCLAIMER} <= parameters


def _texts(sr: Dataset, code: str) -> list[Dataset]:
    found = []

    def walk(items: Dataset) -> None:
        for item in items:
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == code:
                found.append(item)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_sr_declares_the_private_coding_scheme(built: Built) -> None:
    sr = _read_sr(built)
    private = {c.scheme_designator for c in FINDING_CODES.values()} - {"SCT", "DCM"}
    declared = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert private <= declared


# --------------------------------------------------------------------------
# Summary image


def test_summary_image(built: Built) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc = pydicom.dcmread(built.sc_path)
    source = built.key
    uids = report_uids(str(source.SeriesInstanceUID), 2)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID == uids.sc_series_uid != source.SeriesInstanceUID
    assert sc.SeriesInstanceUID != uids.sr_series_uid
    assert sc.SOPInstanceUID == uids.sc_sop_instance_uid
    assert sc.SeriesDescription == "ICH AI summary v2"
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.BitsAllocated == 8
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    assert sc.BurnedInAnnotation == "NO"
    assert sc.ImageComments == DISCLAIMER
    pixels = sc.pixel_array
    assert pixels.dtype == np.uint8
    assert pixels.shape[1] == source.Columns and pixels.shape[0] > source.Rows
    # The image part is the key slice in the brain window (grey: R == G == B).
    image = pixels[: source.Rows]
    assert np.array_equal(image[..., 0], image[..., 1])
    hu = to_hu(source)
    assert np.all(image[..., 0][hu <= 0] == 0)
    assert np.all(image[..., 0][hu >= 80] == 255)
    # The panel below has text, red for the findings flagged present.
    panel = pixels[source.Rows :]
    assert panel.any()
    assert ((panel[..., 0] > 200) & (panel[..., 1] < 120)).any()


def test_summary_image_of_a_small_slice_is_scaled_up() -> None:
    key = _synthetic_ct("1.2.3.4.5.1")
    content = _content(str(key.SOPInstanceUID))
    uids = report_uids(str(key.SeriesInstanceUID), 1)
    hu = np.full((64, 48), 40.0)
    hu[0, 0] = np.nan
    sc = build_summary_image(key, hu, content, uids=uids)
    assert sc.Columns == 512 and sc.Rows > round(64 * 512 / 48)
    assert sc.PatientOrientation == ["L", "P"]


def test_reports_are_built_for_a_key_slice_carrying_a_deeply_nested_sequence() -> None:
    # 150 levels: readable by the receiver, but past what a copy can recurse into.
    key = _synthetic_ct("1.2.3.4.5.1")
    item = Dataset()
    item.TextValue = "innermost"
    for _ in range(150):
        outer = Dataset()
        outer.ContentSequence = [item]
        item = outer
    key.ContentSequence = item.ContentSequence
    content = _content(str(key.SOPInstanceUID))
    uids = report_uids(str(key.SeriesInstanceUID), 1)
    sc = build_summary_image(key, np.full((64, 64), 40.0), content, uids=uids)
    sr = build_sr([key], content, uids=uids)
    assert "ContentSequence" not in sc and sr.SOPInstanceUID == uids.sr_sop_instance_uid


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], ["L", "P"]),
        ([0.7071068, 0.7071068, 0, -0.7071068, 0.7071068, 0], ["LP", "RP"]),  # rotated 45 degrees in plane
        ([1, 0, 0, 0, 0.9396926, -0.3420201], ["L", "P"]),  # a gantry tilted 20 degrees
    ],
)
def test_summary_image_orientation_names_every_main_axis_of_the_slice(orientation: list, expected: list) -> None:
    key = _synthetic_ct("1.2.3.4.5.1")
    key.ImageOrientationPatient = orientation
    uids = report_uids(str(key.SeriesInstanceUID), 1)
    sc = build_summary_image(key, np.full((64, 64), 40.0), _content(str(key.SOPInstanceUID)), uids=uids)
    assert sc.PatientOrientation == expected


@pytest.mark.tools("dciodvfy")
@pytest.mark.filterwarnings("ignore:.*for VR CS")  # the source's free text, set below
def test_summary_image_of_a_lossy_source_with_free_text_headers_is_valid_and_says_lossy(tmp_path: Path) -> None:
    key = _synthetic_ct("1.2.3.4.5.1")
    key.BodyPartExamined = "Kopf/Schaedel nativ"  # free text where a Code String belongs
    key.SeriesNumber = 2**31 - 100  # + 2000 would pass what an Integer String holds
    key.LossyImageCompression, key.LossyImageCompressionRatio, key.LossyImageCompressionMethod = "01", 10, "ISO_10918_1"
    content = _content(str(key.SOPInstanceUID))
    sc = build_summary_image(key, np.full((64, 64), 40.0), content, uids=report_uids(str(key.SeriesInstanceUID), 1))
    assert (sc.BodyPartExamined, sc.SeriesNumber) == ("HEAD", 2000)
    assert (sc.LossyImageCompression, sc.LossyImageCompressionRatio, sc.LossyImageCompressionMethod) == (
        "01",
        10,
        "ISO_10918_1",
    )
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    assert [line for line in _dciodvfy(tmp_path / "sc.dcm") if line.startswith("Error")] == []
    key.BodyPartExamined = "head"
    again = build_summary_image(key, np.full((64, 64), 40.0), content, uids=report_uids(str(key.SeriesInstanceUID), 1))
    assert again.BodyPartExamined == "HEAD"


# --------------------------------------------------------------------------
# UIDs and resends


def test_report_uids_are_deterministic_per_version() -> None:
    series = "1.2.826.0.1.3680043.9.4245.3115138630835728997848661150714813892"
    first, again = report_uids(series, 1), report_uids(series, 1)
    second = report_uids(series, 2, previous_versions=(1,))
    assert first == again
    own = ("sr_series_uid", "sr_sop_instance_uid", "sc_series_uid", "sc_sop_instance_uid")
    values = [getattr(first, name) for name in own] + [getattr(second, name) for name in own]
    assert len(set(values)) == len(values)
    assert first.tracking_uids == second.tracking_uids  # the same findings, followed
    assert len(set(first.tracking_uids)) == len(LABELS)
    assert first.previous_srs == ()
    assert second.previous_srs == ((first.sr_series_uid, first.sr_sop_instance_uid),)
    # Only versions that had an SR are named: version 3 after a skipped version 2.
    third = report_uids(series, 3, previous_versions=(1,))
    assert third.previous_srs == second.previous_srs
    assert report_uids(series, 2).previous_srs == ()
    # Several: the SR the PACS holds, and one that may reach it meanwhile.
    assert report_uids(series, 3, previous_versions=(2, 1)).previous_srs == (
        (first.sr_series_uid, first.sr_sop_instance_uid),
        (second.sr_series_uid, second.sr_sop_instance_uid),
    )
    assert report_uids("ID_4d28912ba6", 1) != report_uids("ID_4d28912ba7", 1)
    rsna = report_uids("ID_4d28912ba6", 1)
    for uid in [*values, *first.tracking_uids, *rsna.tracking_uids, rsna.sr_series_uid]:
        assert UID(uid).is_valid, uid
    custom = report_uids(series, 1, prefix="1.2.3.")
    assert custom.sr_series_uid.startswith("1.2.3.")
    assert custom.sr_series_uid != first.sr_series_uid


def test_each_database_gives_the_reports_uids_of_its_own(tmp_path: Path) -> None:
    # Two nodes (a test and a production node, or one whose database was
    # made again) scoring one series must not give one UID to two reports: a
    # PACS keeps the first object under a UID and drops the other.
    from sqlalchemy import delete

    from ichnode import db

    series = "1.2.826.0.1.3680043.9.4245.3115138630835728997848661150714813892"
    installations = []
    for name in ("a", "b"):
        engine = db.make_engine(f"sqlite:///{tmp_path / name}.db")
        db.init_db(engine)
        db.init_db(engine)  # a restart keeps it
        installations.append(db.installation(db.session_factory(engine)))
        engine.dispose()
    a, b = (report_uids(series, 1, installation=i) for i in installations)
    assert all(installations) and a.sr_sop_instance_uid != b.sr_sop_instance_uid
    assert a == report_uids(series, 1, installation=installations[0])
    assert report_uids(series, 2, previous_versions=(1,), installation=installations[0]).previous_srs == (
        (a.sr_series_uid, a.sr_sop_instance_uid),
    )
    # A database made before there were installations keeps deriving the
    # UIDs it sent, so that its next version names the right predecessor.
    engine = db.make_engine(f"sqlite:///{tmp_path / 'a'}.db")
    with db.transaction(db.session_factory(engine)) as session:
        session.execute(delete(db.Meta).where(db.Meta.key == "installation"))
    db.init_db(engine)
    assert db.installation(db.session_factory(engine)) == ""
    engine.dispose()
    assert report_uids(series, 1, installation="") == report_uids(series, 1)


def _device_observer_uids(sr: Dataset) -> list[str]:
    found = []
    for item in sr.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == "121012":  # Device Observer UID
            found.append(str(item.UID))
        found += _device_observer_uids(item)
    return found


def test_each_installation_names_itself_another_device() -> None:
    from tests.pipeline_support import phantom

    key = phantom(3, n_slices=2).datasets[0]
    content = _content(str(key.SOPInstanceUID))
    devices = [
        _device_observer_uids(build_sr([key], content, uids=report_uids(key.SeriesInstanceUID, 1, installation=i)))
        for i in ("a", "b", "a")
    ]
    assert [len(d) for d in devices] == [1, 1, 1]
    assert devices[0] != devices[1] and devices[0] == devices[2]


@pytest.mark.parametrize(
    ("series", "version", "error"),
    [
        ("", 1, ValueError),
        ("1.2.3", 0, ValueError),
        ("1.2.3", True, TypeError),
        ("1.2.3", 1.0, TypeError),
    ],
)
def test_report_uids_rejects(series: str, version: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        report_uids(series, version)  # type: ignore[arg-type]


@pytest.mark.parametrize("previous", [2, 3, 0])
def test_report_uids_rejects_a_predecessor_that_is_not_earlier(previous: int) -> None:
    with pytest.raises(ValueError):
        report_uids("1.2.3", 2, previous_versions=(previous,))


def test_a_resend_is_the_same_object() -> None:
    paths, headers = _read_series("rsna-series")
    key = headers[3]
    content = _content(str(key.SOPInstanceUID))
    uids = report_uids(str(key.SeriesInstanceUID), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pydicom.dcmread(paths[3])
    hu = to_hu(full)

    def encode(report: Dataset) -> bytes:
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    for build in (
        lambda: build_sr(headers, content, uids=uids, content_datetime=WHEN),
        lambda: build_summary_image(full, hu, content, uids=uids, content_datetime=WHEN),
    ):
        assert encode(build()) == encode(build())


def test_sr_from_the_key_slice_and_uids_equals_sr_from_every_header(built: Built) -> None:
    # The worker reads only the key slice again; the others' UIDs come from its database
    # (the SOP Class UID as received: RSNA files carry it in the file meta only).
    slices = [
        (str(h.get("SOPClassUID") or h.file_meta.MediaStorageSOPClassUID), str(h.SOPInstanceUID))
        for h in built.headers
    ]
    uids = report_uids(str(built.key.SeriesInstanceUID), built.content.version, previous_versions=(1,))
    light = build_sr(evidence_headers(built.key, slices), built.content, uids=uids, content_datetime=WHEN)

    def encode(report: Dataset) -> bytes:
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    assert encode(light) == encode(built.sr)


# --------------------------------------------------------------------------
# RSNA quirks


def test_rsna_quirks_are_handled() -> None:
    paths, headers = _read_series("rsna-series")
    key = headers[0]
    assert "SOPClassUID" not in key and "PatientName" not in key
    content = _content(str(key.SOPInstanceUID))
    sr = build_sr(headers, content, uids=report_uids(str(key.SeriesInstanceUID), 1))
    # The invalid UIDs are passed through: the SR joins the source's study.
    assert sr.StudyInstanceUID == "ID_1f6d1e8aeb"
    assert ("ID_1f6d1e8aeb", "ID_4d28912ba6", str(key.SOPInstanceUID), CTImageStorage) in (
        sr.get_evidence()
    )
    # "ID_..." cannot be an IMAGE content item (DCMTK rejects the tree), so
    # the key slice is referenced from the evidence only.
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    assert all(g.source_images == [] for g in parsed.content.get_image_measurement_groups())
    # Type 2 attributes missing from the source are present and empty.
    assert sr.PatientName == "" or sr.PatientName is None
    assert "AccessionNumber" in sr and not sr.AccessionNumber
    assert sr.PatientID == "ID_52c1ab5a"
    # The caller's datasets are left alone.
    assert "SOPClassUID" not in key and "PatientName" not in key


# --------------------------------------------------------------------------
# Argument checks


def _synthetic_ct(sop_uid: str, series_uid: str = "1.2.3.4.2", **attributes: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = "1.2.3.4.1"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientID = "P1"
    ds.Rows, ds.Columns = 64, 48
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_build_sr_rejects_bad_arguments() -> None:
    a, b = _synthetic_ct("1.2.3.4.5.1"), _synthetic_ct("1.2.3.4.5.2")
    content = _content(a.SOPInstanceUID)
    uids = report_uids(a.SeriesInstanceUID, 1)
    with pytest.raises(ValueError, match="key_sop_instance_uid"):
        build_sr([b], content, uids=uids)
    with pytest.raises(ValueError, match="one series"):
        build_sr([a, _synthetic_ct("1.2.3.4.5.3", series_uid="1.2.3.4.9")], content, uids=uids)
    with pytest.raises(ValueError, match="version"):
        build_sr([a, b], content, uids=report_uids(a.SeriesInstanceUID, 2))
    with pytest.raises(ValueError, match="series"):
        build_sr([a, b], content, uids=report_uids("1.2.3.4.9", 1))
    with pytest.raises(ValueError, match="non-empty sequence"):
        build_sr([], content, uids=uids)
    no_class = _synthetic_ct("1.2.3.4.5.1")
    del no_class.SOPClassUID
    with pytest.raises(ValueError, match="SOPClassUID"):
        build_sr([no_class], content, uids=uids)
    with pytest.raises(TypeError, match="content"):
        build_sr([a], {"any": 0.5}, uids=uids)  # type: ignore[arg-type]
    # A minimal header is enough; series numbers follow the source's.
    sr = build_sr([a, b], content, uids=uids)
    assert sr.SeriesNumber == 1000 and sr.CompletionFlag == "COMPLETE"
    assert build_sr([a], content, uids=uids, series_number=77).SeriesNumber == 77


def _person_name_warnings() -> list[str]:
    """Building the reports of a slice whose patient name has one component:
    the warnings about that name."""
    key = _synthetic_ct("1.2.3.4.5.1", PatientName="ANONYMOUS")
    content = _content(key.SOPInstanceUID)
    uids = report_uids(key.SeriesInstanceUID, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", append=True)  # after the process's own filters
        sr = build_sr([key], content, uids=uids)
        sc = build_summary_image(key, np.zeros((64, 48)), content, uids=uids)
    assert sr.PatientName == sc.PatientName == "ANONYMOUS"
    return [str(w.message) for w in caught if "person name" in str(w.message)]


def test_helper_processes_build_reports_of_one_component_names_without_a_warning() -> None:
    # The reports copy the source's patient name; in the node's log a warning
    # about its form is nothing anyone could act on.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as plain:
        assert plain.submit(_person_name_warnings).result()  # highdicom's, for contrast
    with preparation.process_pool(1) as helpers:
        assert helpers.submit(_person_name_warnings).result() == []


def test_prime_builds_a_throwaway_report() -> None:
    # Helper processes call it at start and only log its failure: a broken
    # prime would otherwise go unnoticed until the first series after a start.
    prime()


def test_build_summary_image_rejects_bad_arguments() -> None:
    key = _synthetic_ct("1.2.3.4.5.1")
    content = _content(key.SOPInstanceUID)
    uids = report_uids(key.SeriesInstanceUID, 1)
    hu = np.zeros((64, 48))
    with pytest.raises(ValueError, match="key slice"):
        build_summary_image(_synthetic_ct("1.2.3.4.5.2"), hu, content, uids=uids)
    with pytest.raises(ValueError, match="2-D"):
        build_summary_image(key, np.zeros((2, 64, 48)), content, uids=uids)
    tilted = _synthetic_ct("1.2.3.4.5.1")
    del tilted.ImageOrientationPatient
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        build_summary_image(tilted, hu, content, uids=uids)


def test_each_finding_names_as_its_source_the_slice_it_was_seen_on(built: Built) -> None:
    from tests.pipeline_support import measurement_sources

    uids = [str(h.SOPInstanceUID) for h in built.headers]
    content = replace(
        built.content,
        findings=tuple(replace(f, source_sop_instance_uid=uids[i]) for i, f in enumerate(built.content.findings)),
    )
    sr = build_sr(built.headers, content, uids=report_uids(str(built.key.SeriesInstanceUID), 2, previous_versions=(1,)))
    valid = UID(uids[0]).is_valid  # RSNA's "ID_..." UIDs cannot be IMAGE items
    assert measurement_sources(sr) == {label: [uids[i]] if valid else [] for i, label in enumerate(LABELS)}
    # Without a source of its own, a finding's is the key slice.
    assert {tuple(v) for v in measurement_sources(built.sr).values()} == {(built.content.key_sop_instance_uid,) if valid else ()}


def test_summary_names_the_key_slice_by_its_instance_number() -> None:
    content = _content("1.2.3")
    assert _summary_rows(content, 14)[0][0] == ("ICH AI results v1 - key slice (image 14, highest 'any' score)",)
    assert _summary_rows(content, None)[0][0] == ("ICH AI results v1 - key slice (highest 'any' score)",)


def test_summary_numbers_never_contradict_the_flag_beside_them() -> None:
    # Near a threshold, rounding to three decimals must not show an absent
    # finding at its threshold, nor a present one below it.
    findings = {
        "any": Finding("any", 0.4996, False, 0.5),
        "epidural": Finding("epidural", 0.4556, True, 0.4555),
        "intraparenchymal": Finding("intraparenchymal", 0.4554, False, 0.4555),
    }
    content = replace(
        _content("1.2.3"),
        findings=tuple(findings.get(label, Finding(label, 0.1, False, 0.5)) for label in LABELS),
    )
    cells = {row[0]: row[1:] for row, _ in _summary_rows(content) if len(row) == 4}
    assert cells["any"] == ("0.499", "absent", "threshold 0.500")
    assert cells["epidural"] == ("0.456", "PRESENT", "threshold 0.456")
    assert cells["intraparenchymal"] == ("0.455", "absent", "threshold 0.456")
    assert shown_scores(0.5552, 0.55548, False) == ("0.554", "0.555")
    assert cells["subdural"] == ("0.100", "absent", "threshold 0.500")
    # Away from the threshold, plain rounding: the numbers `ichnode results` prints too.
    assert shown_scores(0.867203, 0.49237, True) == ("0.867", "0.492")
    assert shown_scores(0.001774, 0.24, False) == ("0.002", "0.240")


def test_summary_text_is_drawn_in_the_fonts_characters_and_within_the_panel() -> None:
    from PIL import ImageFont

    from ichnode.reports import _drawable, _wrap

    assert _drawable("Nur für Forschung, école – 研究") == "Nur fur Forschung, ecole ? ??"
    font = ImageFont.load_default(size=15)
    address = "https://example.org/" + "intended-use/" * 12
    lines = _wrap(f"See {address} first", font, 300)
    assert all(font.getlength(line) <= 300 for line in lines)
    assert "".join(lines).replace(" ", "") == f"See{address}first"


def test_content_checks() -> None:
    good = _content("1.2.3")
    with pytest.raises(ValueError, match="order"):
        replace(good, findings=tuple(reversed(good.findings)))
    with pytest.raises(ValueError, match="probability"):
        Finding("any", 1.5, True, 0.5)
    with pytest.raises(ValueError, match="label"):
        Finding("hemorrhage", 0.5, True, 0.5)
    with pytest.raises(TypeError, match="present"):
        Finding("any", 0.5, "yes", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quarantined_count"):
        replace(good, quarantined_count=-1)
    with pytest.raises(ValueError, match="version"):
        replace(good, version=0)
    assert good.finding("subdural").probability == PROBABILITIES[-1]


@pytest.mark.parametrize("charset_file", ["chrH31.dcm", "chrH32.dcm", "chrI2.dcm", "chrX2.dcm", "chrRuss.dcm"])
def test_reports_of_every_character_set_pydicom_reads(tmp_path: Path, charset_file: str) -> None:
    # Japanese and Korean sources use code extensions (an empty first value,
    # as PS3.5's own examples write it): the reports keep the patient's name.
    (path,) = get_charset_files(charset_file)
    names = pydicom.dcmread(path)
    source = _synthetic_ct("1.2.3.4.5.1", SpecificCharacterSet=names.SpecificCharacterSet)
    source.PatientName = names.PatientName
    _assert_reports_keep(source, tmp_path, PatientName=str(names.PatientName))


@pytest.mark.parametrize("charset", ["", "ISO_IR 6", "ISO 2022 IR 100", ["ISO_IR 100", "ISO_IR 144"]])
def test_reports_of_a_source_with_a_malformed_character_set(tmp_path: Path, charset: object) -> None:
    source = _synthetic_ct("1.2.3.4.5.1", SpecificCharacterSet=charset, PatientName="Buc^Jerome")
    _assert_reports_keep(source, tmp_path, PatientName="Buc^Jerome")


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the source's, on purpose
def test_reports_of_a_source_with_values_written_by_hand(tmp_path: Path) -> None:
    # What RIS entry and old modalities write: the value in its standard
    # form where there is one, else empty; the reports are built either way.
    source = _synthetic_ct(
        "1.2.3.4.5.1", PatientSex="m", PatientBirthDate="1970", StudyDate="2015-02-06", StudyTime="09:34:25"
    )
    _assert_reports_keep(source, tmp_path, PatientSex="M", PatientBirthDate="", StudyDate="20150206", StudyTime="093425")
    source = _synthetic_ct("1.2.3.4.5.1", PatientSex="Male", PatientBirthDate="19700230", StudyDate="06/02/15")
    _assert_reports_keep(source, tmp_path, PatientSex="", PatientBirthDate="", StudyDate="")


def _assert_reports_keep(source: Dataset, tmp_path: Path, **expected: str) -> None:
    """Build both reports of ``source``, write and read them back, and check
    the ``expected`` values of the Patient and Study modules."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, source, implicit_vr=False, little_endian=True)
    source = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
    content, uids = _content(source.SOPInstanceUID), report_uids(source.SeriesInstanceUID, 1)
    for name, report in (
        ("sr", build_sr([source], content, uids=uids)),
        ("sc", build_summary_image(source, np.zeros((64, 48)), content, uids=uids)),
    ):
        path = tmp_path / f"{name}.dcm"
        report.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert {keyword: str(back.get(keyword, "")) for keyword in expected} == expected, name


def test_character_set(tmp_path: Path) -> None:
    # A Latin-1 source: its character set is kept for ASCII text of our own,
    # and UTF-8 is used (patient attributes re-encoded) for any other.
    source = _synthetic_ct("1.2.3.4.5.1", SpecificCharacterSet="ISO_IR 100")
    source.PatientName = "Müller^Jürgen"
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, source, implicit_vr=False, little_endian=True)
    source = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
    uids = report_uids(source.SeriesInstanceUID, 1)
    hu = np.zeros((64, 48))
    cases = (("Not for clinical use", "ISO_IR 100"), ("Nur für Forschung – ✓", "ISO_IR 192"))
    for disclaimer, charset in cases:
        content = replace(_content(source.SOPInstanceUID), disclaimer=disclaimer)
        for name, report in (
            ("sr", build_sr([source], content, uids=uids)),
            ("sc", build_summary_image(source, hu, content, uids=uids)),
        ):
            path = tmp_path / f"{name}.dcm"
            report.save_as(path, enforce_file_format=True)
            back = pydicom.dcmread(path)
            assert back.SpecificCharacterSet == charset
            assert str(back.PatientName) == "Müller^Jürgen"
        assert back.ImageComments == disclaimer
