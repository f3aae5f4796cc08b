"""The receiver over real associations: C-ECHO, C-STORE, access control, failures, series.

Senders are pynetdicom (in this process) and DCMTK's echoscu/storescu.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import update

from ichnode import db
from ichnode.config import parse_config
from ichnode.scu import send_files
from tests.conftest import (
    all_instances,
    all_series,
    config_data,
    dataset_bytes,
    echo_ok,
    require_data,
    require_tool,
    run_cli,
    run_dcmtk,
    series_by_uid,
    store_files,
    wait_for,
    wait_series_state,
)
from tests.test_dicomfile import deflated_copy, deflated_ct

CT = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MR = "1.2.840.10008.5.1.4.1.1.4"
# storage.min_free_mb of the tests on a small disk of their own.
KEPT_FREE_MB = 32

# RSNA files and some pydicom test files carry UIDs such as "ID_1f6d1e8aeb".
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")


def ge_files() -> list[Path]:
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))
    assert len(files) == 28
    return files


def ge_series_uid() -> str:
    return str(dcmread(ge_files()[0], stop_before_pixels=True).SeriesInstanceUID)


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom-data lacks {name}")
    return Path(path)


@pytest.fixture
def send_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's encoded data set as it is, without decoding and re-encoding it."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def store_one(port: int, path: Path, calling_ae: str = "TEST_SCU") -> Any:
    """C-STORE one file; the whole response (Status, ErrorComment)."""
    meta = read_file_meta_info(path)  # not the data set: a deflated one is inflated whole to be read
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def associate(port: int, calling_ae: str, called_ae: str = "ICHNODE") -> Any:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called_ae)


def assert_rejected(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    assert not assoc.is_established
    assert assoc.is_rejected
    primitive = assoc.acceptor.primitive
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (result, source, diagnostic)


def storage_association(port: int, calling_ae: str = "TEST_SCU") -> Any:
    """An association proposing CT Image Storage (in pynetdicom's default syntaxes)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT)
    return ae.associate("127.0.0.1", port, ae_title="ICHNODE")


def big_ct(folder: Path, megabytes: int) -> Path:
    """pydicom's small CT with ``megabytes`` of pixel data (long to transfer), as another instance."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = bytes(megabytes * 2**20)
    path = folder / f"big-{megabytes}.dcm"
    ds.save_as(path)
    return path


def receiver_log(caplog: pytest.LogCaptureFixture, level: str) -> list[str]:
    """What the receiver logged at ``level``."""
    return [r.getMessage() for r in caplog.records if r.name == "ichnode.receiver" and r.levelname == level]


def node_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records at ERROR and above, but for pynetdicom's report of a rejection
    to the senders in this process."""
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.name != "pynetdicom.acse"]


def assert_nothing_stored(node: Any) -> None:
    spool = node.spool
    assert [p for p in spool.instances_dir.rglob("*") if p.is_file()] == []
    assert [p for p in spool.tmp_dir.rglob("*") if p.is_file()] == []
    assert all_instances(node) == []
    assert all_series(node) == []


# -- C-ECHO ------------------------------------------------------------------
def test_echo_with_pynetdicom(start_node: Any) -> None:
    node = start_node()
    assoc = associate(node.port, "TEST_SCU")
    assert assoc.is_established
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    assert response.Status == 0x0000


