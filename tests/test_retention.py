"""Retention: finished series lose their files after storage.retention_days; results stay."""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from ichnode import db, service
from ichnode.retention import purge_expired

from .conftest import all_instances, all_series, require_data, store_files, wait_for


def _finish(node: Any) -> db.Series:
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Series).values(state=db.SCORED))
        return session.scalars(select(db.Series)).one()


def test_purge_removes_files_of_finished_old_series_only(start_node: Any) -> None:
    node = start_node()
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:3]
    assert store_files(node.port, files) == [0, 0, 0]
    wait_for(lambda: len(all_instances(node)) == 3, message="3 instances")
    spooled = [node.spool.absolute(i.path) for i in all_instances(node)]
    assert all(path.is_file() for path in spooled)

    # Still receiving: kept, however old.
    later = db.utcnow() + dt.timedelta(days=30)
    assert purge_expired(node.sessions, node.spool, 7, now=later) == 0
    series = _finish(node)
    # Finished but younger than the retention: kept.
    assert purge_expired(node.sessions, node.spool, 7) == 0
    # Retention 0 keeps everything.
    assert purge_expired(node.sessions, node.spool, 0, now=later) == 0

    assert purge_expired(node.sessions, node.spool, 7, now=later) == 3
    assert not any(path.exists() for path in spooled)
    assert all_instances(node) == []
    with node.sessions() as session:
        kept = session.get(db.Series, series.id)
        assert kept is not None and kept.state == db.SCORED


def _queue_report(node: Any, series: db.Series, state: str) -> Path:
    """A report of ``series`` for two destinations, in delivery state
    ``state``; returns its spooled file."""
    report = node.spool.absolute("reports/1.2.3/1.2.3.4.dcm")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_bytes(b"an SR")
    with db.transaction(node.sessions) as session:
        result = db.SeriesResult(series_id=series.id, version=1, status=db.SCORED)
        session.add(result)
        session.flush()
        for ae_title in ("TEST_PACS", "ARCHIVE"):
            session.add(
                db.Delivery(
                    result_id=result.id,
                    kind="sr",
                    sop_instance_uid="1.2.3.4",
                    path="reports/1.2.3/1.2.3.4.dcm",
                    ae_title=ae_title,
                    host="127.0.0.1",
                    port=104,
                    state=state,
                )
            )
    return report


@pytest.mark.parametrize("state", db.UNDELIVERED)
def test_purge_keeps_the_files_of_a_series_whose_report_is_undelivered(start_node: Any, state: str) -> None:
    node = start_node()
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:3]
    assert store_files(node.port, files) == [0, 0, 0]
    wait_for(lambda: len(all_instances(node)) == 3, message="3 instances")
    spooled = [node.spool.absolute(i.path) for i in all_instances(node)]
    spooled.append(_queue_report(node, _finish(node), state))

    later = db.utcnow() + dt.timedelta(days=30)
    assert purge_expired(node.sessions, node.spool, 7, now=later) == 0
    assert all(path.is_file() for path in spooled)
    # Once the report is delivered the files go: 3 images and the report both destinations got.
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Delivery).values(state=db.SENT))
    assert purge_expired(node.sessions, node.spool, 7, now=later) == 4
    assert not any(path.exists() for path in spooled)


def test_a_running_node_purges_on_its_own(start_node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "RETENTION_CHECK_SECONDS", 0.2)
    node = start_node(storage={"retention_days": 7})
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:3]
    assert store_files(node.port, files) == [0, 0, 0]
    wait_for(lambda: len(all_instances(node)) == 3, message="3 instances")
    spooled = [node.spool.absolute(i.path) for i in all_instances(node)]
    _finish(node)
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Series).values(last_received_at=db.utcnow() - dt.timedelta(days=8)))
    wait_for(lambda: not any(path.exists() for path in spooled), message="the node removed the expired files")
    # Each file goes a moment before its row (a crash between leaves a row without a file, never the reverse).
    wait_for(lambda: all_instances(node) == [], timeout=10, message="the expired rows removed")


def test_purge_keeps_a_series_resent_while_it_runs(
    start_node: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ichnode.retention")
    node = start_node()
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:3]
    assert store_files(node.port, files) == [0, 0, 0]
    wait_for(lambda: len(all_instances(node)) == 3, message="3 instances")
    _finish(node)
    # The first image is sent again after the purge chose the series, before
    # it removes the image: acknowledged, it must stay.
    # (The receiver in this process takes the same lock: only the purge's first one resends.)
    lock, resent = node.spool.instance_lock, {}

    def resend_first(sop_uid: str) -> Any:
        if not resent:
            resent["statuses"] = None
            resent["statuses"] = store_files(node.port, files[:1])
        return lock(sop_uid)

    monkeypatch.setattr(node.spool, "instance_lock", resend_first)
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Series).values(last_received_at=db.utcnow() - dt.timedelta(days=30)))
    assert purge_expired(node.sessions, node.spool, 7) == 0
    assert resent == {"statuses": [0]}
    assert _retention_lines(caplog) == []  # it purged no series
    instances = all_instances(node)
    assert len(instances) == 3 and all(node.spool.absolute(i.path).is_file() for i in instances)
    with node.sessions() as session:
        # The same bytes again: the series is not scored again, but was received just now.
        series = session.scalars(select(db.Series)).one()
        assert series.state == db.SCORED and series.last_received_at > db.utcnow() - dt.timedelta(minutes=5)


