"""The ``ichnode`` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ichnode import __version__
from ichnode.cli import main
from ichnode.config import load_config
from tests.conftest import (
    all_instances,
    config_data,
    free_port,
    require_data,
    run_cli,
    store_files,
    wait_series_state,
    write_config,
)


def test_help_and_version() -> None:
    result = run_cli(["--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ichnode")
    for name in main.commands:
        assert name in result.stdout
    result = run_cli(["--version"])
    assert result.returncode == 0
    assert __version__ in result.stdout


@pytest.mark.parametrize("command", sorted(main.commands))
def test_subcommand_help(command: str) -> None:
    result = run_cli([command, "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: ichnode {command}")


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = run_cli(["recieve"])
    assert result.returncode == 2
    assert "No such command 'recieve'" in result.stderr


@pytest.fixture
def node_from_file(tmp_path: Path, start_node: Any) -> tuple[Any, Path]:
    """An in-process node started from a YAML file the CLI can read too."""
    path = write_config(
        tmp_path / "ichnode.yaml",
        config_data(tmp_path, access={"allow": [{"ae_title": "*", "host": "127.0.0.1"}]}),
    )
    return start_node(config=load_config(path)), path


def _ct_file(path: Path, *, part10: bool = True) -> Path:
    """A small CT image (64 x 64, 16 bits): a Part 10 file, or (``part10=False``) a bare
    implicit VR little endian data set without preamble and file meta, as older archives hold."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.PatientID, ds.InstanceNumber = "CLI-TEST", 1
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(range(256)) * 32
    if part10:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def test_echo_a_running_node(node_from_file: tuple[Any, Path]) -> None:
    node, _ = node_from_file
    result = run_cli(["echo", f"ICHNODE@127.0.0.1:{node.port}"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"C-ECHO ICHNODE@127.0.0.1:{node.port}: 0x0000 (Success)" in result.stdout


def test_echo_a_closed_port_fails_clearly() -> None:
    port = free_port()  # nothing listens there
    result = run_cli(["echo", f"ICHNODE@127.0.0.1:{port}"])
    assert result.returncode == 1
    assert f"cannot connect to ICHNODE@127.0.0.1:{port}: Connection refused" in result.stdout


def test_echo_a_refused_ae_title_fails_clearly(start_node: Any) -> None:
    node = start_node(access={"allow": [{"ae_title": "CT_SCANNER_1"}]})
    result = run_cli(["echo", f"WRONG_AE@127.0.0.1:{node.port}", "--calling-ae", "CT_SCANNER_1"])
    assert result.returncode == 1
    assert "rejected" in result.stdout
    assert "reason 0x07" in result.stdout  # called AE title not recognised
    result = run_cli(["echo", f"ICHNODE@127.0.0.1:{node.port}", "--calling-ae", "INTRUDER"])
    assert result.returncode == 1
    assert "rejected" in result.stdout
    assert "reason 0x03" in result.stdout  # calling AE title not recognised
    result = run_cli(["echo", f"ICHNODE@127.0.0.1:{node.port}", "--calling-ae", "CT_SCANNER_1"])
    assert result.returncode == 0, result.stdout


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose accept backlog is full, so that the kernel drops every further
    SYN: what a client sees of a firewall that drops packets."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)  # and never accept
    port = server.getsockname()[1]
    fillers = []
    while len(fillers) < 4:  # connect until one is no longer answered: the backlog is full
        filler = socket.socket()
        filler.settimeout(0.5)
        fillers.append(filler)
        try:
            filler.connect(("127.0.0.1", port))
        except TimeoutError:
            break
    try:
        yield port
    finally:
        for sock in [*fillers, server]:
            sock.close()


def test_echo_to_a_peer_that_drops_syns_times_out(silent_port: int) -> None:
    from ichnode.scu import echo

    # In a thread: without a connect timeout the kernel retries SYNs for ~2 minutes.
    outcome: list[tuple[bool, str]] = []
    started = time.monotonic()
    thread = threading.Thread(
        target=lambda: outcome.append(echo("PEER", "127.0.0.1", silent_port, timeout=1)), daemon=True
    )
    thread.start()
    thread.join(timeout=15)
    assert outcome, f"echo still blocked after {time.monotonic() - started:.0f} s"
    ((ok, line),) = outcome
    assert not ok
    assert f"cannot connect to PEER@127.0.0.1:{silent_port}: timed out" in line


@pytest.fixture
def picky_pacs() -> Iterator[int]:
    """A PACS that answers only the calling AE title ICHNODE, as PACSs that check calling AE titles do; its port."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

    pacs = AE("PICKY_PACS")
    pacs.require_calling_aet = ["ICHNODE"]
    pacs.add_supported_context(Verification)
    pacs.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_echo_and_send_call_as_the_node(tmp_path: Path, picky_pacs: int) -> None:
    # The documented check, `ichnode echo PACS@host:port`, calls with the AE
    # title the node's reports are sent with: node.ae_title of the configuration.
    address = f"PICKY_PACS@127.0.0.1:{picky_pacs}"
    defaults = {k: v for k, v in os.environ.items() if k != "ICHNODE_CONFIG"}
    result = run_cli(["echo", address], cwd=tmp_path, env=defaults)  # no config file: the embedded defaults
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"C-ECHO {address}: 0x0000 (Success)" in result.stdout
    one_file = sorted(require_data("ge-head-ct").glob("*.dcm"))[:1]
    result = run_cli(["send", str(one_file[0]), "--to", address, "--no-progress"], cwd=tmp_path, env=defaults)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: 1" in result.stdout.splitlines()

    # --config names the node whose AE title is used; --calling-ae still overrides it.
    other = write_config(tmp_path / "other.yaml", {"node": {"ae_title": "OTHER_NODE"}})
    result = run_cli(["echo", address, "--config", str(other)], cwd=tmp_path, env=defaults)
    assert result.returncode == 1
    assert "reason 0x03" in result.stdout  # calling AE title not recognised
    result = run_cli(["send", str(one_file[0]), "--to", address, "--config", str(other), "--no-progress"])
    assert result.returncode == 1
    assert "Not sent: 1" in result.stdout.splitlines()
    result = run_cli(["echo", address, "--config", str(other), "--calling-ae", "ICHNODE"], cwd=tmp_path, env=defaults)
    assert result.returncode == 0, result.stdout + result.stderr


def test_echo_needs_an_address() -> None:
    result = run_cli(["echo", "ICHNODE-127.0.0.1-11112"])
    assert result.returncode == 2
    assert "expected AE@HOST:PORT" in result.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["echo", "ICHNODE_ARCHIVE_NODE_1@127.0.0.1:11112"], "Invalid value for 'ADDRESS': AE title must be 1 to 16"),
        (["echo", "PACS@127.0.0.1:70000"], "Invalid value for 'ADDRESS': port must be 1 to 65535, got 70000"),
        (
            ["echo", "PACS@127.0.0.1:11112", "--calling-ae", "THIS_IS_WAY_TOO_LONG_AE"],
            "Invalid value for '--calling-ae': AE title must be 1 to 16",
        ),
        (["send", "{file}", "--to", "PACS@127.0.0.1:0"], "Invalid value for '--to': port must be 1 to 65535, got 0"),
        (
            ["send", "{file}", "--to", "PACS@127.0.0.1:11112", "--calling-ae", "ICHNODE_SCANNER_01"],
            "Invalid value for '--calling-ae': AE title must be 1 to 16",
        ),
    ],
    ids=["long called AE", "port out of range", "long calling AE", "send port 0", "send long calling AE"],
)
def test_echo_and_send_refuse_a_bad_ae_title_or_port(tmp_path: Path, args: list[str], error: str) -> None:
    file = _ct_file(tmp_path / "ct.dcm")
    result = run_cli([arg.format(file=file) for arg in args])
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"Error: {error}"), result.stderr
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr
    assert result.stdout == ""  # refused before any file is read or any peer called


def test_echo_and_send_name_a_host_that_does_not_resolve(tmp_path: Path) -> None:
    file = _ct_file(tmp_path / "ct.dcm")
    result = run_cli(["echo", "PACS@pacs.invalid:104"])
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    assert line.startswith("cannot resolve host pacs.invalid: "), line
    assert "Traceback" not in result.stderr
    result = run_cli(["send", str(file), "--to", "PACS@pacs.invalid:104", "--no-progress"])
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == "Not sent: 1"
    assert result.stdout.splitlines()[1].startswith("failed: cannot resolve host pacs.invalid: ")
    assert "Traceback" not in result.stderr


def test_send_a_folder_prints_a_summary(node_from_file: tuple[Any, Path]) -> None:
    node, _ = node_from_file
    folder = require_data("ge-head-ct")
    result = run_cli(["send", str(folder), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
    # Files of the folder that are not images are passed over: every image was stored.
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "Success: 28" in lines
    assert sorted(Path(line.split()[2].rstrip(":")).name for line in lines if line.startswith("passed over:")) == [
        "LICENSE",
        "README.md",
    ]
    assert not [line for line in lines if line.startswith("not sent:")]
    assert not [line for line in lines if line.startswith("failed:")]
    assert len(all_instances(node)) == 28


def test_send_counts_every_file_when_the_peer_drops_the_association() -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from ichnode.scu import send_files

    received = []

    def abort_on_third(event: Any) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        if len(received) == 3:
            event.assoc.abort()
        return 0x0000

    peer = AE("DROPPER")
    peer.supported_contexts = AllStoragePresentationContexts
    server = peer.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, abort_on_third)])
    try:
        files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:6]
        summary = send_files(files, "DROPPER", "127.0.0.1", server.socket.getsockname()[1], timeout=5)
    finally:
        server.shutdown()
    assert not summary.all_stored
    assert summary.statuses["Success"] == 2
    assert sum(summary.statuses.values()) == 6  # every file is accounted for
    assert summary.statuses["Not sent"] >= 1
    assert any("not sent" in line for line in summary.failures)


def test_send_goes_on_past_a_file_the_peer_accepted_no_context_for(tmp_path: Path, recorder: Any) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from ichnode.scu import send_files

    pacs = recorder(sop_classes=[CTImageStorage])  # no Secondary Capture
    sc = Dataset()
    sc.file_meta = FileMetaDataset()
    sc.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sc.SOPClassUID, sc.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.Modality = generate_uid(), generate_uid(), "OT"
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    cts = sorted(require_data("ge-head-ct").glob("*.dcm"))[:2]

    summary = send_files([cts[0], tmp_path / "sc.dcm", cts[1]], pacs.ae_title, "127.0.0.1", pacs.port, timeout=5)
    assert sorted(r.sop_class_uid for r in pacs.stored()) == [CTImageStorage] * 2
    assert summary.statuses == {"Success": 2, "Not sent": 1}
    (failure,) = summary.failures
    assert failure.startswith(f"{tmp_path / 'sc.dcm'}: not sent: ")
    assert "Secondary Capture" in failure
    assert not summary.all_stored


def test_send_reaches_a_peer_that_accepts_only_implicit_vr(tmp_path: Path, recorder: Any) -> None:
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from ichnode.scu import send_files
    from tests.pipeline_support import phantom, write_series

    pacs = recorder(transfer_syntaxes=[ImplicitVRLittleEndian])
    files = write_series(phantom(4, n_slices=2).datasets, tmp_path / "series")
    assert {dcmread(f).file_meta.TransferSyntaxUID for f in files} == {ExplicitVRLittleEndian}
    summary = send_files(files, pacs.ae_title, "127.0.0.1", pacs.port, timeout=5)
    assert summary.statuses == {"Success": 2} and len(pacs.stored()) == 2


def test_send_to_a_refusing_node_exits_1(start_node: Any) -> None:
    node = start_node(access={"allow": [{"ae_title": "CT_SCANNER_1"}]})
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))[:3]
    result = run_cli(["send", *map(str, files), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
    assert result.returncode == 1
    assert "Not sent: 3" in result.stdout.splitlines()
    assert "rejected" in result.stdout
    assert all_instances(node) == []


def test_send_exits_1_when_a_file_is_not_stored(node_from_file: tuple[Any, Path], tmp_path: Path) -> None:
    node, _ = node_from_file
    good = _ct_file(tmp_path / "ct.dcm")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    result = run_cli(["send", str(good), str(notes), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["Success: 1", f"not sent: {notes}: not a DICOM file (InvalidDicomError)"]


def test_send_sends_a_data_set_without_file_meta(node_from_file: tuple[Any, Path], tmp_path: Path) -> None:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ImplicitVRLittleEndian

    node, _ = node_from_file
    bare = _ct_file(tmp_path / "bare.dcm", part10=False)
    with pytest.raises(InvalidDicomError):  # no preamble, no "DICM", no file meta
        dcmread(bare)
    result = run_cli(["send", str(bare), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["Success: 1"]
    (instance,) = all_instances(node)
    sent = dcmread(bare, force=True)
    assert instance.sop_instance_uid == sent.SOPInstanceUID
    assert instance.transfer_syntax_uid == ImplicitVRLittleEndian
    stored = dcmread(node.spool.root / instance.path)
    assert stored.PixelData == sent.PixelData


def test_send_refuses_a_file_cut_off_inside_its_pixel_data(node_from_file: tuple[Any, Path], tmp_path: Path) -> None:
    # An interrupted copy: sent, it would replace the good copy the node holds.
    node, _ = node_from_file
    good = _ct_file(tmp_path / "good.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-3000])
    address = f"ICHNODE@127.0.0.1:{node.port}"
    assert run_cli(["send", str(good), "--to", address, "--no-progress"]).returncode == 0
    result = run_cli(["send", str(cut), "--to", address, "--no-progress"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"not sent: {cut}: truncated: Pixel Data (7FE0,0010) is 8192 bytes, the file has 5192"
    ]
    (instance,) = all_instances(node)
    assert instance.times_received == 1
    assert (node.spool.root / instance.path).stat().st_size == instance.size_bytes


def test_send_names_a_deflated_file_too_large_to_send(node_from_file: tuple[Any, Path], tmp_path: Path) -> None:
    # In a folder, it is said why it is not sent (not passed over as "not DICOM").
    from tests.test_dicomfile import deflated_ct

    node, _ = node_from_file
    (tmp_path / "folder").mkdir()
    bomb = deflated_ct(tmp_path / "folder" / "bomb.dcm", 16384, 16384)
    result = run_cli(["send", str(bomb.parent), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"not sent: {bomb}: deflated data set inflates past 256 MiB" in result.stdout.splitlines()
    assert all_instances(node) == []


def test_send_refuses_a_file_cut_inside_an_element_header(node_from_file: tuple[Any, Path], tmp_path: Path) -> None:
    # Cut 4 bytes into Pixel Data's header, pydicom reads the rest without a
    # word: sent, the image would arrive without its pixels.
    node, _ = node_from_file
    whole = _ct_file(tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: whole.rindex(b"\xe0\x7f\x10\x00") + 4])
    result = run_cli(["send", str(cut), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"not sent: {cut}: truncated: 4 bytes after Pixel Representation (0028,0103) are no whole element"
    ]
    assert all_instances(node) == []


def test_send_keeps_the_transfer_syntax_of_a_file_meta_without_preamble(
    node_from_file: tuple[Any, Path], tmp_path: Path
) -> None:
    # Compressed pixels in a file that lost its preamble: sent as compressed,
    # not relabelled as native. A deflated file is whole, however short.
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import RLELossless

    node, _ = node_from_file
    compressed = dcmread(_ct_file(tmp_path / "ct.dcm"))
    compressed.compress(RLELossless)
    compressed.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    headless = tmp_path / "headless.dcm"
    headless.write_bytes((tmp_path / "rle.dcm").read_bytes()[132:])  # no preamble, no "DICM"
    deflated = Path(get_testdata_file("image_dfl.dcm"))
    result = run_cli(["send", str(headless), str(deflated), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["Success: 2"]
    stored = {i.sop_instance_uid: i for i in all_instances(node)}
    rle = stored[compressed.SOPInstanceUID]
    assert rle.transfer_syntax_uid == RLELossless
    assert (dcmread(node.spool.root / rle.path).pixel_array == compressed.pixel_array).all()


def test_status_json_reports_what_the_node_holds(node_from_file: tuple[Any, Path]) -> None:
    node, path = node_from_file
    files = sorted(require_data("ge-head-ct").glob("*.dcm"))
    assert store_files(node.port, files[:6]) == [0] * 6
    assert store_files(node.port, files[:1]) == [0]  # one duplicate
    from pydicom import dcmread

    wait_series_state(node, str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID), "complete")

    result = run_cli(["status", "--json", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["instances"]["total"] == 6
    assert report["instances"]["received_again"] == 1
    assert report["series"] == {"complete": 1}
    spooled = [p for p in node.spool.instances_dir.rglob("*.dcm")]
    assert len(spooled) == 6
    assert report["spool_bytes"] == sum(p.stat().st_size for p in spooled)
    free_mb = shutil.disk_usage(node.spool.root).free / 2**20
    assert abs(report["free_disk_mb"] - free_mb) < max(512, 0.05 * free_mb)
    assert report["spool_dir"] == str(node.spool.root)

    text = run_cli(["status", "--config", str(path)])
    assert text.returncode == 0, text.stderr
    assert "complete 1" in text.stdout
    assert "total 6" in text.stdout


def test_status_hides_the_database_password(node_from_file: tuple[Any, Path], tmp_path: Path) -> None:
    # SQLite takes no password; the read-only path opens the file and ignores it,
    # and the line shown is the one a PostgreSQL URL gets.
    node, _ = node_from_file
    database = Path(node.config.database.url.removeprefix("sqlite:///"))
    path = write_config(
        tmp_path / "with-password.yaml",
        config_data(tmp_path, database={"url": f"sqlite://ichnode:s3cret@/{database}"}),
    )
    text = run_cli(["status", "--config", str(path)])
    assert text.returncode == 0, text.stderr
    assert f"database     sqlite://ichnode:***@/{database}" in text.stdout.splitlines()
    as_json = run_cli(["status", "--json", "--config", str(path)])
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["database"] == f"sqlite://ichnode:***@/{database}"
    assert "s3cret" not in text.stdout + text.stderr + as_json.stdout + as_json.stderr


def test_reading_commands_do_not_create_a_database(tmp_path: Path) -> None:
    # A config that is not the node's (a typo in --config) must say so, not show an empty new database.
    path = write_config(tmp_path / "other.yaml", {"database": {"url": "sqlite:///nowhere/ichnode.db"}})
    for command in (["status"], ["results", "list"], ["results", "show", "1.2.3"]):
        result = run_cli([*command, "--config", str(path)])
        assert result.returncode == 1, command
        assert f"no database at {tmp_path / 'nowhere' / 'ichnode.db'}" in result.stderr
    assert not (tmp_path / "nowhere" / "ichnode.db").exists()


def _foreign_sqlite(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    other.close()


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (lambda path: path.write_bytes(b""), "is not an ichnode database"),
        (_foreign_sqlite, "is not an ichnode database"),
        (lambda path: path.write_bytes(b"not SQLite at all " * 300), "file is not a database"),
    ],
    ids=["empty file", "another program's SQLite", "not SQLite"],
)
def test_reading_commands_name_a_database_that_is_not_the_nodes(tmp_path: Path, make: Any, cause: str) -> None:
    database = tmp_path / "data" / "ichnode.db"
    database.parent.mkdir()
    make(database)
    before = database.read_bytes()
    path = write_config(tmp_path / "node.yaml", {"database": {"url": f"sqlite:///{database}"}})
    for command in (["status"], ["results", "list"], ["results", "show", "1.2.3"]):
        result = run_cli([*command, "--config", str(path)])
        assert result.returncode == 1, command
        assert result.stderr.startswith("Error: "), result.stderr
        assert str(database) in result.stderr
        assert cause in result.stderr
        assert "Traceback" not in result.stderr
    # Commands that only read leave the file as it was, and add none beside it.
    assert database.read_bytes() == before
    assert sorted(p.name for p in database.parent.iterdir()) == ["ichnode.db"]


def test_reading_commands_see_a_running_nodes_database_through_a_link(tmp_path: Path) -> None:
    # SQLite keeps -wal beside the link's target: a reader that looked
    # beside the link took the database for closed and read it as immutable,
    # missing what the running node had committed to its write-ahead log.
    from pydicom.uid import generate_uid

    from ichnode import db
    from ichnode.series import InstanceHeader, register_instance

    real = tmp_path / "data" / "ichnode.db"
    engine = db.make_engine(f"sqlite:///{real}")
    db.init_db(engine)
    header = InstanceHeader(generate_uid(), "1.2.840.10008.5.1.4.1.1.2", generate_uid(), generate_uid(), "")
    register_instance(db.session_factory(engine), header, path="x.dcm", size_bytes=1, calling_ae="CT", peer_host=None)
    link = tmp_path / "ichnode.db"
    link.symlink_to(real)
    try:
        assert Path(f"{real}-wal").exists()  # the node's connection is still open
        reader = db.open_existing(f"sqlite:///{link}")
        with reader.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM series").scalar() == 1
        reader.dispose()
    finally:
        engine.dispose()


def test_status_with_a_bad_config_exits_1(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yaml", {"node": {"portt": 1}})
    result = run_cli(["status", "--config", str(path)])
    assert result.returncode == 1
    assert "node.portt" in result.stderr


def test_requeue_needs_the_nodes_database(tmp_path: Path) -> None:
    # It changes the database, but never makes one where a wrong --config points.
    path = write_config(tmp_path / "other.yaml", {"database": {"url": "sqlite:///nowhere/ichnode.db"}})
    result = run_cli(["requeue", "--config", str(path)])
    assert result.returncode == 1
    assert f"no database at {tmp_path / 'nowhere' / 'ichnode.db'}" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_requeue_needs_a_destination_as_an_address() -> None:
    result = run_cli(["requeue", "--destination", "PACS"])
    assert result.returncode == 2
    assert "expected AE@HOST:PORT, got 'PACS'" in result.stderr


def _newer_schema(path: Path) -> None:
    from ichnode import db

    engine = db.make_engine(f"sqlite:///{path}")
    db.init_db(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    engine.dispose()


def test_serve_names_a_database_it_cannot_open(tmp_path: Path) -> None:
    # A server URL where nothing listens on the port (or, without psycopg, its
    # driver not installed). Either way: one line, password hidden.
    port = free_port()
    server = f"postgresql+psycopg://ichnode:s3cret@127.0.0.1:{port}/ichnode"
    not_sqlite = tmp_path / "not-sqlite.db"
    not_sqlite.write_bytes(b"not SQLite at all " * 300)
    newer = tmp_path / "newer.db"
    _newer_schema(newer)
    cases = [
        (server, f"postgresql+psycopg://ichnode:***@127.0.0.1:{port}/ichnode", ""),
        (f"sqlite:///{not_sqlite}", f"sqlite:///{not_sqlite}", "file is not a database"),
        (f"sqlite:///{newer}", f"sqlite:///{newer}", "database schema version 99 is newer than this ichnode"),
    ]
    for url, shown, cause in cases:
        path = write_config(tmp_path / "node.yaml", config_data(tmp_path, port=free_port(), database={"url": url}))
        result = run_cli(["serve", "--config", str(path), "--components", "receiver"], timeout=60)
        assert result.returncode == 1, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"Error: cannot start: cannot open the database {shown}: {cause}"), line
        assert "s3cret" not in result.stderr
        assert not (tmp_path / "spool").exists()  # nothing was set up


@pytest.mark.parametrize(
    "login", ["ichnode:s3cret@127.0.0.1:{port}/ichnode", "ichnode@127.0.0.1:{port}/ichnode?password=s3cret"]
)
def test_check_config_names_a_database_server_it_cannot_reach_and_hides_the_password(
    tmp_path: Path, login: str
) -> None:
    # As serve would fail on it, check-config says so, before the node is started.
    pytest.importorskip("psycopg")
    url = "postgresql+psycopg://" + login.format(port=free_port())
    path = write_config(tmp_path / "node.yaml", {"database": {"url": url}})
    result = run_cli(["check-config", "--config", str(path)])
    assert result.returncode == 1
    heading, problem = result.stderr.splitlines()
    assert heading == "error: invalid configuration:"
    assert problem.startswith("  database.url: cannot connect: ") and "refused" in problem, problem
    assert "s3cret" not in result.stderr + result.stdout
    status = run_cli(["status", "--config", str(path)])
    assert status.returncode == 1 and "***" in status.stderr and "s3cret" not in status.stderr
    from ichnode.config import load_config

    shown = load_config(path).to_yaml()
    assert "url: postgresql+psycopg://ichnode" in shown and "***" in shown and "s3cret" not in shown


def test_serve_gives_up_on_a_database_server_that_does_not_answer(tmp_path: Path, silent_port: int) -> None:
    # Packets dropped (a host gone, a firewall): a bounded wait, then one line.
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://ichnode@127.0.0.1:{silent_port}/ichnode"
    path = write_config(tmp_path / "node.yaml", config_data(tmp_path, port=free_port(), database={"url": url}))
    started = time.monotonic()
    result = run_cli(["serve", "--config", str(path), "--components", "receiver"], timeout=60)
    assert result.returncode == 1 and time.monotonic() - started < 40
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: cannot start: cannot open the database {url}: ") and "timeout" in line, line


@pytest.mark.parametrize(
    ("url", "driver"),
    [("mysql+mysqldb://ichnode@db.example/ichnode", "MySQLdb"), ("postgresql+nodriver://x@h/x", None)],
    ids=["mysqlclient not installed", "no such driver"],
)
def test_check_config_names_a_database_driver_that_is_not_installed(
    tmp_path: Path, url: str, driver: str | None
) -> None:
    import importlib.util

    if driver and importlib.util.find_spec(driver):
        pytest.skip(f"{driver} is installed here")
    path = write_config(tmp_path / "node.yaml", {"database": {"url": url}})
    result = run_cli(["check-config", "--config", str(path)])
    assert result.returncode == 1
    heading, problem = result.stderr.splitlines()
    assert heading == "error: invalid configuration:"
    assert problem.startswith(f"  database.url: cannot load the driver for {url.split(':', 1)[0]}: "), problem


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    """Run what is started inside with ``mask`` as its umask, as a shell or systemd would."""
    saved = os.umask(mask)
    try:
        yield
    finally:
        os.umask(saved)


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"),
    [(0o022, 0o640, 0o750), (0o077, 0o600, 0o700)],
    ids=["usual umask 022", "stricter umask 077 stays"],
)
def test_serve_keeps_patient_data_from_other_users(
    node_process: Any, tmp_path: Path, umask: int, file_mode: int, folder_mode: int
) -> None:
    node = node_process()
    with _umask(umask):
        node.start()
    assert store_files(node.port, [_ct_file(tmp_path / "ct.dcm")]) == [0]
    created = [tmp_path / "spool", *(tmp_path / "spool").rglob("*"), *tmp_path.glob("ichnode.db*")]
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in created}
    assert modes["ichnode.db"] == file_mode
    assert modes["spool"] == folder_mode
    too_open = {
        path: oct(mode)
        for path, mode in modes.items()
        if mode & ~(folder_mode if (tmp_path / path).is_dir() else file_mode)
    }
    assert not too_open


def test_send_a_folder_with_no_files_says_so(tmp_path: Path) -> None:
    # A mistyped series folder that exists but holds nothing: not a silent exit 1.
    folder = tmp_path / "series"
    (folder / "empty-too").mkdir(parents=True)
    result = run_cli(["send", str(folder), "--to", f"PACS@127.0.0.1:{free_port()}", "--no-progress"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"failed: no files found under {folder}"]


@pytest.mark.parametrize("components", ["", " , "])
def test_serve_refuses_no_components(tmp_path: Path, components: str) -> None:
    # It would run, doing nothing, until stopped.
    path = write_config(tmp_path / "node.yaml", config_data(tmp_path, port=free_port()))
    result = run_cli(["serve", "--config", str(path), "--components", components], timeout=60)
    assert result.returncode == 2
    assert "Error: Invalid value for --components: name at least one of receiver, worker, dispatcher" in result.stderr
    assert not (tmp_path / "ichnode.db").exists()


def test_serve_names_a_keras_backend_that_is_not_installed(tmp_path: Path) -> None:
    from tests.test_config import _missing_keras_backend

    missing = _missing_keras_backend()
    path = write_config(tmp_path / "node.yaml", config_data(tmp_path, port=free_port()))
    env = {**os.environ, "KERAS_BACKEND": missing}
    result = run_cli(["serve", "--config", str(path), "--components", "worker"], env=env, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Error: cannot start: Keras backend {missing!r} (KERAS_BACKEND) cannot be loaded in this environment: "
        f"No module named {missing!r}"
    )


def _id_uid_file(path: Path) -> Path:
    """A CT image whose UIDs are RSNA-style "ID_..." names: accepted, though not conformant."""
    import warnings

    from pydicom import dcmread

    _ct_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
        stem = path.stem.replace("-", "")[:9]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"ID_{stem}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "ID_1f6d1e8aeb", "ID_2a7c0e9b1d"
        ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the node in this process reading them
def test_send_of_non_conformant_uids_keeps_stderr_clean(node_from_file: tuple[Any, Path], tmp_path: Path) -> None:
    node, _ = node_from_file
    files = [_id_uid_file(tmp_path / f"a{index:08x}.dcm") for index in range(4)]
    result = run_cli(["send", *map(str, files), "--to", f"ICHNODE@127.0.0.1:{node.port}", "--no-progress"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["Success: 4"]
    assert result.stderr == ""
