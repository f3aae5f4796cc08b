"""Report delivery: C-STORE of the SR and summary to real SCPs, retries, dead letters, crashes.

Destinations are pynetdicom Storage SCPs in this process (tests.pipeline_support.Recorder)
whose answer status the test sets; a "down" destination is a free port nobody
listens on. Nodes run in this process with the shared model, except for the
kill -9 test, whose first node is an ``ichnode serve`` subprocess.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import evt
from sqlalchemy import event, update
from sqlalchemy.exc import OperationalError

from ichnode import db
from ichnode.config import RetryConfig, parse_config
from ichnode.dispatch import Dispatcher, backoff_seconds, requeue_interrupted
from ichnode.spool import Spool
from tests.conftest import free_port, require_data, require_tool, run_cli, store_files, wait_for
from tests.peers import IchnodeProcess
from tests.pipeline_support import (
    PIPELINE_WARNINGS,
    Nodes,
    Recorder,
    deliveries,
    phantom,
    results_of,
    shared_model,
    wait_deliveries,
)

pytestmark = PIPELINE_WARNINGS


# Short delays so that a test sees several retries in about a second.
FAST_RETRY = {"first_delay_s": 0.2, "max_delay_s": 0.5, "max_attempts": 100}


def _all_sent(count: int):
    return lambda rows: len(rows) == count and all(r.state == db.SENT for r in rows)


def _series_uid(series) -> str:
    return str(series.datasets[0].SeriesInstanceUID)


# -- reports reach the destination and are valid DICOM ---------------------------------
def _children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _dciodvfy(path: Path) -> list[str]:
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return (out.stdout + out.stderr).splitlines()


@pytest.mark.tools("dciodvfy", "dsrdump")
def test_reports_reach_the_destination_in_the_source_study_and_validate(nodes: Nodes, recorder) -> None:
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    pacs = recorder()
    node = nodes.start(reports={"destinations": [pacs.destination]})
    assert store_files(node.port, files) == [0x0000] * len(files)

    rows = wait_deliveries(node.sessions, _all_sent(2), message="SR and summary delivered")
    assert sorted(r.kind for r in rows) == ["sr", "summary"]
    assert all(r.attempts == 1 and r.last_error is None and r.sent_at is not None for r in rows)
    received = {r.sop_class_uid: r for r in pacs.stored()}
    assert sorted(received) == sorted([Comprehensive3DSRStorage, SecondaryCaptureImageStorage])
    assert {r.calling_ae for r in received.values()} == {"ICHNODE"}
    for item in received.values():
        assert item.dataset.StudyInstanceUID == source.StudyInstanceUID
        assert item.dataset.SeriesInstanceUID != source.SeriesInstanceUID  # a new series
    assert {r.sop_instance_uid for r in rows} == {r.sop_instance_uid for r in received.values()}

    # The spooled files (what is sent, and resent) pass dciodvfy but for what
    # the source brings (GE: an empty DeidentificationMethod, see test_reports).
    inherited = {line for line in _dciodvfy(files[0]) if line.startswith("Error")}
    for row in rows:
        path = node.spool.absolute(row.path)
        lines = _dciodvfy(path)
        assert [line for line in lines if line.startswith("Error") and line not in inherited] == [], row.kind
        assert ("Comprehensive3DSR" if row.kind == "sr" else "SCImage") in lines
    sr_row = next(r for r in rows if r.kind == "sr")
    dump = subprocess.run(
        [require_tool("dsrdump"), str(node.spool.absolute(sr_row.path))], capture_output=True, text=True, timeout=60
    )
    assert dump.returncode == 0, dump.stderr
    assert "Comprehensive 3D SR Document" in dump.stdout


# -- status answers that are not Success ------------------------------------------------
def test_failure_and_warning_statuses_are_retried_with_the_same_objects(nodes: Nodes, recorder) -> None:
    pacs = recorder(status=0xA700)
    series = phantom(31)
    node = nodes.start(reports={"destinations": [pacs.destination], "retry": FAST_RETRY})
    store_files(node.port, series.datasets)

    def answered(code: str):
        return lambda rows: len(rows) == 2 and all(code in (r.last_error or "") for r in rows)

    rows = wait_deliveries(node.sessions, answered("0xA700"), message="deliveries refused with 0xA700")
    assert all(r.state == db.QUEUED and r.sent_at is None and r.attempts >= 1 for r in rows)
    assert all("Failure" in r.last_error for r in rows)
    pacs.status = 0xB000  # a warning is not a success either
    rows = wait_deliveries(node.sessions, answered("0xB000"), message="deliveries answered with 0xB000")
    assert all(r.state == db.QUEUED and r.sent_at is None and r.attempts >= 2 for r in rows)
    assert all("Warning" in r.last_error for r in rows)
    pacs.status = 0x0000
    rows = wait_deliveries(node.sessions, _all_sent(2), message="deliveries stored")
    assert all(r.attempts >= 3 and r.last_error is None for r in rows)

    # Every attempt carried the same object: same SOP Instance UID, same content.
    for row in rows:
        tries = [r for r in pacs.records if r.sop_instance_uid == row.sop_instance_uid]
        assert {0xA700, 0xB000, 0x0000} <= {t.status for t in tries}
        assert len({(str(t.dataset.SeriesInstanceUID), str(t.dataset.ContentTime)) for t in tries}) == 1
    assert pacs.stored_counts() == {row.sop_instance_uid: 1 for row in rows}


def test_a_destination_down_for_a_while_gets_every_report_when_it_is_back(nodes: Nodes, recorder) -> None:
    port = free_port()  # nobody listens there yet
    studies = [phantom(32), phantom(33, hemorrhage=())]
    node = nodes.start(
        reports={"destinations": [{"ae_title": "LATE_PACS", "host": "127.0.0.1", "port": port}], "retry": FAST_RETRY}
    )
    for series in studies:
        store_files(node.port, series.datasets)
    rows = wait_deliveries(
        node.sessions,
        lambda rows: len(rows) == 4 and all(r.attempts >= 2 for r in rows),
        message="four deliveries to have failed twice",
    )
    assert all(r.state == db.QUEUED and "cannot connect" in r.last_error for r in rows)

    pacs = recorder("LATE_PACS", port=port)
    rows = wait_deliveries(node.sessions, _all_sent(4), message="every report delivered")
    assert pacs.stored_counts() == {r.sop_instance_uid: 1 for r in rows}


def test_a_delivery_is_dead_lettered_after_max_attempts_and_shown_by_status(nodes: Nodes) -> None:
    port = free_port()
    retry = {"first_delay_s": 0.1, "max_delay_s": 0.2, "max_attempts": 3}
    destination = {"ae_title": "GONE_PACS", "host": "127.0.0.1", "port": port}
    config_path, config = nodes.config(reports={"destinations": [destination], "retry": retry})
    node = nodes.start(config)
    store_files(node.port, phantom(34).datasets)
    rows = wait_deliveries(
        node.sessions, lambda rows: len(rows) == 2 and all(r.state == db.DEAD for r in rows), message="dead letters"
    )
    assert all(r.attempts == 3 and "cannot connect to GONE_PACS@127.0.0.1" in r.last_error for r in rows)

    out = run_cli(["status", "--json", "--config", str(config_path)])
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["deliveries"] == {"dead": 2}
    dead = {d["sop_instance_uid"]: d for d in status["dead_letters"]}
    assert sorted(dead) == sorted(r.sop_instance_uid for r in rows)
    for letter in dead.values():
        assert letter["destination"] == f"GONE_PACS@127.0.0.1:{port}"
        assert letter["attempts"] == 3
        assert "cannot connect" in letter["last_error"]


def test_a_destination_without_sr_support_gets_the_summary_and_the_sr_is_dead_lettered(nodes: Nodes, recorder) -> None:
    pacs = recorder(sop_classes=[SecondaryCaptureImageStorage])
    retry = {"first_delay_s": 0.1, "max_delay_s": 0.2, "max_attempts": 2}
    node = nodes.start(reports={"destinations": [pacs.destination], "retry": retry})
    store_files(node.port, phantom(35).datasets)
    rows = wait_deliveries(
        node.sessions,
        lambda rows: len(rows) == 2 and all(r.state in (db.SENT, db.DEAD) for r in rows),
        message="summary sent and SR dead-lettered",
    )
    by_kind = {r.kind: r for r in rows}
    assert by_kind["summary"].state == db.SENT
    assert by_kind["sr"].state == db.DEAD and by_kind["sr"].attempts == 2
    assert "presentation context" in by_kind["sr"].last_error
    assert [r.sop_class_uid for r in pacs.stored()] == [SecondaryCaptureImageStorage]


def test_reports_go_in_explicit_vr_to_a_destination_that_takes_both(nodes: Nodes, recorder) -> None:
    # Implicit VR is only the fallback: in it a PACS must look every VR up in
    # its own dictionary, and attributes newer than that dictionary become UN.
    pacs = recorder(transfer_syntaxes=[ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    node = nodes.start(reports={"destinations": [pacs.destination]})
    store_files(node.port, phantom(37).datasets)
    wait_deliveries(node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 2, message="both sent")
    assert {r.dataset.file_meta.TransferSyntaxUID for r in pacs.stored()} == {ExplicitVRLittleEndian}


def test_a_destination_that_accepts_only_implicit_vr_gets_every_report(nodes: Nodes, recorder) -> None:
    # The one transfer syntax every SCP must accept; some accept nothing else.
    pacs = recorder(transfer_syntaxes=[ImplicitVRLittleEndian])
    node = nodes.start(reports={"destinations": [pacs.destination]})
    store_files(node.port, phantom(36).datasets)
    rows = wait_deliveries(node.sessions, lambda rows: [r.state for r in rows] == [db.SENT] * 2, message="both sent")
    assert sorted(r.sop_instance_uid for r in pacs.stored()) == sorted(r.sop_instance_uid for r in rows)
    assert {r.dataset.file_meta.TransferSyntaxUID for r in pacs.stored()} == {ImplicitVRLittleEndian}


# -- backoff -------------------------------------------------------------------------
def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    retry = RetryConfig(first_delay_s=5, max_delay_s=600, max_attempts=20)
    assert [backoff_seconds(n, retry) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff_seconds(0, retry) == 5


def _report(spool: Spool, tmp_path: Path, study_uid: str, pixels: int = 0) -> tuple[str, str]:
    """A small report object (with ``pixels`` x ``pixels`` of 16-bit noise) in the spool; (SOP Instance UID, path)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality = "OT"
    if pixels:
        ds.Rows = ds.Columns = pixels
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = os.urandom(2 * pixels * pixels)
    relative = spool.report_path(study_uid, ds.SOPInstanceUID)
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    spool.commit_file(tmp_path / "report.dcm", relative)
    return str(ds.SOPInstanceUID), relative