def _dcmtk_echo(port: int, calling_ae: str, called_ae: str = "ICHNODE") -> tuple[int, str]:
    """DCMTK ``echoscu -v`` from ``calling_ae`` to ``called_ae``: its exit status and output."""
    result = run_dcmtk([require_tool("echoscu"), "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)])
    return result.returncode, result.stdout + result.stderr


def test_echo_with_dcmtk(start_node: Any) -> None:
    node = start_node()
    status, output = _dcmtk_echo(node.port, "DCMTK_SCU")
    assert status == 0, output
    assert "Received Echo Response (Success)" in output


# -- real series -------------------------------------------------------------
def test_ge_series_sent_with_storescu_is_one_complete_series(start_node: Any) -> None:
    storescu = require_tool("storescu")
    files = ge_files()
    node = start_node()
    result = run_dcmtk(
        [storescu, "-aet", "GE_CT", "-aec", "ICHNODE", "127.0.0.1", str(node.port), *map(str, files)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    series = wait_series_state(node, ge_series_uid(), db.COMPLETE, instance_count=28)
    assert series.version == 1
    assert (series.modality, series.calling_ae, series.peer_host) == ("CT", "GE_CT", "127.0.0.1")
    assert len(all_series(node)) == 1
    instances = all_instances(node)
    assert len(instances) == 28
    originals = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    assert {i.sop_instance_uid for i in instances} == set(originals)
    for instance in instances:
        received = dcmread(node.spool.absolute(instance.path))
        sent = dcmread(originals[instance.sop_instance_uid])
        assert instance.size_bytes == node.spool.absolute(instance.path).stat().st_size
        assert instance.sop_class_uid == CT
        assert received.PixelData == sent.PixelData
        assert received.ImageOrientationPatient == sent.ImageOrientationPatient


def test_series_split_over_two_associations_is_one_series(start_node: Any) -> None:
    files = ge_files()
    node = start_node()
    assert store_files(node.port, files[:14], calling_ae="FIRST") == [0] * 14
    assert store_files(node.port, files[14:], calling_ae="SECOND") == [0] * 14
    series = wait_series_state(node, ge_series_uid(), db.COMPLETE, instance_count=28)
    assert len(all_series(node)) == 1
    instances = all_instances(node)
    assert len(instances) == 28
    assert {i.series_id for i in instances} == {series.id}
    assert {i.calling_ae for i in instances} == {"FIRST", "SECOND"}


def test_rsna_series_with_nonconforming_uids_is_accepted(start_node: Any) -> None:
    folder = require_data("rsna-series")
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 32
    node = start_node()
    summary = send_files(files, "ICHNODE", "127.0.0.1", node.port, calling_ae="RSNA")
    assert summary.statuses == {"Success": 32}, summary.lines()
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    series_uid = str(headers[0].SeriesInstanceUID)
    assert series_uid.startswith("ID_")
    series = wait_series_state(node, series_uid, db.COMPLETE, instance_count=32)
    assert series.study_uid == str(headers[0].StudyInstanceUID)
    instances = all_instances(node)
    # The dataset's SOP Instance UID (not the file meta's, which differs) identifies the instance.
    assert {i.sop_instance_uid for i in instances} == {str(h.SOPInstanceUID) for h in headers}
    by_uid = {str(h.SOPInstanceUID): f for h, f in zip(headers, files)}
    for instance in instances:
        assert instance.sop_class_uid == CT  # taken from the file meta by the sender
        received = dcmread(node.spool.absolute(instance.path))
        assert received.PixelData == dcmread(by_uid[instance.sop_instance_uid]).PixelData


def test_header_values_past_what_the_database_holds_are_cut_and_the_image_stored(
    start_node: Any, tmp_path: Path
) -> None:
    # Free text longer than its column, an Instance Number no integer column
    # holds, a NUL inside an ID: SQLite keeps them, a server database refuses
    # them; the image is stored on every database, with what fits.
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.SeriesDescription, ds.AccessionNumber = "D" * 140, "A" * 70
    ds.InstanceNumber, ds.PatientID = "20240101001", "PAT\x00123"
    node = start_node()
    assert store_files(node.port, [ds]) == [0x0000]
    (series,) = all_series(node)
    assert (series.series_description, series.accession_number, series.patient_id) == ("D" * 128, "A" * 64, "PAT123")
    (instance,) = all_instances(node)
    assert instance.instance_number is None


def test_a_uid_longer_than_the_database_holds_is_refused_not_cut() -> None:
    # Cut, it could be another image's UID.
    from ichnode.series import InstanceHeader

    ds = dcmread(pydicom_file("CT_small.dcm"), stop_before_pixels=True)
    ds.SeriesInstanceUID = "1." * 70
    with pytest.raises(ValueError, match="^SeriesInstanceUID is 140 characters, more than 128$"):
        InstanceHeader.from_dataset(ds, sop_class_uid=CT, sop_instance_uid=str(ds.SOPInstanceUID))


# -- transfer syntaxes -------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "syntax", "sop_class"),
    [
        ("693_J2KR.dcm", "1.2.840.10008.1.2.4.90", CT),  # JPEG 2000 lossless
        ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91", CT),  # JPEG 2000 (lossy)
        ("bad_sequence.dcm", "1.2.840.10008.1.2.4.70", CT),  # JPEG lossless SV1
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", MR),  # RLE lossless (no CT file has it)
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", MR),  # JPEG-LS lossless
        ("eCT_Supplemental.dcm", "1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.2.1"),  # Enhanced CT
    ],
)
def test_transfer_syntax_received_byte_exact(
    start_node: Any, send_raw: None, name: str, syntax: str, sop_class: str
) -> None:
    sent = pydicom_file(name)
    assert str(dcmread(sent, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    node = start_node()
    assert store_files(node.port, [sent]) == [0x0000]
    (instance,) = all_instances(node)
    assert (instance.transfer_syntax_uid, instance.sop_class_uid) == (syntax, sop_class)
    received = node.spool.absolute(instance.path)
    assert dataset_bytes(received) == dataset_bytes(sent)
    received_ds, sent_ds = dcmread(received), dcmread(sent)
    assert received_ds.file_meta.TransferSyntaxUID == syntax
    assert received_ds.PixelData == sent_ds.PixelData
    np.testing.assert_array_equal(received_ds.pixel_array, sent_ds.pixel_array)


# -- access control ----------------------------------------------------------
def test_wrong_called_ae_title_is_rejected(start_node: Any) -> None:
    node = start_node()
    # 1 rejected-permanent, 1 service user, 7 called AE title not recognised
    assert_rejected(associate(node.port, "TEST_SCU", called_ae="NOT_ICHNODE"), 1, 1, 7)
    assert echo_ok(node.port)  # the right title still works

    status, output = _dcmtk_echo(node.port, "TEST_SCU", called_ae="NOT_ICHNODE")
    assert status != 0
    assert "Association Rejected" in output
    assert "Called AE Title Not Recognized" in output


def test_unlisted_calling_ae_title_is_rejected(start_node: Any) -> None:
    node = start_node(access={"allow": [{"ae_title": "CT_SCANNER_1"}]})
    # 3: calling AE title not recognised
    assert_rejected(associate(node.port, "INTRUDER"), 1, 1, 3)
    assert echo_ok(node.port, calling_ae="CT_SCANNER_1")

    status, output = _dcmtk_echo(node.port, "INTRUDER")
    assert status != 0
    assert "Association Rejected" in output
    assert "Calling AE Title Not Recognized" in output
    status, output = _dcmtk_echo(node.port, "CT_SCANNER_1")
    assert status == 0, output


def test_allowed_ae_title_from_another_host_is_rejected(start_node: Any) -> None:
    node = start_node(
        access={
            "allow": [
                {"ae_title": "CT_SCANNER_1", "host": "10.9.9.9"},
                {"ae_title": "CT_SCANNER_2", "host": "localhost"},  # a name, resolved
            ]
        }
    )
    # 3: calling AE title not recognised (from this address)
    assert_rejected(associate(node.port, "CT_SCANNER_1"), 1, 1, 3)
    assert not echo_ok(node.port, calling_ae="CT_SCANNER_1")
    assert echo_ok(node.port, calling_ae="CT_SCANNER_2")


def test_a_node_on_every_interface_allows_an_ipv4_peer_listed_by_its_address(
    start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Listening on "::", the socket takes IPv4 peers too, as ::ffff:127.0.0.1.
    caplog.set_level(logging.INFO, logger="ichnode")
    node = start_node(node={"host": "::"}, access={"allow": [{"ae_title": "CT1", "host": "127.0.0.1"}]})
    assert store_files(node.port, [pydicom_file("CT_small.dcm")], calling_ae="CT1") == [0]
    (series,) = all_series(node)
    assert series.peer_host == "127.0.0.1"  # reports go back to the sender by its allow entry's host
    assert [m for m in receiver_log(caplog, "INFO") if m.startswith("association from CT1@127.0.0.1:")]


def _connect(port: int, source_host: str) -> socket.socket:
    """A bare TCP connection to the node from ``source_host`` (any 127.x address is this machine)."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source_host, 0))
    return connection


def test_a_connection_from_a_host_no_entry_names_is_closed_at_once_and_holds_no_slot(
    start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Held open without a word, each would hold one of node.max_associations
    # until its association request was due.
    node = start_node(node={"max_associations": 1})  # access.allow: any AE title from 127.0.0.1
    strangers = [_connect(node.port, "127.0.0.2") for _ in range(2)]
    ports = {str(stranger.getsockname()[1]) for stranger in strangers}
    try:
        for stranger in strangers:
            assert stranger.recv(1) == b""  # closed by the node
        assert echo_ok(node.port)
    finally:
        for stranger in strangers:
            stranger.close()
    refused = [m for m in receiver_log(caplog, "WARNING") if "127.0.0.2" in m]
    assert len(refused) == 2, refused
    for line in refused:
        address, reason = re.fullmatch(r"refused connection from 127\.0\.0\.2:(\d+): (.*)", line).groups()
        assert address in ports and reason == "no access.allow entry is for this host"


def test_with_an_entry_for_any_host_a_connection_from_anywhere_gets_to_the_ae_title_check(start_node: Any) -> None:
    node = start_node(access={"allow": [{"ae_title": "CT1"}]})
    assert store_files(node.port, [pydicom_file("CT_small.dcm")], calling_ae="CT1", source_host="127.0.0.2") == [0]
    assert_rejected(associate(node.port, "INTRUDER"), 1, 1, 3)


def test_a_connection_without_an_association_request_is_closed_soon_and_logged(
    start_node: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ichnode.receiver

    caplog.set_level(logging.INFO, logger="ichnode")
    monkeypatch.setattr(ichnode.receiver, "REQUEST_SECONDS", 1)  # a test's patience
    node = start_node()
    idle = _connect(node.port, "127.0.0.1")
    logged = f"connection from 127.0.0.1:{idle.getsockname()[1]} ended without an association request"
    try:
        assert idle.recv(1) == b""  # closed by the node
    finally:
        idle.close()
    wait_for(lambda: logged in receiver_log(caplog, "INFO"), message="the connection in the log")


def test_a_connection_closed_before_its_association_request_frees_its_slot_at_once(
    start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A port scan, a load balancer's probe: each would hold one of
    # node.max_associations for as long as the node waits for a request.
    caplog.set_level(logging.INFO, logger="ichnode")
    node = start_node(node={"max_associations": 1})
    probe = _connect(node.port, "127.0.0.1")
    logged = f"connection from 127.0.0.1:{probe.getsockname()[1]} ended without an association request"
    probe.close()
    wait_for(lambda: logged in receiver_log(caplog, "INFO"), message="the connection in the log")
    wait_for(lambda: echo_ok(node.port), timeout=5, message="a slot")


def test_association_log_names_peer_and_ae_titles(start_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ichnode")
    node = start_node(access={"allow": [{"ae_title": "CT_SCANNER_1", "host": "127.0.0.1"}]})
    assert echo_ok(node.port, calling_ae="CT_SCANNER_1")
    assert not echo_ok(node.port, calling_ae="INTRUDER")
    assert not echo_ok(node.port, calling_ae="CT_SCANNER_1", called_ae="SOMEONE")
    messages = [r.getMessage() for r in caplog.records if r.name == "ichnode.receiver"]
    accepted = [m for m in messages if re.search(r"^association from CT_SCANNER_1@127\.0\.0\.1:\d+ to ICHNODE", m)]
    assert len(accepted) == 1, messages
    refused_calling = [m for m in messages if "refused" in m and "INTRUDER@127.0.0.1:" in m and "ICHNODE" in m]
    assert len(refused_calling) == 1, messages
    refused_called = [m for m in messages if "refused" in m and "CT_SCANNER_1@127.0.0.1:" in m and "SOMEONE" in m]
    assert len(refused_called) == 1, messages
    assert [r.levelname for r in caplog.records if "refused" in r.getMessage()] == ["WARNING", "WARNING"]


def test_an_association_over_max_associations_is_logged_as_refused(
    start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ichnode")
    node = start_node(node={"max_associations": 1})
    holder = associate(node.port, "HOLDER")
    assert holder.is_established
    try:
        # 2 rejected-transient, 3 service provider (presentation), 2 local limit exceeded
        assert_rejected(associate(node.port, "SECOND"), 2, 3, 2)
    finally:
        holder.release()
    (refused,) = wait_for(
        lambda: [m for m in receiver_log(caplog, "WARNING") if "SECOND@" in m], message="the refusal in the log"
    )
    assert re.search(
        r"^refused association from SECOND@127\.0\.0\.1:\d+ to ICHNODE: node\.max_associations \(1\)",
        refused,
    )
    assert re.search(r"held by HOLDER@127\.0\.0\.1:\d+$", refused), refused  # who holds them
    accepted = [m for m in receiver_log(caplog, "INFO") if m.startswith("association from")]
    assert [m.split("@")[0] for m in accepted] == ["association from HOLDER"]


def test_an_echo_that_offers_query_retrieve_too_is_no_warning(start_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    # A PACS's echo button (Orthanc's) offers its find and move services too.
    caplog.set_level(logging.INFO, logger="ichnode")
    node = start_node()
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Query/Retrieve - FIND
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    wait_for(lambda: any("rejected presentation context from PACS@" in m for m in receiver_log(caplog, "INFO")))
    assert not [m for m in receiver_log(caplog, "WARNING") if "PACS@" in m]


def test_rejected_presentation_contexts_are_logged_with_what_was_offered(
    start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A modality that offers CT only in a syntax this node cannot decode, and
    # classes it does not serve: none of its images can come, and the node says so.
    caplog.set_level(logging.INFO, logger="ichnode")
    node = start_node()
    mpeg2, mpeg4 = "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.102"
    worklist, private = "1.2.840.10008.5.1.4.31", "1.2.826.0.1.3680043.8.498.99"
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CT, [mpeg2, mpeg4])
    ae.add_requested_context(worklist, "1.2.840.10008.1.2")
    ae.add_requested_context(private, "1.2.840.10008.1.2")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
    assert not assoc.is_established  # nothing it may send: it gives up

    def logged() -> list[str]:
        return [m for m in receiver_log(caplog, "WARNING") if "MODALITY@" in m]

    wait_for(lambda: len(logged()) == 3, message="the rejected contexts in the log")
    warnings = logged()
    assert all(m.startswith("rejected presentation context from MODALITY@127.0.0.1:") for m in warnings), warnings
    ct, mwl, other = warnings
    assert CT in ct and mpeg2 in ct and mpeg4 in ct and ct.endswith("transfer syntax(es) not supported")
    assert "Modality Worklist" in mwl and mwl.endswith("abstract syntax not supported")
    assert private in other and other.endswith("abstract syntax not supported")


# -- failures keep the sender's copy authoritative ----------------------------
def test_full_disk_refuses_associations_for_now(start_node: Any) -> None:
    # Before any image is written out: rejected, transient (local limit
    # exceeded). A C-ECHO still answers: the node is up.
    node = start_node(storage={"min_free_mb": 10**12})
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(CT)
    assert_rejected(ae.associate("127.0.0.1", node.port, ae_title="ICHNODE"), 2, 3, 2)
    assert echo_ok(node.port)
    assert_nothing_stored(node)


def test_disk_filling_during_an_association_answers_out_of_resources(start_node: Any) -> None:
    node = start_node()
    meta = dcmread(pydicom_file("CT_small.dcm"), stop_before_pixels=True).file_meta
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
    assert assoc.is_established
    try:
        node.spool.min_free_mb = 10**12  # the disk fills meanwhile
        response = assoc.send_c_store(pydicom_file("CT_small.dcm"))
    finally:
        assoc.release()
    assert response.Status == 0xA700
    assert "MB free" in response.ErrorComment
    assert_nothing_stored(node)


def test_a_transfer_cut_off_leaves_no_partial_file(start_node: Any, tmp_path: Path) -> None:
    import socket
    import threading

    big = big_ct(tmp_path, 64)  # long enough to be cut off midway
    meta = dcmread(big, stop_before_pixels=True).file_meta
    node = start_node()
    receiving = node.spool.tmp_dir / "receiver-0"
    ae = AE(ae_title="TEST_SCU")
    ae.maximum_pdu_size = 16384
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
    assert assoc.is_established
    sender = threading.Thread(target=assoc.send_c_store, args=(big,), daemon=True)
    sender.start()
    wait_for(lambda: any(receiving.iterdir()), timeout=30, interval=0.005, message="the transfer to start")
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # the sender's end of the line is cut
    sender.join(30)
    wait_for(lambda: not any(receiving.iterdir()), timeout=10, message="the partial file to be removed")
    assert_nothing_stored(node)


def send_on_a_context_never_negotiated(port: int, path: Path) -> Any:
    """A sender's bug: a C-STORE on a presentation context the association
    never negotiated. pynetdicom's reactor thread for that association dies
    once it has opened the file for the dataset, and leaves the file."""
    meta = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="BUGGY_SCU")
    ae.add_requested_context(CT, meta.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = meta.SOPClassUID, meta.SOPInstanceUID
    request.DataSet = BytesIO(dataset_bytes(path))
    assoc.dimse.send_msg(request, 99)
    return assoc


# pynetdicom's reactor thread dies of the sender's bug: that is the case here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_file_abandoned_by_a_dead_association_is_removed_while_the_node_runs(
    start_node: Any, tmp_path: Path
) -> None:
    import threading

    node = start_node()
    receiving = node.spool.tmp_dir / "receiver-0"
    # A long transfer is under way all along: its file is not abandoned.
    ae = AE(ae_title="SLOW_SCU")
    ae.maximum_pdu_size = 16384
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    slow = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
    assert slow.is_established
    responses: list[Any] = []
    sender = threading.Thread(target=lambda: responses.append(slow.send_c_store(big_ct(tmp_path, 64))))
    sender.start()
    try:
        (in_transfer,) = wait_for(lambda: list(receiving.iterdir()), timeout=30, interval=0.005, message="a transfer")
        buggy = send_on_a_context_never_negotiated(node.port, pydicom_file("CT_small.dcm"))
        wait_for(lambda: len(node.server.active_associations) == 1, message="the buggy association to die")
        buggy.abort()
        (abandoned,) = set(receiving.iterdir()) - {in_transfer}  # nothing of pynetdicom removes it

        assert store_files(node.port, [pydicom_file("CT_small.dcm")]) == [0]
        assert not abandoned.exists()
    finally:
        sender.join(120)
        slow.release()
    assert responses[0].Status == 0x0000  # its file was left alone
    assert not any(receiving.iterdir())
    assert len(all_instances(node)) == 2


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed (it needs root): {result.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of its own (a tmpfs; root only) with room for what is kept
    free and 32 MB more, for other programs to fill up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", f"size={KEPT_FREE_MB + 32}m", "tmpfs", str(disk))
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path, leave_mb: float) -> Path:
    """Another program fills ``disk`` up to ``leave_mb`` of free room; returns its file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - int(leave_mb * 2**20))
    return filler


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only (a read-only bind mount; root only), as a whole
    filesystem is once an I/O error remounts it (ext4 errors=remount-ro)."""
    _mount("--bind", str(folder), str(folder))
    try:
        _mount("-o", "remount,bind,ro", str(folder))
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_a_spool_without_room_for_a_large_dataset_refuses_associations(
    small_disk: Path, start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ichnode")
    node = start_node(storage={"spool_dir": str(small_disk / "spool"), "min_free_mb": KEPT_FREE_MB})
    filler = fill(small_disk, leave_mb=KEPT_FREE_MB / 2)
    assert_rejected(storage_association(node.port, "PACS"), 2, 3, 2)
    assert echo_ok(node.port)  # the node is up
    status, output = _dcmtk_store(node.port, pydicom_file("CT_small.dcm"))
    assert status != 0 and "Local Limit Exceeded" in output, output
    (refusal, _) = [m for m in receiver_log(caplog, "WARNING") if "refused association" in m]
    assert re.search(
        rf"^refused association from PACS@127\.0\.0\.1:\d+ to ICHNODE: \d+ MB free in the spool, "
        rf"less than storage\.min_free_mb \({KEPT_FREE_MB} MB\)",
        refusal,
    ), refusal
    filler.unlink()
    assert store_files(node.port, [pydicom_file("CT_small.dcm")]) == [0]


def _dcmtk_store(port: int, path: Path) -> tuple[int, str]:
    """DCMTK ``storescu`` of one file: its exit status and output."""
    storescu = require_tool("storescu")
    result = run_dcmtk([storescu, "-aet", "DCMTK_SCU", "-aec", "ICHNODE", "127.0.0.1", str(port), str(path)])
    return result.returncode, result.stdout + result.stderr


def test_a_spool_filling_up_during_a_transfer_answers_out_of_resources(
    small_disk: Path, start_node: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ichnode")
    node = start_node(storage={"spool_dir": str(small_disk / "spool"), "min_free_mb": 4})
    small, big = pydicom_file("CT_small.dcm"), big_ct(tmp_path, 8)
    assoc = storage_association(node.port)
    assert assoc.is_established
    try:
        filler = fill(small_disk, leave_mb=2)  # another program fills the disk meanwhile
        response = assoc.send_c_store(big)
        assert (response.Status, response.ErrorComment) == (0xA700, "spool write failed: No space left on device")
        # The association goes on: the next image is refused for want of room, then stored.
        assert assoc.send_c_store(small).Status == 0xA700
        filler.unlink()
        assert assoc.send_c_store(small).Status == 0x0000
    finally:
        assoc.release()
    assert [p for p in node.spool.tmp_dir.rglob("*") if p.is_file()] == []  # no partial file
    assert len(all_instances(node)) == 1
    errors = node_errors(caplog)
    assert [r.name for r in errors] == ["ichnode.receiver"] * 2, [r.getMessage() for r in errors]
    assert "No space left on device" in errors[0].getMessage() and errors[0].exc_info is None  # one line


def test_a_read_only_spool_refuses_associations_and_answers_out_of_resources(
    start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ichnode")
    node = start_node()
    small = pydicom_file("CT_small.dcm")
    early = storage_association(node.port, "EARLY")
    assert early.is_established
    try:
        with read_only(node.spool.tmp_dir / "receiver-0"):
            assert_rejected(storage_association(node.port, "LATE"), 2, 3, 2)
            assert echo_ok(node.port)
            response = early.send_c_store(small)
            assert (response.Status, response.ErrorComment) == (0xA700, "spool write failed: Read-only file system")
        assert early.send_c_store(small).Status == 0x0000  # the same association, once it is writable again
    finally:
        early.release()
    (refusal,) = [m for m in receiver_log(caplog, "WARNING") if "refused association" in m]
    assert re.search(r"^refused association from LATE@.* the spool cannot be written: Read-only file system$", refusal)
    assert [r.name for r in node_errors(caplog)] == ["ichnode.receiver"]
    assert store_files(node.port, [small]) == [0]


def test_a_dataset_arriving_on_a_read_only_spool_is_answered_out_of_resources_whatever_sweeps(
    start_node: Any, tmp_path: Path
) -> None:
    # A second association of the sender, refused meanwhile, sweeps the
    # receiving folder: the dataset under way is still answered 0xA700 (try
    # again later), not 0xC000 (a permanent failure).
    node = start_node()
    ae = AE(ae_title="EARLY")
    ae.maximum_pdu_size = 16384  # a few seconds of transfer
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    early = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
    assert early.is_established
    responses: list[Any] = []
    try:
        with read_only(node.spool.tmp_dir / "receiver-0"):
            sender = threading.Thread(target=lambda: responses.append(early.send_c_store(big_ct(tmp_path, 256))))
            sender.start()
            wait_for(lambda: node.server.ae.receiving._open, interval=0.002, message="the dataset under way")
            assert_rejected(storage_association(node.port, "LATE"), 2, 3, 2)
            sender.join(120)
    finally:
        early.release()
    (response,) = responses
    assert (response.Status, response.ErrorComment) == (0xA700, "spool write failed: Read-only file system")


@pytest.mark.parametrize("when", ["before-rename", "after-rename"])
def test_io_error_while_committing_answers_failure(
    start_node: Any, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    from ichnode import spool as spool_module
    from ichnode.spool import Spool

    node = start_node()
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if when == "before-rename":

        def commit_file(self: Spool, source: Path, relative: str) -> Path:
            raise enospc

        monkeypatch.setattr(Spool, "commit_file", commit_file)
    else:
        # The rename succeeded but syncing the folder entry failed: the
        # image is not known to be durable, so it must not be acknowledged
        # (nor left behind as a file without a row).
        real_fsync = spool_module._fsync_path

        def fsync(path: Path) -> None:
            # Only the final sync of the series folder, once the file is in it.
            if path.is_dir() and any(path.glob("*.dcm")):
                raise enospc
            real_fsync(path)

        monkeypatch.setattr(spool_module, "_fsync_path", fsync)

    sent = pydicom_file("CT_small.dcm")
    response = store_one(node.port, sent)
    assert 0xA700 <= response.Status <= 0xA7FF
    assert "spool write failed" in response.ErrorComment
    assert_nothing_stored(node)

    monkeypatch.undo()  # the disk recovers; the sender's retry is stored
    assert store_one(node.port, sent).Status == 0x0000
    assert len(all_instances(node)) == 1


def test_database_error_answers_failure(start_node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import ichnode.receiver

    node = start_node()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(ichnode.receiver, "register_instance", broken)
    sent = pydicom_file("CT_small.dcm")
    response = store_one(node.port, sent)
    assert 0xA700 <= response.Status <= 0xA7FF
    assert "database error" in response.ErrorComment
    assert_nothing_stored(node)

    monkeypatch.undo()
    assert store_one(node.port, sent).Status == 0x0000
    assert len(all_instances(node)) == 1


@contextmanager
def instance_rows_frozen(node: Any) -> Iterator[None]:
    """The node's database refuses every change of an instance row (an SQL
    error, as a broken database gives) until the block ends."""
    with node.engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TRIGGER frozen BEFORE UPDATE ON instance BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
        )
    try:
        yield
    finally:
        with node.engine.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER frozen")


def test_a_failed_resend_leaves_the_acknowledged_copy_in_place(
    start_node: Any, send_raw: None, tmp_path: Path
) -> None:
    first, second = pydicom_file("CT_small.dcm"), _changed_copy(tmp_path)
    node = start_node()
    assert store_one(node.port, first).Status == 0x0000
    with instance_rows_frozen(node):
        response = store_one(node.port, second)
    assert 0xA700 <= response.Status <= 0xA7FF
    assert "database error" in response.ErrorComment
    (instance,) = all_instances(node)
    stored = node.spool.absolute(instance.path)
    assert dataset_bytes(stored) == dataset_bytes(first)  # the copy the sender was told is stored
    assert (instance.size_bytes, instance.times_received) == (stored.stat().st_size, 1)

    # The sender retries once the database is back: now the new copy is in place.
    assert store_one(node.port, second).Status == 0x0000
    (instance,) = all_instances(node)
    assert dataset_bytes(node.spool.absolute(instance.path)) == dataset_bytes(second)
    assert instance.times_received == 2


def test_header_without_series_uid_cannot_be_understood(start_node: Any, tmp_path: Path) -> None:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    del ds.SeriesInstanceUID
    path = tmp_path / "no-series.dcm"
    ds.save_as(path)
    node = start_node()
    response = store_one(node.port, path)
    assert response.Status == 0xC000
    # Whole, within the 64 characters of an ErrorComment.
    assert re.fullmatch(r".*SeriesInstanceUID .*\(0020,000E\).* is missing or empty", response.ErrorComment)
    assert_nothing_stored(node)


# -- duplicates, other classes, a whole exam ---------------------------------
def _changed_copy(folder: Path) -> Path:
    """pydicom's small CT, same SOP Instance UID, other pixels and comments."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.ImageComments = "second copy"
    ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()
    second = folder / "second.dcm"
    ds.save_as(second)
    return second


@pytest.mark.parametrize(
    ("cut", "comment"),
    [
        # CT_small.dcm ends in 138 bytes of padding after its Pixel Data.
        ("inside the pixel data", "truncated: (7FE0,0010) short by 2862 bytes"),
        ("inside an element header", "truncated: 4 bytes after (0043,104E) are no whole element"),  # private
        ("inside the pixel data, then deflated whole", "truncated: (7FE0,0010) short by 2862 bytes"),
    ],
)
def test_a_cut_off_file_sent_as_it_is_is_refused_and_the_stored_copy_kept(
    start_node: Any, send_raw: None, tmp_path: Path, caplog: pytest.LogCaptureFixture, cut: str, comment: str
) -> None:
    # A sender that streams an interrupted copy (deflating it as it reads
    # it, or not): stored, it would replace the good copy the node holds
    # with part of the pixels.
    node = start_node()
    good = pydicom_file("CT_small.dcm")
    whole = good.read_bytes()
    end = whole.rindex(b"\xe0\x7f\x10\x00") + 4 if cut == "inside an element header" else len(whole) - 3000
    broken = tmp_path / "cut.dcm"
    broken.write_bytes(whole[:end])
    if cut.endswith("deflated whole"):
        broken = deflated_copy(whole[:end], tmp_path / "cut-deflated.dcm")
    assert store_one(node.port, good).Status == 0x0000
    response = store_one(node.port, broken)
    assert (response.Status, response.ErrorComment) == (0xC000, comment)
    (warning,) = receiver_log(caplog, "WARNING")  # in full
    in_full = "Pixel Data (7FE0,0010) is 32768 bytes" if "pixel data" in cut else "4 bytes after element (0043,104E)"
    assert in_full in warning
    (row,) = all_instances(node)
    assert row.times_received == 1
    assert dcmread(node.spool.absolute(row.path)).PixelData == dcmread(good).PixelData


def test_a_small_deflated_image_that_inflates_to_gbs_is_refused(
    start_node: Any, send_raw: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 2.3 MB sent, 512 MiB once inflated: read whole, it would take that much
    # of the node's memory (a larger one, all of it).
    node = start_node()
    response = store_one(node.port, deflated_ct(tmp_path / "bomb.dcm", 16384, 16384))
    assert (response.Status, response.get("ErrorComment")) == (0xC000, "deflated data set inflates past 256 MiB")
    assert_nothing_stored(node)
    (warning,) = receiver_log(caplog, "WARNING")
    assert "from TEST_SCU@127.0.0.1:" in warning and warning.endswith("deflated data set inflates past 256 MiB")
    # The same image at a real size, deflated too, is stored.
    assert store_one(node.port, deflated_ct(tmp_path / "ct.dcm", 512, 512)).Status == 0x0000
    (instance,) = all_instances(node)
    assert instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian


def test_a_large_image_from_a_sender_that_takes_the_nodes_offer_arrives_in_bounded_pieces(
    start_node: Any, tmp_path: Path
) -> None:
    # A sender sends PDUs as large as the node announces (pynetdicom's, such
    # as ichnode send, do). pynetdicom reads a PDU whole and copies it several
    # times: one PDU of a whole image took several times its size of the
    # node's memory (300 MB images, 8 associations: the node is killed).
    big = big_ct(tmp_path, 48)
    node = start_node()
    assoc = associate(node.port, "TEST_SCU")
    assert assoc.is_established
    assoc.release()
    assert 0 < assoc.acceptor.maximum_length <= 4 * 2**20
    tracemalloc.start()
    try:
        result = run_cli(["send", str(big), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
        peak = tracemalloc.get_traced_memory()[1]  # of the node: the sender is another process
    finally:
        tracemalloc.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(all_instances(node)) == 1
    assert peak < 16 * 2**20


def store_as_requested(port: int, ds: Any, **affected: str | None) -> Any:
    """C-STORE ``ds`` under a command whose Affected SOP Class or Instance UID
    (``AffectedSOPInstanceUID=...``) is not the data set's; the response."""
    ae = AE(ae_title="ODD_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    send_msg = assoc.dimse.send_msg

    def send_altered(primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_STORE):
            for keyword, uid in affected.items():
                setattr(primitive, keyword, uid)
        send_msg(primitive, context_id)

    assoc.dimse.send_msg = send_altered
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_a_c_store_naming_another_sop_class_than_its_data_set_is_refused(
    start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # As DCMTK's storescp answers it: a CT data set sent as an MR image.
    node = start_node()
    response = store_as_requested(node.port, dcmread(pydicom_file("CT_small.dcm")), AffectedSOPClassUID=MR)
    refusal = (0xA900, "data set's SOPClassUID differs from the request's")
    assert (response.Status, response.get("ErrorComment")) == refusal
    assert_nothing_stored(node)
    (warning,) = receiver_log(caplog, "WARNING")
    assert "from ODD_SCU@127.0.0.1:" in warning and f"its data set is a {CT}, the request says {MR}" in warning


def test_a_c_store_naming_another_instance_than_its_data_set_stores_it_under_its_own(
    start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Some files' meta names another instance than their data set (the RSNA
    # set); a sender that takes the C-STORE's UID from it is not refused: the
    # image is filed under the UID a PACS files it under, and the log says so.
    node = start_node()
    ds = dcmread(pydicom_file("CT_small.dcm"))
    asked = "1.2.826.0.1.3680043.8.498.99"
    assert store_as_requested(node.port, ds, AffectedSOPInstanceUID=asked).Status == 0x0000
    (instance,) = all_instances(node)
    assert instance.sop_instance_uid == ds.SOPInstanceUID
    (warning,) = receiver_log(caplog, "WARNING")
    assert warning.startswith(f"{asked} from ODD_SCU@127.0.0.1:")
    assert warning.endswith(f"is stored under its data set's SOP Instance UID {ds.SOPInstanceUID}")


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("missing", ["AffectedSOPInstanceUID", "AffectedSOPClassUID"])
def test_a_c_store_without_the_uids_of_its_command_aborts_the_association_and_says_why(
    start_node: Any, caplog: pytest.LogCaptureFixture, missing: str
) -> None:
    # They name the file the data set is received into: without them no
    # failure status can be sent, but the A-ABORT is clean, and the log says why.
    node = start_node()
    response = store_as_requested(node.port, dcmread(pydicom_file("CT_small.dcm")), **{missing: None})
    assert "Status" not in response  # aborted
    (warning,) = receiver_log(caplog, "WARNING")
    assert re.fullmatch(rf"aborted the association from ODD_SCU@127\.0\.0\.1:\d+: a C-STORE without {missing}", warning)
    # Neither the state machine's exception nor the reactor thread's traceback.
    assert not [r for r in caplog.records if r.name == "pynetdicom.fsm" and r.levelno >= logging.ERROR]
    wait_for(lambda: not any((node.spool.tmp_dir / "receiver-0").iterdir()), message="its file to be removed")
    assert store_files(node.port, [pydicom_file("CT_small.dcm")]) == [0]


def test_a_data_set_without_its_sop_instance_uid_is_stored_under_the_requests(
    start_node: Any, send_raw: None, tmp_path: Path
) -> None:
    # Nothing to differ from: the C-STORE's Affected SOP Instance UID names it.
    ds = dcmread(pydicom_file("CT_small.dcm"))
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "no-instance-uid.dcm")
    node = start_node()
    assert store_one(node.port, tmp_path / "no-instance-uid.dcm").Status == 0x0000
    (instance,) = all_instances(node)
    assert instance.sop_instance_uid == ds.file_meta.MediaStorageSOPInstanceUID


def test_duplicate_sop_instance_keeps_the_newer_copy(start_node: Any, send_raw: None, tmp_path: Path) -> None:
    first, second = pydicom_file("CT_small.dcm"), _changed_copy(tmp_path)
    node = start_node()
    assert store_files(node.port, [first]) == [0]
    assert store_files(node.port, [second]) == [0]
    (instance,) = all_instances(node)
    assert instance.sop_instance_uid == str(dcmread(first).SOPInstanceUID)
    assert instance.times_received == 2
    (series,) = all_series(node)
    assert series.instance_count == 1
    files = [p for p in node.spool.instances_dir.rglob("*") if p.is_file()]
    assert files == [node.spool.absolute(instance.path)]
    assert dataset_bytes(files[0]) == dataset_bytes(second)
    assert dcmread(files[0]).ImageComments == "second copy"
    (series,) = all_series(node)
    assert series.state == db.RECEIVING  # a changed image: scored again


def _ct(sop_uid: str, series_uid: str, study_uid: str = "1.2.826.0.1.3680043.8.498.1") -> Any:
    """pydicom's small CT, as instance ``sop_uid`` of series ``series_uid``."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    return ds


def _files_and_rows(node: Any) -> tuple[list[Path], list[Path]]:
    """The spooled instance files, and the files the rows name: equal when none is lost or stray."""
    files = sorted(p for p in node.spool.instances_dir.rglob("*") if p.is_file())
    return files, sorted(node.spool.absolute(i.path) for i in all_instances(node))


def test_uids_made_of_dots_stay_inside_the_spool(start_node: Any) -> None:
    node = start_node()
    parent = node.spool.root.parent
    before = sorted(parent.iterdir())
    statuses = store_files(
        node.port,
        [_ct(generate_uid(), "..", study_uid=".."), _ct(generate_uid(), ".tmp", study_uid="..")],
    )
    assert statuses == [0, 0]
    files, rows = _files_and_rows(node)
    assert len(files) == 2 and files == rows
    assert sorted(parent.iterdir()) == before  # nothing written beside the spool
    assert [p for p in node.spool.tmp_dir.rglob("*") if p.is_file()] == []


def test_two_uids_never_share_a_file(start_node: Any) -> None:
    # A UID cleaned for a file name takes a hash of itself; one that looks
    # like such a name (a sender's odd UIDs) must not take its file.
    node = start_node()
    odd = "1.2.826.0.1.3680043.8.498.4/1"
    look_alike = "1.2.826.0.1.3680043.8.498.4_1-" + hashlib.sha1(odd.encode()).hexdigest()[:8]
    series_uid = generate_uid()
    first, second = _ct(odd, series_uid), _ct(look_alike, series_uid)
    first.InstanceNumber, second.InstanceNumber = 1, 2
    assert store_files(node.port, [first, second]) == [0, 0]
    files, rows = _files_and_rows(node)
    assert len(files) == 2 and files == rows
    for instance in all_instances(node):
        stored = dcmread(node.spool.absolute(instance.path))
        assert stored.SOPInstanceUID == instance.sop_instance_uid
    # Sent again, each is an identical copy of its own file.
    assert store_files(node.port, [first, second]) == [0, 0]
    assert [i.times_received for i in all_instances(node)] == [2, 2]
    assert _files_and_rows(node) == (files, rows)


def test_an_instance_stored_under_the_name_it_had_before_is_replaced_when_sent_again(start_node: Any) -> None:
    # A UID that ends as a cleaned one's name does was its own file name
    # before such UIDs took a hash too; sent again, its new copy replaces that file.
    node = start_node()
    sop = "1.2.826.0.1.3680043.8.498.7-0123abcd"
    first = _ct(sop, generate_uid())
    assert store_files(node.port, [first]) == [0]
    (instance,) = all_instances(node)
    stored = node.spool.absolute(instance.path)
    before = stored.with_name(f"{sop}.dcm")
    assert before != stored
    stored.rename(before)  # where the node stored it before
    with node.engine.begin() as connection:
        relative = before.relative_to(node.spool.root).as_posix()
        connection.execute(update(db.Instance).where(db.Instance.id == instance.id).values(path=relative))

    second = _ct(sop, str(first.SeriesInstanceUID))
    second.ImageComments = "second copy"
    assert store_files(node.port, [second]) == [0]
    (again,) = all_instances(node)
    assert (again.path, again.times_received) == (instance.path, 2)
    assert _files_and_rows(node) == ([stored], [stored])
    assert dcmread(stored).ImageComments == "second copy"


def test_one_instance_stored_by_two_associations_at_once_keeps_its_file(start_node: Any) -> None:
    # A sender retrying while its first association is still under way, or
    # two senders with one study: each round sends instance X to its series
    # and, at the same moment, to another series.
    import threading

    node = start_node()
    for _ in range(20):
        sop, home = generate_uid(), generate_uid()
        assert store_files(node.port, [_ct(sop, home)]) == [0]
        start, statuses = threading.Barrier(2), []

        def send(series_uid: str, sop: str = sop) -> None:
            dataset = _ct(sop, series_uid)
            start.wait()
            statuses.extend(store_files(node.port, [dataset]))

        threads = [threading.Thread(target=send, args=(uid,)) for uid in (home, generate_uid())]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert statuses == [0, 0]
    files, rows = _files_and_rows(node)
    assert len(rows) == 20  # one row per instance, each with its file, and no other file
    assert files == rows


def test_restart_keeps_the_recorded_copy_of_a_duplicate(start_node: Any, tmp_path: Path) -> None:
    # A crash after a duplicate was recorded in its new series, before its
    # copy in the old series was removed.
    config = parse_config(config_data(tmp_path), base=tmp_path)
    node = start_node(config=config)
    sop, old_series, new_series = generate_uid(), generate_uid(), generate_uid()
    first = _ct(sop, old_series)
    assert store_files(node.port, [first, _ct(sop, new_series)]) == [0, 0]
    (instance,) = all_instances(node)
    node.stop()
    left = node.spool.absolute(node.spool.instance_path(str(first.StudyInstanceUID), old_series, sop))
    left.parent.mkdir(parents=True, exist_ok=True)
    first.save_as(left, enforce_file_format=True)

    restarted = start_node(config=config)
    (again,) = all_instances(restarted)
    assert again.path == instance.path
    files, rows = _files_and_rows(restarted)
    assert files == rows == [restarted.spool.absolute(instance.path)]


def test_non_ct_storage_classes_are_accepted_and_recorded(start_node: Any) -> None:
    philips = require_data("philips-phantom")
    secondary = philips / "S21610" / "S4010" / "I10"
    mr = pydicom_file("MR_small.dcm")
    node = start_node()
    assert store_files(node.port, [secondary, mr]) == [0, 0]
    classes = {i.sop_class_uid: i for i in all_instances(node)}
    assert set(classes) == {SECONDARY_CAPTURE, MR}
    assert {s.modality for s in all_series(node)} == {"CT", "MR"}
    for instance in classes.values():
        assert node.spool.absolute(instance.path).is_file()


def test_whole_philips_exam_sent_with_the_cli(start_node: Any) -> None:
    philips = require_data("philips-phantom")
    node = start_node()
    result = run_cli(["send", str(philips), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "Success: 118" in lines
    passed_over = [line for line in lines if line.startswith("passed over:")]
    dicomdirs = [line for line in passed_over if "DIRFILE" in line and "DICOMDIR" in line]
    assert len(dicomdirs) == 5
    assert {Path(line.split()[2].rstrip(":")).name for line in passed_over} == {"DIRFILE", "README.md", "LICENSE"}
    assert not [line for line in lines if line.startswith(("not sent:", "failed:"))]

    expected = {}
    for folder, count in {"S1000": 1, "S2010": 54, "S3010": 58, "S4010": 5}.items():
        first = next(p for p in sorted((philips / "S21610" / folder).iterdir()) if p.name != "DIRFILE")
        expected[str(dcmread(first, stop_before_pixels=True).SeriesInstanceUID)] = count
    for series_uid, count in expected.items():
        wait_series_state(node, series_uid, db.COMPLETE, instance_count=count)
    assert len(all_series(node)) == 4
    assert len(all_instances(node)) == 118
    classes = {i.sop_class_uid for i in all_instances(node)}
    assert classes == {CT, SECONDARY_CAPTURE}


# -- series life cycle -------------------------------------------------------
def test_late_slice_reopens_a_complete_series(start_node: Any) -> None:
    files = ge_files()
    # stable_seconds long enough that the test sees "receiving" right after the late slice.
    node = start_node(series={"stable_seconds": 1.0, "check_interval_seconds": 0.1})
    series_uid = ge_series_uid()
    assert store_files(node.port, files[:5]) == [0] * 5
    first = wait_series_state(node, series_uid, db.COMPLETE, instance_count=5)
    assert first.version == 1

    assert store_files(node.port, files[5:6]) == [0]
    reopened = series_by_uid(node, series_uid)
    assert (reopened.state, reopened.version, reopened.instance_count) == (db.RECEIVING, 1, 6)

    second = wait_series_state(node, series_uid, db.COMPLETE, instance_count=6)
    assert second.version == 2
    assert second.completed_at > first.completed_at


def test_an_identical_resend_of_a_complete_series_changes_nothing(start_node: Any) -> None:
    # A routing rule that fires twice, a study sent again: the series is not
    # completed, scored and reported again for images it already holds.
    storescu = require_tool("storescu")
    files = ge_files()
    series_uid = ge_series_uid()
    node = start_node()

    def send(*options: str) -> None:
        command = [storescu, *options, "-aet", "PACS", "-aec", "ICHNODE", "127.0.0.1", str(node.port)]
        result = run_dcmtk([*command, *map(str, files)])
        assert result.returncode == 0, result.stdout + result.stderr

    send()
    complete = wait_series_state(node, series_uid, db.COMPLETE, instance_count=28, version=1)
    send()
    again = series_by_uid(node, series_uid)
    assert (again.state, again.version, again.instance_count) == (db.COMPLETE, 1, 28)
    assert again.last_received_at > complete.last_received_at  # received, all the same (retention counts from it)
    assert {i.times_received for i in all_instances(node)} == {2}
    spooled, rows = _files_and_rows(node)
    assert spooled == rows and len(rows) == 28

    # The same study forwarded by a PACS in another encoding: Implicit VR,
    # or compressed without loss. The same images, so nothing changes.
    send("-xi")
    rle = dcmread(files[0])
    rle.compress(RLELossless, generate_instance_uid=False)
    assert store_files(node.port, [rle]) == [0]
    again = series_by_uid(node, series_uid)
    assert (again.state, again.version) == (db.COMPLETE, 1)
    assert sorted(i.times_received for i in all_instances(node)) == [3] * 27 + [4]

    # A copy that differs is news: the series is completed (and scored) again.
    changed = dcmread(files[0])
    changed.ImageComments = "corrected"
    assert store_files(node.port, [changed]) == [0]
    wait_series_state(node, series_uid, db.COMPLETE, instance_count=28, version=2)


@pytest.mark.parametrize("outcome", [db.FAILED, db.SKIPPED])
def test_a_study_sent_again_unchanged_tries_a_failed_or_skipped_series_again(start_node: Any, outcome: str) -> None:
    # The way to have a series the worker failed (or skipped, before a fix of
    # the settings) scored: send the study again.
    node = start_node()
    series_uid, sops = generate_uid(), [generate_uid() for _ in range(3)]
    images = [_ct(sop, series_uid) for sop in sops]
    assert store_files(node.port, images) == [0] * 3
    wait_series_state(node, series_uid, db.COMPLETE, instance_count=3, version=1)
    with db.transaction(node.sessions) as session:
        session.execute(update(db.Series).where(db.Series.series_uid == series_uid).values(state=outcome))
    assert store_files(node.port, images) == [0] * 3
    wait_series_state(node, series_uid, db.COMPLETE, instance_count=3, version=2)


def test_an_instance_refiled_into_another_series_reopens_the_series_it_left(start_node: Any) -> None:
    node = start_node()
    left, emptied, other = generate_uid(), generate_uid(), generate_uid()
    sops, lone = [generate_uid() for _ in range(3)], generate_uid()
    assert store_files(node.port, [_ct(sop, left) for sop in sops] + [_ct(lone, emptied)]) == [0] * 4
    before = wait_series_state(node, left, db.COMPLETE, instance_count=3, version=1)
    wait_series_state(node, emptied, db.COMPLETE, instance_count=1, version=1)

    # The PACS re-files one image of each into another series.
    assert store_files(node.port, [_ct(sops[0], other), _ct(lone, other)]) == [0, 0]
    assert series_by_uid(node, left).last_received_at > before.last_received_at
    # Completed again without it: its next result supersedes one made with it.
    wait_series_state(node, left, db.COMPLETE, instance_count=2, version=2)
    wait_series_state(node, emptied, db.COMPLETE, instance_count=0, version=2)
    wait_series_state(node, other, db.COMPLETE, instance_count=2, version=1)
    spooled, rows = _files_and_rows(node)
    assert spooled == rows and len(rows) == 4


def test_a_series_emptied_by_refiling_is_not_scored_and_its_result_is_superseded(nodes: Any) -> None:
    from tests.pipeline_support import phantom, results_of, wait_result

    node = nodes.start(components=("receiver", "worker"))
    datasets = phantom(5, n_slices=12).datasets
    emptied = str(datasets[0].SeriesInstanceUID)
    assert store_files(node.port, datasets) == [0] * 12
    assert wait_result(node.sessions, emptied, instances=12).status == db.SCORED

    refiled = generate_uid()
    for ds in datasets:
        ds.SeriesInstanceUID = refiled
    assert store_files(node.port, datasets) == [0] * 12
    result = wait_result(node.sessions, emptied, version=2, timeout=60)
    assert (result.status, result.slice_count, result.slices) == (db.SKIPPED, 0, [])
    assert [r.superseded for r in results_of(node.sessions, emptied)] == [True, False]
    assert wait_result(node.sessions, refiled, instances=12).status == db.SCORED


def test_a_series_sent_again_under_a_corrected_patient_goes_by_it(start_node: Any, tmp_path: Path) -> None:
    # The PACS re-files a misfiled series (other patient, other study) and
    # sends it again: results name the corrected patient and study.
    node = start_node()
    series_uid, sop_uid = generate_uid(), generate_uid()
    first = _ct(sop_uid, series_uid, study_uid="1.2.826.0.1.3680043.8.498.11")
    first.PatientID, first.AccessionNumber = "WRONG-PATIENT", "ACC-1"
    corrected = _ct(sop_uid, series_uid, study_uid="1.2.826.0.1.3680043.8.498.12")
    corrected.PatientID, corrected.AccessionNumber = "RIGHT-PATIENT", "ACC-2"
    for ds in (first, corrected):
        ds.save_as(tmp_path / "one.dcm", enforce_file_format=True)
        assert store_one(node.port, tmp_path / "one.dcm").Status == 0
    series = series_by_uid(node, series_uid)
    assert (series.study_uid, series.patient_id, series.accession_number, series.instance_count) == (
        "1.2.826.0.1.3680043.8.498.12",
        "RIGHT-PATIENT",
        "ACC-2",
        1,
    )
    files, rows = _files_and_rows(node)
    assert files == rows and "1.2.826.0.1.3680043.8.498.12" in str(files[0])
    # A later image without a PatientID is the series' patient: nothing changes.
    unnamed = _ct(generate_uid(), series_uid, study_uid="1.2.826.0.1.3680043.8.498.12")
    del unnamed.PatientID
    unnamed.save_as(tmp_path / "two.dcm", enforce_file_format=True)
    assert store_one(node.port, tmp_path / "two.dcm").Status == 0
    assert series_by_uid(node, series_uid).patient_id == "RIGHT-PATIENT"


def test_completion_names_only_the_series_it_completed(tmp_path: Path) -> None:
    # A slice arrives between the completion check's query and its update:
    # the series stays receiving, and is not reported complete (which would
    # wake the worker for nothing and log a completion that did not happen).
    import time

    from sqlalchemy import event

    from ichnode.series import InstanceHeader, complete_stable_series, register_instance

    engine = db.make_engine(f"sqlite:///{tmp_path / 'ichnode.db'}")
    db.init_db(engine)
    sessions = db.session_factory(engine)
    series_uid = generate_uid()

    def register() -> None:
        header = InstanceHeader(generate_uid(), "1.2.840.10008.5.1.4.1.1.2", "1.2.3", series_uid, "")
        register_instance(sessions, header, path="x.dcm", size_bytes=1, calling_ae="CT", peer_host="127.0.0.1")

    register()
    time.sleep(0.2)
    arrived = []

    def slice_arrives(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE series SET state") and not arrived:
            arrived.append(True)
            register()

    event.listen(engine, "before_cursor_execute", slice_arrives)
    try:
        assert complete_stable_series(sessions, 0.1) == []
    finally:
        event.remove(engine, "before_cursor_execute", slice_arrives)
        engine.dispose()
    assert arrived
    with sessions() as session:
        assert session.query(db.Series.state).one() == (db.RECEIVING,)


def test_restart_completes_a_series_left_receiving(start_node: Any, tmp_path: Path) -> None:
    files = ge_files()
    series_uid = ge_series_uid()
    # First run: series never complete on their own before the stop.
    config = parse_config(config_data(tmp_path, series={"stable_seconds": 3600}), base=tmp_path)
    node = start_node(config=config)
    assert store_files(node.port, files[:4]) == [0] * 4
    node.stop()
    assert series_by_uid(node, series_uid).state == db.RECEIVING

    # Leftovers of a crash: a partial temp file, and a whole spooled file whose row was lost.
    (node.spool.tmp_dir / "receiver-0" / "interrupted.dcm").write_bytes(b"\0" * 100)
    (node.spool.tmp_dir / "report.part").write_bytes(b"\0" * 100)
    orphan_uid = str(dcmread(files[4], stop_before_pixels=True).SOPInstanceUID)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    orphan = node.spool.absolute(node.spool.instance_path(study_uid, series_uid, orphan_uid))
    orphan.write_bytes(files[4].read_bytes())

    restarted_config = config.model_copy(
        update={"series": config.series.model_copy(update={"stable_seconds": 0.5})}
    )
    restarted = start_node(config=restarted_config)
    series = wait_series_state(restarted, series_uid, db.COMPLETE, instance_count=5)
    assert series.version == 1
    assert [p for p in restarted.spool.tmp_dir.rglob("*") if p.is_file()] == []
    assert orphan_uid in {i.sop_instance_uid for i in all_instances(restarted)}
    assert echo_ok(restarted.port)


def _listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (several with node.receiver_processes)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A")


@pytest.mark.parametrize("processes", [1, 2])
def test_concurrent_associations_store_one_series(start_node: Any, processes: int) -> None:
    """Several senders at once (a PACS with parallel associations) still make one
    series, also when several receiver processes share the port."""
    import threading

    files = ge_files()
    node = start_node(node={"receiver_processes": processes})
    wait_for(lambda: _listening_sockets(node.port) == processes, timeout=60, message="receiver processes listening")
    results: dict[int, list[int | None]] = {}

    def send(index: int) -> None:
        results[index] = store_files(node.port, files[index::4], calling_ae=f"SENDER{index}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(s for statuses in results.values() for s in statuses) == [0] * 28
    wait_series_state(node, ge_series_uid(), db.COMPLETE, instance_count=28)
    assert len(all_series(node)) == 1
    assert len(all_instances(node)) == 28
    node.stop()
    assert not any(process.is_alive() for process in node._extra_receivers)
    assert _listening_sockets(node.port) == 0


def test_new_uid_for_each_store_is_a_new_instance(start_node: Any, tmp_path: Path) -> None:
    """Same pixels, new SOP Instance UID: a second instance, not a duplicate."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    copies = []
    for index in range(3):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        path = tmp_path / f"copy{index}.dcm"
        ds.save_as(path)
        copies.append(path)
    node = start_node()
    assert store_files(node.port, copies) == [0, 0, 0]
    instances = all_instances(node)
    assert sorted(i.instance_number for i in instances) == [1, 2, 3]
    assert {i.times_received for i in instances} == {1}
    (series,) = all_series(node)
    assert series.instance_count == 3


def test_a_host_name_of_access_allow_is_looked_up_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # A failed lookup is not kept, and an address moves: names are resolved
    # again after receiver.HOST_LOOKUP_SECONDS.
    import socket

    from ichnode import receiver
    from ichnode.config import AccessConfig

    answers = [OSError("temporary failure in name resolution"), "10.0.0.5", "10.0.0.5", "10.0.0.6"]

    def getaddrinfo(host: str, port: Any) -> list[Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, 0))]

    monkeypatch.setattr(receiver.socket, "getaddrinfo", getaddrinfo)
    policy = receiver.AccessPolicy(AccessConfig(allow=[{"ae_title": "CT1", "host": "ct1.example"}]), "ICHNODE")
    assert policy.check("CT1", "ICHNODE", "10.0.0.5") is not None  # the lookup failed
    assert policy.check("CT1", "ICHNODE", "10.0.0.5") is None  # tried again
    assert policy.check("CT1", "ICHNODE", "10.0.0.5") is None  # from the cache: no lookup
    assert answers == ["10.0.0.5", "10.0.0.6"]
    monkeypatch.setattr(receiver, "HOST_LOOKUP_SECONDS", 0.0)
    assert policy.check("CT1", "ICHNODE", "10.0.0.5") is None
    assert policy.check("CT1", "ICHNODE", "10.0.0.5") is not None  # the name moved to 10.0.0.6


def test_a_second_node_on_the_same_spool_is_refused(start_node: Any, tmp_path: Path) -> None:
    # It would remove the first one's files in transit at its start.
    from ichnode.spool import SpoolInUse

    config = parse_config(config_data(tmp_path), base=tmp_path)
    first = start_node(config=config)
    with pytest.raises(SpoolInUse, match="another ichnode receiver is running on the spool"):
        start_node(config=config)
    assert echo_ok(first.port)
    first.stop()
    assert echo_ok(start_node(config=config).port)  # once the first has stopped


@pytest.mark.parametrize("fsync", [True, False])
def test_each_image_reaches_the_disk_before_its_success(
    start_node: Any, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    # What survives a power loss: the image's bytes and its name in the
    # series folder are flushed (os.fsync, recorded here, not replaced)
    # before the C-STORE is answered; with storage.fsync off, neither is.
    node = start_node(storage={"fsync": fsync})
    flushed: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert store_files(node.port, [pydicom_file("CT_small.dcm")]) == [0]
    monkeypatch.setattr(os, "fsync", real_fsync)
    (row,) = all_instances(node)
    stored = node.spool.absolute(row.path)
    if not fsync:
        assert flushed == []
        return
    receiving = node.spool.tmp_dir / "receiver-0"
    # The received file (fsynced under its name in the receiving folder, then renamed) and the folder it went to.
    assert [p.parent for p in flushed if p.suffix == ".dcm"] == [receiving]
    assert stored.parent in flushed