def _of_another_series(path: Path) -> Dataset:
    """The image at ``path`` as the one image of another series of its study."""
    ds = dcmread(path)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def test_purge_leaves_no_empty_folders_and_logs_only_what_it_purged(
    start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ichnode.retention")
    node = start_node()
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:3]
    assert store_files(node.port, [*files, _of_another_series(files[0])]) == [0, 0, 0, 0]
    wait_for(lambda: len(all_instances(node)) == 4, message="4 instances")
    expired, kept = all_series(node)
    report = _queue_report(node, expired, db.SENT)
    series_folder, kept_folder = (
        node.spool.absolute(_an_image_of(node, series.id)).parent for series in (expired, kept)
    )
    study_folder = series_folder.parent
    # Only the first series is finished: the other one of the study is still coming in.
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Series).where(db.Series.id == expired.id).values(state=db.SCORED))
    later = db.utcnow() + dt.timedelta(days=30)

    assert purge_expired(node.sessions, node.spool, 7, now=later) == 4
    assert not series_folder.exists() and not report.parent.exists()
    assert list(study_folder.iterdir()) == [kept_folder]
    assert _retention_lines(caplog) == ["retention: removed 4 files of 1 series older than 7 days"]

    # The next run has nothing left of that series to remove, and says nothing.
    caplog.clear()
    assert purge_expired(node.sessions, node.spool, 7, now=later) == 0
    assert _retention_lines(caplog) == []

    # The study's last series goes too, and its folder with it; the spool's own folders stay.
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Series).values(state=db.SCORED))
    assert purge_expired(node.sessions, node.spool, 7, now=later) == 1
    assert not study_folder.exists()
    assert list(node.spool.instances_dir.iterdir()) == [] and list(node.spool.reports_dir.iterdir()) == []
    assert _retention_lines(caplog) == ["retention: removed 1 files of 1 series older than 7 days"]


def test_the_reports_of_a_series_whose_images_all_moved_to_another_series_are_purged(start_node: Any) -> None:
    # The PACS re-files a reported series under a new Series Instance UID:
    # the old series keeps no image, but the reports it was sent stay its own.
    node = start_node()
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:3]
    assert store_files(node.port, files) == [0, 0, 0]
    wait_for(lambda: len(all_instances(node)) == 3, message="3 instances")
    (series,) = all_series(node)
    report = _queue_report(node, series, db.SENT)
    refiled = [dcmread(path) for path in files]
    for ds in refiled:
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    assert store_files(node.port, refiled) == [0, 0, 0]
    wait_for(lambda: len(all_series(node)) == 2, message="the re-filed series")
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Series).values(state=db.SKIPPED))
    assert purge_expired(node.sessions, node.spool, 7, now=db.utcnow() + dt.timedelta(days=30)) == 4
    assert not report.exists()


def _an_image_of(node: Any, series_id: int) -> str:
    """The spool path of one image of the series ``series_id``."""
    with node.sessions() as session:
        return session.scalars(select(db.Instance.path).where(db.Instance.series_id == series_id)).first()


def _retention_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "ichnode.retention"]


def test_an_image_arriving_as_the_purge_removes_its_folder_is_stored(
    start_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node()
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:4]
    assert store_files(node.port, files[:3]) == [0, 0, 0]
    wait_for(lambda: len(all_instances(node)) == 3, message="3 instances")
    _finish(node)
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Series).values(last_received_at=db.utcnow() - dt.timedelta(days=30)))
    late = dcmread(files[3], stop_before_pixels=True)
    relative = node.spool.instance_path(late.StudyInstanceUID, late.SeriesInstanceUID, late.SOPInstanceUID)
    # The fourth image of the series reaches the spool as the purge empties
    # the series folder: after the receiver found the folder, before it moved
    # the image in. (The purge runs in the receiver's thread, under the fourth
    # image's lock, which is not one of the other three's.)
    replace, purged = os.replace, []

    def purge_first(source: Any, target: Any) -> None:
        if Path(target) == node.spool.absolute(relative) and not purged:
            purged.append(purge_expired(node.sessions, node.spool, 7))
        replace(source, target)

    monkeypatch.setattr(os, "replace", purge_first)
    assert store_files(node.port, files[3:4]) == [0]
    assert purged == [3]
    assert [instance.path for instance in all_instances(node)] == [relative]
    assert node.spool.absolute(relative).is_file()