def _queue(
    tmp_path: Path,
    count: int,
    port: int,
    ae_title: str = "TEST_PACS",
    *,
    also: Sequence[tuple[str, int]] = (),
    pixels: int = 0,
) -> tuple:
    """A database and spool with ``count`` queued deliveries, each of its own small report
    file, to ``ae_title`` at ``port`` on 127.0.0.1, and as many to each (AE title, port) of ``also``."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ichnode.db'}")
    db.init_db(engine)
    sessions = db.session_factory(engine)
    spool = Spool(tmp_path / "spool")
    study_uid = generate_uid()
    with db.transaction(sessions) as session:
        series = db.Series(series_uid=generate_uid(), study_uid=study_uid)
        session.add(series)
        session.flush()
        result = db.SeriesResult(series_id=series.id, version=1, status=db.SCORED)
        session.add(result)
        session.flush()
        for to_ae, to_port in [(ae_title, port), *also]:
            for _ in range(count):
                session.add(_delivery(result.id, *_report(spool, tmp_path, study_uid, pixels), to_ae, to_port))
    return engine, sessions, spool


def _delivery(result_id: int, sop_instance_uid: str, path: str, ae_title: str, port: int) -> db.Delivery:
    return db.Delivery(
        result_id=result_id,
        kind="summary",
        sop_instance_uid=sop_instance_uid,
        path=path,
        ae_title=ae_title,
        host="127.0.0.1",
        port=port,
        state=db.QUEUED,
        next_attempt_at=db.utcnow(),
    )


def test_next_attempt_at_in_the_database_grows_exponentially(tmp_path: Path) -> None:
    retry = RetryConfig(first_delay_s=1, max_delay_s=8, max_attempts=10)
    engine, sessions, spool = _queue(tmp_path, 1, free_port())
    dispatcher = Dispatcher(sessions, spool, retry, calling_ae="ICHNODE", timeout=5)
    far = db.utcnow() + dt.timedelta(days=1)  # every delivery is due then
    try:
        delays = []
        for attempt in range(1, 7):
            before = db.utcnow()
            assert dispatcher.run_once(now=far) == 0
            (row,) = deliveries(sessions)
            assert (row.attempts, row.state) == (attempt, db.QUEUED)
            delays.append((row.next_attempt_at - before).total_seconds())
            # Not due yet: a tick now leaves it alone.
            dispatcher.run_once()
            assert deliveries(sessions)[0].attempts == attempt
        for delay, expected in zip(delays, [1, 2, 4, 8, 8, 8]):
            assert expected <= delay < expected + 2, delays
    finally:
        engine.dispose()


def test_more_due_reports_than_an_association_has_contexts_are_all_tried(tmp_path: Path) -> None:
    # After a long outage more reports may be due for one destination than an
    # association has presentation contexts (128); the round must still try each.
    engine, sessions, spool = _queue(tmp_path, 130, free_port())
    dispatcher = Dispatcher(sessions, spool, RetryConfig(), calling_ae="ICHNODE", timeout=5)
    try:
        assert dispatcher.run_once() == 0
        rows = deliveries(sessions)
        assert len(rows) == 130
        assert all(r.attempts == 1 and "cannot connect" in r.last_error for r in rows)
    finally:
        engine.dispose()


# -- one delivery, one sender: the claim (queued -> sending) ---------------------------
class _SupersedingPacs(Recorder):
    """A PACS during whose C-STORE the worker stores a newer result (superseding
    every undelivered report, as the worker does), and which then refuses the store."""

    def __init__(self, sessions: Any, status: int = 0xA700) -> None:
        super().__init__(status=status)
        self.sessions = sessions

    def _on_store(self, event: Any) -> int:
        with db.transaction(self.sessions) as session:
            session.execute(
                update(db.Delivery).where(db.Delivery.state.in_(db.UNDELIVERED)).values(state=db.SUPERSEDED)
            )
        return super()._on_store(event)


class _SlowPacs(Recorder):
    """A PACS that takes a while over each C-STORE: two dispatchers overlap on it."""

    def _on_store(self, event: Any) -> int:
        time.sleep(0.3)
        return super()._on_store(event)


class _StoppingPacs(Recorder):
    """A PACS during whose first C-STORE the node is told to stop."""

    def __init__(self) -> None:
        super().__init__()
        self.dispatcher: Dispatcher | None = None

    def _on_store(self, event: Any) -> int:
        self.dispatcher.stop()
        return super()._on_store(event)


def test_a_stop_ends_a_batch_after_the_report_on_the_wire(tmp_path: Path) -> None:
    # A backlog after an outage must not keep a stopping node past systemd's
    # stop timeout: the reports not yet sent wait, queued, for the next start.
    pacs = _StoppingPacs().start()
    engine, sessions, spool = _queue(tmp_path, 5, pacs.port)
    pacs.dispatcher = dispatcher = Dispatcher(sessions, spool, RetryConfig(), calling_ae="ICHNODE", timeout=5)
    try:
        assert dispatcher.run_once() == 1
        assert len(pacs.records) == 1
        rows = deliveries(sessions)
        assert sorted((r.state, r.attempts) for r in rows) == [(db.QUEUED, 0)] * 4 + [(db.SENT, 1)]
    finally:
        pacs.stop()
        engine.dispose()


def _set_state(sessions: Any, state: str) -> None:
    with db.transaction(sessions) as session:
        session.execute(update(db.Delivery).values(state=state))


def test_a_report_superseded_during_a_failed_c_store_stays_superseded(tmp_path: Path) -> None:
    port = free_port()
    engine, sessions, spool = _queue(tmp_path, 1, port)
    pacs = _SupersedingPacs(sessions).start(port)
    dispatcher = Dispatcher(sessions, spool, RetryConfig(first_delay_s=1), calling_ae="ICHNODE", timeout=5)
    try:
        assert dispatcher.run_once() == 0
        (row,) = deliveries(sessions)
        assert row.state == db.SUPERSEDED  # not queued again by the failure
        # Never retried, however late: the newer report is the one to send.
        assert dispatcher.run_once(now=db.utcnow() + dt.timedelta(days=1)) == 0
        assert len(pacs.records) == 1
        assert deliveries(sessions)[0].state == db.SUPERSEDED
    finally:
        pacs.stop()
        engine.dispose()


def test_reports_superseded_while_their_batch_is_under_way_are_not_sent(tmp_path: Path) -> None:
    # A backlog goes in one batch: a newer result recorded meanwhile must keep
    # the rest of the old one from the PACS. The one on the wire is stored.
    port = free_port()
    engine, sessions, spool = _queue(tmp_path, 3, port)
    pacs = _SupersedingPacs(sessions, status=0x0000).start(port)
    dispatcher = Dispatcher(sessions, spool, RetryConfig(), calling_ae="ICHNODE", timeout=5)
    try:
        assert dispatcher.run_once() == 1
        assert len(pacs.records) == 1
        assert sorted(r.state for r in deliveries(sessions)) == [db.SENT, db.SUPERSEDED, db.SUPERSEDED]
    finally:
        pacs.stop()
        engine.dispose()


def test_two_dispatchers_on_one_database_send_each_delivery_once(tmp_path: Path) -> None:
    port = free_port()
    engine, sessions, spool = _queue(tmp_path, 4, port)
    pacs = _SlowPacs().start(port)
    # Two processes' worth: each dispatcher on its own engine.
    # str(url) hides the password: a server database would refuse the second login.
    other_engine = db.make_engine(engine.url.render_as_string(hide_password=False))
    dispatchers = [
        Dispatcher(factory, spool, RetryConfig(), calling_ae="ICHNODE", timeout=10)
        for factory in (sessions, db.session_factory(other_engine))
    ]
    start = threading.Barrier(len(dispatchers))
    sent: list[int] = []

    def run(dispatcher: Dispatcher) -> None:
        start.wait()
        sent.append(dispatcher.run_once())

    threads = [threading.Thread(target=run, args=(d,)) for d in dispatchers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(sent) == [0, 4]
        assert len(pacs.records) == 4
        rows = deliveries(sessions)
        assert [(r.state, r.attempts) for r in rows] == [(db.SENT, 1)] * 4
    finally:
        pacs.stop()
        other_engine.dispose()
        engine.dispose()


def test_a_delivery_left_sending_by_a_crash_is_requeued_and_sent(tmp_path: Path, recorder) -> None:
    pacs = recorder()
    engine, sessions, spool = _queue(tmp_path, 1, pacs.port)
    _set_state(sessions, db.SENDING)  # what a dispatcher killed during its C-STORE leaves
    dispatcher = Dispatcher(sessions, spool, RetryConfig(), calling_ae="ICHNODE", timeout=5)
    try:
        assert dispatcher.run_once() == 0  # another dispatcher's, for all this one knows
        assert requeue_interrupted(sessions, RetryConfig()) == 1
        assert dispatcher.run_once() == 1
        (row,) = deliveries(sessions)
        assert (row.state, row.attempts) == (db.SENT, 2)  # the interrupted try and this one
        assert requeue_interrupted(sessions, RetryConfig()) == 0
        assert len(pacs.stored()) == 1
    finally:
        engine.dispose()


def test_a_node_started_after_a_dispatcher_crash_sends_what_it_left_sending(
    tmp_path: Path, nodes: Nodes, recorder
) -> None:
    pacs = recorder()
    _, config = nodes.config(tmp_path, reports={"destinations": [pacs.destination]})
    engine, sessions, _ = _queue(tmp_path, 1, pacs.port)  # the node's database and spool
    _set_state(sessions, db.SENDING)
    engine.dispose()
    node = nodes.start(config, components=("dispatcher",))
    (row,) = wait_deliveries(node.sessions, _all_sent(1), timeout=30, message="the interrupted delivery sent")
    assert row.attempts == 2
    assert pacs.stored_counts() == {row.sop_instance_uid: 1}


def test_a_delivery_interrupted_at_every_start_is_dead_lettered(tmp_path: Path) -> None:
    # A report whose sending brings the node down each time is not retried for ever.
    retry = RetryConfig(max_attempts=3)
    engine, sessions, _ = _queue(tmp_path, 1, free_port())
    try:
        for attempt in range(1, 4):
            _set_state(sessions, db.SENDING)  # the dispatcher dies during the C-STORE
            assert requeue_interrupted(sessions, retry) == 1  # the next start
            (row,) = deliveries(sessions)
            assert (row.state, row.attempts) == (db.QUEUED if attempt < 3 else db.DEAD, attempt)
        assert row.last_error == "interrupted: the dispatcher stopped during the C-STORE"
    finally:
        engine.dispose()


def test_of_a_batch_left_sending_only_the_report_on_the_wire_is_charged(tmp_path: Path) -> None:
    # A batch claims all of a destination's due reports and sends them in
    # order: after a crash, the first still sending was on the wire.
    engine, sessions, _ = _queue(tmp_path, 3, free_port(), also=[("ARCHIVE", free_port())])
    try:
        _set_state(sessions, db.SENDING)
        assert requeue_interrupted(sessions, RetryConfig()) == 6
        rows = sorted(deliveries(sessions), key=lambda r: (r.ae_title, r.id))
        assert [(r.ae_title, r.state, r.attempts) for r in rows] == [
            ("ARCHIVE", db.QUEUED, 1),
            ("ARCHIVE", db.QUEUED, 0),
            ("ARCHIVE", db.QUEUED, 0),
            ("TEST_PACS", db.QUEUED, 1),
            ("TEST_PACS", db.QUEUED, 0),
            ("TEST_PACS", db.QUEUED, 0),
        ]
    finally:
        engine.dispose()


def test_a_failed_try_the_database_refuses_to_record_is_queued_again_next_round(tmp_path: Path) -> None:
    engine, sessions, spool = _queue(tmp_path, 2, free_port())  # nobody listens there
    dispatcher = Dispatcher(sessions, spool, RetryConfig(), calling_ae="ICHNODE", timeout=5)
    failed = dispatcher._failed

    def locked(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("UPDATE delivery", {}, Exception("database is locked"))

    dispatcher._failed = locked
    try:
        assert dispatcher.run_once() == 0  # nothing escapes the round
        assert [r.state for r in deliveries(sessions)] == [db.SENDING] * 2
        dispatcher._failed = failed
        assert dispatcher.run_once(now=db.utcnow() + dt.timedelta(days=1)) == 0
        assert [(r.state, r.attempts) for r in deliveries(sessions)] == [(db.QUEUED, 1)] * 2
    finally:
        engine.dispose()


class _DatabaseOutage:
    """The database of ``engine`` fails from the first time a delivery is recorded sent,
    for ``statements`` statements, or, with None, until :meth:`end`."""

    def __init__(self, engine: Any, statements: int | None) -> None:
        self.engine = engine
        self.statements = statements
        self.failed = 0
        self.ended = False
        event.listen(engine, "before_cursor_execute", self._execute)

    def _execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        starts = statement.startswith("UPDATE delivery SET state") and "sent_at" in statement
        if self.ended or not (self.failed or starts) or self.failed == self.statements:
            return
        self.failed += 1
        raise OperationalError(statement, {}, Exception("disk I/O error"))

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            event.remove(self.engine, "before_cursor_execute", self._execute)


@pytest.mark.parametrize(
    "statements, stored_in_the_first_round",
    [(1, 2), (2, 1), (None, 1)],
    ids=["for-that-update", "for-that-update-and-the-next", "for-the-rest-of-the-round"],
)
def test_a_report_stored_while_the_database_fails_is_recorded_sent_and_not_sent_again(
    tmp_path: Path, recorder, statements: int | None, stored_in_the_first_round: int
) -> None:
    pacs = recorder()
    engine, sessions, spool = _queue(tmp_path, 2, pacs.port)
    first, second = (r.sop_instance_uid for r in deliveries(sessions))
    dispatcher = Dispatcher(sessions, spool, RetryConfig(), calling_ae="ICHNODE", timeout=5)
    outage = _DatabaseOutage(engine, statements)
    try:
        dispatcher.run_once()  # the PACS stores the first report; recording that fails
        assert outage.failed, "the database did not fail"
        if statements is None:  # a round while it is still down sends and claims nothing, and says why
            with pytest.raises(OperationalError, match="disk I/O error"):
                dispatcher.run_once(now=db.utcnow() + dt.timedelta(days=1))
        outage.end()
        assert [r.sop_instance_uid for r in pacs.stored()] == [first, second][:stored_in_the_first_round]
        # Not queued again: no round, of this dispatcher or another, sends it a second time.
        assert deliveries(sessions)[0].state == db.SENDING

        dispatcher.run_once(now=db.utcnow() + dt.timedelta(days=1))  # whatever backoff was recorded is over
        assert pacs.stored_counts() == {first: 1, second: 1}
        rows = deliveries(sessions)
        assert [r.state for r in rows] == [db.SENT, db.SENT]
        assert rows[0].attempts == 1 and rows[0].last_error is None
    finally:
        outage.end()
        engine.dispose()


# -- a destination that does not answer, or stops reading -------------------------------
@contextmanager
def _unanswering_peer() -> Iterator[int]:
    """A port whose connections the kernel completes and nobody ever answers (a hung
    PACS); on exit they are reset, so an association still waiting ends at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def _add_report(node: Any, result_id: int, ae_title: str, port: int) -> None:
    """One more report queued for a destination, as the worker queues a new result's."""
    with db.transaction(node.sessions) as session:
        session.add(_delivery(result_id, *_report(node.spool, node.spool.root, generate_uid()), ae_title, port))


