"""An acknowledged image is never lost: kill -9 and SIGTERM in the middle of a transfer.

The node runs as ``ichnode serve`` in a subprocess; a pynetdicom SCU in this
process sends 300 synthetic 512x512 CT slices and records every SOP Instance
UID answered with Success.
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from sqlalchemy import select

from ichnode import db
from ichnode.service import SHUTDOWN_GRACE_SECONDS
from tests.conftest import NodeProcess, open_db, wait_for
from tests.pipeline_support import phantom

SLICES = 300
KILL_AFTER = 50


@pytest.fixture(scope="module")
def synthetic_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Path]]:
    """300 slices with a phantom's header, new UIDs and positions, random int16
    pixels (made here: durability is checked wherever the tests run)."""
    template = copy.deepcopy(phantom(90, matrix=512, n_slices=10).datasets[0])
    assert (template.Rows, template.Columns, template.BitsAllocated, template.PixelRepresentation) == (512, 512, 16, 1)
    folder = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(20240601)
    series_uid = generate_uid()
    template.SeriesInstanceUID = series_uid
    template.StudyInstanceUID = generate_uid()
    x, y, z = (float(v) for v in template.ImagePositionPatient)
    files = []
    for index in range(SLICES):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = index + 1
        template.ImagePositionPatient = [x, y, z + 1.25 * index]
        template.PixelData = rng.integers(-1024, 3071, size=(512, 512), dtype=np.int16).tobytes()
        path = folder / f"slice{index:03d}.dcm"
        template.save_as(path, enforce_file_format=True)
        files.append(path)
    return series_uid, files


class Sender(threading.Thread):
    """Sends files over one association; ``acked`` holds the SOP UIDs answered Success."""

    def __init__(self, port: int, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.files = files
        self.acked: list[str] = []
        self.problem: str | None = None

    def run(self) -> None:
        ae = AE(ae_title="CRASH_SCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ICHNODE")
        if not assoc.is_established:
            self.problem = "association failed"
            return
        try:
            for path in self.files:
                response = assoc.send_c_store(path)
                if response is None or "Status" not in response:
                    self.problem = f"no response for {path.name}"
                    return
                if int(response.Status) == 0x0000:
                    self.acked.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
                else:
                    self.problem = f"status 0x{int(response.Status):04X} for {path.name}"
                    return
        except Exception as exc:  # the peer died under us
            self.problem = f"{type(exc).__name__}: {exc}"
        finally:
            if assoc.is_established:
                assoc.release()


@pytest.fixture(autouse=True)
def send_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    # Send each file's encoded data set as it is (faster, and what arrives is what we wrote).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def stored(node: NodeProcess) -> dict[str, Any]:
    """SOP Instance UID -> Instance row, read from the node's database."""
    import yaml

    url = yaml.safe_load(node.config_path.read_text())["database"]["url"]
    engine, factory = open_db(url)
    try:
        with factory() as session:
            return {i.sop_instance_uid: i for i in session.scalars(select(db.Instance))}
    finally:
        engine.dispose()


def series_row(node: NodeProcess, series_uid: str) -> Any:
    import yaml

    url = yaml.safe_load(node.config_path.read_text())["database"]["url"]
    engine, factory = open_db(url)
    try:
        with factory() as session:
            return session.scalars(select(db.Series).where(db.Series.series_uid == series_uid)).one_or_none()
    finally:
        engine.dispose()


def assert_acknowledged_are_whole(node: NodeProcess, acked: list[str], files: list[Path]) -> None:
    rows = stored(node)
    missing = [uid for uid in acked if uid not in rows]
    assert not missing, f"{len(missing)} acknowledged instances lost, e.g. {missing[:3]}"
    originals = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    spool = node.config_path.parent / "spool"
    for uid in acked:
        received = dcmread(spool / rows[uid].path)
        assert received.SOPInstanceUID == uid
        assert received.PixelData == dcmread(originals[uid]).PixelData, uid
        assert rows[uid].size_bytes == (spool / rows[uid].path).stat().st_size


def test_kill_9_mid_transfer_loses_no_acknowledged_image(
    node_process: Any, synthetic_series: tuple[str, list[Path]]
) -> None:
    series_uid, files = synthetic_series
    node = node_process().start()
    sender = Sender(node.port, files)
    sender.start()
    wait_for(lambda: len(sender.acked) >= KILL_AFTER, timeout=120, message=f"{KILL_AFTER} acknowledged stores")
    node.signal(signal.SIGKILL)
    assert node.wait(timeout=30) == -signal.SIGKILL
    sender.join(60)
    assert not sender.is_alive()
    acked = list(sender.acked)
    assert KILL_AFTER <= len(acked) < SLICES, "the kill did not land in the middle of the transfer"
    assert sender.problem is not None

    node.start()
    assert_acknowledged_are_whole(node, acked, files)
    assert [p for p in (node.config_path.parent / "spool" / ".tmp").rglob("*") if p.is_file()] == []

    # The sender retries everything; duplicates are fine.
    resend = Sender(node.port, files)
    resend.start()
    resend.join(300)
    assert resend.problem is None
    assert len(resend.acked) == SLICES
    wait_for(
        lambda: (row := series_row(node, series_uid)) is not None and row.state == db.COMPLETE and row,
        timeout=30,
        message="the series to complete",
    )
    row = series_row(node, series_uid)
    assert row.instance_count == SLICES
    rows = stored(node)
    assert len(rows) == SLICES
    assert set(rows) == {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert_acknowledged_are_whole(node, list(rows), files)


def test_sigterm_mid_transfer_exits_cleanly_and_keeps_every_acknowledged_image(
    node_process: Any, synthetic_series: tuple[str, list[Path]]
) -> None:
    _, files = synthetic_series
    node = node_process().start()
    sender = Sender(node.port, files)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 30, timeout=120, message="30 acknowledged stores")
    signalled = time.monotonic()
    node.signal(signal.SIGTERM)
    returncode = node.wait(timeout=SHUTDOWN_GRACE_SECONDS + 15)
    took = time.monotonic() - signalled
    assert returncode == 0, node.log()
    assert took < SHUTDOWN_GRACE_SECONDS + 10
    sender.join(60)
    assert not sender.is_alive()
    acked = list(sender.acked)
    # The association under way was let finish (well within the grace time), not aborted.
    assert sender.problem is None and len(acked) == SLICES, sender.problem
    assert "received SIGTERM" in node.log()
    assert "aborting association" not in node.log()
    assert "stopped" in node.log()

    node.start()
    assert_acknowledged_are_whole(node, acked, files)
