"""``ichnode serve`` as a process: stopping it while it works, and starting it where it cannot listen."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ichnode import db
from tests.conftest import config_data, open_db, run_cli, store_files, wait_for, write_config
from tests.pipeline_support import PIPELINE_WARNINGS, phantom, write_series

pytestmark = PIPELINE_WARNINGS


@pytest.fixture
def series_states(tmp_path: Path) -> Any:
    """The states of the series in the database of a node made by ``node_process()``."""
    engine, sessions = open_db(f"sqlite:///{tmp_path / 'ichnode.db'}")

    def states() -> list[str]:
        with sessions() as session:
            return list(session.scalars(select(db.Series.state)))

    yield states
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("to", ["node", "group"])
def test_sigterm_while_a_series_is_scored_exits_cleanly(
    node_process: Any, series_states: Any, tmp_path: Path, to: str
) -> None:
    # The scoring job wakes the delivery job when it is done; a shutdown that
    # waited for it while holding the scheduler's lock never returned. Sent
    # to the whole process group (Ctrl-C in a terminal, or systemd's default
    # kill mode), the signal must not kill the helper processes mid-series.
    series = phantom(7, n_slices=53)
    files = write_series(series.datasets, tmp_path / "series")
    node = node_process()
    node.components = "receiver,worker,dispatcher"
    node.start(timeout=180)
    assert set(store_files(node.port, files)) == {0x0000}
    wait_for(lambda: series_states() == [db.PROCESSING], timeout=60, interval=0.005, message="the worker to take it")
    if to == "node":
        node.signal(signal.SIGTERM)
    else:
        node.signal_group(signal.SIGINT)
    # The scoring under way finishes first (a few seconds here); a hang fails at the timeout.
    assert node.wait(timeout=90) == 0, node.log()
    log = node.log()
    assert ("received SIGTERM" if to == "node" else "received SIGINT") in log
    assert "stopped" in log
    assert "helper process died" not in log


def test_sighup_to_every_process_of_the_node_leaves_it_running(
    node_process: Any, series_states: Any, tmp_path: Path
) -> None:
    # logrotate's postrotate, `systemctl kill -s HUP`: by default SIGHUP would
    # end the node at once, a stop systemd takes as clean (no restart).
    series = phantom(8, n_slices=12)
    unreached = {"ae_title": "PACS", "host": "127.0.0.1", "port": 9}
    node = node_process(node={"receiver_processes": 2}, reports={"destinations": [unreached]})
    node.components = "receiver,worker,dispatcher"
    node.start(timeout=180)
    wait_for(lambda: "receiver-1" in node.log(), timeout=60, message="the second receiver process")
    node.signal_group(signal.SIGHUP)
    time.sleep(1.0)
    # Every process of the node lives on: still receiving and scoring, helpers included.
    group = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _process_group_of(int(pid)) == node.proc.pid]
    assert len(group) >= 4 and all(_state_of(pid) != "Z" for pid in group)  # node, receiver-1, helpers, tracker
    assert set(store_files(node.port, write_series(series.datasets, tmp_path / "series"))) == {0x0000}
    wait_for(lambda: series_states() == [db.SCORED], timeout=120, message="the series scored")
    wait_for(lambda: "to PACS@127.0.0.1:9 failed (attempt 1)" in node.log(), timeout=60, message="a failed delivery")
    node.signal(signal.SIGTERM)
    assert node.wait(timeout=90) == 0, node.log()
    log = node.log()
    assert "helper process died" not in log
    # The failed delivery is told once, by the node, naming the destination: not by pynetdicom too.
    assert "ERROR pynetdicom" not in log


def _process_group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _state_of(pid: int) -> str:
    """A process's state letter (Z: a zombie, dead and not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_sighup_while_the_node_starts_leaves_it_running(node_process: Any) -> None:
    # While the model loads (seconds), before the node is up.
    import threading

    node = node_process()
    node.components = "receiver,worker"
    hangup = threading.Timer(2.0, node.signal, args=(signal.SIGHUP,))
    hangup.start()
    node.start(timeout=180)  # fails if the node ended
    hangup.join()
    node.signal(signal.SIGTERM)
    assert node.wait(timeout=90) == 0, node.log()


