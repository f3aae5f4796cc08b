"""The peer launchers in tests/peers.py start real servers, answer, and stop."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.peers import IchnodeProcess, Orthanc, dicom_echo, free_port, require_tool


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_require_tool_finds_python_and_skips_missing() -> None:
    assert Path(require_tool("python3")).is_absolute()
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception)):
        require_tool("no-such-tool-ichnode-test")


@pytest.mark.timeout(60)
def test_orthanc_answers_rest_and_echo_then_stops(tmp_path: Path) -> None:
    with Orthanc(tmp_path, aet="ORTHANC_T", modalities={"ichnode": ("ICHNODE", "127.0.0.1", 11112)}) as orthanc:
        system = orthanc.rest("GET", "/system")
        assert system["DicomAet"] == "ORTHANC_T"
        assert system["DicomPort"] == orthanc.dicom_port
        assert orthanc.rest("GET", "/modalities") == ["ichnode"]
        assert dicom_echo("127.0.0.1", orthanc.dicom_port, orthanc.aet)
        assert orthanc.count_instances() == 0
        proc = orthanc.proc
    assert proc is not None and proc.returncode == 0


@pytest.mark.timeout(90)
def test_ichnode_process_answers_echo_and_stops_cleanly(tmp_path: Path) -> None:
    with IchnodeProcess(tmp_path, components=["receiver"]) as node:
        assert dicom_echo("127.0.0.1", node.port, node.ae_title)
        assert node.count_instances() == 0
        code = node.stop()
    assert code == 0
