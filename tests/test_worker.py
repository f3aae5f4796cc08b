"""The worker inside a whole node: which series are scored, what is stored, versions, recovery.

Each test runs an in-process node (receiver, worker, dispatcher) on free
localhost ports with the bundled model (loaded once per process), sends real
series by C-STORE and reads what the worker wrote to the database and spool.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import multiprocessing
import logging
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from ichnode import db, imaging, preparation
from ichnode import worker as worker_module
from ichnode.config import LABELS
from ichnode.model import HemorrhageModel, aggregate_series
from ichnode.results import format_show, list_results, show_results
from ichnode.retention import purge_expired
from ichnode.spool import safe_name
from ichnode.worker import Worker, requeue_interrupted
from tests.conftest import require_data, store_files, wait_series_state
from tests.pipeline_support import (
    PIPELINE_WARNINGS,
    Nodes,
    instances_of,
    measurement_sources,
    phantom,
    results_of,
    shared_model,
    wait_deliveries,
    wait_result,
    z_order,
)

pytestmark = PIPELINE_WARNINGS


# A destination nothing listens at: reports are built and queued, never sent.
UNREACHED = {"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 9}]}


def _uid(ds: pydicom.Dataset, keyword: str = "SeriesInstanceUID") -> str:
    return str(ds[keyword].value)


def _spooled_reports(node, study_uid: str) -> dict[str, pydicom.Dataset]:
    """The report objects the worker spooled for a study, by SOP Instance UID."""
    folder = node.spool.reports_dir / safe_name(study_uid)
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm")))}


def test_a_whole_philips_exam_is_triaged_series_by_series(nodes: Nodes) -> None:
    exam = require_data("philips-phantom")
    # Every image of the exam as a scanner sends it; DIRFILE is a directory record.
    files = sorted(p for p in exam.rglob("I*") if p.is_file())
    by_folder: dict[str, str] = {}
    counts: dict[str, int] = {}
    for path in files:
        by_folder.setdefault(path.parent.name, _uid(pydicom.dcmread(path, stop_before_pixels=True)))
        counts[path.parent.name] = counts.get(path.parent.name, 0) + 1
    assert counts == {"S1000": 1, "S2010": 54, "S3010": 58, "S4010": 5}

    node = nodes.start()
    assert store_files(node.port, files, calling_ae="PHILIPS_CT") == [0x0000] * len(files)
    results = {name: wait_result(node.sessions, uid, instances=counts[name]) for name, uid in by_folder.items()}

    scout = results["S1000"]
    assert scout.status == db.SKIPPED
    assert "localizer" in scout.skip_reason.lower()
    captures = results["S4010"]
    assert captures.status == db.SKIPPED
    assert "Secondary Capture" in captures.skip_reason and "not CT Image Storage" in captures.skip_reason
    # Both axial series are tilted (-18.5 and +16.5 degrees) and still scored whole.
    for name, count in (("S2010", 54), ("S3010", 58)):
        result = results[name]
        assert result.status == db.SCORED, (name, result.skip_reason)
        assert result.slice_count == count and result.quarantined_count == 0
        assert len(result.slices) == count
    for result in (scout, captures):
        assert result.scores is None and result.slice_count == 0


def test_ge_series_is_scored_slice_by_slice_with_thresholds_from_card_and_config(nodes: Nodes) -> None:
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert len(files) == 28
    series_uid = _uid(headers[0])
    card = shared_model().card
    override = {"any": 0.0, "subdural": 1.0}

    node = nodes.start(model={"thresholds": override}, reports=UNREACHED)
    assert store_files(node.port, files) == [0x0000] * 28
    result = wait_result(node.sessions, series_uid, instances=28)

    assert result.status == db.SCORED and result.version == 1 and not result.superseded
    assert result.slice_count == 28 and result.quarantined_count == 0
    assert (result.model_name, result.model_version) == (card.name, card.version)

    # One SliceResult per slice, positions 0..27 in z order, six scores each.
    slices = sorted(result.slices, key=lambda s: s.position)
    assert [s.position for s in slices] == list(range(28))
    assert [s.sop_instance_uid for s in slices] == z_order(headers)
    probs = np.array([[s.scores[label] for label in LABELS] for s in slices])
    assert probs.shape == (28, 6) and ((probs >= 0) & (probs <= 1)).all()

    # The series scores come from the slice scores as the card says; the key
    # slice is the one most likely to show a hemorrhage.
    expected_scores = aggregate_series(probs, card.series_aggregation)
    assert list(result.scores) == list(LABELS)
    assert [result.scores[label] for label in LABELS] == pytest.approx(expected_scores.tolist(), abs=1e-6)
    assert result.key_sop_instance_uid == slices[int(np.argmax(probs[:, 0]))].sop_instance_uid

    # Flags: the card's thresholds, overridden label by label by model.thresholds.
    thresholds = {**card.thresholds, **override}
    assert result.thresholds == thresholds
    assert result.flags == {label: result.scores[label] >= thresholds[label] for label in LABELS}
    assert result.flags["any"] is True  # threshold 0 from the configuration
    assert result.flags["subdural"] is (result.scores["subdural"] >= 1.0)

    # The reports were written for this version and carry the same algorithm.
    reports = _spooled_reports(node, _uid(headers[0], "StudyInstanceUID"))
    assert len(reports) == 2
    assert {str(ds.SeriesDescription) for ds in reports.values()} == {"ICH AI results v1", "ICH AI summary v1"}


def test_too_few_slices_are_skipped_with_the_reason(nodes: Nodes) -> None:
    series = phantom(21, n_slices=6)
    node = nodes.start()
    assert store_files(node.port, series.datasets) == [0x0000] * 6
    result = wait_result(node.sessions, _uid(series.datasets[0]), instances=6)
    assert result.status == db.SKIPPED
    assert result.skip_reason == "6 slices, fewer than series.min_slices (10)"
    assert result.slices == [] and result.deliveries == [] and result.scores is None
    assert _spooled_reports(node, _uid(series.datasets[0], "StudyInstanceUID")) == {}


def test_a_chest_series_is_not_scored(nodes: Nodes) -> None:
    # The phantom's study is described "CT HEAD WO CONTRAST"; BodyPartExamined
    # says what this series shows.
    series = phantom(22)
    for ds in series.datasets:
        ds.BodyPartExamined = "CHEST"
    node = nodes.start()
    assert store_files(node.port, series.datasets) == [0x0000] * len(series.datasets)
    result = wait_result(node.sessions, _uid(series.datasets[0]), instances=len(series.datasets))
    assert result.status == db.SKIPPED
    assert "not a head series" in result.skip_reason and "CHEST" in result.skip_reason
    assert result.slices == []


def _with_a_truncated_slice(datasets: list[pydicom.Dataset], index: int) -> list[pydicom.Dataset]:
    """Copies of ``datasets`` where slice ``index`` has a valid header but pixel
    data that stops halfway (a truncated transfer)."""
    datasets = [copy.deepcopy(ds) for ds in datasets]
    bad = datasets[index]
    half = len(bad.PixelData) // 2
    bad.PixelData = bad.PixelData[: half - half % 2]
    return datasets


def test_a_corrupt_slice_is_quarantined_and_the_rest_scored(nodes: Nodes) -> None:
    series = phantom(23, n_slices=14)
    datasets = _with_a_truncated_slice(series.datasets, 5)
    bad = datasets[5]
    bad_uid = _uid(bad, "SOPInstanceUID")
    series_uid = _uid(bad)

    node = nodes.start(reports=UNREACHED)
    # The receiver does not decode pixels: every image is acknowledged.
    assert store_files(node.port, datasets) == [0x0000] * 14
    result = wait_result(node.sessions, series_uid, instances=14)

    assert result.status == db.SCORED
    assert (result.slice_count, result.quarantined_count) == (13, 1)
    assert bad_uid not in {s.sop_instance_uid for s in result.slices}
    reasons = {row.sop_instance_uid: row.quarantine_reason for row in instances_of(node.sessions, series_uid)}
    assert reasons.pop(bad_uid).startswith("cannot decode pixels")
    assert set(reasons.values()) == {None}

    reports = _spooled_reports(node, _uid(bad, "StudyInstanceUID"))
    (sr,) = [ds for ds in reports.values() if ds.SOPClassUID == Comprehensive3DSRStorage]
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.CompletionFlagDescription == "1 slice could not be used and was not scored"
    # What an administrator reads: which image, and why.
    with node.sessions() as session:
        (shown,) = show_results(session, series_uid)
    (left_out,) = shown["quarantined"]
    assert (left_out["sop_instance_uid"], left_out["instance_number"]) == (bad_uid, int(bad.InstanceNumber))
    assert left_out["reason"].startswith("cannot decode pixels")
    table = format_show([shown], "table")
    assert bad_uid in table and "cannot decode pixels" in table
    (row,) = [r for r in csv.DictReader(io.StringIO(format_show([shown], "csv"))) if r["level"] == "quarantined"]
    assert row["sop_instance_uid"] == bad_uid and row["quarantine_reason"].startswith("cannot decode pixels")


def test_too_few_decodable_slices_are_skipped_with_the_reason(nodes: Nodes) -> None:
    # 12 slices received, 3 of them undecodable: fewer than series.min_slices (10) left.
    series = phantom(58, n_slices=12)
    datasets = series.datasets
    for index in (2, 5, 8):
        datasets = _with_a_truncated_slice(datasets, index)
    series_uid = _uid(datasets[0])
    node = nodes.start()
    assert store_files(node.port, datasets) == [0x0000] * 12
    result = wait_result(node.sessions, series_uid, instances=12)
    assert result.status == db.SKIPPED
    assert result.skip_reason == "9 slices could be decoded, fewer than series.min_slices (10)"
    assert result.quarantined_count == 3
    reasons = [row.quarantine_reason for row in instances_of(node.sessions, series_uid)]
    assert sum(1 for reason in reasons if reason and reason.startswith("cannot decode pixels")) == 3


@pytest.mark.parametrize("stray", ["localizer", "reformat"])
def test_an_image_filed_in_the_series_that_is_not_one_of_its_slices_is_left_out(nodes: Nodes, stray: str) -> None:
    series = phantom(57, n_slices=14)
    datasets = [copy.deepcopy(ds) for ds in series.datasets]
    odd = datasets[7]
    if stray == "localizer":
        odd.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        why = "ImageType ORIGINAL\\PRIMARY\\LOCALIZER is a localizer (scout)"
    else:  # the same slice, reformatted 30 degrees off the others
        odd.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(np.pi / 6)), float(np.sin(np.pi / 6))]
        why = "oriented 30 degrees from the series' other slices"
    series_uid = _uid(odd)
    node = nodes.start()
    assert store_files(node.port, datasets) == [0x0000] * 14
    result = wait_result(node.sessions, series_uid, instances=14)
    assert (result.status, result.slice_count, result.quarantined_count) == (db.SCORED, 13, 1)
    assert _uid(odd, "SOPInstanceUID") not in {s.sop_instance_uid for s in result.slices}
    reasons = {row.sop_instance_uid: row.quarantine_reason for row in instances_of(node.sessions, series_uid)}
    assert reasons.pop(_uid(odd, "SOPInstanceUID")) == f"not a slice of the series' volume: {why}"
    assert set(reasons.values()) == {None}


def test_late_slices_make_a_new_version_that_supersedes_the_old(nodes: Nodes, recorder) -> None:
    pacs = recorder()
    series = phantom(24, n_slices=14)
    series_uid = _uid(series.datasets[0])
    first, late = series.datasets[:12], series.datasets[12:]

    node = nodes.start(reports={"destinations": [pacs.destination]})
    assert store_files(node.port, first) == [0x0000] * 12
    v1 = wait_result(node.sessions, series_uid, instances=12)
    assert v1.version == 1
    assert v1.status == db.SCORED and v1.slice_count == 12
    wait_deliveries(node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 2, message="v1 delivered")

    assert store_files(node.port, late) == [0x0000] * 2
    v2 = wait_result(node.sessions, series_uid, instances=14)
    assert v2.version == 2
    assert v2.status == db.SCORED and v2.slice_count == 14
    rows = wait_deliveries(
        node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 4, message="v1 and v2 delivered"
    )

    old, new = results_of(node.sessions, series_uid)
    assert (old.version, old.superseded) == (1, True)
    assert (new.version, new.superseded) == (2, False)
    v1_uids = {d.sop_instance_uid for d in rows if d.result_id == old.id}
    v2_uids = {d.sop_instance_uid for d in rows if d.result_id == new.id}
    assert len(v1_uids) == len(v2_uids) == 2 and not v1_uids & v2_uids
    assert pacs.stored_counts() == {uid: 1 for uid in v1_uids | v2_uids}

    received = {r.sop_instance_uid: r.dataset for r in pacs.stored()}
    (sr1,) = [received[u] for u in v1_uids if received[u].SOPClassUID == Comprehensive3DSRStorage]
    (sr2,) = [received[u] for u in v2_uids if received[u].SOPClassUID == Comprehensive3DSRStorage]
    assert sr1.SeriesDescription == "ICH AI results v1" and sr2.SeriesDescription == "ICH AI results v2"
    assert sr2.SeriesInstanceUID != sr1.SeriesInstanceUID
    # Version 2 names version 1 as its predecessor.
    predecessors = {
        str(sop.ReferencedSOPInstanceUID)
        for study in sr2.PredecessorDocumentsSequence
        for series_item in study.ReferencedSeriesSequence
        for sop in series_item.ReferencedSOPSequence
    }
    assert predecessors == {str(sr1.SOPInstanceUID)}


def test_the_sr_sends_a_viewer_to_the_slice_each_label_scored_highest_on(nodes: Nodes) -> None:
    series = phantom(62, n_slices=16, hemorrhage=("subdural", "intraparenchymal"))
    series_uid = _uid(series.datasets[0])
    node = nodes.start(reports=UNREACHED)
    assert store_files(node.port, series.datasets) == [0x0000] * 16
    result = wait_result(node.sessions, series_uid, instances=16)
    top = {
        label: max(result.slices, key=lambda s: s.scores[label]).sop_instance_uid for label in LABELS
    }
    assert top["any"] == result.key_sop_instance_uid
    (sr,) = [
        ds
        for ds in _spooled_reports(node, _uid(series.datasets[0], "StudyInstanceUID")).values()
        if ds.SOPClassUID == Comprehensive3DSRStorage
    ]
    assert measurement_sources(sr) == {label: [top[label]] for label in LABELS}
    assert len(set(top.values())) > 1  # not all the key slice


def test_images_arriving_after_retention_do_not_replace_the_full_series_result(nodes: Nodes) -> None:
    series = phantom(24, n_slices=14)
    series_uid = _uid(series.datasets[0])
    node = nodes.start(reports={"destinations": []})
    assert store_files(node.port, series.datasets[:12]) == [0x0000] * 12
    v1 = wait_result(node.sessions, series_uid, instances=12)
    assert v1.status == db.SCORED and v1.flags["subdural"]
    later = db.utcnow() + dt.timedelta(days=30)
    assert purge_expired(node.sessions, node.spool, 7, now=later) == 12

    # A late slice: too few to score alone, and no judge of the whole series.
    assert store_files(node.port, series.datasets[12:13]) == [0x0000]
    v2 = wait_result(node.sessions, series_uid, version=2)
    assert (v2.status, v2.superseded) == (db.SKIPPED, True)
    with node.sessions() as session:
        (row,) = list_results(session, positive=True)
    assert (row["series_uid"], row["version"], row["status"]) == (series_uid, 1, db.SCORED)
    assert row["scores"] == v1.scores

    # Sent again in full, the series is scored again as a whole and that result replaces the first.
    assert store_files(node.port, series.datasets) == [0x0000] * 14
    v3 = wait_result(node.sessions, series_uid, version=3)
    assert (v3.status, v3.slice_count, v3.superseded) == (db.SCORED, 14, False)
    with node.sessions() as session:
        (row,) = list_results(session)
    assert (row["version"], row["slices_scored"]) == (3, 14)
    assert [r.superseded for r in results_of(node.sessions, series_uid)] == [True, True, False]

    # So too when a gateway sends it again whole under new SOP Instance UIDs.
    assert purge_expired(node.sessions, node.spool, 7, now=later) == 14
    renamed = []
    for ds in series.datasets:
        ds = copy.deepcopy(ds)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        renamed.append(ds)
    assert store_files(node.port, renamed) == [0x0000] * 14
    v4 = wait_result(node.sessions, series_uid, version=4)
    assert (v4.status, v4.slice_count, v4.superseded) == (db.SCORED, 14, False)


def test_a_slice_sent_again_under_a_new_uid_replaces_the_old_copy_and_nothing_is_missing(nodes: Nodes) -> None:
    series = phantom(56, n_slices=12)
    series_uid, study_uid = _uid(series.datasets[0]), _uid(series.datasets[0], "StudyInstanceUID")
    node = nodes.start(reports=UNREACHED)
    assert store_files(node.port, series.datasets) == [0x0000] * 12
    wait_result(node.sessions, series_uid, instances=12)
    again = copy.deepcopy(series.datasets[4])
    again.SOPInstanceUID = pydicom.uid.generate_uid()
    assert store_files(node.port, [again]) == [0x0000]
    v2 = wait_result(node.sessions, series_uid, instances=13, version=2)
    assert (v2.status, v2.slice_count, v2.quarantined_count) == (db.SCORED, 12, 0)
    (old,) = [i for i in instances_of(node.sessions, series_uid) if i.quarantine_reason]
    assert old.sop_instance_uid == series.datasets[4].SOPInstanceUID and "used instead" in old.quarantine_reason
    (sr,) = [
        ds
        for ds in _spooled_reports(node, study_uid).values()
        if ds.SOPClassUID == Comprehensive3DSRStorage and ds.SeriesDescription == "ICH AI results v2"
    ]
    assert sr.CompletionFlag == "COMPLETE"
    # A third version (one slice more) still counts nothing missing.
    extra = copy.deepcopy(series.datasets[11])
    extra.SOPInstanceUID = pydicom.uid.generate_uid()
    extra.ImagePositionPatient = [float(v) for v in extra.ImagePositionPatient[:2]] + [
        float(extra.ImagePositionPatient[2]) + 5.0
    ]
    assert store_files(node.port, [extra]) == [0x0000]
    v3 = wait_result(node.sessions, series_uid, instances=14, version=3)
    assert (v3.slice_count, v3.quarantined_count) == (13, 0)


def test_reports_of_its_own_sent_back_by_the_pacs_are_acknowledged_not_stored(nodes: Nodes) -> None:
    # A PACS that forwards all it stores, or a study sent again whole, brings
    # the node's own SR and summary back: they are no series to list as skipped.
    series = phantom(71, n_slices=12)
    series_uid, study_uid = _uid(series.datasets[0]), _uid(series.datasets[0], "StudyInstanceUID")
    node = nodes.start(reports=UNREACHED)
    assert store_files(node.port, series.datasets) == [0x0000] * 12
    wait_result(node.sessions, series_uid, instances=12)
    own = list(_spooled_reports(node, study_uid).values())
    assert len(own) == 2
    assert store_files(node.port, own) == [0x0000] * 2
    with node.sessions() as session:
        assert [row["series_uid"] for row in list_results(session)] == [series_uid]
    # Another's SR is stored as any image is.
    other = copy.deepcopy(own[0])
    other.SOPInstanceUID, other.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    assert store_files(node.port, [other]) == [0x0000]
    with node.sessions() as session:
        assert len(list_results(session)) == 2


def test_a_new_version_still_counts_the_slices_quarantined_before(nodes: Nodes) -> None:
    series = phantom(53, n_slices=14)
    datasets = _with_a_truncated_slice(series.datasets, 5)
    series_uid = _uid(datasets[0])
    node = nodes.start(reports=UNREACHED)
    assert store_files(node.port, datasets[:12]) == [0x0000] * 12
    v1 = wait_result(node.sessions, series_uid, instances=12)
    assert (v1.slice_count, v1.quarantined_count) == (11, 1)

    # The bad slice is not read again, and it is still not scored.
    assert store_files(node.port, datasets[12:]) == [0x0000] * 2
    v2 = wait_result(node.sessions, series_uid, instances=14, version=2)
    assert (v2.status, v2.slice_count, v2.quarantined_count) == (db.SCORED, 13, 1)
    (sr,) = [
        ds
        for ds in _spooled_reports(node, _uid(datasets[0], "StudyInstanceUID")).values()
        if ds.SOPClassUID == Comprehensive3DSRStorage and ds.SeriesDescription == "ICH AI results v2"
    ]
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.CompletionFlagDescription == "1 slice could not be used and was not scored"


def test_a_new_version_names_as_predecessor_only_an_sr_that_was_sent(nodes: Nodes, recorder) -> None:
    pacs = recorder()
    series = phantom(54, n_slices=14)
    series_uid = _uid(series.datasets[0])
    node = nodes.start(series={"min_slices": 13}, reports={"destinations": [pacs.destination]})
    # Version 1 (12 slices) is skipped: it has no SR for version 2 to replace.
    assert store_files(node.port, series.datasets[:12]) == [0x0000] * 12
    v1 = wait_result(node.sessions, series_uid, instances=12)
    assert v1.status == db.SKIPPED
    assert store_files(node.port, series.datasets[12:]) == [0x0000] * 2
    v2 = wait_result(node.sessions, series_uid, instances=14, version=2)
    assert v2.status == db.SCORED
    wait_deliveries(node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 2, message="v2 delivered")
    (sr,) = [r.dataset for r in pacs.stored() if r.sop_class_uid == Comprehensive3DSRStorage]
    assert sr.SeriesDescription == "ICH AI results v2"
    assert "PredecessorDocumentsSequence" not in sr


def test_a_new_version_names_as_predecessor_an_sr_still_on_its_way(nodes: Nodes) -> None:
    # Version 1's SR is queued while version 2 is scored: it may reach the PACS meanwhile.
    series = phantom(55, n_slices=14)
    series_uid, study_uid = _uid(series.datasets[0]), _uid(series.datasets[0], "StudyInstanceUID")
    node = nodes.start(reports=UNREACHED)
    assert store_files(node.port, series.datasets[:12]) == [0x0000] * 12
    wait_result(node.sessions, series_uid, instances=12)
    assert store_files(node.port, series.datasets[12:]) == [0x0000] * 2
    wait_result(node.sessions, series_uid, instances=14, version=2)
    srs = {
        ds.SeriesDescription: ds
        for ds in _spooled_reports(node, study_uid).values()
        if ds.SOPClassUID == Comprehensive3DSRStorage
    }
    (study,) = srs["ICH AI results v2"].PredecessorDocumentsSequence
    (named,) = [sop.ReferencedSOPInstanceUID for item in study.ReferencedSeriesSequence for sop in item.ReferencedSOPSequence]
    assert named == srs["ICH AI results v1"].SOPInstanceUID


def _predecessors_named(sr: pydicom.Dataset) -> list[str]:
    (study,) = sr.PredecessorDocumentsSequence
    return sorted(str(s.ReferencedSOPInstanceUID) for i in study.ReferencedSeriesSequence for s in i.ReferencedSOPSequence)


def test_a_new_version_names_the_sr_the_pacs_holds_and_one_still_on_its_way(nodes: Nodes, recorder) -> None:
    pacs = recorder()
    series = phantom(57, n_slices=16)
    series_uid, study_uid = _uid(series.datasets[0]), _uid(series.datasets[0], "StudyInstanceUID")
    node = nodes.start(reports={"destinations": [pacs.destination], "retry": {"first_delay_s": 60}})
    assert store_files(node.port, series.datasets[:12]) == [0x0000] * 12
    wait_result(node.sessions, series_uid, instances=12)
    wait_deliveries(node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 2, message="v1 delivered")
    pacs.status = 0xA700  # the PACS refuses for now: version 2's reports wait to be tried again
    assert store_files(node.port, series.datasets[12:14]) == [0x0000] * 2
    wait_result(node.sessions, series_uid, instances=14, version=2)
    wait_deliveries(node.sessions, lambda rows: any(r.attempts for r in rows if r.state == db.QUEUED), message="v2 refused")
    assert store_files(node.port, series.datasets[14:]) == [0x0000] * 2
    wait_result(node.sessions, series_uid, instances=16, version=3)
    srs = {
        ds.SeriesDescription: ds
        for ds in _spooled_reports(node, study_uid).values()
        if ds.SOPClassUID == Comprehensive3DSRStorage
    }
    # Version 1's SR is at the PACS; version 2's might have reached it meanwhile.
    v1, v2 = (str(srs[f"ICH AI results v{v}"].SOPInstanceUID) for v in (1, 2))
    assert _predecessors_named(srs["ICH AI results v3"]) == sorted([v1, v2])


@pytest.mark.parametrize("outcome", ["failed", "skipped"])
@pytest.mark.parametrize("newer", ["in flight", "recorded"])
def test_a_stale_version_recorded_late_leaves_the_newer_one_alone(nodes: Nodes, outcome: str, newer: str) -> None:
    # Version 1 is claimed; late slices make version 2, claimed too. Version
    # 1's outcome is recorded while version 2 is in flight, or once version 2
    # is scored and its reports queued.
    series = phantom(55, n_slices=14)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(
        nodes,
        SimpleNamespace(datasets=series.datasets[:12]),
        reports=UNREACHED,
    )
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())

    def record_stale() -> None:
        # Version 1 found a slice bad; it has been sent again since (version 2).
        stale.prepared.quarantined[instances_of(receiver.sessions, series_uid)[5].id] = "cannot decode pixels"
        if outcome == "failed":
            worker._fail(stale, "preparing failed: it took too long")
        else:
            worker._finish(stale, status=db.SKIPPED, skip_reason="too few slices")

    try:
        (stale,) = worker.claim()
        assert store_files(receiver.port, series.datasets[12:]) == [0x0000] * 2
        wait_series_state(receiver, series_uid, db.COMPLETE, version=2)
        if newer == "in flight":
            assert len(worker.claim()) == 1
            record_stale()
            wait_series_state(receiver, series_uid, db.PROCESSING, version=2)
            assert requeue_interrupted(receiver.sessions) == 1  # as a restart would
        assert worker.run_once() == 1
        if newer == "recorded":
            record_stale()
    finally:
        worker.close()
    wait_series_state(receiver, series_uid, db.SCORED, version=2)
    old, new = sorted(results_of(receiver.sessions, series_uid), key=lambda result: result.version)
    assert (old.version, old.status, old.superseded) == (1, outcome, True)
    assert (new.version, new.status, new.superseded) == (2, db.SCORED, False)
    assert (new.slice_count, new.quarantined_count) == (14, 0)
    assert [d.state for d in new.deliveries] == [db.QUEUED] * 2
    assert {row.quarantine_reason for row in instances_of(receiver.sessions, series_uid)} == {None}


def test_the_reports_of_a_stale_result_are_removed(nodes: Nodes) -> None:
    # Version 1 is scored while late slices make version 2: its reports are
    # never queued, so nothing would send or remove them.
    series = phantom(65, n_slices=14)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, SimpleNamespace(datasets=series.datasets[:12]), reports=UNREACHED)
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    try:
        (stale,) = worker.claim()
        assert store_files(receiver.port, series.datasets[12:]) == [0x0000] * 2
        report = receiver.spool.report_path(stale.study_uid, "1.2.3.4")
        receiver.spool.absolute(report).parent.mkdir(parents=True)
        receiver.spool.absolute(report).write_bytes(b"an SR of version 1")
        worker._finish(stale, status=db.SCORED, reports=[("sr", "1.2.3.4", report)], targets=[("PACS", "h", 104)])
    finally:
        worker.close()
    (old,) = results_of(receiver.sessions, series_uid)
    assert (old.version, old.superseded, old.deliveries) == (1, True, [])
    assert not receiver.spool.absolute(report).exists()


def test_the_log_says_a_result_superseded_while_it_was_scored_is_not_reported(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    series = phantom(66, n_slices=14, hemorrhage=("subdural",))
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, SimpleNamespace(datasets=series.datasets[:12]), reports=UNREACHED)
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    store = worker._store

    def late_slices_arrive_first(item: Any, scored: Any) -> None:
        assert store_files(receiver.port, series.datasets[12:]) == [0x0000] * 2
        store(item, scored)

    worker._store = late_slices_arrive_first
    caplog.set_level(logging.INFO, logger="ichnode.worker")
    try:
        assert worker.run_once() == 1
    finally:
        worker.close()
    (old,) = results_of(receiver.sessions, series_uid)
    assert (old.version, old.superseded, old.deliveries) == (1, True, [])
    (line,) = [r.getMessage() for r in caplog.records if f"series {series_uid} scored" in r.getMessage()]
    assert "version 1" in line and line.endswith("superseded at once, not reported")


@pytest.mark.parametrize("failing", [("_finish",), ("_finish", "_fail")])
def test_an_outcome_the_database_refuses_is_scored_again_next_round(nodes: Nodes, failing: tuple[str, ...]) -> None:
    # A database locked past its timeout, or a connection a restart left stale,
    # is not the series' fault: it must not end failed, its scores lost.
    from sqlalchemy.exc import OperationalError

    series = phantom(56)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, series)
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    finish, fail = worker._finish, worker._fail

    def locked(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("UPDATE series", {}, Exception("database is locked"))

    for name in failing:
        setattr(worker, name, locked)
    try:
        assert worker.run_once() == 1  # nothing escapes the round
        assert results_of(receiver.sessions, series_uid) == []
        wait_series_state(receiver, series_uid, db.PROCESSING)
        worker._finish, worker._fail = finish, fail
        assert worker.run_once() == 1
    finally:
        worker.close()
    (result,) = results_of(receiver.sessions, series_uid)
    assert (result.version, result.status, result.slice_count) == (1, db.SCORED, len(series.datasets))


def test_an_outcome_the_database_can_never_take_leaves_the_series_failed_not_scored_for_ever(nodes: Nodes) -> None:
    # A value the database refuses (a column too short on a server database)
    # would be refused at every try: the series ends failed, not put back.
    from sqlalchemy.exc import DataError

    series = phantom(57)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, series)
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise DataError("INSERT INTO series_result", {}, Exception("value too long for type character varying(64)"))

    worker._finish = worker._fail = refused
    try:
        assert worker.run_once() == 1
        assert worker.run_once() == 0  # not put back
    finally:
        worker.close()
    assert results_of(receiver.sessions, series_uid) == []
    wait_series_state(receiver, series_uid, db.FAILED)


def _store_complete(receiver: Any, series: Any) -> None:
    """Send ``series`` to ``receiver`` and wait until it is complete."""
    assert store_files(receiver.port, series.datasets) == [0x0000] * len(series.datasets)
    wait_series_state(receiver, _uid(series.datasets[0]), db.COMPLETE)


def _received_complete(nodes: Nodes, *series: Any, **sections: dict[str, Any]) -> tuple[Any, Any]:
    """A receiver-only node (config ``sections`` overridden) holding each of
    ``series``, complete; returns (config, node)."""
    _, config = nodes.config(**sections)
    receiver = nodes.start(config, components=("receiver",))
    for one in series:
        _store_complete(receiver, one)
    return config, receiver


def test_a_long_series_is_decoded_in_parts_by_several_helpers(nodes: Nodes) -> None:
    # 70 slices, one with truncated pixel data, and nothing else to prepare:
    # two helper processes each decode part of it into one volume.
    series = phantom(28, n_slices=70)
    datasets = _with_a_truncated_slice(series.datasets, 50)
    bad = datasets[50]
    series_uid = _uid(bad)
    _, config = nodes.config(model={"worker_processes": 2}, reports=UNREACHED)
    receiver = nodes.start(config, components=("receiver",))
    # Sent out of order: the parts follow the slices' z order, not their arrival.
    sent = datasets[1::2] + datasets[::2]
    assert store_files(receiver.port, sent) == [0x0000] * 70
    wait_series_state(receiver, series_uid, db.COMPLETE)

    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    submitted = []
    submit = worker._submit
    worker._submit = lambda fn, *args, **kwargs: submitted.append(fn.__name__) or submit(fn, *args, **kwargs)
    try:
        assert worker.run_once() == 1
    finally:
        worker.close()
    assert sorted(submitted) == ["decode_slices", "decode_slices", "order_series", "write_reports"]
    assert list((receiver.spool.tmp_dir / "worker").iterdir()) == []  # the volume file is gone

    (result,) = results_of(receiver.sessions, series_uid)
    assert result.status == db.SCORED
    assert (result.slice_count, result.quarantined_count) == (69, 1)
    reasons = {row.sop_instance_uid: row.quarantine_reason for row in instances_of(receiver.sessions, series_uid)}
    assert reasons[_uid(bad, "SOPInstanceUID")].startswith("cannot decode pixels")
    # The same scores as the model gives the good slices preprocessed in one piece.
    good = [ds for ds in series.datasets if ds is not series.datasets[50]]
    model = shared_model()
    card = model.card
    x, _ = imaging.preprocess_series(good, card.windows, tuple(card.input_size), card.context_slices)
    slices = sorted(result.slices, key=lambda s: s.position)
    assert [s.sop_instance_uid for s in slices] == z_order(good)
    probs = np.array([[s.scores[label] for label in LABELS] for s in slices])
    np.testing.assert_allclose(probs, model.predict_series(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("pads_batches", "longest_wait"),
    [(True, 60.0), (False, 60.0), (True, 0.0)],
    ids=["padded batches", "partial batches", "padded batches, no time to wait"],
)
def test_series_wait_to_share_a_batch_only_where_a_partial_one_costs_a_full_one(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch, pads_batches: bool, longest_wait: float
) -> None:
    # Four 12-slice series, two helper processes: they are prepared two by
    # two. Where the model pads a partial batch (JAX) all four (48 slices,
    # less than one batch of 64) go to it together, unless waiting for a
    # full batch takes longer than allowed; elsewhere a prepared series
    # never waits for others.
    monkeypatch.setattr(HemorrhageModel, "pads_batches", pads_batches)
    monkeypatch.setattr(worker_module, "LONGEST_WAIT_FOR_A_BATCH_SECONDS", longest_wait)
    series = [phantom(40 + n) for n in range(4)]
    config, receiver = _received_complete(nodes, *series, model={"worker_processes": 2, "batch_size": 64})

    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    scored_together = []
    score_all = worker._score_all
    worker._score_all = lambda items: scored_together.append(len(items)) or score_all(items)
    try:
        assert worker.run_once() == 4
    finally:
        worker.close()
    calls = [count for count in scored_together if count]
    assert sum(calls) == 4
    # Two helpers: the first wait ends with at most two series prepared.
    assert (calls == [4]) if pads_batches and longest_wait else (len(calls) >= 2)
    for one in series:
        (result,) = results_of(receiver.sessions, _uid(one.datasets[0]))
        assert (result.status, result.slice_count) == (db.SCORED, 12)


def test_the_first_series_after_start_is_not_traced_again(nodes: Nodes) -> None:
    # TensorFlow traces the model again for a new input shape (~1 s): the
    # worker's warm-up covers every batch size and series length at start,
    # so the first patient's series does not pay it.
    import keras

    from ichnode.model import load_model

    if keras.backend.backend() != "tensorflow":
        pytest.skip("tracing for any shape is TensorFlow's")
    config, receiver = _received_complete(nodes, phantom(31, n_slices=14), phantom(32, n_slices=45))

    model = load_model(None)  # fresh: nothing traced yet

    def traced() -> list[int]:
        stages = [model._on_rows] + ([model._sequence] if model.has_sequence_stage else [])
        return [stage.predict_function.experimental_get_tracing_count() for stage in stages]

    worker = Worker(config, receiver.sessions, receiver.spool, model)
    try:
        after_warm_up = traced()
        assert worker.run_once() == 2
    finally:
        worker.close()
    assert traced() == after_warm_up


def test_scoring_interrupted_by_a_crash_is_redone_at_start(nodes: Nodes) -> None:
    series = phantom(25)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, series)
    # A worker claims the series, then its process dies before storing a result.
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    try:
        assert [item.series_uid for item in worker.claim()] == [series_uid]
    finally:
        worker.close()
    receiver.stop(grace_seconds=2)
    node = nodes.start(config)  # start-up requeues what was left processing
    result = wait_result(node.sessions, series_uid, instances=len(series.datasets))
    assert result.version == 1  # the same version, scored again from the start
    assert result.status == db.SCORED and result.slice_count == len(series.datasets)
    assert len(results_of(node.sessions, series_uid)) == 1
    # Nothing is left to requeue once it is scored.
    assert requeue_interrupted(node.sessions) == 0


def test_requeue_interrupted_moves_processing_series_back_to_complete(nodes: Nodes) -> None:
    series = phantom(26, n_slices=4)
    config, receiver = _received_complete(nodes, series)
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    try:
        assert len(worker.claim()) == 1
        assert worker.claim() == []  # a processing series is not claimed twice
        assert requeue_interrupted(receiver.sessions) == 1
        row = wait_series_state(receiver, _uid(series.datasets[0]), db.COMPLETE, version=1)
        assert row.claimed_at is None
        assert len(worker.claim()) == 1
    finally:
        worker.close()


@pytest.mark.parametrize(
    ("step", "error", "reason"),
    [
        # the model raises, and again when the series is scored alone: it is
        # recorded failed, not left "processing" until a restart
        ("_predict", RuntimeError("out of GPU memory"), "scoring failed: RuntimeError: out of GPU memory"),
        # the series cannot be handed to the helper processes
        ("_start_preparing", OSError("database is locked"), "preparing failed: OSError('database is locked')"),
    ],
)
def test_a_step_that_fails_fails_the_series_with_the_reason(
    nodes: Nodes, step: str, error: Exception, reason: str
) -> None:
    series = phantom(29)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, series)
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())

    def broken(*args: Any) -> Any:
        raise error

    setattr(worker, step, broken)
    if step == "_predict":
        assert worker.run_once() == 1 and results_of(receiver.sessions, series_uid) == []
    _fails_the_series(worker, receiver, series_uid, reason)


def test_series_the_model_failed_on_together_are_scored_again_alone(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two series share a batch (padded, as under JAX) and the model fails
    # once (a GPU out of memory): neither is lost, both are scored next round.
    monkeypatch.setattr(HemorrhageModel, "pads_batches", True)
    first, second = phantom(66), phantom(67)
    config, receiver = _received_complete(nodes, first, second, model={"worker_processes": 2, "batch_size": 64})
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    predict, failures = worker._predict, []

    def fails_once(items: Any) -> Any:
        if items and not failures:
            failures.append(len(items))
            raise RuntimeError("out of GPU memory")
        return predict(items)

    worker._predict = fails_once
    try:
        assert worker.run_once() == 2
        assert worker.run_once() == 2
    finally:
        worker.close()
    assert failures == [2]
    for series in (first, second):
        (result,) = results_of(receiver.sessions, _uid(series.datasets[0]))
        assert (result.version, result.status) == (1, db.SCORED)


def test_a_series_whose_scores_cannot_be_made_fails_alone(nodes: Nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two series in one model batch (batches padded, as under JAX); making the
    # scores of the first raises: it fails with why, the second is scored.
    monkeypatch.setattr(HemorrhageModel, "pads_batches", True)
    first, second = phantom(60), phantom(61)
    config, receiver = _received_complete(nodes, first, second, model={"worker_processes": 2, "batch_size": 64})
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    score, batches = worker._score, []
    score_all = worker._score_all
    worker._score_all = lambda items: batches.append(len(items)) or score_all(items)

    def broken_for_the_first(item: Any, probs: Any) -> Any:
        if item.series_uid == _uid(first.datasets[0]):
            raise ValueError("no scores")
        return score(item, probs)

    worker._score = broken_for_the_first
    try:
        assert worker.run_once() == 2
    finally:
        worker.close()
    assert [count for count in batches if count] == [2]  # one batch
    (failed,) = results_of(receiver.sessions, _uid(first.datasets[0]))
    assert (failed.status, failed.skip_reason) == (db.FAILED, "scoring failed: ValueError: no scores")
    (scored,) = results_of(receiver.sessions, _uid(second.datasets[0]))
    assert scored.status == db.SCORED


def test_a_series_whose_reports_cannot_be_written_keeps_its_scores(nodes: Nodes) -> None:
    # The study's report folder cannot be made (a file is in its way): the
    # scores are stored, and the result says why no report is on its way.
    series = phantom(62)
    config, receiver = _received_complete(nodes, series, reports=UNREACHED)
    study_uid = _uid(series.datasets[0], "StudyInstanceUID")
    blocker = receiver.spool.absolute(receiver.spool.report_path(study_uid, "x")).parent
    blocker.write_bytes(b"")
    _score_once(config, receiver)
    (result,) = results_of(receiver.sessions, _uid(series.datasets[0]))
    assert result.status == db.SCORED and set(result.scores) == set(LABELS)
    assert result.skip_reason.startswith("scored, but its reports could not be built: ")
    with db.transaction(receiver.sessions) as session:
        assert session.scalars(select(db.Delivery)).all() == []
    # Nothing of them is left taking room: no part file, no report of the pair.
    assert list(receiver.spool.tmp_dir.glob("*.part")) == []
    assert [p for p in receiver.spool.reports_dir.rglob("*") if p.is_file()] == [blocker]
    from ichnode.status import collect_status, format_status

    assert collect_status(config)["scored_without_reports"] == 1
    assert "1 scored series have no reports on their way" in format_status(collect_status(config))

    # The disk mended, the study sent again unchanged: scored and reported this time.
    blocker.unlink()
    _store_complete(receiver, series)
    _score_once(config, receiver)
    old, new = results_of(receiver.sessions, _uid(series.datasets[0]))
    assert (old.superseded, new.version, new.skip_reason) == (True, 2, None)
    assert {d.kind for d in new.deliveries} == {"sr", "summary"}
    assert collect_status(config)["scored_without_reports"] == 0


def test_one_pacs_named_by_name_and_by_address_gets_each_report_once(tmp_path: Any) -> None:
    from ichnode.config import parse_config

    pacs = {"ae_title": "PACS", "port": 4104}
    config = parse_config(
        {
            "access": {"allow": [{**pacs, "host": "127.0.0.1"}]},
            "reports": {"return_to_sender": True, "destinations": [{**pacs, "host": "localhost"}]},
        },
        tmp_path,
    )
    worker = SimpleNamespace(config=config)
    assert Worker.destinations(worker, "PACS", "127.0.0.1") == [("PACS", "localhost", 4104)]
    assert Worker.destinations(worker, "CT", "127.0.0.1") == [("PACS", "localhost", 4104)]


def test_a_sender_sharing_its_ae_title_is_told_apart_by_host() -> None:
    from ichnode.config import Peer
    from ichnode.worker import _sender_address

    allow = [Peer(ae_title="CT", host="10.0.0.5"), Peer(ae_title="CT", host="10.0.0.6", port=104)]
    assert _sender_address(allow, "CT", "10.0.0.6") == ("CT", "10.0.0.6", 104)
    assert _sender_address(allow, "CT", "10.0.0.5") is None  # its entry gives no port: never the other scanner
    assert _sender_address(allow, "CT", None) is None
    anyone = [Peer(ae_title="CT"), Peer(ae_title="CT", host="10.0.0.6", port=104)]
    assert _sender_address(anyone, "CT", "10.0.0.6") == ("CT", "10.0.0.6", 104)
    assert _sender_address(anyone, "CT", "10.0.0.7") is None  # admitted by the entry without an address


def test_no_reports_are_built_for_nowhere(nodes: Nodes) -> None:
    # Without a destination nothing would send the reports, nor remove them.
    series = phantom(64)
    config, receiver = _received_complete(nodes, series, reports={"destinations": []})
    _score_once(config, receiver)
    (result,) = results_of(receiver.sessions, _uid(series.datasets[0]))
    assert result.status == db.SCORED and result.skip_reason is None
    assert _spooled_reports(receiver, _uid(series.datasets[0], "StudyInstanceUID")) == {}


@pytest.mark.parametrize("kind", ["sr", "summary"])
def test_only_the_reports_asked_for_are_built_and_queued(nodes: Nodes, kind: str) -> None:
    series = phantom(68)
    wanted = {"sr": kind == "sr", "summary_image": kind == "summary"}
    config, receiver = _received_complete(nodes, series, reports={**UNREACHED, **wanted})
    _score_once(config, receiver)
    (result,) = results_of(receiver.sessions, _uid(series.datasets[0]))
    assert [d.kind for d in result.deliveries] == [kind]
    (report,) = _spooled_reports(receiver, _uid(series.datasets[0], "StudyInstanceUID")).values()
    assert report.SOPClassUID == (Comprehensive3DSRStorage if kind == "sr" else SecondaryCaptureImageStorage)


def test_reports_return_to_the_scanner_that_sent_the_series(nodes: Nodes) -> None:
    # Two scanners keep their factory AE title "CT": the reports go back to
    # the one whose host the series came from.
    series = phantom(63)
    scanners = [
        {"ae_title": "CT", "host": "127.0.0.1", "port": 4101},
        {"ae_title": "CT", "host": "127.0.0.2", "port": 4102},
    ]
    _, config = nodes.config(access={"allow": scanners}, reports={"return_to_sender": True, "destinations": []})
    receiver = nodes.start(config, components=("receiver",))
    assert _reports_go_to(config, receiver, series.datasets) == {("CT", "127.0.0.2", 4102)}


def test_reports_return_to_the_sender_of_a_series_whose_first_image_came_without_one(nodes: Nodes) -> None:
    # Its first image re-indexed at start after a crash (no sender known), the
    # rest sent by the scanner: the reports go back to the scanner.
    from ichnode.series import InstanceHeader, register_instance

    series = phantom(64)
    first = series.datasets[0]
    scanner = {"ae_title": "CT", "host": "127.0.0.2", "port": 4102}
    _, config = nodes.config(access={"allow": [scanner]}, reports={"return_to_sender": True, "destinations": []})
    receiver = nodes.start(config, components=("receiver",))
    relative = "instances/reindexed/first.dcm"
    receiver.spool.absolute(relative).parent.mkdir(parents=True)
    first.save_as(receiver.spool.absolute(relative), enforce_file_format=True)
    header = InstanceHeader.from_dataset(
        first, sop_class_uid=str(first.SOPClassUID), sop_instance_uid=str(first.SOPInstanceUID)
    )
    register_instance(receiver.sessions, header, path=relative, size_bytes=1, calling_ae=None, peer_host=None)
    assert _reports_go_to(config, receiver, series.datasets[1:]) == {("CT", "127.0.0.2", 4102)}


def test_large_private_values_are_not_held_for_every_slice_while_a_series_is_prepared(nodes: Nodes) -> None:
    # A vendor's 8 MB raw-data blob in each of 12 slices: preparing the series
    # must not hold 96 MB of them at once (300 slices would need GBs).
    import tracemalloc

    series = phantom(66)
    for ds in series.datasets:
        ds.add_new(0x00090010, "LO", "VENDOR")
        ds.add_new(0x00091000, "OB", b"\x01" * (8 << 20))
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, series)
    rows = [
        preparation.InstanceRow(i.id, i.path, i.sop_class_uid, i.sop_instance_uid)
        for i in instances_of(receiver.sessions, series_uid)
    ]
    volume = str(receiver.spool.tmp_dir / "volume.npy")
    tracemalloc.start()
    try:
        prepared = preparation.prepare_series(
            receiver.spool.root, rows, config.series, ((40, 80),) * 3, (256, 256), volume
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (prepared.skip, len(prepared.rows), prepared.quarantined) == (None, 12, {})
    assert peak < 40 << 20, f"{peak / 2**20:.0f} MB"


def _reports_go_to(config: Any, receiver: Any, datasets: list[Any]) -> set[tuple[str, str, int]]:
    """Send ``datasets`` as the scanner CT at 127.0.0.2, score their series
    once it is complete; the addresses its reports are queued to."""
    statuses = store_files(receiver.port, datasets, calling_ae="CT", source_host="127.0.0.2")
    assert statuses == [0x0000] * len(datasets)
    wait_series_state(receiver, _uid(datasets[0]), db.COMPLETE)
    _score_once(config, receiver)
    with db.transaction(receiver.sessions) as session:
        return {(d.ae_title, d.host, d.port) for d in session.scalars(select(db.Delivery))}


def _score_once(config: Any, receiver: Any) -> None:
    """One round of a new worker on ``receiver``'s database and spool, which handles one series."""
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    try:
        assert worker.run_once() == 1
    finally:
        worker.close()


