"""Shared helpers for the receiver, config, CLI and crash tests.

Everything runs over real associations on free localhost ports. Nothing
waits with a fixed sleep: :func:`wait_for` polls a condition until a deadline.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ICHNODE_SHARED_DATA", REPO.parent / "shared" / "data"))

T = TypeVar("T")


# -- availability ------------------------------------------------------------
# Peers (DCMTK, Orthanc, dicom3tools) must be there in CI: require_tool fails
# when CI=true and one is missing, and skips elsewhere.
from .peers import deep_merge, free_port, require_tool  # noqa: E402,F401  (used by the tests through conftest)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.tools(...)``: the programs a test runs are looked for
    before its fixtures are made, so that a missing one fails it under
    CI=true even where a fixture would skip it first (the shared data absent)."""
    for marker in item.iter_markers("tools"):
        for name in marker.args:
            require_tool(name)


def require_data(name: str) -> Path:
    """A folder of the shared real data, read in place (never copied into the repo).

    It lives beside the repository (``../shared/data``, or ``$ICHNODE_SHARED_DATA``);
    a checkout without it skips the tests that need it, saying where it looked.
    """
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"shared data {path} is not present")
    return path


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY DCMTK stalls ~45 ms per image (Nagle + delayed ACK).
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


# -- polling -----------------------------------------------------------------
def wait_for(
    condition: Callable[[], T],
    timeout: float = 15.0,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}; last value: {last!r}")
        time.sleep(interval)