def test_uids_longer_than_64_characters_do_not_flood_the_log() -> None:
    # pydicom warns of them in other words than of other non-conformant UIDs.
    import subprocess
    import sys

    script = (
        "from ichnode.logs import setup_logging; setup_logging('INFO')\n"
        "from pydicom.dataset import Dataset\n"
        "ds = Dataset(); ds.SOPInstanceUID = '1.2.' + '3' * 66; ds.SeriesInstanceUID = 'ID_1f6d1e8aeb'\n"
        "print('set')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "set\n", "")


@pytest.mark.slow
def test_a_stop_finishes_the_series_in_hand_and_leaves_the_rest_for_the_next_start(
    node_process: Any, series_states: Any, tmp_path: Path
) -> None:
    # A backlog of complete series: the stop waits for the ones being scored,
    # not for the whole backlog, which could outlast systemd's stop timeout.
    # Two helpers: the worker holds 4 series at once, whatever the machine.
    node = node_process(model={"worker_processes": 2})
    node.start()
    for seed in range(12):
        files = write_series(phantom(100 + seed).datasets, tmp_path / f"series{seed}")
        assert set(store_files(node.port, files)) == {0x0000}
    wait_for(lambda: series_states().count(db.COMPLETE) == 12, timeout=30, message="12 complete series")
    node.signal(signal.SIGTERM)
    assert node.wait(timeout=30) == 0
    node.components = "receiver,worker,dispatcher"
    node.start(timeout=180)
    wait_for(lambda: db.PROCESSING in series_states(), timeout=60, interval=0.005, message="the worker to start")
    node.signal(signal.SIGTERM)
    assert node.wait(timeout=90) == 0, node.log()
    left = series_states()
    assert db.PROCESSING not in left  # what the worker held, it finished
    assert left.count(db.SCORED) >= 1 and left.count(db.COMPLETE) >= 1, left


@pytest.fixture
def taken_port() -> Any:
    """A port another program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


@pytest.mark.parametrize("components", ["receiver", "receiver,worker,dispatcher"])
def test_serve_on_a_port_in_use_names_the_key(tmp_path: Path, taken_port: int, components: str) -> None:
    path = write_config(tmp_path / "ichnode.yaml", config_data(tmp_path, port=taken_port))
    result = run_cli(["serve", "--config", str(path), "--components", components], timeout=180)
    assert result.returncode == 1, result.stderr
    assert f"Error: cannot listen on 127.0.0.1:{taken_port} (node.host/node.port): Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "cannot schedule new futures" not in result.stderr


def test_serve_on_an_unknown_host_names_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path / "ichnode.yaml", config_data(tmp_path, node={"host": "no-such-host.invalid"}))
    result = run_cli(["serve", "--config", str(path), "--components", "receiver"])
    assert result.returncode == 1, result.stderr
    assert "Error: cannot listen on no-such-host.invalid:0 (node.host/node.port)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("role", ["worker", "dispatcher"])
def test_a_second_worker_or_dispatcher_on_one_spool_is_refused(tmp_path: Path, role: str) -> None:
    # A second worker would remove the first's volumes in transit and requeue
    # its series; a second dispatcher would requeue deliveries being sent.
    from ichnode.config import parse_config
    from ichnode.service import Node
    from ichnode.spool import SpoolInUse
    from tests.pipeline_support import shared_model

    config = parse_config(config_data(tmp_path), base=tmp_path)
    model = shared_model() if role == "worker" else None
    first = Node(config, components=(role,), model=model)
    try:
        with pytest.raises(SpoolInUse, match=f"another ichnode {role} is running on the spool"):
            Node(config, components=(role,), model=model)
    finally:
        first.stop()
    Node(config, components=(role,), model=model).stop()  # once the first has stopped


def test_processes_starting_together_on_a_new_sqlite_database_all_open_it(tmp_path: Path) -> None:
    # Stages started as separate services (systemd units at boot) on a fresh install.
    from tests.postgres_support import open_together

    urls = [f"sqlite:///{tmp_path}/together-{attempt}.db" for attempt in range(4)]
    for url, outcomes in open_together(urls, processes=3).items():
        assert [detail for state, detail in outcomes if state != "ok"] == [], url
        installations = {detail for _, detail in outcomes}
        assert len(installations) == 1 and len(installations.pop()) == 32, outcomes


def test_a_new_database_over_a_spool_that_holds_images_is_refused(tmp_path: Path, start_node: Any) -> None:
    # Moving to PostgreSQL, or a damaged ichnode.db replaced by an empty one,
    # with the spool kept: every retained image would be indexed as new and
    # every series scored and reported to the PACS again, under new UIDs.
    from ichnode.config import parse_config
    from ichnode.service import Node
    from ichnode.spool import SpoolOfAnotherDatabase

    node = start_node()
    assert store_files(node.port, phantom(6, n_slices=3).datasets) == [0] * 3
    node.stop()
    moved = config_data(tmp_path, database={"url": f"sqlite:///{tmp_path / 'new.db'}"})
    moved_path = write_config(tmp_path / "moved.yaml", moved)
    # check-config sees it, reading the spool and the database without making either.
    checked = run_cli(["check-config", "--config", str(moved_path)])
    assert checked.returncode == 1
    assert "holds the images of another database" in checked.stderr
    assert "storage.spool_dir" in checked.stderr and "database.url" in checked.stderr
    result = run_cli(["serve", "--config", str(moved_path)])
    assert result.returncode == 1
    assert "cannot start: the spool" in result.stderr and "holds the images of another database" in result.stderr
    assert "point database.url back to it" in result.stderr
    # The refused start made no database, so status still says the configuration has none.
    status = run_cli(["status", "--config", str(moved_path)])
    assert status.returncode == 1 and f"no database at {tmp_path / 'new.db'}" in status.stderr
    # A database that has no tables yet (a new PostgreSQL database) is given none.
    (tmp_path / "new.db").write_bytes(b"")
    with pytest.raises(SpoolOfAnotherDatabase):
        Node(parse_config(moved, tmp_path), components=("receiver",))
    with pytest.raises(db.DatabaseUnreadable, match="is not an ichnode database"):
        db.open_existing(moved["database"]["url"])
    # On its own database, the spool is its own.
    own = run_cli(["check-config", "--config", str(write_config(tmp_path / "own.yaml", config_data(tmp_path)))])
    assert own.returncode == 0, own.stderr
    start_node().stop()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # this process writing and sending them
def test_non_conformant_uids_do_not_flood_the_log_of_any_receiver_process(node_process: Any, tmp_path: Path) -> None:
    # RSNA-style "ID_..." UIDs are accepted by design; pydicom and pynetdicom
    # would log a dozen warnings per image, in the main process and in the
    # extra receiver processes alike, hiding the warnings that matter.
    from tests.test_cli import _id_uid_file

    node = node_process(node={"receiver_processes": 2}, access={"allow": [{"ae_title": "*"}]})
    node.start()
    sent = 0

    def received_by_the_second_process() -> bool:
        # The kernel spreads associations over the processes by source address and port.
        nonlocal sent
        sent += 1
        source = f"127.0.0.{1 + sent}"
        assert store_files(node.port, [_id_uid_file(tmp_path / f"b{sent:08x}.dcm")], source_host=source) == [0]
        return f"receiver-1 ichnode.receiver: association from TEST_SCU@{source}" in node.log()

    wait_for(received_by_the_second_process, timeout=60, interval=0, message="an association in receiver-1")
    log = node.log()
    assert "Invalid value for VR UI" not in log
    assert "Non-conformant" not in log
    assert "UserWarning" not in log
    assert "apscheduler" not in log


@pytest.mark.slow
def test_non_conformant_uids_do_not_flood_the_log_of_the_helpers_building_reports(
    node_process: Any, series_states: Any
) -> None:
    # The helper processes are spawned: they build the SR of such a series
    # without the main process's log set-up unless they make their own.
    from ichnode.scu import send_files
    from tests.conftest import require_data

    files = sorted(require_data("rsna-series").glob("*.dcm"))
    node = node_process(reports={"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 9}]})
    node.components = "receiver,worker"
    node.start(timeout=180)
    # As `ichnode send` sends them: their SOP Class UID is in the file meta only.
    assert send_files(files, "ICHNODE", "127.0.0.1", node.port, timeout=30).all_stored
    wait_for(lambda: series_states() == [db.SCORED], timeout=120, message="the RSNA series scored")
    wait_for(lambda: "scored (version 1" in node.log(), timeout=30, message="its result logged")
    log = node.log()
    assert "Invalid value for VR UI" not in log
    assert "UserWarning" not in log


def test_a_series_part_of_which_was_refused_for_want_of_room_waits_for_the_rest(
    start_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The spool fills while a series arrives: the rest is refused. Completed
    # and scored from its first half, the series would be reported as a whole
    # head; it waits, and for a while once there is room again, for the rest.
    from ichnode import service
    from tests.conftest import wait_series_state

    monkeypatch.setattr(service, "ROOM_GRACE_SECONDS", 5.0)
    series = phantom(6, n_slices=12)
    uid = str(series.datasets[0].SeriesInstanceUID)
    node = start_node(series={"stable_seconds": 0.5})
    assert store_files(node.port, series.datasets[:6]) == [0] * 6
    room = node.spool.min_free_mb
    node.spool.min_free_mb = 2**40  # the rest refused: an association is, when the spool lacks room
    with pytest.raises(AssertionError, match="association to ICHNODE"):
        store_files(node.port, series.datasets[6:])
    time.sleep(1.5)  # three times stable_seconds
    assert series_state(node, uid) == db.RECEIVING
    # Room again (the node restarted too), but the sender has not sent the rest yet.
    node.stop()
    node = start_node(config=node.config)
    assert node.spool.min_free_mb == room
    time.sleep(1.5)
    assert series_state(node, uid) == db.RECEIVING
    assert store_files(node.port, series.datasets[6:]) == [0] * 6
    assert wait_series_state(node, uid, db.COMPLETE, instance_count=12).version == 1


def test_a_database_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A database server down for an hour fails every stage at every tick
    # (0.1 s here): two lines in the log, not a traceback per stage per tick,
    # also while a report the PACS stored waits to be recorded sent.
    import logging
    from types import SimpleNamespace

    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from ichnode.config import parse_config
    from ichnode.service import Node

    node = Node(parse_config(config_data(tmp_path), base=tmp_path), components=("receiver", "dispatcher"))
    node.start()
    try:
        working = node.sessions
        stored = SimpleNamespace(id=1, attempts=0, kind="sr", sop_instance_uid="1.2.3", ae_title="PACS",
                                 host="127.0.0.1", port=104)  # fmt: skip
        node.dispatcher._acknowledged.append(stored)
        with caplog.at_level(logging.INFO):
            node.sessions = node.dispatcher.sessions = sessionmaker(
                create_engine(f"sqlite:///{tmp_path}/no/such/folder/ichnode.db")
            )
            wait_for(lambda: "the database fails" in caplog.text, timeout=10, message="the outage logged")
            time.sleep(1.0)  # ten more failing ticks
            node.sessions = node.dispatcher.sessions = working
            wait_for(lambda: "the database answers again" in caplog.text, timeout=10, message="the recovery logged")
            wait_for(lambda: not node.dispatcher._acknowledged, timeout=10, message="the stored report recorded")
    finally:
        node.stop(grace_seconds=1)
    ours = [r for r in caplog.records if r.name.startswith("ichnode") and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in ours] == [
        "the database fails (unable to open database file); every stage tries again at each tick"
    ]
    assert len([r for r in caplog.records if "the database answers again" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_the_system_clock_set_back_holds_no_stage_back(start_node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # An NTP correction or a restored virtual machine steps the wall clock
    # back: the scheduler's next ticks, and a series' last receipt, then lie
    # that far in the future. Without a catch-up nothing completes until then.
    import datetime as dt

    from sqlalchemy import update

    from ichnode import service

    stepped = [0.0]
    real = service.wall_minus_monotonic
    monkeypatch.setattr(service, "wall_minus_monotonic", lambda: real() - stepped[0])
    node = start_node(series={"stable_seconds": 1})
    series = phantom(5, n_slices=3)
    assert store_files(node.port, series.datasets) == [0] * 3
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    with db.transaction(node.sessions) as session:  # stamped before the clock went back 10 minutes
        session.execute(update(db.Series).values(last_received_at=later.replace(tzinfo=None)))
    for job in node.scheduler.get_jobs():
        job.modify(next_run_time=later)
    stepped[0] = 600.0
    uid = str(series.datasets[0].SeriesInstanceUID)
    wait_for(lambda: series_state(node, uid) == db.COMPLETE, timeout=10, message="the series complete")


def test_reports_queued_before_the_clock_went_back_are_sent_at_once(
    nodes: Any, recorder: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import datetime as dt

    from sqlalchemy import update

    from ichnode import service
    from ichnode.service import Node
    from tests.pipeline_support import deliveries
    from tests.test_dispatch import _queue

    pacs = recorder()
    stepped = [0.0]
    real = service.wall_minus_monotonic
    monkeypatch.setattr(service, "wall_minus_monotonic", lambda: real() - stepped[0])
    _, config = nodes.config(tmp_path)
    engine, _, _ = _queue(tmp_path, 2, pacs.port)
    engine.dispose()
    node = Node(config, components=("dispatcher",))
    nodes.started.append(node)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    with db.transaction(node.sessions) as session:  # queued "now" just before the clock went back 10 minutes
        session.execute(update(db.Delivery).values(next_attempt_at=later.replace(tzinfo=None)))
    node.start()
    for job in node.scheduler.get_jobs():
        job.modify(next_run_time=later)
    stepped[0] = 600.0
    wait_for(lambda: len(pacs.stored()) == 2, timeout=10, message="both reports sent")
    # Recorded sent once the PACS answered: a moment after it stored the second.
    wait_for(
        lambda: [d.state for d in deliveries(node.sessions)] == [db.SENT] * 2, timeout=10, message="both recorded sent"
    )


def series_state(node: Any, uid: str) -> str | None:
    with node.sessions() as session:
        return session.scalar(select(db.Series.state).where(db.Series.series_uid == uid))