def _fails_the_series(worker: Worker, receiver: Any, series_uid: str, reason: str) -> None:
    """One round of ``worker`` records the series failed with ``reason``, and leaves no volume behind."""
    try:
        assert worker.run_once() == 1
    finally:
        worker.close()
    (result,) = results_of(receiver.sessions, series_uid)
    assert result.status == db.FAILED
    assert result.skip_reason == reason
    assert list((receiver.spool.tmp_dir / "worker").iterdir()) == []


def test_a_failed_claim_does_not_abandon_the_series_in_hand(nodes: Nodes) -> None:
    # The database refuses the claims made while two series are prepared
    # (busy past its timeout): both are still scored, and a third series,
    # complete meanwhile, waits for the next round.
    from sqlalchemy.exc import OperationalError

    first, second, third = phantom(50), phantom(51), phantom(52)
    config, receiver = _received_complete(nodes, first, second, model={"worker_processes": 2})

    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    claim = worker.claim
    calls = []

    def busy_after_the_first(limit: int) -> Any:
        calls.append(limit)
        if len(calls) == 1:
            claimed = claim(limit)
            _store_complete(receiver, third)
            return claimed
        raise OperationalError("UPDATE series", {}, Exception("database is locked"))

    worker.claim = busy_after_the_first
    try:
        assert worker.run_once() == 2
        assert len(calls) > 1  # it did try to claim more
        worker.claim = claim
        assert worker.run_once() == 1
    finally:
        worker.close()
    for one in (first, second, third):
        (result,) = results_of(receiver.sessions, _uid(one.datasets[0]))
        assert (result.status, result.slice_count) == (db.SCORED, 12)