def _states(rows: list[db.Delivery], ae_title: str) -> list[str]:
    return [r.state for r in rows if r.ae_title == ae_title]


def test_a_destination_that_never_answers_holds_back_no_other(tmp_path: Path, nodes: Nodes, recorder) -> None:
    from ichnode.service import Node

    good = recorder("GOOD")
    # AAA_HUNG's request stays unanswered all through the test.
    _, config = nodes.config(tmp_path, reports={"timeout_seconds": 600})
    with _unanswering_peer() as hung_port:
        # AAA_HUNG sorts first: the order in which destinations are looked at.
        engine, _, _ = _queue(tmp_path, 1, hung_port, "AAA_HUNG", also=[("GOOD", good.port)])
        engine.dispose()
        node = Node(config, components=("dispatcher",))
        nodes.started.append(node)
        assert node.dispatcher.timeout == 600
        node.start()
        rows = wait_deliveries(
            node.sessions, lambda rows: _states(rows, "GOOD") == [db.SENT], timeout=60, message="GOOD's first report"
        )
        # New reports for both while AAA_HUNG's request still waits: GOOD's go at once.
        for ae_title, port in (("AAA_HUNG", hung_port), ("GOOD", good.port)):
            _add_report(node, rows[0].result_id, ae_title, port)
        rows = wait_deliveries(
            node.sessions, lambda rows: _states(rows, "GOOD") == [db.SENT] * 2, timeout=60, message="GOOD's next report"
        )
        assert len(good.stored()) == 2
        # No second association to AAA_HUNG while the first waits: its new report stays queued.
        assert [(r.state, r.attempts) for r in rows if r.ae_title == "AAA_HUNG"] == [(db.SENDING, 0), (db.QUEUED, 0)]