# -- configuration -----------------------------------------------------------
def config_data(root: Path, port: int = 0, **sections: dict[str, Any]) -> dict[str, Any]:
    """A test configuration mapping: its own spool and SQLite file under ``root``."""
    data: dict[str, Any] = {
        "node": {"ae_title": "ICHNODE", "host": "127.0.0.1", "port": port},
        "access": {"allow": [{"ae_title": "*", "host": "127.0.0.1"}]},
        "storage": {"spool_dir": str(root / "spool"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{root / 'ichnode.db'}"},
        "series": {"stable_seconds": 0.5, "check_interval_seconds": 0.1},
        "logging": {"level": "INFO"},
    }
    return deep_merge(data, sections)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# -- in-process nodes --------------------------------------------------------
@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory: ``start_node(**sections)`` starts a Node on a free port; all are stopped at teardown.

    ``start_node(config=cfg)`` starts one on an existing Config (a restart).
    """
    from ichnode.config import parse_config
    from ichnode.service import Node

    nodes: list[Node] = []

    def start(config: Any = None, **sections: dict[str, Any]) -> Node:
        if config is None:
            config = parse_config(config_data(tmp_path, **sections), base=tmp_path)
        # The receiver and series completion only: no model is loaded and no
        # worker moves complete series on, so these tests see what the receiver did.
        node = Node(config, components=("receiver",))
        nodes.append(node)
        node.start()
        return node

    yield start
    for node in nodes:
        node.stop(grace_seconds=5)


# -- database views ----------------------------------------------------------
def all_series(node: Any) -> list[Any]:
    from sqlalchemy import select

    from ichnode import db

    with node.sessions() as session:
        return list(session.scalars(select(db.Series).order_by(db.Series.id)))


def all_instances(node: Any) -> list[Any]:
    from sqlalchemy import select

    from ichnode import db

    with node.sessions() as session:
        return list(session.scalars(select(db.Instance).order_by(db.Instance.id)))


def series_by_uid(node: Any, series_uid: str) -> Any:
    from sqlalchemy import select

    from ichnode import db

    with node.sessions() as session:
        return session.scalars(select(db.Series).where(db.Series.series_uid == series_uid)).one_or_none()


def wait_series_state(node: Any, series_uid: str, state: str, timeout: float = 20.0, **expected: Any) -> Any:
    """Poll until the series is in ``state`` (and has the ``expected`` column values)."""

    def check() -> Any:
        row = series_by_uid(node, series_uid)
        if row is None or row.state != state:
            return None
        if any(getattr(row, key) != value for key, value in expected.items()):
            return None
        return row

    return wait_for(check, timeout=timeout, message=f"series {series_uid} to be {state} with {expected}")


def spool_instance_files(spool_dir: Path) -> list[Path]:
    return sorted((spool_dir / "instances").rglob("*")) if (spool_dir / "instances").exists() else []


# -- DICOM helpers -----------------------------------------------------------
def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: everything after the file meta."""
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part 10 file"
    # (0002,0000) UL group length: tag 4 + VR 2 + length 2 + value 4 bytes.
    assert raw[132:136] == b"\x02\x00\x00\x00", f"{path} has no file meta group length"
    group_length = struct.unpack("<I", raw[140:144])[0]
    return raw[144 + group_length :]


def store_files(
    port: int,
    paths: Sequence[Path | Any],
    *,
    calling_ae: str = "TEST_SCU",
    called_ae: str = "ICHNODE",
    source_host: str = "127.0.0.1",
) -> list[int | None]:
    """C-STORE files (paths or Datasets) over one pynetdicom association from
    ``source_host`` (any 127.x address is this machine); their statuses."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    contexts = set()
    for item in paths:
        meta = item.file_meta if isinstance(item, Dataset) else dcmread(item, stop_before_pixels=True).file_meta
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, bind_address=(source_host, 0))
    assert assoc.is_established, f"association to {called_ae}@127.0.0.1:{port} failed"
    statuses: list[int | None] = []
    try:
        for item in paths:
            response = assoc.send_c_store(item)
            statuses.append(int(response.Status) if response is not None and "Status" in response else None)
    finally:
        assoc.release()
    return statuses


def echo_ok(port: int, called_ae: str = "ICHNODE", calling_ae: str = "TEST_SCU", host: str = "127.0.0.1") -> bool:
    """One pynetdicom C-ECHO; True on status Success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    try:
        response = assoc.send_c_echo()
        return "Status" in response and int(response.Status) == 0
    finally:
        assoc.release()


# -- subprocess nodes and the CLI -------------------------------------------
def ichnode_cmd() -> list[str]:
    """The installed console script, else ``python -m ichnode.cli``."""
    script = Path(sys.executable).parent / "ichnode"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ichnode.cli"]


def run_cli(args: Sequence[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("cwd", REPO)
    return subprocess.run(ichnode_cmd() + list(args), capture_output=True, text=True, timeout=timeout, **kwargs)


class NodeProcess:
    """``ichnode serve`` in a subprocess, its log in a file."""

    def __init__(self, config_path: Path, port: int, log_path: Path, components: str = "receiver") -> None:
        self.config_path = config_path
        self.components = components
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> NodeProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ichnode_cmd() + ["serve", "--config", str(self.config_path), "--components", self.components],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.config_path.parent,
            start_new_session=True,  # its own process group, as under systemd or in a terminal
        )
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            return echo_ok(self.port)

        wait_for(ready, timeout=timeout, interval=0.1, message=f"the node on port {self.port} to answer C-ECHO")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """Signal the node and its helper processes, as Ctrl-C in a terminal does."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: ``node_process(**sections)`` writes a config and returns a (not yet started) NodeProcess."""
    procs: list[NodeProcess] = []

    def make(root: Path | None = None, **sections: dict[str, Any]) -> NodeProcess:
        root = root or tmp_path
        port = free_port()
        config_path = write_config(root / "ichnode.yaml", config_data(root, port=port, **sections))
        proc = NodeProcess(config_path, port, root / "node.log")
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        proc.stop()


def open_db(url: str) -> Any:
    """A sessionmaker on a node's database, read from the test process."""
    from ichnode import db

    engine = db.make_engine(url)
    return engine, db.session_factory(engine)


# -- full nodes (receiver, worker, dispatcher) and a recording destination ----
@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Any]:
    from .pipeline_support import node_factory

    yield from node_factory(tmp_path)


@pytest.fixture
def recorder() -> Iterator[Callable[..., Any]]:
    from .pipeline_support import recorder_factory

    yield from recorder_factory()