def test_a_part_that_cannot_be_handed_over_fails_its_series(nodes: Nodes) -> None:
    series = phantom(28, n_slices=70)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, series, model={"worker_processes": 2})
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    submit, parts = worker._submit, []

    def second_part_refused(fn: Any, *args: Any) -> Any:
        if fn.__name__ == "decode_slices":
            parts.append(args)
            if len(parts) == 2:
                raise RuntimeError("cannot start a helper process")
        return submit(fn, *args)

    worker._submit = second_part_refused
    _fails_the_series(worker, receiver, series_uid, "preparing failed: RuntimeError('cannot start a helper process')")


def test_a_dead_helper_process_is_replaced_and_scoring_goes_on(nodes: Nodes) -> None:
    series = phantom(27, n_slices=12)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, series)
    handoff = receiver.spool.tmp_dir / "worker"
    handoff.mkdir(exist_ok=True)
    (handoff / "volume-left-by-a-crash.npy").write_bytes(b"x")
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    try:
        assert list(handoff.iterdir()) == []  # leftovers of a crash are removed at start
        # A helper process dies abruptly (as if a decoder crashed or it ran out of memory).
        died = worker._processes.submit(os._exit, 1)
        assert isinstance(died.exception(timeout=60), BrokenProcessPool)
        assert worker.run_once() == 1
        assert list(handoff.iterdir()) == []  # every volume handed over is deleted
    finally:
        worker.close()
    (result,) = results_of(receiver.sessions, series_uid)
    assert result.status == db.SCORED and result.slice_count == len(series.datasets)