def test_a_destination_that_never_answers_is_recorded_as_such(tmp_path: Path) -> None:
    with _unanswering_peer() as port:
        engine, sessions, spool = _queue(tmp_path, 1, port)
        dispatcher = Dispatcher(sessions, spool, RetryConfig(), calling_ae="ICHNODE", timeout=1)
        try:
            assert dispatcher.run_once() == 0
            (row,) = deliveries(sessions)
            assert (row.state, row.attempts) == (db.QUEUED, 1)
            assert row.last_error == f"TEST_PACS@127.0.0.1:{port} did not answer the association request within 1 s"
        finally:
            engine.dispose()


class _StalledPacs(Recorder):
    """A PACS that stops reading at the first data of an association until :meth:`stop`:
    a dataset larger than the socket buffers then never leaves the sender."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def start(self, port: int = 0) -> _StalledPacs:
        super().start(port)
        self.server.bind(evt.EVT_DATA_RECV, self._on_data)
        return self

    def _on_data(self, event: Any) -> None:
        if event.data[:1] == b"\x04":  # a P-DATA-TF PDU: the C-STORE has begun
            self.released.wait(120)

    def stop(self) -> None:
        self.released.set()
        super().stop()


def test_a_destination_that_stops_reading_mid_dataset_does_not_hang_the_dispatcher(tmp_path: Path) -> None:
    pacs = _StalledPacs().start()
    # 32 MB: more than the loopback socket buffers hold.
    engine, sessions, spool = _queue(tmp_path, 1, pacs.port, pixels=4096)
    dispatcher = Dispatcher(sessions, spool, RetryConfig(), calling_ae="ICHNODE", timeout=2)
    round_ = threading.Thread(target=dispatcher.run_once, daemon=True)
    try:
        round_.start()
        round_.join(timeout=60)
        assert not round_.is_alive(), "the dispatcher is still blocked sending to a peer that stopped reading"
        (row,) = deliveries(sessions)
        assert (row.state, row.attempts) == (db.QUEUED, 1)
        assert "C-STORE" in row.last_error
    finally:
        pacs.stop()
        round_.join(timeout=60)
        engine.dispose()


# -- dead letters sent again -------------------------------------------------------------
def _status_lines(config_path: Path) -> list[str]:
    out = run_cli(["status", "--config", str(config_path)])
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _requeue(config_path: Path, *args: str) -> list[str]:
    out = run_cli(["requeue", "--config", str(config_path), *args])
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_dead_letters_requeued_from_the_command_line_are_sent_by_the_running_node(
    tmp_path: Path, nodes: Nodes, recorder
) -> None:
    port = free_port()  # the PACS is down for longer than the retries last
    retry = {"first_delay_s": 0.1, "max_delay_s": 0.2, "max_attempts": 2}
    config_path, config = nodes.config(tmp_path, reports={"retry": retry})
    engine, _, spool = _queue(tmp_path, 2, port, "GONE_PACS")
    engine.dispose()
    node = nodes.start(config, components=("dispatcher",))
    rows = wait_deliveries(node.sessions, lambda rows: all(r.state == db.DEAD for r in rows), message="dead letters")
    # status names each dead letter's file, for `ichnode send` or to see it is still there.
    dead_lines = [line for line in _status_lines(config_path) if line.startswith("dead letter")]
    assert sorted(dead_lines) == sorted(
        f"dead letter  {r.sop_instance_uid} to GONE_PACS@127.0.0.1:{port} after 2 attempts: {r.last_error}; "
        f"file {spool.absolute(r.path)}"
        for r in rows
    )

    pacs = recorder("GONE_PACS", port=port)  # back
    assert _requeue(config_path) == ["requeued 2 dead letters"]
    rows = wait_deliveries(node.sessions, _all_sent(2), timeout=30, message="the requeued reports sent")
    assert [r.attempts for r in rows] == [1, 1]
    assert pacs.stored_counts() == {r.sop_instance_uid: 1 for r in rows}
    assert not [line for line in _status_lines(config_path) if line.startswith("dead letter")]


def test_requeue_takes_one_destination_and_leaves_what_cannot_be_sent(tmp_path: Path, nodes: Nodes) -> None:
    config_path, _ = nodes.config(tmp_path)
    engine, sessions, spool = _queue(tmp_path, 2, 104, "PACS_A", also=[("PACS_B", 104)])
    try:
        _set_state(sessions, db.DEAD)
        gone = deliveries(sessions)[0]  # one of PACS_A's
        spool.absolute(gone.path).unlink()  # e.g. removed by retention
        gone_line = (
            f"not requeued, its report file is gone: {gone.sop_instance_uid} to PACS_A@127.0.0.1:104 "
            f"({spool.absolute(gone.path)})"
        )

        assert _requeue(config_path, "--destination", "PACS_A@127.0.0.1:104") == ["requeued 1 dead letter", gone_line]
        # PACS_A's two, then PACS_B's two
        assert [r.state for r in deliveries(sessions)] == [db.DEAD, db.QUEUED, db.DEAD, db.DEAD]
        assert f"{spool.absolute(gone.path)} (deleted)" in "\n".join(_status_lines(config_path))

        # A dead letter of a result since replaced by a newer one is not sent after it.
        with db.transaction(sessions) as session:
            session.execute(update(db.SeriesResult).values(superseded=True))
        lines = _requeue(config_path)
        assert lines[0] == "requeued 0 dead letters"
        assert [line.split(":")[0] for line in lines[1:]] == ["not requeued, its series has a newer result"] * 3
        assert [r.state for r in deliveries(sessions)] == [db.DEAD, db.QUEUED, db.DEAD, db.DEAD]
    finally:
        engine.dispose()


def test_requeue_leaves_dead_a_letter_whose_result_is_superseded_while_it_looks(tmp_path: Path) -> None:
    # The worker stores a newer result between requeue's check and its update.
    from ichnode.dispatch import requeue_dead

    engine, sessions, spool = _queue(tmp_path, 1, 104)
    other = db.make_engine(f"sqlite:///{tmp_path / 'ichnode.db'}")

    def newer_result_stored(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE delivery SET state"):
            with other.begin() as worker:
                worker.execute(update(db.SeriesResult).values(superseded=True))

    try:
        _set_state(sessions, db.DEAD)
        event.listen(engine, "before_cursor_execute", newer_result_stored)
        found = requeue_dead(sessions, spool.root)
        assert (len(found.requeued), len(found.superseded)) == (0, 1)
        assert [r.state for r in deliveries(sessions)] == [db.DEAD]
    finally:
        event.remove(engine, "before_cursor_execute", newer_result_stored)
        other.dispose()
        engine.dispose()


# -- where reports go -------------------------------------------------------------------
def test_reports_return_to_the_sender(nodes: Nodes, recorder) -> None:
    scanner = recorder("CT_SCANNER")
    series = phantom(36)
    node = nodes.start(
        access={"allow": [{"ae_title": "CT_SCANNER", "host": "127.0.0.1", "port": scanner.port}]},
        reports={"return_to_sender": True, "destinations": []},
    )
    assert store_files(node.port, series.datasets, calling_ae="CT_SCANNER") == [0x0000] * len(series.datasets)
    rows = wait_deliveries(node.sessions, _all_sent(2), message="reports returned to the sender")
    assert {(r.ae_title, r.host, r.port) for r in rows} == {("CT_SCANNER", "127.0.0.1", scanner.port)}
    assert scanner.stored_counts() == {r.sop_instance_uid: 1 for r in rows}
    assert all(r.dataset.StudyInstanceUID == series.datasets[0].StudyInstanceUID for r in scanner.stored())


# -- kill -9 between scoring and delivery -------------------------------------------------
def test_kill_9_between_scoring_and_delivery_delivers_each_report_exactly_once(
    tmp_path: Path, nodes: Nodes, recorder
) -> None:
    shared_model()  # loaded here, before the clock of the subprocess start runs
    pacs_port = free_port()
    studies = [phantom(37), phantom(38, hemorrhage=())]
    process = IchnodeProcess(
        tmp_path / "node",
        stable_seconds=1.0,
        start_timeout=180,
        config={
            "storage": {"min_free_mb": 0},
            "series": {"check_interval_seconds": 0.1},
            "reports": {
                "destinations": [{"ae_title": "TEST_PACS", "host": "127.0.0.1", "port": pacs_port}],
                "retry": FAST_RETRY,
            },
        },
    )
    process.start()
    engine = db.make_engine(f"sqlite:///{process.db_path}")
    try:
        for series in studies:
            assert store_files(process.port, series.datasets) == [0x0000] * len(series.datasets)
        # Scored, reports written and queued, the destination still down.
        wait_deliveries(
            db.session_factory(engine),
            lambda rows: len(rows) == 4 and all(r.attempts >= 1 and r.state == db.QUEUED for r in rows),
            message="four queued deliveries",
        )
        helpers = _children(process.pid)
        assert helpers, "the worker's helper processes are running"
        assert process.kill() == -signal.SIGKILL
        # They do not outlive the node.
        wait_for(lambda: not any(_alive(pid) for pid in helpers), timeout=15, message="the helpers to exit")
    finally:
        engine.dispose()
        process.stop()

    pacs = recorder(port=pacs_port)
    config = parse_config(process.config, base=process.workdir)
    node = nodes.start(config)
    rows = wait_deliveries(node.sessions, _all_sent(4), message="every report delivered after the restart")
    assert pacs.stored_counts() == {r.sop_instance_uid: 1 for r in rows}
    for series in studies:
        (result,) = results_of(node.sessions, _series_uid(series))  # scored once, not again
        assert (result.status, result.version) == (db.SCORED, 1)


def _unconfigured(counts: str, address: str) -> str:
    return (
        f"{counts} to {address}, which is not a configured report destination (reports.destinations); "
        f"ichnode requeue --destination {address} --to AE@HOST:PORT sends them elsewhere"
    )


def test_requeue_to_sends_dead_letters_to_the_corrected_destination(tmp_path: Path, nodes: Nodes, recorder) -> None:
    # The reports went dead at a wrong port; the admin corrects reports.destinations.
    old = free_port()  # nothing listens there
    pacs = recorder("PACS")
    retry = {"first_delay_s": 0.1, "max_delay_s": 0.2, "max_attempts": 2}
    config_path, config = nodes.config(tmp_path, reports={"destinations": [pacs.destination], "retry": retry})
    engine, _, _ = _queue(tmp_path, 2, old, "PACS")
    engine.dispose()
    node = nodes.start(config, components=("dispatcher",))
    wait_deliveries(node.sessions, lambda rows: all(r.state == db.DEAD for r in rows), message="dead letters")
    # status says that they go to an address the configuration no longer names.
    assert f"warning      {_unconfigured('2 dead', f'PACS@127.0.0.1:{old}')}" in _status_lines(config_path)

    out = run_cli(["requeue", "--config", str(config_path), "--to", f"PACS@127.0.0.1:{pacs.port}"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"requeued 2 dead letters to PACS@127.0.0.1:{pacs.port}"]
    assert out.stderr == ""  # nothing goes to an old address any more
    rows = wait_deliveries(node.sessions, _all_sent(2), timeout=30, message="the requeued reports sent")
    assert {(r.ae_title, r.host, r.port, r.attempts) for r in rows} == {("PACS", "127.0.0.1", pacs.port, 1)}
    assert pacs.stored_counts() == {r.sop_instance_uid: 1 for r in rows}
    assert not [line for line in _status_lines(config_path) if line.startswith("warning")]


def test_requeue_warns_of_old_addresses_and_redirects_what_is_still_queued(tmp_path: Path, nodes: Nodes) -> None:
    corrected = {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}
    config_path, _ = nodes.config(tmp_path, reports={"destinations": [corrected]})
    engine, sessions, _ = _queue(tmp_path, 2, 104, "PACS", also=[("OTHER", 104)])
    try:
        with db.transaction(sessions) as session:
            session.execute(update(db.Delivery).values(state=db.DEAD, attempts=20, last_error="connection refused"))
        # Reports meant for two PACS are never all sent to one.
        out = run_cli(["requeue", "--config", str(config_path), "--to", "PACS@127.0.0.1:11112"])
        assert out.returncode == 1
        assert out.stderr.splitlines() == [
            "Error: the dead letters go to OTHER@127.0.0.1:104, PACS@127.0.0.1:104; "
            "choose one of them with --destination"
        ]
        assert {r.state for r in deliveries(sessions)} == {db.DEAD}

        # Without --to, the letters go to the address they were made with, and requeue says so.
        out = run_cli(["requeue", "--config", str(config_path), "--destination", "PACS@127.0.0.1:104"])
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["requeued 2 dead letters"]
        assert out.stderr.splitlines() == [
            f"warning: {_unconfigured('2 dead', 'OTHER@127.0.0.1:104')}",
            f"warning: {_unconfigured('2 queued', 'PACS@127.0.0.1:104')}",
        ]

        # What the warning says to run moves those still queued too, as new.
        lines = _requeue(config_path, "--destination", "PACS@127.0.0.1:104", "--to", "PACS@127.0.0.1:11112")
        assert lines == [
            "requeued 0 dead letters to PACS@127.0.0.1:11112",
            "redirected 2 queued deliveries to PACS@127.0.0.1:11112",
        ]
        assert [(r.ae_title, r.port, r.state, r.attempts) for r in deliveries(sessions)] == [
            ("PACS", 11112, db.QUEUED, 0),
            ("PACS", 11112, db.QUEUED, 0),
            ("OTHER", 104, db.DEAD, 20),
            ("OTHER", 104, db.DEAD, 20),
        ]
    finally:
        engine.dispose()