@pytest.mark.parametrize("deaths", [1, 2])
def test_a_series_a_dying_helper_took_down_is_scored_again_once(nodes: Nodes, deaths: int) -> None:
    # A helper dies while preparing the series (as if the out-of-memory killer
    # took it): the series is scored again at the next round; if that kills
    # a helper too (a file that crashes the decoder), it fails, with why.
    series = phantom(59)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, series)
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    submit, died = worker._submit, []

    def die_preparing(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn is preparation.prepare_series and len(died) < deaths:
            died.append(fn)
            return submit(os._exit, 1)
        return submit(fn, *args, **kwargs)

    worker._submit = die_preparing
    try:
        assert worker.run_once() == 1
        assert results_of(receiver.sessions, series_uid) == []  # not failed: put back
        assert worker.run_once() == 1
    finally:
        worker.close()
    (result,) = results_of(receiver.sessions, series_uid)
    if deaths == 1:
        assert (result.status, result.version, result.slice_count) == (db.SCORED, 1, len(series.datasets))
    else:
        assert result.status == db.FAILED
        assert "BrokenProcessPool" in result.skip_reason


def _prepare_instead(worker: Worker, series_uid: str, *instead: Any) -> None:
    """Have ``worker``'s helpers run ``instead`` (a function and its arguments)
    whenever they are to prepare the series ``series_uid``."""
    submit = worker._submit

    def replaced(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn is preparation.prepare_series and safe_name(series_uid) in args[1][0].path:
            return submit(*instead)
        return submit(fn, *args, **kwargs)

    worker._submit = replaced


def test_a_helper_that_stops_answering_is_replaced_and_holds_back_no_other_series(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A decoder looping on a crafted frame, a spool on a hung mount: the
    # helper never returns. Past its deadline the helpers are replaced; the
    # other series is scored, the stuck one scored again alone, then failed.
    import time

    monkeypatch.setattr(worker_module, "PREPARATION_SECONDS", 3.0)
    monkeypatch.setattr(worker_module, "PREPARATION_SECONDS_PER_SLICE", 0.0)
    stuck, innocent = phantom(63), phantom(64)
    stuck_uid = _uid(stuck.datasets[0])
    config, receiver = _received_complete(nodes, stuck, innocent, model={"worker_processes": 2})
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    _prepare_instead(worker, stuck_uid, time.sleep, 3600)
    try:
        assert worker.run_once() == 2
        assert results_of(receiver.sessions, stuck_uid) == []  # put back, not failed: it may not be its fault
        assert worker.run_once() >= 1
    finally:
        worker.close()
    (failed,) = results_of(receiver.sessions, stuck_uid)
    (scored,) = results_of(receiver.sessions, _uid(innocent.datasets[0]))
    assert (scored.status, scored.slice_count) == (db.SCORED, len(innocent.datasets))
    assert failed.status == db.FAILED and "stopped answering" in failed.skip_reason


def test_a_model_busy_for_longer_than_the_deadline_takes_no_helper_for_stuck(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Preparations that finished while the main thread scored (a large model
    # on a CPU), or that wait behind others for a helper, are not overdue.
    import time

    monkeypatch.setattr(worker_module, "PREPARATION_SECONDS", 3.0)
    monkeypatch.setattr(worker_module, "PREPARATION_SECONDS_PER_SLICE", 0.0)
    predict = Worker._predict

    def slow(self: Worker, items: Any) -> Any:
        time.sleep(4.0)
        return predict(self, items)

    monkeypatch.setattr(Worker, "_predict", slow)
    many = [phantom(seed, n_slices=12) for seed in (66, 67, 68, 69, 70)]
    config, receiver = _received_complete(nodes, *many, model={"worker_processes": 1, "batch_size": 12})
    caplog.set_level(logging.ERROR, logger="ichnode.worker")
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    try:
        while worker.run_once():
            pass
    finally:
        worker.close()
    assert not [r for r in caplog.records if "stopped answering" in r.getMessage()]
    for series in many:
        (result,) = results_of(receiver.sessions, _uid(series.datasets[0]))
        assert result.status == db.SCORED


def test_a_slice_a_helper_could_not_read_for_want_of_memory_is_not_quarantined(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import Future

    series = phantom(65)
    series_uid = _uid(series.datasets[0])
    config, receiver = _received_complete(nodes, series)
    # In a helper: out of memory (or file descriptors) is no fault of the file.
    rows = [
        preparation.InstanceRow(i.id, i.path, i.sop_class_uid, i.sop_instance_uid)
        for i in instances_of(receiver.sessions, series_uid)
    ]
    real = imaging.preprocess_slice

    def short(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError()

    monkeypatch.setattr(imaging, "preprocess_slice", short)
    volume = str(receiver.spool.tmp_dir / "volume.npy")
    with pytest.raises(preparation.ShortOfResources, match="MemoryError"):
        preparation.prepare_series(receiver.spool.root, rows, config.series, ((40, 80),) * 3, (256, 256), volume)
    monkeypatch.setattr(imaging, "preprocess_slice", real)

    # The worker scores the series again, whole, at its next round.
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    submit, short_once = worker._submit, []

    def runs_short_once(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn is preparation.prepare_series and not short_once:
            short_once.append(fn)
            future: Future[Any] = Future()
            future.set_exception(preparation.ShortOfResources("x.dcm: MemoryError: "))
            return future
        return submit(fn, *args, **kwargs)

    worker._submit = runs_short_once
    try:
        assert worker.run_once() == 1
        assert results_of(receiver.sessions, series_uid) == []  # put back
        assert worker.run_once() == 1
    finally:
        worker.close()
    (result,) = results_of(receiver.sessions, series_uid)
    assert (result.status, result.slice_count, result.quarantined_count) == (db.SCORED, len(series.datasets), 0)


def test_helpers_outlive_ctrl_c_but_end_on_sigterm() -> None:
    # Ctrl-C signals the node's whole process group: the helpers go on with
    # their series. SIGTERM is how the pool ends the others when one dies: a
    # helper that ignored it would keep the worker from ever closing.
    import signal

    pool = preparation.process_pool(1)
    try:
        pid = pool.submit(os.getpid).result(timeout=60)
        os.kill(pid, signal.SIGINT)
        assert pool.submit(os.getpid).result(timeout=60) == pid
        os.kill(pid, signal.SIGTERM)
        with pytest.raises(BrokenProcessPool):
            pool.submit(os.getpid).result(timeout=60)
    finally:
        pool.shutdown(wait=True)


def test_a_series_that_crashes_the_helpers_fails_alone(nodes: Nodes) -> None:
    # Every time the helper prepares series A it dies (as on a file that
    # crashes the decoder). B, queued behind A the first time, is taken down
    # too; the next round scores each alone, so only A fails.
    poison, innocent = phantom(61), phantom(60)
    poison_uid = _uid(poison.datasets[0])
    config, receiver = _received_complete(nodes, poison, innocent, model={"worker_processes": 1})
    worker = Worker(config, receiver.sessions, receiver.spool, shared_model())
    # Killed once B is queued behind it (the shell's parent is the helper).
    _prepare_instead(worker, poison_uid, os.system, "sleep 0.5; kill -9 $PPID")
    try:
        assert worker.run_once() == 2
        assert results_of(receiver.sessions, poison_uid) == []  # both put back, neither failed
        assert worker.run_once() == 2
    finally:
        worker.close()
    (scored,) = results_of(receiver.sessions, _uid(innocent.datasets[0]))
    (failed,) = results_of(receiver.sessions, poison_uid)
    assert (scored.status, scored.slice_count) == (db.SCORED, len(innocent.datasets))
    assert failed.status == db.FAILED and "BrokenProcessPool" in failed.skip_reason


def _resident_bytes_freed() -> int:
    """How much resident memory a 12 MiB array gives back to the system when freed."""

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    array = np.ones(12 << 20, dtype=np.uint8)  # written, so resident
    before = resident()
    del array
    return before - resident()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_helper_processes_keep_freed_memory_for_the_next_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    # A helper decodes slice after slice; memory given back on every free is
    # page-faulted in again for the next (half the decode rate).
    for tuning in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(tuning, raising=False)  # glibc's defaults in the processes started here
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as plain:
        returned = plain.submit(_resident_bytes_freed).result()
    with preparation.process_pool(1) as helpers:
        kept = helpers.submit(_resident_bytes_freed).result()
    assert returned >= 10 << 20  # the system default, for contrast
    assert kept < 1 << 20
